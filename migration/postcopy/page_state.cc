#include "migration/postcopy/page_state.h"

namespace microvmm::migration {

PageStateMap::PageStateMap(const GuestMemory& mem) {
  for (const GuestMemory::Region& r : mem.regions()) {
    regions_.push_back({r.gpa, r.size, pages_});
    pages_ += r.size / kPageSize;
  }
  state_.reset(new std::atomic<uint8_t>[pages_]);
  for (uint64_t i = 0; i < pages_; ++i)
    state_[i].store(static_cast<uint8_t>(PageState::kMissing), std::memory_order_relaxed);
  not_present_.store(pages_, std::memory_order_release);
}

std::optional<uint64_t> PageStateMap::IndexOf(uint64_t gpa) const {
  for (const RegionInfo& r : regions_)
    if (gpa >= r.gpa && gpa - r.gpa < r.size) return r.first_page + (gpa - r.gpa) / kPageSize;
  return std::nullopt;
}

size_t PageStateMap::RegionOf(uint64_t index) const {
  size_t i = 0;
  while (i + 1 < regions_.size() && index >= regions_[i + 1].first_page) ++i;
  return i;
}

uint64_t PageStateMap::GpaOf(uint64_t index) const {
  const RegionInfo& r = regions_[RegionOf(index)];
  return r.gpa + (index - r.first_page) * kPageSize;
}

void PageStateMap::Set(uint64_t index, PageState s) {
  PageState old = Get(index);
  if (old == PageState::kPresent && s != PageState::kPresent) not_present_.fetch_add(1);
  if (old != PageState::kPresent && s == PageState::kPresent) not_present_.fetch_sub(1);
  state_[index].store(static_cast<uint8_t>(s), std::memory_order_release);
}

bool PageStateMap::TryClaim(uint64_t index, PageState* prior) {
  uint8_t cur = state_[index].load(std::memory_order_acquire);
  while (cur == static_cast<uint8_t>(PageState::kMissing) ||
         cur == static_cast<uint8_t>(PageState::kZero)) {
    if (state_[index].compare_exchange_weak(cur, static_cast<uint8_t>(PageState::kInFlight),
                                            std::memory_order_acq_rel)) {
      if (prior) *prior = static_cast<PageState>(cur);
      return true;
    }
  }
  return false;
}

std::optional<PageState> PageStateMap::BeginInstall(uint64_t index) {
  uint8_t cur = state_[index].load(std::memory_order_acquire);
  while (cur <= static_cast<uint8_t>(PageState::kInFlight)) {
    if (state_[index].compare_exchange_weak(cur, static_cast<uint8_t>(PageState::kInstalling),
                                            std::memory_order_acq_rel))
      return static_cast<PageState>(cur);
  }
  return std::nullopt;
}

void PageStateMap::AbortInstall(uint64_t index, PageState prior) {
  state_[index].store(static_cast<uint8_t>(prior), std::memory_order_release);
}

void PageStateMap::MarkPresent(uint64_t index) {
  uint8_t old = state_[index].exchange(static_cast<uint8_t>(PageState::kPresent),
                                       std::memory_order_seq_cst);
  if (old != static_cast<uint8_t>(PageState::kPresent))
    not_present_.fetch_sub(1, std::memory_order_acq_rel);
}

uint64_t PageStateMap::Count(PageState s) const {
  uint64_t n = 0;
  for (uint64_t i = 0; i < pages_; ++i) n += Get(i) == s;
  return n;
}

}  // namespace microvmm::migration
