#include "vmm/vfio/kvm_glue.h"

#include <iterator>

#include "absl/strings/str_format.h"

namespace microvmm {

std::unique_ptr<MemslotBarMapper> MemslotBarMapper::ForVm(KvmVm& vm, uint32_t first_slot) {
  // KVM_CAP_NR_MEMSLOTS: user-settable slots per address space (509 on old kernels, 32764 now).
  int nr = vm.CheckExtension(KVM_CAP_NR_MEMSLOTS);
  uint32_t end = nr > 0 ? static_cast<uint32_t>(nr) : first_slot;
  return std::make_unique<MemslotBarMapper>(
      [&vm](uint32_t slot, uint64_t gpa, uint64_t size, void* host) {
        return vm.SetUserMemoryRegion(slot, 0, gpa, size, host);
      },
      first_slot, end);
}

absl::Status MemslotBarMapper::Map(uint64_t gpa, void* host, uint64_t size) {
  const uint64_t hva = reinterpret_cast<uint64_t>(host);
  if (size == 0 || gpa % page_ || size % page_ || hva % page_ || gpa + size < gpa)
    return absl::InvalidArgumentError(absl::StrFormat(
        "BAR memslot: unaligned or empty range gpa %#x size %#x host %#x", gpa, size, hva));
  std::lock_guard lock(mu_);
  // The neighbours in gpa order are the only candidates for an overlap.
  auto next = by_gpa_.lower_bound(gpa);
  if (next != by_gpa_.end() && next->first < gpa + size)
    return absl::AlreadyExistsError(
        absl::StrFormat("BAR memslot: [%#x, +%#x) overlaps a mapped BAR at %#x", gpa, size,
                        next->first));
  if (next != by_gpa_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second.size > gpa)
      return absl::AlreadyExistsError(
          absl::StrFormat("BAR memslot: [%#x, +%#x) overlaps a mapped BAR at %#x", gpa, size,
                          prev->first));
  }
  uint32_t id = first_;
  while (id < end_ && used_.count(id)) ++id;
  if (id >= end_)
    return absl::ResourceExhaustedError(
        absl::StrFormat("BAR memslot: no free KVM memslot in [%d, %d)", first_, end_));
  if (absl::Status s = set_slot_(id, gpa, size, host); !s.ok()) return s;
  used_.insert(id);
  by_gpa_[gpa] = Slot{id, size, host};
  return absl::OkStatus();
}

absl::Status MemslotBarMapper::Unmap(uint64_t gpa, uint64_t size) {
  std::lock_guard lock(mu_);
  auto it = by_gpa_.find(gpa);
  if (it == by_gpa_.end() || it->second.size != size)
    return absl::NotFoundError(
        absl::StrFormat("BAR memslot: nothing mapped at [%#x, +%#x)", gpa, size));
  // memory_size 0 deletes the slot (KVM ignores the other fields then).
  if (absl::Status s = set_slot_(it->second.id, gpa, 0, nullptr); !s.ok()) return s;
  used_.erase(it->second.id);
  by_gpa_.erase(it);
  return absl::OkStatus();
}

}  // namespace microvmm
