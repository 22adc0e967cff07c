// Page records of the migration stream: encoding (zero detection) and strict decoding.
#ifndef MICROVMM_MIGRATION_STREAM_PAGE_CODEC_H_
#define MICROVMM_MIGRATION_STREAM_PAGE_CODEC_H_

#include <cstdint>
#include <atomic>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "proto/migration.pb.h"
#include "vmm/memory/guest_memory.h"

namespace microvmm::migration {

bool IsZeroPage(const uint8_t* page);

// Fills `rec` with a ZERO tag for `gpa`. Returns wire bytes.
uint64_t EncodeZeroPage(uint64_t gpa, PageRecord* rec);

// Fills `rec` for the page at `gpa` whose bytes are `page` (kPageSize). Returns wire bytes.
uint64_t EncodePage(uint64_t gpa, const uint8_t* page, PageRecord* rec);

// Pages of a fresh destination VM that have been given non-zero content. Guest RAM of an incoming
// VM starts as all zeros (new memfd), so a ZERO record for a page never written needs no store —
// and no page fault, which dominates receiving an idle guest. Thread-safe (atomic bits).
class ReceivedPages {
 public:
  explicit ReceivedPages(const GuestMemory& mem);
  bool Test(uint64_t gpa) const;
  void Set(uint64_t gpa);

 private:
  struct Region {
    uint64_t gpa, size;
    std::unique_ptr<std::atomic<uint64_t>[]> bits;
  };
  std::vector<Region> regions_;
};

// Validates `rec` against `mem` and writes the page (with `received`: skips ZERO records for
// pages that are still zero). Never writes outside guest RAM; malformed
// records (unaligned / out-of-range gpa, unknown codec, wrong length) are INVALID_ARGUMENT.
// LZ4 (one block) and ZSTD (exactly one frame whose header declares kPageSize) must decompress
// to exactly one page; anything else (truncated, trailing bytes, bombs, garbage, > kPageSize+512
// bytes) is INVALID_ARGUMENT and leaves the guest page untouched. XBZRLE: UNIMPLEMENTED for now.
absl::Status DecodePageInto(const PageRecord& rec, GuestMemory& mem,
                            ReceivedPages* received = nullptr);

// Stream a page travels on: fixed per page so re-sends of one page stay ordered.
inline uint32_t StreamForPage(uint64_t gpa, uint32_t streams) {
  return static_cast<uint32_t>((gpa >> 18) % streams);  // 256 KiB chunks
}

}  // namespace microvmm::migration

#endif  // MICROVMM_MIGRATION_STREAM_PAGE_CODEC_H_
