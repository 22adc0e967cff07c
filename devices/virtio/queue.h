// Device side of a virtio 1.x split virtqueue (virtio spec "Split Virtqueues"): descriptor table,
// available ring, used ring; VIRTQ_DESC_F_NEXT/WRITE/INDIRECT, VIRTIO_F_INDIRECT_DESC,
// VIRTIO_F_EVENT_IDX (used_event / avail_event) and the NO_INTERRUPT / NO_NOTIFY flags.
//
// Everything in guest memory is hostile. The queue reads each descriptor exactly once into a
// private copy, validates it, and only ever touches guest memory through GuestMemory (rings are
// validated to lie inside guest RAM at Activate(), buffers at PopChain()). Any protocol violation
// by the driver puts the queue into a sticky error state: it stops processing (PopChain/AddUsed
// fail, nothing more is written to the rings) and error() reports why; the transport is expected
// to set DEVICE_NEEDS_RESET and wait for the driver to reset the device (Reset()).
//
// Decisions on points the spec leaves open (see also queue.cc):
//  - Zero-length descriptors are accepted (the split-ring spec does not forbid them); they are
//    validated for flag ordering and counted towards the chain length but never accessed and not
//    listed in readable()/writable(). A zero-length *indirect* descriptor is an error (a table
//    needs at least one entry).
//  - Chain length: a walk of the descriptor table that visits more than `size` descriptors is a
//    loop (or a chain longer than the queue) -> error. An indirect table may hold at most `size`
//    entries ("A driver MUST NOT create a descriptor chain longer than the Queue Size") and its
//    walk is bounded by its entry count.
//  - A chain whose buffers add up to more than 2^32 bytes is an error (spec: drivers MUST NOT).
//  - The WRITE flag of a descriptor pointing to an indirect table is ignored (spec: MUST ignore).
//  - A head that is already in flight (popped, not yet used) is an error: the driver cannot
//    legitimately offer descriptors the device still owns.
//  - Rings may overlap each other; that can only hurt the guest, never the VMM.
//  - VIRTIO_F_VERSION_1 is not required here: on x86 the legacy ring format is identical
//    (little-endian) once the transport has computed the ring addresses. Transports that refuse
//    legacy drivers do so at FEATURES_OK.
//
// Memory ordering: avail->idx is read with an acquire load before ring entries and descriptors;
// used elements are written before used->idx is stored with release semantics; a full fence
// separates the used->idx store from reading used_event / avail->flags (NeedsNotification) and
// the avail_event / used->flags store from re-reading avail->idx (EnableNotifications).
//
// Thread safety: Virtqueue is internally locked, so e.g. a worker thread may complete requests
// (AddUsed) while another pops. DescriptorChain is a value owned by whoever popped it.
#ifndef MICROVMM_DEVICES_VIRTIO_QUEUE_H_
#define MICROVMM_DEVICES_VIRTIO_QUEUE_H_

#include <cstdint>
#include <mutex>
#include <optional>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "devices/virtio/queue_state.pb.h"
#include "vmm/memory/guest_memory.h"

namespace microvmm::virtio {

// Feature bit numbers (virtio spec "Reserved Feature Bits").
inline constexpr int kFeatureIndirectDesc = 28;  // VIRTIO_F_INDIRECT_DESC
inline constexpr int kFeatureEventIdx = 29;      // VIRTIO_F_EVENT_IDX
inline constexpr int kFeatureVersion1 = 32;      // VIRTIO_F_VERSION_1

// Descriptor flags.
inline constexpr uint16_t kDescFNext = 1;      // VIRTQ_DESC_F_NEXT
inline constexpr uint16_t kDescFWrite = 2;     // VIRTQ_DESC_F_WRITE
inline constexpr uint16_t kDescFIndirect = 4;  // VIRTQ_DESC_F_INDIRECT
// Ring flags.
inline constexpr uint16_t kAvailFNoInterrupt = 1;  // VIRTQ_AVAIL_F_NO_INTERRUPT
inline constexpr uint16_t kUsedFNoNotify = 1;      // VIRTQ_USED_F_NO_NOTIFY

inline constexpr uint32_t kMaxQueueSize = 32768;

// Ring layout (virtio spec table "Virtqueue Part / Alignment / Size"). The sizes include the
// EVENT_IDX fields whether or not the feature is negotiated.
inline constexpr uint64_t kDescAlign = 16, kAvailAlign = 2, kUsedAlign = 4;
inline constexpr uint64_t kDescSize = 16;
inline constexpr uint64_t DescTableBytes(uint32_t size) { return kDescSize * size; }
inline constexpr uint64_t AvailRingBytes(uint32_t size) { return 6 + 2ULL * size; }
inline constexpr uint64_t UsedRingBytes(uint32_t size) { return 6 + 8ULL * size; }

// vring_need_event(): having moved the index from `old_idx` to `new_idx`, does the other side's
// `event_idx` ask for a notification? (True iff event_idx is in [old_idx, new_idx) mod 2^16.)
inline constexpr bool VringNeedEvent(uint16_t event_idx, uint16_t new_idx, uint16_t old_idx) {
  return static_cast<uint16_t>(new_idx - event_idx - 1) < static_cast<uint16_t>(new_idx - old_idx);
}

// One guest buffer of a chain; always non-empty and entirely inside one guest RAM region.
struct GuestBuffer {
  uint64_t gpa = 0;
  uint32_t len = 0;
  bool operator==(const GuestBuffer&) const = default;
};

// A descriptor chain popped from the available ring: device-readable buffers first, then
// device-writable ones (the order is enforced at pop time), flattened through indirect tables.
class DescriptorChain {
 public:
  DescriptorChain() = default;

  uint16_t head() const { return head_; }
  const std::vector<GuestBuffer>& readable() const { return readable_; }
  const std::vector<GuestBuffer>& writable() const { return writable_; }
  uint64_t readable_bytes() const { return readable_bytes_; }
  uint64_t writable_bytes() const { return writable_bytes_; }
  // Number of descriptors walked (including zero-length ones and the indirect-table pointer).
  uint32_t descriptor_count() const { return descriptor_count_; }

  // Copies up to dst.size() bytes of the readable buffers, starting `offset` bytes into their
  // concatenation, into `dst`. Returns the number of bytes copied (short at the end of the data).
  uint64_t ReadAt(uint64_t offset, std::span<uint8_t> dst) const;
  // Copies `src` into the writable buffers starting `offset` bytes into their concatenation,
  // through GuestMemory::Write (marks the dirty bitmap). Returns the number of bytes written
  // (short when the buffers are too small). Raises bytes_written() to offset + returned count.
  uint64_t WriteAt(uint64_t offset, std::span<const uint8_t> src);

  // Sequential variants with a read cursor and a write cursor.
  uint64_t Read(std::span<uint8_t> dst);
  uint64_t Write(std::span<const uint8_t> src);
  uint64_t read_pos() const { return read_pos_; }
  uint64_t write_pos() const { return write_pos_; }
  uint64_t readable_remaining() const { return readable_bytes_ - read_pos_; }
  uint64_t writable_remaining() const { return writable_bytes_ - write_pos_; }

  // High-water mark of the bytes written from the start of the writable buffers: the `len` to
  // report in AddUsed() (clamped to 32 bits).
  uint32_t bytes_written() const;

 private:
  friend class Virtqueue;
  GuestMemory* mem_ = nullptr;
  uint16_t head_ = 0;
  uint32_t descriptor_count_ = 0;
  std::vector<GuestBuffer> readable_, writable_;
  uint64_t readable_bytes_ = 0, writable_bytes_ = 0;
  uint64_t read_pos_ = 0, write_pos_ = 0, written_hwm_ = 0;
};

class Virtqueue {
 public:
  // `mem` must outlive the queue. `index` only labels log and error messages. `max_size` is
  // what the transport reports as QueueNumMax (power of 2, 1..32768; anything else is taken as
  // 32768); size() starts there.
  Virtqueue(GuestMemory* mem, uint16_t index, uint32_t max_size = kMaxQueueSize);
  Virtqueue(const Virtqueue&) = delete;
  Virtqueue& operator=(const Virtqueue&) = delete;

  uint16_t index() const { return index_; }
  uint32_t max_size() const { return max_size_; }

  // --- Configuration, as the transport sets it. Refused (FailedPrecondition) while active. ---
  absl::Status set_size(uint32_t size);  // validated at Activate()
  absl::Status set_desc_addr(uint64_t gpa);
  absl::Status set_avail_addr(uint64_t gpa);
  absl::Status set_used_addr(uint64_t gpa);
  absl::Status set_ready(bool ready);
  // All negotiated feature bits; the queue uses INDIRECT_DESC and EVENT_IDX.
  absl::Status set_features(uint64_t features);

  uint32_t size() const;
  uint64_t desc_addr() const;
  uint64_t avail_addr() const;
  uint64_t used_addr() const;
  bool ready() const;
  uint64_t features() const;

  // Validates the configuration (ready; size a power of 2 <= max_size; desc 16-, avail 2-,
  // used 4-byte aligned; each ring entirely inside guest RAM) and starts processing. On failure
  // the queue stays inactive (not in the error state) and the error says what is wrong.
  absl::Status Activate();
  bool active() const;

  // Sticky error state after the driver broke the protocol; cleared only by Reset().
  bool in_error() const;
  absl::Status error() const;  // OkStatus() unless in_error()

  // Pops the next available chain. nullopt: the ring is empty. Error: the queue is inactive or
  // in (or has just entered) the error state. Does not wait for earlier chains to be used.
  absl::StatusOr<std::optional<DescriptorChain>> PopChain();
  // Number of chains the driver has made available and the device has not popped yet.
  absl::StatusOr<uint16_t> PendingAvail();

  // Returns the chain `head` (which must be in flight) to the driver: writes the used element
  // {head, len}, then publishes used->idx. `len` is the number of bytes written into the
  // chain's writable buffers. FailedPrecondition if `head` is not in flight (a device bug; the
  // queue state is unchanged).
  absl::Status AddUsed(uint16_t head, uint32_t len);
  // After one or more AddUsed(): should the device send a used-buffer notification (interrupt)?
  // EVENT_IDX: vring_need_event(used_event, used idx now, used idx at the last decision);
  // otherwise: !(avail->flags & NO_INTERRUPT). False if nothing was used since the last call.
  bool NeedsNotification();

  // Available-buffer notification suppression (device side). Without EVENT_IDX this sets or
  // clears VIRTQ_USED_F_NO_NOTIFY; with EVENT_IDX (used->flags stays 0) enabling publishes
  // avail_event = next_avail and keeps it there after every pop, disabling stops updating it.
  // EnableNotifications() returns true if chains are already pending (process them: the driver
  // may not notify for those), after a full fence.
  void DisableNotifications();
  bool EnableNotifications();
  bool notifications_enabled() const;
  // Writes avail_event directly (EVENT_IDX only; no-op otherwise). While notifications are
  // enabled the next PopChain() moves it back to next_avail.
  void SetAvailEvent(uint16_t avail_event);

  // Device-side indices (free-running, mod 2^16).
  uint16_t next_avail() const;
  uint16_t next_used() const;
  // Heads popped but not yet used, oldest pop first.
  std::vector<uint16_t> InFlightHeads() const;
  // Walks the chain of an in-flight head again (e.g. to resubmit requests after a restore).
  // The descriptors still belong to the device, so the guest must not have changed them; any
  // violation puts the queue into the error state as in PopChain().
  absl::StatusOr<DescriptorChain> ReadInFlightChain(uint16_t head);

  // Save/restore. RestoreState() validates the state (and, if active, the rings against guest
  // RAM) and on failure leaves the queue reset and returns the error.
  VirtqueueState SaveState() const;
  absl::Status RestoreState(const VirtqueueState& state);

  // Back to the initial state (size = max_size, everything else zero/false, no error).
  void Reset();

 private:
  struct RawDesc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
  };
  static_assert(sizeof(RawDesc) == kDescSize);

  void ResetLocked();
  absl::Status ValidateConfigLocked() const;
  absl::Status CheckUsableLocked() const;
  // Enters the error state (logs, rate-limited) and returns the error.
  absl::Status FailLocked(const std::string& what);
  absl::StatusOr<DescriptorChain> WalkChainLocked(uint16_t head);
  std::vector<uint16_t> InFlightHeadsLocked() const;
  uint16_t LoadAvailIdxLocked() const;
  void WriteAvailEventLocked(uint16_t value);
  void WriteUsedFlagsLocked(uint16_t value);
  bool event_idx() const { return (features_ >> kFeatureEventIdx) & 1; }
  bool indirect() const { return (features_ >> kFeatureIndirectDesc) & 1; }

  GuestMemory* const mem_;
  const uint16_t index_;
  const uint32_t max_size_;

  mutable std::mutex mu_;
  // Configuration.
  uint32_t size_;
  uint64_t desc_addr_ = 0, avail_addr_ = 0, used_addr_ = 0;
  bool ready_ = false;
  uint64_t features_ = 0;
  // Run state.
  bool active_ = false;
  absl::Status error_;
  uint16_t next_avail_ = 0, next_used_ = 0;
  uint16_t signalled_used_ = 0;
  bool signalled_used_valid_ = false;
  uint32_t used_since_signal_ = 0;
  bool notifications_enabled_ = true;
  // Per head: 0 = not in flight, else the pop sequence number (orders InFlightHeads()).
  std::vector<uint64_t> in_flight_;
  uint32_t in_flight_count_ = 0;
  uint64_t pop_seq_ = 0;
  // Host views of the rings, valid while active_ (validated inside guest RAM at activation).
  uint8_t* desc_host_ = nullptr;
  uint8_t* avail_host_ = nullptr;
  uint8_t* used_host_ = nullptr;
};

}  // namespace microvmm::virtio

#endif  // MICROVMM_DEVICES_VIRTIO_QUEUE_H_
