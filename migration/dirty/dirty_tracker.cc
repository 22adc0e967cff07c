#include "migration/dirty/dirty_tracker.h"

#include <errno.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cassert>
#include <map>

#include "absl/strings/str_cat.h"

namespace microvmm::migration {
namespace {

// Newer-than-6.1 constants are not needed here: the ring caps (192, 223), RESET_DIRTY_RINGS,
// KVM_EXIT_DIRTY_RING_FULL and CLEAR_DIRTY_LOG are all in the 6.1 uAPI. Guard anyway so the module
// builds against older headers.
#ifndef KVM_CAP_DIRTY_LOG_RING_ACQ_REL
#define KVM_CAP_DIRTY_LOG_RING_ACQ_REL 223
#endif

constexpr uint32_t kMinRingBytes = 4096;  // KVM: at least a page (and the reserved entries)

// Ring sizes EnableDirtyRing chose, by VM fd (the kernel does not report the size back). Entries
// are validated against DirtyRingEnabled() before use, so a reused fd cannot mislead us.
std::mutex g_ring_mu;
std::map<int, DirtyRingConfig>& RingRegistry() {
  static auto* m = new std::map<int, DirtyRingConfig>();
  return *m;
}

uint64_t RegionPages(const GuestMemory::Region& r) { return r.size / kPageSize; }

}  // namespace

// ---------------------------------------------------------------------------------------------
// DirtyBitmap / DirtySet

void DirtyBitmap::SetAll() {
  std::fill(words_.begin(), words_.end(), ~0ULL);
  TrimTail();
}

void DirtyBitmap::ClearAll() { std::fill(words_.begin(), words_.end(), 0); }

uint64_t DirtyBitmap::Count() const {
  uint64_t n = 0;
  for (uint64_t w : words_) n += std::popcount(w);
  return n;
}

bool DirtyBitmap::Empty() const {
  for (uint64_t w : words_)
    if (w != 0) return false;
  return true;
}

void DirtyBitmap::Or(const DirtyBitmap& o) {
  assert(o.gpa_ == gpa_ && o.pages_ == pages_);
  OrWords(o.words_);
}

void DirtyBitmap::OrWords(std::span<const uint64_t> words) {
  size_t n = std::min(words.size(), words_.size());
  for (size_t i = 0; i < n; ++i) words_[i] |= words[i];
  TrimTail();
}

void DirtyBitmap::TrimTail() {
  if (pages_ % 64 != 0 && !words_.empty()) words_.back() &= (1ULL << (pages_ % 64)) - 1;
}

DirtySet DirtySet::ForMemory(const GuestMemory& mem) {
  DirtySet s;
  for (const auto& r : mem.regions()) s.regions_.emplace_back(r.gpa, RegionPages(r));
  return s;
}

bool DirtySet::Test(uint64_t gpa) const {
  for (const DirtyBitmap& r : regions_)
    if (r.Contains(gpa)) return r.Test((gpa - r.gpa()) / kPageSize);
  return false;
}

void DirtySet::Set(uint64_t gpa) {
  for (DirtyBitmap& r : regions_)
    if (r.Contains(gpa)) return r.Set((gpa - r.gpa()) / kPageSize);
}

uint64_t DirtySet::Count() const {
  uint64_t n = 0;
  for (const DirtyBitmap& r : regions_) n += r.Count();
  return n;
}

bool DirtySet::Empty() const {
  for (const DirtyBitmap& r : regions_)
    if (!r.Empty()) return false;
  return true;
}

void DirtySet::Or(const DirtySet& o) {
  for (size_t i = 0; i < std::min(regions_.size(), o.regions_.size()); ++i)
    regions_[i].Or(o.regions_[i]);
}

void DirtySet::OrRange(uint64_t gpa, uint64_t pages, std::span<const uint64_t> words) {
  for (DirtyBitmap& r : regions_) {
    if (r.gpa() == gpa && r.pages() == pages) {
      r.OrWords(words);
      return;
    }
  }
  for (size_t w = 0; w < words.size(); ++w)
    for (uint64_t bits = words[w]; bits != 0; bits &= bits - 1) {
      const uint64_t page = w * 64 + static_cast<uint64_t>(std::countr_zero(bits));
      if (page < pages) Set(gpa + page * kPageSize);
    }
}

void DirtySet::SetAll() {
  for (DirtyBitmap& r : regions_) r.SetAll();
}

void DirtySet::ClearAll() {
  for (DirtyBitmap& r : regions_) r.ClearAll();
}

std::vector<uint64_t> DirtySet::Gpas() const {
  std::vector<uint64_t> out;
  ForEachSetPage([&](uint64_t gpa) { out.push_back(gpa); });
  return out;
}

namespace {
bool SameGeometry(const DirtySet& a, const GuestMemory& mem) {
  if (a.size() != mem.regions().size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    const auto& r = mem.regions()[i];
    if (a.region(i).gpa() != r.gpa || a.region(i).pages() != RegionPages(r)) return false;
  }
  return true;
}
}  // namespace

// ---------------------------------------------------------------------------------------------
// DirtyRing

const char* DirtyRingKindName(DirtyRingKind k) {
  return k == DirtyRingKind::kAcqRel ? "KVM_CAP_DIRTY_LOG_RING_ACQ_REL" : "KVM_CAP_DIRTY_LOG_RING";
}

absl::StatusOr<DirtyRing> DirtyRing::Map(const KvmVcpu& vcpu, const DirtyRingConfig& config) {
  uint32_t entries = config.entries();
  if (entries == 0 || (entries & (entries - 1)) != 0)
    return absl::InvalidArgumentError(absl::StrCat("dirty ring of ", config.bytes,
                                                   " bytes is not a power-of-two entry count"));
  long page = ::sysconf(_SC_PAGESIZE);
  off_t offset = static_cast<off_t>(KVM_DIRTY_LOG_PAGE_OFFSET) * page;
  void* p = ::mmap(nullptr, config.bytes, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu.fd(), offset);
  if (p == MAP_FAILED)
    return ErrnoStatus(errno, absl::StrCat("mmap dirty ring of vCPU ", vcpu.id()));
  return DirtyRing(ScopedMmap(p, config.bytes), entries, vcpu.id());
}

uint32_t DirtyRing::FlagsAt(uint32_t rel) const {
  kvm_dirty_gfn& e = gfns()[(fetch_ + rel) & (entries_ - 1)];
  return std::atomic_ref<uint32_t>(e.flags).load(std::memory_order_acquire);
}

void DirtyRing::SetFlagsAt(uint32_t rel, uint32_t flags) {
  kvm_dirty_gfn& e = gfns()[(fetch_ + rel) & (entries_ - 1)];
  std::atomic_ref<uint32_t>(e.flags).store(flags, std::memory_order_release);
}

uint32_t DirtyRing::PeekDirty() const {
  uint32_t n = 0;
  while (n < entries_ && (FlagsAt(n) & KVM_DIRTY_GFN_F_MASK) == KVM_DIRTY_GFN_F_DIRTY) ++n;
  return n;
}

uint32_t DirtyRing::FindGap() const {
  uint32_t j = 1;
  while (j < entries_ && (FlagsAt(j) & KVM_DIRTY_GFN_F_MASK) != KVM_DIRTY_GFN_F_DIRTY) ++j;
  if (j == entries_) return 0;
  // KVM fills entries in order (each flags store is a release), so once a later entry is seen
  // DIRTY, an entry KVM pushed before it is visible as DIRTY too: if ours still is not, KVM's push
  // index really is ahead of our fetch index (it skipped these slots after overrunning the ring).
  if ((FlagsAt(0) & KVM_DIRTY_GFN_F_MASK) == KVM_DIRTY_GFN_F_DIRTY) return 0;
  return j;
}

// ---------------------------------------------------------------------------------------------
// DirtyTracker: creation

const char* DirtyTracker::ModeName(Mode m) {
  switch (m) {
    case Mode::kAuto:
      return "auto";
    case Mode::kRing:
      return "ring";
    case Mode::kBitmap:
      return "bitmap";
  }
  return "?";
}

absl::StatusOr<DirtyRingConfig> DirtyTracker::EnableDirtyRing(KvmVm& vm, uint32_t bytes) {
  struct Candidate {
    DirtyRingKind kind;
    uint32_t cap;
  };
  std::vector<std::pair<Candidate, uint32_t>> caps;  // (candidate, max bytes)
  int acq = vm.CheckExtension(KVM_CAP_DIRTY_LOG_RING_ACQ_REL);
  int tso = vm.CheckExtension(KVM_CAP_DIRTY_LOG_RING);
  if (acq > 0)
    caps.push_back({{DirtyRingKind::kAcqRel, KVM_CAP_DIRTY_LOG_RING_ACQ_REL},
                    static_cast<uint32_t>(acq)});
  if (tso > 0)
    caps.push_back({{DirtyRingKind::kTso, KVM_CAP_DIRTY_LOG_RING}, static_cast<uint32_t>(tso)});
  if (caps.empty())
    return absl::UnimplementedError("KVM has no dirty ring (KVM_CAP_DIRTY_LOG_RING[_ACQ_REL] = 0)");

  absl::Status last;
  for (const auto& [cand, max_bytes] : caps) {
    uint32_t max_pow2 = std::bit_floor(max_bytes);
    uint32_t size = bytes == 0 ? kMinRingBytes : std::bit_floor(bytes);
    size = std::clamp(size, kMinRingBytes, std::max(kMinRingBytes, max_pow2));
    // A too-small ring (below KVM's reserved entries) is EINVAL as well: grow until accepted.
    for (;; size *= 2) {
      absl::Status s = vm.EnableCap(cand.cap, size);
      if (s.ok()) {
        DirtyRingConfig cfg{cand.kind, size};
        std::lock_guard lock(g_ring_mu);
        RingRegistry()[vm.fd()] = cfg;
        return cfg;
      }
      last = s;
      if (!absl::IsInvalidArgument(s) || size >= max_pow2) break;
    }
  }
  if (DirtyRingEnabled(vm))
    return absl::FailedPreconditionError(
        "dirty ring is already enabled on this VM (it can be enabled only once)");
  if (absl::IsInvalidArgument(last))
    return absl::FailedPreconditionError(absl::StrCat(
        "KVM refused the dirty ring at every size up to its maximum (", last.message(),
        "): it must be enabled right after KVM_CREATE_VM, before any vCPU is created"));
  return last;
}

bool DirtyTracker::DirtyRingEnabled(const KvmVm& vm) {
  // KVM_GET_DIRTY_LOG checks "dirty ring in use" (ENXIO) before validating the slot, so an
  // out-of-range slot id probes without touching any real bitmap (EINVAL when the ring is off).
  uint64_t buf[1] = {0};
  kvm_dirty_log log{};
  log.slot = 0xffff;
  log.dirty_bitmap = buf;
  return ::ioctl(vm.fd(), KVM_GET_DIRTY_LOG, &log) < 0 && errno == ENXIO;
}

absl::StatusOr<std::unique_ptr<DirtyTracker>> DirtyTracker::Create(KvmVm& vm, GuestMemory& mem,
                                                                   std::vector<KvmVcpu*> vcpus,
                                                                   Mode mode) {
  Options o;
  o.mode = mode;
  return Create(vm, mem, std::move(vcpus), o);
}

absl::StatusOr<std::unique_ptr<DirtyTracker>> DirtyTracker::Create(KvmVm& vm, GuestMemory& mem,
                                                                   std::vector<KvmVcpu*> vcpus,
                                                                   const Options& options) {
  if (options.clear_chunk_pages == 0 || options.clear_chunk_pages % 64 != 0)
    return absl::InvalidArgumentError(absl::StrCat("clear_chunk_pages ", options.clear_chunk_pages,
                                                   " is not a non-zero multiple of 64"));
  bool ring_on = DirtyRingEnabled(vm);
  Mode mode = options.mode;
  if (mode == Mode::kAuto) mode = ring_on ? Mode::kRing : Mode::kBitmap;

  if (mode == Mode::kBitmap && ring_on)
    return absl::FailedPreconditionError(
        "bitmap dirty tracking requested, but the VM's dirty ring is enabled (KVM then refuses "
        "KVM_GET_DIRTY_LOG); use ring mode");
  if (mode == Mode::kRing && !ring_on)
    return absl::FailedPreconditionError(
        "ring dirty tracking requested, but the VM's dirty ring is not enabled: call "
        "DirtyTracker::EnableDirtyRing right after KVM_CREATE_VM, before creating any vCPU");

  std::unique_ptr<DirtyTracker> t(new DirtyTracker(vm, mem, mode));
  t->clear_chunk_pages_ = options.clear_chunk_pages;
  t->poll_interval_ = options.ring_poll_interval;
  t->scratch_ = DirtySet::ForMemory(mem);
  t->pending_ = DirtySet::ForMemory(mem);

  if (mode == Mode::kRing) {
    std::optional<DirtyRingConfig> cfg = options.ring;
    if (!cfg.has_value()) {
      std::lock_guard lock(g_ring_mu);
      auto it = RingRegistry().find(vm.fd());
      if (it != RingRegistry().end()) cfg = it->second;
    }
    if (!cfg.has_value())
      return absl::FailedPreconditionError(
          "the VM's dirty ring was enabled without DirtyTracker::EnableDirtyRing: pass its size "
          "in Options::ring");
    if (vcpus.empty())
      return absl::FailedPreconditionError(
          "ring dirty tracking needs the VM's vCPUs (every vCPU has its own ring)");
    t->ring_config_ = cfg;
    for (KvmVcpu* v : vcpus) {
      if (v == nullptr) return absl::InvalidArgumentError("null vCPU");
      for (const auto& rs : t->rings_)
        if (rs->ring.vcpu_id() == v->id())
          return absl::InvalidArgumentError(absl::StrCat("vCPU ", v->id(), " listed twice"));
      auto ring = DirtyRing::Map(*v, *cfg);
      if (!ring.ok()) return ring.status();
      t->rings_.push_back(std::make_unique<RingState>(std::move(*ring)));
    }
  } else {
    int caps = vm.CheckExtension(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2);
    if (options.use_manual_protect && caps > 0 && (caps & KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE)) {
      uint64_t flags = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE;
      if (caps & KVM_DIRTY_LOG_INITIALLY_SET) flags |= KVM_DIRTY_LOG_INITIALLY_SET;
      absl::Status s = vm.EnableCap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, flags);
      if (!s.ok() && (flags & KVM_DIRTY_LOG_INITIALLY_SET)) {
        flags = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE;
        s = vm.EnableCap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, flags);
      }
      if (s.ok()) {
        t->manual_protect_ = true;
        t->initially_set_ = (flags & KVM_DIRTY_LOG_INITIALLY_SET) != 0;
      }
      // Failure: fall back to plain get-and-clear KVM_GET_DIRTY_LOG.
    } else if (caps > 0) {
      // The setting is per VM and sticky: make sure KVM_GET_DIRTY_LOG clears what it returns.
      if (absl::Status s = vm.EnableCap(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 0); !s.ok())
        return absl::Status(s.code(), absl::StrCat("disabling manual dirty-log protect: ",
                                                   s.message()));
    }
    for (const auto& r : mem.regions())
      t->kvm_bitmaps_.emplace_back((RegionPages(r) + 63) / 64, 0);
  }
  return t;
}

DirtyTracker::~DirtyTracker() {
  (void)Stop();
  StopPoller();
}

bool DirtyTracker::started() const { return started_.load(std::memory_order_acquire); }

// ---------------------------------------------------------------------------------------------
// Start / Stop

absl::Status DirtyTracker::SetLogging(bool on) {
  uint32_t flags = on ? KVM_MEM_LOG_DIRTY_PAGES : 0;
  const auto& regions = mem_.regions();
  for (size_t i = 0; i < regions.size(); ++i) {
    const auto& r = regions[i];
    absl::Status s = vm_.SetUserMemoryRegion(static_cast<uint32_t>(i), flags, r.gpa, r.size, r.host);
    if (!s.ok())
      return absl::Status(s.code(), absl::StrCat("memslot ", i, ": dirty logging ",
                                                 on ? "on" : "off", ": ", s.message()));
  }
  return absl::OkStatus();
}

absl::Status DirtyTracker::Start() {
  std::lock_guard op(op_mu_);
  if (started_.load()) return absl::OkStatus();
  if (mode_ == Mode::kRing) {
    // Drop anything left from an earlier run (there should be nothing: logging was off).
    std::lock_guard r(reset_mu_);
    uint64_t ignored = 0;
    (void)HarvestAllLocked(scratch_, ignored, nullptr);
    for (auto& rs : rings_) {
      std::lock_guard l(rs->mu);
      rs->since_sync = 0;
      rs->total_at_last_full = rs->harvested_total;
    }
  }
  if (absl::Status s = SetLogging(true); !s.ok()) {
    (void)SetLogging(false);
    return s;
  }
  {
    std::lock_guard l(pending_mu_);
    pending_.ClearAll();
    pending_ignored_ = ring_full_exits_ = 0;
  }
  overruns_.store(0);
  for (size_t i = 0; i < mem_.regions().size(); ++i) (void)mem_.TakeDirty(i);
  scratch_.ClearAll();
  // The first pass must send everything. Bitmap mode with INITIALLY_SET gets that from KVM (and
  // the first Sync's CLEAR is what write-protects memory); otherwise synthesize it.
  full_pass_pending_ = true;
  started_.store(true, std::memory_order_release);
  if (mode_ == Mode::kRing && poll_interval_ > absl::ZeroDuration()) {
    std::lock_guard l(poll_mu_);
    poll_stop_ = false;
    poller_ = std::thread([this] { PollerLoop(); });
  }
  return absl::OkStatus();
}

void DirtyTracker::StopPoller() {
  {
    std::lock_guard l(poll_mu_);
    poll_stop_ = true;
  }
  poll_cv_.notify_all();
  if (poller_.joinable()) poller_.join();
}

absl::Status DirtyTracker::Stop() {
  std::lock_guard op(op_mu_);
  if (!started_.load()) return absl::OkStatus();
  StopPoller();
  started_.store(false, std::memory_order_release);
  absl::Status s = SetLogging(false);
  if (mode_ == Mode::kRing) {
    std::lock_guard r(reset_mu_);
    uint64_t ignored = 0;
    absl::Status h = HarvestAllLocked(scratch_, ignored, nullptr);
    if (s.ok()) s = h;
    for (auto& rs : rings_) {
      std::lock_guard l(rs->mu);
      rs->since_sync = 0;
    }
  }
  scratch_.ClearAll();
  std::lock_guard l(pending_mu_);
  pending_.ClearAll();
  pending_ignored_ = 0;
  return s;
}

// ---------------------------------------------------------------------------------------------
// Ring mode
//
// The protocol (Documentation/virt/kvm/api.rst, KVM_CAP_DIRTY_LOG_RING): KVM pushes a GFN by
// writing slot/offset and then flags = DIRTY (release); userspace harvests entries strictly in
// order, setting flags = RESET (release) after reading them (acquire), then calls
// KVM_RESET_DIRTY_RINGS, which re-protects the pages and frees the entries. A vCPU whose ring
// passes its soft limit (size minus 64 reserved entries) exits with KVM_EXIT_DIRTY_RING_FULL.
//
// Overruns. The KVM of our development hosts (kvm-pvm, emulated guests) checks the soft limit
// late: measured, a vCPU ran 0..~250 entries past it, so any ring that fills up can overflow (KVM
// then overwrites unharvested entries and its push index runs ahead of ours). We never report a
// clean page as clean after that: every overrun sign makes the next Sync a full pass, and the ring
// is brought back in step:
//  * a walk that collects a whole ring's worth ("lapped")      -> overrun (entries were lost);
//  * KVM_RESET_DIRTY_RINGS resetting more/fewer than we marked  -> overrun;
//  * our next entry empty while a later one is DIRTY ("gap")    -> KVM skipped ahead after an
//    overrun; the gap's slots are marked RESET so KVM's reset index can pass them;
//  * KVM_EXIT_DIRTY_RING_FULL although nothing at all was harvested from that ring since the
//    previous one ("wedged": KVM counts entries that no longer exist) -> release one such entry
//    per exit, at the slot KVM_RESET_DIRTY_RINGS proves is KVM's reset index (it counts only what
//    it resets; a wrong guess resets nothing and is undone). One per exit is safe: KVM cannot
//    exit for a full ring with fewer than one pending entry; more could move its reset index past
//    its push index, which KVM never recovers from.
// The background poller keeps rings far from full so none of this happens in practice.

void DirtyTracker::NoteOverrun(std::atomic<uint64_t>& counter) {
  overruns_.fetch_add(1);
  counter.fetch_add(1);
}

DirtyTracker::OverrunCounts DirtyTracker::ring_overrun_counts() const {
  OverrunCounts c;
  c.lapped = n_lapped_.load();
  c.gaps = n_gaps_.load();
  c.reset_mismatch = n_reset_mismatch_.load();
  c.wedged = n_wedged_.load();
  return c;
}

void DirtyTracker::HarvestRing(RingState& rs, DirtySet& into, uint64_t& ignored,
                               bool force_gap_scan) {
  DirtyRing::HarvestResult r = rs.ring.Harvest(
      [&](uint32_t slot, uint64_t offset) {
        uint32_t as_id = slot >> 16;
        uint32_t id = slot & 0xffff;
        if (as_id != 0 || id >= into.size() || offset >= into.region(id).pages()) {
          ++ignored;
          return;
        }
        into.region(id).Set(offset);
      },
      force_gap_scan || rs.suspect.load());
  marked_since_reset_ += r.collected + r.phantoms;
  rs.since_sync += r.collected;
  rs.harvested_total += r.collected;
  using Lap = RingState::Lap;
  if (r.phantoms > 0) {
    // KVM pushed past the ring: entries were overwritten. Already charged if this is the gap a
    // lap left behind and a Sync counted that lap.
    if (rs.lap != Lap::kCharged) NoteOverrun(n_gaps_);
    rs.lap = Lap::kNone;
    rs.suspect.store(true);
  } else if (r.collected > 0 && !r.lapped) {
    rs.lap = Lap::kNone;  // KVM pushed right at our fetch index: any earlier lap was lossless
    rs.suspect.store(false);
  }
  if (r.lapped) {
    rs.lap = Lap::kUnresolved;
    rs.suspect.store(true);
  }
}

absl::Status DirtyTracker::ResetRings() {
  // Every harvest is followed by a reset under reset_mu_, so with nothing marked there is nothing
  // for KVM to do (and the 1 ms poller would otherwise take KVM's slots lock for nothing).
  if (marked_since_reset_ == 0) return absl::OkStatus();
  // KVM stops early on a pending signal (vCPU kicks) and reports what it did: call again until it
  // has nothing left, summing.
  uint64_t total = 0;
  for (int i = 0; i < 64; ++i) {
    int n = ::ioctl(vm_.fd(), KVM_RESET_DIRTY_RINGS, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      marked_since_reset_ = 0;
      return ErrnoStatus(errno, "KVM_RESET_DIRTY_RINGS");
    }
    if (n == 0) break;
    total += n;
    if (total >= marked_since_reset_) break;
  }
  if (total != marked_since_reset_) {
    for (auto& rs : rings_) rs->suspect.store(true);
    NoteOverrun(n_reset_mismatch_);
  }
  marked_since_reset_ = 0;
  return absl::OkStatus();
}

absl::Status DirtyTracker::HarvestAllLocked(DirtySet& into, uint64_t& ignored,
                                            std::vector<VcpuDirtyCount>* per_vcpu) {
  for (auto& rs : rings_) {
    std::lock_guard l(rs->mu);
    HarvestRing(*rs, into, ignored, /*force_gap_scan=*/per_vcpu != nullptr);
    if (per_vcpu != nullptr) {  // a Sync
      per_vcpu->push_back({rs->ring.vcpu_id(), rs->since_sync});
      rs->since_sync = 0;
      if (rs->lap == RingState::Lap::kUnresolved) {
        NoteOverrun(n_lapped_);
        rs->lap = RingState::Lap::kCharged;
      }
    }
  }
  // Re-protect what we collected before anyone reads those pages.
  return ResetRings();
}

absl::Status DirtyTracker::HarvestRings() {
  if (mode_ != Mode::kRing) return absl::OkStatus();
  std::lock_guard r(reset_mu_);
  absl::Status s;
  for (auto& rs : rings_) {
    std::lock_guard l(rs->mu);
    std::lock_guard p(pending_mu_);
    HarvestRing(*rs, pending_, pending_ignored_, false);
  }
  return ResetRings();
}

void DirtyTracker::PollerLoop() {
  std::unique_lock l(poll_mu_);
  while (!poll_stop_) {
    poll_cv_.wait_for(l, absl::ToChronoNanoseconds(poll_interval_));
    if (poll_stop_) break;
    l.unlock();
    (void)HarvestRings();
    l.lock();
  }
}

absl::Status DirtyTracker::UnwedgeRing(RingState& rs) {
  DirtyRing& ring = rs.ring;
  const uint32_t n = ring.entries();
  for (uint32_t rel = 0; rel < n; ++rel) {
    if ((ring.FlagsAt(rel) & KVM_DIRTY_GFN_F_MASK) != 0) continue;  // only empty slots
    ring.SetFlagsAt(rel, KVM_DIRTY_GFN_F_RESET);
    marked_since_reset_ = 0;
    int y;
    do {
      y = ::ioctl(vm_.fd(), KVM_RESET_DIRTY_RINGS, 0);
    } while (y < 0 && errno == EINTR);
    if (y < 0) {
      ring.SetFlagsAt(rel, 0);
      return ErrnoStatus(errno, "KVM_RESET_DIRTY_RINGS");
    }
    if (y > 0) {
      // KVM's reset index R was this slot. Our fetch index F never trails R, so
      // R = F - ((n - rel) mod n); KVM advanced it by y (this entry plus any stuck ones after it).
      uint32_t f = ring.fetch_index();
      uint32_t r_new = f - ((n - rel) & (n - 1)) + static_cast<uint32_t>(y);
      if (static_cast<int32_t>(r_new - f) > 0) ring.set_fetch_index(r_new);
      return absl::OkStatus();
    }
    ring.SetFlagsAt(rel, 0);  // not KVM's reset index: undo
  }
  return absl::InternalError(absl::StrCat("dirty ring of vCPU ", ring.vcpu_id(),
                                          " is wedged after a KVM ring overrun and no slot could "
                                          "be released"));
}

absl::Status DirtyTracker::HandleRingFull(int vcpu_id) {
  if (mode_ != Mode::kRing)
    return absl::FailedPreconditionError("HandleRingFull: tracker is in bitmap mode");
  RingState* rs = nullptr;
  for (auto& r : rings_)
    if (r->ring.vcpu_id() == vcpu_id) rs = r.get();
  if (rs == nullptr)
    return absl::NotFoundError(
        absl::StrCat("HandleRingFull: vCPU ", vcpu_id, " was not given to the tracker"));
  std::lock_guard r(reset_mu_);
  std::lock_guard l(rs->mu);
  uint64_t before = rs->harvested_total;
  {
    std::lock_guard p(pending_mu_);
    HarvestRing(*rs, pending_, pending_ignored_, /*force_gap_scan=*/true);
    ++ring_full_exits_;
  }
  // Reset before returning: KVM_RUN may only be re-entered once the ring is below its soft limit,
  // and no Sync may report these pages before they are write-protected again.
  absl::Status s = ResetRings();
  if (!s.ok()) return s;
  bool wedged = rs->harvested_total == before && rs->harvested_total == rs->total_at_last_full;
  rs->total_at_last_full = rs->harvested_total;
  if (wedged) {
    rs->suspect.store(true);
    if (rs->lap != RingState::Lap::kCharged) NoteOverrun(n_wedged_);
    rs->lap = RingState::Lap::kNone;
    return UnwedgeRing(*rs);
  }
  return absl::OkStatus();
}

uint32_t DirtyTracker::RingDirtyEntries(int vcpu_id) const {
  for (const auto& r : rings_) {
    if (r->ring.vcpu_id() != vcpu_id) continue;
    std::lock_guard l(r->mu);
    return r->ring.PeekDirty();
  }
  return 0;
}

absl::Status DirtyTracker::SyncRing(DirtySet& scratch, DirtySyncStats& st) {
  absl::Time t0 = absl::Now();
  uint64_t ignored = 0;
  absl::Status s;
  {
    std::lock_guard r(reset_mu_);
    st.per_vcpu.reserve(rings_.size());
    s = HarvestAllLocked(scratch, ignored, &st.per_vcpu);
    for (const VcpuDirtyCount& c : st.per_vcpu) st.kvm_pages += c.pages;
    std::lock_guard p(pending_mu_);
    scratch.Or(pending_);
    pending_.ClearAll();
    st.ring_full_exits = ring_full_exits_;
    ignored += pending_ignored_;
    pending_ignored_ = ring_full_exits_ = 0;
  }
  st.ignored_entries = ignored;
  st.ring_overruns = overruns_.exchange(0);
  st.kvm_time = absl::Now() - t0;
  return s;
}

// ---------------------------------------------------------------------------------------------
// Bitmap mode

absl::Status DirtyTracker::SyncBitmap(DirtySet& scratch, DirtySyncStats& st) {
  absl::Time t0 = absl::Now();
  const auto& regions = mem_.regions();
  for (size_t i = 0; i < regions.size(); ++i) {
    std::vector<uint64_t>& bm = kvm_bitmaps_[i];
    uint64_t pages = RegionPages(regions[i]);
    kvm_dirty_log log{};
    log.slot = static_cast<uint32_t>(i);
    log.dirty_bitmap = bm.data();
    ++st.ioctls;
    if (::ioctl(vm_.fd(), KVM_GET_DIRTY_LOG, &log) < 0)
      return ErrnoStatus(errno, absl::StrCat("KVM_GET_DIRTY_LOG slot ", i));
    if (pages % 64 != 0) bm.back() &= (1ULL << (pages % 64)) - 1;

    if (manual_protect_) {
      // Clear (= re-protect) only what was found dirty, chunk by chunk; each ioctl covers the
      // words from the chunk's first to last non-zero word (first_page and num_pages are then
      // multiples of 64, except a range ending at the end of the slot).
      uint64_t words_per_chunk = clear_chunk_pages_ / 64;
      for (uint64_t c = 0; c < bm.size(); c += words_per_chunk) {
        uint64_t end = std::min<uint64_t>(bm.size(), c + words_per_chunk);
        uint64_t first = c;
        while (first < end && bm[first] == 0) ++first;
        if (first == end) continue;
        uint64_t last = end - 1;
        while (bm[last] == 0) --last;
        kvm_clear_dirty_log clr{};
        clr.slot = static_cast<uint32_t>(i);
        clr.first_page = first * 64;
        clr.num_pages = static_cast<uint32_t>(std::min(pages, (last + 1) * 64) - first * 64);
        clr.dirty_bitmap = &bm[first];
        ++st.ioctls;
        if (::ioctl(vm_.fd(), KVM_CLEAR_DIRTY_LOG, &clr) < 0)
          return ErrnoStatus(errno, absl::StrCat("KVM_CLEAR_DIRTY_LOG slot ", i, " pages [",
                                                 clr.first_page, ", +", clr.num_pages, ")"));
      }
    }
    for (uint64_t w : bm) st.kvm_pages += std::popcount(w);
    scratch.region(i).OrWords(bm);
  }
  st.kvm_time = absl::Now() - t0;
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Sync

absl::Status DirtyTracker::Sync(DirtySet& out, DirtySyncStats* stats) {
  std::lock_guard op(op_mu_);
  if (!started_.load())
    return absl::FailedPreconditionError("dirty tracking is not started (call Start first)");
  absl::Time t0 = absl::Now();
  if (!SameGeometry(out, mem_)) out = DirtySet::ForMemory(mem_);
  DirtySyncStats st;
  scratch_.ClearAll();

  absl::Status s = mode_ == Mode::kRing ? SyncRing(scratch_, st) : SyncBitmap(scratch_, st);
  if (!s.ok()) return s;  // nothing reported: the caller should treat the migration as failed

  // VMM-side writes, taken after KVM's log: a device write racing with this Sync lands either
  // here or in the next Sync, never nowhere.
  for (size_t i = 0; i < mem_.regions().size(); ++i) {
    std::vector<uint64_t> vmm = mem_.TakeDirty(i);
    for (uint64_t w : vmm) st.vmm_pages += std::popcount(w);
    scratch_.region(i).OrWords(vmm);
  }
  if (full_pass_pending_ || st.ring_overruns > 0) {
    st.full_pass = true;
    full_pass_pending_ = false;
    scratch_.SetAll();
  }
  st.reported_pages = scratch_.Count();
  out.Or(scratch_);
  st.duration = absl::Now() - t0;
  last_stats_ = st;
  if (stats != nullptr) *stats = std::move(st);
  return absl::OkStatus();
}

}  // namespace microvmm::migration
