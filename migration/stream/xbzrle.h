// XBZRLE-like delta encoding of a re-sent page (PageRecord codec XBZRLE, proto/migration.proto).
//
// The source keeps the last version of a page it sent (migration/stream/delta_cache.h) and sends
// only the bytes that changed since; the destination applies the delta in place to the copy it
// already holds. The destination needs no cache.
//
// Wire format (this is the whole of PageRecord.data; the page size N is implicit — kPageSize for
// the migration stream — and not carried):
//
//   delta := run+
//   run   := skip:varint  len:varint  bytes[len]
//
//   - varint: unsigned LEB128, least significant 7-bit group first, bit 7 set on every byte but
//     the last. At most 5 bytes; must be minimal (a multi-byte varint may not end in 0x00).
//   - A run leaves `skip` bytes of the destination page unchanged, then overwrites the next `len`
//     bytes with `bytes`. Runs are consecutive: run k starts where run k-1 ended.
//   - The runs cover the page exactly: sum(skip + len) == N. Nothing may follow the last run.
//   - Canonical form (no run that does nothing, no two runs that should be one):
//       * only the first run may have skip == 0;
//       * only a run that ends exactly at the page end may have len == 0 (the last one, which
//         covers an unchanged tail).
//     So an unchanged page is the single run (skip = N, len = 0): 3 bytes for N = 4096, and a
//     completely changed page is (0, N, N bytes): N + 3 bytes.
//
//   Example, N = 4096, bytes 10..11 changed to AA BB and byte 4095 changed to CC:
//     0A 02 AA BB   F3 1F 01 CC       (skip 10, len 2, AA BB; skip 4083, len 1, CC)
//
// The encoder merges changed runs separated by fewer than 3 unchanged bytes: splitting a run
// costs at least 2 bytes (two varints), so a 1-byte gap is cheaper to resend and a 2-byte gap
// ties (merged: fewer runs to apply).
#ifndef MICROVMM_MIGRATION_STREAM_XBZRLE_H_
#define MICROVMM_MIGRATION_STREAM_XBZRLE_H_

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

#include "absl/status/status.h"

namespace microvmm::migration {

// Largest delta the encoder can produce for an N-byte page (all bytes changed).
size_t XbzrleMaxDeltaSize(size_t page_size);

// Encodes the delta that turns `old_page` into `new_page` (same non-zero size) into *out
// (replacing its contents). Returns false — *out then holds unspecified bytes — when the delta
// would be longer than `max_out` (the caller sends the page in full instead) or the sizes
// differ. Reads each page once, 16 bytes per compare (SSE2), then walks a bitmap of changes.
bool XbzrleEncode(std::span<const uint8_t> old_page, std::span<const uint8_t> new_page,
                  size_t max_out, std::string* out);

// Strictly validates `delta` against page.size(), then applies it to `page` in place.
// Any deviation from the format above (truncated or over-long varint, non-minimal varint, run
// past the page end, truncated changed bytes, bytes after the last run, runs not covering the
// page, non-canonical empty runs) is INVALID_ARGUMENT and leaves `page` untouched. Never writes
// outside `page`.
absl::Status XbzrleApply(std::span<const uint8_t> delta, std::span<uint8_t> page);

// Validation only (what XbzrleApply checks before it writes).
absl::Status XbzrleValidate(std::span<const uint8_t> delta, size_t page_size);

}  // namespace microvmm::migration

#endif  // MICROVMM_MIGRATION_STREAM_XBZRLE_H_
