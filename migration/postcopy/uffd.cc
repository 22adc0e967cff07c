#include "migration/postcopy/uffd.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "vmm/base/status.h"

namespace microvmm::migration {
namespace {

constexpr uint64_t kPage = 4096;

// Opens an uffd with `flags` (O_CLOEXEC|O_NONBLOCK[|UFFD_USER_MODE_ONLY]) by the syscall, falling
// back to /dev/userfaultfd (Linux 6.1+) when the syscall is refused.
absl::StatusOr<ScopedFd> OpenRaw(int flags) {
  int fd = static_cast<int>(::syscall(SYS_userfaultfd, flags));
  if (fd >= 0) return ScopedFd(fd);
  int sys_err = errno;
  ScopedFd dev(::open("/dev/userfaultfd", O_RDWR | O_CLOEXEC));
  if (!dev.valid())
    return ErrnoStatus(sys_err, "userfaultfd(2) (and /dev/userfaultfd cannot be opened)");
  fd = ::ioctl(dev.get(), USERFAULTFD_IOC_NEW, flags);
  if (fd < 0) return ErrnoStatus(errno, "ioctl(/dev/userfaultfd, USERFAULTFD_IOC_NEW)");
  return ScopedFd(fd);
}

absl::StatusOr<ScopedFd> OpenAny(bool allow_user_mode_only) {
  auto fd = OpenRaw(O_CLOEXEC | O_NONBLOCK);
  if (fd.ok() || !allow_user_mode_only) return fd;
  return OpenRaw(O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
}

// Runs one UFFDIO_{COPY,ZEROPAGE,CONTINUE} over [dst, dst+len). `op(dst, off, len, &done)` issues
// the ioctl for the remaining part and stores the kernel's progress field. Per
// ioctl_userfaultfd(2): a partial operation reports the bytes done (>0) and fails with EAGAIN;
// EEXIST means the page at the cursor is already mapped; EAGAIN with nothing done means the mm
// changed under us: retry.
template <typename Op>
absl::StatusOr<bool> Fill(Userfaultfd* u, const char* what, uint64_t dst, uint64_t len,
                          bool dontwake, Op op) {
  bool all_ours = true;
  uint64_t off = 0;
  while (off < len) {
    int64_t done = 0;
    if (op(dst + off, off, len - off, &done) == 0) return all_ours;
    int err = errno;
    if (done > 0) off += static_cast<uint64_t>(done);
    if (err == EAGAIN) continue;
    if (err == EEXIST) {
      all_ours = false;
      if (!dontwake) {
        absl::Status s = u->Wake(reinterpret_cast<void*>(dst + off), kPage);
        if (!s.ok()) return s;
      }
      off += kPage;
      continue;
    }
    return ErrnoStatus(err, absl::StrFormat("%s at 0x%x (+0x%x)", what, dst + off, len - off));
  }
  return all_ours;
}

}  // namespace

bool Userfaultfd::Event::write() const { return flags & UFFD_PAGEFAULT_FLAG_WRITE; }
bool Userfaultfd::Event::minor() const { return flags & UFFD_PAGEFAULT_FLAG_MINOR; }

std::string Userfaultfd::FeatureNames(uint64_t f) {
  static const char* const kNames[] = {
      "PAGEFAULT_FLAG_WP", "EVENT_FORK",     "EVENT_REMAP",         "EVENT_REMOVE",
      "MISSING_HUGETLBFS", "MISSING_SHMEM",  "EVENT_UNMAP",         "SIGBUS",
      "THREAD_ID",         "MINOR_HUGETLBFS", "MINOR_SHMEM",        "EXACT_ADDRESS",
      "WP_HUGETLBFS_SHMEM", "WP_UNPOPULATED", "POISON",             "WP_ASYNC",
      "MOVE"};
  std::vector<std::string> out;
  for (int bit = 0; bit < 64; ++bit) {
    if (!(f & (1ULL << bit))) continue;
    if (bit < static_cast<int>(sizeof(kNames) / sizeof(kNames[0])))
      out.push_back(kNames[bit]);
    else
      out.push_back(absl::StrCat("bit", bit));
  }
  return out.empty() ? "none" : absl::StrJoin(out, "|");
}

absl::StatusOr<uint64_t> Userfaultfd::AvailableFeatures() {
  auto fd = OpenAny(/*allow_user_mode_only=*/false);
  if (!fd.ok()) return fd.status();
  uffdio_api api{};
  api.api = UFFD_API;
  api.features = 0;
  if (::ioctl(fd->get(), UFFDIO_API, &api) != 0) return ErrnoStatus(errno, "UFFDIO_API probe");
  return api.features;
}

absl::StatusOr<Userfaultfd> Userfaultfd::Open(uint64_t features, bool allow_user_mode_only) {
  // UFFDIO_API may be issued only once per fd, so probe the kernel's features on a separate
  // fd first to be able to say exactly what is missing.
  auto avail = AvailableFeatures();
  if (!avail.ok()) return avail.status();
  if (uint64_t missing = features & ~*avail; missing != 0)
    return absl::FailedPreconditionError(absl::StrCat(
        "userfaultfd: kernel lacks requested features ", FeatureNames(missing), " (available: ",
        FeatureNames(*avail), ")"));
  auto fd = OpenAny(allow_user_mode_only);
  if (!fd.ok()) return fd.status();
  uffdio_api api{};
  api.api = UFFD_API;
  api.features = features;
  if (::ioctl(fd->get(), UFFDIO_API, &api) != 0)
    return ErrnoStatus(errno, absl::StrCat("UFFDIO_API features ", FeatureNames(features)));
  Userfaultfd u;
  u.fd_ = std::move(*fd);
  u.features_ = features;
  return u;
}

absl::StatusOr<uint64_t> Userfaultfd::Register(void* addr, uint64_t len, uint64_t modes) {
  uffdio_register reg{};
  reg.range.start = reinterpret_cast<uint64_t>(addr);
  reg.range.len = len;
  reg.mode = modes;
  if (::ioctl(fd_.get(), UFFDIO_REGISTER, &reg) != 0)
    return ErrnoStatus(errno, absl::StrFormat("UFFDIO_REGISTER [%p, +0x%x) mode 0x%x", addr,
                                              len, modes));
  return reg.ioctls;
}

absl::Status Userfaultfd::Unregister(void* addr, uint64_t len) {
  uffdio_range r{reinterpret_cast<uint64_t>(addr), len};
  if (::ioctl(fd_.get(), UFFDIO_UNREGISTER, &r) != 0)
    return ErrnoStatus(errno, absl::StrFormat("UFFDIO_UNREGISTER [%p, +0x%x)", addr, len));
  return absl::OkStatus();
}

absl::StatusOr<bool> Userfaultfd::Copy(void* dst, const void* src, uint64_t len, bool dontwake) {
  const uint64_t s = reinterpret_cast<uint64_t>(src);
  return Fill(this, "UFFDIO_COPY", reinterpret_cast<uint64_t>(dst), len, dontwake,
              [&](uint64_t d, uint64_t off, uint64_t l, int64_t* done) {
                uffdio_copy c{};
                c.dst = d;
                c.src = s + off;
                c.len = l;
                c.mode = dontwake ? UFFDIO_COPY_MODE_DONTWAKE : 0;
                int rc = ::ioctl(fd_.get(), UFFDIO_COPY, &c);
                *done = c.copy;
                return rc;
              });
}

absl::StatusOr<bool> Userfaultfd::ZeroPage(void* dst, uint64_t len, bool dontwake) {
  return Fill(this, "UFFDIO_ZEROPAGE", reinterpret_cast<uint64_t>(dst), len, dontwake,
              [&](uint64_t d, uint64_t, uint64_t l, int64_t* done) {
                uffdio_zeropage z{};
                z.range = {d, l};
                z.mode = dontwake ? UFFDIO_ZEROPAGE_MODE_DONTWAKE : 0;
                int rc = ::ioctl(fd_.get(), UFFDIO_ZEROPAGE, &z);
                *done = z.zeropage;
                return rc;
              });
}

absl::StatusOr<bool> Userfaultfd::Continue(void* addr, uint64_t len, bool dontwake) {
  return Fill(this, "UFFDIO_CONTINUE", reinterpret_cast<uint64_t>(addr), len, dontwake,
              [&](uint64_t d, uint64_t, uint64_t l, int64_t* done) {
                uffdio_continue c{};
                c.range = {d, l};
                c.mode = dontwake ? UFFDIO_CONTINUE_MODE_DONTWAKE : 0;
                int rc = ::ioctl(fd_.get(), UFFDIO_CONTINUE, &c);
                *done = c.mapped;
                return rc;
              });
}

absl::Status Userfaultfd::Wake(void* addr, uint64_t len) {
  uffdio_range r{reinterpret_cast<uint64_t>(addr), len};
  if (::ioctl(fd_.get(), UFFDIO_WAKE, &r) != 0)
    return ErrnoStatus(errno, absl::StrFormat("UFFDIO_WAKE [%p, +0x%x)", addr, len));
  return absl::OkStatus();
}

absl::StatusOr<size_t> Userfaultfd::ReadEvents(std::span<Event> out) {
  if (out.empty()) return 0;
  uffd_msg stack_buf[64];
  std::vector<uffd_msg> heap;
  uffd_msg* buf = stack_buf;
  if (out.size() > 64) {
    heap.resize(out.size());
    buf = heap.data();
  }
  ssize_t n;
  do {
    n = ::read(fd_.get(), buf, out.size() * sizeof(uffd_msg));
  } while (n < 0 && errno == EINTR);
  if (n < 0) {
    if (errno == EAGAIN) return 0;
    return ErrnoStatus(errno, "read(userfaultfd)");
  }
  size_t count = 0;
  for (size_t i = 0; i < static_cast<size_t>(n) / sizeof(uffd_msg); ++i) {
    if (buf[i].event != UFFD_EVENT_PAGEFAULT) continue;
    out[count].address = buf[i].arg.pagefault.address;
    out[count].flags = buf[i].arg.pagefault.flags;
    out[count].tid = static_cast<pid_t>(buf[i].arg.pagefault.feat.ptid);
    ++count;
  }
  return count;
}

}  // namespace microvmm::migration
