#include "vmm/kvm/kvm.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/ioctl.h>

#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "vmm/base/log.h"
#include "vmm/throttle_wake.h"

namespace microvmm {


namespace {
template <typename T>
absl::Status Ioctl(int fd, unsigned long req, T arg, absl::string_view what) {
  if (::ioctl(fd, req, arg) < 0) return ErrnoStatus(errno, what);
  return absl::OkStatus();
}
}  // namespace

kvm_cpuid_entry2* CpuidTable::Find(uint32_t function, uint32_t index) {
  for (auto& e : entries_) {
    if (e.function != function) continue;
    if ((e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX) && e.index != index) continue;
    return &e;
  }
  return nullptr;
}

std::vector<uint8_t> CpuidTable::ToKvm() const {
  std::vector<uint8_t> buf(sizeof(kvm_cpuid2) + entries_.size() * sizeof(kvm_cpuid_entry2));
  auto* c = reinterpret_cast<kvm_cpuid2*>(buf.data());
  c->nent = entries_.size();
  if (!entries_.empty())
    std::memcpy(c->entries, entries_.data(), entries_.size() * sizeof(kvm_cpuid_entry2));
  return buf;
}

absl::StatusOr<Kvm> Kvm::Open(const char* path) {
  ScopedFd fd(::open(path, O_RDWR | O_CLOEXEC));
  if (!fd.valid()) return ErrnoStatus(errno, absl::StrCat("open ", path));
  int v = ::ioctl(fd.get(), KVM_GET_API_VERSION, 0);
  if (v != KVM_API_VERSION)
    return absl::FailedPreconditionError(
        absl::StrCat("KVM API version ", v, ", expected ", KVM_API_VERSION));
  return Kvm(std::move(fd));
}

int Kvm::CheckExtension(long cap) const { return ::ioctl(fd_.get(), KVM_CHECK_EXTENSION, cap); }

absl::StatusOr<int> Kvm::VcpuMmapSize() const {
  int n = ::ioctl(fd_.get(), KVM_GET_VCPU_MMAP_SIZE, 0);
  if (n <= 0) return ErrnoStatus(errno, "KVM_GET_VCPU_MMAP_SIZE");
  return n;
}

absl::StatusOr<CpuidTable> Kvm::GetSupportedCpuid() const {
  for (size_t n = 64; n <= 4096; n *= 2) {
    std::vector<uint8_t> buf(sizeof(kvm_cpuid2) + n * sizeof(kvm_cpuid_entry2));
    auto* c = reinterpret_cast<kvm_cpuid2*>(buf.data());
    c->nent = n;
    if (::ioctl(fd_.get(), KVM_GET_SUPPORTED_CPUID, c) == 0) {
      return CpuidTable(std::vector<kvm_cpuid_entry2>(c->entries, c->entries + c->nent));
    }
    if (errno != E2BIG) return ErrnoStatus(errno, "KVM_GET_SUPPORTED_CPUID");
  }
  return absl::InternalError("KVM_GET_SUPPORTED_CPUID: table too large");
}

absl::StatusOr<std::vector<uint32_t>> Kvm::GetMsrIndexList() const {
  kvm_msr_list probe{};
  probe.nmsrs = 0;
  if (::ioctl(fd_.get(), KVM_GET_MSR_INDEX_LIST, &probe) < 0 && errno != E2BIG)
    return ErrnoStatus(errno, "KVM_GET_MSR_INDEX_LIST");
  std::vector<uint8_t> buf(sizeof(kvm_msr_list) + probe.nmsrs * sizeof(uint32_t));
  auto* l = reinterpret_cast<kvm_msr_list*>(buf.data());
  l->nmsrs = probe.nmsrs;
  if (::ioctl(fd_.get(), KVM_GET_MSR_INDEX_LIST, l) < 0)
    return ErrnoStatus(errno, "KVM_GET_MSR_INDEX_LIST");
  return std::vector<uint32_t>(l->indices, l->indices + l->nmsrs);
}

absl::StatusOr<KvmVm> KvmVm::Create(const Kvm& kvm) {
  int fd;
  do {
    fd = ::ioctl(kvm.fd(), KVM_CREATE_VM, 0);
  } while (fd < 0 && errno == EINTR);
  if (fd < 0) return ErrnoStatus(errno, "KVM_CREATE_VM");
  return KvmVm(ScopedFd(fd));
}

int KvmVm::CheckExtension(long cap) const { return ::ioctl(fd_.get(), KVM_CHECK_EXTENSION, cap); }

absl::Status KvmVm::SetTssAddr(uint64_t addr) {
  return Ioctl(fd_.get(), KVM_SET_TSS_ADDR, static_cast<unsigned long>(addr), "KVM_SET_TSS_ADDR");
}

absl::Status KvmVm::SetIdentityMapAddr(uint64_t addr) {
  return Ioctl(fd_.get(), KVM_SET_IDENTITY_MAP_ADDR, &addr, "KVM_SET_IDENTITY_MAP_ADDR");
}

absl::Status KvmVm::CreateIrqchip() {
  return Ioctl(fd_.get(), KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP");
}

absl::Status KvmVm::CreatePit2() {
  kvm_pit_config cfg{};
  cfg.flags = KVM_PIT_SPEAKER_DUMMY;
  return Ioctl(fd_.get(), KVM_CREATE_PIT2, &cfg, "KVM_CREATE_PIT2");
}

absl::Status KvmVm::SetUserMemoryRegion(uint32_t slot, uint32_t flags, uint64_t gpa,
                                        uint64_t size, void* host) {
  kvm_userspace_memory_region r{};
  r.slot = slot;
  r.flags = flags;
  r.guest_phys_addr = gpa;
  r.memory_size = size;
  r.userspace_addr = reinterpret_cast<uint64_t>(host);
  return Ioctl(fd_.get(), KVM_SET_USER_MEMORY_REGION, &r, "KVM_SET_USER_MEMORY_REGION");
}

absl::Status KvmVm::SetUserMemoryRegion2(uint32_t slot, uint32_t flags, uint64_t gpa,
                                         uint64_t size, void* host,
                                         const void* userfault_bitmap) {
  kvm_userspace_memory_region2_uf r{};
  r.slot = slot;
  r.flags = flags;
  r.guest_phys_addr = gpa;
  r.memory_size = size;
  r.userspace_addr = reinterpret_cast<uint64_t>(host);
  r.userfault_bitmap = reinterpret_cast<uint64_t>(userfault_bitmap);
  return Ioctl(fd_.get(), MICROVMM_KVM_SET_USER_MEMORY_REGION2, &r,
               absl::StrCat("KVM_SET_USER_MEMORY_REGION2 slot ", slot, " flags 0x",
                            absl::Hex(flags)));
}

absl::Status KvmVm::IrqLine(uint32_t irq, bool level) {
  kvm_irq_level l{};
  l.irq = irq;
  l.level = level ? 1 : 0;
  absl::Status s = Ioctl(fd_.get(), KVM_IRQ_LINE, &l, "KVM_IRQ_LINE");
  if (level) NoteInterruptRaised();  // wakes a throttled vCPU sleeping outside KVM_RUN
  return s;
}

absl::Status KvmVm::EnableCap(uint32_t cap, uint64_t arg0) {
  kvm_enable_cap c{};
  c.cap = cap;
  c.args[0] = arg0;
  return Ioctl(fd_.get(), KVM_ENABLE_CAP, &c, "KVM_ENABLE_CAP");
}

absl::StatusOr<ScopedFd> KvmVm::CreateVcpu(int id) {
  int fd = ::ioctl(fd_.get(), KVM_CREATE_VCPU, static_cast<unsigned long>(id));
  if (fd < 0) return ErrnoStatus(errno, absl::StrCat("KVM_CREATE_VCPU ", id));
  return ScopedFd(fd);
}

absl::StatusOr<KvmVcpu> KvmVcpu::Create(const Kvm& kvm, const KvmVm& vm, int id) {
  auto size = kvm.VcpuMmapSize();
  if (!size.ok()) return size.status();
  auto fd = const_cast<KvmVm&>(vm).CreateVcpu(id);
  if (!fd.ok()) return fd.status();
  void* p = ::mmap(nullptr, *size, PROT_READ | PROT_WRITE, MAP_SHARED, fd->get(), 0);
  if (p == MAP_FAILED) return ErrnoStatus(errno, "mmap kvm_run");
  return KvmVcpu(std::move(*fd), ScopedMmap(p, *size), id);
}

int KvmVcpu::Run() {
  if (::ioctl(fd_.get(), KVM_RUN, 0) < 0) return -errno;
  return 0;
}

#define VCPU_GET(Type, Req, Name)                               \
  absl::StatusOr<Type> KvmVcpu::Name() const {                  \
    Type v{};                                                   \
    if (::ioctl(fd_.get(), Req, &v) < 0) return ErrnoStatus(errno, #Req); \
    return v;                                                   \
  }
#define VCPU_SET(Type, Req, Name)                               \
  absl::Status KvmVcpu::Name(const Type& v) {                   \
    return Ioctl(fd_.get(), Req, &v, #Req);                     \
  }
VCPU_GET(kvm_regs, KVM_GET_REGS, GetRegs)
VCPU_SET(kvm_regs, KVM_SET_REGS, SetRegs)
VCPU_GET(kvm_sregs, KVM_GET_SREGS, GetSregs)
VCPU_SET(kvm_sregs, KVM_SET_SREGS, SetSregs)
VCPU_GET(kvm_fpu, KVM_GET_FPU, GetFpu)
VCPU_SET(kvm_fpu, KVM_SET_FPU, SetFpu)
VCPU_GET(kvm_lapic_state, KVM_GET_LAPIC, GetLapic)
VCPU_SET(kvm_lapic_state, KVM_SET_LAPIC, SetLapic)
VCPU_GET(kvm_mp_state, KVM_GET_MP_STATE, GetMpState)
VCPU_GET(kvm_xcrs, KVM_GET_XCRS, GetXcrs)
VCPU_SET(kvm_xcrs, KVM_SET_XCRS, SetXcrs)
VCPU_GET(kvm_vcpu_events, KVM_GET_VCPU_EVENTS, GetEvents)
VCPU_SET(kvm_vcpu_events, KVM_SET_VCPU_EVENTS, SetEvents)
VCPU_GET(kvm_debugregs, KVM_GET_DEBUGREGS, GetDebugRegs)
VCPU_SET(kvm_debugregs, KVM_SET_DEBUGREGS, SetDebugRegs)
#undef VCPU_GET
#undef VCPU_SET

absl::Status KvmVcpu::SetMpState(uint32_t state) {
  kvm_mp_state s{};
  s.mp_state = state;
  return Ioctl(fd_.get(), KVM_SET_MP_STATE, &s, "KVM_SET_MP_STATE");
}

absl::Status KvmVcpu::SetCpuid(const CpuidTable& cpuid) {
  auto buf = cpuid.ToKvm();
  return Ioctl(fd_.get(), KVM_SET_CPUID2, buf.data(), "KVM_SET_CPUID2");
}

absl::Status KvmVcpu::SetMsrs(const std::vector<kvm_msr_entry>& msrs) {
  std::vector<uint8_t> buf(sizeof(kvm_msrs) + msrs.size() * sizeof(kvm_msr_entry));
  auto* m = reinterpret_cast<kvm_msrs*>(buf.data());
  m->nmsrs = msrs.size();
  if (!msrs.empty()) std::memcpy(m->entries, msrs.data(), msrs.size() * sizeof(kvm_msr_entry));
  int n = ::ioctl(fd_.get(), KVM_SET_MSRS, m);
  if (n < 0) return ErrnoStatus(errno, "KVM_SET_MSRS");
  if (static_cast<size_t>(n) != msrs.size())
    return absl::InternalError(absl::StrCat("KVM_SET_MSRS: only ", n, " of ", msrs.size(),
                                            " MSRs set; first rejected index 0x",
                                            absl::Hex(msrs[n].index)));
  return absl::OkStatus();
}

absl::StatusOr<std::vector<kvm_msr_entry>> KvmVcpu::GetMsrs(
    const std::vector<uint32_t>& indices) const {
  std::vector<uint8_t> buf(sizeof(kvm_msrs) + indices.size() * sizeof(kvm_msr_entry));
  auto* m = reinterpret_cast<kvm_msrs*>(buf.data());
  m->nmsrs = indices.size();
  for (size_t i = 0; i < indices.size(); ++i) m->entries[i].index = indices[i];
  int n = ::ioctl(fd_.get(), KVM_GET_MSRS, m);
  if (n < 0) return ErrnoStatus(errno, "KVM_GET_MSRS");
  return std::vector<kvm_msr_entry>(m->entries, m->entries + n);
}

}  // namespace microvmm

namespace microvmm {

absl::StatusOr<std::string> KvmVcpu::GetXsave(int xsave2_size) const {
  size_t size = std::max<size_t>(sizeof(kvm_xsave), xsave2_size > 0 ? xsave2_size : 0);
  std::string buf(size, '\0');
  unsigned long req = size > sizeof(kvm_xsave) ? KVM_GET_XSAVE2 : KVM_GET_XSAVE;
  if (::ioctl(fd_.get(), req, buf.data()) < 0) return ErrnoStatus(errno, "KVM_GET_XSAVE");
  return buf;
}

absl::Status KvmVcpu::SetXsave(const std::string& xsave) {
  if (xsave.size() < sizeof(kvm_xsave))
    return absl::InvalidArgumentError("saved xsave area is too small");
  std::string copy = xsave;
  return Ioctl(fd_.get(), KVM_SET_XSAVE, copy.data(), "KVM_SET_XSAVE");
}

uint32_t KvmVcpu::GetTscKhz() const {
  int r = ::ioctl(fd_.get(), KVM_GET_TSC_KHZ, 0);
  return r > 0 ? static_cast<uint32_t>(r) : 0;
}

absl::Status KvmVcpu::SetTscKhz(uint32_t khz) {
  return Ioctl(fd_.get(), KVM_SET_TSC_KHZ, static_cast<unsigned long>(khz), "KVM_SET_TSC_KHZ");
}

absl::StatusOr<kvm_irqchip> KvmVm::GetIrqchip(uint32_t chip_id) const {
  kvm_irqchip c{};
  c.chip_id = chip_id;
  if (::ioctl(fd_.get(), KVM_GET_IRQCHIP, &c) < 0) return ErrnoStatus(errno, "KVM_GET_IRQCHIP");
  return c;
}

absl::Status KvmVm::SetIrqchip(const kvm_irqchip& chip) {
  kvm_irqchip c = chip;
  return Ioctl(fd_.get(), KVM_SET_IRQCHIP, &c, "KVM_SET_IRQCHIP");
}

absl::StatusOr<kvm_pit_state2> KvmVm::GetPit2() const {
  kvm_pit_state2 p{};
  if (::ioctl(fd_.get(), KVM_GET_PIT2, &p) < 0) return ErrnoStatus(errno, "KVM_GET_PIT2");
  return p;
}

absl::Status KvmVm::SetPit2(const kvm_pit_state2& pit) {
  kvm_pit_state2 p = pit;
  return Ioctl(fd_.get(), KVM_SET_PIT2, &p, "KVM_SET_PIT2");
}

absl::StatusOr<kvm_clock_data> KvmVm::GetClock() const {
  kvm_clock_data c{};
  if (::ioctl(fd_.get(), KVM_GET_CLOCK, &c) < 0) return ErrnoStatus(errno, "KVM_GET_CLOCK");
  return c;
}

absl::Status KvmVm::SetClock(const kvm_clock_data& clock) {
  kvm_clock_data c{};
  c.clock = clock.clock;
  c.flags = 0;  // only the clock value is settable portably
  return Ioctl(fd_.get(), KVM_SET_CLOCK, &c, "KVM_SET_CLOCK");
}

}  // namespace microvmm

// ---- Interrupt routing and eventfds (KVM_SET_GSI_ROUTING, KVM_IRQFD, KVM_IOEVENTFD). ----
namespace microvmm {

absl::Status KvmVm::SetGsiRouting(const std::vector<kvm_irq_routing_entry>& entries) {
  // struct kvm_irq_routing ends in a flexible array: one buffer for header + entries.
  std::vector<uint8_t> buf(sizeof(kvm_irq_routing) +
                           entries.size() * sizeof(kvm_irq_routing_entry));
  auto* r = reinterpret_cast<kvm_irq_routing*>(buf.data());
  r->nr = entries.size();
  r->flags = 0;
  if (!entries.empty())
    std::memcpy(r->entries, entries.data(), entries.size() * sizeof(kvm_irq_routing_entry));
  return Ioctl(fd_.get(), KVM_SET_GSI_ROUTING, r, "KVM_SET_GSI_ROUTING");
}

namespace {
absl::Status IrqfdIoctl(int vm_fd, int fd, uint32_t gsi, uint32_t flags, const char* what,
                        int resample_fd = 0) {
  kvm_irqfd f{};
  f.fd = static_cast<uint32_t>(fd);
  f.gsi = gsi;
  f.flags = flags;
  f.resamplefd = static_cast<uint32_t>(resample_fd);  // with KVM_IRQFD_FLAG_RESAMPLE
  return Ioctl(vm_fd, KVM_IRQFD, &f, absl::StrCat(what, " gsi ", gsi));
}

absl::Status IoeventfdIoctl(int vm_fd, int fd, uint64_t addr, uint32_t len, bool pio,
                            std::optional<uint64_t> datamatch, bool deassign) {
  kvm_ioeventfd e{};
  e.addr = addr;
  e.len = len;
  e.fd = fd;
  if (pio) e.flags |= KVM_IOEVENTFD_FLAG_PIO;
  if (datamatch.has_value()) {
    e.flags |= KVM_IOEVENTFD_FLAG_DATAMATCH;
    e.datamatch = *datamatch;
  }
  if (deassign) e.flags |= KVM_IOEVENTFD_FLAG_DEASSIGN;
  return Ioctl(vm_fd, KVM_IOEVENTFD, &e,
               absl::StrCat(deassign ? "KVM_IOEVENTFD deassign " : "KVM_IOEVENTFD ",
                            pio ? "port 0x" : "mmio 0x", absl::Hex(addr), " len ", len));
}
}  // namespace

absl::Status KvmVm::AssignIrqfd(int fd, uint32_t gsi) {
  return IrqfdIoctl(fd_.get(), fd, gsi, 0, "KVM_IRQFD");
}

absl::Status KvmVm::AssignResampleIrqfd(int fd, int resample_fd, uint32_t gsi) {
  return IrqfdIoctl(fd_.get(), fd, gsi, KVM_IRQFD_FLAG_RESAMPLE, "KVM_IRQFD resample",
                    resample_fd);
}

absl::Status KvmVm::DeassignIrqfd(int fd, uint32_t gsi) {
  return IrqfdIoctl(fd_.get(), fd, gsi, KVM_IRQFD_FLAG_DEASSIGN, "KVM_IRQFD deassign");
}

absl::Status KvmVm::AssignIoeventfd(int fd, uint64_t addr, uint32_t len, bool pio,
                                    std::optional<uint64_t> datamatch) {
  return IoeventfdIoctl(fd_.get(), fd, addr, len, pio, datamatch, /*deassign=*/false);
}

absl::Status KvmVm::DeassignIoeventfd(int fd, uint64_t addr, uint32_t len, bool pio,
                                      std::optional<uint64_t> datamatch) {
  return IoeventfdIoctl(fd_.get(), fd, addr, len, pio, datamatch, /*deassign=*/true);
}

}  // namespace microvmm

// ---- KVM Userfault probe. ----
namespace microvmm {
namespace {

// Scratch guest: three pages at gpa 0; real-mode code on page 1 reads a byte from page 2 (the one
// marked missing) and halts.
constexpr uint64_t kProbePage = 0x1000;
constexpr uint64_t kProbeCode = 1 * kProbePage;
constexpr uint64_t kProbeData = 2 * kProbePage;
constexpr uint8_t kProbeByte = 0x5a;

// KVM_RUN, retrying signal interruptions (bounded: the probe must not hang on a broken KVM).
int ProbeRun(KvmVcpu& vcpu) {
  int r = -EINTR;
  for (int i = 0; i < 100 && (r == -EINTR || r == -EAGAIN); ++i) r = vcpu.Run();
  return r;
}

std::string DescribeExit(int r, const kvm_run* run) {
  if (r < 0 && r != -EFAULT && r != -EHWPOISON)
    return absl::StrCat("KVM_RUN failed: ", strerror(-r));
  return absl::StrCat("KVM_RUN returned ", r, " with exit reason ", run->exit_reason);
}

// The probe proper: absl error = could not even set up; OK(false) + *why = not supported.
absl::StatusOr<bool> ProbeUserfaultSteps(Kvm& kvm, std::string* why) {
  // The bitmap must outlive the memslot: declared before the VM, so destroyed after it.
  alignas(8) uint64_t bitmap = uint64_t{1} << (kProbeData / kProbePage);
  void* mem = ::mmap(nullptr, 3 * kProbePage, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (mem == MAP_FAILED) return ErrnoStatus(errno, "mmap probe memory");
  ScopedMmap guard(mem, 3 * kProbePage);
  auto* bytes = static_cast<uint8_t*>(mem);
  const uint8_t code[] = {0xa0, kProbeData & 0xff, kProbeData >> 8,  // mov al, [0x2000]
                          0xf4};                                      // hlt
  std::memcpy(bytes + kProbeCode, code, sizeof(code));
  bytes[kProbeData] = kProbeByte;

  auto vm = KvmVm::Create(kvm);
  if (!vm.ok()) return vm.status();
  if (vm->CheckExtension(KVM_CAP_USER_MEMORY2) <= 0) {
    *why = "KVM_CAP_USER_MEMORY2 not supported (no KVM_SET_USER_MEMORY_REGION2)";
    return false;
  }
  if (absl::Status s = vm->SetUserMemoryRegion2(0, KVM_MEM_USERFAULT, 0, 3 * kProbePage, mem,
                                                &bitmap);
      !s.ok()) {
    *why = absl::StrCat("memslot flag KVM_MEM_USERFAULT refused: ", s.message());
    return false;
  }
  // Real mode on VMX without unrestricted guest needs the TSS area; harmless elsewhere.
  if (absl::Status s = vm->SetTssAddr(0xfffbd000); !s.ok()) return s;
  auto vcpu = KvmVcpu::Create(kvm, *vm, 0);
  if (!vcpu.ok()) return vcpu.status();
  auto sregs = vcpu->GetSregs();
  if (!sregs.ok()) return sregs.status();
  sregs->cs.base = 0;
  sregs->cs.selector = 0;
  sregs->ds.base = 0;
  sregs->ds.selector = 0;
  if (absl::Status s = vcpu->SetSregs(*sregs); !s.ok()) return s;
  kvm_regs regs{};
  regs.rip = kProbeCode;
  regs.rflags = 0x2;
  if (absl::Status s = vcpu->SetRegs(regs); !s.ok()) return s;

  // 1. The access to the marked page must exit (KVM_RUN -1/EFAULT) as a userfault on that page.
  kvm_run* run = vcpu->run();
  int r = ProbeRun(*vcpu);
  const kvm_memory_fault_exit* f = KvmRunMemoryFault(run);
  if (r != -EFAULT || run->exit_reason != KVM_EXIT_MEMORY_FAULT) {
    *why = absl::StrCat("memslot accepted, but a read of a page marked missing gave ",
                        DescribeExit(r, run), " instead of KVM_EXIT_MEMORY_FAULT/EFAULT");
    return false;
  }
  if (!(f->flags & KVM_MEMORY_EXIT_FLAG_USERFAULT) || f->gpa > kProbeData ||
      f->gpa + f->size <= kProbeData) {
    *why = absl::StrFormat(
        "memory fault exit without the userfault flag or for the wrong page "
        "(flags 0x%x gpa 0x%x size 0x%x, expected gpa 0x%x)",
        f->flags, f->gpa, f->size, kProbeData);
    return false;
  }
  // 2. Once the bit is clear (store-release, as the series documents) the read must complete.
  __atomic_store_n(&bitmap, 0, __ATOMIC_RELEASE);
  r = ProbeRun(*vcpu);
  if (r != 0 || run->exit_reason != KVM_EXIT_HLT) {
    *why = absl::StrCat("userfault exit seen, but after clearing the bit the vCPU did not reach "
                        "HLT: ",
                        DescribeExit(r, run));
    return false;
  }
  auto after = vcpu->GetRegs();
  if (!after.ok()) return after.status();
  if ((after->rax & 0xff) != kProbeByte) {
    *why = absl::StrFormat("guest read 0x%x from the installed page, expected 0x%x",
                           after->rax & 0xff, kProbeByte);
    return false;
  }
  return true;
}

}  // namespace

absl::StatusOr<bool> ProbeKvmUserfault(Kvm& kvm, std::string* reason) {
  std::string why;
  absl::StatusOr<bool> ok = ProbeUserfaultSteps(kvm, &why);
  if (!ok.ok()) {
    LOG_WARN("KVM Userfault probe could not run: %s", ok.status().ToString());
    if (reason != nullptr) *reason = std::string(ok.status().message());
    return ok.status();
  }
  if (*ok) why = "KVM Userfault works (memslot accepted, userfault exit seen, page installed)";
  LOG_INFO("KVM Userfault: %s", why);
  if (reason != nullptr) *reason = why;
  return *ok;
}

}  // namespace microvmm
