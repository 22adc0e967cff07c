#include "devices/vfio/kernel/kernel_vfio_device.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "devices/vfio/kernel/vfio_uapi.h"
#include "vmm/base/log.h"
#include "vmm/base/status.h"

namespace microvmm::vfio {
namespace {

constexpr uint32_t kNumPciRegions = VFIO_PCI_NUM_REGIONS;  // BAR0-5, ROM, config, VGA
constexpr size_t kMaxInfoReply = 64 * 1024;  // bound on a (possibly hostile) argsz request
constexpr int kMaxCaps = 64;
constexpr uint32_t kMaxIrqVectors = 2048;  // MSI-X maximum
constexpr int kMaxEintrRetries = 1000;
constexpr uint64_t kPageSize = 4096;

// Retries a -1/EINTR system call; returns the final result (errno preserved).
template <typename F>
auto RetryEintr(F f) -> decltype(f()) {
  decltype(f()) r;
  int tries = 0;
  do {
    r = f();
  } while (r == -1 && errno == EINTR && ++tries < kMaxEintrRetries);
  return r;
}

std::string Basename(const std::string& path) {
  size_t slash = path.find_last_of('/');
  return slash == std::string::npos ? path : path.substr(slash + 1);
}

// vfio-pci itself or a vendor variant driver built on vfio-pci-core (mlx5_vfio_pci,
// hisi_acc_vfio_pci, virtio_vfio_pci, ...), which is where migration support lives.
bool IsVfioPciDriver(const std::string& driver) {
  if (driver == "vfio-pci") return true;
  const std::string suffix = "vfio_pci";
  return driver.size() > suffix.size() &&
         driver.compare(driver.size() - suffix.size(), suffix.size(), suffix) == 0;
}

bool IsPowerOfTwo(uint64_t v) { return v != 0 && (v & (v - 1)) == 0; }

// Checks [start, start+len) does not wrap.
bool RangeOk(uint64_t start, uint64_t len) { return len != 0 && start + len - 1 >= start; }

// Migration states that own a data transfer session (data_fd).
bool StateHasDataSession(MigState s) {
  return s == MigState::kStopCopy || s == MigState::kResuming || s == MigState::kPreCopy ||
         s == MigState::kPreCopyP2p;
}

absl::Status SysError(int err, const std::string& what) {
  if (err == EBUSY) {
    return absl::FailedPreconditionError(
        absl::StrCat(what,
                     ": device is in use by another process (another VMM or VFIO user "
                     "holds it; find it with `fuser -v /dev/vfio/*`)"));
  }
  return ErrnoStatus(err, what);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Capability chain parsing. The chain lives inside the reply buffer; offsets are relative to its
// start. The kernel always builds it forward (each cap after the previous one), so we require
// strictly increasing offsets: that rules out loops without a visited set.
absl::Status ParseRegionCaps(std::span<const uint8_t> buf, RegionInfo* out) {
  vfio_region_info hdr;
  if (buf.size() < sizeof(hdr)) return absl::InvalidArgumentError("region info reply too short");
  std::memcpy(&hdr, buf.data(), sizeof(hdr));
  if (!(hdr.flags & VFIO_REGION_INFO_FLAG_CAPS) || hdr.cap_offset == 0) return absl::OkStatus();

  bool sparse_seen = false;
  std::vector<MmapArea> areas;
  uint64_t off = hdr.cap_offset;
  uint64_t min_off = sizeof(hdr);
  for (int n = 0; off != 0; ++n) {
    if (n >= kMaxCaps) return absl::InvalidArgumentError("region capability chain too long");
    if (off < min_off || off > buf.size() || buf.size() - off < sizeof(vfio_info_cap_header)) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "region %u: capability offset %u out of range (reply %u bytes, next must be >= %u)",
          hdr.index, off, buf.size(), min_off));
    }
    vfio_info_cap_header cap;
    std::memcpy(&cap, buf.data() + off, sizeof(cap));
    // This capability extends to the next one, or to the end of the reply.
    uint64_t end = (cap.next > off && cap.next <= buf.size()) ? cap.next : buf.size();
    if (cap.id == VFIO_REGION_INFO_CAP_SPARSE_MMAP) {
      vfio_region_info_cap_sparse_mmap sp;
      if (end - off < sizeof(sp)) {
        return absl::InvalidArgumentError(
            absl::StrFormat("region %u: truncated sparse mmap capability", hdr.index));
      }
      std::memcpy(&sp, buf.data() + off, sizeof(sp));
      uint64_t room = (end - off - sizeof(sp)) / sizeof(vfio_region_sparse_mmap_area);
      if (sp.nr_areas > room) {
        return absl::InvalidArgumentError(
            absl::StrFormat("region %u: sparse mmap capability claims %u areas, reply holds %u",
                            hdr.index, sp.nr_areas, room));
      }
      sparse_seen = true;
      for (uint32_t i = 0; i < sp.nr_areas; ++i) {
        vfio_region_sparse_mmap_area a;
        std::memcpy(&a, buf.data() + off + sizeof(sp) + i * sizeof(a), sizeof(a));
        if (a.size == 0) continue;
        if (a.offset > hdr.size || a.size > hdr.size - a.offset) {
          return absl::InvalidArgumentError(absl::StrFormat(
              "region %u: sparse mmap area [%#x, +%#x) outside the region (size %#x)", hdr.index,
              a.offset, a.size, hdr.size));
        }
        areas.push_back({a.offset, a.size});
      }
    }
    // Other capabilities (MSIX_MAPPABLE, TYPE, ...) carry nothing the interface exposes.
    min_off = off + sizeof(cap);
    off = cap.next;
  }
  if (sparse_seen && out->mappable) {
    out->mmap_areas = std::move(areas);
    // A sparse capability without areas: nothing may be mapped (the whole region is trapped).
    if (out->mmap_areas.empty()) out->mappable = false;
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Open

absl::StatusOr<std::unique_ptr<KernelVfioDevice>> OpenKernelVfioDevice(
    const std::string& sysfs_path_in, VfioSys& sys) {
  std::string path = sysfs_path_in;
  if (path.find('/') == std::string::npos) path = "/sys/bus/pci/devices/" + path;
  while (path.size() > 1 && path.back() == '/') path.pop_back();
  const std::string bdf = Basename(path);

  std::vector<std::string> entries;
  if (sys.ReadDir(path, &entries) != 0) {
    int err = errno;
    if (err == ENOENT) {
      return absl::NotFoundError(
          absl::StrFormat("no PCI device %s (%s does not exist)", bdf, path));
    }
    return ErrnoStatus(err, absl::StrCat("reading ", path));
  }

  const std::string bind_hint = absl::StrFormat(
      "bind it with: echo %1$s > /sys/bus/pci/devices/%1$s/driver/unbind; "
      "echo vfio-pci > /sys/bus/pci/devices/%1$s/driver_override; "
      "echo %1$s > /sys/bus/pci/drivers_probe",
      bdf);
  std::string driver;
  if (sys.Readlink(path + "/driver", &driver) != 0) {
    int err = errno;
    if (err != ENOENT) return ErrnoStatus(err, absl::StrCat("reading ", path, "/driver"));
    return absl::FailedPreconditionError(
        absl::StrFormat("%s is not bound to vfio-pci (no driver); %s", bdf, bind_hint));
  }
  driver = Basename(driver);
  if (!IsVfioPciDriver(driver)) {
    return absl::FailedPreconditionError(
        absl::StrFormat("%s is not bound to vfio-pci (driver: %s); %s", bdf, driver, bind_hint));
  }

  std::unique_ptr<KernelVfioDevice> dev(new KernelVfioDevice(sys, bdf));

  // Prefer the device cdev + iommufd (Linux >= 6.6); fall back to the group/container API only
  // when that path is absent (no vfio-dev node, no /dev/iommu), not when it fails.
  std::string cdev;
  std::vector<std::string> vfio_dev;
  if (sys.ReadDir(path + "/vfio-dev", &vfio_dev) == 0) {
    for (const std::string& e : vfio_dev) {
      if (e.rfind("vfio", 0) == 0) cdev = e;
    }
  }
  bool opened = false;
  if (!cdev.empty()) {
    int iommu_fd = RetryEintr([&] { return sys.Open("/dev/iommu", O_RDWR); });
    if (iommu_fd >= 0) {
      dev->iommufd_ = SysFd(&sys, iommu_fd);
      bool absent = false;
      absl::Status s = dev->OpenViaCdev(cdev, &absent);
      if (!s.ok() && !absent) return s;
      if (absent) {
        LOG_INFO("%s: %s, using the VFIO group/container interface", bdf, s.message());
        dev->iommufd_.reset();
      }
      opened = !absent;
    } else if (errno != ENOENT) {
      const int err = errno;
      return ErrnoStatus(err, absl::StrCat(bdf, ": opening /dev/iommu"));
    } else {
      LOG_INFO("%s: no /dev/iommu, using the VFIO group/container interface", bdf);
    }
  }
  if (!opened) {
    if (absl::Status s = dev->OpenViaGroup(path); !s.ok()) return s;
  }
  if (absl::Status s = dev->ProbeLayout(); !s.ok()) return s;
  LOG_INFO("%s: opened via %s (%u regions, %u irqs, reset %s)", bdf,
           dev->path_ == KernelVfioPath::kIommufdCdev ? "vfio cdev + iommufd"
                                                      : "vfio group + type1v2 container",
           dev->info_.num_regions, dev->info_.num_irqs, dev->info_.can_reset ? "yes" : "no");
  return dev;
}

KernelVfioDevice::~KernelVfioDevice() = default;

absl::Status KernelVfioDevice::OpenViaCdev(const std::string& cdev_name, bool* absent) {
  path_ = KernelVfioPath::kIommufdCdev;
  const std::string node = "/dev/vfio/devices/" + cdev_name;
  int fd = RetryEintr([&] { return sys_.Open(node, O_RDWR); });
  if (fd < 0) {
    const int err = errno;
    *absent = err == ENOENT;  // sysfs knows the cdev but /dev has no node: use the group
    return SysError(err, absl::StrCat(name_, ": opening ", node));
  }
  device_ = SysFd(&sys_, fd);

  uapi::vfio_device_bind_iommufd bind = {};
  bind.argsz = sizeof(bind);
  bind.iommufd = iommufd_.get();
  if (absl::Status s = DeviceIoctl(uapi::kVfioDeviceBindIommufd, &bind, "binding to iommufd");
      !s.ok()) {
    return s;
  }
  uapi::iommu_ioas_alloc alloc = {};
  alloc.size = sizeof(alloc);
  if (RetryEintr([&] { return sys_.Ioctl(iommufd_.get(), uapi::kIommuIoasAlloc, &alloc); }) != 0) {
    const int err = errno;
    return SysError(err, absl::StrCat(name_, ": IOMMU_IOAS_ALLOC"));
  }
  ioas_id_ = alloc.out_ioas_id;
  dev_id_ = bind.out_devid;
  // A device without its own DMA logging can still be migrated without counting all its RAM as
  // dirty when the IOMMU tracks dirty IOPTEs: try that first, the plain IOAS attach otherwise.
  if (absl::Status s = AttachDirtyTrackingHwpt(); s.ok()) {
    LOG_INFO("%s: attached to IOMMU HWPT %u with dirty tracking (IOAS %u)", name_, hwpt_id_,
             ioas_id_);
    return absl::OkStatus();
  } else if (absl::IsUnimplemented(s)) {
    LOG_INFO("%s: %s; attaching to the IOAS", name_, s.message());
  } else {
    LOG_WARN("%s: IOMMU dirty tracking unavailable (%s); attaching to the IOAS", name_,
             s.message());
  }
  uapi::vfio_device_attach_iommufd_pt attach = {};
  attach.argsz = sizeof(attach);
  attach.pt_id = ioas_id_;
  return DeviceIoctl(uapi::kVfioDeviceAttachIommufdPt, &attach, "attaching to the IOAS");
}

absl::Status KernelVfioDevice::AttachDirtyTrackingHwpt() {
  uapi::iommu_hw_info hw = {};
  hw.size = sizeof(hw);
  hw.dev_id = dev_id_;  // data_len 0: the vendor-specific part is not needed
  if (absl::Status s = IommufdIoctl(uapi::kIommuGetHwInfo, &hw, "IOMMU capabilities"); !s.ok()) {
    if (last_err_ == ENOTTY) {
      return absl::UnimplementedError("kernel without IOMMU_GET_HW_INFO: no IOMMU dirty tracking");
    }
    return s;
  }
  if (!(hw.out_capabilities & uapi::kIommuHwCapDirtyTracking)) {
    return absl::UnimplementedError("the IOMMU cannot track dirty pages");
  }
  uapi::iommu_hwpt_alloc alloc = {};
  alloc.size = sizeof(alloc);
  alloc.flags = uapi::kIommuHwptAllocDirtyTracking;
  alloc.dev_id = dev_id_;
  alloc.pt_id = ioas_id_;
  alloc.data_type = uapi::kIommuHwptDataNone;
  if (absl::Status s = IommufdIoctl(uapi::kIommuHwptAlloc, &alloc, "dirty-tracking HWPT");
      !s.ok()) {
    return s;
  }
  uapi::vfio_device_attach_iommufd_pt attach = {};
  attach.argsz = sizeof(attach);
  attach.pt_id = alloc.out_hwpt_id;
  absl::Status s = DeviceIoctl(uapi::kVfioDeviceAttachIommufdPt, &attach,
                               "attaching to the dirty-tracking HWPT");
  if (!s.ok()) {
    // Not attached: drop the HWPT now rather than keep an unused IOMMU domain until close.
    uapi::iommu_destroy d = {sizeof(d), alloc.out_hwpt_id};
    if (absl::Status ds = IommufdIoctl(uapi::kIommuDestroy, &d, "unused HWPT"); !ds.ok()) {
      LOG_WARN("%s", ds.message());  // freed with the iommufd anyway
    }
    return s;
  }
  hwpt_id_ = alloc.out_hwpt_id;
  return absl::OkStatus();
}

absl::Status KernelVfioDevice::OpenViaGroup(const std::string& sysfs_path) {
  path_ = KernelVfioPath::kGroupContainer;
  std::string link;
  if (sys_.Readlink(sysfs_path + "/iommu_group", &link) != 0) {
    if (errno == ENOENT) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "%s has no IOMMU group (is the IOMMU enabled? intel_iommu=on / amd_iommu=on)", name_));
    }
    const int err = errno;
    return ErrnoStatus(err, absl::StrCat(name_, ": reading iommu_group"));
  }
  const std::string group = Basename(link);
  const std::string group_node = "/dev/vfio/" + group;
  int gfd = RetryEintr([&] { return sys_.Open(group_node, O_RDWR); });
  if (gfd < 0) {
    if (errno == ENOENT) {
      return absl::NotFoundError(
          absl::StrFormat("%s: %s does not exist (vfio-pci loaded and the device bound to it?)",
                          name_, group_node));
    }
    const int err = errno;
    return SysError(err, absl::StrCat(name_, ": opening ", group_node));
  }
  group_ = SysFd(&sys_, gfd);

  vfio_group_status status = {};
  status.argsz = sizeof(status);
  if (RetryEintr([&] { return sys_.Ioctl(group_.get(), VFIO_GROUP_GET_STATUS, &status); }) != 0) {
    const int err = errno;
    return SysError(err, absl::StrCat(name_, ": VFIO_GROUP_GET_STATUS"));
  }
  if (!(status.flags & VFIO_GROUP_FLAGS_VIABLE)) {
    // Every device of the group must be bound to vfio-pci (or to no driver) before any of them
    // can be used: list the others so the user knows what to unbind.
    std::vector<std::string> members, others;
    const std::string dir = "/sys/kernel/iommu_groups/" + group + "/devices";
    if (sys_.ReadDir(dir, &members) == 0) {
      for (const std::string& m : members) {
        if (m == name_) continue;
        std::string drv;
        others.push_back(sys_.Readlink(dir + "/" + m + "/driver", &drv) == 0
                             ? absl::StrFormat("%s (driver: %s)", m, Basename(drv))
                             : absl::StrFormat("%s (no driver)", m));
      }
    }
    return absl::FailedPreconditionError(absl::StrFormat(
        "%s: IOMMU group %s is not viable: all its devices must be bound to vfio-pci; other "
        "devices in the group: %s",
        name_, group, others.empty() ? "(unknown)" : absl::StrJoin(others, ", ")));
  }

  int cfd = RetryEintr([&] { return sys_.Open("/dev/vfio/vfio", O_RDWR); });
  if (cfd < 0) {
    const int err = errno;
    return SysError(err, absl::StrCat(name_, ": opening /dev/vfio/vfio"));
  }
  container_ = SysFd(&sys_, cfd);
  // GET_API_VERSION, CHECK_EXTENSION and SET_IOMMU take their argument by value.
  int version =
      RetryEintr([&] { return sys_.Ioctl(container_.get(), VFIO_GET_API_VERSION, nullptr); });
  if (version < 0) {
    const int err = errno;
    return SysError(err, absl::StrCat(name_, ": VFIO_GET_API_VERSION"));
  }
  if (version != VFIO_API_VERSION) {
    return absl::FailedPreconditionError(
        absl::StrFormat("%s: unsupported VFIO API version %d", name_, version));
  }
  void* type1v2 = reinterpret_cast<void*>(static_cast<uintptr_t>(VFIO_TYPE1v2_IOMMU));
  int has = RetryEintr([&] { return sys_.Ioctl(container_.get(), VFIO_CHECK_EXTENSION, type1v2); });
  if (has < 0) {
    const int err = errno;
    return SysError(err, absl::StrCat(name_, ": VFIO_CHECK_EXTENSION"));
  }
  if (has == 0) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "%s: the VFIO container has no type1v2 IOMMU support (vfio_iommu_type1 module?)", name_));
  }
  int container_fd = container_.get();
  if (RetryEintr(
          [&] { return sys_.Ioctl(group_.get(), VFIO_GROUP_SET_CONTAINER, &container_fd); }) != 0) {
    const int err = errno;
    return SysError(err, absl::StrCat(name_, ": VFIO_GROUP_SET_CONTAINER"));
  }
  if (RetryEintr([&] { return sys_.Ioctl(container_.get(), VFIO_SET_IOMMU, type1v2); }) != 0) {
    const int err = errno;
    return SysError(err, absl::StrCat(name_, ": VFIO_SET_IOMMU(TYPE1v2)"));
  }
  std::string dev_name = name_;  // the kernel reads a NUL-terminated string
  int dfd = RetryEintr(
      [&] { return sys_.Ioctl(group_.get(), VFIO_GROUP_GET_DEVICE_FD, dev_name.data()); });
  if (dfd < 0) {
    const int err = errno;
    return SysError(err, absl::StrCat(name_, ": VFIO_GROUP_GET_DEVICE_FD"));
  }
  device_ = SysFd(&sys_, dfd);
  return absl::OkStatus();
}

absl::Status KernelVfioDevice::DeviceIoctl(unsigned long request, void* arg, const char* what) {
  last_err_ = 0;
  if (RetryEintr([&] { return sys_.Ioctl(device_.get(), request, arg); }) != 0) {
    last_err_ = errno;
    return SysError(last_err_,
                    absl::StrFormat("%s: %s (%s)", name_, uapi::IoctlName(request), what));
  }
  return absl::OkStatus();
}

absl::Status KernelVfioDevice::IommufdIoctl(unsigned long request, void* arg,
                                            const std::string& what) {
  last_err_ = 0;
  if (RetryEintr([&] { return sys_.Ioctl(iommufd_.get(), request, arg); }) != 0) {
    last_err_ = errno;
    return SysError(last_err_,
                    absl::StrFormat("%s: %s (%s)", name_, uapi::IoctlName(request), what));
  }
  return absl::OkStatus();
}

absl::Status KernelVfioDevice::ProbeLayout() {
  vfio_device_info di = {};
  di.argsz = sizeof(di);
  if (absl::Status s = DeviceIoctl(VFIO_DEVICE_GET_INFO, &di, "device info"); !s.ok()) return s;
  if (!(di.flags & VFIO_DEVICE_FLAGS_PCI)) {
    return absl::FailedPreconditionError(
        absl::StrFormat("%s: not a vfio-pci device (flags %#x)", name_, di.flags));
  }
  if (di.num_regions <= VFIO_PCI_CONFIG_REGION_INDEX) {
    return absl::FailedPreconditionError(
        absl::StrFormat("%s: unsupported region layout: %u regions (needs at least %u)", name_,
                        di.num_regions, VFIO_PCI_CONFIG_REGION_INDEX + 1));
  }
  info_.num_regions = di.num_regions;
  info_.num_irqs = di.num_irqs;
  info_.is_pci = true;
  info_.can_reset = di.flags & VFIO_DEVICE_FLAGS_RESET;

  const uint32_t n = std::min(di.num_regions, kNumPciRegions);
  for (uint32_t i = 0; i < n; ++i) {
    // Query through the uncached path: regions_ is still being filled.
    std::vector<uint64_t> buf(sizeof(vfio_region_info) / 8);
    vfio_region_info ri;
    for (int attempt = 0;; ++attempt) {
      std::memset(buf.data(), 0, buf.size() * 8);
      ri = {};
      ri.argsz = buf.size() * 8;
      ri.index = i;
      std::memcpy(buf.data(), &ri, sizeof(ri));
      if (absl::Status s = DeviceIoctl(VFIO_DEVICE_GET_REGION_INFO, buf.data(),
                                       absl::StrFormat("region %u", i).c_str());
          !s.ok()) {
        // vfio-pci answers EINVAL for the VGA region of a non-VGA device: absent, not an error.
        if (i == VFIO_PCI_VGA_REGION_INDEX && last_err_ == EINVAL) {
          std::memset(buf.data(), 0, buf.size() * 8);
          ri = {};
          ri.argsz = buf.size() * 8;
          ri.index = i;
          break;
        }
        return s;
      }
      std::memcpy(&ri, buf.data(), sizeof(ri));
      if (ri.argsz <= buf.size() * 8) break;
      // The capability chain did not fit: the kernel reports the size it needs in argsz.
      if (ri.argsz > kMaxInfoReply || attempt >= 2) {
        return absl::InternalError(
            absl::StrFormat("%s: region %u info: implausible reply size %u", name_, i, ri.argsz));
      }
      buf.resize((ri.argsz + 7) / 8);
    }
    if (ri.index != i) {
      return absl::InternalError(
          absl::StrFormat("%s: region info for %u answered for %u", name_, i, ri.index));
    }
    RegionInfo r;
    r.index = i;
    r.size = ri.size;
    r.readable = ri.flags & VFIO_REGION_INFO_FLAG_READ;
    r.writable = ri.flags & VFIO_REGION_INFO_FLAG_WRITE;
    r.mappable = ri.flags & VFIO_REGION_INFO_FLAG_MMAP;
    if (r.size != 0 && (ri.offset > INT64_MAX || r.size > INT64_MAX - ri.offset)) {
      return absl::InternalError(absl::StrFormat("%s: region %u: offset %#x + size %#x overflows",
                                                 name_, i, ri.offset, r.size));
    }
    if (absl::Status s = ParseRegionCaps(
            std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(buf.data()), buf.size() * 8),
            &r);
        !s.ok()) {
      return absl::FailedPreconditionError(
          absl::StrCat(name_, ": unsupported region layout: ", s.message()));
    }
    if (r.size != 0) {
      // The PCI model needs config space read/write and every present BAR (and the ROM)
      // readable through the fd; MMIO BARs must also be writable.
      bool need_write = i != VFIO_PCI_ROM_REGION_INDEX && i != VFIO_PCI_VGA_REGION_INDEX;
      if (i <= VFIO_PCI_CONFIG_REGION_INDEX && (!r.readable || (need_write && !r.writable))) {
        return absl::FailedPreconditionError(
            absl::StrFormat("%s: unsupported region layout: region %u (size %#x) is not %s", name_,
                            i, r.size, r.readable ? "writable" : "readable"));
      }
    } else if (i == VFIO_PCI_CONFIG_REGION_INDEX) {
      return absl::FailedPreconditionError(
          absl::StrFormat("%s: unsupported region layout: empty config space region", name_));
    }
    regions_.push_back(std::move(r));
    region_offsets_.push_back(ri.offset);
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Info, regions, irqs

absl::StatusOr<DeviceInfo> KernelVfioDevice::GetInfo() { return info_; }

absl::StatusOr<RegionInfo> KernelVfioDevice::GetRegionInfo(uint32_t index) {
  // vfio-pci region info is static for the lifetime of the fd: answer from the probe.
  if (index >= regions_.size()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: region %u not supported (device has %u PCI regions)", name_, index, regions_.size()));
  }
  return regions_[index];
}

absl::StatusOr<IrqInfo> KernelVfioDevice::GetIrqInfo(uint32_t index) {
  if (index >= info_.num_irqs) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: irq index %u out of range (%u)", name_, index, info_.num_irqs));
  }
  vfio_irq_info ii = {};
  ii.argsz = sizeof(ii);
  ii.index = index;
  if (absl::Status s = DeviceIoctl(VFIO_DEVICE_GET_IRQ_INFO, &ii, "irq info"); !s.ok()) return s;
  if (ii.count > kMaxIrqVectors) {  // PCI allows at most 2048 (MSI-X); anything else is bogus
    return absl::InternalError(
        absl::StrFormat("%s: irq index %u reports %u vectors", name_, index, ii.count));
  }
  IrqInfo out;
  out.index = index;
  out.count = ii.count;
  out.eventfd = ii.flags & VFIO_IRQ_INFO_EVENTFD;
  out.maskable = ii.flags & VFIO_IRQ_INFO_MASKABLE;
  out.automasked = ii.flags & VFIO_IRQ_INFO_AUTOMASKED;
  return out;
}

absl::Status KernelVfioDevice::CheckRegionAccess(uint32_t index, uint64_t offset, uint64_t size,
                                                 bool write) {
  if (index >= regions_.size() || regions_[index].size == 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: region %u does not exist", name_, index));
  }
  const RegionInfo& r = regions_[index];
  if (write ? !r.writable : !r.readable) {
    return absl::PermissionDeniedError(
        absl::StrFormat("%s: region %u is not %s", name_, index, write ? "writable" : "readable"));
  }
  if (size == 0 || offset > r.size || size > r.size - offset) {
    return absl::OutOfRangeError(absl::StrFormat(
        "%s: access [%#x, +%#x) outside region %u (size %#x)", name_, offset, size, index, r.size));
  }
  return absl::OkStatus();
}

absl::Status KernelVfioDevice::RegionRead(uint32_t index, uint64_t offset,
                                          std::span<uint8_t> data) {
  if (absl::Status s = CheckRegionAccess(index, offset, data.size(), false); !s.ok()) return s;
  const off_t pos = region_offsets_[index] + offset;
  ssize_t n = RetryEintr([&] { return sys_.Pread(device_.get(), data.data(), data.size(), pos); });
  if (n < 0) {
    const int err = errno;
    return ErrnoStatus(err, absl::StrFormat("%s: reading region %u at %#x", name_, index, offset));
  }
  if (static_cast<size_t>(n) != data.size()) {
    return absl::DataLossError(absl::StrFormat("%s: short read of region %u at %#x: %d of %u",
                                               name_, index, offset, n, data.size()));
  }
  return absl::OkStatus();
}

absl::Status KernelVfioDevice::RegionWrite(uint32_t index, uint64_t offset,
                                           std::span<const uint8_t> data) {
  if (absl::Status s = CheckRegionAccess(index, offset, data.size(), true); !s.ok()) return s;
  const off_t pos = region_offsets_[index] + offset;
  ssize_t n = RetryEintr([&] { return sys_.Pwrite(device_.get(), data.data(), data.size(), pos); });
  if (n < 0) {
    const int err = errno;
    return ErrnoStatus(err, absl::StrFormat("%s: writing region %u at %#x", name_, index, offset));
  }
  if (static_cast<size_t>(n) != data.size()) {
    return absl::DataLossError(absl::StrFormat("%s: short write to region %u at %#x: %d of %u",
                                               name_, index, offset, n, data.size()));
  }
  return absl::OkStatus();
}

absl::StatusOr<ScopedMmap> KernelVfioDevice::MapRegion(uint32_t index, uint64_t offset,
                                                       uint64_t size) {
  if (index >= regions_.size() || !regions_[index].mappable) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: region %u is not mappable", name_, index));
  }
  const RegionInfo& r = regions_[index];
  if (!RangeOk(offset, size) || offset % kPageSize != 0 || size % kPageSize != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: map of region %u [%#x, +%#x) is empty or not page aligned", name_,
                        index, offset, size));
  }
  bool inside = false;
  if (r.mmap_areas.empty()) {
    inside = offset <= r.size && size <= r.size - offset;
  } else {
    for (const MmapArea& a : r.mmap_areas) {
      if (offset >= a.offset && offset - a.offset <= a.size &&
          size <= a.size - (offset - a.offset)) {
        inside = true;
        break;
      }
    }
  }
  if (!inside) {
    return absl::OutOfRangeError(absl::StrFormat(
        "%s: [%#x, +%#x) of region %u is not inside one mmap area", name_, offset, size, index));
  }
  int prot = (r.readable ? PROT_READ : 0) | (r.writable ? PROT_WRITE : 0);
  void* p = sys_.Mmap(nullptr, size, prot, MAP_SHARED, device_.get(),
                      static_cast<off_t>(region_offsets_[index] + offset));
  if (p == MAP_FAILED) {
    const int err = errno;
    return ErrnoStatus(err, absl::StrFormat("%s: mmap of region %u", name_, index));
  }
  // Unmapped by ScopedMmap (::munmap) — the interface's type; a fake must hand out real memory.
  return ScopedMmap(p, size);
}

absl::Status KernelVfioDevice::SetIrqs(uint32_t index, uint32_t start, std::span<const int> fds) {
  if (fds.size() > kMaxIrqVectors) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: %u irq vectors is too many", name_, fds.size()));
  }
  std::vector<uint32_t> buf((sizeof(vfio_irq_set) + fds.size() * sizeof(int32_t)) / 4);
  vfio_irq_set set = {};
  set.argsz = buf.size() * 4;
  set.index = index;
  if (fds.empty()) {
    // Disable the whole index: DATA_NONE | ACTION_TRIGGER with count 0.
    set.flags = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER;
  } else {
    set.flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
    set.start = start;
    set.count = fds.size();
    for (size_t i = 0; i < fds.size(); ++i) buf[sizeof(set) / 4 + i] = fds[i];
  }
  std::memcpy(buf.data(), &set, sizeof(set));
  return DeviceIoctl(VFIO_DEVICE_SET_IRQS, buf.data(),
                     absl::StrFormat("irq index %u trigger", index).c_str());
}

absl::Status KernelVfioDevice::SetIrqUnmaskFd(uint32_t index, int unmask_fd) {
  // DATA_EVENTFD | ACTION_UNMASK: writes to the eventfd unmask the (automasked) INTx line
  // inside the kernel; -1 de-assigns it.
  std::vector<uint32_t> buf((sizeof(vfio_irq_set) + sizeof(int32_t)) / 4);
  vfio_irq_set set = {};
  set.argsz = buf.size() * 4;
  set.flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_UNMASK;
  set.index = index;
  set.start = 0;
  set.count = 1;
  std::memcpy(buf.data(), &set, sizeof(set));
  buf[sizeof(set) / 4] = unmask_fd;
  return DeviceIoctl(VFIO_DEVICE_SET_IRQS, buf.data(),
                     absl::StrFormat("irq index %u unmask", index).c_str());
}

absl::Status KernelVfioDevice::Reset() {
  if (!info_.can_reset) {
    return absl::FailedPreconditionError(absl::StrFormat("%s: device has no reset", name_));
  }
  absl::Status s = DeviceIoctl(VFIO_DEVICE_RESET, nullptr, "reset");
  // A reset returns the migration FSM to RUNNING and ends any data transfer session.
  if (s.ok()) data_fd_.reset();
  return s;
}

// ---------------------------------------------------------------------------------------------
// DMA

absl::Status KernelVfioDevice::DmaMap(uint64_t iova, uint64_t size, void* vaddr, int /*fd*/,
                                      uint64_t /*fd_offset*/, bool writable) {
  // The kernel pins `vaddr`; the memfd is only needed by vfio-user.
  if (!RangeOk(iova, size) || vaddr == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: bad DMA map [%#x, +%#x) vaddr %p", name_, iova, size, vaddr));
  }
  int r;
  unsigned long req;
  if (path_ == KernelVfioPath::kIommufdCdev) {
    uapi::iommu_ioas_map m = {};
    m.size = sizeof(m);
    m.flags = uapi::kIommuIoasMapFixedIova | uapi::kIommuIoasMapReadable |
              (writable ? uapi::kIommuIoasMapWriteable : 0);
    m.ioas_id = ioas_id_;
    m.user_va = reinterpret_cast<uintptr_t>(vaddr);
    m.length = size;
    m.iova = iova;
    req = uapi::kIommuIoasMap;
    r = RetryEintr([&] { return sys_.Ioctl(iommufd_.get(), req, &m); });
  } else {
    vfio_iommu_type1_dma_map m = {};
    m.argsz = sizeof(m);
    m.flags = VFIO_DMA_MAP_FLAG_READ | (writable ? VFIO_DMA_MAP_FLAG_WRITE : 0);
    m.vaddr = reinterpret_cast<uintptr_t>(vaddr);
    m.iova = iova;
    m.size = size;
    req = VFIO_IOMMU_MAP_DMA;
    r = RetryEintr([&] { return sys_.Ioctl(container_.get(), req, &m); });
  }
  if (r != 0) {
    int err = errno;
    std::string what =
        absl::StrFormat("%s: %s [%#x, +%#x)", name_, uapi::IoctlName(req), iova, size);
    if (err == EEXIST) {
      return absl::AlreadyExistsError(absl::StrCat(what, ": overlaps an existing DMA mapping"));
    }
    return ErrnoStatus(err, what);
  }
  return absl::OkStatus();
}

absl::Status KernelVfioDevice::DmaUnmap(uint64_t iova, uint64_t size) {
  if (!RangeOk(iova, size)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: bad DMA unmap [%#x, +%#x)", name_, iova, size));
  }
  uint64_t unmapped;
  unsigned long req;
  int r;
  if (path_ == KernelVfioPath::kIommufdCdev) {
    uapi::iommu_ioas_unmap u = {};
    u.size = sizeof(u);
    u.ioas_id = ioas_id_;
    u.iova = iova;
    u.length = size;
    req = uapi::kIommuIoasUnmap;
    r = RetryEintr([&] { return sys_.Ioctl(iommufd_.get(), req, &u); });
    unmapped = u.length;
  } else {
    vfio_iommu_type1_dma_unmap u = {};
    u.argsz = sizeof(u);
    u.iova = iova;
    u.size = size;
    req = VFIO_IOMMU_UNMAP_DMA;
    r = RetryEintr([&] { return sys_.Ioctl(container_.get(), req, &u); });
    unmapped = u.size;
  }
  const int err = r != 0 ? errno : 0;
  std::string what = absl::StrFormat("%s: %s [%#x, +%#x)", name_, uapi::IoctlName(req), iova, size);
  if (r != 0) {
    if (err == ENOENT) return absl::NotFoundError(absl::StrCat(what, ": nothing mapped"));
    return ErrnoStatus(err, what);
  }
  // type1 reports 0 bytes when nothing was mapped there; both report what they removed.
  if (unmapped == 0) return absl::NotFoundError(absl::StrCat(what, ": nothing mapped"));
  if (unmapped != size) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "%s: unmapped %#x bytes, not the whole range (ranges must match DmaMap calls)", what,
        unmapped));
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// VFIO_DEVICE_FEATURE: migration v2 and DMA logging

absl::Status KernelVfioDevice::Feature(uint32_t flags, void* data, size_t data_size,
                                       const char* what) {
  std::vector<uint64_t> buf((sizeof(vfio_device_feature) + data_size + 7) / 8);
  vfio_device_feature f = {};
  f.argsz = sizeof(f) + data_size;
  f.flags = flags;
  std::memcpy(buf.data(), &f, sizeof(f));
  uint8_t* payload = reinterpret_cast<uint8_t*>(buf.data()) + sizeof(f);
  if (data_size) std::memcpy(payload, data, data_size);
  absl::Status s = DeviceIoctl(VFIO_DEVICE_FEATURE, buf.data(), what);
  if (s.ok() && data_size) std::memcpy(data, payload, data_size);
  return s;
}

absl::StatusOr<MigrationCaps> KernelVfioDevice::GetMigrationCaps() {
  MigrationCaps caps;
  vfio_device_feature_migration mig = {};
  absl::Status s = Feature(VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIGRATION, &mig,
                           sizeof(mig), "migration caps");
  // ENOTTY: no migration driver (or a kernel without DEVICE_FEATURE) — not an error.
  if (!s.ok() && last_err_ != ENOTTY) return s;
  if (s.ok()) {
    caps.supported = mig.flags & VFIO_MIGRATION_STOP_COPY;
    caps.p2p = caps.supported && (mig.flags & VFIO_MIGRATION_P2P);
    caps.pre_copy = caps.supported && (mig.flags & uapi::kMigrationPreCopy);
  }
  s = Feature(
      VFIO_DEVICE_FEATURE_PROBE | VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
      nullptr, 0, "DMA logging probe");
  if (!s.ok() && last_err_ != ENOTTY) return s;
  caps.dma_logging = s.ok();
  return caps;
}

absl::StatusOr<MigState> KernelVfioDevice::GetMigState() {
  vfio_device_feature_mig_state st = {};
  st.data_fd = -1;
  if (absl::Status s = Feature(VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, &st,
                               sizeof(st), "get migration state");
      !s.ok()) {
    return s;
  }
  if (st.device_state > static_cast<uint32_t>(MigState::kPreCopyP2p)) {
    return absl::InternalError(
        absl::StrFormat("%s: kernel reported unknown migration state %u", name_, st.device_state));
  }
  return static_cast<MigState>(st.device_state);
}

absl::Status KernelVfioDevice::SetMigState(MigState state) {
  if (state == MigState::kError || static_cast<uint32_t>(state) > 7) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: cannot request migration state %s", name_, MigStateName(state)));
  }
  vfio_device_feature_mig_state st = {};
  st.device_state = static_cast<uint32_t>(state);
  st.data_fd = -1;
  std::string what = absl::StrCat("migration state -> ", MigStateName(state));
  if (absl::Status s = Feature(VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE, &st,
                               sizeof(st), what.c_str());
      !s.ok()) {
    // The device may now be anywhere on the path (or in ERROR); the caller decides (reset).
    return s;
  }
  // Arcs that start a session (STOP->STOP_COPY, STOP->RESUMING, RUNNING->PRE_COPY) return a new
  // data_fd. PRE_COPY_P2P->STOP_COPY continues on the existing one (data_fd = -1). Leaving the
  // session states ends the session.
  if (st.data_fd >= 0) data_fd_ = SysFd(&sys_, st.data_fd);
  if (!StateHasDataSession(state)) data_fd_.reset();
  return absl::OkStatus();
}

absl::StatusOr<size_t> KernelVfioDevice::ReadMigData(std::span<uint8_t> buf) {
  if (!data_fd_.valid()) {
    return absl::FailedPreconditionError(
        absl::StrFormat("%s: no migration data session (device not in PRE_COPY/STOP_COPY)", name_));
  }
  ssize_t n = RetryEintr([&] { return sys_.Read(data_fd_.get(), buf.data(), buf.size()); });
  if (n < 0) {
    // PRE_COPY: ENOMSG = no more data for now (the device may produce more later).
    if (errno == ENOMSG) return 0;
    const int err = errno;
    return ErrnoStatus(err, absl::StrCat(name_, ": reading migration data"));
  }
  if (static_cast<size_t>(n) > buf.size()) {
    return absl::InternalError(absl::StrCat(name_, ": migration data read overran the buffer"));
  }
  return static_cast<size_t>(n);
}

absl::Status KernelVfioDevice::WriteMigData(std::span<const uint8_t> data) {
  if (!data_fd_.valid()) {
    return absl::FailedPreconditionError(
        absl::StrFormat("%s: no migration data session (device not in RESUMING)", name_));
  }
  size_t done = 0;
  while (done < data.size()) {
    size_t left = data.size() - done;
    ssize_t n = RetryEintr([&] { return sys_.Write(data_fd_.get(), data.data() + done, left); });
    if (n < 0) {
      const int err = errno;
      return ErrnoStatus(err, absl::StrCat(name_, ": writing migration data"));
    }
    if (n == 0 || static_cast<size_t>(n) > left) {
      return absl::InternalError(
          absl::StrFormat("%s: migration data write returned %d for %u bytes", name_, n, left));
    }
    done += n;
  }
  return absl::OkStatus();
}

absl::Status KernelVfioDevice::StartDmaLogging(std::span<const DmaRange> ranges,
                                               uint64_t page_size) {
  if (ranges.empty() || !IsPowerOfTwo(page_size)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: DMA logging needs ranges and a power-of-two page size (%u)", name_, page_size));
  }
  std::vector<vfio_device_feature_dma_logging_range> rs;
  for (const DmaRange& r : ranges) {
    if (!RangeOk(r.iova, r.size)) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: bad DMA logging range [%#x, +%#x)", name_, r.iova, r.size));
    }
    rs.push_back({r.iova, r.size});
  }
  vfio_device_feature_dma_logging_control ctl = {};
  ctl.page_size = page_size;
  ctl.num_ranges = rs.size();
  ctl.ranges = reinterpret_cast<uintptr_t>(rs.data());
  absl::Status s = Feature(VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_START, &ctl,
                           sizeof(ctl), "DMA logging start");
  if (!s.ok() && last_err_ == ENOTTY) {
    return absl::UnimplementedError(absl::StrCat(name_, ": device cannot log its DMA"));
  }
  return s;
}

absl::Status KernelVfioDevice::ReportDmaDirty(uint64_t iova, uint64_t size, uint64_t page_size,
                                              std::span<uint64_t> bitmap) {
  if (!RangeOk(iova, size) || !IsPowerOfTwo(page_size)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: bad DMA dirty report [%#x, +%#x) page %u", name_, iova, size, page_size));
  }
  const uint64_t pages = size / page_size + (size % page_size != 0);
  if (bitmap.size() < (pages + 63) / 64) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: dirty bitmap of %u words is too small for %u pages", name_, bitmap.size(), pages));
  }
  vfio_device_feature_dma_logging_report rep = {};
  rep.iova = iova;
  rep.length = size;
  rep.page_size = page_size;
  rep.bitmap = reinterpret_cast<uintptr_t>(bitmap.data());
  absl::Status s = Feature(VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT, &rep,
                           sizeof(rep), "DMA logging report");
  if (!s.ok() && last_err_ == ENOTTY) {
    return absl::UnimplementedError(absl::StrCat(name_, ": device cannot log its DMA"));
  }
  // On any error the log must be considered lost: the caller treats the range as dirty.
  return s;
}

absl::Status KernelVfioDevice::StopDmaLogging() {
  absl::Status s = Feature(VFIO_DEVICE_FEATURE_SET | VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP, nullptr,
                           0, "DMA logging stop");
  if (!s.ok() && last_err_ == ENOTTY) {
    return absl::UnimplementedError(absl::StrCat(name_, ": device cannot log its DMA"));
  }
  return s;
}

// ---------------------------------------------------------------------------------------------
// IOMMU dirty tracking (iommufd HWPT)

absl::Status KernelVfioDevice::StartIommuDirtyTracking() {
  if (hwpt_id_ == 0) {
    return absl::UnimplementedError(absl::StrCat(
        name_, ": no IOMMU dirty tracking (",
        path_ == KernelVfioPath::kGroupContainer ? "type1 container" : "not offered by the IOMMU",
        ")"));
  }
  if (iommu_tracking_) {
    return absl::FailedPreconditionError(absl::StrCat(name_, ": IOMMU dirty tracking is on"));
  }
  // Enabling also clears dirty bits the IOPTEs picked up before (the kernel does so on enable).
  uapi::iommu_hwpt_set_dirty_tracking set = {};
  set.size = sizeof(set);
  set.flags = uapi::kIommuHwptDirtyTrackingEnable;
  set.hwpt_id = hwpt_id_;
  if (absl::Status s = IommufdIoctl(uapi::kIommuHwptSetDirtyTracking, &set, "enable");
      !s.ok()) {
    return s;
  }
  iommu_tracking_ = true;
  return absl::OkStatus();
}

absl::Status KernelVfioDevice::ReportIommuDirty(uint64_t iova, uint64_t size, uint64_t page_size,
                                                std::span<uint64_t> bitmap) {
  if (hwpt_id_ == 0) {
    return absl::UnimplementedError(absl::StrCat(name_, ": no IOMMU dirty tracking"));
  }
  if (!iommu_tracking_) {
    return absl::FailedPreconditionError(absl::StrCat(name_, ": IOMMU dirty tracking is off"));
  }
  // The kernel wants iova and length aligned to page_size (iommufd_check_iova_range).
  if (!RangeOk(iova, size) || !IsPowerOfTwo(page_size) || iova % page_size != 0 ||
      size % page_size != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: bad IOMMU dirty report [%#x, +%#x) page %u (must be page aligned)", name_, iova,
        size, page_size));
  }
  const uint64_t pages = size / page_size;
  if (bitmap.size() < (pages + 63) / 64) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: dirty bitmap of %u words is too small for %u pages", name_, bitmap.size(), pages));
  }
  uapi::iommu_hwpt_get_dirty_bitmap get = {};
  get.size = sizeof(get);
  get.hwpt_id = hwpt_id_;
  get.flags = 0;  // read and clear
  get.iova = iova;
  get.length = size;
  get.page_size = page_size;
  get.data = reinterpret_cast<uintptr_t>(bitmap.data());
  // On an error the dirty bits may be partly cleared: the caller treats the range as dirty.
  return IommufdIoctl(uapi::kIommuHwptGetDirtyBitmap, &get,
                      absl::StrFormat("[%#x, +%#x)", iova, size));
}

absl::Status KernelVfioDevice::StopIommuDirtyTracking() {
  if (hwpt_id_ == 0) {
    return absl::UnimplementedError(absl::StrCat(name_, ": no IOMMU dirty tracking"));
  }
  if (!iommu_tracking_) return absl::OkStatus();
  uapi::iommu_hwpt_set_dirty_tracking set = {};
  set.size = sizeof(set);
  set.hwpt_id = hwpt_id_;
  if (absl::Status s = IommufdIoctl(uapi::kIommuHwptSetDirtyTracking, &set, "disable");
      !s.ok()) {
    return s;  // still on: Stop may be retried
  }
  iommu_tracking_ = false;
  return absl::OkStatus();
}

}  // namespace microvmm::vfio
