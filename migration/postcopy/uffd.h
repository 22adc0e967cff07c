// RAII wrapper around a userfaultfd (see userfaultfd(2), ioctl_userfaultfd(2),
// /usr/include/linux/userfaultfd.h). Used by the post-copy destination to keep not-yet-received
// guest pages MISSING and to install them atomically when they arrive.
#ifndef MICROVMM_MIGRATION_POSTCOPY_UFFD_H_
#define MICROVMM_MIGRATION_POSTCOPY_UFFD_H_

#include <sys/types.h>

#include <cstdint>
#include <span>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "vmm/base/fd.h"

namespace microvmm::migration {

class Userfaultfd {
 public:
  // Register modes (UFFDIO_REGISTER_MODE_*).
  static constexpr uint64_t kMissing = 1ULL << 0;
  static constexpr uint64_t kMinor = 1ULL << 2;

  struct Event {
    uint64_t address = 0;  // faulting address (page-aligned unless EXACT_ADDRESS)
    uint64_t flags = 0;    // UFFD_PAGEFAULT_FLAG_*
    pid_t tid = 0;         // faulting thread (UFFD_FEATURE_THREAD_ID), 0 if not enabled
    bool write() const;
    bool minor() const;
  };

  // Features the running kernel offers (UFFDIO_API handshake on a throw-away fd).
  static absl::StatusOr<uint64_t> AvailableFeatures();
  // Names of the UFFD_FEATURE_* bits in `features` ("THREAD_ID|MINOR_SHMEM").
  static std::string FeatureNames(uint64_t features);

  // Opens a non-blocking, close-on-exec userfaultfd and enables `features` (UFFD_FEATURE_*).
  // Fails with a FailedPrecondition naming every requested feature the kernel lacks.
  // Open order: userfaultfd(2); on EPERM /dev/userfaultfd (USERFAULTFD_IOC_NEW, access decided
  // by the device node's permissions). UFFD_USER_MODE_ONLY is only used when
  // `allow_user_mode_only` is set: such an fd cannot resolve faults taken in kernel mode, which
  // includes KVM's get_user_pages() on guest RAM and syscalls copying into guest buffers, so it
  // is never acceptable for guest memory.
  static absl::StatusOr<Userfaultfd> Open(uint64_t features, bool allow_user_mode_only = false);

  Userfaultfd() = default;
  Userfaultfd(Userfaultfd&&) = default;
  Userfaultfd& operator=(Userfaultfd&&) = default;

  int fd() const { return fd_.get(); }
  bool valid() const { return fd_.valid(); }
  uint64_t features() const { return features_; }  // enabled features

  // Registers [addr, addr+len) (page-aligned) with `modes` (kMissing|kMinor). Returns the
  // bitmask of ioctls the kernel allows on the range.
  absl::StatusOr<uint64_t> Register(void* addr, uint64_t len, uint64_t modes);
  absl::Status Unregister(void* addr, uint64_t len);

  // UFFDIO_COPY / UFFDIO_ZEROPAGE / UFFDIO_CONTINUE. Return true if this call populated the
  // range; false if the kernel reported EEXIST (something already mapped there: not an error
  // for post-copy, the range is then woken unless `dontwake`). EAGAIN (the mm is changing
  // under us, e.g. a concurrent munmap/mremap) is retried from the first byte not yet done.
  absl::StatusOr<bool> Copy(void* dst, const void* src, uint64_t len, bool dontwake = false);
  absl::StatusOr<bool> ZeroPage(void* dst, uint64_t len, bool dontwake = false);
  absl::StatusOr<bool> Continue(void* addr, uint64_t len, bool dontwake = false);
  absl::Status Wake(void* addr, uint64_t len);

  // Reads up to out.size() pending events without blocking; 0 if none is pending.
  // Non-pagefault events (none are requested) are skipped.
  absl::StatusOr<size_t> ReadEvents(std::span<Event> out);

 private:
  ScopedFd fd_;
  uint64_t features_ = 0;
};

}  // namespace microvmm::migration

#endif  // MICROVMM_MIGRATION_POSTCOPY_UFFD_H_
