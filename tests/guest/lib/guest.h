/* Freestanding test-guest library: serial output, test exit, panic, args, locks, barriers.
 *
 * Contract with the VMM (summary; see tests/guest/README.md):
 *   - flat binary linked at 0x100000, entry = first byte; all vCPUs enter at once in 64-bit long
 *     mode, first 4 GiB identity mapped, interrupts off, RSP = 0;
 *   - RDI = vCPU index, RSI = vCPU count, RDX = args string (guest-physical), RCX = RAM size;
 *   - serial THR at 0x3f8, test exit = outl(0xf4, status), pvpanic = outb(0x505, x).
 *
 * A guest defines guest_main(). Its return value: on vCPU 0 it always ends the test
 * (test_exit(rc)); on any other vCPU a nonzero value ends the test with that status, zero makes
 * the vCPU halt forever. So "vCPU 0 owns success, anyone may report failure".
 *
 * Output lines end with "\n" only (no "\r"). gprintf() is line-atomic with respect to other
 * vCPUs (it holds the print lock for the whole call); print_lock()/print_unlock() group several
 * calls into one atomic unit (the lock is recursive per vCPU). */
#ifndef TESTS_GUEST_LIB_GUEST_H_
#define TESTS_GUEST_LIB_GUEST_H_

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define GUEST_MAX_CPUS 64
#define GUEST_STACK_SIZE 16384
#define GUEST_LOAD_ADDR 0x100000ull
#define GUEST_RAM_LIMIT (3ull << 30) /* RAM above 3 GiB is not contiguous: ignore it. */

#define PORT_SERIAL_THR 0x3f8
#define PORT_SERIAL_LSR 0x3fd
#define PORT_TEST_EXIT 0xf4
#define PORT_PVPANIC 0x505

/* Exit status used by the library itself when the entry state is unusable (vCPU count 0 or
 * above GUEST_MAX_CPUS, vCPU index >= count). */
#define GUEST_EXIT_BAD_ENTRY 63

/* Implemented by each guest. */
int guest_main(uint64_t cpu, uint64_t ncpus, const char* args, uint64_t ram_size);

/* ---- CPU helpers ---- */
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline void compiler_barrier(void) { __asm__ volatile("" ::: "memory"); }
void halt_forever(void) __attribute__((noreturn));
/* Index of the calling vCPU (derived from the stack pointer; valid anywhere in guest code). */
uint64_t this_cpu(void);
/* Address just past the image including bss (the linker's __bss_end). */
uint64_t guest_image_end(void);
/* Usable RAM top: min(ram_size, 3 GiB). */
static inline uint64_t guest_ram_top(uint64_t ram_size) {
  return ram_size < GUEST_RAM_LIMIT ? ram_size : GUEST_RAM_LIMIT;
}

/* ---- Port I/O (the hosted test build replaces these) ---- */
#ifndef HOSTED
static inline void outb(uint16_t port, uint8_t v) {
  __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port) : "memory");
}
static inline void outl(uint16_t port, uint32_t v) {
  __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(port) : "memory");
}
static inline uint8_t inb(uint16_t port) {
  uint8_t v;
  __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port) : "memory");
  return v;
}
static inline uint32_t inl(uint16_t port) {
  uint32_t v;
  __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port) : "memory");
  return v;
}
#else
void outb(uint16_t port, uint8_t v);
void outl(uint16_t port, uint32_t v);
uint8_t inb(uint16_t port);
uint32_t inl(uint16_t port);
#endif

/* ---- Test exit / panic ---- */
void test_exit(uint32_t status) __attribute__((noreturn));
/* Prints "guest panic: <msg>" (cpu number included), writes the pvpanic port, halts. */
void guest_panic(const char* msg) __attribute__((noreturn));
/* Loads a zero-limit IDT and executes ud2: #UD -> #GP -> #DF -> triple fault (shutdown). */
void guest_triple_fault(void) __attribute__((noreturn));

/* ---- Serial output ---- */
void print_lock(void);   /* recursive per vCPU */
void print_unlock(void);
void gputc(char c);                /* locked, single byte */
void gputs(const char* s);         /* locked, no newline appended */
void put_hex(uint64_t v);          /* "0x..." lower-case, no padding */
void put_dec(uint64_t v);
/* printf subset: %s %c %d %i %u %x %p %% with optional '0' flag, width and 'l'/'ll'/'z'
 * length modifiers (%ld %lu %lx %llx %zu %016lx ...). Line-atomic across vCPUs. */
void gprintf(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void gvprintf(const char* fmt, va_list ap);

/* ---- Argument string: space separated key=value tokens, e.g. "mib=8 gens=3" ---- */
/* Value of key as an unsigned number (decimal, or hex with 0x prefix); def if absent or bad. */
uint64_t arg_u64(const char* args, const char* key, uint64_t def);
/* Pointer to the value of key (not NUL-terminated: ends at space/NUL) and its length; NULL if
 * absent. A bare "key" token yields an empty value. */
const char* arg_get(const char* args, const char* key, size_t* len);
/* True if key is present and its value equals value exactly. */
bool arg_eq(const char* args, const char* key, const char* value);

/* ---- Atomics and barriers ---- */
static inline uint32_t atomic_inc32(volatile uint32_t* p) { /* returns the new value */
  return __atomic_add_fetch(p, 1, __ATOMIC_SEQ_CST);
}
static inline uint32_t atomic_load32(const volatile uint32_t* p) {
  return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
static inline void atomic_store32(volatile uint32_t* p, uint32_t v) {
  __atomic_store_n(p, v, __ATOMIC_RELEASE);
}

/* Reusable (sense-reversing) barrier; zero-initialised is ready to use. */
struct barrier {
  volatile uint32_t count;
  volatile uint32_t phase;
};
/* Waits until n vCPUs have called barrier_wait on b for the current phase. */
void barrier_wait(struct barrier* b, uint32_t n);

/* Spinlock (zero = unlocked). */
struct spinlock {
  volatile uint32_t locked;
};
void spin_lock(struct spinlock* l);
void spin_unlock(struct spinlock* l);

/* ---- Minimal libc pieces gcc may call implicitly ---- */
#ifdef HOSTED
#include <string.h>
#else
void* memset(void* d, int c, size_t n);
void* memcpy(void* d, const void* s, size_t n);
void* memmove(void* d, const void* s, size_t n);
int memcmp(const void* a, const void* b, size_t n);
#endif
size_t gstrlen(const char* s);

#endif /* TESTS_GUEST_LIB_GUEST_H_ */
