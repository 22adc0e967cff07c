// Unit tests of vmm/boot/x86_setup.h: e820 map, per-vCPU CPUID (Intel SDM CPUID leaves 1, 4, 0xB),
// boot page tables / GDT in guest memory (walked like the MMU would) and the long-mode and
// protected-mode segment/control register set-up.
#include "vmm/boot/x86_setup.h"

#include <cstdint>
#include <cstring>
#include <vector>

#include "gtest/gtest.h"
#include "vmm/kvm/kvm.h"
#include "vmm/memory/guest_memory.h"

namespace microvmm {
namespace {

constexpr uint64_t kMiB = 1ULL << 20;
constexpr uint64_t kGiB = 1ULL << 30;
constexpr uint64_t kGapStart = 3 * kGiB;
constexpr uint64_t kGapEnd = 4 * kGiB;
constexpr uint64_t kEbda = 0x9FC00;
constexpr uint64_t kOneMiB = 0x100000;

// ---------------------------------------------------------------------------------------------
// BuildE820
// ---------------------------------------------------------------------------------------------

// ACPI table area (layout::kAcpiStart, e820 type 3) and the PCI ECAM window for bus 0
// (pci::kEcamBase, reserved), spelled out here so the test checks the values, not itself.
constexpr uint64_t kAcpiArea = 0xE0000;
constexpr uint64_t kAcpiAreaSize = 0x10000;
constexpr uint64_t kEcam = 0xE0000000;
constexpr uint64_t kEcamSize = kOneMiB;

// Invariants any valid map for `ram` bytes must satisfy. Returns the end of the highest RAM range.
uint64_t CheckE820Invariants(uint64_t ram) {
  SCOPED_TRACE(testing::Message() << "ram=0x" << std::hex << ram);
  std::vector<E820Entry> e = BuildE820(ram);
  EXPECT_FALSE(e.empty());
  uint64_t ram_sum = 0, low_hole_sum = 0, highest_ram_end = 0;
  bool ram_at_zero = false;
  int acpi = 0, ecam = 0;
  for (size_t i = 0; i < e.size(); ++i) {
    SCOPED_TRACE(testing::Message() << "entry " << i << " addr=0x" << std::hex << e[i].addr
                                    << " size=0x" << e[i].size << " type=" << e[i].type);
    EXPECT_GT(e[i].size, 0u);
    EXPECT_TRUE(e[i].type == kE820Ram || e[i].type == kE820Reserved || e[i].type == kE820Acpi);
    if (i > 0) {
      EXPECT_GE(e[i].addr, e[i - 1].addr + e[i - 1].size) << "unsorted or overlapping";
    }
    // Nothing in the 32-bit MMIO gap but the reserved ECAM window.
    if (e[i].addr < kGapEnd && e[i].addr + e[i].size > kGapStart) {
      EXPECT_EQ(e[i].addr, kEcam);
      EXPECT_EQ(e[i].size, kEcamSize);
      EXPECT_EQ(e[i].type, kE820Reserved);
      ++ecam;
    }
    if (e[i].type == kE820Acpi) {
      EXPECT_EQ(e[i].addr, kAcpiArea);
      EXPECT_EQ(e[i].size, kAcpiAreaSize);
      ++acpi;
    }
    if (e[i].type == kE820Ram) {
      ram_sum += e[i].size;
      highest_ram_end = std::max(highest_ram_end, e[i].addr + e[i].size);
      if (e[i].addr == 0) ram_at_zero = true;
      // Every RAM range must be backed by a GuestMemory region.
      bool backed = false;
      for (const RamRange& r : RamLayout(ram))
        backed |= e[i].addr >= r.gpa && e[i].addr + e[i].size <= r.gpa + r.size;
      EXPECT_TRUE(backed);
      // RAM must not cover the EBDA / BIOS area.
      EXPECT_FALSE(e[i].addr < kOneMiB && e[i].addr + e[i].size > kEbda);
    } else if (e[i].addr + e[i].size <= kOneMiB) {
      EXPECT_GE(e[i].addr, kEbda);
      low_hole_sum += e[i].size;
    }
  }
  EXPECT_TRUE(ram_at_zero);
  EXPECT_EQ(acpi, 1) << "one ACPI (type 3) range for the tables";
  EXPECT_EQ(ecam, 1) << "ECAM must be e820-reserved (Linux rejects unreserved MMCONFIG)";
  // Non-overlapping entries inside [EBDA, 1 MiB) that add up to its size cover it completely
  // (the MP table and the ACPI tables live there).
  EXPECT_EQ(low_hole_sum, kOneMiB - kEbda) << "EBDA..1 MiB must be reserved/ACPI end to end";
  EXPECT_EQ(ram_sum + (kOneMiB - kEbda), ram) << "RAM + EBDA hole must equal the guest RAM size";
  return highest_ram_end;
}

TEST(BuildE820Test, SixtyFourMiB) {
  EXPECT_EQ(CheckE820Invariants(64 * kMiB), 64 * kMiB);
  std::vector<E820Entry> e = BuildE820(64 * kMiB);
  for (const E820Entry& x : e) {
    if (x.type == kE820Ram) {
      EXPECT_LT(x.addr, kGapStart);
    }
  }
}

TEST(BuildE820Test, ExactlyThreeGiB) {
  EXPECT_EQ(CheckE820Invariants(3 * kGiB), 3 * kGiB);
  for (const E820Entry& x : BuildE820(3 * kGiB)) {
    if (x.type == kE820Ram) {
      EXPECT_LE(x.addr + x.size, kGapStart);
    }
  }
}

TEST(BuildE820Test, FourGiB) {
  // 3 GiB below the gap, the last 1 GiB relocated to 4 GiB.
  EXPECT_EQ(CheckE820Invariants(4 * kGiB), 5 * kGiB);
  bool high = false;
  for (const E820Entry& x : BuildE820(4 * kGiB))
    if (x.addr == kGapEnd) {
      high = true;
      EXPECT_EQ(x.size, 1 * kGiB);
      EXPECT_EQ(x.type, kE820Ram);
    }
  EXPECT_TRUE(high);
}

TEST(BuildE820Test, SixGiB) {
  EXPECT_EQ(CheckE820Invariants(6 * kGiB), 7 * kGiB);
  bool high = false;
  for (const E820Entry& x : BuildE820(6 * kGiB))
    if (x.addr == kGapEnd) {
      high = true;
      EXPECT_EQ(x.size, 3 * kGiB);
    }
  EXPECT_TRUE(high);
}

TEST(BuildE820Test, SmallestConfigurableGuest) {
  EXPECT_EQ(CheckE820Invariants(16 * kMiB), 16 * kMiB);
}

// ---------------------------------------------------------------------------------------------
// BuildVcpuCpuid
// ---------------------------------------------------------------------------------------------

kvm_cpuid_entry2 Leaf(uint32_t fn, uint32_t idx, uint32_t flags, uint32_t a, uint32_t b,
                      uint32_t c, uint32_t d) {
  kvm_cpuid_entry2 e{};
  e.function = fn;
  e.index = idx;
  e.flags = flags;
  e.eax = a;
  e.ebx = b;
  e.ecx = c;
  e.edx = d;
  return e;
}

constexpr uint32_t kSig = KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
// Host values, deliberately "wrong" for any vCPU (host APIC id 0x37, 0xEE logical CPUs).
constexpr uint32_t kHostLeaf1Eax = 0x000906ea;
constexpr uint32_t kHostLeaf1Ebx = 0x37EE08A5;  // [31:24] APIC id, [23:16] count, CLFLUSH 8, brand A5
constexpr uint32_t kHostLeaf1Ecx = 0x7ffafbbf;  // hypervisor bit (31) clear
constexpr uint32_t kHostLeaf1Edx = 0xbfebfbff;  // HTT (28) set

CpuidTable SyntheticSupported() {
  std::vector<kvm_cpuid_entry2> v = {
      Leaf(0x0, 0, 0, 0x16, 0x756e6547, 0x6c65746e, 0x49656e69),  // "GenuineIntel"
      Leaf(0x1, 0, 0, kHostLeaf1Eax, kHostLeaf1Ebx, kHostLeaf1Ecx, kHostLeaf1Edx),
      // Leaf 4: EAX[31:26] cores-1, [25:14] threads sharing-1, [13:0] cache type/level/etc.
      Leaf(0x4, 0, kSig, 0x1c004121, 0x01c0003f, 0x0000003f, 0),
      Leaf(0x4, 1, kSig, 0x1c004122, 0x01c0003f, 0x0000003f, 0),
      Leaf(0x4, 2, kSig, 0x1c004143, 0x00c0003f, 0x000003ff, 0),
      Leaf(0x4, 3, kSig, 0x1c03c163, 0x03c0003f, 0x00003fff, 6),
      Leaf(0x4, 4, kSig, 0, 0, 0, 0),
      Leaf(0x7, 0, kSig, 0, 0x029c6fbf, 0x40000000, 0xbc000400),
      // Host topology: SMT (2 threads), core (8), invalid; host x2APIC id 0x37.
      Leaf(0xb, 0, kSig, 1, 2, 0x100, 0x37),
      Leaf(0xb, 1, kSig, 4, 16, 0x201, 0x37),
      Leaf(0xb, 2, kSig, 0, 0, 2, 0x37),
      Leaf(0x40000000, 0, 0, 0x40000001, 0x4b4d564b, 0x564b4d56, 0x4d),  // "KVMKVMKVM"
      Leaf(0x40000001, 0, 0, 0x01007afb, 0, 0, 0),
      Leaf(0x80000001, 0, 0, 0, 0, 0x121, 0x2c100800),
  };
  return CpuidTable(std::move(v));
}

const kvm_cpuid_entry2* FindLeaf(const CpuidTable& t, uint32_t fn, uint32_t idx = 0) {
  for (const kvm_cpuid_entry2& e : t.entries())
    if (e.function == fn && e.index == idx) return &e;
  return nullptr;
}

bool SameEntry(const kvm_cpuid_entry2& a, const kvm_cpuid_entry2& b) {
  return a.function == b.function && a.index == b.index && a.flags == b.flags && a.eax == b.eax &&
         a.ebx == b.ebx && a.ecx == b.ecx && a.edx == b.edx;
}

struct TopoCase {
  uint32_t vcpu_id;
  uint32_t num_vcpus;
  uint32_t core_shift;  // bits of x2APIC id below the package: ceil(log2(num_vcpus))
};

class BuildVcpuCpuidTest : public testing::TestWithParam<TopoCase> {};

TEST_P(BuildVcpuCpuidTest, TopologyAndIds) {
  const TopoCase c = GetParam();
  const CpuidTable in = SyntheticSupported();
  const CpuidTable out = BuildVcpuCpuid(in, c.vcpu_id, c.num_vcpus);

  // Same leaves, same order.
  ASSERT_EQ(out.entries().size(), in.entries().size());
  for (size_t i = 0; i < in.entries().size(); ++i) {
    EXPECT_EQ(out.entries()[i].function, in.entries()[i].function);
    EXPECT_EQ(out.entries()[i].index, in.entries()[i].index);
    EXPECT_EQ(out.entries()[i].flags, in.entries()[i].flags);
  }

  // Leaf 1.
  const kvm_cpuid_entry2* l1 = FindLeaf(out, 1);
  ASSERT_NE(l1, nullptr);
  EXPECT_EQ(l1->eax, kHostLeaf1Eax);
  EXPECT_EQ(l1->ebx >> 24, c.vcpu_id) << "initial APIC id";
  EXPECT_EQ((l1->ebx >> 16) & 0xff, c.num_vcpus) << "logical processors";
  EXPECT_EQ(l1->ebx & 0xffff, kHostLeaf1Ebx & 0xffff) << "CLFLUSH size / brand preserved";
  EXPECT_TRUE(l1->ecx & (1u << 31)) << "hypervisor present bit";
  EXPECT_EQ(l1->ecx & ~(1u << 31), kHostLeaf1Ecx & ~(1u << 31));
  EXPECT_EQ(bool(l1->edx & (1u << 28)), c.num_vcpus > 1) << "HTT only for >1 logical CPU";
  EXPECT_EQ(l1->edx & ~(1u << 28), kHostLeaf1Edx & ~(1u << 28));

  // Leaf 4: EAX[31:26] = cores per package - 1 (6-bit field); cache description untouched.
  uint32_t cores_m1 = std::min<uint32_t>(c.num_vcpus, 64) - 1;
  for (uint32_t sub = 0; sub <= 4; ++sub) {
    SCOPED_TRACE(testing::Message() << "leaf 4 subleaf " << sub);
    const kvm_cpuid_entry2* o = FindLeaf(out, 4, sub);
    const kvm_cpuid_entry2* i = FindLeaf(in, 4, sub);
    ASSERT_NE(o, nullptr);
    EXPECT_EQ(o->eax & 0x3fff, i->eax & 0x3fff);
    EXPECT_EQ(o->ebx, i->ebx);
    EXPECT_EQ(o->ecx, i->ecx);
    EXPECT_EQ(o->edx, i->edx);
    if (sub < 4) {
      EXPECT_EQ(o->eax >> 26, cores_m1);
    }
  }

  // Leaf 0xB: EAX[4:0] shift, EBX[15:0] logical CPUs at level, ECX[7:0] level number,
  // ECX[15:8] level type (1 SMT, 2 core, 0 invalid), EDX x2APIC id.
  const kvm_cpuid_entry2* smt = FindLeaf(out, 0xb, 0);
  const kvm_cpuid_entry2* core = FindLeaf(out, 0xb, 1);
  const kvm_cpuid_entry2* inval = FindLeaf(out, 0xb, 2);
  ASSERT_TRUE(smt && core && inval);
  EXPECT_EQ(smt->eax & 0x1f, 0u) << "one thread per core";
  EXPECT_EQ(smt->ebx & 0xffff, 1u);
  EXPECT_EQ(smt->ecx & 0xff, 0u);
  EXPECT_EQ((smt->ecx >> 8) & 0xff, 1u);
  EXPECT_EQ(core->eax & 0x1f, c.core_shift);
  EXPECT_EQ(core->ebx & 0xffff, c.num_vcpus);
  EXPECT_EQ(core->ecx & 0xff, 1u);
  EXPECT_EQ((core->ecx >> 8) & 0xff, 2u);
  EXPECT_EQ(inval->eax, 0u);
  EXPECT_EQ(inval->ebx, 0u);
  EXPECT_EQ(inval->ecx & 0xff, 2u);
  EXPECT_EQ((inval->ecx >> 8) & 0xff, 0u);
  for (const kvm_cpuid_entry2* e : {smt, core, inval}) EXPECT_EQ(e->edx, c.vcpu_id);
  // x2APIC id agrees with the leaf 1 initial APIC id.
  EXPECT_EQ(smt->edx, l1->ebx >> 24);

  // Everything else is passed through bit for bit.
  for (uint32_t fn : {0x0u, 0x7u, 0x40000000u, 0x40000001u, 0x80000001u}) {
    const kvm_cpuid_entry2* o = FindLeaf(out, fn);
    const kvm_cpuid_entry2* i = FindLeaf(in, fn);
    ASSERT_NE(o, nullptr) << std::hex << fn;
    EXPECT_TRUE(SameEntry(*o, *i)) << "leaf 0x" << std::hex << fn << " modified";
  }
}

INSTANTIATE_TEST_SUITE_P(Topologies, BuildVcpuCpuidTest,
                         testing::Values(TopoCase{0, 1, 0}, TopoCase{0, 2, 1}, TopoCase{1, 2, 1},
                                         TopoCase{2, 3, 2}, TopoCase{3, 4, 2}, TopoCase{4, 5, 3},
                                         TopoCase{63, 64, 6}, TopoCase{200, 254, 8}));

TEST(BuildVcpuCpuidPureTest, InputUnchanged) {
  const CpuidTable in = SyntheticSupported();
  CpuidTable copy = in;
  (void)BuildVcpuCpuid(in, 3, 4);
  ASSERT_EQ(copy.entries().size(), in.entries().size());
  for (size_t i = 0; i < in.entries().size(); ++i)
    EXPECT_TRUE(SameEntry(copy.entries()[i], in.entries()[i]));
}

TEST(BuildVcpuCpuidPureTest, DistinctApicIdsPerVcpu) {
  const CpuidTable in = SyntheticSupported();
  for (uint32_t id = 0; id < 8; ++id) {
    CpuidTable out = BuildVcpuCpuid(in, id, 8);
    EXPECT_EQ(FindLeaf(out, 1)->ebx >> 24, id);
    EXPECT_EQ(FindLeaf(out, 0xb, 1)->edx, id);
  }
}

// ---------------------------------------------------------------------------------------------
// WriteBootTables + SetupLongModeSregs: walk the tables like the MMU would.
// ---------------------------------------------------------------------------------------------

constexpr uint64_t kPresent = 1ULL << 0;
constexpr uint64_t kRw = 1ULL << 1;
constexpr uint64_t kPs = 1ULL << 7;
constexpr uint64_t kAddrMask = 0x000ffffffffff000ULL;

kvm_sregs ResetSregs() {
  // Architectural state after RESET/INIT (SDM Vol. 3 9.1.1): CR0 = 0x60000010 (CD, NW, ET).
  kvm_sregs s{};
  s.cr0 = 0x60000010;
  s.cr4 = 0;
  s.efer = 0;
  return s;
}

struct TablesFixture : testing::Test {
  void SetUp() override {
    auto m = GuestMemory::Create(64 * kMiB);
    ASSERT_TRUE(m.ok()) << m.status();
    mem = std::move(*m);
    ASSERT_TRUE(WriteBootTables(*mem).ok());
    sregs = ResetSregs();
    SetupLongModeSregs(sregs);
  }
  uint64_t Q(uint64_t gpa) {
    auto v = mem->ReadObj<uint64_t>(gpa);
    EXPECT_TRUE(v.ok()) << std::hex << gpa;
    return v.ok() ? *v : 0;
  }
  // 4-level walk; returns the physical address `va` maps to (2 MiB pages expected).
  uint64_t Translate(uint64_t va) {
    SCOPED_TRACE(testing::Message() << "va=0x" << std::hex << va);
    uint64_t pml4e = Q((sregs.cr3 & kAddrMask) + 8 * ((va >> 39) & 511));
    EXPECT_EQ(pml4e & (kPresent | kRw), kPresent | kRw);
    uint64_t pdpte = Q((pml4e & kAddrMask) + 8 * ((va >> 30) & 511));
    EXPECT_EQ(pdpte & (kPresent | kRw), kPresent | kRw);
    EXPECT_EQ(pdpte & kPs, 0u) << "expected a PD, not a 1 GiB page";
    uint64_t pde = Q((pdpte & kAddrMask) + 8 * ((va >> 21) & 511));
    EXPECT_EQ(pde & (kPresent | kRw | kPs), kPresent | kRw | kPs) << "2 MiB page, present, rw";
    return (pde & 0x000fffffffe00000ULL) | (va & 0x1fffff);
  }
  std::unique_ptr<GuestMemory> mem;
  kvm_sregs sregs;
};

TEST_F(TablesFixture, IdentityMapsFirstFourGiB) {
  EXPECT_EQ(sregs.cr3 & 0xfff, 0u);
  for (uint64_t va : {0x0ULL, 0x1000ULL, 0x7000ULL, 0x100000ULL, 0x200000ULL, 0x1234567ULL,
                      0x40000000ULL, 0x7FE00000ULL, 0x80000000ULL, 0xBFFFF000ULL, 0xC0000000ULL,
                      0xFEC00000ULL, 0xFEE00000ULL, 0xFFE00000ULL, 0xFFFFFFFFULL}) {
    EXPECT_EQ(Translate(va), va) << std::hex << va;
  }
}

TEST_F(TablesFixture, TablesLieInsideEbdaFreeLowRam) {
  // The tables must be in RAM the e820 map reports as usable-but-low and not in the EBDA.
  uint64_t pml4 = sregs.cr3 & kAddrMask;
  EXPECT_LT(pml4, kEbda);
  EXPECT_LT(sregs.gdt.base + sregs.gdt.limit, kEbda);
}

// Decodes a legacy segment descriptor (SDM Vol. 3 3.4.5).
struct Desc {
  uint32_t base, limit;
  uint8_t type, s, dpl, p, avl, l, db, g;
};
Desc Decode(uint64_t d) {
  Desc x;
  x.limit = (d & 0xffff) | ((d >> 32) & 0xf0000);
  x.base = ((d >> 16) & 0xffffff) | ((d >> 32) & 0xff000000);
  x.type = (d >> 40) & 0xf;
  x.s = (d >> 44) & 1;
  x.dpl = (d >> 45) & 3;
  x.p = (d >> 47) & 1;
  x.avl = (d >> 52) & 1;
  x.l = (d >> 53) & 1;
  x.db = (d >> 54) & 1;
  x.g = (d >> 55) & 1;
  return x;
}

void ExpectSegMatchesDesc(const kvm_segment& s, const Desc& d, uint16_t sel) {
  EXPECT_EQ(s.selector, sel);
  EXPECT_EQ(s.base, d.base);
  EXPECT_EQ(s.limit, d.g ? (d.limit << 12) | 0xfff : d.limit);
  EXPECT_EQ(s.type, d.type);
  EXPECT_EQ(s.s, d.s);
  EXPECT_EQ(s.dpl, d.dpl);
  EXPECT_EQ(s.present, d.p);
  EXPECT_EQ(s.l, d.l);
  EXPECT_EQ(s.db, d.db);
  EXPECT_EQ(s.g, d.g);
  EXPECT_EQ(s.unusable, 0);
}

TEST_F(TablesFixture, GdtHas64BitCodeAndDataAtLinuxBootSelectors) {
  ASSERT_GE(sregs.gdt.limit, 0x1f) << "GDT must cover selector 0x18";
  EXPECT_EQ(Q(sregs.gdt.base + 0), 0u) << "null descriptor";
  Desc code = Decode(Q(sregs.gdt.base + 0x10));
  EXPECT_EQ(code.p, 1);
  EXPECT_EQ(code.s, 1);
  EXPECT_TRUE(code.type & 0x8) << "code segment";
  EXPECT_TRUE(code.type & 0x2) << "readable";
  EXPECT_EQ(code.l, 1) << "64-bit code";
  EXPECT_EQ(code.db, 0) << "D must be 0 when L=1";
  EXPECT_EQ(code.dpl, 0);
  // boot.rst 64-bit protocol: "both descriptors must be 4G flat segment".
  EXPECT_EQ(code.base, 0u);
  EXPECT_EQ(code.g, 1);
  EXPECT_EQ(code.limit, 0xfffffu);

  Desc data = Decode(Q(sregs.gdt.base + 0x18));
  EXPECT_EQ(data.p, 1);
  EXPECT_EQ(data.s, 1);
  EXPECT_FALSE(data.type & 0x8) << "data segment";
  EXPECT_TRUE(data.type & 0x2) << "writable";
  EXPECT_EQ(data.dpl, 0);
  EXPECT_EQ(data.base, 0u);
  EXPECT_EQ(data.g, 1);
  EXPECT_EQ(data.limit, 0xfffffu) << "flat 4 GiB";

  // The cached segment state handed to KVM matches what reloading from the GDT would give.
  ExpectSegMatchesDesc(sregs.cs, code, 0x10);
  for (const kvm_segment* s : {&sregs.ds, &sregs.es, &sregs.ss, &sregs.fs, &sregs.gs})
    ExpectSegMatchesDesc(*s, data, 0x18);
}

TEST(SregsTest, LongMode) {
  kvm_sregs s = ResetSregs();
  SetupLongModeSregs(s);
  EXPECT_TRUE(s.cr0 & (1ULL << 31)) << "CR0.PG";
  EXPECT_TRUE(s.cr0 & (1ULL << 0)) << "CR0.PE";
  EXPECT_FALSE(s.cr0 & (1ULL << 30)) << "CR0.CD must be cleared (caching enabled)";
  EXPECT_FALSE(s.cr0 & (1ULL << 29)) << "CR0.NW must be cleared";
  EXPECT_TRUE(s.cr4 & (1ULL << 5)) << "CR4.PAE";
  EXPECT_TRUE(s.efer & (1ULL << 8)) << "EFER.LME";
  EXPECT_TRUE(s.efer & (1ULL << 10)) << "EFER.LMA";
  EXPECT_EQ(s.cs.l, 1);
  EXPECT_EQ(s.cs.db, 0);
  EXPECT_EQ(s.cs.present, 1);
  EXPECT_EQ(s.cs.selector, 0x10);
  EXPECT_EQ(s.ds.selector, 0x18);
  EXPECT_EQ(s.ss.selector, 0x18);
  EXPECT_EQ(s.tr.present, 1) << "VMX needs a usable TR";
}

TEST(SregsTest, LongModePreservesUnrelatedCr4Bits) {
  kvm_sregs s = ResetSregs();
  s.cr4 = 1ULL << 9;  // OSFXSR
  SetupLongModeSregs(s);
  EXPECT_TRUE(s.cr4 & (1ULL << 9));
  EXPECT_TRUE(s.cr4 & (1ULL << 5));
}

TEST(SregsTest, ProtectedModeForPvh) {
  // Xen PVH entry (docs/misc/pvh.pandoc): 32-bit flat CS/DS, CR0.PE set, paging off, CR4 = 0.
  kvm_sregs s = ResetSregs();
  s.efer = (1ULL << 8) | (1ULL << 10);
  s.cr4 = 1ULL << 5;
  SetupProtectedModeSregs(s);
  EXPECT_TRUE(s.cr0 & 1ULL) << "CR0.PE";
  EXPECT_FALSE(s.cr0 & (1ULL << 31)) << "CR0.PG";
  EXPECT_FALSE(s.cr0 & (1ULL << 30)) << "CR0.CD";
  EXPECT_EQ(s.cr4, 0u);
  EXPECT_EQ(s.efer & ((1ULL << 8) | (1ULL << 10)), 0u);
  EXPECT_EQ(s.cs.l, 0);
  EXPECT_EQ(s.cs.db, 1) << "32-bit code";
  EXPECT_EQ(s.cs.base, 0u);
  EXPECT_EQ(s.cs.limit, 0xffffffffu);
  EXPECT_TRUE(s.cs.type & 0x8);
  EXPECT_EQ(s.ds.base, 0u);
  EXPECT_EQ(s.ds.limit, 0xffffffffu);
  EXPECT_FALSE(s.ds.type & 0x8);
}

}  // namespace
}  // namespace microvmm
