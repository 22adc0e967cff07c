// Linux loaders: bzImage via the 64-bit boot protocol (as Firecracker enters it) and PVH ELF
// vmlinux (32-bit entry with hvm_start_info). Parsing is separated from loading so corrupt images
// are rejected before anything is built (and so it is unit-testable).
#ifndef MICROVMM_VMM_BOOT_LINUX_LOADER_H_
#define MICROVMM_VMM_BOOT_LINUX_LOADER_H_

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "vmm/memory/guest_memory.h"

namespace microvmm {

struct BzImageInfo {
  uint16_t protocol_version = 0;  // e.g. 0x020f
  uint32_t setup_bytes = 0;       // (setup_sects + 1) * 512: start of the protected-mode kernel
  uint64_t payload_size = 0;      // bytes of protected-mode kernel in the file
  uint32_t initrd_addr_max = 0;
  uint32_t cmdline_size = 0;      // max command line length (without NUL)
  uint32_t init_size = 0;         // memory the kernel needs from its load address
  uint64_t pref_address = 0;
  uint32_t kernel_alignment = 0;
  uint16_t xloadflags = 0;
  bool relocatable = false;
};

// Validates the real-mode header of a bzImage: boot sector signature, "HdrS", protocol >= 2.12,
// 64-bit entry (XLF_KERNEL_64), loaded-high, sizes consistent with the file.
absl::StatusOr<BzImageInfo> ParseBzImage(std::span<const uint8_t> file);

struct PvhInfo {
  uint32_t entry = 0;  // XEN_ELFNOTE_PHYS32_ENTRY
  struct Segment {
    uint64_t file_offset;
    uint64_t paddr;
    uint64_t filesz;
    uint64_t memsz;
  };
  std::vector<Segment> segments;
  uint64_t lowest_paddr = 0;
  uint64_t highest_paddr = 0;  // end of the highest segment (memsz)
};

// Parses a 64-bit ELF vmlinux and finds the PVH entry note. NOT_FOUND if there is no PVH note.
absl::StatusOr<PvhInfo> ParsePvhElf(std::span<const uint8_t> file);

bool LooksLikeElf(std::span<const uint8_t> file);

struct LinuxBootSpec {
  std::span<const uint8_t> kernel;
  std::span<const uint8_t> initrd;  // may be empty
  std::string cmdline;
  // Guest-physical address of the ACPI RSDP (WriteAcpiTables), 0 = none. Handed to the kernel in
  // boot_params.acpi_rsdp_addr (boot protocol 2.14+; older kernels ignore it and scan
  // 0xE0000-0xFFFFF) or hvm_start_info.rsdp_paddr (PVH).
  uint64_t rsdp_addr = 0;
};

struct LinuxEntry {
  bool pvh = false;       // false: 64-bit long mode entry with RSI = boot_params
  uint64_t rip = 0;
  uint64_t boot_info = 0; // boot_params (RSI) or hvm_start_info (EBX)
};

// Loads kernel, initrd, command line and boot structures (boot_params / hvm_start_info, e820,
// RSDP pointer)
// into guest RAM. Returns where the boot vCPU must start.
absl::StatusOr<LinuxEntry> LoadLinux(GuestMemory& mem, const LinuxBootSpec& spec);

}  // namespace microvmm

#endif  // MICROVMM_VMM_BOOT_LINUX_LOADER_H_
