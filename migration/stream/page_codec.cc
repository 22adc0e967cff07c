#include "migration/stream/page_codec.h"

#include "migration/stream/xbzrle.h"

#include <cstring>
#include <memory>

#include "absl/strings/str_format.h"
#include "lz4.h"
#include "migration/stream/xbzrle.h"
#include "zstd.h"

namespace microvmm::migration {

bool IsZeroPage(const uint8_t* page) {
  const uint64_t* w = reinterpret_cast<const uint64_t*>(page);
  for (size_t i = 0; i < kPageSize / 8; i += 8) {
    if ((w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7]) != 0)
      return false;
  }
  return true;
}

uint64_t EncodeZeroPage(uint64_t gpa, PageRecord* rec) {
  rec->set_gpa(gpa);
  rec->set_codec(ZERO);
  return 12;
}

uint64_t EncodePage(uint64_t gpa, const uint8_t* page, PageRecord* rec) {
  if (IsZeroPage(page)) return EncodeZeroPage(gpa, rec);
  rec->set_gpa(gpa);
  rec->set_codec(RAW);
  rec->set_data(page, kPageSize);
  return 12 + kPageSize;
}

ReceivedPages::ReceivedPages(const GuestMemory& mem) {
  for (const auto& r : mem.regions()) {
    uint64_t words = (r.size / kPageSize + 63) / 64;
    Region reg{r.gpa, r.size, std::unique_ptr<std::atomic<uint64_t>[]>(new std::atomic<uint64_t>[words])};
    for (uint64_t i = 0; i < words; ++i) reg.bits[i].store(0, std::memory_order_relaxed);
    regions_.push_back(std::move(reg));
  }
}

bool ReceivedPages::Test(uint64_t gpa) const {
  for (const auto& r : regions_)
    if (gpa >= r.gpa && gpa - r.gpa < r.size) {
      uint64_t pg = (gpa - r.gpa) / kPageSize;
      return (r.bits[pg / 64].load(std::memory_order_relaxed) >> (pg % 64)) & 1;
    }
  return true;  // unknown: assume written (forces the store)
}

void ReceivedPages::Set(uint64_t gpa) {
  for (auto& r : regions_)
    if (gpa >= r.gpa && gpa - r.gpa < r.size) {
      uint64_t pg = (gpa - r.gpa) / kPageSize;
      r.bits[pg / 64].fetch_or(1ULL << (pg % 64), std::memory_order_relaxed);
      return;
    }
}

namespace {

// Largest compressed record accepted. A compressed page larger than the page itself is never
// sent (the encoder falls back to RAW), but the decoder stays tolerant up to the codecs' own worst
// case for one page; anything bigger is garbage and rejected before any decompression work.
constexpr size_t kMaxCompressedBytes = kPageSize + 512;
static_assert(LZ4_COMPRESSBOUND(kPageSize) <= kMaxCompressedBytes);
static_assert(ZSTD_COMPRESSBOUND(kPageSize) <= kMaxCompressedBytes);

struct DCtxFree {
  void operator()(ZSTD_DCtx* c) const { ZSTD_freeDCtx(c); }
};

// Decompresses `data` (codec LZ4 or ZSTD) into `out` (kPageSize bytes). Strict: the input must
// decode to exactly one page and be consumed completely; no write past `out + kPageSize`.
absl::Status DecompressPage(PageCodec codec, const std::string& data, uint8_t* out) {
  if (data.empty() || data.size() > kMaxCompressedBytes)
    return absl::InvalidArgumentError(absl::StrFormat("%d compressed bytes", data.size()));
  if (codec == LZ4) {
    // Block format: LZ4_decompress_safe bounds every read by srcSize and every write by
    // dstCapacity, and fails unless the input ends exactly at the end of a sequence.
    int n = LZ4_decompress_safe(data.data(), reinterpret_cast<char*>(out),
                                static_cast<int>(data.size()), static_cast<int>(kPageSize));
    if (n != static_cast<int>(kPageSize))
      return absl::InvalidArgumentError(
          n < 0 ? std::string("corrupt lz4 block")
                : absl::StrFormat("lz4 block decodes to %d bytes", n));
    return absl::OkStatus();
  }
  // ZSTD: exactly one frame (no trailing bytes, no skippable frame, no second frame) whose header
  // declares a content size of exactly one page. The declared size is checked before decoding,
  // and the single-pass decoder cannot produce more than dstCapacity (a bomb is dstSize_tooSmall),
  // so a lying header cannot make us write or allocate more.
  unsigned long long declared = ZSTD_getFrameContentSize(data.data(), data.size());
  if (declared != kPageSize)
    return absl::InvalidArgumentError(
        declared == ZSTD_CONTENTSIZE_ERROR     ? std::string("not a zstd frame")
        : declared == ZSTD_CONTENTSIZE_UNKNOWN ? std::string("zstd frame without content size")
                                               : absl::StrFormat("zstd frame of %d bytes", declared));
  size_t frame = ZSTD_findFrameCompressedSize(data.data(), data.size());
  if (ZSTD_isError(frame) || frame != data.size())
    return absl::InvalidArgumentError("zstd record is not exactly one frame");
  thread_local std::unique_ptr<ZSTD_DCtx, DCtxFree> dctx(ZSTD_createDCtx());
  if (!dctx) return absl::ResourceExhaustedError("ZSTD_createDCtx failed");
  size_t n = ZSTD_decompressDCtx(dctx.get(), out, kPageSize, data.data(), data.size());
  if (ZSTD_isError(n)) return absl::InvalidArgumentError(ZSTD_getErrorName(n));
  if (n != kPageSize) return absl::InvalidArgumentError(absl::StrFormat("zstd frame decodes to %d bytes", n));
  return absl::OkStatus();
}

}  // namespace

absl::Status DecodePageInto(const PageRecord& rec, GuestMemory& mem, ReceivedPages* received) {
  if (rec.gpa() % kPageSize != 0)
    return absl::InvalidArgumentError(absl::StrFormat("page record gpa 0x%x is not page aligned", rec.gpa()));
  auto p = mem.HostPtr(rec.gpa(), kPageSize);
  if (!p.ok())
    return absl::InvalidArgumentError(
        absl::StrFormat("page record gpa 0x%x is outside guest RAM", rec.gpa()));
  switch (rec.codec()) {
    case RAW:
      if (rec.data().size() != kPageSize)
        return absl::InvalidArgumentError(absl::StrFormat(
            "raw page 0x%x has %d bytes, expected %d", rec.gpa(), rec.data().size(), kPageSize));
      std::memcpy(*p, rec.data().data(), kPageSize);
      if (received != nullptr) received->Set(rec.gpa());
      return absl::OkStatus();
    case ZERO:
      if (!rec.data().empty())
        return absl::InvalidArgumentError(
            absl::StrFormat("zero page 0x%x carries %d bytes of data", rec.gpa(), rec.data().size()));
      if (received == nullptr || received->Test(rec.gpa())) std::memset(*p, 0, kPageSize);
      return absl::OkStatus();
    case LZ4:
    case ZSTD: {
      // Decode into a scratch page first: a record that turns out to be corrupt half-way must
      // leave the guest page untouched (it keeps its previous, consistent content). The extra
      // 4 KiB copy is small next to the decompression itself.
      alignas(64) uint8_t scratch[kPageSize];
      if (absl::Status s = DecompressPage(rec.codec(), rec.data(), scratch); !s.ok())
        return absl::InvalidArgumentError(
            absl::StrFormat("compressed page 0x%x: %s", rec.gpa(), s.message()));
      std::memcpy(*p, scratch, kPageSize);
      if (received != nullptr) received->Set(rec.gpa());
      return absl::OkStatus();
    }
    case XBZRLE: {
      // A delta against the copy this side holds: only for a page that was received (a page
      // never received is zeros here, which no source delta is based on). XbzrleApply validates
      // the whole delta before it writes, so a bad record leaves the page as it was.
      if (received != nullptr && !received->Test(rec.gpa()))
        return absl::InvalidArgumentError(
            absl::StrFormat("page 0x%x: delta record for a page never received", rec.gpa()));
      absl::Status s = XbzrleApply(
          std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(rec.data().data()),
                                   rec.data().size()),
          std::span<uint8_t>(*p, kPageSize));
      if (!s.ok())
        return absl::InvalidArgumentError(
            absl::StrFormat("delta page 0x%x: %s", rec.gpa(), s.message()));
      return absl::OkStatus();
    }
    default:
      return absl::InvalidArgumentError(
          absl::StrFormat("page 0x%x has unknown codec %d", rec.gpa(), static_cast<int>(rec.codec())));
  }
}

}  // namespace microvmm::migration
