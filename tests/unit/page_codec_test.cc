// Page records of the migration stream: encoding and strict decoding.
#include "migration/stream/page_codec.h"

#include <cstring>
#include <vector>

#include "gtest/gtest.h"

namespace microvmm::migration {
namespace {

class PageCodecTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto m = GuestMemory::Create(16 << 20);
    ASSERT_TRUE(m.ok());
    mem_ = std::move(*m);
  }
  uint8_t* Host(uint64_t gpa) { return *mem_->HostPtr(gpa, kPageSize); }
  std::unique_ptr<GuestMemory> mem_;
};

TEST_F(PageCodecTest, ZeroPagesBecomeTagsAndOthersRaw) {
  std::vector<uint8_t> page(kPageSize, 0);
  PageRecord rec;
  EXPECT_EQ(EncodePage(0x3000, page.data(), &rec), 12u);
  EXPECT_EQ(rec.codec(), ZERO);
  EXPECT_TRUE(rec.data().empty());
  page[kPageSize - 1] = 7;  // a single non-zero byte at the very end
  EXPECT_EQ(EncodePage(0x3000, page.data(), &rec), 12u + kPageSize);
  EXPECT_EQ(rec.codec(), RAW);
  EXPECT_EQ(rec.data().size(), kPageSize);
}

TEST_F(PageCodecTest, RawThenZeroClearsThePage) {
  ReceivedPages received(*mem_);
  std::vector<uint8_t> page(kPageSize, 0xab);
  PageRecord rec;
  EncodePage(0x5000, page.data(), &rec);
  ASSERT_TRUE(DecodePageInto(rec, *mem_, &received).ok());
  EXPECT_EQ(Host(0x5000)[100], 0xab);
  PageRecord zero;
  zero.set_gpa(0x5000);
  zero.set_codec(ZERO);
  ASSERT_TRUE(DecodePageInto(zero, *mem_, &received).ok());
  EXPECT_EQ(Host(0x5000)[100], 0);
}

TEST_F(PageCodecTest, ZeroForNeverWrittenPageDoesNotStore) {
  // Fresh incoming RAM is zero, so the decoder skips the store (no page fault). The skip is
  // observable only if something else wrote the page behind the decoder's back.
  ReceivedPages received(*mem_);
  std::memset(Host(0x7000), 0x11, kPageSize);
  PageRecord zero;
  zero.set_gpa(0x7000);
  zero.set_codec(ZERO);
  ASSERT_TRUE(DecodePageInto(zero, *mem_, &received).ok());
  EXPECT_EQ(Host(0x7000)[0], 0x11);
  // Without the tracker every ZERO record is stored.
  ASSERT_TRUE(DecodePageInto(zero, *mem_).ok());
  EXPECT_EQ(Host(0x7000)[0], 0);
}

TEST_F(PageCodecTest, MalformedRecordsAreRejectedWithoutWriting) {
  std::memset(Host(0x2000), 0x5a, kPageSize);
  auto expect_bad = [&](PageRecord rec) {
    absl::Status s = DecodePageInto(rec, *mem_);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << rec.DebugString();
    EXPECT_EQ(Host(0x2000)[0], 0x5a);
  };
  PageRecord r;
  r.set_gpa(0x2001);  // unaligned
  r.set_codec(ZERO);
  expect_bad(r);
  r.set_gpa(16 << 20);  // just past RAM
  expect_bad(r);
  r.set_gpa(0xC0000000);  // in the MMIO gap
  expect_bad(r);
  r.set_gpa(0x2000);
  r.set_codec(RAW);
  r.set_data(std::string(100, 'x'));  // short raw page
  expect_bad(r);
  r.set_codec(ZERO);  // zero page carrying data
  expect_bad(r);
  r.clear_data();
  r.set_codec(static_cast<PageCodec>(42));  // unknown codec
  expect_bad(r);
}

TEST_F(PageCodecTest, StreamAssignmentIsStablePerChunk) {
  for (uint32_t n : {1u, 2u, 5u, 16u}) {
    for (uint64_t gpa = 0; gpa < (8u << 20); gpa += kPageSize) {
      uint32_t s = StreamForPage(gpa, n);
      ASSERT_LT(s, n);
      // Every page of one 256 KiB chunk travels on the same stream.
      EXPECT_EQ(s, StreamForPage(gpa & ~((256u << 10) - 1), n));
    }
  }
}

}  // namespace
}  // namespace microvmm::migration
