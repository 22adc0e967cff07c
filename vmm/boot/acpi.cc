#include "vmm/boot/acpi.h"

#include <cstring>
#include <initializer_list>
#include <string_view>

#include "absl/strings/str_format.h"
#include "vmm/boot/aml.h"
#include "vmm/boot/layout.h"
#include "vmm/boot/mptable.h"

namespace microvmm {
namespace {

// ---- little-endian byte building ----------------------------------------------------------------

using Bytes = std::vector<uint8_t>;

void Put(Bytes& b, uint64_t v, int n) {
  for (int i = 0; i < n; ++i) b.push_back(static_cast<uint8_t>(v >> (8 * i)));
}
void Put8(Bytes& b, uint64_t v) { Put(b, v, 1); }
void Put16(Bytes& b, uint64_t v) { Put(b, v, 2); }
void Put32(Bytes& b, uint64_t v) { Put(b, v, 4); }
void Put64(Bytes& b, uint64_t v) { Put(b, v, 8); }
void PutStr(Bytes& b, std::string_view s) { b.insert(b.end(), s.begin(), s.end()); }
void Patch32(Bytes& b, size_t off, uint32_t v) {
  for (int i = 0; i < 4; ++i) b[off + i] = static_cast<uint8_t>(v >> (8 * i));
}
void Append(Bytes& b, const Bytes& more) { b.insert(b.end(), more.begin(), more.end()); }

uint8_t Checksum(const uint8_t* p, size_t n) {
  uint8_t sum = 0;
  for (size_t i = 0; i < n; ++i) sum += p[i];
  return static_cast<uint8_t>(-sum);
}

// ---- System description tables (ACPI 6.0 §5.2) --------------------------------------------------

constexpr std::string_view kOemId = "MCRVMM";       // 6 bytes
constexpr std::string_view kOemTableId = "MICROVMM";  // 8 bytes
constexpr std::string_view kCreatorId = "MVMM";
constexpr size_t kHeaderSize = 36;
constexpr size_t kChecksumOffset = 9;

Bytes TableHeader(std::string_view signature, uint8_t revision) {
  Bytes b;
  PutStr(b, signature);
  Put32(b, 0);  // length, patched by Finish
  Put8(b, revision);
  Put8(b, 0);  // checksum, patched by Finish
  PutStr(b, kOemId);
  PutStr(b, kOemTableId);
  Put32(b, 1);  // OEM revision
  PutStr(b, kCreatorId);
  Put32(b, 1);  // creator revision
  return b;
}

Bytes Finish(Bytes b) {
  Patch32(b, 4, static_cast<uint32_t>(b.size()));
  b[kChecksumOffset] = 0;
  b[kChecksumOffset] = Checksum(b.data(), b.size());
  return b;
}

// Generic Address Structure (§5.2.3.2).
void PutGas(Bytes& b, uint8_t space, uint8_t bit_width, uint8_t access_size, uint64_t addr) {
  Put8(b, space);
  Put8(b, bit_width);
  Put8(b, 0);  // bit offset
  Put8(b, access_size);
  Put64(b, addr);
}
void PutNullGas(Bytes& b) { PutGas(b, 0, 0, 0, 0); }

// FADT (§5.2.9), revision 6 / minor 0: 276 bytes.
Bytes BuildFadt(const AcpiConfig& cfg, uint64_t dsdt) {
  constexpr uint32_t kWbinvd = 1u << 0;
  constexpr uint32_t kResetRegSup = 1u << 10;
  constexpr uint32_t kHwReducedAcpi = 1u << 20;
  constexpr uint16_t kBoot8042 = 1u << 1;
  constexpr uint16_t kBootVgaNotPresent = 1u << 2;
  constexpr uint16_t kBootCmosRtcNotPresent = 1u << 5;
  // Not reported to the guest, but named here so the choice is visible: bit 3 "MSI not
  // supported" stays clear (our PCI devices use MSI-X).

  Bytes b = TableHeader("FACP", 6);
  Put32(b, 0);                           // 36 FIRMWARE_CTRL: no FACS (optional when HW-reduced)
  Put32(b, static_cast<uint32_t>(dsdt));  // 40 DSDT
  Put8(b, 0);                            // 44 reserved
  Put8(b, 0);                            // 45 preferred PM profile: unspecified
  // 46 SCI_INT. Unused when HW-reduced, but kept off IRQ 0: Linux treats a MADT override whose
  // source equals SCI_INT as the SCI override, and kernels before the reduced-hardware check
  // configure SCI_INT level/low. IRQ 9 is the PC convention and nothing else uses it.
  Put16(b, 9);
  Put32(b, 0);  // 48 SMI_CMD: no SMM, ACPI is always enabled
  Put8(b, 0);   // 52 ACPI_ENABLE
  Put8(b, 0);   // 53 ACPI_DISABLE
  Put8(b, 0);   // 54 S4BIOS_REQ
  Put8(b, 0);   // 55 PSTATE_CNT
  for (int i = 0; i < 8; ++i) Put32(b, 0);  // 56..87 PM1a/b EVT, PM1a/b CNT, PM2 CNT, PM TMR, GPE0/1
  for (int i = 0; i < 8; ++i) Put8(b, 0);   // 88..95 block lengths, GPE1_BASE, CST_CNT
  Put16(b, 0);  // 96 P_LVL2_LAT
  Put16(b, 0);  // 98 P_LVL3_LAT
  Put16(b, 0);  // 100 FLUSH_SIZE
  Put16(b, 0);  // 102 FLUSH_STRIDE
  Put8(b, 0);   // 104 DUTY_OFFSET
  Put8(b, 0);   // 105 DUTY_WIDTH
  Put8(b, 0);   // 106 DAY_ALRM
  Put8(b, 0);   // 107 MON_ALRM
  Put8(b, 0);   // 108 CENTURY
  uint16_t boot_arch = kBootVgaNotPresent;
  if (cfg.i8042) boot_arch |= kBoot8042;
  if (!cfg.cmos_rtc) boot_arch |= kBootCmosRtcNotPresent;
  Put16(b, boot_arch);  // 109 IAPC_BOOT_ARCH
  Put8(b, 0);           // 111 reserved
  uint32_t flags = kWbinvd | kHwReducedAcpi;
  if (cfg.reset_via_cf9) flags |= kResetRegSup;
  Put32(b, flags);  // 112 flags
  // 116 RESET_REG: byte write of 6 to port 0xCF9 (bit 2 = reset, what PciRootBus decodes).
  if (cfg.reset_via_cf9)
    PutGas(b, /*SystemIO*/ 1, 8, /*byte*/ 1, 0xCF9);
  else
    PutNullGas(b);
  Put8(b, cfg.reset_via_cf9 ? 6 : 0);  // 128 RESET_VALUE
  Put16(b, 0);                          // 129 ARM_BOOT_ARCH
  Put8(b, 0);                           // 131 FADT minor version
  Put64(b, 0);                          // 132 X_FIRMWARE_CTRL
  Put64(b, dsdt);                       // 140 X_DSDT (same value as DSDT: ACPICA checks)
  for (int i = 0; i < 8; ++i) PutNullGas(b);  // 148..243 X_PM1a_EVT .. X_GPE1
  PutNullGas(b);                              // 244 SLEEP_CONTROL_REG
  PutNullGas(b);                              // 256 SLEEP_STATUS_REG
  PutStr(b, "MICROVMM");                      // 268 hypervisor vendor identity
  return Finish(std::move(b));
}

// MADT (§5.2.12), revision 4 (ACPI 6.0).
Bytes BuildMadt(const AcpiConfig& cfg) {
  constexpr uint32_t kPcatCompat = 1;
  Bytes b = TableHeader("APIC", 4);
  Put32(b, kLapicAddr);
  Put32(b, kPcatCompat);
  for (uint32_t i = 0; i < cfg.num_vcpus; ++i) {
    Put8(b, 0);  // Processor Local APIC
    Put8(b, 8);
    Put8(b, static_cast<uint8_t>(i));  // ACPI processor UID
    Put8(b, static_cast<uint8_t>(i));  // APIC ID (CPUID leaf 1/0xB report the same)
    Put32(b, 1);                       // enabled
  }
  Put8(b, 1);  // I/O APIC
  Put8(b, 12);
  Put8(b, static_cast<uint8_t>(cfg.num_vcpus));  // IOAPIC ID, after the LAPIC IDs (MP table too)
  Put8(b, 0);
  Put32(b, kIoapicAddr);
  Put32(b, 0);  // GSI base
  Put8(b, 4);   // Local APIC NMI: LINT1 of every processor, as KVM's LAPIC reset and the MP table
  Put8(b, 6);
  Put8(b, 0xFF);  // all processors
  Put16(b, 0);    // flags: conforms to the bus
  Put8(b, 1);     // LINT1
  return Finish(std::move(b));
}

// MCFG (PCI Firmware spec 3.x §4.1.2), revision 1.
Bytes BuildMcfg(const AcpiConfig& cfg) {
  Bytes b = TableHeader("MCFG", 1);
  Put64(b, 0);  // reserved
  Put64(b, cfg.ecam_base);
  Put16(b, 0);  // segment
  Put8(b, 0);   // start bus
  Put8(b, cfg.ecam_end_bus);
  Put32(b, 0);
  return Finish(std::move(b));
}

Bytes BuildXsdt(std::initializer_list<uint64_t> tables) {
  Bytes b = TableHeader("XSDT", 1);
  for (uint64_t t : tables) Put64(b, t);
  return Finish(std::move(b));
}

// RSDP (§5.2.5.3), revision 2: 36 bytes; no RSDT (XSDT only, as Firecracker/Cloud Hypervisor).
Bytes BuildRsdp(uint64_t xsdt) {
  Bytes b;
  PutStr(b, "RSD PTR ");
  Put8(b, 0);  // checksum of the first 20 bytes
  PutStr(b, kOemId);
  Put8(b, 2);   // revision
  Put32(b, 0);  // RSDT address
  Put32(b, 36);
  Put64(b, xsdt);
  Put8(b, 0);  // extended checksum of all 36 bytes
  Put8(b, 0);
  Put8(b, 0);
  Put8(b, 0);
  b[8] = Checksum(b.data(), 20);
  b[32] = Checksum(b.data(), 36);
  return b;
}

// ---- AML (vmm/boot/aml.h) -------------------------------------------------------------------

Bytes AmlEisaId(const char (&id)[8]) {
  Bytes b;
  Put8(b, aml::kDWordPrefix);
  Put32(b, EisaId(id));
  return b;
}

// IO(Decode16, base, base, 1, len) — small I/O port descriptor.
void ResIo(Bytes& b, uint16_t base, uint8_t len) {
  Put8(b, 0x47);
  Put8(b, 1);  // 16-bit decode
  Put16(b, base);
  Put16(b, base);
  Put8(b, 1);  // alignment
  Put8(b, len);
}

// IRQNoFlags(){irq}: edge triggered, active high (ISA).
void ResIrq(Bytes& b, int irq) {
  Put8(b, 0x22);
  Put16(b, 1u << irq);
}

// Memory32Fixed(ReadWrite, base, len).
void ResMemory32Fixed(Bytes& b, uint32_t base, uint32_t len) {
  Put8(b, 0x86);
  Put16(b, 9);
  Put8(b, 1);  // read/write
  Put32(b, base);
  Put32(b, len);
}

// Address space descriptors as a bridge window: ResourceProducer, PosDecode, MinFixed, MaxFixed
// (general flags 0x0C), granularity 0, no translation, length = max - min + 1.
constexpr uint8_t kWindowFlags = 0x0C;
enum : uint8_t { kSpaceMemory = 0, kSpaceIo = 1, kSpaceBus = 2 };

void ResWord(Bytes& b, uint8_t space, uint8_t type_flags, uint16_t min, uint16_t max) {
  Put8(b, 0x88);
  Put16(b, 13);
  Put8(b, space);
  Put8(b, kWindowFlags);
  Put8(b, type_flags);
  Put16(b, 0);
  Put16(b, min);
  Put16(b, max);
  Put16(b, 0);
  Put16(b, max - min + 1);
}

void ResDWordMemory(Bytes& b, uint8_t type_flags, uint32_t min, uint32_t max) {
  Put8(b, 0x87);
  Put16(b, 23);
  Put8(b, kSpaceMemory);
  Put8(b, kWindowFlags);
  Put8(b, type_flags);
  Put32(b, 0);
  Put32(b, min);
  Put32(b, max);
  Put32(b, 0);
  Put32(b, max - min + 1);
}

void ResQWordMemory(Bytes& b, uint8_t type_flags, uint64_t min, uint64_t max) {
  Put8(b, 0x8A);
  Put16(b, 43);
  Put8(b, kSpaceMemory);
  Put8(b, kWindowFlags);
  Put8(b, type_flags);
  Put64(b, 0);
  Put64(b, min);
  Put64(b, max);
  Put64(b, 0);
  Put64(b, max - min + 1);
}

// Memory type-specific flags: bit 0 read/write, bits 2:1 caching (0 non-cacheable, 1 cacheable;
// 3 would be "prefetchable", which Linux turns into IORESOURCE_PREFETCH and then refuses to
// place non-prefetchable BARs in). WordIO type flags 3: ISA and non-ISA ranges (EntireRange).
constexpr uint8_t kMemNonCacheableRw = 0x01;
constexpr uint8_t kMemCacheableRw = 0x03;
constexpr uint8_t kIoEntireRange = 0x03;

Bytes BuildPci0(const AcpiConfig& cfg) {
  const pci::PciWindows& w = cfg.pci_windows;
  Bytes crs;
  ResWord(crs, kSpaceBus, 0, 0, cfg.ecam_end_bus);
  ResIo(crs, 0xCF8, 8);  // conf1 ports, consumed by the host bridge itself
  if (w.io_end > w.io_start)
    ResWord(crs, kSpaceIo, kIoEntireRange, static_cast<uint16_t>(w.io_start),
            static_cast<uint16_t>(w.io_end - 1));
  if (w.mmio32_end > w.mmio32_start)
    ResDWordMemory(crs, kMemNonCacheableRw, static_cast<uint32_t>(w.mmio32_start),
                   static_cast<uint32_t>(w.mmio32_end - 1));
  // Cacheable like QEMU's 64-bit hole; for Linux that is still a non-prefetchable window.
  if (w.mmio64_end > w.mmio64_start)
    ResQWordMemory(crs, kMemCacheableRw, w.mmio64_start, w.mmio64_end - 1);

  Bytes body;
  Append(body, aml::Name("_HID", AmlEisaId("PNP0A08")));  // PCI Express root bridge
  Append(body, aml::Name("_CID", AmlEisaId("PNP0A03")));  // PCI root bridge
  Append(body, aml::Name("_SEG", aml::Integer(0)));
  Append(body, aml::Name("_BBN", aml::Integer(0)));
  Append(body, aml::Name("_UID", aml::Integer(0)));
  Append(body, aml::Name("_CRS", aml::ResourceTemplate(std::move(crs))));
  // _PRT (ACPI 6.0 §6.2.13): INTx routing of every slot and pin of bus 0, even though virtio
  // devices use MSI-X only — a passthrough function may fall back to INTx. Each entry is
  // Package { Address = slot << 16 | 0xFFFF (any function), Pin (0 = INTA#), Source = 0 (a
  // hard-wired GSI, no link device), Source Index = GSI }. 32 x 4 = 128 entries.
  std::vector<Bytes> prt;
  for (uint32_t slot = 0; slot < 32; ++slot) {
    for (uint32_t pin = 0; pin < 4; ++pin) {
      prt.push_back(aml::Package({aml::Integer((slot << 16) | 0xFFFF), aml::Integer(pin),
                                aml::Integer(0), aml::Integer(PciIntxGsi(slot, pin))}));
    }
  }
  Append(body, aml::Name("_PRT", aml::Package(prt)));
  return aml::Device("PCI0", body);
}

// Motherboard resources: the ECAM window. Linux (arch/x86/pci/mmconfig-shared.c) accepts MCFG
// regions reserved either in e820 or by a PNP0C02 _CRS; we provide both.
Bytes BuildMotherboardResources(const AcpiConfig& cfg) {
  Bytes crs;
  ResMemory32Fixed(crs, static_cast<uint32_t>(cfg.ecam_base),
                   static_cast<uint32_t>((uint64_t{cfg.ecam_end_bus} + 1) << 20));
  Bytes body;
  Append(body, aml::Name("_HID", AmlEisaId("PNP0C02")));
  Append(body, aml::Name("_UID", aml::Integer(0)));
  Append(body, aml::Name("_CRS", aml::ResourceTemplate(std::move(crs))));
  return aml::Device("MRES", body);
}

Bytes BuildCom1() {
  Bytes crs;
  ResIo(crs, 0x3F8, 8);
  ResIrq(crs, 4);
  Bytes body;
  Append(body, aml::Name("_HID", AmlEisaId("PNP0501")));  // 16550A-compatible
  Append(body, aml::Name("_UID", aml::Integer(0)));
  Append(body, aml::Name("_CRS", aml::ResourceTemplate(std::move(crs))));
  return aml::Device("COM1", body);
}

Bytes BuildDsdt(const AcpiConfig& cfg) {
  Bytes sb;
  Append(sb, BuildPci0(cfg));
  Append(sb, BuildMotherboardResources(cfg));
  if (cfg.com1) Append(sb, BuildCom1());
  Append(sb, cfg.sb_aml);
  Bytes b = TableHeader("DSDT", 2);  // revision 2: 64-bit AML integers
  Append(b, aml::Scope("\\_SB_", sb));
  return Finish(std::move(b));
}

absl::Status ValidateConfig(const AcpiConfig& cfg) {
  if (cfg.num_vcpus == 0 || cfg.num_vcpus > 254)
    return absl::InvalidArgumentError(
        absl::StrFormat("ACPI MADT supports 1..254 vCPUs (xAPIC IDs), got %d", cfg.num_vcpus));
  uint64_t ecam_size = (uint64_t{cfg.ecam_end_bus} + 1) << 20;
  if (cfg.ecam_base == 0 || cfg.ecam_base % (1 << 20) != 0 ||
      cfg.ecam_base + ecam_size > (1ULL << 32))
    return absl::InvalidArgumentError(absl::StrFormat(
        "ECAM base 0x%x must be MiB-aligned and the window below 4 GiB", cfg.ecam_base));
  const pci::PciWindows& w = cfg.pci_windows;
  if (w.io_end > 0x10000 || (w.io_end > w.io_start && w.io_start < 0xD00 && w.io_end > 0xCF8))
    return absl::InvalidArgumentError("PCI I/O window must be below 64 KiB, clear of 0xCF8-0xCFF");
  if (w.mmio32_end > (1ULL << 32))
    return absl::InvalidArgumentError("PCI 32-bit MMIO window ends above 4 GiB");
  return absl::OkStatus();
}

size_t AlignUp(size_t v, size_t a) { return (v + a - 1) & ~(a - 1); }

}  // namespace

uint32_t PciIntxGsi(uint32_t slot, uint32_t pin) {
  return kPciIntxFirstGsi + (slot + pin) % kPciIntxGsis;
}

uint32_t EisaId(const char (&id)[8]) {
  // Three letters as 5-bit values ('A' = 1) packed big-endian into 15 bits, then four hex digits;
  // stored so that the bytes in memory read: letters (2 bytes), then digits 1-2, digits 3-4.
  auto letter = [](char c) { return static_cast<uint32_t>(c - '@') & 0x1F; };
  auto hex = [](char c) -> uint32_t {
    return c <= '9' ? c - '0' : (c | 0x20) - 'a' + 10;
  };
  uint32_t letters = (letter(id[0]) << 10) | (letter(id[1]) << 5) | letter(id[2]);
  uint32_t digits = (hex(id[3]) << 12) | (hex(id[4]) << 8) | (hex(id[5]) << 4) | hex(id[6]);
  uint8_t bytes[4] = {static_cast<uint8_t>(letters >> 8), static_cast<uint8_t>(letters),
                      static_cast<uint8_t>(digits >> 8), static_cast<uint8_t>(digits)};
  uint32_t v;
  std::memcpy(&v, bytes, 4);
  return v;
}

absl::StatusOr<std::vector<uint8_t>> BuildAcpiTables(const AcpiConfig& cfg, uint64_t base) {
  if (absl::Status s = ValidateConfig(cfg); !s.ok()) return s;
  if (base % 16 != 0 || base >= (1ULL << 32))
    return absl::InvalidArgumentError("ACPI tables must start 16-byte aligned below 4 GiB");
  // Address-independent tables first, then the ones that point at them.
  Bytes dsdt = BuildDsdt(cfg);
  Bytes madt = BuildMadt(cfg);
  Bytes mcfg = BuildMcfg(cfg);
  constexpr size_t kRsdpSize = 36;
  constexpr size_t kXsdtSize = kHeaderSize + 3 * 8;
  constexpr size_t kFadtSize = 276;
  size_t off_xsdt = AlignUp(kRsdpSize, 16);
  size_t off_fadt = AlignUp(off_xsdt + kXsdtSize, 16);
  size_t off_madt = AlignUp(off_fadt + kFadtSize, 16);
  size_t off_mcfg = AlignUp(off_madt + madt.size(), 16);
  size_t off_dsdt = AlignUp(off_mcfg + mcfg.size(), 16);
  size_t total = off_dsdt + dsdt.size();

  Bytes fadt = BuildFadt(cfg, base + off_dsdt);
  Bytes xsdt = BuildXsdt({base + off_fadt, base + off_madt, base + off_mcfg});
  Bytes rsdp = BuildRsdp(base + off_xsdt);
  if (fadt.size() != kFadtSize || xsdt.size() != kXsdtSize || rsdp.size() != kRsdpSize)
    return absl::InternalError("ACPI table size mismatch");

  Bytes out(total, 0);
  auto place = [&out](size_t off, const Bytes& t) { std::memcpy(out.data() + off, t.data(), t.size()); };
  place(0, rsdp);
  place(off_xsdt, xsdt);
  place(off_fadt, fadt);
  place(off_madt, madt);
  place(off_mcfg, mcfg);
  place(off_dsdt, dsdt);
  return out;
}

absl::StatusOr<uint64_t> WriteAcpiTables(GuestMemory& mem, const AcpiConfig& cfg) {
  auto tables = BuildAcpiTables(cfg, layout::kAcpiStart);
  if (!tables.ok()) return tables.status();
  if (tables->size() > layout::kAcpiSize)
    return absl::InternalError(absl::StrFormat("ACPI tables (%d bytes) exceed their %d-byte area",
                                               tables->size(), layout::kAcpiSize));
  if (absl::Status s = mem.Write(layout::kAcpiStart, tables->data(), tables->size()); !s.ok())
    return s;
  return layout::kAcpiStart;
}

}  // namespace microvmm
