// KVM Userfault bitmaps for exit-driven post-copy: one bitmap per memslot, in the layout the
// (not yet upstream) uAPI reads with copy_from_user during a vCPU fault: an array of unsigned
// long (64-bit here), bit i of the slot = page gpa_start + i * 4 KiB, LSB first; set = the page has
// not arrived, a vCPU touching it exits with KVM_EXIT_MEMORY_FAULT + KVM_MEMORY_EXIT_FLAG_USERFAULT.
//
// Lifetime: KVM keeps the bitmap's address (kvm_userspace_memory_region2.userfault_bitmap) as
// long as the memslot has KVM_MEM_USERFAULT. Each bitmap lives in its own anonymous mapping
// (page-aligned, never moves, even when this object is moved); destroy the object only after the
// memslots were re-registered without the flag (post-copy done) or deleted.
//
// Threading: AddSlot() before the vCPUs run. Set/Clear/Test/ClearRange/CountMissing are
// lock-free and may be called from any number of threads at once (each vCPU clears the bits of
// the pages it installed). Bits are cleared with release order, as the series asks, so a vCPU
// that KVM lets through sees the page contents written before the clear.
#ifndef MICROVMM_MIGRATION_POSTCOPY_KVM_USERFAULT_H_
#define MICROVMM_MIGRATION_POSTCOPY_KVM_USERFAULT_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "vmm/base/fd.h"

namespace microvmm {

class KvmUserfaultBitmap {
 public:
  static constexpr uint64_t kPageSize = 4096;

  KvmUserfaultBitmap() = default;
  KvmUserfaultBitmap(KvmUserfaultBitmap&&) = default;
  KvmUserfaultBitmap& operator=(KvmUserfaultBitmap&&) = default;

  // Adds the bitmap of memslot `slot` covering [gpa, gpa + size) (both page-aligned, size > 0,
  // no overlap with another slot). Every page starts missing if `all_missing`, else present.
  // Returns the pointer to pass as userfault_bitmap to KvmVm::SetUserMemoryRegion2.
  absl::StatusOr<const void*> AddSlot(uint32_t slot, uint64_t gpa, uint64_t size,
                                      bool all_missing = true);
  // The bitmap of `slot` (nullptr if unknown).
  const void* SlotBitmap(uint32_t slot) const;

  // By guest-physical address (any address within the page). false: gpa is in no slot.
  bool Set(uint64_t gpa);    // mark missing
  bool Clear(uint64_t gpa);  // mark installed
  // true: the page is in a slot and missing.
  bool Test(uint64_t gpa) const;
  // Marks every page overlapping [gpa, gpa + len) installed (parts outside any slot are ignored).
  // Returns how many pages went from missing to installed.
  uint64_t ClearRange(uint64_t gpa, uint64_t len);
  // Pages still missing, over all slots.
  uint64_t CountMissing() const;

 private:
  struct Slot {
    uint32_t slot;
    uint64_t gpa;
    uint64_t pages;
    ScopedMmap map;  // ceil(pages / 64) words, rounded up to whole host pages
    uint64_t* words() const { return static_cast<uint64_t*>(map.get()); }
  };
  const Slot* Find(uint64_t gpa) const;

  std::vector<Slot> slots_;
};

}  // namespace microvmm

#endif  // MICROVMM_MIGRATION_POSTCOPY_KVM_USERFAULT_H_
