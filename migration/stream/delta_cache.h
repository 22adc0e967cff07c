// Source-side cache of the last version of each page sent, for XBZRLE deltas (xbzrle.h).
//
// CONTRACT (correctness of every delta depends on it): for every gpa the cache holds either
// exactly the bytes the destination holds for that page, or nothing.
//  - Send a page that may be delta-encoded only through EncodeAndUpdate(): it computes the delta
//    against the cached copy and replaces the copy with the new bytes in one step, whatever the
//    outcome (delta sent, or the caller must send the page in full).
//  - Whenever the page is sent by any other path that does not go through this cache — ZERO
//    records, pages pushed or demand-fetched during post-copy, a full resend after a stream
//    error, a page the caller decided not to delta-encode — call Invalidate(gpa) (or
//    Update(gpa, bytes) with exactly the bytes sent) before the record leaves.
//  - If a record built by EncodeAndUpdate() is dropped instead of sent, Invalidate(gpa).
//  - One gpa is encoded by one sender at a time, in send order (StreamForPage in page_codec.h pins
//    a page to one stream). Different gpas may be used from any number of threads concurrently.
//  - A new migration attempt (new destination) needs Clear() or a new cache.
//
// Capacity: `requested_bytes` of page data, capped at MemAvailable / memavailable_divisor (from
// /proc/meminfo, read once at Create()). If meminfo cannot be read or parsed the cap is
// fallback_bytes instead (a safe small bound), and capacity_note() says why. Bookkeeping
// (hash map, slot headers: ~40 bytes per page) comes on top.
//
// Eviction: CLOCK per shard (a reference bit set on hit; the hand clears bits and evicts the
// first unreferenced page) — O(1) amortized, no list splicing under the lock. The cache is split
// into shards by a hash of the gpa, each with its own lock and its own share of the capacity.
#ifndef MICROVMM_MIGRATION_STREAM_DELTA_CACHE_H_
#define MICROVMM_MIGRATION_STREAM_DELTA_CACHE_H_

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "vmm/base/meminfo.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"

namespace microvmm::migration {

// Returns the text of /proc/meminfo (or a test's stand-in).
using MeminfoReader = std::function<absl::StatusOr<std::string>()>;

absl::StatusOr<std::string> ReadProcMeminfo();


struct DeltaCacheOptions {
  uint64_t requested_bytes = 256ULL << 20;
  size_t page_size = 4096;
  uint32_t shards = 16;
  uint64_t memavailable_divisor = 4;            // at most 1/4 of MemAvailable
  uint64_t fallback_bytes = 64ULL << 20;        // cap when MemAvailable is unknown
  MeminfoReader meminfo_reader;                 // empty: ReadProcMeminfo
};

struct DeltaCacheStats {
  uint64_t hits = 0;          // EncodeAndUpdate found the previous version
  uint64_t misses = 0;        // ... did not
  uint64_t deltas = 0;        // hits whose delta fit in max_out (XBZRLE record)
  uint64_t too_large = 0;     // hits whose delta did not fit (page sent in full)
  uint64_t evictions = 0;
  uint64_t bytes_saved = 0;   // sum over deltas of page_size - delta size
  uint64_t entries = 0;       // pages cached now
  uint64_t cache_bytes = 0;   // page buffers allocated now (<= capacity)
};

class DeltaCache {
 public:
  // INVALID_ARGUMENT for page_size 0, shards 0 or memavailable_divisor 0. A capacity below one
  // page per shard leaves some shards (or all) without room: those gpas always miss.
  static absl::StatusOr<std::unique_ptr<DeltaCache>> Create(const DeltaCacheOptions& options);

  // The capacity Create() would pick for `options` (min(requested, MemAvailable / divisor), or
  // min(requested, fallback) with a reason in *note when meminfo is unusable).
  static uint64_t ChooseCapacity(const DeltaCacheOptions& options, std::string* note);

  enum class Result {
    kDelta,     // *delta holds an XBZRLE delta (<= max_out bytes): send codec XBZRLE
    kFull,      // the previous version was cached but the delta exceeded max_out: send in full
    kMiss,      // not cached: send in full
  };

  // Looks up gpa; on a hit encodes the delta old -> page into *delta. Then, atomically with the
  // lookup, stores `page` as the version the destination will hold: always on a hit, on a miss
  // only if insert_on_miss (may evict). A precopy sender passes insert_on_miss = false in its
  // first pass over RAM (most pages are sent once; caching them all just thrashes the cache)
  // and true for re-sends of dirty pages. page.size() must be page_size (else kMiss, nothing
  // stored, and gpa invalidated).
  Result EncodeAndUpdate(uint64_t gpa, std::span<const uint8_t> page, size_t max_out,
                         std::string* delta, bool insert_on_miss = true);

  // Stores `page` as what the destination holds for gpa (the caller sent exactly these bytes).
  void Update(uint64_t gpa, std::span<const uint8_t> page);
  // Forgets gpa (the destination's copy changed by a path that bypassed the cache).
  void Invalidate(uint64_t gpa);
  bool Contains(uint64_t gpa) const;
  void Clear();

  DeltaCacheStats Stats() const;
  uint64_t capacity_bytes() const { return capacity_bytes_; }
  size_t page_size() const { return page_size_; }
  // Empty, or why capacity fell back to fallback_bytes.
  const std::string& capacity_note() const { return capacity_note_; }

  ~DeltaCache();

 private:
  struct Slot {
    uint64_t gpa = 0;
    bool used = false;
    bool referenced = false;
    std::unique_ptr<uint8_t[]> data;
  };
  struct Shard {
    mutable absl::Mutex mu;
    size_t max_slots = 0;
    std::vector<Slot> slots;                       // grows up to max_slots, then recycled
    absl::flat_hash_map<uint64_t, uint32_t> index; // gpa -> slot
    std::vector<uint32_t> free;                    // unused slots (after Invalidate)
    size_t hand = 0;                               // CLOCK hand
    DeltaCacheStats stats;                         // counters only (entries/bytes computed)
  };

  DeltaCache(size_t page_size, uint32_t shards, uint64_t capacity, std::string note);
  Shard& ShardFor(uint64_t gpa) const;
  // A slot for a new gpa in `s` (free, new, or evicted), or nullptr if the shard has no room.
  Slot* AllocateSlot(Shard& s, uint64_t gpa);
  void StoreLocked(Shard& s, uint64_t gpa, std::span<const uint8_t> page);
  void InvalidateLocked(Shard& s, uint64_t gpa);

  const size_t page_size_;
  const uint64_t capacity_bytes_;
  const std::string capacity_note_;
  std::unique_ptr<Shard[]> shards_;
  const uint32_t num_shards_;
};

}  // namespace microvmm::migration

#endif  // MICROVMM_MIGRATION_STREAM_DELTA_CACHE_H_
