/* spincount: vCPU 0 counts loop iterations forever in `spin_count`, a 64-bit word in guest RAM
 * the host may read. It first prints `spincount at=0x<address of spin_count>`, then
 * `spincount n=<count>` every 65536 iterations (~6 instructions per iteration, so a few lines per
 * second on the emulating KVM). Never exits; other vCPUs halt. Used by the vCPU throttle KVM test
 * (tests/unit/vcpu_throttle_kvm_test.cc): iterations per second with and without throttling. */
#include "lib/guest.h"

volatile uint64_t spin_count;

int guest_main(uint64_t cpu, uint64_t ncpus, const char* args, uint64_t ram_size) {
  (void)ncpus;
  (void)args;
  (void)ram_size;
  if (cpu != 0) halt_forever();
  gprintf("spincount at=0x%lx\n", (uint64_t)&spin_count);
  for (;;) {
    uint64_t n = spin_count + 1;
    spin_count = n;
    if ((n & 0xffff) == 0) gprintf("spincount n=%lu\n", n);
  }
}
