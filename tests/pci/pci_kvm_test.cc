// KVM tests of the interrupt and notification plumbing:
//  - an MSI route + irqfd: writing the eventfd sets the vector in the LAPIC's IRR;
//  - the re-created default routes: KVM_IRQ_LINE on GSI 4 still reaches the IOAPIC and LAPIC
//    after the GSI routing table was replaced;
//  - MsixTable on real KVM: delivery, per-vector masking with the pending bit, delivery on unmask;
//  - a tiny 64-bit guest that enables its LAPIC, waits in `sti; hlt` and takes the MSI through
//    its IDT (twice, so EOI works), reporting on an I/O port;
//  - ioeventfd: a guest MMIO write to a registered address signals the eventfd without
//    KVM_EXIT_MMIO; datamatch, deassign on destruction, Move.
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <cstring>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "vmm/boot/x86_setup.h"
#include "vmm/kvm/kvm.h"
#include "vmm/memory/guest_memory.h"
#include "vmm/pci/eventfd.h"
#include "vmm/pci/gsi_router.h"
#include "vmm/pci/ioeventfd.h"
#include "vmm/pci/msix.h"
#include "vmm/pci/pci_config.h"

namespace microvmm::pci {
namespace {

bool KvmOpenable() {
  int fd = ::open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (fd < 0) return false;
  ::close(fd);
  return true;
}

#define REQUIRE_KVM()                                                                          \
  do {                                                                                         \
    if (!KvmOpenable()) {                                                                      \
      fprintf(stderr,                                                                          \
              "*** KVM UNAVAILABLE: /dev/kvm cannot be opened; this KVM test did NOT run ***\n"); \
      GTEST_SKIP() << "*** KVM UNAVAILABLE: /dev/kvm cannot be opened; this KVM test did NOT "  \
                      "run ***";                                                               \
    }                                                                                          \
  } while (0)

#define ASSERT_OK(expr)                          \
  do {                                           \
    absl::Status _s = (expr);                    \
    ASSERT_TRUE(_s.ok()) << #expr << ": " << _s; \
  } while (0)

constexpr uint64_t kRamBytes = 16 << 20;
constexpr uint64_t kCode = 0x1000;
constexpr uint64_t kIdtBase = 0x3000;
constexpr uint64_t kStackTop = 0x8000;
constexpr uint16_t kReadyPort = 0x511;
constexpr uint16_t kReportPort = 0x510;
constexpr uint64_t kMsiAddress = 0xfee00000;  // destination APIC ID 0, physical mode

// Guest programs (assembled with GNU as, bytes pasted):
// at kCode + 0x00:
//   0: 48 b8 f0 00 e0 fe 00 00 00 00   movabs rax, 0xfee000f0
//   a: c7 00 ff 01 00 00               mov dword [rax], 0x1ff   ; LAPIC SVR: enable
//  10: 66 ba 11 05                     mov dx, 0x511
//  14: ee                              out dx, al               ; "ready"
//  15: fb                              sti
//  16: f4                              hlt
//  17: fa                              cli
//  18: eb f6                           jmp 0x10
constexpr uint8_t kWaitProg[] = {0x48, 0xb8, 0xf0, 0x00, 0xe0, 0xfe, 0x00, 0x00, 0x00, 0x00,
                                 0xc7, 0x00, 0xff, 0x01, 0x00, 0x00, 0x66, 0xba, 0x11, 0x05,
                                 0xee, 0xfb, 0xf4, 0xfa, 0xeb, 0xf6};
// at kCode + 0x40 (interrupt handler):
//   0: 50 52                          push rax; push rdx
//   2: b8 60 00 00 00                 mov eax, 0x60
//   7: 66 ba 10 05                    mov dx, 0x510
//   b: ef                             out dx, eax              ; report
//   c: 48 b8 b0 00 e0 fe 00 00 00 00  movabs rax, 0xfee000b0
//  16: c7 00 00 00 00 00              mov dword [rax], 0       ; LAPIC EOI
//  1c: 5a 58                          pop rdx; pop rax
//  1e: 48 cf                          iretq
constexpr uint8_t kHandler[] = {0x50, 0x52, 0xb8, 0x60, 0x00, 0x00, 0x00, 0x66, 0xba, 0x10, 0x05,
                                0xef, 0x48, 0xb8, 0xb0, 0x00, 0xe0, 0xfe, 0x00, 0x00, 0x00, 0x00,
                                0xc7, 0x00, 0x00, 0x00, 0x00, 0x00, 0x5a, 0x58, 0x48, 0xcf};
constexpr uint64_t kHandlerAt = kCode + 0x40;
constexpr uint8_t kHandlerVector = 0x60;
// at kCode + 0x80 (MMIO store loop): RDI = address, RSI = value.
//   0: 89 37           mov [rdi], esi
//   2: 66 ba 11 05     mov dx, 0x511
//   6: ee              out dx, al
//   7: eb f7           jmp 0
constexpr uint8_t kStoreProg[] = {0x89, 0x37, 0x66, 0xba, 0x11, 0x05, 0xee, 0xeb, 0xf7};
constexpr uint64_t kStoreProgAt = kCode + 0x80;

void NoopSignal(int) {}

struct TestVm {
  std::optional<Kvm> kvm;
  std::optional<KvmVm> vm;
  std::unique_ptr<GuestMemory> mem;
  std::unique_ptr<KvmVcpu> vcpu;
};

absl::StatusOr<std::unique_ptr<TestVm>> MakeVm() {
  auto t = std::make_unique<TestVm>();
  auto kvm = Kvm::Open();
  if (!kvm.ok()) return kvm.status();
  t->kvm.emplace(std::move(*kvm));
  auto vm = KvmVm::Create(*t->kvm);
  if (!vm.ok()) return vm.status();
  t->vm.emplace(std::move(*vm));
  // Same as vmm/vm.cc.
  if (absl::Status s = t->vm->SetIdentityMapAddr(0xfeffc000); !s.ok()) return s;
  if (absl::Status s = t->vm->SetTssAddr(0xfeffd000); !s.ok()) return s;
  if (absl::Status s = t->vm->CreateIrqchip(); !s.ok()) return s;
  auto mem = GuestMemory::Create(kRamBytes);
  if (!mem.ok()) return mem.status();
  t->mem = std::move(*mem);
  for (size_t i = 0; i < t->mem->regions().size(); ++i) {
    const auto& r = t->mem->regions()[i];
    if (absl::Status s = t->vm->SetUserMemoryRegion(i, 0, r.gpa, r.size, r.host); !s.ok()) return s;
  }
  if (absl::Status s = WriteBootTables(*t->mem); !s.ok()) return s;
  if (absl::Status s = t->mem->Write(kCode, kWaitProg, sizeof(kWaitProg)); !s.ok()) return s;
  if (absl::Status s = t->mem->Write(kHandlerAt, kHandler, sizeof(kHandler)); !s.ok()) return s;
  if (absl::Status s = t->mem->Write(kStoreProgAt, kStoreProg, sizeof(kStoreProg)); !s.ok())
    return s;
  // IDT: a 64-bit interrupt gate for kHandlerVector, everything else not present.
  uint8_t gate[16] = {};
  gate[0] = kHandlerAt & 0xff;
  gate[1] = (kHandlerAt >> 8) & 0xff;
  gate[2] = 0x10;  // code selector
  gate[5] = 0x8e;  // present, DPL 0, interrupt gate
  gate[6] = (kHandlerAt >> 16) & 0xff;
  gate[7] = (kHandlerAt >> 24) & 0xff;
  if (absl::Status s = t->mem->Write(kIdtBase + 16 * kHandlerVector, gate, 16); !s.ok()) return s;

  auto supported = t->kvm->GetSupportedCpuid();
  if (!supported.ok()) return supported.status();
  auto v = KvmVcpu::Create(*t->kvm, *t->vm, 0);
  if (!v.ok()) return v.status();
  t->vcpu = std::make_unique<KvmVcpu>(std::move(*v));
  if (absl::Status s = t->vcpu->SetCpuid(BuildVcpuCpuid(*supported, 0, 1)); !s.ok()) return s;
  auto sregs = t->vcpu->GetSregs();
  if (!sregs.ok()) return sregs.status();
  SetupLongModeSregs(*sregs);
  sregs->idt.base = kIdtBase;
  sregs->idt.limit = 256 * 16 - 1;
  if (absl::Status s = t->vcpu->SetSregs(*sregs); !s.ok()) return s;
  kvm_regs regs{};
  regs.rflags = 0x2;
  regs.rip = kCode;
  regs.rsp = kStackTop;
  if (absl::Status s = t->vcpu->SetRegs(regs); !s.ok()) return s;
  return t;
}

uint32_t LapicReg(const kvm_lapic_state& l, uint32_t off) {
  uint32_t v;
  std::memcpy(&v, &l.regs[off], 4);
  return v;
}

// Software-enables the LAPIC (SVR bit 8) from the host, as a guest would.
absl::Status EnableLapic(KvmVcpu& v) {
  auto l = v.GetLapic();
  if (!l.ok()) return l.status();
  uint32_t svr = LapicReg(*l, 0xf0) | 0x100 | 0xff;
  std::memcpy(&l->regs[0xf0], &svr, 4);
  return v.SetLapic(*l);
}

absl::StatusOr<bool> IrrSet(KvmVcpu& v, uint8_t vector) {
  auto l = v.GetLapic();
  if (!l.ok()) return l.status();
  return (LapicReg(*l, 0x200 + 0x10 * (vector / 32)) >> (vector % 32)) & 1;
}

// Polls the IRR: irqfd injection may complete on a kernel worker after the eventfd write.
bool WaitIrr(KvmVcpu& v, uint8_t vector, absl::Duration timeout = absl::Seconds(2)) {
  absl::Time deadline = absl::Now() + timeout;
  do {
    auto set = IrrSet(v, vector);
    if (set.ok() && *set) return true;
    absl::SleepFor(absl::Milliseconds(1));
  } while (absl::Now() < deadline);
  return false;
}

kvm_irq_routing_entry MsiEntry(uint32_t gsi, uint8_t vector) {
  kvm_irq_routing_entry e{};
  e.gsi = gsi;
  e.type = KVM_IRQ_ROUTING_MSI;
  e.u.msi.address_lo = kMsiAddress;
  e.u.msi.data = vector;  // fixed delivery, edge
  return e;
}

struct Exit {
  enum Kind { kReady, kReport, kMmio } kind;
  uint64_t value = 0;
  uint64_t addr = 0;
};

// Runs the vCPU to the next exit we care about (I/O on the test ports, MMIO). A watchdog thread
// kicks KVM_RUN with a signal so a guest stuck in HLT (in-kernel) cannot hang the test.
absl::StatusOr<Exit> RunToExit(KvmVcpu& v, absl::Duration timeout = absl::Seconds(20)) {
  struct sigaction sa {};
  sa.sa_handler = NoopSignal;  // no SA_RESTART: KVM_RUN returns EINTR
  sigaction(SIGUSR1, &sa, nullptr);
  std::atomic<bool> done{false};
  pthread_t self = pthread_self();
  absl::Time deadline = absl::Now() + timeout;
  std::thread watchdog([&] {
    while (!done.load()) {
      if (absl::Now() > deadline) pthread_kill(self, SIGUSR1);
      absl::SleepFor(absl::Milliseconds(20));
    }
  });
  auto finish = [&](absl::StatusOr<Exit> r) {
    done = true;
    watchdog.join();
    return r;
  };
  for (;;) {
    int r = v.Run();
    if (absl::Now() > deadline)
      return finish(absl::DeadlineExceededError("guest made no progress in time"));
    if (r == -EINTR || r == -EAGAIN) continue;
    if (r < 0) return finish(ErrnoStatus(-r, "KVM_RUN"));
    kvm_run* run = v.run();
    switch (run->exit_reason) {
      case KVM_EXIT_IO: {
        uint64_t val = 0;
        std::memcpy(&val, reinterpret_cast<uint8_t*>(run) + run->io.data_offset,
                    std::min<uint32_t>(run->io.size, 8));
        if (run->io.port == kReadyPort) return finish(Exit{Exit::kReady, val, 0});
        if (run->io.port == kReportPort) return finish(Exit{Exit::kReport, val, 0});
        return finish(absl::InternalError(absl::StrCat("unexpected port 0x", absl::Hex(run->io.port))));
      }
      case KVM_EXIT_MMIO: {
        uint64_t val = 0;
        std::memcpy(&val, run->mmio.data, std::min<uint32_t>(run->mmio.len, 8));
        if (!run->mmio.is_write) std::memset(run->mmio.data, 0, sizeof(run->mmio.data));
        return finish(Exit{Exit::kMmio, val, run->mmio.phys_addr});
      }
      default: {
        auto regs = v.GetRegs();
        return finish(absl::InternalError(absl::StrCat(
            "unexpected exit reason ", run->exit_reason, " rip=0x",
            absl::Hex(regs.ok() ? regs->rip : 0))));
      }
    }
  }
}

TEST(PciKvmTest, MsiRouteAndIrqfdSetLapicIrr) {
  REQUIRE_KVM();
  auto t = MakeVm();
  ASSERT_TRUE(t.ok()) << t.status();
  KvmVm& vm = *(*t)->vm;
  KvmVcpu& vcpu = *(*t)->vcpu;
  ASSERT_OK(EnableLapic(vcpu));
  // Raw ioctls first: a routing table = KVM's defaults + one MSI route; irqfd on it.
  std::vector<kvm_irq_routing_entry> table = DefaultIrqchipRoutes();
  table.push_back(MsiEntry(30, 0x45));
  ASSERT_OK(vm.SetGsiRouting(table));
  auto ev = EventFd::Create();
  ASSERT_TRUE(ev.ok());
  ASSERT_OK(vm.AssignIrqfd(ev->fd(), 30));
  EXPECT_FALSE(*IrrSet(vcpu, 0x45));
  ASSERT_OK(ev->Signal());
  EXPECT_TRUE(WaitIrr(vcpu, 0x45)) << "MSI via irqfd did not reach the LAPIC IRR";
  ASSERT_OK(vm.DeassignIrqfd(ev->fd(), 30));
  // Deassigned: a write is not delivered anywhere (vector 0x46 route, same eventfd).
  table.back() = MsiEntry(30, 0x46);
  ASSERT_OK(vm.SetGsiRouting(table));
  ASSERT_OK(ev->Signal());
  EXPECT_FALSE(WaitIrr(vcpu, 0x46, absl::Milliseconds(100)));
}

TEST(PciKvmTest, DefaultRoutesSurviveTheRoutingTable) {
  REQUIRE_KVM();
  auto t = MakeVm();
  ASSERT_TRUE(t.ok()) << t.status();
  KvmVm& vm = *(*t)->vm;
  KvmVcpu& vcpu = *(*t)->vcpu;
  ASSERT_OK(EnableLapic(vcpu));
  // IOAPIC pin 4 -> vector 0x33/0x34, fixed, physical destination 0, unmasked, edge.
  auto ioapic = vm.GetIrqchip(KVM_IRQCHIP_IOAPIC);
  ASSERT_TRUE(ioapic.ok());
  ioapic->chip.ioapic.redirtbl[4].bits = 0x33;
  ASSERT_OK(vm.SetIrqchip(*ioapic));
  // Control: a table with only an MSI route drops KVM's defaults, and GSI 4 goes nowhere.
  ASSERT_OK(vm.SetGsiRouting({MsiEntry(40, 0x47)}));
  ASSERT_OK(vm.IrqLine(4, true));
  ASSERT_OK(vm.IrqLine(4, false));
  EXPECT_FALSE(WaitIrr(vcpu, 0x33, absl::Milliseconds(100)));

  auto router = GsiRouter::Create(vm);
  ASSERT_TRUE(router.ok()) << router.status();
  auto gsi = (*router)->AllocateGsi();
  ASSERT_TRUE(gsi.ok());
  ASSERT_OK((*router)->SetMsiRoute(*gsi, kMsiAddress, 0x47));
  ioapic->chip.ioapic.redirtbl[4].bits = 0x34;
  ASSERT_OK(vm.SetIrqchip(*ioapic));
  ASSERT_OK(vm.IrqLine(4, true));
  ASSERT_OK(vm.IrqLine(4, false));
  EXPECT_TRUE(WaitIrr(vcpu, 0x34)) << "GSI 4 no longer reaches the IOAPIC";
  // And GSI 20 (IOAPIC only).
  ioapic->chip.ioapic.redirtbl[20].bits = 0x35;
  ASSERT_OK(vm.SetIrqchip(*ioapic));
  ASSERT_OK(vm.IrqLine(20, true));
  ASSERT_OK(vm.IrqLine(20, false));
  EXPECT_TRUE(WaitIrr(vcpu, 0x35));
}

TEST(PciKvmTest, MsixTableMaskingAndPendingOnKvm) {
  REQUIRE_KVM();
  auto t = MakeVm();
  ASSERT_TRUE(t.ok()) << t.status();
  KvmVm& vm = *(*t)->vm;
  KvmVcpu& vcpu = *(*t)->vcpu;
  ASSERT_OK(EnableLapic(vcpu));
  auto router = GsiRouter::Create(vm);
  ASSERT_TRUE(router.ok()) << router.status();
  PciHeader h;
  h.vendor_id = 0x1af4;
  h.device_id = 0x1041;
  PciConfigSpace cfg(h);
  ASSERT_OK(cfg.AddBar(0, BarType::kMem64, 0x4000));
  auto msix = MsixTable::Create(**router, 2);
  ASSERT_TRUE(msix.ok()) << msix.status();
  MsixTable& m = **msix;
  auto cap = m.AddCapability(cfg, 0, 0, 0, 0x2000);
  ASSERT_TRUE(cap.ok());
  auto write32 = [&](uint64_t off, uint32_t v) {
    uint8_t b[4];
    std::memcpy(b, &v, 4);
    ASSERT_TRUE(m.WriteBar(0, off, b));
  };
  // Guest-style programming: enable with function mask, fill entries, unmask the function.
  cfg.Write(*cap + 2, 2, kMsixControlEnable | kMsixControlFunctionMask);
  write32(0x00, kMsiAddress);
  write32(0x08, 0x51);
  write32(0x0c, 0);  // vector 0 unmasked
  write32(0x10, kMsiAddress);
  write32(0x18, 0x52);
  write32(0x1c, 1);  // vector 1 masked
  cfg.Write(*cap + 2, 2, kMsixControlEnable);
  ASSERT_OK(m.status());

  m.Trigger(0);
  EXPECT_TRUE(WaitIrr(vcpu, 0x51)) << "MSI-X vector 0 not delivered";
  m.Trigger(1);
  EXPECT_FALSE(WaitIrr(vcpu, 0x52, absl::Milliseconds(100))) << "masked vector was delivered";
  EXPECT_TRUE(m.pending(1));
  uint8_t pba[8];
  ASSERT_TRUE(m.ReadBar(0, 0x2000, pba));
  EXPECT_EQ(pba[0], 0x2);
  write32(0x1c, 0);  // unmask: the pending event goes out
  EXPECT_TRUE(WaitIrr(vcpu, 0x52)) << "pending MSI-X vector not delivered on unmask";
  ASSERT_TRUE(m.ReadBar(0, 0x2000, pba));
  EXPECT_EQ(pba[0], 0x0);
  ASSERT_OK(m.status());
}

TEST(PciKvmTest, GuestTakesMsiThroughItsIdt) {
  REQUIRE_KVM();
  auto t = MakeVm();
  ASSERT_TRUE(t.ok()) << t.status();
  KvmVm& vm = *(*t)->vm;
  KvmVcpu& vcpu = *(*t)->vcpu;
  auto router = GsiRouter::Create(vm);
  ASSERT_TRUE(router.ok()) << router.status();
  auto gsi = (*router)->AllocateGsi();
  ASSERT_TRUE(gsi.ok());
  ASSERT_OK((*router)->SetMsiRoute(*gsi, kMsiAddress, kHandlerVector));
  auto ev = EventFd::Create();
  ASSERT_TRUE(ev.ok());
  ASSERT_OK((*router)->AssignIrqfd(ev->fd(), *gsi));

  auto e = RunToExit(vcpu);
  ASSERT_TRUE(e.ok()) << e.status();
  ASSERT_EQ(e->kind, Exit::kReady);  // LAPIC enabled, about to sti; hlt
  for (int round = 0; round < 2; ++round) {
    ASSERT_OK(ev->Signal());  // the device raising its interrupt: one eventfd write
    e = RunToExit(vcpu);
    ASSERT_TRUE(e.ok()) << "round " << round << ": " << e.status();
    ASSERT_EQ(e->kind, Exit::kReport) << "round " << round;
    EXPECT_EQ(e->value, kHandlerVector);
    e = RunToExit(vcpu);  // EOI, iretq, back to "ready"
    ASSERT_TRUE(e.ok()) << e.status();
    ASSERT_EQ(e->kind, Exit::kReady);
  }
  ASSERT_OK((*router)->DeassignIrqfd(ev->fd(), *gsi));
}

TEST(PciKvmTest, IoeventfdSignalsWithoutMmioExit) {
  REQUIRE_KVM();
  auto t = MakeVm();
  ASSERT_TRUE(t.ok()) << t.status();
  KvmVm& vm = *(*t)->vm;
  KvmVcpu& vcpu = *(*t)->vcpu;
  constexpr uint64_t kNotify = 0xe0103000;  // in the 32-bit PCI window, no memslot
  auto a = IoEventFd::Create(vm, {.addr = kNotify, .len = 4, .datamatch = 0x1234});
  ASSERT_TRUE(a.ok()) << a.status();
  auto b = IoEventFd::Create(vm, {.addr = kNotify + 0x100, .len = 4});
  ASSERT_TRUE(b.ok()) << b.status();

  // Each step: the guest stores `value` to `addr`, then reports "ready" on the port.
  auto store = [&](uint64_t addr, uint32_t value) -> absl::StatusOr<std::vector<Exit>> {
    // Complete the pending I/O exit before replacing the registers (KVM API: operations of
    // an exit finish on the next KVM_RUN; immediate_exit runs none of the guest).
    vcpu.SetImmediateExit(true);
    (void)vcpu.Run();
    vcpu.SetImmediateExit(false);
    kvm_regs regs{};
    regs.rflags = 0x2;
    regs.rip = kStoreProgAt;
    regs.rsp = kStackTop;
    regs.rdi = addr;
    regs.rsi = value;
    if (absl::Status s = vcpu.SetRegs(regs); !s.ok()) return s;
    std::vector<Exit> exits;
    for (int i = 0; i < 4; ++i) {
      auto e = RunToExit(vcpu);
      if (!e.ok()) return e.status();
      exits.push_back(*e);
      if (e->kind == Exit::kReady) return exits;
    }
    return absl::InternalError("no ready exit");
  };
  auto count = [](const IoEventFd& f) { return *f.event().Consume(); };

  auto x = store(kNotify, 0x1234);  // matches: signalled in the kernel, no MMIO exit
  ASSERT_TRUE(x.ok()) << x.status();
  ASSERT_EQ(x->size(), 1u) << "exit kind " << (*x)[0].kind << " addr 0x" << std::hex << (*x)[0].addr;
  EXPECT_EQ(count(**a), 1u);

  x = store(kNotify, 0x9999);  // datamatch fails: an ordinary MMIO exit
  ASSERT_TRUE(x.ok()) << x.status();
  ASSERT_EQ(x->size(), 2u);
  EXPECT_EQ((*x)[0].kind, Exit::kMmio);
  EXPECT_EQ((*x)[0].addr, kNotify);
  EXPECT_EQ((*x)[0].value, 0x9999u);
  EXPECT_EQ(count(**a), 0u);

  x = store(kNotify + 0x100, 0xabcd);  // no datamatch: any value
  ASSERT_TRUE(x.ok()) << x.status();
  EXPECT_EQ(x->size(), 1u);
  EXPECT_EQ(count(**b), 1u);

  // Move `b` (same eventfd): the old address exits again, the new one signals.
  ASSERT_OK((*b)->Move(kNotify + 0x200));
  x = store(kNotify + 0x100, 1);
  ASSERT_TRUE(x.ok()) << x.status();
  EXPECT_EQ(x->size(), 2u);
  x = store(kNotify + 0x200, 1);
  ASSERT_TRUE(x.ok()) << x.status();
  EXPECT_EQ(x->size(), 1u);
  EXPECT_EQ(count(**b), 1u);

  // Destruction deassigns.
  a->reset();
  x = store(kNotify, 0x1234);
  ASSERT_TRUE(x.ok()) << x.status();
  ASSERT_EQ(x->size(), 2u);
  EXPECT_EQ((*x)[0].kind, Exit::kMmio);
}

}  // namespace
}  // namespace microvmm::pci
