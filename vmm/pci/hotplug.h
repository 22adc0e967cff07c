// ACPI PCI hotplug for bus 0: the register block the guest's AML reads, the interrupt that tells
// the guest to look, and the AML itself.
//
// Why a Generic Event Device and not a FADT GPE0 block: our FADT sets HW_REDUCED_ACPI (see
// vmm/boot/acpi.h). On such a platform there is no SCI, no PM1 and no GPE block (ACPI 6.0
// §4.1), and ACPICA (Linux) does not even look at GPE0_BLK (acpi_ev_initialize_events and the
// SCI handler are skipped when acpi_gbl_reduced_hardware). The hardware-reduced equivalent of
// "GPE -> SCI -> _Lxx" is the Generic Event Device (ACPI0013, §5.6.9): an ordinary interrupt in
// its _CRS; the OS runs its _EVT method when that interrupt fires. So:
//   - PciHotplugController: I/O ports [kPciHotplugIoBase, +kPciHotplugIoLen), dword registers
//       0x0 PCIU  slots with a device added and not yet acknowledged (bit n = slot n), W1C
//       0x4 PCID  slots the host wants removed: always 0 (no hot-unplug yet), W1C
//       0x8 PCEJ  write-only: the guest's _EJ0 writes the slot's bit; eject is NOT supported,
//                 the write is logged and refused (the device stays on the bus)
//     The interrupt line (level, active high: a GED interrupt) is asserted while PCIU|PCID != 0,
//     the GPE-style "status bit set until written 1 to clear".
//   - BuildPciHotplugAml: AML for \_SB: per free slot Device(Sxx_) {_ADR, _SUN, _EJ0} in
//     \_SB.PCI0, the register block as an OperationRegion, PCNT (ack PCIU, Notify(Sxx_, 1 =
//     Device Check) for each bit: what Linux acpiphp turns into a rescan of that slot), and the
//     GED \_SB.PHPE with _CRS = Interrupt(level, high){gsi} and _EVT calling PCNT.
// Freestanding test guests cannot run AML: they simply rescan config space.
#ifndef MICROVMM_VMM_PCI_HOTPLUG_H_
#define MICROVMM_VMM_PCI_HOTPLUG_H_

#include <cstdint>
#include <functional>
#include <mutex>
#include <span>
#include <vector>

#include "vmm/bus.h"

namespace microvmm::pci {

inline constexpr uint16_t kPciHotplugIoBase = 0xAE00;  // below the PCI I/O window (0xC000)
inline constexpr uint16_t kPciHotplugIoLen = 0x10;
inline constexpr uint32_t kPciHotplugRegUp = 0x0;
inline constexpr uint32_t kPciHotplugRegDown = 0x4;
inline constexpr uint32_t kPciHotplugRegEject = 0x8;
// IOAPIC pin of the GED interrupt: free here (serial 4, i8042 1/12, FADT SCI_INT 9 is avoided
// because old kernels configure SCI_INT level/low; INTx _PRT routes use 16-23).
inline constexpr uint32_t kPciHotplugGsi = 5;

// Thread-safe: vCPU threads access the registers, the API thread calls SlotAdded.
class PciHotplugController : public BusDevice {
 public:
  // `set_irq(level)` drives the interrupt line; called on every change, never concurrently.
  explicit PciHotplugController(std::function<void(bool)> set_irq);

  // A device was placed in `slot` (1..31): sets its PCIU bit and asserts the interrupt.
  void SlotAdded(uint8_t slot);
  // Saved state: the PCIU bits the guest has not acknowledged yet (a migration in between must
  // not lose the event); restoring re-asserts the interrupt when any is set.
  uint32_t pending_up() const;
  void RestorePending(uint32_t up);
  bool irq_level() const;
  uint64_t eject_requests() const;

  void Read(uint64_t offset, std::span<uint8_t> data) override;
  void Write(uint64_t offset, std::span<const uint8_t> data) override;

 private:
  void UpdateIrqLocked();

  std::function<void(bool)> set_irq_;
  mutable std::mutex mu_;
  uint32_t up_ = 0;
  uint32_t down_ = 0;
  bool level_ = false;
  uint64_t ejects_ = 0;
};

// AML terms to append inside Scope(\_SB) after Device(PCI0): hotplug objects for every slot
// whose bit is set in `slot_mask` (slot 0, the host bridge, is never hotpluggable), the register
// block at `io_base` and the GED on `gsi`.
std::vector<uint8_t> BuildPciHotplugAml(uint32_t slot_mask, uint16_t io_base = kPciHotplugIoBase,
                                        uint32_t gsi = kPciHotplugGsi);

}  // namespace microvmm::pci

#endif  // MICROVMM_VMM_PCI_HOTPLUG_H_
