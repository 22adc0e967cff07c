#include "vmm/pci/hotplug.h"

#include <string>
#include <string_view>

#include "absl/strings/str_format.h"
#include "vmm/base/log.h"

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

// ---- AML (ACPI 6.0 §19.6 / §20) ------------------------------------------------------------
namespace {

using Bytes = std::vector<uint8_t>;

enum : uint8_t {
  kZeroOp = 0x00, kOneOp = 0x01, kNameOp = 0x08, kBytePrefix = 0x0A, kWordPrefix = 0x0B,
  kDWordPrefix = 0x0C, kStringPrefix = 0x0D, kScopeOp = 0x10, kBufferOp = 0x11,
  kMethodOp = 0x14, kDualNamePrefix = 0x2E, kMultiNamePrefix = 0x2F, kExtOpPrefix = 0x5B,
  kRootChar = 0x5C, kLocal0 = 0x60, kStoreOp = 0x70, kAndOp = 0x7B, kNotifyOp = 0x86,
  kIfOp = 0xA0,
  // after kExtOpPrefix
  kOpRegionOp = 0x80, kFieldOp = 0x81, kDeviceOp = 0x82,
};

void Put(Bytes& b, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) b.push_back(static_cast<uint8_t>(v >> (8 * i)));
}
void Append(Bytes& b, const Bytes& more) { b.insert(b.end(), more.begin(), more.end()); }
void PutName(Bytes& b, std::string_view s) { b.insert(b.end(), s.begin(), s.end()); }

// PkgLength (§20.2.4) of a package whose contents after the PkgLength are `body` bytes; the
// encoded value counts the PkgLength bytes too. One byte up to 63, else 1-3 extra bytes.
Bytes PkgLength(size_t body) {
  Bytes b;
  if (body + 1 < 0x40) {
    Put(b, body + 1, 1);
    return b;
  }
  for (int extra = 1; extra <= 3; ++extra) {
    size_t total = body + 1 + extra;
    if (total < (size_t{1} << (4 + 8 * extra))) {
      Put(b, (extra << 6) | (total & 0xF), 1);
      for (int i = 0; i < extra; ++i) Put(b, total >> (4 + 8 * i), 1);
      return b;
    }
  }
  return b;  // > 256 MiB: unreachable for our tables
}

// Op PkgLength <head> <terms>: the layout of Scope, Device, Method, If, Field, Buffer.
Bytes Pkg(std::initializer_list<uint8_t> op, const Bytes& head, const Bytes& terms) {
  Bytes b(op);
  Append(b, PkgLength(head.size() + terms.size()));
  Append(b, head);
  Append(b, terms);
  return b;
}

Bytes Int(uint64_t v) {
  Bytes b;
  if (v == 0) return {kZeroOp};
  if (v == 1) return {kOneOp};
  if (v <= 0xFF) { b.push_back(kBytePrefix); Put(b, v, 1); }
  else if (v <= 0xFFFF) { b.push_back(kWordPrefix); Put(b, v, 2); }
  else { b.push_back(kDWordPrefix); Put(b, v, 4); }  // 32-bit is all we emit
  return b;
}

Bytes Seg(std::string_view s) { return Bytes(s.begin(), s.end()); }

Bytes Name(std::string_view seg, const Bytes& value) {
  Bytes b{kNameOp};
  PutName(b, seg);
  Append(b, value);
  return b;
}

Bytes String(std::string_view s) {
  Bytes b{kStringPrefix};
  PutName(b, s);
  b.push_back(0);
  return b;
}

Bytes Method(std::string_view seg, uint8_t args, const Bytes& terms) {
  Bytes head = Seg(seg);
  head.push_back(args & 7);  // MethodFlags: arg count, not serialized, sync level 0
  return Pkg({kMethodOp}, head, terms);
}

Bytes Store(const Bytes& src, const Bytes& dst) {
  Bytes b{kStoreOp};
  Append(b, src);
  Append(b, dst);
  return b;
}

std::string SlotSeg(int slot) { return absl::StrFormat("S%02X_", slot); }

}  // namespace

std::vector<uint8_t> BuildPciHotplugAml(uint32_t slot_mask, uint16_t io_base, uint32_t gsi) {
  slot_mask &= ~1u;  // 00:00.0 is the host bridge
  Bytes pci0;
  // OperationRegion (PHPR, SystemIO, io_base, 16)
  {
    Bytes b{kExtOpPrefix, kOpRegionOp};
    PutName(b, "PHPR");
    b.push_back(0x01);  // RegionSpace SystemIO
    Append(b, Int(io_base));
    Append(b, Int(kPciHotplugIoLen));
    Append(pci0, b);
  }
  // Field (PHPR, DWordAcc, NoLock, WriteAsZeros) { PCIU, 32, PCID, 32, PCEJ, 32 }
  // FieldFlags: AccessType bits 3:0 (3 = DWordAcc), LockRule bit 4 (0 = NoLock), UpdateRule
  // bits 6:5 (2 = WriteAsZeros: a W1C register must not get ones written back). Each NamedField
  // is NameSeg + its width in bits as a PkgLength-style encoding (32 fits in one byte).
  {
    Bytes fields;
    for (std::string_view f : {"PCIU", "PCID", "PCEJ"}) {
      PutName(fields, f);
      fields.push_back(32);
    }
    Bytes head = Seg("PHPR");
    head.push_back(0x43);
    Append(pci0, Pkg({kExtOpPrefix, kFieldOp}, head, fields));
  }
  // Device (Sxx_) { Name (_ADR, xx << 16); Name (_SUN, xx); Method (_EJ0, 1) { PCEJ = 1 << xx } }
  Bytes notify;  // PCNT's body after the ack
  for (int slot = 1; slot < 32; ++slot) {
    if (!(slot_mask & (1u << slot))) continue;
    Bytes dev;
    Append(dev, Name("_ADR", Int(uint32_t(slot) << 16)));  // device << 16 | function (0)
    Append(dev, Name("_SUN", Int(slot)));
    Append(dev, Method("_EJ0", 1, Store(Int(1u << slot), Seg("PCEJ"))));
    Append(pci0, Pkg({kExtOpPrefix, kDeviceOp}, Seg(SlotSeg(slot)), dev));
    // If (And (Local0, 1 << xx)) { Notify (Sxx_, 1) }   -- 1: Device Check
    Bytes pred{kAndOp, kLocal0};
    Append(pred, Int(1u << slot));
    pred.push_back(kZeroOp);  // Target: NullName
    Bytes then{kNotifyOp};
    Append(then, Seg(SlotSeg(slot)));
    Append(then, Int(1));
    Append(notify, Pkg({kIfOp}, pred, then));
  }
  // Method (PCNT, 0) { Local0 = PCIU; PCIU = Local0 (acknowledge exactly what we saw: a slot
  // added meanwhile keeps its bit and the interrupt); then the Notifies }
  Bytes pcnt = Store(Seg("PCIU"), Bytes{kLocal0});
  Append(pcnt, Store(Bytes{kLocal0}, Seg("PCIU")));
  Append(pcnt, notify);
  Append(pci0, Method("PCNT", 0, pcnt));

  // Scope (\_SB.PCI0) { ... }
  Bytes path{kRootChar, kDualNamePrefix};
  PutName(path, "_SB_PCI0");
  Bytes out = Pkg({kScopeOp}, path, pci0);

  // Device (PHPE) { _HID "ACPI0013", _UID 0, _CRS Interrupt (ResourceConsumer, Level,
  // ActiveHigh, Exclusive) { gsi }, Method (_EVT, 1) { \_SB.PCI0.PCNT } }
  Bytes crs;
  crs.push_back(0x89);  // Extended Interrupt Descriptor (§6.4.3.6)
  Put(crs, 6, 2);       // length: flags, count, one DWORD
  crs.push_back(0x01);  // consumer, level-triggered, active-high, exclusive, not wake
  crs.push_back(1);
  Put(crs, gsi, 4);
  crs.push_back(0x79);  // End Tag, checksum 0
  crs.push_back(0);
  Bytes crs_buf = Pkg({kBufferOp}, Int(crs.size()), crs);
  Bytes ged;
  Append(ged, Name("_HID", String("ACPI0013")));
  Append(ged, Name("_UID", Int(0)));
  Append(ged, Name("_CRS", crs_buf));
  // \_SB.PCI0.PCNT: a MethodInvocation with no arguments is just its NamePath. _EVT's Arg0 is
  // the GSI that fired; this GED has only ours.
  Bytes call{kRootChar, kMultiNamePrefix, 3};
  PutName(call, "_SB_PCI0PCNT");
  Append(ged, Method("_EVT", 1, call));
  Append(out, Pkg({kExtOpPrefix, kDeviceOp}, Seg("PHPE"), ged));
  return out;
}

}  // namespace microvmm::pci
