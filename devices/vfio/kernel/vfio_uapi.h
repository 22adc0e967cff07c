// Linux VFIO/iommufd uAPI for the kernel backend. The system headers are Linux 6.1: <linux/vfio.h>
// lacks the cdev/iommufd ioctls (6.6) and PRE_COPY (6.3), and <linux/iommufd.h> is absent (with
// it the IOMMU dirty tracking ioctls of 6.7), so the newer pieces are defined here from upstream
// include/uapi/linux/{vfio,iommufd}.h. All of them are stable ABI; layouts are checked with
// static_asserts.
#ifndef MICROVMM_DEVICES_VFIO_KERNEL_VFIO_UAPI_H_
#define MICROVMM_DEVICES_VFIO_KERNEL_VFIO_UAPI_H_

#include <linux/ioctl.h>
#include <linux/types.h>
#include <linux/vfio.h>

#include <cstdint>

namespace microvmm::vfio::uapi {

// ---- vfio.h, newer than 6.1 ----
inline constexpr uint64_t kMigrationPreCopy = 1u << 2;  // VFIO_MIGRATION_PRE_COPY

// VFIO_DEVICE_BIND_IOMMUFD (Linux 6.6). Later kernels append token_uuid_ptr behind a flag; we
// pass the 16-byte base layout, which every kernel accepts (argsz-versioned).
struct vfio_device_bind_iommufd {
  uint32_t argsz;
  uint32_t flags;
  int32_t iommufd;
  uint32_t out_devid;
};
static_assert(sizeof(vfio_device_bind_iommufd) == 16);
inline constexpr unsigned long kVfioDeviceBindIommufd = _IO(VFIO_TYPE, VFIO_BASE + 18);

// VFIO_DEVICE_ATTACH_IOMMUFD_PT (Linux 6.6); `pasid` was appended later behind a flag.
struct vfio_device_attach_iommufd_pt {
  uint32_t argsz;
  uint32_t flags;
  uint32_t pt_id;
};
static_assert(sizeof(vfio_device_attach_iommufd_pt) == 12);
inline constexpr unsigned long kVfioDeviceAttachIommufdPt = _IO(VFIO_TYPE, VFIO_BASE + 19);

// ---- iommufd.h ----
inline constexpr unsigned kIommufdType = ';';
inline constexpr unsigned kIommufdCmdBase = 0x80;

struct iommu_destroy {
  uint32_t size;
  uint32_t id;
};
inline constexpr unsigned long kIommuDestroy = _IO(kIommufdType, kIommufdCmdBase + 0);

struct iommu_ioas_alloc {
  uint32_t size;
  uint32_t flags;
  uint32_t out_ioas_id;
};
static_assert(sizeof(iommu_ioas_alloc) == 12);
inline constexpr unsigned long kIommuIoasAlloc = _IO(kIommufdType, kIommufdCmdBase + 1);

inline constexpr uint32_t kIommuIoasMapFixedIova = 1u << 0;
inline constexpr uint32_t kIommuIoasMapWriteable = 1u << 1;
inline constexpr uint32_t kIommuIoasMapReadable = 1u << 2;

struct iommu_ioas_map {
  uint32_t size;
  uint32_t flags;
  uint32_t ioas_id;
  uint32_t reserved;
  alignas(8) uint64_t user_va;
  alignas(8) uint64_t length;
  alignas(8) uint64_t iova;
};
static_assert(sizeof(iommu_ioas_map) == 40);
inline constexpr unsigned long kIommuIoasMap = _IO(kIommufdType, kIommufdCmdBase + 5);

struct iommu_ioas_unmap {
  uint32_t size;
  uint32_t ioas_id;
  alignas(8) uint64_t iova;
  alignas(8) uint64_t length;
};
static_assert(sizeof(iommu_ioas_unmap) == 24);
inline constexpr unsigned long kIommuIoasUnmap = _IO(kIommufdType, kIommufdCmdBase + 6);

// ---- iommufd.h: IOMMU dirty tracking (Linux 6.7) ----
// Command numbers continue the enum of include/uapi/linux/iommufd.h: OPTION 0x87, VFIO_IOAS 0x88,
// HWPT_ALLOC 0x89, GET_HW_INFO 0x8a, HWPT_SET_DIRTY_TRACKING 0x8b, HWPT_GET_DIRTY_BITMAP 0x8c.

inline constexpr uint32_t kIommuHwptAllocNestParent = 1u << 0;    // IOMMU_HWPT_ALLOC_NEST_PARENT
inline constexpr uint32_t kIommuHwptAllocDirtyTracking = 1u << 1;  // ..._DIRTY_TRACKING
inline constexpr uint32_t kIommuHwptDataNone = 0;                  // IOMMU_HWPT_DATA_NONE

// A kernel-managed HW page table mirroring the IOAS `pt_id`, for device `dev_id` (the
// out_devid of VFIO_DEVICE_BIND_IOMMUFD). With DIRTY_TRACKING the kernel refuses (EOPNOTSUPP)
// when the device's IOMMU cannot track dirty IOPTEs, and refuses to attach any device whose
// IOMMU cannot to the resulting HWPT.
struct iommu_hwpt_alloc {
  uint32_t size;
  uint32_t flags;
  uint32_t dev_id;
  uint32_t pt_id;
  uint32_t out_hwpt_id;
  uint32_t reserved;
  uint32_t data_type;
  uint32_t data_len;
  alignas(8) uint64_t data_uptr;
};
static_assert(sizeof(iommu_hwpt_alloc) == 40);
inline constexpr unsigned long kIommuHwptAlloc = _IO(kIommufdType, kIommufdCmdBase + 9);

inline constexpr uint64_t kIommuHwCapDirtyTracking = 1u << 0;  // IOMMU_HW_CAP_DIRTY_TRACKING

// IOMMU_GET_HW_INFO (Linux 6.6; out_capabilities from 6.7: older kernels leave it 0). Newer
// kernels split `reserved` into out_max_pasid_log2 + padding; the size is the same.
struct iommu_hw_info {
  uint32_t size;
  uint32_t flags;
  uint32_t dev_id;
  uint32_t data_len;  // in: size of the buffer at data_uptr (0 allowed)
  alignas(8) uint64_t data_uptr;
  uint32_t out_data_type;
  uint32_t reserved;
  alignas(8) uint64_t out_capabilities;
};
static_assert(sizeof(iommu_hw_info) == 40);
inline constexpr unsigned long kIommuGetHwInfo = _IO(kIommufdType, kIommufdCmdBase + 10);

inline constexpr uint32_t kIommuHwptDirtyTrackingEnable = 1;  // IOMMU_HWPT_DIRTY_TRACKING_ENABLE

struct iommu_hwpt_set_dirty_tracking {
  uint32_t size;
  uint32_t flags;
  uint32_t hwpt_id;
  uint32_t reserved;
};
static_assert(sizeof(iommu_hwpt_set_dirty_tracking) == 16);
inline constexpr unsigned long kIommuHwptSetDirtyTracking =
    _IO(kIommufdType, kIommufdCmdBase + 11);

inline constexpr uint32_t kIommuHwptGetDirtyBitmapNoClear = 1;  // ..._GET_DIRTY_BITMAP_NO_CLEAR

// Reads (and by default clears) the dirty bits of [iova, iova+length): bit i of the u64 array at
// `data` is the page_size page at iova + i*page_size; bits are only ever set (ORed in). iova and
// length must be multiples of page_size (and of the IOAS alignment), data 8-byte aligned.
struct iommu_hwpt_get_dirty_bitmap {
  uint32_t size;
  uint32_t hwpt_id;
  uint32_t flags;
  uint32_t reserved;
  alignas(8) uint64_t iova;
  alignas(8) uint64_t length;
  alignas(8) uint64_t page_size;
  alignas(8) uint64_t data;
};
static_assert(sizeof(iommu_hwpt_get_dirty_bitmap) == 48);
inline constexpr unsigned long kIommuHwptGetDirtyBitmap =
    _IO(kIommufdType, kIommufdCmdBase + 12);

// Layout checks against the 6.1 header for the structs we take from it.
static_assert(sizeof(vfio_region_info) == 32);
static_assert(sizeof(vfio_info_cap_header) == 8);
static_assert(sizeof(vfio_region_info_cap_sparse_mmap) == 16);
static_assert(sizeof(vfio_region_sparse_mmap_area) == 16);
static_assert(sizeof(vfio_irq_set) == 20);
static_assert(sizeof(vfio_device_feature) == 8);
static_assert(sizeof(vfio_device_feature_mig_state) == 8);
static_assert(sizeof(vfio_device_feature_dma_logging_control) == 24);
static_assert(sizeof(vfio_device_feature_dma_logging_report) == 32);

// Name of an ioctl request for error messages ("VFIO_DEVICE_GET_REGION_INFO").
const char* IoctlName(unsigned long request);

}  // namespace microvmm::vfio::uapi

#endif  // MICROVMM_DEVICES_VFIO_KERNEL_VFIO_UAPI_H_
