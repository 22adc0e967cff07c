#include "devices/virtio/net/tap.h"

#include <fcntl.h>
#include <linux/if_tun.h>
#include <net/if.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "vmm/base/status.h"

namespace microvmm::virtio {

absl::StatusOr<size_t> FdNetBackend::ReadPacket(std::span<const iovec> iov) {
  for (;;) {
    ssize_t n = ::readv(fd_.get(), iov.data(), static_cast<int>(iov.size()));
    if (n >= 0) return static_cast<size_t>(n);
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
    return ErrnoStatus(errno, absl::StrCat(name_, ": read"));
  }
}

absl::Status FdNetBackend::WritePacket(std::span<const iovec> iov) {
  for (;;) {
    ssize_t n = ::writev(fd_.get(), iov.data(), static_cast<int>(iov.size()));
    if (n >= 0) return absl::OkStatus();
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == ENOBUFS)
      return absl::ResourceExhaustedError(absl::StrCat(name_, ": backend full"));
    return ErrnoStatus(errno, absl::StrCat(name_, ": write"));
  }
}

absl::Status FdNetBackend::SetOffload(uint32_t tun_flags) {
  offload_ = tun_flags;
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Tap>> Tap::Open(const std::string& name) {
  const std::string what = absl::StrCat("tap '", name, "'");
  if (name.size() >= IFNAMSIZ)
    return absl::InvalidArgumentError(
        absl::StrCat(what, ": name too long (at most ", IFNAMSIZ - 1, " characters)"));
  if (name.find_first_of("/: \t\n") != std::string::npos)
    return absl::InvalidArgumentError(absl::StrCat(what, ": invalid interface name"));
  ScopedFd fd(::open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC));
  if (!fd.valid()) {
    int e = errno;
    if (e == ENOENT || e == ENODEV || e == ENXIO)
      return absl::NotFoundError(
          absl::StrCat(what, ": /dev/net/tun is missing (no tun/tap support on this host)"));
    if (e == EACCES || e == EPERM)
      return absl::PermissionDeniedError(
          absl::StrCat(what, ": no permission to open /dev/net/tun"));
    return ErrnoStatus(e, absl::StrCat(what, ": open /dev/net/tun"));
  }
  ifreq ifr{};
  std::memcpy(ifr.ifr_name, name.data(), name.size());
  ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
  if (::ioctl(fd.get(), TUNSETIFF, &ifr) != 0) {
    int e = errno;
    if (e == EPERM || e == EACCES)
      return absl::PermissionDeniedError(absl::StrCat(
          what, ": permission denied creating/attaching the tap (needs CAP_NET_ADMIN, or a "
                "persistent tap owned by this user: ip tuntap add ", name, " mode tap user ...)"));
    if (e == EBUSY)
      return absl::FailedPreconditionError(
          absl::StrCat(what, ": busy (already attached elsewhere, or not a tap with vnet_hdr)"));
    if (e == EINVAL)
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": refused (exists with other flags, e.g. a tun device?)"));
    return ErrnoStatus(e, absl::StrCat(what, ": TUNSETIFF"));
  }
  // Same layout as struct virtio_net_hdr_v1 (num_buffers included): the guest's tx header is
  // handed to the tap as is, and the tap's rx header becomes the guest's.
  int hdr_size = 12;
  if (::ioctl(fd.get(), TUNSETVNETHDRSZ, &hdr_size) != 0)
    return ErrnoStatus(errno, absl::StrCat(what, ": TUNSETVNETHDRSZ 12"));
  if (::ioctl(fd.get(), TUNSETOFFLOAD, 0u) != 0)
    return ErrnoStatus(errno, absl::StrCat(what, ": TUNSETOFFLOAD"));
  std::string actual(ifr.ifr_name, strnlen(ifr.ifr_name, IFNAMSIZ));
  return std::unique_ptr<Tap>(new Tap(std::move(fd), std::move(actual)));
}

absl::Status Tap::SetOffload(uint32_t tun_flags) {
  if (::ioctl(fd_.get(), TUNSETOFFLOAD, static_cast<unsigned long>(tun_flags)) != 0)
    return ErrnoStatus(errno, absl::StrCat("tap '", name_, "': TUNSETOFFLOAD ", tun_flags));
  offload_ = tun_flags;
  return absl::OkStatus();
}

}  // namespace microvmm::virtio
