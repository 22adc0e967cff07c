// virtio-vsock with the unix-socket backend, driven by a TestDriver playing the guest (rx, tx
// and event queues in GuestMemory) and real unix-socket clients playing host programs, on a
// real EventLoop. No KVM.
#include "devices/virtio/vsock/vsock.h"

#include <poll.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "devices/virtio/vsock/vsock_state.pb.h"
#include "gtest/gtest.h"
#include "tests/virtio/virtq_driver.h"
#include "vmm/event_loop.h"

namespace microvmm::virtio {
namespace {

using testing::Seg;
using testing::TestDriver;

constexpr uint64_t kCid = 42;
constexpr uint32_t kGuestBuf = 256 * 1024;  // the guest's advertised buf_alloc
constexpr uint64_t kRxBase = 0x100000, kRxSlot = 0x10000;   // 256 x 64 KiB
constexpr uint64_t kTxBase = 0x1200000, kTxSlot = 0x14000;  // 64 x 80 KiB
constexpr uint64_t kEvBase = 0x1800000;
constexpr auto kTimeout = std::chrono::seconds(10);

struct Pkt {
  VsockHdr h{};
  std::string data;
};

VsockHdr G(uint32_t src_port, uint32_t dst_port, uint16_t op, uint32_t len = 0,
           uint32_t flags = 0, uint32_t buf_alloc = kGuestBuf, uint32_t fwd_cnt = 0) {
  VsockHdr h{};
  h.src_cid = kCid;
  h.dst_cid = kVsockHostCid;
  h.src_port = src_port;
  h.dst_port = dst_port;
  h.len = len;
  h.type = kVsockTypeStream;
  h.op = op;
  h.flags = flags;
  h.buf_alloc = buf_alloc;
  h.fwd_cnt = fwd_cnt;
  return h;
}

std::string TempDir() {
  char tmpl[] = "/tmp/vsockXXXXXX";  // TEST_TMPDIR is too long for sun_path
  char* d = ::mkdtemp(tmpl);
  return d ? d : "";
}

ScopedFd HostConnect(const std::string& path) {
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::strncpy(a.sun_path, path.c_str(), sizeof(a.sun_path) - 1);
  ScopedFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) return ScopedFd();
  return fd;
}

ScopedFd Listen(const std::string& path) {
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  std::strncpy(a.sun_path, path.c_str(), sizeof(a.sun_path) - 1);
  ScopedFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) return ScopedFd();
  if (::listen(fd.get(), 8) != 0) return ScopedFd();
  return fd;
}

void WriteAll(int fd, const std::string& s) {
  size_t off = 0;
  while (off < s.size()) {
    ssize_t n = ::send(fd, s.data() + off, s.size() - off, MSG_NOSIGNAL);
    ASSERT_GT(n, 0) << strerror(errno);
    off += n;
  }
}

// Reads what is available within `ms` (at most `max` bytes). nullopt: EOF/error seen.
std::optional<std::string> ReadSome(int fd, int ms, size_t max = 1 << 20) {
  pollfd p{fd, POLLIN, 0};
  if (::poll(&p, 1, ms) <= 0) return std::string();
  std::string buf(max, '\0');
  ssize_t n = ::recv(fd, buf.data(), max, MSG_DONTWAIT);
  if (n < 0 && errno == EAGAIN) return std::string();
  if (n <= 0) return std::nullopt;
  buf.resize(n);
  return buf;
}

// Reads exactly n bytes (or fails after kTimeout).
std::string ReadN(int fd, size_t n) {
  std::string out;
  auto deadline = std::chrono::steady_clock::now() + kTimeout;
  while (out.size() < n && std::chrono::steady_clock::now() < deadline) {
    auto s = ReadSome(fd, 50, n - out.size());
    if (!s) break;
    out += *s;
  }
  return out;
}

// True once the peer closed (EOF or reset) within kTimeout; data before that is discarded.
bool WaitClosed(int fd) {
  auto deadline = std::chrono::steady_clock::now() + kTimeout;
  while (std::chrono::steady_clock::now() < deadline)
    if (!ReadSome(fd, 50)) return true;
  return false;
}

std::string Pattern(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::string s(n, '\0');
  for (char& c : s) c = static_cast<char>(rng());
  return s;
}

template <typename F>
bool WaitFor(F pred) {
  auto deadline = std::chrono::steady_clock::now() + kTimeout;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return true;
}

class VsockTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto m = GuestMemory::Create(32 << 20);
    ASSERT_TRUE(m.ok()) << m.status();
    mem_ = std::move(*m);
    auto l = EventLoop::Create("vsock-test");
    ASSERT_TRUE(l.ok()) << l.status();
    loop_ = std::move(*l);
    dir_ = TempDir();
    ASSERT_FALSE(dir_.empty());
    uds_ = dir_ + "/v.sock";
    auto d = VirtioVsock::Create({kCid, uds_}, mem_.get(), loop_.get());
    ASSERT_TRUE(d.ok()) << d.status();
    dev_ = std::move(*d);
    for (uint32_t i = 0; i < 256; ++i) rx_free_.push_back(255 - i);
    SetUpQueues();
    ActivateDevice();
  }
  void TearDown() override {
    dev_.reset();
    loop_.reset();
    std::filesystem::remove_all(dir_);
  }

  void SetUpQueues() {
    for (uint16_t i = 0; i < 3; ++i) {
      q_[i] = std::make_unique<Virtqueue>(mem_.get(), i, 256);
      drv_[i] = std::make_unique<TestDriver>(mem_.get(), 256, 0x10000 * (i + 1));
      ASSERT_TRUE(drv_[i]->Configure(*q_[i], features()).ok());
    }
  }
  uint64_t features() const { return dev_->device_features(); }
  void ActivateDevice() {
    Virtqueue* qs[3] = {q_[0].get(), q_[1].get(), q_[2].get()};
    ASSERT_TRUE(dev_->Activate(features(), qs, [this](uint16_t i) { signals_[i]++; }).ok());
  }
  TestDriver& rxd() { return *drv_[0]; }
  TestDriver& txd() { return *drv_[1]; }
  TestDriver& evd() { return *drv_[2]; }

  // --- Guest side ------------------------------------------------------------------------
  void AddRx(int n, uint32_t size = 4096, bool kick = true) {
    for (int i = 0; i < n; ++i) {
      ASSERT_FALSE(rx_free_.empty());
      uint32_t slot = rx_free_.back();
      rx_free_.pop_back();
      uint16_t head = rxd().AddChain({{kRxBase + slot * kRxSlot, size, true}});
      rx_slot_[head] = slot;
    }
    if (kick) dev_->ProcessQueue(VirtioVsock::kRxQueue);
  }

  // Next packet the device put on rx (refilling the buffer when refill_ is set).
  std::optional<Pkt> Recv(std::chrono::milliseconds wait = kTimeout) {
    auto deadline = std::chrono::steady_clock::now() + wait;
    while (rxd().UsedIdx() == rxd().last_used()) {
      if (std::chrono::steady_clock::now() > deadline) return std::nullopt;
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    auto e = rxd().GetUsed();
    uint32_t slot = rx_slot_.at(static_cast<uint16_t>(e->id));
    rx_free_.push_back(slot);
    Pkt p;
    EXPECT_GE(e->len, sizeof(VsockHdr));
    std::string raw(e->len, '\0');
    EXPECT_TRUE(mem_->Read(kRxBase + slot * kRxSlot, raw.data(), raw.size()).ok());
    if (e->len >= sizeof(VsockHdr)) {
      std::memcpy(&p.h, raw.data(), sizeof(VsockHdr));
      p.data = raw.substr(sizeof(VsockHdr));
      EXPECT_EQ(p.h.len, p.data.size());
      EXPECT_EQ(p.h.src_cid, kVsockHostCid);
      EXPECT_EQ(p.h.dst_cid, kCid);
      EXPECT_EQ(p.h.type, kVsockTypeStream);
    }
    if (refill_) AddRx(1, refill_size_);
    return p;
  }
  // Asserts that nothing more arrives (a short grace period for the loop thread; this can only
  // miss a bug, never invent one).
  void ExpectNoPacket() {
    std::this_thread::sleep_for(std::chrono::milliseconds(150));
    EXPECT_EQ(rxd().UsedIdx(), rxd().last_used()) << "unexpected rx packet";
  }

  // One tx packet from raw bytes split into readable segments of at most `seg` bytes.
  void SendRaw(const std::string& bytes, uint32_t seg = 1 << 20) {
    uint64_t gpa = kTxBase + (tx_slot_++ % 64) * kTxSlot;
    ASSERT_LE(bytes.size(), kTxSlot);
    ASSERT_TRUE(mem_->Write(gpa, bytes.data(), bytes.size()).ok());
    std::vector<Seg> segs;
    for (size_t off = 0; off < bytes.size(); off += seg)
      segs.push_back({gpa + off, static_cast<uint32_t>(std::min<size_t>(seg, bytes.size() - off)),
                      false});
    txd().AddChain(segs);
    dev_->ProcessQueue(VirtioVsock::kTxQueue);
    while (txd().GetUsed()) {
    }
  }
  void Send(const VsockHdr& h, const std::string& payload = "") {
    std::string b(reinterpret_cast<const char*>(&h), sizeof(h));
    SendRaw(b + payload);
  }

  // Host program connects with "CONNECT <port>\n"; the guest accepts. Returns the host socket
  // and the device's ephemeral port.
  std::pair<ScopedFd, uint32_t> HostInitiated(uint32_t guest_port, uint32_t guest_buf = kGuestBuf) {
    ScopedFd host = HostConnect(uds_);
    EXPECT_TRUE(host.valid());
    WriteAll(host.get(), "CONNECT " + std::to_string(guest_port) + "\n");
    auto p = Recv();
    EXPECT_TRUE(p.has_value());
    if (!p) return {std::move(host), 0};
    EXPECT_EQ(p->h.op, kVsockOpRequest);
    EXPECT_EQ(p->h.dst_port, guest_port);
    EXPECT_GE(p->h.src_port, VirtioVsock::kFirstEphemeralPort);
    EXPECT_EQ(p->h.buf_alloc, VirtioVsock::kHostBufAlloc);
    uint32_t local = p->h.src_port;
    Send(G(guest_port, local, kVsockOpResponse, 0, 0, guest_buf));
    EXPECT_EQ(ReadN(host.get(), ("OK " + std::to_string(local) + "\n").size()),
              "OK " + std::to_string(local) + "\n");
    return {std::move(host), local};
  }

  std::unique_ptr<GuestMemory> mem_;
  std::unique_ptr<EventLoop> loop_;
  std::string dir_, uds_;
  std::unique_ptr<VirtioVsock> dev_;
  std::unique_ptr<Virtqueue> q_[3];
  std::unique_ptr<TestDriver> drv_[3];
  std::atomic<int> signals_[3] = {0, 0, 0};
  std::vector<uint32_t> rx_free_;
  std::map<uint16_t, uint32_t> rx_slot_;
  bool refill_ = true;
  uint32_t refill_size_ = 4096;
  uint64_t tx_slot_ = 0;
};

TEST(VsockCreateTest, OptionsAndSocketPath) {
  auto mem = GuestMemory::Create(2 << 20);
  ASSERT_TRUE(mem.ok());
  auto loop = EventLoop::Create("vsock-create");
  ASSERT_TRUE(loop.ok());
  std::string dir = TempDir();
  std::string path = dir + "/s";
  auto create = [&](uint64_t cid, const std::string& p) {
    return VirtioVsock::Create({cid, p}, mem->get(), loop->get());
  };
  EXPECT_EQ(create(2, path).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(create(0xffffffff, path).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(create(3, dir + "/missing/s").status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(create(3, dir + "/" + std::string(100, 'x')).status().code(),
            absl::StatusCode::kInvalidArgument);
  // A regular file is never removed.
  { FILE* f = fopen((dir + "/file").c_str(), "w"); fclose(f); }
  EXPECT_FALSE(create(3, dir + "/file").ok());
  EXPECT_TRUE(std::filesystem::exists(dir + "/file"));
  {
    auto d = create(3, path);
    ASSERT_TRUE(d.ok()) << d.status();
    EXPECT_TRUE(std::filesystem::is_socket(path));
    EXPECT_EQ((*d)->device_type(), 19);
    EXPECT_EQ((*d)->queue_max_sizes(), (std::vector<uint32_t>{256, 256, 256}));
    EXPECT_EQ((*d)->device_features() & 2, 0u) << "SEQPACKET must not be offered";
    uint8_t cfg[8];
    (*d)->ReadConfig(0, cfg);
    uint64_t cid;
    std::memcpy(&cid, cfg, 8);
    EXPECT_EQ(cid, 3u);
    // A live socket is in use.
    EXPECT_EQ(create(4, path).status().code(), absl::StatusCode::kAlreadyExists);
  }
  EXPECT_FALSE(std::filesystem::exists(path)) << "unlinked on destruction";
  // A stale socket (bound, nobody listening) is replaced.
  { ScopedFd stale = Listen(path); }
  ASSERT_TRUE(std::filesystem::is_socket(path));
  EXPECT_TRUE(create(3, path).ok());
  std::filesystem::remove_all(dir);
}

TEST_F(VsockTest, HostInitiatedConnectionCarriesDataBothWays) {
  AddRx(8);
  auto [host, local] = HostInitiated(1234);
  ASSERT_NE(local, 0u);
  EXPECT_EQ(dev_->stats().connections_open, 1u);

  WriteAll(host.get(), "hello from host");
  auto p = Recv();
  ASSERT_TRUE(p);
  EXPECT_EQ(p->h.op, kVsockOpRw);
  EXPECT_EQ(p->h.src_port, local);
  EXPECT_EQ(p->h.dst_port, 1234u);
  EXPECT_EQ(p->data, "hello from host");

  Send(G(1234, local, kVsockOpRw, 10), "from guest");
  EXPECT_EQ(ReadN(host.get(), 10), "from guest");
  auto st = dev_->stats();
  EXPECT_EQ(st.bytes_to_guest, 15u);
  EXPECT_EQ(st.bytes_to_host, 10u);
  EXPECT_GT(signals_[0].load(), 0);
}

TEST_F(VsockTest, HandshakeTrailingBytesReachTheGuestFirst) {
  AddRx(8);
  ScopedFd host = HostConnect(uds_);
  WriteAll(host.get(), "CONNECT 77\nearly bytes");
  auto req = Recv();
  ASSERT_TRUE(req);
  ASSERT_EQ(req->h.op, kVsockOpRequest);
  Send(G(77, req->h.src_port, kVsockOpResponse));
  std::string ok = "OK " + std::to_string(req->h.src_port) + "\n";
  EXPECT_EQ(ReadN(host.get(), ok.size()), ok);
  WriteAll(host.get(), "+late");
  std::string got;
  while (got.size() < 16) {
    auto p = Recv();
    ASSERT_TRUE(p);
    ASSERT_EQ(p->h.op, kVsockOpRw);
    got += p->data;
  }
  EXPECT_EQ(got, "early bytes+late");
}

TEST_F(VsockTest, LargeHostToGuestTransferSplitsIntoRxBuffers) {
  AddRx(16, 4096);
  auto [host, local] = HostInitiated(5);
  const std::string data = Pattern(300 * 1024, 1);
  std::thread writer([&, fd = host.get()] { WriteAll(fd, data); });
  std::string got;
  uint32_t fwd = 0, last_update = 0;
  while (got.size() < data.size()) {
    auto p = Recv();
    ASSERT_TRUE(p) << "stalled after " << got.size();
    ASSERT_EQ(p->h.op, kVsockOpRw);
    EXPECT_LE(p->data.size(), 4096 - sizeof(VsockHdr));
    got += p->data;
    fwd += p->data.size();
    // The guest application consumed the data: tell the device (as Linux does).
    if (fwd - last_update >= 64 * 1024) {
      Send(G(5, local, kVsockOpCreditUpdate, 0, 0, kGuestBuf, fwd));
      last_update = fwd;
    }
    // Credit is never exceeded: in flight <= buf_alloc.
    ASSERT_LE(got.size() - last_update, kGuestBuf);
  }
  writer.join();
  EXPECT_TRUE(got == data) << "data corrupted";
  EXPECT_EQ(dev_->stats().bytes_to_guest, data.size());
}

TEST_F(VsockTest, GuestCreditIsRespectedAndResumesAfterCreditUpdate) {
  AddRx(16);
  constexpr uint32_t kBuf = 1000;
  auto [host, local] = HostInitiated(9, kBuf);
  const std::string data = Pattern(5000, 2);
  WriteAll(host.get(), data);
  std::string got;
  for (uint32_t fwd = 0; fwd < data.size(); fwd += kBuf) {
    while (got.size() < fwd + kBuf) {
      auto p = Recv();
      ASSERT_TRUE(p) << "stalled at " << got.size();
      ASSERT_EQ(p->h.op, kVsockOpRw);
      got += p->data;
      ASSERT_LE(got.size(), fwd + kBuf) << "device sent beyond the guest's credit";
    }
    ExpectNoPacket();  // out of credit: nothing more
    EXPECT_EQ(dev_->stats().bytes_to_guest, fwd + kBuf);
    Send(G(9, local, kVsockOpCreditUpdate, 0, 0, kBuf, fwd + kBuf));
  }
  EXPECT_TRUE(got == data);
  // A CREDIT_REQUEST is answered with our credit.
  Send(G(9, local, kVsockOpCreditRequest, 0, 0, kBuf, 5000));
  auto p = Recv();
  ASSERT_TRUE(p);
  EXPECT_EQ(p->h.op, kVsockOpCreditUpdate);
  EXPECT_EQ(p->h.buf_alloc, VirtioVsock::kHostBufAlloc);
}

TEST_F(VsockTest, LargeGuestToHostTransferGetsCreditUpdates) {
  AddRx(16);
  auto [host, local] = HostInitiated(6);
  const std::string data = Pattern(700 * 1024, 3);
  const uint32_t kChunk = 16 * 1024;
  uint32_t host_buf = VirtioVsock::kHostBufAlloc, host_fwd = 0, sent = 0;
  int credit_updates = 0;
  std::string got;
  while (sent < data.size()) {
    // Respect the device's credit, as a guest must.
    while (sent + kChunk - host_fwd > host_buf) {
      auto s = ReadSome(host.get(), 20);  // the host program reads...
      ASSERT_TRUE(s);
      got += *s;
      while (auto p = Recv(std::chrono::milliseconds(0))) {  // ...and credit comes back
        if (p->h.op == kVsockOpCreditUpdate) ++credit_updates;
        host_fwd = p->h.fwd_cnt;
        host_buf = p->h.buf_alloc;
      }
    }
    uint32_t n = std::min<uint32_t>(kChunk, data.size() - sent);
    Send(G(6, local, kVsockOpRw, n, 0, kGuestBuf, 0), data.substr(sent, n));
    sent += n;
    ASSERT_EQ(dev_->stats().connections_open, 1u) << "device reset a well-behaved guest";
  }
  got += ReadN(host.get(), data.size() - got.size());
  EXPECT_GT(credit_updates, 0);
  EXPECT_TRUE(got == data) << "data corrupted, got " << got.size();
}

TEST_F(VsockTest, GuestExceedingCreditIsReset) {
  AddRx(8);
  auto [host, local] = HostInitiated(6);
  // The host program does not read; the socket buffer fills, then the device's 256 KiB.
  const std::string chunk = Pattern(60000, 4);
  bool reset = false;
  for (int i = 0; i < 40 && !reset; ++i) {
    Send(G(6, local, kVsockOpRw, chunk.size()), chunk);
    while (auto p = Recv(std::chrono::milliseconds(0)))
      if (p->h.op == kVsockOpRst) reset = true;
  }
  EXPECT_TRUE(reset);
  EXPECT_EQ(dev_->stats().connections_open, 0u);
}

TEST_F(VsockTest, RxStarvationHoldsDataUntilBuffersArrive) {
  refill_ = false;
  AddRx(1);
  auto [host, local] = HostInitiated(3);  // used the only rx buffer
  const std::string data = Pattern(20000, 5);
  WriteAll(host.get(), data);
  ExpectNoPacket();
  EXPECT_EQ(dev_->stats().bytes_to_guest, 0u);
  // Control packets wait too: a guest-initiated connection's RESPONSE.
  ScopedFd l = Listen(uds_ + "_500");
  Send(G(900, 500, kVsockOpRequest));
  ExpectNoPacket();
  refill_ = true;
  AddRx(4);
  std::string got;
  bool response = false;
  while (got.size() < data.size() || !response) {
    auto p = Recv();
    ASSERT_TRUE(p);
    if (p->h.op == kVsockOpResponse) {
      EXPECT_EQ(p->h.dst_port, 900u);
      response = true;
    } else {
      ASSERT_EQ(p->h.op, kVsockOpRw);
      got += p->data;
    }
  }
  EXPECT_TRUE(got == data);
}

TEST_F(VsockTest, GuestInitiatedConnections) {
  AddRx(8);
  ScopedFd l = Listen(uds_ + "_5000");
  ASSERT_TRUE(l.valid());
  Send(G(777, 5000, kVsockOpRequest));
  auto p = Recv();
  ASSERT_TRUE(p);
  EXPECT_EQ(p->h.op, kVsockOpResponse);
  EXPECT_EQ(p->h.src_port, 5000u);
  EXPECT_EQ(p->h.dst_port, 777u);
  ScopedFd app(::accept4(l.get(), nullptr, nullptr, SOCK_CLOEXEC));
  ASSERT_TRUE(app.valid());
  Send(G(777, 5000, kVsockOpRw, 4), "ping");
  EXPECT_EQ(ReadN(app.get(), 4), "ping");
  WriteAll(app.get(), "pong");
  p = Recv();
  ASSERT_TRUE(p);
  EXPECT_EQ(p->h.op, kVsockOpRw);
  EXPECT_EQ(p->data, "pong");

  // Nobody listens on port 5001: RST.
  Send(G(778, 5001, kVsockOpRequest));
  p = Recv();
  ASSERT_TRUE(p);
  EXPECT_EQ(p->h.op, kVsockOpRst);
  EXPECT_EQ(p->h.src_port, 5001u);
  EXPECT_EQ(p->h.dst_port, 778u);
  EXPECT_EQ(dev_->stats().connections_open, 1u);
}

TEST_F(VsockTest, GuestShutdownAndRst) {
  AddRx(8);
  auto [host, local] = HostInitiated(10);
  // SHUTDOWN(SEND): the host reads EOF but can still send.
  Send(G(10, local, kVsockOpShutdown, 0, kVsockShutdownSend));
  EXPECT_EQ(ReadSome(host.get(), 5000), std::nullopt);
  WriteAll(host.get(), "still");
  auto p = Recv();
  ASSERT_TRUE(p);
  EXPECT_EQ(p->data, "still");
  // Both directions: RST to the guest, socket closed.
  Send(G(10, local, kVsockOpShutdown, 0, kVsockShutdownSend | kVsockShutdownRcv));
  p = Recv();
  ASSERT_TRUE(p);
  EXPECT_EQ(p->h.op, kVsockOpRst);
  EXPECT_EQ(dev_->stats().connections_open, 0u);
  EXPECT_TRUE(WaitClosed(host.get()));

  // Guest RST on an established connection closes the host socket.
  auto [host2, local2] = HostInitiated(11);
  Send(G(11, local2, kVsockOpRst));
  EXPECT_TRUE(WaitClosed(host2.get()));
  EXPECT_EQ(dev_->stats().connections_open, 0u);
  ExpectNoPacket();  // a RST is never answered
}

TEST_F(VsockTest, ShutdownFlushesBufferedDataBeforeRst) {
  AddRx(8);
  ScopedFd l = Listen(uds_ + "_6000");
  Send(G(600, 6000, kVsockOpRequest));
  auto p = Recv();
  ASSERT_TRUE(p);
  ASSERT_EQ(p->h.op, kVsockOpResponse);
  ScopedFd app(::accept4(l.get(), nullptr, nullptr, SOCK_CLOEXEC));
  // The app does not read yet: more than the socket buffer goes out, the rest waits in the
  // device (within the 256 KiB credit).
  const std::string data = Pattern(250 * 1024, 6);
  for (size_t off = 0; off < data.size(); off += 50 * 1024)
    Send(G(600, 6000, kVsockOpRw, 50 * 1024), data.substr(off, 50 * 1024));
  Send(G(600, 6000, kVsockOpShutdown, 0, kVsockShutdownSend | kVsockShutdownRcv));
  std::this_thread::sleep_for(std::chrono::milliseconds(150));
  uint64_t flushed = dev_->stats().bytes_to_host;
  if (flushed == data.size()) GTEST_SKIP() << "the socket buffer took everything: nothing to test";
  // No RST while data is still buffered (credit updates may come).
  while (auto q = Recv(std::chrono::milliseconds(0))) {
    EXPECT_EQ(q->h.op, kVsockOpCreditUpdate);
  }
  EXPECT_EQ(dev_->stats().connections_open, 1u);
  std::string got = ReadN(app.get(), data.size());
  EXPECT_TRUE(got == data) << "got " << got.size();
  EXPECT_TRUE(WaitClosed(app.get()));
  do {
    p = Recv();
    ASSERT_TRUE(p);
  } while (p->h.op == kVsockOpCreditUpdate);
  EXPECT_EQ(p->h.op, kVsockOpRst);
  EXPECT_EQ(dev_->stats().connections_open, 0u);
}

TEST_F(VsockTest, WritesToAClosedHostSocketGetRst) {
  AddRx(8);
  ScopedFd l = Listen(uds_ + "_6001");
  Send(G(601, 6001, kVsockOpRequest));
  auto p = Recv();
  ASSERT_TRUE(p);
  ASSERT_EQ(p->h.op, kVsockOpResponse);
  { ScopedFd app(::accept4(l.get(), nullptr, nullptr, SOCK_CLOEXEC)); }  // app exits
  p = Recv();
  ASSERT_TRUE(p);
  EXPECT_EQ(p->h.op, kVsockOpShutdown);
  EXPECT_EQ(p->h.flags, kVsockShutdownRcv | kVsockShutdownSend);
  Send(G(601, 6001, kVsockOpRw, 3), "late");  // guest ignores the shutdown
  p = Recv();
  ASSERT_TRUE(p);
  EXPECT_EQ(p->h.op, kVsockOpRst);
  EXPECT_EQ(dev_->stats().connections_open, 0u);
}

TEST_F(VsockTest, ShutdownInsteadOfResponseResets) {
  AddRx(8);
  ScopedFd host = HostConnect(uds_);
  WriteAll(host.get(), "CONNECT 8\n");
  auto p = Recv();
  ASSERT_TRUE(p);
  ASSERT_EQ(p->h.op, kVsockOpRequest);
  Send(G(8, p->h.src_port, kVsockOpShutdown, 0, kVsockShutdownSend));
  p = Recv();
  ASSERT_TRUE(p);
  EXPECT_EQ(p->h.op, kVsockOpRst);
  EXPECT_TRUE(WaitClosed(host.get()));
}

TEST_F(VsockTest, GuestRefusalClosesHostSocket) {
  AddRx(8);
  ScopedFd host = HostConnect(uds_);
  WriteAll(host.get(), "CONNECT 4242\n");
  auto p = Recv();
  ASSERT_TRUE(p);
  ASSERT_EQ(p->h.op, kVsockOpRequest);
  Send(G(4242, p->h.src_port, kVsockOpRst));
  EXPECT_TRUE(WaitClosed(host.get()));
  EXPECT_EQ(dev_->stats().connections_open, 0u);
}

TEST_F(VsockTest, HostCloseAndHalfClose) {
  AddRx(8);
  auto [host, local] = HostInitiated(12);
  WriteAll(host.get(), "bye");
  ::shutdown(host.get(), SHUT_WR);
  auto p = Recv();
  ASSERT_TRUE(p);
  EXPECT_EQ(p->data, "bye");  // data first, then the shutdown
  p = Recv();
  ASSERT_TRUE(p);
  EXPECT_EQ(p->h.op, kVsockOpShutdown);
  EXPECT_EQ(p->h.flags, kVsockShutdownSend);
  Send(G(12, local, kVsockOpRw, 5), "reply");  // half-closed: the other way still works
  EXPECT_EQ(ReadN(host.get(), 5), "reply");

  auto [host2, local2] = HostInitiated(13);
  host2.reset();  // the host program exits
  p = Recv();
  ASSERT_TRUE(p);
  EXPECT_EQ(p->h.op, kVsockOpShutdown);
  EXPECT_EQ(p->h.flags, kVsockShutdownSend | kVsockShutdownRcv);
  EXPECT_EQ(p->h.src_port, local2);
  Send(G(13, local2, kVsockOpRst));  // the guest's answer
  EXPECT_EQ(dev_->stats().connections_open, 1u);  // only the half-closed one
}

TEST_F(VsockTest, BadHandshakesCloseTheHostSocket) {
  AddRx(8);
  const char* bad[] = {"HELLO 12\n", "CONNECT abc\n", "CONNECT 99999999999\n", "CONNECT \n",
                       "CONNECT 12 \n", "CONNECT 1234567890123456789012345678901234"};
  for (const char* b : bad) {
    ScopedFd host = HostConnect(uds_);
    WriteAll(host.get(), b);
    EXPECT_TRUE(WaitClosed(host.get())) << b;
  }
  {  // Closed mid-line.
    ScopedFd host = HostConnect(uds_);
    WriteAll(host.get(), "CONN");
    ASSERT_TRUE(WaitFor([&] { return dev_->stats().connections_open == 1; }));
  }
  ASSERT_TRUE(WaitFor([&] { return dev_->stats().bad_handshakes == 7; }));
  EXPECT_EQ(dev_->stats().connections_open, 0u);
  ExpectNoPacket();  // the guest never heard of them
  // Still works afterwards.
  auto [host, local] = HostInitiated(1);
  EXPECT_NE(local, 0u);
}

TEST_F(VsockTest, HostilePacketsAreDroppedOrReset) {
  AddRx(16);
  auto [host, local] = HostInitiated(20);
  auto hdr_bytes = [](const VsockHdr& h) {
    return std::string(reinterpret_cast<const char*>(&h), sizeof(h));
  };
  uint64_t dropped = dev_->stats().tx_dropped;
  // Short header.
  SendRaw(std::string(20, 'x'));
  // Header split over several descriptors is fine (valid RW, 3-byte segments).
  SendRaw(hdr_bytes(G(20, local, kVsockOpRw, 6)) + "split!", 3);
  EXPECT_EQ(ReadN(host.get(), 6), "split!");
  // len beyond the chain / beyond 64 KiB.
  SendRaw(hdr_bytes(G(20, local, kVsockOpRw, 100)) + "short");
  SendRaw(hdr_bytes(G(20, local, kVsockOpRw, 70000)) + std::string(70000, 'z'));
  // Wrong cids.
  VsockHdr h = G(20, local, kVsockOpRw, 1);
  h.src_cid = 7;
  Send(h, "a");
  h = G(20, local, kVsockOpRw, 1);
  h.dst_cid = 99;
  Send(h, "b");
  h = G(20, local, kVsockOpRw, 1);
  h.dst_cid = (1ULL << 32) | kVsockHostCid;  // upper bits matter
  Send(h, "c");
  EXPECT_EQ(dev_->stats().tx_dropped, dropped + 6);
  ExpectNoPacket();
  EXPECT_EQ(dev_->stats().connections_open, 1u);
  EXPECT_EQ(dev_->stats().bytes_to_host, 6u);

  // Unknown type: RST. Unknown connection: RST. RST to an unknown connection: nothing.
  h = G(31, 32, kVsockOpRequest);
  h.type = 2;  // SEQPACKET, not negotiated
  Send(h);
  auto p = Recv();
  ASSERT_TRUE(p);
  EXPECT_EQ(p->h.op, kVsockOpRst);
  EXPECT_EQ(p->h.dst_port, 31u);
  Send(G(40, 41, kVsockOpRw, 2), "zz");
  p = Recv();
  ASSERT_TRUE(p);
  EXPECT_EQ(p->h.op, kVsockOpRst);
  EXPECT_EQ(p->h.src_port, 41u);
  Send(G(40, 41, kVsockOpRst));
  Send(G(40, 41, 0));   // OP_INVALID on an unknown connection: RST
  Send(G(40, 41, 99));  // unknown op
  for (int i = 0; i < 2; ++i) {
    p = Recv();
    ASSERT_TRUE(p);
    EXPECT_EQ(p->h.op, kVsockOpRst);
  }
  // A response for a connection that is already established: protocol violation -> reset.
  Send(G(20, local, kVsockOpResponse));
  p = Recv();
  ASSERT_TRUE(p);
  EXPECT_EQ(p->h.op, kVsockOpRst);
  EXPECT_TRUE(WaitClosed(host.get()));

}

TEST_F(VsockTest, TxBackPressureWhenRepliesCannotBeDelivered) {
  // No rx buffers: every tx packet (RW to unknown connections) needs a RST that cannot go out.
  uint32_t port = 1000;
  int used_per_batch[3];
  for (int batch = 0; batch < 3; ++batch) {
    while (txd().free_descriptors() > 0) {
      uint64_t gpa = kTxBase + (port - 1000) * 64;  // one buffer per pending packet
      VsockHdr h = G(port++, 1, kVsockOpRw);
      ASSERT_TRUE(mem_->Write(gpa, &h, sizeof(h)).ok());
      txd().AddChain({{gpa, sizeof(h), false}});
    }
    dev_->ProcessQueue(VirtioVsock::kTxQueue);
    used_per_batch[batch] = 0;
    while (txd().GetUsed()) ++used_per_batch[batch];
  }
  // The first 512 were taken (VirtioVsock::kMaxCtrlQueue), then the device stopped: the third
  // batch waits in the ring instead of its replies being dropped.
  EXPECT_EQ(used_per_batch[0], 256);
  EXPECT_EQ(used_per_batch[1], 256);
  EXPECT_EQ(used_per_batch[2], 0);
  AddRx(64);
  for (uint32_t i = 1000; i < port; ++i) {
    auto p = Recv();
    ASSERT_TRUE(p) << "missing RST for port " << i;
    EXPECT_EQ(p->h.op, kVsockOpRst);
    EXPECT_EQ(p->h.dst_port, i);
  }
  while (txd().GetUsed()) {
  }
  EXPECT_EQ(txd().free_descriptors(), 256u);  // tx resumed and finished
  ExpectNoPacket();
}

TEST_F(VsockTest, UnusableBuffersAreSkipped) {
  // A tx chain with only writable buffers and an rx buffer too small for a header.
  txd().AddChain({{kTxBase, 64, true}});
  dev_->ProcessQueue(VirtioVsock::kTxQueue);
  EXPECT_TRUE(txd().GetUsed().has_value());
  EXPECT_EQ(dev_->stats().tx_dropped, 1u);
  refill_ = false;
  ASSERT_TRUE(mem_->Write(kRxBase + 255 * kRxSlot, std::string(64, '\x5a').data(), 64).ok());
  AddRx(1, 16, /*kick=*/false);  // slot 255
  AddRx(1, 4096);
  Send(G(50, 51, kVsockOpRw));  // unknown connection -> RST
  auto tiny = rxd().GetUsed();
  ASSERT_TRUE(tiny);
  EXPECT_EQ(tiny->len, 0u);
  uint8_t b[64];
  ASSERT_TRUE(mem_->Read(kRxBase + 255 * kRxSlot, b, 64).ok());
  for (uint8_t x : b) ASSERT_EQ(x, 0x5a) << "device wrote into a too-small rx buffer";
  rx_free_.push_back(rx_slot_.at(static_cast<uint16_t>(tiny->id)));
  auto p = Recv();
  ASSERT_TRUE(p);
  EXPECT_EQ(p->h.op, kVsockOpRst);
  EXPECT_FALSE(q_[0]->in_error());
  EXPECT_FALSE(q_[1]->in_error());
}

TEST_F(VsockTest, SaveRestoreSendsTransportReset) {
  AddRx(8);
  auto [host, local] = HostInitiated(30);
  WriteAll(host.get(), "x");
  ASSERT_TRUE(Recv());
  loop_->Pause();
  dev_->Quiesce();
  std::string state = dev_->SaveState();
  VirtioVsockState parsed;
  ASSERT_TRUE(parsed.ParseFromString(state));
  EXPECT_EQ(parsed.guest_cid(), kCid);
  EXPECT_EQ(parsed.open_connections(), 1u);
  VirtqueueState qs[3];
  for (int i = 0; i < 3; ++i) qs[i] = q_[i]->SaveState();
  loop_->Resume();

  // Destination: a new device (its own socket path) over the same guest memory.
  auto d2 = VirtioVsock::Create({kCid, dir_ + "/dst.sock"}, mem_.get(), loop_.get());
  ASSERT_TRUE(d2.ok());
  EXPECT_FALSE((*d2)->RestoreState("\xff\xff garbage").ok());
  auto other = VirtioVsock::Create({kCid + 1, dir_ + "/o.sock"}, mem_.get(), loop_.get());
  ASSERT_TRUE(other.ok());
  EXPECT_EQ((*other)->RestoreState(state).code(), absl::StatusCode::kFailedPrecondition);
  other->reset();

  ASSERT_TRUE((*d2)->RestoreState(state).ok());
  dev_ = std::move(*d2);  // the source device goes away: its host socket closes
  EXPECT_TRUE(WaitClosed(host.get()));
  uds_ = dir_ + "/dst.sock";
  for (int i = 0; i < 3; ++i) {
    q_[i] = std::make_unique<Virtqueue>(mem_.get(), i, 256);
    ASSERT_TRUE(q_[i]->RestoreState(qs[i]).ok());
  }
  // No event buffer yet: the reset waits for one.
  ActivateDevice();
  EXPECT_EQ(dev_->stats().connections_open, 0u);
  uint16_t head = evd().AddChain({{kEvBase, 4, true}});
  ASSERT_TRUE(mem_->Write(kEvBase, "\xee\xee\xee\xee", 4).ok());
  dev_->ProcessQueue(VirtioVsock::kEventQueue);
  ASSERT_TRUE(WaitFor([&] { return evd().UsedIdx() == 1; }));
  auto e = evd().GetUsed();
  EXPECT_EQ(e->id, head);
  EXPECT_EQ(e->len, 4u);
  uint32_t id = 0xffffffff;
  ASSERT_TRUE(mem_->Read(kEvBase, &id, 4).ok());
  EXPECT_EQ(id, kVsockEventTransportReset);
  EXPECT_EQ(dev_->stats().reset_events, 1u);

  // The restored device works: new connections on the new path (held rx chains reused).
  auto [h2, l2] = HostInitiated(31);
  EXPECT_NE(l2, 0u);
  WriteAll(h2.get(), "after");
  auto p = Recv();
  ASSERT_TRUE(p);
  EXPECT_EQ(p->data, "after");
}

TEST_F(VsockTest, TransportResetPostedWhenEventBufferIsWaiting) {
  evd().AddChain({{kEvBase, 4, true}});
  std::string state = dev_->SaveState();
  VirtqueueState qs[3];
  for (int i = 0; i < 3; ++i) qs[i] = q_[i]->SaveState();
  dev_->Reset();
  ASSERT_TRUE(dev_->RestoreState(state).ok());
  for (int i = 0; i < 3; ++i) {
    q_[i] = std::make_unique<Virtqueue>(mem_.get(), i, 256);
    ASSERT_TRUE(q_[i]->RestoreState(qs[i]).ok());
  }
  int before = signals_[2].load();
  ActivateDevice();  // must not signal from inside Activate(); the loop delivers it
  ASSERT_TRUE(WaitFor([&] { return evd().UsedIdx() == 1; }));
  EXPECT_TRUE(WaitFor([&] { return signals_[2].load() > before; }));
  EXPECT_EQ(dev_->stats().reset_events, 1u);
}

TEST_F(VsockTest, ResetClosesEverything) {
  AddRx(8);
  auto [host, local] = HostInitiated(40);
  dev_->Reset();
  EXPECT_EQ(dev_->stats().connections_open, 0u);
  EXPECT_TRUE(WaitClosed(host.get()));
  // While inactive, host connections wait in the backlog; no crash on ProcessQueue.
  dev_->ProcessQueue(0);
  dev_->ProcessQueue(1);
}

}  // namespace
}  // namespace microvmm::virtio
