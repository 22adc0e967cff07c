// One vCPU thread: runs KVM_RUN, dispatches port I/O and MMIO exits to the buses, and can be
// paused (signal + immediate_exit, so a vCPU is really out of KVM_RUN) and stopped.
#ifndef MICROVMM_VMM_VCPU_H_
#define MICROVMM_VMM_VCPU_H_

#include <pthread.h>

#include <condition_variable>
#include <functional>
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

class Vcpu {
 public:
  using StopFn = std::function<void(const VcpuStop&)>;
  // Called on KVM_EXIT_DIRTY_RING_FULL with the vCPU id; non-OK stops the VM.
  using RingFullFn = std::function<absl::Status(int)>;
  Vcpu(KvmVcpu kvm, const Bus* pio, const Bus* mmio, StopFn on_stop, RingFullFn on_ring_full = {});
  ~Vcpu();  // stops and joins

  KvmVcpu& kvm() { return kvm_; }
  int id() const { return kvm_.id(); }

  void Start();
  // Asks the thread to leave KVM_RUN and park. Returns at once; WaitPaused() blocks.
  void RequestPause();
  void WaitPaused();
  void Resume();
  // Asks the thread to exit (from any thread, including this vCPU's own).
  void RequestStop();
  void Join();

  // Human-readable register dump (only valid while paused or stopped, or from the vCPU thread).
  std::string DumpRegisters();

 private:
  void Loop();
  bool HandleExit();  // false: the vCPU must stop
  void Kick();

  KvmVcpu kvm_;
  const Bus* pio_;
  const Bus* mmio_;
  StopFn on_stop_;
  RingFullFn on_ring_full_;
  std::thread thread_;
  std::mutex join_mu_;  // Join() may be called from several threads
  pthread_t tid_{};
  std::mutex mu_;
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
