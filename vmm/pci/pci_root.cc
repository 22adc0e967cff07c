#include "vmm/pci/pci_root.h"

#include <cstring>

#include "absl/strings/str_format.h"
#include "vmm/base/log.h"

namespace microvmm::pci {

namespace {

uint32_t AllOnes(unsigned size) { return size >= 4 ? 0xffffffffu : (1u << (8 * size)) - 1; }

void StoreLe(std::span<uint8_t> data, uint32_t v) {
  for (size_t i = 0; i < data.size(); ++i) data[i] = i < 4 ? static_cast<uint8_t>(v >> (8 * i)) : 0xff;
}

uint32_t LoadLe(std::span<const uint8_t> data) {
  uint32_t v = 0;
  for (size_t i = 0; i < data.size() && i < 4; ++i) v |= uint32_t{data[i]} << (8 * i);
  return v;
}

bool ValidSize(size_t size) { return size == 1 || size == 2 || size == 4; }

}  // namespace

Conf1Address DecodeConf1(uint32_t address) {
  Conf1Address a;
  a.enabled = address & kConf1Enable;
  a.bus = (address >> 16) & 0xff;
  a.device = (address >> 11) & 0x1f;
  a.function = (address >> 8) & 0x7;
  a.reg = address & 0xfc;
  return a;
}

uint32_t EncodeConf1(uint8_t bus, uint8_t device, uint8_t function, uint8_t reg) {
  return kConf1Enable | uint32_t{bus} << 16 | uint32_t{device & 0x1fu} << 11 |
         uint32_t{function & 0x7u} << 8 | (reg & 0xfcu);
}

EcamAddress DecodeEcam(uint64_t offset) {
  EcamAddress a;
  a.bus = (offset >> 20) & 0xff;
  a.device = (offset >> 15) & 0x1f;
  a.function = (offset >> 12) & 0x7;
  a.reg = offset & 0xfff;
  return a;
}

uint64_t EncodeEcam(uint8_t bus, uint8_t device, uint8_t function, uint16_t reg) {
  return uint64_t{bus} << 20 | uint64_t{device & 0x1fu} << 15 | uint64_t{function & 0x7u} << 12 |
         (reg & 0xfffu);
}

PciHostBridge::PciHostBridge()
    : config_(PciHeader{.vendor_id = kHostBridgeVendorId,
                        .device_id = kHostBridgeDeviceId,
                        .class_code = kClassBridgeHost}) {}

// ---- conf1: 0xCF8 CONFIG_ADDRESS (dword only), 0xCF9 reset control (byte), 0xCFC-0xCFF data ----
class ConfigIo : public BusDevice {
 public:
  explicit ConfigIo(PciRootBus* root) : root_(root) {}

  void Read(uint64_t offset, std::span<uint8_t> data) override {
    size_t size = data.size();
    uint32_t v = AllOnes(size);
    if (offset == 0 && size == 4) {
      v = address_.load(std::memory_order_relaxed);
    } else if (offset == kResetControlPort - kConfigAddressPort && size == 1) {
      v = rcr_.load(std::memory_order_relaxed);
    } else if (offset >= 4 && ValidSize(size) && (offset - 4) % size == 0) {
      Conf1Address a = DecodeConf1(address_.load(std::memory_order_relaxed));
      if (a.enabled)
        v = root_->ConfigRead(a.bus, a.device, a.function, a.reg + (offset - 4), size);
    }
    StoreLe(data, v);
  }

  void Write(uint64_t offset, std::span<const uint8_t> data) override {
    size_t size = data.size();
    uint32_t v = LoadLe(data);
    if (offset == 0 && size == 4) {
      address_.store(v & ~0x3u, std::memory_order_relaxed);  // bits 1:0 read as 0
    } else if (offset == kResetControlPort - kConfigAddressPort && size == 1) {
      rcr_.store(v & ~0x4u & 0xff, std::memory_order_relaxed);  // RST_CPU self-clears
      if (v & 0x4) root_->Reset();
    } else if (offset >= 4 && ValidSize(size) && (offset - 4) % size == 0) {
      Conf1Address a = DecodeConf1(address_.load(std::memory_order_relaxed));
      if (a.enabled)
        root_->ConfigWrite(a.bus, a.device, a.function, a.reg + (offset - 4), size, v);
    }
    // Byte/word writes to 0xCF8/0xCFA/0xCFB (type-2 probing) are ignored.
  }

 private:
  PciRootBus* root_;
  std::atomic<uint32_t> address_{0};
  std::atomic<uint32_t> rcr_{0};
};

// ---- ECAM: bus 0 only (1 MiB); 8-byte accesses are split into two dwords ----
class Ecam : public BusDevice {
 public:
  explicit Ecam(PciRootBus* root) : root_(root) {}

  void Read(uint64_t offset, std::span<uint8_t> data) override {
    if (data.size() == 8 && offset % 8 == 0) {
      Read(offset, data.subspan(0, 4));
      Read(offset + 4, data.subspan(4, 4));
      return;
    }
    uint32_t v = AllOnes(data.size());
    if (ValidSize(data.size()) && offset % data.size() == 0) {
      EcamAddress a = DecodeEcam(offset);
      v = root_->ConfigRead(a.bus, a.device, a.function, a.reg, data.size());
    }
    StoreLe(data, v);
  }

  void Write(uint64_t offset, std::span<const uint8_t> data) override {
    if (data.size() == 8 && offset % 8 == 0) {
      Write(offset, data.subspan(0, 4));
      Write(offset + 4, data.subspan(4, 4));
      return;
    }
    if (!ValidSize(data.size()) || offset % data.size() != 0) return;
    EcamAddress a = DecodeEcam(offset);
    root_->ConfigWrite(a.bus, a.device, a.function, a.reg, data.size(), LoadLe(data));
  }

 private:
  PciRootBus* root_;
};

// ---- A PCI address window: dispatches to the BAR that covers an access ----
class BarWindow : public BusDevice {
 public:
  BarWindow(uint64_t start, uint64_t end, bool io) : start_(start), end_(end), io_(io) {}
  uint64_t start() const { return start_; }
  uint64_t end() const { return end_; }
  bool io() const { return io_; }
  bool Contains(uint64_t addr, uint64_t len) const {
    return addr >= start_ && addr + len <= end_ && addr + len > addr;
  }

  absl::Status Map(uint64_t addr, uint64_t len, std::shared_ptr<PciDevice> dev, int bar) {
    if (!Contains(addr, len))
      return absl::OutOfRangeError(absl::StrFormat(
          "BAR 0x%x+0x%x outside the PCI window [0x%x, 0x%x)", addr, len, start_, end_));
    std::unique_lock lock(mu_);
    auto next = map_.lower_bound(addr);
    auto overlap = [&](std::map<uint64_t, Mapping>::iterator it) {
      return absl::AlreadyExistsError(absl::StrFormat(
          "BAR 0x%x+0x%x overlaps %s BAR %d at 0x%x", addr, len, it->second.dev->name(),
          it->second.bar, it->first));
    };
    if (next != map_.end() && next->first < addr + len) return overlap(next);
    if (next != map_.begin()) {
      auto prev = std::prev(next);
      if (prev->first + prev->second.len > addr) return overlap(prev);
    }
    map_.emplace(addr, Mapping{len, std::move(dev), bar});
    return absl::OkStatus();
  }

  void Unmap(const PciDevice* dev, int bar) {
    std::unique_lock lock(mu_);
    for (auto it = map_.begin(); it != map_.end(); ++it) {
      if (it->second.dev.get() == dev && it->second.bar == bar) {
        map_.erase(it);
        return;
      }
    }
  }

  void Read(uint64_t offset, std::span<uint8_t> data) override {
    uint64_t off;
    int bar;
    std::shared_ptr<PciDevice> dev = Find(start_ + offset, data.size(), &off, &bar);
    if (!dev) {
      std::memset(data.data(), 0xff, data.size());
      return;
    }
    dev->ReadBar(bar, off, data);
  }

  void Write(uint64_t offset, std::span<const uint8_t> data) override {
    uint64_t off;
    int bar;
    std::shared_ptr<PciDevice> dev = Find(start_ + offset, data.size(), &off, &bar);
    if (dev) dev->WriteBar(bar, off, data);
  }

 private:
  struct Mapping {
    uint64_t len;
    std::shared_ptr<PciDevice> dev;
    int bar;
  };

  std::shared_ptr<PciDevice> Find(uint64_t addr, uint64_t len, uint64_t* off, int* bar) const {
    std::shared_lock lock(mu_);
    auto it = map_.upper_bound(addr);
    if (it == map_.begin()) return nullptr;
    --it;
    const Mapping& m = it->second;
    if (addr - it->first >= m.len || addr - it->first + len > m.len) return nullptr;
    // A function decodes its BARs only while the command register enables that space.
    if (io_ ? !m.dev->config().io_enabled() : !m.dev->config().memory_enabled()) return nullptr;
    *off = addr - it->first;
    *bar = m.bar;
    return m.dev;
  }

  const uint64_t start_;
  const uint64_t end_;
  const bool io_;
  mutable std::shared_mutex mu_;
  std::map<uint64_t, Mapping> map_;
};

PciRootBus::PciRootBus(const PciWindows& windows)
    : allocator_(windows),
      config_io_(std::make_shared<ConfigIo>(this)),
      ecam_(std::make_shared<Ecam>(this)),
      io_window_(std::make_shared<BarWindow>(windows.io_start, windows.io_end, true)),
      mmio32_window_(std::make_shared<BarWindow>(windows.mmio32_start, windows.mmio32_end, false)),
      mmio64_window_(
          std::make_shared<BarWindow>(windows.mmio64_start, windows.mmio64_end, false)) {
  slots_[0] = std::make_shared<PciHostBridge>();
}

PciRootBus::~PciRootBus() {
  for (auto& d : slots_)
    if (d) d->config().set_bar_moved_callback(nullptr);
}

std::shared_ptr<BusDevice> PciRootBus::io_window() const { return io_window_; }
std::shared_ptr<BusDevice> PciRootBus::mmio32_window() const { return mmio32_window_; }
std::shared_ptr<BusDevice> PciRootBus::mmio64_window() const { return mmio64_window_; }

absl::Status PciRootBus::Attach(Bus& pio, Bus& mmio) {
  const PciWindows& w = windows();
  if (absl::Status s = pio.Insert(config_io_, kConfigAddressPort, kConfigIoPortCount); !s.ok())
    return s;
  if (absl::Status s = mmio.Insert(ecam_, kEcamBase, kEcamSize); !s.ok()) return s;
  if (w.io_end > w.io_start)
    if (absl::Status s = pio.Insert(io_window_, w.io_start, w.io_end - w.io_start); !s.ok())
      return s;
  if (w.mmio32_end > w.mmio32_start)
    if (absl::Status s = mmio.Insert(mmio32_window_, w.mmio32_start, w.mmio32_end - w.mmio32_start);
        !s.ok())
      return s;
  if (w.mmio64_end > w.mmio64_start)
    if (absl::Status s = mmio.Insert(mmio64_window_, w.mmio64_start, w.mmio64_end - w.mmio64_start);
        !s.ok())
      return s;
  return absl::OkStatus();
}

void PciRootBus::set_reset_callback(std::function<void()> fn) {
  std::lock_guard lock(reset_mu_);
  reset_fn_ = std::move(fn);
}

void PciRootBus::Reset() {
  std::function<void()> fn;
  {
    std::lock_guard lock(reset_mu_);
    fn = reset_fn_;
  }
  if (fn) fn();
}

std::shared_ptr<PciDevice> PciRootBus::device(uint8_t device, uint8_t function) const {
  if (device >= kDevicesPerBus || function >= kFunctionsPerDevice) return nullptr;
  return slots_[device * kFunctionsPerDevice + function];
}

BarWindow* PciRootBus::WindowFor(BarType type, uint64_t addr, uint64_t len) const {
  if (type == BarType::kIo) return io_window_->Contains(addr, len) ? io_window_.get() : nullptr;
  if (mmio32_window_->Contains(addr, len)) return mmio32_window_.get();
  if (type == BarType::kMem64 && mmio64_window_->Contains(addr, len)) return mmio64_window_.get();
  return nullptr;
}

absl::Status PciRootBus::MapBar(const std::shared_ptr<PciDevice>& dev, int bar, uint64_t addr) {
  PciConfigSpace& cfg = dev->config();
  BarWindow* w = WindowFor(cfg.bar_type(bar), addr, cfg.bar_size(bar));
  if (w == nullptr)
    return absl::OutOfRangeError(absl::StrFormat("%s BAR %d (%s) at 0x%x+0x%x is outside the PCI windows",
                                                 dev->name(), bar, BarTypeName(cfg.bar_type(bar)),
                                                 addr, cfg.bar_size(bar)));
  return w->Map(addr, cfg.bar_size(bar), dev, bar);
}

void PciRootBus::UnmapBar(const PciDevice* dev, int bar) {
  io_window_->Unmap(dev, bar);
  mmio32_window_->Unmap(dev, bar);
  mmio64_window_->Unmap(dev, bar);
}

absl::Status PciRootBus::AddDevice(uint8_t device, uint8_t function,
                                   std::shared_ptr<PciDevice> dev) {
  if (!dev) return absl::InvalidArgumentError("null PCI device");
  if (device >= kDevicesPerBus || function >= kFunctionsPerDevice)
    return absl::InvalidArgumentError(absl::StrFormat("bad PCI slot 00:%02x.%d", device, function));
  std::lock_guard lock(config_mu_);
  auto& slot = slots_[device * kFunctionsPerDevice + function];
  if (slot)
    return absl::AlreadyExistsError(absl::StrFormat("PCI slot 00:%02x.%d holds %s", device,
                                                    function, slot->name()));
  std::shared_ptr<PciDevice> fn0 = slots_[device * kFunctionsPerDevice];
  if (function != 0 && !fn0)
    return absl::FailedPreconditionError(absl::StrFormat(
        "PCI 00:%02x.%d: function 0 must exist before other functions", device, function));
  PciConfigSpace& cfg = dev->config();
  if (absl::Status s = allocator_.AssignBars(cfg); !s.ok())
    return absl::ResourceExhaustedError(absl::StrFormat("PCI 00:%02x.%d %s: %s", device, function,
                                                        dev->name(), s.message()));
  for (int i = 0; i < cfg.num_bars(); ++i) {
    if (cfg.bar_type(i) == BarType::kNone || cfg.bar_mapped_address(i) == 0) continue;
    if (absl::Status s = MapBar(dev, i, cfg.bar_mapped_address(i)); !s.ok()) {
      for (int j = 0; j < i; ++j) UnmapBar(dev.get(), j);
      return s;
    }
  }
  std::weak_ptr<PciDevice> weak = dev;
  cfg.set_bar_moved_callback([this, weak](const BarMove& m) {
    if (auto d = weak.lock()) OnBarMoved(d, m);
  });
  if (function != 0)
    fn0->config().WriteRaw(kRegHeaderType, 1,
                           fn0->config().ReadRaw(kRegHeaderType, 1) | kHeaderTypeMultiFunction);
  slot = std::move(dev);
  return absl::OkStatus();
}

absl::StatusOr<uint8_t> PciRootBus::AddDevice(std::shared_ptr<PciDevice> dev) {
  for (uint8_t d = 1; d < kDevicesPerBus; ++d) {
    {
      std::lock_guard lock(config_mu_);
      if (slots_[d * kFunctionsPerDevice]) continue;
    }
    if (absl::Status s = AddDevice(d, 0, std::move(dev)); !s.ok()) return s;
    return d;
  }
  return absl::ResourceExhaustedError("PCI bus 0 has no free device slot");
}

void PciRootBus::OnBarMoved(const std::shared_ptr<PciDevice>& dev, const BarMove& move) {
  UnmapBar(dev.get(), move.index);
  if (move.new_addr != 0) {
    if (absl::Status s = MapBar(dev, move.index, move.new_addr); !s.ok())
      LOG_WARN_RATELIMITED("PCI: guest moved %s BAR %d from 0x%x to 0x%x; left unmapped: %s",
                           dev->name(), move.index, move.old_addr, move.new_addr, s.message());
    else
      LOG_DEBUG("PCI: %s BAR %d moved 0x%x -> 0x%x", dev->name(), move.index, move.old_addr,
                move.new_addr);
  }
  dev->BarMoved(move);
}

absl::Status PciRootBus::RemapAll() {
  std::lock_guard lock(config_mu_);
  absl::Status first;
  for (const auto& dev : slots_) {
    if (!dev) continue;
    PciConfigSpace& cfg = dev->config();
    for (int i = 0; i < cfg.num_bars(); ++i) {
      if (cfg.bar_type(i) == BarType::kNone) continue;
      UnmapBar(dev.get(), i);
      uint64_t addr = cfg.bar_mapped_address(i);
      if (addr == 0) continue;
      if (absl::Status s = MapBar(dev, i, addr); !s.ok() && first.ok()) first = s;
    }
  }
  return first;
}

uint32_t PciRootBus::ConfigRead(uint8_t bus, uint8_t device, uint8_t function, uint32_t reg,
                                unsigned size) {
  if (bus != 0 || device >= kDevicesPerBus || function >= kFunctionsPerDevice)
    return AllOnes(size);
  std::lock_guard lock(config_mu_);
  const auto& dev = slots_[device * kFunctionsPerDevice + function];
  if (!dev) return AllOnes(size);
  return dev->ReadConfig(reg, size);
}

void PciRootBus::ConfigWrite(uint8_t bus, uint8_t device, uint8_t function, uint32_t reg,
                             unsigned size, uint32_t value) {
  if (bus != 0 || device >= kDevicesPerBus || function >= kFunctionsPerDevice) return;
  std::lock_guard lock(config_mu_);
  const auto& dev = slots_[device * kFunctionsPerDevice + function];
  if (dev) dev->WriteConfig(reg, size, value);
}

}  // namespace microvmm::pci
