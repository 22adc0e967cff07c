// KVM side of a passthrough PCI function (vfio::VfioPciDevice): direct BAR maps as KVM memslots
// and INTx as a resampling KVM irqfd.
#ifndef MICROVMM_VMM_VFIO_KVM_GLUE_H_
#define MICROVMM_VMM_VFIO_KVM_GLUE_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>

#include "absl/status/status.h"
#include "devices/vfio/pci/vfio_pci_device.h"
#include "vmm/kvm/kvm.h"

namespace microvmm {

// Maps mmapped BAR areas into the guest as KVM user memory slots. One per VM, shared by all its
// passthrough functions: slot ids come from [first_slot, end_slot) (RAM uses the low ids, see
// Vm::RamSlot), lowest free first; Unmap deletes the memslot (size 0) and frees its id. A BAR
// move is Unmap at the old address + Map at the new one (VfioPciDevice::ReconcileDirectMaps).
// Thread-safe.
class MemslotBarMapper : public vfio::BarMapper {
 public:
  // (slot, gpa, size, host): KVM_SET_USER_MEMORY_REGION; size 0 deletes the slot.
  using SetSlotFn = std::function<absl::Status(uint32_t slot, uint64_t gpa, uint64_t size,
                                               void* host)>;
  MemslotBarMapper(SetSlotFn set_slot, uint32_t first_slot, uint32_t end_slot,
                   uint64_t page_size = 4096)
      : set_slot_(std::move(set_slot)), first_(first_slot), end_(end_slot), page_(page_size) {}
  // Over a real VM: ids from `first_slot` up to KVM_CAP_NR_MEMSLOTS.
  static std::unique_ptr<MemslotBarMapper> ForVm(KvmVm& vm, uint32_t first_slot);
  ~MemslotBarMapper() override = default;

  // gpa, host and size page-aligned, size > 0, no overlap with a range already mapped here.
  absl::Status Map(uint64_t gpa, void* host, uint64_t size) override;
  // Exactly a range given to Map.
  absl::Status Unmap(uint64_t gpa, uint64_t size) override;

  struct Slot {
    uint32_t id = 0;
    uint64_t size = 0;
    void* host = nullptr;
  };
  std::map<uint64_t, Slot> slots() const {  // by gpa
    std::lock_guard lock(mu_);
    return by_gpa_;
  }

 private:
  SetSlotFn set_slot_;
  const uint32_t first_, end_;
  const uint64_t page_;
  mutable std::mutex mu_;
  std::map<uint64_t, Slot> by_gpa_;
  std::set<uint32_t> used_;
};

// INTx through KVM_IRQFD with KVM_IRQFD_FLAG_RESAMPLE on the VM's in-kernel IOAPIC.
class KvmIntxRouter : public vfio::IntxRouter {
 public:
  explicit KvmIntxRouter(KvmVm& vm) : vm_(vm) {}
  absl::Status AssignResampleIrqfd(int trigger_fd, int resample_fd, uint32_t gsi) override {
    return vm_.AssignResampleIrqfd(trigger_fd, resample_fd, gsi);
  }
  absl::Status DeassignResampleIrqfd(int trigger_fd, uint32_t gsi) override {
    return vm_.DeassignResampleIrqfd(trigger_fd, gsi);
  }

 private:
  KvmVm& vm_;
};

}  // namespace microvmm

#endif  // MICROVMM_VMM_VFIO_KVM_GLUE_H_
