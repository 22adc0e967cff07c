// virtio-balloon behind the virtio-pci transport, driven through BAR 0 like Linux's
// virtio_pci_modern + virtio_balloon: queue count, feature negotiation, spec queue numbering with
// a hole, device config in the DEVICE_CFG region, config interrupts for SetTarget, and a
// transport-level save/restore that keeps the stats buffer held. No KVM.
#include <cstring>
#include <memory>
#include <vector>

#include "devices/virtio/balloon/balloon.h"
#include "devices/virtio/pci_transport.h"
#include "gtest/gtest.h"
#include "tests/virtio/virtq_driver.h"

namespace microvmm::virtio {
namespace {

using testing::TestDriver;

class RecordingInterrupt : public VirtioInterrupt {
 public:
  explicit RecordingInterrupt(std::vector<uint16_t>* log) : log_(log) {}
  void Signal(uint16_t vector) override { log_->push_back(vector); }

 private:
  std::vector<uint16_t>* log_;
};

constexpr uint64_t kV1 = uint64_t{1} << kFeatureVersion1;
constexpr uint64_t kStatsF = uint64_t{1} << kBalloonFStatsVq;
constexpr uint64_t kReportF = uint64_t{1} << kBalloonFReporting;
constexpr uint8_t kAll = kStatusAcknowledge | kStatusDriver | kStatusFeaturesOk | kStatusDriverOk;
constexpr uint64_t kScratch = 0x100000;
constexpr uint64_t kData = 0x400000;

struct Fixture {
  Fixture(GuestMemory* mem, const VirtioBalloonOptions& opt) {
    auto b = VirtioBalloon::Create(mem, nullptr, opt);
    EXPECT_TRUE(b.ok()) << b.status();
    balloon = std::move(*b);
    auto d = VirtioPciDevice::Create(mem, balloon.get(), nullptr,
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
  void Wr64(uint64_t off, uint64_t v) {
    Wr(off, 4, v & 0xffffffff);
    Wr(off + 4, 4, v >> 32);
  }
  uint64_t DeviceFeatures() {
    Wr(kCommonDeviceFeatureSelect, 4, 0);
    uint64_t lo = Rd(kCommonDeviceFeature, 4);
    Wr(kCommonDeviceFeatureSelect, 4, 1);
    return lo | Rd(kCommonDeviceFeature, 4) << 32;
  }
  bool Negotiate(uint64_t f) {
    Wr(kCommonDeviceStatus, 1, 0);
    Wr(kCommonDeviceStatus, 1, kStatusAcknowledge | kStatusDriver);
    Wr(kCommonDriverFeatureSelect, 4, 0);
    Wr(kCommonDriverFeature, 4, f & 0xffffffff);
    Wr(kCommonDriverFeatureSelect, 4, 1);
    Wr(kCommonDriverFeature, 4, f >> 32);
    Wr(kCommonDeviceStatus, 1, kStatusAcknowledge | kStatusDriver | kStatusFeaturesOk);
    return Rd(kCommonDeviceStatus, 1) & kStatusFeaturesOk;
  }
  void SetupQueue(uint16_t q, const TestDriver& drv) {
    Wr(kCommonQueueSelect, 2, q);
    Wr(kCommonQueueSize, 2, drv.size());
    Wr64(kCommonQueueDesc, drv.desc_addr);
    Wr64(kCommonQueueDriver, drv.avail_addr);
    Wr64(kCommonQueueDevice, drv.used_addr);
    Wr(kCommonQueueEnable, 2, 1);
  }
  void Notify(uint16_t q) { dev->Notify(q); }

  std::vector<uint16_t> irqs;
  std::unique_ptr<VirtioBalloon> balloon;
  std::unique_ptr<VirtioPciDevice> dev;
};

TEST(BalloonPciTest, LinuxStyleProbeInflateAndSaveRestore) {
  auto m = GuestMemory::Create(16 << 20);
  ASSERT_TRUE(m.ok());
  GuestMemory* mem = m->get();
  VirtioBalloonOptions opt;
  opt.free_page_reporting = true;
  opt.initial_target_bytes = 1 << 20;

  // Drivers for inflateq, deflateq, statsq and reporting_vq at spec index 4 (no hinting: hole).
  std::vector<std::unique_ptr<TestDriver>> drv;
  for (int i = 0; i < 5; ++i) drv.push_back(std::make_unique<TestDriver>(mem, 64, 0x10000 + 0x4000 * i));
  VirtioPciState saved;
  uint16_t stats_head;
  {
    Fixture f(mem, opt);
    EXPECT_EQ(f.Rd(kCommonNumQueues, 2), 5u);
    EXPECT_EQ(f.DeviceFeatures() & (kStatsF | kReportF | kV1), kStatsF | kReportF | kV1);
    ASSERT_TRUE(f.Negotiate(kV1 | kStatsF | kReportF));
    f.Wr(kCommonMsixConfig, 2, 7);
    for (uint16_t q : {0, 1, 2, 4}) f.SetupQueue(q, *drv[q]);
    // Linux adds the first stats buffer before DRIVER_OK.
    uint16_t tag = 5;
    uint64_t val = 123456;
    ASSERT_TRUE(mem->Write(kScratch + 0x800, &tag, 2).ok());
    ASSERT_TRUE(mem->Write(kScratch + 0x802, &val, 8).ok());
    stats_head = drv[2]->AddChain({{kScratch + 0x800, 10, false}});
    f.Wr(kCommonDeviceStatus, 1, kAll);
    ASSERT_EQ(f.Rd(kCommonDeviceStatus, 1), kAll);
    f.Notify(2);
    ASSERT_TRUE(f.balloon->GetStats().has_value());
    EXPECT_EQ(*f.balloon->GetStats()->total_memory, 123456u);

    // Device config through the DEVICE_CFG region; SetTarget raises a config interrupt.
    EXPECT_EQ(f.Rd(kBarDeviceCfgOffset, 4), 256u);
    f.balloon->SetTarget(2 << 20);
    EXPECT_EQ(f.Rd(kBarDeviceCfgOffset, 4), 512u);
    EXPECT_EQ(f.Rd(kBarIsrOffset, 1) & kIsrConfig, kIsrConfig);
    EXPECT_EQ(f.irqs, std::vector<uint16_t>{7});

    // Inflate two pages, report the guest's `actual`.
    uint32_t pfns[2] = {kData >> 12, (kData >> 12) + 1};
    ASSERT_TRUE(mem->Write(kScratch, pfns, sizeof(pfns)).ok());
    drv[0]->AddChain({{kScratch, sizeof(pfns), false}});
    f.Notify(0);
    ASSERT_TRUE(drv[0]->GetUsed().has_value());
    EXPECT_EQ(f.balloon->inflated_pages(), 2u);
    f.Wr(kBarDeviceCfgOffset + 4, 4, 2);
    EXPECT_EQ(f.balloon->actual_bytes(), 2u * 4096);

    // Free page reporting on queue 4.
    drv[4]->AddChain({{kData + 0x10000, 0x4000, true}});
    f.Notify(4);
    ASSERT_TRUE(drv[4]->GetUsed().has_value());
    EXPECT_EQ(f.balloon->bytes_reported(), 0x4000u);

    f.balloon->Quiesce();
    saved = f.dev->SaveState();
  }

  Fixture g(mem, opt);
  ASSERT_TRUE(g.dev->RestoreState(saved).ok());
  EXPECT_EQ(g.Rd(kCommonDeviceStatus, 1), kAll);
  EXPECT_EQ(g.balloon->inflated_pages(), 2u);
  EXPECT_TRUE(g.balloon->IsInflated(kData + 4096));
  EXPECT_EQ(g.balloon->target_bytes(), 2u << 20);
  EXPECT_EQ(g.balloon->actual_bytes(), 2u * 4096);
  EXPECT_EQ(g.balloon->queue_index(VirtioBalloon::kReporting), 4);
  // The stats buffer is still held: a request hands back the very same head.
  EXPECT_EQ(drv[2]->UsedIdx(), 0);
  EXPECT_TRUE(g.balloon->RequestStats());
  auto u = drv[2]->GetUsed();
  ASSERT_TRUE(u.has_value());
  EXPECT_EQ(u->id, stats_head);
  // And the queues keep working.
  uint32_t pfn = kData >> 12;
  ASSERT_TRUE(mem->Write(kScratch, &pfn, 4).ok());
  drv[1]->AddChain({{kScratch, 4, false}});
  g.Notify(1);
  ASSERT_TRUE(drv[1]->GetUsed().has_value());
  EXPECT_EQ(g.balloon->inflated_pages(), 1u);
}

}  // namespace
}  // namespace microvmm::virtio
