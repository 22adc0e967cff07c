// Guest RAM: one memfd per region, mapped shared into the VMM. All VMM accesses to guest memory
// go through GuestMemory (bounds-checked; marks the VMM-side dirty bitmap that migration ORs with
// KVM's dirty log, since KVM never sees writes the VMM makes).
#ifndef MICROVMM_VMM_MEMORY_GUEST_MEMORY_H_
#define MICROVMM_VMM_MEMORY_GUEST_MEMORY_H_

#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "vmm/base/fd.h"

namespace microvmm {

inline constexpr uint64_t kPageSize = 4096;
inline constexpr uint64_t kMmioGapStart = 0xC0000000ULL;  // 3 GiB: 32-bit MMIO gap starts here
inline constexpr uint64_t kMmioGapEnd = 0x100000000ULL;   // 4 GiB: RAM resumes here

struct RamRange {
  uint64_t gpa;
  uint64_t size;
};

// RAM below the 32-bit MMIO gap, the rest above 4 GiB.
std::vector<RamRange> RamLayout(uint64_t ram_bytes);

class GuestMemory {
 public:
  struct Region {
    uint64_t gpa = 0;
    uint64_t size = 0;
    ScopedFd memfd;
    ScopedMmap mapping;
    uint8_t* host = nullptr;
    std::unique_ptr<std::atomic<uint64_t>[]> dirty;  // one bit per page
    uint64_t end() const { return gpa + size; }
  };

  // Creates zero-filled memfd-backed RAM of `ram_bytes` (multiple of 2 MiB) laid out by RamLayout.
  static absl::StatusOr<std::unique_ptr<GuestMemory>> Create(uint64_t ram_bytes);

  uint64_t ram_bytes() const { return ram_bytes_; }
  const std::vector<Region>& regions() const { return regions_; }

  // Host pointer for [gpa, gpa+len) if the whole range lies inside one RAM region.
  absl::StatusOr<uint8_t*> HostPtr(uint64_t gpa, uint64_t len) const;
  bool Contains(uint64_t gpa, uint64_t len) const;

  absl::Status Read(uint64_t gpa, void* dst, uint64_t len) const;
  // Writes and marks the pages dirty in the VMM-side bitmap.
  absl::Status Write(uint64_t gpa, const void* src, uint64_t len);

  template <typename T>
  absl::StatusOr<T> ReadObj(uint64_t gpa) const {
    T v;
    absl::Status s = Read(gpa, &v, sizeof(T));
    if (!s.ok()) return s;
    return v;
  }
  template <typename T>
  absl::Status WriteObj(uint64_t gpa, const T& v) {
    return Write(gpa, &v, sizeof(T));
  }

  // Gives the host memory behind [gpa, gpa+len) back (hole punched in the memfd, so every
  // mapping, KVM's included, reads zeros afterwards) and marks the pages dirty (their content
  // changed to zero as far as migration is concerned). `gpa` and `len` must be page-aligned and
  // the range inside one RAM region.
  absl::Status Discard(uint64_t gpa, uint64_t len);

  // VMM-side dirty bitmap (device DMA and loader writes).
  void MarkDirty(uint64_t gpa, uint64_t len);
  bool TestDirty(uint64_t gpa) const;
  // Returns and clears the dirty bits of region `index` (one bit per page).
  std::vector<uint64_t> TakeDirty(size_t index);

 private:
  GuestMemory() = default;
  const Region* FindRegion(uint64_t gpa, uint64_t len) const;

  uint64_t ram_bytes_ = 0;
  std::vector<Region> regions_;
};

}  // namespace microvmm

#endif  // MICROVMM_VMM_MEMORY_GUEST_MEMORY_H_
