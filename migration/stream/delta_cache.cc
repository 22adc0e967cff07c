#include "migration/stream/delta_cache.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "migration/stream/xbzrle.h"
#include "vmm/base/fd.h"
#include "vmm/base/log.h"
#include "vmm/base/status.h"

namespace microvmm::migration {

absl::StatusOr<std::string> ReadProcMeminfo() {
  ScopedFd fd(open("/proc/meminfo", O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) return ErrnoStatus(errno, "open /proc/meminfo");
  std::string text;
  char buf[4096];
  for (;;) {
    const ssize_t r = read(fd.get(), buf, sizeof(buf));
    if (r < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus(errno, "read /proc/meminfo");
    }
    if (r == 0) break;
    text.append(buf, static_cast<size_t>(r));
    if (text.size() > (1 << 20)) return absl::OutOfRangeError("/proc/meminfo larger than 1 MiB");
  }
  return text;
}

uint64_t DeltaCache::ChooseCapacity(const DeltaCacheOptions& o, std::string* note) {
  note->clear();
  absl::StatusOr<std::string> text = o.meminfo_reader ? o.meminfo_reader() : ReadProcMeminfo();
  absl::StatusOr<uint64_t> avail =
      text.ok() ? ParseMemAvailable(*text) : absl::StatusOr<uint64_t>(text.status());
  if (!avail.ok() || o.memavailable_divisor == 0) {
    *note = absl::StrFormat("MemAvailable unknown (%s): capacity capped at fallback %d bytes",
                            avail.ok() ? "divisor 0" : avail.status().ToString(),
                            o.fallback_bytes);
    return std::min(o.requested_bytes, o.fallback_bytes);
  }
  return std::min(o.requested_bytes, *avail / o.memavailable_divisor);
}

absl::StatusOr<std::unique_ptr<DeltaCache>> DeltaCache::Create(const DeltaCacheOptions& o) {
  if (o.page_size == 0 || o.shards == 0 || o.memavailable_divisor == 0) {
    return absl::InvalidArgumentError("DeltaCache: page_size, shards and divisor must be > 0");
  }
  std::string note;
  const uint64_t capacity = ChooseCapacity(o, &note);
  if (!note.empty()) LOG_WARN("xbzrle cache: %s", note);
  return std::unique_ptr<DeltaCache>(new DeltaCache(o.page_size, o.shards, capacity, note));
}

DeltaCache::DeltaCache(size_t page_size, uint32_t shards, uint64_t capacity, std::string note)
    : page_size_(page_size),
      capacity_bytes_(capacity),
      capacity_note_(std::move(note)),
      shards_(new Shard[shards]),
      num_shards_(shards) {
  // Whole pages only, spread as evenly as possible (first `rem` shards get one more).
  const uint64_t pages = capacity / page_size;
  const uint64_t rem = pages % shards;
  for (uint32_t i = 0; i < shards; ++i) shards_[i].max_slots = pages / shards + (i < rem ? 1 : 0);
}

DeltaCache::~DeltaCache() = default;

DeltaCache::Shard& DeltaCache::ShardFor(uint64_t gpa) const {
  // Fibonacci hashing of the page number: neighbouring pages land in different shards.
  const uint64_t h = (gpa / page_size_) * 0x9E3779B97F4A7C15ULL;
  return shards_[(h >> 32) % num_shards_];
}

DeltaCache::Slot* DeltaCache::AllocateSlot(Shard& s, uint64_t gpa) {
  uint32_t idx;
  if (!s.free.empty()) {
    idx = s.free.back();
    s.free.pop_back();
  } else if (s.slots.size() < s.max_slots) {
    idx = static_cast<uint32_t>(s.slots.size());
    s.slots.emplace_back();
    s.slots.back().data.reset(new uint8_t[page_size_]);
  } else if (s.slots.empty()) {
    return nullptr;  // this shard has no capacity
  } else {
    // CLOCK: every slot is in use here (free ones are on the free list). At most two sweeps.
    for (;;) {
      Slot& c = s.slots[s.hand];
      idx = static_cast<uint32_t>(s.hand);
      s.hand = (s.hand + 1) % s.slots.size();
      if (c.referenced) {
        c.referenced = false;
        continue;
      }
      s.index.erase(c.gpa);
      ++s.stats.evictions;
      break;
    }
  }
  Slot& slot = s.slots[idx];
  slot.gpa = gpa;
  slot.used = true;
  slot.referenced = false;  // earns its reference bit by being hit
  s.index[gpa] = idx;
  return &slot;
}

void DeltaCache::StoreLocked(Shard& s, uint64_t gpa, std::span<const uint8_t> page) {
  auto it = s.index.find(gpa);
  Slot* slot = it != s.index.end() ? &s.slots[it->second] : AllocateSlot(s, gpa);
  if (slot == nullptr) return;
  std::memcpy(slot->data.get(), page.data(), page_size_);
}

void DeltaCache::InvalidateLocked(Shard& s, uint64_t gpa) {
  auto it = s.index.find(gpa);
  if (it == s.index.end()) return;
  Slot& slot = s.slots[it->second];
  slot.used = false;
  slot.referenced = false;
  s.free.push_back(it->second);
  s.index.erase(it);
}

DeltaCache::Result DeltaCache::EncodeAndUpdate(uint64_t gpa, std::span<const uint8_t> page,
                                               size_t max_out, std::string* delta,
                                               bool insert_on_miss) {
  if (page.size() != page_size_) {
    Invalidate(gpa);
    return Result::kMiss;
  }
  Shard& s = ShardFor(gpa);
  absl::MutexLock lock(&s.mu);
  auto it = s.index.find(gpa);
  if (it == s.index.end()) {
    ++s.stats.misses;
    if (insert_on_miss) StoreLocked(s, gpa, page);
    return Result::kMiss;
  }
  Slot& slot = s.slots[it->second];
  slot.referenced = true;
  ++s.stats.hits;
  const bool fits =
      XbzrleEncode(std::span<const uint8_t>(slot.data.get(), page_size_), page, max_out, delta);
  // Either way the destination will hold `page` once the caller has sent the record.
  std::memcpy(slot.data.get(), page.data(), page_size_);
  if (!fits) {
    ++s.stats.too_large;
    return Result::kFull;
  }
  ++s.stats.deltas;
  if (delta->size() < page_size_) s.stats.bytes_saved += page_size_ - delta->size();
  return Result::kDelta;
}

void DeltaCache::Update(uint64_t gpa, std::span<const uint8_t> page) {
  if (page.size() != page_size_) {
    Invalidate(gpa);
    return;
  }
  Shard& s = ShardFor(gpa);
  absl::MutexLock lock(&s.mu);
  StoreLocked(s, gpa, page);
}

void DeltaCache::Invalidate(uint64_t gpa) {
  Shard& s = ShardFor(gpa);
  absl::MutexLock lock(&s.mu);
  InvalidateLocked(s, gpa);
}

bool DeltaCache::Contains(uint64_t gpa) const {
  Shard& s = ShardFor(gpa);
  absl::MutexLock lock(&s.mu);
  return s.index.contains(gpa);
}

void DeltaCache::Clear() {
  for (uint32_t i = 0; i < num_shards_; ++i) {
    Shard& s = shards_[i];
    absl::MutexLock lock(&s.mu);
    s.index.clear();
    s.slots.clear();
    s.slots.shrink_to_fit();
    s.free.clear();
    s.hand = 0;
  }
}

DeltaCacheStats DeltaCache::Stats() const {
  DeltaCacheStats t;
  for (uint32_t i = 0; i < num_shards_; ++i) {
    const Shard& s = shards_[i];
    absl::MutexLock lock(&s.mu);
    t.hits += s.stats.hits;
    t.misses += s.stats.misses;
    t.deltas += s.stats.deltas;
    t.too_large += s.stats.too_large;
    t.evictions += s.stats.evictions;
    t.bytes_saved += s.stats.bytes_saved;
    t.entries += s.index.size();
    t.cache_bytes += s.slots.size() * page_size_;
  }
  return t;
}

}  // namespace microvmm::migration
