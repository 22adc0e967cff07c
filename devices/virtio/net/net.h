// virtio-net (virtio device ID 1) on a packet backend (a tap in production, see tap.h).
//
// Queues: 0 = receiveq, 1 = transmitq, 256 entries each; no control queue, one queue pair.
// Config space: struct virtio_net_config up to max_virtqueue_pairs (mac, status, pairs = 1).
// Every buffer carries a 12-byte struct virtio_net_hdr_v1 (VERSION_1 is required by the
// transport), which is exactly the tap's vnet header with TUNSETVNETHDRSZ 12, so headers pass
// through unchanged in both directions (except num_buffers on rx, which the device owns).
//
// TX (ProcessQueue(1), any thread): each chain's readable buffers are written to the backend in
// one writev, straight from guest memory; used len is always 0. Chains shorter than the header
// or with a frame over kMaxFrameBytes are dropped and counted as tx_errors.
// RX (EventLoop handler on the backend fd, and ProcessQueue(0)): one packet at a time is read
// into a bounce buffer and copied into rx chains with DescriptorChain::WriteAt (dirty-tracked).
// Without MRG_RXBUF each chain must hold the whole packet (else: dropped, rx_errors, used len
// 0); with MRG_RXBUF a packet spans as many chains as needed and num_buffers is set in its first
// header. When the guest has no rx buffers left the device stops watching the backend fd (the
// packet stays in the bounce buffer, nothing is dropped) until the guest notifies queue 0.
//
// Quiesce() stops reading the backend; the next ProcessQueue(), Activate() or Resume() starts
// again. The saved state includes the undelivered packet and the rx chains held for it.
#ifndef MICROVMM_DEVICES_VIRTIO_NET_NET_H_
#define MICROVMM_DEVICES_VIRTIO_NET_NET_H_

#include <array>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "devices/virtio/device.h"
#include "devices/virtio/net/backend.h"
#include "vmm/base/fd.h"
#include "vmm/event_loop.h"
#include "vmm/memory/guest_memory.h"

namespace microvmm::virtio {

using MacAddress = std::array<uint8_t, 6>;

// "52:54:00:12:34:56" (also '-' separators). Rejects malformed text, multicast and all-zero
// addresses with a message quoting the input.
absl::StatusOr<MacAddress> ParseMac(absl::string_view text);
std::string FormatMac(const MacAddress& mac);
// A locally administered unicast address 52:54:00:xx:xx:xx, stable for a given tap name.
MacAddress DefaultMac(absl::string_view tap_name);

struct NetOptions {
  std::string tap;                 // tap interface name (created if it does not exist)
  std::optional<MacAddress> mac;   // guest MAC; default DefaultMac(tap)
};

struct NetStats {
  uint64_t rx_packets = 0, rx_bytes = 0;  // delivered to the guest (frame bytes)
  uint64_t tx_packets = 0, tx_bytes = 0;  // sent to the backend (frame bytes)
  uint64_t rx_dropped = 0;  // could not be delivered (guest buffer too small for the packet)
  uint64_t tx_dropped = 0;  // backend could not take the packet
  uint64_t rx_errors = 0;   // bad packet from the backend, bad rx chain, backend read error
  uint64_t tx_errors = 0;   // hostile tx chain (short header, oversize), backend write error
};

class VirtioNet : public VirtioDevice {
 public:
  static constexpr uint32_t kQueueSize = 256;
  static constexpr size_t kHdrBytes = 12;  // struct virtio_net_hdr_v1
  // Largest frame (without the header) accepted from the guest or the backend: a 64 KiB GSO
  // packet plus Ethernet/VLAN headers, the size Linux gives big rx buffers (65562).
  static constexpr size_t kMaxFrameBytes = 65562;
  static constexpr size_t kMaxPacketBytes = kHdrBytes + kMaxFrameBytes;
  static constexpr uint32_t kConfigBytes = 10;  // mac[6], status, max_virtqueue_pairs

  // Opens the tap (errors name it) and registers it with `loop`. Nothing is read before the
  // driver activates the device.
  static absl::StatusOr<std::unique_ptr<VirtioNet>> Create(const NetOptions& options,
                                                           GuestMemory* mem, EventLoop* loop);
  // Any backend (tests: socketpair, fakes). `loop` may be null, or the backend's fd() -1: then
  // nothing watches the backend and the owner calls PollRx().
  static absl::StatusOr<std::unique_ptr<VirtioNet>> Create(std::unique_ptr<NetBackend> backend,
                                                           const MacAddress& mac,
                                                           GuestMemory* mem, EventLoop* loop);
  ~VirtioNet() override;

  uint16_t device_type() const override { return kDeviceIdNet; }
  std::string name() const override { return "net"; }
  uint64_t device_features() const override;
  std::vector<uint32_t> queue_max_sizes() const override { return {kQueueSize, kQueueSize}; }
  uint32_t config_size() const override { return kConfigBytes; }
  void ReadConfig(uint64_t offset, std::span<uint8_t> data) override;
  void WriteConfig(uint64_t offset, std::span<const uint8_t> data) override;

  absl::Status Activate(uint64_t features, std::span<Virtqueue* const> queues,
                        QueueSignal signal) override;
  void Reset() override;
  void ProcessQueue(uint16_t index) override;
  void Quiesce() override;
  std::string SaveState() const override;
  absl::Status RestoreState(const std::string& state) override;

  // Restarts reading the backend after Quiesce() when the VM resumes without a restore.
  void Resume() override;
  // What the backend readiness handler does: delivers waiting packets, signals. For tests and
  // for owners without an EventLoop.
  void PollRx();
  // Link state in the config space (VIRTIO_NET_F_STATUS); a change raises a config interrupt.
  void SetLinkUp(bool up);

  NetStats stats() const;
  MacAddress mac() const;
  NetBackend* backend() const { return backend_.get(); }
  // True while rx waits for guest buffers (the backend fd is not watched).
  bool rx_stalled() const;

 private:
  VirtioNet(std::unique_ptr<NetBackend> backend, const MacAddress& mac, GuestMemory* mem,
            EventLoop* loop);
  absl::Status Register();

  enum class Delivery { kDone, kNoBuffers };
  void RxLocked();
  Delivery DeliverPendingLocked();
  void DropHeldLocked();
  void TxLocked();
  void TxChainLocked(DescriptorChain& chain);
  void SignalLocked();
  void UpdateWatchLocked();
  void OnKick();
  bool has(int bit) const { return (features_ >> bit) & 1; }

  const std::unique_ptr<NetBackend> backend_;
  GuestMemory* const mem_;
  EventLoop* const loop_;
  ScopedFd kick_;  // eventfd: runs PollRx() on the loop (signals owed after a restore)
  bool registered_ = false;

  mutable std::mutex mu_;
  MacAddress mac_;
  bool link_up_ = true;
  uint64_t features_ = 0;
  bool active_ = false;
  bool quiesced_ = false;
  bool rx_stalled_ = false;
  bool watching_ = false;  // EPOLLIN set on the backend fd
  Virtqueue* rxq_ = nullptr;
  Virtqueue* txq_ = nullptr;
  QueueSignal signal_;
  NetStats stats_;
  // Undelivered packet: rx_buf_[0, pending_len_), and the rx chains popped for it so far.
  std::vector<uint8_t> rx_buf_;
  size_t pending_len_ = 0;
  std::vector<DescriptorChain> held_;
  std::vector<uint16_t> restored_heads_;  // RestoreState() -> Activate()
};

}  // namespace microvmm::virtio

#endif  // MICROVMM_DEVICES_VIRTIO_NET_NET_H_
