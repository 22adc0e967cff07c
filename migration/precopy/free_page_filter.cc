#include "migration/precopy/free_page_filter.h"

namespace microvmm::migration {

FreePageFilter::FreePageFilter(const GuestMemory& mem) {
  for (const auto& r : mem.regions()) {
    Region x;
    x.gpa = r.gpa;
    x.pages = r.size / kPageSize;
    size_t words = (x.pages + 63) / 64;
    x.bits = std::make_unique<std::atomic<uint64_t>[]>(words);
    for (size_t i = 0; i < words; ++i) x.bits[i].store(0, std::memory_order_relaxed);
    regions_.push_back(std::move(x));
  }
}

FreePageFilter::Region* FreePageFilter::Find(uint64_t gpa) {
  for (Region& r : regions_)
    if (gpa >= r.gpa && (gpa - r.gpa) / kPageSize < r.pages) return &r;
  return nullptr;
}

const FreePageFilter::Region* FreePageFilter::Find(uint64_t gpa) const {
  return const_cast<FreePageFilter*>(this)->Find(gpa);
}

void FreePageFilter::OnHintRangeFree(uint64_t gpa, uint64_t len) {
  for (uint64_t a = gpa; a < gpa + len; a += kPageSize) {
    Region* r = Find(a);
    if (r == nullptr) continue;  // the balloon only passes RAM ranges; be safe anyway
    uint64_t pg = (a - r->gpa) / kPageSize;
    uint64_t bit = 1ULL << (pg % 64);
    if (!(r->bits[pg / 64].fetch_or(bit, std::memory_order_acq_rel) & bit))
      hinted_bytes_.fetch_add(kPageSize, std::memory_order_relaxed);
  }
}

void FreePageFilter::OnHintingDone(uint32_t) { done_.store(true); }

void FreePageFilter::ClearDirty(const DirtySet& written) {
  written.ForEachSetPage([&](uint64_t gpa) {
    Region* r = Find(gpa);
    if (r == nullptr) return;
    uint64_t pg = (gpa - r->gpa) / kPageSize;
    r->bits[pg / 64].fetch_and(~(1ULL << (pg % 64)), std::memory_order_acq_rel);
  });
}

bool FreePageFilter::hinted(uint64_t gpa) const {
  const Region* r = Find(gpa);
  if (r == nullptr) return false;
  uint64_t pg = (gpa - r->gpa) / kPageSize;
  return (r->bits[pg / 64].load(std::memory_order_acquire) >> (pg % 64)) & 1;
}

bool FreePageFilter::Skip(uint64_t gpa) {
  if (!hinted(gpa)) return false;
  skipped_bytes_.fetch_add(kPageSize, std::memory_order_relaxed);
  return true;
}

std::vector<std::vector<uint64_t>> FreePageFilter::Snapshot() const {
  std::vector<std::vector<uint64_t>> out;
  for (const Region& r : regions_) {
    std::vector<uint64_t> w((r.pages + 63) / 64);
    for (size_t i = 0; i < w.size(); ++i) w[i] = r.bits[i].load(std::memory_order_acquire);
    out.push_back(std::move(w));
  }
  return out;
}

}  // namespace microvmm::migration
