// x86 CPU set-up for boot: long-mode page tables and segments, 32-bit flat protected mode (PVH),
// CPUID built from KVM_GET_SUPPORTED_CPUID with topology, boot MSRs, e820 map.
#ifndef MICROVMM_VMM_BOOT_X86_SETUP_H_
#define MICROVMM_VMM_BOOT_X86_SETUP_H_

#include "vmm/kvm/linux_kvm.h"

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "vmm/kvm/kvm.h"
#include "vmm/memory/guest_memory.h"

namespace microvmm {

// Writes the boot GDT and the identity page tables (first 4 GiB, 2 MiB pages) into guest RAM.
absl::Status WriteBootTables(GuestMemory& mem);

// Segment/control registers for 64-bit long mode using the tables above.
void SetupLongModeSregs(kvm_sregs& sregs);
// Flat 32-bit protected mode, paging off (PVH entry).
void SetupProtectedModeSregs(kvm_sregs& sregs);

// CPUID for vCPU `vcpu_id` of `num_vcpus`: supported leaves with the APIC ID, topology
// (leaf 1, 4, 0xB), hypervisor bit set. Pure function (unit tested).
CpuidTable BuildVcpuCpuid(const CpuidTable& supported, uint32_t vcpu_id, uint32_t num_vcpus);

// MSRs every vCPU starts with (SYSENTER/STAR/..., TSC, MISC_ENABLE with fast strings).
std::vector<kvm_msr_entry> BootMsrs();

// FPU state after reset (FCW 0x37f, MXCSR 0x1f80).
kvm_fpu BootFpu();

struct E820Entry {
  uint64_t addr;
  uint64_t size;
  uint32_t type;  // 1 = RAM, 2 = reserved, 3 = ACPI tables
};
inline constexpr uint32_t kE820Ram = 1;
inline constexpr uint32_t kE820Reserved = 2;
inline constexpr uint32_t kE820Acpi = 3;

// e820 map, sorted: low RAM up to the EBDA; the EBDA..1 MiB hole reserved except the ACPI table
// area [layout::kAcpiStart, +kAcpiSize) (ACPI); RAM from 1 MiB to the MMIO gap; the PCI ECAM
// window [pci::kEcamBase, +kEcamSize) reserved (Linux only uses MMCONFIG that is reserved);
// RAM above 4 GiB. Pure function (unit tested).
std::vector<E820Entry> BuildE820(uint64_t ram_bytes);

}  // namespace microvmm

#endif  // MICROVMM_VMM_BOOT_X86_SETUP_H_
