// vfio-user wire protocol (QEMU docs "vfio-user Protocol Specification", version 0.1 with the
// migration v2 additions: DEVICE_FEATURE 16, MIG_DATA_READ 17, MIG_DATA_WRITE 18).
//
// Every message is a 16-byte header followed by a command-specific payload, host endianness,
// over an AF_UNIX SOCK_STREAM socket; file descriptors travel as SCM_RIGHTS ancillary data
// attached to the first byte of the message. Both peers are untrusted: the receive path bounds
// every size before allocating, and the payload decoders below never read past the payload.
//
// Choices where the spec is loose (client and test server agree on all of them):
//  - We speak version 0.1 and refuse another major or a higher minor in the reply.
//  - Error replies map errno -> absl code (vmm/base/status.h); ENOTTY/ENOTSUP/ENOSYS, what VFIO
//    answers for a missing feature, become kUnimplemented.
//  - DMA_LOGGING_REPORT bitmaps use the kernel VFIO layout: bit i of u64 word w = page 64*w+i of
//    the reported range (the spec's formula is garbled); bits past the range are zero.
//  - SET_IRQS with DATA_EVENTFD and no fds de-assigns [start, start+count); DATA_NONE|TRIGGER with
//    count 0 disables the index.
//  - Migration: the server executes single FSM arcs only (callers walk multi-step paths, as the
//    VfioDevice contract says); a rejected arc leaves the state unchanged. MIG_DATA_READ returning
//    fewer bytes than asked is not end-of-stream for us; 0 bytes is.
//  - DMA_UNMAP's reply echoes the request; the client does not depend on it.
//  - A timeout or any framing error ends the session for the client (see client.h).
#ifndef MICROVMM_DEVICES_VFIO_USER_PROTOCOL_H_
#define MICROVMM_DEVICES_VFIO_USER_PROTOCOL_H_

#include <cstdint>
#include <cstring>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "vmm/base/fd.h"

namespace microvmm::vfio_user {

inline constexpr uint16_t kVersionMajor = 0;
inline constexpr uint16_t kVersionMinor = 1;

enum Command : uint16_t {
  kCmdVersion = 1,
  kCmdDmaMap = 2,
  kCmdDmaUnmap = 3,
  kCmdDeviceGetInfo = 4,
  kCmdDeviceGetRegionInfo = 5,
  kCmdDeviceGetRegionIoFds = 6,
  kCmdDeviceGetIrqInfo = 7,
  kCmdDeviceSetIrqs = 8,
  kCmdRegionRead = 9,
  kCmdRegionWrite = 10,
  kCmdDmaRead = 11,
  kCmdDmaWrite = 12,
  kCmdDeviceReset = 13,
  kCmdRegionWriteMulti = 15,
  kCmdDeviceFeature = 16,
  kCmdMigDataRead = 17,
  kCmdMigDataWrite = 18,
};
const char* CommandName(uint16_t cmd);

// Header flags.
inline constexpr uint32_t kFlagTypeMask = 0xf;
inline constexpr uint32_t kFlagTypeCommand = 0;
inline constexpr uint32_t kFlagTypeReply = 1;
inline constexpr uint32_t kFlagNoReply = 1u << 4;
inline constexpr uint32_t kFlagError = 1u << 5;

// Limits. max_data_xfer_size defaults to 1 MiB in the spec; a message may carry that much data
// plus a small fixed part. Anything bigger is a protocol violation (no unbounded allocation).
inline constexpr uint32_t kDefaultMaxDataXfer = 1u << 20;
inline constexpr uint32_t kMaxMessageSize = kDefaultMaxDataXfer + 4096;
inline constexpr size_t kMaxFdsPerMessage = 16;

#pragma pack(push, 1)
struct Header {
  uint16_t msg_id;
  uint16_t command;
  uint32_t msg_size;  // including the header
  uint32_t flags;
  uint32_t error;  // errno, valid when kFlagError is set in a reply
};
static_assert(sizeof(Header) == 16);

struct VersionPayload {  // followed by optional NUL-terminated JSON
  uint16_t major;
  uint16_t minor;
};

inline constexpr uint32_t kDmaFlagRead = 1u << 0;
inline constexpr uint32_t kDmaFlagWrite = 1u << 1;
struct DmaMapPayload {
  uint32_t argsz;
  uint32_t flags;
  uint64_t offset;  // into the passed fd
  uint64_t address;
  uint64_t size;
};
static_assert(sizeof(DmaMapPayload) == 32);

struct DmaUnmapPayload {
  uint32_t argsz;
  uint32_t flags;
  uint64_t address;
  uint64_t size;
};
static_assert(sizeof(DmaUnmapPayload) == 24);

inline constexpr uint32_t kDeviceFlagReset = 1u << 0;
inline constexpr uint32_t kDeviceFlagPci = 1u << 1;
struct DeviceInfoPayload {
  uint32_t argsz;
  uint32_t flags;
  uint32_t num_regions;
  uint32_t num_irqs;
};

inline constexpr uint32_t kRegionFlagRead = 1u << 0;
inline constexpr uint32_t kRegionFlagWrite = 1u << 1;
inline constexpr uint32_t kRegionFlagMmap = 1u << 2;
inline constexpr uint32_t kRegionFlagCaps = 1u << 3;
struct RegionInfoPayload {
  uint32_t argsz;
  uint32_t flags;
  uint32_t index;
  uint32_t cap_offset;  // from the start of this struct
  uint64_t size;
  uint64_t offset;  // mmap offset into the region fd
};
static_assert(sizeof(RegionInfoPayload) == 32);

inline constexpr uint16_t kCapSparseMmap = 1;  // VFIO_REGION_INFO_CAP_SPARSE_MMAP
struct CapHeader {
  uint16_t id;
  uint16_t version;
  uint32_t next;  // from the start of RegionInfoPayload; 0 ends the list
};
struct SparseMmapCap {  // after CapHeader
  uint32_t nr_areas;
  uint32_t reserved;
};
struct SparseMmapArea {
  uint64_t offset;
  uint64_t size;
};

inline constexpr uint32_t kIrqInfoEventfd = 1u << 0;
inline constexpr uint32_t kIrqInfoMaskable = 1u << 1;
inline constexpr uint32_t kIrqInfoAutomasked = 1u << 2;
inline constexpr uint32_t kIrqInfoNoresize = 1u << 3;
struct IrqInfoPayload {
  uint32_t argsz;
  uint32_t flags;
  uint32_t index;
  uint32_t count;
};

inline constexpr uint32_t kIrqSetDataNone = 1u << 0;
inline constexpr uint32_t kIrqSetDataBool = 1u << 1;
inline constexpr uint32_t kIrqSetDataEventfd = 1u << 2;
inline constexpr uint32_t kIrqSetActionMask = 1u << 3;
inline constexpr uint32_t kIrqSetActionUnmask = 1u << 4;
inline constexpr uint32_t kIrqSetActionTrigger = 1u << 5;
inline constexpr uint32_t kIrqSetDataTypeMask = 0x7;
inline constexpr uint32_t kIrqSetActionTypeMask = 0x38;
struct IrqSetPayload {  // DATA_BOOL: followed by `count` bytes
  uint32_t argsz;
  uint32_t flags;
  uint32_t index;
  uint32_t start;
  uint32_t count;
};

struct RegionAccessPayload {  // followed by `count` data bytes (write request / read reply)
  uint64_t offset;
  uint32_t region;
  uint32_t count;
};
static_assert(sizeof(RegionAccessPayload) == 16);

struct DmaAccessPayload {  // followed by `count` data bytes (write request / read reply)
  uint64_t address;
  uint64_t count;
};

inline constexpr uint32_t kFeatureMaskIndex = 0xffff;
inline constexpr uint32_t kFeatureGet = 1u << 16;
inline constexpr uint32_t kFeatureSet = 1u << 17;
inline constexpr uint32_t kFeatureProbe = 1u << 18;
inline constexpr uint32_t kFeatureMigration = 1;
inline constexpr uint32_t kFeatureMigDeviceState = 2;
inline constexpr uint32_t kFeatureDmaLoggingStart = 6;
inline constexpr uint32_t kFeatureDmaLoggingStop = 7;
inline constexpr uint32_t kFeatureDmaLoggingReport = 8;
struct FeaturePayload {  // followed by feature data
  uint32_t argsz;
  uint32_t flags;
};
inline constexpr uint64_t kMigrationStopCopy = 1u << 0;
inline constexpr uint64_t kMigrationP2p = 1u << 1;
inline constexpr uint64_t kMigrationPreCopy = 1u << 2;
struct MigDeviceStateData {
  uint32_t device_state;
  uint32_t data_fd;  // unused in vfio-user
};
struct DmaLoggingControl {  // followed by num_ranges DmaLoggingRange
  uint64_t page_size;
  uint32_t num_ranges;
  uint32_t reserved;
};
struct DmaLoggingRange {
  uint64_t iova;
  uint64_t length;
};
struct DmaLoggingReport {  // reply: followed by the bitmap (u64 words)
  uint64_t iova;
  uint64_t length;
  uint64_t page_size;
};
struct MigDataPayload {  // followed by `size` bytes (read reply / write request)
  uint32_t argsz;
  uint32_t size;
};
#pragma pack(pop)

// A received message. `payload` excludes the header.
struct Message {
  Header hdr{};
  std::vector<uint8_t> payload;
  std::vector<ScopedFd> fds;

  uint32_t type() const { return hdr.flags & kFlagTypeMask; }
  bool is_reply() const { return type() == kFlagTypeReply; }
  bool is_error() const { return (hdr.flags & kFlagError) != 0; }
};

// Sends header + payload (+ fds via SCM_RIGHTS). Fills in hdr.msg_size. Handles EINTR and
// partial writes; MSG_NOSIGNAL so a dead peer is an error, not SIGPIPE.
absl::Status SendMessage(int sock, Header hdr, std::span<const uint8_t> payload,
                         std::span<const int> fds = {});

// Receives one whole message. timeout_ms < 0 waits forever; the timeout covers the whole message.
// Errors: kUnavailable "peer closed the connection" on EOF at a message boundary,
// kDeadlineExceeded on timeout, kDataLoss for malformed framing (bad size, truncated, too many
// fds). After an error other than a clean EOF the stream position is unknown: close it.
absl::StatusOr<Message> RecvMessage(int sock, int timeout_ms, uint32_t max_size = kMaxMessageSize);

// Builds a payload out of fixed structs and byte blobs.
class PayloadBuilder {
 public:
  template <typename T>
  PayloadBuilder& Add(const T& v) {
    static_assert(std::is_trivially_copyable_v<T>);
    const auto* p = reinterpret_cast<const uint8_t*>(&v);
    buf_.insert(buf_.end(), p, p + sizeof(T));
    return *this;
  }
  PayloadBuilder& AddBytes(std::span<const uint8_t> b) {
    buf_.insert(buf_.end(), b.begin(), b.end());
    return *this;
  }
  PayloadBuilder& AddZeros(size_t n) {
    buf_.resize(buf_.size() + n, 0);
    return *this;
  }
  std::vector<uint8_t>& bytes() { return buf_; }
  std::span<const uint8_t> span() const { return buf_; }

 private:
  std::vector<uint8_t> buf_;
};

// Bounds-checked copy of a struct out of a payload.
template <typename T>
absl::StatusOr<T> ReadAt(std::span<const uint8_t> payload, size_t offset) {
  static_assert(std::is_trivially_copyable_v<T>);
  if (offset > payload.size() || payload.size() - offset < sizeof(T)) {
    return absl::DataLossError("vfio-user: payload too short");
  }
  T v;
  std::memcpy(&v, payload.data() + offset, sizeof(T));
  return v;
}

// VERSION JSON capabilities. Only the fields we use; values are bounded on parse.
struct VersionCaps {
  uint32_t max_msg_fds = 1;                      // spec default
  uint32_t max_data_xfer_size = kDefaultMaxDataXfer;  // spec default
  bool migration = false;
  uint64_t pgsize = 4096;
};
std::string EncodeVersionJson(const VersionCaps& caps);
// Accepts at most 4 KiB of JSON. This is deliberately not a general JSON parser: it checks the
// text is printable and balanced, then looks up the known keys ("max_msg_fds",
// "max_data_xfer_size", "migration" object with "pgsize"); unknown keys are ignored.
absl::StatusOr<VersionCaps> ParseVersionJson(absl::string_view json);

}  // namespace microvmm::vfio_user

#endif  // MICROVMM_DEVICES_VFIO_USER_PROTOCOL_H_
