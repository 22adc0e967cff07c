#include "vmm/boot/x86_setup.h"

#include <cpuid.h>

#include <algorithm>

#include "vmm/boot/layout.h"
#include "vmm/pci/bar_allocator.h"

namespace microvmm {
namespace {

// GDT entry: base, limit, flags in the 12-bit "access + flags" packing used by Firecracker
// and the Linux boot code (flags << 8 | access).
constexpr uint64_t GdtEntry(uint16_t flags, uint32_t base, uint32_t limit) {
  return ((uint64_t{base} & 0xff000000ULL) << 32) | ((uint64_t{flags} & 0xf0ffULL) << 40) |
         ((uint64_t{limit} & 0x000f0000ULL) << 32) | ((uint64_t{base} & 0x00ffffffULL) << 16) |
         (uint64_t{limit} & 0x0000ffffULL);
}

constexpr uint64_t kGdtTable[] = {
    0,                                 // null
    0,                                 // null
    GdtEntry(0xa09b, 0, 0xfffff),      // 0x10: 64-bit code, present, accessed
    GdtEntry(0xc093, 0, 0xfffff),      // 0x18: data, 4 KiB granular, accessed
};
constexpr uint64_t kGdt32Code = GdtEntry(0xc09b, 0, 0xfffff);  // 32-bit code for PVH

kvm_segment SegmentFromGdt(uint64_t entry, uint16_t selector) {
  kvm_segment s{};
  s.base = ((entry >> 16) & 0xffffff) | (((entry >> 56) & 0xff) << 24);
  uint32_t limit = (entry & 0xffff) | (((entry >> 48) & 0xf) << 16);
  s.g = (entry >> 55) & 1;
  s.limit = s.g ? (limit << 12) | 0xfff : limit;
  s.selector = selector;
  s.type = (entry >> 40) & 0xf;
  s.present = (entry >> 47) & 1;
  s.dpl = (entry >> 45) & 3;
  s.db = (entry >> 54) & 1;
  s.s = (entry >> 44) & 1;
  s.l = (entry >> 53) & 1;
  s.avl = (entry >> 52) & 1;
  s.unusable = s.present ? 0 : 1;
  return s;
}

constexpr uint64_t kCr0Pe = 1ULL << 0;
constexpr uint64_t kCr0Et = 1ULL << 4;
constexpr uint64_t kCr0Nw = 1ULL << 29;
constexpr uint64_t kCr0Cd = 1ULL << 30;
constexpr uint64_t kCr0Pg = 1ULL << 31;
constexpr uint64_t kCr4Pae = 1ULL << 5;
constexpr uint64_t kEferLme = 1ULL << 8;
constexpr uint64_t kEferLma = 1ULL << 10;

void SetFlatSegments(kvm_sregs& sregs, uint64_t code_entry) {
  sregs.gdt.base = layout::kGdt;
  sregs.gdt.limit = sizeof(kGdtTable) - 1;
  sregs.idt.base = layout::kIdt;
  sregs.idt.limit = 0;  // any exception before the guest sets an IDT triple-faults: loud
  sregs.cs = SegmentFromGdt(code_entry, layout::kCodeSelector);
  kvm_segment data = SegmentFromGdt(kGdtTable[3], layout::kDataSelector);
  sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data;
  // A valid busy 64-bit TSS descriptor is required by VMX even if never used.
  sregs.tr.base = 0;
  sregs.tr.limit = 0xfff;
  sregs.tr.type = 11;
  sregs.tr.present = 1;
  sregs.tr.s = 0;
  sregs.tr.selector = 0;
  sregs.ldt.unusable = 1;
  sregs.ldt.type = 2;
  sregs.ldt.present = 1;
}

}  // namespace

absl::Status WriteBootTables(GuestMemory& mem) {
  if (absl::Status s = mem.Write(layout::kGdt, kGdtTable, sizeof(kGdtTable)); !s.ok()) return s;
  uint64_t zero_idt = 0;
  if (absl::Status s = mem.WriteObj(layout::kIdt, zero_idt); !s.ok()) return s;
  // PML4[0] -> PDPT; PDPT[0..3] -> 4 PDs; each PD maps 1 GiB with 2 MiB pages.
  constexpr uint64_t kPresentRw = 0x3;
  constexpr uint64_t kHuge = 0x80;
  if (absl::Status s = mem.WriteObj<uint64_t>(layout::kPml4, layout::kPdpt | kPresentRw); !s.ok())
    return s;
  for (uint64_t i = 0; i < 4; ++i) {
    uint64_t pd = layout::kPd + i * 0x1000;
    if (absl::Status s = mem.WriteObj<uint64_t>(layout::kPdpt + i * 8, pd | kPresentRw); !s.ok())
      return s;
    uint64_t entries[512];
    for (uint64_t j = 0; j < 512; ++j)
      entries[j] = ((i << 30) + (j << 21)) | kPresentRw | kHuge;
    if (absl::Status s = mem.Write(pd, entries, sizeof(entries)); !s.ok()) return s;
  }
  return absl::OkStatus();
}

void SetupLongModeSregs(kvm_sregs& sregs) {
  SetFlatSegments(sregs, kGdtTable[2]);
  sregs.cr3 = layout::kPml4;
  sregs.cr4 |= kCr4Pae;
  sregs.cr0 = (sregs.cr0 | kCr0Pe | kCr0Et | kCr0Pg) & ~(kCr0Cd | kCr0Nw);
  sregs.efer |= kEferLme | kEferLma;
}

void SetupProtectedModeSregs(kvm_sregs& sregs) {
  SetFlatSegments(sregs, kGdt32Code);
  sregs.cr0 = (sregs.cr0 | kCr0Pe | kCr0Et) & ~(kCr0Pg | kCr0Cd | kCr0Nw);
  sregs.cr4 = 0;
  sregs.efer = 0;
}

CpuidTable BuildVcpuCpuid(const CpuidTable& supported, uint32_t vcpu_id, uint32_t num_vcpus) {
  CpuidTable t = supported;
  for (kvm_cpuid_entry2& e : t.entries()) {
    switch (e.function) {
      case 0x1:
        // EBX[31:24] initial APIC ID, EBX[23:16] logical processors per package.
        e.ebx = (e.ebx & 0x0000ffff) | (vcpu_id << 24) | ((num_vcpus & 0xff) << 16);
        e.ecx |= 1U << 31;  // running under a hypervisor
        if (num_vcpus > 1)
          e.edx |= 1U << 28;  // HTT: the EBX[23:16] field is valid
        else
          e.edx &= ~(1U << 28);
        break;
      case 0x4: {
        // Deterministic cache parameters: EAX[31:26] = cores per package - 1; each cache is
        // shared by one thread (EAX[25:14] = 0).
        uint32_t cores = num_vcpus > 64 ? 63 : num_vcpus - 1;
        e.eax = (e.eax & 0x3fff) | (cores << 26);
        break;
      }
      default:
        break;
    }
  }
  // Extended topology (leaf 0xB): KVM reports only an empty subleaf 0, so build the levels here:
  // subleaf 0 = SMT (1 thread per core), 1 = core (all vCPUs in one package), 2 = invalid.
  kvm_cpuid_entry2* leaf0 = t.Find(0);
  if (leaf0 != nullptr && leaf0->eax >= 0xb) {
    auto& es = t.entries();
    auto is_b = [](const kvm_cpuid_entry2& e) { return e.function == 0xb; };
    size_t pos = std::find_if(es.begin(), es.end(), is_b) - es.begin();
    es.erase(std::remove_if(es.begin(), es.end(), is_b), es.end());
    pos = std::min(pos, es.size());
    std::vector<kvm_cpuid_entry2> levels;
    uint32_t shift = 0;
    while ((1U << shift) < num_vcpus) ++shift;
    for (uint32_t sub = 0; sub < 3; ++sub) {
      kvm_cpuid_entry2 e{};
      e.function = 0xb;
      e.index = sub;
      e.flags = KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
      e.edx = vcpu_id;
      if (sub == 0) {
        e.eax = 0;
        e.ebx = 1;
        e.ecx = (1 << 8) | 0;  // SMT level
      } else if (sub == 1) {
        e.eax = shift;
        e.ebx = num_vcpus;
        e.ecx = (2 << 8) | 1;  // core level
      } else {
        e.ecx = sub;  // invalid level terminates the enumeration
      }
      levels.push_back(e);
    }
    es.insert(es.begin() + pos, levels.begin(), levels.end());
  }
  return t;
}

std::vector<kvm_msr_entry> BootMsrs() {
  auto msr = [](uint32_t index, uint64_t data) {
    kvm_msr_entry e{};
    e.index = index;
    e.data = data;
    return e;
  };
  return {
      msr(0x174, 0),           // IA32_SYSENTER_CS
      msr(0x175, 0),           // IA32_SYSENTER_ESP
      msr(0x176, 0),           // IA32_SYSENTER_EIP
      msr(0xc0000081, 0),      // STAR
      msr(0xc0000082, 0),      // LSTAR
      msr(0xc0000083, 0),      // CSTAR
      msr(0xc0000084, 0),      // SYSCALL_MASK
      msr(0xc0000102, 0),      // KERNEL_GS_BASE
      msr(0x10, 0),            // TSC
      msr(0x1a0, 1),           // IA32_MISC_ENABLE: fast strings
  };
}

kvm_fpu BootFpu() {
  kvm_fpu fpu{};
  fpu.fcw = 0x37f;
  fpu.mxcsr = 0x1f80;
  return fpu;
}

std::vector<E820Entry> BuildE820(uint64_t ram_bytes) {
  std::vector<E820Entry> out;
  static_assert(layout::kEbdaStart < layout::kAcpiStart &&
                layout::kAcpiStart + layout::kAcpiSize <= layout::kHighMemStart);
  static_assert(pci::kEcamBase >= kMmioGapStart && pci::kEcamBase + pci::kEcamSize <= kMmioGapEnd);
  bool ecam_done = false;
  auto add_ecam = [&] {
    out.push_back({pci::kEcamBase, pci::kEcamSize, kE820Reserved});
    ecam_done = true;
  };
  for (const RamRange& r : RamLayout(ram_bytes)) {
    if (r.gpa >= kMmioGapEnd && !ecam_done) add_ecam();  // keep the map sorted
    if (r.gpa == 0) {
      out.push_back({0, layout::kEbdaStart, kE820Ram});
      out.push_back({layout::kEbdaStart, layout::kAcpiStart - layout::kEbdaStart, kE820Reserved});
      out.push_back({layout::kAcpiStart, layout::kAcpiSize, kE820Acpi});
      uint64_t acpi_end = layout::kAcpiStart + layout::kAcpiSize;
      out.push_back({acpi_end, layout::kHighMemStart - acpi_end, kE820Reserved});
      if (r.size > layout::kHighMemStart)
        out.push_back({layout::kHighMemStart, r.size - layout::kHighMemStart, kE820Ram});
    } else {
      out.push_back({r.gpa, r.size, kE820Ram});
    }
  }
  if (!ecam_done) add_ecam();
  return out;
}

}  // namespace microvmm
