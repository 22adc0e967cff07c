// MSI-X for one PCI function: the capability (PCI 3.0 §6.8.2), the vector table and the pending
// bit array (PBA) emulated inside a memory BAR, backed by KVM irqfds.
//
// Every vector owns a GSI (from the VM's GsiRouter) and an eventfd. The device raises vector v
// with Trigger(v) — a single write(2) on the eventfd, no ioctl, callable from any thread (or hand
// eventfd(v) to another thread/process). Whether KVM delivers it depends on the irqfd:
//   vector deliverable (MSI-X enabled, function not masked, vector not masked):
//       the GSI has an MSI route with the entry's address/data and the eventfd is attached
//       with KVM_IRQFD — KVM injects the interrupt on the write.
//   otherwise: the irqfd is detached; writes accumulate in the eventfd counter, which is the
//       vector's pending bit (PBA). When the vector becomes deliverable again the route is
//       (re)programmed, the irqfd re-attached and a pending event is delivered then.
// Routing updates (KVM_SET_GSI_ROUTING of the VM's whole table) happen only on control-path
// events: a vector becoming deliverable, or its address/data changing while deliverable.
#ifndef MICROVMM_VMM_PCI_MSIX_H_
#define MICROVMM_VMM_PCI_MSIX_H_

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "vmm/pci/eventfd.h"
#include "vmm/pci/gsi_router.h"
#include "vmm/pci/pci_config.h"
#include "vmm/pci/pci_state.pb.h"

namespace microvmm::pci {

inline constexpr uint32_t kMsixEntryBytes = 16;
inline constexpr uint16_t kMsixMaxVectors = 2048;
inline constexpr uint32_t kMsixCapabilityBytes = 12;
// Message control (capability offset +2).
inline constexpr uint16_t kMsixControlTableSizeMask = 0x07ff;  // N - 1, read-only
inline constexpr uint16_t kMsixControlFunctionMask = 1u << 14;
inline constexpr uint16_t kMsixControlEnable = 1u << 15;
// Vector control (entry offset +12).
inline constexpr uint32_t kMsixVectorMasked = 1u << 0;
// Entry layout.
inline constexpr uint32_t kMsixEntryAddressLo = 0;
inline constexpr uint32_t kMsixEntryAddressHi = 4;
inline constexpr uint32_t kMsixEntryData = 8;
inline constexpr uint32_t kMsixEntryControl = 12;

struct MsixEntry {
  uint32_t address_lo = 0;
  uint32_t address_hi = 0;
  uint32_t data = 0;
  uint32_t control = kMsixVectorMasked;  // vectors come out of reset masked
  uint64_t address() const { return uint64_t{address_hi} << 32 | address_lo; }
};

// Thread-safe.
class MsixTable {
 public:
  // Allocates `num_vectors` (1..2048) GSIs and eventfds. MSI-X starts disabled, vectors masked.
  // `router` must outlive the table.
  static absl::StatusOr<std::unique_ptr<MsixTable>> Create(GsiRouter& router,
                                                           uint16_t num_vectors);
  // Detaches the irqfds and frees the GSIs.
  ~MsixTable();
  MsixTable(const MsixTable&) = delete;
  MsixTable& operator=(const MsixTable&) = delete;

  uint16_t num_vectors() const { return static_cast<uint16_t>(entries_.size()); }
  uint64_t table_bytes() const { return uint64_t{kMsixEntryBytes} * num_vectors(); }
  uint64_t pba_bytes() const { return 8 * ((uint64_t{num_vectors()} + 63) / 64); }

  // Adds the MSI-X capability to `cfg`: the table at `table_offset` in memory BAR `table_bar`,
  // the PBA at `pba_offset` in `pba_bar` (offsets 8-byte aligned, inside the declared BARs, not
  // overlapping each other). Watches the capability's message-control word (enable, function
  // mask). `cfg` must outlive the table's use by the guest (normally both belong to the device).
  absl::StatusOr<uint32_t> AddCapability(PciConfigSpace& cfg, int table_bar,
                                         uint32_t table_offset, int pba_bar, uint32_t pba_offset);

  // BAR accesses of the owning device: true if [offset, offset+size) hits the table or the PBA
  // (as placed by AddCapability) and was handled.
  bool ReadBar(int bar, uint64_t offset, std::span<uint8_t> data);
  bool WriteBar(int bar, uint64_t offset, std::span<const uint8_t> data);

  // Guest accesses relative to the table / PBA start; any size 1..8. Reads beyond the end return
  // 0; the PBA is read-only.
  void ReadTable(uint64_t offset, std::span<uint8_t> data);
  void WriteTable(uint64_t offset, std::span<const uint8_t> data);
  void ReadPba(uint64_t offset, std::span<uint8_t> data) const;

  // Message control as written by the guest (only the enable and function-mask bits matter).
  void SetMessageControl(uint16_t control);
  uint16_t message_control() const;

  // Raises vector `v` (hot path: one eventfd write). Out-of-range vectors are ignored.
  void Trigger(uint16_t v) const;
  int eventfd(uint16_t v) const { return events_.at(v).fd(); }
  uint32_t gsi(uint16_t v) const { return gsis_.at(v); }

  bool enabled() const;
  bool function_masked() const;
  // True unless the vector is deliverable (enabled, function and vector unmasked).
  bool masked(uint16_t v) const;
  bool pending(uint16_t v) const;
  MsixEntry entry(uint16_t v) const;

  // Function reset: MSI-X disabled, every vector masked with a zero message, pending bits cleared.
  void Reset();
  // First KVM error met while the guest drove the table (guest accesses cannot return errors).
  absl::Status status() const;

  MsixState SaveState() const;
  // Needs the same vector count. Pending vectors are re-raised (delivered when unmasked).
  absl::Status RestoreState(const MsixState& state);

 private:
  MsixTable(GsiRouter& router, std::vector<uint32_t> gsis, std::vector<EventFd> events);
  bool DeliverableLocked(uint16_t v) const;
  // Brings KVM in line with the state of vectors [first, last): routes, then irqfds.
  void ReconcileLocked(uint16_t first, uint16_t last);
  void NoteError(const absl::Status& s);

  GsiRouter& router_;
  const std::vector<uint32_t> gsis_;
  const std::vector<EventFd> events_;
  mutable std::mutex mu_;
  std::vector<MsixEntry> entries_;
  std::vector<bool> attached_;                     // irqfd assigned
  std::vector<std::optional<MsiRoute>> routed_;    // route last pushed for the vector
  uint16_t control_ = 0;
  absl::Status status_;
  // Set by AddCapability.
  int table_bar_ = -1;
  uint32_t table_offset_ = 0;
  int pba_bar_ = -1;
  uint32_t pba_offset_ = 0;
};

}  // namespace microvmm::pci

#endif  // MICROVMM_VMM_PCI_MSIX_H_
