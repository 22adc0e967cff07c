#include "devices/vfio/pci/vfio_migration.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "vmm/base/log.h"

namespace microvmm::vfio {

namespace {
constexpr size_t kChunk = 64 * 1024;  // read granularity of the data_fd
}  // namespace

absl::StatusOr<std::unique_ptr<VfioMigrationDriver>> VfioMigrationDriver::Create(VfioDevice& dev,
                                                                                 std::mutex* mu) {
  auto lock = mu ? std::unique_lock<std::mutex>(*mu) : std::unique_lock<std::mutex>();
  absl::StatusOr<MigrationCaps> caps = dev.GetMigrationCaps();
  if (!caps.ok()) return caps.status();
  if (!caps->supported)
    return absl::FailedPreconditionError(absl::StrCat(
        "VFIO device ", dev.name(),
        " cannot be migrated: it does not offer VFIO_MIGRATION_STOP_COPY (no migration driver)"));
  std::unique_ptr<VfioMigrationDriver> d(new VfioMigrationDriver(dev, mu, *caps));
  absl::StatusOr<MigState> st = dev.GetMigState();
  if (!st.ok()) return st.status();
  d->state_ = *st;
  return d;
}

absl::Status VfioMigrationDriver::Step(MigState to) {
  absl::Status s = dev_.SetMigState(to);
  if (!s.ok())
    return absl::Status(s.code(), absl::StrFormat("%s: migration arc %s -> %s failed: %s",
                                                  dev_.name(), MigStateName(state_),
                                                  MigStateName(to), s.message()));
  state_ = to;
  return absl::OkStatus();
}

absl::StatusOr<bool> VfioMigrationDriver::StartPreCopy() {
  auto lock = Lock();
  if (!caps_.pre_copy) return false;
  if (state_ != MigState::kRunning)
    return absl::FailedPreconditionError(absl::StrCat(
        dev_.name(), ": pre-copy starts from RUNNING, device is in ", MigStateName(state_)));
  blob_.clear();
  if (absl::Status s = Step(MigState::kPreCopy); !s.ok()) return s;
  return true;
}

absl::Status VfioMigrationDriver::ReadAvailable(size_t max_bytes, size_t* got) {
  *got = 0;
  while (*got < max_bytes) {
    size_t want = std::min(kChunk, max_bytes - *got);
    size_t old = blob_.size();
    blob_.resize(old + want);
    absl::StatusOr<size_t> n =
        dev_.ReadMigData(std::span<uint8_t>(reinterpret_cast<uint8_t*>(blob_.data()) + old, want));
    blob_.resize(old + (n.ok() ? *n : 0));
    if (!n.ok()) return n.status();
    if (*n == 0) return absl::OkStatus();  // EOF (STOP_COPY) or nothing more for now (PRE_COPY)
    *got += *n;
  }
  return absl::OkStatus();
}

absl::StatusOr<size_t> VfioMigrationDriver::DrainPreCopy(size_t max_bytes) {
  auto lock = Lock();
  if (state_ != MigState::kPreCopy && state_ != MigState::kPreCopyP2p)
    return absl::FailedPreconditionError(
        absl::StrCat(dev_.name(), ": not in PRE_COPY (", MigStateName(state_), ")"));
  size_t got = 0;
  if (absl::Status s = ReadAvailable(max_bytes, &got); !s.ok()) return s;
  return got;
}

absl::StatusOr<std::string> VfioMigrationDriver::StopAndCopy(size_t max_bytes) {
  auto lock = Lock();
  absl::Status s;
  switch (state_) {
    case MigState::kPreCopy:
      if (caps_.p2p) s = Step(MigState::kPreCopyP2p);
      if (s.ok()) s = Step(MigState::kStopCopy);
      break;
    case MigState::kPreCopyP2p:
      s = Step(MigState::kStopCopy);
      break;
    case MigState::kRunning:
      blob_.clear();
      if (caps_.p2p) s = Step(MigState::kRunningP2p);
      if (s.ok()) s = Step(MigState::kStop);
      if (s.ok()) s = Step(MigState::kStopCopy);
      break;
    case MigState::kRunningP2p:
      blob_.clear();
      s = Step(MigState::kStop);
      if (s.ok()) s = Step(MigState::kStopCopy);
      break;
    case MigState::kStop:
      blob_.clear();
      s = Step(MigState::kStopCopy);
      break;
    default:
      return absl::FailedPreconditionError(absl::StrCat(
          dev_.name(), ": cannot stop-and-copy from migration state ", MigStateName(state_)));
  }
  if (!s.ok()) return s;
  size_t limit = max_bytes > blob_.size() ? max_bytes - blob_.size() : 0;
  size_t got = 0;
  if (s = ReadAvailable(limit, &got); !s.ok()) return s;
  if (got == limit) {
    // Still not at EOF after the limit: one more byte tells a device that never ends.
    uint8_t probe;
    absl::StatusOr<size_t> n = dev_.ReadMigData(std::span<uint8_t>(&probe, 1));
    if (!n.ok()) return n.status();
    if (*n != 0)
      return absl::ResourceExhaustedError(absl::StrFormat(
          "%s: device state exceeds %u bytes", dev_.name(), max_bytes));
  }
  if (s = Step(MigState::kStop); !s.ok()) return s;
  LOG_INFO("%s: device state saved, %u bytes", dev_.name(), blob_.size());
  return std::move(blob_);
}

absl::Status VfioMigrationDriver::Resume(std::span<const uint8_t> blob, bool run) {
  auto lock = Lock();
  absl::Status s;
  if (state_ == MigState::kRunning && caps_.p2p) s = Step(MigState::kRunningP2p);
  if (s.ok() && (state_ == MigState::kRunning || state_ == MigState::kRunningP2p))
    s = Step(MigState::kStop);
  if (s.ok() && state_ != MigState::kStop)
    s = absl::FailedPreconditionError(absl::StrCat(dev_.name(), ": cannot resume from state ",
                                                   MigStateName(state_)));
  if (s.ok()) s = Step(MigState::kResuming);
  if (s.ok()) {
    s = dev_.WriteMigData(blob);
    // RESUMING -> STOP is where the device validates and commits the stream.
    if (s.ok()) s = Step(MigState::kStop);
  }
  if (s.ok() && run) s = RunLocked();  // from STOP
  if (!s.ok()) {
    // Leave the device usable (RUNNING, state lost) rather than stuck in RESUMING/ERROR.
    if (absl::Status c = CancelLocked(); !c.ok())
      LOG_WARN("%s: after failed resume: %s", dev_.name(), c.message());
    return s;
  }
  return absl::OkStatus();
}

absl::Status VfioMigrationDriver::Run() {
  auto lock = Lock();
  return RunLocked();
}

absl::Status VfioMigrationDriver::RunLocked() {
  if (state_ == MigState::kRunning) return absl::OkStatus();
  if (state_ != MigState::kStop)
    return absl::FailedPreconditionError(
        absl::StrCat(dev_.name(), ": Run() from ", MigStateName(state_)));
  absl::Status s;
  if (caps_.p2p) s = Step(MigState::kRunningP2p);
  if (s.ok()) s = Step(MigState::kRunning);
  return s;
}

absl::Status VfioMigrationDriver::Cancel() {
  auto lock = Lock();
  return CancelLocked();
}

absl::Status VfioMigrationDriver::CancelLocked() {
  blob_.clear();
  // Ask the device where it really is: a failed arc may have left it anywhere on the path.
  absl::StatusOr<MigState> now = dev_.GetMigState();
  if (now.ok()) state_ = *now;
  absl::Status s = now.status();
  while (s.ok() && state_ != MigState::kRunning) {
    switch (state_) {
      case MigState::kPreCopyP2p: s = Step(MigState::kPreCopy); break;
      case MigState::kPreCopy: s = Step(MigState::kRunning); break;
      case MigState::kStopCopy: s = Step(MigState::kStop); break;
      case MigState::kResuming: s = Step(MigState::kStop); break;
      case MigState::kStop: s = Step(MigState::kRunning); break;
      case MigState::kRunningP2p: s = Step(MigState::kRunning); break;
      default:
        s = absl::InternalError(absl::StrCat("device in ", MigStateName(state_)));
        break;
    }
  }
  if (s.ok()) return s;
  LOG_WARN("%s: returning to RUNNING failed (%s); resetting the device", dev_.name(),
           s.message());
  if (absl::Status r = dev_.Reset(); !r.ok())
    return absl::Status(r.code(), absl::StrCat(dev_.name(), ": cancel: ", s.message(),
                                               "; reset failed: ", r.message()));
  state_ = MigState::kRunning;
  return absl::OkStatus();
}

// ---- DMA dirty tracking ----

const char* DirtySourceName(DirtySource s) {
  switch (s) {
    case DirtySource::kNone: return "off";
    case DirtySource::kDeviceDmaLog: return "device DMA log";
    case DirtySource::kIommu: return "IOMMU dirty tracking";
    case DirtySource::kAllMapped: return "all DMA-mapped RAM";
  }
  return "unknown";
}

absl::Status VfioMigrationDriver::StartDirtyTracking(std::vector<DmaRange> ranges,
                                                     uint64_t page_size) {
  auto lock = Lock();
  if (source_ != DirtySource::kNone)
    return absl::FailedPreconditionError(dev_.name() + ": dirty tracking is on");
  if (ranges.empty() || page_size == 0 || (page_size & (page_size - 1)))
    return absl::InvalidArgumentError(dev_.name() + ": dirty tracking needs ranges and a page size");
  DirtySource source = DirtySource::kDeviceDmaLog;
  absl::Status s = dev_.StartDmaLogging(ranges, page_size);
  if (!s.ok() && !absl::IsUnimplemented(s)) return s;
  if (!s.ok()) {
    source = DirtySource::kIommu;
    s = dev_.StartIommuDirtyTracking();
    if (!s.ok()) {
      // All-dirty is always correct, so an IOMMU that refuses is not worth failing migration.
      if (!absl::IsUnimplemented(s))
        LOG_WARN("%s: IOMMU dirty tracking failed to start: %s", dev_.name(), s.message());
      LOG_WARN("%s: neither the device nor the IOMMU can track its DMA; every DMA-mapped page of "
               "guest RAM is reported dirty on every sync", dev_.name());
      source = DirtySource::kAllMapped;
    }
  }
  LOG_INFO("%s: DMA dirty tracking: %s", dev_.name(), DirtySourceName(source));
  source_ = source;
  ranges_ = std::move(ranges);
  page_size_ = page_size;
  return absl::OkStatus();
}

absl::Status VfioMigrationDriver::SyncDirty(const DirtyFn& fn) {
  auto lock = Lock();
  if (source_ == DirtySource::kNone)
    return absl::FailedPreconditionError(dev_.name() + ": dirty tracking is off");
  for (const DmaRange& r : ranges_) {
    uint64_t pages = (r.size + page_size_ - 1) / page_size_;
    std::vector<uint64_t> bitmap((pages + 63) / 64, 0);
    bool all = source_ == DirtySource::kAllMapped;
    if (!all) {
      absl::Status s = source_ == DirtySource::kIommu
                           ? dev_.ReportIommuDirty(r.iova, r.size, page_size_, bitmap)
                           : dev_.ReportDmaDirty(r.iova, r.size, page_size_, bitmap);
      if (!s.ok()) {
        LOG_WARN("%s: DMA dirty report (%s) for [%#x, +%#x) failed (%s); range reported all dirty",
                 dev_.name(), DirtySourceName(source_), r.iova, r.size, s.message());
        all = true;
      }
    }
    if (all) {
      std::fill(bitmap.begin(), bitmap.end(), ~uint64_t{0});
      if (pages % 64) bitmap.back() = (uint64_t{1} << (pages % 64)) - 1;
    }
    if (lock.owns_lock()) lock.unlock();  // the callback may take its time (and other locks)
    fn(r, bitmap);
    lock = Lock();
  }
  return absl::OkStatus();
}

absl::Status VfioMigrationDriver::StopDirtyTracking() {
  auto lock = Lock();
  if (source_ == DirtySource::kNone) return absl::OkStatus();
  const DirtySource source = std::exchange(source_, DirtySource::kNone);
  switch (source) {
    case DirtySource::kDeviceDmaLog: return dev_.StopDmaLogging();
    case DirtySource::kIommu: return dev_.StopIommuDirtyTracking();
    default: return absl::OkStatus();
  }
}

}  // namespace microvmm::vfio
