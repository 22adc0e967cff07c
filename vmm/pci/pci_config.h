// PCI configuration space of one function: the 256-byte header (type 0 endpoint or type 1
// PCI-to-PCI bridge) with its capability list, the 4 KiB PCIe extended space (reads as zero),
// per-byte write masks so read-only fields stay read-only, and BAR registers with the sizing
// protocol (write all-ones, read back ~(size-1) | type bits).
//
// References: PCI Local Bus Specification 3.0 §6.1 (header), §6.2.5 (BARs), §6.7 (capability
// list); PCI-to-PCI Bridge Architecture 1.2 §3.2 (type 1 header).
#ifndef MICROVMM_VMM_PCI_PCI_CONFIG_H_
#define MICROVMM_VMM_PCI_PCI_CONFIG_H_

#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <optional>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "vmm/pci/pci_state.pb.h"

namespace microvmm::pci {

inline constexpr uint32_t kConfigHeaderSize = 256;    // conventional PCI configuration space
inline constexpr uint32_t kConfigSpaceSize = 4096;    // with the PCIe extended space

// Header registers common to both header types.
inline constexpr uint32_t kRegVendorId = 0x00;
inline constexpr uint32_t kRegDeviceId = 0x02;
inline constexpr uint32_t kRegCommand = 0x04;
inline constexpr uint32_t kRegStatus = 0x06;
inline constexpr uint32_t kRegRevisionId = 0x08;
inline constexpr uint32_t kRegClassCode = 0x09;  // 3 bytes: prog-if, subclass, base class
inline constexpr uint32_t kRegCacheLineSize = 0x0c;
inline constexpr uint32_t kRegLatencyTimer = 0x0d;
inline constexpr uint32_t kRegHeaderType = 0x0e;
inline constexpr uint32_t kRegBist = 0x0f;
inline constexpr uint32_t kRegBar0 = 0x10;
inline constexpr uint32_t kRegCapabilitiesPointer = 0x34;
inline constexpr uint32_t kRegInterruptLine = 0x3c;
inline constexpr uint32_t kRegInterruptPin = 0x3d;
// Type 0 only.
inline constexpr uint32_t kRegSubsystemVendorId = 0x2c;
inline constexpr uint32_t kRegSubsystemId = 0x2e;
inline constexpr uint32_t kRegExpansionRom = 0x30;
// Type 1 only.
inline constexpr uint32_t kRegPrimaryBus = 0x18;
inline constexpr uint32_t kRegSecondaryBus = 0x19;
inline constexpr uint32_t kRegSubordinateBus = 0x1a;
inline constexpr uint32_t kRegIoBase = 0x1c;
inline constexpr uint32_t kRegMemoryBase = 0x20;
inline constexpr uint32_t kRegPrefetchBase = 0x24;
inline constexpr uint32_t kRegPrefetchBaseUpper = 0x28;
inline constexpr uint32_t kRegIoBaseUpper = 0x30;
inline constexpr uint32_t kRegBridgeRom = 0x38;
inline constexpr uint32_t kRegBridgeControl = 0x3e;

inline constexpr uint8_t kHeaderTypeEndpoint = 0x00;
inline constexpr uint8_t kHeaderTypeBridge = 0x01;
inline constexpr uint8_t kHeaderTypeMultiFunction = 0x80;

// Command register bits.
inline constexpr uint16_t kCommandIo = 1 << 0;
inline constexpr uint16_t kCommandMemory = 1 << 1;
inline constexpr uint16_t kCommandBusMaster = 1 << 2;
inline constexpr uint16_t kCommandParity = 1 << 6;
inline constexpr uint16_t kCommandSerr = 1 << 8;
inline constexpr uint16_t kCommandIntxDisable = 1 << 10;
inline constexpr uint16_t kCommandWritable = kCommandIo | kCommandMemory | kCommandBusMaster |
                                             kCommandParity | kCommandSerr | kCommandIntxDisable;
// Status register bits.
inline constexpr uint16_t kStatusInterrupt = 1 << 3;
inline constexpr uint16_t kStatusCapabilities = 1 << 4;

// Capability IDs.
inline constexpr uint8_t kCapIdPowerManagement = 0x01;
inline constexpr uint8_t kCapIdMsi = 0x05;
inline constexpr uint8_t kCapIdVendor = 0x09;
inline constexpr uint8_t kCapIdPciExpress = 0x10;
inline constexpr uint8_t kCapIdMsix = 0x11;
inline constexpr uint32_t kCapabilityAreaStart = 0x40;

// BAR low bits.
inline constexpr uint32_t kBarIoSpace = 0x1;
inline constexpr uint32_t kBarMem64 = 0x4;
inline constexpr uint32_t kBarPrefetchable = 0x8;

inline constexpr int kNumBarsType0 = 6;
inline constexpr int kNumBarsType1 = 2;

enum class BarType { kNone, kIo, kMem32, kMem64 };
const char* BarTypeName(BarType t);

struct PciHeader {
  uint16_t vendor_id = 0;
  uint16_t device_id = 0;
  uint8_t revision_id = 0;
  uint32_t class_code = 0;  // 24 bits: base class << 16 | subclass << 8 | programming interface
  uint8_t header_type = kHeaderTypeEndpoint;  // 0 = endpoint, 1 = PCI-to-PCI bridge
  bool multifunction = false;
  uint16_t subsystem_vendor_id = 0;  // type 0 only
  uint16_t subsystem_id = 0;         // type 0 only
  uint8_t interrupt_pin = 0;         // 0 = no INTx, 1..4 = INTA#..INTD#
};

// A BAR whose decoded address the guest changed.
struct BarMove {
  int index = 0;
  BarType type = BarType::kNone;
  uint64_t size = 0;
  uint64_t old_addr = 0;  // 0: was not assigned
  uint64_t new_addr = 0;
};

// Not thread-safe: PciRootBus serializes guest config accesses; device models that look at their
// config space from other threads synchronize themselves. Exception: command() is an atomic
// mirror and may be read from any thread (the BAR windows check the decode-enable bits with it).
class PciConfigSpace {
 public:
  explicit PciConfigSpace(const PciHeader& header);
  PciConfigSpace(const PciConfigSpace&) = delete;
  PciConfigSpace& operator=(const PciConfigSpace&) = delete;

  // ---- Guest accesses (configuration mechanism #1 or ECAM) ----
  // `offset` < 4096, `size` 1, 2 or 4 and naturally aligned; otherwise reads return all-ones and
  // writes are dropped. Offsets 0x100..0xFFF (PCIe extended space) read as zero.
  uint32_t Read(uint32_t offset, unsigned size) const;
  // Applies the write masks; may call the BAR-moved callback and write observers.
  void Write(uint32_t offset, unsigned size, uint32_t value);

  // ---- Device-model set-up ----
  // Declares BAR `index` (a 64-bit BAR also uses index+1). `size` is a power of two: memory BARs
  // at least 16 bytes (32-bit BARs at most 2 GiB), I/O BARs 4..256 bytes.
  absl::Status AddBar(int index, BarType type, uint64_t size, bool prefetchable = false);
  // Programs the BAR's address (VMM side, e.g. at VM build): no callback, becomes the mapped one.
  absl::Status SetBarAddress(int index, uint64_t addr);
  BarType bar_type(int index) const;
  uint64_t bar_size(int index) const;
  bool bar_prefetchable(int index) const;
  // Address the BAR decodes right now (what the registers hold, with the type bits cleared).
  uint64_t bar_address(int index) const;
  // Address last reported as mapped (SetBarAddress or the last BarMove).
  uint64_t bar_mapped_address(int index) const;
  int num_bars() const { return header_type_ == kHeaderTypeBridge ? kNumBarsType1 : kNumBarsType0; }
  uint8_t header_type() const { return header_type_; }

  // Appends a capability. `body` is the whole capability structure starting at its ID byte; its
  // second byte (next pointer) is filled in. `writable` holds per-byte guest write masks for the
  // body (empty = all read-only; bytes 0..1 are always read-only). Returns its offset (a dword-
  // aligned offset >= 0x40). Fails when the 256-byte header is full.
  absl::StatusOr<uint32_t> AddCapability(std::span<const uint8_t> body,
                                         std::span<const uint8_t> writable = {});
  // Walks the list from the capabilities pointer; the first capability with `id`.
  std::optional<uint32_t> FindCapability(uint8_t id) const;

  // Raw access for device models: no masks, no callbacks. `offset + size` <= 256.
  uint32_t ReadRaw(uint32_t offset, unsigned size) const;
  void WriteRaw(uint32_t offset, unsigned size, uint32_t value);
  // Makes bits of a device-specific register guest-writable (little-endian `mask`).
  void SetWriteMask(uint32_t offset, unsigned size, uint32_t mask);
  uint32_t WriteMask(uint32_t offset, unsigned size) const;

  uint16_t command() const { return command_.load(std::memory_order_relaxed); }
  bool io_enabled() const { return command() & kCommandIo; }
  bool memory_enabled() const { return command() & kCommandMemory; }
  bool bus_master_enabled() const { return command() & kCommandBusMaster; }
  bool intx_disabled() const { return command() & kCommandIntxDisable; }
  uint8_t interrupt_line() const { return regs_[kRegInterruptLine]; }
  uint8_t interrupt_pin() const { return regs_[kRegInterruptPin]; }

  // Called after a guest write changed the address a BAR decodes. Not called for sizing probes
  // (a write of all-ones) nor, for a 64-bit BAR, on the write of its lower half: the move is
  // reported when the upper half is written (Linux and firmware write low, then high).
  using BarMovedFn = std::function<void(const BarMove&)>;
  void set_bar_moved_callback(BarMovedFn fn) { bar_moved_ = std::move(fn); }
  // `fn` runs after every guest write that overlaps [offset, offset + len) (e.g. the MSI-X
  // message-control word). Observers run in registration order.
  void AddWriteObserver(uint32_t offset, uint32_t len, std::function<void()> fn);

  // Saved state: registers and mapped BAR addresses (layout/masks come from the device model,
  // which must declare the same BARs and capabilities before RestoreState).
  PciConfigState SaveState() const;
  absl::Status RestoreState(const PciConfigState& state);

 private:
  struct Bar {
    BarType type = BarType::kNone;
    uint64_t size = 0;
    bool prefetchable = false;
    uint64_t mapped = 0;
  };
  struct Observer {
    uint32_t offset;
    uint32_t len;
    std::function<void()> fn;
  };
  bool ValidBarIndex(int index) const { return index >= 0 && index < num_bars(); }
  // BAR index whose register(s) hold byte `offset` (the 64-bit upper half maps to its lower index).
  std::optional<int> BarAt(uint32_t offset) const;
  void SetBarMask(int index);
  void CheckBarMoves(uint32_t offset, unsigned size, uint32_t value);

  std::array<uint8_t, kConfigHeaderSize> regs_{};
  std::array<uint8_t, kConfigHeaderSize> wmask_{};
  std::array<Bar, kNumBarsType0> bars_{};
  std::atomic<uint16_t> command_{0};
  uint8_t header_type_;
  uint32_t next_cap_ = kCapabilityAreaStart;
  uint32_t last_cap_ = 0;
  BarMovedFn bar_moved_;
  std::vector<Observer> observers_;
};

}  // namespace microvmm::pci

#endif  // MICROVMM_VMM_PCI_PCI_CONFIG_H_
