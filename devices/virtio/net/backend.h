// Packet backends of virtio-net. A backend exchanges whole packets, each prefixed with a 12-byte
// virtio_net_hdr_v1 (the tap's IFF_VNET_HDR layout with TUNSETVNETHDRSZ 12), and exposes an fd
// that polls readable when a packet can be read. Implementations: Tap (tap.h), FdNetBackend (any
// packet-preserving fd, e.g. one end of a SOCK_SEQPACKET socketpair in tests), test fakes.
#ifndef MICROVMM_DEVICES_VIRTIO_NET_BACKEND_H_
#define MICROVMM_DEVICES_VIRTIO_NET_BACKEND_H_

#include <sys/uio.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace microvmm::virtio {

class NetBackend {
 public:
  virtual ~NetBackend() = default;

  // For messages ("tap 'tap0'").
  virtual std::string name() const = 0;
  // Polls readable (level-triggered) while a packet is waiting; -1 if the backend has no fd
  // (then the owner must call VirtioNet::PollRx() itself).
  virtual int fd() const = 0;
  // Reads one packet (header + frame) into `iov`. Returns its length, 0 if none is waiting.
  // A packet longer than the iovecs may be truncated; callers pass one byte more than the
  // largest packet they accept so that truncation is visible as "too long".
  virtual absl::StatusOr<size_t> ReadPacket(std::span<const iovec> iov) = 0;
  // Writes one packet (header + frame). ResourceExhausted: the backend cannot take it now.
  virtual absl::Status WritePacket(std::span<const iovec> iov) = 0;
  // TUN_F_* bits (linux/if_tun.h): which offloads the backend may leave to the receiver of the
  // packets it hands out (partial checksums, TSO), following the guest's negotiated features.
  virtual absl::Status SetOffload(uint32_t tun_flags) = 0;
};

}  // namespace microvmm::virtio

#endif  // MICROVMM_DEVICES_VIRTIO_NET_BACKEND_H_
