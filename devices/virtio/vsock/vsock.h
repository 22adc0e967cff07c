// virtio-vsock (virtio device ID 19, virtio spec "Socket Device") with a unix-socket backend
// following Firecracker's convention:
//  - host -> guest: a host program connects to `uds_path` and writes "CONNECT <port>\n"; the
//    device sends OP_REQUEST to guest port <port> from an ephemeral host port it allocates, and on
//    OP_RESPONSE answers "OK <host port>\n" on the unix socket; from then on bytes flow both ways.
//    A refusal (OP_RST) or a bad handshake closes the unix socket.
//  - guest -> host: OP_REQUEST to cid 2 port P connects to the unix socket "<uds_path>_<P>";
//    success -> OP_RESPONSE, failure -> OP_RST.
// Stream sockets only (VIRTIO_VSOCK_F_SEQPACKET is not offered).
//
// Queues: rx (0, device -> driver), tx (1, driver -> device), event (2). Config: le64 guest_cid.
//
// Flow control (spec "Buffer Space Management"): every packet carries the sender's buf_alloc and
// fwd_cnt. Towards the guest the device never sends more than the guest's free space
// (buf_alloc - (tx_cnt - fwd_cnt)); it advertises kHostBufAlloc for its own per-connection
// buffer (bytes received from the guest but not yet written to the unix socket) and sends
// OP_CREDIT_UPDATE as the unix socket consumes them. A guest exceeding that credit is reset.
//
// Back-pressure, nothing dropped silently: host sockets are read only when the guest has credit
// for the connection and an rx buffer is available (EPOLLIN is turned off otherwise; the data
// waits in the socket). Control packets (RESPONSE, RST, SHUTDOWN, CREDIT_UPDATE...) wait in a
// bounded queue; when it is full the device stops taking tx packets until rx buffers drain it.
//
// Threading: one mutex for all state. ProcessQueue() may run on any thread; socket readiness is
// handled on the EventLoop with EPOLLONESHOT registrations re-armed after each event, so a socket
// whose interest is "nothing" (no credit, no rx buffer) stays silent even on EPOLLHUP. fds are
// only removed from the loop and closed after the mutex is released (EventLoop::Remove waits for
// a running handler, which may be waiting for the mutex).
//
// Save/restore: connections are not migrated (their host ends cannot move). After RestoreState()
// + Activate() the device sends VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on the event queue (posted to
// the EventLoop since Activate() must not signal) and starts with no connections; rx chains that
// were held at save time are taken back as empty rx buffers. Event buffers are only popped when
// an event is due, so none are held across a save (nothing to record for them). Quiesce() keeps
// that posted event from touching guest memory until the next ProcessQueue()/socket event.
//
// Not implemented: timeouts (a guest that never answers OP_REQUEST, or never sends the final RST
// after a shutdown, keeps that connection until reset/destruction; kMaxConnections bounds it).
#ifndef MICROVMM_DEVICES_VIRTIO_VSOCK_VSOCK_H_
#define MICROVMM_DEVICES_VIRTIO_VSOCK_VSOCK_H_

#include <cstdint>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "devices/virtio/device.h"
#include "vmm/base/fd.h"
#include "vmm/event_loop.h"
#include "vmm/memory/guest_memory.h"

namespace microvmm::virtio {

struct VsockOptions {
  uint64_t guest_cid = 3;  // >= 3 (0-2 are reserved; 2 is the host)
  std::string uds_path;    // listening unix socket for host-initiated connections
};

// struct virtio_vsock_hdr (little-endian, packed, 44 bytes).
struct VsockHdr {
  uint64_t src_cid;
  uint64_t dst_cid;
  uint32_t src_port;
  uint32_t dst_port;
  uint32_t len;
  uint16_t type;
  uint16_t op;
  uint32_t flags;
  uint32_t buf_alloc;
  uint32_t fwd_cnt;
} __attribute__((packed));
static_assert(sizeof(VsockHdr) == 44);

inline constexpr uint64_t kVsockHostCid = 2;
inline constexpr uint16_t kVsockTypeStream = 1;
inline constexpr uint16_t kVsockOpRequest = 1, kVsockOpResponse = 2, kVsockOpRst = 3,
                          kVsockOpShutdown = 4, kVsockOpRw = 5, kVsockOpCreditUpdate = 6,
                          kVsockOpCreditRequest = 7;
inline constexpr uint32_t kVsockShutdownRcv = 1, kVsockShutdownSend = 2;
inline constexpr uint32_t kVsockEventTransportReset = 0;

class VirtioVsock : public VirtioDevice {
 public:
  static constexpr uint32_t kQueueSize = 256;
  static constexpr uint16_t kRxQueue = 0, kTxQueue = 1, kEventQueue = 2;
  static constexpr uint32_t kMaxPacketPayload = 64 * 1024;  // larger OP_RW from the guest: dropped
  static constexpr uint32_t kHostBufAlloc = 256 * 1024;     // our advertised buffer per connection
  static constexpr size_t kMaxCtrlQueue = 512;              // pending control packets to the guest
  static constexpr size_t kMaxConnections = 1024;
  static constexpr size_t kMaxHandshake = 32;  // "CONNECT <port>\n" must fit
  static constexpr uint32_t kFirstEphemeralPort = 1u << 30;

  // Binds and listens on options.uds_path (a stale socket file there is removed; any other
  // existing file, or a missing directory, is an error). `mem` and `loop` must outlive the device.
  static absl::StatusOr<std::unique_ptr<VirtioVsock>> Create(const VsockOptions& options,
                                                             GuestMemory* mem, EventLoop* loop);
  ~VirtioVsock() override;  // closes every socket and unlinks uds_path

  uint16_t device_type() const override { return kDeviceIdVsock; }
  std::string name() const override { return "vsock"; }
  uint64_t device_features() const override;
  std::vector<uint32_t> queue_max_sizes() const override {
    return {kQueueSize, kQueueSize, kQueueSize};
  }
  uint32_t config_size() const override { return 8; }
  void ReadConfig(uint64_t offset, std::span<uint8_t> data) override;

  absl::Status Activate(uint64_t features, std::span<Virtqueue* const> queues,
                        QueueSignal signal) override;
  void Reset() override;
  void ProcessQueue(uint16_t index) override;
  void Quiesce() override;
  std::string SaveState() const override;
  absl::Status RestoreState(const std::string& state) override;

  // Introspection for tests.
  struct Stats {
    size_t connections_open = 0;
    uint64_t bytes_to_guest = 0;  // payload bytes delivered in OP_RW to the guest
    uint64_t bytes_to_host = 0;   // payload bytes written to unix sockets
    uint64_t tx_dropped = 0;      // malformed tx packets dropped
    uint64_t rst_sent = 0;
    uint64_t bad_handshakes = 0;
    uint64_t reset_events = 0;    // TRANSPORT_RESET events delivered
  };
  Stats stats() const;
  const VsockOptions& options() const { return options_; }

 private:
  enum class ConnState {
    kHandshake,    // host-initiated: reading "CONNECT <port>\n"
    kRequestSent,  // host-initiated: OP_REQUEST sent, waiting for the guest's answer
    kEstablished,
    kClosing,      // guest shut down both ways: flushing to the unix socket, then RST + close
  };
  struct Conn {
    uint64_t id = 0;
    ScopedFd fd;
    ConnState state = ConnState::kHandshake;
    uint32_t local_port = 0;  // host side port
    uint32_t peer_port = 0;   // guest side port
    std::string handshake;
    std::string leftover;  // host bytes read with the handshake line, to go to the guest first
    // Guest's credit (from its packets) and what we sent it.
    uint32_t peer_buf_alloc = 0, peer_fwd_cnt = 0, tx_cnt = 0;
    // Our credit: bytes received from the guest, bytes written to the unix socket, and the
    // fwd_cnt the guest last heard from us.
    uint32_t rx_cnt = 0, fwd_cnt = 0, fwd_cnt_sent = 0;
    std::string to_host;          // guest data the unix socket did not take yet
    bool host_eof = false;        // read() returned 0
    bool guest_no_send = false;   // guest sent SHUTDOWN(SEND)
    bool guest_no_rcv = false;    // guest sent SHUTDOWN(RCV)
    bool host_wr_shut = false;    // shutdown(SHUT_WR) done
    bool host_hup = false;        // EPOLLHUP seen: the host closed its end entirely
    bool credit_update_queued = false;
    uint32_t armed = 0;           // epoll events currently armed (0 after a oneshot fired)
  };
  using Key = std::pair<uint32_t, uint32_t>;  // (local_port, peer_port); not for kHandshake
  struct Ctrl {
    uint32_t local_port, peer_port;
    uint16_t op;
    uint32_t flags;
  };

  VirtioVsock(const VsockOptions& options, GuestMemory* mem, EventLoop* loop)
      : options_(options), mem_(mem), loop_(loop) {}

  // Everything below runs with mu_ held. Functions taking a Conn& may close it (returning
  // false when they did); callers must not touch it afterwards.
  void ProcessTxLocked();
  void HandleTxPacket(const VsockHdr& h, DescriptorChain& chain);
  void HandleGuestRequest(const VsockHdr& h);
  bool HandleGuestRw(Conn& c, const VsockHdr& h, DescriptorChain& chain);
  bool HandleGuestShutdown(Conn& c, uint32_t flags);
  bool HandleGuestResponse(Conn& c);
  void KickLocked();              // control queue -> rx, resume blocked tx, pending leftovers
  void PumpRxLocked();            // drains the control queue into rx buffers
  bool ReadHostLocked(Conn& c);   // host socket -> OP_RW packets, as credit/rx buffers allow
  bool FlushToHostLocked(Conn& c);
  void OnHandshake(Conn& c);
  std::optional<DescriptorChain> TakeRxChain();
  void DeliverRx(DescriptorChain& chain, const VsockHdr& h, std::span<const uint8_t> payload);
  VsockHdr MakeHdr(uint32_t local_port, uint32_t peer_port, uint16_t op, uint32_t flags,
                   uint32_t len);
  void QueueCtrl(uint32_t local_port, uint32_t peer_port, uint16_t op, uint32_t flags = 0);
  void MaybeCreditUpdate(Conn& c);
  uint32_t PeerCredit(const Conn& c) const;
  uint32_t WantedEvents(const Conn& c) const;
  void RearmAll();
  void SetListenInterest(bool on);
  void CloseConn(Conn& c, bool send_rst);  // optionally sends RST; the fd goes to dead_
  Conn* FindConn(const Key& key);
  uint32_t AllocEphemeralPort(uint32_t peer_port);
  void DeliverResetEventLocked();
  void NotifyLocked();  // used-buffer notifications for what was used since the last call
  bool active() const { return rx_ != nullptr; }
  void ResetLocked();

  // Entry points from the EventLoop (take mu_ themselves).
  void OnConnEvent(uint64_t id, uint32_t events);
  void OnListenEvent();
  // Called without mu_: unregisters and closes the fds of closed connections.
  void ReapDead();

  const VsockOptions options_;
  GuestMemory* const mem_;
  EventLoop* const loop_;
  ScopedFd listen_fd_;
  bool bound_ = false;              // uds_path is ours to unlink
  bool listen_registered_ = false;  // listen_fd_ is in the loop
  bool listen_armed_ = false;

  mutable std::mutex mu_;
  Virtqueue* rx_ = nullptr;
  Virtqueue* tx_ = nullptr;
  Virtqueue* ev_ = nullptr;
  QueueSignal signal_;
  uint64_t epoch_ = 0;  // bumped on Reset(); posted tasks from an older epoch do nothing
  std::map<uint64_t, Conn> conns_;  // by connection id
  std::map<Key, uint64_t> keys_;     // connections known to the guest
  uint64_t next_conn_id_ = 1;
  uint32_t next_ephemeral_ = kFirstEphemeralPort;
  std::deque<Ctrl> ctrl_q_;
  std::deque<DescriptorChain> rx_held_;  // popped rx chains not yet used
  bool rx_starved_ = false;              // the last attempt found no rx buffer
  bool tx_blocked_ = false;              // tx processing stopped: ctrl_q_ full
  bool restored_ = false;                // RestoreState() ran: send TRANSPORT_RESET on Activate
  bool reset_event_pending_ = false;
  bool quiesced_ = false;  // Quiesce() ran; cleared by the next ProcessQueue()/socket event
  std::vector<uint32_t> restored_rx_heads_;
  std::vector<ScopedFd> dead_;  // closed connections' fds, still registered in the loop
  std::vector<uint8_t> scratch_;  // host socket -> guest bounce buffer
  Stats stats_;
  // Lets tasks posted to the loop detect that the device is gone.
  struct Alive {
    std::mutex mu;
    bool alive = true;
  };
  std::shared_ptr<Alive> alive_ = std::make_shared<Alive>();
};

}  // namespace microvmm::virtio

#endif  // MICROVMM_DEVICES_VIRTIO_VSOCK_VSOCK_H_
