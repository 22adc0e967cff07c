// Unit tests of vmm/boot/acpi.h: the tables are written into a GuestMemory and parsed back the way
// a guest OS finds them (RSDP scan of 0xE0000-0xFFFFF, XSDT walk), with every signature, length
// and checksum checked, MADT/MCFG/FADT contents, and the DSDT's AML decoded by a small
// independent AML reader (Scope/Device/Name/Buffer/integers, resource descriptors). Also: the
// e820 map reserves what the tables describe, and LoadLinux hands the RSDP to the kernel.
#include "vmm/kvm/linux_kvm.h"  // before any linux header

#include <asm/bootparam.h>
#include <elf.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <set>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "vmm/boot/acpi.h"
#include "vmm/boot/layout.h"
#include "vmm/boot/linux_loader.h"
#include "vmm/boot/x86_setup.h"
#include "vmm/memory/guest_memory.h"
#include "vmm/pci/bar_allocator.h"

namespace microvmm {
namespace {

constexpr uint64_t kMiB = 1ULL << 20;
constexpr uint64_t kRsdpGpa = 0xE0000;  // layout::kAcpiStart, spelled out

std::unique_ptr<GuestMemory> NewMem(uint64_t bytes) {
  auto m = GuestMemory::Create(bytes);
  EXPECT_TRUE(m.ok()) << m.status();
  return m.ok() ? std::move(*m) : nullptr;
}

std::vector<uint8_t> ReadBytes(const GuestMemory& mem, uint64_t gpa, uint64_t len) {
  std::vector<uint8_t> b(len);
  EXPECT_TRUE(mem.Read(gpa, b.data(), len).ok()) << "read 0x" << std::hex << gpa;
  return b;
}

uint64_t Le(const std::vector<uint8_t>& b, size_t off, int n) {
  uint64_t v = 0;
  for (int i = n - 1; i >= 0; --i) v = (v << 8) | b.at(off + i);
  return v;
}

uint8_t Sum(const std::vector<uint8_t>& b, size_t n) {
  uint8_t s = 0;
  for (size_t i = 0; i < n; ++i) s += b[i];
  return s;
}

// A table read back from guest memory after checking its header: signature, length within the
// ACPI area, byte sum 0.
std::vector<uint8_t> ReadTable(const GuestMemory& mem, uint64_t gpa, const char* sig) {
  SCOPED_TRACE(sig);
  EXPECT_GE(gpa, layout::kAcpiStart);
  std::vector<uint8_t> hdr = ReadBytes(mem, gpa, 36);
  EXPECT_EQ(std::string(hdr.begin(), hdr.begin() + 4), sig);
  uint32_t len = static_cast<uint32_t>(Le(hdr, 4, 4));
  EXPECT_GE(len, 36u);
  EXPECT_LE(gpa + len, layout::kAcpiStart + layout::kAcpiSize) << "table leaves the ACPI area";
  if (len < 36 || gpa + len > layout::kAcpiStart + layout::kAcpiSize) return hdr;
  std::vector<uint8_t> t = ReadBytes(mem, gpa, len);
  EXPECT_EQ(Sum(t, t.size()), 0) << "checksum";
  EXPECT_EQ(std::string(t.begin() + 10, t.begin() + 16), "MCRVMM");  // OEM ID matches the RSDP
  return t;
}

struct Parsed {
  std::vector<uint8_t> rsdp, xsdt, fadt, madt, mcfg, dsdt;
  uint64_t fadt_gpa = 0, madt_gpa = 0, mcfg_gpa = 0, dsdt_gpa = 0;
};

// Finds the RSDP like Linux's acpi_find_root_pointer (16-byte steps over 0xE0000-0xFFFFF,
// signature + checksum) and follows XSDT -> FADT -> DSDT, MADT, MCFG.
Parsed ParseFromGuest(const GuestMemory& mem) {
  Parsed p;
  std::vector<uint8_t> bios = ReadBytes(mem, 0xE0000, 0x20000);
  std::optional<uint64_t> found;
  for (size_t off = 0; off + 36 <= bios.size(); off += 16) {
    if (std::memcmp(bios.data() + off, "RSD PTR ", 8) != 0) continue;
    std::vector<uint8_t> cand(bios.begin() + off, bios.begin() + off + 36);
    if (Sum(cand, 20) != 0) continue;
    found = 0xE0000 + off;
    p.rsdp = cand;
    break;
  }
  EXPECT_TRUE(found.has_value()) << "no RSDP in the BIOS area";
  if (!found) return p;
  EXPECT_EQ(*found, kRsdpGpa);
  EXPECT_EQ(p.rsdp[15], 2) << "RSDP revision";
  EXPECT_EQ(Le(p.rsdp, 20, 4), 36u) << "RSDP length";
  EXPECT_EQ(Sum(p.rsdp, 36), 0) << "RSDP extended checksum";
  uint64_t xsdt_gpa = Le(p.rsdp, 24, 8);
  p.xsdt = ReadTable(mem, xsdt_gpa, "XSDT");
  EXPECT_EQ((p.xsdt.size() - 36) % 8, 0u);
  std::map<std::string, uint64_t> by_sig;
  for (size_t off = 36; off + 8 <= p.xsdt.size(); off += 8) {
    uint64_t gpa = Le(p.xsdt, off, 8);
    std::string sig(reinterpret_cast<const char*>(ReadBytes(mem, gpa, 4).data()), 4);
    EXPECT_EQ(by_sig.count(sig), 0u) << "duplicate " << sig;
    by_sig[sig] = gpa;
  }
  EXPECT_EQ(by_sig.size(), 3u);
  p.fadt_gpa = by_sig["FACP"];
  p.madt_gpa = by_sig["APIC"];
  p.mcfg_gpa = by_sig["MCFG"];
  p.fadt = ReadTable(mem, p.fadt_gpa, "FACP");
  p.madt = ReadTable(mem, p.madt_gpa, "APIC");
  p.mcfg = ReadTable(mem, p.mcfg_gpa, "MCFG");
  if (p.fadt.size() >= 148) {
    p.dsdt_gpa = Le(p.fadt, 140, 8);  // X_DSDT
    EXPECT_EQ(Le(p.fadt, 40, 4), p.dsdt_gpa) << "DSDT and X_DSDT disagree";
    p.dsdt = ReadTable(mem, p.dsdt_gpa, "DSDT");
  }
  return p;
}

// ---------------------------------------------------------------------------------------------
// Independent AML reader for the subset the DSDT may use.
// ---------------------------------------------------------------------------------------------

struct AmlObject {
  bool is_buffer = false;
  bool is_package = false;
  uint64_t value = 0;
  std::vector<uint8_t> buffer;
  std::vector<AmlObject> package;  // elements (integers or packages)
};

class AmlReader {
 public:
  explicit AmlReader(const std::vector<uint8_t>& aml) : a_(aml) {}

  // Parses the whole TermList; false (with error()) on anything unexpected.
  bool Parse(std::map<std::string, AmlObject>& out) {
    out_ = &out;
    return TermList(0, a_.size(), "\\");
  }
  const std::string& error() const { return error_; }

 private:
  bool Fail(const std::string& e, size_t at) {
    error_ = e + " at offset " + std::to_string(at);
    return false;
  }

  // Returns the end offset of the package whose PkgLength starts at `pos`; advances `pos`.
  std::optional<size_t> PkgLength(size_t& pos, size_t limit) {
    size_t start = pos;
    if (pos >= limit) return std::nullopt;
    uint8_t lead = a_[pos++];
    int extra = lead >> 6;
    size_t len;
    if (extra == 0) {
      len = lead & 0x3F;
    } else {
      if (lead & 0x30) return std::nullopt;  // bits 5:4 reserved
      len = lead & 0x0F;
      for (int i = 0; i < extra; ++i) {
        if (pos >= limit) return std::nullopt;
        len |= size_t{a_[pos++]} << (4 + 8 * i);
      }
      // The encoding must be the shortest one (what iasl emits; ACPICA accepts either).
      if (extra == 1 && len < 0x40) return std::nullopt;
    }
    if (start + len > limit || start + len < pos) return std::nullopt;
    return start + len;
  }

  std::optional<std::string> NameString(size_t& pos, size_t limit, const std::string& scope) {
    std::string prefix = scope;
    if (pos < limit && a_[pos] == '\\') {
      prefix = "\\";
      ++pos;
    }
    if (pos + 4 > limit) return std::nullopt;
    std::string seg(a_.begin() + pos, a_.begin() + pos + 4);
    for (size_t i = 0; i < 4; ++i) {
      char c = seg[i];
      bool ok = (c >= 'A' && c <= 'Z') || c == '_' || (i > 0 && c >= '0' && c <= '9');
      if (!ok) return std::nullopt;
    }
    pos += 4;
    return prefix == "\\" ? "\\" + seg : prefix + "." + seg;
  }

  std::optional<uint64_t> Integer(size_t& pos, size_t limit) {
    if (pos >= limit) return std::nullopt;
    uint8_t op = a_[pos++];
    int n;
    switch (op) {
      case 0x00: return 0;
      case 0x01: return 1;
      case 0x0A: n = 1; break;
      case 0x0B: n = 2; break;
      case 0x0C: n = 4; break;
      case 0x0E: n = 8; break;
      default: return std::nullopt;
    }
    if (pos + n > limit) return std::nullopt;
    uint64_t v = Le(a_, pos, n);
    pos += n;
    return v;
  }

  // PackageOp PkgLength NumElements {Integer | Package}*; `pos` is at the PackageOp.
  std::optional<AmlObject> Package(size_t& pos, size_t limit) {
    if (pos >= limit || a_[pos] != 0x12) return std::nullopt;
    ++pos;
    auto pkg_end = PkgLength(pos, limit);
    if (!pkg_end || pos >= *pkg_end) return std::nullopt;
    AmlObject obj;
    obj.is_package = true;
    const size_t count = a_[pos++];
    while (pos < *pkg_end) {
      if (a_[pos] == 0x12) {
        auto sub = Package(pos, *pkg_end);
        if (!sub) return std::nullopt;
        obj.package.push_back(std::move(*sub));
      } else {
        auto v = Integer(pos, *pkg_end);
        if (!v) return std::nullopt;
        AmlObject e;
        e.value = *v;
        obj.package.push_back(std::move(e));
      }
    }
    // NumElements may exceed the initializers (the rest is uninitialized); we always fill all.
    if (obj.package.size() != count) return std::nullopt;
    pos = *pkg_end;
    return obj;
  }

  bool TermList(size_t pos, size_t end, const std::string& scope) {
    while (pos < end) {
      size_t at = pos;
      uint8_t op = a_[pos++];
      if (op == 0x10) {  // ScopeOp
        auto pkg_end = PkgLength(pos, end);
        if (!pkg_end) return Fail("bad Scope PkgLength", at);
        auto name = NameString(pos, *pkg_end, scope);
        if (!name) return Fail("bad Scope name", at);
        if (!TermList(pos, *pkg_end, *name)) return false;
        pos = *pkg_end;
      } else if (op == 0x5B && pos < end && a_[pos] == 0x82) {  // DeviceOp
        ++pos;
        auto pkg_end = PkgLength(pos, end);
        if (!pkg_end) return Fail("bad Device PkgLength", at);
        auto name = NameString(pos, *pkg_end, scope);
        if (!name) return Fail("bad Device name", at);
        (*out_)[*name] = AmlObject{};  // the device itself
        if (!TermList(pos, *pkg_end, *name)) return false;
        pos = *pkg_end;
      } else if (op == 0x08) {  // NameOp
        auto name = NameString(pos, end, scope);
        if (!name) return Fail("bad Name name", at);
        if (out_->count(*name)) return Fail("duplicate name " + *name, at);
        AmlObject obj;
        if (pos < end && a_[pos] == 0x11) {  // BufferOp
          size_t bat = pos++;
          auto pkg_end = PkgLength(pos, end);
          if (!pkg_end) return Fail("bad Buffer PkgLength", bat);
          auto size = Integer(pos, *pkg_end);
          if (!size) return Fail("bad Buffer size", bat);
          if (*size != *pkg_end - pos) return Fail("Buffer size != initializer length", bat);
          obj.is_buffer = true;
          obj.buffer.assign(a_.begin() + pos, a_.begin() + *pkg_end);
          pos = *pkg_end;
        } else if (pos < end && a_[pos] == 0x12) {  // PackageOp
          size_t pat = pos;
          auto pkg = Package(pos, end);
          if (!pkg) return Fail("bad Package", pat);
          obj = std::move(*pkg);
        } else {
          auto v = Integer(pos, end);
          if (!v) return Fail("unsupported Name data", at);
          obj.value = *v;
        }
        (*out_)[*name] = obj;
      } else {
        return Fail("unexpected opcode " + std::to_string(op), at);
      }
    }
    return pos == end || Fail("TermList overran its package", pos);
  }

  const std::vector<uint8_t>& a_;
  std::map<std::string, AmlObject>* out_ = nullptr;
  std::string error_;
};

struct Descriptor {
  uint8_t type;  // small: item name (0x4 IRQ, 0x8 IO, 0xF end); large: the full tag byte
  bool large;
  std::vector<uint8_t> data;
};

// Splits a resource template; checks it ends with exactly one End Tag at the end.
std::vector<Descriptor> ParseResources(const std::vector<uint8_t>& b) {
  std::vector<Descriptor> out;
  size_t pos = 0;
  bool ended = false;
  while (pos < b.size()) {
    EXPECT_FALSE(ended) << "data after the End Tag";
    uint8_t tag = b[pos];
    Descriptor d;
    size_t len, hdr;
    if (tag & 0x80) {
      EXPECT_LE(pos + 3, b.size());
      if (pos + 3 > b.size()) break;
      d.large = true;
      d.type = tag;
      len = Le(b, pos + 1, 2);
      hdr = 3;
    } else {
      d.large = false;
      d.type = (tag >> 3) & 0xF;
      len = tag & 7;
      hdr = 1;
    }
    EXPECT_LE(pos + hdr + len, b.size()) << "descriptor overruns the buffer";
    if (pos + hdr + len > b.size()) break;
    d.data.assign(b.begin() + pos + hdr, b.begin() + pos + hdr + len);
    if (!d.large && d.type == 0xF) ended = true;
    out.push_back(d);
    pos += hdr + len;
  }
  EXPECT_TRUE(ended) << "no End Tag";
  return out;
}

// ---------------------------------------------------------------------------------------------

pci::PciWindows TestWindows() {
  auto w = pci::PciWindows::Default(512 * kMiB, 40);
  EXPECT_TRUE(w.ok()) << w.status();
  return w.ok() ? *w : pci::PciWindows{};
}

AcpiConfig TestConfig(uint32_t vcpus) {
  AcpiConfig c;
  c.num_vcpus = vcpus;
  c.pci_windows = TestWindows();
  return c;
}

TEST(EisaIdTest, KnownEncodings) {
  // Values as iasl's EISAID() produces them (little-endian DWORDs in the AML).
  EXPECT_EQ(EisaId("PNP0A03"), 0x030AD041u);
  EXPECT_EQ(EisaId("PNP0A08"), 0x080AD041u);
  EXPECT_EQ(EisaId("PNP0501"), 0x0105D041u);
  EXPECT_EQ(EisaId("PNP0C02"), 0x020CD041u);
}

class AcpiVcpusTest : public testing::TestWithParam<uint32_t> {};

TEST_P(AcpiVcpusTest, TablesParseBackFromGuestMemory) {
  const uint32_t n = GetParam();
  auto mem = NewMem(512 * kMiB);
  ASSERT_NE(mem, nullptr);
  AcpiConfig cfg = TestConfig(n);
  auto rsdp = WriteAcpiTables(*mem, cfg);
  ASSERT_TRUE(rsdp.ok()) << rsdp.status();
  EXPECT_EQ(*rsdp, kRsdpGpa);
  Parsed p = ParseFromGuest(*mem);
  ASSERT_FALSE(p.madt.size() < 44 || p.fadt.size() < 276 || p.mcfg.size() < 60 ||
               p.dsdt.size() < 36);

  // --- MADT: LAPIC address, PCAT_COMPAT, N enabled LAPICs with IDs 0..N-1, one IOAPIC.
  EXPECT_EQ(Le(p.madt, 36, 4), 0xFEE00000u);
  EXPECT_EQ(Le(p.madt, 40, 4) & 1, 1u) << "PCAT_COMPAT";
  std::vector<uint32_t> apic_ids;
  int ioapics = 0, nmis = 0;
  size_t off = 44;
  while (off < p.madt.size()) {
    ASSERT_LE(off + 2, p.madt.size());
    uint8_t type = p.madt[off], len = p.madt[off + 1];
    ASSERT_GE(len, 2);
    ASSERT_LE(off + len, p.madt.size()) << "MADT entry overruns the table";
    switch (type) {
      case 0:  // local APIC
        ASSERT_EQ(len, 8);
        EXPECT_EQ(p.madt[off + 2], p.madt[off + 3]) << "UID == APIC ID";
        EXPECT_EQ(Le(p.madt, off + 4, 4), 1u) << "enabled";
        apic_ids.push_back(p.madt[off + 3]);
        break;
      case 1:  // IOAPIC
        ASSERT_EQ(len, 12);
        ++ioapics;
        EXPECT_EQ(p.madt[off + 2], n) << "IOAPIC ID after the LAPIC IDs (as in the MP table)";
        EXPECT_EQ(Le(p.madt, off + 4, 4), 0xFEC00000u);
        EXPECT_EQ(Le(p.madt, off + 8, 4), 0u) << "GSI base";
        break;
      case 2:  // interrupt source override: must agree with KVM's identity GSI routing
        ASSERT_EQ(len, 10);
        EXPECT_EQ(Le(p.madt, off + 4, 4), p.madt[off + 3]) << "ISA IRQ rerouted";
        break;
      case 4:  // local APIC NMI
        ASSERT_EQ(len, 6);
        ++nmis;
        EXPECT_EQ(p.madt[off + 2], 0xFF);
        EXPECT_EQ(p.madt[off + 5], 1) << "LINT1";
        break;
      default:
        ADD_FAILURE() << "unexpected MADT entry type " << int{type};
    }
    off += len;
  }
  EXPECT_EQ(off, p.madt.size());
  ASSERT_EQ(apic_ids.size(), n);
  for (uint32_t i = 0; i < n; ++i) EXPECT_EQ(apic_ids[i], i);
  EXPECT_EQ(ioapics, 1);
  EXPECT_EQ(nmis, 1);

  // --- MCFG: one allocation, ECAM base, segment 0, bus 0..0.
  ASSERT_EQ(p.mcfg.size(), 60u);
  EXPECT_EQ(Le(p.mcfg, 44, 8), pci::kEcamBase);
  EXPECT_EQ(Le(p.mcfg, 52, 2), 0u);
  EXPECT_EQ(p.mcfg[54], 0);
  EXPECT_EQ(p.mcfg[55], 0);

  // --- FADT: revision 6, HW-reduced, boot arch flags, DSDT pointer (checked in ParseFromGuest).
  EXPECT_EQ(p.fadt.size(), 276u);
  EXPECT_EQ(p.fadt[8], 6) << "FADT revision";
  uint32_t flags = static_cast<uint32_t>(Le(p.fadt, 112, 4));
  EXPECT_TRUE(flags & (1u << 20)) << "HW_REDUCED_ACPI";
  EXPECT_TRUE(flags & (1u << 10)) << "RESET_REG_SUP";
  uint16_t boot_arch = static_cast<uint16_t>(Le(p.fadt, 109, 2));
  EXPECT_TRUE(boot_arch & (1u << 1)) << "8042 present";
  EXPECT_TRUE(boot_arch & (1u << 2)) << "VGA not present";
  EXPECT_FALSE(boot_arch & (1u << 3)) << "MSI must not be reported unsupported";
  EXPECT_TRUE(boot_arch & (1u << 5)) << "no CMOS RTC is emulated";
  EXPECT_NE(Le(p.fadt, 46, 2), 0u) << "SCI_INT 0 would alias the timer IRQ in Linux";
  EXPECT_EQ(Le(p.fadt, 76, 4), 0u) << "no PM timer";
  EXPECT_EQ(p.fadt[116], 1) << "RESET_REG in system I/O space";
  EXPECT_EQ(Le(p.fadt, 120, 8), 0xCF9u);
  EXPECT_EQ(p.fadt[128], 6) << "RESET_VALUE";
  EXPECT_EQ(p.dsdt[8], 2) << "DSDT revision 2: 64-bit integers";

  // Every table sits inside the e820 ACPI range.
  bool covered = false;
  for (const E820Entry& e : BuildE820(512 * kMiB))
    if (e.type == kE820Acpi)
      covered = e.addr <= kRsdpGpa && p.dsdt_gpa + p.dsdt.size() <= e.addr + e.size &&
                p.madt_gpa + p.madt.size() <= e.addr + e.size;
  EXPECT_TRUE(covered);
}

INSTANTIATE_TEST_SUITE_P(Counts, AcpiVcpusTest, testing::Values(1u, 2u, 254u));

TEST(AcpiDsdtTest, PciHostBridgeCom1AndEcamResource) {
  auto mem = NewMem(512 * kMiB);
  ASSERT_NE(mem, nullptr);
  AcpiConfig cfg = TestConfig(2);
  const pci::PciWindows& w = cfg.pci_windows;
  ASSERT_GT(w.mmio64_end, w.mmio64_start) << "test wants a 64-bit window";
  ASSERT_TRUE(WriteAcpiTables(*mem, cfg).ok());
  Parsed p = ParseFromGuest(*mem);
  ASSERT_GT(p.dsdt.size(), 36u);
  std::vector<uint8_t> aml(p.dsdt.begin() + 36, p.dsdt.end());
  std::map<std::string, AmlObject> ns;
  AmlReader reader(aml);
  ASSERT_TRUE(reader.Parse(ns)) << reader.error();

  ASSERT_TRUE(ns.count("\\_SB_.PCI0"));
  EXPECT_EQ(ns["\\_SB_.PCI0._HID"].value, 0x080AD041u);  // PNP0A08
  EXPECT_EQ(ns["\\_SB_.PCI0._CID"].value, 0x030AD041u);  // PNP0A03
  ASSERT_TRUE(ns.count("\\_SB_.PCI0._SEG") && ns.count("\\_SB_.PCI0._BBN"));
  EXPECT_EQ(ns["\\_SB_.PCI0._SEG"].value, 0u);
  EXPECT_EQ(ns["\\_SB_.PCI0._BBN"].value, 0u);
  ASSERT_TRUE(ns["\\_SB_.PCI0._CRS"].is_buffer);
  std::vector<Descriptor> crs = ParseResources(ns["\\_SB_.PCI0._CRS"].buffer);

  bool bus = false, cf8 = false, io = false, mem32 = false, mem64 = false;
  for (const Descriptor& d : crs) {
    if (!d.large && d.type == 0x8) {  // IO port descriptor
      ASSERT_EQ(d.data.size(), 7u);
      EXPECT_EQ(Le(d.data, 1, 2), 0xCF8u);
      EXPECT_EQ(Le(d.data, 3, 2), 0xCF8u);
      EXPECT_EQ(d.data[6], 8);
      cf8 = true;
    } else if (d.large && d.type == 0x88) {  // Word address space
      ASSERT_EQ(d.data.size(), 13u);
      EXPECT_EQ(d.data[1] & 0x0D, 0x0C) << "producer, min/max fixed";
      uint64_t min = Le(d.data, 5, 2), max = Le(d.data, 7, 2), len = Le(d.data, 11, 2);
      EXPECT_EQ(len, max - min + 1);
      if (d.data[0] == 2) {
        EXPECT_EQ(min, 0u);
        EXPECT_EQ(max, 0u);
        bus = true;
      } else if (d.data[0] == 1) {
        EXPECT_EQ(min, w.io_start);
        EXPECT_EQ(max, w.io_end - 1);
        io = true;
      } else {
        ADD_FAILURE() << "unexpected word resource type " << int{d.data[0]};
      }
    } else if (d.large && d.type == 0x87) {  // DWord memory
      ASSERT_EQ(d.data.size(), 23u);
      EXPECT_EQ(d.data[0], 0);
      EXPECT_EQ(d.data[2] & 0x06, 0x00) << "32-bit window must not be prefetchable";
      EXPECT_EQ(Le(d.data, 7, 4), w.mmio32_start);
      EXPECT_EQ(Le(d.data, 11, 4), w.mmio32_end - 1);
      EXPECT_EQ(Le(d.data, 19, 4), w.mmio32_end - w.mmio32_start);
      mem32 = true;
    } else if (d.large && d.type == 0x8A) {  // QWord memory
      ASSERT_EQ(d.data.size(), 43u);
      EXPECT_EQ(d.data[0], 0);
      EXPECT_NE(d.data[2] & 0x06, 0x06) << "prefetchable window would reject plain BARs";
      EXPECT_EQ(Le(d.data, 11, 8), w.mmio64_start);
      EXPECT_EQ(Le(d.data, 19, 8), w.mmio64_end - 1);
      EXPECT_EQ(Le(d.data, 35, 8), w.mmio64_end - w.mmio64_start);
      mem64 = true;
    }
  }
  EXPECT_TRUE(bus && cf8 && io && mem32 && mem64)
      << bus << cf8 << io << mem32 << mem64;
  // The ECAM window itself is not a bridge window.
  EXPECT_GE(w.mmio32_start, pci::kEcamBase + pci::kEcamSize);

  // PNP0C02 motherboard resource = ECAM range (Linux's late MMCONFIG reservation check).
  EXPECT_EQ(ns["\\_SB_.MRES._HID"].value, 0x020CD041u);
  std::vector<Descriptor> mres = ParseResources(ns["\\_SB_.MRES._CRS"].buffer);
  ASSERT_GE(mres.size(), 2u);
  ASSERT_EQ(mres[0].type, 0x86);
  ASSERT_EQ(mres[0].data.size(), 9u);
  EXPECT_EQ(Le(mres[0].data, 1, 4), pci::kEcamBase);
  EXPECT_EQ(Le(mres[0].data, 5, 4), pci::kEcamSize);

  // COM1: PNP0501, IO 0x3F8 (8 ports), IRQ 4.
  EXPECT_EQ(ns["\\_SB_.COM1._HID"].value, 0x0105D041u);
  std::vector<Descriptor> com = ParseResources(ns["\\_SB_.COM1._CRS"].buffer);
  ASSERT_EQ(com.size(), 3u);
  EXPECT_EQ(com[0].type, 0x8);
  EXPECT_EQ(Le(com[0].data, 1, 2), 0x3F8u);
  EXPECT_EQ(com[0].data[6], 8);
  EXPECT_EQ(com[1].type, 0x4);
  EXPECT_EQ(Le(com[1].data, 0, 2), 1u << 4);
}

// _PRT: INTA#..INTD# of all 32 slots of bus 0, each a 4-element package pointing at a GSI
// (source 0), matching PciIntxGsi (what the VMM wires passthrough INTx to) and within the
// IOAPIC's level-triggered pins 16..23.
TEST(AcpiDsdtTest, PciRoutingTableCoversEverySlotAndPin) {
  auto mem = NewMem(64 * kMiB);
  ASSERT_NE(mem, nullptr);
  ASSERT_TRUE(WriteAcpiTables(*mem, TestConfig(1)).ok());
  Parsed p = ParseFromGuest(*mem);
  ASSERT_GT(p.dsdt.size(), 36u);
  std::vector<uint8_t> aml(p.dsdt.begin() + 36, p.dsdt.end());
  std::map<std::string, AmlObject> ns;
  AmlReader reader(aml);
  ASSERT_TRUE(reader.Parse(ns)) << reader.error();
  ASSERT_TRUE(ns.count("\\_SB_.PCI0._PRT"));
  const AmlObject& prt = ns["\\_SB_.PCI0._PRT"];
  ASSERT_TRUE(prt.is_package);
  ASSERT_EQ(prt.package.size(), 128u);
  std::set<std::pair<uint64_t, uint64_t>> seen;  // (slot, pin)
  std::map<uint64_t, int> per_gsi;
  for (const AmlObject& e : prt.package) {
    ASSERT_TRUE(e.is_package);
    ASSERT_EQ(e.package.size(), 4u);
    const uint64_t addr = e.package[0].value, pin = e.package[1].value;
    EXPECT_EQ(addr & 0xFFFF, 0xFFFFu) << "function field must be 0xFFFF (any function)";
    const uint64_t slot = addr >> 16;
    EXPECT_LT(slot, 32u);
    EXPECT_LT(pin, 4u);
    EXPECT_FALSE(e.package[2].is_package);
    EXPECT_EQ(e.package[2].value, 0u) << "source 0: the index is a GSI";
    const uint64_t gsi = e.package[3].value;
    EXPECT_GE(gsi, 16u);
    EXPECT_LT(gsi, 24u);
    EXPECT_EQ(gsi, PciIntxGsi(static_cast<uint32_t>(slot), static_cast<uint32_t>(pin)));
    EXPECT_TRUE(seen.insert({slot, pin}).second) << "duplicate entry slot " << slot << " pin " << pin;
    per_gsi[gsi]++;
  }
  EXPECT_EQ(seen.size(), 128u);
  // The swizzle spreads the lines: 128 (slot, pin) pairs over 8 GSIs, 16 each.
  EXPECT_EQ(per_gsi.size(), 8u);
  for (const auto& [gsi, n] : per_gsi) EXPECT_EQ(n, 16) << "GSI " << gsi;
  // Neighbouring slots' INTA# differ.
  EXPECT_NE(PciIntxGsi(3, 0), PciIntxGsi(4, 0));
}

TEST(AcpiDsdtTest, OptionalPartsLeftOut) {
  auto mem = NewMem(64 * kMiB);
  ASSERT_NE(mem, nullptr);
  AcpiConfig cfg;  // default windows: no 64-bit window
  cfg.num_vcpus = 1;
  cfg.com1 = false;
  cfg.i8042 = false;
  cfg.reset_via_cf9 = false;
  ASSERT_TRUE(WriteAcpiTables(*mem, cfg).ok());
  Parsed p = ParseFromGuest(*mem);
  ASSERT_GT(p.dsdt.size(), 36u);
  std::vector<uint8_t> aml(p.dsdt.begin() + 36, p.dsdt.end());
  std::map<std::string, AmlObject> ns;
  AmlReader reader(aml);
  ASSERT_TRUE(reader.Parse(ns)) << reader.error();
  EXPECT_FALSE(ns.count("\\_SB_.COM1"));
  EXPECT_TRUE(ns.count("\\_SB_.PCI0"));
  for (const Descriptor& d : ParseResources(ns["\\_SB_.PCI0._CRS"].buffer))
    EXPECT_NE(d.type, 0x8A) << "empty 64-bit window must not be described";
  ASSERT_GE(p.fadt.size(), 129u);
  EXPECT_FALSE(Le(p.fadt, 109, 2) & (1u << 1)) << "no 8042";
  EXPECT_FALSE(Le(p.fadt, 112, 4) & (1u << 10)) << "no reset register";
  EXPECT_EQ(p.fadt[128], 0);
}

TEST(AcpiConfigTest, VcpuCountLimits) {
  for (uint32_t n : {0u, 255u, 1000u}) {
    auto t = BuildAcpiTables(TestConfig(n), layout::kAcpiStart);
    ASSERT_FALSE(t.ok()) << n;
    EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument) << n;
  }
  // The largest configuration fits the reserved area with room to spare.
  auto t = BuildAcpiTables(TestConfig(254), layout::kAcpiStart);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_LT(t->size(), layout::kAcpiSize / 4);
}

TEST(AcpiConfigTest, BadEcamOrBaseRejected) {
  AcpiConfig c = TestConfig(1);
  c.ecam_base = 0xE0001000;  // not MiB-aligned
  EXPECT_FALSE(BuildAcpiTables(c, layout::kAcpiStart).ok());
  c.ecam_base = 0xFFF00000;
  c.ecam_end_bus = 1;  // 2 MiB crosses 4 GiB
  EXPECT_FALSE(BuildAcpiTables(c, layout::kAcpiStart).ok());
  EXPECT_FALSE(BuildAcpiTables(TestConfig(1), 0xE0008).ok()) << "unaligned base";
}

TEST(AcpiConfigTest, TablesAreRelocatable) {
  // Same config at another base: pointers move, content otherwise identical in size.
  auto a = BuildAcpiTables(TestConfig(4), 0xE0000);
  auto b = BuildAcpiTables(TestConfig(4), 0x80000);
  ASSERT_TRUE(a.ok() && b.ok());
  ASSERT_EQ(a->size(), b->size());
  std::vector<uint8_t> rb(b->begin(), b->begin() + 36);
  EXPECT_EQ(Le(rb, 24, 8) - 0x80000, Le(std::vector<uint8_t>(a->begin(), a->begin() + 36), 24, 8) -
                                         0xE0000);
}

// ---------------------------------------------------------------------------------------------
// e820 and boot protocol hand-over
// ---------------------------------------------------------------------------------------------

TEST(AcpiE820Test, EcamReservedAndTablesInAcpiRange) {
  for (uint64_t ram : {64 * kMiB, 3072 * kMiB, 6144 * kMiB}) {
    SCOPED_TRACE(ram);
    std::vector<E820Entry> e = BuildE820(ram);
    int ecam = 0, acpi = 0;
    for (size_t i = 0; i < e.size(); ++i) {
      if (i > 0) {
        EXPECT_GE(e[i].addr, e[i - 1].addr + e[i - 1].size) << "sorted";
      }
      if (e[i].addr == pci::kEcamBase && e[i].size == pci::kEcamSize &&
          e[i].type == kE820Reserved)
        ++ecam;
      if (e[i].type == kE820Acpi) {
        ++acpi;
        EXPECT_EQ(e[i].addr, layout::kAcpiStart);
        EXPECT_EQ(e[i].size, layout::kAcpiSize);
      }
      // No RAM overlaps the ECAM window.
      if (e[i].type == kE820Ram) {
        EXPECT_FALSE(e[i].addr < pci::kEcamBase + pci::kEcamSize &&
                     e[i].addr + e[i].size > pci::kEcamBase);
      }
    }
    EXPECT_EQ(ecam, 1);
    EXPECT_EQ(acpi, 1);
  }
}

// Minimal 64-bit bzImage (boot protocol 2.15) for LoadLinux.
std::vector<uint8_t> TinyBzImage() {
  constexpr size_t kHdrOff = offsetof(boot_params, hdr);
  std::vector<uint8_t> f(5 * 512 + 4096, 0);
  setup_header h;
  std::memset(&h, 0, sizeof(h));
  h.setup_sects = 4;
  h.boot_flag = 0xAA55;
  h.jump = static_cast<uint16_t>(0xEB | ((kHdrOff + sizeof(setup_header) - 0x202) << 8));
  h.header = 0x53726448;
  h.version = 0x020f;
  h.loadflags = LOADED_HIGH;
  h.xloadflags = XLF_KERNEL_64;
  h.init_size = 1 << 20;
  h.cmdline_size = 255;
  h.initrd_addr_max = 0x7fffffff;
  h.syssize = 4096 / 16;
  h.pref_address = 0x1000000;
  h.relocatable_kernel = 1;
  h.kernel_alignment = 0x200000;
  std::memcpy(f.data() + kHdrOff, &h, sizeof(h));
  return f;
}

// Minimal PVH ELF: one PT_LOAD at 16 MiB and a Xen PHYS32_ENTRY note.
std::vector<uint8_t> TinyPvhElf() {
  std::vector<uint8_t> f(4096, 0);
  Elf64_Ehdr eh{};
  std::memcpy(eh.e_ident, ELFMAG, SELFMAG);
  eh.e_ident[EI_CLASS] = ELFCLASS64;
  eh.e_ident[EI_DATA] = ELFDATA2LSB;
  eh.e_ident[EI_VERSION] = EV_CURRENT;
  eh.e_type = ET_EXEC;
  eh.e_machine = EM_X86_64;
  eh.e_version = EV_CURRENT;
  eh.e_phoff = sizeof(Elf64_Ehdr);
  eh.e_ehsize = sizeof(Elf64_Ehdr);
  eh.e_phentsize = sizeof(Elf64_Phdr);
  eh.e_phnum = 2;
  std::memcpy(f.data(), &eh, sizeof(eh));
  Elf64_Phdr load{};
  load.p_type = PT_LOAD;
  load.p_offset = 0x800;
  load.p_paddr = load.p_vaddr = 0x1000000;
  load.p_filesz = load.p_memsz = 0x100;
  Elf64_Phdr note{};
  note.p_type = PT_NOTE;
  note.p_offset = 0x400;
  note.p_filesz = sizeof(Elf64_Nhdr) + 4 + 8;
  std::memcpy(f.data() + eh.e_phoff, &load, sizeof(load));
  std::memcpy(f.data() + eh.e_phoff + sizeof(load), &note, sizeof(note));
  Elf64_Nhdr nh{4, 8, 18};  // "Xen", 8-byte desc, XEN_ELFNOTE_PHYS32_ENTRY
  std::memcpy(f.data() + 0x400, &nh, sizeof(nh));
  std::memcpy(f.data() + 0x400 + sizeof(nh), "Xen", 4);
  uint64_t entry = 0x1000040;
  std::memcpy(f.data() + 0x400 + sizeof(nh) + 4, &entry, 8);
  return f;
}

TEST(AcpiLoaderTest, BzImageGetsRsdpInBootParams) {
  auto mem = NewMem(64 * kMiB);
  ASSERT_NE(mem, nullptr);
  auto rsdp = WriteAcpiTables(*mem, TestConfig(1));
  ASSERT_TRUE(rsdp.ok());
  std::vector<uint8_t> k = TinyBzImage();
  LinuxBootSpec spec{k, {}, "console=ttyS0"};
  spec.rsdp_addr = *rsdp;
  auto e = LoadLinux(*mem, spec);
  ASSERT_TRUE(e.ok()) << e.status();
  ASSERT_FALSE(e->pvh);
  auto bp = mem->ReadObj<boot_params>(e->boot_info);
  ASSERT_TRUE(bp.ok());
  EXPECT_EQ(bp->acpi_rsdp_addr, kRsdpGpa);
  // The zero page's e820 carries the ACPI and ECAM ranges.
  bool acpi = false, ecam = false;
  for (int i = 0; i < bp->e820_entries; ++i) {
    acpi |= bp->e820_table[i].type == 3 && bp->e820_table[i].addr == kRsdpGpa;
    ecam |= bp->e820_table[i].type == 2 && bp->e820_table[i].addr == 0xE0000000;
  }
  EXPECT_TRUE(acpi);
  EXPECT_TRUE(ecam);

  // Without an RSDP the field stays 0 (the kernel then scans the BIOS area itself).
  auto mem2 = NewMem(64 * kMiB);
  ASSERT_NE(mem2, nullptr);
  auto e2 = LoadLinux(*mem2, LinuxBootSpec{k, {}, ""});
  ASSERT_TRUE(e2.ok()) << e2.status();
  auto bp2 = mem2->ReadObj<boot_params>(e2->boot_info);
  ASSERT_TRUE(bp2.ok());
  EXPECT_EQ(bp2->acpi_rsdp_addr, 0u);
}

TEST(AcpiLoaderTest, PvhGetsRsdpInStartInfo) {
  auto mem = NewMem(64 * kMiB);
  ASSERT_NE(mem, nullptr);
  auto rsdp = WriteAcpiTables(*mem, TestConfig(2));
  ASSERT_TRUE(rsdp.ok());
  std::vector<uint8_t> k = TinyPvhElf();
  LinuxBootSpec spec{k, {}, ""};
  spec.rsdp_addr = *rsdp;
  auto e = LoadLinux(*mem, spec);
  ASSERT_TRUE(e.ok()) << e.status();
  ASSERT_TRUE(e->pvh);
  // hvm_start_info: magic, version, flags, nr_modules (4 x u32), modlist, cmdline, rsdp (u64).
  auto rsdp_paddr = mem->ReadObj<uint64_t>(e->boot_info + 32);
  ASSERT_TRUE(rsdp_paddr.ok());
  EXPECT_EQ(*rsdp_paddr, kRsdpGpa);
}

}  // namespace
}  // namespace microvmm
