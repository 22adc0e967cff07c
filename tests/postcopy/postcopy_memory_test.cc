// PostcopyMemory end to end on a 64 MiB GuestMemory with the real kernel userfaultfd: threads
// playing vCPUs fault on missing pages, a fake fetcher answers from a "source" buffer on its own
// thread with random delays, and a bulk pusher installs pages concurrently. Both modes.
#include "migration/postcopy/postcopy_memory.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <deque>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "gtest/gtest.h"
#include "vmm/memory/guest_memory.h"

namespace microvmm::migration {
namespace {

using Mode = PostcopyOptions::Mode;
constexpr uint64_t kRam = 64ULL << 20;
constexpr uint64_t kPages = kRam / kPageSize;
constexpr int kLanes = 4;

// Content of page p on the source: never a zero byte, different per page.
uint8_t SourceByte(uint64_t page, uint64_t off) {
  return static_cast<uint8_t>(1 + (page * 7 + off * 13 + (page >> 8)) % 255);
}

// True if any VMA overlapping [p, p+len) carries a userfaultfd flag (um: missing, ui: minor).
bool UffdRegistered(const uint8_t* p, uint64_t len) {
  std::ifstream smaps("/proc/self/smaps");
  std::string line;
  bool overlap = false;
  const uint64_t lo = reinterpret_cast<uint64_t>(p), hi = lo + len;
  while (std::getline(smaps, line)) {
    uint64_t a, b;
    if (sscanf(line.c_str(), "%lx-%lx ", &a, &b) == 2 && line.find('-') < 17) {
      overlap = a < hi && b > lo;
      continue;
    }
    if (overlap && line.rfind("VmFlags:", 0) == 0) {
      std::istringstream in(line.substr(8));
      std::string f;
      while (in >> f)
        if (f == "um" || f == "ui") return true;
    }
  }
  return false;
}

class Harness {
 public:
  explicit Harness(Mode mode, int shards = 0) {
    auto m = GuestMemory::Create(kRam);
    EXPECT_TRUE(m.ok()) << m.status();
    mem = std::move(*m);
    source.resize(kRam);
    for (uint64_t p = 0; p < kPages; ++p)
      for (uint64_t o = 0; o < kPageSize; ++o) source[p * kPageSize + o] = SourceByte(p, o);
    for (auto& t : tids) t = 0;
    fetches.reset(new std::atomic<int>[kPages]);
    installs.reset(new std::atomic<int>[kPages]);
    for (uint64_t p = 0; p < kPages; ++p) fetches[p] = installs[p] = 0;
    PostcopyOptions opt;
    opt.mode = mode;
    opt.lanes = kLanes;
    opt.shards = shards;
    auto pm = PostcopyMemory::Create(
        mem.get(), opt,
        [this](int lane, uint64_t gpa) {
          fetches[gpa / kPageSize]++;
          absl::MutexLock l(&mu);
          requests.push_back({lane, gpa});
        },
        [this](pid_t tid) {
          for (int i = 0; i < kLanes; ++i)
            if (tids[i].load(std::memory_order_relaxed) == tid) return i;
          return 1000;  // unknown thread: PostcopyMemory maps it to kVmmLane
        });
    EXPECT_TRUE(pm.ok()) << pm.status();
    pc = std::move(*pm);
  }
  ~Harness() { StopFetcher(); }

  const uint8_t* Src(uint64_t page) const { return source.data() + page * kPageSize; }

  // Per-region bitmaps from a per-page classifier: 'p' present, 'z' known zero, 'm' missing.
  // Before switchover the guest memory holds source content for present pages and stale
  // garbage for every other page (which must never be seen).
  absl::Status StartWith(const std::vector<char>& kind) {
    std::vector<std::vector<uint64_t>> present(1), zero(1);
    present[0].assign(kPages / 64, 0);
    zero[0].assign(kPages / 64, 0);
    uint8_t* host = mem->regions()[0].host;
    for (uint64_t p = 0; p < kPages; ++p) {
      if (kind[p] == 'p') {
        present[0][p / 64] |= 1ULL << (p % 64);
        memcpy(host + p * kPageSize, Src(p), kPageSize);
      } else {
        if (kind[p] == 'z') zero[0][p / 64] |= 1ULL << (p % 64);
        memset(host + p * kPageSize, kind[p] == 'z' ? 0xDD : 0xEE, kPageSize);
      }
    }
    this->kind = kind;
    return pc->Start(present, zero);
  }

  // Answers fetch requests from `source` on a separate thread after a random 0-200 us delay.
  void StartFetcher(bool delays = true) {
    fetcher = std::thread([this, delays] {
      std::mt19937 rng(7);
      for (;;) {
        std::pair<int, uint64_t> req;
        {
          absl::MutexLock l(&mu);
          auto ready = [this] { return !requests.empty() || stop_fetcher; };
          mu.Await(absl::Condition(&ready));
          if (requests.empty()) return;
          req = requests.front();
          requests.pop_front();
        }
        if (delays) usleep(rng() % 200);
        Answer(req.second);
      }
    });
  }
  void StopFetcher() {
    {
      absl::MutexLock l(&mu);
      stop_fetcher = true;
    }
    if (fetcher.joinable()) fetcher.join();
  }
  void Answer(uint64_t gpa) {
    auto r = pc->Install(gpa, std::span<const uint8_t>(Src(gpa / kPageSize), kPageSize));
    EXPECT_TRUE(r.ok()) << r.status();
    if (r.ok() && *r) installs[gpa / kPageSize]++;
  }
  std::vector<std::pair<int, uint64_t>> TakeRequests() {
    absl::MutexLock l(&mu);
    std::vector<std::pair<int, uint64_t>> out(requests.begin(), requests.end());
    requests.clear();
    return out;
  }
  // Waits (bounded, so a regression fails instead of hanging) until a request is queued.
  bool WaitForRequest() {
    for (int i = 0; i < 10000; ++i) {
      if (PendingRequests() > 0) return true;
      usleep(1000);
    }
    return false;
  }
  size_t PendingRequests() {
    absl::MutexLock l(&mu);
    return requests.size();
  }

  std::unique_ptr<GuestMemory> mem;
  std::vector<uint8_t> source;
  std::unique_ptr<PostcopyMemory> pc;
  std::array<std::atomic<pid_t>, kLanes> tids;
  std::unique_ptr<std::atomic<int>[]> fetches, installs;
  std::vector<char> kind;
  absl::Mutex mu;
  std::deque<std::pair<int, uint64_t>> requests;  // (lane, gpa), guarded by mu
  bool stop_fetcher = false;
  std::thread fetcher;
};

class PostcopyMemoryTest : public ::testing::TestWithParam<Mode> {};

TEST_P(PostcopyMemoryTest, DemandFaultsAndBulkPushInstallEveryPageOnce) {
  Harness h(GetParam());
  ASSERT_EQ(h.pc->mode(), GetParam());
  ASSERT_EQ(h.pc->shards(), 4);
  std::vector<char> kind(kPages);
  uint64_t n_missing = 0, n_zero = 0;
  for (uint64_t p = 0; p < kPages; ++p) {
    kind[p] = p % 7 == 0 ? 'p' : p % 11 == 0 ? 'z' : 'm';
    n_missing += kind[p] == 'm';
    n_zero += kind[p] == 'z';
  }
  ASSERT_TRUE(h.StartWith(kind).ok());
  EXPECT_EQ(h.pc->missing_pages(), n_missing + n_zero);
  EXPECT_TRUE(UffdRegistered(h.mem->regions()[0].host, kRam));
  h.StartFetcher();

  // Bulk push: every missing page, random order, slowly enough that vCPUs fault too.
  std::thread pusher([&] {
    std::vector<uint64_t> order;
    for (uint64_t p = 0; p < kPages; ++p)
      if (kind[p] == 'm') order.push_back(p);
    std::shuffle(order.begin(), order.end(), std::mt19937(3));
    for (size_t i = 0; i < order.size(); ++i) {
      h.Answer(order[i] * kPageSize);
      if (i % 32 == 0) usleep(100);
    }
  });
  // vCPUs: lane i reads its quarter of RAM, page by page, and checks every byte.
  std::atomic<uint64_t> bad{0};
  std::vector<std::thread> vcpus;
  const uint8_t* guest = h.mem->regions()[0].host;
  std::vector<uint8_t> zeros(kPageSize, 0);
  for (int lane = 0; lane < kLanes; ++lane)
    vcpus.emplace_back([&, lane] {
      h.tids[lane] = gettid();
      uint64_t per = kPages / kLanes;
      for (uint64_t p = lane * per; p < (lane + 1) * per; ++p) {
        const uint8_t* want = kind[p] == 'z' ? zeros.data() : h.Src(p);
        if (memcmp(guest + p * kPageSize, want, kPageSize) != 0) bad++;
      }
    });
  for (auto& t : vcpus) t.join();
  pusher.join();
  EXPECT_EQ(bad.load(), 0u);
  // A woken thread may run before its installer has marked the page present (see stats()):
  // give the installers a moment, bounded.
  for (int i = 0; i < 2000 && !h.pc->complete(); ++i) usleep(1000);
  EXPECT_TRUE(h.pc->complete());
  EXPECT_EQ(h.pc->missing_pages(), 0u);

  // Every page installed exactly once; zero and present pages never fetched; every demand
  // request came from the lane whose thread touched that page.
  h.StopFetcher();  // drains: every request gets its answer
  uint64_t fetched = 0;
  for (uint64_t p = 0; p < kPages; ++p) {
    if (kind[p] == 'm') {
      EXPECT_EQ(h.installs[p].load(), 1) << "page " << p;
    } else {
      EXPECT_EQ(h.fetches[p].load(), 0) << "page " << p << " kind " << kind[p];
      EXPECT_EQ(h.installs[p].load(), 0);
    }
    fetched += h.fetches[p];
  }
  PostcopyMemory::Stats st = h.pc->stats();
  EXPECT_EQ(st.pulled + st.pushed, n_missing);
  EXPECT_EQ(st.zeroed, n_zero);  // every zero page was touched by a vCPU and zero-filled locally
  // The pusher sends every missing page and each request is answered: all but n_missing of
  // those Install() calls must have been refused as duplicates.
  EXPECT_EQ(st.duplicates, fetched);
  EXPECT_GT(st.pulled, 0u) << "no page was demand-fetched; the test did not exercise faults";
  uint64_t lane_faults = 0;
  for (const auto& l : st.lanes) lane_faults += l.faults;
  EXPECT_GE(lane_faults, st.pulled);
  EXPECT_EQ(st.vmm.faults, 0u);
  for (int lane = 0; lane < kLanes; ++lane) EXPECT_GT(st.lanes[lane].faults, 0u) << lane;

  ASSERT_TRUE(h.pc->Finish().ok());
  EXPECT_TRUE(h.pc->Finish().ok());  // idempotent
  EXPECT_FALSE(UffdRegistered(h.mem->regions()[0].host, kRam));
  for (uint64_t p = 0; p < kPages; ++p) {
    const uint8_t* want = kind[p] == 'z' ? zeros.data() : h.Src(p);
    ASSERT_EQ(memcmp(guest + p * kPageSize, want, kPageSize), 0) << "page " << p;
  }
  // Installs after the end are duplicates, not errors.
  auto late = h.pc->Install(0, std::span<const uint8_t>(h.Src(0), kPageSize));
  ASSERT_TRUE(late.ok());
  EXPECT_FALSE(*late);
  // After Finish the range is a plain shmem mapping again: a punched page reads as zero at once.
  uint8_t* g = h.mem->regions()[0].host;
  ASSERT_EQ(fallocate(h.mem->regions()[0].memfd.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                      0, kPageSize),
            0);
  EXPECT_EQ(g[10], 0);
}

TEST_P(PostcopyMemoryTest, DemandRequestsCarryTheFaultingLane) {
  Harness h(GetParam());
  ASSERT_TRUE(h.StartWith(std::vector<char>(kPages, 'm')).ok());
  h.StartFetcher();
  std::vector<std::thread> vcpus;
  for (int lane = 0; lane < kLanes; ++lane)
    vcpus.emplace_back([&, lane] {
      h.tids[lane] = gettid();
      // Touch 64 pages spread over this lane's quarter.
      for (uint64_t k = 0; k < 64; ++k) {
        uint64_t p = lane * (kPages / kLanes) + k * 61;
        volatile uint8_t* b = h.mem->regions()[0].host + p * kPageSize;
        EXPECT_EQ(b[1], SourceByte(p, 1));
      }
    });
  for (auto& t : vcpus) t.join();
  // A woken vCPU may run before its installer's bookkeeping (kInstalling -> kPresent) is done:
  // join the fetcher (it drains its queue) before reading the counters.
  h.StopFetcher();
  PostcopyMemory::Stats st = h.pc->stats();
  for (int lane = 0; lane < kLanes; ++lane) {
    EXPECT_EQ(st.lanes[lane].faults, 64u) << lane;
    EXPECT_GT(st.lanes[lane].p50_us, 0.0);
    EXPECT_GE(st.lanes[lane].p99_us, st.lanes[lane].p50_us);
    EXPECT_GT(st.lanes[lane].blocked_ms, 0.0);
  }
  EXPECT_EQ(st.pulled, 256u);
  EXPECT_EQ(st.pushed, 0u);
  EXPECT_EQ(h.pc->missing_pages(), kPages - 256);
  EXPECT_FALSE(h.pc->Finish().ok());  // pages still missing
}

TEST_P(PostcopyMemoryTest, SuspendKeepsFaultingThreadsBlockedUntilRefetch) {
  Harness h(GetParam());
  ASSERT_TRUE(h.StartWith(std::vector<char>(kPages, 'm')).ok());
  const uint8_t* guest = h.mem->regions()[0].host;
  std::atomic<int> a_val{-1}, b_val{-1};
  std::thread a([&] {
    h.tids[0] = gettid();
    a_val = guest[10 * kPageSize + 3];
  });
  ASSERT_TRUE(h.WaitForRequest());  // lane 0 asked for page 10
  h.pc->Suspend();                                // ... and the link drops before the answer
  std::thread b([&] {
    h.tids[1] = gettid();
    b_val = guest[20 * kPageSize + 5];
  });
  usleep(200 * 1000);
  EXPECT_EQ(a_val.load(), -1) << "a faulting thread got a page the source never sent";
  EXPECT_EQ(b_val.load(), -1);
  auto reqs = h.TakeRequests();
  ASSERT_EQ(reqs.size(), 1u);  // no request issued while suspended
  EXPECT_EQ(reqs[0], std::make_pair(0, 10 * kPageSize));
  EXPECT_EQ(h.pc->page_states().Get(20), PageState::kInFlight);  // fault seen, claim kept
  auto ens = h.pc->EnsurePresent(30 * kPageSize, kPageSize, absl::Seconds(5));
  EXPECT_EQ(ens.code(), absl::StatusCode::kUnavailable) << ens;

  h.pc->Refetch();  // link recovered
  reqs = h.TakeRequests();
  std::sort(reqs.begin(), reqs.end());
  ASSERT_EQ(reqs.size(), 3u);  // pages 10 (lane 0), 20 (lane 1), 30 (vmm)
  EXPECT_EQ(reqs[0], std::make_pair(kVmmLane, 30 * kPageSize));
  EXPECT_EQ(reqs[1], std::make_pair(0, 10 * kPageSize));
  EXPECT_EQ(reqs[2], std::make_pair(1, 20 * kPageSize));
  for (auto& r : reqs) h.Answer(r.second);
  a.join();
  b.join();
  EXPECT_EQ(a_val.load(), SourceByte(10, 3));
  EXPECT_EQ(b_val.load(), SourceByte(20, 5));
}

TEST_P(PostcopyMemoryTest, EnsurePresentFromNonLaneThread) {
  Harness h(GetParam());
  std::vector<char> kind(kPages, 'm');
  kind[101] = 'z';
  kind[102] = 'p';
  ASSERT_TRUE(h.StartWith(kind).ok());
  h.StartFetcher();
  absl::Status s;
  std::thread dev([&] {  // device emulation thread: not a vCPU
    s = h.pc->EnsurePresent(100 * kPageSize + 100, 5 * kPageSize, absl::Seconds(10));
  });
  dev.join();
  ASSERT_TRUE(s.ok()) << s;
  for (uint64_t p = 100; p <= 105; ++p) {
    EXPECT_EQ(h.pc->page_states().Get(p), PageState::kPresent) << p;
    EXPECT_EQ(h.fetches[p].load(), kind[p] == 'm' ? 1 : 0) << p;
  }
  h.StopFetcher();
  // Fetched pages went on the VMM lane; the known-zero page was never fetched and reads zero.
  PostcopyMemory::Stats st = h.pc->stats();
  EXPECT_EQ(st.vmm.faults, 4u);
  EXPECT_EQ(st.pulled, 4u);
  EXPECT_EQ(st.zeroed, 1u);
  std::vector<uint8_t> buf(kPageSize);
  ASSERT_TRUE(h.mem->Read(101 * kPageSize, buf.data(), kPageSize).ok());
  EXPECT_EQ(buf, std::vector<uint8_t>(kPageSize, 0));
  ASSERT_TRUE(h.mem->Read(103 * kPageSize, buf.data(), kPageSize).ok());
  EXPECT_EQ(memcmp(buf.data(), h.Src(103), kPageSize), 0);
  // Nobody answers now: bounded wait.
  auto t = h.pc->EnsurePresent(200 * kPageSize, kPageSize, absl::Milliseconds(50));
  EXPECT_EQ(t.code(), absl::StatusCode::kDeadlineExceeded) << t;
  EXPECT_EQ(h.pc->EnsurePresent(kRam, kPageSize, absl::Seconds(1)).code(),
            absl::StatusCode::kOutOfRange);
}

TEST_P(PostcopyMemoryTest, VmmWriteToMissingPageBlocksUntilInstalled) {
  Harness h(GetParam());
  ASSERT_TRUE(h.StartWith(std::vector<char>(kPages, 'm')).ok());
  const uint64_t gpa = 500 * kPageSize + 64;
  const char msg[] = "device DMA data";
  std::atomic<bool> done{false};
  std::thread dev([&] {
    ASSERT_TRUE(h.mem->Write(gpa, msg, sizeof(msg)).ok());
    done = true;
  });
  ASSERT_TRUE(h.WaitForRequest());
  usleep(50 * 1000);
  EXPECT_FALSE(done.load());  // blocked on the missing page
  auto reqs = h.TakeRequests();
  ASSERT_EQ(reqs.size(), 1u);
  EXPECT_EQ(reqs[0], std::make_pair(kVmmLane, 500 * kPageSize));
  h.Answer(reqs[0].second);
  dev.join();
  std::vector<uint8_t> page(kPageSize);
  ASSERT_TRUE(h.mem->Read(500 * kPageSize, page.data(), kPageSize).ok());
  std::vector<uint8_t> want(h.Src(500), h.Src(500) + kPageSize);
  memcpy(want.data() + 64, msg, sizeof(msg));
  EXPECT_EQ(page, want);  // the source content arrived first, the VMM write landed on top
  EXPECT_TRUE(h.mem->TestDirty(gpa));
  EXPECT_EQ(h.pc->stats().vmm.faults, 1u);
}

TEST_P(PostcopyMemoryTest, InstallValidatesAndCountsDuplicates) {
  Harness h(GetParam(), /*shards=*/2);
  std::vector<uint8_t> page(kPageSize, 0x42);
  EXPECT_EQ(h.pc->Install(0, page).status().code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(h.StartWith(std::vector<char>(kPages, 'm')).ok());
  EXPECT_EQ(h.pc->Install(1, page).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(h.pc->Install(kRam, page).status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_EQ(h.pc->Install(0, std::span<const uint8_t>(page.data(), 100)).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto r = h.pc->Install(3 * kPageSize, page);
  ASSERT_TRUE(r.ok() && *r);
  r = h.pc->Install(3 * kPageSize, std::vector<uint8_t>(kPageSize, 0x55));
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(*r);  // never overwrites a present page
  r = h.pc->InstallZero(3 * kPageSize);
  ASSERT_TRUE(r.ok());
  EXPECT_FALSE(*r);
  r = h.pc->InstallZero(4 * kPageSize);
  ASSERT_TRUE(r.ok() && *r);
  const uint8_t* guest = h.mem->regions()[0].host;
  EXPECT_EQ(guest[3 * kPageSize + 9], 0x42);
  EXPECT_EQ(guest[4 * kPageSize + 9], 0);
  auto st = h.pc->stats();
  EXPECT_EQ(st.pushed, 2u);
  EXPECT_EQ(st.duplicates, 2u);
  EXPECT_EQ(h.pc->missing_pages(), kPages - 2);
  // Bad bitmaps are rejected, and Start only runs once.
  EXPECT_FALSE(h.pc->Start({}, {}).ok());
}

TEST_P(PostcopyMemoryTest, BadStartBitmapsAreRejected) {
  Harness h(GetParam());
  std::vector<std::vector<uint64_t>> short_bm(1, std::vector<uint64_t>(3, 0));
  EXPECT_EQ(h.pc->Start(short_bm, {}).code(), absl::StatusCode::kInvalidArgument);
}

TEST_P(PostcopyMemoryTest, ConcurrentFaultsOnOnePageFetchItOnce) {
  Harness h(GetParam());
  ASSERT_TRUE(h.StartWith(std::vector<char>(kPages, 'm')).ok());
  h.StartFetcher();
  std::atomic<uint64_t> bad{0};
  std::vector<std::thread> vcpus;
  for (int lane = 0; lane < kLanes; ++lane)
    vcpus.emplace_back([&, lane] {
      h.tids[lane] = gettid();
      for (uint64_t p = 1000; p < 1256; ++p)  // every lane touches the same pages
        if (h.mem->regions()[0].host[p * kPageSize + lane] != SourceByte(p, lane)) bad++;
    });
  for (auto& t : vcpus) t.join();
  h.StopFetcher();
  EXPECT_EQ(bad.load(), 0u);
  for (uint64_t p = 1000; p < 1256; ++p) {
    EXPECT_EQ(h.fetches[p].load(), 1) << p;
    EXPECT_EQ(h.installs[p].load(), 1) << p;
  }
  EXPECT_EQ(h.pc->stats().duplicates, 0u);
}

TEST_P(PostcopyMemoryTest, PresentPagesDoNotFault) {
  // MISSING mode: present pages are in the page cache, so no MISSING fault. MINOR mode: Start()
  // maps them into the guest mapping before registering, so no MINOR fault either.
  Harness h(GetParam());
  std::vector<char> kind(kPages, 'm');
  for (uint64_t p = 0; p < 64; ++p) kind[p] = 'p';
  ASSERT_TRUE(h.StartWith(kind).ok());
  std::thread t([&] {
    h.tids[0] = gettid();
    for (uint64_t p = 0; p < 64; ++p)
      EXPECT_EQ(h.mem->regions()[0].host[p * kPageSize + 9], SourceByte(p, 9));
  });
  t.join();
  EXPECT_EQ(h.pc->stats().lanes[0].faults, 0u);
  EXPECT_EQ(h.PendingRequests(), 0u);
}

TEST_P(PostcopyMemoryTest, DiscardedPresentPageFaultsBackAsZero) {
  // A page that was present and then discarded (balloon: hole punched in the memfd) takes a
  // MISSING fault; its content is legitimately zero and it must not be fetched or hang.
  Harness h(GetParam());
  std::vector<char> kind(kPages, 'm');
  kind[7] = 'p';
  ASSERT_TRUE(h.StartWith(kind).ok());
  ASSERT_TRUE(h.mem->Discard(7 * kPageSize, kPageSize).ok());
  int v = -1;
  std::thread t([&] { v = h.mem->regions()[0].host[7 * kPageSize + 1]; });
  t.join();
  EXPECT_EQ(v, 0);
  EXPECT_EQ(h.PendingRequests(), 0u);
}

TEST_P(PostcopyMemoryTest, SettledZeroPagesCompleteAndReadZeroWithoutFetching) {
  // After the source pushed everything, pages still known-zero need nothing from it: settling
  // them completes the post-copy; a touch before Finish() gets zeros, after Finish() too.
  Harness h(GetParam());
  std::vector<char> kind(kPages, 'z');
  kind[3] = 'p';
  kind[5] = 'm';
  ASSERT_TRUE(h.StartWith(kind).ok());
  EXPECT_FALSE(h.pc->complete());
  h.Answer(5 * kPageSize);  // the pushed page
  EXPECT_FALSE(h.pc->complete()) << "known-zero pages are not present before settling";
  EXPECT_FALSE(h.pc->Finish().ok());
  EXPECT_EQ(h.pc->SettleZeroPages(), kPages - 2);
  EXPECT_TRUE(h.pc->complete());
  int before = -1;
  std::thread t([&] { before = h.mem->regions()[0].host[9 * kPageSize + 100]; });
  t.join();
  EXPECT_EQ(before, 0);
  ASSERT_TRUE(h.pc->Finish().ok());
  EXPECT_EQ(h.mem->regions()[0].host[11 * kPageSize + 5], 0);
  EXPECT_EQ(h.mem->regions()[0].host[5 * kPageSize + 9], SourceByte(5, 9));
  EXPECT_EQ(h.PendingRequests(), 0u) << "a known-zero page was fetched";
}

// ---- Exit-driven path (KVM Userfault): the bitmap KVM would read, and the vCPU-thread fetch.
// No KVM needed: the bitmap is plain memory and ResolveVcpuExit is what the vCPU's
// KVM_EXIT_MEMORY_FAULT handler calls (tests/postcopy/exit_driven_test drives it from the real
// vCPU loop).

// One bitmap slot over the harness's single region.
std::unique_ptr<KvmUserfaultBitmap> AttachBitmap(Harness& h) {
  auto bm = std::make_unique<KvmUserfaultBitmap>();
  const auto& r = h.mem->regions()[0];
  auto slot = bm->AddSlot(0, r.gpa, r.size, /*all_missing=*/false);
  EXPECT_TRUE(slot.ok()) << slot.status();
  h.pc->AttachKvmUserfault(bm.get());
  return bm;
}

TEST_P(PostcopyMemoryTest, KvmUserfaultBitmapFollowsPageStates) {
  Harness h(GetParam());
  auto bm = AttachBitmap(h);
  std::vector<char> kind(kPages, 'm');
  for (uint64_t p = 0; p < kPages; p += 3) kind[p] = 'p';
  for (uint64_t p = 1; p < kPages; p += 7) kind[p] = 'z';
  ASSERT_TRUE(h.StartWith(kind).ok());
  const uint64_t base = h.mem->regions()[0].gpa;
  uint64_t missing = 0;
  for (uint64_t p = 0; p < kPages; ++p) {
    ASSERT_EQ(bm->Test(base + p * kPageSize), kind[p] != 'p') << "page " << p;
    missing += kind[p] != 'p';
  }
  EXPECT_EQ(bm->CountMissing(), missing);
  // Every install path clears the page's bit: push/demand answers, then settled zero pages.
  for (uint64_t p = 0; p < kPages; ++p)
    if (kind[p] == 'm') h.Answer(base + p * kPageSize);
  for (uint64_t p = 0; p < kPages; ++p)
    ASSERT_EQ(bm->Test(base + p * kPageSize), kind[p] == 'z') << "page " << p;
  h.pc->SettleZeroPages();
  EXPECT_EQ(bm->CountMissing(), 0u);
  EXPECT_TRUE(h.pc->Finish().ok());
}

TEST_P(PostcopyMemoryTest, VcpuExitFetchesOnItsOwnLaneAndWaitsForThePage) {
  Harness h(GetParam());
  auto bm = AttachBitmap(h);
  std::vector<char> kind(kPages, 'm');
  kind[41] = 'z';
  ASSERT_TRUE(h.StartWith(kind).ok());
  const uint64_t base = h.mem->regions()[0].gpa;
  h.StartFetcher();
  // An unaligned 8-byte access straddling pages 20 and 21, as KVM may report it, on vCPU 2.
  ASSERT_TRUE(h.pc->ResolveVcpuExit(2, base + 21 * kPageSize - 4, 8, [] { return false; }).ok());
  EXPECT_FALSE(bm->Test(base + 20 * kPageSize));
  EXPECT_FALSE(bm->Test(base + 21 * kPageSize));
  EXPECT_EQ(h.mem->regions()[0].host[20 * kPageSize + 7], SourceByte(20, 7));
  EXPECT_EQ(h.mem->regions()[0].host[21 * kPageSize + 3], SourceByte(21, 3));
  EXPECT_EQ(h.fetches[20].load(), 1);
  EXPECT_EQ(h.fetches[21].load(), 1);
  // A known-zero page is resolved locally, nothing is fetched.
  ASSERT_TRUE(h.pc->ResolveVcpuExit(1, base + 41 * kPageSize, 4, [] { return false; }).ok());
  EXPECT_FALSE(bm->Test(base + 41 * kPageSize));
  EXPECT_EQ(h.fetches[41].load(), 0);
  h.StopFetcher();
  // The requests went out on the faulting vCPU's lane.
  PostcopyMemory::Stats st = h.pc->stats();
  ASSERT_GE(st.lanes.size(), 3u);
  EXPECT_EQ(st.lanes[2].faults, 2u);
  EXPECT_EQ(st.lanes[0].faults + st.lanes[1].faults + st.vmm.faults, 0u);
  // Outside guest RAM: an error (the vCPU stops), not a hang.
  EXPECT_EQ(h.pc->ResolveVcpuExit(0, base + kRam + kPageSize, 4, [] { return false; }).code(),
            absl::StatusCode::kOutOfRange);
}

TEST_P(PostcopyMemoryTest, VcpuExitWaitsThroughSuspensionAndNeverGetsZeros) {
  // Source gone: the vCPU keeps waiting (no zero page, no error) until recovery brings the page;
  // it gives up only when told to (the VM is stopping).
  Harness h(GetParam());
  auto bm = AttachBitmap(h);
  ASSERT_TRUE(h.StartWith(std::vector<char>(kPages, 'm')).ok());
  const uint64_t base = h.mem->regions()[0].gpa;
  h.pc->Suspend();
  std::atomic<bool> done{false};
  absl::Status result;
  std::thread vcpu([&] {
    result = h.pc->ResolveVcpuExit(1, base + 7 * kPageSize, 4, [] { return false; },
                                   absl::Milliseconds(5));
    done = true;
  });
  // Many poll periods pass while suspended: still waiting, nothing requested.
  for (int i = 0; i < 40 && !done; ++i) usleep(5000);
  EXPECT_FALSE(done.load()) << result;
  EXPECT_EQ(h.PendingRequests(), 0u);
  h.pc->Refetch();  // recovery: re-requests in-flight pages on the lane that faulted them
  ASSERT_TRUE(h.WaitForRequest());
  auto reqs = h.TakeRequests();
  ASSERT_EQ(reqs.size(), 1u);
  EXPECT_EQ(reqs[0].first, 1);
  EXPECT_EQ(reqs[0].second, base + 7 * kPageSize);
  h.Answer(reqs[0].second);
  vcpu.join();
  EXPECT_TRUE(result.ok()) << result;
  EXPECT_EQ(h.mem->regions()[0].host[7 * kPageSize], SourceByte(7, 0));
  EXPECT_FALSE(bm->Test(base + 7 * kPageSize));

  // A stop request ends the wait with CANCELLED and leaves the page missing.
  h.pc->Suspend();
  std::atomic<bool> stop{false};
  std::thread vcpu2([&] {
    result = h.pc->ResolveVcpuExit(0, base + 9 * kPageSize, 4, [&] { return stop.load(); },
                                   absl::Milliseconds(5));
  });
  stop = true;
  vcpu2.join();
  EXPECT_EQ(result.code(), absl::StatusCode::kCancelled) << result;
  EXPECT_TRUE(bm->Test(base + 9 * kPageSize));
}

INSTANTIATE_TEST_SUITE_P(Modes, PostcopyMemoryTest,
                         ::testing::Values(Mode::kMinor, Mode::kMissing),
                         [](const auto& info) {
                           return info.param == Mode::kMinor ? "Minor" : "Missing";
                         });

}  // namespace
}  // namespace microvmm::migration
