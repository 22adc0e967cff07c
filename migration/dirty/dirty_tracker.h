// Dirty-page tracking for live migration.
//
// Two KVM mechanisms, one interface:
//  * Ring mode (KVM_CAP_DIRTY_LOG_RING[_ACQ_REL]): one ring of dirtied GFNs per vCPU, mmapped from
//    the vCPU fd. Must be enabled on the VM right after KVM_CREATE_VM, before any vCPU exists
//    (DirtyTracker::EnableDirtyRing). Harvesting works while vCPUs run; a vCPU whose ring is full
//    exits with KVM_EXIT_DIRTY_RING_FULL and its thread must call DirtyTracker::HandleRingFull.
//  * Bitmap mode (KVM_GET_DIRTY_LOG, with KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 + KVM_CLEAR_DIRTY_LOG
//    when available, plain get-and-clear otherwise).
// KVM refuses KVM_GET_DIRTY_LOG once the ring is enabled, so a VM uses one or the other for life.
//
// Every Sync also ORs in GuestMemory's VMM-side bitmap (device/loader writes the VMM makes through
// GuestMemory never appear in KVM's log).
//
// How the VMM wires it up:
//   1. right after KvmVm::Create, before any vCPU:  DirtyTracker::EnableDirtyRing(vm, 1 << 20)
//        (1 MiB = 65536 entries per vCPU, KVM's maximum here; on failure just log it: the
//        tracker then uses bitmap mode).
//   2. after all vCPUs exist:  tracker = DirtyTracker::Create(vm, mem, {every KvmVcpu*}, kAuto);
//        keep it for the VM's lifetime (vCPU threads call into it; Start/Stop per migration).
//   3. vCPU loop, on exit_reason == KVM_EXIT_DIRTY_RING_FULL:
//        absl::Status s = tracker->HandleRingFull(vcpu.id());  then re-enter KVM_RUN. Not an
//        error, not a VM exit. A non-OK status means the ring could not be recovered after a KVM
//        ring overrun: stop the VM (treat like an internal error).
//   4. migration thread: Start(); Sync(set) once per pass (the first reports every page; vCPUs
//        keep running); the final Sync with every vCPU paused (out of KVM_RUN); Stop() when done
//        or cancelled. Read the reported pages only after Sync returns.
#ifndef MICROVMM_MIGRATION_DIRTY_DIRTY_TRACKER_H_
#define MICROVMM_MIGRATION_DIRTY_DIRTY_TRACKER_H_

#include "vmm/kvm/linux_kvm.h"

#include <atomic>
#include <bit>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "vmm/base/fd.h"
#include "vmm/kvm/kvm.h"
#include "vmm/memory/guest_memory.h"

namespace microvmm::migration {

// One bit per 4 KiB page of one guest RAM region.
class DirtyBitmap {
 public:
  DirtyBitmap() = default;
  DirtyBitmap(uint64_t gpa, uint64_t pages) : gpa_(gpa), pages_(pages), words_((pages + 63) / 64) {}

  uint64_t gpa() const { return gpa_; }
  uint64_t pages() const { return pages_; }
  uint64_t end() const { return gpa_ + pages_ * kPageSize; }
  bool Contains(uint64_t gpa) const { return gpa >= gpa_ && gpa < end(); }

  // `page` is the page index inside the region.
  void Set(uint64_t page) { words_[page / 64] |= 1ULL << (page % 64); }
  void Clear(uint64_t page) { words_[page / 64] &= ~(1ULL << (page % 64)); }
  bool Test(uint64_t page) const { return (words_[page / 64] >> (page % 64)) & 1; }
  void SetAll();
  void ClearAll();
  uint64_t Count() const;
  bool Empty() const;

  // Same geometry required (checked in debug builds; extra bits are ignored).
  void Or(const DirtyBitmap& o);
  // ORs a raw one-bit-per-page word array (KVM or GuestMemory layout); bits past pages() dropped.
  void OrWords(std::span<const uint64_t> words);

  // Calls fn(gpa) for every set page, in ascending order.
  template <typename Fn>
  void ForEachSetPage(Fn&& fn) const {
    for (uint64_t w = 0; w < words_.size(); ++w) {
      uint64_t bits = words_[w];
      while (bits != 0) {
        int b = std::countr_zero(bits);
        bits &= bits - 1;
        fn(gpa_ + (w * 64 + b) * kPageSize);
      }
    }
  }

  std::span<uint64_t> words() { return words_; }
  std::span<const uint64_t> words() const { return words_; }

 private:
  void TrimTail();
  uint64_t gpa_ = 0;
  uint64_t pages_ = 0;
  std::vector<uint64_t> words_;
};

// One DirtyBitmap per GuestMemory region, index = region index = KVM memslot id.
class DirtySet {
 public:
  DirtySet() = default;
  static DirtySet ForMemory(const GuestMemory& mem);

  size_t size() const { return regions_.size(); }
  DirtyBitmap& region(size_t i) { return regions_[i]; }
  const DirtyBitmap& region(size_t i) const { return regions_[i]; }

  // By guest-physical address; false / no-op outside RAM.
  bool Test(uint64_t gpa) const;
  void Set(uint64_t gpa);
  uint64_t Count() const;
  bool Empty() const;
  void Or(const DirtySet& o);
  // ORs in `words` (bit i of word w = page 64*w+i of the `pages` pages from `gpa`, e.g. a
  // device's DMA dirty log): word at a time where the range is exactly one region, else page by
  // page (pages outside RAM ignored).
  void OrRange(uint64_t gpa, uint64_t pages, std::span<const uint64_t> words);
  void SetAll();
  void ClearAll();
  // Every dirty page's gpa, ascending per region (convenience; prefer ForEachSetPage for big sets).
  std::vector<uint64_t> Gpas() const;

  template <typename Fn>
  void ForEachSetPage(Fn&& fn) const {
    for (const DirtyBitmap& r : regions_) r.ForEachSetPage(fn);
  }

 private:
  std::vector<DirtyBitmap> regions_;
};

// Which dirty-ring capability was enabled.
enum class DirtyRingKind {
  kTso,     // KVM_CAP_DIRTY_LOG_RING (192): x86 total-store-order protocol
  kAcqRel,  // KVM_CAP_DIRTY_LOG_RING_ACQ_REL (223): acquire/release protocol (also fine on x86)
};
const char* DirtyRingKindName(DirtyRingKind k);

struct DirtyRingConfig {
  DirtyRingKind kind = DirtyRingKind::kAcqRel;
  uint32_t bytes = 0;  // per vCPU; power of two
  uint32_t entries() const { return bytes / sizeof(kvm_dirty_gfn); }
};

// RAII mapping of one vCPU's dirty ring (vCPU fd at KVM_DIRTY_LOG_PAGE_OFFSET * page size).
// Not thread-safe: one caller at a time per ring (DirtyTracker serializes).
class DirtyRing {
 public:
  static absl::StatusOr<DirtyRing> Map(const KvmVcpu& vcpu, const DirtyRingConfig& config);

  DirtyRing(DirtyRing&&) noexcept = default;
  DirtyRing& operator=(DirtyRing&&) noexcept = default;

  int vcpu_id() const { return vcpu_id_; }
  uint32_t entries() const { return entries_; }

  struct HarvestResult {
    uint32_t collected = 0;  // DIRTY entries handed to fn and marked RESET
    uint32_t phantoms = 0;   // overrun repair: empty slots KVM counts as pushed, marked RESET
    bool lapped = false;     // a whole ring's worth in one walk: the ring was full (KVM went
                             // past its soft limit; entries may have been overwritten)
  };
  // Walks the ring from the fetch index: while the next entry's flags are exactly DIRTY
  // (load-acquire), calls fn(slot, offset) and marks it RESET (store-release). The caller must then
  // issue KVM_RESET_DIRTY_RINGS on the VM fd before the pages' contents are read.
  // `repair_gaps`: if the next entry is not DIRTY but a later one is (KVM pushed past the ring's
  // size and our fetch index trails its push index), mark the gap RESET and carry on.
  template <typename Fn>
  HarvestResult Harvest(Fn&& fn, bool repair_gaps) {
    HarvestResult r;
    for (;;) {
      if (r.collected + r.phantoms >= entries_) {
        r.lapped = true;
        break;
      }
      kvm_dirty_gfn& e = gfns()[fetch_ & (entries_ - 1)];
      std::atomic_ref<uint32_t> flags(e.flags);
      if ((flags.load(std::memory_order_acquire) & KVM_DIRTY_GFN_F_MASK) == KVM_DIRTY_GFN_F_DIRTY) {
        fn(e.slot, e.offset);
        flags.store(KVM_DIRTY_GFN_F_RESET, std::memory_order_release);
        ++fetch_;
        ++r.collected;
        continue;
      }
      if (!repair_gaps) break;
      uint32_t gap = FindGap();
      if (gap == 0) break;
      for (uint32_t i = 0; i < gap; ++i) SetFlagsAt(i, KVM_DIRTY_GFN_F_RESET);
      fetch_ += gap;
      r.phantoms += gap;
    }
    return r;
  }

  // Entries ready to harvest right now (diagnostics/tests; does not change the ring).
  uint32_t PeekDirty() const;

  // Low-level access for overrun recovery: `rel` counts from the fetch index.
  uint32_t FlagsAt(uint32_t rel) const;
  void SetFlagsAt(uint32_t rel, uint32_t flags);
  uint32_t fetch_index() const { return fetch_; }
  void set_fetch_index(uint32_t f) { fetch_ = f; }

 private:
  DirtyRing(ScopedMmap map, uint32_t entries, int vcpu_id)
      : map_(std::move(map)), entries_(entries), vcpu_id_(vcpu_id) {}
  kvm_dirty_gfn* gfns() const { return static_cast<kvm_dirty_gfn*>(map_.get()); }
  // Number of non-DIRTY entries before the first DIRTY one, if the entry at the fetch index is
  // (still, re-read after the later one was seen) not DIRTY; 0 when there is no DIRTY entry.
  uint32_t FindGap() const;

  ScopedMmap map_;
  uint32_t entries_ = 0;
  uint32_t fetch_ = 0;  // free-running; entry index = fetch_ & (entries_ - 1)
  int vcpu_id_ = -1;
};

struct VcpuDirtyCount {
  int vcpu_id = -1;
  uint64_t pages = 0;  // ring entries harvested from this vCPU since the previous Sync
};

struct DirtySyncStats {
  absl::Duration duration;          // whole Sync
  absl::Duration kvm_time;          // ring walk + KVM_RESET_DIRTY_RINGS, or GET/CLEAR ioctls
  uint64_t kvm_pages = 0;           // pages KVM reported (ring entries incl. ring-full handler's)
  uint64_t vmm_pages = 0;           // pages from GuestMemory's VMM-side bitmap
  uint64_t reported_pages = 0;      // distinct pages this Sync ORed into `out`
  bool full_pass = false;           // every page reported: first Sync after Start, or a ring
                                    // overrun was detected
  uint64_t ioctls = 0;              // KVM ioctls issued by this Sync
  uint64_t ring_full_exits = 0;     // HandleRingFull calls since the previous Sync
  uint64_t ignored_entries = 0;     // ring entries for unknown slots/offsets (should stay 0)
  // KVM overran a ring (pushed more entries than it holds: GFNs were overwritten) since the
  // previous Sync. Dirty information was lost, so this Sync reported every page (full_pass).
  // Never happens on a KVM that honours the ring's soft limit; see dirty_tracker.cc.
  uint64_t ring_overruns = 0;
  std::vector<VcpuDirtyCount> per_vcpu;  // ring mode only
};

class DirtyTracker {
 public:
  enum class Mode {
    kAuto,    // ring if the VM's dirty ring is enabled, else bitmap
    kRing,
    kBitmap,
  };
  static const char* ModeName(Mode m);

  struct Options {
    Mode mode = Mode::kAuto;
    // Pages per KVM_CLEAR_DIRTY_LOG ioctl (multiple of 64).
    uint64_t clear_chunk_pages = 64 * 1024;
    // Bitmap mode: use KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 when KVM has it (false forces the plain
    // get-and-clear KVM_GET_DIRTY_LOG path; tests use it).
    bool use_manual_protect = true;
    // Ring mode: a background thread harvests every ring this often while tracking is started, so
    // rings stay far from full between Syncs (0: only Sync and HandleRingFull harvest).
    absl::Duration ring_poll_interval = absl::Milliseconds(1);
    // Ring size when the ring was enabled without EnableDirtyRing (normally left empty: the size
    // EnableDirtyRing chose is remembered per VM).
    std::optional<DirtyRingConfig> ring;
  };

  // Enables the dirty ring on `vm`: KVM_CAP_DIRTY_LOG_RING_ACQ_REL when supported, else
  // KVM_CAP_DIRTY_LOG_RING. `bytes` is rounded down to a power of two and clamped to
  // [smallest size KVM accepts, KVM's maximum]. Must be called before any vCPU is created:
  // FAILED_PRECONDITION otherwise (KVM answers EINVAL). UNIMPLEMENTED if KVM has no dirty ring.
  static absl::StatusOr<DirtyRingConfig> EnableDirtyRing(KvmVm& vm, uint32_t bytes);

  // Asks KVM whether the dirty ring is enabled on `vm` (KVM_GET_DIRTY_LOG answers ENXIO then).
  static bool DirtyRingEnabled(const KvmVm& vm);

  // One tracker per VM. `vcpus`: every vCPU of the VM (ring mode maps each one's ring; ignored in
  // bitmap mode). The VM
  // must have KVM memslot i = mem.regions()[i], flags 0. Errors: FAILED_PRECONDITION for ring mode
  // without an enabled ring (it can only be enabled before the vCPUs exist), bitmap mode on a VM
  // whose ring is enabled, or ring mode without vCPUs.
  static absl::StatusOr<std::unique_ptr<DirtyTracker>> Create(KvmVm& vm, GuestMemory& mem,
                                                              std::vector<KvmVcpu*> vcpus,
                                                              Mode mode = Mode::kAuto);
  static absl::StatusOr<std::unique_ptr<DirtyTracker>> Create(KvmVm& vm, GuestMemory& mem,
                                                              std::vector<KvmVcpu*> vcpus,
                                                              const Options& options);

  ~DirtyTracker();  // Stop()s if started
  DirtyTracker(const DirtyTracker&) = delete;
  DirtyTracker& operator=(const DirtyTracker&) = delete;

  Mode mode() const { return mode_; }  // kRing or kBitmap
  const std::optional<DirtyRingConfig>& ring_config() const { return ring_config_; }
  bool manual_protect() const { return manual_protect_; }  // bitmap mode: CLEAR_DIRTY_LOG in use
  bool initially_set() const { return initially_set_; }    // bitmap mode: KVM sets all on Start
  bool started() const;

  // Sets KVM_MEM_LOG_DIRTY_PAGES on every memslot and arms the full first pass.
  absl::Status Start();
  // Clears KVM_MEM_LOG_DIRTY_PAGES and drops whatever was collected. Idempotent.
  absl::Status Stop();

  // ORs into `out` every page dirtied since the previous Sync (the first after Start: all pages).
  // Call from one thread (the migration thread); vCPUs may run meanwhile. The pages' contents must
  // be read after Sync returns. FAILED_PRECONDITION if not started. `out` must come from
  // DirtySet::ForMemory(mem) (re-created if it does not match).
  absl::Status Sync(DirtySet& out, DirtySyncStats* stats = nullptr);

  // vCPU thread, on KVM_EXIT_DIRTY_RING_FULL: harvests that vCPU's ring into the pending set and
  // issues KVM_RESET_DIRTY_RINGS, so KVM_RUN can be re-entered. Also harmless at any other time.
  // After a KVM ring overrun it also brings the ring back in step (possibly over several exits).
  // NOT_FOUND for a vCPU id the tracker was not given; FAILED_PRECONDITION in bitmap mode;
  // INTERNAL if the ring cannot be recovered (the vCPU would exit forever: stop the VM).
  absl::Status HandleRingFull(int vcpu_id);

  // Ring mode: drains every ring into the pending set now (what the background poller does).
  absl::Status HarvestRings();

  // Dirty entries waiting in vCPU `vcpu_id`'s ring (tests/diagnostics; 0 in bitmap mode).
  uint32_t RingDirtyEntries(int vcpu_id) const;

  // Ring overruns detected since Create (see DirtySyncStats::ring_overruns), by sign.
  struct OverrunCounts {
    uint64_t lapped = 0;          // a walk collected a whole ring and KVM did not push again
                                  // before the next Sync (possibly lossless, counted anyway)
    uint64_t gaps = 0;            // KVM's push index was ahead of our fetch index
    uint64_t reset_mismatch = 0;  // KVM_RESET_DIRTY_RINGS reset more/fewer entries than marked
    uint64_t wedged = 0;          // ring-full exit with nothing harvested since the previous one
    uint64_t total() const { return lapped + gaps + reset_mismatch + wedged; }
  };
  OverrunCounts ring_overrun_counts() const;
  uint64_t total_ring_overruns() const { return ring_overrun_counts().total(); }

  const DirtySyncStats& last_stats() const { return last_stats_; }

 private:
  struct RingState {
    explicit RingState(DirtyRing r) : ring(std::move(r)) {}
    mutable std::mutex mu;  // serializes access to this ring
    DirtyRing ring;
    uint64_t since_sync = 0;        // entries harvested since the previous Sync
    uint64_t harvested_total = 0;   // entries harvested, ever
    uint64_t total_at_last_full = 0;  // harvested_total when HandleRingFull last ran
    std::atomic<bool> suspect{false};  // overrun seen: look for gaps on every harvest
    // A walk collected a whole ring: lossless if KVM stopped exactly at the ring's size, lossy if
    // it went on. Told apart when KVM pushes again (at our fetch index: fine; past it: gap), or
    // charged as an overrun by the next Sync if still unknown then.
    enum class Lap { kNone, kUnresolved, kCharged } lap = Lap::kNone;
  };

  DirtyTracker(KvmVm& vm, GuestMemory& mem, Mode mode) : vm_(vm), mem_(mem), mode_(mode) {}
  absl::Status SetLogging(bool on);
  // Ring mode. Callers hold reset_mu_ and rs.mu. Harvests one ring into `into`.
  void HarvestRing(RingState& rs, DirtySet& into, uint64_t& ignored, bool force_gap_scan);
  // KVM_RESET_DIRTY_RINGS, checking KVM reset exactly what was marked since the last one.
  absl::Status ResetRings();
  // All rings into `into` + reset (caller holds reset_mu_). Fills per-vCPU counts if asked.
  // Syncs (per_vcpu != nullptr) always look for gaps: a ring whose fetch index fell behind KVM's
  // would otherwise hold its new entries back unseen until it fills.
  absl::Status HarvestAllLocked(DirtySet& into, uint64_t& ignored,
                                std::vector<VcpuDirtyCount>* per_vcpu);
  absl::Status UnwedgeRing(RingState& rs);
  void NoteOverrun(std::atomic<uint64_t>& counter);
  void PollerLoop();
  void StopPoller();
  absl::Status SyncBitmap(DirtySet& scratch, DirtySyncStats& st);
  absl::Status SyncRing(DirtySet& scratch, DirtySyncStats& st);

  KvmVm& vm_;
  GuestMemory& mem_;
  Mode mode_;
  std::optional<DirtyRingConfig> ring_config_;
  bool manual_protect_ = false;
  bool initially_set_ = false;
  uint64_t clear_chunk_pages_ = 64 * 1024;

  std::mutex op_mu_;  // Start/Stop/Sync
  std::atomic<bool> started_{false};
  bool full_pass_pending_ = false;  // guarded by op_mu_
  DirtySet scratch_;                // guarded by op_mu_
  std::vector<std::vector<uint64_t>> kvm_bitmaps_;  // bitmap mode buffers, guarded by op_mu_
  DirtySyncStats last_stats_;

  std::vector<std::unique_ptr<RingState>> rings_;  // fixed after Create
  absl::Duration poll_interval_;

  // Lock order: op_mu_ -> reset_mu_ -> RingState::mu -> pending_mu_.
  // reset_mu_ is held from marking entries RESET until KVM_RESET_DIRTY_RINGS returns, so the
  // count KVM returns can be checked against what was marked.
  std::mutex reset_mu_;
  uint64_t marked_since_reset_ = 0;  // guarded by reset_mu_

  std::mutex pending_mu_;  // harvests (ring-full handler, poller) waiting for the next Sync
  DirtySet pending_;
  uint64_t pending_ignored_ = 0;
  uint64_t ring_full_exits_ = 0;
  std::atomic<uint64_t> overruns_{0};  // since the previous Sync
  std::atomic<uint64_t> n_lapped_{0}, n_gaps_{0}, n_reset_mismatch_{0}, n_wedged_{0};

  std::mutex poll_mu_;
  std::condition_variable poll_cv_;
  bool poll_stop_ = false;
  std::thread poller_;
};

}  // namespace microvmm::migration

#endif  // MICROVMM_MIGRATION_DIRTY_DIRTY_TRACKER_H_
