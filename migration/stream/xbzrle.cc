#include "migration/stream/xbzrle.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>

#include <emmintrin.h>  // SSE2: baseline on x86_64, the only target

#include "absl/strings/str_format.h"

namespace microvmm::migration {
namespace {

// Changed runs separated by fewer unchanged bytes than this are merged (see the header).
constexpr size_t kMinGap = 3;
constexpr int kMaxVarintBytes = 5;

// Bit i set <=> a[i] != b[i]. Built 64 bytes at a time with SSE2 compares (branch-free, as
// fast as memcmp), then runs are found with count-trailing-zeros on 64-bit words. A page full of
// short changes costs a few instructions per run instead of a byte or word scan loop whose exit
// branch mispredicts at every run boundary.
class DiffBits {
 public:
  DiffBits(const uint8_t* a, const uint8_t* b, size_t n) : n_(n), words_((n + 63) / 64) {
    if (words_ <= kInlineWords) {
      bits_ = inline_;
    } else {
      heap_.reset(new uint64_t[words_]);
      bits_ = heap_.get();
    }
    size_t i = 0;
    for (; i + 64 <= n; i += 64) bits_[i / 64] = Diff64(a + i, b + i);
    if (i < n) {  // partial last word; bits at and beyond n stay clear
      uint64_t m = 0;
      for (size_t j = i; j < n; ++j) m |= static_cast<uint64_t>(a[j] != b[j]) << (j - i);
      bits_[i / 64] = m;
    }
  }

  // First set bit >= i, or n.
  size_t NextSet(size_t i) const {
    if (i >= n_) return n_;
    size_t w = i / 64;
    uint64_t x = bits_[w] & (~0ULL << (i % 64));
    while (x == 0) {
      if (++w == words_) return n_;
      x = bits_[w];
    }
    return w * 64 + static_cast<size_t>(__builtin_ctzll(x));
  }

  // First clear bit >= i, or n.
  size_t NextClear(size_t i) const {
    if (i >= n_) return n_;
    size_t w = i / 64;
    uint64_t x = ~bits_[w] & (~0ULL << (i % 64));
    while (x == 0) {
      if (++w == words_) return n_;
      x = ~bits_[w];
    }
    return std::min(n_, w * 64 + static_cast<size_t>(__builtin_ctzll(x)));
  }

 private:
  static constexpr size_t kInlineWords = 64;  // 4 KiB pages need no allocation

  static uint64_t Diff64(const uint8_t* a, const uint8_t* b) {
    uint64_t same = 0;
    for (int k = 0; k < 4; ++k) {
      const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a + 16 * k));
      const __m128i y = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16 * k));
      same |= static_cast<uint64_t>(static_cast<uint16_t>(_mm_movemask_epi8(_mm_cmpeq_epi8(x, y))))
              << (16 * k);
    }
    return ~same;
  }

  const size_t n_, words_;
  uint64_t* bits_;
  uint64_t inline_[kInlineWords];
  std::unique_ptr<uint64_t[]> heap_;
};

inline size_t VarintLen(uint64_t v) {
  size_t len = 1;
  while (v >= 0x80) {
    v >>= 7;
    ++len;
  }
  return len;
}

inline uint8_t* PutVarint(uint64_t v, uint8_t* p) {
  while (v >= 0x80) {
    *p++ = static_cast<uint8_t>(v | 0x80);
    v >>= 7;
  }
  *p++ = static_cast<uint8_t>(v);
  return p;
}

// Appends one run at *p unless that would pass `end`.
inline bool EmitRun(size_t skip, size_t len, const uint8_t* bytes, uint8_t** p, uint8_t* end) {
  const size_t room = static_cast<size_t>(end - *p);
  // Exact size only near the limit; two varints never exceed 2 * 10 bytes.
  if (room < len + 20 && room < VarintLen(skip) + VarintLen(len) + len) return false;
  uint8_t* q = PutVarint(len, PutVarint(skip, *p));
  if (len != 0) std::memcpy(q, bytes, len);  // bytes is null for the tail run
  *p = q + len;
  return true;
}

// Encodes into buf[0, cap). Returns the delta size, or SIZE_MAX if it does not fit.
size_t EncodeInto(const uint8_t* a, const uint8_t* b, size_t n, uint8_t* buf, size_t cap) {
  const DiffBits diff(a, b, n);
  uint8_t* p = buf;
  uint8_t* const end = buf + cap;
  size_t pos = 0;                       // end of the last emitted run
  size_t start = diff.NextSet(0);       // first changed byte of the next run
  while (start < n) {
    // Extend the changed run over gaps shorter than kMinGap; `next` is the following change.
    size_t end_run = start, next;
    for (;;) {
      end_run = diff.NextClear(end_run);
      if (end_run == n) {
        next = n;
        break;
      }
      next = diff.NextSet(end_run);
      if (next - end_run >= kMinGap) break;
      if (next == n) {  // short unchanged tail: resend it rather than spend a run on it
        end_run = n;
        break;
      }
      end_run = next;
    }
    if (!EmitRun(start - pos, end_run - start, b + start, &p, end)) return SIZE_MAX;
    pos = end_run;
    start = next;
  }
  if (pos < n && !EmitRun(n - pos, 0, nullptr, &p, end)) return SIZE_MAX;
  return static_cast<size_t>(p - buf);
}

enum class ParseError {
  kNone,
  kEmptyPage,
  kVarintTruncated,
  kVarintTooLong,
  kVarintNotMinimal,
  kZeroSkip,
  kSkipOverrun,
  kLenOverrun,
  kEmptyRun,
  kBytesTruncated,
  kTrailing,
};

const char* ErrorText(ParseError e) {
  switch (e) {
    case ParseError::kNone: return "ok";
    case ParseError::kEmptyPage: return "page size is 0";
    case ParseError::kVarintTruncated: return "truncated varint (delta ends before the page does)";
    case ParseError::kVarintTooLong: return "varint longer than 5 bytes";
    case ParseError::kVarintNotMinimal: return "non-minimal varint";
    case ParseError::kZeroSkip: return "run with skip 0 after the first run";
    case ParseError::kSkipOverrun: return "unchanged run past the page end";
    case ParseError::kLenOverrun: return "changed run past the page end";
    case ParseError::kEmptyRun: return "run with no changed bytes before the page end";
    case ParseError::kBytesTruncated: return "changed bytes truncated";
    case ParseError::kTrailing: return "bytes after the last run";
  }
  return "?";
}

inline ParseError ReadVarint(const uint8_t* d, size_t size, size_t* in, uint64_t* v) {
  uint64_t value = 0;
  for (int i = 0; i < kMaxVarintBytes; ++i) {
    if (*in >= size) return ParseError::kVarintTruncated;
    const uint8_t byte = d[(*in)++];
    value |= static_cast<uint64_t>(byte & 0x7f) << (7 * i);
    if ((byte & 0x80) == 0) {
      if (byte == 0 && i > 0) return ParseError::kVarintNotMinimal;
      *v = value;
      return ParseError::kNone;
    }
  }
  return ParseError::kVarintTooLong;
}

// Walks the runs of `d` for an n-byte page, calling on_run(offset, bytes, len) for each changed
// run only after it is fully checked. Validation and application share this one parser, so
// XbzrleApply can never write something XbzrleValidate would not have accepted.
template <typename F>
ParseError ParseRuns(std::span<const uint8_t> delta, size_t n, size_t* err_at, F&& on_run) {
  if (n == 0) return ParseError::kEmptyPage;
  const uint8_t* d = delta.data();
  const size_t size = delta.size();
  size_t in = 0, covered = 0;
  ParseError e = ParseError::kNone;
  while (covered < n) {
    *err_at = in;
    uint64_t skip, len;
    if ((e = ReadVarint(d, size, &in, &skip)) != ParseError::kNone) return e;
    if (skip == 0 && covered != 0) return ParseError::kZeroSkip;
    if (skip > n - covered) return ParseError::kSkipOverrun;
    covered += skip;
    *err_at = in;
    if ((e = ReadVarint(d, size, &in, &len)) != ParseError::kNone) return e;
    if (len > n - covered) return ParseError::kLenOverrun;
    if (len == 0 && covered != n) return ParseError::kEmptyRun;
    if (len > size - in) return ParseError::kBytesTruncated;
    on_run(covered, d + in, static_cast<size_t>(len));
    in += len;
    covered += len;
  }
  *err_at = in;
  if (in != size) return ParseError::kTrailing;
  return ParseError::kNone;
}

absl::Status ToStatus(ParseError e, size_t at) {
  return absl::InvalidArgumentError(
      absl::StrFormat("xbzrle: %s (at delta offset %d)", ErrorText(e), at));
}

}  // namespace

size_t XbzrleMaxDeltaSize(size_t page_size) {
  return VarintLen(0) + VarintLen(page_size) + page_size;
}

bool XbzrleEncode(std::span<const uint8_t> old_page, std::span<const uint8_t> new_page,
                  size_t max_out, std::string* out) {
  const size_t n = new_page.size();
  out->clear();
  if (old_page.size() != n || n == 0) return false;
  const size_t cap = std::min(max_out, XbzrleMaxDeltaSize(n));
  // Small pages: encode on the stack and copy only the delta out (resizing the string first
  // would zero `cap` bytes, which costs as much as encoding an unchanged page).
  constexpr size_t kStackBuf = 4096 + 16;
  if (cap <= kStackBuf) {
    uint8_t buf[kStackBuf];
    const size_t len = EncodeInto(old_page.data(), new_page.data(), n, buf, cap);
    if (len == SIZE_MAX) return false;
    out->assign(reinterpret_cast<const char*>(buf), len);
    return true;
  }
  out->resize(cap);
  const size_t len = EncodeInto(old_page.data(), new_page.data(), n,
                                reinterpret_cast<uint8_t*>(out->data()), cap);
  if (len == SIZE_MAX) return false;
  out->resize(len);
  return true;
}

absl::Status XbzrleValidate(std::span<const uint8_t> delta, size_t page_size) {
  size_t at = 0;
  const ParseError e = ParseRuns(delta, page_size, &at, [](size_t, const uint8_t*, size_t) {});
  return e == ParseError::kNone ? absl::OkStatus() : ToStatus(e, at);
}

absl::Status XbzrleApply(std::span<const uint8_t> delta, std::span<uint8_t> page) {
  // Validate fully first so a malformed delta leaves the page untouched.
  if (absl::Status s = XbzrleValidate(delta, page.size()); !s.ok()) return s;
  size_t at = 0;
  uint8_t* p = page.data();
  ParseRuns(delta, page.size(), &at,
            [p](size_t off, const uint8_t* bytes, size_t len) {
              // Most runs of a dense delta are a few bytes: an inline loop beats a memcpy call.
              if (len <= 16) {
                for (size_t i = 0; i < len; ++i) p[off + i] = bytes[i];
              } else {
                std::memcpy(p + off, bytes, len);
              }
            });
  return absl::OkStatus();
}

}  // namespace microvmm::migration
