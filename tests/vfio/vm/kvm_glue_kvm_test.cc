// vmm/vfio/kvm_glue.h on real KVM:
//  - MemslotBarMapper::ForVm: a host page mapped at a guest-physical address is what a 64-bit
//    guest reads there (directly: a host-side change shows up without any copy); after Unmap the
//    same read is an MMIO exit (nothing there any more); a re-Map serves another page.
//  - KvmVm::AssignResampleIrqfd (via KvmIntxRouter): a write to the trigger eventfd asserts
//    the IOAPIC pin level-triggered (IRR bit set); one trigger fd cannot be assigned twice;
//    deassign works and allows a new assign.
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>
#include <memory>
#include <optional>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "tests/util/subprocess.h"
#include "vmm/base/fd.h"
#include "vmm/boot/x86_setup.h"
#include "vmm/kvm/kvm.h"
#include "vmm/memory/guest_memory.h"
#include "vmm/vfio/kvm_glue.h"

namespace microvmm {
namespace {

constexpr uint64_t kRamBytes = 16 << 20;
constexpr uint64_t kCode = 0x1000;
constexpr uint64_t kBarGpa = 0x2000000;  // above RAM, inside the 4 GiB identity map
constexpr uint16_t kReportPort = 0x510;
// at kCode, RDI = address:
//   0: 8b 07          mov eax, [rdi]
//   2: 66 ba 10 05    mov dx, 0x510
//   6: ef             out dx, eax
//   7: eb f7          jmp 0
constexpr uint8_t kReadLoop[] = {0x8b, 0x07, 0x66, 0xba, 0x10, 0x05, 0xef, 0xeb, 0xf7};

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
  if (absl::Status s = t->mem->Write(kCode, kReadLoop, sizeof(kReadLoop)); !s.ok()) return s;
  auto supported = t->kvm->GetSupportedCpuid();
  if (!supported.ok()) return supported.status();
  auto v = KvmVcpu::Create(*t->kvm, *t->vm, 0);
  if (!v.ok()) return v.status();
  t->vcpu = std::make_unique<KvmVcpu>(std::move(*v));
  if (absl::Status s = t->vcpu->SetCpuid(BuildVcpuCpuid(*supported, 0, 1)); !s.ok()) return s;
  auto sregs = t->vcpu->GetSregs();
  if (!sregs.ok()) return sregs.status();
  SetupLongModeSregs(*sregs);
  if (absl::Status s = t->vcpu->SetSregs(*sregs); !s.ok()) return s;
  kvm_regs regs{};
  regs.rflags = 0x2;
  regs.rip = kCode;
  regs.rsp = 0x8000;
  regs.rdi = kBarGpa;
  if (absl::Status s = t->vcpu->SetRegs(regs); !s.ok()) return s;
  return t;
}

struct Exit {
  bool mmio = false;
  uint64_t value = 0;  // port value, or MMIO address
};

// Runs to the next report (I/O) or MMIO exit; MMIO reads complete with 0.
absl::StatusOr<Exit> RunToExit(KvmVcpu& v) {
  for (int spins = 0; spins < 1000; ++spins) {
    int r = v.Run();
    if (r == -EINTR || r == -EAGAIN) continue;
    if (r < 0) return ErrnoStatus(-r, "KVM_RUN");
    kvm_run* run = v.run();
    if (run->exit_reason == KVM_EXIT_IO && run->io.port == kReportPort) {
      uint32_t val = 0;
      std::memcpy(&val, reinterpret_cast<uint8_t*>(run) + run->io.data_offset, 4);
      return Exit{false, val};
    }
    if (run->exit_reason == KVM_EXIT_MMIO) {
      if (!run->mmio.is_write) std::memset(run->mmio.data, 0, sizeof(run->mmio.data));
      return Exit{true, run->mmio.phys_addr};
    }
    return absl::InternalError(absl::StrCat("unexpected exit reason ", run->exit_reason));
  }
  return absl::InternalError("no exit");
}

ScopedMmap Page(uint32_t value) {
  void* p = ::mmap(nullptr, 4096, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return ScopedMmap();
  std::memcpy(p, &value, 4);
  return ScopedMmap(p, 4096);
}

TEST(MemslotBarMapperKvm, GuestReadsMappedPageDirectlyAndMmioAfterUnmap) {
  REQUIRE_KVM();
  auto t = MakeVm();
  ASSERT_TRUE(t.ok()) << t.status();
  KvmVcpu& vcpu = *(*t)->vcpu;
  auto mapper = MemslotBarMapper::ForVm(*(*t)->vm, 256);
  ScopedMmap a = Page(0x11223344), b = Page(0x55667788);
  ASSERT_TRUE(a.get() != nullptr && b.get() != nullptr);

  ASSERT_TRUE(mapper->Map(kBarGpa, a.get(), 4096).ok());
  auto e = RunToExit(vcpu);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_FALSE(e->mmio) << "read at 0x" << std::hex << e->value << " trapped despite the memslot";
  EXPECT_EQ(e->value, 0x11223344u);
  // The guest sees the host page itself.
  const uint32_t changed = 0xcafef00d;
  std::memcpy(a.get(), &changed, 4);
  e = RunToExit(vcpu);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_FALSE(e->mmio);
  EXPECT_EQ(e->value, changed);

  ASSERT_TRUE(mapper->Unmap(kBarGpa, 4096).ok());
  EXPECT_TRUE(mapper->slots().empty());
  e = RunToExit(vcpu);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_TRUE(e->mmio) << "the memslot is still there";
  EXPECT_EQ(e->value, kBarGpa);
  e = RunToExit(vcpu);  // the trapped read completes with 0
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_FALSE(e->mmio);
  EXPECT_EQ(e->value, 0u);

  ASSERT_TRUE(mapper->Map(kBarGpa, b.get(), 4096).ok());  // the freed slot id is reused
  EXPECT_EQ(mapper->slots().at(kBarGpa).id, 256u);
  e = RunToExit(vcpu);
  ASSERT_TRUE(e.ok()) << e.status();
  EXPECT_FALSE(e->mmio);
  EXPECT_EQ(e->value, 0x55667788u);
  // KVM itself refuses a memslot overlapping RAM; the mapper reports it and records nothing.
  EXPECT_FALSE(mapper->Map(0x100000, a.get(), 4096).ok());
  EXPECT_EQ(mapper->slots().size(), 1u);
}

bool IoapicIrr(KvmVm& vm, uint32_t pin) {
  auto chip = vm.GetIrqchip(KVM_IRQCHIP_IOAPIC);
  return chip.ok() && ((chip->chip.ioapic.irr >> pin) & 1);
}

TEST(KvmIntxRouterKvm, ResampleIrqfdAssertsTheIoapicPin) {
  REQUIRE_KVM();
  auto t = MakeVm();
  ASSERT_TRUE(t.ok()) << t.status();
  KvmVm& vm = *(*t)->vm;
  KvmIntxRouter router(vm);
  ScopedFd trigger(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  ScopedFd resample(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  ASSERT_TRUE(trigger.valid() && resample.valid());
  constexpr uint32_t kGsi = 17;
  ASSERT_TRUE(router.AssignResampleIrqfd(trigger.get(), resample.get(), kGsi).ok());
  EXPECT_FALSE(router.AssignResampleIrqfd(trigger.get(), resample.get(), kGsi).ok())
      << "the same trigger fd twice must be refused (EBUSY)";
  EXPECT_FALSE(IoapicIrr(vm, kGsi));
  uint64_t one = 1;
  ASSERT_EQ(::write(trigger.get(), &one, sizeof(one)), 8);
  // irqfd injection runs on a kernel worker: poll.
  absl::Time deadline = absl::Now() + absl::Seconds(5);
  while (!IoapicIrr(vm, kGsi) && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(1));
  EXPECT_TRUE(IoapicIrr(vm, kGsi)) << "level not asserted on IOAPIC pin " << kGsi;
  ASSERT_TRUE(router.DeassignResampleIrqfd(trigger.get(), kGsi).ok());
  // Deassigning a resampler de-asserts its line.
  deadline = absl::Now() + absl::Seconds(5);
  while (IoapicIrr(vm, kGsi) && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(1));
  EXPECT_FALSE(IoapicIrr(vm, kGsi));
  EXPECT_TRUE(router.AssignResampleIrqfd(trigger.get(), resample.get(), kGsi).ok());
  EXPECT_TRUE(router.DeassignResampleIrqfd(trigger.get(), kGsi).ok());
}

}  // namespace
}  // namespace microvmm
