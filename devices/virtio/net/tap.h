// Tap backend for virtio-net, and a generic packet-fd backend it builds on.
#ifndef MICROVMM_DEVICES_VIRTIO_NET_TAP_H_
#define MICROVMM_DEVICES_VIRTIO_NET_TAP_H_

#include <memory>
#include <string>

#include "devices/virtio/net/backend.h"
#include "vmm/base/fd.h"

namespace microvmm::virtio {

// Any fd that keeps packet boundaries (tap, SOCK_SEQPACKET/SOCK_DGRAM socket), non-blocking.
// Packets on it carry the 12-byte virtio-net header. SetOffload() only records the flags.
class FdNetBackend : public NetBackend {
 public:
  FdNetBackend(ScopedFd fd, std::string name) : fd_(std::move(fd)), name_(std::move(name)) {}

  std::string name() const override { return name_; }
  int fd() const override { return fd_.get(); }
  absl::StatusOr<size_t> ReadPacket(std::span<const iovec> iov) override;
  absl::Status WritePacket(std::span<const iovec> iov) override;
  absl::Status SetOffload(uint32_t tun_flags) override;
  uint32_t offload() const { return offload_; }

 protected:
  ScopedFd fd_;
  std::string name_;
  uint32_t offload_ = 0;
};

// A tap interface opened through /dev/net/tun with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, vnet
// header size 12 (virtio_net_hdr_v1, num_buffers included), non-blocking. Creating a tap that
// does not exist needs CAP_NET_ADMIN; attaching to a persistent one needs ownership or the cap.
// The interface disappears with the fd unless it was made persistent (ip tuntap add).
class Tap : public FdNetBackend {
 public:
  // `name` empty: the kernel picks one (see ifname()).
  static absl::StatusOr<std::unique_ptr<Tap>> Open(const std::string& name);

  const std::string& ifname() const { return name_; }
  // TUNSETOFFLOAD. The kernel refuses TSO bits without TUN_F_CSUM.
  absl::Status SetOffload(uint32_t tun_flags) override;

 private:
  Tap(ScopedFd fd, std::string name) : FdNetBackend(std::move(fd), std::move(name)) {}
};

}  // namespace microvmm::virtio

#endif  // MICROVMM_DEVICES_VIRTIO_NET_TAP_H_
