// Intel MultiProcessor Specification 1.4 table, so Linux finds every vCPU, the IOAPIC and the PCI
// INTx routing without ACPI (acpi=off). Written at the start of the EBDA (which the e820 map
// reserves).
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
// Bus entries: PCI bus 0 is MP bus 0 (consumers take the MP bus id for the PCI bus number), the
// ISA bus (legacy IRQs 0..15, identity-mapped to IOAPIC pins) is MP bus 1.
inline constexpr uint8_t kMpPciBus = 0;
inline constexpr uint8_t kMpIsaBus = 1;
inline constexpr uint32_t kMpPciSlots = 32;  // INTA#..INTD# of each routed to PciIntxGsi

// Builds the floating pointer + configuration table for `num_vcpus` as it must appear at guest
// physical address `base`. Pure (unit tested).
std::vector<uint8_t> BuildMpTable(uint32_t num_vcpus, uint64_t base);

absl::Status WriteMpTable(GuestMemory& mem, uint32_t num_vcpus);

}  // namespace microvmm

#endif  // MICROVMM_VMM_BOOT_MPTABLE_H_
