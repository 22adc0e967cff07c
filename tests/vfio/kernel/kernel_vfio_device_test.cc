// Kernel VFIO backend against FakeVfioKernel: open paths, error messages, region/irq/DMA
// ioctls, migration v2 and DMA logging, hostile replies, injected failures and fd leaks.
#include "devices/vfio/kernel/kernel_vfio_device.h"

#include <cerrno>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

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

std::string Msg(const absl::Status& s) { return std::string(s.message()); }

// cdev = true: kernel with vfio cdev + /dev/iommu; false: group/container only.
void SetUpDevice(FakeVfioKernel& k, bool cdev, const std::string& driver = "vfio-pci") {
  k.AddPciDevice(kBdf, driver, "12", cdev ? "vfio0" : "");
  k.SetIommufdPresent(cdev);
}

std::unique_ptr<KernelVfioDevice> MustOpen(FakeVfioKernel& k) {
  auto dev = OpenKernelVfioDevice(kPath, k);
  EXPECT_TRUE(dev.ok()) << dev.status();
  return dev.ok() ? std::move(*dev) : nullptr;
}

// ---------------------------------------------------------------------------------------------
// Open paths

TEST(KernelVfioOpen, CdevAndIommufdPreferred) {
  FakeVfioKernel k;
  SetUpDevice(k, true);
  auto dev = MustOpen(k);
  ASSERT_NE(dev, nullptr);
  EXPECT_EQ(dev->path(), KernelVfioPath::kIommufdCdev);
  EXPECT_EQ(dev->name(), kBdf);
  EXPECT_EQ(k.ioctl_calls(uapi::kVfioDeviceBindIommufd), 1);
  EXPECT_EQ(k.ioctl_calls(uapi::kIommuIoasAlloc), 1);
  EXPECT_EQ(k.ioctl_calls(uapi::kVfioDeviceAttachIommufdPt), 1);
  EXPECT_EQ(k.ioctl_calls(VFIO_GROUP_GET_STATUS), 0);
  EXPECT_EQ(k.open_fd_count(), 2);  // iommufd + device
  auto info = dev->GetInfo();
  ASSERT_TRUE(info.ok());
  EXPECT_TRUE(info->is_pci);
  EXPECT_TRUE(info->can_reset);
  EXPECT_EQ(info->num_regions, 9u);
  EXPECT_EQ(info->num_irqs, 5u);
  dev.reset();
  EXPECT_EQ(k.open_fd_count(), 0);
}

TEST(KernelVfioOpen, GroupAndType1Container) {
  FakeVfioKernel k;
  SetUpDevice(k, false);
  auto dev = MustOpen(k);
  ASSERT_NE(dev, nullptr);
  EXPECT_EQ(dev->path(), KernelVfioPath::kGroupContainer);
  EXPECT_EQ(k.ioctl_calls(VFIO_SET_IOMMU), 1);
  EXPECT_EQ(k.ioctl_calls(VFIO_GROUP_GET_DEVICE_FD), 1);
  EXPECT_EQ(k.open_fd_count(), 3);  // container + group + device
  dev.reset();
  EXPECT_EQ(k.open_fd_count(), 0);
}

TEST(KernelVfioOpen, FallsBackToGroupWithoutDevIommu) {
  FakeVfioKernel k;
  k.AddPciDevice(kBdf, "vfio-pci", "12", "vfio0");  // cdev exists, /dev/iommu does not
  auto dev = MustOpen(k);
  ASSERT_NE(dev, nullptr);
  EXPECT_EQ(dev->path(), KernelVfioPath::kGroupContainer);
}

TEST(KernelVfioOpen, FallsBackToGroupWhenCdevNodeMissing) {
  FakeVfioKernel k;
  SetUpDevice(k, true);
  k.dev_nodes.erase("/dev/vfio/devices/vfio0");  // sysfs knows the cdev, /dev has no node
  auto dev = MustOpen(k);
  ASSERT_NE(dev, nullptr);
  EXPECT_EQ(dev->path(), KernelVfioPath::kGroupContainer);
  EXPECT_EQ(k.open_fd_count(), 3);  // the /dev/iommu fd was not kept
}

TEST(KernelVfioOpen, RealKernelReportsMissingDevice) {
  // The real VfioSys on this machine (no VFIO here): a BDF that cannot exist.
  auto dev = OpenKernelVfioDevice("ffff:ff:1f.7", VfioSys::Real());
  ASSERT_FALSE(dev.ok());
  EXPECT_EQ(dev.status().code(), absl::StatusCode::kNotFound);
  std::string target;
  ASSERT_EQ(VfioSys::Real().Readlink("/proc/self/exe", &target), 0);
  EXPECT_FALSE(target.empty());
  std::vector<std::string> names;
  ASSERT_EQ(VfioSys::Real().ReadDir("/proc/self/fd", &names), 0);
  EXPECT_THAT(names, ::testing::Contains("0"));
  EXPECT_THAT(names, ::testing::Not(::testing::Contains(".")));
}

TEST(KernelVfioOpen, BareBdfAndVariantDriverAccepted) {
  FakeVfioKernel k;
  SetUpDevice(k, true, "mlx5_vfio_pci");
  auto dev = OpenKernelVfioDevice(kBdf, k);
  ASSERT_TRUE(dev.ok()) << dev.status();
  EXPECT_EQ((*dev)->name(), kBdf);
}

TEST(KernelVfioOpen, MissingDevice) {
  FakeVfioKernel k;
  auto dev = OpenKernelVfioDevice("/sys/bus/pci/devices/0000:09:00.0", k);
  ASSERT_FALSE(dev.ok());
  EXPECT_EQ(dev.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(Msg(dev.status()), HasSubstr("no PCI device 0000:09:00.0"));
}

TEST(KernelVfioOpen, WrongDriverExplainsHowToBind) {
  FakeVfioKernel k;
  SetUpDevice(k, true, "nvme");
  auto dev = OpenKernelVfioDevice(kPath, k);
  ASSERT_FALSE(dev.ok());
  EXPECT_EQ(dev.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(Msg(dev.status()), HasSubstr("not bound to vfio-pci (driver: nvme); bind it with"));
  EXPECT_THAT(Msg(dev.status()),
              HasSubstr("echo vfio-pci > " + std::string(kPath) + "/driver_override"));
  EXPECT_EQ(k.open_fd_count(), 0);
}

TEST(KernelVfioOpen, NoDriver) {
  FakeVfioKernel k;
  SetUpDevice(k, false, "");
  auto dev = OpenKernelVfioDevice(kPath, k);
  ASSERT_FALSE(dev.ok());
  EXPECT_THAT(Msg(dev.status()), HasSubstr("not bound to vfio-pci (no driver)"));
}

TEST(KernelVfioOpen, GroupNotViableListsOtherDevices) {
  FakeVfioKernel k;
  SetUpDevice(k, false);
  k.AddGroupPeer("0000:01:00.1", "snd_hda_intel");
  auto dev = OpenKernelVfioDevice(kPath, k);
  ASSERT_FALSE(dev.ok());
  EXPECT_EQ(dev.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(Msg(dev.status()), HasSubstr("IOMMU group 12 is not viable"));
  EXPECT_THAT(Msg(dev.status()), HasSubstr("0000:01:00.1 (driver: snd_hda_intel)"));
  EXPECT_THAT(Msg(dev.status()), ::testing::Not(HasSubstr("0000:01:00.0 (")));
  EXPECT_EQ(k.open_fd_count(), 0);
}

TEST(KernelVfioOpen, GroupBusy) {
  FakeVfioKernel k;
  SetUpDevice(k, false);
  k.FailOpen("/dev/vfio/12", EBUSY);
  auto dev = OpenKernelVfioDevice(kPath, k);
  ASSERT_FALSE(dev.ok());
  EXPECT_THAT(Msg(dev.status()), HasSubstr("in use by another process"));
  EXPECT_EQ(k.open_fd_count(), 0);
}

TEST(KernelVfioOpen, DeviceBusyOnBothPaths) {
  for (bool cdev : {true, false}) {
    FakeVfioKernel k;
    SetUpDevice(k, cdev);
    k.device_busy = true;
    auto dev = OpenKernelVfioDevice(kPath, k);
    ASSERT_FALSE(dev.ok()) << cdev;
    EXPECT_EQ(dev.status().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_THAT(Msg(dev.status()), HasSubstr("in use by another process"));
    EXPECT_THAT(Msg(dev.status()),
                HasSubstr(cdev ? "VFIO_DEVICE_BIND_IOMMUFD" : "VFIO_GROUP_GET_DEVICE_FD"));
    EXPECT_EQ(k.open_fd_count(), 0);
  }
}

TEST(KernelVfioOpen, NoType1Support) {
  FakeVfioKernel k;
  SetUpDevice(k, false);
  k.type1v2 = false;
  auto dev = OpenKernelVfioDevice(kPath, k);
  ASSERT_FALSE(dev.ok());
  EXPECT_THAT(Msg(dev.status()), HasSubstr("no type1v2 IOMMU support"));
  EXPECT_EQ(k.ioctl_calls(VFIO_GROUP_SET_CONTAINER), 0);
  EXPECT_EQ(k.open_fd_count(), 0);
}

TEST(KernelVfioOpen, WrongApiVersion) {
  FakeVfioKernel k;
  SetUpDevice(k, false);
  k.api_version = 1;
  auto dev = OpenKernelVfioDevice(kPath, k);
  ASSERT_FALSE(dev.ok());
  EXPECT_THAT(Msg(dev.status()), HasSubstr("unsupported VFIO API version 1"));
}

TEST(KernelVfioOpen, NoIommuGroup) {
  FakeVfioKernel k;
  SetUpDevice(k, false);
  k.symlinks.erase(std::string(kPath) + "/iommu_group");
  auto dev = OpenKernelVfioDevice(kPath, k);
  ASSERT_FALSE(dev.ok());
  EXPECT_THAT(Msg(dev.status()), HasSubstr("has no IOMMU group"));
}

TEST(KernelVfioOpen, UnsupportedRegionLayouts) {
  struct Case {
    const char* what;
    void (*mutate)(FakeVfioKernel&);
    const char* msg;
  };
  const Case cases[] = {
      {"BAR not readable",
       [](FakeVfioKernel& k) { k.regions[0].flags &= ~VFIO_REGION_INFO_FLAG_READ; },
       "region 0 (size 0x4000) is not readable"},
      {"BAR not writable",
       [](FakeVfioKernel& k) { k.regions[2].flags &= ~VFIO_REGION_INFO_FLAG_WRITE; },
       "region 2 (size 0x1000) is not writable"},
      {"no config space", [](FakeVfioKernel& k) { k.regions[7].size = 0; },
       "empty config space region"},
      {"too few regions", [](FakeVfioKernel& k) { k.regions.resize(5); }, "5 regions"},
      {"not PCI", [](FakeVfioKernel& k) { k.device_flags = VFIO_DEVICE_FLAGS_PLATFORM; },
       "not a vfio-pci device"},
      {"sparse area outside BAR",
       [](FakeVfioKernel& k) {
         k.regions[0].sparse = std::vector<MmapArea>{{0x3000, 0x2000}};
       },
       "outside the region"},
  };
  for (const Case& c : cases) {
    for (bool cdev : {true, false}) {
      FakeVfioKernel k;
      SetUpDevice(k, cdev);
      c.mutate(k);
      auto dev = OpenKernelVfioDevice(kPath, k);
      ASSERT_FALSE(dev.ok()) << c.what;
      EXPECT_EQ(dev.status().code(), absl::StatusCode::kFailedPrecondition) << c.what;
      EXPECT_THAT(Msg(dev.status()), HasSubstr(c.msg)) << c.what;
      EXPECT_EQ(k.open_fd_count(), 0) << c.what;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Regions

TEST(KernelVfioRegions, InfoWithSparseMmapCapability) {
  FakeVfioKernel k;
  SetUpDevice(k, true);
  auto dev = MustOpen(k);
  ASSERT_NE(dev, nullptr);
  // Region 0 has caps that do not fit the first reply: asked again with the argsz it reported.
  EXPECT_EQ(k.ioctl_calls(VFIO_DEVICE_GET_REGION_INFO), 10);
  auto r0 = dev->GetRegionInfo(0);
  ASSERT_TRUE(r0.ok());
  EXPECT_EQ(r0->size, 0x4000u);
  EXPECT_TRUE(r0->readable && r0->writable && r0->mappable);
  ASSERT_EQ(r0->mmap_areas.size(), 2u);
  EXPECT_EQ(r0->mmap_areas[0].offset, 0u);
  EXPECT_EQ(r0->mmap_areas[0].size, 0x1000u);
  EXPECT_EQ(r0->mmap_areas[1].offset, 0x2000u);
  EXPECT_EQ(r0->mmap_areas[1].size, 0x2000u);
  auto r2 = dev->GetRegionInfo(2);
  ASSERT_TRUE(r2.ok());
  EXPECT_TRUE(r2->mappable);
  EXPECT_TRUE(r2->mmap_areas.empty());  // whole region
  auto r4 = dev->GetRegionInfo(4);
  ASSERT_TRUE(r4.ok());
  EXPECT_FALSE(r4->mappable);
  auto vga = dev->GetRegionInfo(8);  // EINVAL from the kernel on a non-VGA device: absent
  ASSERT_TRUE(vga.ok());
  EXPECT_EQ(vga->size, 0u);
  auto r1 = dev->GetRegionInfo(1);
  ASSERT_TRUE(r1.ok());
  EXPECT_EQ(r1->size, 0u);
  EXPECT_FALSE(dev->GetRegionInfo(9).ok());
}

TEST(KernelVfioRegions, SparseCapabilityWithoutAreasIsNotMappable) {
  FakeVfioKernel k;
  SetUpDevice(k, true);
  k.regions[0].sparse = std::vector<MmapArea>{};
  auto dev = MustOpen(k);
  ASSERT_NE(dev, nullptr);
  auto r0 = dev->GetRegionInfo(0);
  ASSERT_TRUE(r0.ok());
  EXPECT_FALSE(r0->mappable);
  EXPECT_FALSE(dev->MapRegion(0, 0, 0x1000).ok());
}

// Reply buffers for ParseRegionCaps: vfio_region_info + raw cap bytes.
struct Reply {
  std::vector<uint8_t> bytes;
  explicit Reply(uint32_t cap_offset, size_t total = 128, uint64_t region_size = 0x4000) {
    bytes.assign(total, 0);
    vfio_region_info ri = {};
    ri.argsz = total;
    ri.flags = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_MMAP | VFIO_REGION_INFO_FLAG_CAPS;
    ri.size = region_size;
    ri.cap_offset = cap_offset;
    std::memcpy(bytes.data(), &ri, sizeof(ri));
  }
  void Cap(uint32_t at, uint16_t id, uint32_t next) {
    vfio_info_cap_header h = {id, 1, next};
    std::memcpy(bytes.data() + at, &h, sizeof(h));
  }
  void Sparse(uint32_t at, uint32_t next, uint32_t nr, std::vector<MmapArea> areas) {
    Cap(at, VFIO_REGION_INFO_CAP_SPARSE_MMAP, next);
    std::memcpy(bytes.data() + at + 8, &nr, 4);
    for (size_t i = 0; i < areas.size(); ++i) {
      vfio_region_sparse_mmap_area a = {areas[i].offset, areas[i].size};
      std::memcpy(bytes.data() + at + 16 + 16 * i, &a, sizeof(a));
    }
  }
  absl::Status Parse(RegionInfo* out) {
    out->size = 0x4000;
    out->mappable = true;
    return ParseRegionCaps(bytes, out);
  }
};

TEST(KernelVfioRegions, ParseCapsAcceptsWellFormedChain) {
  Reply r(32);
  r.Cap(32, VFIO_REGION_INFO_CAP_MSIX_MAPPABLE, 40);
  r.Sparse(40, 0, 2, {{0, 0x1000}, {0x3000, 0x1000}});
  RegionInfo out;
  ASSERT_TRUE(r.Parse(&out).ok());
  ASSERT_EQ(out.mmap_areas.size(), 2u);
  EXPECT_EQ(out.mmap_areas[1].offset, 0x3000u);
}

TEST(KernelVfioRegions, ParseCapsRejectsMalformedChains) {
  RegionInfo out;
  {
    Reply r(200);  // first cap beyond the reply
    EXPECT_THAT(Msg(r.Parse(&out)), HasSubstr("out of range"));
  }
  {
    Reply r(124);  // header would straddle the end of the reply
    EXPECT_THAT(Msg(r.Parse(&out)), HasSubstr("out of range"));
  }
  {
    Reply r(8);  // points into the fixed struct
    EXPECT_THAT(Msg(r.Parse(&out)), HasSubstr("out of range"));
  }
  {
    Reply r(32);  // self loop
    r.Cap(32, VFIO_REGION_INFO_CAP_MSIX_MAPPABLE, 32);
    EXPECT_THAT(Msg(r.Parse(&out)), HasSubstr("out of range"));
  }
  {
    Reply r(32);  // two-cap loop
    r.Cap(32, VFIO_REGION_INFO_CAP_MSIX_MAPPABLE, 48);
    r.Cap(48, VFIO_REGION_INFO_CAP_TYPE, 32);
    EXPECT_THAT(Msg(r.Parse(&out)), HasSubstr("next must be >= 56"));
  }
  {
    Reply r(32);  // next beyond the reply
    r.Cap(32, VFIO_REGION_INFO_CAP_MSIX_MAPPABLE, 4096);
    EXPECT_THAT(Msg(r.Parse(&out)), HasSubstr("out of range"));
  }
  {
    Reply r(32);  // area count larger than the reply can hold
    r.Sparse(32, 0, 0xffffffffu, {});
    EXPECT_THAT(Msg(r.Parse(&out)), HasSubstr("claims 4294967295 areas"));
  }
  {
    Reply r(32);  // the sparse cap is bounded by the next cap, not by the reply end
    r.Sparse(32, 64, 2, {{0, 0x1000}});
    r.Cap(64, VFIO_REGION_INFO_CAP_MSIX_MAPPABLE, 0);
    EXPECT_THAT(Msg(r.Parse(&out)), HasSubstr("claims 2 areas, reply holds 1"));
  }
  {
    Reply r(32);  // area wraps around
    r.Sparse(32, 0, 1, {{0x1000, ~0ull}});
    EXPECT_THAT(Msg(r.Parse(&out)), HasSubstr("outside the region"));
  }
  {
    Reply r(120);  // truncated sparse cap at the end of the reply
    r.Cap(120, VFIO_REGION_INFO_CAP_SPARSE_MMAP, 0);
    EXPECT_THAT(Msg(r.Parse(&out)), HasSubstr("truncated sparse mmap"));
  }
}

TEST(KernelVfioRegions, HostileRegionInfoRepliesFailOpenCleanly) {
  for (int variant = 0; variant < 3; ++variant) {
    FakeVfioKernel k;
    SetUpDevice(k, variant % 2 == 0);
    FakeVfioKernel::Region& r = k.regions[2];
    if (variant == 0) {
      std::vector<uint8_t> raw(16, 0);
      vfio_info_cap_header h = {VFIO_REGION_INFO_CAP_MSIX_MAPPABLE, 1, 32};  // loop
      std::memcpy(raw.data(), &h, sizeof(h));
      r.raw_caps = raw;
      r.raw_cap_offset = 32;
    } else if (variant == 1) {
      r.demand_argsz = 1u << 30;  // implausible
    } else {
      r.demand_argsz = UINT32_MAX;  // never satisfied
    }
    auto dev = OpenKernelVfioDevice(kPath, k);
    ASSERT_FALSE(dev.ok()) << variant;
    EXPECT_THAT(Msg(dev.status()),
                HasSubstr(variant == 0 ? "unsupported region layout" : "implausible reply size"))
        << variant;
    EXPECT_EQ(k.open_fd_count(), 0);
  }
}

TEST(KernelVfioRegions, ReadWriteThroughDeviceFd) {
  FakeVfioKernel k;
  SetUpDevice(k, false);
  auto dev = MustOpen(k);
  ASSERT_NE(dev, nullptr);
  std::vector<uint8_t> w = {0x86, 0x80, 0x3c, 0x15};
  ASSERT_TRUE(dev->RegionWrite(kConfigRegionIndex, 0x40, w).ok());
  EXPECT_EQ(k.regions[7].data[0x41], 0x80);
  std::vector<uint8_t> r(4);
  ASSERT_TRUE(dev->RegionRead(kConfigRegionIndex, 0x40, std::span<uint8_t>(r)).ok());
  EXPECT_EQ(r, w);
  k.regions[0].data[0x3ff8] = 0x5a;
  std::vector<uint8_t> bar(8);
  ASSERT_TRUE(dev->RegionRead(0, 0x3ff8, std::span<uint8_t>(bar)).ok());
  EXPECT_EQ(bar[0], 0x5a);
  // Out of range, straddling the end, absent region, overflow.
  EXPECT_EQ(dev->RegionRead(0, 0x3ffc, std::span<uint8_t>(bar)).code(),
            absl::StatusCode::kOutOfRange);
  EXPECT_EQ(dev->RegionRead(kConfigRegionIndex, 0x100, std::span<uint8_t>(r)).code(),
            absl::StatusCode::kOutOfRange);
  EXPECT_EQ(dev->RegionRead(1, 0, std::span<uint8_t>(r)).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(dev->RegionWrite(0, ~0ull - 1, w).code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(dev->RegionRead(42, 0, std::span<uint8_t>(r)).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(KernelVfioRegions, MapOnlyInsideMmapAreas) {
  FakeVfioKernel k;
  SetUpDevice(k, true);
  auto dev = MustOpen(k);
  ASSERT_NE(dev, nullptr);
  auto m = dev->MapRegion(0, 0x2000, 0x2000);
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_NE(m->get(), nullptr);
  EXPECT_EQ(m->size(), 0x2000u);
  ASSERT_EQ(k.mmaps.size(), 1u);
  EXPECT_EQ(k.mmaps[0], std::make_pair(0u, uint64_t{0x2000}));
  // The trapped MSI-X page between the areas, a range spanning both areas, unaligned, empty.
  EXPECT_EQ(dev->MapRegion(0, 0x1000, 0x1000).status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(dev->MapRegion(0, 0, 0x4000).status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(dev->MapRegion(0, 0x2100, 0x1000).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(dev->MapRegion(0, 0x2000, 0).ok());
  EXPECT_FALSE(dev->MapRegion(4, 0, 0x1000).ok());  // I/O BAR: not mappable
  auto whole = dev->MapRegion(2, 0, 0x1000);
  EXPECT_TRUE(whole.ok()) << whole.status();
  EXPECT_EQ(dev->MapRegion(2, 0, 0x2000).status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(k.mmaps.size(), 2u);
}

// ---------------------------------------------------------------------------------------------
// Interrupts, reset

TEST(KernelVfioIrqs, InfoSetAndUnset) {
  FakeVfioKernel k;
  SetUpDevice(k, true);
  auto dev = MustOpen(k);
  ASSERT_NE(dev, nullptr);
  auto intx = dev->GetIrqInfo(kIntxIrqIndex);
  ASSERT_TRUE(intx.ok());
  EXPECT_EQ(intx->count, 1u);
  EXPECT_TRUE(intx->eventfd && intx->maskable && intx->automasked);
  auto msix = dev->GetIrqInfo(kMsixIrqIndex);
  ASSERT_TRUE(msix.ok());
  EXPECT_EQ(msix->count, 16u);
  EXPECT_FALSE(msix->automasked);
  EXPECT_FALSE(dev->GetIrqInfo(5).ok());

  const int fds[] = {21, 22, -1};
  ASSERT_TRUE(dev->SetIrqs(kMsixIrqIndex, 3, fds).ok());
  EXPECT_EQ(k.irqs[2].triggers[3], 21);
  EXPECT_EQ(k.irqs[2].triggers[4], 22);
  EXPECT_EQ(k.irqs[2].triggers[5], -1);
  const int past_end[] = {1, 2};
  absl::Status s = dev->SetIrqs(kMsixIrqIndex, 15, past_end);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Msg(s), HasSubstr("VFIO_DEVICE_SET_IRQS"));
  ASSERT_TRUE(dev->SetIrqs(kMsixIrqIndex, 0, {}).ok());
  EXPECT_EQ(k.irqs[2].triggers[3], -1);
  EXPECT_EQ(k.irqs[2].triggers[4], -1);

  ASSERT_TRUE(dev->SetIrqUnmaskFd(kIntxIrqIndex, 33).ok());
  EXPECT_EQ(k.irqs[0].unmask_fd, 33);
  ASSERT_TRUE(dev->SetIrqUnmaskFd(kIntxIrqIndex, -1).ok());
  EXPECT_EQ(k.irqs[0].unmask_fd, -1);
  EXPECT_FALSE(dev->SetIrqUnmaskFd(kMsixIrqIndex, 33).ok());  // MSI-X is not maskable here
}

TEST(KernelVfioReset, ResetAndNoResetSupport) {
  {
    FakeVfioKernel k;
    SetUpDevice(k, true);
    auto dev = MustOpen(k);
    ASSERT_NE(dev, nullptr);
    ASSERT_TRUE(dev->Reset().ok());
    EXPECT_EQ(k.reset_count, 1);
  }
  {
    FakeVfioKernel k;
    SetUpDevice(k, false);
    k.device_flags = VFIO_DEVICE_FLAGS_PCI;
    auto dev = MustOpen(k);
    ASSERT_NE(dev, nullptr);
    EXPECT_EQ(dev->Reset().code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_EQ(k.ioctl_calls(VFIO_DEVICE_RESET), 0);
  }
}

// ---------------------------------------------------------------------------------------------
// DMA

class KernelVfioDma : public ::testing::TestWithParam<bool> {};

TEST_P(KernelVfioDma, MapUnmapAndOverlap) {
  FakeVfioKernel k;
  SetUpDevice(k, GetParam());
  auto dev = MustOpen(k);
  ASSERT_NE(dev, nullptr);
  static char ram[0x10000];
  ASSERT_TRUE(dev->DmaMap(0x100000, 0x10000, ram, -1, 0, true).ok());
  ASSERT_TRUE(dev->DmaMap(0x200000, 0x1000, ram, -1, 0, false).ok());
  ASSERT_EQ(k.dma.size(), 2u);
  EXPECT_EQ(k.dma.at(0x100000).vaddr, reinterpret_cast<uint64_t>(ram));
  EXPECT_TRUE(k.dma.at(0x100000).writable);
  EXPECT_FALSE(k.dma.at(0x200000).writable);

  absl::Status overlap = dev->DmaMap(0x10f000, 0x2000, ram, -1, 0, true);
  EXPECT_EQ(overlap.code(), absl::StatusCode::kAlreadyExists);
  EXPECT_THAT(Msg(overlap), HasSubstr("overlaps an existing DMA mapping"));
  EXPECT_THAT(Msg(overlap), HasSubstr(GetParam() ? "IOMMU_IOAS_MAP" : "VFIO_IOMMU_MAP_DMA"));
  EXPECT_FALSE(dev->DmaMap(0x300000, 0, ram, -1, 0, true).ok());
  EXPECT_FALSE(dev->DmaMap(~0ull - 0xfff, 0x2000, ram, -1, 0, true).ok());  // wraps
  EXPECT_EQ(k.dma.size(), 2u);

  EXPECT_FALSE(dev->DmaUnmap(0x100000, 0x1000).ok());  // bisects a mapping
  ASSERT_TRUE(dev->DmaUnmap(0x100000, 0x10000).ok());
  EXPECT_EQ(dev->DmaUnmap(0x100000, 0x10000).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(k.dma.size(), 1u);
  // A range covering more than the mapping unmaps less than asked: reported.
  absl::Status partial = dev->DmaUnmap(0x200000, 0x2000);
  EXPECT_EQ(partial.code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(k.dma.empty());
}

INSTANTIATE_TEST_SUITE_P(BothPaths, KernelVfioDma, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& p) {
                           return p.param ? "Iommufd" : "Type1";
                         });

// ---------------------------------------------------------------------------------------------
// Migration v2

std::vector<uint8_t> ReadAll(KernelVfioDevice& dev, size_t chunk) {
  std::vector<uint8_t> out, buf(chunk);
  for (int guard = 0; guard < 1000; ++guard) {
    auto n = dev.ReadMigData(buf);
    EXPECT_TRUE(n.ok()) << n.status();
    if (!n.ok() || *n == 0) break;
    out.insert(out.end(), buf.begin(), buf.begin() + *n);
  }
  return out;
}

TEST(KernelVfioMigration, Caps) {
  {
    FakeVfioKernel k;
    SetUpDevice(k, true);
    auto dev = MustOpen(k);
    ASSERT_NE(dev, nullptr);
    auto caps = dev->GetMigrationCaps();
    ASSERT_TRUE(caps.ok()) << caps.status();
    EXPECT_TRUE(caps->supported && caps->p2p && caps->pre_copy && caps->dma_logging);
  }
  {
    FakeVfioKernel k;
    SetUpDevice(k, true);
    k.mig_supported = false;  // ENOTTY: plain vfio-pci without a migration driver
    k.dma_logging_supported = false;
    auto dev = MustOpen(k);
    ASSERT_NE(dev, nullptr);
    auto caps = dev->GetMigrationCaps();
    ASSERT_TRUE(caps.ok()) << caps.status();
    EXPECT_FALSE(caps->supported || caps->p2p || caps->pre_copy || caps->dma_logging);
    EXPECT_FALSE(dev->GetMigState().ok());
  }
  {
    FakeVfioKernel k;
    SetUpDevice(k, true);
    auto dev = MustOpen(k);
    ASSERT_NE(dev, nullptr);
    k.FailIoctl(VFIO_DEVICE_FEATURE, EIO);  // a real failure is not "unsupported"
    EXPECT_FALSE(dev->GetMigrationCaps().ok());
  }
}

TEST(KernelVfioMigration, StopCopyReadsStateToEof) {
  FakeVfioKernel k;
  SetUpDevice(k, false);
  auto dev = MustOpen(k);
  ASSERT_NE(dev, nullptr);
  const int base_fds = k.open_fd_count();
  EXPECT_EQ(*dev->GetMigState(), MigState::kRunning);
  ASSERT_TRUE(dev->SetMigState(MigState::kStop).ok());
  EXPECT_FALSE(dev->has_mig_data_fd());
  ASSERT_TRUE(dev->SetMigState(MigState::kStopCopy).ok());
  EXPECT_TRUE(dev->has_mig_data_fd());
  EXPECT_EQ(k.open_fd_count(), base_fds + 1);
  EXPECT_EQ(*dev->GetMigState(), MigState::kStopCopy);
  EXPECT_EQ(ReadAll(*dev, 16), k.state_blob);  // fake hands out 7 bytes per read
  ASSERT_TRUE(dev->SetMigState(MigState::kStop).ok());
  EXPECT_FALSE(dev->has_mig_data_fd());
  EXPECT_EQ(k.open_fd_count(), base_fds);
  EXPECT_EQ(dev->ReadMigData(std::span<uint8_t>()).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST(KernelVfioMigration, ResumingWritesState) {
  FakeVfioKernel k;
  SetUpDevice(k, true);
  auto dev = MustOpen(k);
  ASSERT_NE(dev, nullptr);
  ASSERT_TRUE(dev->SetMigState(MigState::kStop).ok());
  EXPECT_FALSE(dev->WriteMigData(std::vector<uint8_t>{1}).ok());  // no session yet
  ASSERT_TRUE(dev->SetMigState(MigState::kResuming).ok());
  std::vector<uint8_t> blob(23);
  for (size_t i = 0; i < blob.size(); ++i) blob[i] = i * 7;
  ASSERT_TRUE(dev->WriteMigData(blob).ok());  // fake accepts 5 bytes per write
  ASSERT_TRUE(dev->SetMigState(MigState::kStop).ok());
  EXPECT_EQ(k.resumed_blob, blob);
  ASSERT_TRUE(dev->SetMigState(MigState::kRunning).ok());
  EXPECT_EQ(*dev->GetMigState(), MigState::kRunning);
}

TEST(KernelVfioMigration, RejectedResumeLeavesErrorUntilReset) {
  FakeVfioKernel k;
  SetUpDevice(k, true);
  k.reject_resume = true;
  auto dev = MustOpen(k);
  ASSERT_NE(dev, nullptr);
  ASSERT_TRUE(dev->SetMigState(MigState::kStop).ok());
  ASSERT_TRUE(dev->SetMigState(MigState::kResuming).ok());
  ASSERT_TRUE(dev->WriteMigData(std::vector<uint8_t>{1, 2, 3}).ok());
  absl::Status s = dev->SetMigState(MigState::kStop);
  EXPECT_FALSE(s.ok());
  EXPECT_THAT(Msg(s), HasSubstr("migration state -> STOP"));
  EXPECT_EQ(*dev->GetMigState(), MigState::kError);
  ASSERT_TRUE(dev->Reset().ok());
  EXPECT_FALSE(dev->has_mig_data_fd());
  EXPECT_EQ(*dev->GetMigState(), MigState::kRunning);
  dev.reset();
  EXPECT_EQ(k.open_fd_count(), 0);
}

TEST(KernelVfioMigration, PreCopyThenStopCopyOnSameFd) {
  FakeVfioKernel k;
  SetUpDevice(k, true);
  auto dev = MustOpen(k);
  ASSERT_NE(dev, nullptr);
  ASSERT_TRUE(dev->SetMigState(MigState::kPreCopy).ok());
  EXPECT_EQ(ReadAll(*dev, 64), k.precopy_blob);  // ends with ENOMSG: "nothing more for now"
  ASSERT_TRUE(dev->SetMigState(MigState::kPreCopyP2p).ok());
  ASSERT_TRUE(dev->SetMigState(MigState::kStopCopy).ok());  // kernel returns no new fd
  EXPECT_TRUE(dev->has_mig_data_fd());
  EXPECT_EQ(ReadAll(*dev, 64), k.state_blob);
  ASSERT_TRUE(dev->SetMigState(MigState::kStop).ok());
  EXPECT_FALSE(dev->has_mig_data_fd());
}

TEST(KernelVfioMigration, BadArcsAndRequests) {
  FakeVfioKernel k;
  SetUpDevice(k, true);
  auto dev = MustOpen(k);
  ASSERT_NE(dev, nullptr);
  absl::Status s = dev->SetMigState(MigState::kStopCopy);  // RUNNING -> STOP_COPY: not one arc
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(Msg(s), HasSubstr("STOP_COPY"));
  EXPECT_EQ(dev->SetMigState(MigState::kError).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(dev->SetMigState(static_cast<MigState>(99)).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(dev->has_mig_data_fd());
}

TEST(KernelVfioMigration, StrayDataFdFromKernelIsClosed) {
  FakeVfioKernel k;
  SetUpDevice(k, true);
  auto dev = MustOpen(k);
  ASSERT_NE(dev, nullptr);
  const int base_fds = k.open_fd_count();
  k.stray_data_fd = true;
  ASSERT_TRUE(dev->SetMigState(MigState::kStop).ok());
  EXPECT_FALSE(dev->has_mig_data_fd());
  EXPECT_EQ(k.open_fd_count(), base_fds);
}

TEST(KernelVfioIrqs, BogusVectorCountRejected) {
  FakeVfioKernel k;
  SetUpDevice(k, true);
  auto dev = MustOpen(k);
  ASSERT_NE(dev, nullptr);
  k.irqs[2].count = 100000;
  EXPECT_FALSE(dev->GetIrqInfo(kMsixIrqIndex).ok());
}

TEST(KernelVfioMigration, DestroyMidSessionLeaksNothing) {
  FakeVfioKernel k;
  SetUpDevice(k, false);
  auto dev = MustOpen(k);
  ASSERT_NE(dev, nullptr);
  ASSERT_TRUE(dev->SetMigState(MigState::kStop).ok());
  ASSERT_TRUE(dev->SetMigState(MigState::kStopCopy).ok());
  dev.reset();
  EXPECT_EQ(k.open_fd_count(), 0);
}

// ---------------------------------------------------------------------------------------------
// DMA logging

TEST(KernelVfioDmaLogging, StartReportStop) {
  FakeVfioKernel k;
  SetUpDevice(k, true);
  auto dev = MustOpen(k);
  ASSERT_NE(dev, nullptr);
  const DmaRange ranges[] = {{0x100000, 0x40000}, {0x1000000, 0x1000}};
  ASSERT_TRUE(dev->StartDmaLogging(ranges, 4096).ok());
  EXPECT_TRUE(k.logging);
  EXPECT_EQ(k.logging_page_size, 4096u);
  ASSERT_EQ(k.logging_ranges.size(), 2u);
  EXPECT_EQ(k.logging_ranges[1], std::make_pair(uint64_t{0x1000000}, uint64_t{0x1000}));
  EXPECT_FALSE(dev->StartDmaLogging(ranges, 4096).ok());  // already started

  k.dirty_pages = {0x100000, 0x103000, 0x13f000, 0x1000000};
  std::vector<uint64_t> bitmap(1, 0);
  ASSERT_TRUE(dev->ReportDmaDirty(0x100000, 0x40000, 4096, bitmap).ok());
  EXPECT_EQ(bitmap[0], (1ull << 0) | (1ull << 3) | (1ull << 63));
  std::vector<uint64_t> again(1, 0);
  ASSERT_TRUE(dev->ReportDmaDirty(0x100000, 0x40000, 4096, again).ok());
  EXPECT_EQ(again[0], 0u);              // reporting cleared the range
  EXPECT_EQ(k.dirty_pages.size(), 1u);  // the other range is untouched

  std::vector<uint64_t> small(1, 0);
  EXPECT_EQ(dev->ReportDmaDirty(0x100000, 0x41000, 4096, small).code(),
            absl::StatusCode::kInvalidArgument);  // 65 pages need 2 words
  EXPECT_EQ(dev->ReportDmaDirty(0x100000, 0x1000, 3000, small).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(dev->StartDmaLogging({}, 4096).ok());

  ASSERT_TRUE(dev->StopDmaLogging().ok());
  EXPECT_FALSE(k.logging);
  EXPECT_FALSE(dev->ReportDmaDirty(0x100000, 0x1000, 4096, small).ok());  // not logging
}

TEST(KernelVfioDmaLogging, UnsupportedIsUnimplemented) {
  FakeVfioKernel k;
  SetUpDevice(k, true);
  k.dma_logging_supported = false;
  auto dev = MustOpen(k);
  ASSERT_NE(dev, nullptr);
  const DmaRange ranges[] = {{0, 0x1000}};
  EXPECT_EQ(dev->StartDmaLogging(ranges, 4096).code(), absl::StatusCode::kUnimplemented);
  std::vector<uint64_t> bm(1);
  EXPECT_EQ(dev->ReportDmaDirty(0, 0x1000, 4096, bm).code(), absl::StatusCode::kUnimplemented);
  EXPECT_EQ(dev->StopDmaLogging().code(), absl::StatusCode::kUnimplemented);
}

// ---------------------------------------------------------------------------------------------
// Injected failures

TEST(KernelVfioFailures, EintrIsRetried) {
  for (bool cdev : {true, false}) {
    FakeVfioKernel k;
    SetUpDevice(k, cdev);
    k.FailIoctl(VFIO_DEVICE_GET_INFO, EINTR, 3);
    k.FailIoctl(VFIO_DEVICE_GET_REGION_INFO, EINTR);
    k.FailOpen(cdev ? "/dev/iommu" : "/dev/vfio/12", EINTR, 2);
    auto dev = MustOpen(k);
    ASSERT_NE(dev, nullptr);
    EXPECT_EQ(k.ioctl_calls(VFIO_DEVICE_GET_INFO), 4);
    k.FailIoctl(VFIO_DEVICE_RESET, EINTR, 2);
    EXPECT_TRUE(dev->Reset().ok());
    EXPECT_EQ(k.reset_count, 1);
  }
}

TEST(KernelVfioFailures, EveryOpenStepFailingOnce) {
  const std::vector<unsigned long> cdev_ioctls = {
      uapi::kVfioDeviceBindIommufd, uapi::kIommuIoasAlloc, uapi::kVfioDeviceAttachIommufdPt,
      VFIO_DEVICE_GET_INFO, VFIO_DEVICE_GET_REGION_INFO};
  const std::vector<unsigned long> group_ioctls = {
      VFIO_GROUP_GET_STATUS, VFIO_GET_API_VERSION,
      VFIO_CHECK_EXTENSION,  VFIO_GROUP_SET_CONTAINER,
      VFIO_SET_IOMMU,        VFIO_GROUP_GET_DEVICE_FD,
      VFIO_DEVICE_GET_INFO,  VFIO_DEVICE_GET_REGION_INFO};
  int checked = 0;
  for (bool cdev : {true, false}) {
    for (unsigned long req : cdev ? cdev_ioctls : group_ioctls) {
      FakeVfioKernel k;
      SetUpDevice(k, cdev);
      k.FailIoctl(req, EIO);
      auto dev = OpenKernelVfioDevice(kPath, k);
      ASSERT_FALSE(dev.ok()) << uapi::IoctlName(req);
      EXPECT_THAT(Msg(dev.status()), HasSubstr(uapi::IoctlName(req)));
      EXPECT_THAT(Msg(dev.status()), HasSubstr("Input/output error"));
      EXPECT_THAT(Msg(dev.status()), HasSubstr(kBdf));
      EXPECT_EQ(k.open_fd_count(), 0) << uapi::IoctlName(req);
      ++checked;
    }
    const std::vector<std::string> nodes =
        cdev ? std::vector<std::string>{"/dev/iommu", "/dev/vfio/devices/vfio0"}
             : std::vector<std::string>{"/dev/vfio/12", "/dev/vfio/vfio"};
    for (const std::string& node : nodes) {
      FakeVfioKernel k;
      SetUpDevice(k, cdev);
      k.FailOpen(node, EACCES);
      auto dev = OpenKernelVfioDevice(kPath, k);
      ASSERT_FALSE(dev.ok()) << node;
      EXPECT_EQ(dev.status().code(), absl::StatusCode::kPermissionDenied) << node;
      EXPECT_THAT(Msg(dev.status()), HasSubstr(node));
      EXPECT_EQ(k.open_fd_count(), 0) << node;
      ++checked;
    }
  }
  EXPECT_EQ(checked, 17);
}

TEST(KernelVfioFailures, EveryDeviceOperationFailingOnceRecovers) {
  for (bool cdev : {true, false}) {
    FakeVfioKernel k;
    SetUpDevice(k, cdev);
    auto dev = MustOpen(k);
    ASSERT_NE(dev, nullptr);
    const int fds_open = k.open_fd_count();
    static char ram[0x1000];
    const int efd[] = {5};
    const DmaRange ranges[] = {{0, 0x1000}};
    std::vector<uint64_t> bm(1);
    std::vector<uint8_t> buf(4);
    const unsigned long map_req = cdev ? uapi::kIommuIoasMap : VFIO_IOMMU_MAP_DMA;
    const unsigned long unmap_req = cdev ? uapi::kIommuIoasUnmap : VFIO_IOMMU_UNMAP_DMA;
    struct Op {
      unsigned long req;
      std::function<absl::Status()> run;
    };
    const std::vector<Op> ops = {
        {VFIO_DEVICE_GET_IRQ_INFO, [&] { return dev->GetIrqInfo(2).status(); }},
        {VFIO_DEVICE_SET_IRQS, [&] { return dev->SetIrqs(2, 0, efd); }},
        {VFIO_DEVICE_SET_IRQS, [&] { return dev->SetIrqUnmaskFd(0, 5); }},
        {VFIO_DEVICE_RESET, [&] { return dev->Reset(); }},
        {map_req, [&] { return dev->DmaMap(0x1000, 0x1000, ram, -1, 0, true); }},
        {unmap_req, [&] { return dev->DmaUnmap(0x1000, 0x1000); }},
        {VFIO_DEVICE_FEATURE, [&] { return dev->GetMigrationCaps().status(); }},
        {VFIO_DEVICE_FEATURE, [&] { return dev->GetMigState().status(); }},
        {VFIO_DEVICE_FEATURE, [&] { return dev->SetMigState(MigState::kStop); }},
        {VFIO_DEVICE_FEATURE, [&] { return dev->SetMigState(MigState::kRunning); }},
        {VFIO_DEVICE_FEATURE, [&] { return dev->StartDmaLogging(ranges, 4096); }},
        {VFIO_DEVICE_FEATURE, [&] { return dev->ReportDmaDirty(0, 0x1000, 4096, bm); }},
        {VFIO_DEVICE_FEATURE, [&] { return dev->StopDmaLogging(); }},
    };
    for (const Op& op : ops) {
      k.FailIoctl(op.req, EIO);
      absl::Status s = op.run();
      EXPECT_FALSE(s.ok()) << uapi::IoctlName(op.req);
      EXPECT_THAT(Msg(s), HasSubstr(uapi::IoctlName(op.req)));
      EXPECT_THAT(Msg(s), HasSubstr("Input/output error"));
      EXPECT_TRUE(op.run().ok()) << uapi::IoctlName(op.req);  // the same call then works
      EXPECT_EQ(k.open_fd_count(), fds_open);
    }
    // pread/pwrite failures surface too.
    EXPECT_FALSE(dev->RegionRead(1, 0, std::span<uint8_t>(buf)).ok());
  }
}

}  // namespace
}  // namespace microvmm::vfio
