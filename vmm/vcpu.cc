#include "vmm/vcpu.h"

#include <errno.h>
#include <signal.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <string_view>

#include "absl/strings/str_format.h"
#include "vmm/base/fd.h"
#include "vmm/base/log.h"
#include "vmm/exit_status.h"
#include "vmm/throttle_wake.h"

namespace microvmm {
namespace {
constexpr int kKickSignal = SIGUSR1;
void KickHandler(int) {}
thread_local Vcpu* t_current = nullptr;

int64_t ClockNs(clockid_t clock) {
  timespec ts{};
  if (::clock_gettime(clock, &ts) != 0) return -1;
  return int64_t{ts.tv_sec} * 1000000000 + ts.tv_nsec;
}
int64_t MonoNs() { return ClockNs(CLOCK_MONOTONIC); }

// The run time a throttle charges for a run phase of `wall_ns` in which the vCPU thread used
// `cpu_ns` of CPU: min(wall, 2 x cpu). A busy vCPU (even one the host gives only half a core) is
// charged wall time, so it really spends ~P% of wall time outside KVM_RUN; a guest halted inside
// KVM_RUN (in-kernel LAPIC) burns no CPU and is not charged (nor kicked) for idling.
int64_t ChargedRunNs(int64_t wall_ns, int64_t cpu_ns) { return std::min(wall_ns, 2 * cpu_ns); }

// Production exit source: KVM_RUN on the vCPU fd and its mmap'ed kvm_run.
class KvmExitSource final : public ExitSource {
 public:
  explicit KvmExitSource(KvmVcpu vcpu) : vcpu_(std::move(vcpu)) {}
  int Run() override { return vcpu_.Run(); }
  kvm_run* run() override { return vcpu_.run(); }
  absl::StatusOr<kvm_regs> GetRegs() override { return vcpu_.GetRegs(); }
  absl::StatusOr<kvm_sregs> GetSregs() override { return vcpu_.GetSregs(); }
  KvmVcpu& vcpu() { return vcpu_; }

 private:
  KvmVcpu vcpu_;
};
}  // namespace

Vcpu* CurrentVcpu() { return t_current; }

ThrottleSleepPlan PlanThrottleSleep(int percent, int64_t ran_ns, int64_t debt_ns,
                                    int64_t max_sleep_ns) {
  if (percent <= 0 || percent >= 100 || max_sleep_ns <= 0) return {0, 0};
  // Out of KVM_RUN for P% of the time: sleep P/(100-P) x run time. __int128: no overflow for
  // absurd run times.
  __int128 total = static_cast<__int128>(ran_ns > 0 ? ran_ns : 0) * percent / (100 - percent) +
                   (debt_ns > 0 ? debt_ns : 0);
  int64_t sleep = total > max_sleep_ns ? max_sleep_ns : static_cast<int64_t>(total);
  __int128 owed = total - sleep;
  return {sleep, owed > max_sleep_ns ? max_sleep_ns : static_cast<int64_t>(owed)};
}

void InstallVcpuKickSignal() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction sa{};
    sa.sa_handler = KickHandler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0;  // no SA_RESTART: KVM_RUN must return EINTR
    sigaction(kKickSignal, &sa, nullptr);
  });
}

Vcpu::Vcpu(KvmVcpu kvm, const Bus* pio, const Bus* mmio, StopFn on_stop, RingFullFn on_ring_full,
           MemoryFaultFn on_memory_fault)
    : source_(std::make_unique<KvmExitSource>(std::move(kvm))),
      kvm_(&static_cast<KvmExitSource&>(*source_).vcpu()),
      run_(source_->run()),
      id_(kvm_->id()),
      pio_(pio),
      mmio_(mmio),
      on_stop_(std::move(on_stop)),
      on_ring_full_(std::move(on_ring_full)),
      on_memory_fault_(std::move(on_memory_fault)) {}

Vcpu::Vcpu(int id, std::unique_ptr<ExitSource> source, const Bus* pio, const Bus* mmio,
           StopFn on_stop, RingFullFn on_ring_full, MemoryFaultFn on_memory_fault)
    : source_(std::move(source)),
      kvm_(nullptr),
      run_(source_->run()),
      id_(id),
      pio_(pio),
      mmio_(mmio),
      on_stop_(std::move(on_stop)),
      on_ring_full_(std::move(on_ring_full)),
      on_memory_fault_(std::move(on_memory_fault)) {}

Vcpu::~Vcpu() {
  RequestStop();
  Join();
}

void Vcpu::Start() {
  InstallVcpuKickSignal();
  thread_ = std::thread([this] { Loop(); });
  pthread_ = thread_.native_handle();
  // Publish the Linux tid before returning, so tid() is valid for whoever starts post-copy.
  std::unique_lock lock(mu_);
  cv_.wait(lock, [this] { return linux_tid_.load(std::memory_order_relaxed) != 0; });
}

void Vcpu::Kick() {
  run_->immediate_exit = 1;
  if (thread_.joinable()) pthread_kill(pthread_, kKickSignal);
}

void Vcpu::RequestPause() {
  {
    std::lock_guard lock(mu_);
    if (exited_) return;
    pause_requested_ = true;
    if (!BlockedOnMissingPage()) Kick();  // a blocked one parks at its next exit
  }
  throttle_wake::WakeAll();  // a throttle sleeper parks at once
}

bool Vcpu::WaitPausedFor(std::chrono::milliseconds timeout) {
  std::unique_lock lock(mu_);
  return cv_.wait_for(lock, timeout, [this] { return parked_ || exited_ || !thread_.joinable(); });
}

bool Vcpu::paused() const {
  std::lock_guard lock(mu_);
  return parked_ || exited_ || !thread_.joinable();
}

bool Vcpu::BlockedOnMissingPage() const {
  // Exit-driven post-copy: the thread waits in its memory fault handler, not in the kernel.
  if (in_fault_handler_.load(std::memory_order_acquire)) return true;
  pid_t tid = linux_tid_.load(std::memory_order_acquire);
  if (tid == 0) return false;
  char path[64];
  std::snprintf(path, sizeof(path), "/proc/self/task/%d/wchan", static_cast<int>(tid));
  ScopedFd fd(::open(path, O_RDONLY | O_CLOEXEC));
  if (!fd.valid()) return false;
  char buf[64] = {};
  ssize_t n = ::read(fd.get(), buf, sizeof(buf) - 1);
  return n > 0 && std::string_view(buf, static_cast<size_t>(n)) == "handle_userfault";
}

void Vcpu::WaitPaused() {
  std::unique_lock lock(mu_);
  cv_.wait(lock, [this] { return parked_ || exited_ || !thread_.joinable(); });
}

void Vcpu::Resume() {
  std::lock_guard lock(mu_);
  pause_requested_ = false;
  cv_.notify_all();
}

void Vcpu::RequestStop() {
  {
    std::lock_guard lock(mu_);
    stop_requested_ = true;
    if (!exited_) Kick();
    cv_.notify_all();
  }
  throttle_wake::WakeAll();  // a throttle sleeper exits at once
}

void Vcpu::Join() {
  std::lock_guard lock(join_mu_);
  if (thread_.joinable() && std::this_thread::get_id() != thread_.get_id()) thread_.join();
}

void Vcpu::Loop() {
  t_current = this;
  {
    std::lock_guard lock(mu_);
    if (pthread_getcpuclockid(pthread_self(), &cpu_clock_) != 0) cpu_clock_ = CLOCK_MONOTONIC;
    linux_tid_.store(::gettid(), std::memory_order_release);
    cv_.notify_all();
  }
  for (;;) {
    {
      std::unique_lock lock(mu_);
      if (pause_requested_ && !stop_requested_) {
        // Complete a pending port/MMIO read before parking so saved registers are consistent
        // (KVM finishes the emulated instruction on the next KVM_RUN; immediate_exit makes that
        // run return at once).
        run_->immediate_exit = 1;
        (void)source_->Run();
        parked_ = true;
        cv_.notify_all();
        cv_.wait(lock, [this] { return !pause_requested_ || stop_requested_; });
        parked_ = false;
        // Parked time is neither run time nor throttle time: start a fresh run phase.
        thr_run_start_ns_.store(ClockNs(CLOCK_THREAD_CPUTIME_ID), std::memory_order_relaxed);
        thr_run_start_wall_ns_.store(MonoNs(), std::memory_order_relaxed);
      }
      if (stop_requested_) break;
      run_->immediate_exit = 0;
    }
    // Throttle: may sleep (outside KVM_RUN, interruptible); then re-check pause/stop first.
    if (thr_percent_.load(std::memory_order_relaxed) != 0 ||
        thr_epoch_.load(std::memory_order_relaxed) !=
            thr_epoch_applied_.load(std::memory_order_relaxed)) {
      const uint64_t sleeps = thr_sleeps_.load(std::memory_order_relaxed);
      ThrottlePoint();
      if (thr_sleeps_.load(std::memory_order_relaxed) != sleeps) continue;
    }
    // Interrupts raised from here on end the next throttle sleep (or skip it): one raised while
    // we are outside the guest is pending in KVM and must not wait for a throttle sleep.
    irq_seen_ = throttle_wake::InterruptGeneration();
    in_run_.store(true, std::memory_order_seq_cst);
    int r = source_->Run();
    in_run_.store(false, std::memory_order_relaxed);
    if (r == -EINTR || r == -EAGAIN) continue;  // kicked: re-check the flags
    // KVM_EXIT_MEMORY_FAULT is the one exit KVM reports with KVM_RUN failing (EFAULT, or
    // EHWPOISON); for any other errno exit_reason is stale and the run really failed.
    if (r < 0 && !((r == -EFAULT || r == -EHWPOISON) &&
                   run_->exit_reason == KVM_EXIT_MEMORY_FAULT)) {
      on_stop_({kExitVmmError, absl::StrFormat("vCPU %d: KVM_RUN failed: %s", id(), strerror(-r))});
      break;
    }
    if (!HandleExit()) break;
  }
  std::lock_guard lock(mu_);
  exited_ = true;
  cv_.notify_all();
}

void Vcpu::SetThrottle(int percent, int64_t run_quantum_ns, int64_t max_sleep_ns) {
  if (percent < 0 || percent > 99) percent = 0;
  thr_quantum_ns_.store(run_quantum_ns, std::memory_order_relaxed);
  thr_max_sleep_ns_.store(max_sleep_ns, std::memory_order_relaxed);
  thr_percent_.store(percent, std::memory_order_seq_cst);
  thr_epoch_.fetch_add(1, std::memory_order_seq_cst);
  if (percent != 0 && in_run_.load(std::memory_order_seq_cst)) {
    // A guest computing without exits would never see the new setting otherwise.
    std::lock_guard lock(mu_);
    if (!exited_ && !parked_ && thread_.joinable() && !BlockedOnMissingPage()) Kick();
  }
  throttle_wake::WakeAll();  // sleepers re-check: released or changed
}

int64_t Vcpu::ThrottleTick() {
  const int percent = thr_percent_.load(std::memory_order_relaxed);
  const int64_t quantum = thr_quantum_ns_.load(std::memory_order_relaxed);
  if (percent == 0) return -1;
  // Outside KVM_RUN the vCPU checks for itself before it re-enters.
  if (!in_run_.load(std::memory_order_seq_cst) || linux_tid_.load() == 0) return quantum;
  if (thr_epoch_applied_.load(std::memory_order_acquire) ==
      thr_epoch_.load(std::memory_order_acquire)) {
    const int64_t cpu = ClockNs(cpu_clock_);
    if (cpu < 0) return quantum;
    const int64_t wall = MonoNs();
    const int64_t ran = ChargedRunNs(wall - thr_run_start_wall_ns_.load(std::memory_order_relaxed),
                                     cpu - thr_run_start_ns_.load(std::memory_order_relaxed));
    // The charge grows no faster than wall time: waiting `quantum - ran` cannot overshoot.
    if (ran < quantum) return quantum - ran;
  }
  std::lock_guard lock(mu_);
  // Never kick a vCPU waiting for a post-copy page: it runs no guest code anyway and a signal
  // makes the in-kernel fault retry spin on this KVM (see BlockedOnMissingPage).
  if (!exited_ && !parked_ && !BlockedOnMissingPage()) Kick();
  return quantum;
}

Vcpu::ThrottleStats Vcpu::throttle_stats() const {
  ThrottleStats s;
  s.throttled_ns = thr_throttled_ns_.load();
  s.sleeps = thr_sleeps_.load();
  s.irq_wakeups = thr_irq_wakeups_.load();
  s.sleeping = thr_sleeping_.load();
  return s;
}

void Vcpu::ThrottlePoint() {
  const int64_t cpu = ClockNs(CLOCK_THREAD_CPUTIME_ID);
  const int64_t wall = MonoNs();
  const uint32_t epoch = thr_epoch_.load(std::memory_order_acquire);
  if (epoch != thr_epoch_applied_.load(std::memory_order_relaxed)) {
    // New setting: a fresh run phase, nothing owed.
    thr_run_start_ns_.store(cpu, std::memory_order_relaxed);
    thr_run_start_wall_ns_.store(wall, std::memory_order_relaxed);
    thr_debt_ns_ = 0;
    thr_epoch_applied_.store(epoch, std::memory_order_release);
    return;
  }
  const int percent = thr_percent_.load(std::memory_order_relaxed);
  const int64_t ran = ChargedRunNs(wall - thr_run_start_wall_ns_.load(std::memory_order_relaxed),
                                   cpu - thr_run_start_ns_.load(std::memory_order_relaxed));
  if (percent == 0 || ran < thr_quantum_ns_.load(std::memory_order_relaxed)) return;
  ThrottleSleep(percent, ran);
  thr_run_start_ns_.store(ClockNs(CLOCK_THREAD_CPUTIME_ID), std::memory_order_relaxed);
  thr_run_start_wall_ns_.store(MonoNs(), std::memory_order_relaxed);
}

bool Vcpu::ThrottleInterrupted() {
  std::lock_guard lock(mu_);
  return pause_requested_ || stop_requested_;
}

// Sleeps outside KVM_RUN until the planned time passed, or at once when:
//  - an interrupt was raised since the last KVM_RUN began: the unslept rest is owed (added to the
//    debt, capped at max_sleep) rather than forgiven, so a guest with a high interrupt rate still
//    ends up throttled; the cap keeps any single sleep <= max_sleep;
//  - the throttle was released or changed (debt dropped by the new run phase);
//  - pause or stop was requested (the loop then parks or exits).
void Vcpu::ThrottleSleep(int percent, int64_t ran_ns) {
  const int64_t max_sleep = thr_max_sleep_ns_.load(std::memory_order_relaxed);
  const ThrottleSleepPlan plan = PlanThrottleSleep(percent, ran_ns, thr_debt_ns_, max_sleep);
  thr_debt_ns_ = plan.debt_ns;
  const uint32_t epoch = thr_epoch_applied_.load(std::memory_order_relaxed);
  const int64_t start = MonoNs();
  const int64_t deadline = start + plan.sleep_ns;
  thr_sleeps_.fetch_add(1, std::memory_order_relaxed);
  thr_sleeping_.store(true, std::memory_order_seq_cst);
  for (;;) {
    const uint32_t word = throttle_wake::WakeWord();  // before the checks: no lost wake-up
    const int64_t remaining = deadline - MonoNs();
    if (throttle_wake::InterruptGeneration() != irq_seen_) {
      if (remaining > 0) {
        thr_irq_wakeups_.fetch_add(1, std::memory_order_relaxed);
        thr_debt_ns_ = std::min(thr_debt_ns_ + remaining, max_sleep);
      }
      break;
    }
    if (remaining <= 0) break;
    if (thr_epoch_.load(std::memory_order_seq_cst) != epoch) break;
    if (ThrottleInterrupted()) break;
    throttle_wake::Wait(word, remaining);
  }
  thr_sleeping_.store(false, std::memory_order_relaxed);
  thr_throttled_ns_.fetch_add(static_cast<uint64_t>(MonoNs() - start), std::memory_order_relaxed);
}

bool Vcpu::HandleExit() {
  kvm_run* run = run_;
  switch (run->exit_reason) {
    case KVM_EXIT_IO: {
      uint8_t* data = reinterpret_cast<uint8_t*>(run) + run->io.data_offset;
      for (uint32_t i = 0; i < run->io.count; ++i) {
        std::span<uint8_t> chunk(data + i * run->io.size, run->io.size);
        if (run->io.direction == KVM_EXIT_IO_OUT) {
          if (!pio_->Write(run->io.port, chunk) && run->io.port != 0x80)
            LOG_DEBUG("vCPU %d: unhandled port write 0x%x", id(), run->io.port);
        } else if (!pio_->Read(run->io.port, chunk)) {
          LOG_DEBUG("vCPU %d: unhandled port read 0x%x", id(), run->io.port);
        }
      }
      return true;
    }
    case KVM_EXIT_MMIO: {
      uint32_t len = std::min<uint32_t>(run->mmio.len, sizeof(run->mmio.data));
      if (run->mmio.is_write) {
        if (!mmio_->Write(run->mmio.phys_addr, std::span<const uint8_t>(run->mmio.data, len)))
          LOG_DEBUG("vCPU %d: unhandled MMIO write 0x%x", id(), run->mmio.phys_addr);
      } else if (!mmio_->Read(run->mmio.phys_addr, std::span<uint8_t>(run->mmio.data, len))) {
        LOG_DEBUG("vCPU %d: unhandled MMIO read 0x%x", id(), run->mmio.phys_addr);
      }
      return true;
    }
#ifndef KVM_EXIT_DIRTY_RING_FULL
#define KVM_EXIT_DIRTY_RING_FULL 31
#endif
    case KVM_EXIT_DIRTY_RING_FULL:
      if (on_ring_full_) {
        if (absl::Status s = on_ring_full_(id()); !s.ok()) {
          on_stop_({kExitVmmError, absl::StrFormat("vCPU %d: dirty ring: %s", id(), s.message())});
          return false;
        }
        return true;
      }
      on_stop_({kExitVmmError, absl::StrFormat("vCPU %d: dirty ring full, no handler", id())});
      return false;
    case KVM_EXIT_MEMORY_FAULT:
      return HandleMemoryFault();
    case KVM_EXIT_HLT:
      // Only seen without an in-kernel LAPIC; nothing can wake us then.
      on_stop_({kExitOk, absl::StrFormat("vCPU %d halted", id())});
      return false;
    case KVM_EXIT_SHUTDOWN:
      on_stop_({kExitGuestCrash, absl::StrFormat("guest crash: triple fault on vCPU %d\n%s", id(),
                                    DumpRegisters())});
      return false;
    case KVM_EXIT_SYSTEM_EVENT:
      if (run->system_event.type == KVM_SYSTEM_EVENT_CRASH) {
        on_stop_({kExitGuestPanic, absl::StrFormat("guest panic (system event) on vCPU %d", id())});
      } else {
        on_stop_({kExitOk, absl::StrFormat("guest system event %d (shutdown/reset) on vCPU %d",
                                     run->system_event.type, id())});
      }
      return false;
    case KVM_EXIT_INTERNAL_ERROR: {
      std::string data;
      for (uint32_t i = 0; i < run->internal.ndata && i < 16; ++i)
        absl::StrAppendFormat(&data, " 0x%x", run->internal.data[i]);
      on_stop_({kExitKvmError, absl::StrFormat("KVM internal error on vCPU %d: suberror %d, data:%s\n%s",
                                    id(), run->internal.suberror, data, DumpRegisters())});
      return false;
    }
    case KVM_EXIT_FAIL_ENTRY:
      on_stop_({kExitKvmError, absl::StrFormat("KVM entry failed on vCPU %d: hardware reason 0x%x\n%s", id(),
                                    run->fail_entry.hardware_entry_failure_reason,
                                    DumpRegisters())});
      return false;
    default:
      on_stop_({kExitVmmError, absl::StrFormat("vCPU %d: unexpected KVM exit reason %d\n%s", id(),
                                    run->exit_reason, DumpRegisters())});
      return false;
  }
}

bool Vcpu::HandleMemoryFault() {
  const kvm_memory_fault_exit f = *KvmRunMemoryFault(run_);
  // KVM leaves exit_reason alone when a later KVM_RUN fails for another reason: forget this exit
  // so a plain EFAULT afterwards is not taken for a second memory fault.
  run_->exit_reason = KVM_EXIT_UNKNOWN;
  if (!(f.flags & KVM_MEMORY_EXIT_FLAG_USERFAULT)) {
    // Not ours to resolve (e.g. a private/shared mismatch or an unmappable host page).
    on_stop_({kExitKvmError,
              absl::StrFormat("vCPU %d: KVM could not map guest memory: memory fault exit at gpa "
                              "0x%x size 0x%x flags 0x%x (not a userfault)\n%s",
                              id_, f.gpa, f.size, f.flags, DumpRegisters())});
    return false;
  }
  if (!on_memory_fault_) {
    on_stop_({kExitVmmError,
              absl::StrFormat("vCPU %d: post-copy userfault at gpa 0x%x size 0x%x but no memory "
                              "fault handler is installed\n%s",
                              id_, f.gpa, f.size, DumpRegisters())});
    return false;
  }
  // On this thread: the vCPU fetches its own page (no shared fault queue), then re-enters.
  in_fault_handler_.store(true, std::memory_order_release);
  absl::Status s = on_memory_fault_(id_, f.gpa, f.size, f.flags);
  in_fault_handler_.store(false, std::memory_order_release);
  if (!s.ok()) {
    on_stop_({kExitVmmError,
              absl::StrFormat("post-copy: page 0x%x could not be fetched: %s (vCPU %d)", f.gpa,
                              s.message(), id_)});
    return false;
  }
  return true;
}

std::string Vcpu::DumpRegisters() {
  auto regs = source_->GetRegs();
  auto sregs = source_->GetSregs();
  if (!regs.ok() || !sregs.ok()) return "  (registers unavailable)";
  const kvm_regs& r = *regs;
  const kvm_sregs& s = *sregs;
  return absl::StrFormat(
      "  RIP=%016x RSP=%016x RFLAGS=%08x\n"
      "  RAX=%016x RBX=%016x RCX=%016x RDX=%016x\n"
      "  RSI=%016x RDI=%016x RBP=%016x\n"
      "  R8 =%016x R9 =%016x R10=%016x R11=%016x\n"
      "  R12=%016x R13=%016x R14=%016x R15=%016x\n"
      "  CS=%04x(base %x l%d db%d) SS=%04x CR0=%x CR2=%x CR3=%x CR4=%x EFER=%x\n"
      "  GDT=%x/%x IDT=%x/%x",
      r.rip, r.rsp, r.rflags, r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.r8, r.r9, r.r10,
      r.r11, r.r12, r.r13, r.r14, r.r15, s.cs.selector, s.cs.base, s.cs.l, s.cs.db,
      s.ss.selector, s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.gdt.base, s.gdt.limit, s.idt.base,
      s.idt.limit);
}

}  // namespace microvmm
