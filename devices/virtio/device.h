// The device half of a virtio device (virtio 1.x), independent of the transport. The transport
// (devices/virtio/pci_transport.h) owns the virtqueues, negotiates features and calls in here.
#ifndef MICROVMM_DEVICES_VIRTIO_DEVICE_H_
#define MICROVMM_DEVICES_VIRTIO_DEVICE_H_

#include <cstdint>
#include <cstring>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "devices/virtio/queue.h"

namespace microvmm::virtio {

// Virtio device IDs (virtio spec "Device Types").
inline constexpr uint16_t kDeviceIdNet = 1;
inline constexpr uint16_t kDeviceIdBlock = 2;
inline constexpr uint16_t kDeviceIdConsole = 3;
inline constexpr uint16_t kDeviceIdEntropy = 4;
inline constexpr uint16_t kDeviceIdBalloon = 5;
inline constexpr uint16_t kDeviceIdVsock = 19;

// Threading contract for devices:
//  - ProcessQueue() may run on a vCPU thread (notify write trapped) or on the VM's EventLoop
//    thread (ioeventfd), possibly concurrently for different queues: devices lock internally.
//  - Activate(), Reset(), SaveState(), RestoreState() are called with the transport's lock held:
//    a device must never call back into the transport (QueueSignal, NotifyConfigChanged())
//    from inside them, nor wait there for a thread that might.
//  - QueueSignal and NotifyConfigChanged() are lock-free on the transport side; they may be
//    called with the device's own lock held, from any thread.
//  - Backend work (io_uring completions, tap/socket readiness) runs on the EventLoop handed to
//    the device at creation, never on a thread of the device's own, so that pausing the loop
//    (VM pause) stops all device activity.
//
// Raises the used-buffer notification of queue `index` (the transport maps it to an interrupt
// vector). Callable from any thread.
using QueueSignal = std::function<void(uint16_t index)>;

class VirtioDevice {
 public:
  virtual ~VirtioDevice() = default;

  virtual uint16_t device_type() const = 0;  // virtio device ID
  virtual std::string name() const = 0;
  // Feature bits offered (device-specific and transport bits such as VERSION_1, EVENT_IDX).
  virtual uint64_t device_features() const = 0;
  // One entry per queue: its maximum size (power of 2, <= 32768).
  virtual std::vector<uint32_t> queue_max_sizes() const = 0;

  // Device-specific configuration space.
  virtual uint32_t config_size() const { return 0; }
  virtual void ReadConfig(uint64_t offset, std::span<uint8_t> data) {
    (void)offset;
    std::memset(data.data(), 0, data.size());
  }
  virtual void WriteConfig(uint64_t offset, std::span<const uint8_t> data) {
    (void)offset;
    (void)data;
  }

  // DRIVER_OK: `features` are the negotiated ones; `queues` has one entry per queue (the
  // transport owns them; they stay valid until Reset(); inactive ones were not enabled by the
  // driver). An error makes the transport set DEVICE_NEEDS_RESET.
  virtual absl::Status Activate(uint64_t features, std::span<Virtqueue* const> queues,
                                QueueSignal signal) = 0;
  // Device reset (status 0): forget the queues and any in-flight work.
  virtual void Reset() = 0;
  // Available-buffer notification for queue `index` (only after Activate()). A queue that enters
  // its error state is noticed by the transport afterwards.
  virtual void ProcessQueue(uint16_t index) = 0;

  // VM pause, after the vCPUs and the EventLoop stopped: finish (or cancel and remember) every
  // backend operation that could still write guest memory — e.g. wait for io_uring reads to
  // land and complete them into the used ring — so that after Quiesce() returns the device
  // touches no guest memory until the next ProcessQueue()/event. The saved state then holds
  // only requests the device can redo after a restore.
  virtual void Quiesce() {}
  // The VM runs again after a Quiesce() (without a restore): restart backend work Quiesce()
  // stopped (e.g. reading a tap), called with the EventLoop running.
  virtual void Resume() {}

  // Device-specific save/restore: the serialized form of the device's own protobuf message
  // (kept next to its code), stored in VirtioPciState.device_state. RestoreState runs before
  // Activate(); Activate() after a restore must resubmit the requests still in flight on the
  // queues (Virtqueue::InFlightHeads() + ReadInFlightChain()).
  virtual std::string SaveState() const { return {}; }
  virtual absl::Status RestoreState(const std::string& state) {
    (void)state;
    return absl::OkStatus();
  }

  // Set by the transport once at creation: raises a configuration-change interrupt (bumping
  // config_generation). Devices call NotifyConfigChanged() after changing their config space.
  void set_config_changed_callback(std::function<void()> fn) { config_changed_ = std::move(fn); }

 protected:
  void NotifyConfigChanged() {
    if (config_changed_) config_changed_();
  }

 private:
  std::function<void()> config_changed_;
};

}  // namespace microvmm::virtio

#endif  // MICROVMM_DEVICES_VIRTIO_DEVICE_H_
