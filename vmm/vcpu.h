// One vCPU thread: runs KVM_RUN, dispatches port I/O and MMIO exits to the buses, and can be
// paused (signal + immediate_exit, so a vCPU is really out of KVM_RUN) and stopped.
#ifndef MICROVMM_VMM_VCPU_H_
#define MICROVMM_VMM_VCPU_H_

#include <pthread.h>
#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <time.h>

#include "vmm/bus.h"
#include "vmm/kvm/kvm.h"

namespace microvmm {

// What a vCPU reports when the guest (or KVM) ends the VM.
struct VcpuStop {
  int status;
  std::string reason;
};

// Where the vCPU loop gets its exits from: KVM_RUN in production (the Vcpu wraps its KvmVcpu),
// a scripted fake in tests. The loop makes one (indirect) Run() call per exit and reads the exit
// from run(), exactly as from KVM.
class ExitSource {
 public:
  virtual ~ExitSource() = default;
  // One KVM_RUN: 0 or -errno, the exit described in run(). Must return -EINTR at once when
  // run()->immediate_exit is set (that is how pause/stop reach the vCPU thread).
  virtual int Run() = 0;
  // Stable for the source's lifetime.
  virtual kvm_run* run() = 0;
  virtual absl::StatusOr<kvm_regs> GetRegs() = 0;
  virtual absl::StatusOr<kvm_sregs> GetSregs() = 0;
};

class Vcpu {
 public:
  using StopFn = std::function<void(const VcpuStop&)>;
  // Called on KVM_EXIT_DIRTY_RING_FULL with the vCPU id; non-OK stops the VM.
  using RingFullFn = std::function<absl::Status(int)>;
  // Post-copy (KVM Userfault): called on the vCPU thread for KVM_EXIT_MEMORY_FAULT with
  // KVM_MEMORY_EXIT_FLAG_USERFAULT. It fetches the page on this vCPU's own lane, installs it and
  // clears its bit in the userfault bitmap; OK re-enters KVM_RUN, an error stops the VM (post-copy
  // is a point of no return: a page that cannot be fetched must never be replaced by zeros).
  // Several vCPUs call it concurrently; it may block, and a stop/pause request is only acted on
  // after it returns (so it should give up when the migration is cancelled). Pause/stop kick the
  // thread with a signal installed without SA_RESTART: its blocking system calls can fail with
  // EINTR and must be retried. `gpa`/`size` are as KVM reports them (not necessarily aligned).
  using MemoryFaultFn =
      std::function<absl::Status(int vcpu_id, uint64_t gpa, uint64_t size, uint64_t flags)>;
  Vcpu(KvmVcpu kvm, const Bus* pio, const Bus* mmio, StopFn on_stop, RingFullFn on_ring_full = {},
       MemoryFaultFn on_memory_fault = {});
  // Test seam: exits come from `source` instead of KVM (no /dev/kvm needed); kvm() must not be
  // called on such a vCPU.
  Vcpu(int id, std::unique_ptr<ExitSource> source, const Bus* pio, const Bus* mmio,
       StopFn on_stop, RingFullFn on_ring_full = {}, MemoryFaultFn on_memory_fault = {});
  ~Vcpu();  // stops and joins

  KvmVcpu& kvm() { return *kvm_; }
  int id() const { return id_; }
  // Linux thread id of the vCPU thread (valid once Start() returned; 0 before): the userfaultfd
  // path attributes faults to vCPUs by tid (UFFD_FEATURE_THREAD_ID).
  pid_t tid() const { return linux_tid_.load(std::memory_order_acquire); }

  // Installs/replaces the memory fault handler; only before Start().
  void SetMemoryFaultHandler(MemoryFaultFn fn) { on_memory_fault_ = std::move(fn); }

  void Start();
  // Asks the thread to leave KVM_RUN and park. Returns at once; WaitPaused() blocks.
  void RequestPause();
  void WaitPaused();
  // Like WaitPaused() with a limit; true if parked (or stopped).
  bool WaitPausedFor(std::chrono::milliseconds timeout);
  // Parked, or stopped?
  bool paused() const;
  // The thread waits for a post-copy page — in the kernel (userfaultfd) or in its memory fault
  // handler (KVM Userfault exit): it runs no guest code until the page arrives. Kicking it is
  // pointless, and on some KVMs (this project's software one) a signal makes the in-kernel fault
  // retry spin, so Pause() leaves it alone; it parks once the page arrived.
  bool BlockedOnMissingPage() const;
  void Resume();
  // Asks the thread to exit (from any thread, including this vCPU's own).
  void RequestStop();
  void Join();

  // ---- Throttling (driven by VcpuThrottle, vmm/throttle.h; see there for the design) ----
  struct ThrottleStats {
    uint64_t throttled_ns = 0;  // wall time spent in throttle sleeps
    uint64_t sleeps = 0;        // throttle sleeps begun
    uint64_t irq_wakeups = 0;   // sleeps cut short (or skipped) because an interrupt was raised
    bool sleeping = false;      // in a throttle sleep right now
  };
  // Any thread. `percent` 0 releases at once (a sleeping vCPU wakes). While throttled, after
  // `run_quantum_ns` of run time (wall time while busy; see ChargedRunNs in vcpu.cc) the vCPU
  // sleeps percent/(100-percent) x that time
  // (plus debt), at most `max_sleep_ns` in one go. A change also kicks the vCPU out of KVM_RUN
  // (unless BlockedOnMissingPage) so it starts a fresh run phase under the new setting.
  void SetThrottle(int percent, int64_t run_quantum_ns, int64_t max_sleep_ns);
  // The throttle's timer thread: kicks the vCPU out of KVM_RUN when it is due for a sleep (never
  // a vCPU blocked on a missing post-copy page). Returns how long (ns of wall time) until it can
  // next be due; -1 when not throttled.
  int64_t ThrottleTick();
  ThrottleStats throttle_stats() const;

  // Human-readable register dump (only valid while paused or stopped, or from the vCPU thread).
  std::string DumpRegisters();

 private:
  void Loop();
  bool HandleExit();  // false: the vCPU must stop
  bool HandleMemoryFault();
  void Kick();
  void ThrottlePoint();  // vCPU thread, before each KVM_RUN
  void ThrottleSleep(int percent, int64_t ran_ns);
  bool ThrottleInterrupted();  // pause or stop requested

  std::unique_ptr<ExitSource> source_;
  KvmVcpu* kvm_;  // the production source's vCPU; nullptr with an injected source
  kvm_run* run_;  // source_->run(), cached for the loop
  int id_;
  const Bus* pio_;
  const Bus* mmio_;
  StopFn on_stop_;
  RingFullFn on_ring_full_;
  MemoryFaultFn on_memory_fault_;
  std::thread thread_;
  std::mutex join_mu_;  // Join() may be called from several threads
  pthread_t pthread_{};
  std::atomic<pid_t> linux_tid_{0};
  std::atomic<bool> in_fault_handler_{false};  // inside on_memory_fault_ (exit-driven post-copy)
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool pause_requested_ = false;
  bool stop_requested_ = false;
  bool parked_ = false;
  bool exited_ = false;

  // Throttle parameters (written by SetThrottle, any thread).
  std::atomic<int> thr_percent_{0};
  std::atomic<int64_t> thr_quantum_ns_{0};
  std::atomic<int64_t> thr_max_sleep_ns_{0};
  std::atomic<uint32_t> thr_epoch_{0};          // bumped by every SetThrottle
  std::atomic<uint32_t> thr_epoch_applied_{0};  // the epoch the vCPU thread last acted on
  // vCPU-thread state shared with the timer thread.
  std::atomic<bool> in_run_{false};             // inside source_->Run()
  std::atomic<int64_t> thr_run_start_ns_{0};    // thread CPU time when this run phase began
  std::atomic<int64_t> thr_run_start_wall_ns_{0};  // CLOCK_MONOTONIC when it began
  clockid_t cpu_clock_{};                       // the vCPU thread's CPU clock (set before tid)
  // vCPU thread only.
  int64_t thr_debt_ns_ = 0;
  uint32_t irq_seen_ = 0;  // throttle_wake::InterruptGeneration() before the last KVM_RUN
  // Stats.
  std::atomic<uint64_t> thr_throttled_ns_{0};
  std::atomic<uint64_t> thr_sleeps_{0};
  std::atomic<uint64_t> thr_irq_wakeups_{0};
  std::atomic<bool> thr_sleeping_{false};
};

// Throttle arithmetic (pure, exposed for tests): after `ran_ns` of run time at `percent`, with
// `debt_ns` still owed, sleep `sleep_ns` now (<= max_sleep_ns) and owe `debt_ns` (<= max_sleep_ns;
// anything beyond is forgiven so a vCPU never catches up in one long deaf stretch).
struct ThrottleSleepPlan {
  int64_t sleep_ns;
  int64_t debt_ns;
};
ThrottleSleepPlan PlanThrottleSleep(int percent, int64_t ran_ns, int64_t debt_ns,
                                    int64_t max_sleep_ns);

// The vCPU whose thread is calling (nullptr on other threads): lets devices attribute an access.
Vcpu* CurrentVcpu();

// Installs the (empty) handler of the signal used to kick vCPUs out of KVM_RUN. Idempotent.
void InstallVcpuKickSignal();

}  // namespace microvmm

#endif  // MICROVMM_VMM_VCPU_H_
