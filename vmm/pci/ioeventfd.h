// KVM_IOEVENTFD registration with RAII: a guest write to an MMIO address (or port) signals an
// eventfd inside KVM — no exit to the VMM — optionally only when the written value matches.
// Typical use: virtio-pci queue notify registers.
#ifndef MICROVMM_VMM_PCI_IOEVENTFD_H_
#define MICROVMM_VMM_PCI_IOEVENTFD_H_

#include <cstdint>
#include <memory>
#include <optional>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "vmm/kvm/kvm.h"
#include "vmm/pci/eventfd.h"

namespace microvmm::pci {

class IoEventFd {
 public:
  struct Options {
    uint64_t addr = 0;
    uint32_t len = 4;  // 1, 2, 4 or 8; 0 = any length (MMIO only, needs no datamatch)
    bool pio = false;  // port I/O instead of MMIO
    std::optional<uint64_t> datamatch;
  };

  // Creates an eventfd and assigns it. `vm` must outlive the returned object.
  static absl::StatusOr<std::unique_ptr<IoEventFd>> Create(KvmVm& vm, const Options& options);
  // Deassigns (errors are logged), then closes the eventfd.
  ~IoEventFd();
  IoEventFd(const IoEventFd&) = delete;
  IoEventFd& operator=(const IoEventFd&) = delete;

  // Re-registers the same eventfd at `addr` (e.g. after the guest moved the BAR), so a thread
  // waiting on fd() keeps working. On failure the old registration is restored.
  absl::Status Move(uint64_t addr);

  int fd() const { return event_.fd(); }
  const EventFd& event() const { return event_; }
  const Options& options() const { return options_; }

 private:
  IoEventFd(KvmVm& vm, EventFd event, const Options& options)
      : vm_(vm), event_(std::move(event)), options_(options) {}
  KvmVm& vm_;
  EventFd event_;
  Options options_;
};

}  // namespace microvmm::pci

#endif  // MICROVMM_VMM_PCI_IOEVENTFD_H_
