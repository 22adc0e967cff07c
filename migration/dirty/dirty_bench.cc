// Micro-benchmark: cost of DirtyTracker::Sync for a large guest (default 1 GiB), both modes.
//
//   bazel run -c opt //migration/dirty:dirty_bench -- [--mem_mib=1024] [--reps=5] [--no_guest]
//
// For each mode (bitmap = KVM_GET_DIRTY_LOG + KVM_CLEAR_DIRTY_LOG, ring = 1 MiB dirty ring per
// vCPU + 1 ms poller) it times:
//   * the first Sync after Start (full pass; in bitmap mode this is where KVM write-protects all
//     memory, chunk by chunk, through KVM_CLEAR_DIRTY_LOG);
//   * Sync after the host (VMM) dirtied N% of the pages through GuestMemory::Write (they reach the
//     tracker through the VMM-side bitmap; KVM's log is empty) -- median of --reps;
//   * Sync after one vCPU dirtied N% of the pages (a 4-instruction store loop; guest execution is
//     emulated on our dev hosts, so only the Sync time is meaningful, not the guest's).
#include <errno.h>
#include <sys/ioctl.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "migration/dirty/dirty_tracker.h"
#include "vmm/boot/layout.h"
#include "vmm/boot/x86_setup.h"
#include "vmm/kvm/kvm.h"
#include "vmm/memory/guest_memory.h"

namespace microvmm::migration {
namespace {

constexpr uint64_t kProg = 0x1000;
// mov [rdi], al; add rdi, rdx; dec rcx; jnz 0; hlt
constexpr uint8_t kStrideProg[] = {0x88, 0x07, 0x48, 0x01, 0xd7, 0x48, 0xff, 0xc9, 0x75, 0xf6, 0xf4};

struct Bench {
  std::optional<Kvm> kvm;
  std::optional<KvmVm> vm;
  std::unique_ptr<GuestMemory> mem;
  std::unique_ptr<KvmVcpu> vcpu;
  std::unique_ptr<DirtyTracker> tracker;
};

#define CHECK_OK(expr)                                                        \
  do {                                                                        \
    absl::Status _s = (expr);                                                 \
    if (!_s.ok()) {                                                           \
      std::fprintf(stderr, "%s: %s\n", #expr, _s.ToString().c_str());         \
      std::exit(1);                                                           \
    }                                                                         \
  } while (0)

template <typename T>
T Must(absl::StatusOr<T> v, const char* what) {
  if (!v.ok()) {
    std::fprintf(stderr, "%s: %s\n", what, v.status().ToString().c_str());
    std::exit(1);
  }
  return std::move(*v);
}

Bench Build(bool ring, uint64_t mem_bytes) {
  Bench b;
  b.kvm.emplace(Must(Kvm::Open(), "open /dev/kvm"));
  b.vm.emplace(Must(KvmVm::Create(*b.kvm), "KVM_CREATE_VM"));
  if (ring) Must(DirtyTracker::EnableDirtyRing(*b.vm, 1 << 20), "EnableDirtyRing");
  (void)b.vm->SetTssAddr(0xfffbd000);
  b.mem = Must(GuestMemory::Create(mem_bytes), "GuestMemory::Create");
  for (size_t i = 0; i < b.mem->regions().size(); ++i) {
    const auto& r = b.mem->regions()[i];
    CHECK_OK(b.vm->SetUserMemoryRegion(i, 0, r.gpa, r.size, r.host));
  }
  CHECK_OK(WriteBootTables(*b.mem));
  // Accessed/Dirty preset so page walks never write guest memory.
  auto orbits = [&](uint64_t gpa, uint64_t bits) {
    uint64_t e = *b.mem->ReadObj<uint64_t>(gpa);
    e |= bits;
    std::memcpy(*b.mem->HostPtr(gpa, 8), &e, 8);
  };
  orbits(layout::kPml4, 0x20);
  for (uint64_t i = 0; i < 4; ++i) orbits(layout::kPdpt + i * 8, 0x20);
  for (uint64_t i = 0; i < 4 * 512; ++i) orbits(layout::kPd + i * 8, 0x60);
  std::memcpy(*b.mem->HostPtr(kProg, sizeof(kStrideProg)), kStrideProg, sizeof(kStrideProg));
  auto supported = Must(b.kvm->GetSupportedCpuid(), "GET_SUPPORTED_CPUID");
  b.vcpu = std::make_unique<KvmVcpu>(Must(KvmVcpu::Create(*b.kvm, *b.vm, 0), "vCPU"));
  CHECK_OK(b.vcpu->SetCpuid(BuildVcpuCpuid(supported, 0, 1)));
  kvm_sregs sregs = Must(b.vcpu->GetSregs(), "GET_SREGS");
  SetupLongModeSregs(sregs);
  CHECK_OK(b.vcpu->SetSregs(sregs));
  DirtyTracker::Options o;
  o.mode = ring ? DirtyTracker::Mode::kRing : DirtyTracker::Mode::kBitmap;
  b.tracker = Must(DirtyTracker::Create(*b.vm, *b.mem, {b.vcpu.get()}, o), "DirtyTracker");
  return b;
}

// Guest stores to `count` pages, every `stride` pages, starting at 2 MiB.
void GuestDirty(Bench& b, uint64_t count, uint64_t stride) {
  if (count == 0) return;
  kvm_regs regs{};
  regs.rflags = 0x2;
  regs.rip = kProg;
  regs.rdi = 2 << 20;
  regs.rdx = stride * kPageSize;
  regs.rcx = count;
  regs.rax = 0x42;
  CHECK_OK(b.vcpu->SetRegs(regs));
  for (;;) {
    int r = b.vcpu->Run();
    if (r == -EINTR) continue;
    if (r < 0) {
      std::fprintf(stderr, "KVM_RUN: %s\n", strerror(-r));
      std::exit(1);
    }
    uint32_t why = b.vcpu->run()->exit_reason;
    if (why == KVM_EXIT_HLT) return;
    if (why == KVM_EXIT_DIRTY_RING_FULL) {
      CHECK_OK(b.tracker->HandleRingFull(0));
      continue;
    }
    std::fprintf(stderr, "unexpected exit %u\n", why);
    std::exit(1);
  }
}

std::string Ms(absl::Duration d) { return absl::StrFormat("%.3f ms", absl::ToDoubleMilliseconds(d)); }

void Run(bool ring, uint64_t mem_bytes, int reps, bool guest) {
  Bench b = Build(ring, mem_bytes);
  const uint64_t pages = mem_bytes / kPageSize;
  std::printf("\n== %s mode, %llu MiB (%llu pages)%s ==\n", ring ? "ring (1 MiB/vCPU)" : "bitmap",
              (unsigned long long)(mem_bytes >> 20), (unsigned long long)pages,
              ring ? "" : (b.tracker->manual_protect() ? ", MANUAL_PROTECT2+INITIALLY_SET"
                                                       : ", get-and-clear"));
  DirtySet set = DirtySet::ForMemory(*b.mem);
  DirtySyncStats st;
  absl::Time t0 = absl::Now();
  CHECK_OK(b.tracker->Start());
  absl::Duration start_time = absl::Now() - t0;
  CHECK_OK(b.tracker->Sync(set, &st));
  std::printf("Start (KVM_MEM_LOG_DIRTY_PAGES on): %s\n", Ms(start_time).c_str());
  std::printf("first Sync (full pass):  %s  (KVM part %s, %llu ioctls, %llu pages)\n",
              Ms(st.duration).c_str(), Ms(st.kvm_time).c_str(), (unsigned long long)st.ioctls,
              (unsigned long long)st.reported_pages);
  std::printf("%-7s | %-34s | %-40s\n", "dirty", "host writes (median Sync)", "guest writes (Sync)");
  for (double pct : {0.0, 0.1, 1.0, 10.0, 50.0}) {
    uint64_t count = static_cast<uint64_t>(pages * pct / 100.0);
    uint64_t stride = count ? std::max<uint64_t>(1, (pages - 1024) / count) : 1;
    if (count && stride * count + 512 > pages) count = (pages - 512) / stride;
    std::vector<absl::Duration> host;
    uint64_t host_pages = 0;
    for (int r = 0; r < reps; ++r) {
      uint8_t v = static_cast<uint8_t>(r);
      for (uint64_t i = 0; i < count; ++i) CHECK_OK(b.mem->Write((2 << 20) + i * stride * kPageSize, &v, 1));
      set.ClearAll();
      CHECK_OK(b.tracker->Sync(set, &st));
      host.push_back(st.duration);
      host_pages = st.reported_pages;
    }
    std::sort(host.begin(), host.end());
    std::string gcol = "-";
    if (guest) {
      absl::Time g0 = absl::Now();
      GuestDirty(b, count, stride);
      absl::Duration gt = absl::Now() - g0;
      set.ClearAll();
      CHECK_OK(b.tracker->Sync(set, &st));
      gcol = absl::StrFormat("%s, %llu pages (guest ran %s)", Ms(st.duration),
                             (unsigned long long)st.reported_pages, Ms(gt));
    }
    std::printf("%6.1f%% | %-34s | %s\n", pct,
                absl::StrFormat("%s, %llu pages", Ms(host[host.size() / 2]),
                                (unsigned long long)host_pages)
                    .c_str(),
                gcol.c_str());
  }
  CHECK_OK(b.tracker->Stop());
}

}  // namespace
}  // namespace microvmm::migration

int main(int argc, char** argv) {
  uint64_t mem_mib = 1024;
  int reps = 5;
  bool guest = true;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a.rfind("--mem_mib=", 0) == 0) {
      if (!absl::SimpleAtoi(a.substr(10), &mem_mib)) return 2;
    } else if (a.rfind("--reps=", 0) == 0) {
      if (!absl::SimpleAtoi(a.substr(7), &reps) || reps < 1) return 2;
    } else if (a == "--no_guest") {
      guest = false;
    } else {
      std::fprintf(stderr, "usage: %s [--mem_mib=1024] [--reps=5] [--no_guest]\n", argv[0]);
      return 2;
    }
  }
  microvmm::migration::Run(false, mem_mib << 20, reps, guest);
  microvmm::migration::Run(true, mem_mib << 20, reps, guest);
  return 0;
}
