/* hello: vCPU 0 prints "hello from guest" and exits 0; other vCPUs halt. */
#include "lib/guest.h"

int guest_main(uint64_t cpu, uint64_t ncpus, const char* args, uint64_t ram_size) {
  (void)ncpus;
  (void)args;
  (void)ram_size;
  if (cpu == 0) gputs("hello from guest\n");
  return 0;  // vCPU 0: test_exit(0); others: halt forever
}
