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
  // The thread sits in the kernel waiting for a post-copy page (userfaultfd): it runs no guest
  // code until the page arrives. Kicking it is pointless, and on some KVMs (this project's
  // software one) a signal makes the in-kernel fault retry spin, so Pause() leaves it alone.
  bool BlockedOnMissingPage() const;
  void Resume();
  // Asks the thread to exit (from any thread, including this vCPU's own).
  void RequestStop();
  void Join();

  // Human-readable register dump (only valid while paused or stopped, or from the vCPU thread).
  std::string DumpRegisters();

 private:
  void Loop();
  bool HandleExit();  // false: the vCPU must stop
  bool HandleMemoryFault();
  void Kick();

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
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool pause_requested_ = false;
  bool stop_requested_ = false;
  bool parked_ = false;
  bool exited_ = false;
};

// The vCPU whose thread is calling (nullptr on other threads): lets devices attribute an access.
Vcpu* CurrentVcpu();

// Installs the (empty) handler of the signal used to kick vCPUs out of KVM_RUN. Idempotent.
void InstallVcpuKickSignal();

}  // namespace microvmm

#endif  // MICROVMM_VMM_VCPU_H_
