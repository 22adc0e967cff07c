#include "devices/virtio/pci_transport.h"

#include <algorithm>
#include <cstring>
#include <utility>

#include "vmm/base/log.h"

namespace microvmm::virtio {
namespace {

constexpr uint32_t kVirtioCapBytes = 16;
constexpr uint32_t kNotifyCapBytes = 20;
constexpr uint32_t kPciCfgCapBytes = 20;
constexpr uint32_t kPciCfgData = 16;  // offset of pci_cfg_data in the PCI_CFG capability

uint64_t Get(const uint8_t* p, unsigned n) {
  uint64_t v = 0;
  std::memcpy(&v, p, n);
  return v;
}
void Put(uint8_t* p, unsigned n, uint64_t v) { std::memcpy(p, &v, n); }

std::vector<uint8_t> VirtioCap(uint8_t cfg_type, uint32_t offset, uint32_t length,
                               uint32_t cap_len = kVirtioCapBytes) {
  std::vector<uint8_t> c(cap_len, 0);
  c[0] = pci::kCapIdVendor;
  c[2] = static_cast<uint8_t>(cap_len);
  c[3] = cfg_type;
  c[4] = kVirtioBar;
  Put(&c[8], 4, offset);
  Put(&c[12], 4, length);
  return c;
}

bool Overlaps(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen) {
  return a < b + blen && b < a + alen;
}

}  // namespace

absl::StatusOr<std::unique_ptr<VirtioPciDevice>> VirtioPciDevice::Create(
    GuestMemory* mem, VirtioDevice* device, std::unique_ptr<pci::MsixTable> msix,
    std::unique_ptr<VirtioInterrupt> interrupt) {
  if (mem == nullptr || device == nullptr) return absl::InvalidArgumentError("null argument");
  if (interrupt == nullptr) {
    if (msix == nullptr) return absl::InvalidArgumentError("virtio-pci: no interrupt delivery");
    interrupt = std::make_unique<MsixInterrupt>(msix.get());
  }
  std::unique_ptr<VirtioPciDevice> d(
      new VirtioPciDevice(mem, device, std::move(msix), std::move(interrupt)));
  absl::Status s = d->Init();
  if (!s.ok()) return s;
  return d;
}

VirtioPciDevice::VirtioPciDevice(GuestMemory* mem, VirtioDevice* device,
                                 std::unique_ptr<pci::MsixTable> msix,
                                 std::unique_ptr<VirtioInterrupt> interrupt)
    : mem_(mem),
      device_(device),
      config_(pci::PciHeader{
          .vendor_id = kVirtioPciVendorId,
          .device_id = static_cast<uint16_t>(kVirtioPciDeviceIdBase + device->device_type()),
          .revision_id = 1,
          .class_code = 0xff0000,
          .subsystem_vendor_id = kVirtioPciVendorId,
          .subsystem_id = device->device_type(),
      }),
      msix_(std::move(msix)),
      interrupt_(std::move(interrupt)) {}

absl::Status VirtioPciDevice::Init() {
  std::vector<uint32_t> sizes = device_->queue_max_sizes();
  if (sizes.empty() || sizes.size() > kMaxVirtioQueues)
    return absl::InvalidArgumentError("virtio-pci: bad number of queues");
  if (device_->config_size() > 0x1000)
    return absl::InvalidArgumentError("virtio-pci: device config too large");
  device_features_ = device_->device_features() | (uint64_t{1} << kFeatureVersion1);
  for (size_t i = 0; i < sizes.size(); ++i) {
    queues_.push_back(std::make_unique<Virtqueue>(mem_, static_cast<uint16_t>(i), sizes[i]));
    queue_ptrs_.push_back(queues_.back().get());
  }
  queue_vectors_ = std::make_unique<std::atomic<uint16_t>[]>(sizes.size());
  for (size_t i = 0; i < sizes.size(); ++i) queue_vectors_[i].store(kVirtioMsiNoVector);
  device_->set_config_changed_callback([this] { ConfigChanged(); });

  absl::Status s = config_.AddBar(kVirtioBar, pci::BarType::kMem64, kVirtioBarSize);
  if (!s.ok()) return s;
  if (msix_ != nullptr) {
    if (msix_->table_bytes() > kBarMsixPbaOffset - kBarMsixTableOffset ||
        msix_->pba_bytes() > kVirtioBarSize - kBarMsixPbaOffset)
      return absl::InvalidArgumentError("virtio-pci: too many MSI-X vectors");
    auto off = msix_->AddCapability(config_, kVirtioBar, kBarMsixTableOffset, kVirtioBar,
                                    kBarMsixPbaOffset);
    if (!off.ok()) return off.status();
  }
  struct {
    std::vector<uint8_t> body;
  } caps[] = {
      {VirtioCap(kVirtioPciCapCommonCfg, kBarCommonOffset, kCommonCfgBytes)},
      {VirtioCap(kVirtioPciCapIsrCfg, kBarIsrOffset, 1)},
      {VirtioCap(kVirtioPciCapNotifyCfg, kBarNotifyOffset,
                 kNotifyOffMultiplier * static_cast<uint32_t>(sizes.size()), kNotifyCapBytes)},
  };
  for (auto& c : caps) {
    if (c.body[3] == kVirtioPciCapNotifyCfg) Put(&c.body[16], 4, kNotifyOffMultiplier);
    auto off = config_.AddCapability(c.body);
    if (!off.ok()) return off.status();
  }
  if (device_->config_size() > 0) {
    auto off = config_.AddCapability(
        VirtioCap(kVirtioPciCapDeviceCfg, kBarDeviceCfgOffset, device_->config_size()));
    if (!off.ok()) return off.status();
  }
  // VIRTIO_PCI_CAP_PCI_CFG: a window into BAR 0 through configuration space.
  std::vector<uint8_t> pcicfg = VirtioCap(kVirtioPciCapPciCfg, 0, 0, kPciCfgCapBytes);
  pcicfg[4] = 0;
  std::vector<uint8_t> wmask(kPciCfgCapBytes, 0);
  wmask[4] = 0xff;
  std::fill(wmask.begin() + 8, wmask.end(), 0xff);
  auto off = config_.AddCapability(pcicfg, wmask);
  if (!off.ok()) return off.status();
  pci_cfg_cap_ = *off;
  return absl::OkStatus();
}

VirtioPciDevice::~VirtioPciDevice() {
  std::lock_guard<std::mutex> l(io_mu_);
  DropIoEventFdsLocked();
}

// ---- Queue-notify ioeventfds -----------------------------------------------------------------

absl::Status VirtioPciDevice::EnableIoEventFds(KvmVm* vm, EventLoop* loop) {
  if (vm == nullptr || loop == nullptr) return absl::InvalidArgumentError("null argument");
  std::lock_guard<std::mutex> l(io_mu_);
  io_vm_ = vm;
  io_loop_ = loop;
  return PlaceIoEventFdsLocked(config_.bar_mapped_address(kVirtioBar));
}

bool VirtioPciDevice::ioeventfds_active() const {
  std::lock_guard<std::mutex> l(io_mu_);
  return !ioeventfds_.empty();
}

void VirtioPciDevice::BarMoved(const pci::BarMove& move) {
  if (move.index != kVirtioBar) return;
  std::lock_guard<std::mutex> l(io_mu_);
  if (io_vm_ == nullptr) return;
  if (absl::Status s = PlaceIoEventFdsLocked(move.new_addr); !s.ok())
    LOG_WARN_RATELIMITED("%s: queue notifications will trap (no ioeventfd): %s", name(),
                         s.message());
}

void VirtioPciDevice::DropIoEventFdsLocked() {
  for (auto& e : ioeventfds_) io_loop_->Remove(e->fd());  // waits for a running handler
  ioeventfds_.clear();
}

absl::Status VirtioPciDevice::PlaceIoEventFdsLocked(uint64_t bar_base) {
  if (bar_base == 0) {
    DropIoEventFdsLocked();
    return absl::OkStatus();
  }
  if (!ioeventfds_.empty()) {
    for (size_t i = 0; i < ioeventfds_.size(); ++i) {
      absl::Status s = ioeventfds_[i]->Move(bar_base + NotifyBarOffset(static_cast<uint16_t>(i)));
      if (!s.ok()) {
        DropIoEventFdsLocked();
        return s;
      }
    }
    return absl::OkStatus();
  }
  for (size_t i = 0; i < queues_.size(); ++i) {
    pci::IoEventFd::Options o;
    o.addr = bar_base + NotifyBarOffset(static_cast<uint16_t>(i));
    o.len = 2;
    auto ev = pci::IoEventFd::Create(*io_vm_, o);
    absl::Status s = ev.status();
    if (s.ok()) {
      pci::IoEventFd* e = ev->get();
      uint16_t index = static_cast<uint16_t>(i);
      s = io_loop_->Add(e->fd(), EPOLLIN, [this, e, index](uint32_t) {
        (void)e->event().Consume();
        kicks_ioeventfd_.fetch_add(1, std::memory_order_relaxed);
        Notify(index);
      });
      if (s.ok()) ioeventfds_.push_back(std::move(*ev));
    }
    if (!s.ok()) {
      DropIoEventFdsLocked();
      return s;
    }
  }
  return absl::OkStatus();
}

// ---- Configuration space (VIRTIO_PCI_CAP_PCI_CFG access window) ------------------------------

uint32_t VirtioPciDevice::ReadConfig(uint32_t offset, unsigned size) {
  if (pci_cfg_cap_ != 0 && Overlaps(offset, size, pci_cfg_cap_ + kPciCfgData, 4)) {
    uint32_t bar = config_.ReadRaw(pci_cfg_cap_ + 4, 1);
    uint32_t off = config_.ReadRaw(pci_cfg_cap_ + 8, 4);
    uint32_t len = config_.ReadRaw(pci_cfg_cap_ + 12, 4);
    if (bar == kVirtioBar && (len == 1 || len == 2 || len == 4) && off % len == 0 &&
        off + uint64_t{len} <= kVirtioBarSize) {
      uint8_t buf[4] = {0, 0, 0, 0};
      ReadBar(kVirtioBar, off, std::span<uint8_t>(buf, len));
      config_.WriteRaw(pci_cfg_cap_ + kPciCfgData, 4, static_cast<uint32_t>(Get(buf, 4)));
    }
  }
  return config_.Read(offset, size);
}

void VirtioPciDevice::WriteConfig(uint32_t offset, unsigned size, uint32_t value) {
  config_.Write(offset, size, value);
  if (pci_cfg_cap_ != 0 && Overlaps(offset, size, pci_cfg_cap_ + kPciCfgData, 4)) {
    uint32_t bar = config_.ReadRaw(pci_cfg_cap_ + 4, 1);
    uint32_t off = config_.ReadRaw(pci_cfg_cap_ + 8, 4);
    uint32_t len = config_.ReadRaw(pci_cfg_cap_ + 12, 4);
    if (bar == kVirtioBar && (len == 1 || len == 2 || len == 4) && off % len == 0 &&
        off + uint64_t{len} <= kVirtioBarSize) {
      uint8_t buf[4];
      Put(buf, 4, config_.ReadRaw(pci_cfg_cap_ + kPciCfgData, 4));
      WriteBar(kVirtioBar, off, std::span<const uint8_t>(buf, len));
    }
  }
}

// ---- BAR 0 -----------------------------------------------------------------------------------

void VirtioPciDevice::ReadBar(int bar, uint64_t offset, std::span<uint8_t> data) {
  std::memset(data.data(), 0, data.size());
  if (bar != kVirtioBar || data.empty() || data.size() > 8) return;
  if (msix_ != nullptr && msix_->ReadBar(bar, offset, data)) return;
  if (offset >= kBarCommonOffset && offset < kBarCommonOffset + 0x1000) {
    ReadCommon(offset - kBarCommonOffset, data);
  } else if (offset == kBarIsrOffset) {
    data[0] = isr_.exchange(0);  // reading the ISR clears it
  } else if (offset >= kBarDeviceCfgOffset && offset < kBarDeviceCfgOffset + 0x1000) {
    uint64_t o = offset - kBarDeviceCfgOffset;
    if (o + data.size() <= device_->config_size()) device_->ReadConfig(o, data);
  }
}

void VirtioPciDevice::WriteBar(int bar, uint64_t offset, std::span<const uint8_t> data) {
  if (bar != kVirtioBar || data.empty() || data.size() > 8) return;
  if (msix_ != nullptr && msix_->WriteBar(bar, offset, data)) return;
  if (offset >= kBarCommonOffset && offset < kBarCommonOffset + 0x1000) {
    WriteCommon(offset - kBarCommonOffset, data);
  } else if (offset >= kBarDeviceCfgOffset && offset < kBarDeviceCfgOffset + 0x1000) {
    uint64_t o = offset - kBarDeviceCfgOffset;
    if (o + data.size() <= device_->config_size()) device_->WriteConfig(o, data);
  } else if (offset >= kBarNotifyOffset && offset < kBarNotifyOffset + 0x1000) {
    uint64_t q = (offset - kBarNotifyOffset) / kNotifyOffMultiplier;
    if (q < queues_.size()) {
      kicks_trapped_.fetch_add(1, std::memory_order_relaxed);
      Notify(static_cast<uint16_t>(q));
    }
  }
}

void VirtioPciDevice::CommonImageLocked(uint8_t* img) const {
  std::memset(img, 0, 64);
  Put(img + kCommonDeviceFeatureSelect, 4, device_feature_select_);
  uint32_t df = device_feature_select_ < 2
                    ? static_cast<uint32_t>(device_features_ >> (32 * device_feature_select_))
                    : 0;
  Put(img + kCommonDeviceFeature, 4, df);
  Put(img + kCommonDriverFeatureSelect, 4, driver_feature_select_);
  uint32_t drf = driver_feature_select_ < 2
                     ? static_cast<uint32_t>(driver_features_ >> (32 * driver_feature_select_))
                     : 0;
  Put(img + kCommonDriverFeature, 4, drf);
  Put(img + kCommonMsixConfig, 2, msix_config_.load());
  Put(img + kCommonNumQueues, 2, queues_.size());
  img[kCommonDeviceStatus] = status_;
  img[kCommonConfigGeneration] = config_generation_.load();
  Put(img + kCommonQueueSelect, 2, queue_select_);
  if (queue_select_ < queues_.size()) {
    const Virtqueue& q = *queues_[queue_select_];
    Put(img + kCommonQueueSize, 2, q.size());
    Put(img + kCommonQueueMsixVector, 2, queue_vectors_[queue_select_].load());
    Put(img + kCommonQueueEnable, 2, q.ready() ? 1 : 0);
    Put(img + kCommonQueueNotifyOff, 2, queue_select_);
    Put(img + kCommonQueueDesc, 8, q.desc_addr());
    Put(img + kCommonQueueDriver, 8, q.avail_addr());
    Put(img + kCommonQueueDevice, 8, q.used_addr());
  }
}

void VirtioPciDevice::ReadCommon(uint64_t offset, std::span<uint8_t> data) {
  if (offset + data.size() > kCommonCfgBytes) return;  // zeros
  uint8_t img[64];
  std::lock_guard<std::mutex> l(mu_);
  CommonImageLocked(img);
  std::memcpy(data.data(), img + offset, data.size());
}

void VirtioPciDevice::WriteCommon(uint64_t offset, std::span<const uint8_t> data) {
  if (offset + data.size() > kCommonCfgBytes) return;
  std::lock_guard<std::mutex> l(mu_);
  uint8_t img[64];
  CommonImageLocked(img);
  std::memcpy(img + offset, data.data(), data.size());
  auto touched = [&](uint32_t field, uint32_t len) {
    return Overlaps(offset, data.size(), field, len);
  };
  Virtqueue* q = queue_select_ < queues_.size() ? queues_[queue_select_].get() : nullptr;

  if (touched(kCommonDeviceFeatureSelect, 4))
    device_feature_select_ = static_cast<uint32_t>(Get(img + kCommonDeviceFeatureSelect, 4));
  if (touched(kCommonDriverFeatureSelect, 4))
    driver_feature_select_ = static_cast<uint32_t>(Get(img + kCommonDriverFeatureSelect, 4));
  if (touched(kCommonDriverFeature, 4) && driver_feature_select_ < 2 &&
      !(status_ & kStatusFeaturesOk)) {
    unsigned shift = 32 * driver_feature_select_;
    driver_features_ = (driver_features_ & ~(uint64_t{0xffffffff} << shift)) |
                       (Get(img + kCommonDriverFeature, 4) << shift);
  }
  if (touched(kCommonMsixConfig, 2)) {
    uint16_t v = static_cast<uint16_t>(Get(img + kCommonMsixConfig, 2));
    if (msix_ != nullptr && v >= msix_->num_vectors()) v = kVirtioMsiNoVector;
    msix_config_ = v;
  }
  if (touched(kCommonQueueSelect, 2)) {
    queue_select_ = static_cast<uint16_t>(Get(img + kCommonQueueSelect, 2));
    q = queue_select_ < queues_.size() ? queues_[queue_select_].get() : nullptr;
  }
  if (q != nullptr) {
    // Setters refuse changes to an enabled queue (the driver must not make them).
    if (touched(kCommonQueueSize, 2)) (void)q->set_size(Get(img + kCommonQueueSize, 2));
    if (touched(kCommonQueueMsixVector, 2)) {
      uint16_t v = static_cast<uint16_t>(Get(img + kCommonQueueMsixVector, 2));
      if (msix_ != nullptr && v >= msix_->num_vectors()) v = kVirtioMsiNoVector;
      queue_vectors_[queue_select_] = v;
    }
    if (touched(kCommonQueueDesc, 8)) (void)q->set_desc_addr(Get(img + kCommonQueueDesc, 8));
    if (touched(kCommonQueueDriver, 8))
      (void)q->set_avail_addr(Get(img + kCommonQueueDriver, 8));
    if (touched(kCommonQueueDevice, 8)) (void)q->set_used_addr(Get(img + kCommonQueueDevice, 8));
    if (touched(kCommonQueueEnable, 2) && Get(img + kCommonQueueEnable, 2) == 1 && !q->ready()) {
      absl::Status s = q->set_ready(true);
      if (s.ok()) s = q->Activate();
      if (!s.ok()) NeedsResetLocked(s);
    }
  }
  if (touched(kCommonDeviceStatus, 1)) SetStatusLocked(img[kCommonDeviceStatus]);
}

void VirtioPciDevice::SetStatusLocked(uint8_t value) {
  if (value == 0) {
    ResetLocked();
    return;
  }
  uint8_t old = status_;
  // DEVICE_NEEDS_RESET belongs to the device; FEATURES_OK is granted below.
  uint8_t next = static_cast<uint8_t>((value & ~kStatusDeviceNeedsReset) |
                                      (old & kStatusDeviceNeedsReset));
  if ((next & kStatusFeaturesOk) && !(old & kStatusFeaturesOk)) {
    bool ok = (driver_features_ & ~device_features_) == 0 &&
              ((driver_features_ >> kFeatureVersion1) & 1);
    if (ok) {
      for (auto& q : queues_) ok = ok && q->set_features(driver_features_).ok();
    }
    if (!ok) next &= ~kStatusFeaturesOk;
  }
  status_ = next;
  if ((next & kStatusDriverOk) && !(old & kStatusDriverOk) && !activated_.load()) {
    if (!(next & kStatusFeaturesOk)) {
      NeedsResetLocked(absl::FailedPreconditionError("DRIVER_OK without FEATURES_OK"));
      return;
    }
    absl::Status s = device_->Activate(driver_features_, queue_ptrs_,
                                       [this](uint16_t i) { SignalQueue(i); });
    if (!s.ok()) {
      NeedsResetLocked(s);
      return;
    }
    activated_.store(true);
  }
}

void VirtioPciDevice::ResetLocked() {
  if (activated_.exchange(false)) device_->Reset();
  for (auto& q : queues_) q->Reset();
  status_ = 0;
  device_feature_select_ = driver_feature_select_ = 0;
  driver_features_ = 0;
  msix_config_ = kVirtioMsiNoVector;
  queue_select_ = 0;
  for (size_t i = 0; i < queues_.size(); ++i) queue_vectors_[i].store(kVirtioMsiNoVector);
  isr_.store(0);
}

void VirtioPciDevice::NeedsResetLocked(const absl::Status& why) {
  (void)why;
  if (status_ & kStatusDeviceNeedsReset) return;
  status_ |= kStatusDeviceNeedsReset;
  ConfigChanged();
}

void VirtioPciDevice::ConfigChanged() {
  config_generation_.fetch_add(1);
  isr_.fetch_or(kIsrConfig);
  uint16_t v = msix_config_.load();
  if (v != kVirtioMsiNoVector) interrupt_->Signal(v);
}

void VirtioPciDevice::SignalQueue(uint16_t index) {
  if (index >= queues_.size()) return;
  uint16_t v = queue_vectors_[index].load();
  isr_.fetch_or(kIsrQueue);
  if (v != kVirtioMsiNoVector) interrupt_->Signal(v);
}

void VirtioPciDevice::Notify(uint16_t index) {
  if (index >= queues_.size() || !activated_.load()) return;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (status_ & kStatusDeviceNeedsReset) return;
  }
  Virtqueue& q = *queues_[index];
  if (!q.active()) return;
  device_->ProcessQueue(index);
  if (q.in_error()) {
    std::lock_guard<std::mutex> l(mu_);
    NeedsResetLocked(q.error());
  }
}

std::optional<uint64_t> VirtioPciDevice::NotifyAddress(uint16_t index) const {
  uint64_t base = config_.bar_mapped_address(kVirtioBar);
  if (base == 0 || index >= queues_.size()) return std::nullopt;
  return base + NotifyBarOffset(index);
}

uint8_t VirtioPciDevice::device_status() const {
  std::lock_guard<std::mutex> l(mu_);
  return status_;
}

uint64_t VirtioPciDevice::negotiated_features() const {
  std::lock_guard<std::mutex> l(mu_);
  return (status_ & kStatusFeaturesOk) ? driver_features_ : 0;
}

// ---- Save / restore --------------------------------------------------------------------------

VirtioPciState VirtioPciDevice::SaveState() const {
  std::lock_guard<std::mutex> l(mu_);
  VirtioPciState st;
  st.set_device_status(status_);
  st.set_device_feature_select(device_feature_select_);
  st.set_driver_feature_select(driver_feature_select_);
  st.set_driver_features(driver_features_);
  st.set_msix_config(msix_config_.load());
  st.set_queue_select(queue_select_);
  st.set_config_generation(config_generation_.load());
  st.set_isr(isr_.load());
  for (size_t i = 0; i < queues_.size(); ++i) {
    *st.add_queues() = queues_[i]->SaveState();
    st.add_queue_msix_vectors(queue_vectors_[i].load());
  }
  st.set_device_state(device_->SaveState());
  *st.mutable_pci_config() = config_.SaveState();
  if (msix_ != nullptr) {
    *st.mutable_msix() = msix_->SaveState();
  }
  return st;
}

absl::Status VirtioPciDevice::RestoreState(const VirtioPciState& st) {
  std::lock_guard<std::mutex> l(mu_);
  ResetLocked();
  auto fail = [&](absl::Status s) {
    ResetLocked();
    return s;
  };
  if (st.queues_size() != static_cast<int>(queues_.size()) ||
      st.queue_msix_vectors_size() != static_cast<int>(queues_.size()))
    return fail(absl::InvalidArgumentError("virtio-pci restore: queue count mismatch"));
  if (st.device_status() > 0xff || st.msix_config() > 0xffff || st.queue_select() > 0xffff ||
      st.config_generation() > 0xff || st.isr() > 3)
    return fail(absl::InvalidArgumentError("virtio-pci restore: field out of range"));
  if ((st.driver_features() & ~device_features_) != 0)
    return fail(absl::InvalidArgumentError("virtio-pci restore: features not offered"));
  if (st.has_msix() != (msix_ != nullptr))
    return fail(absl::InvalidArgumentError("virtio-pci restore: MSI-X presence mismatch"));
  for (int i = 0; i < st.queue_msix_vectors_size(); ++i)
    if (st.queue_msix_vectors(i) > 0xffff)
      return fail(absl::InvalidArgumentError("virtio-pci restore: bad queue vector"));
  absl::Status s = config_.RestoreState(st.pci_config());
  if (!s.ok()) return fail(s);
  if (msix_ != nullptr) {
    s = msix_->RestoreState(st.msix());
    if (!s.ok()) return fail(s);
  }
  for (size_t i = 0; i < queues_.size(); ++i) {
    s = queues_[i]->RestoreState(st.queues(static_cast<int>(i)));
    if (!s.ok()) return fail(s);
    queue_vectors_[i] = static_cast<uint16_t>(st.queue_msix_vectors(static_cast<int>(i)));
  }
  status_ = static_cast<uint8_t>(st.device_status());
  device_feature_select_ = st.device_feature_select();
  driver_feature_select_ = st.driver_feature_select();
  driver_features_ = st.driver_features();
  msix_config_ = static_cast<uint16_t>(st.msix_config());
  queue_select_ = static_cast<uint16_t>(st.queue_select());
  config_generation_ = static_cast<uint8_t>(st.config_generation());
  isr_.store(static_cast<uint8_t>(st.isr()));
  s = device_->RestoreState(st.device_state());
  if (!s.ok()) return fail(s);
  if ((status_ & kStatusDriverOk) && (status_ & kStatusFeaturesOk)) {
    s = device_->Activate(driver_features_, queue_ptrs_, [this](uint16_t i) { SignalQueue(i); });
    if (!s.ok()) return fail(s);
    activated_.store(true);
  }
  return absl::OkStatus();
}

}  // namespace microvmm::virtio
