// virtio-blk (virtio device ID 2) backed by a host file or block device, one request queue.
//
// Requests (virtio spec "Block Device"): a 16-byte device-readable header {type, reserved,
// sector}, then data (readable for T_OUT/T_DISCARD/T_WRITE_ZEROES, writable for T_IN/T_GET_ID),
// then one device-writable status byte — the *last* writable byte of the chain. The device makes
// no assumption about how these are split into descriptors (VIRTIO_F_ANY_LAYOUT is implied by
// VERSION_1).
//
// Two engines share all parsing and validation; only the I/O submission differs:
//  - kIoUring: reads/writes go straight between the file and the guest buffers (iovecs built from
//    GuestMemory::HostPtr). Every ProcessQueue() submits one batch and then reaps what completed
//    inline (page-cache hits: no thread hop); the rest is signalled through an eventfd
//    registered with io_uring and watched by the EventLoop, so requests complete out of order
//    on the loop thread.
//  - kSync: preadv/pwritev/fdatasync/fallocate on the calling thread (the baseline).
//
// Anything the guest gets wrong in a request (short header, data past the capacity, write to a
// read-only disk, bad discard segment...) completes that request with VIRTIO_BLK_S_IOERR or
// VIRTIO_BLK_S_UNSUPP; a chain without room for the status byte is returned with len 0 (nothing
// can be reported). Protocol violations of the ring itself are the queue's business (error state).
//
// Thread safety: one internal mutex guards the queue processing, the io_uring and the request
// slots; ProcessQueue() may run concurrently from several threads while completions run on the
// EventLoop thread.
#ifndef MICROVMM_DEVICES_VIRTIO_BLK_BLK_H_
#define MICROVMM_DEVICES_VIRTIO_BLK_BLK_H_

#include <liburing.h>
#include <linux/virtio_blk.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "devices/virtio/device.h"
#include "devices/virtio/queue.h"
#include "vmm/base/fd.h"
#include "vmm/event_loop.h"
#include "vmm/memory/guest_memory.h"

namespace microvmm::virtio {

struct BlockOptions {
  enum class Engine { kIoUring, kSync };

  std::string path;        // regular file (size a multiple of 512) or block device
  bool read_only = false;  // open O_RDONLY, offer VIRTIO_BLK_F_RO
  bool direct = false;     // O_DIRECT (bypass the host page cache)
  std::string serial;      // T_GET_ID answer, <= 20 bytes; empty: basename of `path`, truncated
  Engine engine = Engine::kIoUring;
};

struct BlockStats {
  uint64_t requests = 0;       // chains completed
  uint64_t reads = 0;          // T_IN completed OK
  uint64_t writes = 0;         // T_OUT completed OK
  uint64_t flushes = 0;        // T_FLUSH completed OK
  uint64_t discards = 0;       // T_DISCARD completed OK
  uint64_t write_zeroes = 0;   // T_WRITE_ZEROES completed OK
  uint64_t bytes_read = 0;     // from the disk into guest memory
  uint64_t bytes_written = 0;  // from guest memory to the disk
  uint64_t errors = 0;         // requests completed with IOERR (guest mistakes and I/O errors)
  uint64_t unsupported = 0;    // requests completed with UNSUPP
  uint64_t peak_in_flight = 0;  // most requests submitted to io_uring at once (not saved)
};

class VirtioBlock : public VirtioDevice {
 public:
  static constexpr uint32_t kQueueSize = 256;
  static constexpr uint32_t kSectorSize = 512;
  static constexpr uint32_t kSerialBytes = 20;  // VIRTIO_BLK_ID_BYTES
  // SEG_MAX: data segments per request (the header and the status need two descriptors).
  static constexpr uint32_t kSegMax = kQueueSize - 2;
  // Per-request limits for discard / write-zeroes (one segment each).
  static constexpr uint32_t kMaxDiscardSectors = 1u << 22;  // 2 GiB
  static constexpr uint32_t kMaxWriteZeroesSectors = 1u << 22;

  // `mem` and `loop` must outlive the device. Errors (INVALID_ARGUMENT unless the host lacks
  // io_uring): missing file, directory, size not a multiple of 512, file cannot be opened,
  // O_DIRECT refused by the filesystem, serial longer than 20 bytes, io_uring setup failure with
  // engine kIoUring (no silent fallback to kSync).
  static absl::StatusOr<std::unique_ptr<VirtioBlock>> Create(const BlockOptions& options,
                                                             GuestMemory* mem, EventLoop* loop);
  ~VirtioBlock() override;
  VirtioBlock(const VirtioBlock&) = delete;
  VirtioBlock& operator=(const VirtioBlock&) = delete;

  uint16_t device_type() const override { return kDeviceIdBlock; }
  std::string name() const override { return "blk"; }
  uint64_t device_features() const override;
  std::vector<uint32_t> queue_max_sizes() const override { return {kQueueSize}; }
  uint32_t config_size() const override { return sizeof(virtio_blk_config); }
  void ReadConfig(uint64_t offset, std::span<uint8_t> data) override;

  absl::Status Activate(uint64_t features, std::span<Virtqueue* const> queues,
                        QueueSignal signal) override;
  void Reset() override;
  void ProcessQueue(uint16_t index) override;
  void Quiesce() override;
  std::string SaveState() const override;
  absl::Status RestoreState(const std::string& state) override;

  uint64_t capacity_sectors() const { return capacity_sectors_; }
  const std::string& serial() const { return serial_; }
  BlockStats stats() const;
  // Requests submitted to the host and not completed yet (always 0 with kSync).
  uint32_t in_flight() const;

 private:
  struct Request;
  enum class Op { kNone, kRead, kWrite, kFlush, kFallocate };

  VirtioBlock(const BlockOptions& options, GuestMemory* mem, EventLoop* loop);

  // Parses and validates `chain` into slot `chain.head()`, then starts it (or completes it at
  // once if it needs no I/O). Caller holds mu_.
  void StartLocked(DescriptorChain chain);
  // Engine-specific: runs (sync) or queues an SQE for (io_uring) the current step of `r`.
  void SubmitLocked(Request& r);
  // Shared completion logic for one I/O result (bytes or -errno). Returns true if `r` needs
  // another step (short transfer: the rest is resubmitted).
  bool OnResultLocked(Request& r, int64_t res);
  // Writes the status byte, returns the chain, updates stats, frees the slot.
  void FinishLocked(Request& r, uint8_t status);
  void FlushSubmissionsLocked();
  // Reaps io_uring completions; `wait`: block until all in-flight requests are done.
  void ReapLocked(bool wait);
  void SignalIfNeededLocked();
  void OnCompletionEvent();
  int64_t RunSyncStep(Request& r);
  int64_t ZeroFill(uint64_t offset, uint64_t len);

  const BlockOptions options_;
  GuestMemory* const mem_;
  EventLoop* const loop_;
  ScopedFd fd_;
  bool is_block_device_ = false;
  uint64_t capacity_sectors_ = 0;
  uint32_t dio_align_ = kSectorSize;  // buffer alignment O_DIRECT needs (bounce otherwise)
  std::string serial_;
  virtio_blk_config config_{};

  bool uring_ok_ = false;
  io_uring ring_{};
  ScopedFd event_fd_;
  bool event_fd_registered_ = false;  // with the EventLoop
  // Outlives posted callbacks: they hold a weak_ptr and do nothing once the device is gone.
  std::shared_ptr<VirtioBlock*> alive_;

  mutable std::mutex mu_;
  Virtqueue* queue_ = nullptr;
  QueueSignal signal_;
  uint64_t features_ = 0;
  std::vector<std::unique_ptr<Request>> slots_;  // indexed by head; null when free
  uint32_t in_flight_ = 0;                       // requests with an SQE outstanding
  BlockStats stats_;
};

}  // namespace microvmm::virtio

#endif  // MICROVMM_DEVICES_VIRTIO_BLK_BLK_H_
