// DecodePageInto for every codec: round trips on every page kind, and strict rejection of
// corrupt, truncated, oversized and "bomb" records without touching the guest page.
#include <lz4.h>
#include <zstd.h>

#include <cstring>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "migration/stream/page_codec.h"
#include "migration/stream/xbzrle.h"
#include "tests/stream/test_pages.h"

namespace microvmm::migration {
namespace {

using testing::Kind;
using testing::MakePage;

std::string Lz4(const uint8_t* src, size_t n, int accel = 1) {
  std::string out(LZ4_compressBound(n), '\0');
  int c = LZ4_compress_fast(reinterpret_cast<const char*>(src), out.data(), n, out.size(), accel);
  EXPECT_GT(c, 0);
  out.resize(c);
  return out;
}

std::string Zstd(const uint8_t* src, size_t n, int level = 1, bool content_size = true) {
  ZSTD_CCtx* c = ZSTD_createCCtx();
  ZSTD_CCtx_setParameter(c, ZSTD_c_compressionLevel, level);
  ZSTD_CCtx_setParameter(c, ZSTD_c_contentSizeFlag, content_size ? 1 : 0);
  std::string out(ZSTD_compressBound(n), '\0');
  size_t r = ZSTD_compress2(c, out.data(), out.size(), src, n);
  ZSTD_freeCCtx(c);
  EXPECT_FALSE(ZSTD_isError(r)) << ZSTD_getErrorName(r);
  out.resize(r);
  return out;
}

class PageDecodeTest : public ::testing::Test {
 protected:
  static constexpr uint64_t kGpa = 0x4000;
  void SetUp() override {
    auto m = GuestMemory::Create(4 << 20);
    ASSERT_TRUE(m.ok());
    mem_ = std::move(*m);
  }
  uint8_t* Host(uint64_t gpa) { return *mem_->HostPtr(gpa, kPageSize); }
  PageRecord Rec(PageCodec codec, std::string data, uint64_t gpa = kGpa) {
    PageRecord r;
    r.set_gpa(gpa);
    r.set_codec(codec);
    r.set_data(std::move(data));
    return r;
  }
  void ExpectRoundTrip(const PageRecord& rec, const std::vector<uint8_t>& page) {
    std::memset(Host(kGpa), 0xee, kPageSize);
    ASSERT_TRUE(DecodePageInto(rec, *mem_).ok()) << DecodePageInto(rec, *mem_);
    EXPECT_EQ(std::memcmp(Host(kGpa), page.data(), kPageSize), 0);
    // Neighbours untouched.
    EXPECT_EQ(Host(kGpa - kPageSize)[kPageSize - 1], 0);
    EXPECT_EQ(Host(kGpa + kPageSize)[0], 0);
  }
  // A bad record is INVALID_ARGUMENT and leaves the (pre-filled) page as it was.
  void ExpectRejected(const PageRecord& rec, const char* what) {
    std::memset(Host(kGpa), 0x77, kPageSize);
    absl::Status s = DecodePageInto(rec, *mem_);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << what << ": " << s;
    std::vector<uint8_t> want(kPageSize, 0x77);
    EXPECT_EQ(std::memcmp(Host(kGpa), want.data(), kPageSize), 0) << what << " wrote the page";
  }
  std::unique_ptr<GuestMemory> mem_;
};

TEST_F(PageDecodeTest, EveryCodecRoundTripsEveryPageKind) {
  for (Kind k : testing::kAllKinds) {
    SCOPED_TRACE(testing::KindName(k));
    auto page = MakePage(k, 17);
    ExpectRoundTrip(Rec(RAW, std::string(page.begin(), page.end())), page);
    for (int accel : {1, 4, 65537}) ExpectRoundTrip(Rec(LZ4, Lz4(page.data(), kPageSize, accel)), page);
    for (int level : {-5, -1, 1, 3, 19}) ExpectRoundTrip(Rec(ZSTD, Zstd(page.data(), kPageSize, level)), page);
    if (k == Kind::kZero) ExpectRoundTrip(Rec(ZERO, ""), page);
  }
}

TEST_F(PageDecodeTest, CompressedRecordsMarkThePageReceived) {
  ReceivedPages received(*mem_);
  auto page = MakePage(Kind::kText, 3);
  ASSERT_TRUE(DecodePageInto(Rec(LZ4, Lz4(page.data(), kPageSize)), *mem_, &received).ok());
  EXPECT_TRUE(received.Test(kGpa));
  EXPECT_FALSE(received.Test(kGpa + kPageSize));
  ASSERT_TRUE(
      DecodePageInto(Rec(ZSTD, Zstd(page.data(), kPageSize), kGpa + kPageSize), *mem_, &received)
          .ok());
  EXPECT_TRUE(received.Test(kGpa + kPageSize));
  // A rejected record does not mark its page.
  EXPECT_FALSE(DecodePageInto(Rec(LZ4, "junk", kGpa + 2 * kPageSize), *mem_, &received).ok());
  EXPECT_FALSE(received.Test(kGpa + 2 * kPageSize));
}

TEST_F(PageDecodeTest, TruncatedAndPaddedLz4IsRejected) {
  auto page = MakePage(Kind::kText, 5);
  std::string c = Lz4(page.data(), kPageSize);
  ExpectRejected(Rec(LZ4, c.substr(0, c.size() - 1)), "lz4 minus one byte");
  ExpectRejected(Rec(LZ4, c.substr(0, c.size() / 2)), "lz4 half");
  ExpectRejected(Rec(LZ4, c + std::string(1, '\0')), "lz4 plus trailing byte");
  ExpectRejected(Rec(LZ4, ""), "empty lz4");
  // A valid block of a different size: short page, and a bomb (2 pages into a 1-page buffer).
  ExpectRejected(Rec(LZ4, Lz4(page.data(), kPageSize / 2)), "lz4 half page");
  std::vector<uint8_t> two(2 * kPageSize, 0);
  ExpectRejected(Rec(LZ4, Lz4(two.data(), two.size())), "lz4 two pages");
  std::vector<uint8_t> big(1 << 20, 0);
  ExpectRejected(Rec(LZ4, Lz4(big.data(), big.size())), "lz4 1 MiB of zeros");
}

TEST_F(PageDecodeTest, MalformedZstdIsRejected) {
  auto page = MakePage(Kind::kText, 6);
  std::string c = Zstd(page.data(), kPageSize);
  ExpectRejected(Rec(ZSTD, c.substr(0, c.size() - 1)), "zstd minus one byte");
  ExpectRejected(Rec(ZSTD, c.substr(0, 6)), "zstd header only");
  ExpectRejected(Rec(ZSTD, c + "x"), "zstd plus trailing byte");
  ExpectRejected(Rec(ZSTD, c + c), "two zstd frames");
  ExpectRejected(Rec(ZSTD, ""), "empty zstd");
  ExpectRejected(Rec(ZSTD, Zstd(page.data(), kPageSize, 1, /*content_size=*/false)),
                 "zstd without content size");
  ExpectRejected(Rec(ZSTD, Zstd(page.data(), kPageSize / 2)), "zstd half page");
  std::vector<uint8_t> big(1 << 20, 0);
  ExpectRejected(Rec(ZSTD, Zstd(big.data(), big.size())), "zstd 1 MiB of zeros");
  // Skippable frame (magic 0x184D2A50, 4-byte size, payload).
  std::string skip("\x50\x2a\x4d\x18\x04\x00\x00\x00" "abcd", 12);
  ASSERT_EQ(ZSTD_findFrameCompressedSize(skip.data(), skip.size()), skip.size());  // well formed
  ExpectRejected(Rec(ZSTD, skip), "skippable frame");
  ExpectRejected(Rec(ZSTD, skip + c), "skippable frame + page");
}

TEST_F(PageDecodeTest, ZstdHeaderLyingAboutItsSizeIsRejected) {
  // A two-page frame whose header is patched to declare one page: the declared-size check
  // passes, the single-pass decoder must then refuse to write past the page.
  std::vector<uint8_t> two = MakePage(Kind::kText, 8);
  auto second = MakePage(Kind::kPattern, 9);
  two.insert(two.end(), second.begin(), second.end());
  std::string c = Zstd(two.data(), two.size());
  // Frame header: magic (4), descriptor: bits 7-6 FCS field size flag, bit 5 single segment.
  uint8_t fhd = static_cast<uint8_t>(c[4]);
  ASSERT_EQ(fhd >> 6, 1) << "expected a 2-byte content size field (value - 256)";
  ASSERT_TRUE(fhd & 0x20) << "expected single-segment (no window descriptor)";
  uint16_t declared = static_cast<uint16_t>(kPageSize - 256);
  std::memcpy(&c[5], &declared, 2);
  ASSERT_EQ(ZSTD_getFrameContentSize(c.data(), c.size()), kPageSize);
  ExpectRejected(Rec(ZSTD, c), "zstd lying header");
}

TEST_F(PageDecodeTest, GarbageAndOversizedRecordsAreRejected) {
  std::mt19937_64 rng(1);
  for (int i = 0; i < 200; ++i) {
    std::string g(1 + rng() % 5000, '\0');
    for (auto& ch : g) ch = static_cast<char>(rng());
    // Random bytes are almost never a valid one-page block; if one is, it must still be exact.
    for (PageCodec codec : {LZ4, ZSTD}) {
      std::memset(Host(kGpa), 0x77, kPageSize);
      absl::Status s = DecodePageInto(Rec(codec, g), *mem_);
      if (!s.ok()) {
        EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
        EXPECT_EQ(Host(kGpa)[0], 0x77);
        EXPECT_EQ(Host(kGpa)[kPageSize - 1], 0x77);
      }
    }
  }
  // Larger than any real compressed page.
  std::string huge(kPageSize * 2, 'a');
  ExpectRejected(Rec(LZ4, huge), "oversized lz4");
  ExpectRejected(Rec(ZSTD, huge), "oversized zstd");
  ExpectRejected(Rec(RAW, huge), "oversized raw");
}

TEST_F(PageDecodeTest, CompressedRecordsOutsideRamOrUnalignedAreRejected) {
  auto page = MakePage(Kind::kText, 2);
  std::string c = Lz4(page.data(), kPageSize);
  EXPECT_EQ(DecodePageInto(Rec(LZ4, c, 4 << 20), *mem_).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(DecodePageInto(Rec(LZ4, c, kGpa + 8), *mem_).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(DecodePageInto(Rec(ZSTD, Zstd(page.data(), kPageSize), ~0ULL & ~(kPageSize - 1)), *mem_)
                .code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(PageDecodeTest, XbzrleDeltaAppliesToTheReceivedPage) {
  ReceivedPages received(*mem_);
  auto old_page = MakePage(Kind::kText, 3);
  ASSERT_TRUE(DecodePageInto(Rec(RAW, std::string(old_page.begin(), old_page.end())), *mem_,
                             &received)
                  .ok());
  auto new_page = old_page;
  new_page[17] ^= 0x5a;
  new_page[kPageSize - 1] ^= 0x01;
  std::string delta;
  ASSERT_TRUE(XbzrleEncode(old_page, new_page, kPageSize, &delta));
  ASSERT_TRUE(DecodePageInto(Rec(XBZRLE, delta), *mem_, &received).ok());
  auto host = mem_->HostPtr(kGpa, kPageSize);
  ASSERT_TRUE(host.ok());
  EXPECT_EQ(std::memcmp(*host, new_page.data(), kPageSize), 0);
}

TEST_F(PageDecodeTest, BadXbzrleLeavesThePageAndNeverReceivedIsRefused) {
  ReceivedPages received(*mem_);
  auto page = MakePage(Kind::kText, 4);
  ASSERT_TRUE(
      DecodePageInto(Rec(RAW, std::string(page.begin(), page.end())), *mem_, &received).ok());
  std::string delta;
  auto changed = page;
  changed[100] ^= 1;
  ASSERT_TRUE(XbzrleEncode(page, changed, kPageSize, &delta));
  for (const std::string& bad :
       {delta.substr(0, delta.size() - 1), delta + "x", std::string(), std::string("\xff\xff\xff\xff\xff\xff", 6)}) {
    EXPECT_EQ(DecodePageInto(Rec(XBZRLE, bad), *mem_, &received).code(),
              absl::StatusCode::kInvalidArgument);
    auto host = mem_->HostPtr(kGpa, kPageSize);
    ASSERT_TRUE(host.ok());
    EXPECT_EQ(std::memcmp(*host, page.data(), kPageSize), 0) << "a bad delta changed the page";
  }
  // A delta for a page this side never received (it holds zeros no delta is based on).
  EXPECT_EQ(DecodePageInto(Rec(XBZRLE, delta, kGpa + kPageSize), *mem_, &received).code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace microvmm::migration
