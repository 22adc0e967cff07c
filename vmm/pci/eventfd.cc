#include "vmm/pci/eventfd.h"

#include <errno.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "vmm/kvm/kvm.h"

namespace microvmm::pci {

absl::StatusOr<EventFd> EventFd::Create() {
  ScopedFd fd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!fd.valid()) return ErrnoStatus(errno, "eventfd");
  return EventFd(std::move(fd));
}

absl::Status EventFd::Signal(uint64_t n) const {
  for (;;) {
    ssize_t r = ::write(fd_.get(), &n, sizeof(n));
    if (r == sizeof(n)) return absl::OkStatus();
    if (r < 0 && errno == EINTR) continue;
    // EAGAIN: the counter would overflow 2^64-2, i.e. the event is already pending.
    if (r < 0 && errno == EAGAIN) return absl::OkStatus();
    return ErrnoStatus(r < 0 ? errno : EIO, "eventfd write");
  }
}

absl::StatusOr<uint64_t> EventFd::Consume() const {
  for (;;) {
    uint64_t v = 0;
    ssize_t r = ::read(fd_.get(), &v, sizeof(v));
    if (r == sizeof(v)) return v;
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && errno == EAGAIN) return 0;
    return ErrnoStatus(r < 0 ? errno : EIO, "eventfd read");
  }
}

bool EventFd::Pending() const {
  pollfd p{fd_.get(), POLLIN, 0};
  int r;
  do {
    r = ::poll(&p, 1, 0);
  } while (r < 0 && errno == EINTR);
  return r > 0 && (p.revents & POLLIN);
}

}  // namespace microvmm::pci
