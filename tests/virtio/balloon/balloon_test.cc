// Tests of the virtio-balloon device (devices/virtio/balloon) driven like a guest driver through
// the split-ring test driver: inflate/deflate (memfd holes, dirty bits, out-of-range PFNs), target
// and config space, the stats buffer protocol, free page reporting and hinting (cmd ids, stale
// hints), queue numbering, quiesce and save/restore. No KVM.
#include "devices/virtio/balloon/balloon.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "devices/virtio/balloon/free_page_hints.h"
#include "gtest/gtest.h"
#include "tests/virtio/virtq_driver.h"
#include "vmm/event_loop.h"
#include "vmm/memory/guest_memory.h"

namespace microvmm::virtio {
namespace {

using testing::Seg;
using testing::TestDriver;

constexpr uint64_t kMiB = 1ULL << 20;
constexpr uint64_t kRam = 16 * kMiB;
constexpr uint64_t kVersion1 = 1ULL << kFeatureVersion1;
constexpr uint64_t kStatsF = 1ULL << kBalloonFStatsVq;
constexpr uint64_t kHintF = 1ULL << kBalloonFFreePageHint;
constexpr uint64_t kReportF = 1ULL << kBalloonFReporting;
constexpr uint64_t kScratch = 1 * kMiB;  // PFN arrays, stats buffers, command ids
constexpr uint64_t kData = 4 * kMiB;     // pages the tests inflate / report / hint

// Guest RAM, a balloon, one Virtqueue per exposed queue and a test driver for each queue the
// "guest" enables; records queue signals and config-change interrupts.
struct Rig {
  std::unique_ptr<GuestMemory> mem;
  std::unique_ptr<VirtioBalloon> dev;
  std::vector<std::unique_ptr<Virtqueue>> qs;
  std::map<int, std::unique_ptr<TestDriver>> drv;
  uint64_t features = 0;
  std::mutex mu;
  std::vector<uint16_t> signals;
  std::atomic<int> config_changes{0};

  Rig(const VirtioBalloonOptions& opt, uint64_t guest_bits, std::vector<int> enabled,
      EventLoop* loop = nullptr) {
    auto m = GuestMemory::Create(kRam);
    if (!m.ok()) {
      ADD_FAILURE() << m.status();
      return;
    }
    mem = std::move(*m);
    auto d = VirtioBalloon::Create(mem.get(), loop, opt);
    if (!d.ok()) {
      ADD_FAILURE() << d.status();
      return;
    }
    dev = std::move(*d);
    dev->set_config_changed_callback([this] { config_changes++; });
    features = kVersion1 | guest_bits;
    EXPECT_EQ(features & ~dev->device_features(), 0u) << "guest asks for features not offered";
    std::vector<uint32_t> sizes = dev->queue_max_sizes();
    for (size_t i = 0; i < sizes.size(); ++i)
      qs.push_back(std::make_unique<Virtqueue>(mem.get(), static_cast<uint16_t>(i), sizes[i]));
    for (int e : enabled) {
      drv[e] = std::make_unique<TestDriver>(mem.get(), 256, 0x10000 + 0x8000ULL * e);
      EXPECT_TRUE(drv[e]->Configure(*qs[e], features).ok());
    }
    EXPECT_TRUE(Activate(*dev).ok());
  }

  absl::Status Activate(VirtioBalloon& d) {
    std::vector<Virtqueue*> ptrs;
    for (auto& q : qs) ptrs.push_back(q.get());
    return d.Activate(features, ptrs, [this](uint16_t i) {
      std::lock_guard<std::mutex> l(mu);
      signals.push_back(i);
    });
  }
  int SignalCount(uint16_t q) {
    std::lock_guard<std::mutex> l(mu);
    int n = 0;
    for (uint16_t s : signals) n += s == q;
    return n;
  }

  TestDriver& D(VirtioBalloon::Role role) { return *drv.at(dev->queue_index(role)); }
  uint16_t Q(VirtioBalloon::Role role) { return static_cast<uint16_t>(dev->queue_index(role)); }

  // The guest sends `pfns` on inflateq/deflateq; returns the head.
  uint16_t SendPfns(VirtioBalloon::Role role, const std::vector<uint32_t>& pfns,
                    uint64_t at = kScratch) {
    EXPECT_TRUE(mem->Write(at, pfns.data(), 4 * pfns.size()).ok());
    uint16_t head = D(role).AddChain({{at, static_cast<uint32_t>(4 * pfns.size()), false}});
    dev->ProcessQueue(Q(role));
    return head;
  }

  void Fill(uint64_t gpa, uint64_t len, uint8_t seed) {
    std::vector<uint8_t> v(len);
    for (size_t i = 0; i < len; ++i) v[i] = static_cast<uint8_t>(seed + i * 13 + 1);
    ASSERT_TRUE(mem->Write(gpa, v.data(), len).ok());
  }
  bool AllZero(uint64_t gpa, uint64_t len) {
    std::vector<uint8_t> v(len);
    EXPECT_TRUE(mem->Read(gpa, v.data(), len).ok());
    for (uint8_t b : v)
      if (b != 0) return false;
    return true;
  }
  // Is the memfd page at `gpa` a hole (its memory released)?
  bool IsHole(uint64_t gpa) {
    int fd = mem->regions()[0].memfd.get();
    off_t r = ::lseek(fd, static_cast<off_t>(gpa), SEEK_DATA);
    if (r < 0) return errno == ENXIO;  // no data at or after gpa
    return static_cast<uint64_t>(r) >= gpa + kPageSize;
  }
  int64_t Blocks() {
    struct stat st;
    EXPECT_EQ(::fstat(mem->regions()[0].memfd.get(), &st), 0);
    return st.st_blocks;
  }
};

VirtioBalloonOptions AllOptions() {
  VirtioBalloonOptions o;
  o.deflate_on_oom = true;
  o.free_page_reporting = true;
  o.free_page_hinting = true;
  return o;
}

uint32_t Pfn(uint64_t gpa) { return static_cast<uint32_t>(gpa / kPageSize); }

TEST(BalloonTest, FeaturesAndQueuesFollowOptions) {
  auto mem = GuestMemory::Create(kRam);
  ASSERT_TRUE(mem.ok());
  auto plain = VirtioBalloon::Create(mem->get(), nullptr, {});
  ASSERT_TRUE(plain.ok());
  EXPECT_EQ((*plain)->device_type(), 5);
  EXPECT_EQ((*plain)->device_features() & 0xff, kStatsF);
  EXPECT_EQ((*plain)->queue_max_sizes().size(), 3u);
  EXPECT_FALSE((*plain)->StartFreePageHinting(nullptr).ok());

  auto all = VirtioBalloon::Create(mem->get(), nullptr, AllOptions());
  ASSERT_TRUE(all.ok());
  EXPECT_EQ((*all)->device_features() & 0xff,
            kStatsF | (1u << kBalloonFDeflateOnOom) | kHintF | kReportF);
  EXPECT_EQ((*all)->queue_max_sizes().size(), 5u);
  EXPECT_EQ((*all)->config_size(), 16u);

  VirtioBalloonOptions timed;
  timed.stats_interval_s = 1;
  EXPECT_FALSE(VirtioBalloon::Create(mem->get(), nullptr, timed).ok()) << "needs an EventLoop";
}

TEST(BalloonTest, InflateReleasesMemoryAndMarksDirty) {
  Rig r({}, kStatsF, {0, 1, 2});
  ASSERT_NE(r.dev, nullptr);
  // Pattern into 9 pages (8 contiguous + 1 apart) plus a neighbour that must survive.
  r.Fill(kData, 8 * kPageSize, 7);
  r.Fill(kData + 16 * kPageSize, kPageSize, 9);
  r.Fill(kData + 12 * kPageSize, kPageSize, 3);
  for (int i = 0; i < 8; ++i) ASSERT_FALSE(r.IsHole(kData + i * kPageSize));
  r.Fill(kScratch, kPageSize, 0);  // the PFN array's page, allocated before measuring
  int64_t blocks_before = r.Blocks();
  (void)r.mem->TakeDirty(0);

  std::vector<uint32_t> pfns;
  for (int i = 0; i < 8; ++i) pfns.push_back(Pfn(kData) + i);
  pfns.push_back(Pfn(kData) + 12);  // a lone page
  uint16_t head = r.SendPfns(VirtioBalloon::kInflate, pfns);

  auto used = r.D(VirtioBalloon::kInflate).GetUsed();
  ASSERT_TRUE(used.has_value());
  EXPECT_EQ(used->id, head);
  EXPECT_EQ(used->len, 0u);
  EXPECT_EQ(r.SignalCount(0), 1);
  EXPECT_EQ(r.dev->inflated_pages(), 9u);
  // Memory released (checked before reading: a read of a shmem hole allocates a page again).
  EXPECT_LE(r.Blocks(), blocks_before - 9 * static_cast<int64_t>(kPageSize / 512));
  for (uint32_t pfn : pfns) EXPECT_TRUE(r.IsHole(uint64_t{pfn} * kPageSize)) << pfn;
  for (uint32_t pfn : pfns) {
    uint64_t gpa = uint64_t{pfn} * kPageSize;
    EXPECT_TRUE(r.AllZero(gpa, kPageSize)) << std::hex << gpa;
    EXPECT_TRUE(r.mem->TestDirty(gpa)) << std::hex << gpa;
    EXPECT_TRUE(r.dev->IsInflated(gpa));
  }
  // Pages not inflated keep their data and are neither released nor dirtied.
  EXPECT_FALSE(r.IsHole(kData + 16 * kPageSize));
  EXPECT_FALSE(r.AllZero(kData + 16 * kPageSize, kPageSize));
  EXPECT_FALSE(r.mem->TestDirty(kData + 16 * kPageSize));
  EXPECT_FALSE(r.dev->IsInflated(kData + 16 * kPageSize));

  // Deflate two of them: they leave the set and stay usable (zero-filled on touch).
  r.SendPfns(VirtioBalloon::kDeflate, {pfns[0], pfns[8]});
  ASSERT_TRUE(r.D(VirtioBalloon::kDeflate).GetUsed().has_value());
  EXPECT_EQ(r.SignalCount(1), 1);
  EXPECT_EQ(r.dev->inflated_pages(), 7u);
  EXPECT_FALSE(r.dev->IsInflated(kData));
  EXPECT_TRUE(r.dev->IsInflated(kData + kPageSize));
  r.Fill(kData, kPageSize, 1);
  EXPECT_FALSE(r.AllZero(kData, kPageSize));
  // Inflating a page twice does not count it twice.
  r.SendPfns(VirtioBalloon::kInflate, {pfns[1]});
  EXPECT_EQ(r.dev->inflated_pages(), 7u);
  EXPECT_EQ(r.dev->ignored_pfns(), 0u);
}

TEST(BalloonTest, OutOfRangeAndMalformedPfnsAreIgnored) {
  Rig r({}, kStatsF, {0, 1, 2});
  ASSERT_NE(r.dev, nullptr);
  r.Fill(kRam - kPageSize, kPageSize, 5);
  // Past the end of RAM, the largest PFN, inside the 32-bit MMIO gap, and one valid page.
  r.SendPfns(VirtioBalloon::kInflate,
             {Pfn(kRam), 0xffffffffu, Pfn(kMmioGapStart), Pfn(kRam - kPageSize)});
  ASSERT_TRUE(r.D(VirtioBalloon::kInflate).GetUsed().has_value());
  EXPECT_EQ(r.dev->ignored_pfns(), 3u);
  EXPECT_EQ(r.dev->inflated_pages(), 1u);
  EXPECT_TRUE(r.AllZero(kRam - kPageSize, kPageSize));

  // 6 bytes: one PFN and a stray half; a device-writable buffer only; an empty-ish chain.
  uint32_t pfn = Pfn(kData);
  ASSERT_TRUE(r.mem->Write(kScratch, &pfn, 4).ok());
  r.D(VirtioBalloon::kInflate).AddChain({{kScratch, 6, false}});
  r.D(VirtioBalloon::kInflate).AddChain({{kScratch, 64, true}});
  r.dev->ProcessQueue(0);
  EXPECT_TRUE(r.D(VirtioBalloon::kInflate).GetUsed().has_value());
  EXPECT_TRUE(r.D(VirtioBalloon::kInflate).GetUsed().has_value());
  EXPECT_EQ(r.dev->inflated_pages(), 2u);
  EXPECT_FALSE(r.qs[0]->in_error());
  // Deflating garbage is harmless too.
  r.SendPfns(VirtioBalloon::kDeflate, {0xfffffff0u, Pfn(kData + kPageSize)});
  EXPECT_EQ(r.dev->ignored_pfns(), 4u);
  EXPECT_EQ(r.dev->inflated_pages(), 2u);
  // Queue indices that do not exist are ignored.
  r.dev->ProcessQueue(7);
}

TEST(BalloonTest, TargetAndConfigSpace) {
  VirtioBalloonOptions opt;
  opt.initial_target_bytes = 8 * kMiB;
  Rig r(opt, kStatsF, {0, 1, 2});
  ASSERT_NE(r.dev, nullptr);
  auto read32 = [&](uint64_t off) {
    uint8_t b[4];
    r.dev->ReadConfig(off, b);
    uint32_t v;
    std::memcpy(&v, b, 4);
    return v;
  };
  EXPECT_EQ(read32(0), 8 * kMiB / kPageSize);
  EXPECT_EQ(r.config_changes.load(), 0);

  r.dev->SetTarget(64 * kMiB + 100);
  EXPECT_EQ(r.config_changes.load(), 1);
  EXPECT_EQ(read32(0), 64 * kMiB / kPageSize);
  EXPECT_EQ(r.dev->target_bytes(), 64 * kMiB);
  r.dev->SetTarget(uint64_t{1} << 60);  // capped at 2^32 - 1 pages
  EXPECT_EQ(read32(0), 0xffffffffu);
  EXPECT_EQ(r.config_changes.load(), 2);

  // The guest reports `actual`; num_pages and cmd_id are read-only for it.
  uint32_t actual = 1234;
  r.dev->WriteConfig(4, std::span<const uint8_t>(reinterpret_cast<uint8_t*>(&actual), 4));
  EXPECT_EQ(r.dev->actual_bytes(), 1234 * kPageSize);
  uint8_t junk[8] = {1, 2, 3, 4, 5, 6, 7, 8};
  r.dev->WriteConfig(0, std::span<const uint8_t>(junk, 4));
  r.dev->WriteConfig(8, std::span<const uint8_t>(junk, 4));
  EXPECT_EQ(read32(0), 0xffffffffu);
  EXPECT_EQ(read32(8), kBalloonCmdIdStop);
  // Byte-wise update of actual; reads past the config space return zeros.
  uint8_t one = 0x01;
  r.dev->WriteConfig(5, std::span<const uint8_t>(&one, 1));
  EXPECT_EQ(read32(4), (1234u & ~0xff00u) | 0x100u);
  uint8_t tail[8];
  std::memset(tail, 0xaa, sizeof(tail));
  r.dev->ReadConfig(12, tail);
  for (int i = 4; i < 8; ++i) EXPECT_EQ(tail[i], 0);
}

// Writes a stats buffer: entries (tag, value) packed as struct virtio_balloon_stat.
void WriteStats(GuestMemory& mem, uint64_t gpa,
                const std::vector<std::pair<uint16_t, uint64_t>>& entries) {
  std::vector<uint8_t> buf(10 * entries.size());
  for (size_t i = 0; i < entries.size(); ++i) {
    std::memcpy(&buf[10 * i], &entries[i].first, 2);
    std::memcpy(&buf[10 * i + 2], &entries[i].second, 8);
  }
  ASSERT_TRUE(mem.Write(gpa, buf.data(), buf.size()).ok());
}

TEST(BalloonTest, StatsRoundTrip) {
  Rig r({}, kStatsF, {0, 1, 2});
  ASSERT_NE(r.dev, nullptr);
  EXPECT_FALSE(r.dev->GetStats().has_value());
  EXPECT_FALSE(r.dev->RequestStats()) << "no buffer yet";

  // The driver's initial buffer already carries statistics; the device keeps it.
  WriteStats(*r.mem, kScratch, {{4, 1000}, {5, 5000}, {99, 7}, {1, 3}});
  uint16_t head = r.D(VirtioBalloon::kStats).AddChain({{kScratch, 40, false}});
  r.dev->ProcessQueue(2);
  EXPECT_EQ(r.D(VirtioBalloon::kStats).UsedIdx(), 0) << "the stats buffer must be held";
  auto s = r.dev->GetStats();
  ASSERT_TRUE(s.has_value());
  EXPECT_EQ(s->free_memory, 1000u);
  EXPECT_EQ(s->total_memory, 5000u);
  EXPECT_EQ(s->swap_out, 3u);
  EXPECT_FALSE(s->swap_in.has_value());
  EXPECT_FALSE(s->available_memory.has_value());
  absl::Time first = s->timestamp;

  // A request returns the buffer (used length 0) and signals the stats queue.
  EXPECT_TRUE(r.dev->RequestStats());
  auto used = r.D(VirtioBalloon::kStats).GetUsed();
  ASSERT_TRUE(used.has_value());
  EXPECT_EQ(used->id, head);
  EXPECT_EQ(used->len, 0u);
  EXPECT_EQ(r.SignalCount(2), 1);
  EXPECT_FALSE(r.dev->RequestStats()) << "the guest has not refilled it yet";

  // The guest refills and re-adds it.
  WriteStats(*r.mem, kScratch, {{4, 2000}, {6, 3000}, {15, 42}});
  r.D(VirtioBalloon::kStats).AddChain({{kScratch, 30, false}});
  r.dev->ProcessQueue(2);
  s = r.dev->GetStats();
  ASSERT_TRUE(s.has_value());
  EXPECT_EQ(s->free_memory, 2000u);
  EXPECT_EQ(s->available_memory, 3000u);
  EXPECT_EQ(s->direct_reclaims, 42u);
  EXPECT_FALSE(s->total_memory.has_value()) << "values are per report, not merged";
  EXPECT_GE(s->timestamp, first);
  EXPECT_TRUE(r.dev->RequestStats());
}

TEST(BalloonTest, StatsTimerRequestsPeriodically) {
  auto loop = EventLoop::Create("balloon-test");
  ASSERT_TRUE(loop.ok());
  VirtioBalloonOptions opt;
  opt.stats_interval_s = 1;
  Rig r(opt, kStatsF, {0, 1, 2}, loop->get());
  ASSERT_NE(r.dev, nullptr);
  WriteStats(*r.mem, kScratch, {{4, 1}});
  r.D(VirtioBalloon::kStats).AddChain({{kScratch, 10, false}});
  r.dev->ProcessQueue(2);
  // Not a timing assertion: wait (generously) for the first tick to return the buffer.
  for (int i = 0; i < 200 && r.SignalCount(2) == 0; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  EXPECT_EQ(r.SignalCount(2), 1);
  EXPECT_TRUE(r.D(VirtioBalloon::kStats).GetUsed().has_value());
  r.dev.reset();  // unregisters the timer while the loop runs
}

TEST(BalloonTest, FreePageReportingDiscardsRanges) {
  VirtioBalloonOptions opt;
  opt.free_page_reporting = true;
  Rig r(opt, kStatsF | kReportF, {0, 1, 2, 4});
  ASSERT_NE(r.dev, nullptr);
  ASSERT_EQ(r.dev->queue_index(VirtioBalloon::kReporting), 4);
  r.Fill(kData, 2 * kMiB, 3);
  (void)r.mem->TakeDirty(0);
  // Linux reports page blocks as device-writable buffers; a misaligned one shrinks to whole pages.
  uint16_t head = r.D(VirtioBalloon::kReporting)
                      .AddChain({{kData, 1 * kMiB, true},
                                 {kData + 1 * kMiB + 100, 2 * kPageSize + 100, true},
                                 {kData + 1 * kMiB + 8 * kPageSize + 1, 100, true}});
  r.dev->ProcessQueue(4);
  auto used = r.D(VirtioBalloon::kReporting).GetUsed();
  ASSERT_TRUE(used.has_value());
  EXPECT_EQ(used->id, head);
  EXPECT_EQ(used->len, 0u);
  EXPECT_EQ(r.SignalCount(4), 1);
  EXPECT_EQ(r.dev->bytes_reported(), 1 * kMiB + kPageSize);
  // Holes first (reading a shmem hole allocates a page again), then contents.
  for (uint64_t off = 0; off < 1 * kMiB; off += kPageSize) ASSERT_TRUE(r.IsHole(kData + off));
  EXPECT_TRUE(r.IsHole(kData + 1 * kMiB + kPageSize));
  EXPECT_FALSE(r.IsHole(kData + 1 * kMiB));
  EXPECT_TRUE(r.AllZero(kData, 1 * kMiB));
  EXPECT_TRUE(r.mem->TestDirty(kData));
  // The partial pages around the misaligned range keep their data; the aligned middle is gone.
  EXPECT_FALSE(r.AllZero(kData + 1 * kMiB, kPageSize));
  EXPECT_TRUE(r.AllZero(kData + 1 * kMiB + kPageSize, kPageSize));
  EXPECT_FALSE(r.AllZero(kData + 1 * kMiB + 2 * kPageSize, kPageSize));
  EXPECT_FALSE(r.AllZero(kData + 1 * kMiB + 8 * kPageSize, kPageSize));
  // Reported pages are not balloon pages.
  EXPECT_EQ(r.dev->inflated_pages(), 0u);
}

struct RecordingSink : FreePageHintSink {
  std::vector<std::pair<uint64_t, uint64_t>> ranges;
  std::vector<uint32_t> done;
  void OnHintRangeFree(uint64_t gpa, uint64_t len) override { ranges.emplace_back(gpa, len); }
  void OnHintingDone(uint32_t cmd_id) override { done.push_back(cmd_id); }
};

TEST(BalloonTest, FreePageHintingFollowsCmdId) {
  VirtioBalloonOptions opt;
  opt.free_page_hinting = true;
  Rig r(opt, kStatsF | kHintF, {0, 1, 2, 3});
  ASSERT_NE(r.dev, nullptr);
  ASSERT_EQ(r.dev->queue_index(VirtioBalloon::kFreePage), 3);
  TestDriver& d = r.D(VirtioBalloon::kFreePage);
  RecordingSink sink;
  auto send_id = [&](uint32_t id, uint64_t at) {
    ASSERT_TRUE(r.mem->Write(at, &id, 4).ok());
    d.AddChain({{at, 4, false}});
    r.dev->ProcessQueue(3);
  };
  auto hint = [&](uint64_t gpa, uint32_t len) {
    d.AddChain({{gpa, len, true}});
    r.dev->ProcessQueue(3);
  };
  auto drain = [&] {
    int n = 0;
    while (auto u = d.GetUsed()) {
      EXPECT_EQ(u->len, 0u);
      ++n;
    }
    return n;
  };
  r.Fill(kData, 4 * kMiB, 9);
  (void)r.mem->TakeDirty(0);

  auto id1 = r.dev->StartFreePageHinting(&sink);
  ASSERT_TRUE(id1.ok());
  EXPECT_GE(*id1, kBalloonCmdIdFirst);
  EXPECT_EQ(r.dev->free_page_hint_cmd_id(), *id1);
  EXPECT_EQ(r.config_changes.load(), 1);

  hint(kData, 64 * 1024);  // before the guest sent the id: not part of the session
  EXPECT_TRUE(sink.ranges.empty());
  send_id(*id1, kScratch);
  hint(kData + 1 * kMiB, 1 * kMiB);
  hint(kData + 2 * kMiB + 10, 3 * kPageSize);  // inner whole pages only
  ASSERT_EQ(sink.ranges.size(), 2u);
  EXPECT_EQ(sink.ranges[0], std::make_pair(kData + 1 * kMiB, 1 * kMiB));
  EXPECT_EQ(sink.ranges[1], std::make_pair(kData + 2 * kMiB + kPageSize, 2 * kPageSize));
  EXPECT_EQ(r.dev->bytes_hinted(), 1 * kMiB + 2 * kPageSize);
  EXPECT_EQ(drain(), 4);
  // The device neither wrote nor discarded the hinted pages.
  EXPECT_FALSE(r.AllZero(kData + 1 * kMiB, kPageSize));
  EXPECT_FALSE(r.IsHole(kData + 1 * kMiB));
  EXPECT_FALSE(r.mem->TestDirty(kData + 1 * kMiB));

  // A new session: hints still tagged with the old id (or the old id resent) are stale.
  auto id2 = r.dev->StartFreePageHinting(&sink);
  ASSERT_TRUE(id2.ok());
  EXPECT_NE(*id2, *id1);
  EXPECT_EQ(r.config_changes.load(), 2);
  hint(kData, kPageSize);
  send_id(*id1, kScratch);
  hint(kData, kPageSize);
  EXPECT_EQ(sink.ranges.size(), 2u);
  send_id(*id2, kScratch);
  hint(kData + 3 * kMiB, 2 * kPageSize);
  ASSERT_EQ(sink.ranges.size(), 3u);
  EXPECT_EQ(sink.ranges[2], std::make_pair(kData + 3 * kMiB, 2 * kPageSize));
  // The guest is done with this session.
  send_id(kBalloonCmdIdStop, kScratch);
  EXPECT_EQ(sink.done, std::vector<uint32_t>{*id2});
  hint(kData, kPageSize);
  EXPECT_EQ(sink.ranges.size(), 3u) << "nothing after the guest's STOP";
  EXPECT_EQ(drain(), 7);

  // Host stop / done: cmd id and config change; the sink is not called any more.
  send_id(*id2, kScratch);
  r.dev->StopFreePageHinting();
  EXPECT_EQ(r.dev->free_page_hint_cmd_id(), kBalloonCmdIdStop);
  EXPECT_EQ(r.config_changes.load(), 3);
  hint(kData, kPageSize);
  EXPECT_EQ(sink.ranges.size(), 3u);
  r.dev->FinishFreePageHinting();
  EXPECT_EQ(r.dev->free_page_hint_cmd_id(), kBalloonCmdIdDone);
  EXPECT_EQ(r.config_changes.load(), 4);
  uint8_t cfg[4];
  r.dev->ReadConfig(8, cfg);
  EXPECT_EQ(cfg[0], kBalloonCmdIdDone);
  EXPECT_EQ(drain(), 2);
  EXPECT_FALSE(r.qs[3]->in_error());
}

TEST(BalloonTest, QueueNumberingFollowsTheDriver) {
  VirtioBalloonOptions opt;
  opt.free_page_reporting = true;  // no hinting: spec index 4, contiguous index 3
  {
    Rig r(opt, kStatsF | kReportF, {0, 1, 2, 4});  // spec numbering (Linux >= 6.11)
    ASSERT_NE(r.dev, nullptr);
    EXPECT_EQ(r.dev->queue_index(VirtioBalloon::kReporting), 4);
    EXPECT_EQ(r.dev->queue_index(VirtioBalloon::kFreePage), -1);
  }
  {
    Rig r(opt, kStatsF | kReportF, {0, 1, 2, 3});  // contiguous numbering (older Linux, QEMU)
    ASSERT_NE(r.dev, nullptr);
    EXPECT_EQ(r.dev->queue_index(VirtioBalloon::kReporting), 3);
    // And it works there: a report on queue 3 is discarded.
    r.Fill(kData, kPageSize, 1);
    r.D(VirtioBalloon::kReporting).AddChain({{kData, static_cast<uint32_t>(kPageSize), true}});
    r.dev->ProcessQueue(3);
    EXPECT_EQ(r.dev->bytes_reported(), kPageSize);
    EXPECT_TRUE(r.AllZero(kData, kPageSize));
  }
  {
    Rig r(opt, kReportF, {0, 1, 2});  // driver declined stats: contiguous puts reporting at 2
    ASSERT_NE(r.dev, nullptr);
    EXPECT_EQ(r.dev->queue_index(VirtioBalloon::kReporting), 2);
    EXPECT_EQ(r.dev->queue_index(VirtioBalloon::kStats), -1);
  }
  {
    Rig r(opt, 0, {0, 1});  // nothing optional negotiated
    ASSERT_NE(r.dev, nullptr);
    EXPECT_EQ(r.dev->queue_index(VirtioBalloon::kInflate), 0);
    EXPECT_EQ(r.dev->queue_index(VirtioBalloon::kStats), -1);
    r.dev->ProcessQueue(2);  // not a queue of this layout: ignored
    EXPECT_FALSE(r.dev->RequestStats());
  }
}

TEST(BalloonTest, QuiesceDefersStatsRequest) {
  Rig r({}, kStatsF, {0, 1, 2});
  ASSERT_NE(r.dev, nullptr);
  WriteStats(*r.mem, kScratch, {{4, 1}});
  r.D(VirtioBalloon::kStats).AddChain({{kScratch, 10, false}});
  r.dev->ProcessQueue(2);
  r.dev->Quiesce();
  auto before = r.D(VirtioBalloon::kStats).UsedRingBytesNow();
  EXPECT_TRUE(r.dev->RequestStats());
  EXPECT_EQ(r.D(VirtioBalloon::kStats).UsedRingBytesNow(), before) << "used ring written";
  // The VM runs again: the next notification sends the request.
  r.dev->ProcessQueue(0);
  EXPECT_TRUE(r.D(VirtioBalloon::kStats).GetUsed().has_value());
  EXPECT_EQ(r.SignalCount(2), 1);
}

TEST(BalloonTest, SaveRestoreContinue) {
  VirtioBalloonOptions opt = AllOptions();
  opt.initial_target_bytes = 4 * kMiB;
  Rig r(opt, kStatsF | kHintF | kReportF, {0, 1, 2, 3, 4});
  ASSERT_NE(r.dev, nullptr);
  std::vector<uint32_t> pfns;
  for (int i = 0; i < 20; ++i) pfns.push_back(Pfn(kData) + (i < 10 ? i : 2 * i));
  r.SendPfns(VirtioBalloon::kInflate, pfns);
  ASSERT_TRUE(r.D(VirtioBalloon::kInflate).GetUsed().has_value());
  uint32_t actual = 20;
  r.dev->WriteConfig(4, std::span<const uint8_t>(reinterpret_cast<uint8_t*>(&actual), 4));
  WriteStats(*r.mem, kScratch + 0x1000, {{5, 777}});
  uint16_t stats_head = r.D(VirtioBalloon::kStats).AddChain({{kScratch + 0x1000, 10, false}});
  r.dev->ProcessQueue(2);
  RecordingSink sink;
  auto id = r.dev->StartFreePageHinting(&sink);
  ASSERT_TRUE(id.ok());
  r.dev->FinishFreePageHinting();

  // An inflate chain left in flight at save time (popped, never used). Cannot happen with this
  // device (chains complete inside ProcessQueue) but a restore must still redo it.
  uint32_t extra = Pfn(kData) + 50;
  ASSERT_TRUE(r.mem->Write(kScratch + 0x2000, &extra, 4).ok());
  uint16_t extra_head = r.D(VirtioBalloon::kInflate).AddChain({{kScratch + 0x2000, 4, false}});
  ASSERT_TRUE(r.qs[0]->PopChain().ok());

  r.dev->Quiesce();
  std::string state = r.dev->SaveState();
  std::vector<VirtqueueState> qstates;
  for (auto& q : r.qs) qstates.push_back(q->SaveState());
  ASSERT_EQ(r.qs[2]->InFlightHeads(), std::vector<uint16_t>{stats_head});

  // "Destination": same guest RAM (already migrated), fresh queues and device.
  auto d2 = VirtioBalloon::Create(r.mem.get(), nullptr, opt);
  ASSERT_TRUE(d2.ok());
  for (size_t i = 0; i < r.qs.size(); ++i) {
    r.qs[i] = std::make_unique<Virtqueue>(r.mem.get(), static_cast<uint16_t>(i), 256);
    ASSERT_TRUE(r.qs[i]->RestoreState(qstates[i]).ok());
  }
  r.dev = std::move(*d2);
  ASSERT_TRUE(r.dev->RestoreState(state).ok());
  r.signals.clear();
  ASSERT_TRUE(r.Activate(*r.dev).ok());

  // The in-flight inflate chain was redone at Activate() (used, not yet signalled).
  EXPECT_EQ(r.dev->inflated_pages(), 21u);
  EXPECT_TRUE(r.dev->IsInflated(uint64_t{extra} * kPageSize));
  auto redone = r.D(VirtioBalloon::kInflate).GetUsed();
  ASSERT_TRUE(redone.has_value());
  EXPECT_EQ(redone->id, extra_head);
  EXPECT_EQ(r.SignalCount(0), 0) << "Activate() must not signal";
  for (uint32_t p : pfns) EXPECT_TRUE(r.dev->IsInflated(uint64_t{p} * kPageSize));
  EXPECT_FALSE(r.dev->IsInflated(kData + 10 * kPageSize));
  EXPECT_EQ(r.dev->target_bytes(), 4 * kMiB);
  EXPECT_EQ(r.dev->actual_bytes(), 20 * kPageSize);
  EXPECT_EQ(r.dev->free_page_hint_cmd_id(), kBalloonCmdIdDone);
  auto s = r.dev->GetStats();
  ASSERT_TRUE(s.has_value());
  EXPECT_EQ(s->total_memory, 777u);
  EXPECT_EQ(r.D(VirtioBalloon::kStats).UsedIdx(), 0) << "restore must not return the buffer";

  // The held stats buffer is held again: a request returns exactly that head.
  EXPECT_TRUE(r.dev->RequestStats());
  auto used = r.D(VirtioBalloon::kStats).GetUsed();
  ASSERT_TRUE(used.has_value());
  EXPECT_EQ(used->id, stats_head);
  // Inflate/deflate continue on the restored set.
  r.SendPfns(VirtioBalloon::kDeflate, {pfns[0], pfns[19]});
  EXPECT_EQ(r.dev->inflated_pages(), 19u);
  EXPECT_EQ(r.SignalCount(0), 1) << "the deferred signal goes out with the next event";
  r.SendPfns(VirtioBalloon::kInflate, {Pfn(kData) + 10});
  EXPECT_EQ(r.dev->inflated_pages(), 20u);
  // A new hinting session gets a fresh id.
  auto id2 = r.dev->StartFreePageHinting(&sink);
  ASSERT_TRUE(id2.ok());
  EXPECT_NE(*id2, *id);
}

TEST(BalloonTest, RestoreRejectsBadState) {
  auto mem = GuestMemory::Create(kRam);
  ASSERT_TRUE(mem.ok());
  auto dev = VirtioBalloon::Create(mem->get(), nullptr, {});
  ASSERT_TRUE(dev.ok());
  EXPECT_FALSE((*dev)->RestoreState("\xff\xff\xff garbage").ok());
  // A valid state restores; an inflated range beyond RAM is refused.
  std::string good = (*dev)->SaveState();
  EXPECT_TRUE((*dev)->RestoreState(good).ok());
  Rig r({}, kStatsF, {0, 1, 2});
  ASSERT_NE(r.dev, nullptr);
  r.SendPfns(VirtioBalloon::kInflate, {Pfn(kRam - kPageSize)});
  std::string st = r.dev->SaveState();
  auto small = GuestMemory::Create(kRam / 2);
  ASSERT_TRUE(small.ok());
  auto d2 = VirtioBalloon::Create(small->get(), nullptr, {});
  ASSERT_TRUE(d2.ok());
  EXPECT_FALSE((*d2)->RestoreState(st).ok());
  EXPECT_TRUE(r.dev->RestoreState(st).ok());
}

TEST(BalloonTest, ResetEmptiesTheBalloon) {
  Rig r({}, kStatsF, {0, 1, 2});
  ASSERT_NE(r.dev, nullptr);
  r.SendPfns(VirtioBalloon::kInflate, {Pfn(kData)});
  EXPECT_EQ(r.dev->inflated_pages(), 1u);
  r.dev->Reset();
  EXPECT_EQ(r.dev->inflated_pages(), 0u);
  EXPECT_EQ(r.dev->actual_bytes(), 0u);
  r.dev->ProcessQueue(0);  // after reset: ignored, no crash
  EXPECT_FALSE(r.dev->RequestStats());
}

TEST(BalloonTest, HostileChainsNeverBreakTheDevice) {
  Rig r(AllOptions(), kStatsF | kHintF | kReportF, {0, 1, 2, 3, 4});
  ASSERT_NE(r.dev, nullptr);
  // Short stats buffer, 2-byte command id, a readable-only report, writable-only stats.
  r.D(VirtioBalloon::kStats).AddChain({{kScratch, 3, false}});
  r.D(VirtioBalloon::kFreePage).AddChain({{kScratch, 2, false}, {kData, 4096, true}});
  r.D(VirtioBalloon::kReporting).AddChain({{kScratch + 100, 5, false}});
  r.D(VirtioBalloon::kStats).AddChain({{kScratch, 64, true}});
  for (uint16_t q = 0; q < 5; ++q) r.dev->ProcessQueue(q);
  for (auto& q : r.qs) EXPECT_FALSE(q->in_error());
  // The first stats buffer was replaced by the second and returned; the second is held.
  EXPECT_EQ(r.D(VirtioBalloon::kStats).UsedIdx(), 1);
  EXPECT_FALSE(r.dev->GetStats().has_value()) << "no complete entry was ever sent";
  EXPECT_EQ(r.D(VirtioBalloon::kFreePage).UsedIdx(), 1);
  EXPECT_EQ(r.D(VirtioBalloon::kReporting).UsedIdx(), 1);
  EXPECT_EQ(r.dev->bytes_hinted(), 0u);
  EXPECT_EQ(r.dev->bytes_reported(), 0u);
}

}  // namespace
}  // namespace microvmm::virtio
