// Virtio 1.x modern PCI transport (virtio spec "Virtio Over PCI Bus"): a PCI function with one
// 64-bit memory BAR holding the common configuration, ISR status, device configuration and
// notification regions (plus the MSI-X table and PBA when MSI-X is used), the vendor-specific
// capabilities describing them (COMMON, NOTIFY, ISR, DEVICE, PCI_CFG), feature negotiation and
// queue configuration. Legacy (transitional) drivers are refused: VIRTIO_F_VERSION_1 must be
// negotiated or FEATURES_OK does not stick.
//
// BAR 0 layout (kBar*Offset below): common cfg @0x0000, ISR @0x1000, device cfg @0x2000,
// notify @0x3000 (queue q at 0x3000 + 4*q: queue_notify_off = q, notify_off_multiplier = 4),
// MSI-X table @0x4000, PBA @0x6000.
//
// Interrupts go through VirtioInterrupt (vector numbers as programmed by the driver in
// msix_config / queue_msix_vector). MsixInterrupt adapts an MsixTable; tests use a recorder.
//
// Thread safety: register accesses and notifications may come from any vCPU thread; the
// transport's state is under a mutex which is not held while the device processes a queue.
#ifndef MICROVMM_DEVICES_VIRTIO_PCI_TRANSPORT_H_
#define MICROVMM_DEVICES_VIRTIO_PCI_TRANSPORT_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "devices/virtio/device.h"
#include "devices/virtio/queue.h"
#include "devices/virtio/virtio_pci_state.pb.h"
#include "vmm/event_loop.h"
#include "vmm/kvm/kvm.h"
#include "vmm/memory/guest_memory.h"
#include "vmm/pci/ioeventfd.h"
#include "vmm/pci/msix.h"
#include "vmm/pci/pci_config.h"
#include "vmm/pci/pci_device.h"

namespace microvmm::virtio {

inline constexpr uint16_t kVirtioPciVendorId = 0x1af4;
inline constexpr uint16_t kVirtioPciDeviceIdBase = 0x1040;  // + virtio device ID
inline constexpr uint16_t kVirtioMsiNoVector = 0xffff;

// virtio_pci_cap.cfg_type
inline constexpr uint8_t kVirtioPciCapCommonCfg = 1;
inline constexpr uint8_t kVirtioPciCapNotifyCfg = 2;
inline constexpr uint8_t kVirtioPciCapIsrCfg = 3;
inline constexpr uint8_t kVirtioPciCapDeviceCfg = 4;
inline constexpr uint8_t kVirtioPciCapPciCfg = 5;

// Device status bits.
inline constexpr uint8_t kStatusAcknowledge = 1;
inline constexpr uint8_t kStatusDriver = 2;
inline constexpr uint8_t kStatusDriverOk = 4;
inline constexpr uint8_t kStatusFeaturesOk = 8;
inline constexpr uint8_t kStatusDeviceNeedsReset = 64;
inline constexpr uint8_t kStatusFailed = 128;

// ISR bits.
inline constexpr uint8_t kIsrQueue = 1;
inline constexpr uint8_t kIsrConfig = 2;

// struct virtio_pci_common_cfg offsets.
inline constexpr uint32_t kCommonDeviceFeatureSelect = 0;
inline constexpr uint32_t kCommonDeviceFeature = 4;
inline constexpr uint32_t kCommonDriverFeatureSelect = 8;
inline constexpr uint32_t kCommonDriverFeature = 12;
inline constexpr uint32_t kCommonMsixConfig = 16;
inline constexpr uint32_t kCommonNumQueues = 18;
inline constexpr uint32_t kCommonDeviceStatus = 20;
inline constexpr uint32_t kCommonConfigGeneration = 21;
inline constexpr uint32_t kCommonQueueSelect = 22;
inline constexpr uint32_t kCommonQueueSize = 24;
inline constexpr uint32_t kCommonQueueMsixVector = 26;
inline constexpr uint32_t kCommonQueueEnable = 28;
inline constexpr uint32_t kCommonQueueNotifyOff = 30;
inline constexpr uint32_t kCommonQueueDesc = 32;
inline constexpr uint32_t kCommonQueueDriver = 40;
inline constexpr uint32_t kCommonQueueDevice = 48;
inline constexpr uint32_t kCommonCfgBytes = 56;

// BAR 0 layout.
inline constexpr int kVirtioBar = 0;
inline constexpr uint64_t kBarCommonOffset = 0x0000;
inline constexpr uint64_t kBarIsrOffset = 0x1000;
inline constexpr uint64_t kBarDeviceCfgOffset = 0x2000;
inline constexpr uint64_t kBarNotifyOffset = 0x3000;
inline constexpr uint32_t kNotifyOffMultiplier = 4;
inline constexpr uint64_t kBarMsixTableOffset = 0x4000;
inline constexpr uint64_t kBarMsixPbaOffset = 0x6000;
inline constexpr uint64_t kVirtioBarSize = 0x8000;
inline constexpr uint32_t kMaxVirtioQueues = 256;  // notify region is 0x1000 / 4 entries

class VirtioInterrupt {
 public:
  virtual ~VirtioInterrupt() = default;
  virtual void Signal(uint16_t vector) = 0;
};

// Production interrupt delivery through the function's MSI-X table (irqfds).
class MsixInterrupt : public VirtioInterrupt {
 public:
  explicit MsixInterrupt(const pci::MsixTable* table) : table_(table) {}
  void Signal(uint16_t vector) override { table_->Trigger(vector); }

 private:
  const pci::MsixTable* table_;
};

class VirtioPciDevice : public pci::PciDevice {
 public:
  // `mem` and `device` must outlive the transport. `msix` (may be null: no MSI-X capability,
  // used by unit tests) gets its table/PBA placed in BAR 0; it needs at least
  // 1 + number of queues vectors to give each queue its own. `interrupt` null: MsixInterrupt
  // over `msix` (then `msix` is required).
  static absl::StatusOr<std::unique_ptr<VirtioPciDevice>> Create(
      GuestMemory* mem, VirtioDevice* device, std::unique_ptr<pci::MsixTable> msix,
      std::unique_ptr<VirtioInterrupt> interrupt = nullptr);

  ~VirtioPciDevice() override;

  pci::PciConfigSpace& config() override { return config_; }
  std::string name() const override { return "virtio-" + device_->name(); }
  uint32_t ReadConfig(uint32_t offset, unsigned size) override;
  void WriteConfig(uint32_t offset, unsigned size, uint32_t value) override;
  void ReadBar(int bar, uint64_t offset, std::span<uint8_t> data) override;
  void WriteBar(int bar, uint64_t offset, std::span<const uint8_t> data) override;
  void BarMoved(const pci::BarMove& move) override;

  // Queue notifications through KVM ioeventfds (2-byte writes to a queue's notify register)
  // handled on `loop`, so a guest kick does not exit to userspace; other widths still trap and
  // are handled synchronously. Registers at BAR 0's current address (none while unmapped) and
  // follows the BAR when the guest moves it. Idempotent; call after the function is on the bus
  // and again after RestoreState(). `vm` and `loop` must outlive the transport.
  absl::Status EnableIoEventFds(KvmVm* vm, EventLoop* loop);
  bool ioeventfds_active() const;
  // Queue notifications received through ioeventfds / trapped register writes.
  uint64_t kicks_ioeventfd() const { return kicks_ioeventfd_.load(); }
  uint64_t kicks_trapped() const { return kicks_trapped_.load(); }

  // Notification of queue `index` (what a write to its notify address does; call it from the
  // ioeventfd handler in production).
  void Notify(uint16_t index);
  // Offset of queue `index`'s notify register in BAR kVirtioBar (register a 2-byte ioeventfd
  // there, no datamatch, or datamatch = index).
  static uint64_t NotifyBarOffset(uint16_t index) {
    return kBarNotifyOffset + uint64_t{kNotifyOffMultiplier} * index;
  }
  // Guest-physical notify address of queue `index`, if BAR 0 is mapped.
  std::optional<uint64_t> NotifyAddress(uint16_t index) const;
  uint16_t num_queues() const { return static_cast<uint16_t>(queues_.size()); }

  // Introspection (tests, logs).
  uint8_t device_status() const;
  uint64_t negotiated_features() const;  // 0 until FEATURES_OK
  Virtqueue& queue(uint16_t index) { return *queues_.at(index); }
  pci::MsixTable* msix() { return msix_.get(); }

  VirtioPciState SaveState() const;
  // The transport must be freshly created for the same device type / queue layout.
  absl::Status RestoreState(const VirtioPciState& state);

 private:
  VirtioPciDevice(GuestMemory* mem, VirtioDevice* device, std::unique_ptr<pci::MsixTable> msix,
                  std::unique_ptr<VirtioInterrupt> interrupt);
  absl::Status Init();

  void ReadCommon(uint64_t offset, std::span<uint8_t> data);
  void WriteCommon(uint64_t offset, std::span<const uint8_t> data);
  void CommonImageLocked(uint8_t* img) const;
  void SetStatusLocked(uint8_t value);
  void ResetLocked();
  // Sets DEVICE_NEEDS_RESET and raises a configuration-change interrupt.
  void NeedsResetLocked(const absl::Status& why);
  void SignalQueue(uint16_t index);
  absl::Status PlaceIoEventFdsLocked(uint64_t bar_base);
  void DropIoEventFdsLocked();
  // Configuration change: bumps config_generation, sets the ISR bit, raises msix_config. Lock-free.
  void ConfigChanged();

  GuestMemory* const mem_;
  VirtioDevice* const device_;
  pci::PciConfigSpace config_;
  std::unique_ptr<pci::MsixTable> msix_;
  std::unique_ptr<VirtioInterrupt> interrupt_;
  std::vector<std::unique_ptr<Virtqueue>> queues_;
  std::vector<Virtqueue*> queue_ptrs_;
  uint64_t device_features_ = 0;
  uint32_t pci_cfg_cap_ = 0;  // offset of the VIRTIO_PCI_CAP_PCI_CFG capability

  mutable std::mutex mu_;
  uint8_t status_ = 0;
  uint32_t device_feature_select_ = 0;
  uint32_t driver_feature_select_ = 0;
  uint64_t driver_features_ = 0;
  std::atomic<uint16_t> msix_config_{kVirtioMsiNoVector};
  uint16_t queue_select_ = 0;
  std::atomic<uint8_t> config_generation_{0};
  // Lock-free on the signalling path (devices signal with their own locks held).
  std::unique_ptr<std::atomic<uint16_t>[]> queue_vectors_;
  std::atomic<bool> activated_{false};  // device Activate() succeeded (DRIVER_OK)
  std::atomic<uint8_t> isr_{0};

  mutable std::mutex io_mu_;  // ioeventfd registrations (never held while a queue is processed)
  KvmVm* io_vm_ = nullptr;
  EventLoop* io_loop_ = nullptr;
  std::vector<std::unique_ptr<pci::IoEventFd>> ioeventfds_;
  std::atomic<uint64_t> kicks_ioeventfd_{0}, kicks_trapped_{0};
};

}  // namespace microvmm::virtio

#endif  // MICROVMM_DEVICES_VIRTIO_PCI_TRANSPORT_H_
