// VfioMigrationDriver over KernelVfioDevice + the fake kernel: capability refusal, the source
// arcs (pre-copy, stop-copy to EOF, with and without P2P), resume on a destination, cancel from
// every intermediate state, and DMA dirty tracking with its fallback.
#include "devices/vfio/pci/vfio_migration.h"

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/vfio/pci/test_util.h"

namespace microvmm::vfio {
namespace {

using ::testing::ElementsAre;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;
using testing::ArcRecorder;
using testing::FakeVfioKernel;
using S = MigState;

struct Rig {
  explicit Rig(uint64_t mig_flags = VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P |
                                    uapi::kMigrationPreCopy) {
    k.mig_flags = mig_flags;
    testing::SetUpKernel(k);
    dev = std::make_unique<ArcRecorder>(testing::OpenDevice(k));
  }
  std::unique_ptr<VfioMigrationDriver> Driver() {
    auto d = VfioMigrationDriver::Create(*dev);
    EXPECT_TRUE(d.ok()) << d.status();
    return d.ok() ? std::move(*d) : nullptr;
  }
  S KernelState() const { return static_cast<S>(k.mig_state); }
  testing::PciFakeKernel k;
  std::unique_ptr<ArcRecorder> dev;
};

std::string Str(const std::vector<uint8_t>& v) { return std::string(v.begin(), v.end()); }
std::span<const uint8_t> Bytes(const std::string& s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

TEST(VfioMigration, RefusesDeviceWithoutMigrationNamingIt) {
  FakeVfioKernel k;
  k.mig_supported = false;
  testing::SetUpKernel(k);
  auto dev = testing::OpenDevice(k);
  auto d = VfioMigrationDriver::Create(*dev);
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(d.status().message()), HasSubstr(testing::kBdf));
  EXPECT_THAT(std::string(d.status().message()), HasSubstr("STOP_COPY"));
}

TEST(VfioMigration, RefusesDeviceWithoutStopCopyFlag) {
  Rig r(VFIO_MIGRATION_P2P);  // a driver that claims P2P but not the mandatory STOP_COPY
  auto d = VfioMigrationDriver::Create(*r.dev);
  ASSERT_FALSE(d.ok());
  EXPECT_THAT(std::string(d.status().message()), HasSubstr(testing::kBdf));
}

TEST(VfioMigration, PreCopyThenStopCopyToEof) {
  Rig r;
  auto d = r.Driver();
  ASSERT_NE(d, nullptr);
  EXPECT_TRUE(d->caps().pre_copy);
  auto started = d->StartPreCopy();
  ASSERT_TRUE(started.ok()) << started.status();
  EXPECT_TRUE(*started);
  EXPECT_EQ(r.KernelState(), S::kPreCopy);
  // The VM runs; the fake device hands out its pre-copy data 7 bytes per read.
  auto n = d->DrainPreCopy();
  ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_EQ(*n, r.k.precopy_blob.size());
  auto again = d->DrainPreCopy();  // nothing more for now (ENOMSG) is not an error
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(*again, 0u);
  auto blob = d->StopAndCopy();
  ASSERT_TRUE(blob.ok()) << blob.status();
  EXPECT_EQ(*blob, Str(r.k.precopy_blob) + Str(r.k.state_blob));
  EXPECT_EQ(r.KernelState(), S::kStop);
  EXPECT_EQ(d->state(), S::kStop);
  EXPECT_THAT(r.dev->arcs, ElementsAre(S::kPreCopy, S::kPreCopyP2p, S::kStopCopy, S::kStop));
}

TEST(VfioMigration, PreCopyDrainIsBounded) {
  Rig r;
  auto d = r.Driver();
  ASSERT_TRUE(d->StartPreCopy().ok());
  auto n = d->DrainPreCopy(5);
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 5u);
  EXPECT_EQ(d->blob_bytes(), 5u);
  auto blob = d->StopAndCopy();
  ASSERT_TRUE(blob.ok()) << blob.status();
  EXPECT_EQ(*blob, Str(r.k.precopy_blob) + Str(r.k.state_blob));  // nothing lost
}

TEST(VfioMigration, StopCopyWithoutPreCopyUsesP2pArcs) {
  Rig r(VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P);
  auto d = r.Driver();
  auto pre = d->StartPreCopy();
  ASSERT_TRUE(pre.ok());
  EXPECT_FALSE(*pre);  // not offered: nothing done
  auto blob = d->StopAndCopy();
  ASSERT_TRUE(blob.ok()) << blob.status();
  EXPECT_EQ(*blob, Str(r.k.state_blob));
  EXPECT_THAT(r.dev->arcs, ElementsAre(S::kRunningP2p, S::kStop, S::kStopCopy, S::kStop));
}

TEST(VfioMigration, StopCopyPlainDevice) {
  Rig r(VFIO_MIGRATION_STOP_COPY);
  auto d = r.Driver();
  auto blob = d->StopAndCopy();
  ASSERT_TRUE(blob.ok()) << blob.status();
  EXPECT_EQ(*blob, Str(r.k.state_blob));
  EXPECT_THAT(r.dev->arcs, ElementsAre(S::kStop, S::kStopCopy, S::kStop));
}

TEST(VfioMigration, PreCopyWithoutP2p) {
  Rig r(VFIO_MIGRATION_STOP_COPY | uapi::kMigrationPreCopy);
  auto d = r.Driver();
  ASSERT_TRUE(d->StartPreCopy().ok());
  ASSERT_TRUE(d->DrainPreCopy().ok());
  auto blob = d->StopAndCopy();
  ASSERT_TRUE(blob.ok()) << blob.status();
  EXPECT_EQ(*blob, Str(r.k.precopy_blob) + Str(r.k.state_blob));
  EXPECT_THAT(r.dev->arcs, ElementsAre(S::kPreCopy, S::kStopCopy, S::kStop));
}

TEST(VfioMigration, StopCopyRefusesEndlessDevice) {
  Rig r(VFIO_MIGRATION_STOP_COPY);
  auto d = r.Driver();
  auto blob = d->StopAndCopy(10);  // the fake's state is 30 bytes
  ASSERT_FALSE(blob.ok());
  EXPECT_EQ(blob.status().code(), absl::StatusCode::kResourceExhausted);
  ASSERT_TRUE(d->Cancel().ok());
  EXPECT_EQ(r.KernelState(), S::kRunning);
}

TEST(VfioMigration, ResumeOnDestination) {
  Rig src;
  auto sd = src.Driver();
  ASSERT_TRUE(sd->StartPreCopy().ok());
  ASSERT_TRUE(sd->DrainPreCopy().ok());
  auto blob = sd->StopAndCopy();
  ASSERT_TRUE(blob.ok());

  Rig dst;
  auto dd = dst.Driver();
  ASSERT_TRUE(dd->Resume(Bytes(*blob)).ok());
  EXPECT_EQ(Str(dst.k.resumed_blob), *blob);
  EXPECT_EQ(dst.KernelState(), S::kRunning);
  EXPECT_THAT(dst.dev->arcs, ElementsAre(S::kRunningP2p, S::kStop, S::kResuming, S::kStop,
                                         S::kRunningP2p, S::kRunning));
}

TEST(VfioMigration, ResumeWithoutRunStaysStopped) {
  Rig dst(VFIO_MIGRATION_STOP_COPY);
  auto dd = dst.Driver();
  ASSERT_TRUE(dd->Resume(Bytes("blob"), /*run=*/false).ok());
  EXPECT_EQ(dst.KernelState(), S::kStop);
  ASSERT_TRUE(dd->Run().ok());
  EXPECT_EQ(dst.KernelState(), S::kRunning);
  EXPECT_THAT(dst.dev->arcs, ElementsAre(S::kStop, S::kResuming, S::kStop, S::kRunning));
}

TEST(VfioMigration, RejectedStreamLeavesDeviceRunningAfterReset) {
  Rig dst;
  dst.k.reject_resume = true;  // RESUMING -> STOP fails, device in ERROR
  auto dd = dst.Driver();
  absl::Status s = dd->Resume(Bytes("corrupt"));
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.message()), HasSubstr("RESUMING -> STOP"));
  EXPECT_THAT(std::string(s.message()), HasSubstr(testing::kBdf));
  EXPECT_EQ(dst.dev->resets, 1);
  EXPECT_EQ(dst.KernelState(), S::kRunning);
  EXPECT_EQ(dd->state(), S::kRunning);
}

// Cancel from every intermediate state: the path (arcs the device is walked through before
// Cancel) and the arcs Cancel must use.
struct CancelCase {
  const char* name;
  std::vector<S> path;
  std::vector<S> cancel_arcs;
  int resets;
};

class VfioMigrationCancel : public ::testing::TestWithParam<CancelCase> {};

TEST_P(VfioMigrationCancel, ReturnsToRunning) {
  const CancelCase& c = GetParam();
  Rig r;
  auto d = r.Driver();
  for (S s : c.path) ASSERT_TRUE(r.dev->SetMigState(s).ok()) << MigStateName(s);
  r.dev->arcs.clear();
  ASSERT_TRUE(d->Cancel().ok());
  EXPECT_EQ(r.KernelState(), S::kRunning);
  EXPECT_EQ(d->state(), S::kRunning);
  EXPECT_THAT(r.dev->arcs, ElementsAreArray(c.cancel_arcs));
  EXPECT_EQ(r.dev->resets, c.resets);
  // And the device migrates again afterwards.
  auto blob = d->StopAndCopy();
  ASSERT_TRUE(blob.ok()) << blob.status();
  EXPECT_EQ(*blob, Str(r.k.state_blob));
}

INSTANTIATE_TEST_SUITE_P(
    AllStates, VfioMigrationCancel,
    ::testing::Values(
        CancelCase{"Running", {}, {}, 0},
        CancelCase{"PreCopy", {S::kPreCopy}, {S::kRunning}, 0},
        CancelCase{"PreCopyP2p", {S::kPreCopy, S::kPreCopyP2p}, {S::kPreCopy, S::kRunning}, 0},
        CancelCase{"StopCopyFromPreCopy",
                   {S::kPreCopy, S::kPreCopyP2p, S::kStopCopy},
                   {S::kStop, S::kRunning},
                   0},
        CancelCase{"StopCopy", {S::kStop, S::kStopCopy}, {S::kStop, S::kRunning}, 0},
        CancelCase{"Stop", {S::kStop}, {S::kRunning}, 0},
        CancelCase{"RunningP2p", {S::kRunningP2p}, {S::kRunning}, 0},
        // RESUMING with no data: the commit (RESUMING -> STOP) fails, ERROR -> reset.
        CancelCase{"ResumingEmpty", {S::kStop, S::kResuming}, {S::kStop}, 1}),
    [](const ::testing::TestParamInfo<CancelCase>& i) { return i.param.name; });

TEST(VfioMigration, CancelFromErrorResets) {
  Rig r;
  auto d = r.Driver();
  r.k.mig_state = VFIO_DEVICE_STATE_ERROR;
  ASSERT_TRUE(d->Cancel().ok());
  EXPECT_EQ(r.dev->resets, 1);
  EXPECT_TRUE(r.dev->arcs.empty());
  EXPECT_EQ(r.KernelState(), S::kRunning);
}

TEST(VfioMigration, CancelAfterResumeWritesCommitsOrResets) {
  Rig r;
  auto d = r.Driver();
  ASSERT_TRUE(r.dev->SetMigState(S::kStop).ok());
  ASSERT_TRUE(r.dev->SetMigState(S::kResuming).ok());
  ASSERT_TRUE(r.dev->WriteMigData(Bytes("partial")).ok());
  ASSERT_TRUE(d->Cancel().ok());
  EXPECT_EQ(r.KernelState(), S::kRunning);
  EXPECT_EQ(r.dev->resets, 0);
}

// ---- DMA dirty tracking ----

TEST(VfioMigration, DirtyTrackingReportsDevicePages) {
  Rig r;
  auto d = r.Driver();
  ASSERT_TRUE(d->StartDirtyTracking({{0, 0x10000}, {0x100000, 0x100000}}).ok());
  EXPECT_TRUE(r.k.logging);
  EXPECT_FALSE(d->fallback());
  ASSERT_EQ(r.k.logging_ranges.size(), 2u);
  r.k.dirty_pages = {0x1000, 0x3000, 0x100000 + 65 * 0x1000};
  std::map<uint64_t, std::vector<uint64_t>> got;
  ASSERT_TRUE(d->SyncDirty([&](const DmaRange& rg, std::span<const uint64_t> bm) {
                 got[rg.iova] = std::vector<uint64_t>(bm.begin(), bm.end());
               }).ok());
  ASSERT_EQ(got.size(), 2u);
  EXPECT_THAT(got[0], ElementsAre(0b1010u));
  ASSERT_EQ(got[0x100000].size(), 4u);  // 256 pages
  EXPECT_THAT(got[0x100000], ElementsAre(0u, 0b10u, 0u, 0u));
  // Reported pages are cleared.
  got.clear();
  ASSERT_TRUE(d->SyncDirty([&](const DmaRange& rg, std::span<const uint64_t> bm) {
                 got[rg.iova] = std::vector<uint64_t>(bm.begin(), bm.end());
               }).ok());
  EXPECT_THAT(got[0], ElementsAre(0u));
  ASSERT_TRUE(d->StopDirtyTracking().ok());
  EXPECT_FALSE(r.k.logging);
}

TEST(VfioMigration, DirtyTrackingFallbackReportsEverything) {
  Rig r;
  r.k.dma_logging_supported = false;
  auto d = r.Driver();
  EXPECT_FALSE(d->caps().dma_logging);
  ASSERT_TRUE(d->StartDirtyTracking({{0, 0x46000}}).ok());  // 70 pages
  EXPECT_TRUE(d->fallback());
  std::vector<uint64_t> got;
  ASSERT_TRUE(d->SyncDirty([&](const DmaRange&, std::span<const uint64_t> bm) {
                 got.assign(bm.begin(), bm.end());
               }).ok());
  EXPECT_THAT(got, ElementsAre(~uint64_t{0}, 0x3fu));  // 64 + 6 pages, nothing beyond
  EXPECT_TRUE(d->StopDirtyTracking().ok());
}

TEST(VfioMigration, FailedDirtyReportMeansAllDirty) {
  Rig r;
  auto d = r.Driver();
  ASSERT_TRUE(d->StartDirtyTracking({{0, 0x8000}}).ok());
  r.k.dirty_pages = {0x2000};
  r.k.FailIoctl(VFIO_DEVICE_FEATURE, EIO);
  std::vector<uint64_t> got;
  ASSERT_TRUE(d->SyncDirty([&](const DmaRange&, std::span<const uint64_t> bm) {
                 got.assign(bm.begin(), bm.end());
               }).ok());
  EXPECT_THAT(got, ElementsAre(0xffu));
}


// ---- Dirty source order: device DMA log, else IOMMU dirty tracking, else all DMA-mapped RAM ----
// (The KernelVfioDevice is driven directly here: ArcRecorder does not forward the IOMMU calls.)

struct IommuRig {
  IommuRig(bool dma_logging, bool iommu_dirty) {
    k.dma_logging_supported = dma_logging;
    k.iommu_dirty_cap = iommu_dirty;
    testing::SetUpKernel(k);
    dev = testing::OpenDevice(k);
    static char ram[0x10000];
    EXPECT_TRUE(dev->DmaMap(0, 0x10000, ram, -1, 0, true).ok());
    EXPECT_TRUE(dev->DmaMap(0x100000, 0x10000, ram, -1, 0, true).ok());
    auto d = VfioMigrationDriver::Create(*dev);
    EXPECT_TRUE(d.ok()) << d.status();
    if (d.ok()) driver = std::move(*d);
  }
  std::map<uint64_t, std::vector<uint64_t>> Sync() {
    std::map<uint64_t, std::vector<uint64_t>> got;
    EXPECT_TRUE(driver
                    ->SyncDirty([&](const DmaRange& rg, std::span<const uint64_t> bm) {
                      got[rg.iova] = std::vector<uint64_t>(bm.begin(), bm.end());
                    })
                    .ok());
    return got;
  }
  testing::PciFakeKernel k;
  std::unique_ptr<KernelVfioDevice> dev;
  std::unique_ptr<VfioMigrationDriver> driver;
};
const std::vector<DmaRange> kTwoRanges = {{0, 0x10000}, {0x100000, 0x10000}};  // 16 pages each

TEST(VfioMigrationDirtySource, Names) {
  EXPECT_STREQ(DirtySourceName(DirtySource::kDeviceDmaLog), "device DMA log");
  EXPECT_STREQ(DirtySourceName(DirtySource::kIommu), "IOMMU dirty tracking");
  EXPECT_STREQ(DirtySourceName(DirtySource::kAllMapped), "all DMA-mapped RAM");
}

TEST(VfioMigrationDirtySource, DeviceDmaLogFirstEvenWithADirtyIommu) {
  IommuRig r(/*dma_logging=*/true, /*iommu_dirty=*/true);
  ASSERT_TRUE(r.dev->has_dirty_hwpt());
  EXPECT_EQ(r.driver->dirty_source(), DirtySource::kNone);
  ASSERT_TRUE(r.driver->StartDirtyTracking(kTwoRanges).ok());
  EXPECT_EQ(r.driver->dirty_source(), DirtySource::kDeviceDmaLog);
  EXPECT_TRUE(r.k.logging);
  EXPECT_FALSE(r.dev->iommu_dirty_tracking());
  EXPECT_EQ(r.k.ioctl_calls(uapi::kIommuHwptSetDirtyTracking), 0);
  r.k.DeviceWrites(0x2000);
  EXPECT_THAT(r.Sync()[0], ElementsAre(0b100u));
  ASSERT_TRUE(r.driver->StopDirtyTracking().ok());
  EXPECT_FALSE(r.k.logging);
  EXPECT_EQ(r.driver->dirty_source(), DirtySource::kNone);
}

TEST(VfioMigrationDirtySource, IommuWhenTheDeviceCannotLog) {
  IommuRig r(/*dma_logging=*/false, /*iommu_dirty=*/true);
  ASSERT_TRUE(r.driver->StartDirtyTracking(kTwoRanges).ok());
  EXPECT_EQ(r.driver->dirty_source(), DirtySource::kIommu);
  EXPECT_FALSE(r.driver->fallback());
  EXPECT_TRUE(r.dev->iommu_dirty_tracking());
  EXPECT_TRUE(r.k.hwpt_tracking(r.k.attached_pt()));
  r.k.DeviceWrites(0x1000);
  r.k.DeviceWrites(0xf000);
  r.k.DeviceWrites(0x100000 + 5 * 0x1000);
  auto got = r.Sync();
  ASSERT_EQ(got.size(), 2u);
  EXPECT_THAT(got[0], ElementsAre((1u << 1) | (1u << 15)));
  EXPECT_THAT(got[0x100000], ElementsAre(1u << 5));
  got = r.Sync();  // cleared on read
  EXPECT_THAT(got[0], ElementsAre(0u));
  EXPECT_THAT(got[0x100000], ElementsAre(0u));
  ASSERT_TRUE(r.driver->StopDirtyTracking().ok());
  EXPECT_FALSE(r.dev->iommu_dirty_tracking());
  EXPECT_FALSE(r.k.hwpt_tracking(r.k.attached_pt()));
}

TEST(VfioMigrationDirtySource, AllMappedWhenNeitherCan) {
  IommuRig r(/*dma_logging=*/false, /*iommu_dirty=*/false);
  ASSERT_TRUE(r.driver->StartDirtyTracking(kTwoRanges).ok());
  EXPECT_EQ(r.driver->dirty_source(), DirtySource::kAllMapped);
  EXPECT_TRUE(r.driver->fallback());
  auto got = r.Sync();
  EXPECT_THAT(got[0], ElementsAre(0xffffu));
  EXPECT_THAT(got[0x100000], ElementsAre(0xffffu));
  EXPECT_TRUE(r.driver->StopDirtyTracking().ok());
}

TEST(VfioMigrationDirtySource, IommuRefusingToStartFallsBackToAllMapped) {
  IommuRig r(/*dma_logging=*/false, /*iommu_dirty=*/true);
  r.k.FailIoctl(uapi::kIommuHwptSetDirtyTracking, EIO);
  ASSERT_TRUE(r.driver->StartDirtyTracking(kTwoRanges).ok());
  EXPECT_EQ(r.driver->dirty_source(), DirtySource::kAllMapped);
  EXPECT_THAT(r.Sync()[0], ElementsAre(0xffffu));
  EXPECT_EQ(r.k.ioctl_calls(uapi::kIommuHwptGetDirtyBitmap), 0);
  ASSERT_TRUE(r.driver->StopDirtyTracking().ok());
  EXPECT_EQ(r.k.ioctl_calls(uapi::kIommuHwptSetDirtyTracking), 1);  // nothing to turn off
}

TEST(VfioMigrationDirtySource, FailedIommuReadMeansThatRangeAllDirty) {
  IommuRig r(/*dma_logging=*/false, /*iommu_dirty=*/true);
  ASSERT_TRUE(r.driver->StartDirtyTracking(kTwoRanges).ok());
  r.k.DeviceWrites(0x100000 + 3 * 0x1000);
  r.k.FailIoctl(uapi::kIommuHwptGetDirtyBitmap, EIO);  // the first range's read
  auto got = r.Sync();
  EXPECT_THAT(got[0], ElementsAre(0xffffu));
  EXPECT_THAT(got[0x100000], ElementsAre(1u << 3));
  ASSERT_TRUE(r.driver->StopDirtyTracking().ok());
}

TEST(VfioMigrationDirtySource, DeviceLogErrorIsNotHiddenByTheIommu) {
  IommuRig r(/*dma_logging=*/true, /*iommu_dirty=*/true);
  r.k.FailIoctl(VFIO_DEVICE_FEATURE, EIO);  // the device can log but its start fails
  EXPECT_FALSE(r.driver->StartDirtyTracking(kTwoRanges).ok());
  EXPECT_FALSE(r.driver->dirty_tracking());
  EXPECT_EQ(r.k.ioctl_calls(uapi::kIommuHwptSetDirtyTracking), 0);
}

}  // namespace
}  // namespace microvmm::vfio
