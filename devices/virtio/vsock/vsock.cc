#include "devices/virtio/vsock/vsock.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "devices/virtio/vsock/vsock_state.pb.h"
#include "vmm/base/log.h"
#include "vmm/base/status.h"

namespace microvmm::virtio {

namespace {

constexpr uint32_t kCreditUpdateThreshold = 64 * 1024;
constexpr int kReadBudget = 16;  // OP_RW packets per connection per event (fairness)

bool FillSockaddr(const std::string& path, sockaddr_un* addr) {
  std::memset(addr, 0, sizeof(*addr));
  addr->sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr->sun_path)) return false;
  std::memcpy(addr->sun_path, path.data(), path.size());
  return true;
}

// Non-blocking connect to a unix stream socket; invalid fd on failure (errno set).
ScopedFd ConnectUnix(const std::string& path) {
  sockaddr_un addr;
  if (!FillSockaddr(path, &addr)) {
    errno = ENAMETOOLONG;
    return ScopedFd();
  }
  ScopedFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!fd.valid()) return fd;
  // AF_UNIX connects complete at once (or fail with EAGAIN when the backlog is full): there is
  // no EINPROGRESS to wait for.
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) return ScopedFd();
  return fd;
}

// "CONNECT <port>" (without the newline) -> port.
std::optional<uint32_t> ParseConnect(const std::string& line) {
  static constexpr char kPrefix[] = "CONNECT ";
  if (line.compare(0, sizeof(kPrefix) - 1, kPrefix) != 0) return std::nullopt;
  std::string num = line.substr(sizeof(kPrefix) - 1);
  if (num.empty() || num.size() > 10 ||
      !std::all_of(num.begin(), num.end(), [](char ch) { return ch >= '0' && ch <= '9'; }))
    return std::nullopt;
  uint64_t v = std::stoull(num);
  if (v > UINT32_MAX) return std::nullopt;
  return static_cast<uint32_t>(v);
}

}  // namespace

absl::StatusOr<std::unique_ptr<VirtioVsock>> VirtioVsock::Create(const VsockOptions& options,
                                                                  GuestMemory* mem,
                                                                  EventLoop* loop) {
  if (mem == nullptr || loop == nullptr)
    return absl::InvalidArgumentError("virtio-vsock: needs guest memory and an event loop");
  // 0, 1 and 2 are reserved (hypervisor, local, host); 0xffffffff is VMADDR_CID_ANY.
  if (options.guest_cid < 3 || options.guest_cid >= 0xffffffffULL)
    return absl::InvalidArgumentError(
        absl::StrCat("virtio-vsock: guest_cid ", options.guest_cid, " out of range [3, 2^32-2]"));
  sockaddr_un addr;
  // "<uds_path>_<port>" must fit too: keep room for "_4294967295".
  if (!FillSockaddr(options.uds_path + "_4294967295", &addr))
    return absl::InvalidArgumentError(absl::StrCat(
        "virtio-vsock: uds_path '", options.uds_path, "' is empty or too long (max ",
        sizeof(addr.sun_path) - 1 - 11, " characters)"));
  FillSockaddr(options.uds_path, &addr);

  std::string dir = ".";
  if (size_t slash = options.uds_path.rfind('/'); slash != std::string::npos)
    dir = slash == 0 ? "/" : options.uds_path.substr(0, slash);
  struct stat st;
  if (::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
    return absl::NotFoundError(
        absl::StrCat("virtio-vsock: directory '", dir, "' of uds_path does not exist"));
  if (::lstat(options.uds_path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode))
      return absl::AlreadyExistsError(absl::StrCat(
          "virtio-vsock: uds_path '", options.uds_path, "' exists and is not a socket"));
    // A socket file nobody listens on is a leftover of an earlier run: remove it. One with a
    // listener belongs to a live process.
    if (ConnectUnix(options.uds_path).valid())
      return absl::AlreadyExistsError(
          absl::StrCat("virtio-vsock: uds_path '", options.uds_path, "' is in use"));
    if (::unlink(options.uds_path.c_str()) != 0)
      return ErrnoStatus(errno, absl::StrCat("unlink stale socket ", options.uds_path));
    LOG_INFO("virtio-vsock: removed stale socket %s", options.uds_path);
  }

  std::unique_ptr<VirtioVsock> dev(new VirtioVsock(options, mem, loop));
  dev->listen_fd_.reset(::socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!dev->listen_fd_.valid()) return ErrnoStatus(errno, "socket(AF_UNIX)");
  if (::bind(dev->listen_fd_.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0)
    return ErrnoStatus(errno, absl::StrCat("bind ", options.uds_path));
  dev->bound_ = true;
  if (::listen(dev->listen_fd_.get(), 128) != 0)
    return ErrnoStatus(errno, absl::StrCat("listen ", options.uds_path));
  VirtioVsock* d = dev.get();
  // Armed (EPOLLIN) only while the driver is active: connections wait in the backlog meanwhile.
  absl::Status s = loop->Add(dev->listen_fd_.get(), 0, [d](uint32_t) { d->OnListenEvent(); });
  if (!s.ok()) return s;
  dev->listen_registered_ = true;
  dev->scratch_.resize(kMaxPacketPayload);
  return dev;
}

VirtioVsock::~VirtioVsock() {
  {
    std::lock_guard a(alive_->mu);
    alive_->alive = false;
  }
  if (listen_registered_) loop_->Remove(listen_fd_.get());
  {
    std::lock_guard l(mu_);
    for (auto& [id, c] : conns_) dead_.push_back(std::move(c.fd));
    conns_.clear();
    keys_.clear();
  }
  ReapDead();
  listen_fd_.reset();
  if (bound_) ::unlink(options_.uds_path.c_str());
}

uint64_t VirtioVsock::device_features() const {
  // VIRTIO_VSOCK_F_SEQPACKET (bit 1) deliberately not offered.
  return (uint64_t{1} << kFeatureVersion1) | (uint64_t{1} << kFeatureIndirectDesc) |
         (uint64_t{1} << kFeatureEventIdx);
}

void VirtioVsock::ReadConfig(uint64_t offset, std::span<uint8_t> data) {
  uint8_t cfg[8];
  uint64_t cid = options_.guest_cid;  // le64 (x86 is little-endian)
  std::memcpy(cfg, &cid, 8);
  for (size_t i = 0; i < data.size(); ++i)
    data[i] = offset < sizeof(cfg) && offset + i < sizeof(cfg) ? cfg[offset + i] : 0;
}

absl::Status VirtioVsock::Activate(uint64_t features, std::span<Virtqueue* const> queues,
                                   QueueSignal signal) {
  (void)features;
  if (queues.size() != 3 || !queues[0] || !queues[1] || !queues[2] || !queues[0]->active() ||
      !queues[1]->active() || !queues[2]->active())
    return absl::InvalidArgumentError("virtio-vsock: needs active rx, tx and event queues");
  std::lock_guard l(mu_);
  rx_ = queues[kRxQueue];
  tx_ = queues[kTxQueue];
  ev_ = queues[kEventQueue];
  signal_ = std::move(signal);
  rx_starved_ = tx_blocked_ = quiesced_ = false;
  if (restored_) {
    restored_ = false;
    // rx chains we held at save time are still in flight: take them back as empty buffers.
    std::vector<uint16_t> rx_heads = rx_->InFlightHeads();
    if (rx_heads.size() != restored_rx_heads_.size())
      LOG_WARN("virtio-vsock: %d rx chains in flight after restore, state lists %d",
               rx_heads.size(), restored_rx_heads_.size());
    for (uint16_t h : rx_heads) {
      auto chain = rx_->ReadInFlightChain(h);
      if (!chain.ok()) return chain.status();  // the queue is in error now
      rx_held_.push_back(std::move(*chain));
    }
    // Nothing else is ever held across a save; complete anything else in flight as empty.
    for (Virtqueue* q : {tx_, ev_})
      for (uint16_t h : q->InFlightHeads()) (void)q->AddUsed(h, 0);
    // Connections did not survive: tell the guest (spec: TRANSPORT_RESET after migration).
    // Activate() must not signal, so the event goes out from the loop.
    reset_event_pending_ = true;
    uint64_t epoch = epoch_;
    std::shared_ptr<Alive> alive = alive_;
    loop_->Post([this, alive, epoch] {
      std::lock_guard a(alive->mu);
      if (!alive->alive) return;
      {
        std::lock_guard l(mu_);
        if (epoch_ != epoch || !active() || quiesced_) return;  // delivered later otherwise
        KickLocked();
        RearmAll();
        NotifyLocked();
      }
      ReapDead();
    });
  }
  SetListenInterest(true);
  return absl::OkStatus();
}

void VirtioVsock::ResetLocked() {
  for (auto& [id, c] : conns_) dead_.push_back(std::move(c.fd));
  conns_.clear();
  keys_.clear();
  ctrl_q_.clear();
  rx_held_.clear();
  rx_ = tx_ = ev_ = nullptr;
  signal_ = nullptr;
  ++epoch_;
  rx_starved_ = tx_blocked_ = restored_ = reset_event_pending_ = quiesced_ = false;
  restored_rx_heads_.clear();
  SetListenInterest(false);
}

void VirtioVsock::Reset() {
  {
    std::lock_guard l(mu_);
    ResetLocked();
  }
  ReapDead();
}

void VirtioVsock::Quiesce() {
  // All guest-memory work happens synchronously under mu_, so nothing is in flight once we hold
  // it. Socket events are stopped by the paused EventLoop; quiesced_ keeps a posted
  // TRANSPORT_RESET (which the loop runs even while paused) from writing guest memory.
  std::lock_guard l(mu_);
  quiesced_ = true;
}

void VirtioVsock::ProcessQueue(uint16_t index) {
  {
    std::lock_guard l(mu_);
    if (!active()) return;
    quiesced_ = false;
    switch (index) {
      case kRxQueue:
        rx_starved_ = false;  // new buffers (maybe): try again
        break;
      case kTxQueue:
        ProcessTxLocked();
        break;
      case kEventQueue:
        break;  // buffers are only taken when an event is due (KickLocked)
      default:
        return;
    }
    KickLocked();
    RearmAll();
    NotifyLocked();
  }
  ReapDead();
}

std::string VirtioVsock::SaveState() const {
  std::lock_guard l(mu_);
  VirtioVsockState s;
  s.set_guest_cid(options_.guest_cid);
  for (const DescriptorChain& c : rx_held_) s.add_held_rx_heads(c.head());
  s.set_open_connections(static_cast<uint32_t>(conns_.size()));
  return s.SerializeAsString();
}

absl::Status VirtioVsock::RestoreState(const std::string& state) {
  VirtioVsockState s;
  if (!s.ParseFromString(state))
    return absl::InvalidArgumentError("virtio-vsock: device state does not parse");
  if (s.guest_cid() != options_.guest_cid)
    return absl::FailedPreconditionError(
        absl::StrCat("virtio-vsock: saved guest_cid ", s.guest_cid(), " != configured ",
                     options_.guest_cid, " (the guest's cid cannot change under it)"));
  for (uint32_t h : s.held_rx_heads())
    if (h >= kQueueSize)
      return absl::InvalidArgumentError(absl::StrCat("virtio-vsock: bad rx head ", h));
  {
    std::lock_guard l(mu_);
    ResetLocked();
    restored_ = true;
    restored_rx_heads_.assign(s.held_rx_heads().begin(), s.held_rx_heads().end());
  }
  ReapDead();
  if (s.open_connections() > 0)
    LOG_INFO("virtio-vsock: %d connections were open at save time; they are reset",
             s.open_connections());
  return absl::OkStatus();
}

VirtioVsock::Stats VirtioVsock::stats() const {
  std::lock_guard l(mu_);
  Stats s = stats_;
  s.connections_open = conns_.size();
  return s;
}

// ---------------------------------------------------------------------------------------------
// Guest -> device (tx queue)

void VirtioVsock::ProcessTxLocked() {
  tx_blocked_ = false;
  for (;;) {
    // Every tx packet may need a reply on rx: stop taking them while replies pile up (the
    // guest's chains stay in the ring; KickLocked resumes once rx buffers drained the queue).
    if (ctrl_q_.size() >= kMaxCtrlQueue) {
      tx_blocked_ = true;
      return;
    }
    auto r = tx_->PopChain();
    if (!r.ok() || !r->has_value()) return;  // empty, or the queue is in error
    DescriptorChain& chain = **r;
    VsockHdr h;
    if (chain.readable_bytes() < sizeof(h)) {
      ++stats_.tx_dropped;
      LOG_WARN_RATELIMITED("virtio-vsock: tx packet of %d bytes, shorter than the header",
                           chain.readable_bytes());
    } else {
      chain.ReadAt(0, std::span<uint8_t>(reinterpret_cast<uint8_t*>(&h), sizeof(h)));
      HandleTxPacket(h, chain);
    }
    if (!tx_->AddUsed(chain.head(), 0).ok()) return;
  }
}

void VirtioVsock::HandleTxPacket(const VsockHdr& h, DescriptorChain& chain) {
  if (h.src_cid != options_.guest_cid || h.dst_cid != kVsockHostCid) {
    // Not addressed from our guest to the host: there is nobody sensible to RST.
    ++stats_.tx_dropped;
    LOG_WARN_RATELIMITED("virtio-vsock: dropping packet %d -> %d (guest cid %d)", h.src_cid,
                         h.dst_cid, options_.guest_cid);
    return;
  }
  if (h.len > kMaxPacketPayload || h.len > chain.readable_bytes() - sizeof(VsockHdr)) {
    ++stats_.tx_dropped;
    LOG_WARN_RATELIMITED("virtio-vsock: dropping packet with len %d (chain holds %d)", h.len,
                         chain.readable_bytes() - sizeof(VsockHdr));
    return;
  }
  Key key{h.dst_port, h.src_port};
  Conn* c = FindConn(key);
  if (h.op == kVsockOpRst) {  // never answered (no RST storms)
    if (c) CloseConn(*c, false);
    return;
  }
  if (h.type != kVsockTypeStream) {
    // Spec: a packet of an unsupported type gets a RST (e.g. SEQPACKET, not negotiated).
    ++stats_.tx_dropped;
    QueueCtrl(h.dst_port, h.src_port, kVsockOpRst);
    return;
  }
  if (h.op == kVsockOpRequest) {
    HandleGuestRequest(h);
    return;
  }
  if (c == nullptr) {
    // Spec: a packet for a connection the recipient does not know gets a RST.
    QueueCtrl(h.dst_port, h.src_port, kVsockOpRst);
    return;
  }
  // Every packet carries the guest's current credit for this connection.
  c->peer_buf_alloc = h.buf_alloc;
  c->peer_fwd_cnt = h.fwd_cnt;
  switch (h.op) {
    case kVsockOpResponse:
      HandleGuestResponse(*c);
      return;
    case kVsockOpRw:
      HandleGuestRw(*c, h, chain);
      return;
    case kVsockOpShutdown:
      HandleGuestShutdown(*c, h.flags);
      return;
    case kVsockOpCreditUpdate:
      return;  // credit taken above; RearmAll() resumes reading if it was the limit
    case kVsockOpCreditRequest:
      if (!c->credit_update_queued) {
        c->credit_update_queued = true;
        QueueCtrl(c->local_port, c->peer_port, kVsockOpCreditUpdate);
      }
      return;
    default:
      LOG_WARN_RATELIMITED("virtio-vsock: unknown op %d, resetting the connection", h.op);
      CloseConn(*c, true);
      return;
  }
}

void VirtioVsock::HandleGuestRequest(const VsockHdr& h) {
  Key key{h.dst_port, h.src_port};
  if (Conn* old = FindConn(key)) {
    // The guest reuses a live (local, peer) pair: it lost track of it; reset both.
    LOG_WARN_RATELIMITED("virtio-vsock: OP_REQUEST for existing connection %d:%d", h.dst_port,
                         h.src_port);
    CloseConn(*old, true);
    return;
  }
  if (conns_.size() >= kMaxConnections) {
    LOG_WARN_RATELIMITED("virtio-vsock: too many connections, refusing guest port %d",
                         h.src_port);
    QueueCtrl(h.dst_port, h.src_port, kVsockOpRst);
    return;
  }
  std::string path = absl::StrCat(options_.uds_path, "_", h.dst_port);
  ScopedFd fd = ConnectUnix(path);
  if (!fd.valid()) {
    LOG_DEBUG("virtio-vsock: guest connect to %s: %s", path, strerror(errno));
    QueueCtrl(h.dst_port, h.src_port, kVsockOpRst);
    return;
  }
  uint64_t id = next_conn_id_++;
  int raw = fd.get();
  Conn& c = conns_[id];
  c.id = id;
  c.fd = std::move(fd);
  c.state = ConnState::kEstablished;
  c.local_port = h.dst_port;
  c.peer_port = h.src_port;
  c.peer_buf_alloc = h.buf_alloc;
  c.peer_fwd_cnt = h.fwd_cnt;
  keys_[key] = id;
  absl::Status s = loop_->Add(raw, EPOLLONESHOT, [this, id](uint32_t ev) { OnConnEvent(id, ev); });
  if (!s.ok()) {
    LOG_WARN("virtio-vsock: %s", s.ToString());
    c.fd.reset();  // never registered: close directly
    CloseConn(c, true);
    return;
  }
  QueueCtrl(c.local_port, c.peer_port, kVsockOpResponse);
}

bool VirtioVsock::HandleGuestResponse(Conn& c) {
  if (c.state != ConnState::kRequestSent) {
    LOG_WARN_RATELIMITED("virtio-vsock: unexpected OP_RESPONSE on %d:%d", c.local_port,
                         c.peer_port);
    CloseConn(c, true);
    return false;
  }
  c.state = ConnState::kEstablished;
  std::string ok = absl::StrCat("OK ", c.local_port, "\n");
  // A fresh socket's send buffer is empty, so a short write means the host end is gone.
  ssize_t n = ::send(c.fd.get(), ok.data(), ok.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
  if (n != static_cast<ssize_t>(ok.size())) {
    CloseConn(c, true);
    return false;
  }
  return true;
}

bool VirtioVsock::HandleGuestRw(Conn& c, const VsockHdr& h, DescriptorChain& chain) {
  if (c.state != ConnState::kEstablished || c.guest_no_send) {
    LOG_WARN_RATELIMITED("virtio-vsock: OP_RW on %d:%d in the wrong state", c.local_port,
                         c.peer_port);
    CloseConn(c, true);
    return false;
  }
  if (h.len == 0) return true;
  // Credit we gave: kHostBufAlloc bytes beyond what we have forwarded.
  if (c.to_host.size() + h.len > kHostBufAlloc) {
    LOG_WARN_RATELIMITED("virtio-vsock: guest exceeded its credit on %d:%d, resetting",
                         c.local_port, c.peer_port);
    CloseConn(c, true);
    return false;
  }
  size_t old = c.to_host.size();
  c.to_host.resize(old + h.len);
  chain.ReadAt(sizeof(VsockHdr),
               std::span<uint8_t>(reinterpret_cast<uint8_t*>(c.to_host.data()) + old, h.len));
  c.rx_cnt += h.len;
  return FlushToHostLocked(c);
}

bool VirtioVsock::HandleGuestShutdown(Conn& c, uint32_t flags) {
  if (c.state != ConnState::kEstablished && c.state != ConnState::kClosing) {
    CloseConn(c, true);  // e.g. SHUTDOWN instead of an answer to our REQUEST
    return false;
  }
  if (flags & kVsockShutdownRcv) {
    // The guest reads no more: stop reading the host end and make its writes fail.
    if (!c.guest_no_rcv) ::shutdown(c.fd.get(), SHUT_RD);
    c.guest_no_rcv = true;
  }
  if (flags & kVsockShutdownSend) c.guest_no_send = true;
  if (c.guest_no_rcv && c.guest_no_send && c.state == ConnState::kEstablished)
    c.state = ConnState::kClosing;  // RST + close once the buffered data reached the host
  return FlushToHostLocked(c);  // also does the SHUT_WR / the close when the buffer is empty
}

bool VirtioVsock::FlushToHostLocked(Conn& c) {
  size_t done = 0;
  while (done < c.to_host.size()) {
    ssize_t n = ::send(c.fd.get(), c.to_host.data() + done, c.to_host.size() - done,
                       MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n > 0) {
      done += static_cast<size_t>(n);
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
    // The host end is gone: what the guest sent cannot be delivered.
    LOG_DEBUG("virtio-vsock: write to host %d:%d: %s", c.local_port, c.peer_port,
              strerror(errno));
    CloseConn(c, true);
    return false;
  }
  c.to_host.erase(0, done);
  c.fwd_cnt += static_cast<uint32_t>(done);
  stats_.bytes_to_host += done;
  if (c.to_host.empty()) {
    if (c.state == ConnState::kClosing) {
      CloseConn(c, true);
      return false;
    }
    if (c.guest_no_send && !c.host_wr_shut) {
      ::shutdown(c.fd.get(), SHUT_WR);  // the host program reads EOF
      c.host_wr_shut = true;
    }
  }
  MaybeCreditUpdate(c);
  return true;
}

void VirtioVsock::MaybeCreditUpdate(Conn& c) {
  // Every packet to the guest carries fwd_cnt; an explicit update is only needed when the
  // guest's view of our free space got low (it would stall waiting for credit).
  uint32_t guest_view_free = kHostBufAlloc - (c.rx_cnt - c.fwd_cnt_sent);
  if (c.fwd_cnt != c.fwd_cnt_sent && guest_view_free < kCreditUpdateThreshold &&
      !c.credit_update_queued && c.state == ConnState::kEstablished) {
    c.credit_update_queued = true;
    QueueCtrl(c.local_port, c.peer_port, kVsockOpCreditUpdate);
  }
}

// ---------------------------------------------------------------------------------------------
// Device -> guest (rx queue)

uint32_t VirtioVsock::PeerCredit(const Conn& c) const {
  uint32_t in_flight = c.tx_cnt - c.peer_fwd_cnt;  // wrapping counters (spec)
  // A guest that shrinks buf_alloc below what is in flight simply has no credit.
  return in_flight >= c.peer_buf_alloc ? 0 : c.peer_buf_alloc - in_flight;
}

std::optional<DescriptorChain> VirtioVsock::TakeRxChain() {
  if (!rx_held_.empty()) {
    DescriptorChain c = std::move(rx_held_.front());
    rx_held_.pop_front();
    return c;
  }
  for (;;) {
    auto r = rx_->PopChain();
    if (!r.ok() || !r->has_value()) {
      rx_starved_ = true;
      return std::nullopt;
    }
    if ((*r)->writable_bytes() >= sizeof(VsockHdr)) return std::move(**r);
    LOG_WARN_RATELIMITED("virtio-vsock: rx buffer of %d bytes cannot hold a header",
                         (*r)->writable_bytes());
    if (!rx_->AddUsed((*r)->head(), 0).ok()) {
      rx_starved_ = true;
      return std::nullopt;
    }
  }
}

VsockHdr VirtioVsock::MakeHdr(uint32_t local_port, uint32_t peer_port, uint16_t op,
                              uint32_t flags, uint32_t len) {
  VsockHdr h{};
  h.src_cid = kVsockHostCid;
  h.dst_cid = options_.guest_cid;
  h.src_port = local_port;
  h.dst_port = peer_port;
  h.len = len;
  h.type = kVsockTypeStream;
  h.op = op;
  h.flags = flags;
  if (Conn* c = FindConn({local_port, peer_port})) {
    h.buf_alloc = kHostBufAlloc;
    h.fwd_cnt = c->fwd_cnt;
    c->fwd_cnt_sent = c->fwd_cnt;
    if (op == kVsockOpCreditUpdate) c->credit_update_queued = false;
  }
  return h;
}

void VirtioVsock::DeliverRx(DescriptorChain& chain, const VsockHdr& h,
                            std::span<const uint8_t> payload) {
  chain.WriteAt(0, std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(&h), sizeof(h)));
  if (!payload.empty()) chain.WriteAt(sizeof(h), payload);
  if (h.op == kVsockOpRst) ++stats_.rst_sent;
  (void)rx_->AddUsed(chain.head(), chain.bytes_written());
}

void VirtioVsock::QueueCtrl(uint32_t local_port, uint32_t peer_port, uint16_t op,
                            uint32_t flags) {
  ctrl_q_.push_back(Ctrl{local_port, peer_port, op, flags});
}

void VirtioVsock::PumpRxLocked() {
  while (!ctrl_q_.empty()) {
    std::optional<DescriptorChain> chain = TakeRxChain();
    if (!chain) return;
    Ctrl k = ctrl_q_.front();
    ctrl_q_.pop_front();
    DeliverRx(*chain, MakeHdr(k.local_port, k.peer_port, k.op, k.flags, 0), {});
  }
}

bool VirtioVsock::ReadHostLocked(Conn& c) {
  for (int budget = kReadBudget; budget > 0; --budget) {
    // Control packets (e.g. the RESPONSE that must precede data) go first.
    PumpRxLocked();
    if (!ctrl_q_.empty()) return true;
    if (c.state != ConnState::kEstablished || c.host_eof || c.guest_no_rcv) return true;
    uint32_t credit = PeerCredit(c);
    if (credit == 0) return true;  // EPOLLIN stays off until the guest grants credit
    std::optional<DescriptorChain> chain = TakeRxChain();
    if (!chain) return true;  // EPOLLIN stays off until the guest adds rx buffers
    size_t want = std::min<uint64_t>({credit, chain->writable_bytes() - sizeof(VsockHdr),
                                      kMaxPacketPayload});
    ssize_t n;
    if (!c.leftover.empty()) {  // bytes that came with the handshake line
      n = static_cast<ssize_t>(std::min(want, c.leftover.size()));
      std::memcpy(scratch_.data(), c.leftover.data(), n);
      c.leftover.erase(0, n);
    } else if (want == 0) {
      n = -1;
      errno = EAGAIN;
    } else {
      n = ::recv(c.fd.get(), scratch_.data(), want, MSG_DONTWAIT);
    }
    if (n > 0) {
      DeliverRx(*chain, MakeHdr(c.local_port, c.peer_port, kVsockOpRw, 0, n),
                std::span<const uint8_t>(scratch_.data(), n));
      c.tx_cnt += static_cast<uint32_t>(n);
      stats_.bytes_to_guest += n;
      continue;
    }
    rx_held_.push_front(std::move(*chain));  // unused: keep it for the next packet
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return true;
    if (n < 0) {
      LOG_DEBUG("virtio-vsock: read from host %d:%d: %s", c.local_port, c.peer_port,
                strerror(errno));
      CloseConn(c, true);
      return false;
    }
    // EOF: the host sends no more. If it closed entirely (EPOLLHUP), it receives nothing
    // either. The guest answers a two-way shutdown with RST, which closes the connection.
    c.host_eof = true;
    QueueCtrl(c.local_port, c.peer_port, kVsockOpShutdown,
              kVsockShutdownSend | (c.host_hup ? kVsockShutdownRcv : 0));
    PumpRxLocked();
    return true;
  }
  return true;
}

void VirtioVsock::KickLocked() {
  if (!active()) return;
  for (;;) {
    PumpRxLocked();
    if (!tx_blocked_ || ctrl_q_.size() >= kMaxCtrlQueue) break;
    ProcessTxLocked();
  }
  if (reset_event_pending_) DeliverResetEventLocked();
  // Bytes read together with a handshake line have no EPOLLIN left to announce them.
  std::vector<uint64_t> leftovers;
  for (auto& [id, c] : conns_)
    if (!c.leftover.empty() && c.state == ConnState::kEstablished) leftovers.push_back(id);
  for (uint64_t id : leftovers)
    if (auto it = conns_.find(id); it != conns_.end()) ReadHostLocked(it->second);
}

void VirtioVsock::DeliverResetEventLocked() {
  reset_event_pending_ = true;
  for (;;) {
    auto r = ev_->PopChain();
    if (!r.ok() || !r->has_value()) return;  // sent when the guest adds an event buffer
    DescriptorChain& chain = **r;
    uint32_t id = kVsockEventTransportReset;  // struct virtio_vsock_event
    uint64_t n =
        chain.WriteAt(0, std::span<const uint8_t>(reinterpret_cast<uint8_t*>(&id), sizeof(id)));
    if (!ev_->AddUsed(chain.head(), chain.bytes_written()).ok()) return;
    if (n == sizeof(id)) {
      reset_event_pending_ = false;
      ++stats_.reset_events;
      return;
    }
    LOG_WARN_RATELIMITED("virtio-vsock: event buffer too small");
  }
}

void VirtioVsock::NotifyLocked() {
  if (!signal_) return;
  Virtqueue* qs[3] = {rx_, tx_, ev_};
  for (uint16_t i = 0; i < 3; ++i)
    if (qs[i] && qs[i]->NeedsNotification()) signal_(i);
}

// ---------------------------------------------------------------------------------------------
// Host sockets

uint32_t VirtioVsock::WantedEvents(const Conn& c) const {
  switch (c.state) {
    case ConnState::kHandshake:
      return EPOLLIN;
    case ConnState::kRequestSent:
      return 0;
    case ConnState::kEstablished:
    case ConnState::kClosing:
      break;
  }
  uint32_t ev = c.to_host.empty() ? 0 : EPOLLOUT;
  if (c.state == ConnState::kEstablished && !c.host_eof && !c.guest_no_rcv &&
      PeerCredit(c) > 0 && !rx_starved_ && ctrl_q_.size() < kMaxCtrlQueue)
    ev |= EPOLLIN;
  return ev;
}

void VirtioVsock::RearmAll() {
  // Registrations are EPOLLONESHOT: an fd with nothing wanted stays silent, EPOLLHUP included
  // (a peer that closed while we cannot read would otherwise spin the loop).
  for (auto& [id, c] : conns_) {
    uint32_t want = WantedEvents(c);
    if (want == c.armed || !c.fd.valid()) continue;
    if (loop_->Modify(c.fd.get(), want | EPOLLONESHOT).ok()) c.armed = want;
  }
}

void VirtioVsock::SetListenInterest(bool on) {
  if (!listen_registered_ || listen_armed_ == on) return;
  if (loop_->Modify(listen_fd_.get(), on ? EPOLLIN : 0).ok()) listen_armed_ = on;
}

VirtioVsock::Conn* VirtioVsock::FindConn(const Key& key) {
  auto it = keys_.find(key);
  if (it == keys_.end()) return nullptr;
  auto c = conns_.find(it->second);
  return c == conns_.end() ? nullptr : &c->second;
}

void VirtioVsock::CloseConn(Conn& c, bool send_rst) {
  if (c.state != ConnState::kHandshake) {
    keys_.erase(Key{c.local_port, c.peer_port});
    if (send_rst) QueueCtrl(c.local_port, c.peer_port, kVsockOpRst);
  }
  if (c.fd.valid()) dead_.push_back(std::move(c.fd));
  conns_.erase(c.id);
}

uint32_t VirtioVsock::AllocEphemeralPort(uint32_t peer_port) {
  for (;;) {
    uint32_t p = next_ephemeral_++;
    if (next_ephemeral_ == 0) next_ephemeral_ = kFirstEphemeralPort;
    if (!keys_.count(Key{p, peer_port})) return p;
  }
}

void VirtioVsock::ReapDead() {
  std::vector<ScopedFd> dead;
  {
    std::lock_guard l(mu_);
    dead.swap(dead_);
  }
  for (ScopedFd& fd : dead) loop_->Remove(fd.get());  // then closed by ~ScopedFd
}

void VirtioVsock::OnListenEvent() {
  {
    std::lock_guard l(mu_);
    if (!active()) return;
    quiesced_ = false;
    for (;;) {
      ScopedFd fd(::accept4(listen_fd_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC));
      if (!fd.valid()) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)
          LOG_WARN_RATELIMITED("virtio-vsock: accept: %s", strerror(errno));
        break;
      }
      if (conns_.size() >= kMaxConnections) {
        LOG_WARN_RATELIMITED("virtio-vsock: too many connections, closing a new host one");
        continue;
      }
      uint64_t id = next_conn_id_++;
      int raw = fd.get();
      if (!loop_->Add(raw, EPOLLIN | EPOLLONESHOT, [this, id](uint32_t ev) { OnConnEvent(id, ev); })
               .ok())
        continue;
      Conn& c = conns_[id];
      c.id = id;
      c.fd = std::move(fd);
      c.state = ConnState::kHandshake;
      c.armed = EPOLLIN;
    }
  }
  ReapDead();
}

void VirtioVsock::OnHandshake(Conn& c) {
  char buf[kMaxHandshake];
  ssize_t n = ::recv(c.fd.get(), buf, kMaxHandshake - c.handshake.size(), MSG_DONTWAIT);
  if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return;
  if (n <= 0) {
    if (!c.handshake.empty()) {
      ++stats_.bad_handshakes;
      LOG_WARN_RATELIMITED("virtio-vsock: host connection closed during the handshake");
    }
    CloseConn(c, false);
    return;
  }
  c.handshake.append(buf, n);
  size_t nl = c.handshake.find('\n');
  if (nl == std::string::npos) {
    if (c.handshake.size() < kMaxHandshake) return;  // wait for the rest of the line
    ++stats_.bad_handshakes;
    LOG_WARN_RATELIMITED("virtio-vsock: no newline in the first %d bytes of a host connection",
                         kMaxHandshake);
    CloseConn(c, false);
    return;
  }
  std::optional<uint32_t> port = ParseConnect(c.handshake.substr(0, nl));
  if (!port) {
    ++stats_.bad_handshakes;
    LOG_WARN_RATELIMITED("virtio-vsock: bad handshake line '%s' (want \"CONNECT <port>\")",
                         absl::CHexEscape(c.handshake.substr(0, nl)));
    CloseConn(c, false);
    return;
  }
  c.leftover = c.handshake.substr(nl + 1);
  c.handshake.clear();
  c.peer_port = *port;
  c.local_port = AllocEphemeralPort(*port);
  c.state = ConnState::kRequestSent;
  keys_[Key{c.local_port, c.peer_port}] = c.id;
  QueueCtrl(c.local_port, c.peer_port, kVsockOpRequest);
}

void VirtioVsock::OnConnEvent(uint64_t id, uint32_t events) {
  {
    std::lock_guard l(mu_);
    auto it = conns_.find(id);
    if (it == conns_.end() || !active()) return;
    quiesced_ = false;
    Conn& c = it->second;
    c.armed = 0;  // oneshot fired
    if (events & EPOLLHUP) c.host_hup = true;
    bool alive = true;
    if (c.state == ConnState::kHandshake) {
      OnHandshake(c);
    } else if (c.state != ConnState::kRequestSent) {
      if (!c.to_host.empty()) alive = FlushToHostLocked(c);
      if (alive) ReadHostLocked(c);
    }
    KickLocked();
    RearmAll();
    NotifyLocked();
  }
  ReapDead();
}

}  // namespace microvmm::virtio
