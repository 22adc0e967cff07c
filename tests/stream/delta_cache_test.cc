#include "migration/stream/delta_cache.h"

#include <cstdint>
#include <map>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "migration/stream/xbzrle.h"

namespace microvmm::migration {
namespace {

using Bytes = std::vector<uint8_t>;
constexpr size_t kPage = 4096;

std::span<const uint8_t> S(const std::string& s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

Bytes Page(uint8_t fill) { return Bytes(kPage, fill); }

MeminfoReader FixedMeminfo(std::string text) {
  return [text]() -> absl::StatusOr<std::string> { return text; };
}

// 1 GiB available -> 256 MiB cap with the default divisor, so tests are independent of the host.
DeltaCacheOptions Opts(uint64_t requested, uint32_t shards = 1) {
  DeltaCacheOptions o;
  o.requested_bytes = requested;
  o.shards = shards;
  o.meminfo_reader = FixedMeminfo("MemTotal: 2097152 kB\nMemAvailable:    1048576 kB\n");
  return o;
}

std::unique_ptr<DeltaCache> Make(uint64_t requested, uint32_t shards = 1) {
  auto c = DeltaCache::Create(Opts(requested, shards));
  EXPECT_TRUE(c.ok()) << c.status();
  return std::move(*c);
}

// --- /proc/meminfo parsing and capacity choice ---

TEST(MeminfoTest, ParsesMemAvailable) {
  auto v = ParseMemAvailable(
      "MemTotal:       24617008 kB\nMemFree:         1000 kB\nMemAvailable:   20480000 kB\n"
      "Buffers:          100 kB\n");
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(*v, 20480000ULL * 1024);
  EXPECT_EQ(*ParseMemAvailable("MemAvailable:\t0 kB"), 0u);
}

TEST(MeminfoTest, BadFilesAreClearErrors) {
  const std::vector<std::pair<std::string, std::string>> bad = {
      {"", "no MemAvailable"},
      {"MemTotal: 100 kB\n", "no MemAvailable"},
      {"MemAvailable: 100\n", "not '<number> kB'"},
      {"MemAvailable: 100 MB\n", "not '<number> kB'"},
      {"MemAvailable: kB\n", "not '<number> kB'"},
      {"MemAvailable: 1 2 kB\n", "not '<number> kB'"},
      {"MemAvailable: -5 kB\n", "bad MemAvailable value"},
      {"MemAvailable: 0x10 kB\n", "bad MemAvailable value"},
      {"MemAvailable: 99999999999999999999 kB\n", "bad MemAvailable value"},
      {"MemAvailable: 18014398509481984 kB\n", "bad MemAvailable value"},  // 2^54 KiB overflows
      {"MemAvailable: 1 kB\nMemAvailable: 2 kB\n", "twice"},
  };
  for (const auto& [text, msg] : bad) {
    SCOPED_TRACE(text);
    auto v = ParseMemAvailable(text);
    ASSERT_FALSE(v.ok());
    EXPECT_EQ(v.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(v.status().message().find(msg), absl::string_view::npos) << v.status();
  }
}

TEST(MeminfoTest, RealProcMeminfoParses) {
  auto text = ReadProcMeminfo();
  ASSERT_TRUE(text.ok()) << text.status();
  auto v = ParseMemAvailable(*text);
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_GT(*v, 0u);
}

TEST(CapacityTest, MinOfRequestedAndQuarterOfAvailable) {
  std::string note;
  EXPECT_EQ(DeltaCache::ChooseCapacity(Opts(1ULL << 40), &note), 256ULL << 20);
  EXPECT_TRUE(note.empty());
  EXPECT_EQ(DeltaCache::ChooseCapacity(Opts(1ULL << 20), &note), 1ULL << 20);
  DeltaCacheOptions o = Opts(1ULL << 40);
  o.memavailable_divisor = 8;
  EXPECT_EQ(DeltaCache::ChooseCapacity(o, &note), 128ULL << 20);
}

TEST(CapacityTest, UnusableMeminfoFallsBackToSmallBound) {
  DeltaCacheOptions o = Opts(1ULL << 40);
  o.meminfo_reader = []() -> absl::StatusOr<std::string> {
    return absl::NotFoundError("no /proc here");
  };
  std::string note;
  EXPECT_EQ(DeltaCache::ChooseCapacity(o, &note), o.fallback_bytes);
  EXPECT_NE(note.find("no /proc here"), std::string::npos) << note;

  o.meminfo_reader = FixedMeminfo("garbage\n");
  auto c = DeltaCache::Create(o);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ((*c)->capacity_bytes(), o.fallback_bytes);
  EXPECT_NE((*c)->capacity_note().find("no MemAvailable"), std::string::npos);

  o.requested_bytes = 1 << 20;  // the fallback is a cap, not a minimum
  EXPECT_EQ(DeltaCache::ChooseCapacity(o, &note), 1u << 20);
}

TEST(CapacityTest, BadOptionsRejected) {
  DeltaCacheOptions o = Opts(1 << 20);
  o.page_size = 0;
  EXPECT_FALSE(DeltaCache::Create(o).ok());
  o = Opts(1 << 20);
  o.shards = 0;
  EXPECT_FALSE(DeltaCache::Create(o).ok());
  o = Opts(1 << 20);
  o.memavailable_divisor = 0;
  EXPECT_FALSE(DeltaCache::Create(o).ok());
}

// --- cache behaviour ---

TEST(DeltaCacheTest, MissThenDeltaAppliesToDestinationCopy) {
  auto c = Make(1 << 20);
  std::string delta;
  Bytes v1 = Page(1);
  EXPECT_EQ(c->EncodeAndUpdate(0x1000, v1, kPage, &delta), DeltaCache::Result::kMiss);
  EXPECT_TRUE(c->Contains(0x1000));
  Bytes dest = v1;  // sent in full

  Bytes v2 = v1;
  v2[100] = 9;
  v2[4000] = 9;
  ASSERT_EQ(c->EncodeAndUpdate(0x1000, v2, kPage, &delta), DeltaCache::Result::kDelta);
  ASSERT_TRUE(XbzrleApply(S(delta), dest).ok());
  EXPECT_EQ(dest, v2);

  // The cache now holds v2: an unchanged resend is the 3-byte "nothing changed" delta.
  ASSERT_EQ(c->EncodeAndUpdate(0x1000, v2, kPage, &delta), DeltaCache::Result::kDelta);
  EXPECT_EQ(delta.size(), 3u);

  DeltaCacheStats st = c->Stats();
  EXPECT_EQ(st.misses, 1u);
  EXPECT_EQ(st.hits, 2u);
  EXPECT_EQ(st.deltas, 2u);
  EXPECT_EQ(st.entries, 1u);
  EXPECT_EQ(st.cache_bytes, kPage);
  EXPECT_GT(st.bytes_saved, 2 * kPage - 20);
}

TEST(DeltaCacheTest, TooLargeDeltaStillUpdatesCache) {
  auto c = Make(1 << 20);
  std::string delta;
  c->EncodeAndUpdate(0, Page(1), kPage, &delta);
  EXPECT_EQ(c->EncodeAndUpdate(0, Page(2), 100, &delta), DeltaCache::Result::kFull);
  // Sent in full: the destination holds Page(2), and so must the cache.
  Bytes dest = Page(2), v3 = Page(2);
  v3[7] = 0;
  ASSERT_EQ(c->EncodeAndUpdate(0, v3, 100, &delta), DeltaCache::Result::kDelta);
  ASSERT_TRUE(XbzrleApply(S(delta), dest).ok());
  EXPECT_EQ(dest, v3);
  EXPECT_EQ(c->Stats().too_large, 1u);
}

TEST(DeltaCacheTest, InsertOnMissFalseDoesNotCache) {
  auto c = Make(1 << 20);
  std::string delta;
  EXPECT_EQ(c->EncodeAndUpdate(0, Page(1), kPage, &delta, /*insert_on_miss=*/false),
            DeltaCache::Result::kMiss);
  EXPECT_FALSE(c->Contains(0));
  EXPECT_EQ(c->Stats().entries, 0u);
}

TEST(DeltaCacheTest, InvalidateAndUpdate) {
  auto c = Make(1 << 20);
  std::string delta;
  c->EncodeAndUpdate(0x2000, Page(1), kPage, &delta);
  c->Invalidate(0x2000);  // e.g. sent as a ZERO record
  EXPECT_FALSE(c->Contains(0x2000));
  EXPECT_EQ(c->EncodeAndUpdate(0x2000, Page(1), kPage, &delta), DeltaCache::Result::kMiss);

  c->Update(0x3000, Page(5));  // sent in full by another path, bytes known
  Bytes dest = Page(5), v = Page(5);
  v[0] = 1;
  ASSERT_EQ(c->EncodeAndUpdate(0x3000, v, kPage, &delta), DeltaCache::Result::kDelta);
  ASSERT_TRUE(XbzrleApply(S(delta), dest).ok());
  EXPECT_EQ(dest, v);

  // Invalidated slots are reused, not leaked.
  for (int i = 0; i < 10; ++i) {
    c->Update(0x4000, Page(1));
    c->Invalidate(0x4000);
  }
  EXPECT_EQ(c->Stats().cache_bytes, 3 * kPage);

  c->Clear();
  EXPECT_FALSE(c->Contains(0x3000));
  EXPECT_EQ(c->Stats().entries, 0u);
  EXPECT_EQ(c->Stats().cache_bytes, 0u);
}

TEST(DeltaCacheTest, WrongSizedPageIsMissAndInvalidates) {
  auto c = Make(1 << 20);
  std::string delta;
  c->Update(0, Page(1));
  Bytes small(100, 0);
  EXPECT_EQ(c->EncodeAndUpdate(0, small, kPage, &delta), DeltaCache::Result::kMiss);
  EXPECT_FALSE(c->Contains(0));
}

TEST(DeltaCacheTest, CapacityBoundsEntriesAndEvicts) {
  auto c = Make(8 * kPage + 100);  // 8 whole pages
  std::string delta;
  for (uint64_t i = 0; i < 100; ++i) c->EncodeAndUpdate(i * kPage, Page(i), kPage, &delta);
  DeltaCacheStats st = c->Stats();
  EXPECT_EQ(st.entries, 8u);
  EXPECT_EQ(st.cache_bytes, 8 * kPage);
  EXPECT_EQ(st.evictions, 92u);
  int cached = 0;
  for (uint64_t i = 0; i < 100; ++i) cached += c->Contains(i * kPage);
  EXPECT_EQ(cached, 8);
}

TEST(DeltaCacheTest, ShardedCapacityStaysWithinBound) {
  auto c = Make(64 * kPage, 16);
  std::string delta;
  for (uint64_t i = 0; i < 1000; ++i) c->Update(i * kPage, Page(i));
  DeltaCacheStats st = c->Stats();
  EXPECT_LE(st.cache_bytes, 64 * kPage);
  EXPECT_LE(st.entries, 64u);
  EXPECT_GE(st.entries, 48u);  // hashing spreads 1000 pages over all 16 shards
}

TEST(DeltaCacheTest, ClockKeepsRecentlyHitPages) {
  auto c = Make(4 * kPage);
  std::string delta;
  for (uint64_t i = 0; i < 4; ++i) c->EncodeAndUpdate(i * kPage, Page(i), kPage, &delta);
  // Hit page 0 (sets its reference bit); the next insert must evict page 1, not 0.
  EXPECT_EQ(c->EncodeAndUpdate(0, Page(0), kPage, &delta), DeltaCache::Result::kDelta);
  c->EncodeAndUpdate(4 * kPage, Page(4), kPage, &delta);
  EXPECT_TRUE(c->Contains(0));
  EXPECT_FALSE(c->Contains(1 * kPage));
  EXPECT_TRUE(c->Contains(2 * kPage));
  EXPECT_TRUE(c->Contains(4 * kPage));
}

TEST(DeltaCacheTest, ZeroCapacityAlwaysMisses) {
  auto c = Make(kPage - 1);
  std::string delta;
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(c->EncodeAndUpdate(0, Page(1), kPage, &delta), DeltaCache::Result::kMiss);
  }
  EXPECT_EQ(c->Stats().cache_bytes, 0u);
}

// Several sender threads, each owning its gpas (the contract), on a cache smaller than the
// working set. Each thread keeps a model of the destination and applies exactly what it would
// send; at the end every destination page must equal the source page, and every page still
// cached must equal it too (a resend is the 3-byte "unchanged" delta).
TEST(DeltaCacheTest, ConcurrentSendersKeepDestinationInSync) {
  constexpr int kThreads = 4;
  constexpr uint64_t kPagesPerThread = 96;
  auto c = Make(128 * kPage, 8);  // 128 of 384 pages fit
  std::vector<std::map<uint64_t, Bytes>> src(kThreads), dst(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(t);
      std::string delta;
      for (int op = 0; op < 4000; ++op) {
        const uint64_t gpa = (rng() % kPagesPerThread * kThreads + t) * kPage;
        Bytes& page = src[t][gpa];
        if (page.empty()) page = Page(static_cast<uint8_t>(t));
        const int edits = rng() % 20;
        for (int e = 0; e < edits; ++e) page[rng() % kPage] = static_cast<uint8_t>(rng());
        const size_t max_out = rng() % 2 ? kPage : 64;
        switch (c->EncodeAndUpdate(gpa, page, max_out, &delta)) {
          case DeltaCache::Result::kDelta:
            ASSERT_EQ(dst[t].count(gpa), 1u);
            ASSERT_TRUE(XbzrleApply(S(delta), dst[t][gpa]).ok());
            break;
          case DeltaCache::Result::kFull:
          case DeltaCache::Result::kMiss:
            dst[t][gpa] = page;
            break;
        }
        if (op % 97 == 0) c->Invalidate(gpa);  // e.g. sent by another path
      }
    });
  }
  for (auto& th : threads) th.join();
  std::string delta;
  for (int t = 0; t < kThreads; ++t) {
    for (const auto& [gpa, page] : src[t]) {
      ASSERT_EQ(dst[t][gpa], page) << "gpa " << gpa;
      if (c->Contains(gpa)) {
        ASSERT_EQ(c->EncodeAndUpdate(gpa, page, kPage, &delta), DeltaCache::Result::kDelta);
        EXPECT_EQ(delta.size(), 3u) << "cache differs from destination at gpa " << gpa;
      }
    }
  }
  DeltaCacheStats st = c->Stats();
  EXPECT_LE(st.cache_bytes, 128 * kPage);
  EXPECT_GT(st.evictions, 0u);
  EXPECT_GT(st.deltas, 0u);
  EXPECT_GE(st.hits + st.misses, uint64_t{kThreads} * 4000);
}

}  // namespace
}  // namespace microvmm::migration
