/* smp: every vCPU counts to `iters` (default 1000) in its own slot and prints
 * "cpu N count M"; vCPU 0 waits for all, checks every slot and prints "smp ok ncpus=N" (exit 0)
 * or "smp FAIL cpu=N count=M expected=I" (exit 2). */
#include "lib/guest.h"

struct slot {
  volatile uint64_t count;
  char pad[56];  // one cache line per vCPU
};

static struct slot counters[GUEST_MAX_CPUS] __attribute__((aligned(64)));
static volatile uint32_t done;

int guest_main(uint64_t cpu, uint64_t ncpus, const char* args, uint64_t ram_size) {
  (void)ram_size;
  uint64_t iters = arg_u64(args, "iters", 1000);

  for (uint64_t i = 0; i < iters; i++) counters[cpu].count++;
  gprintf("cpu %lu count %lu\n", (unsigned long)cpu, (unsigned long)counters[cpu].count);
  atomic_inc32(&done);

  if (cpu != 0) return 0;
  while (atomic_load32(&done) != ncpus) cpu_relax();
  for (uint64_t c = 0; c < ncpus; c++) {
    if (counters[c].count != iters) {
      gprintf("smp FAIL cpu=%lu count=%lu expected=%lu\n", (unsigned long)c,
              (unsigned long)counters[c].count, (unsigned long)iters);
      return 2;
    }
  }
  gprintf("smp ok ncpus=%lu\n", (unsigned long)ncpus);
  return 0;
}
