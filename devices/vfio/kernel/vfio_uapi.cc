#include "devices/vfio/kernel/vfio_uapi.h"

namespace microvmm::vfio::uapi {

const char* IoctlName(unsigned long request) {
  switch (request) {
    case VFIO_GET_API_VERSION:
      return "VFIO_GET_API_VERSION";
    case VFIO_CHECK_EXTENSION:
      return "VFIO_CHECK_EXTENSION";
    case VFIO_SET_IOMMU:
      return "VFIO_SET_IOMMU";
    case VFIO_GROUP_GET_STATUS:
      return "VFIO_GROUP_GET_STATUS";
    case VFIO_GROUP_SET_CONTAINER:
      return "VFIO_GROUP_SET_CONTAINER";
    case VFIO_GROUP_UNSET_CONTAINER:
      return "VFIO_GROUP_UNSET_CONTAINER";
    case VFIO_GROUP_GET_DEVICE_FD:
      return "VFIO_GROUP_GET_DEVICE_FD";
    case VFIO_DEVICE_GET_INFO:
      return "VFIO_DEVICE_GET_INFO";
    case VFIO_DEVICE_GET_REGION_INFO:
      return "VFIO_DEVICE_GET_REGION_INFO";
    case VFIO_DEVICE_GET_IRQ_INFO:
      return "VFIO_DEVICE_GET_IRQ_INFO";
    case VFIO_DEVICE_SET_IRQS:
      return "VFIO_DEVICE_SET_IRQS";
    case VFIO_DEVICE_RESET:
      return "VFIO_DEVICE_RESET";
    case VFIO_DEVICE_FEATURE:
      return "VFIO_DEVICE_FEATURE";
    case VFIO_IOMMU_MAP_DMA:
      return "VFIO_IOMMU_MAP_DMA";
    case VFIO_IOMMU_UNMAP_DMA:
      return "VFIO_IOMMU_UNMAP_DMA";
    case kVfioDeviceBindIommufd:
      return "VFIO_DEVICE_BIND_IOMMUFD";
    case kVfioDeviceAttachIommufdPt:
      return "VFIO_DEVICE_ATTACH_IOMMUFD_PT";
    case kIommuDestroy:
      return "IOMMU_DESTROY";
    case kIommuIoasAlloc:
      return "IOMMU_IOAS_ALLOC";
    case kIommuIoasMap:
      return "IOMMU_IOAS_MAP";
    case kIommuIoasUnmap:
      return "IOMMU_IOAS_UNMAP";
    case kIommuHwptAlloc:
      return "IOMMU_HWPT_ALLOC";
    case kIommuGetHwInfo:
      return "IOMMU_GET_HW_INFO";
    case kIommuHwptSetDirtyTracking:
      return "IOMMU_HWPT_SET_DIRTY_TRACKING";
    case kIommuHwptGetDirtyBitmap:
      return "IOMMU_HWPT_GET_DIRTY_BITMAP";
  }
  return "unknown ioctl";
}

}  // namespace microvmm::vfio::uapi
