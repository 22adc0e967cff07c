#include "migration/postcopy/kvm_userfault.h"

#include <errno.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <bit>

#include "absl/strings/str_cat.h"
#include "vmm/base/status.h"

namespace microvmm {
namespace {

constexpr uint64_t kBitsPerWord = 64;  // unsigned long on x86_64

// Mask of bits [first, last] within one word.
uint64_t WordMask(uint64_t first, uint64_t last) {
  uint64_t hi = last == 63 ? ~uint64_t{0} : (uint64_t{1} << (last + 1)) - 1;
  return hi & ~((uint64_t{1} << first) - 1);
}

std::atomic_ref<uint64_t> Word(uint64_t* words, uint64_t index) {
  return std::atomic_ref<uint64_t>(words[index]);
}

}  // namespace

absl::StatusOr<const void*> KvmUserfaultBitmap::AddSlot(uint32_t slot, uint64_t gpa,
                                                        uint64_t size, bool all_missing) {
  if (size == 0 || gpa % kPageSize != 0 || size % kPageSize != 0 || gpa + size < gpa)
    return absl::InvalidArgumentError(absl::StrCat("userfault bitmap for slot ", slot,
                                                   ": gpa 0x", absl::Hex(gpa), " size 0x",
                                                   absl::Hex(size), " is not page-aligned"));
  for (const Slot& s : slots_) {
    if (s.slot == slot)
      return absl::AlreadyExistsError(absl::StrCat("userfault bitmap: slot ", slot, " exists"));
    if (gpa < s.gpa + s.pages * kPageSize && s.gpa < gpa + size)
      return absl::InvalidArgumentError(
          absl::StrCat("userfault bitmap: slot ", slot, " overlaps slot ", s.slot));
  }
  const uint64_t pages = size / kPageSize;
  const uint64_t words = (pages + kBitsPerWord - 1) / kBitsPerWord;
  const size_t bytes = (words * sizeof(uint64_t) + kPageSize - 1) / kPageSize * kPageSize;
  // Anonymous mapping: zeroed, page-aligned (KVM reads whole aligned longs), stable address.
  void* p = ::mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return ErrnoStatus(errno, "mmap userfault bitmap");
  Slot s{slot, gpa, pages, ScopedMmap(p, bytes)};
  if (all_missing) {
    uint64_t* w = s.words();
    std::fill(w, w + pages / kBitsPerWord, ~uint64_t{0});
    // Bits past the last page stay 0: KVM never looks at them, and CountMissing stays exact.
    if (pages % kBitsPerWord) w[pages / kBitsPerWord] = WordMask(0, pages % kBitsPerWord - 1);
  }
  slots_.push_back(std::move(s));
  return static_cast<const void*>(p);
}

const void* KvmUserfaultBitmap::SlotBitmap(uint32_t slot) const {
  for (const Slot& s : slots_)
    if (s.slot == slot) return s.map.get();
  return nullptr;
}

const KvmUserfaultBitmap::Slot* KvmUserfaultBitmap::Find(uint64_t gpa) const {
  for (const Slot& s : slots_)  // a handful of slots (RAM below/above the PCI hole)
    if (gpa >= s.gpa && (gpa - s.gpa) / kPageSize < s.pages) return &s;
  return nullptr;
}

bool KvmUserfaultBitmap::Set(uint64_t gpa) {
  const Slot* s = Find(gpa);
  if (s == nullptr) return false;
  uint64_t bit = (gpa - s->gpa) / kPageSize;
  Word(s->words(), bit / kBitsPerWord)
      .fetch_or(uint64_t{1} << (bit % kBitsPerWord), std::memory_order_relaxed);
  return true;
}

bool KvmUserfaultBitmap::Clear(uint64_t gpa) {
  const Slot* s = Find(gpa);
  if (s == nullptr) return false;
  uint64_t bit = (gpa - s->gpa) / kPageSize;
  Word(s->words(), bit / kBitsPerWord)
      .fetch_and(~(uint64_t{1} << (bit % kBitsPerWord)), std::memory_order_release);
  return true;
}

bool KvmUserfaultBitmap::Test(uint64_t gpa) const {
  const Slot* s = Find(gpa);
  if (s == nullptr) return false;
  uint64_t bit = (gpa - s->gpa) / kPageSize;
  return (Word(s->words(), bit / kBitsPerWord).load(std::memory_order_acquire) >>
          (bit % kBitsPerWord)) & 1;
}

uint64_t KvmUserfaultBitmap::ClearRange(uint64_t gpa, uint64_t len) {
  if (len == 0) return 0;
  const uint64_t end = gpa + len < gpa ? ~uint64_t{0} : gpa + len;  // exclusive, saturated
  uint64_t cleared = 0;
  for (const Slot& s : slots_) {
    const uint64_t slot_end = s.gpa + s.pages * kPageSize;
    if (end <= s.gpa || gpa >= slot_end) continue;
    const uint64_t first = (std::max(gpa, s.gpa) - s.gpa) / kPageSize;
    const uint64_t last = (std::min(end, slot_end) - 1 - s.gpa) / kPageSize;  // inclusive
    // Word by word: one atomic per 64 pages.
    for (uint64_t w = first / kBitsPerWord; w <= last / kBitsPerWord; ++w) {
      uint64_t lo = w == first / kBitsPerWord ? first % kBitsPerWord : 0;
      uint64_t hi = w == last / kBitsPerWord ? last % kBitsPerWord : kBitsPerWord - 1;
      uint64_t mask = WordMask(lo, hi);
      uint64_t old = Word(s.words(), w).fetch_and(~mask, std::memory_order_release);
      cleared += std::popcount(old & mask);
    }
  }
  return cleared;
}

uint64_t KvmUserfaultBitmap::CountMissing() const {
  uint64_t n = 0;
  for (const Slot& s : slots_) {
    const uint64_t words = (s.pages + kBitsPerWord - 1) / kBitsPerWord;
    for (uint64_t w = 0; w < words; ++w)
      n += std::popcount(Word(s.words(), w).load(std::memory_order_relaxed));
  }
  return n;
}

}  // namespace microvmm
