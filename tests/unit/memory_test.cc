// Unit tests of vmm/memory/guest_memory.h: RAM layout around the 3-4 GiB MMIO gap, bounds-checked
// access (HostPtr/Read/Write), and the VMM-side dirty bitmap. No KVM needed.
#include "vmm/memory/guest_memory.h"

#include <sys/stat.h>

#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <vector>

#include "gtest/gtest.h"

namespace microvmm {
namespace {

constexpr uint64_t kMiB = 1ULL << 20;
constexpr uint64_t kGiB = 1ULL << 30;

std::unique_ptr<GuestMemory> Make(uint64_t bytes) {
  auto m = GuestMemory::Create(bytes);
  EXPECT_TRUE(m.ok()) << m.status();
  return m.ok() ? std::move(*m) : nullptr;
}

// Bits set in a TakeDirty() bitmap, as page numbers.
std::vector<uint64_t> Pages(const std::vector<uint64_t>& bitmap) {
  std::vector<uint64_t> out;
  for (size_t w = 0; w < bitmap.size(); ++w)
    for (int b = 0; b < 64; ++b)
      if ((bitmap[w] >> b) & 1) out.push_back(w * 64 + b);
  return out;
}

TEST(RamLayoutTest, BelowGap) {
  auto l = RamLayout(1 * kGiB);
  ASSERT_EQ(l.size(), 1u);
  EXPECT_EQ(l[0].gpa, 0u);
  EXPECT_EQ(l[0].size, 1 * kGiB);
}

TEST(RamLayoutTest, ExactlyUpToGap) {
  auto l = RamLayout(3 * kGiB);
  ASSERT_EQ(l.size(), 1u);
  EXPECT_EQ(l[0].gpa, 0u);
  EXPECT_EQ(l[0].size, 3 * kGiB);
}

TEST(RamLayoutTest, SplitAroundGap) {
  auto l = RamLayout(5 * kGiB);
  ASSERT_EQ(l.size(), 2u);
  EXPECT_EQ(l[0].gpa, 0u);
  EXPECT_EQ(l[0].size, 3 * kGiB);  // up to the 32-bit MMIO gap at 3 GiB
  EXPECT_EQ(l[1].gpa, 4 * kGiB);   // RAM resumes at 4 GiB
  EXPECT_EQ(l[1].size, 2 * kGiB);
}

TEST(GuestMemoryCreateTest, SizeMustBeNonZeroMultipleOf2MiB) {
  for (uint64_t bad :
       std::initializer_list<uint64_t>{0, 4096, 1 * kMiB, 3 * kMiB, 64 * kMiB + 4096, 65 * kMiB}) {
    auto m = GuestMemory::Create(bad);
    ASSERT_FALSE(m.ok()) << bad;
    EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
  EXPECT_TRUE(GuestMemory::Create(2 * kMiB).ok());
}

TEST(GuestMemoryCreateTest, RegionsFollowRamLayout) {
  auto mem = Make(5 * kGiB);
  ASSERT_NE(mem, nullptr);
  EXPECT_EQ(mem->ram_bytes(), 5 * kGiB);
  ASSERT_EQ(mem->regions().size(), 2u);
  EXPECT_EQ(mem->regions()[0].gpa, 0u);
  EXPECT_EQ(mem->regions()[0].size, 3 * kGiB);
  EXPECT_EQ(mem->regions()[1].gpa, 4 * kGiB);
  EXPECT_EQ(mem->regions()[1].size, 2 * kGiB);
  EXPECT_TRUE(mem->regions()[0].memfd.valid());
  EXPECT_NE(mem->regions()[0].host, mem->regions()[1].host);
}

TEST(GuestMemoryTest, ZeroFilledAndRoundTrip) {
  auto mem = Make(16 * kMiB);
  ASSERT_NE(mem, nullptr);
  std::vector<uint8_t> buf(8192, 0xEE);
  ASSERT_TRUE(mem->Read(0x3000, buf.data(), buf.size()).ok());
  EXPECT_EQ(buf, std::vector<uint8_t>(8192, 0));
  const char msg[] = "hello guest";
  ASSERT_TRUE(mem->Write(0x123456, msg, sizeof(msg)).ok());
  char back[sizeof(msg)] = {};
  ASSERT_TRUE(mem->Read(0x123456, back, sizeof(back)).ok());
  EXPECT_STREQ(back, msg);
  ASSERT_TRUE(mem->WriteObj<uint64_t>(16 * kMiB - 8, 0x1122334455667788ULL).ok());
  auto v = mem->ReadObj<uint64_t>(16 * kMiB - 8);
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(*v, 0x1122334455667788ULL);
  // HostPtr aliases the same bytes.
  auto p = mem->HostPtr(0x123456, sizeof(msg));
  ASSERT_TRUE(p.ok());
  EXPECT_EQ(std::memcmp(*p, msg, sizeof(msg)), 0);
}

TEST(GuestMemoryTest, HighRegionAddressedAt4GiB) {
  auto mem = Make(3 * kGiB + 64 * kMiB);
  ASSERT_NE(mem, nullptr);
  auto p = mem->HostPtr(4 * kGiB, 16);
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(*p, mem->regions()[1].host);
  ASSERT_TRUE(mem->WriteObj<uint32_t>(4 * kGiB + 0x10, 0xCAFEF00D).ok());
  uint32_t v;
  std::memcpy(&v, mem->regions()[1].host + 0x10, 4);
  EXPECT_EQ(v, 0xCAFEF00Du);
  // Last byte of each region is addressable, the next one is not.
  EXPECT_TRUE(mem->Contains(3 * kGiB - 1, 1));
  EXPECT_FALSE(mem->Contains(3 * kGiB, 1));
  EXPECT_TRUE(mem->Contains(4 * kGiB + 64 * kMiB - 1, 1));
  EXPECT_FALSE(mem->Contains(4 * kGiB + 64 * kMiB, 1));
}

TEST(GuestMemoryTest, OutOfRangeAccessesFailAndWriteNothing) {
  auto mem = Make(3 * kGiB + 64 * kMiB);
  ASSERT_NE(mem, nullptr);
  const uint64_t low_end = 3 * kGiB, high_end = 4 * kGiB + 64 * kMiB;
  uint8_t four[4] = {1, 2, 3, 4};
  struct Case {
    uint64_t gpa, len;
    const char* what;
  } cases[] = {
      {low_end - 2, 4, "crosses the end of low RAM into the gap"},
      {low_end, 4, "starts at the gap"},
      {3 * kGiB + 512 * kMiB, 4, "inside the gap"},
      {4 * kGiB - 2, 4, "crosses from the gap into high RAM"},
      {high_end - 2, 4, "crosses the end of high RAM"},
      {high_end, 1, "just past the end"},
      {~0ULL - 1, 4, "wraps around 2^64"},
      {0, ~0ULL, "huge length"},
      {low_end - 2, ~0ULL - 1, "length overflow"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    auto p = mem->HostPtr(c.gpa, c.len);
    ASSERT_FALSE(p.ok());
    EXPECT_EQ(p.status().code(), absl::StatusCode::kOutOfRange);
    EXPECT_FALSE(mem->Contains(c.gpa, c.len));
    uint8_t dst[4] = {9, 9, 9, 9};
    if (c.len <= 4) {
      EXPECT_EQ(mem->Read(c.gpa, dst, c.len).code(), absl::StatusCode::kOutOfRange);
      EXPECT_EQ(mem->Write(c.gpa, four, c.len).code(), absl::StatusCode::kOutOfRange);
    }
  }
  // The partial writes above must not have stored their in-range bytes or marked pages dirty.
  uint8_t tail[2];
  ASSERT_TRUE(mem->Read(low_end - 2, tail, 2).ok());
  EXPECT_EQ(tail[0], 0);
  EXPECT_EQ(tail[1], 0);
  ASSERT_TRUE(mem->Read(high_end - 2, tail, 2).ok());
  EXPECT_EQ(tail[0], 0);
  EXPECT_EQ(tail[1], 0);
  EXPECT_TRUE(Pages(mem->TakeDirty(0)).empty());
  EXPECT_TRUE(Pages(mem->TakeDirty(1)).empty());
}

TEST(GuestMemoryDirtyTest, FreshMemoryIsClean) {
  auto mem = Make(16 * kMiB);
  ASSERT_NE(mem, nullptr);
  std::vector<uint64_t> d = mem->TakeDirty(0);
  EXPECT_EQ(d.size(), (16 * kMiB / kPageSize + 63) / 64);
  EXPECT_TRUE(Pages(d).empty());
  EXPECT_FALSE(mem->TestDirty(0));
}

TEST(GuestMemoryDirtyTest, WriteMarksExactlyTouchedPages) {
  auto mem = Make(16 * kMiB);
  ASSERT_NE(mem, nullptr);
  uint8_t b = 1;
  ASSERT_TRUE(mem->Write(0x5000, &b, 1).ok());         // page 5
  ASSERT_TRUE(mem->Write(0x7FFF, &b, 1).ok());         // last byte of page 7
  uint32_t w = 0xffffffff;
  ASSERT_TRUE(mem->Write(0x9FFE, &w, 4).ok());         // spans pages 9 and 10
  std::vector<uint8_t> page(4096, 7);
  ASSERT_TRUE(mem->Write(0x40000, page.data(), page.size()).ok());  // exactly page 64
  ASSERT_TRUE(mem->Write(16 * kMiB - 1, &b, 1).ok());  // last page
  EXPECT_TRUE(mem->TestDirty(0x5000));
  EXPECT_TRUE(mem->TestDirty(0x5FFF));
  EXPECT_FALSE(mem->TestDirty(0x6000));
  EXPECT_TRUE(mem->TestDirty(0xA000));
  EXPECT_FALSE(mem->TestDirty(0x41000));
  const uint64_t last = 16 * kMiB / kPageSize - 1;
  EXPECT_EQ(Pages(mem->TakeDirty(0)), (std::vector<uint64_t>{5, 7, 9, 10, 64, last}));
  // TakeDirty cleared the bits.
  EXPECT_TRUE(Pages(mem->TakeDirty(0)).empty());
  EXPECT_FALSE(mem->TestDirty(0x5000));
}

TEST(GuestMemoryDirtyTest, ReadsDoNotDirty) {
  auto mem = Make(16 * kMiB);
  ASSERT_NE(mem, nullptr);
  uint8_t buf[64];
  ASSERT_TRUE(mem->Read(0x1000, buf, sizeof(buf)).ok());
  (void)mem->ReadObj<uint64_t>(0x2000);
  EXPECT_TRUE(Pages(mem->TakeDirty(0)).empty());
}

TEST(GuestMemoryDirtyTest, HighRegionHasItsOwnBitmap) {
  auto mem = Make(3 * kGiB + 64 * kMiB);
  ASSERT_NE(mem, nullptr);
  uint16_t v = 0xabcd;
  ASSERT_TRUE(mem->WriteObj(4 * kGiB + 3 * kPageSize + 10, v).ok());
  ASSERT_TRUE(mem->WriteObj(uint64_t{0x2000}, v).ok());
  EXPECT_TRUE(mem->TestDirty(4 * kGiB + 3 * kPageSize));
  EXPECT_EQ(Pages(mem->TakeDirty(1)), std::vector<uint64_t>{3});  // page index within region 1
  EXPECT_EQ(Pages(mem->TakeDirty(0)), std::vector<uint64_t>{2});
}

TEST(GuestMemoryDirtyTest, MarkDirtyDirectly) {
  auto mem = Make(16 * kMiB);
  ASSERT_NE(mem, nullptr);
  mem->MarkDirty(0x3000, 0);  // empty range: nothing
  EXPECT_TRUE(Pages(mem->TakeDirty(0)).empty());
  mem->MarkDirty(0x3001, 2 * kPageSize);  // 0x3001..0x5000 -> pages 3, 4, 5
  EXPECT_EQ(Pages(mem->TakeDirty(0)), (std::vector<uint64_t>{3, 4, 5}));
}

}  // namespace
}  // namespace microvmm

namespace microvmm {
namespace {

uint64_t AllocatedBytes(int fd) {
  struct stat st;
  return ::fstat(fd, &st) == 0 ? static_cast<uint64_t>(st.st_blocks) * 512 : ~0ULL;
}

TEST(GuestMemoryDiscardTest, ReleasesHostMemoryReadsZeroAndMarksDirty) {
  auto mem = GuestMemory::Create(16 << 20);
  ASSERT_TRUE(mem.ok()) << mem.status();
  GuestMemory& m = **mem;
  std::vector<uint8_t> pattern(4 * kPageSize, 0xa5);
  ASSERT_TRUE(m.Write(0x200000, pattern.data(), pattern.size()).ok());
  (void)m.TakeDirty(0);
  const int fd = m.regions()[0].memfd.get();
  uint64_t before = AllocatedBytes(fd);
  ASSERT_GE(before, 4 * kPageSize);

  ASSERT_TRUE(m.Discard(0x201000, 2 * kPageSize).ok());
  EXPECT_EQ(AllocatedBytes(fd), before - 2 * kPageSize) << "host memory not released";
  uint8_t b = 0;
  ASSERT_TRUE(m.Read(0x200000, &b, 1).ok());
  EXPECT_EQ(b, 0xa5) << "page before the range must be untouched";
  ASSERT_TRUE(m.Read(0x201000, &b, 1).ok());
  EXPECT_EQ(b, 0) << "discarded page must read zero";
  ASSERT_TRUE(m.Read(0x202fff, &b, 1).ok());
  EXPECT_EQ(b, 0);
  ASSERT_TRUE(m.Read(0x203000, &b, 1).ok());
  EXPECT_EQ(b, 0xa5) << "page after the range must be untouched";
  EXPECT_FALSE(m.TestDirty(0x200000));
  EXPECT_TRUE(m.TestDirty(0x201000));
  EXPECT_TRUE(m.TestDirty(0x202000));
  EXPECT_FALSE(m.TestDirty(0x203000));
}

TEST(GuestMemoryDiscardTest, RejectsUnalignedAndOutOfRange) {
  auto mem = GuestMemory::Create(16 << 20);
  ASSERT_TRUE(mem.ok());
  EXPECT_FALSE((*mem)->Discard(0x1001, kPageSize).ok());
  EXPECT_FALSE((*mem)->Discard(0x1000, 100).ok());
  EXPECT_FALSE((*mem)->Discard(0x1000, 0).ok());
  EXPECT_EQ((*mem)->Discard(15 << 20, 2 << 20).code(), absl::StatusCode::kOutOfRange);
}

}  // namespace
}  // namespace microvmm
