// IOMMU dirty tracking of the kernel VFIO backend (iommufd dirty-tracking HWPT) against
// FakeVfioKernel: attach to a dirty HWPT when the IOMMU offers it, fall back to the IOAS when
// anything refuses (no leaks, no stale HWPT), start/report/stop with bitmaps per range cleared on
// read, bad arguments, and every tracking ioctl failing once.
#include <cerrno>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "devices/vfio/kernel/kernel_vfio_device.h"
#include "devices/vfio/kernel/vfio_uapi.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/vfio/kernel/fake_vfio_kernel.h"

namespace microvmm::vfio {
namespace {

using ::testing::ElementsAre;
using testing::FakeVfioKernel;
using ::testing::HasSubstr;

constexpr char kBdf[] = "0000:01:00.0";
constexpr char kPath[] = "/sys/bus/pci/devices/0000:01:00.0";
constexpr uint64_t kPage = 4096;

std::string Msg(const absl::Status& s) { return std::string(s.message()); }

// A cdev + iommufd kernel whose IOMMU can (or cannot) track dirty IOPTEs.
void SetUpKernel(FakeVfioKernel& k, bool dirty_cap, bool cdev = true) {
  k.AddPciDevice(kBdf, "vfio-pci", "12", cdev ? "vfio0" : "");
  k.SetIommufdPresent(cdev);
  k.iommu_dirty_cap = dirty_cap;
  k.dma_logging_supported = false;  // the devices that need the IOMMU
}

std::unique_ptr<KernelVfioDevice> MustOpen(FakeVfioKernel& k) {
  auto dev = OpenKernelVfioDevice(kPath, k);
  EXPECT_TRUE(dev.ok()) << dev.status();
  return dev.ok() ? std::move(*dev) : nullptr;
}

// Maps [0x100000, +256 KiB) and [0x1000000, +8 KiB) for DMA.
void MapTwoRanges(KernelVfioDevice& dev) {
  static char ram[0x40000];
  ASSERT_TRUE(dev.DmaMap(0x100000, 0x40000, ram, -1, 0, true).ok());
  ASSERT_TRUE(dev.DmaMap(0x1000000, 0x2000, ram, -1, 0, true).ok());
}

// ---------------------------------------------------------------------------------------------
// Attach

TEST(IommuDirtyAttach, CapableIommuAttachesDeviceToDirtyHwpt) {
  FakeVfioKernel k;
  SetUpKernel(k, true);
  auto dev = MustOpen(k);
  ASSERT_NE(dev, nullptr);
  EXPECT_TRUE(dev->has_dirty_hwpt());
  EXPECT_TRUE(k.is_hwpt(k.attached_pt()));
  EXPECT_EQ(k.hwpt_count(), 1);
  EXPECT_EQ(k.ioctl_calls(uapi::kIommuGetHwInfo), 1);
  EXPECT_EQ(k.ioctl_calls(uapi::kIommuHwptAlloc), 1);
  EXPECT_EQ(k.ioctl_calls(uapi::kVfioDeviceAttachIommufdPt), 1);  // straight to the HWPT
  EXPECT_EQ(k.open_fd_count(), 2);
  // DMA is still mapped through the IOAS (the HWPT mirrors it).
  MapTwoRanges(*dev);
  EXPECT_EQ(k.dma.size(), 2u);
  dev.reset();
  EXPECT_EQ(k.open_fd_count(), 0);
  EXPECT_EQ(k.hwpt_count(), 0);
}

TEST(IommuDirtyAttach, NoCapabilityOrOldKernelUsesTheIoas) {
  for (bool old_kernel : {false, true}) {
    FakeVfioKernel k;
    SetUpKernel(k, /*dirty_cap=*/old_kernel);  // an old kernel cannot even be asked
    k.hw_info_supported = !old_kernel;
    auto dev = MustOpen(k);
    ASSERT_NE(dev, nullptr);
    EXPECT_FALSE(dev->has_dirty_hwpt());
    EXPECT_NE(k.attached_pt(), 0u);
    EXPECT_FALSE(k.is_hwpt(k.attached_pt()));
    EXPECT_EQ(k.ioctl_calls(uapi::kIommuHwptAlloc), 0);
    EXPECT_EQ(k.hwpt_count(), 0);
    EXPECT_EQ(dev->StartIommuDirtyTracking().code(), absl::StatusCode::kUnimplemented);
    std::vector<uint64_t> bm(1);
    EXPECT_EQ(dev->ReportIommuDirty(0x100000, kPage, kPage, bm).code(),
              absl::StatusCode::kUnimplemented);
    EXPECT_EQ(dev->StopIommuDirtyTracking().code(), absl::StatusCode::kUnimplemented);
    EXPECT_EQ(k.ioctl_calls(uapi::kIommuHwptSetDirtyTracking), 0);
  }
}

TEST(IommuDirtyAttach, GroupPathNeverOffersIt) {
  FakeVfioKernel k;
  SetUpKernel(k, true, /*cdev=*/false);
  auto dev = MustOpen(k);
  ASSERT_NE(dev, nullptr);
  EXPECT_EQ(dev->path(), KernelVfioPath::kGroupContainer);
  EXPECT_FALSE(dev->has_dirty_hwpt());
  EXPECT_EQ(k.ioctl_calls(uapi::kIommuGetHwInfo), 0);
  absl::Status s = dev->StartIommuDirtyTracking();
  EXPECT_EQ(s.code(), absl::StatusCode::kUnimplemented);
  EXPECT_THAT(Msg(s), HasSubstr("type1 container"));
}

// Each step towards the dirty HWPT refused once: the device still opens, attached to the IOAS,
// with no HWPT left behind and no extra fd.
TEST(IommuDirtyAttach, EverySetupStepFailingFallsBackToTheIoas) {
  const std::vector<unsigned long> steps = {uapi::kIommuGetHwInfo, uapi::kIommuHwptAlloc,
                                            uapi::kVfioDeviceAttachIommufdPt};
  for (unsigned long req : steps) {
    FakeVfioKernel k;
    SetUpKernel(k, true);
    k.FailIoctl(req, req == uapi::kIommuHwptAlloc ? EOPNOTSUPP : EIO);
    auto dev = MustOpen(k);
    ASSERT_NE(dev, nullptr) << uapi::IoctlName(req);
    EXPECT_FALSE(dev->has_dirty_hwpt()) << uapi::IoctlName(req);
    EXPECT_FALSE(k.is_hwpt(k.attached_pt())) << uapi::IoctlName(req);
    EXPECT_NE(k.attached_pt(), 0u) << uapi::IoctlName(req);
    EXPECT_EQ(k.hwpt_count(), 0) << uapi::IoctlName(req);
    EXPECT_EQ(k.open_fd_count(), 2) << uapi::IoctlName(req);
    // Only the refused attach leaves a HWPT to destroy.
    EXPECT_EQ(k.ioctl_calls(uapi::kIommuDestroy),
              req == uapi::kVfioDeviceAttachIommufdPt ? 1 : 0);
    EXPECT_EQ(dev->StartIommuDirtyTracking().code(), absl::StatusCode::kUnimplemented);
    dev.reset();
    EXPECT_EQ(k.open_fd_count(), 0);
  }
}

TEST(IommuDirtyAttach, AttachRefusedAndDestroyFailingStillOpens) {
  FakeVfioKernel k;
  SetUpKernel(k, true);
  k.refuse_dirty_hwpt_attach = true;  // e.g. a device behind an IOMMU unit without the feature
  k.FailIoctl(uapi::kIommuDestroy, EIO);
  auto dev = MustOpen(k);
  ASSERT_NE(dev, nullptr);
  EXPECT_FALSE(dev->has_dirty_hwpt());
  EXPECT_FALSE(k.is_hwpt(k.attached_pt()));
  EXPECT_EQ(k.hwpt_count(), 1);  // freed with the iommufd
  dev.reset();
  EXPECT_EQ(k.hwpt_count(), 0);
  EXPECT_EQ(k.open_fd_count(), 0);
}

TEST(IommuDirtyAttach, PlainAttachFailingAfterFallbackFailsOpenCleanly) {
  FakeVfioKernel k;
  SetUpKernel(k, true);
  k.FailIoctl(uapi::kVfioDeviceAttachIommufdPt, EIO, 2);  // the HWPT, then the IOAS
  auto dev = OpenKernelVfioDevice(kPath, k);
  ASSERT_FALSE(dev.ok());
  EXPECT_THAT(Msg(dev.status()), HasSubstr("VFIO_DEVICE_ATTACH_IOMMUFD_PT"));
  EXPECT_THAT(Msg(dev.status()), HasSubstr(kBdf));
  EXPECT_EQ(k.open_fd_count(), 0);
  EXPECT_EQ(k.hwpt_count(), 0);
}

// ---------------------------------------------------------------------------------------------
// Tracking

TEST(IommuDirtyTracking, BitmapsPerRangeClearedOnRead) {
  FakeVfioKernel k;
  SetUpKernel(k, true);
  auto dev = MustOpen(k);
  ASSERT_NE(dev, nullptr);
  MapTwoRanges(*dev);
  const uint32_t hwpt = k.attached_pt();
  k.DeviceWrites(0x100000);  // before tracking: not recorded
  EXPECT_TRUE(k.iommu_dirty_pages.empty());

  ASSERT_TRUE(dev->StartIommuDirtyTracking().ok());
  EXPECT_TRUE(dev->iommu_dirty_tracking());
  EXPECT_TRUE(k.hwpt_tracking(hwpt));
  EXPECT_EQ(dev->StartIommuDirtyTracking().code(), absl::StatusCode::kFailedPrecondition);
  for (uint64_t iova : {0x100000ull, 0x103000ull, 0x13f000ull, 0x1001000ull, 0x5000000ull}) {
    k.DeviceWrites(iova);  // the last one is not mapped: the IOMMU would fault it
  }
  EXPECT_EQ(k.iommu_dirty_pages.size(), 4u);

  std::vector<uint64_t> first(1, 0), second(1, 0);
  ASSERT_TRUE(dev->ReportIommuDirty(0x100000, 0x40000, kPage, first).ok());
  EXPECT_THAT(first, ElementsAre((1ull << 0) | (1ull << 3) | (1ull << 63)));
  ASSERT_TRUE(dev->ReportIommuDirty(0x1000000, 0x2000, kPage, second).ok());
  EXPECT_THAT(second, ElementsAre(0b10u));
  // Read-and-clear: nothing the second time.
  std::vector<uint64_t> again(1, 0);
  ASSERT_TRUE(dev->ReportIommuDirty(0x100000, 0x40000, kPage, again).ok());
  EXPECT_THAT(again, ElementsAre(0u));
  EXPECT_TRUE(k.iommu_dirty_pages.empty());

  // Coarser pages: one bit per 8 KiB; bits are ORed into what the caller passed.
  k.DeviceWrites(0x101000);
  k.DeviceWrites(0x104000);
  std::vector<uint64_t> coarse(1, 1ull << 40);
  ASSERT_TRUE(dev->ReportIommuDirty(0x100000, 0x40000, 2 * kPage, coarse).ok());
  EXPECT_THAT(coarse, ElementsAre((1ull << 40) | (1ull << 0) | (1ull << 2)));

  // A bitmap longer than needed: nothing is set past the range.
  k.DeviceWrites(0x140000 - kPage);
  std::vector<uint64_t> two(2, 0);
  ASSERT_TRUE(dev->ReportIommuDirty(0x100000, 0x40000, kPage, two).ok());
  EXPECT_THAT(two, ElementsAre(1ull << 63, 0u));

  ASSERT_TRUE(dev->StopIommuDirtyTracking().ok());
  EXPECT_FALSE(dev->iommu_dirty_tracking());
  EXPECT_FALSE(k.hwpt_tracking(hwpt));
  EXPECT_TRUE(dev->StopIommuDirtyTracking().ok());  // already off: nothing to do
  EXPECT_EQ(dev->ReportIommuDirty(0x100000, 0x40000, kPage, again).code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST(IommuDirtyTracking, StartingAgainDropsStaleBits) {
  FakeVfioKernel k;
  SetUpKernel(k, true);
  auto dev = MustOpen(k);
  ASSERT_NE(dev, nullptr);
  MapTwoRanges(*dev);
  ASSERT_TRUE(dev->StartIommuDirtyTracking().ok());
  k.DeviceWrites(0x100000);
  ASSERT_TRUE(dev->StopIommuDirtyTracking().ok());
  ASSERT_TRUE(dev->StartIommuDirtyTracking().ok());  // a new migration attempt
  std::vector<uint64_t> bm(1, 0);
  ASSERT_TRUE(dev->ReportIommuDirty(0x100000, 0x40000, kPage, bm).ok());
  EXPECT_THAT(bm, ElementsAre(0u));
}

TEST(IommuDirtyTracking, BadArgumentsNeverReachTheKernel) {
  FakeVfioKernel k;
  SetUpKernel(k, true);
  auto dev = MustOpen(k);
  ASSERT_NE(dev, nullptr);
  ASSERT_TRUE(dev->StartIommuDirtyTracking().ok());
  std::vector<uint64_t> one(1, 0);
  struct Case {
    uint64_t iova, size, page;
    size_t words;
  };
  const Case cases[] = {
      {0x100000, 0, kPage, 1},             // empty
      {0x100800, 0x1000, kPage, 1},        // iova not page aligned
      {0x100000, 0x1800, kPage, 1},        // size not a page multiple
      {0x100000, 0x1000, 3000, 1},         // page size not a power of two
      {0x100000, 0x1000, 0, 1},            // no page size
      {0x101000, 0x2000, 2 * kPage, 1},    // iova not aligned to the 8 KiB page
      {~0ull - 0xfff, 0x2000, kPage, 1},   // wraps
      {0x100000, 0x41000, kPage, 1},       // 65 pages, one word
      {0x100000, 0x1000, kPage, 0},        // no bitmap at all
  };
  for (const Case& c : cases) {
    std::vector<uint64_t> bm(c.words, 0);
    absl::Status s = dev->ReportIommuDirty(c.iova, c.size, c.page, bm);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument)
        << std::hex << c.iova << " " << c.size << " " << c.page;
  }
  EXPECT_EQ(k.ioctl_calls(uapi::kIommuHwptGetDirtyBitmap), 0);
  // What the kernel itself refuses is surfaced with the ioctl's name.
  k.FailIoctl(uapi::kIommuHwptGetDirtyBitmap, EINVAL);
  absl::Status s = dev->ReportIommuDirty(0x100000, 0x1000, kPage, one);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Msg(s), HasSubstr("IOMMU_HWPT_GET_DIRTY_BITMAP"));
}

TEST(IommuDirtyTracking, EveryTrackingIoctlFailingOnceRecovers) {
  FakeVfioKernel k;
  SetUpKernel(k, true);
  auto dev = MustOpen(k);
  ASSERT_NE(dev, nullptr);
  MapTwoRanges(*dev);
  const int fds_open = k.open_fd_count();
  std::vector<uint64_t> bm(1);
  struct Op {
    unsigned long req;
    std::function<absl::Status()> run;
  };
  const std::vector<Op> ops = {
      {uapi::kIommuHwptSetDirtyTracking, [&] { return dev->StartIommuDirtyTracking(); }},
      {uapi::kIommuHwptGetDirtyBitmap,
       [&] { return dev->ReportIommuDirty(0x100000, 0x40000, kPage, bm); }},
      {uapi::kIommuHwptSetDirtyTracking, [&] { return dev->StopIommuDirtyTracking(); }},
  };
  for (const Op& op : ops) {
    k.FailIoctl(op.req, EIO);
    absl::Status s = op.run();
    EXPECT_FALSE(s.ok()) << uapi::IoctlName(op.req);
    EXPECT_THAT(Msg(s), HasSubstr(uapi::IoctlName(op.req)));
    EXPECT_THAT(Msg(s), HasSubstr("Input/output error"));
    EXPECT_THAT(Msg(s), HasSubstr(kBdf));
    EXPECT_TRUE(op.run().ok()) << uapi::IoctlName(op.req);  // the same call then works
    EXPECT_EQ(k.open_fd_count(), fds_open);
  }
  EXPECT_FALSE(dev->iommu_dirty_tracking());
  EXPECT_FALSE(k.hwpt_tracking(k.attached_pt()));
  dev.reset();
  EXPECT_EQ(k.open_fd_count(), 0);
}

TEST(IommuDirtyTracking, DestroyWhileTrackingLeaksNothing) {
  FakeVfioKernel k;
  SetUpKernel(k, true);
  auto dev = MustOpen(k);
  ASSERT_NE(dev, nullptr);
  MapTwoRanges(*dev);
  ASSERT_TRUE(dev->StartIommuDirtyTracking().ok());
  dev.reset();
  EXPECT_EQ(k.open_fd_count(), 0);
  EXPECT_EQ(k.hwpt_count(), 0);
}


// The fake answers like iommufd, so the backend is tested against the kernel's refusals.
TEST(IommuDirtyFake, RejectsBadArgumentsLikeIommufd) {
  FakeVfioKernel k;
  SetUpKernel(k, true);
  auto dev = MustOpen(k);
  ASSERT_NE(dev, nullptr);
  MapTwoRanges(*dev);
  const int fd = k.iommufd_fd();
  const uint32_t hwpt = k.attached_pt();
  ASSERT_TRUE(k.is_hwpt(hwpt));
  auto err = [&](unsigned long req, void* arg) {
    errno = 0;
    return k.Ioctl(fd, req, arg) == 0 ? 0 : errno;
  };
  uapi::iommu_hw_info hw = {};
  hw.size = sizeof(hw);
  hw.dev_id = 99;
  EXPECT_EQ(err(uapi::kIommuGetHwInfo, &hw), ENOENT);  // not a bound device
  hw.size = 8;
  EXPECT_EQ(err(uapi::kIommuGetHwInfo, &hw), EINVAL);

  uapi::iommu_hwpt_alloc alloc = {};
  alloc.size = sizeof(alloc);
  alloc.dev_id = 7;
  alloc.pt_id = 12345;
  EXPECT_EQ(err(uapi::kIommuHwptAlloc, &alloc), ENOENT);  // no such IOAS
  alloc.flags = 1u << 7;
  EXPECT_EQ(err(uapi::kIommuHwptAlloc, &alloc), EOPNOTSUPP);

  uapi::iommu_hwpt_set_dirty_tracking set = {};
  set.size = sizeof(set);
  set.hwpt_id = 12345;
  EXPECT_EQ(err(uapi::kIommuHwptSetDirtyTracking, &set), ENOENT);
  set.hwpt_id = hwpt;
  set.flags = 2;
  EXPECT_EQ(err(uapi::kIommuHwptSetDirtyTracking, &set), EOPNOTSUPP);

  uint64_t bits[2] = {};
  uapi::iommu_hwpt_get_dirty_bitmap get = {};
  get.size = sizeof(get);
  get.hwpt_id = hwpt;
  get.iova = 0x100000;
  get.length = 0x2000;
  get.page_size = kPage;
  get.data = reinterpret_cast<uintptr_t>(bits);
  EXPECT_EQ(err(uapi::kIommuHwptGetDirtyBitmap, &get), EINVAL);  // tracking is off
  ASSERT_TRUE(dev->StartIommuDirtyTracking().ok());
  EXPECT_EQ(err(uapi::kIommuHwptGetDirtyBitmap, &get), 0);
  get.iova = 0x100800;
  EXPECT_EQ(err(uapi::kIommuHwptGetDirtyBitmap, &get), EINVAL);  // unaligned
  get.iova = 0x100000;
  get.page_size = 0x3000;
  EXPECT_EQ(err(uapi::kIommuHwptGetDirtyBitmap, &get), EINVAL);
  get.page_size = kPage;
  get.data = reinterpret_cast<uintptr_t>(bits) + 4;
  EXPECT_EQ(err(uapi::kIommuHwptGetDirtyBitmap, &get), EINVAL);  // misaligned bitmap
  get.data = reinterpret_cast<uintptr_t>(bits);
  get.iova = ~0ull - 0xfff;
  EXPECT_EQ(err(uapi::kIommuHwptGetDirtyBitmap, &get), EOVERFLOW);
  // NO_CLEAR leaves the bits for the next read.
  get.iova = 0x100000;
  k.DeviceWrites(0x101000);
  get.flags = uapi::kIommuHwptGetDirtyBitmapNoClear;
  EXPECT_EQ(err(uapi::kIommuHwptGetDirtyBitmap, &get), 0);
  EXPECT_EQ(bits[0], 0b10u);
  EXPECT_EQ(k.iommu_dirty_pages.size(), 1u);

  uapi::iommu_destroy d = {sizeof(d), hwpt};
  EXPECT_EQ(err(uapi::kIommuDestroy, &d), EBUSY);  // the device is attached to it
  d.id = 12345;
  EXPECT_EQ(err(uapi::kIommuDestroy, &d), ENOENT);
}

}  // namespace
}  // namespace microvmm::vfio
