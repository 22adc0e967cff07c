#include "devices/vfio/pci/vfio_pci_device.h"

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "devices/vfio/pci/vfio_pci_state.pb.h"
#include "vmm/base/log.h"

namespace microvmm::vfio {

namespace {

using pci::BarType;

// Command bits the device itself must see: decode enables (it answers its BARs), bus mastering
// (its DMA) and INTx disable (vfio-pci uses it to mask INTx). Parity/SERR stay virtual.
constexpr uint16_t kCommandPassthrough =
    pci::kCommandIo | pci::kCommandMemory | pci::kCommandBusMaster | pci::kCommandIntxDisable;

// MSI message control (PCI 3.0 §6.8.1.3).
constexpr uint16_t kMsiCtlEnable = 1u << 0;
constexpr uint16_t kMsiCtlMmcMask = 0x7u << 1;  // multiple message capable (log2), read-only
constexpr uint16_t kMsiCtlMmeMask = 0x7u << 4;  // multiple message enable (log2)
constexpr uint16_t kMsiCtl64Bit = 1u << 7;
constexpr uint16_t kMsiCtlMaskable = 1u << 8;   // per-vector masking capable
constexpr uint32_t kMsiMaxVectors = 32;

// Bytes of an MSI capability whose message control is `flags`: 64-bit address adds 4, per-vector
// masking adds mask + pending (+ reserved).
uint32_t MsiCapBytes(uint16_t flags) {
  return ((flags & kMsiCtl64Bit) ? 14 : 10) + ((flags & kMsiCtlMaskable) ? 10 : 0);
}

uint32_t Le(std::span<const uint8_t> b, uint32_t off, unsigned size) {
  uint32_t v = 0;
  for (unsigned i = 0; i < size && off + i < b.size(); ++i) v |= uint32_t{b[off + i]} << (8 * i);
  return v;
}

uint64_t RoundUpPow2(uint64_t v) {
  uint64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

bool ValidConfigAccess(uint32_t offset, unsigned size) {
  return (size == 1 || size == 2 || size == 4) && offset % size == 0 &&
         offset + size <= pci::kConfigHeaderSize;
}

// Length of a capability structure at `off` (bounded by `limit`, the next capability in address
// order or the end of the header). Unknown layouts extend to the limit, so their bytes are
// hidden rather than exposed as device-specific registers.
uint32_t CapLength(std::span<const uint8_t> phys, uint32_t off, uint32_t limit) {
  uint8_t id = phys[off];
  uint32_t len = limit - off;
  switch (id) {
    case pci::kCapIdPowerManagement: len = 8; break;
    case pci::kCapIdMsix: len = pci::kMsixCapabilityBytes; break;
    case pci::kCapIdMsi: len = MsiCapBytes(static_cast<uint16_t>(Le(phys, off + 2, 2))); break;
    case pci::kCapIdPciExpress:
      len = (phys[off + 2] & 0xf) >= 2 ? 0x3c : 0x14;  // PCIe capability version
      break;
    case pci::kCapIdVendor:
      len = std::max<uint32_t>(phys[off + 2], 3);
      break;
    default: break;
  }
  return std::min(len, limit - off);
}

}  // namespace

absl::StatusOr<std::shared_ptr<VfioPciDevice>> VfioPciDevice::Create(
    std::unique_ptr<VfioDevice> dev, const VfioPciOptions& options) {
  if (!dev) return absl::InvalidArgumentError("VfioPciDevice: no device");
  absl::StatusOr<DeviceInfo> info = dev->GetInfo();
  if (!info.ok()) return info.status();
  if (!info->is_pci)
    return absl::FailedPreconditionError(absl::StrCat(dev->name(), ": not a PCI device"));
  absl::StatusOr<RegionInfo> cfg = dev->GetRegionInfo(kConfigRegionIndex);
  if (!cfg.ok()) return cfg.status();
  if (cfg->size < pci::kConfigHeaderSize || !cfg->readable || !cfg->writable)
    return absl::FailedPreconditionError(absl::StrFormat(
        "%s: config region is %u bytes (readable %d, writable %d); need 256 read/write",
        dev->name(), cfg->size, cfg->readable, cfg->writable));
  std::vector<uint8_t> phys(pci::kConfigHeaderSize);
  if (absl::Status s = dev->RegionRead(kConfigRegionIndex, 0, phys); !s.ok()) return s;
  if ((phys[pci::kRegHeaderType] & 0x7f) != pci::kHeaderTypeEndpoint)
    return absl::FailedPreconditionError(absl::StrFormat(
        "%s: header type %#x: only endpoints (type 0) can be passed through", dev->name(),
        phys[pci::kRegHeaderType]));
  pci::PciHeader h;
  h.vendor_id = static_cast<uint16_t>(Le(phys, pci::kRegVendorId, 2));
  h.device_id = static_cast<uint16_t>(Le(phys, pci::kRegDeviceId, 2));
  if (h.vendor_id == 0xffff || h.vendor_id == 0)
    return absl::FailedPreconditionError(
        absl::StrFormat("%s: config space reads vendor %#x (device gone?)", dev->name(),
                        h.vendor_id));
  h.revision_id = phys[pci::kRegRevisionId];
  h.class_code = Le(phys, pci::kRegClassCode, 3);
  h.subsystem_vendor_id = static_cast<uint16_t>(Le(phys, pci::kRegSubsystemVendorId, 2));
  h.subsystem_id = static_cast<uint16_t>(Le(phys, pci::kRegSubsystemId, 2));
  std::shared_ptr<VfioPciDevice> d(new VfioPciDevice(std::move(dev), options, h));
  if (absl::Status s = d->Init(phys); !s.ok()) {
    (void)d->Detach();
    return s;
  }
  return d;
}

VfioPciDevice::VfioPciDevice(std::unique_ptr<VfioDevice> dev, const VfioPciOptions& options,
                             const pci::PciHeader& header)
    : dev_(std::move(dev)),
      options_(options),
      config_(header),
      dma_model_(FootprintFor(header.vendor_id, header.device_id)) {}

VfioPciDevice::~VfioPciDevice() {
  if (absl::Status s = Detach(); !s.ok()) LOG_WARN("%s: detach: %s", name(), s.message());
}

absl::Status VfioPciDevice::Init(std::span<const uint8_t> phys) {
  // BARs: type bits from the device's BAR registers, size from the region.
  for (int i = 0; i < pci::kNumBarsType0; ++i) {
    absl::StatusOr<RegionInfo> ri = dev_->GetRegionInfo(kBar0RegionIndex + i);
    if (!ri.ok()) return ri.status();
    if (ri->size == 0) continue;
    uint32_t reg = Le(phys, pci::kRegBar0 + 4 * i, 4);
    BarType type = BarType::kMem32;
    if (reg & pci::kBarIoSpace) type = BarType::kIo;
    else if (((reg >> 1) & 3) == 2) type = BarType::kMem64;
    bool prefetch = type != BarType::kIo && (reg & pci::kBarPrefetchable);
    uint64_t size = std::max<uint64_t>(RoundUpPow2(ri->size), type == BarType::kIo ? 4 : 16);
    if (absl::Status s = config_.AddBar(i, type, size, prefetch); !s.ok())
      return absl::Status(s.code(), absl::StrCat(dev_->name(), ": ", s.message()));
    bars_[i] = *ri;
    if (type == BarType::kMem64) ++i;  // upper half
  }
  // Status: the device's, minus the capability bit (set below if any capability is kept).
  config_.WriteRaw(pci::kRegStatus, 2,
                   Le(phys, pci::kRegStatus, 2) & ~uint32_t{pci::kStatusCapabilities});
  if (absl::Status s = BuildCapabilities(phys); !s.ok()) return s;
  if (absl::Status s = SetUpIntx(phys[pci::kRegInterruptPin]); !s.ok()) return s;
  if (absl::Status s = SetUpDirectMaps(); !s.ok()) return s;
  SyncCommand();  // the device starts with decoding and bus mastering off, like the shadow
  return absl::OkStatus();
}

absl::Status VfioPciDevice::BuildCapabilities(std::span<const uint8_t> phys) {
  // Walk the device's list defensively (a vfio-user server may send anything): offsets inside
  // 0x40..0xFF, no loops, at most 48 entries (256 bytes / 4-byte minimum).
  std::vector<uint32_t> caps;  // list order
  if (Le(phys, pci::kRegStatus, 2) & pci::kStatusCapabilities) {
    uint32_t p = phys[pci::kRegCapabilitiesPointer] & ~3u;
    std::array<bool, pci::kConfigHeaderSize> seen{};
    while (p >= pci::kCapabilityAreaStart && p + 2 <= pci::kConfigHeaderSize && !seen[p] &&
           caps.size() < 48) {
      seen[p] = true;
      caps.push_back(p);
      p = phys[p + 1] & ~3u;
    }
  }
  std::vector<uint32_t> by_addr = caps;
  std::sort(by_addr.begin(), by_addr.end());
  // Every byte of 0x40..0xFF outside a capability is a device-specific register: pass-through.
  for (uint32_t i = pci::kCapabilityAreaStart; i < pci::kConfigHeaderSize; ++i)
    passthrough_[i] = true;
  std::vector<uint32_t> kept;
  for (size_t k = 0; k < by_addr.size(); ++k) {
    uint32_t off = by_addr[k];
    uint32_t limit = k + 1 < by_addr.size() ? by_addr[k + 1] : pci::kConfigHeaderSize;
    uint32_t len = CapLength(phys, off, limit);
    for (uint32_t i = off; i < off + len; ++i) passthrough_[i] = false;
  }
  for (uint32_t off : caps) {
    uint8_t id = phys[off];
    uint32_t limit = pci::kConfigHeaderSize;
    for (uint32_t o : by_addr)
      if (o > off) { limit = o; break; }
    uint32_t len = CapLength(phys, off, limit);
    bool keep = false;
    if (id == pci::kCapIdPowerManagement || id == pci::kCapIdPciExpress) {
      keep = true;
    } else if (id == pci::kCapIdMsix && !msix_cap_.has_value() && len >= pci::kMsixCapabilityBytes) {
      absl::Status s = SetUpMsix(phys, off);
      if (!s.ok()) return s;
      keep = msix_cap_.has_value();
    } else if (id == pci::kCapIdMsi && !msi_cap_.has_value()) {
      absl::Status s = SetUpMsi(phys, off, len);
      if (!s.ok()) return s;
      keep = msi_cap_.has_value();
    }
    if (!keep) continue;
    for (uint32_t i = 0; i < len; ++i) config_.WriteRaw(off + i, 1, phys[off + i]);
    for (uint32_t i = 0; i < len; ++i) config_.SetWriteMask(off + i, 1, 0);  // read-only
    kept.push_back(off);
  }
  // Re-link the kept capabilities in the device's order.
  for (size_t k = 0; k < kept.size(); ++k)
    config_.WriteRaw(kept[k] + 1, 1, k + 1 < kept.size() ? kept[k + 1] : 0);
  config_.WriteRaw(pci::kRegCapabilitiesPointer, 1, kept.empty() ? 0 : kept[0]);
  if (!kept.empty())
    config_.WriteRaw(pci::kRegStatus, 2,
                     config_.ReadRaw(pci::kRegStatus, 2) | pci::kStatusCapabilities);
  if (msix_cap_) {
    uint32_t ctl = *msix_cap_ + 2;
    ResetMsixShadow();  // the guest may set the two bits it clears
    config_.SetWriteMask(ctl, 2, pci::kMsixControlEnable | pci::kMsixControlFunctionMask);
    config_.AddWriteObserver(ctl, 2, [this] { OnMsixControl(); });
  }
  if (msi_cap_) InitMsiShadow();
  return absl::OkStatus();
}

absl::Status VfioPciDevice::SetUpMsi(std::span<const uint8_t> phys, uint32_t cap, uint32_t len) {
  // MSI is optional (INTx remains): every problem hides it with a warning instead of failing.
  uint16_t flags = static_cast<uint16_t>(Le(phys, cap + 2, 2));
  bool is64 = flags & kMsiCtl64Bit, maskable = flags & kMsiCtlMaskable;
  uint32_t need = MsiCapBytes(flags);
  if (len < need) {
    LOG_WARN("%s: MSI capability at %#x overlaps the next one; MSI hidden", dev_->name(), cap);
    return absl::OkStatus();
  }
  absl::StatusOr<IrqInfo> irq = dev_->GetIrqInfo(kMsiIrqIndex);
  if (!irq.ok() || irq->count == 0 || !irq->eventfd) {
    LOG_WARN("%s: MSI capability but no MSI eventfd interrupts; MSI hidden", dev_->name());
    return absl::OkStatus();
  }
  if (options_.gsi_router == nullptr) {
    LOG_WARN("%s: MSI needs VfioPciOptions::gsi_router; MSI hidden", dev_->name());
    return absl::OkStatus();
  }
  // Vectors: 2^MMC (encodings 6 and 7 are reserved: 32), no more than the device's MSI irqs
  // (vfio-pci reports 2^MMC), kept a power of two (the MMC encoding).
  uint32_t n = std::min(1u << std::min<uint32_t>((flags & kMsiCtlMmcMask) >> 1, 5), irq->count);
  while (n & (n - 1)) n &= n - 1;
  absl::StatusOr<std::unique_ptr<pci::MsixTable>> t =
      pci::MsixTable::Create(*options_.gsi_router, static_cast<uint16_t>(n));
  if (!t.ok()) {
    LOG_WARN("%s: MSI hidden: %s", dev_->name(), t.status().message());
    return absl::OkStatus();
  }
  msi_ = std::move(*t);
  msi_cap_ = cap;
  msi_len_ = need;
  msi_64bit_ = is64;
  msi_maskable_ = maskable;
  return absl::OkStatus();
}

void VfioPciDevice::InitMsiShadow() {
  const uint32_t cap = *msi_cap_;
  const uint32_t n = msi_->num_vectors();
  config_.SetWriteMask(cap + 2, 2, kMsiCtlEnable | kMsiCtlMmeMask);
  config_.SetWriteMask(cap + 4, 4, 0xfffffffc);  // address bits 1:0 are reserved (dword)
  if (msi_64bit_) config_.SetWriteMask(cap + 8, 4, 0xffffffff);
  config_.SetWriteMask(msi_data_reg(), 2, 0xffff);  // 16-bit data; extended data not offered
  // Mask bits of vectors the function does not implement are reserved (read-only 0); the
  // pending register is read-only (ReadConfig fills it in live).
  if (msi_maskable_)
    config_.SetWriteMask(msi_mask_reg(), 4, n >= 32 ? 0xffffffffu : (1u << n) - 1);
  ResetMsiShadow();
  config_.AddWriteObserver(cap + 2, msi_len_ - 2, [this] { OnMsiWrite(); });
}

void VfioPciDevice::ResetMsixShadow() {
  // Out of reset: MSI-X disabled, function unmasked.
  uint32_t ctl = *msix_cap_ + 2;
  config_.WriteRaw(ctl, 2,
                   config_.ReadRaw(ctl, 2) &
                       ~uint32_t{pci::kMsixControlEnable | pci::kMsixControlFunctionMask});
}

void VfioPciDevice::ResetMsiShadow() {
  const uint32_t cap = *msi_cap_;
  uint32_t log2n = 0;
  while ((1u << log2n) < msi_->num_vectors()) ++log2n;
  // Only the 64-bit and maskable capabilities and our MMC; extended message data (bits 9/10)
  // and anything reserved read 0.
  uint16_t ctl = (msi_64bit_ ? kMsiCtl64Bit : 0) | (msi_maskable_ ? kMsiCtlMaskable : 0) |
                 static_cast<uint16_t>(log2n << 1);
  config_.WriteRaw(cap + 2, 2, ctl);
  for (uint32_t i = 4; i < msi_len_; ++i) config_.WriteRaw(cap + i, 1, 0);
}
absl::Status VfioPciDevice::SetUpMsix(std::span<const uint8_t> phys, uint32_t cap) {
  uint16_t n = static_cast<uint16_t>((Le(phys, cap + 2, 2) & pci::kMsixControlTableSizeMask) + 1);
  uint32_t table = Le(phys, cap + 4, 4), pba = Le(phys, cap + 8, 4);
  int tbar = table & 7, pbar = pba & 7;
  uint64_t toff = table & ~7u, poff = pba & ~7u;
  uint64_t tlen = uint64_t{pci::kMsixEntryBytes} * n, plen = 8 * ((uint64_t{n} + 63) / 64);
  auto fits = [&](int bar, uint64_t off, uint64_t len) {
    return bar < 6 && bars_[bar].size != 0 && config_.bar_type(bar) != BarType::kIo &&
           off + len <= bars_[bar].size;
  };
  if (!fits(tbar, toff, tlen) || !fits(pbar, poff, plen))
    return absl::FailedPreconditionError(absl::StrFormat(
        "%s: MSI-X table (BAR %d +%#x, %u vectors) or PBA (BAR %d +%#x) outside its BAR",
        dev_->name(), tbar, toff, n, pbar, poff));
  if (tbar == pbar && toff < poff + plen && poff < toff + tlen)
    return absl::FailedPreconditionError(absl::StrCat(dev_->name(), ": MSI-X table and PBA overlap"));
  absl::StatusOr<IrqInfo> irq = dev_->GetIrqInfo(kMsixIrqIndex);
  if (!irq.ok()) return irq.status();
  if (irq->count == 0 || !irq->eventfd) {
    LOG_WARN("%s: MSI-X capability but no MSI-X eventfd interrupts; MSI-X hidden", dev_->name());
    return absl::OkStatus();
  }
  if (options_.gsi_router == nullptr)
    return absl::InvalidArgumentError(
        absl::StrCat(dev_->name(), ": device has MSI-X; VfioPciOptions::gsi_router is required"));
  absl::StatusOr<std::unique_ptr<pci::MsixTable>> t = pci::MsixTable::Create(*options_.gsi_router, n);
  if (!t.ok()) return t.status();
  msix_ = std::move(*t);
  msix_cap_ = cap;
  msix_table_bar_ = tbar;
  msix_pba_bar_ = pbar;
  msix_table_off_ = toff;
  msix_pba_off_ = poff;
  msix_irq_count_ = std::min<uint32_t>(irq->count, n);
  return absl::OkStatus();
}

absl::Status VfioPciDevice::SetUpIntx(uint8_t pin) {
  if (pin == 0 || pin > 4 || options_.intx_router == nullptr) return absl::OkStatus();
  absl::StatusOr<IrqInfo> irq = dev_->GetIrqInfo(kIntxIrqIndex);
  if (!irq.ok()) return irq.status();
  if (irq->count == 0 || !irq->eventfd) return absl::OkStatus();
  absl::StatusOr<pci::EventFd> trig = pci::EventFd::Create();
  if (!trig.ok()) return trig.status();
  absl::StatusOr<pci::EventFd> res = pci::EventFd::Create();
  if (!res.ok()) return res.status();
  intx_trigger_ = std::move(*trig);
  intx_resample_ = std::move(*res);
  if (absl::Status s = options_.intx_router->AssignResampleIrqfd(
          intx_trigger_->fd(), intx_resample_->fd(), options_.intx_gsi);
      !s.ok())
    return s;
  intx_routed_ = true;
  if (absl::Status s = ConnectIntxLocked(true); !s.ok()) return s;
  config_.WriteRaw(pci::kRegInterruptPin, 1, pin);
  config_.WriteRaw(pci::kRegInterruptLine, 1, options_.intx_gsi & 0xff);
  return absl::OkStatus();
}

absl::Status VfioPciDevice::ConnectIntxLocked(bool on) {
  if (!intx_trigger_ || on == intx_connected_) return absl::OkStatus();
  absl::Status s;
  if (on) {
    int fd = intx_trigger_->fd();
    s = dev_->SetIrqs(kIntxIrqIndex, 0, std::span<const int>(&fd, 1));
    // Without an unmask fd an automasked INTx would fire once; with it, the guest's EOI (KVM's
    // resample) unmasks the line inside the kernel/server without the VMM.
    if (s.ok()) s = dev_->SetIrqUnmaskFd(kIntxIrqIndex, intx_resample_->fd());
    if (s.ok()) intx_connected_ = true;
  } else {
    s = dev_->SetIrqUnmaskFd(kIntxIrqIndex, -1);
    absl::Status d = dev_->SetIrqs(kIntxIrqIndex, 0, {});
    if (s.ok()) s = d;
    intx_connected_ = false;
  }
  return s;
}

absl::Status VfioPciDevice::SetUpDirectMaps() {
  if (options_.bar_mapper == nullptr) return absl::OkStatus();
  const uint64_t pg = options_.page_size;
  for (int bar = 0; bar < 6; ++bar) {
    const RegionInfo& ri = bars_[bar];
    if (ri.size == 0 || !ri.mappable || config_.bar_type(bar) == BarType::kIo) continue;
    std::vector<MmapArea> areas = ri.mmap_areas;
    if (areas.empty()) areas.push_back({0, ri.size});
    // Pages holding the MSI-X table or PBA are always trapped.
    std::vector<std::pair<uint64_t, uint64_t>> holes;  // [start, end)
    auto hole = [&](uint64_t off, uint64_t len) {
      holes.push_back({off / pg * pg, (off + len + pg - 1) / pg * pg});
    };
    if (msix_ && msix_table_bar_ == bar) hole(msix_table_off_, msix_->table_bytes());
    if (msix_ && msix_pba_bar_ == bar) hole(msix_pba_off_, msix_->pba_bytes());
    std::sort(holes.begin(), holes.end());
    for (const MmapArea& a : areas) {
      if (a.size == 0 || a.offset + a.size < a.offset || a.offset + a.size > ri.size) continue;
      uint64_t start = (a.offset + pg - 1) / pg * pg, end = (a.offset + a.size) / pg * pg;
      for (const auto& [hs, he] : holes) {  // split around the holes, in order
        if (he <= start || hs >= end) continue;
        if (hs > start) direct_.push_back(DirectMap{bar, start, hs - start, {}, 0});
        start = std::max(start, he);
      }
      if (end > start) direct_.push_back(DirectMap{bar, start, end - start, {}, 0});
    }
  }
  for (auto it = direct_.begin(); it != direct_.end();) {
    absl::StatusOr<ScopedMmap> m = dev_->MapRegion(kBar0RegionIndex + it->bar, it->offset, it->size);
    if (!m.ok()) {  // not fatal: the range stays trapped
      LOG_WARN("%s: BAR %d [%#x, +%#x) stays trapped: %s", dev_->name(), it->bar, it->offset,
               it->size, m.status().message());
      it = direct_.erase(it);
      continue;
    }
    it->mapping = std::move(*m);
    ++it;
  }
  return absl::OkStatus();
}

// ---- Config space ----

void VfioPciDevice::CatchUpCommand() {
  // The VMM may change the shadow command register behind our back: PciRootBus::AddDevice
  // assigns BARs firmware-style and sets the decode bits with a raw write (no WriteConfig).
  // Linux then sees decoding on and never writes the register itself, so the device must be
  // brought in line before the guest's first access (every guest reads config space before it
  // touches a BAR; BAR accesses catch up the device side too).
  if (config_.command() != synced_command_.load(std::memory_order_relaxed)) {
    SyncCommand();
    ReconcileDirectMaps();
  }
}

uint32_t VfioPciDevice::ReadConfig(uint32_t offset, unsigned size) {
  CatchUpCommand();
  uint32_t v = config_.Read(offset, size);
  if (!ValidConfigAccess(offset, size)) return v;
  if (msi_maskable_ && offset < msi_pending_reg() + 4 && msi_pending_reg() < offset + size) {
    // MSI pending bits are live: a masked vector with events in its eventfd.
    uint32_t bits = MsiPendingBits();
    for (unsigned i = 0; i < size; ++i) {
      uint32_t o = offset + i;
      if (o < msi_pending_reg() || o >= msi_pending_reg() + 4) continue;
      uint32_t b = (bits >> (8 * (o - msi_pending_reg()))) & 0xff;
      v = (v & ~(0xffu << (8 * i))) | (b << (8 * i));
    }
  }
  bool any = false;
  for (unsigned i = 0; i < size; ++i) any |= passthrough_[offset + i];
  if (!any) return v;
  uint8_t buf[4] = {};
  absl::Status s;
  {
    std::lock_guard lock(dev_mu_);
    s = detached_ ? absl::FailedPreconditionError("detached")
                  : dev_->RegionRead(kConfigRegionIndex, offset, std::span<uint8_t>(buf, size));
  }
  if (!s.ok()) {
    LOG_WARN_RATELIMITED("%s: config read %#x/%u: %s", name(), offset, size, s.message());
    std::memset(buf, 0xff, sizeof(buf));
  }
  for (unsigned i = 0; i < size; ++i)
    if (passthrough_[offset + i])
      v = (v & ~(0xffu << (8 * i))) | (uint32_t{buf[i]} << (8 * i));
  return v;
}

void VfioPciDevice::WriteConfig(uint32_t offset, unsigned size, uint32_t value) {
  CatchUpCommand();
  config_.Write(offset, size, value);  // masks, BAR moves (-> PciRootBus), MSI-X observer
  if (!ValidConfigAccess(offset, size)) return;
  // Device-specific registers: forward the guest's bytes (only those).
  uint8_t bytes[4];
  for (unsigned i = 0; i < size; ++i) bytes[i] = static_cast<uint8_t>(value >> (8 * i));
  for (unsigned i = 0; i < size;) {
    if (!passthrough_[offset + i]) {
      ++i;
      continue;
    }
    unsigned j = i;
    while (j < size && passthrough_[offset + j]) ++j;
    absl::Status s;
    {
      std::lock_guard lock(dev_mu_);
      if (!detached_)
        s = dev_->RegionWrite(kConfigRegionIndex, offset + i,
                              std::span<const uint8_t>(bytes + i, j - i));
    }
    if (!s.ok())
      LOG_WARN_RATELIMITED("%s: config write %#x: %s", name(), offset + i, s.message());
    i = j;
  }
  if (offset < pci::kRegCommand + 2 && offset + size > pci::kRegCommand) {
    SyncCommand();
    ReconcileDirectMaps();
  }
}

void VfioPciDevice::SyncCommand() {
  std::lock_guard lock(dev_mu_);
  if (detached_) return;
  uint16_t shadow = config_.command();
  synced_command_.store(shadow, std::memory_order_relaxed);
  uint8_t cur[2];
  absl::Status s = dev_->RegionRead(kConfigRegionIndex, pci::kRegCommand, cur);
  if (s.ok()) {
    uint16_t phys = static_cast<uint16_t>(cur[0] | cur[1] << 8);
    uint16_t want = (phys & ~kCommandPassthrough) | (shadow & kCommandPassthrough);
    if (want == phys) return;
    uint8_t w[2] = {static_cast<uint8_t>(want), static_cast<uint8_t>(want >> 8)};
    s = dev_->RegionWrite(kConfigRegionIndex, pci::kRegCommand, w);
  }
  if (!s.ok()) NoteError(s);
}

void VfioPciDevice::OnMsixControl() {
  if (!msix_ || !msix_cap_) return;
  uint16_t ctl = static_cast<uint16_t>(config_.ReadRaw(*msix_cap_ + 2, 2));
  bool enable = ctl & pci::kMsixControlEnable;
  if (enable && MsiEnableBit()) {
    // Software must not enable both (PCI 3.0 §6.8.2); vfio-pci allows one type: refused.
    LOG_WARN_RATELIMITED("%s: guest enabled MSI-X while MSI is enabled; refused", name());
    ctl &= ~pci::kMsixControlEnable;
    config_.WriteRaw(*msix_cap_ + 2, 2, ctl);
    enable = false;
  }
  // Enabling: routes first, then the device; disabling: the device first.
  if (enable) {
    msix_->SetMessageControl(ctl);
    if (!msix_connected_) NoteError(ConnectMsix(true));
  } else {
    if (msix_connected_) NoteError(ConnectMsix(false));
    msix_->SetMessageControl(ctl);
  }
}

absl::Status VfioPciDevice::ConnectMsix(bool enable) {
  std::lock_guard lock(dev_mu_);
  if (detached_) return absl::OkStatus();
  absl::Status s;
  if (enable) {
    // vfio-pci allows one interrupt type at a time (enabling MSI-X while INTx is set up is
    // EINVAL): INTx goes first, and comes back when MSI-X is disabled (as on real hardware,
    // where MSI-X enable turns INTx off).
    if (absl::Status i = ConnectIntxLocked(false); !i.ok()) NoteError(i);
    std::vector<int> fds;
    for (uint32_t v = 0; v < msix_irq_count_; ++v) fds.push_back(msix_->eventfd(v));
    s = dev_->SetIrqs(kMsixIrqIndex, 0, fds);
    if (s.ok()) msix_connected_ = true;
  } else {
    s = dev_->SetIrqs(kMsixIrqIndex, 0, {});
    if (s.ok()) msix_connected_ = false;
    if (absl::Status i = ConnectIntxLocked(true); !i.ok()) NoteError(i);
  }
  return s;
}

bool VfioPciDevice::MsiEnableBit() const {
  return msi_cap_ && (config_.ReadRaw(*msi_cap_ + 2, 2) & kMsiCtlEnable);
}

bool VfioPciDevice::MsixEnableBit() const {
  return msix_cap_ && (config_.ReadRaw(*msix_cap_ + 2, 2) & pci::kMsixControlEnable);
}

uint32_t VfioPciDevice::MsiPendingBits() const {
  uint32_t bits = 0;
  if (msi_)
    for (uint16_t v = 0; v < msi_->num_vectors() && v < kMsiMaxVectors; ++v)
      if (msi_->pending(v)) bits |= 1u << v;
  return bits;
}

void VfioPciDevice::OnMsiWrite() {
  if (!msi_ || !msi_cap_) return;
  const uint32_t cap = *msi_cap_;
  uint16_t ctl = static_cast<uint16_t>(config_.ReadRaw(cap + 2, 2));
  // MME above MMC is undefined in the spec: the function cannot do more than MMC, so clamp
  // (and show the guest the clamped value).
  uint32_t mmc = (ctl & kMsiCtlMmcMask) >> 1, mme = (ctl & kMsiCtlMmeMask) >> 4;
  mme = std::min(mme, mmc);
  bool enable = ctl & kMsiCtlEnable;
  if (enable && MsixEnableBit()) {
    LOG_WARN_RATELIMITED("%s: guest enabled MSI while MSI-X is enabled; refused", name());
    enable = false;
  }
  ctl = static_cast<uint16_t>((ctl & ~(kMsiCtlMmeMask | kMsiCtlEnable)) | (mme << 4) |
                              (enable ? kMsiCtlEnable : 0));
  config_.WriteRaw(cap + 2, 2, ctl);
  const uint32_t count = 1u << mme;
  const uint64_t addr = config_.ReadRaw(cap + 4, 4) |
                        (msi_64bit_ ? uint64_t{config_.ReadRaw(cap + 8, 4)} << 32 : 0);
  const uint32_t data = config_.ReadRaw(msi_data_reg(), 2);
  const uint32_t mask = msi_maskable_ ? config_.ReadRaw(msi_mask_reg(), 4) : 0;
  // Mirror the capability into the vector engine in one table write (one routing push): vector
  // v carries the message data with its low MME bits replaced by v (PCI 3.0 §6.8.1.5); vectors
  // beyond 2^MME and masked ones are masked entries (irqfd detached, events stay pending).
  std::vector<uint8_t> table(size_t{pci::kMsixEntryBytes} * msi_->num_vectors());
  for (uint32_t v = 0; v < msi_->num_vectors(); ++v) {
    const uint32_t words[4] = {
        static_cast<uint32_t>(addr), static_cast<uint32_t>(addr >> 32),
        (data & ~(count - 1)) | (v & (count - 1)),
        (v >= count || ((mask >> v) & 1)) ? pci::kMsixVectorMasked : 0};
    for (uint32_t w = 0; w < 4; ++w)
      for (uint32_t b = 0; b < 4; ++b)
        table[pci::kMsixEntryBytes * v + 4 * w + b] = static_cast<uint8_t>(words[w] >> (8 * b));
  }
  msi_->WriteTable(0, table);
  // Enabling: routes first, then the device; disabling: the device first.
  if (enable) {
    msi_->SetMessageControl(pci::kMsixControlEnable);
    if (!msi_connected_ || msi_count_ != count) NoteError(ConnectMsi(true, count));
  } else {
    if (msi_connected_) NoteError(ConnectMsi(false, 0));
    msi_->SetMessageControl(0);
  }
}

absl::Status VfioPciDevice::ConnectMsi(bool enable, uint32_t count) {
  std::lock_guard lock(dev_mu_);
  if (detached_) return absl::OkStatus();
  if (!enable) {
    absl::Status s = dev_->SetIrqs(kMsiIrqIndex, 0, {});
    if (s.ok()) msi_connected_ = false;
    // MSI enable off: the function may use INTx again (as on hardware).
    if (absl::Status i = ConnectIntxLocked(true); !i.ok()) NoteError(i);
    return s;
  }
  if (msi_connected_) {
    // vfio-pci fixes the vector count when MSI is enabled: a new count is disable + enable
    // (INTx stays off in between).
    if (absl::Status s = dev_->SetIrqs(kMsiIrqIndex, 0, {}); !s.ok()) return s;
    msi_connected_ = false;
  } else if (absl::Status i = ConnectIntxLocked(false); !i.ok()) {
    NoteError(i);  // one interrupt type at a time: INTx goes first
  }
  std::vector<int> fds;
  for (uint32_t v = 0; v < count; ++v) fds.push_back(msi_->eventfd(static_cast<uint16_t>(v)));
  absl::Status s = dev_->SetIrqs(kMsiIrqIndex, 0, fds);
  if (s.ok()) {
    msi_connected_ = true;
    msi_count_ = count;
  } else if (absl::Status i = ConnectIntxLocked(true); !i.ok()) {
    NoteError(i);  // MSI did not take: the device keeps INTx
  }
  return s;
}

// ---- BARs ----

VfioPciDevice::MsixPart VfioPciDevice::MsixHit(int bar, uint64_t offset, uint64_t len) const {
  if (!msix_) return MsixPart::kNone;
  auto overlap = [&](int b, uint64_t start, uint64_t size) -> std::optional<bool> {
    if (bar != b || offset >= start + size || offset + len <= start) return std::nullopt;
    return offset >= start && offset + len <= start + size;  // fully inside?
  };
  if (auto t = overlap(msix_table_bar_, msix_table_off_, msix_->table_bytes()))
    return *t ? MsixPart::kTable : MsixPart::kStraddle;
  if (auto p = overlap(msix_pba_bar_, msix_pba_off_, msix_->pba_bytes()))
    return *p ? MsixPart::kPba : MsixPart::kStraddle;
  return MsixPart::kNone;
}

bool VfioPciDevice::InRegion(int bar, uint64_t offset, uint64_t len) const {
  return len <= bars_[bar].size && offset <= bars_[bar].size - len;
}

void VfioPciDevice::ReadBar(int bar, uint64_t offset, std::span<uint8_t> data) {
  if (bar < 0 || bar >= 6) {
    std::memset(data.data(), 0xff, data.size());
    return;
  }
  if (config_.command() != synced_command_.load(std::memory_order_relaxed)) SyncCommand();
  switch (MsixHit(bar, offset, data.size())) {
    case MsixPart::kTable: msix_->ReadTable(offset - msix_table_off_, data); return;
    case MsixPart::kPba: msix_->ReadPba(offset - msix_pba_off_, data); return;
    case MsixPart::kStraddle:  // half table, half device: not a valid MSI-X access
      std::memset(data.data(), 0xff, data.size());
      return;
    case MsixPart::kNone: break;
  }
  absl::Status s;
  if (!InRegion(bar, offset, data.size())) {  // BAR rounded up past the region
    s = absl::OutOfRangeError("beyond the region");
  } else {
    std::lock_guard lock(dev_mu_);
    s = detached_ ? absl::FailedPreconditionError("detached")
                  : dev_->RegionRead(kBar0RegionIndex + bar, offset, data);
  }
  if (!s.ok()) {
    LOG_WARN_RATELIMITED("%s: BAR %d read %#x/%u: %s", name(), bar, offset, data.size(),
                         s.message());
    std::memset(data.data(), 0xff, data.size());
  }
}

void VfioPciDevice::WriteBar(int bar, uint64_t offset, std::span<const uint8_t> data) {
  if (bar < 0 || bar >= 6) return;
  if (config_.command() != synced_command_.load(std::memory_order_relaxed)) SyncCommand();
  switch (MsixHit(bar, offset, data.size())) {
    case MsixPart::kTable: msix_->WriteTable(offset - msix_table_off_, data); return;
    case MsixPart::kPba: return;       // read-only
    case MsixPart::kStraddle: return;  // dropped
    case MsixPart::kNone: break;
  }
  // The DMA model follows every write (it must know the registers when post-copy starts);
  // while a gate is set, what the write makes the device access is made present first. Model,
  // gate and forwarding are one step per device: another vCPU reprogramming the registers
  // while a doorbell waits in the gate must not reach the device first.
  std::unique_lock<std::mutex> model_lock;
  if (dma_model_) model_lock = std::unique_lock<std::mutex>(model_mu_);
  std::vector<DmaRange> targets;
  if (dma_model_) targets = dma_model_->OnBarWrite(bar, offset, data);
  if (!targets.empty()) {
    std::shared_ptr<const BarWriteGate> gate;
    {
      std::lock_guard lock(gate_mu_);
      gate = gate_;
      if (gate) ++gate_calls_;
    }
    if (gate) {
      (*gate)(targets);
      std::lock_guard lock(gate_mu_);
      if (--gate_calls_ == 0) gate_cv_.notify_all();
    }
  }
  absl::Status s;
  if (!InRegion(bar, offset, data.size())) {
    s = absl::OutOfRangeError("beyond the region");
  } else {
    std::lock_guard lock(dev_mu_);
    s = detached_ ? absl::FailedPreconditionError("detached")
                  : dev_->RegionWrite(kBar0RegionIndex + bar, offset, data);
  }
  if (!s.ok())
    LOG_WARN_RATELIMITED("%s: BAR %d write %#x/%u: %s", name(), bar, offset, data.size(),
                         s.message());
}

void VfioPciDevice::BarMoved(const pci::BarMove& move) {
  (void)move;
  ReconcileDirectMaps();
}

void VfioPciDevice::SetBarWriteGate(BarWriteGate gate) {
  {
    std::unique_lock lock(gate_mu_);
    gate_ = gate ? std::make_shared<const BarWriteGate>(std::move(gate)) : nullptr;
    trap_all_ = gate_ != nullptr;
    // Removing it: calls in flight may use what the gate refers to; they end before we return.
    if (!gate_) gate_cv_.wait(lock, [this] { return gate_calls_ == 0; });
  }
  ReconcileDirectMaps();
}

void VfioPciDevice::ReconcileDirectMaps() {
  if (options_.bar_mapper == nullptr) return;
  std::lock_guard lock(maps_mu_);
  const bool trap_all = trap_all_.load();
  for (DirectMap& d : direct_) {
    uint64_t base = config_.bar_mapped_address(d.bar);
    uint64_t target =
        (!detached_ && !trap_all && config_.memory_enabled() && base != 0) ? base + d.offset : 0;
    if (d.gpa == target) continue;
    if (d.gpa != 0) {
      if (absl::Status s = options_.bar_mapper->Unmap(d.gpa, d.size); !s.ok()) NoteError(s);
      d.gpa = 0;
    }
    if (target != 0) {
      absl::Status s = options_.bar_mapper->Map(target, d.mapping.get(), d.size);
      if (s.ok()) d.gpa = target;
      else NoteError(s);  // the range stays trapped
    }
  }
}

void VfioPciDevice::NoteError(const absl::Status& s) {
  if (!s.ok()) LOG_WARN_RATELIMITED("%s: %s", name(), s.message());
}

// ---- DMA, reset, detach ----

absl::Status VfioPciDevice::AttachDma(GuestMemory& mem) {
  std::lock_guard lock(dev_mu_);
  if (detached_) return absl::FailedPreconditionError(name() + ": detached");
  if (!dma_ranges_.empty()) return absl::FailedPreconditionError(name() + ": DMA already mapped");
  for (const GuestMemory::Region& r : mem.regions()) {
    absl::Status s = dev_->DmaMap(r.gpa, r.size, r.host, r.memfd.get(), 0, /*writable=*/true);
    if (!s.ok()) {
      for (const DmaRange& m : dma_ranges_) (void)dev_->DmaUnmap(m.iova, m.size);
      dma_ranges_.clear();
      return s;
    }
    dma_ranges_.push_back({r.gpa, r.size});
  }
  return absl::OkStatus();
}

absl::Status VfioPciDevice::DetachDma() {
  std::lock_guard lock(dev_mu_);
  absl::Status first;
  for (const DmaRange& m : dma_ranges_) {
    absl::Status s = dev_->DmaUnmap(m.iova, m.size);
    if (first.ok()) first = s;
  }
  dma_ranges_.clear();
  return first;
}

absl::Status VfioPciDevice::Reset() {
  if (detached_) return absl::FailedPreconditionError(name() + ": detached");
  DisconnectMsis([this](absl::Status s) { NoteError(s); });  // INTx is back on after this
  absl::Status s;
  {
    std::lock_guard lock(dev_mu_);
    s = dev_->Reset();
  }
  if (msix_) {
    msix_->Reset();
    ResetMsixShadow();
  }
  if (msi_) {
    msi_->Reset();
    ResetMsiShadow();
  }
  config_.WriteRaw(pci::kRegCommand, 2, 0);
  SyncCommand();
  ReconcileDirectMaps();
  return s;
}

void VfioPciDevice::DisconnectMsis(absl::FunctionRef<void(absl::Status)> note) {
  if (msix_connected_) note(ConnectMsix(false));
  if (msi_connected_) note(ConnectMsi(false, 0));
}

absl::Status VfioPciDevice::Detach() {
  if (detached_) return absl::OkStatus();
  absl::Status first;
  auto note = [&](absl::Status s) {
    if (first.ok() && !s.ok()) first = s;
  };
  if (migration_ && migration_->dirty_tracking()) note(migration_->StopDirtyTracking());
  DisconnectMsis(note);
  // Stop the device decoding and mastering before its DMA mappings go away.
  config_.WriteRaw(pci::kRegCommand, 2, 0);
  SyncCommand();
  {
    std::lock_guard lock(dev_mu_);
    note(ConnectIntxLocked(false));
    detached_ = true;
  }
  if (intx_routed_)  // only set after intx_router->AssignResampleIrqfd succeeded
    note(options_.intx_router->DeassignResampleIrqfd(intx_trigger_->fd(), options_.intx_gsi));
  intx_routed_ = false;
  ReconcileDirectMaps();  // detached: unmaps everything
  direct_.clear();        // munmap of the BAR mappings
  note(DetachDma());
  return first;
}

// ---- Migration ----

absl::StatusOr<VfioMigrationDriver*> VfioPciDevice::migration() {
  if (!migration_) {
    absl::StatusOr<std::unique_ptr<VfioMigrationDriver>> d =
        VfioMigrationDriver::Create(*dev_, &dev_mu_);
    if (!d.ok()) return d.status();
    migration_ = std::move(*d);
  }
  return migration_.get();
}

std::string VfioPciDevice::SaveState(std::span<const uint8_t> device_blob) const {
  VfioPciState st;
  *st.mutable_config() = config_.SaveState();
  if (msix_) *st.mutable_msix() = msix_->SaveState();
  st.set_device_blob(device_blob.data(), device_blob.size());
  if (dma_model_) st.set_dma_model(dma_model_->SaveState());
  st.set_msi_pending(MsiPendingBits());
  return st.SerializeAsString();
}

absl::Status VfioPciDevice::RestoreState(const std::string& data, bool run) {
  VfioPciState st;
  if (!st.ParseFromString(data))
    return absl::InvalidArgumentError(name() + ": malformed saved state (not a VfioPciState)");
  const std::string& regs = st.config().regs();
  if (regs.size() != pci::kConfigHeaderSize || st.config().bar_mapped_size() != 6)
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: saved config space has %u bytes and %d BARs, expected 256 and 6", name(),
        regs.size(), st.config().bar_mapped_size()));
  // The guest-visible layout must be this device's: every read-only bit of the header and of
  // the MSI-X capability equal (identity, BAR types and sizes, capability pointers, table size).
  // The PM/PCIe snapshots belong to the local device and are kept as they are.
  auto check = [&](uint32_t off) -> absl::Status {
    uint8_t mask = static_cast<uint8_t>(config_.WriteMask(off, 1));
    uint8_t cur = static_cast<uint8_t>(config_.ReadRaw(off, 1));
    if (((static_cast<uint8_t>(regs[off]) ^ cur) & ~mask) != 0)
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s: saved config space differs from this device at %#x (saved %#x, device %#x)",
          name(), off, static_cast<uint8_t>(regs[off]), cur));
    return absl::OkStatus();
  };
  std::string merged(pci::kConfigHeaderSize, '\0');
  for (uint32_t off = 0; off < pci::kConfigHeaderSize; ++off)
    merged[off] = static_cast<char>(config_.ReadRaw(off, 1));
  auto take = [&](uint32_t off, uint32_t len) -> absl::Status {
    for (uint32_t i = off; i < off + len; ++i) {
      if (i != pci::kRegStatus && i != pci::kRegStatus + 1)
        if (absl::Status s = check(i); !s.ok()) return s;
      merged[i] = regs[i];
    }
    return absl::OkStatus();
  };
  if (absl::Status s = take(0, pci::kCapabilityAreaStart); !s.ok()) return s;
  if (msix_cap_)
    if (absl::Status s = take(*msix_cap_, pci::kMsixCapabilityBytes); !s.ok()) return s;
  if (msi_cap_)  // read-only bits: 64-bit/maskable/MMC (same vector count), pending (zero)
    if (absl::Status s = take(*msi_cap_, msi_len_); !s.ok()) return s;
  for (int i = 0; i < 6; ++i) {
    uint64_t a = st.config().bar_mapped(i);
    uint64_t sz = config_.bar_size(i);
    if (a != 0 && (sz == 0 || a % sz != 0))
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: saved BAR %d mapped at %#x, not a valid address", name(), i, a));
  }
  if (st.has_msix() != (msix_ != nullptr) ||
      (msix_ && st.msix().vectors_size() != msix_->num_vectors()))
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: saved MSI-X state (%d vectors) does not match the device (%d)", name(),
        st.has_msix() ? st.msix().vectors_size() : 0, msix_ ? msix_->num_vectors() : 0));

  if (dma_model_ && !st.dma_model().empty())
    if (absl::Status s = dma_model_->RestoreState(st.dma_model()); !s.ok())
      return absl::Status(s.code(), absl::StrCat(name(), ": ", s.message()));
  // Everything validated: load the device's own state first (it must be RESUMING-loaded before
  // interrupts are re-enabled), then re-apply the model.
  absl::StatusOr<VfioMigrationDriver*> mig = migration();
  if (!mig.ok()) return mig.status();
  const std::string& blob = st.device_blob();
  if (absl::Status s = (*mig)->Resume(
          std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(blob.data()), blob.size()),
          /*run=*/false);
      !s.ok())
    return s;
  DisconnectMsis([this](absl::Status s) { NoteError(s); });
  PciConfigState cs = st.config();
  cs.set_regs(merged);
  if (absl::Status s = config_.RestoreState(cs); !s.ok()) return s;
  if (msix_) {
    if (absl::Status s = msix_->RestoreState(st.msix()); !s.ok()) NoteError(s);
    OnMsixControl();
  }
  if (msi_) {
    // The shadow holds the MSI registers: rebuild the vectors from it (a saved state with both
    // enable bits set keeps only one, see OnMsixControl/OnMsiWrite), then re-raise the vectors
    // that were pending (masked) at save time; bits of absent vectors are ignored.
    msi_->Reset();
    OnMsiWrite();
    for (uint16_t v = 0; v < msi_->num_vectors() && v < kMsiMaxVectors; ++v)
      if ((st.msi_pending() >> v) & 1) msi_->Trigger(v);
  }
  SyncCommand();
  ReconcileDirectMaps();
  // Interrupts are connected before the device runs, so none it raises is lost.
  return run ? (*mig)->Run() : absl::OkStatus();
}

}  // namespace microvmm::vfio
