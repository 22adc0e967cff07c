// Unit tests of vmm/boot/linux_loader.h: bzImage header parsing (Linux boot protocol,
// Documentation/x86/boot.rst), PVH ELF parsing (Xen ELF notes, hvm_start_info) and loading both
// into a real (KVM-less) GuestMemory. All images are synthesised here.
#include "vmm/kvm/linux_kvm.h"  // before any linux header (flex-array fix)

#include <asm/bootparam.h>
#include <elf.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "vmm/boot/linux_loader.h"
#include "vmm/boot/x86_setup.h"
#include "vmm/memory/guest_memory.h"

namespace microvmm {
namespace {

using ::testing::HasSubstr;

constexpr uint64_t kMiB = 1ULL << 20;
constexpr size_t kHdrOff = offsetof(boot_params, hdr);  // 0x1f1 per boot.rst
static_assert(kHdrOff == 0x1f1);

// ---------------------------------------------------------------------------------------------
// Synthetic bzImage
// ---------------------------------------------------------------------------------------------

struct BzParams {
  uint8_t setup_sects = 4;
  size_t payload = 8192;  // bytes of protected-mode kernel after the setup sectors
  uint16_t version = 0x020f;
  uint8_t loadflags = LOADED_HIGH;
  uint16_t xloadflags = XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G;
  uint32_t init_size = 4 * kMiB;
  uint32_t cmdline_size = 2047;
  uint32_t initrd_addr_max = 0x7fffffff;
  int64_t syssize = -1;  // -1: payload / 16 (rounded up)
  uint64_t pref_address = 0x1000000;
  uint8_t relocatable = 1;
  uint16_t boot_flag = 0xAA55;
  uint32_t header = 0x53726448;  // "HdrS"
};

uint8_t PayloadByte(size_t i) { return static_cast<uint8_t>((i * 7 + 3) & 0xff); }

std::vector<uint8_t> MakeBzImage(const BzParams& p) {
  uint32_t sects = p.setup_sects == 0 ? 4 : p.setup_sects;  // boot.rst: 0 means 4
  size_t setup_bytes = (sects + 1) * 512;
  std::vector<uint8_t> f(setup_bytes + p.payload, 0);
  setup_header h;
  std::memset(&h, 0, sizeof(h));
  h.setup_sects = p.setup_sects;
  h.boot_flag = p.boot_flag;
  // 0x200: short jump whose 8-bit displacement (byte 0x201) ends the header (boot.rst: "the end
  // of the setup header can be calculated as 0x202 + the byte at 0x201").
  const size_t hdr_end = kHdrOff + sizeof(setup_header);
  h.jump = static_cast<uint16_t>(0xEB | ((hdr_end - 0x202) << 8));
  h.header = p.header;
  h.version = p.version;
  h.loadflags = p.loadflags;
  h.xloadflags = p.xloadflags;
  h.init_size = p.init_size;
  h.cmdline_size = p.cmdline_size;
  h.initrd_addr_max = p.initrd_addr_max;
  h.syssize = p.syssize >= 0 ? static_cast<uint32_t>(p.syssize)
                             : static_cast<uint32_t>((p.payload + 15) / 16);
  h.pref_address = p.pref_address;
  h.relocatable_kernel = p.relocatable;
  h.kernel_alignment = 0x200000;
  std::memcpy(f.data() + kHdrOff, &h, sizeof(h));
  for (size_t i = 0; i < p.payload; ++i) f[setup_bytes + i] = PayloadByte(i);
  return f;
}

void ExpectInvalid(const BzParams& p, const char* why) {
  std::vector<uint8_t> f = MakeBzImage(p);
  auto r = ParseBzImage(f);
  ASSERT_FALSE(r.ok()) << why;
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << why << ": " << r.status();
}

TEST(ParseBzImageTest, ValidHeaderFieldsExtracted) {
  BzParams p;
  p.setup_sects = 7;
  p.payload = 16384;
  p.version = 0x020f;
  p.init_size = 5 * kMiB;
  p.cmdline_size = 4095;
  p.initrd_addr_max = 0x3fffffff;
  p.pref_address = 0x2000000;
  p.xloadflags = XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G;
  std::vector<uint8_t> f = MakeBzImage(p);
  auto r = ParseBzImage(f);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->protocol_version, 0x020f);
  EXPECT_EQ(r->setup_bytes, (7u + 1) * 512);  // boot sector + 7 setup sectors
  EXPECT_EQ(r->payload_size, 16384u);
  EXPECT_EQ(r->init_size, 5 * kMiB);
  EXPECT_EQ(r->cmdline_size, 4095u);
  EXPECT_EQ(r->initrd_addr_max, 0x3fffffffu);
  EXPECT_EQ(r->pref_address, 0x2000000u);
  EXPECT_EQ(r->xloadflags, XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G);
  EXPECT_TRUE(r->relocatable);
}

TEST(ParseBzImageTest, NotRelocatableReported) {
  BzParams p;
  p.relocatable = 0;
  std::vector<uint8_t> f = MakeBzImage(p);
  auto r = ParseBzImage(f);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_FALSE(r->relocatable);
}

TEST(ParseBzImageTest, SetupSectsZeroMeansFour) {
  BzParams p;
  p.setup_sects = 0;
  p.payload = 4096;
  std::vector<uint8_t> f = MakeBzImage(p);
  ASSERT_EQ(f.size(), 5 * 512 + 4096u);
  auto r = ParseBzImage(f);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->setup_bytes, 5u * 512);
  EXPECT_EQ(r->payload_size, 4096u);
}

TEST(ParseBzImageTest, SetupSectsOne) {
  BzParams p;
  p.setup_sects = 1;
  p.payload = 2048;
  std::vector<uint8_t> f = MakeBzImage(p);
  auto r = ParseBzImage(f);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->setup_bytes, 1024u);
  EXPECT_EQ(r->payload_size, 2048u);
}

TEST(ParseBzImageTest, MinimumProtocol212Accepted) {
  BzParams p;
  p.version = 0x020c;
  std::vector<uint8_t> f = MakeBzImage(p);
  auto r = ParseBzImage(f);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->protocol_version, 0x020c);
}

TEST(ParseBzImageTest, SyssizeExactlyPayloadAccepted) {
  BzParams p;
  p.payload = 8192;
  p.syssize = 8192 / 16;
  std::vector<uint8_t> f = MakeBzImage(p);
  EXPECT_TRUE(ParseBzImage(f).ok());
}

TEST(ParseBzImageTest, InitSizeEqualToPayloadAccepted) {
  BzParams p;
  p.payload = 8192;
  p.init_size = 8192;
  std::vector<uint8_t> f = MakeBzImage(p);
  EXPECT_TRUE(ParseBzImage(f).ok());
}

TEST(ParseBzImageTest, TooSmallFileRejected) {
  // Files shorter than the setup header area (and anything under 1 KiB) can't be bzImages.
  for (size_t n : {size_t{0}, size_t{16}, size_t{0x200}, size_t{1023}}) {
    std::vector<uint8_t> full = MakeBzImage(BzParams{});
    std::vector<uint8_t> f(full.begin(), full.begin() + n);
    auto r = ParseBzImage(f);
    ASSERT_FALSE(r.ok()) << n;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << n;
  }
}

TEST(ParseBzImageTest, MissingBootFlagRejected) {
  BzParams p;
  p.boot_flag = 0x55AA;  // byte-swapped
  ExpectInvalid(p, "boot_flag");
  p.boot_flag = 0;
  ExpectInvalid(p, "boot_flag zero");
}

TEST(ParseBzImageTest, MissingHdrSRejected) {
  BzParams p;
  p.header = 0x48647253;  // "SrdH"
  ExpectInvalid(p, "HdrS");
  p.header = 0;
  ExpectInvalid(p, "no header");
}

TEST(ParseBzImageTest, ProtocolBelow212Rejected) {
  for (uint16_t v : {0x0200, 0x0206, 0x020a, 0x020b}) {
    BzParams p;
    p.version = v;
    ExpectInvalid(p, "old protocol");
  }
}

TEST(ParseBzImageTest, No64BitEntryRejected) {
  BzParams p;
  p.xloadflags = XLF_CAN_BE_LOADED_ABOVE_4G;  // everything but XLF_KERNEL_64
  ExpectInvalid(p, "no XLF_KERNEL_64");
  p.xloadflags = 0;
  ExpectInvalid(p, "xloadflags 0");
}

TEST(ParseBzImageTest, NotLoadedHighRejected) {
  BzParams p;
  p.loadflags = CAN_USE_HEAP;  // LOADED_HIGH clear: zImage
  ExpectInvalid(p, "zImage");
}

TEST(ParseBzImageTest, SetupBeyondFileEndRejected) {
  // 60 setup sectors claimed (30 KiB) but the file is 4 KiB.
  std::vector<uint8_t> f = MakeBzImage(BzParams{.setup_sects = 4, .payload = 1536});
  ASSERT_EQ(f.size(), 4096u);
  f[kHdrOff + offsetof(setup_header, setup_sects)] = 60;
  auto r = ParseBzImage(f);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ParseBzImageTest, SyssizeLargerThanPayloadRejected) {
  BzParams p;
  p.payload = 8192;
  p.syssize = 8192 / 16 + 1;  // header claims 16 more bytes than the file holds
  ExpectInvalid(p, "truncated");
  p.syssize = 0x100000;  // 16 MiB claimed
  ExpectInvalid(p, "very truncated");
}

TEST(ParseBzImageTest, InitSizeSmallerThanPayloadRejected) {
  BzParams p;
  p.payload = 8192;
  p.init_size = 8191;
  ExpectInvalid(p, "init_size < payload");
}

TEST(LooksLikeElfTest, Basic) {
  std::vector<uint8_t> bz = MakeBzImage(BzParams{});
  EXPECT_FALSE(LooksLikeElf(bz));
  std::vector<uint8_t> elf = {0x7f, 'E', 'L', 'F', 2, 1, 1};
  EXPECT_TRUE(LooksLikeElf(elf));
  std::vector<uint8_t> short_elf = {0x7f, 'E', 'L'};
  EXPECT_FALSE(LooksLikeElf(short_elf));
}

// ---------------------------------------------------------------------------------------------
// Synthetic PVH ELF
// ---------------------------------------------------------------------------------------------

constexpr uint32_t kXenElfnotePhys32Entry = 18;  // xen/include/public/elfnote.h
constexpr uint64_t kSegOffset = 0x1000;
constexpr uint64_t kSegPaddr = 0x1000000;  // 16 MiB
constexpr uint64_t kSegFilesz = 0x800;
constexpr uint64_t kSegMemsz = 0x3000;    // 0x2800 bytes of bss
constexpr uint32_t kPvhEntry = 0x1000100;

struct Note {
  std::string name;  // without NUL
  uint32_t type;
  std::vector<uint8_t> desc;
};

void AppendNote(std::vector<uint8_t>& out, const Note& n) {
  Elf64_Nhdr nh{};
  nh.n_namesz = n.name.size() + 1;
  nh.n_descsz = n.desc.size();
  nh.n_type = n.type;
  const uint8_t* p = reinterpret_cast<const uint8_t*>(&nh);
  out.insert(out.end(), p, p + sizeof(nh));
  out.insert(out.end(), n.name.begin(), n.name.end());
  out.push_back(0);
  while (out.size() % 4) out.push_back(0);
  out.insert(out.end(), n.desc.begin(), n.desc.end());
  while (out.size() % 4) out.push_back(0);
}

std::vector<uint8_t> Le(uint64_t v, size_t n) {
  std::vector<uint8_t> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = static_cast<uint8_t>(v >> (8 * i));
  return out;
}

Note XenEntryNote(uint32_t entry, size_t desc_bytes = 8) {
  return Note{"Xen", kXenElfnotePhys32Entry, Le(entry, desc_bytes)};
}

uint8_t SegByte(size_t i) { return static_cast<uint8_t>((i * 13 + 1) & 0xff); }

// ELF64 x86_64: [Ehdr][PT_LOAD phdr][PT_NOTE phdr][notes] ... [segment data at 0x1000].
std::vector<uint8_t> MakePvhElf(const std::vector<Note>& notes, bool with_note_phdr = true,
                                uint64_t paddr = kSegPaddr, uint64_t memsz = kSegMemsz) {
  std::vector<uint8_t> note_bytes;
  for (const Note& n : notes) AppendNote(note_bytes, n);
  const uint16_t phnum = with_note_phdr ? 2 : 1;
  const uint64_t note_off = sizeof(Elf64_Ehdr) + phnum * sizeof(Elf64_Phdr);
  std::vector<uint8_t> f(kSegOffset + kSegFilesz, 0);
  EXPECT_LE(note_off + note_bytes.size(), kSegOffset);

  Elf64_Ehdr eh{};
  std::memcpy(eh.e_ident, ELFMAG, SELFMAG);
  eh.e_ident[EI_CLASS] = ELFCLASS64;
  eh.e_ident[EI_DATA] = ELFDATA2LSB;
  eh.e_ident[EI_VERSION] = EV_CURRENT;
  eh.e_type = ET_EXEC;
  eh.e_machine = EM_X86_64;
  eh.e_version = EV_CURRENT;
  eh.e_entry = 0xffffffff81000000ULL;
  eh.e_phoff = sizeof(Elf64_Ehdr);
  eh.e_ehsize = sizeof(Elf64_Ehdr);
  eh.e_phentsize = sizeof(Elf64_Phdr);
  eh.e_phnum = phnum;
  std::memcpy(f.data(), &eh, sizeof(eh));

  Elf64_Phdr load{};
  load.p_type = PT_LOAD;
  load.p_flags = PF_R | PF_X;
  load.p_offset = kSegOffset;
  load.p_vaddr = 0xffffffff81000000ULL;
  load.p_paddr = paddr;
  load.p_filesz = kSegFilesz;
  load.p_memsz = memsz;
  load.p_align = 0x1000;
  std::memcpy(f.data() + eh.e_phoff, &load, sizeof(load));
  if (with_note_phdr) {
    Elf64_Phdr note{};
    note.p_type = PT_NOTE;
    note.p_offset = note_off;
    note.p_filesz = note_bytes.size();
    note.p_memsz = note_bytes.size();
    note.p_align = 4;
    std::memcpy(f.data() + eh.e_phoff + sizeof(Elf64_Phdr), &note, sizeof(note));
    std::memcpy(f.data() + note_off, note_bytes.data(), note_bytes.size());
  }
  for (size_t i = 0; i < kSegFilesz; ++i) f[kSegOffset + i] = SegByte(i);
  return f;
}

Elf64_Ehdr GetEhdr(const std::vector<uint8_t>& f) {
  Elf64_Ehdr eh;
  std::memcpy(&eh, f.data(), sizeof(eh));
  return eh;
}
void PutEhdr(std::vector<uint8_t>& f, const Elf64_Ehdr& eh) { std::memcpy(f.data(), &eh, sizeof(eh)); }
Elf64_Phdr GetPhdr(const std::vector<uint8_t>& f, int i) {
  Elf64_Phdr ph;
  std::memcpy(&ph, f.data() + sizeof(Elf64_Ehdr) + i * sizeof(Elf64_Phdr), sizeof(ph));
  return ph;
}
void PutPhdr(std::vector<uint8_t>& f, int i, const Elf64_Phdr& ph) {
  std::memcpy(f.data() + sizeof(Elf64_Ehdr) + i * sizeof(Elf64_Phdr), &ph, sizeof(ph));
}

TEST(ParsePvhElfTest, EntryAndSegmentFound) {
  std::vector<uint8_t> f = MakePvhElf({XenEntryNote(kPvhEntry)});
  auto r = ParsePvhElf(f);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->entry, kPvhEntry);
  ASSERT_EQ(r->segments.size(), 1u);
  EXPECT_EQ(r->segments[0].file_offset, kSegOffset);
  EXPECT_EQ(r->segments[0].paddr, kSegPaddr);
  EXPECT_EQ(r->segments[0].filesz, kSegFilesz);
  EXPECT_EQ(r->segments[0].memsz, kSegMemsz);
  EXPECT_EQ(r->lowest_paddr, kSegPaddr);
  EXPECT_EQ(r->highest_paddr, kSegPaddr + kSegMemsz);
}

TEST(ParsePvhElfTest, FourByteDescriptorAccepted) {
  std::vector<uint8_t> f = MakePvhElf({XenEntryNote(0x1234560, 4)});
  auto r = ParsePvhElf(f);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->entry, 0x1234560u);
}

TEST(ParsePvhElfTest, XenNoteAfterOtherNotesFound) {
  std::vector<uint8_t> f = MakePvhElf({
      Note{"GNU", 3, std::vector<uint8_t>(20, 0xab)},  // NT_GNU_BUILD_ID
      Note{"Xen", 1, Le(0xffffffff81000000ULL, 8)},    // XEN_ELFNOTE_ENTRY: not the PVH one
      Note{"Linux", 18, Le(0xdeadbeef, 8)},            // type 18 but not owned by Xen
      XenEntryNote(kPvhEntry),
  });
  auto r = ParsePvhElf(f);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->entry, kPvhEntry);
}

TEST(ParsePvhElfTest, NoPvhNoteIsNotFound) {
  {
    std::vector<uint8_t> f = MakePvhElf({}, /*with_note_phdr=*/false);
    auto r = ParsePvhElf(f);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound) << r.status();
  }
  {
    // Notes present, but none is Xen/18.
    std::vector<uint8_t> f = MakePvhElf({Note{"GNU", 3, std::vector<uint8_t>(20, 1)},
                                         Note{"Xen", 1, Le(0x1000000, 8)},
                                         Note{"Linux", 18, Le(0x1000000, 8)}});
    auto r = ParsePvhElf(f);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound) << r.status();
  }
}

TEST(ParsePvhElfTest, TruncatedProgramHeadersRejected) {
  std::vector<uint8_t> good = MakePvhElf({XenEntryNote(kPvhEntry)});
  {
    // File cut in the middle of the second program header.
    std::vector<uint8_t> f(good.begin(),
                           good.begin() + sizeof(Elf64_Ehdr) + sizeof(Elf64_Phdr) + 10);
    auto r = ParsePvhElf(f);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  }
  {
    // Header claims far more program headers than the file holds.
    std::vector<uint8_t> f = good;
    Elf64_Ehdr eh = GetEhdr(f);
    eh.e_phnum = 1000;
    PutEhdr(f, eh);
    auto r = ParsePvhElf(f);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  }
  {
    // Program header table offset past the end of the file.
    std::vector<uint8_t> f = good;
    Elf64_Ehdr eh = GetEhdr(f);
    eh.e_phoff = f.size() + 4096;
    PutEhdr(f, eh);
    auto r = ParsePvhElf(f);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  }
}

TEST(ParsePvhElfTest, SegmentBeyondFileRejected) {
  std::vector<uint8_t> f = MakePvhElf({XenEntryNote(kPvhEntry)});
  Elf64_Phdr load = GetPhdr(f, 0);
  load.p_filesz = f.size() - load.p_offset + 1;  // one byte past the end
  load.p_memsz = load.p_filesz + 0x1000;
  PutPhdr(f, 0, load);
  auto r = ParsePvhElf(f);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();

  std::vector<uint8_t> g = MakePvhElf({XenEntryNote(kPvhEntry)});
  Elf64_Phdr load2 = GetPhdr(g, 0);
  load2.p_offset = g.size() + 0x1000;
  PutPhdr(g, 0, load2);
  r = ParsePvhElf(g);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
}

TEST(ParsePvhElfTest, FileszLargerThanMemszRejected) {
  std::vector<uint8_t> f = MakePvhElf({XenEntryNote(kPvhEntry)});
  Elf64_Phdr load = GetPhdr(f, 0);
  load.p_memsz = load.p_filesz - 1;
  PutPhdr(f, 0, load);
  auto r = ParsePvhElf(f);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
}

TEST(ParsePvhElfTest, Elf32Rejected) {
  // A genuine 32-bit i386 ELF (with a PVH note), padded past sizeof(Elf64_Ehdr).
  std::vector<uint8_t> note;
  AppendNote(note, XenEntryNote(kPvhEntry, 4));
  std::vector<uint8_t> f(0x1000, 0);
  Elf32_Ehdr eh{};
  std::memcpy(eh.e_ident, ELFMAG, SELFMAG);
  eh.e_ident[EI_CLASS] = ELFCLASS32;
  eh.e_ident[EI_DATA] = ELFDATA2LSB;
  eh.e_ident[EI_VERSION] = EV_CURRENT;
  eh.e_type = ET_EXEC;
  eh.e_machine = EM_386;
  eh.e_version = EV_CURRENT;
  eh.e_phoff = sizeof(Elf32_Ehdr);
  eh.e_ehsize = sizeof(Elf32_Ehdr);
  eh.e_phentsize = sizeof(Elf32_Phdr);
  eh.e_phnum = 2;
  std::memcpy(f.data(), &eh, sizeof(eh));
  Elf32_Phdr ph[2]{};
  ph[0].p_type = PT_LOAD;
  ph[0].p_offset = 0x800;
  ph[0].p_paddr = 0x1000000;
  ph[0].p_filesz = 0x100;
  ph[0].p_memsz = 0x100;
  ph[1].p_type = PT_NOTE;
  ph[1].p_offset = 0x200;
  ph[1].p_filesz = note.size();
  std::memcpy(f.data() + sizeof(Elf32_Ehdr), ph, sizeof(ph));
  std::memcpy(f.data() + 0x200, note.data(), note.size());
  ASSERT_TRUE(LooksLikeElf(f));
  auto r = ParsePvhElf(f);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
}

TEST(ParsePvhElfTest, WrongMachineRejected) {
  std::vector<uint8_t> f = MakePvhElf({XenEntryNote(kPvhEntry)});
  Elf64_Ehdr eh = GetEhdr(f);
  eh.e_machine = EM_AARCH64;
  PutEhdr(f, eh);
  auto r = ParsePvhElf(f);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(ParsePvhElfTest, NotElfRejected) {
  std::vector<uint8_t> bz = MakeBzImage(BzParams{});
  auto r = ParsePvhElf(bz);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
}

// ---------------------------------------------------------------------------------------------
// LoadLinux into real guest memory
// ---------------------------------------------------------------------------------------------

constexpr uint64_t kZeroPage = 0x7000;
constexpr uint64_t kCmdlineAddr = 0x20000;
constexpr uint64_t kPvhStartInfoAddr = 0x6000;
constexpr uint64_t kLoadAddr = 0x100000;  // bzImage protected-mode kernel: 1 MiB

std::unique_ptr<GuestMemory> NewMem(uint64_t bytes) {
  auto m = GuestMemory::Create(bytes);
  EXPECT_TRUE(m.ok()) << m.status();
  return m.ok() ? std::move(*m) : nullptr;
}

// boot.rst (init_size): the kernel needs [runtime_start, runtime_start + init_size), where
//   if (relocatable_kernel) { if (load_address < pref_address) load_address = pref_address;
//                             runtime_start = align_up(load_address, kernel_alignment); }
//   else runtime_start = pref_address;
uint64_t RuntimeStart(const BzParams& p, uint64_t load_address) {
  constexpr uint64_t kAlign = 0x200000;  // kernel_alignment set by MakeBzImage
  if (!p.relocatable) return p.pref_address;
  if (load_address < p.pref_address) load_address = p.pref_address;
  return (load_address + kAlign - 1) & ~(kAlign - 1);
}

std::vector<uint8_t> ReadBytes(const GuestMemory& mem, uint64_t gpa, uint64_t len) {
  std::vector<uint8_t> out(len);
  absl::Status s = mem.Read(gpa, out.data(), len);
  EXPECT_TRUE(s.ok()) << s;
  return out;
}

std::string ReadCString(const GuestMemory& mem, uint64_t gpa, size_t max) {
  std::string s;
  for (size_t i = 0; i < max; ++i) {
    auto c = mem.ReadObj<char>(gpa + i);
    if (!c.ok() || *c == 0) return s;
    s.push_back(*c);
  }
  return s + "<unterminated>";
}

std::vector<uint8_t> Pattern(size_t n, uint8_t seed) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>(i * 31 + seed + (i >> 8));
  return v;
}

TEST(LoadLinuxBzImageTest, KernelBootParamsCmdlineInitrd) {
  auto mem = NewMem(64 * kMiB);
  ASSERT_NE(mem, nullptr);
  BzParams p;
  p.payload = 8192;
  p.init_size = 4 * kMiB;
  std::vector<uint8_t> kernel = MakeBzImage(p);
  std::vector<uint8_t> initrd = Pattern(10000, 5);  // deliberately not a page multiple
  const std::string cmdline = "console=ttyS0 root=/dev/vda rw";
  auto e = LoadLinux(*mem, LinuxBootSpec{kernel, initrd, cmdline});
  ASSERT_TRUE(e.ok()) << e.status();

  // 64-bit boot protocol: entry at load address + 0x200, RSI -> boot_params.
  EXPECT_FALSE(e->pvh);
  EXPECT_EQ(e->rip, kLoadAddr + 0x200);
  EXPECT_EQ(e->boot_info, kZeroPage);

  // Protected-mode payload at 1 MiB.
  std::vector<uint8_t> expect_payload(kernel.begin() + 5 * 512, kernel.end());
  EXPECT_EQ(ReadBytes(*mem, kLoadAddr, expect_payload.size()), expect_payload);

  auto bp = mem->ReadObj<boot_params>(kZeroPage);
  ASSERT_TRUE(bp.ok());
  const setup_header& h = bp->hdr;
  // Loader-owned fields.
  EXPECT_EQ(h.type_of_loader, 0xff);  // "undefined" boot loader id
  EXPECT_EQ(h.cmd_line_ptr, kCmdlineAddr);
  EXPECT_EQ(bp->ext_cmd_line_ptr, 0u);
  EXPECT_EQ(ReadCString(*mem, h.cmd_line_ptr, 4096), cmdline);
  // Kernel-provided fields are preserved from the image header.
  EXPECT_EQ(h.header, 0x53726448u);
  EXPECT_EQ(h.boot_flag, 0xAA55);
  EXPECT_EQ(h.version, 0x020f);
  EXPECT_EQ(h.setup_sects, 4);
  EXPECT_EQ(h.init_size, 4 * kMiB);
  EXPECT_EQ(h.xloadflags, p.xloadflags);
  EXPECT_TRUE(h.loadflags & LOADED_HIGH);
  if (h.loadflags & CAN_USE_HEAP) {
    EXPECT_NE(h.heap_end_ptr, 0) << "CAN_USE_HEAP needs heap_end_ptr";
  }

  // Initrd: exact bytes, page aligned, below initrd_addr_max, above the kernel's init_size window.
  EXPECT_EQ(h.ramdisk_size, initrd.size());
  uint64_t rd = h.ramdisk_image;
  EXPECT_EQ(rd % 4096, 0u) << std::hex << rd;
  EXPECT_LE(rd + initrd.size() - 1, uint64_t{p.initrd_addr_max});
  EXPECT_GE(rd, kLoadAddr + p.init_size) << std::hex << rd;
  EXPECT_GE(rd, RuntimeStart(p, kLoadAddr) + p.init_size) << std::hex << rd;
  EXPECT_LE(rd + initrd.size(), 64 * kMiB);
  EXPECT_EQ(bp->ext_ramdisk_image, 0u);
  EXPECT_EQ(bp->ext_ramdisk_size, 0u);
  EXPECT_EQ(ReadBytes(*mem, rd, initrd.size()), initrd);

  // e820 map in the zero page is exactly BuildE820's.
  std::vector<E820Entry> e820 = BuildE820(64 * kMiB);
  ASSERT_EQ(bp->e820_entries, e820.size());
  for (size_t i = 0; i < e820.size(); ++i) {
    EXPECT_EQ(bp->e820_table[i].addr, e820[i].addr) << i;
    EXPECT_EQ(bp->e820_table[i].size, e820[i].size) << i;
    EXPECT_EQ(bp->e820_table[i].type, e820[i].type) << i;
  }
}

TEST(LoadLinuxBzImageTest, NoInitrdLeavesRamdiskZero) {
  auto mem = NewMem(32 * kMiB);
  ASSERT_NE(mem, nullptr);
  std::vector<uint8_t> kernel = MakeBzImage(BzParams{});
  auto e = LoadLinux(*mem, LinuxBootSpec{kernel, {}, "quiet"});
  ASSERT_TRUE(e.ok()) << e.status();
  auto bp = mem->ReadObj<boot_params>(kZeroPage);
  ASSERT_TRUE(bp.ok());
  EXPECT_EQ(bp->hdr.ramdisk_image, 0u);
  EXPECT_EQ(bp->hdr.ramdisk_size, 0u);
  EXPECT_EQ(ReadCString(*mem, kCmdlineAddr, 100), "quiet");
}

TEST(LoadLinuxBzImageTest, InitrdRespectsLowInitrdAddrMax) {
  auto mem = NewMem(64 * kMiB);
  ASSERT_NE(mem, nullptr);
  BzParams p;
  p.initrd_addr_max = 0x01ffffff;  // initrd must end at or below 32 MiB - 1
  std::vector<uint8_t> kernel = MakeBzImage(p);
  std::vector<uint8_t> initrd = Pattern(3 * 4096 + 17, 9);
  auto e = LoadLinux(*mem, LinuxBootSpec{kernel, initrd, ""});
  ASSERT_TRUE(e.ok()) << e.status();
  auto bp = mem->ReadObj<boot_params>(kZeroPage);
  ASSERT_TRUE(bp.ok());
  uint64_t rd = bp->hdr.ramdisk_image;
  EXPECT_EQ(rd % 4096, 0u);
  EXPECT_LE(rd + initrd.size() - 1, 0x01ffffffu) << std::hex << rd;
  EXPECT_GE(rd, RuntimeStart(p, kLoadAddr) + p.init_size);
  EXPECT_EQ(ReadBytes(*mem, rd, initrd.size()), initrd);
}

TEST(LoadLinuxBzImageTest, InitrdThatDoesNotFitAboveKernelRejected) {
  auto mem = NewMem(64 * kMiB);
  ASSERT_NE(mem, nullptr);
  BzParams p;
  p.init_size = 60 * kMiB;  // kernel needs 1..61 MiB; 3 MiB left
  std::vector<uint8_t> kernel = MakeBzImage(p);
  std::vector<uint8_t> initrd(4 * kMiB, 0x11);
  auto e = LoadLinux(*mem, LinuxBootSpec{kernel, initrd, ""});
  ASSERT_FALSE(e.ok());
  EXPECT_EQ(e.status().code(), absl::StatusCode::kInvalidArgument) << e.status();
}

TEST(LoadLinuxBzImageTest, CmdlineLimitIsHeaderCmdlineSize) {
  // boot.rst: cmdline_size is the maximum length *without* the terminating NUL.
  BzParams p;
  p.cmdline_size = 255;
  std::vector<uint8_t> kernel = MakeBzImage(p);
  {
    auto mem = NewMem(32 * kMiB);
    ASSERT_NE(mem, nullptr);
    std::string max(255, 'a');
    auto e = LoadLinux(*mem, LinuxBootSpec{kernel, {}, max});
    ASSERT_TRUE(e.ok()) << e.status();
    EXPECT_EQ(ReadCString(*mem, kCmdlineAddr, 1024), max);
  }
  {
    auto mem = NewMem(32 * kMiB);
    ASSERT_NE(mem, nullptr);
    auto e = LoadLinux(*mem, LinuxBootSpec{kernel, {}, std::string(256, 'a')});
    ASSERT_FALSE(e.ok());
    EXPECT_EQ(e.status().code(), absl::StatusCode::kInvalidArgument) << e.status();
  }
}

TEST(LoadLinuxBzImageTest, RamTooSmallForInitSizeRejected) {
  auto mem = NewMem(64 * kMiB);
  ASSERT_NE(mem, nullptr);
  BzParams p;
  p.init_size = 64 * kMiB;  // needs 65 MiB even from 1 MiB
  std::vector<uint8_t> kernel = MakeBzImage(p);
  auto e = LoadLinux(*mem, LinuxBootSpec{kernel, {}, ""});
  ASSERT_FALSE(e.ok());
  EXPECT_EQ(e.status().code(), absl::StatusCode::kInvalidArgument) << e.status();
  // Exactly fitting the boot.rst window (runtime start 16 MiB + 48 MiB = 64 MiB) is fine.
  p.init_size = 48 * kMiB;
  ASSERT_EQ(RuntimeStart(p, kLoadAddr) + p.init_size, 64 * kMiB);
  kernel = MakeBzImage(p);
  e = LoadLinux(*mem, LinuxBootSpec{kernel, {}, ""});
  EXPECT_TRUE(e.ok()) << e.status();
}

TEST(LoadLinuxBzImageTest, CorruptImageRejected) {
  auto mem = NewMem(32 * kMiB);
  ASSERT_NE(mem, nullptr);
  BzParams p;
  p.header = 0;
  std::vector<uint8_t> kernel = MakeBzImage(p);
  auto e = LoadLinux(*mem, LinuxBootSpec{kernel, {}, ""});
  ASSERT_FALSE(e.ok());
  EXPECT_EQ(e.status().code(), absl::StatusCode::kInvalidArgument);
}

// hvm_start_info ABI, xen/include/public/arch-x86/hvm/start_info.h (version 1).
struct XenStartInfo {
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
struct XenModlistEntry {
  uint64_t paddr;
  uint64_t size;
  uint64_t cmdline_paddr;
  uint64_t reserved;
};
struct XenMemmapEntry {
  uint64_t addr;
  uint64_t size;
  uint32_t type;
  uint32_t reserved;
};
static_assert(sizeof(XenStartInfo) == 56 && sizeof(XenModlistEntry) == 32 &&
              sizeof(XenMemmapEntry) == 24);

bool Overlaps(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen) {
  return a < b + blen && b < a + alen;
}

TEST(LoadLinuxPvhTest, SegmentsBssStartInfo) {
  auto mem = NewMem(64 * kMiB);
  ASSERT_NE(mem, nullptr);
  // Garbage everywhere, so "zeroed" means the loader zeroed it.
  auto all = mem->HostPtr(0, 64 * kMiB);
  ASSERT_TRUE(all.ok());
  std::memset(*all, 0xA5, 64 * kMiB);

  std::vector<uint8_t> kernel = MakePvhElf({XenEntryNote(kPvhEntry)});
  std::vector<uint8_t> initrd = Pattern(5000, 77);
  const std::string cmdline = "console=ttyS0 pci=off";
  auto e = LoadLinux(*mem, LinuxBootSpec{kernel, initrd, cmdline});
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_TRUE(e->pvh);
  EXPECT_EQ(e->rip, kPvhEntry);
  EXPECT_EQ(e->boot_info, kPvhStartInfoAddr);

  // File bytes at p_paddr, bss zeroed up to memsz, nothing past memsz touched.
  std::vector<uint8_t> seg(kernel.begin() + kSegOffset, kernel.begin() + kSegOffset + kSegFilesz);
  EXPECT_EQ(ReadBytes(*mem, kSegPaddr, kSegFilesz), seg);
  std::vector<uint8_t> bss = ReadBytes(*mem, kSegPaddr + kSegFilesz, kSegMemsz - kSegFilesz);
  EXPECT_EQ(bss, std::vector<uint8_t>(kSegMemsz - kSegFilesz, 0));
  EXPECT_EQ(*mem->ReadObj<uint8_t>(kSegPaddr + kSegMemsz), 0xA5);
  EXPECT_EQ(*mem->ReadObj<uint8_t>(kSegPaddr - 1), 0xA5);

  auto si = mem->ReadObj<XenStartInfo>(kPvhStartInfoAddr);
  ASSERT_TRUE(si.ok());
  EXPECT_EQ(si->magic, 0x336ec578u);
  EXPECT_GE(si->version, 1u);  // memmap fields exist from version 1
  EXPECT_EQ(ReadCString(*mem, si->cmdline_paddr, 4096), cmdline);

  ASSERT_EQ(si->nr_modules, 1u);
  auto mod = mem->ReadObj<XenModlistEntry>(si->modlist_paddr);
  ASSERT_TRUE(mod.ok());
  EXPECT_EQ(mod->size, initrd.size());
  EXPECT_EQ(mod->paddr % 4096, 0u);
  EXPECT_GE(mod->paddr, kSegPaddr + kSegMemsz) << "initrd overlaps the kernel image";
  EXPECT_LE(mod->paddr + mod->size, 64 * kMiB);
  EXPECT_EQ(ReadBytes(*mem, mod->paddr, initrd.size()), initrd);

  std::vector<E820Entry> e820 = BuildE820(64 * kMiB);
  ASSERT_EQ(si->memmap_entries, e820.size());
  for (size_t i = 0; i < e820.size(); ++i) {
    auto m = mem->ReadObj<XenMemmapEntry>(si->memmap_paddr + i * sizeof(XenMemmapEntry));
    ASSERT_TRUE(m.ok());
    EXPECT_EQ(m->addr, e820[i].addr) << i;
    EXPECT_EQ(m->size, e820[i].size) << i;
    EXPECT_EQ(m->type, e820[i].type) << i;  // XEN_HVM_MEMMAP_TYPE_* == E820 types
  }

  // The boot structures must not overlap each other, the command line, the boot GDT/IDT,
  // page tables, the zero page or the MP table area.
  struct Area { uint64_t a, len; const char* what; };
  std::vector<Area> areas = {
      {kPvhStartInfoAddr, sizeof(XenStartInfo), "start_info"},
      {si->modlist_paddr, sizeof(XenModlistEntry), "modlist"},
      {si->memmap_paddr, e820.size() * sizeof(XenMemmapEntry), "memmap"},
      {si->cmdline_paddr, cmdline.size() + 1, "cmdline"},
      {0x500, 0x30, "gdt/idt"},
      {0x9000, 0x6000, "page tables"},
      {0x9FC00, 0x100000 - 0x9FC00, "EBDA/MP table"},
      {mod->paddr, mod->size, "initrd"},
      {kSegPaddr, kSegMemsz, "kernel"},
  };
  for (size_t i = 0; i < areas.size(); ++i)
    for (size_t j = i + 1; j < areas.size(); ++j)
      EXPECT_FALSE(Overlaps(areas[i].a, areas[i].len, areas[j].a, areas[j].len))
          << areas[i].what << " overlaps " << areas[j].what;
}

TEST(LoadLinuxPvhTest, NoInitrdMeansNoModules) {
  auto mem = NewMem(32 * kMiB);
  ASSERT_NE(mem, nullptr);
  std::vector<uint8_t> kernel = MakePvhElf({XenEntryNote(kPvhEntry)});
  auto e = LoadLinux(*mem, LinuxBootSpec{kernel, {}, ""});
  ASSERT_TRUE(e.ok()) << e.status();
  auto si = mem->ReadObj<XenStartInfo>(kPvhStartInfoAddr);
  ASSERT_TRUE(si.ok());
  EXPECT_EQ(si->magic, 0x336ec578u);
  EXPECT_EQ(si->nr_modules, 0u);
  EXPECT_EQ(ReadCString(*mem, si->cmdline_paddr, 16), "");
}

TEST(LoadLinuxPvhTest, SegmentsBeyondRamRejected) {
  auto mem = NewMem(16 * kMiB);
  ASSERT_NE(mem, nullptr);
  // Segment at 16 MiB in a 16 MiB guest.
  std::vector<uint8_t> kernel = MakePvhElf({XenEntryNote(kPvhEntry)});
  auto e = LoadLinux(*mem, LinuxBootSpec{kernel, {}, ""});
  ASSERT_FALSE(e.ok());
  EXPECT_EQ(e.status().code(), absl::StatusCode::kInvalidArgument) << e.status();
}

TEST(LoadLinuxPvhTest, MissingNoteIsNotFound) {
  auto mem = NewMem(64 * kMiB);
  ASSERT_NE(mem, nullptr);
  std::vector<uint8_t> kernel = MakePvhElf({}, false);
  auto e = LoadLinux(*mem, LinuxBootSpec{kernel, {}, ""});
  ASSERT_FALSE(e.ok());
  EXPECT_EQ(e.status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace microvmm
