/* Hosted shim: runs a guest's code as a normal Linux process for logic tests (-DHOSTED).
 *
 *   NAME_hosted NCPUS "ARGS"
 *
 * vCPUs are threads; serial output goes to stdout; test exit -> process exit status
 * (status & 0xff); pvpanic -> "PVPANIC" on stderr and exit 200; triple fault -> "TRIPLE" and exit
 * 201; all vCPUs halted without an exit -> exit 98; 20 s without an exit -> exit 97.
 * Guest RAM: [16 MiB, HOSTED_RAM_MIB MiB) (default 64) is an anonymous mapping at the same
 * addresses, so guest code can use "physical" pointers there. HOSTED_FILL=1 fills it with 0xa5
 * (not fresh RAM) to exercise memwalk's mismatch path. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "../lib/guest.h"

void guest_run(uint64_t cpu, uint64_t ncpus, const char* args, uint64_t ram_size)
    __attribute__((noreturn));

static __thread uint64_t tls_cpu;
static volatile uint32_t halted;

uint64_t this_cpu(void) { return tls_cpu; }
uint64_t guest_image_end(void) { return 0x200000; }

void halt_forever(void) {
  atomic_inc32(&halted);
  for (;;) pause();
}

void outb(uint16_t port, uint8_t v) {
  if (port == PORT_SERIAL_THR) {
    putchar(v);
  } else if (port == PORT_PVPANIC) {
    fflush(stdout);
    fprintf(stderr, "PVPANIC\n");
    _exit(200);
  }
}

void outl(uint16_t port, uint32_t v) {
  if (port == PORT_TEST_EXIT) {
    fflush(stdout);
    _exit((int)(v & 0xff));
  }
}

uint8_t inb(uint16_t port) { return port == PORT_SERIAL_LSR ? 0x60 : 0xff; }
/* No PCI on the host: config reads see an empty bus. */
uint32_t inl(uint16_t port) { (void)port; return 0xffffffffu; }

void guest_triple_fault(void) {
  fflush(stdout);
  fprintf(stderr, "TRIPLE\n");
  _exit(201);
}

struct vcpu {
  uint64_t cpu, ncpus, ram;
  const char* args;
};

static void* vcpu_thread(void* p) {
  struct vcpu* v = p;
  tls_cpu = v->cpu;
  guest_run(v->cpu, v->ncpus, v->args, v->ram);
}

int main(int argc, char** argv) {
  if (argc != 3) {
    fprintf(stderr, "usage: %s NCPUS ARGS\n", argv[0]);
    return 2;
  }
  uint64_t ncpus = strtoull(argv[1], NULL, 0);
  const char* env = getenv("HOSTED_RAM_MIB");
  uint64_t ram = (env ? strtoull(env, NULL, 0) : 64) << 20;
  if (ram > (16u << 20)) {
    void* want = (void*)(uintptr_t)(16u << 20);
    void* got = mmap(want, ram - (16u << 20), PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE | MAP_NORESERVE, -1, 0);
    if (got != want) {
      perror("mmap guest RAM at 16 MiB");
      return 2;
    }
    env = getenv("HOSTED_FILL");
    if (env && *env == '1') memset(want, 0xa5, ram - (16u << 20));
  }
  setvbuf(stdout, NULL, _IOLBF, 0);
  uint64_t n = ncpus == 0 ? 1 : ncpus;
  if (n > 256) n = 256;
  static struct vcpu vcpus[256];
  for (uint64_t i = 0; i < n; i++) {
    vcpus[i] = (struct vcpu){i, ncpus, ram, argv[2]};
    pthread_t t;
    if (pthread_create(&t, NULL, vcpu_thread, &vcpus[i]) != 0) {
      perror("pthread_create");
      return 2;
    }
  }
  for (int i = 0; i < 2000; i++) {
    struct timespec ts = {0, 10 * 1000 * 1000};
    nanosleep(&ts, NULL);
    if (atomic_load32(&halted) == n) {
      fflush(stdout);
      fprintf(stderr, "all vCPUs halted without a test exit\n");
      _exit(98);
    }
  }
  fflush(stdout);
  fprintf(stderr, "timeout\n");
  _exit(97);
}
