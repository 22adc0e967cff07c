// A fake Linux kernel behind VfioSys for unit tests of the kernel VFIO backend: a small sysfs
// tree (symlinks + directories), the /dev nodes, and fd objects (container, group, device cdev,
// iommufd, migration data fds) whose ioctls follow the uAPI rules the backend depends on
// (argsz, capability chains, DMA overlap -> EEXIST, migration FSM arcs and data fds, DMA
// logging, IOMMU dirty tracking through HWPTs). Failures can be scripted per ioctl request / per
// opened path. One PCI device.
#ifndef MICROVMM_TESTS_VFIO_KERNEL_FAKE_VFIO_KERNEL_H_
#define MICROVMM_TESTS_VFIO_KERNEL_FAKE_VFIO_KERNEL_H_

#include <cstdint>
#include <deque>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "devices/vfio/kernel/vfio_sys.h"
#include "devices/vfio/vfio_device.h"

namespace microvmm::vfio::testing {

class FakeVfioKernel : public VfioSys {
 public:
  static constexpr int kOffsetShift = 40;  // region i lives at i << 40 in the device fd

  struct Region {
    uint64_t size = 0;
    uint32_t flags = 0;                           // VFIO_REGION_INFO_FLAG_*
    std::optional<std::vector<MmapArea>> sparse;  // adds a SPARSE_MMAP capability
    bool msix_cap = false;                        // adds an (empty) MSIX_MAPPABLE capability
    // Hostile/buggy reply: raw bytes appended after vfio_region_info, cap_offset as given.
    std::optional<std::vector<uint8_t>> raw_caps;
    uint32_t raw_cap_offset = 0;
    uint32_t demand_argsz = 0;  // != 0: always claim this reply size is needed;
                                // UINT32_MAX: always 8 more than given
    std::vector<uint8_t> data;  // backing store for pread/pwrite (size bytes)
  };
  struct Irq {
    uint32_t count = 0;
    uint32_t flags = 0;         // VFIO_IRQ_INFO_*
    std::vector<int> triggers;  // eventfd per vector, -1 = none
    int unmask_fd = -1;
  };
  struct DmaMapping {
    uint64_t size;
    uint64_t vaddr;
    bool writable;
  };

  FakeVfioKernel();
  ~FakeVfioKernel() override;

  // Sysfs + /dev setup for one PCI device. `cdev` ("vfio0") empty: kernel without vfio cdev.
  void AddPciDevice(const std::string& bdf, const std::string& driver, const std::string& group,
                    const std::string& cdev);
  // Another device in the same IOMMU group (makes the group non-viable unless driver is
  // vfio-pci or empty).
  void AddGroupPeer(const std::string& bdf, const std::string& driver);
  void SetIommufdPresent(bool present);

  // Scripted failures: the next `times` calls fail with `err`.
  void FailIoctl(unsigned long request, int err, int times = 1) {
    for (int i = 0; i < times; ++i) ioctl_fail_[request].push_back(err);
  }
  void FailOpen(const std::string& path, int err, int times = 1) {
    for (int i = 0; i < times; ++i) open_fail_[path].push_back(err);
  }
  int ioctl_calls(unsigned long request) const {
    auto it = ioctl_calls_.find(request);
    return it == ioctl_calls_.end() ? 0 : it->second;
  }
  int open_fd_count() const { return static_cast<int>(fds_.size()); }

  // ---- Device model (tests poke these directly) ----
  std::string bdf;
  uint32_t device_flags;  // VFIO_DEVICE_FLAGS_*
  std::vector<Region> regions;
  std::vector<Irq> irqs;
  bool group_viable = true;
  bool type1v2 = true;
  int api_version = 0;       // VFIO_API_VERSION
  bool has_vga = false;      // like vfio-pci: VGA region info is EINVAL on non-VGA devices
  bool device_busy = false;  // GROUP_GET_DEVICE_FD / BIND -> EBUSY
  // Migration
  bool mig_supported = true;
  uint64_t mig_flags;                 // VFIO_MIGRATION_*
  uint32_t mig_state;                 // enum vfio_device_mig_state
  std::vector<uint8_t> precopy_blob;  // streamed in PRE_COPY
  std::vector<uint8_t> state_blob;    // streamed in STOP_COPY
  std::vector<uint8_t> resumed_blob;  // committed by RESUMING -> STOP
  bool reject_resume = false;         // RESUMING -> STOP fails (bad stream), state -> ERROR
  bool stray_data_fd = false;         // buggy driver: a data fd on arcs that start no session
  size_t max_read_chunk = 7;          // data fd read/write granularity (exercise loops)
  size_t max_write_chunk = 5;
  int reset_count = 0;
  // DMA (type1 container or IOAS, whichever the device uses)
  std::map<uint64_t, DmaMapping> dma;
  // DMA logging
  bool dma_logging_supported = true;
  bool logging = false;
  uint64_t logging_page_size = 0;
  std::vector<std::pair<uint64_t, uint64_t>> logging_ranges;
  std::set<uint64_t> dirty_pages;  // 4 KiB-aligned IOVAs the "device" wrote
  // IOMMU dirty tracking (iommufd): IOMMU_GET_HW_INFO, IOMMU_HWPT_ALLOC (DIRTY_TRACKING),
  // IOMMU_HWPT_SET_DIRTY_TRACKING, IOMMU_HWPT_GET_DIRTY_BITMAP, IOMMU_DESTROY.
  bool hw_info_supported = true;   // false: kernel older than 6.6 (GET_HW_INFO is ENOTTY)
  bool iommu_dirty_cap = false;    // IOMMU_HW_CAP_DIRTY_TRACKING reported, DIRTY HWPTs allowed
  bool refuse_dirty_hwpt_attach = false;  // attaching the device to a dirty HWPT: EINVAL
  std::set<uint64_t> iommu_dirty_pages;   // 4 KiB IOVAs whose IOPTE dirty bit is set
  // The device writes the 4 KiB page at `iova`: recorded by DMA logging and/or the IOMMU, as far
  // as each is on (the IOMMU records only mapped IOVAs of a tracking HWPT the device uses).
  void DeviceWrites(uint64_t iova);
  int hwpt_count() const { return static_cast<int>(hwpts_.size()); }
  int iommufd_fd() const;  // the open /dev/iommu fd, -1 = none
  // Object ID the device cdev is attached to (IOAS or HWPT), 0 = none.
  uint32_t attached_pt() const;
  bool is_hwpt(uint32_t id) const { return hwpts_.count(id) != 0; }
  bool hwpt_tracking(uint32_t id) const {
    auto it = hwpts_.find(id);
    return it != hwpts_.end() && it->second.tracking;
  }
  // Region access log
  std::vector<std::pair<uint32_t, uint64_t>> mmaps;  // (region, offset)

  // ---- VfioSys ----
  int Open(const std::string& path, int flags) override;
  int Close(int fd) override;
  int Ioctl(int fd, unsigned long request, void* arg) override;
  ssize_t Pread(int fd, void* buf, size_t count, off_t offset) override;
  ssize_t Pwrite(int fd, const void* buf, size_t count, off_t offset) override;
  ssize_t Read(int fd, void* buf, size_t count) override;
  ssize_t Write(int fd, const void* buf, size_t count) override;
  void* Mmap(void* addr, size_t length, int prot, int flags, int fd, off_t offset) override;
  int Readlink(const std::string& path, std::string* target) override;
  int ReadDir(const std::string& path, std::vector<std::string>* names) override;

  std::map<std::string, std::string> symlinks;
  std::map<std::string, std::vector<std::string>> dirs;
  std::set<std::string> dev_nodes;

 private:
  enum class Kind { kContainer, kGroup, kDevice, kIommufd, kData };
  struct Obj {
    Kind kind;
    bool cdev = false;       // device opened through /dev/vfio/devices
    bool bound = false;      // cdev bound to an iommufd
    bool attached = false;   // cdev attached to an IOAS or HWPT
    uint32_t pt = 0;         // cdev: the IOAS/HWPT it is attached to
    int container = -1;      // group: its container fd
    bool iommu_set = false;  // container: SET_IOMMU done
    int groups = 0;          // container: attached groups
    // data fd
    bool resuming = false;
    uint64_t session = 0;
    std::vector<uint8_t> stream;
    size_t pos = 0;
  };

  int NewFd(Obj obj);
  int Fail(int err) {
    errno = err;
    return -1;
  }
  int ContainerIoctl(Obj& o, unsigned long request, void* arg);
  int GroupIoctl(Obj& o, unsigned long request, void* arg);
  int IommufdIoctl(Obj& o, unsigned long request, void* arg);
  int DeviceIoctl(Obj& o, unsigned long request, void* arg);
  int RegionInfo(void* arg);
  int SetIrqs(void* arg);
  int Feature(void* arg);
  int MigSet(uint32_t new_state, int32_t* data_fd);
  int DmaMapRange(uint64_t iova, uint64_t size, uint64_t vaddr, bool writable);
  int DmaUnmapRange(uint64_t iova, uint64_t size, uint64_t* unmapped);

  std::map<int, Obj> fds_;
  int next_fd_ = 1000;  // never real fd numbers
  uint32_t next_ioas_ = 1;
  std::set<uint32_t> ioas_ids_;
  struct Hwpt {
    uint32_t ioas = 0;
    bool dirty = false;     // allocated with IOMMU_HWPT_ALLOC_DIRTY_TRACKING
    bool tracking = false;  // IOMMU_HWPT_SET_DIRTY_TRACKING enabled
  };
  std::map<uint32_t, Hwpt> hwpts_;  // IDs share the IOAS ID space, like iommufd objects
  static constexpr uint32_t kDevId = 7;  // out_devid of a bound device
  bool DevBound() const;
  int HwptIoctl(unsigned long request, void* arg);
  uint64_t session_ = 0;  // current migration data session; 0 = none
  std::map<unsigned long, std::deque<int>> ioctl_fail_;
  std::map<std::string, std::deque<int>> open_fail_;
  std::map<unsigned long, int> ioctl_calls_;
};

}  // namespace microvmm::vfio::testing

#endif  // MICROVMM_TESTS_VFIO_KERNEL_FAKE_VFIO_KERNEL_H_
