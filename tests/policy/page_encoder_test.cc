// PageEncoder's delta probe (migration/precopy/adaptive.h) on real page buffers in GuestMemory:
// what it reports is what decides whether the policy enables delta encoding at all.
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "migration/dirty/dirty_tracker.h"
#include "migration/precopy/adaptive.h"
#include "vmm/memory/guest_memory.h"

namespace microvmm::migration {
namespace {

constexpr uint64_t kPages = 128;  // the working set: gpa 0 .. 128 pages

class DeltaProbeTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto m = GuestMemory::Create(2 << 20);
    ASSERT_TRUE(m.ok()) << m.status();
    mem_ = std::move(*m);
    dirty_ = DirtySet::ForMemory(*mem_);
    for (uint64_t p = 0; p < kPages; ++p) dirty_.Set(p * kPageSize);
  }

  uint8_t* Page(uint64_t p) { return *mem_->HostPtr(p * kPageSize, kPageSize); }

  // Every byte of every working-set page new (what fill=random does).
  void RandomRewrite() {
    for (uint64_t p = 0; p < kPages; ++p) {
      uint8_t* page = Page(p);
      for (uint64_t i = 0; i < kPageSize; i += 8) {
        const uint64_t v = rng_();
        std::memcpy(page + i, &v, 8);
      }
    }
  }
  // `words` 8-byte words per page change (what the compressible workload's stamps do).
  void FewWordRewrite(int words) {
    for (uint64_t p = 0; p < kPages; ++p) {
      for (int w = 0; w < words; ++w) {
        const uint64_t v = rng_() | 1;  // never all zero
        std::memcpy(Page(p) + (w * 1000 % (kPageSize - 8)), &v, 8);
      }
    }
  }

  std::unique_ptr<GuestMemory> mem_;
  DirtySet dirty_;
  std::mt19937_64 rng_{42};
  PageEncoder enc_;
};

TEST_F(DeltaProbeTest, RandomRewriteNeverDeltasFewWordRewriteAlwaysDoes) {
  RandomRewrite();
  PageEncoder::DeltaSample s = enc_.SampleDelta(*mem_, dirty_);
  EXPECT_EQ(s.pages, 0u) << "first call: nothing to compare with yet";

  RandomRewrite();
  s = enc_.SampleDelta(*mem_, dirty_);
  EXPECT_EQ(s.pages, 64u);  // max 64 of the 128 dirty pages
  EXPECT_EQ(s.hit_rate, 0.0);
  EXPECT_EQ(s.size_ratio, 0.0);

  FewWordRewrite(4);
  s = enc_.SampleDelta(*mem_, dirty_);
  EXPECT_EQ(s.pages, 64u);
  EXPECT_EQ(s.hit_rate, 1.0);
  EXPECT_GT(s.size_ratio, 0.0);
  EXPECT_LT(s.size_ratio, 0.05);  // 4 words + run headers out of 4 KiB
}

TEST_F(DeltaProbeTest, OnlyPagesDirtyAgainAndNonZeroAreCompared) {
  RandomRewrite();
  enc_.SampleDelta(*mem_, dirty_, /*max=*/16);
  FewWordRewrite(2);
  // Of the 16 probed pages (every 8th page of 128: 0, 8, ..., 120), only 0..63 are dirty now;
  // page 0 became zero (a ZERO record next, never a delta).
  DirtySet again = DirtySet::ForMemory(*mem_);
  for (uint64_t p = 0; p < kPages / 2; ++p) again.Set(p * kPageSize);
  std::memset(Page(0), 0, kPageSize);
  PageEncoder::DeltaSample s = enc_.SampleDelta(*mem_, again, 16);
  EXPECT_EQ(s.pages, 7u);  // pages 8, 16, ..., 56
  EXPECT_EQ(s.hit_rate, 1.0);
}

TEST_F(DeltaProbeTest, UsesTheEncodersThresholdWhichCompressionLowers) {
  RandomRewrite();
  enc_.SampleDelta(*mem_, dirty_);
  // 38 changed bytes in every 64: the delta is 64 runs of (skip, len, 38 bytes) = 62.5% of a
  // page. That fits the raw encoder's 7/8-page threshold, not the half page it allows when
  // compression is on (a compressed page would be cheaper).
  auto change_38_of_64 = [&] {
    for (uint64_t p = 0; p < kPages; ++p)
      for (uint64_t i = 0; i < kPageSize; ++i)
        if (i % 64 < 38) Page(p)[i] ^= 0x5a;
  };
  change_38_of_64();
  PageEncoder::DeltaSample s = enc_.SampleDelta(*mem_, dirty_);
  EXPECT_EQ(s.pages, 64u);
  EXPECT_EQ(s.hit_rate, 1.0);
  EXPECT_NEAR(s.size_ratio, 0.625, 0.01);

  ASSERT_TRUE(enc_.SetCompression(true, 1).ok());
  change_38_of_64();
  s = enc_.SampleDelta(*mem_, dirty_);
  EXPECT_EQ(s.pages, 64u);
  EXPECT_EQ(s.hit_rate, 0.0);
}

TEST_F(DeltaProbeTest, EmptyDirtySetDropsTheProbe) {
  RandomRewrite();
  enc_.SampleDelta(*mem_, dirty_);
  DirtySet none = DirtySet::ForMemory(*mem_);
  EXPECT_EQ(enc_.SampleDelta(*mem_, none).pages, 0u);
  FewWordRewrite(1);
  EXPECT_EQ(enc_.SampleDelta(*mem_, dirty_).pages, 0u) << "nothing probed at the empty pass";
}

}  // namespace
}  // namespace microvmm::migration
