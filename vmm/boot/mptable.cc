#include "vmm/boot/mptable.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "vmm/boot/acpi.h"
#include "vmm/boot/layout.h"

namespace microvmm {
namespace {

#pragma pack(push, 1)
struct MpFloating {
  char signature[4];  // "_MP_"
  uint32_t physptr;
  uint8_t length;     // in 16-byte units
  uint8_t spec_rev;
  uint8_t checksum;
  uint8_t feature[5];
};
struct MpConfigHeader {
  char signature[4];  // "PCMP"
  uint16_t length;
  uint8_t spec_rev;
  uint8_t checksum;
  char oem[8];
  char product[12];
  uint32_t oem_ptr;
  uint16_t oem_size;
  uint16_t entry_count;
  uint32_t lapic;
  uint16_t ext_length;
  uint8_t ext_checksum;
  uint8_t reserved;
};
struct MpProcessor {
  uint8_t type;  // 0
  uint8_t apic_id;
  uint8_t apic_ver;
  uint8_t cpu_flags;  // 1 enabled, 2 bootstrap processor
  uint32_t signature;
  uint32_t feature_flags;
  uint32_t reserved[2];
};
struct MpBus {
  uint8_t type;  // 1
  uint8_t bus_id;
  char bus_type[6];
};
struct MpIoapic {
  uint8_t type;  // 2
  uint8_t apic_id;
  uint8_t apic_ver;
  uint8_t flags;  // 1 usable
  uint32_t addr;
};
struct MpIntSrc {
  uint8_t type;  // 3 io interrupt, 4 local interrupt
  uint8_t irq_type;  // 0 INT, 1 NMI, 3 ExtINT
  uint16_t irq_flags;
  uint8_t src_bus;
  uint8_t src_irq;
  uint8_t dst_apic;
  uint8_t dst_pin;
};
#pragma pack(pop)
static_assert(sizeof(MpFloating) == 16 && sizeof(MpConfigHeader) == 44 &&
              sizeof(MpProcessor) == 20 && sizeof(MpBus) == 8 && sizeof(MpIoapic) == 8 &&
              sizeof(MpIntSrc) == 8);

uint8_t Checksum(const uint8_t* p, size_t n) {
  uint8_t sum = 0;
  for (size_t i = 0; i < n; ++i) sum += p[i];
  return static_cast<uint8_t>(-sum);
}

template <typename T>
void Append(std::vector<uint8_t>& out, const T& v) {
  const uint8_t* p = reinterpret_cast<const uint8_t*>(&v);
  out.insert(out.end(), p, p + sizeof(T));
}

}  // namespace

std::vector<uint8_t> BuildMpTable(uint32_t num_vcpus, uint64_t base) {
  const uint8_t ioapic_id = static_cast<uint8_t>(num_vcpus);  // after the LAPIC IDs
  std::vector<uint8_t> body;
  uint16_t count = 0;
  for (uint32_t i = 0; i < num_vcpus; ++i, ++count) {
    MpProcessor p{};
    p.apic_id = static_cast<uint8_t>(i);
    p.apic_ver = 0x14;
    p.cpu_flags = 1 | (i == 0 ? 2 : 0);
    p.signature = 0x600;  // family 6
    p.feature_flags = (1 << 0) | (1 << 9);  // FPU, APIC
    Append(body, p);
  }
  // Bus ids: a consumer matches an interrupt entry of a PCI bus by comparing its bus id with the
  // PCI bus number (Linux IO_APIC_get_PCI_irq_vector: `bus != srcbus`), so our root bus 0 must be
  // MP bus 0 ("PCI   "); the ISA bus takes the next id.
  for (const auto& [id, type] : {std::pair{kMpPciBus, "PCI   "}, std::pair{kMpIsaBus, "ISA   "}}) {
    MpBus bus{};
    bus.type = 1;
    bus.bus_id = id;
    std::memcpy(bus.bus_type, type, 6);
    Append(body, bus);
    ++count;
  }
  MpIoapic io{};
  io.type = 2;
  io.apic_id = ioapic_id;
  io.apic_ver = 0x11;
  io.flags = 1;
  io.addr = kIoapicAddr;
  Append(body, io);
  ++count;
  for (int pin = 0; pin < 16; ++pin, ++count) {
    MpIntSrc s{};
    s.type = 3;
    s.irq_type = 0;
    s.irq_flags = 0;  // conforms to bus: ISA = edge, active high
    s.src_bus = kMpIsaBus;
    s.src_irq = static_cast<uint8_t>(pin);
    s.dst_apic = ioapic_id;
    s.dst_pin = static_cast<uint8_t>(pin);
    Append(body, s);
  }
  // INTx of every slot and pin of PCI bus 0, as the DSDT's _PRT routes them (acpi=off guests
  // and kernels without ACPI use this): MP spec 4.3.4, a PCI source IRQ is (device << 2) | pin
  // (0..3 = INTA#..INTD#); PCI interrupts are level-triggered, active low (flags: polarity
  // bits 1:0 = 3 active low, trigger mode bits 3:2 = 3 level).
  for (uint32_t slot = 0; slot < kMpPciSlots; ++slot) {
    for (uint32_t pin = 0; pin < 4; ++pin, ++count) {
      MpIntSrc s{};
      s.type = 3;
      s.irq_type = 0;
      s.irq_flags = 0x3 | (0x3 << 2);
      s.src_bus = kMpPciBus;
      s.src_irq = static_cast<uint8_t>((slot << 2) | pin);
      s.dst_apic = ioapic_id;
      s.dst_pin = static_cast<uint8_t>(PciIntxGsi(slot, pin));
      Append(body, s);
    }
  }
  MpIntSrc lint0{4, 3, 0, 0, 0, 0xff, 0};  // ExtINT -> LINT0 of every LAPIC
  MpIntSrc lint1{4, 1, 0, 0, 0, 0xff, 1};  // NMI -> LINT1
  Append(body, lint0);
  Append(body, lint1);
  count += 2;

  MpConfigHeader h{};
  std::memcpy(h.signature, "PCMP", 4);
  h.length = sizeof(MpConfigHeader) + body.size();
  h.spec_rev = 4;
  std::memcpy(h.oem, "MICROVMM", 8);
  std::memcpy(h.product, "000000000000", 12);
  h.entry_count = count;
  h.lapic = kLapicAddr;

  std::vector<uint8_t> table;
  MpFloating fp{};
  std::memcpy(fp.signature, "_MP_", 4);
  fp.physptr = static_cast<uint32_t>(base + sizeof(MpFloating));
  fp.length = 1;
  fp.spec_rev = 4;
  fp.checksum = Checksum(reinterpret_cast<uint8_t*>(&fp), sizeof(fp));
  Append(table, fp);
  size_t hdr_off = table.size();
  Append(table, h);
  table.insert(table.end(), body.begin(), body.end());
  table[hdr_off + offsetof(MpConfigHeader, checksum)] =
      Checksum(table.data() + hdr_off, table.size() - hdr_off);
  return table;
}

absl::Status WriteMpTable(GuestMemory& mem, uint32_t num_vcpus) {
  if (num_vcpus == 0 || num_vcpus >= 255)
    return absl::InvalidArgumentError(
        absl::StrCat("MP table supports 1..254 vCPUs, got ", num_vcpus));
  std::vector<uint8_t> t = BuildMpTable(num_vcpus, layout::kEbdaStart);
  if (layout::kEbdaStart + t.size() > layout::kAcpiStart)  // the ACPI tables follow
    return absl::InvalidArgumentError("MP table too large for the EBDA");
  return mem.Write(layout::kEbdaStart, t.data(), t.size());
}

}  // namespace microvmm
