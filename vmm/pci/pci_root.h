// PCI root bus 0: configuration mechanism #1 (ports 0xCF8-0xCFF), ECAM for bus 0, the host
// bridge at 00:00.0, 32 device slots x 8 functions, and BAR windows that dispatch guest MMIO /
// port accesses to the device whose BAR covers them (re-mapped when the guest moves a BAR).
//
// Why the windows: vmm::Bus has no removal, so BARs are not inserted on it one by one. Each PCI
// window (I/O, 32-bit MMIO, 64-bit MMIO) is one BusDevice on the PIO/MMIO bus, and the window
// keeps its own re-mappable BAR map. A BAR the guest moves outside every window is unmapped
// (QEMU behaves the same with its host-bridge windows).
#ifndef MICROVMM_VMM_PCI_PCI_ROOT_H_
#define MICROVMM_VMM_PCI_PCI_ROOT_H_

#include <array>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <shared_mutex>
#include <span>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "vmm/bus.h"
#include "vmm/pci/bar_allocator.h"
#include "vmm/pci/pci_config.h"
#include "vmm/pci/pci_device.h"

namespace microvmm::pci {

inline constexpr uint16_t kConfigAddressPort = 0xCF8;
inline constexpr uint16_t kConfigDataPort = 0xCFC;
inline constexpr uint16_t kResetControlPort = 0xCF9;  // byte register inside the address dword
inline constexpr uint64_t kConfigIoPortCount = 8;      // 0xCF8..0xCFF
inline constexpr int kDevicesPerBus = 32;
inline constexpr int kFunctionsPerDevice = 8;
inline constexpr uint32_t kConf1Enable = 1u << 31;

// The host bridge identity: the one Cloud Hypervisor, Dragonball and EDK2's CloudHv platform use
// for a virtual host bridge (Intel 0x0d57). Linux binds no driver or quirk to it, its conf1
// sanity check passes on the host-bridge class code, and no early MMCONFIG chipset probe matches.
inline constexpr uint16_t kHostBridgeVendorId = 0x8086;
inline constexpr uint16_t kHostBridgeDeviceId = 0x0d57;
inline constexpr uint32_t kClassBridgeHost = 0x060000;

// Fields of the CONFIG_ADDRESS register (PCI 3.0 §3.2.2.3.2).
struct Conf1Address {
  bool enabled = false;
  uint8_t bus = 0;
  uint8_t device = 0;    // 5 bits
  uint8_t function = 0;  // 3 bits
  uint8_t reg = 0;       // dword-aligned register offset (bits 7:2)
};
Conf1Address DecodeConf1(uint32_t address);
uint32_t EncodeConf1(uint8_t bus, uint8_t device, uint8_t function, uint8_t reg);

// ECAM offset (from the ECAM base) = bus << 20 | device << 15 | function << 12 | register.
struct EcamAddress {
  uint8_t bus = 0;
  uint8_t device = 0;
  uint8_t function = 0;
  uint16_t reg = 0;
};
EcamAddress DecodeEcam(uint64_t offset);
uint64_t EncodeEcam(uint8_t bus, uint8_t device, uint8_t function, uint16_t reg);

class PciHostBridge : public PciDevice {
 public:
  PciHostBridge();
  PciConfigSpace& config() override { return config_; }
  std::string name() const override { return "host-bridge"; }

 private:
  PciConfigSpace config_;
};

class BarWindow;

class PciRootBus {
 public:
  // Creates bus 0 with the host bridge at 00:00.0.
  explicit PciRootBus(const PciWindows& windows);
  ~PciRootBus();
  PciRootBus(const PciRootBus&) = delete;
  PciRootBus& operator=(const PciRootBus&) = delete;

  // Places `dev` at 00:device.function, assigns the BARs still at address 0 (firmware-style, see
  // PciBarAllocator) and maps them. A function > 0 needs function 0 present and sets its header's
  // multi-function bit. Call while building the VM (before vCPUs run).
  absl::Status AddDevice(uint8_t device, uint8_t function, std::shared_ptr<PciDevice> dev);
  // Same at the lowest free device number, function 0; returns the device number.
  absl::StatusOr<uint8_t> AddDevice(std::shared_ptr<PciDevice> dev);
  std::shared_ptr<PciDevice> device(uint8_t device, uint8_t function) const;

  // Inserts on `pio`: conf1 at 0xCF8 (8 ports) and the I/O window; on `mmio`: ECAM at kEcamBase
  // (1 MiB) and the 32-bit and (if non-empty) 64-bit MMIO windows.
  absl::Status Attach(Bus& pio, Bus& mmio);

  // A configuration cycle on bus `bus` (what conf1 and ECAM decode to); thread-safe. Absent
  // functions and buses other than 0 read all-ones (vendor 0xFFFF) and ignore writes.
  uint32_t ConfigRead(uint8_t bus, uint8_t device, uint8_t function, uint32_t reg, unsigned size);
  void ConfigWrite(uint8_t bus, uint8_t device, uint8_t function, uint32_t reg, unsigned size,
                   uint32_t value);

  // The bus devices Attach inserts (for tests and custom wiring).
  std::shared_ptr<BusDevice> config_io() const { return config_io_; }
  std::shared_ptr<BusDevice> ecam() const { return ecam_; }
  std::shared_ptr<BusDevice> io_window() const;
  std::shared_ptr<BusDevice> mmio32_window() const;
  std::shared_ptr<BusDevice> mmio64_window() const;

  // Called when the guest writes the reset control register (port 0xCF9, a byte inside the
  // conf1 range) with RST_CPU (bit 2) set, as Linux does with reboot=pci.
  void set_reset_callback(std::function<void()> fn);

  // Re-maps every BAR at its config space's mapped address (after restoring device config state).
  absl::Status RemapAll();

  const PciWindows& windows() const { return allocator_.windows(); }
  PciBarAllocator& allocator() { return allocator_; }

 private:
  friend class ConfigIo;
  void OnBarMoved(const std::shared_ptr<PciDevice>& dev, const BarMove& move);
  absl::Status MapBar(const std::shared_ptr<PciDevice>& dev, int bar, uint64_t addr);
  void UnmapBar(const PciDevice* dev, int bar);
  BarWindow* WindowFor(BarType type, uint64_t addr, uint64_t len) const;
  void Reset();

  PciBarAllocator allocator_;
  std::mutex config_mu_;  // serializes configuration cycles
  std::array<std::shared_ptr<PciDevice>, kDevicesPerBus * kFunctionsPerDevice> slots_;
  std::shared_ptr<BusDevice> config_io_;
  std::shared_ptr<BusDevice> ecam_;
  std::shared_ptr<BarWindow> io_window_;
  std::shared_ptr<BarWindow> mmio32_window_;
  std::shared_ptr<BarWindow> mmio64_window_;
  std::mutex reset_mu_;
  std::function<void()> reset_fn_;
};

}  // namespace microvmm::pci

#endif  // MICROVMM_VMM_PCI_PCI_ROOT_H_
