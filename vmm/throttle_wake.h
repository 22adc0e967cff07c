// Process-wide "an interrupt was raised" signal for throttled vCPUs (vmm/throttle.h).
//
// A throttled vCPU sleeps outside KVM_RUN. Any interrupt the VMM raises while it sleeps must end
// that sleep at once so the guest takes it promptly (the vCPU re-enters KVM_RUN, where KVM injects
// it). Every interrupt source of the VMM calls NoteInterruptRaised() right after raising one:
// MsixTable::Trigger (irqfd eventfd write) and KvmVm::IrqLine(level = true). The in-kernel LAPIC
// timer cannot be seen from userspace; throttle sleeps are bounded instead (see throttle.h).
//
// Lock-free: two counters and a futex. Cost without sleepers: two atomic increments and a load.
// It is process-wide, not per VM: an interrupt of another VM in the same process only wakes a
// sleeper early (a shorter throttle sleep), never the other way round.
#ifndef MICROVMM_VMM_THROTTLE_WAKE_H_
#define MICROVMM_VMM_THROTTLE_WAKE_H_

#include <cstdint>

namespace microvmm {

// Call after raising a guest interrupt (from any thread, including signal-free hot paths).
void NoteInterruptRaised();

namespace throttle_wake {

// Bumped by every NoteInterruptRaised().
uint32_t InterruptGeneration();
// Bumped by NoteInterruptRaised() and WakeAll(); sleepers wait for it to change.
uint32_t WakeWord();
// Wakes every sleeper so it re-checks its conditions (pause, stop, throttle change).
void WakeAll();
// Blocks until WakeWord() != `seen`, `timeout_ns` passed, or a signal arrived (the caller
// re-checks its conditions in a loop). Protocol, free of lost wake-ups: read WakeWord(), then
// check the conditions, then Wait() with the value read.
void Wait(uint32_t seen, int64_t timeout_ns);

}  // namespace throttle_wake
}  // namespace microvmm

#endif  // MICROVMM_VMM_THROTTLE_WAKE_H_
