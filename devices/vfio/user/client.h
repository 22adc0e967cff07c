// vfio-user client: a vfio::VfioDevice whose device lives in another process (a vfio-user
// server) reached over a unix socket.
//
// Model: strictly request/reply. Every method sends one command and waits (with a timeout) for
// the reply carrying the same message id and command; server-initiated DMA_READ/DMA_WRITE that
// arrive meanwhile are served from the VMM mapping given to DmaMap (only for mappings without a
// shared fd; with a shared fd the server must access the memory itself). Any transport failure
// (peer closed, timeout, malformed or mismatched reply) marks the connection broken: later calls
// fail at once with kUnavailable, since a late reply would otherwise be taken for the answer to
// a newer request. A reply with the error flag becomes an errno-carrying status and does not
// break the connection.
#ifndef MICROVMM_DEVICES_VFIO_USER_CLIENT_H_
#define MICROVMM_DEVICES_VFIO_USER_CLIENT_H_

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "devices/vfio/user/protocol.h"
#include "devices/vfio/vfio_device.h"
#include "vmm/base/fd.h"

namespace microvmm::vfio_user {

struct ClientOptions {
  // How long a reply may take (from sending the request to its reply, including any
  // server-initiated DMA served meanwhile). A stuck server turns into kDeadlineExceeded.
  // Negative: wait forever.
  int reply_timeout_ms = 5000;
  // Our max_data_xfer_size; the smaller of ours and the server's is used.
  uint32_t max_data_xfer_size = kDefaultMaxDataXfer;
};

class VfioUserDevice : public vfio::VfioDevice {
 public:
  // Connects to the server listening on `socket_path` and negotiates the version.
  // kNotFound: no such socket; kUnavailable: connection refused; kFailedPrecondition: version
  // mismatch or the server rejected the handshake.
  static absl::StatusOr<std::unique_ptr<VfioUserDevice>> Connect(
      const std::string& socket_path, const ClientOptions& options = {});
  // Same over an already-connected socket (e.g. one end of a socketpair).
  static absl::StatusOr<std::unique_ptr<VfioUserDevice>> FromSocket(
      ScopedFd sock, std::string name, const ClientOptions& options = {});

  ~VfioUserDevice() override = default;

  std::string name() const override { return name_; }
  absl::StatusOr<vfio::DeviceInfo> GetInfo() override;
  absl::StatusOr<vfio::RegionInfo> GetRegionInfo(uint32_t index) override;
  absl::StatusOr<vfio::IrqInfo> GetIrqInfo(uint32_t index) override;
  absl::Status RegionRead(uint32_t index, uint64_t offset, std::span<uint8_t> data) override;
  absl::Status RegionWrite(uint32_t index, uint64_t offset,
                           std::span<const uint8_t> data) override;
  absl::StatusOr<ScopedMmap> MapRegion(uint32_t index, uint64_t offset, uint64_t size) override;
  absl::Status SetIrqs(uint32_t index, uint32_t start, std::span<const int> fds) override;
  absl::Status SetIrqUnmaskFd(uint32_t index, int unmask_fd) override;
  absl::Status Reset() override;
  absl::Status DmaMap(uint64_t iova, uint64_t size, void* vaddr, int fd, uint64_t fd_offset,
                      bool writable) override;
  absl::Status DmaUnmap(uint64_t iova, uint64_t size) override;
  absl::StatusOr<vfio::MigrationCaps> GetMigrationCaps() override;
  absl::StatusOr<vfio::MigState> GetMigState() override;
  absl::Status SetMigState(vfio::MigState state) override;
  absl::StatusOr<size_t> ReadMigData(std::span<uint8_t> buf) override;
  absl::Status WriteMigData(std::span<const uint8_t> data) override;
  absl::Status StartDmaLogging(std::span<const vfio::DmaRange> ranges,
                               uint64_t page_size) override;
  absl::Status ReportDmaDirty(uint64_t iova, uint64_t size, uint64_t page_size,
                              std::span<uint64_t> bitmap) override;
  absl::Status StopDmaLogging() override;

  // Negotiated values (for tests and diagnostics).
  const VersionCaps& server_caps() const { return server_caps_; }
  uint32_t max_data_xfer() const { return max_xfer_; }
  bool broken() const { return broken_.load(); }

 private:
  struct DmaMapping {
    uint64_t size;
    uint8_t* vaddr;
    bool writable;
    bool shared_fd;
  };

  VfioUserDevice(ScopedFd sock, std::string name, const ClientOptions& options)
      : sock_(std::move(sock)), name_(std::move(name)), options_(options) {}

  absl::Status Handshake();
  // Sends one command and returns its (non-error) reply.
  absl::StatusOr<Message> Request(uint16_t command, std::span<const uint8_t> payload,
                                  std::span<const int> fds = {});
  absl::StatusOr<Message> RequestLocked(uint16_t command, std::span<const uint8_t> payload,
                                        std::span<const int> fds);
  // Serves a server-initiated command that arrived while waiting for a reply.
  absl::Status ServeServerCommand(const Message& m);
  absl::Status Broken(absl::Status s);
  absl::StatusOr<Message> Feature(uint32_t flags, std::span<const uint8_t> data,
                                  uint32_t reply_data_max);
  absl::Status RegionAccess(bool write, uint32_t index, uint64_t offset, uint8_t* data,
                            uint32_t count);

  std::mutex mu_;
  ScopedFd sock_;
  const std::string name_;
  const ClientOptions options_;
  uint16_t next_id_ = 1;
  std::atomic<bool> broken_{false};
  VersionCaps server_caps_;
  uint32_t max_xfer_ = kDefaultMaxDataXfer;
  std::map<uint64_t, DmaMapping> dma_;  // by iova
  std::map<uint32_t, vfio::RegionInfo> regions_;  // cached from GetRegionInfo, for MapRegion
  std::map<uint32_t, std::pair<ScopedFd, uint64_t>> region_fds_;  // fd + mmap base offset
};

}  // namespace microvmm::vfio_user

#endif  // MICROVMM_DEVICES_VFIO_USER_CLIENT_H_
