#include "tests/vfio/kernel/fake_vfio_kernel.h"

#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "devices/vfio/kernel/vfio_uapi.h"

namespace microvmm::vfio::testing {
namespace {

constexpr uint64_t kPage = 4096;

template <typename T>
T Load(const void* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}
template <typename T>
void Store(void* p, const T& v) {
  std::memcpy(p, &v, sizeof(T));
}

bool Overlaps(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen) {
  return a < b + blen && b < a + alen;
}

}  // namespace

FakeVfioKernel::FakeVfioKernel()
    : device_flags(VFIO_DEVICE_FLAGS_PCI | VFIO_DEVICE_FLAGS_RESET),
      mig_flags(VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P | uapi::kMigrationPreCopy),
      mig_state(VFIO_DEVICE_STATE_RUNNING) {
  // A typical NVMe-like function: BAR0 16 KiB MMIO with the MSI-X table page trapped (sparse
  // mmap: two areas), BAR2 4 KiB mappable, BAR4 an I/O port BAR (not mappable), no ROM, config
  // space 256 bytes, no VGA.
  regions.resize(VFIO_PCI_NUM_REGIONS);
  const uint32_t rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
  regions[0] = {.size = 0x4000, .flags = rw | VFIO_REGION_INFO_FLAG_MMAP};
  regions[0].sparse = std::vector<MmapArea>{{0, 0x1000}, {0x2000, 0x2000}};
  regions[0].msix_cap = true;
  regions[2] = {.size = 0x1000, .flags = rw | VFIO_REGION_INFO_FLAG_MMAP};
  regions[4] = {.size = 0x100, .flags = rw};
  regions[VFIO_PCI_CONFIG_REGION_INDEX] = {.size = 0x100, .flags = rw};
  for (Region& r : regions) r.data.assign(r.size, 0);
  irqs.resize(VFIO_PCI_NUM_IRQS);
  irqs[VFIO_PCI_INTX_IRQ_INDEX] = {
      .count = 1,
      .flags = VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_MASKABLE | VFIO_IRQ_INFO_AUTOMASKED};
  irqs[VFIO_PCI_MSI_IRQ_INDEX] = {.count = 1,
                                  .flags = VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE};
  irqs[VFIO_PCI_MSIX_IRQ_INDEX] = {.count = 16,
                                   .flags = VFIO_IRQ_INFO_EVENTFD | VFIO_IRQ_INFO_NORESIZE};
  for (Irq& q : irqs) q.triggers.assign(q.count, -1);
  state_blob = {'s', 't', 'a', 't', 'e', '-', 'o', 'f', '-', 't', 'h', 'e', '-', 'd', 'e',
                'v', 'i', 'c', 'e', '-', '0', '1', '2', '3', '4', '5', '6', '7', '8', '9'};
  precopy_blob = {'p', 'r', 'e', 'c', 'o', 'p', 'y', '-', 'd', 'a', 't', 'a'};
  dev_nodes.insert("/dev/vfio/vfio");
}

FakeVfioKernel::~FakeVfioKernel() = default;

void FakeVfioKernel::AddPciDevice(const std::string& b, const std::string& driver,
                                  const std::string& group, const std::string& cdev) {
  bdf = b;
  const std::string base = "/sys/bus/pci/devices/" + b;
  dirs[base] = {"config", "iommu_group", "vendor", "device"};
  if (!driver.empty()) {
    dirs[base].push_back("driver");
    symlinks[base + "/driver"] = "../../../bus/pci/drivers/" + driver;
  }
  symlinks[base + "/iommu_group"] = "../../../kernel/iommu_groups/" + group;
  const std::string gdir = "/sys/kernel/iommu_groups/" + group + "/devices";
  dirs[gdir].push_back(b);
  if (!driver.empty()) symlinks[gdir + "/" + b + "/driver"] = "../../../bus/pci/drivers/" + driver;
  dev_nodes.insert("/dev/vfio/" + group);
  if (!cdev.empty()) {
    dirs[base].push_back("vfio-dev");
    dirs[base + "/vfio-dev"] = {cdev};
    dev_nodes.insert("/dev/vfio/devices/" + cdev);
  }
}

void FakeVfioKernel::AddGroupPeer(const std::string& peer, const std::string& driver) {
  std::string link = symlinks["/sys/bus/pci/devices/" + bdf + "/iommu_group"];
  std::string group = link.substr(link.find_last_of('/') + 1);
  const std::string gdir = "/sys/kernel/iommu_groups/" + group + "/devices";
  dirs[gdir].push_back(peer);
  if (!driver.empty()) {
    symlinks[gdir + "/" + peer + "/driver"] = "../../../bus/pci/drivers/" + driver;
  }
  if (!driver.empty() && driver != "vfio-pci") group_viable = false;
}

void FakeVfioKernel::SetIommufdPresent(bool present) {
  if (present) {
    dev_nodes.insert("/dev/iommu");
  } else {
    dev_nodes.erase("/dev/iommu");
  }
}

int FakeVfioKernel::NewFd(Obj obj) {
  int fd = next_fd_++;
  fds_.emplace(fd, std::move(obj));
  return fd;
}

int FakeVfioKernel::Open(const std::string& path, int /*flags*/) {
  if (auto it = open_fail_.find(path); it != open_fail_.end() && !it->second.empty()) {
    int err = it->second.front();
    it->second.pop_front();
    return Fail(err);
  }
  if (!dev_nodes.count(path)) return Fail(ENOENT);
  Obj o;
  if (path == "/dev/vfio/vfio") {
    o.kind = Kind::kContainer;
  } else if (path == "/dev/iommu") {
    o.kind = Kind::kIommufd;
  } else if (path.rfind("/dev/vfio/devices/", 0) == 0) {
    o.kind = Kind::kDevice;
    o.cdev = true;
  } else {
    o.kind = Kind::kGroup;
  }
  return NewFd(std::move(o));
}

int FakeVfioKernel::Close(int fd) {
  auto it = fds_.find(fd);
  if (it == fds_.end()) return Fail(EBADF);
  if (it->second.kind == Kind::kGroup && it->second.container >= 0) {
    if (auto c = fds_.find(it->second.container); c != fds_.end()) c->second.groups--;
  }
  if (it->second.kind == Kind::kIommufd) {  // every object of an iommufd dies with it
    hwpts_.clear();
    ioas_ids_.clear();
  }
  fds_.erase(it);
  return 0;
}

int FakeVfioKernel::Ioctl(int fd, unsigned long request, void* arg) {
  ioctl_calls_[request]++;
  if (auto it = ioctl_fail_.find(request); it != ioctl_fail_.end() && !it->second.empty()) {
    int err = it->second.front();
    it->second.pop_front();
    return Fail(err);
  }
  auto it = fds_.find(fd);
  if (it == fds_.end()) return Fail(EBADF);
  Obj& o = it->second;
  switch (o.kind) {
    case Kind::kContainer:
      return ContainerIoctl(o, request, arg);
    case Kind::kGroup:
      return GroupIoctl(o, request, arg);
    case Kind::kIommufd:
      return IommufdIoctl(o, request, arg);
    case Kind::kDevice:
      return DeviceIoctl(o, request, arg);
    case Kind::kData:
      return Fail(ENOTTY);
  }
  return Fail(ENOTTY);
}

int FakeVfioKernel::ContainerIoctl(Obj& o, unsigned long request, void* arg) {
  const uintptr_t value = reinterpret_cast<uintptr_t>(arg);
  switch (request) {
    case VFIO_GET_API_VERSION:
      return api_version;
    case VFIO_CHECK_EXTENSION:
      return (value == VFIO_TYPE1v2_IOMMU || value == VFIO_TYPE1_IOMMU) && type1v2 ? 1 : 0;
    case VFIO_SET_IOMMU:
      if (o.groups == 0 || o.iommu_set) return Fail(EINVAL);  // needs a group first
      if (value != VFIO_TYPE1v2_IOMMU || !type1v2) return Fail(ENODEV);
      o.iommu_set = true;
      return 0;
    case VFIO_IOMMU_MAP_DMA: {
      if (!o.iommu_set) return Fail(EINVAL);
      auto m = Load<vfio_iommu_type1_dma_map>(arg);
      if (m.argsz < sizeof(m) || !(m.flags & VFIO_DMA_MAP_FLAG_READ)) return Fail(EINVAL);
      return DmaMapRange(m.iova, m.size, m.vaddr, m.flags & VFIO_DMA_MAP_FLAG_WRITE);
    }
    case VFIO_IOMMU_UNMAP_DMA: {
      if (!o.iommu_set) return Fail(EINVAL);
      auto u = Load<vfio_iommu_type1_dma_unmap>(arg);
      if (u.argsz < sizeof(u) || u.flags != 0) return Fail(EINVAL);
      uint64_t unmapped = 0;
      if (DmaUnmapRange(u.iova, u.size, &unmapped) != 0) return -1;
      u.size = unmapped;  // type1: 0 when nothing was mapped, not an error
      Store(arg, u);
      return 0;
    }
  }
  return Fail(ENOTTY);
}

int FakeVfioKernel::GroupIoctl(Obj& o, unsigned long request, void* arg) {
  switch (request) {
    case VFIO_GROUP_GET_STATUS: {
      auto st = Load<vfio_group_status>(arg);
      if (st.argsz < sizeof(st)) return Fail(EINVAL);
      st.flags = (group_viable ? VFIO_GROUP_FLAGS_VIABLE : 0) |
                 (o.container >= 0 ? VFIO_GROUP_FLAGS_CONTAINER_SET : 0);
      Store(arg, st);
      return 0;
    }
    case VFIO_GROUP_SET_CONTAINER: {
      if (!group_viable) return Fail(EPERM);
      if (o.container >= 0) return Fail(EINVAL);
      int cfd = Load<int>(arg);
      auto c = fds_.find(cfd);
      if (c == fds_.end() || c->second.kind != Kind::kContainer) return Fail(EBADF);
      o.container = cfd;
      c->second.groups++;
      return 0;
    }
    case VFIO_GROUP_GET_DEVICE_FD: {
      if (o.container < 0 || !fds_.at(o.container).iommu_set) return Fail(EINVAL);
      if (std::string(static_cast<const char*>(arg)) != bdf) return Fail(ENODEV);
      if (device_busy) return Fail(EBUSY);
      Obj d;
      d.kind = Kind::kDevice;
      return NewFd(std::move(d));
    }
  }
  return Fail(ENOTTY);
}

bool FakeVfioKernel::DevBound() const {
  for (const auto& [fd, o] : fds_) {
    if (o.kind == Kind::kDevice && o.bound) return true;
  }
  return false;
}

uint32_t FakeVfioKernel::attached_pt() const {
  for (const auto& [fd, o] : fds_) {
    if (o.kind == Kind::kDevice && o.attached) return o.pt;
  }
  return 0;
}

int FakeVfioKernel::iommufd_fd() const {
  for (const auto& [fd, o] : fds_) {
    if (o.kind == Kind::kIommufd) return fd;
  }
  return -1;
}

void FakeVfioKernel::DeviceWrites(uint64_t iova) {
  iova &= ~(kPage - 1);
  if (logging) dirty_pages.insert(iova);
  const uint32_t pt = attached_pt();
  auto h = hwpts_.find(pt);
  if (h == hwpts_.end() || !h->second.tracking) return;
  for (const auto& [start, m] : dma) {
    if (iova >= start && iova - start < m.size) iommu_dirty_pages.insert(iova);
  }
}

// Errnos as iommufd uses them: ENOTTY unknown ioctl, EOPNOTSUPP known field with an unsupported
// value, EINVAL a wrong value, ENOENT unknown object ID, EOVERFLOW arithmetic overflow.
int FakeVfioKernel::HwptIoctl(unsigned long request, void* arg) {
  switch (request) {
    case uapi::kIommuGetHwInfo: {
      if (!hw_info_supported) return Fail(ENOTTY);
      auto h = Load<uapi::iommu_hw_info>(arg);
      if (h.size < sizeof(h)) return Fail(EINVAL);
      if (h.flags || h.reserved) return Fail(EOPNOTSUPP);
      if (h.dev_id != kDevId || !DevBound()) return Fail(ENOENT);
      h.data_len = 0;  // we model no vendor data (the caller passes none)
      h.out_data_type = 1;  // IOMMU_HW_INFO_TYPE_INTEL_VTD
      h.out_capabilities = iommu_dirty_cap ? uapi::kIommuHwCapDirtyTracking : 0;
      Store(arg, h);
      return 0;
    }
    case uapi::kIommuHwptAlloc: {
      auto a = Load<uapi::iommu_hwpt_alloc>(arg);
      if (a.size < sizeof(a)) return Fail(EINVAL);
      if (a.flags & ~(uapi::kIommuHwptAllocNestParent | uapi::kIommuHwptAllocDirtyTracking) ||
          a.reserved || a.data_type != uapi::kIommuHwptDataNone) {
        return Fail(EOPNOTSUPP);
      }
      if (a.data_len || a.data_uptr) return Fail(EINVAL);
      if (a.dev_id != kDevId || !DevBound() || !ioas_ids_.count(a.pt_id)) return Fail(ENOENT);
      const bool dirty = a.flags & uapi::kIommuHwptAllocDirtyTracking;
      if (dirty && !iommu_dirty_cap) return Fail(EOPNOTSUPP);
      a.out_hwpt_id = next_ioas_++;
      hwpts_[a.out_hwpt_id] = {a.pt_id, dirty, false};
      Store(arg, a);
      return 0;
    }
    case uapi::kIommuHwptSetDirtyTracking: {
      auto t = Load<uapi::iommu_hwpt_set_dirty_tracking>(arg);
      if (t.size < sizeof(t)) return Fail(EINVAL);
      if (t.flags & ~uapi::kIommuHwptDirtyTrackingEnable || t.reserved) return Fail(EOPNOTSUPP);
      auto h = hwpts_.find(t.hwpt_id);
      if (h == hwpts_.end()) return Fail(ENOENT);
      if (!h->second.dirty) return Fail(EOPNOTSUPP);
      const bool on = t.flags & uapi::kIommuHwptDirtyTrackingEnable;
      if (on && !h->second.tracking) iommu_dirty_pages.clear();  // enabling clears stale bits
      h->second.tracking = on;
      return 0;
    }
    case uapi::kIommuHwptGetDirtyBitmap: {
      auto g = Load<uapi::iommu_hwpt_get_dirty_bitmap>(arg);
      if (g.size < sizeof(g)) return Fail(EINVAL);
      if (g.flags & ~uapi::kIommuHwptGetDirtyBitmapNoClear || g.reserved) {
        return Fail(EOPNOTSUPP);
      }
      auto h = hwpts_.find(g.hwpt_id);
      if (h == hwpts_.end()) return Fail(ENOENT);
      if (!h->second.dirty) return Fail(EOPNOTSUPP);
      if (!h->second.tracking) return Fail(EINVAL);  // like the VT-d driver
      if (g.length == 0 || g.iova + g.length - 1 < g.iova) return Fail(EOVERFLOW);
      // iommufd_check_iova_range: IOAS alignment (4 KiB here) and page_size alignment.
      if (g.page_size == 0 || (g.page_size & (g.page_size - 1)) || g.iova % kPage ||
          g.length % kPage || g.iova % g.page_size || g.length % g.page_size ||
          g.data == 0 || g.data % 8) {
        return Fail(EINVAL);
      }
      auto* bitmap = reinterpret_cast<uint64_t*>(g.data);
      for (auto it = iommu_dirty_pages.begin(); it != iommu_dirty_pages.end();) {
        if (*it >= g.iova && *it - g.iova < g.length) {
          const uint64_t bit = (*it - g.iova) / g.page_size;
          bitmap[bit / 64] |= 1ull << (bit % 64);  // bits are only set, never cleared
          if (!(g.flags & uapi::kIommuHwptGetDirtyBitmapNoClear)) {
            it = iommu_dirty_pages.erase(it);
            continue;
          }
        }
        ++it;
      }
      return 0;
    }
    case uapi::kIommuDestroy: {
      auto d = Load<uapi::iommu_destroy>(arg);
      if (d.size < sizeof(d)) return Fail(EINVAL);
      if (auto h = hwpts_.find(d.id); h != hwpts_.end()) {
        if (attached_pt() == d.id) return Fail(EBUSY);
        hwpts_.erase(h);
        return 0;
      }
      if (ioas_ids_.count(d.id)) {
        if (attached_pt() == d.id) return Fail(EBUSY);
        for (const auto& [id, h] : hwpts_) {
          if (h.ioas == d.id) return Fail(EBUSY);
        }
        ioas_ids_.erase(d.id);
        return 0;
      }
      return Fail(ENOENT);
    }
  }
  return Fail(ENOTTY);
}

int FakeVfioKernel::IommufdIoctl(Obj& /*o*/, unsigned long request, void* arg) {
  switch (request) {
    case uapi::kIommuIoasAlloc: {
      auto a = Load<uapi::iommu_ioas_alloc>(arg);
      if (a.size < sizeof(a) || a.flags) return Fail(EINVAL);
      a.out_ioas_id = next_ioas_++;
      ioas_ids_.insert(a.out_ioas_id);
      Store(arg, a);
      return 0;
    }
    case uapi::kIommuIoasMap: {
      auto m = Load<uapi::iommu_ioas_map>(arg);
      if (m.size < sizeof(m) || !ioas_ids_.count(m.ioas_id)) return Fail(ENOENT);
      if (!(m.flags & uapi::kIommuIoasMapFixedIova)) return Fail(EOPNOTSUPP);  // not modelled
      return DmaMapRange(m.iova, m.length, m.user_va, m.flags & uapi::kIommuIoasMapWriteable);
    }
    case uapi::kIommuIoasUnmap: {
      auto u = Load<uapi::iommu_ioas_unmap>(arg);
      if (u.size < sizeof(u) || !ioas_ids_.count(u.ioas_id)) return Fail(ENOENT);
      uint64_t unmapped = 0;
      if (DmaUnmapRange(u.iova, u.length, &unmapped) != 0) return -1;
      if (unmapped == 0) return Fail(ENOENT);  // iommufd: nothing there is an error
      u.length = unmapped;
      Store(arg, u);
      return 0;
    }
  }
  return HwptIoctl(request, arg);
}

int FakeVfioKernel::DmaMapRange(uint64_t iova, uint64_t size, uint64_t vaddr, bool writable) {
  if (size == 0 || iova % kPage || size % kPage || iova + size < iova) return Fail(EINVAL);
  for (const auto& [start, m] : dma) {
    if (Overlaps(iova, size, start, m.size)) return Fail(EEXIST);
  }
  dma[iova] = {size, vaddr, writable};
  return 0;
}

int FakeVfioKernel::DmaUnmapRange(uint64_t iova, uint64_t size, uint64_t* unmapped) {
  // Like both kernels: a range may cover whole mappings only; bisecting one is an error.
  for (const auto& [start, m] : dma) {
    if (Overlaps(iova, size, start, m.size) && (start < iova || start + m.size > iova + size)) {
      return Fail(EINVAL);
    }
  }
  *unmapped = 0;
  for (auto it = dma.begin(); it != dma.end();) {
    if (Overlaps(iova, size, it->first, it->second.size)) {
      *unmapped += it->second.size;
      it = dma.erase(it);
    } else {
      ++it;
    }
  }
  return 0;
}

int FakeVfioKernel::DeviceIoctl(Obj& o, unsigned long request, void* arg) {
  if (request == uapi::kVfioDeviceBindIommufd) {
    auto b = Load<uapi::vfio_device_bind_iommufd>(arg);
    if (!o.cdev || o.bound || b.argsz < sizeof(b) || b.flags) return Fail(EINVAL);
    auto i = fds_.find(b.iommufd);
    if (i == fds_.end() || i->second.kind != Kind::kIommufd) return Fail(EBADF);
    if (device_busy) return Fail(EBUSY);
    o.bound = true;
    b.out_devid = kDevId;
    Store(arg, b);
    return 0;
  }
  if (request == uapi::kVfioDeviceAttachIommufdPt) {
    auto a = Load<uapi::vfio_device_attach_iommufd_pt>(arg);
    if (!o.bound || a.argsz < sizeof(a) || a.flags) return Fail(EINVAL);
    auto h = hwpts_.find(a.pt_id);
    if (!ioas_ids_.count(a.pt_id) && h == hwpts_.end()) return Fail(ENOENT);
    if (h != hwpts_.end() && h->second.dirty && refuse_dirty_hwpt_attach) return Fail(EINVAL);
    o.attached = true;  // attaching again replaces the previous attachment (cdev "replace")
    o.pt = a.pt_id;
    return 0;
  }
  // A cdev is unusable until bound (the kernel refuses every other ioctl).
  if (o.cdev && !o.bound) return Fail(EINVAL);
  switch (request) {
    case VFIO_DEVICE_GET_INFO: {
      auto di = Load<vfio_device_info>(arg);
      if (di.argsz < 16) return Fail(EINVAL);
      di.flags = device_flags;
      di.num_regions = regions.size();
      di.num_irqs = irqs.size();
      Store(arg, di);
      return 0;
    }
    case VFIO_DEVICE_GET_REGION_INFO:
      return RegionInfo(arg);
    case VFIO_DEVICE_GET_IRQ_INFO: {
      auto ii = Load<vfio_irq_info>(arg);
      if (ii.argsz < sizeof(ii) || ii.index >= irqs.size()) return Fail(EINVAL);
      ii.flags = irqs[ii.index].flags;
      ii.count = irqs[ii.index].count;
      Store(arg, ii);
      return 0;
    }
    case VFIO_DEVICE_SET_IRQS:
      return SetIrqs(arg);
    case VFIO_DEVICE_RESET:
      if (!(device_flags & VFIO_DEVICE_FLAGS_RESET)) return Fail(EINVAL);
      reset_count++;
      mig_state = VFIO_DEVICE_STATE_RUNNING;
      session_ = 0;
      logging = false;
      return 0;
    case VFIO_DEVICE_FEATURE:
      return Feature(arg);
  }
  return Fail(ENOTTY);
}

int FakeVfioKernel::RegionInfo(void* arg) {
  auto ri = Load<vfio_region_info>(arg);
  if (ri.argsz < sizeof(ri) || ri.index >= regions.size()) return Fail(EINVAL);
  if (ri.index == VFIO_PCI_VGA_REGION_INDEX && !has_vga) return Fail(EINVAL);
  const Region& r = regions[ri.index];
  // Build the capability chain the way vfio-pci does: caps follow the fixed struct, each
  // header's `next` is the offset (from the start of the reply) of the following one.
  std::vector<uint8_t> caps;
  uint32_t cap_offset = 0;
  if (r.raw_caps) {
    caps = *r.raw_caps;
    cap_offset = r.raw_cap_offset;
  } else {
    std::vector<std::vector<uint8_t>> list;
    if (r.sparse) {
      std::vector<uint8_t> c(sizeof(vfio_region_info_cap_sparse_mmap) +
                             r.sparse->size() * sizeof(vfio_region_sparse_mmap_area));
      vfio_region_info_cap_sparse_mmap sp = {};
      sp.header.id = VFIO_REGION_INFO_CAP_SPARSE_MMAP;
      sp.header.version = 1;
      sp.nr_areas = r.sparse->size();
      Store(c.data(), sp);
      for (size_t i = 0; i < r.sparse->size(); ++i) {
        vfio_region_sparse_mmap_area a = {(*r.sparse)[i].offset, (*r.sparse)[i].size};
        Store(c.data() + sizeof(sp) + i * sizeof(a), a);
      }
      list.push_back(std::move(c));
    }
    if (r.msix_cap) {
      std::vector<uint8_t> c(sizeof(vfio_info_cap_header));
      vfio_info_cap_header h = {VFIO_REGION_INFO_CAP_MSIX_MAPPABLE, 1, 0};
      Store(c.data(), h);
      list.push_back(std::move(c));
    }
    for (size_t i = 0; i < list.size(); ++i) {
      uint32_t here = sizeof(vfio_region_info) + caps.size();
      if (i == 0) cap_offset = here;
      if (i + 1 < list.size()) {
        auto h = Load<vfio_info_cap_header>(list[i].data());
        h.next = here + list[i].size();
        Store(list[i].data(), h);
      }
      caps.insert(caps.end(), list[i].begin(), list[i].end());
    }
  }
  ri.flags = r.flags;
  ri.size = r.size;
  ri.offset = static_cast<uint64_t>(ri.index) << kOffsetShift;
  ri.cap_offset = 0;
  if (r.demand_argsz != 0) {
    ri.flags |= VFIO_REGION_INFO_FLAG_CAPS;
    ri.argsz = r.demand_argsz == UINT32_MAX ? ri.argsz + 8 : r.demand_argsz;
  } else if (!caps.empty()) {
    ri.flags |= VFIO_REGION_INFO_FLAG_CAPS;
    const uint32_t need = sizeof(ri) + caps.size();
    if (ri.argsz < need) {
      ri.argsz = need;  // too small: report the size needed, no chain
    } else {
      ri.cap_offset = cap_offset;
      std::memcpy(static_cast<uint8_t*>(arg) + sizeof(ri), caps.data(), caps.size());
    }
  }
  Store(arg, ri);
  return 0;
}

int FakeVfioKernel::SetIrqs(void* arg) {
  auto s = Load<vfio_irq_set>(arg);
  if (s.argsz < sizeof(s) || s.index >= irqs.size()) return Fail(EINVAL);
  Irq& q = irqs[s.index];
  const uint32_t data_type = s.flags & VFIO_IRQ_SET_DATA_TYPE_MASK;
  const uint32_t action = s.flags & VFIO_IRQ_SET_ACTION_TYPE_MASK;
  if (data_type == VFIO_IRQ_SET_DATA_NONE && action == VFIO_IRQ_SET_ACTION_TRIGGER &&
      s.count == 0) {
    q.triggers.assign(q.count, -1);  // disable the index
    return 0;
  }
  if (data_type != VFIO_IRQ_SET_DATA_EVENTFD) return Fail(EINVAL);
  if (s.count == 0 || s.start >= q.count || s.count > q.count - s.start ||
      s.argsz < sizeof(s) + s.count * sizeof(int32_t)) {
    return Fail(EINVAL);
  }
  const uint8_t* data = static_cast<const uint8_t*>(arg) + sizeof(s);
  if (action == VFIO_IRQ_SET_ACTION_TRIGGER) {
    for (uint32_t i = 0; i < s.count; ++i) q.triggers[s.start + i] = Load<int32_t>(data + 4 * i);
    return 0;
  }
  if (action == VFIO_IRQ_SET_ACTION_UNMASK) {
    if (!(q.flags & VFIO_IRQ_INFO_MASKABLE) || s.count != 1) return Fail(EINVAL);
    q.unmask_fd = Load<int32_t>(data);
    return 0;
  }
  return Fail(EINVAL);
}

int FakeVfioKernel::Feature(void* arg) {
  auto f = Load<vfio_device_feature>(arg);
  if (f.argsz < sizeof(f)) return Fail(EINVAL);
  uint8_t* data = static_cast<uint8_t*>(arg) + sizeof(f);
  const size_t data_size = f.argsz - sizeof(f);
  const uint32_t feature = f.flags & VFIO_DEVICE_FEATURE_MASK;
  const bool get = f.flags & VFIO_DEVICE_FEATURE_GET;
  const bool set = f.flags & VFIO_DEVICE_FEATURE_SET;
  const bool probe = f.flags & VFIO_DEVICE_FEATURE_PROBE;
  if (get && set && !probe) return Fail(EINVAL);
  switch (feature) {
    case VFIO_DEVICE_FEATURE_MIGRATION: {
      if (!mig_supported) return Fail(ENOTTY);
      if (probe) return set ? Fail(EINVAL) : 0;
      if (!get || data_size < sizeof(vfio_device_feature_migration)) return Fail(EINVAL);
      Store(data, vfio_device_feature_migration{mig_flags});
      return 0;
    }
    case VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE: {
      if (!mig_supported) return Fail(ENOTTY);
      if (probe) return 0;
      if (data_size < sizeof(vfio_device_feature_mig_state)) return Fail(EINVAL);
      auto st = Load<vfio_device_feature_mig_state>(data);
      if (get) {
        st.device_state = mig_state;
        st.data_fd = -1;
        Store(data, st);
        return 0;
      }
      st.data_fd = -1;
      if (MigSet(st.device_state, &st.data_fd) != 0) return -1;
      Store(data, st);
      return 0;
    }
    case VFIO_DEVICE_FEATURE_DMA_LOGGING_START: {
      if (!dma_logging_supported) return Fail(ENOTTY);
      if (probe) return get ? Fail(EINVAL) : 0;
      if (!set || data_size < sizeof(vfio_device_feature_dma_logging_control)) {
        return Fail(EINVAL);
      }
      if (logging) return Fail(EBUSY);
      auto ctl = Load<vfio_device_feature_dma_logging_control>(data);
      if (ctl.num_ranges == 0 || ctl.page_size == 0) return Fail(EINVAL);
      const auto* rs = reinterpret_cast<const vfio_device_feature_dma_logging_range*>(ctl.ranges);
      logging_ranges.clear();
      for (uint32_t i = 0; i < ctl.num_ranges; ++i) {
        logging_ranges.emplace_back(rs[i].iova, rs[i].length);
      }
      logging = true;
      logging_page_size = ctl.page_size;
      return 0;
    }
    case VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP:
      if (!dma_logging_supported) return Fail(ENOTTY);
      if (probe) return 0;
      if (!logging) return Fail(EINVAL);
      logging = false;
      return 0;
    case VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT: {
      if (!dma_logging_supported) return Fail(ENOTTY);
      if (probe) return 0;
      if (!get || data_size < sizeof(vfio_device_feature_dma_logging_report)) {
        return Fail(EINVAL);
      }
      if (!logging) return Fail(EINVAL);
      auto rep = Load<vfio_device_feature_dma_logging_report>(data);
      if (rep.page_size == 0 || (rep.page_size & (rep.page_size - 1))) return Fail(EINVAL);
      auto* bitmap = reinterpret_cast<uint64_t*>(rep.bitmap);
      for (auto it = dirty_pages.begin(); it != dirty_pages.end();) {
        if (*it >= rep.iova && *it - rep.iova < rep.length) {
          uint64_t bit = (*it - rep.iova) / rep.page_size;
          bitmap[bit / 64] |= 1ull << (bit % 64);  // only ORs bits in, as the uAPI says
          it = dirty_pages.erase(it);
        } else {
          ++it;
        }
      }
      return 0;
    }
  }
  return Fail(ENOTTY);
}

int FakeVfioKernel::MigSet(uint32_t to, int32_t* data_fd) {
  const uint32_t from = mig_state;
  if (from == to) return 0;
  const bool p2p = mig_flags & VFIO_MIGRATION_P2P;
  const bool pre = mig_flags & uapi::kMigrationPreCopy;
  auto arc = [&](uint32_t a, uint32_t b) { return from == a && to == b; };
  auto new_session = [&](bool resuming, const std::vector<uint8_t>& stream) {
    Obj d;
    d.kind = Kind::kData;
    d.resuming = resuming;
    d.session = ++session_;
    d.stream = stream;
    *data_fd = NewFd(std::move(d));
  };
  using S = vfio_device_mig_state;
  constexpr uint32_t kPreCopy = 6, kPreCopyP2p = 7;
  if (arc(S::VFIO_DEVICE_STATE_RUNNING, S::VFIO_DEVICE_STATE_STOP) ||
      (p2p && (arc(S::VFIO_DEVICE_STATE_RUNNING, S::VFIO_DEVICE_STATE_RUNNING_P2P) ||
               arc(S::VFIO_DEVICE_STATE_RUNNING_P2P, S::VFIO_DEVICE_STATE_STOP) ||
               arc(S::VFIO_DEVICE_STATE_STOP, S::VFIO_DEVICE_STATE_RUNNING_P2P) ||
               arc(S::VFIO_DEVICE_STATE_RUNNING_P2P, S::VFIO_DEVICE_STATE_RUNNING))) ||
      arc(S::VFIO_DEVICE_STATE_STOP, S::VFIO_DEVICE_STATE_RUNNING)) {
    // plain arcs
    if (stray_data_fd) new_session(false, {});
  } else if (arc(S::VFIO_DEVICE_STATE_STOP, S::VFIO_DEVICE_STATE_STOP_COPY)) {
    new_session(false, state_blob);
  } else if (arc(S::VFIO_DEVICE_STATE_STOP_COPY, S::VFIO_DEVICE_STATE_STOP)) {
    session_ = 0;
  } else if (arc(S::VFIO_DEVICE_STATE_STOP, S::VFIO_DEVICE_STATE_RESUMING)) {
    new_session(true, {});
  } else if (arc(S::VFIO_DEVICE_STATE_RESUMING, S::VFIO_DEVICE_STATE_STOP)) {
    std::vector<uint8_t> written;
    for (auto& [fd, o] : fds_) {
      if (o.kind == Kind::kData && o.session == session_) written = o.stream;
    }
    session_ = 0;
    if (reject_resume || written.empty()) {
      mig_state = S::VFIO_DEVICE_STATE_ERROR;
      return Fail(EINVAL);
    }
    resumed_blob = written;
  } else if (pre && arc(S::VFIO_DEVICE_STATE_RUNNING, kPreCopy)) {
    new_session(false, precopy_blob);
  } else if (pre && (arc(kPreCopy, kPreCopyP2p) || arc(kPreCopyP2p, kPreCopy))) {
    // same session
  } else if (pre && arc(kPreCopyP2p, S::VFIO_DEVICE_STATE_STOP_COPY)) {
    // The existing data fd continues with the final state; no new fd.
    for (auto& [fd, o] : fds_) {
      if (o.kind == Kind::kData && o.session == session_) {
        o.stream.insert(o.stream.end(), state_blob.begin(), state_blob.end());
      }
    }
  } else if (pre && arc(kPreCopy, S::VFIO_DEVICE_STATE_RUNNING)) {
    session_ = 0;
  } else {
    return Fail(EINVAL);
  }
  mig_state = to;
  return 0;
}

ssize_t FakeVfioKernel::Read(int fd, void* buf, size_t count) {
  auto it = fds_.find(fd);
  if (it == fds_.end()) return Fail(EBADF);
  Obj& o = it->second;
  if (o.kind != Kind::kData || o.resuming) return Fail(EINVAL);
  if (o.session != session_) return Fail(EBADF);  // session ended (state change, reset)
  size_t n = std::min({count, max_read_chunk, o.stream.size() - o.pos});
  if (n == 0 && (mig_state == 6 || mig_state == 7)) return Fail(ENOMSG);  // PRE_COPY: no more now
  std::memcpy(buf, o.stream.data() + o.pos, n);
  o.pos += n;
  return n;
}

ssize_t FakeVfioKernel::Write(int fd, const void* buf, size_t count) {
  auto it = fds_.find(fd);
  if (it == fds_.end()) return Fail(EBADF);
  Obj& o = it->second;
  if (o.kind != Kind::kData || !o.resuming) return Fail(EINVAL);
  if (o.session != session_) return Fail(EBADF);
  size_t n = std::min(count, max_write_chunk);
  const uint8_t* p = static_cast<const uint8_t*>(buf);
  o.stream.insert(o.stream.end(), p, p + n);
  return n;
}

ssize_t FakeVfioKernel::Pread(int fd, void* buf, size_t count, off_t offset) {
  auto it = fds_.find(fd);
  if (it == fds_.end()) return Fail(EBADF);
  if (it->second.kind != Kind::kDevice) return Fail(EINVAL);
  uint64_t index = static_cast<uint64_t>(offset) >> kOffsetShift;
  uint64_t off = offset & ((1ull << kOffsetShift) - 1);
  if (index >= regions.size()) return Fail(EINVAL);
  Region& r = regions[index];
  if (!(r.flags & VFIO_REGION_INFO_FLAG_READ) || off >= r.size) return Fail(EINVAL);
  size_t n = std::min<uint64_t>(count, r.size - off);
  std::memcpy(buf, r.data.data() + off, n);
  return n;
}

ssize_t FakeVfioKernel::Pwrite(int fd, const void* buf, size_t count, off_t offset) {
  auto it = fds_.find(fd);
  if (it == fds_.end()) return Fail(EBADF);
  if (it->second.kind != Kind::kDevice) return Fail(EINVAL);
  uint64_t index = static_cast<uint64_t>(offset) >> kOffsetShift;
  uint64_t off = offset & ((1ull << kOffsetShift) - 1);
  if (index >= regions.size()) return Fail(EINVAL);
  Region& r = regions[index];
  if (!(r.flags & VFIO_REGION_INFO_FLAG_WRITE) || off >= r.size) return Fail(EINVAL);
  size_t n = std::min<uint64_t>(count, r.size - off);
  std::memcpy(r.data.data() + off, buf, n);
  return n;
}

void* FakeVfioKernel::Mmap(void* addr, size_t length, int prot, int flags, int fd, off_t offset) {
  auto it = fds_.find(fd);
  if (it == fds_.end()) return (errno = EBADF, MAP_FAILED);
  uint64_t index = static_cast<uint64_t>(offset) >> kOffsetShift;
  uint64_t off = offset & ((1ull << kOffsetShift) - 1);
  if (it->second.kind != Kind::kDevice || index >= regions.size() ||
      !(regions[index].flags & VFIO_REGION_INFO_FLAG_MMAP) || !(flags & MAP_SHARED) ||
      off + length > regions[index].size) {
    return (errno = EINVAL, MAP_FAILED);
  }
  mmaps.emplace_back(index, off);
  // Real anonymous memory: the caller's ScopedMmap releases it with ::munmap.
  return ::mmap(addr, length, prot, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
}

int FakeVfioKernel::Readlink(const std::string& path, std::string* target) {
  auto it = symlinks.find(path);
  if (it == symlinks.end()) return Fail(ENOENT);
  *target = it->second;
  return 0;
}

int FakeVfioKernel::ReadDir(const std::string& path, std::vector<std::string>* names) {
  auto it = dirs.find(path);
  if (it == dirs.end()) return Fail(ENOENT);
  *names = it->second;
  return 0;
}

}  // namespace microvmm::vfio::testing
