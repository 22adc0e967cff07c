#include "vmm/pci/bar_allocator.h"

#include <algorithm>

#include "absl/strings/str_format.h"
#include "vmm/memory/guest_memory.h"

namespace microvmm::pci {

namespace {
uint64_t AlignUp(uint64_t v, uint64_t align) { return (v + align - 1) & ~(align - 1); }
}  // namespace

absl::StatusOr<PciWindows> PciWindows::Default(uint64_t ram_bytes, int phys_bits,
                                               uint64_t mmio64_size) {
  PciWindows w;
  uint64_t top = kMmioGapEnd;
  for (const RamRange& r : RamLayout(ram_bytes)) top = std::max(top, r.gpa + r.size);
  w.mmio64_start = AlignUp(top, kMmio64Align);
  uint64_t limit = phys_bits >= 64 ? ~uint64_t{0} : (uint64_t{1} << phys_bits);
  w.mmio64_end = std::min(w.mmio64_start + mmio64_size, limit);
  if (w.mmio64_end < w.mmio64_start + kMmio64Align)
    return absl::ResourceExhaustedError(absl::StrFormat(
        "no room for a 64-bit PCI window above RAM end 0x%x with %d physical address bits", top,
        phys_bits));
  return w;
}

int PhysAddressBits(const CpuidTable& cpuid) {
  for (const kvm_cpuid_entry2& e : cpuid.entries())
    if (e.function == 0x80000008 && (e.eax & 0xff) != 0) return e.eax & 0xff;
  return 36;
}

absl::StatusOr<uint64_t> AddressAllocator::Allocate(uint64_t size, uint64_t align) {
  if (size == 0) return absl::InvalidArgumentError("allocation of 0 bytes");
  if (align <= 1) align = 1;
  if (align & (align - 1))
    return absl::InvalidArgumentError(absl::StrFormat("alignment 0x%x is not a power of two", align));
  uint64_t cand = AlignUp(start_, align);
  for (auto it = used_.begin();; ++it) {
    // Gap before `it` (or up to end_).
    uint64_t gap_end = it == used_.end() ? end_ : it->first;
    if (cand >= start_ && cand + size >= cand && cand + size <= gap_end) {
      used_.emplace(cand, size);
      return cand;
    }
    if (it == used_.end()) break;
    uint64_t after = it->first + it->second;
    if (after > cand) cand = AlignUp(after, align);
    if (cand < after) break;  // wrapped
  }
  return absl::ResourceExhaustedError(absl::StrFormat(
      "no 0x%x bytes aligned to 0x%x left in [0x%x, 0x%x)", size, align, start_, end_));
}

absl::Status AddressAllocator::Reserve(uint64_t addr, uint64_t size) {
  if (size == 0 || addr < start_ || addr + size > end_ || addr + size < addr)
    return absl::InvalidArgumentError(
        absl::StrFormat("range 0x%x+0x%x outside [0x%x, 0x%x)", addr, size, start_, end_));
  auto next = used_.lower_bound(addr);
  if (next != used_.end() && next->first < addr + size)
    return absl::FailedPreconditionError(absl::StrFormat("range 0x%x+0x%x is in use", addr, size));
  if (next != used_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second > addr)
      return absl::FailedPreconditionError(
          absl::StrFormat("range 0x%x+0x%x is in use", addr, size));
  }
  used_.emplace(addr, size);
  return absl::OkStatus();
}

absl::Status AddressAllocator::Free(uint64_t addr) {
  if (used_.erase(addr) == 0)
    return absl::NotFoundError(absl::StrFormat("no allocation at 0x%x", addr));
  return absl::OkStatus();
}

PciBarAllocator::PciBarAllocator(const PciWindows& w)
    : windows_(w),
      io_(w.io_start, w.io_end),
      mmio32_(w.mmio32_start, w.mmio32_end),
      mmio64_(w.mmio64_start, w.mmio64_end) {}

absl::StatusOr<uint64_t> PciBarAllocator::AllocateIo(uint64_t size) {
  return io_.Allocate(size, size);
}

absl::StatusOr<uint64_t> PciBarAllocator::AllocateMmio32(uint64_t size) {
  return mmio32_.Allocate(size, size);
}

absl::StatusOr<uint64_t> PciBarAllocator::AllocateMmio64(uint64_t size) {
  if (!mmio64_.empty_range()) {
    auto a = mmio64_.Allocate(size, size);
    if (a.ok() || size > (uint64_t{1} << 31)) return a;
  }
  return mmio32_.Allocate(size, size);
}

absl::Status PciBarAllocator::AssignBars(PciConfigSpace& cfg) {
  struct Done {
    AddressAllocator* from;
    uint64_t addr;
    int index;
  };
  std::vector<Done> done;
  uint16_t decode = 0;
  absl::Status err;
  for (int i = 0; i < cfg.num_bars() && err.ok(); ++i) {
    BarType t = cfg.bar_type(i);
    if (t == BarType::kNone) continue;
    decode |= t == BarType::kIo ? kCommandIo : kCommandMemory;
    if (uint64_t placed = cfg.bar_address(i); placed != 0) {
      // Placed by the device model: keep it, and keep the allocator from handing it out again.
      for (AddressAllocator* a : {&io_, &mmio32_, &mmio64_}) {
        if (placed < a->start() || placed >= a->end()) continue;
        if ((t == BarType::kIo) != (a == &io_)) continue;
        err = a->Reserve(placed, cfg.bar_size(i));
        if (err.ok()) done.push_back({a, placed, -1});
        break;
      }
      continue;
    }
    uint64_t size = cfg.bar_size(i);
    absl::StatusOr<uint64_t> addr;
    AddressAllocator* from = nullptr;
    if (t == BarType::kIo) {
      addr = AllocateIo(size);
      from = &io_;
    } else if (t == BarType::kMem32) {
      addr = AllocateMmio32(size);
      from = &mmio32_;
    } else {
      addr = AllocateMmio64(size);
      // AllocateMmio64 may have fallen back to the 32-bit window.
      from = (addr.ok() && *addr >= mmio64_.start() && *addr < mmio64_.end()) ? &mmio64_ : &mmio32_;
    }
    if (!addr.ok()) {
      err = absl::ResourceExhaustedError(absl::StrFormat(
          "PCI %s BAR %d (0x%x bytes): %s", BarTypeName(t), i, size, addr.status().message()));
      break;
    }
    done.push_back({from, *addr, i});
    err = cfg.SetBarAddress(i, *addr);
  }
  if (!err.ok()) {
    for (const Done& d : done) {
      (void)d.from->Free(d.addr);
      if (d.index >= 0) (void)cfg.SetBarAddress(d.index, 0);
    }
    return err;
  }
  cfg.WriteRaw(kRegCommand, 2, cfg.ReadRaw(kRegCommand, 2) | decode);
  return absl::OkStatus();
}

}  // namespace microvmm::pci
