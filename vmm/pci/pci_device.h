// A PCI function as PciRootBus sees it: its configuration space plus handlers for its BARs.
#ifndef MICROVMM_VMM_PCI_PCI_DEVICE_H_
#define MICROVMM_VMM_PCI_PCI_DEVICE_H_

#include <cstdint>
#include <cstring>
#include <span>
#include <string>

#include "vmm/pci/pci_config.h"

namespace microvmm::pci {

class PciDevice {
 public:
  virtual ~PciDevice() = default;

  virtual PciConfigSpace& config() = 0;
  // Short name for logs ("virtio-blk", "host-bridge").
  virtual std::string name() const = 0;

  // Guest configuration accesses, serialized by PciRootBus (one at a time per root bus).
  // `offset` < 4096, `size` 1/2/4, naturally aligned. The defaults go to config(); override to
  // add side effects, calling config() for the register semantics.
  virtual uint32_t ReadConfig(uint32_t offset, unsigned size) {
    return config().Read(offset, size);
  }
  virtual void WriteConfig(uint32_t offset, unsigned size, uint32_t value) {
    config().Write(offset, size, value);
  }

  // Guest accesses to BAR `bar` at `offset` from its base (MMIO for memory BARs, ports for I/O
  // BARs); `data.size()` is 1, 2, 4 or 8. Called from vCPU threads concurrently; only while the
  // BAR is mapped and its decode bit (command register) is set.
  virtual void ReadBar(int bar, uint64_t offset, std::span<uint8_t> data) {
    (void)bar;
    (void)offset;
    std::memset(data.data(), 0xff, data.size());
  }
  virtual void WriteBar(int bar, uint64_t offset, std::span<const uint8_t> data) {
    (void)bar;
    (void)offset;
    (void)data;
  }

  // The guest moved a BAR; PciRootBus has already re-mapped it (or unmapped it: new_addr 0 or
  // outside the PCI windows). Devices with ioeventfds on the BAR re-register them here.
  virtual void BarMoved(const BarMove& move) { (void)move; }
};

}  // namespace microvmm::pci

#endif  // MICROVMM_VMM_PCI_PCI_DEVICE_H_
