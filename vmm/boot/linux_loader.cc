#include "vmm/boot/linux_loader.h"

#include <asm/bootparam.h>
#include <elf.h>

#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "vmm/boot/layout.h"
#include "vmm/boot/x86_setup.h"

namespace microvmm {
namespace {

constexpr uint32_t kHdrSMagic = 0x53726448;  // "HdrS"
constexpr uint16_t kMinProtocol = 0x020c;    // 2.12: xloadflags / 64-bit entry
constexpr uint16_t kXlfKernel64 = 1 << 0;
constexpr uint8_t kLoadedHigh = 1 << 0;
constexpr uint8_t kCanUseHeap = 1 << 7;
constexpr uint32_t kXenElfnotePhys32Entry = 18;
constexpr uint32_t kHvmStartMagic = 0x336ec578;

template <typename T>
T Load(std::span<const uint8_t> f, size_t off) {
  T v;
  std::memcpy(&v, f.data() + off, sizeof(T));
  return v;
}

absl::Status Invalid(absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat("kernel image: ", what));
}

uint64_t AlignDown(uint64_t v, uint64_t a) { return v & ~(a - 1); }

// hvm_start_info and friends (xen/include/public/arch-x86/hvm/start_info.h), version 1.
struct HvmStartInfo {
  uint32_t magic;
  uint32_t version;
  uint32_t flags;
  uint32_t nr_modules;
  uint64_t modlist_paddr;
  uint64_t cmdline_paddr;
  uint64_t rsdp_paddr;
  uint64_t memmap_paddr;
  uint32_t memmap_entries;
  uint32_t reserved;
};
struct HvmModlistEntry {
  uint64_t paddr;
  uint64_t size;
  uint64_t cmdline_paddr;
  uint64_t reserved;
};
struct HvmMemmapEntry {
  uint64_t addr;
  uint64_t size;
  uint32_t type;
  uint32_t reserved;
};
static_assert(sizeof(HvmStartInfo) == 56);

// Where the initrd goes: top of low RAM (below `max_addr`), page aligned, above `kernel_end`.
absl::StatusOr<uint64_t> PlaceInitrd(const GuestMemory& mem, uint64_t size, uint64_t max_addr,
                                     uint64_t kernel_end) {
  uint64_t low_end = std::min<uint64_t>(mem.ram_bytes(), kMmioGapStart);
  uint64_t top = std::min<uint64_t>(low_end, max_addr + 1);
  if (size > top) return absl::InvalidArgumentError("initrd does not fit in guest RAM");
  uint64_t addr = AlignDown(top - size, kPageSize);
  if (addr < kernel_end)
    return absl::InvalidArgumentError(absl::StrFormat(
        "initrd (%d bytes) does not fit in guest RAM above the kernel (ends at 0x%x); "
        "give the VM more memory",
        size, kernel_end));
  return addr;
}

}  // namespace

absl::StatusOr<BzImageInfo> ParseBzImage(std::span<const uint8_t> f) {
  constexpr size_t kHdr = offsetof(boot_params, hdr);
  if (f.size() < 1024) return Invalid(absl::StrCat("file too small (", f.size(), " bytes)"));
  setup_header h = Load<setup_header>(f, kHdr);
  if (h.boot_flag != 0xAA55) return Invalid("no boot sector signature (0xAA55) at 0x1fe");
  if (h.header != kHdrSMagic) return Invalid("no \"HdrS\" setup header: not a bzImage");
  if (h.version < kMinProtocol)
    return Invalid(absl::StrFormat("boot protocol %d.%02d is too old (need 2.12+ for 64-bit entry)",
                                   h.version >> 8, h.version & 0xff));
  if (!(h.loadflags & kLoadedHigh)) return Invalid("zImage (not loaded high) is not supported");
  if (!(h.xloadflags & kXlfKernel64)) return Invalid("kernel has no 64-bit entry point");
  BzImageInfo info;
  info.protocol_version = h.version;
  uint32_t sects = h.setup_sects == 0 ? 4 : h.setup_sects;
  info.setup_bytes = (sects + 1) * 512;
  if (info.setup_bytes >= f.size())
    return Invalid(absl::StrFormat("setup size %d is beyond the end of the file (%d bytes)",
                                   info.setup_bytes, f.size()));
  info.payload_size = f.size() - info.setup_bytes;
  if (uint64_t{h.syssize} * 16 > info.payload_size)
    return Invalid(absl::StrFormat("truncated: header says %d bytes of kernel, file has %d",
                                   uint64_t{h.syssize} * 16, info.payload_size));
  info.initrd_addr_max = h.initrd_addr_max;
  info.cmdline_size = h.cmdline_size;
  info.init_size = h.init_size;
  info.pref_address = h.pref_address;
  info.kernel_alignment = h.kernel_alignment;
  info.xloadflags = h.xloadflags;
  info.relocatable = h.relocatable_kernel != 0;
  if (info.init_size < info.payload_size)
    return Invalid(absl::StrFormat("init_size %d is smaller than the kernel payload %d",
                                   info.init_size, info.payload_size));
  return info;
}

bool LooksLikeElf(std::span<const uint8_t> f) {
  return f.size() >= 4 && std::memcmp(f.data(), ELFMAG, SELFMAG) == 0;
}

absl::StatusOr<PvhInfo> ParsePvhElf(std::span<const uint8_t> f) {
  if (f.size() < sizeof(Elf64_Ehdr) || !LooksLikeElf(f)) return Invalid("not an ELF file");
  Elf64_Ehdr eh = Load<Elf64_Ehdr>(f, 0);
  if (eh.e_ident[EI_CLASS] != ELFCLASS64 || eh.e_ident[EI_DATA] != ELFDATA2LSB ||
      eh.e_machine != EM_X86_64)
    return Invalid("ELF is not x86_64 little-endian 64-bit");
  if (eh.e_phentsize != sizeof(Elf64_Phdr) || eh.e_phnum == 0 ||
      eh.e_phoff > f.size() || uint64_t{eh.e_phnum} * sizeof(Elf64_Phdr) > f.size() - eh.e_phoff)
    return Invalid("ELF program headers out of bounds");
  PvhInfo info;
  bool found_entry = false;
  info.lowest_paddr = UINT64_MAX;
  for (int i = 0; i < eh.e_phnum; ++i) {
    Elf64_Phdr ph = Load<Elf64_Phdr>(f, eh.e_phoff + i * sizeof(Elf64_Phdr));
    if (ph.p_offset > f.size() || ph.p_filesz > f.size() - ph.p_offset)
      return Invalid(absl::StrFormat("ELF segment %d extends beyond the file", i));
    if (ph.p_type == PT_LOAD) {
      if (ph.p_filesz > ph.p_memsz) return Invalid("ELF segment filesz > memsz");
      info.segments.push_back({ph.p_offset, ph.p_paddr, ph.p_filesz, ph.p_memsz});
      info.lowest_paddr = std::min(info.lowest_paddr, ph.p_paddr);
      info.highest_paddr = std::max(info.highest_paddr, ph.p_paddr + ph.p_memsz);
    } else if (ph.p_type == PT_NOTE) {
      uint64_t off = ph.p_offset, end = ph.p_offset + ph.p_filesz;
      while (off + sizeof(Elf64_Nhdr) <= end) {
        Elf64_Nhdr nh = Load<Elf64_Nhdr>(f, off);
        uint64_t name_off = off + sizeof(Elf64_Nhdr);
        uint64_t desc_off = name_off + ((uint64_t{nh.n_namesz} + 3) & ~3ULL);
        uint64_t next = desc_off + ((uint64_t{nh.n_descsz} + 3) & ~3ULL);
        if (next > end) break;
        if (nh.n_type == kXenElfnotePhys32Entry && nh.n_namesz == 4 &&
            std::memcmp(f.data() + name_off, "Xen", 4) == 0 && nh.n_descsz >= 4) {
          info.entry = nh.n_descsz >= 8 ? static_cast<uint32_t>(Load<uint64_t>(f, desc_off))
                                        : Load<uint32_t>(f, desc_off);
          found_entry = true;
        }
        off = next;
      }
    }
  }
  if (info.segments.empty()) return Invalid("ELF has no loadable segments");
  if (!found_entry)
    return absl::NotFoundError(
        "ELF kernel has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): build with CONFIG_PVH=y "
        "or boot the bzImage");
  return info;
}

namespace {

absl::StatusOr<LinuxEntry> LoadBzImage(GuestMemory& mem, const LinuxBootSpec& spec) {
  auto info = ParseBzImage(spec.kernel);
  if (!info.ok()) return info.status();
  const uint64_t load = layout::kHighMemStart;
  // The kernel decompresses into [runtime_start, runtime_start + init_size) (boot.rst, init_size):
  // a relocatable kernel loaded below pref_address runs at pref_address.
  uint64_t runtime_start = info->pref_address;
  if (info->relocatable) {
    uint64_t align = info->kernel_alignment ? info->kernel_alignment : 1;
    if ((align & (align - 1)) != 0) return Invalid("kernel_alignment is not a power of two");
    runtime_start = (std::max<uint64_t>(load, info->pref_address) + align - 1) & ~(align - 1);
  }
  uint64_t kernel_end =
      std::max<uint64_t>(load + info->payload_size, runtime_start + info->init_size);
  if (!mem.Contains(load, kernel_end - load) || kernel_end > kMmioGapStart)
    return absl::InvalidArgumentError(absl::StrFormat(
        "guest RAM too small for this kernel: it needs at least %d MiB (pref_address + init_size)",
        (kernel_end + (1 << 20) - 1) >> 20));
  if (spec.cmdline.size() + 1 > layout::kCmdlineMax ||
      (info->cmdline_size && spec.cmdline.size() > info->cmdline_size))
    return absl::InvalidArgumentError(absl::StrFormat(
        "kernel command line is %d bytes; this kernel accepts at most %d", spec.cmdline.size(),
        info->cmdline_size));

  if (absl::Status s = mem.Write(load, spec.kernel.data() + info->setup_bytes, info->payload_size);
      !s.ok())
    return s;
  if (absl::Status s = mem.Write(layout::kCmdline, spec.cmdline.c_str(), spec.cmdline.size() + 1);
      !s.ok())
    return s;

  boot_params bp;
  std::memset(&bp, 0, sizeof(bp));
  // Copy the setup header as the kernel provides it, then fill in the loader's fields.
  size_t hdr_end = std::min<size_t>(0x202 + spec.kernel[0x201], sizeof(boot_params));
  std::memcpy(&bp.hdr, spec.kernel.data() + offsetof(boot_params, hdr),
              std::min(sizeof(setup_header), hdr_end - offsetof(boot_params, hdr)));
  bp.hdr.type_of_loader = 0xff;
  bp.hdr.loadflags |= kCanUseHeap;
  bp.hdr.heap_end_ptr = 0xfe00;
  bp.hdr.cmd_line_ptr = layout::kCmdline;
  bp.ext_cmd_line_ptr = 0;
  bp.hdr.code32_start = load;
  bp.acpi_rsdp_addr = spec.rsdp_addr;
  if (!spec.initrd.empty()) {
    auto addr = PlaceInitrd(mem, spec.initrd.size(), info->initrd_addr_max, kernel_end);
    if (!addr.ok()) return addr.status();
    if (absl::Status s = mem.Write(*addr, spec.initrd.data(), spec.initrd.size()); !s.ok())
      return s;
    bp.hdr.ramdisk_image = static_cast<uint32_t>(*addr);
    bp.hdr.ramdisk_size = static_cast<uint32_t>(spec.initrd.size());
  }
  std::vector<E820Entry> e820 = BuildE820(mem.ram_bytes());
  if (e820.size() > E820_MAX_ENTRIES_ZEROPAGE) return absl::InternalError("e820 map too large");
  bp.e820_entries = e820.size();
  for (size_t i = 0; i < e820.size(); ++i) {
    bp.e820_table[i].addr = e820[i].addr;
    bp.e820_table[i].size = e820[i].size;
    bp.e820_table[i].type = e820[i].type;
  }
  if (absl::Status s = mem.WriteObj(layout::kZeroPage, bp); !s.ok()) return s;
  return LinuxEntry{.pvh = false, .rip = load + 0x200, .boot_info = layout::kZeroPage};
}

absl::StatusOr<LinuxEntry> LoadPvh(GuestMemory& mem, const LinuxBootSpec& spec) {
  auto info = ParsePvhElf(spec.kernel);
  if (!info.ok()) return info.status();
  if (info->lowest_paddr < layout::kHighMemStart)
    return absl::InvalidArgumentError("ELF kernel wants to load below 1 MiB");
  if (!mem.Contains(info->lowest_paddr, info->highest_paddr - info->lowest_paddr))
    return absl::InvalidArgumentError(absl::StrFormat(
        "guest RAM too small for this kernel: its segments end at %d MiB",
        (info->highest_paddr + (1 << 20) - 1) >> 20));
  for (const PvhInfo::Segment& seg : info->segments) {
    if (absl::Status s = mem.Write(seg.paddr, spec.kernel.data() + seg.file_offset, seg.filesz);
        !s.ok())
      return s;
    std::vector<uint8_t> zeros(seg.memsz - seg.filesz);
    if (absl::Status s = mem.Write(seg.paddr + seg.filesz, zeros.data(), zeros.size()); !s.ok())
      return s;
  }
  if (spec.cmdline.size() + 1 > layout::kCmdlineMax)
    return absl::InvalidArgumentError("kernel command line too long");
  if (absl::Status s = mem.Write(layout::kCmdline, spec.cmdline.c_str(), spec.cmdline.size() + 1);
      !s.ok())
    return s;

  HvmStartInfo si{};
  si.magic = kHvmStartMagic;
  si.version = 1;
  si.cmdline_paddr = layout::kCmdline;
  si.rsdp_paddr = spec.rsdp_addr;
  uint64_t cursor = layout::kPvhStartInfo + sizeof(HvmStartInfo);
  if (!spec.initrd.empty()) {
    auto addr = PlaceInitrd(mem, spec.initrd.size(), 0xffffffffULL, info->highest_paddr);
    if (!addr.ok()) return addr.status();
    if (absl::Status s = mem.Write(*addr, spec.initrd.data(), spec.initrd.size()); !s.ok())
      return s;
    HvmModlistEntry mod{*addr, spec.initrd.size(), 0, 0};
    if (absl::Status s = mem.WriteObj(cursor, mod); !s.ok()) return s;
    si.nr_modules = 1;
    si.modlist_paddr = cursor;
    cursor += sizeof(mod);
  }
  std::vector<E820Entry> e820 = BuildE820(mem.ram_bytes());
  si.memmap_paddr = cursor;
  si.memmap_entries = e820.size();
  for (const E820Entry& e : e820) {
    HvmMemmapEntry m{e.addr, e.size, e.type, 0};
    if (absl::Status s = mem.WriteObj(cursor, m); !s.ok()) return s;
    cursor += sizeof(m);
  }
  if (cursor > layout::kZeroPage) return absl::InternalError("PVH start info overflow");
  if (absl::Status s = mem.WriteObj(layout::kPvhStartInfo, si); !s.ok()) return s;
  return LinuxEntry{.pvh = true, .rip = info->entry, .boot_info = layout::kPvhStartInfo};
}

}  // namespace

absl::StatusOr<LinuxEntry> LoadLinux(GuestMemory& mem, const LinuxBootSpec& spec) {
  if (LooksLikeElf(spec.kernel)) return LoadPvh(mem, spec);
  return LoadBzImage(mem, spec);
}

}  // namespace microvmm
