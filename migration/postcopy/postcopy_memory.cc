#include "migration/postcopy/postcopy_memory.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <time.h>

#include <algorithm>
#include <bit>
#include <cstring>

#include "absl/time/clock.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "vmm/base/log.h"
#include "vmm/base/status.h"

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif

namespace microvmm::migration {
namespace {

// Log-linear latency histogram over nanoseconds: exact below 32 ns, then 16 sub-buckets per
// power of two (<= 6.25% error). Lock-free: one relaxed atomic add per sample.
constexpr int kBuckets = 32 + 59 * 16;

int BucketOf(uint64_t ns) {
  if (ns < 32) return static_cast<int>(ns);
  int e = 63 - __builtin_clzll(ns);  // >= 5
  int sub = static_cast<int>((ns >> (e - 4)) & 15);
  return 32 + (e - 5) * 16 + sub;
}

double BucketMidNs(int b) {
  if (b < 32) return b;
  int e = (b - 32) / 16 + 5, sub = (b - 32) % 16;
  double lo = static_cast<double>((16ULL + sub) << (e - 4));
  return lo + static_cast<double>(1ULL << (e - 4)) / 2;
}

constexpr uint64_t kChunkMin = 2ULL << 20;  // interleave granule between shards
constexpr uint64_t kMaxChunks = 2048;       // bounds the VMA count the registration creates

}  // namespace

struct PostcopyMemory::Shard {
  Userfaultfd uffd;
  ScopedFd stop;  // eventfd: wakes the reader for shutdown
  std::thread reader;
  std::vector<std::pair<uint8_t*, uint64_t>> ranges;  // registered chunks
};

struct PostcopyMemory::LaneCounters {
  std::atomic<uint64_t> faults{0};
  std::atomic<uint64_t> blocked_ns{0};
  std::atomic<uint64_t> hist[kBuckets];
  LaneCounters() {
    for (auto& h : hist) h.store(0, std::memory_order_relaxed);
  }
};

PostcopyMemory::PostcopyMemory(GuestMemory* mem, PostcopyOptions options, FetchFn fetch,
                               LaneOfThread lanes)
    : mem_(mem),
      options_(options),
      fetch_(std::move(fetch)),
      lane_of_(std::move(lanes)),
      states_(*mem) {}

absl::StatusOr<std::unique_ptr<PostcopyMemory>> PostcopyMemory::Create(GuestMemory* mem,
                                                                       PostcopyOptions options,
                                                                       FetchFn fetch,
                                                                       LaneOfThread lanes) {
  if (mem == nullptr || !fetch || !lanes)
    return absl::InvalidArgumentError("PostcopyMemory: memory, fetch and lane map are required");
  if (options.lanes < 1 || options.lanes > 65000)
    return absl::InvalidArgumentError(absl::StrCat("PostcopyMemory: bad lane count ",
                                                   options.lanes));
  auto avail = Userfaultfd::AvailableFeatures();
  if (!avail.ok()) return avail.status();
  std::unique_ptr<PostcopyMemory> pm(
      new PostcopyMemory(mem, options, std::move(fetch), std::move(lanes)));
  using Mode = PostcopyOptions::Mode;
  bool minor_ok = *avail & UFFD_FEATURE_MINOR_SHMEM;
  pm->mode_ = options.mode == Mode::kAuto ? (minor_ok ? Mode::kMinor : Mode::kMissing)
                                          : options.mode;
  // THREAD_ID attributes each fault to its vCPU lane; without it every fault would land on the
  // VMM lane and per-lane fetching would be meaningless.
  pm->features_ = UFFD_FEATURE_THREAD_ID;
  if (pm->mode_ == Mode::kMinor) pm->features_ |= UFFD_FEATURE_MINOR_SHMEM;
  if (uint64_t missing = pm->features_ & ~*avail; missing != 0)
    return absl::FailedPreconditionError(
        absl::StrCat("post-copy needs userfaultfd features ", Userfaultfd::FeatureNames(missing),
                     " which this kernel lacks (available: ", Userfaultfd::FeatureNames(*avail),
                     ")"));
  pm->nshards_ = options.shards > 0 ? options.shards : std::min(4, options.lanes);
  uint64_t chunk = kChunkMin;
  while (mem->ram_bytes() / chunk > kMaxChunks) chunk *= 2;
  pm->chunk_pages_ = chunk / kPageSize;
  pm->fault_info_.reset(new std::atomic<uint64_t>[pm->states_.pages()]);
  for (uint64_t i = 0; i < pm->states_.pages(); ++i)
    pm->fault_info_[i].store(0, std::memory_order_relaxed);
  for (int i = 0; i <= options.lanes; ++i)
    pm->counters_.push_back(std::make_unique<LaneCounters>());
  pm->lane_wait_ = std::make_unique<std::atomic<int64_t>[]>(std::max(1, options.lanes));
  for (int i = 0; i < options.lanes; ++i) pm->lane_wait_[i].store(-1);
  return pm;
}

PostcopyMemory::~PostcopyMemory() {
  StopReaders();
  if (started_.load() && !finished_.load() && !complete())
    LOG_WARN("post-copy memory destroyed with %d pages still missing", missing_pages());
}

int64_t PostcopyMemory::NowNs() const {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

uint8_t* PostcopyMemory::HostOf(uint64_t index) const {
  size_t r = states_.RegionOf(index);
  return mem_->regions()[r].host + (index - states_.FirstPage(r)) * kPageSize;
}

uint8_t* PostcopyMemory::AliasOf(uint64_t index) const {
  size_t r = states_.RegionOf(index);
  return static_cast<uint8_t*>(alias_[r].get()) + (index - states_.FirstPage(r)) * kPageSize;
}

PostcopyMemory::Shard& PostcopyMemory::ShardOf(uint64_t index) const {
  size_t r = states_.RegionOf(index);
  uint64_t chunk = (index - states_.FirstPage(r)) / chunk_pages_;
  return *shards_[(chunk + r) % nshards_];
}

int PostcopyMemory::LaneSlot(int lane) const {
  return lane >= 0 && lane < options_.lanes ? lane : options_.lanes;
}

void PostcopyMemory::NoteLaneWaiting(int lane, uint64_t index) {
  if (lane >= 0 && lane < options_.lanes)
    lane_wait_[lane].store(static_cast<int64_t>(index), std::memory_order_release);
}

bool PostcopyMemory::LaneWaiting(int lane) const {
  if (lane < 0 || lane >= options_.lanes || !started_.load()) return false;
  const int64_t index = lane_wait_[lane].load(std::memory_order_acquire);
  return index >= 0 && states_.Get(static_cast<uint64_t>(index)) != PageState::kPresent;
}

void PostcopyMemory::RecordFault(uint64_t index, int lane) {
  uint64_t t = static_cast<uint64_t>(NowNs() - start_ns_);
  fault_info_[index].store((t << 16) | static_cast<uint64_t>(LaneSlot(lane) + 1),
                           std::memory_order_relaxed);
}

void PostcopyMemory::RecordInstalled(uint64_t index) {
  // The page is in guest RAM now (release order in Clear): vCPUs may map it without exiting.
  if (kvm_bitmap_ != nullptr) kvm_bitmap_->Clear(states_.GpaOf(index));
  uint64_t info = fault_info_[index].load(std::memory_order_relaxed);
  if (info == 0) return;
  uint64_t now = static_cast<uint64_t>(NowNs() - start_ns_);
  uint64_t lat = now > (info >> 16) ? now - (info >> 16) : 0;
  LaneCounters& c = *counters_[(info & 0xffff) - 1];
  c.hist[BucketOf(lat)].fetch_add(1, std::memory_order_relaxed);
  c.blocked_ns.fetch_add(lat, std::memory_order_relaxed);
}

void PostcopyMemory::RequestFetch(uint64_t index, int lane) {
  if (suspended_.load(std::memory_order_acquire)) return;  // Refetch() re-issues it
  fetch_(lane, states_.GpaOf(index));
}

void PostcopyMemory::NotifyWaiters() {
  // Pairs with EnsurePresent: the page state is stored (seq_cst) before waiters_ is read, and a
  // waiter increments waiters_ before checking states under mu_, so no wakeup is lost.
  if (waiters_.load(std::memory_order_seq_cst) == 0) return;
  absl::MutexLock l(&mu_);
  cv_.SignalAll();
}

absl::Status PostcopyMemory::Start(const std::vector<std::vector<uint64_t>>& present,
                                   const std::vector<std::vector<uint64_t>>& zero) {
  if (started_.load()) return absl::FailedPreconditionError("post-copy already started");
  const auto& regions = mem_->regions();
  auto check = [&](const std::vector<std::vector<uint64_t>>& bm, const char* what) {
    if (bm.empty()) return absl::OkStatus();
    if (bm.size() != regions.size())
      return absl::InvalidArgumentError(absl::StrFormat(
          "post-copy start: %s bitmap has %d regions, memory has %d", what, bm.size(),
          regions.size()));
    for (size_t r = 0; r < regions.size(); ++r)
      if (bm[r].size() * 64 < regions[r].size / kPageSize)
        return absl::InvalidArgumentError(
            absl::StrFormat("post-copy start: %s bitmap of region %d too short", what, r));
    return absl::OkStatus();
  };
  if (absl::Status s = check(present, "present"); !s.ok()) return s;
  if (absl::Status s = check(zero, "zero"); !s.ok()) return s;
  auto bit = [](const std::vector<std::vector<uint64_t>>& bm, size_t r, uint64_t pg) {
    return !bm.empty() && ((bm[r][pg / 64] >> (pg % 64)) & 1);
  };
  if (started_.exchange(true)) return absl::FailedPreconditionError("post-copy already started");
  start_ns_ = NowNs();
  // Start() runs inside the switchover downtime: its phases are logged.
  const absl::Time t_begin = absl::Now();
  for (size_t r = 0; r < regions.size(); ++r) {
    uint64_t first = states_.FirstPage(r);
    // Every page is kMissing since Create(): only set bits need a store (a word at a time; a
    // pure post-copy has hardly any), which keeps this loop out of the downtime.
    const uint64_t n = regions[r].size / kPageSize;
    for (uint64_t w = 0; w * 64 < n; ++w) {
      const uint64_t p = present.empty() ? 0 : present[r][w];
      const uint64_t z = zero.empty() ? 0 : zero[r][w] & ~p;
      for (uint64_t m = p | z; m != 0; m &= m - 1) {
        const uint64_t pg = w * 64 + std::countr_zero(m);
        if (pg >= n) break;
        states_.Set(first + pg, (p >> (pg % 64)) & 1 ? PageState::kPresent : PageState::kZero);
      }
    }
    if (kvm_bitmap_ != nullptr)  // before any vCPU runs: set = not present (zero pages too)
      for (uint64_t pg = 0; pg < regions[r].size / kPageSize; ++pg) {
        const uint64_t gpa = regions[r].gpa + pg * kPageSize;
        if (bit(present, r, pg) ? !kvm_bitmap_->Clear(gpa) : !kvm_bitmap_->Set(gpa))
          return absl::InvalidArgumentError(absl::StrFormat(
              "post-copy start: gpa 0x%x has no KVM userfault bitmap slot", gpa));
      }
  }
  // Calls fn(region, first page, count, present?) for maximal runs of equal presence.
  auto for_runs = [&](auto fn) -> absl::Status {
    for (size_t r = 0; r < regions.size(); ++r) {
      uint64_t first = states_.FirstPage(r), n = regions[r].size / kPageSize, pg = 0;
      while (pg < n) {
        bool p = states_.Get(first + pg) == PageState::kPresent;
        uint64_t end = pg + 1;
        while (end < n && (states_.Get(first + end) == PageState::kPresent) == p) ++end;
        if (absl::Status s = fn(r, pg, end - pg, p); !s.ok()) return s;
        pg = end;
      }
    }
    return absl::OkStatus();
  };

  using Mode = PostcopyOptions::Mode;
  const absl::Time t_states = absl::Now();
  if (mode_ == Mode::kMinor) {
    for (const GuestMemory::Region& r : regions) {
      void* p = ::mmap(nullptr, r.size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE,
                       r.memfd.get(), 0);
      if (p == MAP_FAILED) return ErrnoStatus(errno, "mmap post-copy install alias");
      alias_.emplace_back(p, r.size);
    }
    // Map present pages in the guest mapping now so they do not take MINOR faults later.
    // Best effort: an unmapped present page is still resolved by a reader (CONTINUE).
    (void)for_runs([&](size_t r, uint64_t pg, uint64_t n, bool p) {
      if (p && ::madvise(regions[r].host + pg * kPageSize, n * kPageSize, MADV_POPULATE_WRITE))
        LOG_WARN("post-copy: MADV_POPULATE_WRITE on present pages failed: %s", strerror(errno));
      return absl::OkStatus();
    });
  }

  for (int i = 0; i < nshards_; ++i) {
    auto s = std::make_unique<Shard>();
    auto u = Userfaultfd::Open(features_);
    if (!u.ok()) return u.status();
    s->uffd = std::move(*u);
    s->stop.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
    if (!s->stop.valid()) return ErrnoStatus(errno, "eventfd for post-copy reader");
    shards_.push_back(std::move(s));
  }
  // MINOR mode registers MISSING too: a page punched out of the memfd has no page-cache page, so
  // a MINOR-only registration would let the kernel allocate a zero page for it silently.
  const uint64_t modes = mode_ == Mode::kMinor ? (Userfaultfd::kMissing | Userfaultfd::kMinor)
                                               : Userfaultfd::kMissing;
  for (size_t r = 0; r < regions.size(); ++r) {
    uint64_t chunk_bytes = nshards_ == 1 ? regions[r].size : chunk_pages_ * kPageSize;
    for (uint64_t off = 0, c = 0; off < regions[r].size; off += chunk_bytes, ++c) {
      uint64_t len = std::min(chunk_bytes, regions[r].size - off);
      Shard& sh = *shards_[(c + r) % nshards_];
      auto ioctls = sh.uffd.Register(regions[r].host + off, len, modes);
      if (!ioctls.ok()) return ioctls.status();
      uint64_t need = (1ULL << _UFFDIO_WAKE) |
                      (mode_ == Mode::kMinor ? (1ULL << _UFFDIO_CONTINUE)
                                             : (1ULL << _UFFDIO_COPY) | (1ULL << _UFFDIO_ZEROPAGE));
      if ((*ioctls & need) != need)
        return absl::FailedPreconditionError(absl::StrFormat(
            "userfaultfd registration of guest RAM offers ioctls 0x%x, need 0x%x", *ioctls, need));
      sh.ranges.push_back({regions[r].host + off, len});
    }
  }
  const absl::Time t_registered = absl::Now();
  // Drop stale content now that every access to a non-present page is trapped. Punching a hole
  // in shmem also zaps the PTEs of every mapping (guest, alias, KVM via MMU notifiers).
  absl::Status punched = for_runs([&](size_t r, uint64_t pg, uint64_t n, bool p) {
    if (p) return absl::OkStatus();
    // Punch only where the memfd holds data (SEEK_DATA/SEEK_HOLE): a pure post-copy's
    // destination received next to nothing, and punching an empty range still walks it.
    const int fd = regions[r].memfd.get();
    off_t pos = static_cast<off_t>(pg * kPageSize);
    const off_t end = static_cast<off_t>((pg + n) * kPageSize);
    while (pos < end) {
      off_t data = ::lseek(fd, pos, SEEK_DATA);
      if (data < 0) {
        if (errno == ENXIO) break;  // no data after pos
        data = pos;                 // SEEK_DATA unsupported: punch everything
      }
      if (data >= end) break;
      off_t hole = ::lseek(fd, data, SEEK_HOLE);
      if (hole < 0 || hole > end) hole = end;
      if (::fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, data, hole - data) != 0)
        return ErrnoStatus(errno, "fallocate(PUNCH_HOLE) of missing guest pages");
      pos = hole;
    }
    return absl::OkStatus();
  });
  if (!punched.ok()) return punched;
  for (auto& s : shards_) s->reader = std::thread(&PostcopyMemory::ReaderLoop, this, s.get());
  const absl::Time t_end = absl::Now();
  auto ms = [](absl::Duration d) { return absl::ToDoubleMilliseconds(d); };
  LOG_INFO("post-copy started: %s mode, %d shards, %d of %d pages missing (%d known zero) in "
           "%.1f ms (page states %.1f, map+register %.1f, drop stale %.1f)",
           mode_ == Mode::kMinor ? "MINOR" : "MISSING", nshards_, missing_pages(),
           states_.pages(), states_.Count(PageState::kZero), ms(t_end - t_begin),
           ms(t_states - t_begin), ms(t_registered - t_states), ms(t_end - t_registered));
  return absl::OkStatus();
}

absl::Status PostcopyMemory::Populate(uint64_t index, const uint8_t* src) {
  Shard& sh = ShardOf(index);
  uint8_t* host = HostOf(index);
  absl::StatusOr<bool> r;
  if (mode_ == PostcopyOptions::Mode::kMinor) {
    // Write the content into the page cache through the unregistered alias, then map it into the
    // guest mapping. The memcpy completes (program order, and the ioctl is a full barrier) before
    // CONTINUE makes the PTE visible, so nobody can see a partly written page. Zeros go the same
    // way (memset) so the page cache always holds exactly what we installed.
    uint8_t* alias = AliasOf(index);
    if (src)
      std::memcpy(alias, src, kPageSize);
    else
      std::memset(alias, 0, kPageSize);
    r = sh.uffd.Continue(host, kPageSize);
  } else {
    r = src ? sh.uffd.Copy(host, src, kPageSize) : sh.uffd.ZeroPage(host, kPageSize);
  }
  if (!r.ok()) return r.status();
  // EEXIST: something was mapped there already (the wrapper woke the waiters). Under our state
  // machine only we install, so this means an outside writer raced us; keep going.
  if (!*r)
    LOG_WARN_RATELIMITED("post-copy: page at gpa 0x%x already mapped when installing",
                         states_.GpaOf(index));
  return absl::OkStatus();
}

absl::StatusOr<bool> PostcopyMemory::InstallImpl(uint64_t gpa, const uint8_t* src) {
  if (!started_.load()) return absl::FailedPreconditionError("post-copy not started");
  if (gpa % kPageSize != 0)
    return absl::InvalidArgumentError(absl::StrFormat("install: gpa 0x%x not page-aligned", gpa));
  auto index = states_.IndexOf(gpa);
  if (!index)
    return absl::OutOfRangeError(absl::StrFormat("install: gpa 0x%x outside guest RAM", gpa));
  auto prior = states_.BeginInstall(*index);
  if (!prior) {
    duplicates_.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  if (absl::Status s = Populate(*index, src); !s.ok()) {
    states_.AbortInstall(*index, *prior);
    return s;
  }
  states_.MarkPresent(*index);
  RecordInstalled(*index);
  (*prior == PageState::kInFlight ? pulled_ : pushed_).fetch_add(1, std::memory_order_relaxed);
  NotifyWaiters();
  return true;
}

absl::StatusOr<bool> PostcopyMemory::Install(uint64_t gpa, std::span<const uint8_t> page) {
  if (page.size() != kPageSize)
    return absl::InvalidArgumentError(
        absl::StrFormat("install: page of %d bytes at gpa 0x%x", page.size(), gpa));
  return InstallImpl(gpa, page.data());
}

absl::StatusOr<bool> PostcopyMemory::InstallZero(uint64_t gpa) { return InstallImpl(gpa, nullptr); }

absl::StatusOr<bool> PostcopyMemory::ResolveZero(uint64_t index) {
  // kZero -> kInstalling directly (never through kInFlight), so Refetch() can never ask the
  // source for a known-zero page.
  if (!states_.Transition(index, PageState::kZero, PageState::kInstalling)) return false;
  if (absl::Status s = Populate(index, nullptr); !s.ok()) {
    states_.AbortInstall(index, PageState::kZero);
    return s;
  }
  states_.MarkPresent(index);
  RecordInstalled(index);
  zeroed_.fetch_add(1, std::memory_order_relaxed);
  NotifyWaiters();
  return true;
}

void PostcopyMemory::HandleFault(Shard& shard, const Userfaultfd::Event& ev) {
  uint8_t* addr = reinterpret_cast<uint8_t*>(ev.address & ~(kPageSize - 1));
  std::optional<uint64_t> index;
  const auto& regions = mem_->regions();
  for (size_t r = 0; r < regions.size(); ++r)
    if (addr >= regions[r].host && addr < regions[r].host + regions[r].size)
      index = states_.FirstPage(r) + (addr - regions[r].host) / kPageSize;
  if (!index) {
    LOG_WARN_RATELIMITED("post-copy: fault at %p outside guest RAM", addr);
    return;
  }
  int lane = lane_of_(ev.tid);
  if (lane < 0 || lane >= options_.lanes) lane = kVmmLane;
  counters_[LaneSlot(lane)]->faults.fetch_add(1, std::memory_order_relaxed);
  NoteLaneWaiting(lane, *index);
  for (;;) {
    switch (states_.Get(*index)) {
      case PageState::kMissing:
        if (!states_.TryClaim(*index)) continue;  // lost a race: look again
        RecordFault(*index, lane);
        RequestFetch(*index, lane);
        return;
      case PageState::kZero: {
        RecordFault(*index, lane);
        auto r = ResolveZero(*index);
        if (!r.ok()) LOG_ERROR("post-copy: zero-fill failed: %s", r.status().ToString());
        if (r.ok() && !*r) continue;
        return;
      }
      case PageState::kInFlight:
      case PageState::kInstalling:
        return;  // the installer's COPY/CONTINUE wakes this thread
      case PageState::kPresent: {
        // A stale event (already woken), or a present page without a PTE: MINOR fault -> map it;
        // MISSING fault -> the page left the page cache after it was present, which only a
        // discard (balloon) does, so its content is zero. Both calls return EEXIST and just wake
        // if the page is there after all -- they never overwrite.
        auto r = ev.minor() ? shard.uffd.Continue(addr, kPageSize)
                            : shard.uffd.ZeroPage(addr, kPageSize);
        if (!r.ok()) LOG_WARN_RATELIMITED("post-copy: resolving present page: %s",
                                          r.status().ToString());
        return;
      }
    }
  }
}

void PostcopyMemory::ReaderLoop(Shard* shard) {
  Userfaultfd::Event events[64];
  pollfd fds[2] = {{shard->uffd.fd(), POLLIN, 0}, {shard->stop.get(), POLLIN, 0}};
  for (;;) {
    int n = ::poll(fds, 2, -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      LOG_ERROR("post-copy reader: poll: %s", strerror(errno));
      return;
    }
    if (fds[1].revents) return;
    for (;;) {
      auto got = shard->uffd.ReadEvents(events);
      if (!got.ok()) {
        LOG_ERROR("post-copy reader: %s", got.status().ToString());
        return;
      }
      if (*got == 0) break;
      for (size_t i = 0; i < *got; ++i) HandleFault(*shard, events[i]);
    }
  }
}

void PostcopyMemory::StopReaders() {
  for (auto& s : shards_) {
    if (!s->reader.joinable()) continue;
    uint64_t one = 1;
    if (::write(s->stop.get(), &one, sizeof(one)) < 0)
      LOG_ERROR("post-copy: cannot stop reader: %s", strerror(errno));
    s->reader.join();
  }
}

absl::Status PostcopyMemory::ClaimRange(uint64_t first, uint64_t last, int lane) {
  for (uint64_t i = first; i <= last; ++i) {
    switch (states_.Get(i)) {
      case PageState::kMissing:
        if (states_.TryClaim(i)) {
          counters_[LaneSlot(lane)]->faults.fetch_add(1, std::memory_order_relaxed);
          RecordFault(i, lane);
          RequestFetch(i, lane);
        }
        break;
      case PageState::kZero: {
        auto r = ResolveZero(i);
        if (!r.ok()) return r.status();
        break;
      }
      default:
        break;
    }
  }
  return absl::OkStatus();
}

absl::Status PostcopyMemory::WaitPresent(uint64_t first, uint64_t last, absl::Time deadline,
                                         bool through_suspend) {
  uint64_t next = first;  // pages before `next` are known present
  absl::MutexLock l(&mu_);
  waiters_.fetch_add(1, std::memory_order_seq_cst);
  absl::Status result;
  for (;;) {
    while (next <= last && states_.Get(next) == PageState::kPresent) ++next;
    if (next > last) break;
    if (!through_suspend && suspended_.load()) {
      result = absl::UnavailableError(absl::StrFormat(
          "post-copy suspended (source gone): gpa 0x%x still missing", states_.GpaOf(next)));
      break;
    }
    if (cv_.WaitWithDeadline(&mu_, deadline) && absl::Now() >= deadline) {
      while (next <= last && states_.Get(next) == PageState::kPresent) ++next;
      if (next > last) break;
      result = absl::DeadlineExceededError(
          absl::StrFormat("post-copy: gpa 0x%x not received in time", states_.GpaOf(next)));
      break;
    }
  }
  waiters_.fetch_sub(1, std::memory_order_seq_cst);
  return result;
}

absl::Status PostcopyMemory::EnsurePresent(uint64_t gpa, uint64_t len, absl::Duration timeout) {
  if (!started_.load()) return absl::FailedPreconditionError("post-copy not started");
  if (len == 0) return absl::OkStatus();
  if (!mem_->Contains(gpa, len))
    return absl::OutOfRangeError(
        absl::StrFormat("ensure-present [0x%x, +0x%x): not inside guest RAM", gpa, len));
  const uint64_t first = *states_.IndexOf(gpa);
  const uint64_t last = *states_.IndexOf(gpa + len - 1);
  if (absl::Status s = ClaimRange(first, last, kVmmLane); !s.ok()) return s;
  absl::Status s = WaitPresent(first, last, absl::Now() + timeout, /*through_suspend=*/false);
  if (absl::IsDeadlineExceeded(s))
    return absl::DeadlineExceededError(
        absl::StrCat(s.message(), " (waited ", absl::FormatDuration(timeout), ")"));
  return s;
}

absl::Status PostcopyMemory::ResolveVcpuExit(int lane, uint64_t gpa, uint64_t size,
                                             const std::function<bool()>& give_up,
                                             absl::Duration poll) {
  if (!started_.load()) return absl::FailedPreconditionError("post-copy not started");
  // KVM reports the faulting access; it may be unaligned and (in principle) cross a page.
  const uint64_t begin = gpa & ~(kPageSize - 1);
  const uint64_t end = (gpa + std::max<uint64_t>(size, 1) + kPageSize - 1) & ~(kPageSize - 1);
  if (!mem_->Contains(begin, end - begin))
    return absl::OutOfRangeError(absl::StrFormat(
        "userfault exit of vCPU %d at gpa 0x%x (+%d): not guest RAM", lane, gpa, size));
  const uint64_t first = *states_.IndexOf(begin);
  const uint64_t last = *states_.IndexOf(end - 1);
  NoteLaneWaiting(lane, first);
  if (absl::Status s = ClaimRange(first, last, lane); !s.ok()) return s;
  for (;;) {
    absl::Status s = WaitPresent(first, last, absl::Now() + poll, /*through_suspend=*/true);
    if (s.ok()) break;
    if (!absl::IsDeadlineExceeded(s)) return s;
    if (give_up && give_up())
      return absl::CancelledError(absl::StrFormat(
          "vCPU %d stopped while waiting for post-copy page 0x%x", lane, begin));
  }
  // Installing already cleared the bits; a page that was present before the exit (the bit was
  // still set, e.g. a race with the installer) is cleared here.
  if (kvm_bitmap_ != nullptr) kvm_bitmap_->ClearRange(begin, end - begin);
  return absl::OkStatus();
}

void PostcopyMemory::Suspend() {
  suspended_.store(true, std::memory_order_seq_cst);
  absl::MutexLock l(&mu_);
  cv_.SignalAll();
}

void PostcopyMemory::Refetch() {
  // Clear the flag first: a claim made after this point fetches by itself; one made before is
  // kInFlight and found by the scan (possibly both: a duplicate request, which is harmless).
  suspended_.store(false, std::memory_order_seq_cst);
  if (!started_.load()) return;
  for (uint64_t i = 0; i < states_.pages(); ++i) {
    if (states_.Get(i) != PageState::kInFlight) continue;
    uint64_t info = fault_info_[i].load(std::memory_order_relaxed);
    int slot = info ? static_cast<int>((info & 0xffff) - 1) : options_.lanes;
    fetch_(slot >= options_.lanes ? kVmmLane : slot, states_.GpaOf(i));
  }
}

uint64_t PostcopyMemory::SettleZeroPages() {
  uint64_t n = 0;
  for (uint64_t i = 0; i < states_.pages(); ++i) {
    if (!states_.Transition(i, PageState::kZero, PageState::kInstalling)) continue;
    states_.MarkPresent(i);
    if (kvm_bitmap_ != nullptr) kvm_bitmap_->Clear(states_.GpaOf(i));
    ++n;
  }
  return n;
}

absl::Status PostcopyMemory::Finish() {
  absl::MutexLock l(&finish_mu_);
  if (finished_.load()) return absl::OkStatus();
  if (!started_.load()) return absl::FailedPreconditionError("post-copy not started");
  if (!complete())
    return absl::FailedPreconditionError(
        absl::StrCat("post-copy finish: ", missing_pages(), " pages still missing"));
  for (auto& s : shards_)
    for (auto [addr, len] : s->ranges)
      if (absl::Status st = s->uffd.Unregister(addr, len); !st.ok()) return st;
  StopReaders();
  shards_.clear();
  alias_.clear();
  finished_.store(true);
  LOG_INFO("post-copy finished: pulled %d, pushed %d, zeroed %d, duplicates %d", pulled_.load(),
           pushed_.load(), zeroed_.load(), duplicates_.load());
  return absl::OkStatus();
}

PostcopyMemory::Stats PostcopyMemory::stats() const {
  auto lane_stats = [](const LaneCounters& c) {
    LaneStats s;
    s.faults = c.faults.load(std::memory_order_relaxed);
    s.blocked_ms = static_cast<double>(c.blocked_ns.load(std::memory_order_relaxed)) / 1e6;
    uint64_t counts[kBuckets], total = 0;
    for (int b = 0; b < kBuckets; ++b) total += counts[b] = c.hist[b].load(std::memory_order_relaxed);
    if (total == 0) return s;
    auto pct = [&](double q) {
      uint64_t rank = static_cast<uint64_t>(q * static_cast<double>(total - 1)) + 1, seen = 0;
      for (int b = 0; b < kBuckets; ++b)
        if ((seen += counts[b]) >= rank) return BucketMidNs(b) / 1e3;
      return 0.0;
    };
    s.p50_us = pct(0.50);
    s.p99_us = pct(0.99);
    return s;
  };
  Stats st;
  for (int i = 0; i < options_.lanes; ++i) st.lanes.push_back(lane_stats(*counters_[i]));
  st.vmm = lane_stats(*counters_[options_.lanes]);
  st.pulled = pulled_.load();
  st.pushed = pushed_.load();
  st.duplicates = duplicates_.load();
  st.zeroed = zeroed_.load();
  return st;
}

}  // namespace microvmm::migration
