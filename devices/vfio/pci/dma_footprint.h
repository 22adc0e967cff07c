// Post-copy with a passthrough device (issue 6): what guest memory the device is about to DMA.
//
// During post-copy the destination's guest RAM has pages that have not arrived yet. A vCPU that
// touches one faults and waits for it; a device does not fault: it reads zeros or writes into a
// page that the arriving copy then overwrites. So, before the device may touch a page, the page
// must be present:
//  - when the device starts running (its restored state may hold work it will resume), the
//    ranges `AtRun` names are fetched first;
//  - while post-copy lasts every guest write to the device's BARs traps (no direct BAR maps) and
//    goes through `OnBarWrite` before it reaches the device: the ranges that write makes the
//    device access (a doorbell's request buffers) are fetched, the vCPU waiting, then the write
//    is forwarded.
// That needs a model of the device class: which register writes start DMA and where it goes.
//
// Where this is sound: devices that access guest memory only in response to a register write
// (doorbell) or to state restored with them, and whose accesses for that write can be computed
// from registers and guest memory the model can read first -- DMA engines programmed through
// registers (the test device below), command-queue devices whose queue entries name their
// buffers (NVMe SQ entries with PRP lists, virtio rings and descriptor chains; the model walks
// them, fetching each page it reads). Not sound, and refused: devices that DMA on their own
// (a NIC writing received packets into buffers posted long before; it would need every posted
// buffer fetched at Run and on each post), devices with their own page tables (PASID/ATS,
// GPUs), peer-to-peer DMA, and any class without a model (FootprintFor returns null and the
// VMM refuses post-copy with a clear error; pre-copy works for every migratable device).
// Backend: vfio-user only. The device server maps the guest's memfd itself, so a page installed
// by post-copy is the page it reads and writes. Kernel VFIO pins guest RAM in the IOMMU when it
// is DMA-mapped (at VM creation): the pinned pages are not the ones post-copy installs later,
// so post-copy of a VM with a kernel VFIO function is refused (Vm::CheckPassthroughPostcopy).
#ifndef MICROVMM_DEVICES_VFIO_PCI_DMA_FOOTPRINT_H_
#define MICROVMM_DEVICES_VFIO_PCI_DMA_FOOTPRINT_H_

#include <cstdint>
#include <memory>
#include <mutex>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "devices/vfio/vfio_device.h"

namespace microvmm::vfio {

class DmaFootprint {
 public:
  virtual ~DmaFootprint() = default;
  // A guest write of `data` to BAR `bar` at `offset`, before it reaches the device: the ranges
  // the device may access because of it (empty for a plain register write). The model sees
  // every BAR write from the device's creation on (VfioPciDevice calls it), so it knows the
  // registers the guest programmed. Called from vCPU threads, serialized by the model.
  virtual std::vector<DmaRange> OnBarWrite(int bar, uint64_t offset,
                                           std::span<const uint8_t> data) = 0;
  // The device is about to run with its restored state: the ranges it may access then
  // (conservative: work it may resume).
  virtual std::vector<DmaRange> AtRun() = 0;
  // What the model learned from the guest's writes; travels with the device's state.
  virtual std::string SaveState() const = 0;
  virtual absl::Status RestoreState(const std::string& data) = 0;
};

// The model for a PCI function's class, by its vendor and device id; null when none is known.
std::unique_ptr<DmaFootprint> FootprintFor(uint16_t vendor_id, uint16_t device_id);

// The project's test DMA engine (tests/vfio/user/test_server/test_device.h, PCI 1234:11f0):
// BAR0 registers SRC 0x00, DST 0x08, LEN 0x10, OP 0x18 (0 copy SRC->DST, 1 fill DST), a write to
// DOORBELL 0x28 starts one DMA; a doorbell rung while stopped runs when the device runs.
class TestDmaEngineFootprint : public DmaFootprint {
 public:
  std::vector<DmaRange> OnBarWrite(int bar, uint64_t offset,
                                   std::span<const uint8_t> data) override;
  // A doorbell rung while the source's device was stopped runs when this one runs: the DMA
  // the registers describe.
  std::vector<DmaRange> AtRun() override;
  std::string SaveState() const override;
  absl::Status RestoreState(const std::string& data) override;

  static constexpr uint64_t kSrc = 0x00, kDst = 0x08, kLen = 0x10, kOp = 0x18, kDoorbell = 0x28;
  static constexpr uint64_t kOpCopy = 0;
  static constexpr uint64_t kMaxLen = 16 << 20;  // the device refuses longer DMAs

 private:
  std::vector<DmaRange> Ranges() const;  // for the current registers
  mutable std::mutex mu_;
  uint64_t regs_[4] = {};  // SRC, DST, LEN, OP as the guest programmed them
};

}  // namespace microvmm::vfio

#endif  // MICROVMM_DEVICES_VFIO_PCI_DMA_FOOTPRINT_H_
