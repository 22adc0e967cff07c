// ACPI tables for the guest (ACPI 6.0): RSDP (revision 2) -> XSDT -> FADT (-> DSDT), MADT, MCFG.
//
// Everything lives in guest RAM at layout::kAcpiStart (0xE0000, inside the BIOS area that Linux
// scans for the RSDP when the boot protocol does not hand it over); the e820 map (BuildE820)
// marks that area ACPI (type 3) and reserves the ECAM window.
//
// Platform model described:
//  - FADT: HW_REDUCED_ACPI (no PM timer, no SCI, no GPE blocks, no FACS), like Firecracker and
//    Cloud Hypervisor. Reset register = port 0xCF9 (value 6) when the PCI root bus decodes it.
//  - MADT: one enabled local APIC per vCPU (APIC ID = ACPI processor UID = index), the in-kernel
//    IOAPIC (ID = number of vCPUs, as in the MP table; GSI base 0; 24 pins), LINT1 = NMI on every
//    CPU, PCAT_COMPAT. No interrupt source overrides: KVM's PIT raises GSI 0 and our GSI routing
//    (pci::DefaultIrqchipRoutes, KVM's defaults) sends GSI n to IOAPIC pin n, so ISA IRQs are
//    identity-mapped, which is what ACPI assumes without overrides. QEMU's "IRQ0 -> GSI2"
//    override is only right because QEMU re-routes GSI 0 to IOAPIC pin 2; here it would send the
//    timer to the cascade pin.
//  - MCFG: one ECAM allocation, segment 0, buses 0..ecam_end_bus.
//  - DSDT: \_SB.PCI0 (PNP0A08/PNP0A03, _SEG/_BBN/_UID 0, _CRS = bus range, conf1 ports
//    0xCF8-0xCFF, the I/O, 32-bit and 64-bit MMIO windows, _PRT = INTx routing, see PciIntxGsi),
//    \_SB.MRES (PNP0C02 motherboard
//    resource holding the ECAM range: Linux's late MMCONFIG check looks for it), and, as
//    configured, COM1 (PNP0501, 0x3F8 IRQ 4) and the PS/2 keyboard controller (PNP0303, 0x60/0x64
//    IRQ 1). Reduced-hardware Linux has no legacy PIC, so ISA devices get their IRQs from these
//    _CRS entries.
#ifndef MICROVMM_VMM_BOOT_ACPI_H_
#define MICROVMM_VMM_BOOT_ACPI_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "vmm/memory/guest_memory.h"
#include "vmm/pci/bar_allocator.h"

namespace microvmm {

struct AcpiConfig {
  uint32_t num_vcpus = 1;  // 1..254 (xAPIC IDs; 255 is broadcast)
  // PCI segment 0. Windows are half-open [start, end); an empty window is left out of _CRS.
  uint64_t ecam_base = pci::kEcamBase;
  uint8_t ecam_end_bus = 0;  // ECAM size = (end_bus + 1) MiB
  pci::PciWindows pci_windows;
  bool i8042 = true;          // FADT IAPC_BOOT_ARCH 8042 flag + PNP0303 device
  bool com1 = true;           // PNP0501 at 0x3F8, IRQ 4
  bool cmos_rtc = false;      // false: FADT "CMOS RTC not present" (we emulate no RTC)
  bool reset_via_cf9 = true;  // FADT RESET_REG = I/O 0xCF9, value 6
  // Extra AML terms appended inside Scope(\_SB) after everything above (PCI hotplug objects,
  // vmm/pci/hotplug.h). Not checked here: the caller builds well-formed AML.
  std::vector<uint8_t> sb_aml;
};

// The tables as they must appear at guest-physical address `base` (16-byte aligned, below 4 GiB);
// the RSDP is the first 36 bytes. Pure (unit tested). INVALID_ARGUMENT for a bad config.
absl::StatusOr<std::vector<uint8_t>> BuildAcpiTables(const AcpiConfig& cfg, uint64_t base);

// Writes the tables at layout::kAcpiStart and returns the RSDP's guest-physical address (pass it
// to LoadLinux via LinuxBootSpec::rsdp_addr).
absl::StatusOr<uint64_t> WriteAcpiTables(GuestMemory& mem, const AcpiConfig& cfg);

// Legacy INTx routing of PCI bus 0 (described to the guest by the DSDT's \_SB.PCI0._PRT; the
// VMM wires a passthrough function's INTx to the same GSI): INTA#..INTD# (`pin` 0..3) of device
// `slot` go to IOAPIC pin 16 + (slot + pin) % 8 — the IOAPIC-only, level-triggered pins 16..23
// (GSIs 0..15 are ISA). The usual swizzle, so neighbouring slots rarely share a line.
inline constexpr uint32_t kPciIntxFirstGsi = 16;
inline constexpr uint32_t kPciIntxGsis = 8;
uint32_t PciIntxGsi(uint32_t slot, uint32_t pin);

// EISA ID compression used by _HID/_CID ("PNP0A08" -> 0x080AD041). Exposed for tests.
uint32_t EisaId(const char (&id)[8]);

}  // namespace microvmm

#endif  // MICROVMM_VMM_BOOT_ACPI_H_
