#include "vmm/pci/hotplug.h"

#include <string>
#include <string_view>

#include "absl/strings/str_format.h"
#include "vmm/base/log.h"
#include "vmm/boot/aml.h"

namespace microvmm::pci {

PciHotplugController::PciHotplugController(std::function<void(bool)> set_irq)
    : set_irq_(std::move(set_irq)) {}

void PciHotplugController::UpdateIrqLocked() {
  bool level = (up_ | down_) != 0;
  if (level == level_) return;
  level_ = level;
  if (set_irq_) set_irq_(level);
}

void PciHotplugController::SlotAdded(uint8_t slot) {
  std::lock_guard lock(mu_);
  up_ |= 1u << (slot & 31);
  UpdateIrqLocked();
}

void PciHotplugController::RestorePending(uint32_t up) {
  std::lock_guard lock(mu_);
  up_ = up & ~1u;  // slot 0 (the host bridge) is never hotplugged
  UpdateIrqLocked();
}

uint32_t PciHotplugController::pending_up() const {
  std::lock_guard lock(mu_);
  return up_;
}

bool PciHotplugController::irq_level() const {
  std::lock_guard lock(mu_);
  return level_;
}

uint64_t PciHotplugController::eject_requests() const {
  std::lock_guard lock(mu_);
  return ejects_;
}

void PciHotplugController::Read(uint64_t offset, std::span<uint8_t> data) {
  uint32_t v = 0xffffffffu;
  if (data.size() == 4 && offset % 4 == 0) {
    std::lock_guard lock(mu_);
    if (offset == kPciHotplugRegUp) v = up_;
    else if (offset == kPciHotplugRegDown) v = down_;
    else v = 0;  // PCEJ and the reserved dword read as zero
  }
  for (size_t i = 0; i < data.size(); ++i)
    data[i] = i < 4 ? static_cast<uint8_t>(v >> (8 * i)) : 0xff;
}

void PciHotplugController::Write(uint64_t offset, std::span<const uint8_t> data) {
  if (data.size() != 4 || offset % 4 != 0) {
    LOG_WARN_RATELIMITED("PCI hotplug: ignored %d-byte write at register 0x%x", data.size(),
                         offset);
    return;
  }
  uint32_t v = 0;
  for (size_t i = 0; i < 4; ++i) v |= uint32_t{data[i]} << (8 * i);
  std::lock_guard lock(mu_);
  if (offset == kPciHotplugRegUp) {
    up_ &= ~v;  // write 1 to clear
  } else if (offset == kPciHotplugRegDown) {
    down_ &= ~v;
  } else if (offset == kPciHotplugRegEject) {
    ++ejects_;
    LOG_WARN_RATELIMITED(
        "PCI hotplug: the guest asked to eject slot bitmap 0x%x: eject is not supported, the "
        "device stays",
        v);
  }
  UpdateIrqLocked();
}

// ---- AML (vmm/boot/aml.h) ---------------------------------------------------------------------
namespace {

using aml::Append;
using aml::Bytes;
using aml::Integer;
using aml::Name;
using aml::Pkg;

Bytes Seg(std::string_view s) { return Bytes(s.begin(), s.end()); }

std::string SlotSeg(int slot) { return absl::StrFormat("S%02X_", slot); }

}  // namespace

std::vector<uint8_t> BuildPciHotplugAml(uint32_t slot_mask, uint16_t io_base, uint32_t gsi) {
  slot_mask &= ~1u;  // 00:00.0 is the host bridge
  Bytes pci0;
  // OperationRegion (PHPR, SystemIO, io_base, 16)
  {
    Bytes b{aml::kExtOpPrefix, aml::kOpRegionOp, 'P', 'H', 'P', 'R'};
    b.push_back(0x01);  // RegionSpace SystemIO
    Append(b, Integer(io_base));
    Append(b, Integer(kPciHotplugIoLen));
    Append(pci0, b);
  }
  // Field (PHPR, DWordAcc, NoLock, WriteAsZeros) { PCIU, 32, PCID, 32, PCEJ, 32 }
  // FieldFlags: AccessType bits 3:0 (3 = DWordAcc), LockRule bit 4 (0 = NoLock), UpdateRule
  // bits 6:5 (2 = WriteAsZeros: a W1C register must not get ones written back). Each NamedField
  // is NameSeg + its width in bits as a PkgLength-style encoding (32 fits in one byte).
  {
    Bytes fields;
    for (std::string_view f : {"PCIU", "PCID", "PCEJ"}) {
      Append(fields, Seg(f));
      fields.push_back(32);
    }
    Bytes head = Seg("PHPR");
    head.push_back(0x43);
    Append(pci0, Pkg({aml::kExtOpPrefix, aml::kFieldOp}, head, fields));
  }
  // Device (Sxx_) { Name (_ADR, xx << 16); Name (_SUN, xx); Method (_EJ0, 1) { PCEJ = 1 << xx } }
  Bytes notify;  // PCNT's body after the ack
  for (int slot = 1; slot < 32; ++slot) {
    if (!(slot_mask & (1u << slot))) continue;
    Bytes dev;
    Append(dev, Name("_ADR", Integer(uint32_t(slot) << 16)));  // device << 16 | function (0)
    Append(dev, Name("_SUN", Integer(slot)));
    Append(dev, aml::Method("_EJ0", 1, aml::Store(Integer(1u << slot), Seg("PCEJ"))));
    Append(pci0, aml::Device(SlotSeg(slot), dev));
    // If (And (Local0, 1 << xx)) { Notify (Sxx_, 1) }   -- 1: Device Check
    Bytes pred{aml::kAndOp, aml::kLocal0};
    Append(pred, Integer(1u << slot));
    pred.push_back(aml::kZeroOp);  // Target: NullName
    Bytes then{aml::kNotifyOp};
    Append(then, Seg(SlotSeg(slot)));
    Append(then, Integer(1));
    Append(notify, Pkg({aml::kIfOp}, pred, then));
  }
  // Method (PCNT, 0) { Local0 = PCIU; PCIU = Local0 (acknowledge exactly what we saw: a slot
  // added meanwhile keeps its bit and the interrupt); then the Notifies }
  Bytes pcnt = aml::Store(Seg("PCIU"), Bytes{aml::kLocal0});
  Append(pcnt, aml::Store(Bytes{aml::kLocal0}, Seg("PCIU")));
  Append(pcnt, notify);
  Append(pci0, aml::Method("PCNT", 0, pcnt));

  // Scope (\_SB.PCI0) { ... }
  Bytes out = aml::Scope("\\\x2E_SB_PCI0", pci0);  // RootChar DualNamePrefix _SB_ PCI0

  // Device (PHPE) { _HID "ACPI0013", _UID 0, _CRS Interrupt (ResourceConsumer, Level,
  // ActiveHigh, Exclusive) { gsi }, Method (_EVT, 1) { \_SB.PCI0.PCNT } }
  Bytes crs{0x89, 6, 0};  // Extended Interrupt Descriptor (§6.4.3.6), length: flags, count, 1 DWORD
  crs.push_back(0x01);     // consumer, level-triggered, active-high, exclusive, not wake
  crs.push_back(1);
  for (int i = 0; i < 4; ++i) crs.push_back(static_cast<uint8_t>(gsi >> (8 * i)));
  Bytes ged;
  Append(ged, Name("_HID", aml::String("ACPI0013")));
  Append(ged, Name("_UID", Integer(0)));
  Append(ged, Name("_CRS", aml::ResourceTemplate(crs)));
  // \_SB.PCI0.PCNT: a MethodInvocation with no arguments is just its NamePath. _EVT's Arg0 is
  // the GSI that fired; this GED has only ours.
  Bytes call{aml::kRootChar, aml::kMultiNamePrefix, 3};
  Append(call, Seg("_SB_PCI0PCNT"));
  Append(ged, aml::Method("_EVT", 1, call));
  Append(out, aml::Device("PHPE", ged));
  return out;
}

}  // namespace microvmm::pci
