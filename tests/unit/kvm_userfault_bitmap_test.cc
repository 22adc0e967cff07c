// KvmUserfaultBitmap: the per-memslot bitmaps handed to KVM (layout, Set/Clear/Test/ClearRange,
// concurrent clears). Pure host memory, no /dev/kvm.
#include "migration/postcopy/kvm_userfault.h"

#include <cstdint>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace microvmm {
namespace {

constexpr uint64_t kPage = 4096;
constexpr uint64_t kBase = 0x100000000ULL;  // slot 1 at 4 GiB

const uint64_t* Words(const void* p) { return static_cast<const uint64_t*>(p); }

TEST(KvmUserfaultBitmapTest, AllMissingLayoutIsUnsignedLongBitPerPage) {
  KvmUserfaultBitmap b;
  auto p = b.AddSlot(1, kBase, 70 * kPage);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(reinterpret_cast<uintptr_t>(*p) % kPage, 0u);  // aligned for KVM's long reads
  EXPECT_EQ(b.SlotBitmap(1), *p);
  EXPECT_EQ(b.CountMissing(), 70u);
  const uint64_t* w = Words(*p);
  EXPECT_EQ(w[0], ~uint64_t{0});
  EXPECT_EQ(w[1], 0x3fu);  // pages 64..69; nothing past the slot's end
  EXPECT_EQ(w[2], 0u);
  // Page 65 is bit 1 of word 1 (LSB first), as KVM's test_bit() reads it.
  ASSERT_TRUE(b.Clear(kBase + 65 * kPage + 123));
  EXPECT_EQ(w[1], 0x3du);
  EXPECT_FALSE(b.Test(kBase + 65 * kPage));
  EXPECT_TRUE(b.Test(kBase + 64 * kPage));
  EXPECT_EQ(b.CountMissing(), 69u);
}

TEST(KvmUserfaultBitmapTest, SetClearTestAndOutOfRange) {
  KvmUserfaultBitmap b;
  ASSERT_TRUE(b.AddSlot(0, 0, 16 * kPage, /*all_missing=*/false).ok());
  EXPECT_EQ(b.CountMissing(), 0u);
  EXPECT_FALSE(b.Test(3 * kPage));
  EXPECT_TRUE(b.Set(3 * kPage + 1));
  EXPECT_TRUE(b.Test(3 * kPage));
  EXPECT_FALSE(b.Test(4 * kPage));
  EXPECT_EQ(b.CountMissing(), 1u);
  EXPECT_TRUE(b.Clear(3 * kPage));
  EXPECT_FALSE(b.Test(3 * kPage));
  // Outside every slot: refused, never touches memory.
  EXPECT_FALSE(b.Set(16 * kPage));
  EXPECT_FALSE(b.Clear(~uint64_t{0}));
  EXPECT_FALSE(b.Test(16 * kPage));
  EXPECT_EQ(b.CountMissing(), 0u);
}

TEST(KvmUserfaultBitmapTest, ClearRangeCoversPartialPagesAndSeveralSlots) {
  KvmUserfaultBitmap b;
  ASSERT_TRUE(b.AddSlot(0, 0, 0x80000, true).ok());  // 128 pages below
  ASSERT_TRUE(b.AddSlot(1, kBase, 200 * kPage, true).ok());
  const uint64_t total = 128 + 200;
  // [100, 100 + 4096) touches pages 0 and 1.
  EXPECT_EQ(b.ClearRange(100, kPage), 2u);
  EXPECT_FALSE(b.Test(0));
  EXPECT_FALSE(b.Test(kPage));
  EXPECT_TRUE(b.Test(2 * kPage));
  EXPECT_EQ(b.ClearRange(0, 2 * kPage), 0u);  // already installed
  // Pages 60..130 of slot 1: crosses two word boundaries.
  EXPECT_EQ(b.ClearRange(kBase + 60 * kPage, 71 * kPage), 71u);
  EXPECT_TRUE(b.Test(kBase + 59 * kPage));
  EXPECT_FALSE(b.Test(kBase + 60 * kPage));
  EXPECT_FALSE(b.Test(kBase + 130 * kPage));
  EXPECT_TRUE(b.Test(kBase + 131 * kPage));
  // A range spanning the gap between the slots clears only slot pages.
  EXPECT_EQ(b.ClearRange(0x7f000, kBase + kPage - 0x7f000), 2u);  // page 127 + slot-1 page 0
  // Zero length and wrap-around ranges.
  EXPECT_EQ(b.ClearRange(kBase + 150 * kPage, 0), 0u);
  EXPECT_EQ(b.ClearRange(kBase + 199 * kPage, ~uint64_t{0}), 1u);
  EXPECT_EQ(b.CountMissing(), total - 2 - 71 - 2 - 1);
}

TEST(KvmUserfaultBitmapTest, AddSlotRejectsBadInput) {
  KvmUserfaultBitmap b;
  EXPECT_FALSE(b.AddSlot(0, 0, 0).ok());
  EXPECT_FALSE(b.AddSlot(0, 100, kPage).ok());
  EXPECT_FALSE(b.AddSlot(0, 0, kPage + 1).ok());
  EXPECT_FALSE(b.AddSlot(0, ~uint64_t{0} - kPage + 1, 2 * kPage).ok());  // wraps
  ASSERT_TRUE(b.AddSlot(0, 0, 8 * kPage).ok());
  EXPECT_FALSE(b.AddSlot(0, kBase, kPage).ok());     // same slot id
  EXPECT_FALSE(b.AddSlot(1, 4 * kPage, 8 * kPage).ok());  // overlaps slot 0
  EXPECT_TRUE(b.AddSlot(1, 8 * kPage, 8 * kPage).ok());   // adjacent is fine
}

TEST(KvmUserfaultBitmapTest, BitmapAddressSurvivesMove) {
  KvmUserfaultBitmap a;
  auto p = a.AddSlot(2, kBase, 64 * kPage);
  ASSERT_TRUE(p.ok());
  ASSERT_TRUE(a.AddSlot(3, 2 * kBase, 64 * kPage).ok());  // vector growth must not move it
  KvmUserfaultBitmap b = std::move(a);
  EXPECT_EQ(b.SlotBitmap(2), *p);  // KVM keeps this address for the memslot's lifetime
  EXPECT_TRUE(b.Clear(kBase));
  EXPECT_EQ(Words(*p)[0], ~uint64_t{1});
}

// vCPUs install pages concurrently; bits of one word are cleared from several threads at once.
TEST(KvmUserfaultBitmapTest, ConcurrentClearsLoseNoBit) {
  constexpr int kThreads = 4;
  constexpr uint64_t kPages = 64 * 256;
  KvmUserfaultBitmap b;
  ASSERT_TRUE(b.AddSlot(0, 0, kPages * kPage).ok());
  std::vector<std::thread> ts;
  for (int t = 0; t < kThreads; ++t) {
    ts.emplace_back([&b, t] {
      for (uint64_t i = t; i < kPages; i += kThreads) b.Clear(i * kPage);
    });
  }
  for (auto& t : ts) t.join();
  EXPECT_EQ(b.CountMissing(), 0u);
}

}  // namespace
}  // namespace microvmm
