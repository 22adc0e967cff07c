/* Freestanding-only parts of the guest library: stacks, entry, halting, image bounds, memset
 * and friends. The hosted test build (tests/guest/hosted/shim.c) replaces this file. */
#include "guest.h"

/* Per-vCPU stacks, in bss (zeroed by the VMM). start.S indexes them by the RDI value. */
__attribute__((aligned(4096))) char guest_stacks[GUEST_MAX_CPUS][GUEST_STACK_SIZE];

extern char __bss_end[];

void guest_run(uint64_t cpu, uint64_t ncpus, const char* args, uint64_t ram_size)
    __attribute__((noreturn));

/* Called from start.S on this vCPU's stack. */
void guest_entry(uint64_t cpu, uint64_t ncpus, const char* args, uint64_t ram_size)
    __attribute__((noreturn, used));
void guest_entry(uint64_t cpu, uint64_t ncpus, const char* args, uint64_t ram_size) {
  guest_run(cpu, ncpus, args, ram_size);
}

uint64_t this_cpu(void) {
  uint64_t sp;
  __asm__ volatile("mov %%rsp, %0" : "=r"(sp));
  return (sp - (uint64_t)(uintptr_t)guest_stacks) / GUEST_STACK_SIZE;
}

uint64_t guest_image_end(void) { return (uint64_t)(uintptr_t)__bss_end; }

void halt_forever(void) {
  for (;;) __asm__ volatile("cli; hlt" ::: "memory");
}

void guest_triple_fault(void) {
  struct __attribute__((packed)) {
    uint16_t limit;
    uint64_t base;
  } idtr = {0, 0};
  __asm__ volatile("lidt %0; ud2" ::"m"(idtr) : "memory");
  halt_forever(); /* not reached */
}

/* gcc may emit calls to these even with -ffreestanding. Byte loops: they are not hot. */
void* memset(void* d, int c, size_t n) {
  unsigned char* p = d;
  while (n--) *p++ = (unsigned char)c;
  return d;
}

void* memcpy(void* d, const void* s, size_t n) {
  unsigned char* dp = d;
  const unsigned char* sp = s;
  while (n--) *dp++ = *sp++;
  return d;
}

void* memmove(void* d, const void* s, size_t n) {
  unsigned char* dp = d;
  const unsigned char* sp = s;
  if (dp < sp) {
    while (n--) *dp++ = *sp++;
  } else {
    while (n--) dp[n] = sp[n];
  }
  return d;
}

int memcmp(const void* a, const void* b, size_t n) {
  const unsigned char* x = a;
  const unsigned char* y = b;
  for (size_t i = 0; i < n; i++) {
    if (x[i] != y[i]) return x[i] < y[i] ? -1 : 1;
  }
  return 0;
}
