// virtio-rng (entropy device, virtio device ID 4): one request queue; every chain's writable
// buffers are filled with getrandom(2) bytes and returned. No feature bits, no config space.
#ifndef MICROVMM_DEVICES_VIRTIO_RNG_H_
#define MICROVMM_DEVICES_VIRTIO_RNG_H_

#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "devices/virtio/device.h"

namespace microvmm::virtio {

class VirtioRng : public VirtioDevice {
 public:
  static constexpr uint32_t kQueueSize = 256;
  // Bytes served per chain at most (a driver asking for more gets a short answer).
  static constexpr uint32_t kMaxBytesPerChain = 64 * 1024;

  uint16_t device_type() const override { return kDeviceIdEntropy; }
  std::string name() const override { return "rng"; }
  uint64_t device_features() const override;
  std::vector<uint32_t> queue_max_sizes() const override { return {kQueueSize}; }
  absl::Status Activate(uint64_t features, std::span<Virtqueue* const> queues,
                        QueueSignal signal) override;
  void Reset() override;
  void ProcessQueue(uint16_t index) override;

  uint64_t bytes_served() const;

 private:
  mutable std::mutex mu_;
  Virtqueue* queue_ = nullptr;
  QueueSignal signal_;
  uint64_t bytes_served_ = 0;
};

}  // namespace microvmm::virtio

#endif  // MICROVMM_DEVICES_VIRTIO_RNG_H_
