#include "vmm/pci/pci_config.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace microvmm::pci {

const char* BarTypeName(BarType t) {
  switch (t) {
    case BarType::kNone: return "none";
    case BarType::kIo: return "io";
    case BarType::kMem32: return "mem32";
    case BarType::kMem64: return "mem64";
  }
  return "?";
}

namespace {

bool IsPowerOfTwo(uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

bool ValidAccess(uint32_t offset, unsigned size) {
  return (size == 1 || size == 2 || size == 4) && offset % size == 0 &&
         offset + size <= kConfigSpaceSize;
}

uint32_t AlignUp4(uint32_t v) { return (v + 3) & ~3u; }

}  // namespace

PciConfigSpace::PciConfigSpace(const PciHeader& h) : header_type_(h.header_type & 0x7f) {
  WriteRaw(kRegVendorId, 2, h.vendor_id);
  WriteRaw(kRegDeviceId, 2, h.device_id);
  WriteRaw(kRegRevisionId, 1, h.revision_id);
  WriteRaw(kRegClassCode, 1, h.class_code & 0xff);
  WriteRaw(kRegClassCode + 1, 2, (h.class_code >> 8) & 0xffff);
  WriteRaw(kRegHeaderType, 1, header_type_ | (h.multifunction ? kHeaderTypeMultiFunction : 0));
  WriteRaw(kRegInterruptPin, 1, h.interrupt_pin);

  // Writable fields common to both header types.
  SetWriteMask(kRegCommand, 2, kCommandWritable);
  SetWriteMask(kRegCacheLineSize, 1, 0xff);
  SetWriteMask(kRegLatencyTimer, 1, 0xff);
  SetWriteMask(kRegInterruptLine, 1, 0xff);

  if (header_type_ == kHeaderTypeBridge) {
    // Bus numbers and the secondary latency timer.
    SetWriteMask(kRegPrimaryBus, 4, 0xffffffff);
    // I/O base/limit: 16-bit I/O decode only (low nibbles read 0), upper-16 registers read 0.
    SetWriteMask(kRegIoBase, 2, 0xf0f0);
    // Memory base/limit: bits 15:4 of each.
    SetWriteMask(kRegMemoryBase, 4, 0xfff0fff0);
    // Prefetchable base/limit, 64-bit capable (low nibble 1), with the upper 32-bit halves.
    WriteRaw(kRegPrefetchBase, 4, 0x00010001);
    SetWriteMask(kRegPrefetchBase, 4, 0xfff0fff0);
    SetWriteMask(kRegPrefetchBaseUpper, 4, 0xffffffff);
    SetWriteMask(kRegPrefetchBaseUpper + 4, 4, 0xffffffff);
    SetWriteMask(kRegBridgeControl, 2, 0x0fff);
  } else {
    WriteRaw(kRegSubsystemVendorId, 2, h.subsystem_vendor_id);
    WriteRaw(kRegSubsystemId, 2, h.subsystem_id);
    // No expansion ROM: the ROM BAR reads 0 and ignores writes.
  }
}

uint32_t PciConfigSpace::ReadRaw(uint32_t offset, unsigned size) const {
  uint32_t v = 0;
  for (unsigned i = 0; i < size && offset + i < kConfigHeaderSize; ++i)
    v |= uint32_t{regs_[offset + i]} << (8 * i);
  return v;
}

void PciConfigSpace::WriteRaw(uint32_t offset, unsigned size, uint32_t value) {
  for (unsigned i = 0; i < size && offset + i < kConfigHeaderSize; ++i)
    regs_[offset + i] = static_cast<uint8_t>(value >> (8 * i));
  if (offset < kRegCommand + 2 && offset + size > kRegCommand)
    command_.store(static_cast<uint16_t>(ReadRaw(kRegCommand, 2)), std::memory_order_relaxed);
}

void PciConfigSpace::SetWriteMask(uint32_t offset, unsigned size, uint32_t mask) {
  for (unsigned i = 0; i < size && offset + i < kConfigHeaderSize; ++i)
    wmask_[offset + i] = static_cast<uint8_t>(mask >> (8 * i));
}

uint32_t PciConfigSpace::WriteMask(uint32_t offset, unsigned size) const {
  uint32_t v = 0;
  for (unsigned i = 0; i < size && offset + i < kConfigHeaderSize; ++i)
    v |= uint32_t{wmask_[offset + i]} << (8 * i);
  return v;
}

uint32_t PciConfigSpace::Read(uint32_t offset, unsigned size) const {
  if (!ValidAccess(offset, size)) return size >= 4 ? 0xffffffffu : (1u << (8 * size)) - 1;
  if (offset >= kConfigHeaderSize) return 0;  // PCIe extended space: no extended capabilities
  return ReadRaw(offset, size);
}

void PciConfigSpace::Write(uint32_t offset, unsigned size, uint32_t value) {
  if (!ValidAccess(offset, size) || offset >= kConfigHeaderSize) return;
  for (unsigned i = 0; i < size; ++i) {
    uint8_t m = wmask_[offset + i];
    uint8_t b = static_cast<uint8_t>(value >> (8 * i));
    regs_[offset + i] = static_cast<uint8_t>((regs_[offset + i] & ~m) | (b & m));
  }
  if (offset < kRegCommand + 2 && offset + size > kRegCommand)
    command_.store(static_cast<uint16_t>(ReadRaw(kRegCommand, 2)), std::memory_order_relaxed);
  CheckBarMoves(offset, size, value);
  for (const Observer& o : observers_)
    if (offset < o.offset + o.len && o.offset < offset + size) o.fn();
}

std::optional<int> PciConfigSpace::BarAt(uint32_t offset) const {
  if (offset < kRegBar0 || offset >= kRegBar0 + 4u * num_bars()) return std::nullopt;
  int reg = (offset - kRegBar0) / 4;
  if (bars_[reg].type != BarType::kNone) return reg;
  if (reg > 0 && bars_[reg - 1].type == BarType::kMem64) return reg - 1;
  return std::nullopt;
}

void PciConfigSpace::CheckBarMoves(uint32_t offset, unsigned size, uint32_t value) {
  std::optional<int> idx = BarAt(offset);
  if (!idx.has_value()) return;
  Bar& bar = bars_[*idx];
  bool upper = (offset & ~3u) != kRegBar0 + 4u * *idx;
  // Sizing probe: every written byte is 0xff. The register now reads back the size mask; the
  // guest restores the address afterwards, which compares equal to `mapped` again.
  uint32_t all = size == 4 ? 0xffffffffu : (1u << (8 * size)) - 1;
  if ((value & all) == all) return;
  if (bar.type == BarType::kMem64 && !upper) return;  // reported with the upper half
  uint64_t now = bar_address(*idx);
  if (now == bar.mapped) return;
  BarMove move{*idx, bar.type, bar.size, bar.mapped, now};
  bar.mapped = now;
  if (bar_moved_) bar_moved_(move);
}

void PciConfigSpace::AddWriteObserver(uint32_t offset, uint32_t len, std::function<void()> fn) {
  observers_.push_back(Observer{offset, len, std::move(fn)});
}

void PciConfigSpace::SetBarMask(int index) {
  const Bar& bar = bars_[index];
  uint32_t reg = kRegBar0 + 4 * index;
  switch (bar.type) {
    case BarType::kIo:
      // x86 port space is 16 bits: the upper half of an I/O BAR is hardwired to 0.
      SetWriteMask(reg, 4, static_cast<uint32_t>(~(bar.size - 1)) & 0xfffcu);
      break;
    case BarType::kMem32:
      SetWriteMask(reg, 4, static_cast<uint32_t>(~(bar.size - 1)) & 0xfffffff0u);
      break;
    case BarType::kMem64:
      SetWriteMask(reg, 4, static_cast<uint32_t>(~(bar.size - 1)) & 0xfffffff0u);
      SetWriteMask(reg + 4, 4, static_cast<uint32_t>(~(bar.size - 1) >> 32));
      break;
    case BarType::kNone:
      SetWriteMask(reg, 4, 0);
      break;
  }
}

absl::Status PciConfigSpace::AddBar(int index, BarType type, uint64_t size, bool prefetchable) {
  if (!ValidBarIndex(index))
    return absl::InvalidArgumentError(absl::StrCat("BAR index ", index, " out of range"));
  if (type == BarType::kNone) return absl::InvalidArgumentError("BAR type none");
  if (type == BarType::kMem64 && !ValidBarIndex(index + 1))
    return absl::InvalidArgumentError(
        absl::StrCat("64-bit BAR ", index, " needs BAR ", index + 1, " for its upper half"));
  if (bars_[index].type != BarType::kNone || BarAt(kRegBar0 + 4 * index).has_value() ||
      (type == BarType::kMem64 && bars_[index + 1].type != BarType::kNone))
    return absl::AlreadyExistsError(absl::StrCat("BAR ", index, " is already in use"));
  if (!IsPowerOfTwo(size))
    return absl::InvalidArgumentError(absl::StrFormat("BAR %d size 0x%x is not a power of two",
                                                      index, size));
  if (type == BarType::kIo && (size < 4 || size > 256))
    return absl::InvalidArgumentError(
        absl::StrFormat("I/O BAR %d size 0x%x outside 4..256 bytes", index, size));
  if (type != BarType::kIo && size < 16)
    return absl::InvalidArgumentError(
        absl::StrFormat("memory BAR %d size 0x%x below 16 bytes", index, size));
  if (type == BarType::kMem32 && size > (uint64_t{1} << 31))
    return absl::InvalidArgumentError(
        absl::StrFormat("32-bit BAR %d size 0x%x above 2 GiB", index, size));
  if (type == BarType::kIo && prefetchable)
    return absl::InvalidArgumentError("I/O BARs cannot be prefetchable");
  bars_[index] = Bar{type, size, prefetchable, 0};
  uint32_t flags = 0;
  if (type == BarType::kIo) flags = kBarIoSpace;
  if (type == BarType::kMem64) flags = kBarMem64;
  if (prefetchable) flags |= kBarPrefetchable;
  WriteRaw(kRegBar0 + 4 * index, 4, flags);
  if (type == BarType::kMem64) WriteRaw(kRegBar0 + 4 * (index + 1), 4, 0);
  SetBarMask(index);
  return absl::OkStatus();
}

absl::Status PciConfigSpace::SetBarAddress(int index, uint64_t addr) {
  if (!ValidBarIndex(index) || bars_[index].type == BarType::kNone)
    return absl::InvalidArgumentError(absl::StrCat("BAR ", index, " is not declared"));
  Bar& bar = bars_[index];
  if (addr % bar.size != 0)
    return absl::InvalidArgumentError(absl::StrFormat(
        "BAR %d address 0x%x not aligned to its size 0x%x", index, addr, bar.size));
  if (bar.type == BarType::kIo && addr + bar.size > 0x10000)
    return absl::InvalidArgumentError(absl::StrFormat("I/O BAR %d at 0x%x beyond 64 KiB", index, addr));
  if (bar.type == BarType::kMem32 && addr + bar.size > (uint64_t{1} << 32))
    return absl::InvalidArgumentError(
        absl::StrFormat("32-bit BAR %d at 0x%x beyond 4 GiB", index, addr));
  uint32_t reg = kRegBar0 + 4 * index;
  uint32_t flags = ReadRaw(reg, 4) & (bar.type == BarType::kIo ? 0x3u : 0xfu);
  WriteRaw(reg, 4, static_cast<uint32_t>(addr) | flags);
  if (bar.type == BarType::kMem64) WriteRaw(reg + 4, 4, static_cast<uint32_t>(addr >> 32));
  bar.mapped = addr;
  return absl::OkStatus();
}

BarType PciConfigSpace::bar_type(int index) const {
  return ValidBarIndex(index) ? bars_[index].type : BarType::kNone;
}

uint64_t PciConfigSpace::bar_size(int index) const {
  return ValidBarIndex(index) ? bars_[index].size : 0;
}

bool PciConfigSpace::bar_prefetchable(int index) const {
  return ValidBarIndex(index) && bars_[index].prefetchable;
}

uint64_t PciConfigSpace::bar_address(int index) const {
  if (!ValidBarIndex(index)) return 0;
  uint32_t reg = kRegBar0 + 4 * index;
  uint32_t lo = ReadRaw(reg, 4);
  switch (bars_[index].type) {
    case BarType::kIo: return lo & ~0x3u;
    case BarType::kMem32: return lo & ~0xfu;
    case BarType::kMem64: return (lo & ~0xfu) | (uint64_t{ReadRaw(reg + 4, 4)} << 32);
    case BarType::kNone: return 0;
  }
  return 0;
}

uint64_t PciConfigSpace::bar_mapped_address(int index) const {
  return ValidBarIndex(index) ? bars_[index].mapped : 0;
}

absl::StatusOr<uint32_t> PciConfigSpace::AddCapability(std::span<const uint8_t> body,
                                                       std::span<const uint8_t> writable) {
  if (body.size() < 2) return absl::InvalidArgumentError("capability shorter than 2 bytes");
  if (!writable.empty() && writable.size() != body.size())
    return absl::InvalidArgumentError("capability write mask length differs from its body");
  uint32_t off = AlignUp4(next_cap_);
  if (off + body.size() > kConfigHeaderSize)
    return absl::ResourceExhaustedError(absl::StrFormat(
        "no room for a %d-byte capability at 0x%x in the 256-byte header", body.size(), off));
  for (size_t i = 0; i < body.size(); ++i) {
    regs_[off + i] = body[i];
    wmask_[off + i] = (i >= 2 && !writable.empty()) ? writable[i] : 0;
  }
  regs_[off + 1] = 0;
  if (last_cap_ == 0) {
    regs_[kRegCapabilitiesPointer] = static_cast<uint8_t>(off);
    WriteRaw(kRegStatus, 2, ReadRaw(kRegStatus, 2) | kStatusCapabilities);
  } else {
    regs_[last_cap_ + 1] = static_cast<uint8_t>(off);
  }
  last_cap_ = off;
  next_cap_ = AlignUp4(off + body.size());
  return off;
}

std::optional<uint32_t> PciConfigSpace::FindCapability(uint8_t id) const {
  if (!(ReadRaw(kRegStatus, 2) & kStatusCapabilities)) return std::nullopt;
  uint32_t p = regs_[kRegCapabilitiesPointer] & ~3u;
  for (int guard = 0; guard < 48 && p >= kCapabilityAreaStart; ++guard) {
    if (regs_[p] == id) return p;
    p = regs_[p + 1] & ~3u;
  }
  return std::nullopt;
}

PciConfigState PciConfigSpace::SaveState() const {
  PciConfigState s;
  s.set_regs(std::string(regs_.begin(), regs_.end()));
  for (int i = 0; i < num_bars(); ++i) s.add_bar_mapped(bars_[i].mapped);
  return s;
}

absl::Status PciConfigSpace::RestoreState(const PciConfigState& s) {
  if (s.regs().size() != kConfigHeaderSize)
    return absl::InvalidArgumentError(
        absl::StrCat("saved PCI config space has ", s.regs().size(), " bytes, expected 256"));
  if (s.bar_mapped_size() != num_bars())
    return absl::InvalidArgumentError(absl::StrCat("saved PCI config space has ",
                                                   s.bar_mapped_size(), " BARs, expected ",
                                                   num_bars()));
  // The identity and layout must match the device model this state is restored into.
  for (uint32_t off : {kRegVendorId, kRegDeviceId, kRegCapabilitiesPointer})
    if (static_cast<uint8_t>(s.regs()[off]) != regs_[off])
      return absl::InvalidArgumentError(
          absl::StrFormat("saved PCI config space differs from the device at 0x%x", off));
  std::memcpy(regs_.data(), s.regs().data(), kConfigHeaderSize);
  command_.store(static_cast<uint16_t>(ReadRaw(kRegCommand, 2)), std::memory_order_relaxed);
  for (int i = 0; i < num_bars(); ++i) bars_[i].mapped = s.bar_mapped(i);
  return absl::OkStatus();
}

}  // namespace microvmm::pci
