// A passthrough PCI function: the guest-facing PCI model over a vfio::VfioDevice (kernel VFIO or
// vfio-user), written once for both backends.
//
// Configuration space (read once from the device's config region at attach; the guest sees a
// shadow, byte by byte one of two kinds):
//   shadow (virtualised):
//     - header 0x00..0x3F: identity read-only; BARs re-declared from the region sizes (sizing
//       protocol and moves through PciRootBus as for emulated devices); expansion ROM hidden
//       (reads 0); interrupt line guest-writable; interrupt pin as the device's when INTx is
//       wired, else 0; header type forced to a single-function endpoint (bridges are refused).
//       Command: IO, MEM, BUS_MASTER and INTX_DISABLE are passed to the device (read-modify-write
//       of its command register); PARITY/SERR stay virtual. Status: the device's, with the
//       capability bit ours.
//     - capability list rebuilt over the device's own offsets, keeping only
//         PM (01)          read-only snapshot (guest power-state changes are dropped),
//         PCI Express (10) read-only snapshot (device control writes are dropped: FLR goes
//                          through Reset(), payload/read-request sizes stay as the host set them),
//         MSI (05)         virtualised (enable, MME, address, data, per-vector mask; see below),
//         MSI-X (11)       virtualised (enable + function mask writable, see below).
//       Everything else (vendor-specific, ...) is unlinked and its bytes read as zero.
//     - PCIe extended space (0x100..0xFFF) reads zero: no extended capabilities (AER, SR-IOV...).
//   pass-through: the remaining bytes of 0x40..0xFF (device-specific registers outside every
//     capability) are read from and written to the device.
// BARs: every access is trapped (ReadBar/WriteBar -> RegionRead/RegionWrite) unless a BarMapper
//   is given: then the mappable areas of each BAR (sparse mmap areas, page-aligned, minus the
//   pages holding the MSI-X table and PBA, which are always trapped) are mapped into the guest
//   at the BAR's address while memory decode is on, and follow BAR moves.
// MSI-X: the guest's table/PBA live in a vmm/pci MsixTable (one GSI + eventfd per vector; the
//   eventfd is a KVM irqfd while the vector is deliverable). When the guest sets MSI-X enable,
//   the device's vectors are connected to those eventfds with SetIrqs(kMsixIrqIndex): the device
//   interrupts the guest through KVM with no VMM thread in the path. Masking keeps the eventfd
//   connected: the MsixTable detaches the irqfd, so device interrupts accumulate in the eventfd
//   counter (the emulated PBA bit) and are delivered on unmask. Clearing enable disables the
//   index on the device (SetIrqs with no fds).
// INTx (only with an IntxRouter): an eventfd trigger + a resample eventfd, attached to the
//   INTx GSI as a KVM resample irqfd (level-triggered); the resample fd is the device's unmask
//   fd (SetIrqUnmaskFd), so an EOI by the guest unmasks INTx in the device/kernel directly.
// MSI (only with a gsi_router and MSI eventfd irqs on the device; else hidden): the capability
//   is a shadow (never forwarded); its vectors use a pci::MsixTable as the engine (one GSI +
//   eventfd per vector, irqfd attached while deliverable). Vector count n = 2^MMC, clamped to
//   the device's MSI irq count (MMC in the shadow lowered to match). On enable the guest's
//   2^MME vectors (MME clamped to MMC) get KVM MSI routes with the guest's address and data
//   with its low MME bits replaced by the vector number (PCI 3.0 §6.8.1.5), and the device
//   gets their eventfds with SetIrqs(kMsiIrqIndex). A masked vector (per-vector masking) has
//   its irqfd detached: the device's interrupts accumulate in the eventfd and show as the
//   vector's pending bit (read live), delivered on unmask. Clearing enable disables the index
//   on the device and gives INTx back; changing MME while enabled re-enables with the new
//   count. MSI and MSI-X are mutually exclusive (vfio-pci allows one interrupt type; the spec
//   says software must not enable both): an enable of one while the other's enable bit is set
//   is refused — the bit is cleared in the shadow (Linux never does this).
//
// Threading: guest config accesses are serialised by PciRootBus; BAR accesses may come from any
// vCPU thread. Every call into the VfioDevice is under one mutex (the migration driver shares
// it). AttachDma/Reset/Detach/SaveState/RestoreState: VM thread, vCPUs stopped.
#ifndef MICROVMM_DEVICES_VFIO_PCI_VFIO_PCI_DEVICE_H_
#define MICROVMM_DEVICES_VFIO_PCI_VFIO_PCI_DEVICE_H_

#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "devices/vfio/pci/dma_footprint.h"
#include "devices/vfio/pci/vfio_migration.h"
#include "devices/vfio/vfio_device.h"
#include "vmm/base/fd.h"
#include "vmm/memory/guest_memory.h"
#include "vmm/pci/eventfd.h"
#include "vmm/pci/gsi_router.h"
#include "vmm/pci/msix.h"
#include "vmm/pci/pci_config.h"
#include "vmm/pci/pci_device.h"

namespace microvmm::vfio {

// Maps host memory (a mmap of a device BAR) into the guest physical address space, e.g. as a
// KVM memslot. Called from the config-write path (serialised by PciRootBus).
class BarMapper {
 public:
  virtual ~BarMapper() = default;
  virtual absl::Status Map(uint64_t gpa, void* host, uint64_t size) = 0;
  virtual absl::Status Unmap(uint64_t gpa, uint64_t size) = 0;
};

// Level-triggered INTx with resample: KVM_IRQFD with KVM_IRQFD_FLAG_RESAMPLE on `gsi` (an IOAPIC
// pin). Writes to `trigger_fd` assert the line; KVM writes `resample_fd` (and de-asserts) when
// the guest EOIs it.
class IntxRouter {
 public:
  virtual ~IntxRouter() = default;
  virtual absl::Status AssignResampleIrqfd(int trigger_fd, int resample_fd, uint32_t gsi) = 0;
  virtual absl::Status DeassignResampleIrqfd(int trigger_fd, uint32_t gsi) = 0;
};

struct VfioPciOptions {
  pci::GsiRouter* gsi_router = nullptr;  // required when the device has MSI-X
  BarMapper* bar_mapper = nullptr;       // null: every BAR access is trapped
  IntxRouter* intx_router = nullptr;     // null: INTx not offered (interrupt pin reads 0)
  uint32_t intx_gsi = 0;                 // IOAPIC pin for INTx (with intx_router)
  uint64_t page_size = 4096;             // host page size (direct-map granularity)
};

class VfioPciDevice : public pci::PciDevice {
 public:
  // Reads the device's config space and region/irq layout and builds the guest model. Refuses
  // non-PCI devices, bridges, and layouts that do not fit (MSI-X table outside its BAR...).
  static absl::StatusOr<std::shared_ptr<VfioPciDevice>> Create(std::unique_ptr<VfioDevice> dev,
                                                               const VfioPciOptions& options);
  ~VfioPciDevice() override;  // Detach()

  // ---- pci::PciDevice ----
  pci::PciConfigSpace& config() override { return config_; }
  std::string name() const override { return "vfio:" + dev_->name(); }
  uint32_t ReadConfig(uint32_t offset, unsigned size) override;
  void WriteConfig(uint32_t offset, unsigned size, uint32_t value) override;
  void ReadBar(int bar, uint64_t offset, std::span<uint8_t> data) override;
  void WriteBar(int bar, uint64_t offset, std::span<const uint8_t> data) override;
  void BarMoved(const pci::BarMove& move) override;

  // ---- DMA ----
  // Maps every RAM region of `mem` for device DMA (iova = gpa, writable). `mem` must outlive
  // the mapping (DetachDma / Detach).
  absl::Status AttachDma(GuestMemory& mem);
  absl::Status DetachDma();
  const std::vector<DmaRange>& dma_ranges() const { return dma_ranges_; }

  // Function-level reset of device and model: MSI and MSI-X disabled, command cleared, direct
  // BAR maps dropped (memory decode is off); BAR addresses and INTx wiring stay.
  absl::Status Reset();
  // Disconnects every interrupt, unmaps BARs and DMA. Idempotent; the device is dead afterwards.
  absl::Status Detach();

  // ---- Migration ----
  // The device's migration driver (created on first use; refuses a device without migration
  // support with an error naming it).
  absl::StatusOr<VfioMigrationDriver*> migration();
  // Model state (config shadow incl. MSI, MSI-X table, MSI pending bits) and the device blob,
  // as one serialized VfioPciState.
  std::string SaveState(std::span<const uint8_t> device_blob) const;
  // Validates `data` completely before touching anything, loads the device blob through the
  // migration driver (RESUMING; `run`: device RUNNING afterwards), then re-applies the model:
  // command register, MSI-X / MSI enable (SetIrqs), direct BAR maps; the device runs last, with
  // its interrupts already connected. The VM calls PciRootBus::RemapAll() afterwards (BAR windows).
  absl::Status RestoreState(const std::string& data, bool run = true);

  // ---- Post-copy (destination) ----
  // The DMA model of this function's class (dma_footprint.h), or null if none is known. It
  // sees every BAR write and its state travels in SaveState.
  DmaFootprint* dma_model() { return dma_model_.get(); }
  // While set, `gate` is called with what a guest BAR write makes the device access (per the
  // DMA model), before the write reaches the device; it may block the writing vCPU until those
  // pages are present. While a gate is set no BAR range is mapped directly into the guest, so
  // every write traps (doorbells included). nullptr removes it, waits for calls in flight to
  // end, and direct maps return.
  using BarWriteGate = std::function<void(const std::vector<DmaRange>& targets)>;
  void SetBarWriteGate(BarWriteGate gate);

  // ---- Introspection (tests, debugging) ----
  VfioDevice& device() { return *dev_; }
  pci::MsixTable* msix() { return msix_.get(); }
  std::optional<uint32_t> msix_cap_offset() const { return msix_cap_; }
  bool msix_connected() const { return msix_connected_; }
  // MSI vector engine (entries mirror the MSI capability; vectors >= 2^MME stay masked).
  pci::MsixTable* msi() { return msi_.get(); }
  std::optional<uint32_t> msi_cap_offset() const { return msi_cap_; }
  bool msi_connected() const { return msi_connected_; }
  uint32_t msi_connected_vectors() const { return msi_connected_ ? msi_count_ : 0; }
  int intx_trigger_fd() const { return intx_trigger_ ? intx_trigger_->fd() : -1; }
  int intx_resample_fd() const { return intx_resample_ ? intx_resample_->fd() : -1; }
  struct DirectMap {
    int bar = 0;
    uint64_t offset = 0;  // in the BAR
    uint64_t size = 0;
    ScopedMmap mapping;
    uint64_t gpa = 0;  // where it is mapped into the guest; 0: not mapped
  };
  const std::vector<DirectMap>& direct_maps() const { return direct_; }
  // Bytes of 0x40..0xFF forwarded to the device.
  bool passthrough_byte(uint32_t offset) const { return offset < 256 && passthrough_[offset]; }

 private:
  VfioPciDevice(std::unique_ptr<VfioDevice> dev, const VfioPciOptions& options,
                const pci::PciHeader& header);
  absl::Status Init(std::span<const uint8_t> phys);
  absl::Status BuildCapabilities(std::span<const uint8_t> phys);
  absl::Status SetUpMsix(std::span<const uint8_t> phys, uint32_t cap);
  absl::Status SetUpMsi(std::span<const uint8_t> phys, uint32_t cap, uint32_t len);
  void InitMsiShadow();   // write masks + observer, then ResetMsiShadow
  void ResetMsiShadow();  // MSI registers to their reset values (disabled, MME 0, zeros)
  void ResetMsixShadow();  // MSI-X message control to its reset value (disabled, unmasked)
  absl::Status SetUpDirectMaps();
  absl::Status SetUpIntx(uint8_t pin);
  enum class MsixPart { kNone, kTable, kPba, kStraddle };
  MsixPart MsixHit(int bar, uint64_t offset, uint64_t len) const;
  bool InRegion(int bar, uint64_t offset, uint64_t len) const;
  absl::Status ConnectIntxLocked(bool on);  // INTx trigger + unmask fd on the device
  void SyncCommand();        // shadow command -> device (passed bits)
  void CatchUpCommand();     // SyncCommand + direct maps if the shadow changed behind our back
  void OnMsixControl();      // guest wrote MSI-X message control
  absl::Status ConnectMsix(bool enable);
  void OnMsiWrite();         // guest wrote the MSI capability
  // enable: device MSI index on with `count` vectors (re-enabled if the count changed).
  absl::Status ConnectMsi(bool enable, uint32_t count);
  // Turns off whichever of MSI-X / MSI is connected, passing each result to `note`.
  void DisconnectMsis(absl::FunctionRef<void(absl::Status)> note);
  bool MsiEnableBit() const;
  bool MsixEnableBit() const;
  uint32_t MsiPendingBits() const;
  // MSI register offsets (absolute, in config space).
  uint32_t msi_data_reg() const { return *msi_cap_ + (msi_64bit_ ? 0xc : 0x8); }
  uint32_t msi_mask_reg() const { return msi_data_reg() + 4; }
  uint32_t msi_pending_reg() const { return msi_data_reg() + 8; }
  void ReconcileDirectMaps();
  void NoteError(const absl::Status& s);

  std::unique_ptr<VfioDevice> dev_;
  const VfioPciOptions options_;
  mutable std::mutex dev_mu_;  // serialises every VfioDevice call
  pci::PciConfigSpace config_;
  std::array<bool, pci::kConfigHeaderSize> passthrough_{};
  std::array<RegionInfo, 6> bars_{};  // region info per BAR index (size 0: absent)
  std::unique_ptr<pci::MsixTable> msix_;
  std::optional<uint32_t> msix_cap_;
  int msix_table_bar_ = -1, msix_pba_bar_ = -1;
  uint64_t msix_table_off_ = 0, msix_pba_off_ = 0;
  uint32_t msix_irq_count_ = 0;
  bool msix_connected_ = false;
  std::unique_ptr<pci::MsixTable> msi_;
  std::optional<uint32_t> msi_cap_;
  uint32_t msi_len_ = 0;     // capability bytes (10, 14, 20 or 24)
  bool msi_64bit_ = false;
  bool msi_maskable_ = false;
  bool msi_connected_ = false;
  uint32_t msi_count_ = 0;   // vectors given to the device while connected
  std::atomic<uint16_t> synced_command_{0xffff};  // shadow command last pushed to the device
  std::optional<pci::EventFd> intx_trigger_;
  std::optional<pci::EventFd> intx_resample_;
  bool intx_routed_ = false;     // resample irqfd assigned through the IntxRouter
  bool intx_connected_ = false;  // device INTx -> trigger eventfd
  std::vector<DirectMap> direct_;
  std::vector<DmaRange> dma_ranges_;
  std::unique_ptr<VfioMigrationDriver> migration_;
  bool detached_ = false;
  const std::unique_ptr<DmaFootprint> dma_model_;
  std::mutex maps_mu_;  // ReconcileDirectMaps: vCPU config writes vs SetBarWriteGate
  std::mutex model_mu_;  // WriteBar of a device with a DMA model: model, gate, forward
  std::mutex gate_mu_;
  std::condition_variable gate_cv_;
  std::shared_ptr<const BarWriteGate> gate_;  // guarded by gate_mu_ (copied out to call)
  int gate_calls_ = 0;                        // guarded by gate_mu_: calls in flight
  std::atomic<bool> trap_all_{false};
};

}  // namespace microvmm::vfio

#endif  // MICROVMM_DEVICES_VFIO_PCI_VFIO_PCI_DEVICE_H_
