// Free-page hints on the migration source (virtio-balloon VIRTIO_BALLOON_F_FREE_PAGE_HINT).
//
// Protocol (background.md §4): dirty logging starts first, then the guest is asked for hints.
// A hinted page is dropped from the pages still to send. A page the guest writes after its hint
// shows up in a later dirty harvest, and ClearDirty() then withdraws the hint, so the write is
// sent. A write *before* the hint is harmless either way (the guest declared the page free).
// A page hinted while it sits in a pass's send list is skipped when its turn comes.
#ifndef MICROVMM_MIGRATION_PRECOPY_FREE_PAGE_FILTER_H_
#define MICROVMM_MIGRATION_PRECOPY_FREE_PAGE_FILTER_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "devices/virtio/balloon/free_page_hints.h"
#include "migration/dirty/dirty_tracker.h"
#include "vmm/memory/guest_memory.h"

namespace microvmm::migration {

class FreePageFilter : public virtio::FreePageHintSink {
 public:
  explicit FreePageFilter(const GuestMemory& mem);

  // Sink side (balloon queue processing; any thread).
  void OnHintRangeFree(uint64_t gpa, uint64_t len) override;
  void OnHintingDone(uint32_t cmd_id) override;

  // Pages in `written` were written by the guest: their hints no longer hold.
  void ClearDirty(const DirtySet& written);
  // Is `gpa` hinted free (and not written since)? Counts it as skipped if so.
  bool Skip(uint64_t gpa);
  bool hinted(uint64_t gpa) const;
  // Per region, one bit per page: currently hinted (same layout as GuestMemory::TakeDirty).
  std::vector<std::vector<uint64_t>> Snapshot() const;

  uint64_t hinted_bytes() const { return hinted_bytes_.load(); }
  uint64_t skipped_bytes() const { return skipped_bytes_.load(); }
  bool guest_done() const { return done_.load(); }

 private:
  struct Region {
    uint64_t gpa, pages;
    std::unique_ptr<std::atomic<uint64_t>[]> bits;
  };
  Region* Find(uint64_t gpa);
  const Region* Find(uint64_t gpa) const;

  std::vector<Region> regions_;
  std::atomic<uint64_t> hinted_bytes_{0}, skipped_bytes_{0};
  std::atomic<bool> done_{false};
};

}  // namespace microvmm::migration

#endif  // MICROVMM_MIGRATION_PRECOPY_FREE_PAGE_FILTER_H_
