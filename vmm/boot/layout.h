// Fixed guest-physical addresses used while booting (all below 1 MiB).
#ifndef MICROVMM_VMM_BOOT_LAYOUT_H_
#define MICROVMM_VMM_BOOT_LAYOUT_H_

#include <cstdint>

namespace microvmm::layout {

inline constexpr uint64_t kGdt = 0x500;            // boot GDT (null, null, code 0x10, data 0x18)
inline constexpr uint64_t kIdt = 0x520;            // empty IDT
inline constexpr uint64_t kPvhStartInfo = 0x6000;  // hvm_start_info + modlist + memmap
inline constexpr uint64_t kZeroPage = 0x7000;      // Linux boot_params
inline constexpr uint64_t kPml4 = 0x9000;          // identity page tables: PML4, PDPT, 4 PDs
inline constexpr uint64_t kPdpt = 0xA000;
inline constexpr uint64_t kPd = 0xB000;            // 4 pages: 0xB000..0xEFFF
inline constexpr uint64_t kCmdline = 0x20000;      // kernel command line / test-guest args
inline constexpr uint64_t kCmdlineMax = 0x10000;
inline constexpr uint64_t kEbdaStart = 0x9FC00;    // MP table lives here; e820-reserved to 1 MiB
// ACPI tables, RSDP first: 0xE0000 is the start of the BIOS area Linux scans for "RSD PTR " (on
// 16-byte boundaries, 0xE0000-0xFFFFF). e820 type 3 (ACPI); the rest of the hole stays reserved.
inline constexpr uint64_t kAcpiStart = 0xE0000;
inline constexpr uint64_t kAcpiSize = 0x10000;     // 0xE0000..0xEFFFF
inline constexpr uint64_t kHighMemStart = 0x100000;  // kernel / test guest load address

// Selectors of the boot GDT (what Linux expects as __BOOT_CS / __BOOT_DS).
inline constexpr uint16_t kCodeSelector = 0x10;
inline constexpr uint16_t kDataSelector = 0x18;

}  // namespace microvmm::layout

#endif  // MICROVMM_VMM_BOOT_LAYOUT_H_
