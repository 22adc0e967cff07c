// Page records of the migration stream: encoding (zero detection) and strict decoding.
#ifndef MICROVMM_MIGRATION_STREAM_PAGE_CODEC_H_
#define MICROVMM_MIGRATION_STREAM_PAGE_CODEC_H_

#include <cstdint>
#include <span>

#include "absl/status/status.h"
#include "proto/migration.pb.h"
#include "vmm/memory/guest_memory.h"

namespace microvmm::migration {

bool IsZeroPage(const uint8_t* page);

// Fills `rec` for the page at `gpa` whose bytes are `page` (kPageSize). Returns wire bytes.
uint64_t EncodePage(uint64_t gpa, const uint8_t* page, PageRecord* rec);

// Validates `rec` against `mem` and writes the page. Never writes outside guest RAM; malformed
// records (unaligned / out-of-range gpa, unknown codec, wrong length) are INVALID_ARGUMENT.
absl::Status DecodePageInto(const PageRecord& rec, GuestMemory& mem);

// Stream a page travels on: fixed per page so re-sends of one page stay ordered.
inline uint32_t StreamForPage(uint64_t gpa, uint32_t streams) {
  return static_cast<uint32_t>((gpa >> 18) % streams);  // 256 KiB chunks
}

}  // namespace microvmm::migration

#endif  // MICROVMM_MIGRATION_STREAM_PAGE_CODEC_H_
