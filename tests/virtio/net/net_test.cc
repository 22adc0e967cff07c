// Unit tests of devices/virtio/net (virtio-net) against the test driver in virtq_driver.h and
// a SOCK_SEQPACKET socketpair standing in for the tap: tx of frames with their header, rx with
// and without MRG_RXBUF, rx stall/resume without loss, hostile tx/rx chains, Quiesce, save ->
// restore -> continue. No root, no KVM. The EventLoop is left out (PollRx() is called by the
// test) except where the loop wiring itself is under test.
#include "devices/virtio/net/net.h"

#include <linux/if_tun.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <functional>
#include <map>
#include <chrono>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "devices/virtio/net/tap.h"
#include "gtest/gtest.h"
#include "tests/virtio/virtq_driver.h"
#include "vmm/event_loop.h"
#include "vmm/memory/guest_memory.h"

namespace microvmm::virtio {
namespace {

using testing::Seg;
using testing::TestDriver;

constexpr uint64_t kMiB = 1ULL << 20;
constexpr uint64_t F(int b) { return uint64_t{1} << b; }
constexpr uint64_t kVersion1 = F(kFeatureVersion1);
constexpr uint64_t kMrg = F(15);
constexpr uint64_t kGuestCsum = F(1), kGuestTso4 = F(7), kGuestTso6 = F(8), kGuestEcn = F(9);
constexpr uint32_t kQ = 16;             // ring size used by the tests (device max is 256)
constexpr uint64_t kRxRing = 0x10000, kTxRing = 0x20000;
constexpr uint64_t kData = 0x100000;    // buffers from 1 MiB up
constexpr size_t kHdr = VirtioNet::kHdrBytes;
constexpr MacAddress kMac = {0x52, 0x54, 0x00, 0xab, 0xcd, 0xef};

// 12-byte header with recognisable fields + a patterned frame.
std::vector<uint8_t> Packet(size_t frame_len, uint8_t seed, uint16_t num_buffers = 0x7777) {
  std::vector<uint8_t> p(kHdr + frame_len);
  p[0] = 1;     // flags (NEEDS_CSUM): passed through untouched
  p[1] = 0;     // gso_type
  p[4] = 0x34;  // gso_size etc.: arbitrary, must survive
  p[6] = 14;
  p[8] = 16;
  p[10] = static_cast<uint8_t>(num_buffers);
  p[11] = static_cast<uint8_t>(num_buffers >> 8);
  for (size_t i = 0; i < frame_len; ++i) p[kHdr + i] = static_cast<uint8_t>(seed + i * 13);
  return p;
}

struct Rig {
  std::unique_ptr<GuestMemory> mem;
  std::unique_ptr<Virtqueue> rxq, txq;
  std::unique_ptr<TestDriver> rx, tx;
  int peer = -1;  // the "network" end of the socketpair
  FdNetBackend* backend = nullptr;
  std::unique_ptr<VirtioNet> dev;
  std::mutex mu;
  std::vector<uint16_t> signals;
  uint64_t features = 0;
  uint64_t next_buf = kData;

  explicit Rig(uint64_t feat, EventLoop* loop = nullptr, bool activate = true) {
    features = kVersion1 | feat;
    auto m = GuestMemory::Create(8 * kMiB);
    if (!m.ok()) {
      ADD_FAILURE() << m.status();
      return;
    }
    mem = std::move(*m);
    NewDevice(loop);
    if (activate) Activate();
  }
  ~Rig() {
    dev.reset();
    if (peer >= 0) close(peer);
  }
  void NewDevice(EventLoop* loop) {
    int sv[2];
    ASSERT_EQ(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv), 0);
    if (peer >= 0) close(peer);
    peer = sv[1];
    auto b = std::make_unique<FdNetBackend>(ScopedFd(sv[0]), "socketpair");
    backend = b.get();
    auto d = VirtioNet::Create(std::move(b), kMac, mem.get(), loop);
    ASSERT_TRUE(d.ok()) << d.status();
    dev = std::move(*d);
  }
  void Activate() {
    rxq = std::make_unique<Virtqueue>(mem.get(), 0, VirtioNet::kQueueSize);
    txq = std::make_unique<Virtqueue>(mem.get(), 1, VirtioNet::kQueueSize);
    rx = std::make_unique<TestDriver>(mem.get(), kQ, kRxRing);
    tx = std::make_unique<TestDriver>(mem.get(), kQ, kTxRing);
    ASSERT_TRUE(rx->Configure(*rxq, features).ok());
    ASSERT_TRUE(tx->Configure(*txq, features).ok());
    ASSERT_TRUE(ActivateDevice().ok());
  }
  absl::Status ActivateDevice() {
    Virtqueue* qs[2] = {rxq.get(), txq.get()};
    return dev->Activate(features, qs, [this](uint16_t i) {
      std::lock_guard<std::mutex> l(mu);
      signals.push_back(i);
    });
  }
  size_t SignalCount(uint16_t q) {
    std::lock_guard<std::mutex> l(mu);
    size_t n = 0;
    for (uint16_t s : signals) n += s == q;
    return n;
  }
  uint64_t Alloc(size_t len) {
    uint64_t g = next_buf;
    next_buf += (len + 4095) & ~uint64_t{4095};
    return g;
  }
  // Guest buffers holding `bytes`, split at the given sizes (the rest in a last buffer).
  std::vector<Seg> TxSegs(const std::vector<uint8_t>& bytes, std::vector<size_t> splits) {
    std::vector<Seg> segs;
    size_t off = 0;
    splits.push_back(bytes.size());
    for (size_t s : splits) {
      size_t n = std::min(s, bytes.size() - off);
      if (n == 0) continue;
      uint64_t g = Alloc(n);
      EXPECT_TRUE(mem->Write(g, bytes.data() + off, n).ok());
      segs.push_back({g, static_cast<uint32_t>(n), false});
      off += n;
    }
    return segs;
  }
  // Posts one rx chain of one writable buffer; returns its gpa.
  uint64_t PostRx(uint32_t len) {
    uint64_t g = Alloc(len);
    std::vector<uint8_t> junk(len, 0xEE);
    EXPECT_TRUE(mem->Write(g, junk.data(), len).ok());
    rx->AddChain({{g, len, true}});
    rx_bufs[g] = len;
    return g;
  }
  std::map<uint64_t, uint32_t> rx_bufs;
  std::vector<uint8_t> Peek(uint64_t gpa, size_t n) {
    std::vector<uint8_t> v(n);
    EXPECT_TRUE(mem->Read(gpa, v.data(), n).ok());
    return v;
  }
  void Send(const std::vector<uint8_t>& p) {
    ASSERT_EQ(send(peer, p.data(), p.size(), 0), static_cast<ssize_t>(p.size()));
  }
  // Next packet the device wrote to the backend; empty if none.
  std::vector<uint8_t> Recv() {
    std::vector<uint8_t> buf(80000);
    ssize_t n = recv(peer, buf.data(), buf.size(), MSG_DONTWAIT);
    if (n < 0) return {};
    buf.resize(static_cast<size_t>(n));
    return buf;
  }
};

// gpa of the descriptor `head` of the rx ring (the test driver uses one descriptor per buffer).
uint64_t RxBufOf(Rig& r, uint32_t head) {
  uint64_t addr = 0;
  EXPECT_TRUE(r.mem->Read(r.rx->desc_addr + 16ULL * head, &addr, 8).ok());
  return addr;
}

// --- Options and config ----------------------------------------------------------------------

TEST(NetOptionsTest, ParseMac) {
  auto m = ParseMac("52:54:00:AB:cd:0f");
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(*m, (MacAddress{0x52, 0x54, 0x00, 0xab, 0xcd, 0x0f}));
  EXPECT_EQ(FormatMac(*m), "52:54:00:ab:cd:0f");
  EXPECT_TRUE(ParseMac("02-00-00-00-00-01").ok());
  for (const char* bad : {"", "52:54:00:12:34", "52:54:00:12:34:56:78", "52:54:00:12:34:5g",
                          "52:54:00:12:34:567", "52:54:00:12:34:5", "01:00:5e:00:00:01",
                          "ff:ff:ff:ff:ff:ff", "00:00:00:00:00:00", "52:54:00-12:34:56"}) {
    auto r = ParseMac(bad);
    EXPECT_FALSE(r.ok()) << bad;
    EXPECT_NE(r.status().message().find(std::string("'") + bad + "'"), std::string::npos)
        << r.status();
  }
  MacAddress d = DefaultMac("tap0");
  EXPECT_EQ(d[0] & 3, 2) << "locally administered unicast";
  EXPECT_EQ(d, DefaultMac("tap0"));
  EXPECT_NE(d, DefaultMac("tap1"));
}

TEST(NetOptionsTest, TapNameTooLongIsAClearError) {
  auto t = Tap::Open("averyveryverylongtapname");
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(t.status().message().find("averyveryverylongtapname"), std::string::npos);
  EXPECT_NE(t.status().message().find("too long"), std::string::npos);
  auto d = VirtioNet::Create(NetOptions{"averyveryverylongtapname", std::nullopt}, nullptr,
                             nullptr);
  EXPECT_FALSE(d.ok());
}

TEST(NetTest, FeaturesAndConfig) {
  Rig r(0, nullptr, /*activate=*/false);
  uint64_t f = r.dev->device_features();
  for (int b : {0, 1, 5, 7, 8, 9, 11, 12, 13, 15, 16, kFeatureIndirectDesc, kFeatureEventIdx,
                kFeatureVersion1})
    EXPECT_TRUE(f & F(b)) << "bit " << b;
  for (int b : {10, 14, 17, 22}) EXPECT_FALSE(f & F(b)) << "bit " << b;  // UFO, CTRL_VQ, MQ
  EXPECT_EQ(r.dev->device_type(), 1);
  EXPECT_EQ(r.dev->queue_max_sizes(), (std::vector<uint32_t>{256, 256}));
  ASSERT_EQ(r.dev->config_size(), 10u);
  uint8_t cfg[10];
  r.dev->ReadConfig(0, cfg);
  EXPECT_EQ(0, std::memcmp(cfg, kMac.data(), 6));
  EXPECT_EQ(cfg[6] | cfg[7] << 8, 1);  // VIRTIO_NET_S_LINK_UP
  EXPECT_EQ(cfg[8] | cfg[9] << 8, 1);  // max_virtqueue_pairs
  uint8_t tail[4];
  r.dev->ReadConfig(8, tail);  // partly past the end: zeros
  EXPECT_EQ(tail[0], 1);
  EXPECT_EQ(tail[2], 0);
  int changes = 0;
  r.dev->set_config_changed_callback([&] { ++changes; });
  r.dev->SetLinkUp(false);
  r.dev->ReadConfig(6, std::span<uint8_t>(cfg, 2));
  EXPECT_EQ(cfg[0], 0);
  EXPECT_EQ(changes, 1);
}

TEST(NetTest, OffloadFollowsNegotiatedGuestFeatures) {
  Rig a(kGuestCsum | kGuestTso4 | kGuestTso6 | kGuestEcn);
  EXPECT_EQ(a.backend->offload(), unsigned{TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN});
  Rig b(kGuestTso4);  // TSO without GUEST_CSUM: nothing (the tap would refuse it)
  EXPECT_EQ(b.backend->offload(), 0u);
  Rig c(kGuestCsum);
  EXPECT_EQ(c.backend->offload(), unsigned{TUN_F_CSUM});
}

TEST(NetTest, ActivateNeedsVersion1AndTwoQueues) {
  Rig r(0, nullptr, /*activate=*/false);
  r.rxq = std::make_unique<Virtqueue>(r.mem.get(), 0, 256);
  Virtqueue* one[1] = {r.rxq.get()};
  EXPECT_FALSE(r.dev->Activate(kVersion1, one, nullptr).ok());
  r.features = 0;  // legacy
  r.txq = std::make_unique<Virtqueue>(r.mem.get(), 1, 256);
  Virtqueue* two[2] = {r.rxq.get(), r.txq.get()};
  EXPECT_FALSE(r.dev->Activate(0, two, nullptr).ok());
}

// --- TX --------------------------------------------------------------------------------------

TEST(NetTest, TxWritesHeaderAndFrameAsOnePacket) {
  Rig r(0);
  std::vector<uint8_t> p1 = Packet(1000, 1), p2 = Packet(60, 2);
  r.tx->AddChain(r.TxSegs(p1, {kHdr, 400}));  // header alone, frame in two pieces
  r.tx->AddChain(r.TxSegs(p2, {}));           // header and frame together
  r.dev->ProcessQueue(1);
  EXPECT_EQ(r.Recv(), p1);
  EXPECT_EQ(r.Recv(), p2);
  EXPECT_TRUE(r.Recv().empty());
  for (int i = 0; i < 2; ++i) {
    auto u = r.tx->GetUsed();
    ASSERT_TRUE(u.has_value());
    EXPECT_EQ(u->len, 0u);
  }
  EXPECT_GE(r.SignalCount(1), 1u);
  NetStats s = r.dev->stats();
  EXPECT_EQ(s.tx_packets, 2u);
  EXPECT_EQ(s.tx_bytes, 1060u);
  EXPECT_EQ(s.tx_errors, 0u);
}

TEST(NetTest, TxIndirectChainAndLargeFrame) {
  Rig r(F(kFeatureIndirectDesc));
  std::vector<uint8_t> p = Packet(VirtioNet::kMaxFrameBytes, 9);  // the largest accepted
  r.tx->AddIndirectChain(r.TxSegs(p, {kHdr, 30000}), r.Alloc(4096));
  r.dev->ProcessQueue(1);
  EXPECT_EQ(r.Recv(), p);
  EXPECT_EQ(r.dev->stats().tx_packets, 1u);
}

TEST(NetTest, TxHostileChainsAreDroppedNotFatal) {
  Rig r(0);
  std::vector<uint8_t> small = Packet(0, 3);
  small.resize(5);
  r.tx->AddChain(r.TxSegs(small, {}));                          // shorter than the header
  r.tx->AddChain(r.TxSegs(Packet(0, 4), {}));                   // header, no frame
  r.tx->AddChain({{r.Alloc(2000), 2000, true}});                // device-writable only
  r.tx->AddChain(r.TxSegs(Packet(VirtioNet::kMaxFrameBytes + 1, 5), {kHdr}));  // oversize
  std::vector<uint8_t> good = Packet(100, 6);
  r.tx->AddChain(r.TxSegs(good, {}));
  r.dev->ProcessQueue(1);
  EXPECT_EQ(r.Recv(), good);  // the only packet that went out
  EXPECT_TRUE(r.Recv().empty());
  int used = 0;
  while (auto u = r.tx->GetUsed()) {
    EXPECT_EQ(u->len, 0u);
    ++used;
  }
  EXPECT_EQ(used, 5);
  NetStats s = r.dev->stats();
  EXPECT_EQ(s.tx_errors, 4u);
  EXPECT_EQ(s.tx_packets, 1u);
  EXPECT_FALSE(r.txq->in_error());
}

TEST(NetTest, TxBackendErrorIsCounted) {
  Rig r(0);
  close(r.peer);  // writes now fail (EPIPE/ECONNRESET)
  r.peer = -1;
  r.tx->AddChain(r.TxSegs(Packet(100, 1), {}));
  r.dev->ProcessQueue(1);
  ASSERT_TRUE(r.tx->GetUsed().has_value());
  EXPECT_EQ(r.dev->stats().tx_errors + r.dev->stats().tx_dropped, 1u);
  EXPECT_EQ(r.dev->stats().tx_packets, 0u);
}

// --- RX --------------------------------------------------------------------------------------

TEST(NetTest, RxWithoutMergeableBuffersOneChainPerPacket) {
  Rig r(0);
  uint64_t b1 = r.PostRx(1526), b2 = r.PostRx(1526);
  std::vector<uint8_t> p1 = Packet(1000, 7), p2 = Packet(1514, 8);
  r.Send(p1);
  r.Send(p2);
  r.dev->PollRx();
  auto u1 = r.rx->GetUsed(), u2 = r.rx->GetUsed();
  ASSERT_TRUE(u1 && u2);
  EXPECT_EQ(u1->len, p1.size());
  EXPECT_EQ(u2->len, p2.size());
  // num_buffers is the device's: 1 without MRG_RXBUF, whatever the backend had there.
  p1[10] = 1, p1[11] = 0, p2[10] = 1, p2[11] = 0;
  EXPECT_EQ(r.Peek(b1, p1.size()), p1);
  EXPECT_EQ(r.Peek(b2, p2.size()), p2);
  EXPECT_TRUE(r.mem->TestDirty(b1));
  EXPECT_TRUE(r.mem->TestDirty(b2 + 1500));
  EXPECT_GE(r.SignalCount(0), 1u);
  NetStats s = r.dev->stats();
  EXPECT_EQ(s.rx_packets, 2u);
  EXPECT_EQ(s.rx_bytes, 2514u);
}

TEST(NetTest, RxWithoutMergeableBuffersTooSmallChainDropsPacket) {
  Rig r(0);
  r.PostRx(100);
  uint64_t big = r.PostRx(1526);
  std::vector<uint8_t> p1 = Packet(1000, 1), p2 = Packet(50, 2);
  r.Send(p1);
  r.Send(p2);
  r.dev->PollRx();
  auto u1 = r.rx->GetUsed(), u2 = r.rx->GetUsed();
  ASSERT_TRUE(u1 && u2);
  EXPECT_EQ(u1->len, 0u);  // returned empty
  EXPECT_EQ(u2->len, p2.size());
  p2[10] = 1, p2[11] = 0;
  EXPECT_EQ(r.Peek(big, p2.size()), p2);
  EXPECT_EQ(r.dev->stats().rx_dropped, 1u);
  EXPECT_EQ(r.dev->stats().rx_packets, 1u);
}

TEST(NetTest, RxMergeableBuffersPacketSpansChains) {
  Rig r(kMrg);
  for (int i = 0; i < 6; ++i) r.PostRx(512);
  std::vector<uint8_t> p1 = Packet(1500, 3), p2 = Packet(100, 4);
  r.Send(p1);
  r.Send(p2);
  r.dev->PollRx();
  // p1 = 1512 bytes: 512 + 512 + 488 in three chains, num_buffers = 3 in the first header.
  std::vector<uint8_t> got;
  std::vector<uint32_t> lens;
  for (int i = 0; i < 3; ++i) {
    auto u = r.rx->GetUsed();
    ASSERT_TRUE(u.has_value());
    lens.push_back(u->len);
    auto part = r.Peek(RxBufOf(r, u->id), u->len);
    got.insert(got.end(), part.begin(), part.end());
  }
  EXPECT_EQ(lens, (std::vector<uint32_t>{512, 512, 488}));
  p1[10] = 3, p1[11] = 0;
  EXPECT_EQ(got, p1);
  auto u = r.rx->GetUsed();
  ASSERT_TRUE(u.has_value());
  EXPECT_EQ(u->len, p2.size());
  p2[10] = 1, p2[11] = 0;
  EXPECT_EQ(r.Peek(RxBufOf(r, u->id), p2.size()), p2);
  EXPECT_FALSE(r.rx->GetUsed().has_value());
  EXPECT_EQ(r.dev->stats().rx_packets, 2u);
}

TEST(NetTest, RxStallsWithoutBuffersAndResumesWithoutLoss) {
  Rig r(kMrg);
  std::vector<std::vector<uint8_t>> sent;
  for (int i = 0; i < 4; ++i) {
    sent.push_back(Packet(1200, static_cast<uint8_t>(10 + i)));
    r.Send(sent.back());
  }
  r.dev->PollRx();
  EXPECT_TRUE(r.dev->rx_stalled());
  EXPECT_EQ(r.rx->UsedIdx(), 0);
  // One 1024-byte buffer: the first packet (1212 bytes) is half placed and waits for more.
  r.PostRx(1024);
  r.dev->ProcessQueue(0);
  EXPECT_TRUE(r.dev->rx_stalled());
  EXPECT_EQ(r.rx->UsedIdx(), 0) << "a partial packet must not be published";
  for (int i = 0; i < 7; ++i) r.PostRx(1024);
  r.dev->ProcessQueue(0);  // completes packet 0
  EXPECT_FALSE(r.dev->rx_stalled());
  r.dev->PollRx();  // reads the rest from the backend: 3 more packets, 2 buffers each
  // Reassemble as a driver does: the first chain's num_buffers says how many follow.
  std::vector<std::vector<uint8_t>> got;
  int left = 0;
  while (auto u = r.rx->GetUsed()) {
    auto part = r.Peek(RxBufOf(r, u->id), u->len);
    if (left == 0) {
      ASSERT_GE(part.size(), kHdr);
      left = part[10] | part[11] << 8;
      got.emplace_back();
    }
    --left;
    got.back().insert(got.back().end(), part.begin(), part.end());
  }
  EXPECT_EQ(left, 0);
  ASSERT_EQ(got.size(), 4u);
  for (int i = 0; i < 4; ++i) {
    sent[i][10] = 2, sent[i][11] = 0;
    EXPECT_EQ(got[i], sent[i]) << "packet " << i;
  }
  NetStats s = r.dev->stats();
  EXPECT_EQ(s.rx_packets, 4u);
  EXPECT_EQ(s.rx_dropped + s.rx_errors, 0u);
}

TEST(NetTest, RxHostileChainsDoNotHangOrCrash) {
  Rig r(kMrg);
  // A chain with only a device-readable buffer is returned empty; the packet goes on to the
  // next chain.
  r.rx->AddChain({{r.Alloc(64), 64, false}});
  r.PostRx(1024);
  std::vector<uint8_t> p = Packet(300, 2);
  r.Send(p);
  r.dev->PollRx();
  auto u = r.rx->GetUsed();
  ASSERT_TRUE(u.has_value());
  EXPECT_EQ(u->len, 0u);
  u = r.rx->GetUsed();
  ASSERT_TRUE(u.has_value());
  p[10] = 1, p[11] = 0;
  EXPECT_EQ(r.Peek(RxBufOf(r, u->id), u->len), p);
  EXPECT_EQ(r.dev->stats().rx_errors, 1u);
  // The whole ring in 1-byte buffers can never hold a packet: dropped, all returned empty
  // (waiting for more buffers would hang forever: the driver has none left).
  for (uint32_t i = 0; i < kQ; ++i) r.PostRx(1);
  r.Send(Packet(200, 1));
  r.dev->PollRx();
  int used = 0;
  while (auto e = r.rx->GetUsed()) {
    EXPECT_EQ(e->len, 0u);
    ++used;
  }
  EXPECT_EQ(used, static_cast<int>(kQ));
  EXPECT_EQ(r.dev->stats().rx_errors, 2u);
  EXPECT_FALSE(r.rxq->in_error());
  EXPECT_FALSE(r.dev->rx_stalled());
  // Normal traffic goes on.
  r.PostRx(2048);
  std::vector<uint8_t> p3 = Packet(500, 3);
  r.Send(p3);
  r.dev->PollRx();
  u = r.rx->GetUsed();
  ASSERT_TRUE(u.has_value());
  p3[10] = 1, p3[11] = 0;
  EXPECT_EQ(r.Peek(RxBufOf(r, u->id), u->len), p3);
}

TEST(NetTest, RxBadBackendPacketsAreCountedAndSkipped) {
  Rig r(0);
  r.PostRx(1526);
  std::vector<uint8_t> runt(kHdr + 3, 0);
  r.Send(runt);
  std::vector<uint8_t> p = Packet(64, 1);
  r.Send(p);
  r.dev->PollRx();
  auto u = r.rx->GetUsed();
  ASSERT_TRUE(u.has_value());
  EXPECT_EQ(u->len, p.size());
  EXPECT_EQ(r.dev->stats().rx_errors, 1u);
}

// The stall/resume path through a real EventLoop: the backend fd stops being watched while the
// guest has no buffers (else the level-triggered loop would spin) and is watched again after
// the guest's notification.
TEST(NetTest, RxStallAndResumeThroughEventLoop) {
  auto loop = EventLoop::Create("net-test");
  ASSERT_TRUE(loop.ok()) << loop.status();
  Rig r(0, loop->get());
  std::vector<std::vector<uint8_t>> sent;
  for (int i = 0; i < 5; ++i) {
    sent.push_back(Packet(500, static_cast<uint8_t>(i)));
    r.Send(sent.back());
  }
  auto wait = [](const std::function<bool()>& cond) {
    for (int i = 0; i < 1000 && !cond(); ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    return cond();
  };
  r.PostRx(1526);
  r.PostRx(1526);
  r.dev->ProcessQueue(0);
  ASSERT_TRUE(wait([&] { return r.rx->UsedIdx() == 2 && r.dev->rx_stalled(); }));
  for (int i = 0; i < 3; ++i) r.PostRx(1526);
  r.dev->ProcessQueue(0);
  ASSERT_TRUE(wait([&] { return r.rx->UsedIdx() == 5; }));
  for (int i = 0; i < 5; ++i) {
    auto u = r.rx->GetUsed();
    ASSERT_TRUE(u.has_value());
    sent[i][10] = 1, sent[i][11] = 0;
    EXPECT_EQ(r.Peek(RxBufOf(r, u->id), u->len), sent[i]);
  }
  EXPECT_EQ(r.dev->stats().rx_dropped, 0u);
  // tx from the vCPU side works alongside.
  std::vector<uint8_t> t = Packet(80, 42);
  r.tx->AddChain(r.TxSegs(t, {}));
  r.dev->ProcessQueue(1);
  EXPECT_EQ(r.Recv(), t);
}

// A scripted backend: no fd (the owner polls), programmable failures.
class FakeBackend : public NetBackend {
 public:
  std::string name() const override { return "fake"; }
  int fd() const override { return -1; }
  absl::StatusOr<size_t> ReadPacket(std::span<const iovec> iov) override {
    if (read_error) return absl::InternalError("fake read error");
    if (rx.empty()) return 0;
    std::vector<uint8_t> p = rx.front();
    rx.erase(rx.begin());
    size_t n = std::min(p.size(), iov[0].iov_len);
    std::memcpy(iov[0].iov_base, p.data(), n);
    return p.size();  // like a tap: the full length even when truncated
  }
  absl::Status WritePacket(std::span<const iovec> iov) override {
    if (full) return absl::ResourceExhaustedError("fake full");
    std::vector<uint8_t> p;
    for (const iovec& v : iov)
      p.insert(p.end(), static_cast<uint8_t*>(v.iov_base),
               static_cast<uint8_t*>(v.iov_base) + v.iov_len);
    tx.push_back(p);
    return absl::OkStatus();
  }
  absl::Status SetOffload(uint32_t f) override {
    offload = f;
    return offload_error ? absl::InternalError("fake offload") : absl::OkStatus();
  }
  std::vector<std::vector<uint8_t>> rx, tx;
  bool full = false, read_error = false, offload_error = false;
  uint32_t offload = 0;
};

TEST(NetTest, FakeBackendFullReadErrorOversizeAndOffloadFailure) {
  auto mem = GuestMemory::Create(8 * kMiB);
  ASSERT_TRUE(mem.ok());
  auto fake_owned = std::make_unique<FakeBackend>();
  FakeBackend* fake = fake_owned.get();
  auto loop = EventLoop::Create("net-fake");
  ASSERT_TRUE(loop.ok());
  // A backend without an fd is fine even with a loop: the owner polls.
  auto dev = VirtioNet::Create(std::move(fake_owned), kMac, mem->get(), loop->get());
  ASSERT_TRUE(dev.ok()) << dev.status();
  Virtqueue rxq(mem->get(), 0, 256), txq(mem->get(), 1, 256);
  TestDriver rx(mem->get(), kQ, kRxRing), tx(mem->get(), kQ, kTxRing);
  const uint64_t features = kVersion1 | kGuestCsum;
  ASSERT_TRUE(rx.Configure(rxq, features).ok());
  ASSERT_TRUE(tx.Configure(txq, features).ok());
  Virtqueue* qs[2] = {&rxq, &txq};
  fake->offload_error = true;
  EXPECT_FALSE((*dev)->Activate(features, qs, nullptr).ok()) << "offload failure must show";
  fake->offload_error = false;
  ASSERT_TRUE((*dev)->Activate(features, qs, nullptr).ok());
  EXPECT_EQ(fake->offload, unsigned{TUN_F_CSUM});

  std::vector<uint8_t> p = Packet(100, 1);
  ASSERT_TRUE((*mem)->Write(kData, p.data(), p.size()).ok());
  fake->full = true;
  tx.AddChain({{kData, static_cast<uint32_t>(p.size()), false}});
  (*dev)->ProcessQueue(1);
  EXPECT_EQ((*dev)->stats().tx_dropped, 1u);
  fake->full = false;
  tx.AddChain({{kData, static_cast<uint32_t>(p.size()), false}});
  (*dev)->ProcessQueue(1);
  ASSERT_EQ(fake->tx.size(), 1u);
  EXPECT_EQ(fake->tx[0], p);

  rx.AddChain({{kData + 0x10000, 65562 + 12, true}});
  fake->rx.push_back(Packet(VirtioNet::kMaxFrameBytes + 100, 1));  // longer than anything
  fake->read_error = true;
  (*dev)->PollRx();
  EXPECT_EQ((*dev)->stats().rx_errors, 1u);
  fake->read_error = false;
  std::vector<uint8_t> ok = Packet(VirtioNet::kMaxFrameBytes, 2);  // the largest accepted
  fake->rx.push_back(ok);
  (*dev)->PollRx();
  EXPECT_EQ((*dev)->stats().rx_errors, 2u);  // + the oversize one
  auto u = rx.GetUsed();
  ASSERT_TRUE(u.has_value());
  EXPECT_EQ(u->len, ok.size());
  ok[10] = 1, ok[11] = 0;
  std::vector<uint8_t> got(ok.size());
  ASSERT_TRUE((*mem)->Read(kData + 0x10000, got.data(), got.size()).ok());
  EXPECT_EQ(got, ok);
}

// --- Quiesce, save/restore -----------------------------------------------------------------

TEST(NetTest, QuiesceStopsReadingTheBackend) {
  Rig r(0);
  r.PostRx(1526);
  r.dev->Quiesce();
  std::vector<uint8_t> p = Packet(100, 1);
  r.Send(p);
  auto before = r.rx->UsedRingBytesNow();
  r.dev->PollRx();
  EXPECT_EQ(r.rx->UsedRingBytesNow(), before);
  r.dev->Resume();
  r.dev->PollRx();
  auto u = r.rx->GetUsed();
  ASSERT_TRUE(u.has_value());
  EXPECT_EQ(u->len, p.size());
}

TEST(NetTest, SaveRestoreContinuesPartialPacketAndTraffic) {
  Rig r(kMrg);
  std::vector<uint8_t> p1 = Packet(2000, 5), p2 = Packet(300, 6);
  r.Send(p1);
  r.Send(p2);
  r.PostRx(1024);  // p1 (2012 bytes) needs two
  r.dev->PollRx();
  EXPECT_TRUE(r.dev->rx_stalled());
  std::vector<uint8_t> t1 = Packet(70, 7);
  r.tx->AddChain(r.TxSegs(t1, {}));
  r.dev->ProcessQueue(1);
  EXPECT_EQ(r.Recv(), t1);
  r.dev->Quiesce();
  std::string dev_state = r.dev->SaveState();
  VirtqueueState rxs = r.rxq->SaveState(), txs = r.txq->SaveState();
  ASSERT_EQ(r.rxq->InFlightHeads().size(), 1u);

  // "Destination": same guest memory, a new backend (p2 is still in the old one: lost with the
  // old host, as a real migration loses packets queued in the source's tap).
  r.NewDevice(nullptr);
  r.rxq = std::make_unique<Virtqueue>(r.mem.get(), 0, VirtioNet::kQueueSize);
  r.txq = std::make_unique<Virtqueue>(r.mem.get(), 1, VirtioNet::kQueueSize);
  ASSERT_TRUE(r.rxq->RestoreState(rxs).ok());
  ASSERT_TRUE(r.txq->RestoreState(txs).ok());
  ASSERT_TRUE(r.dev->RestoreState(dev_state).ok());
  ASSERT_TRUE(r.ActivateDevice().ok());
  EXPECT_EQ(r.dev->mac(), kMac);
  EXPECT_EQ(r.dev->stats().tx_packets, 1u);
  r.dev->PollRx();
  EXPECT_EQ(r.rx->UsedIdx(), 0);  // still waiting for a second buffer
  r.PostRx(1024);
  r.dev->ProcessQueue(0);
  std::vector<uint8_t> got;
  for (int i = 0; i < 2; ++i) {
    auto u = r.rx->GetUsed();
    ASSERT_TRUE(u.has_value());
    auto part = r.Peek(RxBufOf(r, u->id), u->len);
    got.insert(got.end(), part.begin(), part.end());
  }
  p1[10] = 2, p1[11] = 0;
  EXPECT_EQ(got, p1);
  // Both directions continue on the new backend.
  r.PostRx(1024);
  std::vector<uint8_t> p3 = Packet(400, 8);
  r.Send(p3);
  r.dev->PollRx();
  auto u = r.rx->GetUsed();
  ASSERT_TRUE(u.has_value());
  p3[10] = 1, p3[11] = 0;
  EXPECT_EQ(r.Peek(RxBufOf(r, u->id), u->len), p3);
  std::vector<uint8_t> t2 = Packet(90, 9);
  r.tx->AddChain(r.TxSegs(t2, {}));
  r.dev->ProcessQueue(1);
  EXPECT_EQ(r.Recv(), t2);
  NetStats s = r.dev->stats();
  EXPECT_EQ(s.rx_packets, 2u);
  EXPECT_EQ(s.tx_packets, 2u);
}

// A tx chain in flight at save time (popped, not completed: another implementation on the
// source, or a crash between pop and write) is transmitted after restore, and the interrupt
// owed for it is raised from the loop thread (Activate() itself must not signal).
TEST(NetTest, RestoreRetransmitsInFlightTxAndSignalsFromLoop) {
  auto loop = EventLoop::Create("net-restore");
  ASSERT_TRUE(loop.ok());
  Rig r(0);
  std::vector<uint8_t> t = Packet(120, 3);
  r.tx->AddChain(r.TxSegs(t, {}));
  auto popped = r.txq->PopChain();  // in flight, never written
  ASSERT_TRUE(popped.ok() && popped->has_value());
  std::string st = r.dev->SaveState();
  VirtqueueState rxs = r.rxq->SaveState(), txs = r.txq->SaveState();
  r.NewDevice(loop->get());
  r.rxq = std::make_unique<Virtqueue>(r.mem.get(), 0, VirtioNet::kQueueSize);
  r.txq = std::make_unique<Virtqueue>(r.mem.get(), 1, VirtioNet::kQueueSize);
  ASSERT_TRUE(r.rxq->RestoreState(rxs).ok());
  ASSERT_TRUE(r.txq->RestoreState(txs).ok());
  ASSERT_TRUE(r.dev->RestoreState(st).ok());
  size_t before = r.SignalCount(1);
  ASSERT_TRUE(r.ActivateDevice().ok());
  EXPECT_EQ(r.Recv(), t);
  auto u = r.tx->GetUsed();
  ASSERT_TRUE(u.has_value());
  EXPECT_EQ(u->len, 0u);
  for (int i = 0; i < 500 && r.SignalCount(1) == before; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  EXPECT_GT(r.SignalCount(1), before);
  r.dev.reset();  // before the loop
}

TEST(NetTest, RestoreRejectsBadState) {
  Rig r(0, nullptr, /*activate=*/false);
  EXPECT_FALSE(r.dev->RestoreState("\xff\xff\xff garbage").ok());
  // A MAC of the wrong length, held buffers without a packet, a runt packet.
  auto mutate = [&](const std::function<void(std::string&)>& f) {
    Rig good(0);
    std::string s = good.dev->SaveState();
    f(s);
    return r.dev->RestoreState(s);
  };
  EXPECT_TRUE(mutate([](std::string&) {}).ok());
  // Field 1 (mac) is serialized first: tag 0x0a, length 6. Shorten it to 5.
  EXPECT_FALSE(mutate([](std::string& s) {
                 ASSERT_EQ(s.substr(0, 2), std::string("\x0a\x06", 2));
                 s = std::string("\x0a\x05", 2) + s.substr(2, 5) + s.substr(8);
               }).ok());
  EXPECT_FALSE(mutate([](std::string& s) { s += std::string("\x60\x03", 2); }).ok());  // held 3
  EXPECT_FALSE(mutate([](std::string& s) { s += std::string("\x5a\x02xy", 4); }).ok());  // runt
}

TEST(NetTest, ActivateAfterRestoreChecksHeldBuffersAgainstQueue) {
  Rig src(kMrg);
  src.Send(Packet(2000, 1));
  src.PostRx(1024);
  src.dev->PollRx();
  std::string st = src.dev->SaveState();
  // The destination's rx queue has nothing in flight: the state does not fit.
  Rig dst(kMrg, nullptr, /*activate=*/false);
  ASSERT_TRUE(dst.dev->RestoreState(st).ok());
  dst.rxq = std::make_unique<Virtqueue>(dst.mem.get(), 0, 256);
  dst.txq = std::make_unique<Virtqueue>(dst.mem.get(), 1, 256);
  dst.rx = std::make_unique<TestDriver>(dst.mem.get(), kQ, kRxRing);
  dst.tx = std::make_unique<TestDriver>(dst.mem.get(), kQ, kTxRing);
  ASSERT_TRUE(dst.rx->Configure(*dst.rxq, dst.features).ok());
  ASSERT_TRUE(dst.tx->Configure(*dst.txq, dst.features).ok());
  absl::Status s = dst.ActivateDevice();
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("in flight"), std::string::npos) << s;
}

TEST(NetTest, ResetDropsPendingAndStopsEverything) {
  Rig r(kMrg);
  r.Send(Packet(2000, 1));
  r.PostRx(1024);
  r.dev->PollRx();
  r.dev->Reset();
  EXPECT_EQ(r.dev->stats().rx_dropped, 1u);
  r.dev->PollRx();
  r.dev->ProcessQueue(0);
  r.dev->ProcessQueue(1);
  EXPECT_EQ(r.rx->UsedIdx(), 0);
  std::string st = r.dev->SaveState();
  Rig other(0, nullptr, false);
  EXPECT_TRUE(other.dev->RestoreState(st).ok());
}

}  // namespace
}  // namespace microvmm::virtio
