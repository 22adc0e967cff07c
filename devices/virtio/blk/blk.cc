#include "devices/virtio/blk/blk.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <functional>

#include "absl/strings/str_format.h"
#include "devices/virtio/blk/blk_state.pb.h"
#include "vmm/base/log.h"
#include "vmm/base/status.h"

namespace microvmm::virtio {
namespace {

constexpr uint32_t kHeaderBytes = 16;       // struct virtio_blk_outhdr
constexpr uint32_t kSegmentBytes = 16;      // struct virtio_blk_discard_write_zeroes
constexpr uint8_t kNoStatus = 0xff;         // internal: the chain has no writable byte
constexpr uint8_t kPending = 0xfe;          // internal: I/O started
constexpr int kMaxRetries = 16;             // -EAGAIN/-EINTR/-ECANCELED resubmissions

struct FreeDeleter {
  void operator()(uint8_t* p) const { std::free(p); }
};

uint64_t Le64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;  // x86: little-endian
}
uint32_t Le32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Calls fn(gpa, len) for each piece of bytes [start, start+len) of the concatenated `bufs`.
void ForEachRange(const std::vector<GuestBuffer>& bufs, uint64_t start, uint64_t len,
                  const std::function<void(uint64_t, uint64_t)>& fn) {
  for (const GuestBuffer& b : bufs) {
    if (len == 0) return;
    if (start >= b.len) {
      start -= b.len;
      continue;
    }
    uint64_t n = std::min<uint64_t>(b.len - start, len);
    fn(b.gpa + start, n);
    start = 0;
    len -= n;
  }
}

}  // namespace

struct VirtioBlock::Request {
  DescriptorChain chain;
  uint32_t type = 0;
  Op op = Op::kNone;
  uint64_t offset = 0;  // byte offset on the disk
  uint64_t len = 0;     // bytes to transfer / fallocate
  int fallocate_mode = 0;
  std::vector<iovec> iov;  // what is left to transfer (advanced on short transfers)
  size_t iov_pos = 0;
  uint64_t done = 0;
  int retries = 0;
  std::unique_ptr<uint8_t, FreeDeleter> bounce;  // O_DIRECT and misaligned guest buffers
};

// ---- Creation ---------------------------------------------------------------------------------

VirtioBlock::VirtioBlock(const BlockOptions& options, GuestMemory* mem, EventLoop* loop)
    : options_(options), mem_(mem), loop_(loop), alive_(std::make_shared<VirtioBlock*>(this)) {
  slots_.resize(kQueueSize);
}

absl::StatusOr<std::unique_ptr<VirtioBlock>> VirtioBlock::Create(const BlockOptions& options,
                                                                 GuestMemory* mem,
                                                                 EventLoop* loop) {
  if (mem == nullptr || loop == nullptr)
    return absl::InvalidArgumentError("virtio-blk: guest memory and event loop are required");
  const std::string& path = options.path;
  if (path.empty()) return absl::InvalidArgumentError("virtio-blk: no disk path given");
  if (options.serial.size() > kSerialBytes)
    return absl::InvalidArgumentError(absl::StrFormat(
        "virtio-blk: serial \"%s\" is longer than %d bytes", options.serial, kSerialBytes));

  struct stat st;
  if (::stat(path.c_str(), &st) != 0) {
    int err = errno;
    if (err == ENOENT)
      return absl::InvalidArgumentError(
          absl::StrFormat("virtio-blk: disk image %s does not exist", path));
    return absl::InvalidArgumentError(
        absl::StrFormat("virtio-blk: cannot stat %s: %s", path, std::strerror(err)));
  }
  if (S_ISDIR(st.st_mode))
    return absl::InvalidArgumentError(
        absl::StrFormat("virtio-blk: %s is a directory, not a disk image", path));
  if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode))
    return absl::InvalidArgumentError(
        absl::StrFormat("virtio-blk: %s is neither a regular file nor a block device", path));

  std::unique_ptr<VirtioBlock> dev(new VirtioBlock(options, mem, loop));
  dev->is_block_device_ = S_ISBLK(st.st_mode);
  int flags = (options.read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC | (options.direct ? O_DIRECT : 0);
  dev->fd_.reset(::open(path.c_str(), flags));
  if (!dev->fd_.valid()) {
    int err = errno;
    if (options.direct && err == EINVAL)
      return absl::InvalidArgumentError(absl::StrFormat(
          "virtio-blk: the filesystem of %s does not support O_DIRECT (drop direct)", path));
    return absl::InvalidArgumentError(absl::StrFormat("virtio-blk: cannot open %s %s: %s", path,
                                                      options.read_only ? "read-only"
                                                                        : "read-write",
                                                      std::strerror(err)));
  }

  uint64_t bytes = 0;
  if (dev->is_block_device_) {
    if (::ioctl(dev->fd_.get(), BLKGETSIZE64, &bytes) != 0)
      return absl::InvalidArgumentError(absl::StrFormat(
          "virtio-blk: cannot get the size of block device %s: %s", path, std::strerror(errno)));
  } else {
    if (::fstat(dev->fd_.get(), &st) != 0)
      return absl::InvalidArgumentError(
          absl::StrFormat("virtio-blk: cannot stat %s: %s", path, std::strerror(errno)));
    bytes = static_cast<uint64_t>(st.st_size);
  }
  if (bytes % kSectorSize != 0)
    return absl::InvalidArgumentError(absl::StrFormat(
        "virtio-blk: size of %s (%d bytes) is not a multiple of %d", path, bytes, kSectorSize));
  dev->capacity_sectors_ = bytes / kSectorSize;

  if (options.direct && bytes > 0) {
    // Some filesystems accept O_DIRECT at open() and refuse the I/O; and the required buffer
    // alignment is 512 on most devices, 4096 on 4K-native ones. Probe both.
    std::unique_ptr<uint8_t, FreeDeleter> buf(static_cast<uint8_t*>(std::aligned_alloc(4096, 8192)));
    if (buf == nullptr) return absl::ResourceExhaustedError("virtio-blk: out of memory");
    if (::pread(dev->fd_.get(), buf.get() + 512, 512, 0) >= 0) {
      dev->dio_align_ = 512;
    } else if (bytes >= 4096 && ::pread(dev->fd_.get(), buf.get(), 4096, 0) >= 0) {
      dev->dio_align_ = 4096;
    } else {
      return absl::InvalidArgumentError(absl::StrFormat(
          "virtio-blk: O_DIRECT reads of %s fail (%s): the filesystem does not support it",
          path, std::strerror(errno)));
    }
  }

  if (options.serial.empty()) {
    std::string base = path.substr(path.find_last_of('/') + 1);
    dev->serial_ = base.substr(0, kSerialBytes);
  } else {
    dev->serial_ = options.serial;
  }

  // Config space (little-endian on x86; fields outside the offered features stay 0).
  virtio_blk_config& c = dev->config_;
  c.capacity = dev->capacity_sectors_;
  c.seg_max = kSegMax;
  // Logical block size: 512 unless O_DIRECT needs 4096-aligned I/O (then the guest must send
  // 4 KiB-aligned requests; misaligned ones fail with IOERR).
  c.blk_size = dev->dio_align_;
  if (!options.read_only) {
    c.max_discard_sectors = kMaxDiscardSectors;
    c.max_discard_seg = 1;
    c.discard_sector_alignment = 1;
    c.max_write_zeroes_sectors = kMaxWriteZeroesSectors;
    c.max_write_zeroes_seg = 1;
    c.write_zeroes_may_unmap = 1;  // with the UNMAP flag we punch a hole
  }

  if (options.engine == BlockOptions::Engine::kIoUring) {
    // No SQPOLL / COOP_TASKRUN: completions must be posted (and the eventfd signalled) without
    // the submitting thread (a vCPU) having to enter the kernel again.
    int rc = ::io_uring_queue_init(kQueueSize, &dev->ring_, 0);
    if (rc < 0) return ErrnoStatus(-rc, "virtio-blk: io_uring_queue_init");
    dev->uring_ok_ = true;
    dev->event_fd_.reset(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
    if (!dev->event_fd_.valid()) return ErrnoStatus(errno, "virtio-blk: eventfd");
    // Not register_eventfd_async: that one stays silent for completions posted through task
    // work (O_DIRECT), which would then wait for the next ProcessQueue().
    rc = ::io_uring_register_eventfd(&dev->ring_, dev->event_fd_.get());
    if (rc < 0) return ErrnoStatus(-rc, "virtio-blk: io_uring_register_eventfd");
    VirtioBlock* self = dev.get();
    absl::Status s =
        loop->Add(dev->event_fd_.get(), EPOLLIN, [self](uint32_t) { self->OnCompletionEvent(); });
    if (!s.ok()) return s;
    dev->event_fd_registered_ = true;
  }
  return dev;
}

VirtioBlock::~VirtioBlock() {
  // Stop the loop from calling in (Remove waits for a running handler), and let any posted
  // callback that already holds `alive_` finish.
  if (event_fd_registered_) loop_->Remove(event_fd_.get());
  alive_.reset();
  loop_->RunSync([] {});
  if (uring_ok_) {
    {
      std::lock_guard<std::mutex> l(mu_);
      queue_ = nullptr;  // the requests' buffers are only waited for, not completed
      ReapLocked(/*wait=*/true);
      slots_.clear();
    }
    ::io_uring_queue_exit(&ring_);
  }
}

uint64_t VirtioBlock::device_features() const {
  uint64_t f = (uint64_t{1} << kFeatureVersion1) | (uint64_t{1} << kFeatureIndirectDesc) |
               (uint64_t{1} << kFeatureEventIdx) | (uint64_t{1} << VIRTIO_BLK_F_SEG_MAX) |
               (uint64_t{1} << VIRTIO_BLK_F_BLK_SIZE) | (uint64_t{1} << VIRTIO_BLK_F_FLUSH);
  if (options_.read_only) {
    f |= uint64_t{1} << VIRTIO_BLK_F_RO;
  } else {
    f |= (uint64_t{1} << VIRTIO_BLK_F_DISCARD) | (uint64_t{1} << VIRTIO_BLK_F_WRITE_ZEROES);
  }
  return f;
}

void VirtioBlock::ReadConfig(uint64_t offset, std::span<uint8_t> data) {
  std::memset(data.data(), 0, data.size());
  if (offset >= sizeof(config_)) return;
  size_t n = std::min<uint64_t>(data.size(), sizeof(config_) - offset);
  std::memcpy(data.data(), reinterpret_cast<const uint8_t*>(&config_) + offset, n);
}

BlockStats VirtioBlock::stats() const {
  std::lock_guard<std::mutex> l(mu_);
  return stats_;
}

uint32_t VirtioBlock::in_flight() const {
  std::lock_guard<std::mutex> l(mu_);
  return in_flight_;
}

// ---- Lifecycle --------------------------------------------------------------------------------

absl::Status VirtioBlock::Activate(uint64_t features, std::span<Virtqueue* const> queues,
                                   QueueSignal signal) {
  if (queues.size() != 1 || queues[0] == nullptr)
    return absl::InvalidArgumentError("virtio-blk: needs exactly one queue");
  std::lock_guard<std::mutex> l(mu_);
  queue_ = queues[0];
  signal_ = std::move(signal);
  features_ = features;
  if (!queue_->active()) return absl::OkStatus();
  // After a restore the queue lists the requests that were in flight at save time: redo them.
  // (On a fresh activation the list is empty.)
  bool redone = false;
  for (uint16_t head : queue_->InFlightHeads()) {
    if (head < slots_.size() && slots_[head] != nullptr) continue;  // already ours
    absl::StatusOr<DescriptorChain> chain = queue_->ReadInFlightChain(head);
    if (!chain.ok()) return chain.status();  // the queue is in error: DEVICE_NEEDS_RESET
    StartLocked(std::move(*chain));
    redone = true;
  }
  FlushSubmissionsLocked();
  if (redone) {
    // Requests may have completed synchronously; the transport lock is held here, so the
    // used-buffer notification is raised from the loop thread instead.
    loop_->Post([weak = std::weak_ptr<VirtioBlock*>(alive_)] {
      std::shared_ptr<VirtioBlock*> p = weak.lock();
      if (p == nullptr) return;
      std::lock_guard<std::mutex> l((*p)->mu_);
      (*p)->SignalIfNeededLocked();
    });
  }
  return absl::OkStatus();
}

void VirtioBlock::Reset() {
  std::lock_guard<std::mutex> l(mu_);
  // The driver may reuse its buffers right after the reset: wait for every read still landing
  // in them. Completions no longer touch the queue (queue_ is null).
  queue_ = nullptr;
  signal_ = nullptr;
  features_ = 0;
  if (uring_ok_) ReapLocked(/*wait=*/true);
  for (auto& s : slots_) s.reset();
}

void VirtioBlock::Quiesce() {
  std::lock_guard<std::mutex> l(mu_);
  if (uring_ok_) ReapLocked(/*wait=*/true);
  SignalIfNeededLocked();
}

std::string VirtioBlock::SaveState() const {
  VirtioBlockState st;
  std::lock_guard<std::mutex> l(mu_);
  st.set_capacity_sectors(capacity_sectors_);
  st.set_read_only(options_.read_only);
  st.set_serial(serial_);
  st.set_blk_size(config_.blk_size);
  st.set_features(features_);
  for (size_t h = 0; h < slots_.size(); ++h)
    if (slots_[h] != nullptr) st.add_in_flight_heads(static_cast<uint32_t>(h));
  VirtioBlockCounters* c = st.mutable_counters();
  c->set_requests(stats_.requests);
  c->set_reads(stats_.reads);
  c->set_writes(stats_.writes);
  c->set_flushes(stats_.flushes);
  c->set_discards(stats_.discards);
  c->set_write_zeroes(stats_.write_zeroes);
  c->set_bytes_read(stats_.bytes_read);
  c->set_bytes_written(stats_.bytes_written);
  c->set_errors(stats_.errors);
  c->set_unsupported(stats_.unsupported);
  return st.SerializeAsString();
}

absl::Status VirtioBlock::RestoreState(const std::string& state) {
  VirtioBlockState st;
  if (!st.ParseFromString(state))
    return absl::InvalidArgumentError("virtio-blk: saved state does not parse");
  if (st.capacity_sectors() != capacity_sectors_)
    return absl::FailedPreconditionError(absl::StrFormat(
        "virtio-blk: saved disk had %d sectors, this one has %d", st.capacity_sectors(),
        capacity_sectors_));
  if (st.read_only() != options_.read_only)
    return absl::FailedPreconditionError(absl::StrFormat(
        "virtio-blk: saved disk was %s, this one is %s", st.read_only() ? "read-only" : "writable",
        options_.read_only ? "read-only" : "writable"));
  if (st.blk_size() != config_.blk_size)
    return absl::FailedPreconditionError(absl::StrFormat(
        "virtio-blk: saved block size %d, this disk needs %d", st.blk_size(), config_.blk_size));
  for (uint32_t h : st.in_flight_heads())
    if (h >= kQueueSize)
      return absl::InvalidArgumentError(
          absl::StrFormat("virtio-blk: saved in-flight head %d out of range", h));
  std::lock_guard<std::mutex> l(mu_);
  // The serial is the guest-visible disk identity: keep the saved one.
  serial_ = st.serial().substr(0, kSerialBytes);
  features_ = st.features();
  const VirtioBlockCounters& c = st.counters();
  stats_ = BlockStats{c.requests(),      c.reads(),         c.writes(),
                      c.flushes(),       c.discards(),      c.write_zeroes(),
                      c.bytes_read(),    c.bytes_written(), c.errors(),
                      c.unsupported(),   0};
  return absl::OkStatus();
}

// ---- Request processing -----------------------------------------------------------------------

void VirtioBlock::ProcessQueue(uint16_t index) {
  std::lock_guard<std::mutex> l(mu_);
  if (index != 0 || queue_ == nullptr || !queue_->active()) return;
  for (;;) {
    queue_->DisableNotifications();
    for (;;) {
      absl::StatusOr<std::optional<DescriptorChain>> chain = queue_->PopChain();
      if (!chain.ok() || !chain->has_value()) break;  // empty, or the queue is in error
      StartLocked(std::move(**chain));
    }
    FlushSubmissionsLocked();  // one io_uring_submit for the whole batch
    if (uring_ok_) ReapLocked(/*wait=*/false);  // requests that completed inline
    if (queue_->in_error()) break;
    // Re-enable and re-check: chains the driver added meanwhile would not be notified.
    if (!queue_->EnableNotifications()) break;
  }
  SignalIfNeededLocked();
}

void VirtioBlock::StartLocked(DescriptorChain chain) {
  const uint16_t head = chain.head();
  if (head >= slots_.size() || slots_[head] != nullptr) {
    // Cannot happen: the queue refuses a head that is still in flight.
    LOG_ERROR("virtio-blk: head %d already in use", head);
    return;
  }
  slots_[head] = std::make_unique<Request>();
  Request& r = *slots_[head];
  r.chain = std::move(chain);
  const DescriptorChain& c = r.chain;

  auto parse = [&]() -> uint8_t {
    if (c.writable_bytes() == 0) {
      LOG_WARN_RATELIMITED("virtio-blk: request %d has no status byte", head);
      return kNoStatus;
    }
    if (c.readable_bytes() < kHeaderBytes) {
      LOG_WARN_RATELIMITED("virtio-blk: request %d: header of %d bytes", head,
                           c.readable_bytes());
      return VIRTIO_BLK_S_IOERR;
    }
    uint8_t hdr[kHeaderBytes];
    c.ReadAt(0, hdr);
    r.type = Le32(hdr);
    const uint64_t sector = Le64(hdr + 8);
    const uint64_t data_in = c.writable_bytes() - 1;            // before the status byte
    const uint64_t data_out = c.readable_bytes() - kHeaderBytes;  // after the header

    // [sector, sector + bytes/512) must lie within the disk; no overflow on hostile values.
    auto in_range = [&](uint64_t sec, uint64_t bytes) {
      return sec <= capacity_sectors_ && bytes / kSectorSize <= capacity_sectors_ - sec;
    };
    auto build_iov = [&](const std::vector<GuestBuffer>& bufs, uint64_t start) -> bool {
      bool aligned = true;
      bool ok = true;
      ForEachRange(bufs, start, r.len, [&](uint64_t gpa, uint64_t n) {
        absl::StatusOr<uint8_t*> p = mem_->HostPtr(gpa, n);
        if (!p.ok()) {
          ok = false;  // the queue validated the buffers; defensive
          return;
        }
        if (reinterpret_cast<uintptr_t>(*p) % dio_align_ != 0 || n % dio_align_ != 0)
          aligned = false;
        r.iov.push_back(iovec{*p, static_cast<size_t>(n)});
      });
      if (ok && options_.direct && !aligned) {
        // O_DIRECT needs aligned memory: go through an aligned bounce buffer.
        uint64_t alloc = (r.len + 4095) & ~uint64_t{4095};
        r.bounce.reset(static_cast<uint8_t*>(std::aligned_alloc(4096, alloc)));
        if (r.bounce == nullptr) return false;
        if (r.op == Op::kWrite) r.chain.ReadAt(start, std::span<uint8_t>(r.bounce.get(), r.len));
        r.iov.assign(1, iovec{r.bounce.get(), static_cast<size_t>(r.len)});
      }
      return ok;
    };

    switch (r.type) {
      case VIRTIO_BLK_T_IN:
      case VIRTIO_BLK_T_OUT: {
        const bool write = r.type == VIRTIO_BLK_T_OUT;
        if (write && options_.read_only) {
          LOG_WARN_RATELIMITED("virtio-blk: write to a read-only disk");
          return VIRTIO_BLK_S_IOERR;
        }
        r.len = write ? data_out : data_in;
        if (r.len % kSectorSize != 0 || !in_range(sector, r.len)) {
          LOG_WARN_RATELIMITED("virtio-blk: %s of %d bytes at sector %d: outside the %d-sector "
                               "disk or not whole sectors",
                               write ? "write" : "read", r.len, sector, capacity_sectors_);
          return VIRTIO_BLK_S_IOERR;
        }
        if (r.len == 0) return VIRTIO_BLK_S_OK;
        r.op = write ? Op::kWrite : Op::kRead;
        r.offset = sector * kSectorSize;
        if (!build_iov(write ? c.readable() : c.writable(), write ? kHeaderBytes : 0))
          return VIRTIO_BLK_S_IOERR;
        return kPending;
      }
      case VIRTIO_BLK_T_FLUSH:
        r.op = Op::kFlush;
        return kPending;
      case VIRTIO_BLK_T_GET_ID: {
        uint8_t id[kSerialBytes] = {};  // NUL-padded when shorter than 20 bytes
        std::memcpy(id, serial_.data(), std::min<size_t>(serial_.size(), kSerialBytes));
        r.chain.WriteAt(0, std::span<const uint8_t>(
                               id, static_cast<size_t>(std::min<uint64_t>(data_in, kSerialBytes))));
        return VIRTIO_BLK_S_OK;
      }
      case VIRTIO_BLK_T_DISCARD:
      case VIRTIO_BLK_T_WRITE_ZEROES: {
        const bool discard = r.type == VIRTIO_BLK_T_DISCARD;
        if (options_.read_only) return VIRTIO_BLK_S_IOERR;  // features not offered either
        // max_discard_seg = max_write_zeroes_seg = 1: exactly one segment.
        if (data_out != kSegmentBytes) {
          LOG_WARN_RATELIMITED("virtio-blk: %s with %d bytes of segments",
                               discard ? "discard" : "write-zeroes", data_out);
          return VIRTIO_BLK_S_IOERR;
        }
        uint8_t seg[kSegmentBytes];
        c.ReadAt(kHeaderBytes, seg);
        const uint64_t seg_sector = Le64(seg);
        const uint32_t num = Le32(seg + 8);
        const uint32_t flags = Le32(seg + 12);
        // Spec: UNSUPP for discard with the unmap flag, or any unknown flag.
        if (flags & ~(discard ? 0u : uint32_t{VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP}))
          return VIRTIO_BLK_S_UNSUPP;
        if (num > (discard ? kMaxDiscardSectors : kMaxWriteZeroesSectors) ||
            !in_range(seg_sector, uint64_t{num} * kSectorSize)) {
          LOG_WARN_RATELIMITED("virtio-blk: %s of %d sectors at sector %d out of range",
                               discard ? "discard" : "write-zeroes", num, seg_sector);
          return VIRTIO_BLK_S_IOERR;
        }
        if (num == 0) return VIRTIO_BLK_S_OK;
        r.op = Op::kFallocate;
        r.offset = seg_sector * kSectorSize;
        r.len = uint64_t{num} * kSectorSize;
        r.fallocate_mode = FALLOC_FL_KEEP_SIZE | ((discard || (flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP))
                                                      ? FALLOC_FL_PUNCH_HOLE
                                                      : FALLOC_FL_ZERO_RANGE);
        return kPending;
      }
      default:
        LOG_WARN_RATELIMITED("virtio-blk: unsupported request type %d", r.type);
        return VIRTIO_BLK_S_UNSUPP;
    }
  };

  uint8_t status = parse();
  if (status == kPending) {
    SubmitLocked(r);
  } else {
    FinishLocked(r, status);
  }
}

void VirtioBlock::SubmitLocked(Request& r) {
  if (!uring_ok_) {
    // Sync engine: run every step (short transfers continue) on this thread.
    while (OnResultLocked(r, RunSyncStep(r))) {
    }
    return;
  }
  io_uring_sqe* sqe = ::io_uring_get_sqe(&ring_);
  if (sqe == nullptr) {
    ::io_uring_submit(&ring_);
    sqe = ::io_uring_get_sqe(&ring_);
  }
  if (sqe == nullptr) {
    LOG_WARN_RATELIMITED("virtio-blk: io_uring submission queue full");
    FinishLocked(r, VIRTIO_BLK_S_IOERR);
    return;
  }
  const int fd = fd_.get();
  const unsigned nr = static_cast<unsigned>(std::min<size_t>(r.iov.size() - r.iov_pos, IOV_MAX));
  switch (r.op) {
    case Op::kRead:
      ::io_uring_prep_readv(sqe, fd, r.iov.data() + r.iov_pos, nr, r.offset + r.done);
      break;
    case Op::kWrite:
      ::io_uring_prep_writev(sqe, fd, r.iov.data() + r.iov_pos, nr, r.offset + r.done);
      break;
    case Op::kFlush:
      ::io_uring_prep_fsync(sqe, fd, IORING_FSYNC_DATASYNC);
      break;
    case Op::kFallocate:
      ::io_uring_prep_fallocate(sqe, fd, r.fallocate_mode, static_cast<off_t>(r.offset),
                                static_cast<off_t>(r.len));
      break;
    case Op::kNone:
      break;
  }
  ::io_uring_sqe_set_data64(sqe, r.chain.head());
  ++in_flight_;
  stats_.peak_in_flight = std::max<uint64_t>(stats_.peak_in_flight, in_flight_);
}

int64_t VirtioBlock::RunSyncStep(Request& r) {
  const int fd = fd_.get();
  const int nr = static_cast<int>(std::min<size_t>(r.iov.size() - r.iov_pos, IOV_MAX));
  ssize_t n;
  switch (r.op) {
    case Op::kRead:
      n = ::preadv(fd, r.iov.data() + r.iov_pos, nr, static_cast<off_t>(r.offset + r.done));
      break;
    case Op::kWrite:
      n = ::pwritev(fd, r.iov.data() + r.iov_pos, nr, static_cast<off_t>(r.offset + r.done));
      break;
    case Op::kFlush:
      n = ::fdatasync(fd);
      break;
    case Op::kFallocate:
      n = ::fallocate(fd, r.fallocate_mode, static_cast<off_t>(r.offset),
                      static_cast<off_t>(r.len));
      break;
    default:
      n = 0;
  }
  return n < 0 ? -errno : n;
}

// Write-zeroes fallback when the file/device cannot fallocate: write zeros (O_DIRECT-safe buffer).
int64_t VirtioBlock::ZeroFill(uint64_t offset, uint64_t len) {
  constexpr size_t kChunk = 1 << 20;
  static uint8_t* const zeros = [] {
    auto* p = static_cast<uint8_t*>(std::aligned_alloc(4096, kChunk));
    if (p != nullptr) std::memset(p, 0, kChunk);
    return p;
  }();
  if (zeros == nullptr) return -ENOMEM;
  for (uint64_t done = 0; done < len;) {
    size_t n = static_cast<size_t>(std::min<uint64_t>(kChunk, len - done));
    ssize_t w = ::pwrite(fd_.get(), zeros, n, static_cast<off_t>(offset + done));
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return w < 0 ? -errno : -EIO;
    done += static_cast<uint64_t>(w);
  }
  return 0;
}

bool VirtioBlock::OnResultLocked(Request& r, int64_t res) {
  if ((res == -EAGAIN || res == -EINTR || res == -ECANCELED) && r.retries++ < kMaxRetries)
    return true;  // transient (e.g. the submitting thread exited and io_uring cancelled it)
  switch (r.op) {
    case Op::kRead:
    case Op::kWrite: {
      if (res <= 0) {
        // 0: end of file inside the disk (the image shrank under us).
        LOG_WARN_RATELIMITED("virtio-blk: %s at offset %d failed: %s",
                             r.op == Op::kRead ? "read" : "write", r.offset + r.done,
                             res == 0 ? "unexpected end of file" : std::strerror(-res));
        FinishLocked(r, VIRTIO_BLK_S_IOERR);
        return false;
      }
      r.done += static_cast<uint64_t>(res);
      if (r.done >= r.len) {
        FinishLocked(r, VIRTIO_BLK_S_OK);
        return false;
      }
      // Short transfer: drop what was done from the iovecs and go on.
      uint64_t adv = static_cast<uint64_t>(res);
      while (adv > 0 && r.iov_pos < r.iov.size()) {
        iovec& v = r.iov[r.iov_pos];
        uint64_t n = std::min<uint64_t>(adv, v.iov_len);
        v.iov_base = static_cast<uint8_t*>(v.iov_base) + n;
        v.iov_len -= n;
        adv -= n;
        if (v.iov_len == 0) ++r.iov_pos;
      }
      return true;
    }
    case Op::kFlush:
      if (res < 0) LOG_WARN_RATELIMITED("virtio-blk: flush failed: %s", std::strerror(-res));
      FinishLocked(r, res < 0 ? VIRTIO_BLK_S_IOERR : VIRTIO_BLK_S_OK);
      return false;
    case Op::kFallocate:
      if (res == -EOPNOTSUPP || res == -ENOTTY) {
        if (r.type == VIRTIO_BLK_T_DISCARD) {
          res = 0;  // discard is a hint: leaving the data in place is allowed
        } else {
          res = ZeroFill(r.offset, r.len);  // e.g. block devices without zeroing support
        }
      }
      if (res < 0) LOG_WARN_RATELIMITED("virtio-blk: fallocate failed: %s", std::strerror(-res));
      FinishLocked(r, res < 0 ? VIRTIO_BLK_S_IOERR : VIRTIO_BLK_S_OK);
      return false;
    case Op::kNone:
      break;
  }
  FinishLocked(r, VIRTIO_BLK_S_OK);
  return false;
}

void VirtioBlock::FinishLocked(Request& r, uint8_t status) {
  DescriptorChain& c = r.chain;
  const uint16_t head = c.head();
  if (r.op == Op::kRead) {
    // The host wrote guest memory behind GuestMemory's back: tell migration (even on failure,
    // part of the data may have landed).
    if (r.bounce != nullptr) {
      if (status == VIRTIO_BLK_S_OK && queue_ != nullptr)
        c.WriteAt(0, std::span<const uint8_t>(r.bounce.get(), r.len));
    } else {
      ForEachRange(c.writable(), 0, r.len, [&](uint64_t gpa, uint64_t n) { mem_->MarkDirty(gpa, n); });
    }
  }
  if (queue_ != nullptr) {  // null: device reset, the chain is dropped
    uint32_t used_len = 0;
    if (status != kNoStatus) {
      c.WriteAt(c.writable_bytes() - 1, std::span<const uint8_t>(&status, 1));
      // The status is the last writable byte, so the high-water mark covers everything the
      // device may have written (read data included).
      used_len = c.bytes_written();
    }
    absl::Status s = queue_->AddUsed(head, used_len);
    if (!s.ok()) LOG_WARN_RATELIMITED("virtio-blk: AddUsed(%d): %s", head, s.ToString());
  }
  ++stats_.requests;
  if (status == VIRTIO_BLK_S_OK) {
    switch (r.type) {
      case VIRTIO_BLK_T_IN:
        ++stats_.reads;
        stats_.bytes_read += r.len;
        break;
      case VIRTIO_BLK_T_OUT:
        ++stats_.writes;
        stats_.bytes_written += r.len;
        break;
      case VIRTIO_BLK_T_FLUSH:
        ++stats_.flushes;
        break;
      case VIRTIO_BLK_T_DISCARD:
        ++stats_.discards;
        break;
      case VIRTIO_BLK_T_WRITE_ZEROES:
        ++stats_.write_zeroes;
        break;
    }
  } else if (status == VIRTIO_BLK_S_UNSUPP) {
    ++stats_.unsupported;
  } else {
    ++stats_.errors;
  }
  slots_[head].reset();  // destroys `r`
}

void VirtioBlock::FlushSubmissionsLocked() {
  if (!uring_ok_) return;
  while (::io_uring_sq_ready(&ring_) > 0) {
    int rc = ::io_uring_submit(&ring_);
    if (rc == -EINTR) continue;
    if (rc < 0) {
      // -EAGAIN/-EBUSY: kernel short of resources or CQ backlog; the SQEs stay queued and go
      // with the next submission (every completion event retries).
      if (rc != -EAGAIN && rc != -EBUSY)
        LOG_WARN_RATELIMITED("virtio-blk: io_uring_submit: %s", std::strerror(-rc));
      break;
    }
  }
}

void VirtioBlock::ReapLocked(bool wait) {
  for (;;) {
    FlushSubmissionsLocked();
    io_uring_cqe* cqe = nullptr;
    int rc;
    if (wait && in_flight_ > 0) {
      rc = ::io_uring_wait_cqe(&ring_, &cqe);
    } else {
      rc = ::io_uring_peek_cqe(&ring_, &cqe);
    }
    if (rc == -EINTR) continue;
    if (rc < 0 || cqe == nullptr) break;  // -EAGAIN: nothing completed
    const uint64_t head = ::io_uring_cqe_get_data64(cqe);
    const int res = cqe->res;
    ::io_uring_cqe_seen(&ring_, cqe);
    if (in_flight_ > 0) --in_flight_;
    Request* r = head < slots_.size() ? slots_[head].get() : nullptr;
    if (r == nullptr) continue;
    if (OnResultLocked(*r, res)) SubmitLocked(*r);
  }
}

void VirtioBlock::SignalIfNeededLocked() {
  if (queue_ != nullptr && queue_->active() && queue_->NeedsNotification() && signal_) signal_(0);
}

void VirtioBlock::OnCompletionEvent() {
  uint64_t v;
  // Clear the eventfd before reaping so that a completion racing with us re-arms it.
  while (::read(event_fd_.get(), &v, sizeof(v)) < 0 && errno == EINTR) {
  }
  std::lock_guard<std::mutex> l(mu_);
  ReapLocked(/*wait=*/false);
  SignalIfNeededLocked();
}

}  // namespace microvmm::virtio
