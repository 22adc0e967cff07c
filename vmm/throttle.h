// VcpuThrottle: slows a VM's vCPUs to about P% of wall time outside KVM_RUN (auto-converge for
// live migration) without making them deaf to interrupts. The policy choosing P lives with the
// migration source; this is the mechanism.
//
// Design (per vCPU; the sleeping and accounting are in Vcpu, vmm/vcpu.cc):
//  - A run phase is charged min(wall time, 2 x the vCPU thread's CPU time): a busy vCPU (even
//    one the host gives only half a core) is charged wall time, so it really spends ~P% of wall
//    time outside KVM_RUN, while a guest halted inside KVM_RUN (in-kernel LAPIC) burns no CPU and
//    is neither charged nor kicked for idling. After `quantum` of charged run time the vCPU sleeps
//    P/(100-P) x that (+ debt). A vCPU computing without exits is kicked out of KVM_RUN by this
//    object's timer thread (signal + immediate_exit, like pause); vCPUs blocked on a missing
//    post-copy page are never kicked.
//  - One sleep never exceeds `max_sleep`; the rest is owed (debt, capped at max_sleep). That
//    bounds how late the in-kernel LAPIC timer interrupt (invisible to userspace) can be taken:
//    <= max_sleep (+ the kick latency). To keep P% with short sleeps, the quantum shrinks with P:
//    quantum = clamp(max_sleep x (100-P)/P, min_run, slice). min_run bounds the kick rate; the
//    highest P reachable in full is max_sleep/(max_sleep+min_run) (97% with the defaults).
//  - Interrupts raised by the VMM (MSI-X, IRQ line: NoteInterruptRaised, vmm/throttle_wake.h)
//    end a sleep at once; the vCPU re-enters KVM_RUN and the guest takes the interrupt. The
//    unslept time is owed, not forgiven (a guest with a high interrupt rate would otherwise escape
//    the throttle), within the debt cap (so owing never makes a longer deaf stretch).
//  - SetPercent(0) releases at once: sleeping vCPUs wake, debt is dropped. Pause/stop of a
//    sleeping vCPU act at once (it parks or exits).
#ifndef MICROVMM_VMM_THROTTLE_H_
#define MICROVMM_VMM_THROTTLE_H_

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "vmm/vcpu.h"

namespace microvmm {

struct ThrottleOptions {
  int max_percent = 90;                             // SetPercent caps to this (1..99)
  std::chrono::nanoseconds slice{10'000'000};       // longest run quantum (charged run time)
  // Longest single sleep: bounds how late a LAPIC timer interrupt is taken. 10 ms (one tick at
  // HZ=100) is harmless to guests and keeps the throttle accurate when a loaded host delays the
  // kicks by a few ms (run phases overshoot; what exceeds the debt cap is forgiven).
  std::chrono::nanoseconds max_sleep{10'000'000};
  std::chrono::nanoseconds min_run{250'000};        // shortest run quantum (bounds kick rate)
};

class VcpuThrottle {
 public:
  struct Stats {
    int percent = 0;                          // current (capped) percent
    std::vector<Vcpu::ThrottleStats> vcpus;   // by position in the vector given to Create
  };

  // `vcpus` must outlive this object (destroy it before the vCPUs). Starts the timer thread
  // (idle while the percent is 0). Bad options -> INVALID_ARGUMENT.
  static absl::StatusOr<std::unique_ptr<VcpuThrottle>> Create(std::vector<Vcpu*> vcpus,
                                                              ThrottleOptions options = {});
  ~VcpuThrottle();  // releases the vCPUs and joins the timer thread

  // Any thread. 0 releases at once; values above max_percent are capped; < 0 or > 99 ->
  // INVALID_ARGUMENT (nothing changes). Returns the percent applied.
  absl::StatusOr<int> SetPercent(int percent);
  int percent() const;
  Stats stats() const;

  // The run quantum used at `percent` (exposed for tests).
  static std::chrono::nanoseconds Quantum(int percent, const ThrottleOptions& options);

 private:
  VcpuThrottle(std::vector<Vcpu*> vcpus, ThrottleOptions options);
  void TimerLoop();

  const std::vector<Vcpu*> vcpus_;
  const ThrottleOptions options_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  int percent_ = 0;
  bool changed_ = false;
  bool stop_ = false;
  std::thread timer_;
};

}  // namespace microvmm

#endif  // MICROVMM_VMM_THROTTLE_H_
