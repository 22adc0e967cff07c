// eventfd(2) owner: the signalling primitive behind irqfds (device -> guest interrupt) and
// ioeventfds (guest register write -> device thread).
#ifndef MICROVMM_VMM_PCI_EVENTFD_H_
#define MICROVMM_VMM_PCI_EVENTFD_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "vmm/base/fd.h"

namespace microvmm::pci {

class EventFd {
 public:
  // Non-blocking, close-on-exec, counter 0.
  static absl::StatusOr<EventFd> Create();
  EventFd(EventFd&&) = default;
  EventFd& operator=(EventFd&&) = default;

  int fd() const { return fd_.get(); }
  // Adds `n` to the counter: one write(2), safe from any thread.
  absl::Status Signal(uint64_t n = 1) const;
  // Returns the counter and resets it to 0 (0 if nothing was signalled).
  absl::StatusOr<uint64_t> Consume() const;
  // True if the counter is non-zero; does not consume (poll(2) with timeout 0).
  bool Pending() const;

 private:
  explicit EventFd(ScopedFd fd) : fd_(std::move(fd)) {}
  ScopedFd fd_;
};

}  // namespace microvmm::pci

#endif  // MICROVMM_VMM_PCI_EVENTFD_H_
