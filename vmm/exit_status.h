// Process exit statuses of the VMM. A test guest's test-exit status s (0..63) is passed through.
#ifndef MICROVMM_VMM_EXIT_STATUS_H_
#define MICROVMM_VMM_EXIT_STATUS_H_

namespace microvmm {
inline constexpr int kExitOk = 0;             // guest shutdown / reset / API shutdown
inline constexpr int kExitUsage = 1;          // bad command line or configuration
inline constexpr int kExitVmmError = 70;      // the VMM itself failed at run time
inline constexpr int kExitGuestCrash = 71;    // triple fault (KVM_EXIT_SHUTDOWN)
inline constexpr int kExitKvmError = 72;      // KVM internal error / failed entry / emulation failure
inline constexpr int kExitGuestPanic = 73;    // guest wrote to the pvpanic port
inline constexpr int kExitIncomingFailed = 75;  // incoming migration failed; nothing ran here
}  // namespace microvmm

#endif  // MICROVMM_VMM_EXIT_STATUS_H_
