#include "devices/virtio/net/net.h"

#include <linux/if_tun.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "devices/virtio/net/net_state.pb.h"
#include "devices/virtio/net/tap.h"
#include "vmm/base/log.h"
#include "vmm/base/status.h"

namespace microvmm::virtio {
namespace {

constexpr uint64_t Bit(int b) { return uint64_t{1} << b; }

// virtio-net feature bits and status (virtio spec 5.1.3; linux/virtio_net.h, which does not
// compile as C++: it has a field named `class`).
constexpr int VIRTIO_NET_F_CSUM = 0;
constexpr int VIRTIO_NET_F_GUEST_CSUM = 1;
constexpr int VIRTIO_NET_F_MAC = 5;
constexpr int VIRTIO_NET_F_GUEST_TSO4 = 7;
constexpr int VIRTIO_NET_F_GUEST_TSO6 = 8;
constexpr int VIRTIO_NET_F_GUEST_ECN = 9;
constexpr int VIRTIO_NET_F_HOST_TSO4 = 11;
constexpr int VIRTIO_NET_F_HOST_TSO6 = 12;
constexpr int VIRTIO_NET_F_HOST_ECN = 13;
constexpr int VIRTIO_NET_F_MRG_RXBUF = 15;
constexpr int VIRTIO_NET_F_STATUS = 16;
constexpr uint8_t VIRTIO_NET_S_LINK_UP = 1;
// struct virtio_net_hdr_v1: flags u8, gso_type u8, hdr_len le16, gso_size le16,
// csum_start le16, csum_offset le16, num_buffers le16 -> 12 bytes, num_buffers at 10.
constexpr size_t kNumBuffersOffset = 10;
constexpr size_t kEthHeaderBytes = 14;
// Packets moved per backend readiness event before yielding to other handlers.
constexpr int kRxBudget = 64;

static_assert(kNumBuffersOffset + 2 == VirtioNet::kHdrBytes);

// Offloads the backend may use towards the guest: exactly what the guest accepts. The tap
// refuses TSO without CSUM, and ECN only makes sense with TSO (spec: GUEST_TSO* requires
// GUEST_CSUM, GUEST_ECN requires GUEST_TSO4 or GUEST_TSO6).
uint32_t TunOffloadFor(uint64_t features) {
  auto has = [&](int b) { return (features >> b) & 1; };
  if (!has(VIRTIO_NET_F_GUEST_CSUM)) return 0;
  uint32_t f = TUN_F_CSUM;
  if (has(VIRTIO_NET_F_GUEST_TSO4)) f |= TUN_F_TSO4;
  if (has(VIRTIO_NET_F_GUEST_TSO6)) f |= TUN_F_TSO6;
  if (has(VIRTIO_NET_F_GUEST_ECN) && (f & (TUN_F_TSO4 | TUN_F_TSO6))) f |= TUN_F_TSO_ECN;
  return f;
}

}  // namespace

absl::StatusOr<MacAddress> ParseMac(absl::string_view text) {
  auto bad_syntax = [&](absl::string_view why) {
    return absl::InvalidArgumentError(
        absl::StrCat("invalid MAC address '", text, "': ", why,
                     " (expected six hex pairs like 52:54:00:12:34:56)"));
  };
  auto bad = [&](absl::string_view why) {
    return absl::InvalidArgumentError(
        absl::StrCat("invalid MAC address '", text, "': ", why, " (a guest needs a unicast one)"));
  };
  const char sep = text.find('-') != absl::string_view::npos ? '-' : ':';
  std::vector<absl::string_view> parts = absl::StrSplit(text, sep);
  if (parts.size() != 6) return bad_syntax(absl::StrCat(parts.size(), " groups instead of 6"));
  MacAddress mac{};
  for (size_t i = 0; i < 6; ++i) {
    if (parts[i].size() != 2 || !absl::ascii_isxdigit(parts[i][0]) ||
        !absl::ascii_isxdigit(parts[i][1]))
      return bad_syntax(absl::StrCat("group ", i + 1, " '", parts[i], "' is not two hex digits"));
    auto nib = [](char c) {
      return absl::ascii_isdigit(c) ? c - '0' : absl::ascii_tolower(c) - 'a' + 10;
    };
    mac[i] = static_cast<uint8_t>(nib(parts[i][0]) * 16 + nib(parts[i][1]));
  }
  if (mac[0] & 1) return bad("multicast/broadcast address (lowest bit of the first byte set)");
  if (mac == MacAddress{}) return bad("all zeros");
  return mac;
}

std::string FormatMac(const MacAddress& m) {
  return absl::StrFormat("%02x:%02x:%02x:%02x:%02x:%02x", m[0], m[1], m[2], m[3], m[4], m[5]);
}

MacAddress DefaultMac(absl::string_view tap_name) {
  // 0x52: locally administered (bit 1), unicast (bit 0 clear). FNV-1a of the name for the rest.
  uint32_t h = 2166136261u;
  for (char c : tap_name) h = (h ^ static_cast<uint8_t>(c)) * 16777619u;
  return {0x52, 0x54, 0x00, static_cast<uint8_t>(h >> 16), static_cast<uint8_t>(h >> 8),
          static_cast<uint8_t>(h)};
}

// --- Construction --------------------------------------------------------------------------

VirtioNet::VirtioNet(std::unique_ptr<NetBackend> backend, const MacAddress& mac,
                     GuestMemory* mem, EventLoop* loop)
    : backend_(std::move(backend)), mem_(mem), loop_(loop), mac_(mac) {
  // One byte more than the largest packet accepted, so a truncated read shows as too long.
  rx_buf_.resize(kMaxPacketBytes + 1);
}

absl::StatusOr<std::unique_ptr<VirtioNet>> VirtioNet::Create(const NetOptions& options,
                                                             GuestMemory* mem, EventLoop* loop) {
  absl::StatusOr<std::unique_ptr<Tap>> tap = Tap::Open(options.tap);
  if (!tap.ok()) return tap.status();
  MacAddress mac = options.mac.value_or(DefaultMac(options.tap));
  LOG_INFO("virtio-net: tap '%s', MAC %s", (*tap)->ifname(), FormatMac(mac));
  return Create(std::move(*tap), mac, mem, loop);
}

absl::StatusOr<std::unique_ptr<VirtioNet>> VirtioNet::Create(std::unique_ptr<NetBackend> backend,
                                                             const MacAddress& mac,
                                                             GuestMemory* mem, EventLoop* loop) {
  if (backend == nullptr || mem == nullptr)
    return absl::InvalidArgumentError("virtio-net: backend and guest memory are required");
  if (mac[0] & 1 || mac == MacAddress{})
    return absl::InvalidArgumentError(
        absl::StrCat("virtio-net: MAC ", FormatMac(mac), " is not a unicast address"));
  std::unique_ptr<VirtioNet> dev(new VirtioNet(std::move(backend), mac, mem, loop));
  if (absl::Status s = dev->Register(); !s.ok()) return s;
  return dev;
}

absl::Status VirtioNet::Register() {
  if (loop_ == nullptr || backend_->fd() < 0) return absl::OkStatus();
  kick_.reset(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  if (!kick_.valid()) return ErrnoStatus(errno, "virtio-net: eventfd");
  // Watched with no events until the driver activates the device (UpdateWatchLocked()).
  absl::Status s = loop_->Add(backend_->fd(), 0, [this](uint32_t events) {
    if ((events & (EPOLLHUP | EPOLLERR)) && !(events & EPOLLIN)) {
      // The peer is gone (socket backends) or the tap broke: stop watching for good rather
      // than spinning on a level-triggered hang-up.
      {
        std::lock_guard<std::mutex> l(mu_);
        LOG_ERROR("virtio-net: %s hung up (events %#x); receive stopped", backend_->name(),
                  events);
        registered_ = false;
        watching_ = false;
      }
      loop_->Remove(backend_->fd());  // on the loop thread: immediate, no wait
      return;
    }
    PollRx();
  });
  if (!s.ok()) return s;
  s = loop_->Add(kick_.get(), EPOLLIN, [this](uint32_t) { OnKick(); });
  if (!s.ok()) {
    loop_->Remove(backend_->fd());
    return s;
  }
  std::lock_guard<std::mutex> l(mu_);
  registered_ = true;
  return absl::OkStatus();
}

VirtioNet::~VirtioNet() {
  if (loop_ == nullptr || !kick_.valid()) return;
  // Remove() waits for a running handler; never called with mu_ held.
  loop_->Remove(backend_->fd());
  loop_->Remove(kick_.get());
}

// --- Features and config -------------------------------------------------------------------

uint64_t VirtioNet::device_features() const {
  return Bit(kFeatureVersion1) | Bit(kFeatureIndirectDesc) | Bit(kFeatureEventIdx) |
         Bit(VIRTIO_NET_F_CSUM) | Bit(VIRTIO_NET_F_GUEST_CSUM) | Bit(VIRTIO_NET_F_MAC) |
         Bit(VIRTIO_NET_F_GUEST_TSO4) | Bit(VIRTIO_NET_F_GUEST_TSO6) |
         Bit(VIRTIO_NET_F_GUEST_ECN) | Bit(VIRTIO_NET_F_HOST_TSO4) |
         Bit(VIRTIO_NET_F_HOST_TSO6) | Bit(VIRTIO_NET_F_HOST_ECN) |
         Bit(VIRTIO_NET_F_MRG_RXBUF) | Bit(VIRTIO_NET_F_STATUS);
}

void VirtioNet::ReadConfig(uint64_t offset, std::span<uint8_t> data) {
  uint8_t cfg[kConfigBytes] = {};
  {
    std::lock_guard<std::mutex> l(mu_);
    std::memcpy(cfg, mac_.data(), 6);
    cfg[6] = link_up_ ? VIRTIO_NET_S_LINK_UP : 0;  // status (le16)
    cfg[8] = 1;                                     // max_virtqueue_pairs (le16)
  }
  for (size_t i = 0; i < data.size(); ++i)
    data[i] = offset + i < kConfigBytes ? cfg[offset + i] : 0;
}

void VirtioNet::WriteConfig(uint64_t offset, std::span<const uint8_t> data) {
  // virtio 1.x: the config space is read-only for the driver here (the MAC can only change
  // through VIRTIO_NET_F_CTRL_MAC_ADDR, not offered). Ignored.
  (void)offset;
  (void)data;
}

void VirtioNet::SetLinkUp(bool up) {
  {
    std::lock_guard<std::mutex> l(mu_);
    if (link_up_ == up) return;
    link_up_ = up;
  }
  NotifyConfigChanged();
}

// --- Lifecycle -----------------------------------------------------------------------------

absl::Status VirtioNet::Activate(uint64_t features, std::span<Virtqueue* const> queues,
                                 QueueSignal signal) {
  if (queues.size() != 2 || queues[0] == nullptr || queues[1] == nullptr)
    return absl::InvalidArgumentError("virtio-net: needs exactly two queues (rx, tx)");
  if (!((features >> kFeatureVersion1) & 1))
    return absl::FailedPreconditionError(
        "virtio-net: driver did not accept VIRTIO_F_VERSION_1 (legacy headers unsupported)");
  if (absl::Status s = backend_->SetOffload(TunOffloadFor(features)); !s.ok()) return s;

  std::lock_guard<std::mutex> l(mu_);
  features_ = features;
  rxq_ = queues[0];
  txq_ = queues[1];
  signal_ = std::move(signal);
  active_ = false;
  // After a restore: transmit the chains that were in flight (our tx completes synchronously,
  // so a well-behaved source leaves none) and take the held rx chains back.
  const std::vector<uint16_t> tx_heads = txq_->InFlightHeads();
  for (uint16_t head : tx_heads) {
    absl::StatusOr<DescriptorChain> c = txq_->ReadInFlightChain(head);
    if (!c.ok()) return c.status();
    TxChainLocked(*c);
    if (absl::Status s = txq_->AddUsed(head, 0); !s.ok()) return s;
  }
  std::vector<uint16_t> rx_heads = rxq_->InFlightHeads();
  if (rx_heads != restored_heads_)
    return absl::FailedPreconditionError(absl::StrCat(
        "virtio-net: saved receive state holds ", restored_heads_.size(),
        " buffers but the receive queue has ", rx_heads.size(), " in flight"));
  held_.clear();
  for (uint16_t head : rx_heads) {
    absl::StatusOr<DescriptorChain> c = rxq_->ReadInFlightChain(head);
    if (!c.ok()) return c.status();
    held_.push_back(std::move(*c));
  }
  restored_heads_.clear();
  active_ = true;
  quiesced_ = false;
  rx_stalled_ = false;
  UpdateWatchLocked();
  // Deliver a restored packet and raise the interrupts owed for the work above from the loop
  // thread: Activate() runs under the transport lock and must not signal.
  if (kick_.valid() && (pending_len_ > 0 || !held_.empty() || !tx_heads.empty())) {
    uint64_t one = 1;
    ssize_t n = ::write(kick_.get(), &one, sizeof(one));
    (void)n;
  }
  return absl::OkStatus();
}

void VirtioNet::Reset() {
  std::lock_guard<std::mutex> l(mu_);
  if (pending_len_ > 0) ++stats_.rx_dropped;
  active_ = false;
  quiesced_ = false;
  rx_stalled_ = false;
  rxq_ = txq_ = nullptr;
  signal_ = nullptr;
  features_ = 0;
  pending_len_ = 0;
  held_.clear();
  restored_heads_.clear();
  UpdateWatchLocked();
}

void VirtioNet::Quiesce() {
  // Every guest-memory write of this device happens under mu_ (ProcessQueue, PollRx): once
  // quiesced_ is set and the fd unwatched, none can start until ProcessQueue()/Resume().
  std::lock_guard<std::mutex> l(mu_);
  quiesced_ = true;
  UpdateWatchLocked();
}

void VirtioNet::Resume() {
  std::lock_guard<std::mutex> l(mu_);
  quiesced_ = false;
  UpdateWatchLocked();
}

void VirtioNet::UpdateWatchLocked() {
  const bool want = active_ && !quiesced_ && !rx_stalled_;
  if (want == watching_) return;
  watching_ = want;
  if (!registered_) return;
  absl::Status s = loop_->Modify(backend_->fd(), want ? uint32_t{EPOLLIN} : 0u);
  if (!s.ok()) LOG_ERROR("virtio-net: %s: %s", backend_->name(), s.ToString());
}

void VirtioNet::OnKick() {
  uint64_t v;
  ssize_t n = ::read(kick_.get(), &v, sizeof(v));
  (void)n;
  PollRx();
}

// --- Queues --------------------------------------------------------------------------------

void VirtioNet::ProcessQueue(uint16_t index) {
  std::lock_guard<std::mutex> l(mu_);
  if (!active_) return;
  quiesced_ = false;  // the VM runs again
  if (index == 1) {
    TxLocked();
  } else if (index == 0 && pending_len_ > 0) {
    // New rx buffers: finish the packet we stalled on; reading resumes through the loop.
    if (DeliverPendingLocked() == Delivery::kDone) rx_stalled_ = false;
  } else if (index == 0) {
    rx_stalled_ = false;
  }
  UpdateWatchLocked();
  SignalLocked();
}

void VirtioNet::PollRx() {
  std::lock_guard<std::mutex> l(mu_);
  if (!active_ || quiesced_) {
    UpdateWatchLocked();
    return;
  }
  RxLocked();
  UpdateWatchLocked();
  SignalLocked();
}

void VirtioNet::SignalLocked() {
  if (!signal_) return;
  if (rxq_->active() && rxq_->NeedsNotification()) signal_(0);
  if (txq_->active() && txq_->NeedsNotification()) signal_(1);
}

void VirtioNet::RxLocked() {
  rx_stalled_ = false;
  for (int budget = kRxBudget; budget > 0; --budget) {
    if (pending_len_ == 0) {
      iovec iov{rx_buf_.data(), rx_buf_.size()};
      absl::StatusOr<size_t> n = backend_->ReadPacket(std::span<const iovec>(&iov, 1));
      if (!n.ok()) {
        ++stats_.rx_errors;
        LOG_WARN_RATELIMITED("virtio-net: %s", n.status().ToString());
        return;
      }
      if (*n == 0) return;  // nothing waiting
      if (*n < kHdrBytes + kEthHeaderBytes || *n > kMaxPacketBytes) {
        ++stats_.rx_errors;
        LOG_WARN_RATELIMITED("virtio-net: %s: dropped a %d-byte packet (bad size)",
                             backend_->name(), *n);
        continue;
      }
      pending_len_ = *n;
    }
    if (DeliverPendingLocked() == Delivery::kNoBuffers) {
      // Keep the packet; stop watching the backend until the guest adds buffers.
      rx_stalled_ = true;
      return;
    }
  }
}

VirtioNet::Delivery VirtioNet::DeliverPendingLocked() {
  if (!rxq_->active()) return Delivery::kNoBuffers;
  const bool mrg = has(VIRTIO_NET_F_MRG_RXBUF);
  uint64_t capacity = 0;
  for (const DescriptorChain& c : held_) capacity += c.writable_bytes();
  while (held_.empty() || capacity < pending_len_) {
    if (held_.size() >= rxq_->size()) {
      // The driver gave us every buffer it has and they still do not hold one packet: waiting
      // would deadlock. Drop it (spec: each buffer MUST hold at least the header; Linux
      // gives far more).
      ++stats_.rx_errors;
      LOG_WARN_RATELIMITED("virtio-net: %d rx buffers cannot hold a %d-byte packet; dropped",
                           held_.size(), pending_len_);
      DropHeldLocked();
      return Delivery::kDone;
    }
    absl::StatusOr<std::optional<DescriptorChain>> c = rxq_->PopChain();
    if (!c.ok() || !c->has_value()) return Delivery::kNoBuffers;  // empty (or queue error)
    DescriptorChain chain = std::move(**c);
    if (chain.writable_bytes() == 0) {
      ++stats_.rx_errors;
      LOG_WARN_RATELIMITED("virtio-net: rx chain %d has no writable buffer", chain.head());
      (void)rxq_->AddUsed(chain.head(), 0);
      continue;
    }
    if (!mrg && chain.writable_bytes() < pending_len_) {
      // Without MRG_RXBUF the driver must post buffers big enough for any packet it accepts
      // (spec 5.1.6.3.1). This one is not: return it empty and drop the packet.
      ++stats_.rx_dropped;
      LOG_WARN_RATELIMITED("virtio-net: %d-byte rx buffer too small for a %d-byte packet",
                           chain.writable_bytes(), pending_len_);
      (void)rxq_->AddUsed(chain.head(), 0);
      pending_len_ = 0;
      return Delivery::kDone;
    }
    capacity += chain.writable_bytes();
    held_.push_back(std::move(chain));
  }
  // num_buffers: the number of chains this packet uses (1 without MRG_RXBUF: spec says the
  // device MUST set it to 1 then). The backend's value is not ours to pass on.
  const uint16_t num_buffers = static_cast<uint16_t>(held_.size());
  rx_buf_[kNumBuffersOffset] = static_cast<uint8_t>(num_buffers);
  rx_buf_[kNumBuffersOffset + 1] = static_cast<uint8_t>(num_buffers >> 8);
  size_t off = 0;
  for (DescriptorChain& chain : held_) {
    size_t take = static_cast<size_t>(std::min<uint64_t>(chain.writable_bytes(), pending_len_ - off));
    chain.WriteAt(0, std::span<const uint8_t>(rx_buf_.data() + off, take));
    off += take;
    if (!rxq_->AddUsed(chain.head(), chain.bytes_written()).ok()) break;
  }
  ++stats_.rx_packets;
  stats_.rx_bytes += pending_len_ - kHdrBytes;
  held_.clear();
  pending_len_ = 0;
  return Delivery::kDone;
}

void VirtioNet::DropHeldLocked() {
  for (DescriptorChain& c : held_) (void)rxq_->AddUsed(c.head(), 0);
  held_.clear();
  pending_len_ = 0;
}

void VirtioNet::TxLocked() {
  if (!txq_->active()) return;
  for (;;) {
    txq_->DisableNotifications();
    for (;;) {
      absl::StatusOr<std::optional<DescriptorChain>> c = txq_->PopChain();
      if (!c.ok()) return;  // queue error: the transport resets the device
      if (!c->has_value()) break;
      TxChainLocked(**c);
      if (!txq_->AddUsed((*c)->head(), 0).ok()) return;
    }
    // Re-enable and look again: chains added in between may not come with a notification.
    if (!txq_->EnableNotifications()) break;
  }
}

void VirtioNet::TxChainLocked(DescriptorChain& chain) {
  const uint64_t total = chain.readable_bytes();
  if (total < kHdrBytes + kEthHeaderBytes || total - kHdrBytes > kMaxFrameBytes) {
    ++stats_.tx_errors;
    LOG_WARN_RATELIMITED("virtio-net: tx chain %d: %d readable bytes (need a %d-byte header and "
                         "a %d..%d-byte frame); dropped",
                         chain.head(), total, kHdrBytes, kEthHeaderBytes, kMaxFrameBytes);
    return;
  }
  // Straight from guest memory (buffers were validated inside guest RAM at pop). The guest can
  // change them meanwhile; that only garbles its own packet — the kernel checks its own copy
  // of the header.
  std::vector<iovec> iov;
  iov.reserve(chain.readable().size());
  for (const GuestBuffer& b : chain.readable()) {
    absl::StatusOr<uint8_t*> p = mem_->HostPtr(b.gpa, b.len);
    if (!p.ok()) {
      ++stats_.tx_errors;
      return;
    }
    iov.push_back(iovec{*p, b.len});
  }
  absl::Status s = backend_->WritePacket(iov);
  if (s.ok()) {
    ++stats_.tx_packets;
    stats_.tx_bytes += total - kHdrBytes;
  } else if (absl::IsResourceExhausted(s)) {
    ++stats_.tx_dropped;  // like a full NIC queue; the guest's TCP retransmits
  } else {
    ++stats_.tx_errors;
    LOG_WARN_RATELIMITED("virtio-net: %s", s.ToString());
  }
}

// --- State ---------------------------------------------------------------------------------

NetStats VirtioNet::stats() const {
  std::lock_guard<std::mutex> l(mu_);
  return stats_;
}

MacAddress VirtioNet::mac() const {
  std::lock_guard<std::mutex> l(mu_);
  return mac_;
}

bool VirtioNet::rx_stalled() const {
  std::lock_guard<std::mutex> l(mu_);
  return rx_stalled_;
}

std::string VirtioNet::SaveState() const {
  std::lock_guard<std::mutex> l(mu_);
  VirtioNetState st;
  st.set_mac(std::string(mac_.begin(), mac_.end()));
  st.set_link_up(link_up_);
  st.set_rx_packets(stats_.rx_packets);
  st.set_rx_bytes(stats_.rx_bytes);
  st.set_tx_packets(stats_.tx_packets);
  st.set_tx_bytes(stats_.tx_bytes);
  st.set_rx_dropped(stats_.rx_dropped);
  st.set_tx_dropped(stats_.tx_dropped);
  st.set_rx_errors(stats_.rx_errors);
  st.set_tx_errors(stats_.tx_errors);
  st.set_rx_pending(std::string(rx_buf_.begin(), rx_buf_.begin() + pending_len_));
  // Not yet re-read after a restore: pass the restored list on unchanged.
  if (!restored_heads_.empty()) {
    for (uint16_t h : restored_heads_) st.add_rx_held_heads(h);
  } else {
    for (const DescriptorChain& c : held_) st.add_rx_held_heads(c.head());
  }
  std::string out;
  st.SerializeToString(&out);
  return out;
}

absl::Status VirtioNet::RestoreState(const std::string& state) {
  VirtioNetState st;
  if (!st.ParseFromString(state))
    return absl::InvalidArgumentError("virtio-net: saved state does not parse");
  if (st.mac().size() != 6)
    return absl::InvalidArgumentError(
        absl::StrCat("virtio-net: saved MAC has ", st.mac().size(), " bytes, not 6"));
  const size_t pending = st.rx_pending().size();
  if (pending != 0 && (pending < kHdrBytes + kEthHeaderBytes || pending > kMaxPacketBytes))
    return absl::InvalidArgumentError(
        absl::StrCat("virtio-net: saved pending packet has a bad size (", pending, ")"));
  if (st.rx_held_heads_size() > static_cast<int>(kQueueSize) ||
      (st.rx_held_heads_size() > 0 && pending == 0))
    return absl::InvalidArgumentError("virtio-net: saved held rx buffers are inconsistent");
  std::vector<uint16_t> heads;
  for (uint32_t h : st.rx_held_heads()) {
    if (h >= kQueueSize)
      return absl::InvalidArgumentError(absl::StrCat("virtio-net: saved rx head ", h));
    heads.push_back(static_cast<uint16_t>(h));
  }
  MacAddress mac;
  std::memcpy(mac.data(), st.mac().data(), 6);

  std::lock_guard<std::mutex> l(mu_);
  if (mac != mac_)
    LOG_WARN("virtio-net: restored MAC %s replaces the configured %s (the guest keeps its MAC)",
             FormatMac(mac), FormatMac(mac_));
  mac_ = mac;
  link_up_ = st.link_up();
  stats_.rx_packets = st.rx_packets();
  stats_.rx_bytes = st.rx_bytes();
  stats_.tx_packets = st.tx_packets();
  stats_.tx_bytes = st.tx_bytes();
  stats_.rx_dropped = st.rx_dropped();
  stats_.tx_dropped = st.tx_dropped();
  stats_.rx_errors = st.rx_errors();
  stats_.tx_errors = st.tx_errors();
  std::memcpy(rx_buf_.data(), st.rx_pending().data(), pending);
  pending_len_ = pending;
  held_.clear();
  restored_heads_ = std::move(heads);
  active_ = false;
  rx_stalled_ = false;
  UpdateWatchLocked();
  return absl::OkStatus();
}

}  // namespace microvmm::virtio
