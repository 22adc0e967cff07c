// Guest-physical layout of the PCI root bus and BAR address assignment at VM build time.
//
//   0xC000_0000 ... 0xDFFF_FFFF   free part of the 32-bit MMIO gap (not used by PCI)
//   0xE000_0000 ... 0xE00F_FFFF   ECAM, bus 0 only (1 MiB)
//   0xE010_0000 ... 0xFEBF_FFFF   32-bit PCI MMIO window (~491 MiB), up to the IOAPIC
//   0xFEC0_0000 ...               IOAPIC, LAPIC, KVM identity map / TSS (not PCI)
//   align_up(max(4 GiB, end of RAM), 1 GiB) + 64 GiB (clamped to the guest's physical address
//                                 width)   64-bit PCI MMIO window
//   ports 0xC000 ... 0xFFFF       PCI I/O window
#ifndef MICROVMM_VMM_PCI_BAR_ALLOCATOR_H_
#define MICROVMM_VMM_PCI_BAR_ALLOCATOR_H_

#include <cstdint>
#include <map>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "vmm/kvm/kvm.h"
#include "vmm/pci/pci_config.h"

namespace microvmm::pci {

inline constexpr uint64_t kEcamBase = 0xE0000000ULL;
inline constexpr uint64_t kEcamSize = 1ULL << 20;  // bus 0: 32 devices x 8 functions x 4 KiB
inline constexpr uint64_t kMmio32Start = kEcamBase + kEcamSize;
inline constexpr uint64_t kMmio32End = 0xFEC00000ULL;  // IOAPIC
inline constexpr uint64_t kIoStart = 0xC000;
inline constexpr uint64_t kIoEnd = 0x10000;
inline constexpr uint64_t kMmio64Align = 1ULL << 30;
inline constexpr uint64_t kMmio64DefaultSize = 64ULL << 30;

// Half-open ranges [start, end).
struct PciWindows {
  uint64_t io_start = kIoStart;
  uint64_t io_end = kIoEnd;
  uint64_t mmio32_start = kMmio32Start;
  uint64_t mmio32_end = kMmio32End;
  uint64_t mmio64_start = 0;
  uint64_t mmio64_end = 0;  // empty 64-bit window: 64-bit BARs fall back to the 32-bit one

  // The layout above for a guest with `ram_bytes` of RAM (vmm/memory RamLayout) whose CPUID
  // reports `phys_bits` physical address bits. Fails if no 1 GiB of 64-bit window fits.
  static absl::StatusOr<PciWindows> Default(uint64_t ram_bytes, int phys_bits,
                                            uint64_t mmio64_size = kMmio64DefaultSize);
};

// Physical address width from CPUID leaf 0x80000008 EAX[7:0]; 36 if the leaf is missing.
int PhysAddressBits(const CpuidTable& cpuid);

// First-fit allocator of aligned ranges inside [start, end).
class AddressAllocator {
 public:
  AddressAllocator(uint64_t start, uint64_t end) : start_(start), end_(end) {}
  // `align` is a power of two (0 or 1: no alignment). RESOURCE_EXHAUSTED when nothing fits.
  absl::StatusOr<uint64_t> Allocate(uint64_t size, uint64_t align);
  // Marks [addr, addr+size) used. FAILED_PRECONDITION if it overlaps an allocation.
  absl::Status Reserve(uint64_t addr, uint64_t size);
  absl::Status Free(uint64_t addr);
  uint64_t start() const { return start_; }
  uint64_t end() const { return end_; }
  bool empty_range() const { return end_ <= start_; }

 private:
  uint64_t start_;
  uint64_t end_;
  std::map<uint64_t, uint64_t> used_;  // addr -> size
};

// Assigns BAR addresses from the windows, as firmware would.
class PciBarAllocator {
 public:
  explicit PciBarAllocator(const PciWindows& w);
  // Every declared BAR of `cfg` whose address is still 0 gets an address aligned to its size:
  // I/O BARs from the I/O window, 32-bit BARs from the 32-bit window, 64-bit BARs from the 64-bit
  // window (the 32-bit one if the 64-bit window is empty or full). Programs the BAR registers
  // and sets the I/O / memory decode bits in the command register for the BAR types present.
  // On failure nothing is left allocated.
  absl::Status AssignBars(PciConfigSpace& cfg);
  absl::StatusOr<uint64_t> AllocateIo(uint64_t size);
  absl::StatusOr<uint64_t> AllocateMmio32(uint64_t size);
  absl::StatusOr<uint64_t> AllocateMmio64(uint64_t size);
  const PciWindows& windows() const { return windows_; }

 private:
  PciWindows windows_;
  AddressAllocator io_;
  AddressAllocator mmio32_;
  AddressAllocator mmio64_;
};

}  // namespace microvmm::pci

#endif  // MICROVMM_VMM_PCI_BAR_ALLOCATOR_H_
