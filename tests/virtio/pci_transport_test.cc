// Drives VirtioPciDevice + VirtioRng through BAR 0 the way the Linux virtio_pci_modern driver
// does. No KVM: interrupts go to a recording VirtioInterrupt.
#include "devices/virtio/pci_transport.h"

#include <algorithm>
#include <cstring>
#include <memory>
#include <set>
#include <vector>

#include "devices/virtio/rng.h"
#include "gtest/gtest.h"
#include "tests/virtio/virtq_driver.h"

namespace microvmm::virtio {
namespace {

using testing::Seg;
using testing::TestDriver;

class RecordingInterrupt : public VirtioInterrupt {
 public:
  explicit RecordingInterrupt(std::vector<uint16_t>* log) : log_(log) {}
  void Signal(uint16_t vector) override { log_->push_back(vector); }

 private:
  std::vector<uint16_t>* log_;
};

std::unique_ptr<GuestMemory> Mem() {
  auto m = GuestMemory::Create(4 << 20);
  if (!m.ok()) __builtin_trap();
  return std::move(*m);
}

struct Fixture {
  explicit Fixture(GuestMemory* mem) {
    auto d = VirtioPciDevice::Create(mem, &rng, nullptr,
                                     std::make_unique<RecordingInterrupt>(&irqs));
    EXPECT_TRUE(d.ok()) << d.status();
    dev = std::move(*d);
  }
  uint64_t Rd(uint64_t off, unsigned n) {
    uint8_t b[8] = {};
    dev->ReadBar(0, off, std::span<uint8_t>(b, n));
    uint64_t v = 0;
    std::memcpy(&v, b, n);
    return v;
  }
  void Wr(uint64_t off, unsigned n, uint64_t v) {
    uint8_t b[8];
    std::memcpy(b, &v, 8);
    dev->WriteBar(0, off, std::span<const uint8_t>(b, n));
  }
  void Wr64(uint64_t off, uint64_t v) {  // vp_iowrite64_twopart
    Wr(off, 4, v & 0xffffffff);
    Wr(off + 4, 4, v >> 32);
  }
  uint8_t Status() { return static_cast<uint8_t>(Rd(kCommonDeviceStatus, 1)); }
  void SetStatus(uint8_t s) { Wr(kCommonDeviceStatus, 1, s); }
  uint64_t DeviceFeatures() {
    Wr(kCommonDeviceFeatureSelect, 4, 0);
    uint64_t lo = Rd(kCommonDeviceFeature, 4);
    Wr(kCommonDeviceFeatureSelect, 4, 1);
    return lo | Rd(kCommonDeviceFeature, 4) << 32;
  }
  void DriverFeatures(uint64_t f) {
    Wr(kCommonDriverFeatureSelect, 4, 0);
    Wr(kCommonDriverFeature, 4, f & 0xffffffff);
    Wr(kCommonDriverFeatureSelect, 4, 1);
    Wr(kCommonDriverFeature, 4, f >> 32);
  }
  // Linux probe up to FEATURES_OK; returns whether FEATURES_OK stuck.
  bool Negotiate(uint64_t f) {
    SetStatus(0);
    SetStatus(kStatusAcknowledge);
    SetStatus(kStatusAcknowledge | kStatusDriver);
    DriverFeatures(f);
    SetStatus(kStatusAcknowledge | kStatusDriver | kStatusFeaturesOk);
    return Status() & kStatusFeaturesOk;
  }
  void SetupQueue(const TestDriver& drv, uint16_t vector) {
    Wr(kCommonQueueSelect, 2, 0);
    ASSERT_EQ(Rd(kCommonQueueSize, 2), VirtioRng::kQueueSize);
    Wr(kCommonQueueSize, 2, drv.size());
    Wr(kCommonQueueMsixVector, 2, vector);
    Wr64(kCommonQueueDesc, drv.desc_addr);
    Wr64(kCommonQueueDriver, drv.avail_addr);
    Wr64(kCommonQueueDevice, drv.used_addr);
    Wr(kCommonQueueEnable, 2, 1);
  }
  void Notify(uint16_t q) {
    Wr(kBarNotifyOffset + Rd(kCommonQueueNotifyOff, 2) * kNotifyOffMultiplier, 2, q);
  }

  VirtioRng rng;
  std::vector<uint16_t> irqs;
  std::unique_ptr<VirtioPciDevice> dev;
};

constexpr uint64_t kV1 = uint64_t{1} << kFeatureVersion1;
constexpr uint8_t kAll = kStatusAcknowledge | kStatusDriver | kStatusFeaturesOk | kStatusDriverOk;

// Walks the capability list like vp_modern_probe / virtio_pci_find_capability.
TEST(VirtioPciTest, ConfigSpaceAndCapabilities) {
  auto mem = Mem();
  Fixture f(mem.get());
  auto& cfg = f.dev->config();
  EXPECT_EQ(f.dev->ReadConfig(pci::kRegVendorId, 2), 0x1af4u);
  EXPECT_EQ(f.dev->ReadConfig(pci::kRegDeviceId, 2), 0x1044u);
  EXPECT_GE(f.dev->ReadConfig(pci::kRegRevisionId, 1), 1u);
  EXPECT_EQ(cfg.bar_type(0), pci::BarType::kMem64);
  std::set<uint8_t> types;
  for (uint32_t p = f.dev->ReadConfig(pci::kRegCapabilitiesPointer, 1); p != 0;
       p = f.dev->ReadConfig(p + 1, 1)) {
    if (f.dev->ReadConfig(p, 1) != pci::kCapIdVendor) continue;
    uint8_t type = f.dev->ReadConfig(p + 3, 1);
    types.insert(type);
    EXPECT_EQ(f.dev->ReadConfig(p + 4, 1), 0u);
    uint32_t off = f.dev->ReadConfig(p + 8, 4), len = f.dev->ReadConfig(p + 12, 4);
    if (type == kVirtioPciCapCommonCfg) {
      EXPECT_EQ(off, kBarCommonOffset);
      EXPECT_GE(len, kCommonCfgBytes);
    }
    if (type == kVirtioPciCapNotifyCfg) {
      EXPECT_EQ(off, kBarNotifyOffset);
      EXPECT_EQ(f.dev->ReadConfig(p + 16, 4), kNotifyOffMultiplier);
    }
    if (type == kVirtioPciCapPciCfg) {
      // Read num_queues through the PCI_CFG window.
      f.dev->WriteConfig(p + 4, 1, 0);
      f.dev->WriteConfig(p + 8, 4, kCommonNumQueues);
      f.dev->WriteConfig(p + 12, 4, 2);
      EXPECT_EQ(f.dev->ReadConfig(p + 16, 2), 1u);
    }
  }
  EXPECT_EQ(types, (std::set<uint8_t>{1, 2, 3, 5}));
  EXPECT_EQ(f.Rd(kCommonNumQueues, 2), 1u);
}

TEST(VirtioPciTest, FeatureNegotiation) {
  auto mem = Mem();
  Fixture f(mem.get());
  uint64_t offered = f.DeviceFeatures();
  EXPECT_TRUE(offered & kV1);
  // Legacy-only driver: refuses VERSION_1.
  EXPECT_FALSE(f.Negotiate(offered & ~kV1));
  EXPECT_EQ(f.dev->negotiated_features(), 0u);
  // Driver asking for something not offered.
  EXPECT_FALSE(f.Negotiate(kV1 | (uint64_t{1} << 40)));
  // Good driver.
  EXPECT_TRUE(f.Negotiate(kV1 | (uint64_t{1} << kFeatureEventIdx)));
  EXPECT_EQ(f.dev->negotiated_features(), kV1 | (uint64_t{1} << kFeatureEventIdx));
  // Features are frozen after FEATURES_OK.
  f.DriverFeatures(kV1);
  EXPECT_EQ(f.dev->negotiated_features(), kV1 | (uint64_t{1} << kFeatureEventIdx));
}

TEST(VirtioPciTest, RngEndToEnd) {
  auto mem = Mem();
  Fixture f(mem.get());
  ASSERT_TRUE(f.Negotiate(kV1));
  f.Wr(kCommonMsixConfig, 2, 0);
  TestDriver drv(mem.get(), 16);
  f.SetupQueue(drv, 1);
  EXPECT_EQ(f.Rd(kCommonQueueEnable, 2), 1u);
  EXPECT_EQ(f.Rd(kCommonQueueDesc, 8), drv.desc_addr);
  f.SetStatus(kAll);
  EXPECT_EQ(f.Status(), kAll);

  uint16_t h1 = drv.AddChain({{0x100000, 64, true}});
  uint16_t h2 = drv.AddChain({{0x101000, 16, true}, {0x102000, 48, true}});
  f.Notify(0);
  auto u1 = drv.GetUsed(), u2 = drv.GetUsed();
  ASSERT_TRUE(u1 && u2);
  EXPECT_EQ(u1->id, h1);
  EXPECT_EQ(u1->len, 64u);
  EXPECT_EQ(u2->id, h2);
  EXPECT_EQ(u2->len, 64u);
  uint8_t buf[64];
  ASSERT_TRUE(mem->Read(0x100000, buf, 64).ok());
  std::set<uint8_t> distinct(buf, buf + 64);
  EXPECT_GT(distinct.size(), 8u);
  EXPECT_EQ(f.irqs, std::vector<uint16_t>{1});
  EXPECT_EQ(f.Rd(kBarIsrOffset, 1), kIsrQueue);
  EXPECT_EQ(f.Rd(kBarIsrOffset, 1), 0u);  // read clears
  EXPECT_EQ(VirtioPciDevice::NotifyBarOffset(0), kBarNotifyOffset);
}

TEST(VirtioPciTest, BadQueueConfigNeedsReset) {
  auto mem = Mem();
  Fixture f(mem.get());
  ASSERT_TRUE(f.Negotiate(kV1));
  f.Wr(kCommonMsixConfig, 2, 7);
  f.Wr(kCommonQueueSelect, 2, 0);
  f.Wr(kCommonQueueSize, 2, 16);
  f.Wr64(kCommonQueueDesc, 0x10001);  // misaligned
  f.Wr64(kCommonQueueDriver, 0x20000);
  f.Wr64(kCommonQueueDevice, 0x30000);
  f.Wr(kCommonQueueEnable, 2, 1);
  EXPECT_TRUE(f.Status() & kStatusDeviceNeedsReset);
  EXPECT_EQ(f.irqs, std::vector<uint16_t>{7});
  EXPECT_EQ(f.Rd(kBarIsrOffset, 1), kIsrConfig);
}

TEST(VirtioPciTest, HostileRingAfterDriverOkNeedsReset) {
  auto mem = Mem();
  Fixture f(mem.get());
  ASSERT_TRUE(f.Negotiate(kV1));
  f.Wr(kCommonMsixConfig, 2, 0);
  TestDriver drv(mem.get(), 16);
  f.SetupQueue(drv, 1);
  f.SetStatus(kAll);
  drv.Desc(0, 0x100000, 64, kDescFWrite | kDescFNext, 0);  // self loop
  drv.Publish(0);
  f.Notify(0);
  EXPECT_TRUE(f.Status() & kStatusDeviceNeedsReset);
  EXPECT_NE(std::find(f.irqs.begin(), f.irqs.end(), 0), f.irqs.end());
  // Reset recovers.
  f.SetStatus(0);
  EXPECT_EQ(f.Status(), 0);
  EXPECT_FALSE(f.dev->queue(0).in_error());
}

TEST(VirtioPciTest, ResetClearsEverything) {
  auto mem = Mem();
  Fixture f(mem.get());
  ASSERT_TRUE(f.Negotiate(kV1));
  TestDriver drv(mem.get(), 16);
  f.SetupQueue(drv, 1);
  f.SetStatus(kAll);
  f.SetStatus(0);
  EXPECT_EQ(f.Status(), 0);
  EXPECT_EQ(f.dev->negotiated_features(), 0u);
  f.Wr(kCommonQueueSelect, 2, 0);
  EXPECT_EQ(f.Rd(kCommonQueueEnable, 2), 0u);
  EXPECT_EQ(f.Rd(kCommonQueueSize, 2), VirtioRng::kQueueSize);
  EXPECT_EQ(f.Rd(kCommonQueueDesc, 8), 0u);
  EXPECT_EQ(f.Rd(kCommonQueueMsixVector, 2), kVirtioMsiNoVector);
  EXPECT_FALSE(f.dev->queue(0).active());
  // Notifications after reset do nothing.
  drv.AddChain({{0x100000, 64, true}});
  f.Notify(0);
  EXPECT_FALSE(drv.GetUsed());
}

TEST(VirtioPciTest, SaveRestoreContinue) {
  auto mem = Mem();
  VirtioPciState st;
  TestDriver drv(mem.get(), 16);
  {
    Fixture f(mem.get());
    ASSERT_TRUE(f.Negotiate(kV1 | (uint64_t{1} << kFeatureEventIdx)));
    f.SetupQueue(drv, 3);
    f.SetStatus(kAll);
    drv.AddChain({{0x100000, 32, true}});
    f.Notify(0);
    ASSERT_TRUE(drv.GetUsed());
    st = f.dev->SaveState();
  }
  Fixture g(mem.get());
  ASSERT_TRUE(g.dev->RestoreState(st).ok());
  EXPECT_EQ(g.Status(), kAll);
  EXPECT_EQ(g.dev->negotiated_features(), kV1 | (uint64_t{1} << kFeatureEventIdx));
  drv.SetUsedEvent(drv.last_used());
  uint16_t h = drv.AddChain({{0x101000, 32, true}});
  g.Notify(0);
  auto u = drv.GetUsed();
  ASSERT_TRUE(u);
  EXPECT_EQ(u->id, h);
  EXPECT_EQ(u->len, 32u);
  EXPECT_EQ(g.irqs, std::vector<uint16_t>{3});
  // Mismatched state is refused.
  VirtioPciState bad = st;
  bad.add_queues();
  Fixture h2(mem.get());
  EXPECT_FALSE(h2.dev->RestoreState(bad).ok());
  EXPECT_EQ(h2.Status(), 0);
}

}  // namespace
}  // namespace microvmm::virtio
