// Destination side of post-copy migration: keeps every page not yet received MISSING behind
// userfaultfd, turns faults into per-lane fetch requests and installs arriving pages atomically.
//
// Threads: Start() spawns one fault-reader thread per shard. Each shard owns a userfaultfd
// registered on an interleaved set of chunks of guest RAM, so no single fd, wait queue or reader
// serialises all vCPUs. Readers never wait for page contents: a fault on a missing page claims it
// (kMissing -> kInFlight, exactly once), calls FetchFn(lane, gpa) and goes on reading. The answer
// arrives on whatever thread the network layer uses and is installed with Install(), which wakes
// every thread waiting on that page. Install/InstallZero/EnsurePresent/Suspend/Refetch/stats are
// thread-safe.
//
// Invariant: a page that was not received is never zero-filled. Only pages marked known-zero at
// Start() (or installed with InstallZero) are resolved with zeros; if the source is gone
// (Suspend()), faulting threads stay blocked until Refetch() + Install() or the VM is torn down.
#ifndef MICROVMM_MIGRATION_POSTCOPY_POSTCOPY_MEMORY_H_
#define MICROVMM_MIGRATION_POSTCOPY_POSTCOPY_MEMORY_H_

#include <sys/types.h>

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "migration/postcopy/page_state.h"
#include "migration/postcopy/uffd.h"
#include "vmm/base/fd.h"
#include "migration/postcopy/kvm_userfault.h"
#include "vmm/memory/guest_memory.h"

namespace microvmm::migration {

// Lane of faults taken by threads that are not vCPUs (device emulation, VMM code, KVM work done
// on behalf of other threads).
inline constexpr int kVmmLane = -1;

struct PostcopyOptions {
  enum class Mode { kAuto, kMinor, kMissing } mode = Mode::kAuto;  // kAuto: MINOR if MINOR_SHMEM
  int shards = 0;  // fault-reading threads/uffds; 0 = min(4, lanes)
  int lanes = 1;   // number of vCPU lanes (0..lanes-1); LaneOfThread results outside -> kVmmLane
};

class PostcopyMemory {
 public:
  // lane = who waits: vCPU index 0..n-1, or kVmmLane (-1) for non-vCPU threads.
  using FetchFn = std::function<void(int lane, uint64_t gpa)>;  // must not block; async request
  using LaneOfThread = std::function<int(pid_t tid)>;           // tid from UFFD_FEATURE_THREAD_ID

  // Checks the kernel's userfaultfd features (THREAD_ID always; MINOR_SHMEM for kMinor) and
  // resolves kAuto. `mem` must outlive this object. Nothing is registered until Start().
  static absl::StatusOr<std::unique_ptr<PostcopyMemory>> Create(GuestMemory* mem,
                                                                PostcopyOptions options,
                                                                FetchFn fetch,
                                                                LaneOfThread lanes);
  // Stops the reader threads and closes the uffds. Destroy only after vCPUs and VMM threads that
  // touch guest RAM have stopped: closing the uffds releases any blocked faulter, and a released
  // fault on a page still missing would then be zero-filled by the kernel.
  ~PostcopyMemory();

  PostcopyMemory(const PostcopyMemory&) = delete;
  PostcopyMemory& operator=(const PostcopyMemory&) = delete;

  // Switchover. `present[i]`/`zero[i]`: per region, one bit per page (uint64_t words, the layout
  // of GuestMemory::TakeDirty); an empty outer vector means "no page". Every other page is
  // MISSING: its current content is stale and dropped. Order: uffds registered on the guest
  // mapping first, then holes punched in the memfd (which also zaps every mapping's PTEs), then
  // reader threads started -- so there is no window in which a toucher could populate a stale or
  // zero page. After Start() returns, the VM may run. Callable once.
  absl::Status Start(const std::vector<std::vector<uint64_t>>& present,
                     const std::vector<std::vector<uint64_t>>& zero);

  // A page's content arrived (demand answer or bulk push). Installs it atomically into guest RAM
  // unless it is already present or being installed (returns false: duplicates are normal) and
  // wakes the threads waiting on it. MINOR mode: written through a second, unregistered mapping
  // of the memfd, then UFFDIO_CONTINUE; MISSING mode: UFFDIO_COPY. `gpa` page-aligned,
  // page.size() == kPageSize.
  absl::StatusOr<bool> Install(uint64_t gpa, std::span<const uint8_t> page);
  absl::StatusOr<bool> InstallZero(uint64_t gpa);

  // Makes [gpa, gpa+len) present before VMM code touches it: fetches missing pages on kVmmLane
  // and waits up to `timeout` (DeadlineExceeded). Unavailable while suspended (source gone).
  absl::Status EnsurePresent(uint64_t gpa, uint64_t len, absl::Duration timeout);

  // Exit-driven post-copy (KVM Userfault): from Start() on, `bitmap` (one slot per RAM region,
  // same order, already added) has a set bit exactly for the pages not present here; each bit
  // is cleared once its page is installed, whichever path installed it (demand, push, zero).
  // Call before Start(); `bitmap` must outlive this object. The userfaultfd registration stays:
  // VMM threads still fault through it, and it backs up the bitmap.
  void AttachKvmUserfault(KvmUserfaultBitmap* bitmap) { kvm_bitmap_ = bitmap; }
  // A vCPU took KVM_EXIT_MEMORY_FAULT (userfault flag) for [gpa, gpa+size): fetches the missing
  // pages on lane `lane` (the vCPU's own), waits until they are present, clears their bits and
  // returns OK (the vCPU re-enters). While post-copy is suspended (source gone, recovery pending)
  // it keeps waiting: a page is never replaced by zeros. Gives up (CANCELLED) only when
  // `give_up()` says so (the vCPU is asked to stop), checked every `poll`.
  absl::Status ResolveVcpuExit(int lane, uint64_t gpa, uint64_t size,
                               const std::function<bool()>& give_up,
                               absl::Duration poll = absl::Milliseconds(100));

  // vCPU `lane` faulted on a page that is not present yet: it cannot run guest code until the
  // page arrives (whether it sits in the fault or, after a signal, retries it). Lets Vm::Pause
  // leave it alone instead of signalling it again and again.
  bool LaneWaiting(int lane) const;

  // The source has pushed every page it had to: pages still known-zero need nothing from it.
  // They count as present from now on and stay holes (reading zeros); a fault on one before
  // Finish() is resolved with a zero page (the kPresent/MISSING case). Returns how many.
  uint64_t SettleZeroPages();

  uint64_t missing_pages() const { return states_.not_present(); }  // not yet present
  bool complete() const { return missing_pages() == 0; }

  // Every page is present: unregisters userfaultfd, stops the fault threads. Idempotent.
  // FailedPrecondition while pages are still missing.
  absl::Status Finish();

  // The source is gone (or the link dropped): stop asking; faulting threads stay blocked, new
  // faults still claim their pages (kInFlight) but are not fetched. Late answers are installed.
  void Suspend();
  // Ends a Suspend() and re-issues FetchFn for every page still kInFlight (on the lane that
  // first faulted it). May duplicate requests; duplicates answers are dropped by Install().
  void Refetch();

  // Metrics. Latency = fault read by a reader thread (or claim by EnsurePresent) -> page
  // installed, recorded for the first fault on a page. blocked_ms sums those latencies.
  // pulled: installs of pages that had been requested (kInFlight); pushed: installs of pages
  // nobody had asked for yet; zeroed: known-zero pages resolved locally; duplicates: Install /
  // InstallZero calls for pages already present.
  struct LaneStats {
    uint64_t faults = 0;
    double p50_us = 0, p99_us = 0;
    double blocked_ms = 0;
  };
  struct Stats {
    std::vector<LaneStats> lanes;
    LaneStats vmm;
    uint64_t pulled = 0, pushed = 0, duplicates = 0, zeroed = 0;
  };
  Stats stats() const;

  PostcopyOptions::Mode mode() const { return mode_; }  // resolved: kMinor or kMissing
  int shards() const { return nshards_; }
  bool suspended() const { return suspended_.load(); }
  const PageStateMap& page_states() const { return states_; }

 private:
  struct Shard;
  struct LaneCounters;

  PostcopyMemory(GuestMemory* mem, PostcopyOptions options, FetchFn fetch, LaneOfThread lanes);

  uint8_t* HostOf(uint64_t index) const;
  uint8_t* AliasOf(uint64_t index) const;
  Shard& ShardOf(uint64_t index) const;
  int LaneSlot(int lane) const;  // counters index; kVmmLane -> lanes
  void RecordFault(uint64_t index, int lane);
  void NoteLaneWaiting(int lane, uint64_t index);
  // Fetches the missing pages of [first, last] on `lane` (claims them), resolves known-zero ones.
  absl::Status ClaimRange(uint64_t first, uint64_t last, int lane);
  // Waits until pages [first, last] are present. Unavailable when suspended (unless
  // `through_suspend`), DeadlineExceeded at `deadline`.
  absl::Status WaitPresent(uint64_t first, uint64_t last, absl::Time deadline,
                           bool through_suspend);
  void RecordInstalled(uint64_t index);
  void RequestFetch(uint64_t index, int lane);
  // Installs `src` (nullptr: zeros) into a page this thread moved to kInstalling.
  absl::Status Populate(uint64_t index, const uint8_t* src);
  absl::StatusOr<bool> InstallImpl(uint64_t gpa, const uint8_t* src);
  // kZero -> kInstalling -> zero page -> kPresent. False if the page was not kZero any more.
  absl::StatusOr<bool> ResolveZero(uint64_t index);
  void HandleFault(Shard& shard, const Userfaultfd::Event& ev);
  void ReaderLoop(Shard* shard);
  void StopReaders();
  void NotifyWaiters();
  int64_t NowNs() const;

  GuestMemory* const mem_;
  const PostcopyOptions options_;
  const FetchFn fetch_;
  const LaneOfThread lane_of_;
  PostcopyOptions::Mode mode_ = PostcopyOptions::Mode::kMissing;
  int nshards_ = 1;
  uint64_t features_ = 0;
  uint64_t chunk_pages_ = 0;  // interleave granule (pages) between shards

  PageStateMap states_;
  // Per page: (ns since start << 16) | (lane + 2) of the first fault, 0 if none recorded.
  std::unique_ptr<std::atomic<uint64_t>[]> fault_info_;
  std::vector<std::unique_ptr<Shard>> shards_;
  std::vector<ScopedMmap> alias_;  // MINOR mode: unregistered second mapping per region
  std::vector<std::unique_ptr<LaneCounters>> counters_;  // lanes + 1 (vmm last)

  std::atomic<uint64_t> pulled_{0}, pushed_{0}, duplicates_{0}, zeroed_{0};
  std::atomic<bool> started_{false}, finished_{false}, suspended_{false};
  KvmUserfaultBitmap* kvm_bitmap_ = nullptr;
  // Per vCPU lane: index of the page its last fault was on (-1: none yet).
  std::unique_ptr<std::atomic<int64_t>[]> lane_wait_;
  int64_t start_ns_ = 0;

  // EnsurePresent waiters; installers signal only when someone waits.
  absl::Mutex mu_;
  absl::CondVar cv_;
  std::atomic<int> waiters_{0};
  absl::Mutex finish_mu_;
};

}  // namespace microvmm::migration

#endif  // MICROVMM_MIGRATION_POSTCOPY_POSTCOPY_MEMORY_H_
