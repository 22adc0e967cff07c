/* fault: deliberately misbehaves for VMM tests (vCPU 0 acts, other vCPUs halt).
 *   mode=panic              guest_panic("deliberate") -> pvpanic (port 0x505)
 *   mode=triple             zero-limit IDT + ud2 -> triple fault (KVM_EXIT_SHUTDOWN)
 *   mode=exit status=N      test_exit(N) (status default 0)
 *   mode=reset              i8042 "pulse reset line" (0xFE to port 0x64): the VMM exits 0
 * Missing or unknown mode: prints an error and exits 5. */
#include "lib/guest.h"

int guest_main(uint64_t cpu, uint64_t ncpus, const char* args, uint64_t ram_size) {
  (void)ncpus;
  (void)ram_size;
  if (cpu != 0) return 0;
  if (arg_eq(args, "mode", "panic")) {
    guest_panic("deliberate");
  } else if (arg_eq(args, "mode", "triple")) {
    gputs("fault: triple fault\n");
    guest_triple_fault();
  } else if (arg_eq(args, "mode", "exit")) {
    return (int)arg_u64(args, "status", 0);
  } else if (arg_eq(args, "mode", "reset")) {
    gputs("fault: i8042 reset\n");
    outb(0x64, 0xfe);
    /* The VMM stops this vCPU on the reset; reaching here means it did not. */
    gputs("fault: still running after reset\n");
    return 6;
  }
  gprintf("fault: unknown mode (args \"%s\"), want mode=panic|triple|exit|reset\n", args);
  return 5;
}
