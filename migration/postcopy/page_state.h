// Per-page post-copy state over all RAM regions of a GuestMemory: one atomic byte per 4 KiB page.
// Transitions (every one a single atomic operation, so concurrent faults, demand answers and the
// bulk push agree on who does what):
//   kMissing/kZero --TryClaim--> kInFlight          (exactly one claimer fetches / zero-fills)
//   kMissing/kZero/kInFlight --BeginInstall--> kInstalling  (exactly one installer)
//   kInstalling --MarkPresent--> kPresent           (or --AbortInstall--> previous state)
#ifndef MICROVMM_MIGRATION_POSTCOPY_PAGE_STATE_H_
#define MICROVMM_MIGRATION_POSTCOPY_PAGE_STATE_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "vmm/memory/guest_memory.h"

namespace microvmm::migration {

enum class PageState : uint8_t {
  kMissing = 0,     // content must be fetched from the source
  kZero = 1,        // known zero: resolved locally (UFFDIO_ZEROPAGE), never fetched
  kInFlight = 2,    // claimed: fetch requested (or zero-fill under way)
  kInstalling = 3,  // an installer owns the page and is copying it in
  kPresent = 4,     // installed (or present since switchover)
};

class PageStateMap {
 public:
  // Every page starts kMissing.
  explicit PageStateMap(const GuestMemory& mem);

  uint64_t pages() const { return pages_; }
  // Global page index of the page holding `gpa`; nullopt outside guest RAM.
  std::optional<uint64_t> IndexOf(uint64_t gpa) const;
  uint64_t GpaOf(uint64_t index) const;
  // Region index and first global page index of each region.
  size_t RegionOf(uint64_t index) const;
  uint64_t FirstPage(size_t region) const { return regions_[region].first_page; }

  PageState Get(uint64_t index) const {
    return static_cast<PageState>(state_[index].load(std::memory_order_acquire));
  }
  // Initialisation only (before any concurrent use). Keeps the not-present count right.
  void Set(uint64_t index, PageState s);

  // kMissing/kZero -> kInFlight. True for exactly one caller per page; `prior` gets the state
  // it claimed from.
  bool TryClaim(uint64_t index, PageState* prior = nullptr);
  bool TryClaimGpa(uint64_t gpa) {
    auto i = IndexOf(gpa);
    return i && TryClaim(*i);
  }
  // kMissing/kZero/kInFlight -> kInstalling; returns the prior state, nullopt if the page is
  // already present or another installer owns it.
  std::optional<PageState> BeginInstall(uint64_t index);
  void AbortInstall(uint64_t index, PageState prior);
  // Single CAS from -> to (e.g. kZero -> kInstalling for a local zero-fill).
  bool Transition(uint64_t index, PageState from, PageState to) {
    uint8_t f = static_cast<uint8_t>(from);
    return state_[index].compare_exchange_strong(f, static_cast<uint8_t>(to),
                                                 std::memory_order_acq_rel);
  }
  // -> kPresent (from any state); counts each page once.
  void MarkPresent(uint64_t index);

  uint64_t not_present() const { return not_present_.load(std::memory_order_acquire); }
  // Pages in state `s` (a scan; for tests and diagnostics).
  uint64_t Count(PageState s) const;

 private:
  struct RegionInfo {
    uint64_t gpa, size, first_page;
  };
  std::vector<RegionInfo> regions_;
  uint64_t pages_ = 0;
  std::unique_ptr<std::atomic<uint8_t>[]> state_;
  std::atomic<uint64_t> not_present_{0};
};

}  // namespace microvmm::migration

#endif  // MICROVMM_MIGRATION_POSTCOPY_PAGE_STATE_H_
