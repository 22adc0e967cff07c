// Unit tests of vmm/boot/mptable.h, checked against the Intel MultiProcessor Specification 1.4
// (chapter 4: floating pointer structure, configuration table header, base table entries). The
// table is decoded here byte by byte from the spec's offsets, not with the implementation's structs.
#include "vmm/boot/mptable.h"

#include <cstdint>
#include <cstring>
#include <set>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "vmm/boot/acpi.h"
#include "vmm/memory/guest_memory.h"

namespace microvmm {
namespace {

constexpr uint64_t kBase = 0x9FC00;  // where the VMM puts it: last KiB of 640 KiB base memory

uint8_t Sum(const uint8_t* p, size_t n) {
  uint8_t s = 0;
  for (size_t i = 0; i < n; ++i) s += p[i];
  return s;
}
uint16_t U16(const std::vector<uint8_t>& v, size_t off) { return v[off] | (v[off + 1] << 8); }
uint32_t U32(const std::vector<uint8_t>& v, size_t off) {
  return uint32_t{v[off]} | uint32_t{v[off + 1]} << 8 | uint32_t{v[off + 2]} << 16 |
         uint32_t{v[off + 3]} << 24;
}

struct Proc {
  uint8_t apic_id, flags;
};
struct IoApic {
  uint8_t id, flags;
  uint32_t addr;
};
struct Bus {
  uint8_t id;
  std::string type;
};
struct Irq {
  uint8_t irq_type;
  uint16_t flags;
  uint8_t src_bus, src_irq, dst_id, dst_pin;
};
struct Parsed {
  std::vector<Proc> procs;
  std::vector<Bus> buses;
  std::vector<IoApic> ioapics;
  std::vector<Irq> io_ints, local_ints;
  std::vector<uint8_t> types;  // entry types in table order
  uint16_t entry_count = 0;
  uint32_t lapic_addr = 0;
};

// Validates the structure as a consumer (e.g. Linux mpparse.c) would and decodes the entries.
Parsed ParseAndCheck(const std::vector<uint8_t>& t, uint64_t base) {
  Parsed out;
  // Floating pointer (MP spec 4.1): 16 bytes.
  EXPECT_GE(t.size(), 16u);
  if (t.size() < 16) return out;
  EXPECT_EQ(std::string(t.begin(), t.begin() + 4), "_MP_");
  uint32_t physptr = U32(t, 4);
  EXPECT_EQ(physptr, base + 16) << "config table right after the floating pointer";
  EXPECT_EQ(t[8], 1) << "length in 16-byte paragraphs";
  EXPECT_TRUE(t[9] == 1 || t[9] == 4) << "spec_rev " << int(t[9]);
  EXPECT_EQ(Sum(t.data(), 16), 0) << "floating pointer checksum";
  EXPECT_EQ(t[11], 0) << "feature byte 1: 0 = configuration table present";

  // Configuration table header (MP spec 4.2): 44 bytes.
  size_t c = physptr - base;
  EXPECT_LE(c + 44, t.size());
  if (c + 44 > t.size()) return out;
  EXPECT_EQ(std::string(t.begin() + c, t.begin() + c + 4), "PCMP");
  uint16_t length = U16(t, c + 4);
  EXPECT_TRUE(t[c + 6] == 1 || t[c + 6] == 4);
  EXPECT_LE(c + length, t.size());
  if (c + length > t.size()) return out;
  EXPECT_EQ(Sum(t.data() + c, length), 0) << "base table checksum over `length` bytes";
  out.entry_count = U16(t, c + 34);
  out.lapic_addr = U32(t, c + 36);
  uint16_t ext_len = U16(t, c + 40);
  EXPECT_EQ(c + length + ext_len, t.size()) << "no trailing bytes";
  if (ext_len) {
    EXPECT_EQ(uint8_t(Sum(t.data() + c + length, ext_len) + t[c + 42]), 0);
  }

  // Base table entries (MP spec 4.3).
  size_t off = c + 44;
  const size_t end = c + length;
  while (off < end) {
    uint8_t type = t[off];
    out.types.push_back(type);
    size_t sz = type == 0 ? 20 : 8;
    EXPECT_LE(type, 4) << "unknown entry type at " << off;
    if (type > 4 || off + sz > end) {
      ADD_FAILURE() << "entry overruns the table at " << off;
      return out;
    }
    switch (type) {
      case 0: out.procs.push_back({t[off + 1], t[off + 3]}); break;
      case 1: out.buses.push_back({t[off + 1], std::string(t.begin() + off + 2, t.begin() + off + 8)}); break;
      case 2: out.ioapics.push_back({t[off + 1], t[off + 3], U32(t, off + 4)}); break;
      case 3:
      case 4: {
        Irq i{t[off + 1], U16(t, off + 2), t[off + 4], t[off + 5], t[off + 6], t[off + 7]};
        (type == 3 ? out.io_ints : out.local_ints).push_back(i);
        break;
      }
    }
    off += sz;
  }
  EXPECT_EQ(off, end) << "entries exactly fill `length`";
  EXPECT_EQ(out.types.size(), out.entry_count) << "entry_count";
  for (size_t i = 1; i < out.types.size(); ++i)
    EXPECT_GE(out.types[i], out.types[i - 1]) << "entries must be sorted by type (MP spec 4.3)";
  return out;
}

class MpTableTest : public testing::TestWithParam<uint32_t> {};

TEST_P(MpTableTest, StructureMatchesSpec) {
  const uint32_t n = GetParam();
  std::vector<uint8_t> t = BuildMpTable(n, kBase);
  Parsed p = ParseAndCheck(t, kBase);
  if (HasFailure()) return;

  EXPECT_EQ(p.lapic_addr, 0xFEE00000u);

  // Processors: one per vCPU, APIC ids 0..n-1, all enabled, BSP flag only on APIC id 0.
  ASSERT_EQ(p.procs.size(), n);
  std::set<uint8_t> ids;
  int bsps = 0;
  for (const Proc& pr : p.procs) {
    ids.insert(pr.apic_id);
    EXPECT_TRUE(pr.flags & 1) << "CPU " << int(pr.apic_id) << " enabled";
    if (pr.flags & 2) {
      ++bsps;
      EXPECT_EQ(pr.apic_id, 0) << "BSP must be APIC id 0";
    }
  }
  EXPECT_EQ(bsps, 1);
  ASSERT_EQ(ids.size(), n) << "duplicate APIC ids";
  EXPECT_EQ(*ids.begin(), 0);
  EXPECT_EQ(*ids.rbegin(), n - 1);

  // One usable IOAPIC at the standard address, with an id no LAPIC uses and != 0xFF.
  ASSERT_EQ(p.ioapics.size(), 1u);
  const IoApic& io = p.ioapics[0];
  EXPECT_EQ(io.addr, 0xFEC00000u);
  EXPECT_TRUE(io.flags & 1) << "IOAPIC usable";
  EXPECT_EQ(ids.count(io.id), 0u) << "IOAPIC id collides with a LAPIC id";
  EXPECT_NE(io.id, 0xFF);

  // An ISA bus and a PCI bus. Linux takes the MP bus id of a PCI bus for its PCI bus number
  // (IO_APIC_get_PCI_irq_vector compares them), so our root bus 0 must be MP bus 0.
  int isa_bus = -1, pci_bus = -1;
  for (const Bus& b : p.buses) {
    if (b.type == "ISA   ") isa_bus = b.id;
    if (b.type == "PCI   ") pci_bus = b.id;
  }
  ASSERT_NE(isa_bus, -1) << "no ISA bus entry";
  ASSERT_EQ(pci_bus, 0) << "PCI bus 0 must be MP bus id 0";
  ASSERT_EQ(p.buses.size(), 2u);
  EXPECT_NE(isa_bus, pci_bus);
  std::vector<Irq> isa, pci;
  for (const Irq& i : p.io_ints) {
    EXPECT_EQ(i.dst_id, io.id) << "I/O interrupt routed to a non-existent IOAPIC";
    EXPECT_LT(i.dst_pin, kIoapicPins);
    EXPECT_EQ(i.irq_type, 0) << "vectored interrupt (INT)";
    ASSERT_TRUE(i.src_bus == isa_bus || i.src_bus == pci_bus) << "unknown bus " << int(i.src_bus);
    (i.src_bus == isa_bus ? isa : pci).push_back(i);
  }

  // The 16 ISA IRQs, identity-mapped, conforming to the bus (edge, active high).
  ASSERT_EQ(isa.size(), 16u);
  std::set<uint8_t> src_irqs, dst_pins;
  for (const Irq& i : isa) {
    EXPECT_EQ(i.src_irq, i.dst_pin);
    EXPECT_EQ(i.flags, 0);
    src_irqs.insert(i.src_irq);
    dst_pins.insert(i.dst_pin);
  }
  EXPECT_EQ(src_irqs.size(), 16u);
  EXPECT_EQ(*src_irqs.rbegin(), 15);
  EXPECT_EQ(dst_pins.size(), 16u) << "two ISA IRQs on one IOAPIC pin";

  // PCI INTx (MP spec 4.3.4): source IRQ = device << 2 | pin (0..3 = INTA#..INTD#), one entry
  // for every slot and pin, level-triggered active low (flags: polarity 3, trigger 3), to the
  // IOAPIC pin the DSDT's _PRT names: 16 + (slot + pin) % 8, never an ISA pin.
  ASSERT_EQ(pci.size(), 32u * 4);
  std::set<uint8_t> pci_srcs;
  for (const Irq& i : pci) {
    const uint32_t slot = i.src_irq >> 2, pin = i.src_irq & 3;
    EXPECT_EQ(i.flags, 0x0f) << "slot " << slot << " pin " << pin;
    EXPECT_EQ(i.dst_pin, 16 + (slot + pin) % 8) << "slot " << slot << " pin " << pin;
    EXPECT_EQ(i.dst_pin, PciIntxGsi(slot, pin));
    pci_srcs.insert(i.src_irq);
  }
  EXPECT_EQ(pci_srcs.size(), 128u) << "a slot/pin given twice";
  EXPECT_EQ(*pci_srcs.rbegin(), (31 << 2) | 3);

  // Local interrupt entries, if any, target all LAPICs (0xFF) or an existing one; LINT0/1 only.
  for (const Irq& i : p.local_ints) {
    EXPECT_TRUE(i.dst_id == 0xFF || ids.count(i.dst_id));
    EXPECT_LE(i.dst_pin, 1);
  }
}

INSTANTIATE_TEST_SUITE_P(VcpuCounts, MpTableTest, testing::Values(1u, 2u, 64u, 254u));

TEST(MpTableBaseTest, PhysptrFollowsBase) {
  for (uint64_t base : {0x9FC00ULL, 0xF0000ULL, 0x400ULL}) {
    std::vector<uint8_t> t = BuildMpTable(2, base);
    ASSERT_GE(t.size(), 16u);
    EXPECT_EQ(U32(t, 4), base + 16);
    EXPECT_EQ(Sum(t.data(), 16), 0);
  }
}

// Linux's smp_scan_config: 16-byte aligned "_MP_" with length 1 and checksum 0 in the first KiB,
// in the last KiB of 640 KiB base memory, or in the BIOS ROM.
bool LinuxFindsFloatingPointer(const GuestMemory& mem, uint64_t* found) {
  const std::pair<uint64_t, uint64_t> areas[] = {{0, 0x400}, {639 * 0x400, 0x400}, {0xF0000, 0x10000}};
  for (auto [start, len] : areas) {
    for (uint64_t a = start; a + 16 <= start + len; a += 16) {
      uint8_t b[16];
      if (!mem.Read(a, b, 16).ok()) continue;
      if (std::memcmp(b, "_MP_", 4) == 0 && b[8] == 1 && Sum(b, 16) == 0) {
        *found = a;
        return true;
      }
    }
  }
  return false;
}

TEST(WriteMpTableTest, WrittenWhereLinuxLooks) {
  for (uint32_t n : {1u, 8u, 254u}) {
    auto mem = GuestMemory::Create(32 << 20);
    ASSERT_TRUE(mem.ok());
    ASSERT_TRUE(WriteMpTable(**mem, n).ok()) << n;
    uint64_t at = 0;
    ASSERT_TRUE(LinuxFindsFloatingPointer(**mem, &at)) << n;
    std::vector<uint8_t> expect = BuildMpTable(n, at);
    std::vector<uint8_t> got(expect.size());
    ASSERT_TRUE((*mem)->Read(at, got.data(), got.size()).ok());
    EXPECT_EQ(got, expect) << n;
    // Whole table inside the e820-reserved EBDA, below the ACPI tables at 0xE0000.
    EXPECT_LE(at + expect.size(), 0xE0000u);
    EXPECT_GE(at, 0x9FC00u);
  }
}

TEST(WriteMpTableTest, RejectsZeroAndTooManyVcpus) {
  auto mem = GuestMemory::Create(32 << 20);
  ASSERT_TRUE(mem.ok());
  for (uint32_t n : {0u, 255u, 256u, 1000u}) {
    absl::Status s = WriteMpTable(**mem, n);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << n << ": " << s;
  }
  // Nothing was written by the rejected calls.
  uint64_t at = 0;
  EXPECT_FALSE(LinuxFindsFloatingPointer(**mem, &at));
}

}  // namespace
}  // namespace microvmm
