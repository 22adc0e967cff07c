#include "migration/stream/xbzrle.h"

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "gtest/gtest.h"

namespace microvmm::migration {
namespace {

using Bytes = std::vector<uint8_t>;

std::span<const uint8_t> S(const std::string& s) {
  return {reinterpret_cast<const uint8_t*>(s.data()), s.size()};
}

Bytes Pattern(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  Bytes p(n);
  for (auto& b : p) b = static_cast<uint8_t>(rng());
  return p;
}

// Encodes old->new (must fit), checks it validates and applies back to exactly `new`.
std::string RoundTrip(const Bytes& old_page, const Bytes& new_page) {
  std::string delta;
  EXPECT_TRUE(XbzrleEncode(old_page, new_page, XbzrleMaxDeltaSize(old_page.size()), &delta));
  EXPECT_LE(delta.size(), XbzrleMaxDeltaSize(old_page.size()));
  EXPECT_TRUE(XbzrleValidate(S(delta), old_page.size()).ok());
  Bytes page = old_page;
  EXPECT_TRUE(XbzrleApply(S(delta), page).ok());
  EXPECT_EQ(page, new_page);
  return delta;
}

std::string Hex(const std::string& s) {
  std::string out;
  for (unsigned char c : s) out += absl::StrFormat("%02X ", c);
  return out;
}

TEST(XbzrleTest, UnchangedPageIsOneRun) {
  Bytes p = Pattern(4096, 1);
  EXPECT_EQ(Hex(RoundTrip(p, p)), "80 20 00 ");  // skip 4096, len 0
}

TEST(XbzrleTest, AllChanged) {
  Bytes a(4096, 0x11), b(4096, 0x22);
  std::string d = RoundTrip(a, b);
  EXPECT_EQ(d.size(), 4099u);
  EXPECT_EQ(XbzrleMaxDeltaSize(4096), 4099u);
  EXPECT_EQ(Hex(d.substr(0, 4)), "00 80 20 22 ");
}

TEST(XbzrleTest, HeaderExampleIsExact) {
  Bytes a(4096, 0), b(4096, 0);
  b[10] = 0xAA;
  b[11] = 0xBB;
  b[4095] = 0xCC;
  EXPECT_EQ(Hex(RoundTrip(a, b)), "0A 02 AA BB F3 1F 01 CC ");
}

TEST(XbzrleTest, EdgesAtPageStartAndEnd) {
  Bytes a = Pattern(4096, 2);
  for (size_t pos : {size_t{0}, size_t{1}, size_t{7}, size_t{8}, size_t{31}, size_t{32},
                     size_t{4088}, size_t{4094}, size_t{4095}}) {
    Bytes b = a;
    b[pos] ^= 0xFF;
    RoundTrip(a, b);
  }
  Bytes b = a;
  b[0] ^= 1;
  b[4095] ^= 1;
  std::string d = RoundTrip(a, b);
  EXPECT_EQ(Hex(d.substr(0, 2)), "00 01 ");  // first run starts with skip 0
}

TEST(XbzrleTest, ShortGapsAreMergedLongGapsSplit) {
  Bytes a(4096, 0);
  Bytes b = a;
  b[100] = 1;
  b[102] = 1;  // gap of 1 -> one run of 3 bytes
  EXPECT_EQ(Hex(RoundTrip(a, b).substr(0, 3)), "64 03 01 ");
  b = a;
  b[100] = 1;
  b[104] = 1;  // gap of 3 -> two runs
  EXPECT_EQ(Hex(RoundTrip(a, b).substr(0, 6)), "64 01 01 03 01 01 ");
  b = a;
  b[4093] = 1;  // short unchanged tail (2 bytes) is resent, no tail run
  EXPECT_EQ(Hex(RoundTrip(a, b)), "FD 1F 03 01 00 00 ");
}

TEST(XbzrleTest, OddPageSizes) {
  // Partial bitmap words, and pages larger than 4 KiB (bitmap on the heap).
  for (size_t n : {size_t{1}, size_t{2}, size_t{7}, size_t{9}, size_t{33}, size_t{63}, size_t{64},
                   size_t{65}, size_t{127}, size_t{4095}, size_t{4097}, size_t{8192 + 5}}) {
    Bytes a = Pattern(n, static_cast<uint32_t>(n));
    RoundTrip(a, a);
    Bytes b = Pattern(n, static_cast<uint32_t>(n) + 1000);
    RoundTrip(a, b);
    Bytes c = a;
    c[n - 1] ^= 0x80;
    RoundTrip(a, c);
  }
}

TEST(XbzrleTest, RandomChangesRoundTrip) {
  std::mt19937 rng(42);
  for (int iter = 0; iter < 2000; ++iter) {
    Bytes a = Pattern(4096, static_cast<uint32_t>(iter));
    Bytes b = a;
    const int mode = iter % 3;
    const size_t changes = rng() % (iter % 50 == 0 ? 4096 : 64);
    for (size_t k = 0; k < changes; ++k) {
      size_t pos = rng() % 4096;
      size_t len = mode == 0 ? 1 : (mode == 1 ? 8 : rng() % 300);
      for (size_t i = pos; i < std::min<size_t>(4096, pos + len); ++i) {
        b[i] = static_cast<uint8_t>(rng());
      }
    }
    RoundTrip(a, b);
  }
}

// Byte-at-a-time reference of the encoder's run choice (gaps < 3 merged, short tail resent).
std::string ReferenceEncode(const Bytes& a, const Bytes& b) {
  const size_t n = a.size();
  auto varint = [](std::string* s, size_t v) {
    for (; v >= 0x80; v >>= 7) s->push_back(static_cast<char>(v | 0x80));
    s->push_back(static_cast<char>(v));
  };
  std::string out;
  size_t pos = 0, i = 0;
  while (true) {
    while (i < n && a[i] == b[i]) ++i;
    if (i == n) break;
    size_t start = i, end = i;
    while (true) {
      while (end < n && a[end] != b[end]) ++end;
      size_t next = end;
      while (next < n && a[next] == b[next]) ++next;
      if (next == n) {
        if (next - end < 3) end = n;
        break;
      }
      if (next - end >= 3) break;
      end = next;
    }
    varint(&out, start - pos);
    varint(&out, end - start);
    out.append(reinterpret_cast<const char*>(&b[start]), end - start);
    pos = i = end;
  }
  if (pos < n) {
    varint(&out, n - pos);
    varint(&out, 0);
  }
  return out;
}

TEST(XbzrleTest, MatchesByteAtATimeReference) {
  std::mt19937 rng(7);
  for (int iter = 0; iter < 3000; ++iter) {
    const size_t n = iter % 4 == 0 ? 1 + rng() % 300 : 4096;
    Bytes a = Pattern(n, static_cast<uint32_t>(iter)), b = a;
    const double density = std::ldexp(1.0, -static_cast<int>(rng() % 12));  // 1 .. 1/2048
    for (size_t i = 0; i < n; ++i) {
      if (rng() % 1000000 < density * 1000000) b[i] ^= static_cast<uint8_t>(1 + rng() % 255);
    }
    std::string d;
    ASSERT_TRUE(XbzrleEncode(a, b, XbzrleMaxDeltaSize(n), &d));
    ASSERT_EQ(Hex(d), Hex(ReferenceEncode(a, b))) << "iter " << iter;
  }
}

TEST(XbzrleTest, MaxOutBoundIsExact) {
  Bytes a(4096, 0), b = a;
  for (size_t i = 0; i < 4096; i += 97) b[i] = 7;
  std::string d = RoundTrip(a, b);
  std::string out;
  EXPECT_TRUE(XbzrleEncode(a, b, d.size(), &out));
  EXPECT_EQ(out, d);
  EXPECT_FALSE(XbzrleEncode(a, b, d.size() - 1, &out));
  EXPECT_FALSE(XbzrleEncode(a, b, 0, &out));
  Bytes c(4096, 1);
  EXPECT_FALSE(XbzrleEncode(a, c, 4096, &out));  // all changed needs 4099
}

TEST(XbzrleTest, SizeMismatchRefused) {
  Bytes a(4096), b(4095), e;
  std::string out;
  EXPECT_FALSE(XbzrleEncode(a, b, 10000, &out));
  EXPECT_FALSE(XbzrleEncode(e, e, 10000, &out));
}

// --- Malformed deltas: each class must be INVALID_ARGUMENT and leave the page untouched. ---

struct Bad {
  const char* name;
  std::string delta;
  const char* message;  // substring of the error
};

std::string Str(std::initializer_list<int> bytes) {
  std::string s;
  for (int b : bytes) s.push_back(static_cast<char>(b));
  return s;
}

TEST(XbzrleTest, MalformedDeltasRejectedPageUntouched) {
  std::string full_changed = Str({0x00, 0x80, 0x20}) + std::string(4096, 'x');
  std::vector<Bad> cases = {
      {"empty", "", "truncated varint"},
      {"truncated varint", Str({0x80}), "truncated varint"},
      {"truncated len varint", Str({0x0A}), "truncated varint"},
      {"varint too long", Str({0x80, 0x80, 0x80, 0x80, 0x80, 0x01, 0x00}), "longer than 5"},
      {"varint overflow", Str({0xFF, 0xFF, 0xFF, 0xFF, 0x7F, 0x00}), "past the page end"},
      {"non-minimal varint", Str({0x8A, 0x00, 0x01, 0x55}), "non-minimal"},
      {"skip past end", Str({0x81, 0x20, 0x00}), "unchanged run past"},
      {"len past end", Str({0xA0, 0x1F, 0x61}) + std::string(97, 'y'), "changed run past"},
      {"bytes truncated", Str({0x00, 0x80, 0x20}) + std::string(10, 'x'), "truncated"},
      {"one byte short", full_changed.substr(0, full_changed.size() - 1), "truncated"},
      {"trailing garbage", Str({0x80, 0x20, 0x00, 0x00}), "after the last run"},
      {"trailing after full", full_changed + "z", "after the last run"},
      {"covers too little", Str({0x0A, 0x01, 0x33}), "truncated varint"},
      {"zero skip mid page", Str({0x0A, 0x01, 0x33, 0x00, 0x01, 0x44}), "skip 0"},
      {"empty run mid page", Str({0x0A, 0x00, 0x05, 0x01, 0x44}), "no changed bytes"},
      {"empty first run", Str({0x00, 0x00}), "no changed bytes"},
  };
  const Bytes orig = Pattern(4096, 9);
  for (const Bad& c : cases) {
    SCOPED_TRACE(c.name);
    Bytes page = orig;
    absl::Status s = XbzrleApply(S(c.delta), page);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_NE(s.message().find(c.message), absl::string_view::npos) << s;
    EXPECT_EQ(page, orig);
    EXPECT_FALSE(XbzrleValidate(S(c.delta), 4096).ok());
  }
}

TEST(XbzrleTest, ValidPrefixThenErrorLeavesPageUntouched) {
  // The first runs are fine and would write; the error is only at the end.
  std::string d = Str({0x00, 0x04, 1, 2, 3, 4, 0x10, 0x02, 5, 6});
  const Bytes orig = Pattern(4096, 3);
  Bytes page = orig;
  EXPECT_FALSE(XbzrleApply(S(d), page).ok());
  EXPECT_EQ(page, orig);
}

TEST(XbzrleTest, WrongPageSizeRejected) {
  Bytes a(4096, 0), b = a;
  b[5] = 1;
  std::string d = RoundTrip(a, b);
  Bytes small(2048, 0), big(8192, 0);
  EXPECT_FALSE(XbzrleApply(S(d), small).ok());
  EXPECT_FALSE(XbzrleApply(S(d), big).ok());
  Bytes none;
  EXPECT_FALSE(XbzrleApply(S(d), none).ok());
  EXPECT_EQ(small, Bytes(2048, 0));
}

}  // namespace
}  // namespace microvmm::migration
