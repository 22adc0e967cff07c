/* idle: vCPU 0 prints "idle" then every vCPU halts forever with interrupts off. The guest of
 * benchmarks that migrate RAM prefilled by the VMM (`vmm --prefill`): it never writes memory. */
#include "lib/guest.h"

int guest_main(uint64_t cpu, uint64_t ncpus, const char* args, uint64_t ram_size) {
  (void)ncpus;
  (void)args;
  (void)ram_size;
  if (cpu == 0) gputs("idle\n");
  halt_forever();
}
