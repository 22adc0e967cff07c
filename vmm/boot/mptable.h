// Intel MultiProcessor Specification 1.4 table, so Linux finds every vCPU and the IOAPIC without
// ACPI. Written at the start of the EBDA (which the e820 map reserves).
#ifndef MICROVMM_VMM_BOOT_MPTABLE_H_
#define MICROVMM_VMM_BOOT_MPTABLE_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "vmm/memory/guest_memory.h"

namespace microvmm {

inline constexpr uint64_t kIoapicAddr = 0xFEC00000;
inline constexpr uint64_t kLapicAddr = 0xFEE00000;
inline constexpr int kIoapicPins = 24;

// Builds the floating pointer + configuration table for `num_vcpus` as it must appear at guest
// physical address `base`. Pure (unit tested).
std::vector<uint8_t> BuildMpTable(uint32_t num_vcpus, uint64_t base);

absl::Status WriteMpTable(GuestMemory& mem, uint32_t num_vcpus);

}  // namespace microvmm

#endif  // MICROVMM_VMM_BOOT_MPTABLE_H_
