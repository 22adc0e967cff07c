// One device-level abstraction over the two ways a VMM reaches a passthrough device:
//   - kernel VFIO (devices/vfio/kernel): ioctls on a device fd obtained through iommufd/cdev or
//     a group + type1 container;
//   - vfio-user (devices/vfio/user): the same operations as messages on a unix socket to a device
//     server process (the protocol QEMU and SPDK speak).
// The PCI model on top (config-space shadowing, BAR mapping, MSI-X through irqfds, INTx with
// resample, device migration) is written once against this interface.
//
// Semantics follow the Linux VFIO uAPI (include/uapi/linux/vfio.h) so that both backends map onto
// it without translation: region/irq indices are VFIO_PCI_*_REGION_INDEX / VFIO_PCI_*_IRQ_INDEX,
// migration states are enum vfio_device_mig_state (uAPI v2).
//
// Threading: a VfioDevice is used by one thread at a time unless a method says otherwise; the
// PCI model serialises accesses. Every method returns a clear error instead of crashing on a
// misbehaving device (a vfio-user server is another process and may send anything).
#ifndef MICROVMM_DEVICES_VFIO_VFIO_DEVICE_H_
#define MICROVMM_DEVICES_VFIO_VFIO_DEVICE_H_

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "vmm/base/fd.h"

namespace microvmm::vfio {

// VFIO_PCI_*_REGION_INDEX and VFIO_PCI_*_IRQ_INDEX, repeated so users need not include vfio.h.
inline constexpr uint32_t kBar0RegionIndex = 0;     // .. 5
inline constexpr uint32_t kRomRegionIndex = 6;
inline constexpr uint32_t kConfigRegionIndex = 7;
inline constexpr uint32_t kIntxIrqIndex = 0;
inline constexpr uint32_t kMsiIrqIndex = 1;
inline constexpr uint32_t kMsixIrqIndex = 2;

struct DeviceInfo {
  uint32_t num_regions = 0;
  uint32_t num_irqs = 0;
  bool is_pci = false;
  bool can_reset = false;
};

struct MmapArea {  // part of a region the guest may access directly (sparse mmap capability)
  uint64_t offset = 0;
  uint64_t size = 0;
};

struct RegionInfo {
  uint32_t index = 0;
  uint64_t size = 0;  // 0: region absent (e.g. unimplemented BAR)
  bool readable = false;
  bool writable = false;
  bool mappable = false;            // Map() may be used for (parts of) it
  std::vector<MmapArea> mmap_areas;  // empty + mappable: the whole region
};

struct IrqInfo {
  uint32_t index = 0;
  uint32_t count = 0;    // vectors; 0: not supported
  bool eventfd = false;  // can signal through eventfds
  bool maskable = false;
  bool automasked = false;  // INTx: masked on delivery until unmasked (resample)
};

// enum vfio_device_mig_state values.
enum class MigState : uint32_t {
  kError = 0,
  kStop = 1,
  kRunning = 2,
  kStopCopy = 3,
  kResuming = 4,
  kRunningP2p = 5,
  kPreCopy = 6,
  kPreCopyP2p = 7,
};
inline const char* MigStateName(MigState s) {
  switch (s) {
    case MigState::kError: return "ERROR";
    case MigState::kStop: return "STOP";
    case MigState::kRunning: return "RUNNING";
    case MigState::kStopCopy: return "STOP_COPY";
    case MigState::kResuming: return "RESUMING";
    case MigState::kRunningP2p: return "RUNNING_P2P";
    case MigState::kPreCopy: return "PRE_COPY";
    case MigState::kPreCopyP2p: return "PRE_COPY_P2P";
  }
  return "UNKNOWN";
}

struct MigrationCaps {
  bool supported = false;  // VFIO_MIGRATION_STOP_COPY
  bool p2p = false;        // VFIO_MIGRATION_P2P
  bool pre_copy = false;   // VFIO_MIGRATION_PRE_COPY
  bool dma_logging = false;  // VFIO_DEVICE_FEATURE_DMA_LOGGING_* (device tracks its own DMA)
};

struct DmaRange {
  uint64_t iova = 0;
  uint64_t size = 0;
};

class VfioDevice {
 public:
  virtual ~VfioDevice() = default;

  // Human-readable identity for errors and logs ("0000:01:00.0", "vfio-user:/run/dev.sock").
  virtual std::string name() const = 0;

  virtual absl::StatusOr<DeviceInfo> GetInfo() = 0;
  virtual absl::StatusOr<RegionInfo> GetRegionInfo(uint32_t index) = 0;
  virtual absl::StatusOr<IrqInfo> GetIrqInfo(uint32_t index) = 0;

  // Reads/writes `data.size()` bytes at `offset` of region `index` (BARs, config space). Out of
  // range or a short transfer is an error.
  virtual absl::Status RegionRead(uint32_t index, uint64_t offset, std::span<uint8_t> data) = 0;
  virtual absl::Status RegionWrite(uint32_t index, uint64_t offset,
                                   std::span<const uint8_t> data) = 0;
  // Maps [offset, offset+size) of a mappable region for direct guest access (must lie inside one
  // of the region's mmap areas).
  virtual absl::StatusOr<ScopedMmap> MapRegion(uint32_t index, uint64_t offset, uint64_t size) = 0;

  // Interrupts: vectors [start, start+fds.size()) of irq `index` signal the given eventfds
  // (-1 = disconnect that vector). SetIrqs with an empty span disables the whole index.
  virtual absl::Status SetIrqs(uint32_t index, uint32_t start, std::span<const int> fds) = 0;
  // INTx level-triggered emulation: the device masks INTx when it fires; writing `unmask_fd`
  // (eventfd, e.g. a KVM irqfd resamplefd) unmasks it. -1 disconnects.
  virtual absl::Status SetIrqUnmaskFd(uint32_t index, int unmask_fd) = 0;

  virtual absl::Status Reset() = 0;

  // DMA: makes guest RAM [iova, iova+size) reachable by the device. `vaddr` is the VMM's mapping
  // (kernel VFIO pins it); `fd`/`fd_offset` is the memfd behind it (vfio-user shares it with the
  // server). Ranges must not overlap an existing mapping.
  virtual absl::Status DmaMap(uint64_t iova, uint64_t size, void* vaddr, int fd,
                              uint64_t fd_offset, bool writable) = 0;
  virtual absl::Status DmaUnmap(uint64_t iova, uint64_t size) = 0;

  // ---- Migration (uAPI v2) ----
  // Unsupported migration is not an error: caps.supported == false.
  virtual absl::StatusOr<MigrationCaps> GetMigrationCaps() = 0;
  virtual absl::StatusOr<MigState> GetMigState() = 0;
  // Moves the device to `state` (one arc of the v2 FSM; callers walk multi-step paths).
  virtual absl::Status SetMigState(MigState state) = 0;
  // Device state stream in PRE_COPY / STOP_COPY: reads up to `buf.size()` bytes; 0 = end of data
  // (in PRE_COPY: nothing more for now). In RESUMING, WriteMigData appends to the device state.
  virtual absl::StatusOr<size_t> ReadMigData(std::span<uint8_t> buf) = 0;
  virtual absl::Status WriteMigData(std::span<const uint8_t> data) = 0;

  // Device DMA dirty tracking (DMA logging). Unimplemented when the device cannot: the caller
  // then treats all DMA-mapped RAM as dirty. `bitmap` has one bit per `page_size` page of
  // [iova, iova+size) (bit i of word w = page 64*w+i), set bits are ORed in; reporting clears
  // the device's record of the reported range.
  virtual absl::Status StartDmaLogging(std::span<const DmaRange> ranges, uint64_t page_size) = 0;
  virtual absl::Status ReportDmaDirty(uint64_t iova, uint64_t size, uint64_t page_size,
                                      std::span<uint64_t> bitmap) = 0;
  virtual absl::Status StopDmaLogging() = 0;

  // IOMMU dirty tracking: the IOMMU's page tables record the device's writes (kernel backend:
  // an iommufd HW page table allocated with IOMMU_HWPT_ALLOC_DIRTY_TRACKING). The second dirty
  // source, for devices without DMA logging; it covers every DMA mapping of the device. Same
  // bitmap contract as ReportDmaDirty (bits ORed in, reporting clears the reported range);
  // `iova`/`size` must be multiples of `page_size`. Unimplemented (the default) when the backend
  // or the IOMMU cannot; starting clears what the IOMMU recorded before.
  virtual absl::Status StartIommuDirtyTracking() {
    return absl::UnimplementedError(name() + ": no IOMMU dirty tracking");
  }
  virtual absl::Status ReportIommuDirty(uint64_t /*iova*/, uint64_t /*size*/,
                                        uint64_t /*page_size*/, std::span<uint64_t> /*bitmap*/) {
    return absl::UnimplementedError(name() + ": no IOMMU dirty tracking");
  }
  virtual absl::Status StopIommuDirtyTracking() {
    return absl::UnimplementedError(name() + ": no IOMMU dirty tracking");
  }
};

}  // namespace microvmm::vfio

#endif  // MICROVMM_DEVICES_VFIO_VFIO_DEVICE_H_
