// Device migration of a VFIO device through the uAPI v2 state machine (enum vfio_device_mig_state)
// plus DMA dirty tracking (device DMA logging, else IOMMU dirty tracking, else all dirty).
//
// Arcs used (every one is a single arc of the v2 FSM, see include/uapi/linux/vfio.h):
//   source, device offers PRE_COPY:
//     StartPreCopy:  RUNNING -> PRE_COPY                  (data_fd opens; DrainPreCopy reads it)
//     StopAndCopy:   PRE_COPY -> PRE_COPY_P2P -> STOP_COPY  (P2P offered: quiesce peer DMA first)
//                    PRE_COPY -> STOP_COPY                  (no P2P)
//                    then read to EOF, STOP_COPY -> STOP
//   source, no PRE_COPY (or StartPreCopy not called):
//     StopAndCopy:   RUNNING [-> RUNNING_P2P] -> STOP -> STOP_COPY, read to EOF, STOP_COPY -> STOP
//   destination:
//     Resume(blob):  RUNNING [-> RUNNING_P2P] -> STOP -> RESUMING, write blob, RESUMING -> STOP,
//                    then (run) STOP [-> RUNNING_P2P] -> RUNNING
//   Cancel() (any state -> RUNNING, e.g. the migration failed or the source resumes):
//     PRE_COPY_P2P -> PRE_COPY -> RUNNING;  PRE_COPY -> RUNNING;  STOP_COPY -> STOP -> RUNNING;
//     RESUMING -> STOP -> RUNNING;  STOP -> RUNNING;  RUNNING_P2P -> RUNNING;
//     ERROR, or any arc failing on the way: device reset (VFIO_DEVICE_RESET puts the FSM back in
//     RUNNING; the device loses its state, which is all that can be done).
// The blob is the device's opaque stream in order: everything read in PRE_COPY followed by the
// STOP_COPY data. The destination writes all of it in RESUMING.
//
// Threading: one thread drives the driver. `mu` (optional) is the lock that serialises the
// VfioDevice with the PCI model (VfioPciDevice passes its own).
#ifndef MICROVMM_DEVICES_VFIO_PCI_VFIO_MIGRATION_H_
#define MICROVMM_DEVICES_VFIO_PCI_VFIO_MIGRATION_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "devices/vfio/vfio_device.h"

namespace microvmm::vfio {

// Where the DMA dirty set of a passthrough device comes from, best first.
enum class DirtySource {
  kNone,          // dirty tracking is off
  kDeviceDmaLog,  // the device logs its own DMA (VFIO_DEVICE_FEATURE_DMA_LOGGING_*)
  kIommu,         // the IOMMU's page tables record device writes (iommufd dirty tracking)
  kAllMapped,     // neither: every DMA-mapped page counts as dirty on every sync
};
// "device DMA log", "IOMMU dirty tracking", "all DMA-mapped RAM" ("off" for kNone).
const char* DirtySourceName(DirtySource s);

class VfioMigrationDriver {
 public:
  // Checks the migration capabilities; FAILED_PRECONDITION naming the device when it cannot
  // migrate (no VFIO_MIGRATION_STOP_COPY). `dev` (and `mu`) must outlive the driver.
  static absl::StatusOr<std::unique_ptr<VfioMigrationDriver>> Create(VfioDevice& dev,
                                                                     std::mutex* mu = nullptr);

  const MigrationCaps& caps() const { return caps_; }
  // The state this driver last put the device in.
  MigState state() const { return state_; }

  // ---- Source ----
  // RUNNING -> PRE_COPY. Returns false (nothing done) when the device offers no PRE_COPY.
  absl::StatusOr<bool> StartPreCopy();
  // Reads what the device has for now (at most `max_bytes`), appending it to the blob. Returns
  // the number of bytes read; 0 = nothing more for now. The VM keeps running.
  absl::StatusOr<size_t> DrainPreCopy(size_t max_bytes = SIZE_MAX);
  // Bytes of the blob read so far (pre-copy progress), and the blob itself (valid until the
  // next call that reads more, Cancel or StopAndCopy).
  size_t blob_bytes() const { return blob_.size(); }
  std::string_view blob() const { return blob_; }
  // Stops the device, reads its final state to EOF and leaves it in STOP. Returns the whole
  // blob (pre-copy data included). At most `max_bytes` in total (a device streaming forever is
  // an error, not an out-of-memory).
  absl::StatusOr<std::string> StopAndCopy(size_t max_bytes = size_t{1} << 32);

  // ---- Destination ----
  // Loads `blob` into the device (RESUMING); with `run`, the device ends in RUNNING, else STOP
  // (call Run() when the VM starts).
  absl::Status Resume(std::span<const uint8_t> blob, bool run = true);
  absl::Status Run();  // STOP -> RUNNING

  // Any state -> RUNNING (see the arcs above). Drops the blob.
  absl::Status Cancel();

  // ---- DMA dirty tracking ----
  // Starts dirty tracking over `ranges` (the DMA-mapped guest RAM) with the best source (see
  // DirtySource): device DMA logging; when the device cannot log (Unimplemented), IOMMU dirty
  // tracking; when that is unavailable or fails to start, every page of `ranges` is reported
  // dirty on every sync. An error other than Unimplemented from the device's DMA logging is
  // returned. Logs which source is on; dirty_source() tells it.
  absl::Status StartDirtyTracking(std::vector<DmaRange> ranges, uint64_t page_size = 4096);
  // Calls `fn` once per range with its bitmap (bit i of word w = page 64*w+i of the range).
  // A failed report loses the log: that range is reported all dirty.
  using DirtyFn = std::function<void(const DmaRange&, std::span<const uint64_t> bitmap)>;
  absl::Status SyncDirty(const DirtyFn& fn);
  absl::Status StopDirtyTracking();
  bool dirty_tracking() const { return source_ != DirtySource::kNone; }
  DirtySource dirty_source() const { return source_; }
  bool fallback() const { return source_ == DirtySource::kAllMapped; }

 private:
  VfioMigrationDriver(VfioDevice& dev, std::mutex* mu, MigrationCaps caps)
      : dev_(dev), mu_(mu), caps_(caps) {}
  std::unique_lock<std::mutex> Lock() const {
    return mu_ ? std::unique_lock<std::mutex>(*mu_) : std::unique_lock<std::mutex>();
  }
  absl::Status Step(MigState to);  // one arc, with the device name in errors
  absl::Status ReadAvailable(size_t max_bytes, size_t* got);
  absl::Status RunLocked();  // Run() with the lock held
  absl::Status CancelLocked();

  VfioDevice& dev_;
  std::mutex* mu_;
  const MigrationCaps caps_;
  MigState state_ = MigState::kRunning;
  std::string blob_;
  // Dirty tracking (kNone: off).
  DirtySource source_ = DirtySource::kNone;
  uint64_t page_size_ = 4096;
  std::vector<DmaRange> ranges_;
};

}  // namespace microvmm::vfio

#endif  // MICROVMM_DEVICES_VFIO_PCI_VFIO_MIGRATION_H_
