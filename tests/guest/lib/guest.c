/* Portable part of the guest library (used both freestanding and in the hosted test build). */
#include "guest.h"

/* ---- Entry ---- */

void guest_run(uint64_t cpu, uint64_t ncpus, const char* args, uint64_t ram_size)
    __attribute__((noreturn));
void guest_run(uint64_t cpu, uint64_t ncpus, const char* args, uint64_t ram_size) {
  if (args == NULL) args = "";
  if (ncpus == 0 || ncpus > GUEST_MAX_CPUS || cpu >= ncpus) {
    if (cpu == 0) {
      gprintf("guest: unsupported vCPU configuration cpu=%lu ncpus=%lu (max %d)\n",
              (unsigned long)cpu, (unsigned long)ncpus, GUEST_MAX_CPUS);
      test_exit(GUEST_EXIT_BAD_ENTRY);
    }
    halt_forever();
  }
  int rc = guest_main(cpu, ncpus, args, ram_size);
  /* vCPU 0 owns the final status; other vCPUs may only end the test with a failure. */
  if (cpu == 0 || rc != 0) test_exit((uint32_t)rc);
  halt_forever();
}

/* ---- Test exit / panic ---- */

void test_exit(uint32_t status) {
  outl(PORT_TEST_EXIT, status);
  halt_forever();
}

void guest_panic(const char* msg) {
  gprintf("guest panic: cpu=%lu %s\n", (unsigned long)this_cpu(), msg ? msg : "(null)");
  outb(PORT_PVPANIC, 1);
  halt_forever();
}

/* ---- Locks and barriers ---- */

void spin_lock(struct spinlock* l) {
  for (;;) {
    if (__atomic_exchange_n(&l->locked, 1, __ATOMIC_ACQUIRE) == 0) return;
    while (__atomic_load_n(&l->locked, __ATOMIC_RELAXED) != 0) cpu_relax();
  }
}

void spin_unlock(struct spinlock* l) { __atomic_store_n(&l->locked, 0, __ATOMIC_RELEASE); }

void barrier_wait(struct barrier* b, uint32_t n) {
  uint32_t phase = atomic_load32(&b->phase);
  if (atomic_inc32(&b->count) == n) {
    b->count = 0;  // nobody touches count again until phase moves on
    atomic_store32(&b->phase, phase + 1);
  } else {
    while (atomic_load32(&b->phase) == phase) cpu_relax();
  }
}

/* ---- Serial output ---- */

static struct spinlock print_spin;
static volatile uint32_t print_owner; /* this_cpu() + 1 of the holder, 0 if free */
static uint32_t print_depth;

void print_lock(void) {
  uint32_t me = (uint32_t)this_cpu() + 1;
  if (print_owner == me) {
    print_depth++;
    return;
  }
  spin_lock(&print_spin);
  print_owner = me;
  print_depth = 1;
}

void print_unlock(void) {
  if (--print_depth == 0) {
    print_owner = 0;
    spin_unlock(&print_spin);
  }
}

static void raw_putc(char c) {
#ifdef GUEST_SERIAL_POLL_LSR
  /* Bounded wait for THR empty (LSR bit 5); an emulated UART is normally always ready. */
  for (int i = 0; i < 1000 && !(inb(PORT_SERIAL_LSR) & 0x20); i++) cpu_relax();
#endif
  outb(PORT_SERIAL_THR, (uint8_t)c);
}

static void raw_puts(const char* s) {
  while (*s) raw_putc(*s++);
}

void gputc(char c) {
  print_lock();
  raw_putc(c);
  print_unlock();
}

void gputs(const char* s) {
  print_lock();
  raw_puts(s);
  print_unlock();
}

void put_hex(uint64_t v) { gprintf("0x%lx", (unsigned long)v); }
void put_dec(uint64_t v) { gprintf("%lu", (unsigned long)v); }

static void put_num(uint64_t v, unsigned base, bool neg, int width, char pad) {
  char buf[24];
  int n = 0;
  do {
    unsigned d = (unsigned)(v % base);
    buf[n++] = (char)(d < 10 ? '0' + d : 'a' + d - 10);
    v /= base;
  } while (v != 0);
  int len = n + (neg ? 1 : 0);
  if (neg && pad == '0') raw_putc('-');
  for (; len < width; len++) raw_putc(pad);
  if (neg && pad != '0') raw_putc('-');
  while (n > 0) raw_putc(buf[--n]);
}

void gvprintf(const char* fmt, va_list ap) {
  print_lock();
  for (const char* p = fmt; *p; p++) {
    if (*p != '%') {
      raw_putc(*p);
      continue;
    }
    p++;
    char pad = ' ';
    int width = 0;
    int lng = 0;
    if (*p == '0') {
      pad = '0';
      p++;
    }
    while (*p >= '0' && *p <= '9') width = width * 10 + (*p++ - '0');
    while (*p == 'l' || *p == 'z') {
      lng++;
      p++;
    }
    switch (*p) {
      case 'd':
      case 'i': {
        int64_t v = lng ? va_arg(ap, long) : va_arg(ap, int);
        uint64_t mag = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
        put_num(mag, 10, v < 0, width, pad);
        break;
      }
      case 'u':
      case 'x': {
        uint64_t v = lng ? va_arg(ap, unsigned long) : va_arg(ap, unsigned int);
        put_num(v, *p == 'u' ? 10 : 16, false, width, pad);
        break;
      }
      case 'p':
        raw_puts("0x");
        put_num((uint64_t)(uintptr_t)va_arg(ap, void*), 16, false, width, pad);
        break;
      case 's': {
        const char* s = va_arg(ap, const char*);
        if (!s) s = "(null)";
        int len = (int)gstrlen(s);
        for (; len < width; len++) raw_putc(' ');
        raw_puts(s);
        break;
      }
      case 'c':
        raw_putc((char)va_arg(ap, int));
        break;
      case '%':
        raw_putc('%');
        break;
      case '\0':
        p--;  // lone '%' at the end
        break;
      default:
        raw_putc('%');
        raw_putc(*p);
        break;
    }
  }
  print_unlock();
}

void gprintf(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  gvprintf(fmt, ap);
  va_end(ap);
}

/* ---- Arguments ---- */

size_t gstrlen(const char* s) {
  size_t n = 0;
  while (s[n]) n++;
  return n;
}

static bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

const char* arg_get(const char* args, const char* key, size_t* len) {
  if (!args || !key) return NULL;
  size_t klen = gstrlen(key);
  const char* p = args;
  for (;;) {
    while (is_space(*p)) p++;
    if (!*p) return NULL;
    const char* tok = p;
    while (*p && !is_space(*p)) p++;
    size_t tlen = (size_t)(p - tok);
    if (tlen >= klen && memcmp(tok, key, klen) == 0) {
      if (tlen == klen) {
        if (len) *len = 0;
        return tok + klen;
      }
      if (tok[klen] == '=') {
        if (len) *len = tlen - klen - 1;
        return tok + klen + 1;
      }
    }
  }
}

bool arg_eq(const char* args, const char* key, const char* value) {
  size_t len;
  const char* v = arg_get(args, key, &len);
  if (!v) return false;
  size_t vlen = gstrlen(value);
  return vlen == len && memcmp(v, value, len) == 0;
}

uint64_t arg_u64(const char* args, const char* key, uint64_t def) {
  size_t len;
  const char* v = arg_get(args, key, &len);
  if (!v || len == 0) return def;
  unsigned base = 10;
  if (len > 2 && v[0] == '0' && (v[1] == 'x' || v[1] == 'X')) {
    base = 16;
    v += 2;
    len -= 2;
  }
  uint64_t r = 0;
  for (size_t i = 0; i < len; i++) {
    char c = v[i];
    unsigned d;
    if (c >= '0' && c <= '9') {
      d = (unsigned)(c - '0');
    } else if (base == 16 && c >= 'a' && c <= 'f') {
      d = (unsigned)(c - 'a' + 10);
    } else if (base == 16 && c >= 'A' && c <= 'F') {
      d = (unsigned)(c - 'A' + 10);
    } else {
      return def;
    }
    r = r * base + d;
  }
  return r;
}
