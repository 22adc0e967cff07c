// A small vfio-user device server for tests: one PCI function with
//   BAR0 (8 KiB): page 0 = registers of a DMA engine (trapped, REGION_READ/WRITE),
//                 page 1 = scratch RAM, directly mappable (sparse mmap area + region fd);
//   BAR2 (4 KiB): MSI-X table (4 vectors) at 0, PBA at 0x800;
//   config space (256 bytes) with an MSI-X capability at 0x40.
// The DMA engine copies or fills guest memory that the client shared with DMA_MAP (the memfd is
// mmapped here), records dirty pages while DMA logging is on, and raises MSI-X vector 0 when done.
// Migration uAPI v2 (DEVICE_FEATURE + MIG_DATA_READ/WRITE) saves/restores the registers, the
// completed-DMA counter, a pending doorbell, config space, MSI-X state and the scratch page.
//
// Every message from the client is validated; a malformed one gets an error reply (EINVAL & co)
// or, when the framing itself is broken, the connection is dropped. The server never crashes on
// input and never touches memory outside what DMA_MAP gave it.
#ifndef MICROVMM_TESTS_VFIO_USER_TEST_SERVER_TEST_DEVICE_H_
#define MICROVMM_TESTS_VFIO_USER_TEST_SERVER_TEST_DEVICE_H_

#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "devices/vfio/user/protocol.h"
#include "devices/vfio/vfio_device.h"
#include "vmm/base/fd.h"

namespace microvmm::vfio_user::testdev {

// BAR0 registers (64-bit each).
inline constexpr uint64_t kRegSrc = 0x00;
inline constexpr uint64_t kRegDst = 0x08;
inline constexpr uint64_t kRegLen = 0x10;
inline constexpr uint64_t kRegOp = 0x18;       // kOpCopy / kOpFill
inline constexpr uint64_t kRegPattern = 0x20;  // fill byte (low 8 bits)
inline constexpr uint64_t kRegDoorbell = 0x28;  // any write starts the DMA
inline constexpr uint64_t kRegStatus = 0x30;    // read-only
inline constexpr uint64_t kRegCompleted = 0x38;  // read-only: DMAs completed successfully
inline constexpr uint64_t kRegScratch = 0x40;
inline constexpr uint64_t kRegReplyDelayMs = 0x48;  // test hook: delay the doorbell's reply
inline constexpr uint64_t kNumRegs = 10;
inline constexpr uint64_t kOpCopy = 0;
inline constexpr uint64_t kOpFill = 1;
inline constexpr uint64_t kStatusIdle = 0;
inline constexpr uint64_t kStatusDone = 1;
inline constexpr uint64_t kStatusError = 2;
inline constexpr uint64_t kStatusPending = 3;  // doorbell rung while the device was stopped
inline constexpr uint64_t kMaxDmaLen = 16 << 20;

inline constexpr uint64_t kBar0Size = 0x2000;
inline constexpr uint64_t kScratchOffset = 0x1000;
inline constexpr uint64_t kScratchSize = 0x1000;
inline constexpr uint64_t kBar2Size = 0x1000;
inline constexpr uint64_t kMsixPbaOffset = 0x800;
inline constexpr uint32_t kMsixVectors = 4;
inline constexpr uint32_t kMsixCapOffset = 0x40;
inline constexpr uint32_t kConfigSize = 256;
inline constexpr uint16_t kVendorId = 0x1234;
inline constexpr uint16_t kDeviceId = 0x11f0;

struct ServerOptions {
  bool migration = true;
  bool dma_logging = true;
  // Test hook: version the server answers with (to provoke a mismatch).
  uint16_t reply_major = kVersionMajor;
  uint16_t reply_minor = kVersionMinor;
  uint32_t max_data_xfer_size = kDefaultMaxDataXfer;
  // PCI device id the function reports (tests of device classes the VMM has no model of).
  uint16_t device_id = kDeviceId;
  // Bytes of opaque pre-copy data the device offers in PRE_COPY (a device with a large state,
  // e.g. firmware tables): a fixed pattern that leads its migration stream; RESUMING checks it.
  uint64_t precopy_bytes = 0;
  // Honour kRegReplyDelayMs (off for fuzzing, where a random write could stall the server).
  bool allow_reply_delay = true;
};

class TestDeviceServer {
 public:
  static absl::StatusOr<std::unique_ptr<TestDeviceServer>> Create(const ServerOptions& options = {});
  ~TestDeviceServer();

  // Serves one connected client until it disconnects (OK) or breaks the framing (error).
  // DMA mappings and irq eventfds belong to the connection and are dropped when it ends; the
  // device state is kept (vfio-user spec, client disconnection).
  absl::Status Serve(int sock);
  // Binds `path`, then accepts and serves clients one after another until Stop().
  // `on_ready` runs once the socket listens.
  absl::Status ListenAndServe(const std::string& path, void (*on_ready)() = nullptr);
  void Stop();

  // Introspection for tests.
  uint64_t completed_dmas();
  vfio::MigState mig_state();
  size_t num_dma_mappings();

 private:
  struct DmaRegion {
    uint64_t size = 0;
    uint32_t flags = 0;
    ScopedMmap map;      // empty if the client sent no fd
    uint64_t delta = 0;  // map starts this far below the requested fd offset (page alignment)
  };
  // Everything that migrates.
  struct State {
    uint64_t regs[kNumRegs] = {};
    uint8_t config[kConfigSize] = {};
    uint8_t msix_table[kMsixVectors * 16] = {};
    uint64_t pba = 0;
    uint8_t scratch[kScratchSize] = {};
  };
  struct Reply {
    int error = 0;
    std::vector<uint8_t> payload;
    std::vector<int> fds;  // borrowed, sent with the reply
  };

  explicit TestDeviceServer(const ServerOptions& o) : options_(o) {}
  absl::Status Init();
  void ResetDevice();
  Reply Handle(const Message& m);
  Reply HandleVersion(const Message& m);
  Reply HandleDmaMap(const Message& m);
  Reply HandleDmaUnmap(const Message& m);
  Reply HandleRegionInfo(const Message& m);
  Reply HandleIrqInfo(const Message& m);
  Reply HandleSetIrqs(const Message& m);
  Reply HandleRegionAccess(const Message& m, bool write);
  Reply HandleFeature(const Message& m);
  Reply HandleMigDataRead(const Message& m);
  Reply HandleMigDataWrite(const Message& m);

  bool ConfigAccess(bool write, uint64_t off, uint8_t* data, uint32_t n);
  bool Bar0Access(bool write, uint64_t off, uint8_t* data, uint32_t n);
  bool Bar2Access(bool write, uint64_t off, uint8_t* data, uint32_t n);
  bool Running() const;
  void RunDma();
  uint8_t* Translate(uint64_t gpa, uint64_t len, bool write);
  // For mappings the client shared without an fd: DMA through DMA_READ/DMA_WRITE messages.
  bool SocketDmaAllowed(uint64_t gpa, uint64_t len, bool write);
  bool SocketDma(bool write, uint64_t gpa, uint8_t* buf, uint64_t len);
  void MarkDirty(uint64_t gpa, uint64_t len);
  void RaiseMsix(uint32_t vector);
  void DeliverPending();
  bool VectorMasked(uint32_t v) const;
  int SetMigState(vfio::MigState to);
  std::vector<uint8_t> PrecopyPart() const;  // options_.precopy_bytes of a fixed pattern
  std::vector<uint8_t> SaveBlob();
  bool LoadBlob(const std::vector<uint8_t>& blob);

  const ServerOptions options_;
  std::mutex mu_;
  State st_;
  uint8_t* scratch_ = nullptr;  // inside scratch_map_ (the mappable half of BAR0)
  ScopedFd scratch_fd_;
  ScopedMmap scratch_map_;
  uint64_t completed_ = 0;  // mirrors regs[kRegCompleted]
  bool version_done_ = false;
  int sock_ = -1;                 // current connection (for server-initiated DMA messages)
  uint32_t client_max_xfer_ = kDefaultMaxDataXfer;
  uint16_t next_dma_id_ = 0x8000;
  std::map<uint64_t, DmaRegion> dma_;  // by iova
  ScopedFd msix_fds_[kMsixVectors];
  vfio::MigState mig_ = vfio::MigState::kRunning;
  std::vector<uint8_t> mig_out_;  // saving: blob being read
  size_t mig_out_pos_ = 0;
  std::vector<uint8_t> mig_in_;  // resuming: blob being written
  bool logging_ = false;
  uint64_t log_page_ = 4096;
  std::vector<vfio::DmaRange> log_ranges_;
  std::set<uint64_t> dirty_;  // page numbers at log_page_ granularity
  uint8_t wmask_[kConfigSize] = {};
  ScopedFd listen_fd_;
  std::atomic<bool> stop_{false};
};

}  // namespace microvmm::vfio_user::testdev

#endif  // MICROVMM_TESTS_VFIO_USER_TEST_SERVER_TEST_DEVICE_H_
