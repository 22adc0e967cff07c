#include "devices/virtio/rng.h"

#include <sys/random.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>

namespace microvmm::virtio {

uint64_t VirtioRng::device_features() const {
  return (uint64_t{1} << kFeatureVersion1) | (uint64_t{1} << kFeatureIndirectDesc) |
         (uint64_t{1} << kFeatureEventIdx);
}

absl::Status VirtioRng::Activate(uint64_t features, std::span<Virtqueue* const> queues,
                                 QueueSignal signal) {
  (void)features;
  if (queues.size() != 1 || queues[0] == nullptr)
    return absl::InvalidArgumentError("virtio-rng: needs exactly one queue");
  std::lock_guard<std::mutex> l(mu_);
  queue_ = queues[0];
  signal_ = std::move(signal);
  return absl::OkStatus();
}

void VirtioRng::Reset() {
  std::lock_guard<std::mutex> l(mu_);
  queue_ = nullptr;
  signal_ = nullptr;
}

uint64_t VirtioRng::bytes_served() const {
  std::lock_guard<std::mutex> l(mu_);
  return bytes_served_;
}

void VirtioRng::ProcessQueue(uint16_t index) {
  std::lock_guard<std::mutex> l(mu_);
  if (index != 0 || queue_ == nullptr || !queue_->active()) return;
  uint8_t buf[4096];
  for (;;) {
    auto chain = queue_->PopChain();
    if (!chain.ok() || !chain->has_value()) break;  // empty, or the queue is in error
    DescriptorChain& c = **chain;
    uint64_t want = std::min<uint64_t>(c.writable_bytes(), kMaxBytesPerChain);
    while (c.write_pos() < want) {
      size_t n = static_cast<size_t>(std::min<uint64_t>(sizeof(buf), want - c.write_pos()));
      ssize_t got = ::getrandom(buf, n, 0);
      if (got < 0 && errno == EINTR) continue;
      if (got <= 0) break;
      if (c.Write(std::span<const uint8_t>(buf, static_cast<size_t>(got))) == 0) break;
    }
    bytes_served_ += c.bytes_written();
    if (!queue_->AddUsed(c.head(), c.bytes_written()).ok()) break;
  }
  if (queue_->NeedsNotification() && signal_) signal_(0);
}

}  // namespace microvmm::virtio
