// virtio-net behind the real virtio-pci transport, driven through BAR 0 like Linux's
// virtio_pci_modern + virtio_net: config space (MAC, link status), feature negotiation, tx
// through a queue notify, rx into mergeable buffers, then pause -> transport SaveState ->
// serialize -> restore into a new transport + device on a new backend -> traffic continues,
// including the packet that was half delivered at save time. No KVM, no root.
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <memory>
#include <vector>

#include "devices/virtio/net/net.h"
#include "devices/virtio/net/tap.h"
#include "devices/virtio/pci_transport.h"
#include "gtest/gtest.h"
#include "tests/virtio/virtq_driver.h"
#include "vmm/memory/guest_memory.h"

namespace microvmm::virtio {
namespace {

using testing::TestDriver;

constexpr uint64_t F(int b) { return uint64_t{1} << b; }
constexpr uint64_t kFeatures = F(kFeatureVersion1) | F(kFeatureEventIdx) | F(15) /*MRG*/ |
                               F(5) /*MAC*/ | F(16) /*STATUS*/;
constexpr MacAddress kMac = {0x52, 0x54, 0x00, 0x0a, 0x0b, 0x0c};
constexpr uint32_t kQ = 32;

class RecordingInterrupt : public VirtioInterrupt {
 public:
  explicit RecordingInterrupt(std::vector<uint16_t>* log) : log_(log) {}
  void Signal(uint16_t vector) override { log_->push_back(vector); }

 private:
  std::vector<uint16_t>* log_;
};

// One side of the test: a backend socketpair, the device and its transport.
struct Side {
  int peer = -1;
  std::unique_ptr<VirtioNet> net;
  std::unique_ptr<VirtioPciDevice> pci;
  std::vector<uint16_t> irqs;

  explicit Side(GuestMemory* mem) {
    int sv[2];
    EXPECT_EQ(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv), 0);
    peer = sv[1];
    auto n = VirtioNet::Create(std::make_unique<FdNetBackend>(ScopedFd(sv[0]), "sp"), kMac, mem,
                               nullptr);
    EXPECT_TRUE(n.ok()) << n.status();
    net = std::move(*n);
    auto p = VirtioPciDevice::Create(mem, net.get(), nullptr,
                                     std::make_unique<RecordingInterrupt>(&irqs));
    EXPECT_TRUE(p.ok()) << p.status();
    pci = std::move(*p);
  }
  ~Side() {
    pci.reset();
    net.reset();
    close(peer);
  }
  uint64_t Rd(uint64_t off, unsigned n) {
    uint8_t b[8] = {};
    pci->ReadBar(0, off, std::span<uint8_t>(b, n));
    uint64_t v = 0;
    std::memcpy(&v, b, n);
    return v;
  }
  void Wr(uint64_t off, unsigned n, uint64_t v) {
    uint8_t b[8];
    std::memcpy(b, &v, 8);
    pci->WriteBar(0, off, std::span<const uint8_t>(b, n));
  }
  void Wr64(uint64_t off, uint64_t v) {
    Wr(off, 4, v & 0xffffffff);
    Wr(off + 4, 4, v >> 32);
  }
  void Notify(uint16_t q) { Wr(VirtioPciDevice::NotifyBarOffset(q), 2, q); }
  MacAddress ConfigMac() {
    MacAddress m;
    for (int i = 0; i < 6; ++i) m[i] = static_cast<uint8_t>(Rd(kBarDeviceCfgOffset + i, 1));
    return m;
  }
};

std::vector<uint8_t> Packet(size_t frame, uint8_t seed) {
  std::vector<uint8_t> p(12 + frame, 0);
  for (size_t i = 0; i < frame; ++i) p[12 + i] = static_cast<uint8_t>(seed + i * 11);
  return p;
}

TEST(NetPciTest, NegotiateTrafficSaveRestoreContinue) {
  auto m = GuestMemory::Create(8 << 20);
  ASSERT_TRUE(m.ok());
  GuestMemory* mem = m->get();
  TestDriver rx(mem, kQ, 0x10000), tx(mem, kQ, 0x20000);
  uint64_t next = 0x100000;
  auto post_rx = [&](uint32_t len) {
    rx.AddChain({{next, len, true}});
    next += 0x1000;
  };
  auto send_tx = [&](Side& s, const std::vector<uint8_t>& p) {
    ASSERT_TRUE(mem->Write(next, p.data(), p.size()).ok());
    tx.AddChain({{next, static_cast<uint32_t>(p.size()), false}});
    next += 0x1000;
    s.Notify(1);
  };
  auto recv_peer = [](Side& s) {
    std::vector<uint8_t> b(4096);
    ssize_t n = recv(s.peer, b.data(), b.size(), MSG_DONTWAIT);
    b.resize(n < 0 ? 0 : static_cast<size_t>(n));
    return b;
  };
  auto rx_bytes = [&](uint32_t id, uint32_t len) {
    uint64_t gpa = 0;
    EXPECT_TRUE(mem->Read(rx.desc_addr + 16ULL * id, &gpa, 8).ok());
    std::vector<uint8_t> v(len);
    EXPECT_TRUE(mem->Read(gpa, v.data(), len).ok());
    return v;
  };

  auto src = std::make_unique<Side>(mem);
  EXPECT_EQ(src->ConfigMac(), kMac);
  EXPECT_EQ(src->Rd(kBarDeviceCfgOffset + 6, 2), 1u);  // VIRTIO_NET_S_LINK_UP
  // Linux probe: reset, ACK, DRIVER, features, FEATURES_OK, queues, DRIVER_OK.
  src->Wr(kCommonDeviceStatus, 1, 0);
  src->Wr(kCommonDeviceStatus, 1, kStatusAcknowledge | kStatusDriver);
  src->Wr(kCommonDriverFeatureSelect, 4, 0);
  src->Wr(kCommonDriverFeature, 4, kFeatures & 0xffffffff);
  src->Wr(kCommonDriverFeatureSelect, 4, 1);
  src->Wr(kCommonDriverFeature, 4, kFeatures >> 32);
  src->Wr(kCommonDeviceStatus, 1, kStatusAcknowledge | kStatusDriver | kStatusFeaturesOk);
  ASSERT_TRUE(src->Rd(kCommonDeviceStatus, 1) & kStatusFeaturesOk);
  EXPECT_EQ(src->Rd(kCommonNumQueues, 2), 2u);
  int qi = 0;
  for (TestDriver* r : {&rx, &tx}) {
    src->Wr(kCommonQueueSelect, 2, qi);
    EXPECT_EQ(src->Rd(kCommonQueueSize, 2), 256u);
    src->Wr(kCommonQueueSize, 2, kQ);
    src->Wr(kCommonQueueMsixVector, 2, qi + 1);
    src->Wr64(kCommonQueueDesc, r->desc_addr);
    src->Wr64(kCommonQueueDriver, r->avail_addr);
    src->Wr64(kCommonQueueDevice, r->used_addr);
    src->Wr(kCommonQueueEnable, 2, 1);
    ++qi;
  }
  src->Wr(kCommonDeviceStatus, 1,
          kStatusAcknowledge | kStatusDriver | kStatusFeaturesOk | kStatusDriverOk);
  ASSERT_EQ(src->Rd(kCommonDeviceStatus, 1) & kStatusDeviceNeedsReset, 0u);

  // Traffic.
  std::vector<uint8_t> t1 = Packet(200, 1);
  send_tx(*src, t1);
  EXPECT_EQ(recv_peer(*src), t1);
  ASSERT_TRUE(tx.GetUsed().has_value());
  post_rx(1024);
  std::vector<uint8_t> r1 = Packet(2000, 2);  // 2012 bytes: needs two buffers, only one posted
  ASSERT_EQ(send(src->peer, r1.data(), r1.size(), 0), static_cast<ssize_t>(r1.size()));
  src->net->PollRx();
  EXPECT_FALSE(rx.GetUsed().has_value());
  EXPECT_TRUE(src->net->rx_stalled());

  // Pause and migrate.
  src->net->Quiesce();
  std::string bytes;
  ASSERT_TRUE(src->pci->SaveState().SerializeToString(&bytes));
  src.reset();
  VirtioPciState st;
  ASSERT_TRUE(st.ParseFromString(bytes));
  Side dst(mem);
  ASSERT_TRUE(dst.pci->RestoreState(st).ok());
  EXPECT_EQ(dst.Rd(kCommonDeviceStatus, 1) & kStatusDriverOk, kStatusDriverOk);
  EXPECT_EQ(dst.ConfigMac(), kMac);

  post_rx(1024);
  dst.Notify(0);
  std::vector<uint8_t> got;
  for (int i = 0; i < 2; ++i) {
    auto u = rx.GetUsed();
    ASSERT_TRUE(u.has_value()) << "chain " << i;
    auto part = rx_bytes(u->id, u->len);
    got.insert(got.end(), part.begin(), part.end());
  }
  r1[10] = 2;  // num_buffers
  EXPECT_EQ(got, r1);
  EXPECT_FALSE(dst.irqs.empty());
  std::vector<uint8_t> t2 = Packet(300, 3);
  send_tx(dst, t2);
  EXPECT_EQ(recv_peer(dst), t2);
  post_rx(2048);
  std::vector<uint8_t> r2 = Packet(64, 4);
  ASSERT_EQ(send(dst.peer, r2.data(), r2.size(), 0), static_cast<ssize_t>(r2.size()));
  dst.net->PollRx();
  auto u = rx.GetUsed();
  ASSERT_TRUE(u.has_value());
  r2[10] = 1;
  EXPECT_EQ(rx_bytes(u->id, u->len), r2);
  NetStats s = dst.net->stats();
  EXPECT_EQ(s.tx_packets, 2u);
  EXPECT_EQ(s.rx_packets, 2u);

  // Reset through the transport: the device drops its state, stops.
  dst.Wr(kCommonDeviceStatus, 1, 0);
  post_rx(2048);
  ASSERT_EQ(send(dst.peer, r2.data(), r2.size(), 0), static_cast<ssize_t>(r2.size()));
  dst.net->PollRx();
  EXPECT_FALSE(rx.GetUsed().has_value());
}

}  // namespace
}  // namespace microvmm::virtio
