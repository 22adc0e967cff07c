/* virtiorng: a minimal virtio 1.x PCI driver for the VMM's virtio-rng device (vmm --rng):
 * finds 1af4:1044 on bus 0 via conf1, walks its vendor capabilities, negotiates VERSION_1,
 * sets up queue 0 with 8 entries in RAM at 17 MiB, posts one 64-byte device-writable buffer,
 * notifies, polls the used ring and checks the bytes. Prints "virtio-rng ok len=64 ..." and exits
 * 0; exits 10..20 on the step that failed. BAR 0 is moved below 4 GiB if it was placed above. */
#include "lib/guest.h"

#define RING_BASE 0x1100000ull /* 17 MiB: above the image, below memwalk's region */

static uint32_t cfg_read(uint32_t dev, uint32_t reg) {
  outl(0xcf8, 0x80000000u | (dev << 11) | (reg & 0xfc));
  return inl(0xcfc);
}
static void cfg_write(uint32_t dev, uint32_t reg, uint32_t v) {
  outl(0xcf8, 0x80000000u | (dev << 11) | (reg & 0xfc));
  outl(0xcfc, v);
}
#define MMIO8(a) (*(volatile uint8_t*)(uintptr_t)(a))
#define MMIO16(a) (*(volatile uint16_t*)(uintptr_t)(a))
#define MMIO32(a) (*(volatile uint32_t*)(uintptr_t)(a))

int guest_main(uint64_t cpu, uint64_t ncpus, const char* args, uint64_t ram_size) {
  (void)ncpus;
  (void)args;
  if (cpu != 0) return 0;
  if (ram_size < RING_BASE + 0x20000) return 19;
  uint32_t dev = 32;
  for (uint32_t d = 0; d < 32; ++d)
    if (cfg_read(d, 0) == 0x10441af4u) dev = d;
  if (dev == 32) return 10;
  uint64_t bar = (cfg_read(dev, 0x10) & ~0xfull) | ((uint64_t)cfg_read(dev, 0x14) << 32);
  if (bar + 0x8000 > 0x100000000ull) {
    /* Our page tables map only the first 4 GiB: move BAR 0 into the 32-bit window, as firmware
     * may, with memory decode off while it changes. */
    cfg_write(dev, 0x04, cfg_read(dev, 0x04) & ~0x2u);
    cfg_write(dev, 0x10, 0xe0200000u | (cfg_read(dev, 0x10) & 0xf));
    cfg_write(dev, 0x14, 0);
    bar = cfg_read(dev, 0x10) & ~0xfull;
    if (bar != 0xe0200000u) return 20;
  }
  cfg_write(dev, 0x04, cfg_read(dev, 0x04) | 0x6); /* memory decode + bus master */
  uint64_t common = 0, notify = 0;
  uint32_t notify_mult = 0;
  for (uint32_t cap = cfg_read(dev, 0x34) & 0xfc; cap != 0; cap = (cfg_read(dev, cap) >> 8) & 0xfc) {
    uint32_t w0 = cfg_read(dev, cap);
    if ((w0 & 0xff) != 0x09) continue; /* vendor-specific */
    uint32_t type = w0 >> 24, off = cfg_read(dev, cap + 8);
    if (type == 1) common = bar + off;
    if (type == 2) {
      notify = bar + off;
      notify_mult = cfg_read(dev, cap + 16);
    }
  }
  if (common == 0 || notify == 0) return 11;
  MMIO8(common + 0x14) = 0;     /* reset */
  MMIO8(common + 0x14) = 1;     /* ACKNOWLEDGE */
  MMIO8(common + 0x14) = 1 | 2; /* DRIVER */
  MMIO32(common + 0x00) = 1;
  if (!(MMIO32(common + 0x04) & 1)) return 12; /* VERSION_1 offered */
  MMIO32(common + 0x08) = 1;
  MMIO32(common + 0x0c) = 1; /* VERSION_1 */
  MMIO32(common + 0x08) = 0;
  MMIO32(common + 0x0c) = 0;
  MMIO8(common + 0x14) = 1 | 2 | 8; /* FEATURES_OK */
  if (!(MMIO8(common + 0x14) & 8)) return 13;
  MMIO16(common + 0x16) = 0; /* queue_select */
  if (MMIO16(common + 0x18) < 8) return 14;
  MMIO16(common + 0x18) = 8;
  uint64_t desc = RING_BASE, avail = RING_BASE + 0x1000, used = RING_BASE + 0x2000;
  uint64_t buf = RING_BASE + 0x10000;
  MMIO32(common + 0x20) = (uint32_t)desc;
  MMIO32(common + 0x24) = (uint32_t)(desc >> 32);
  MMIO32(common + 0x28) = (uint32_t)avail;
  MMIO32(common + 0x2c) = (uint32_t)(avail >> 32);
  MMIO32(common + 0x30) = (uint32_t)used;
  MMIO32(common + 0x34) = (uint32_t)(used >> 32);
  MMIO16(common + 0x1a) = 0xffff; /* no MSI-X vector: poll */
  uint16_t notify_off = MMIO16(common + 0x1e);
  MMIO16(common + 0x1c) = 1;        /* queue_enable */
  MMIO8(common + 0x14) = 1 | 2 | 8 | 4; /* DRIVER_OK */
  if (MMIO8(common + 0x14) & 0x40) return 15; /* DEVICE_NEEDS_RESET */
  /* One descriptor: 64 device-writable bytes. */
  volatile uint64_t* d = (volatile uint64_t*)(uintptr_t)desc;
  d[0] = buf;
  d[1] = 64u | ((uint64_t)2 << 32); /* len, flags = WRITE, next = 0 */
  volatile uint16_t* a = (volatile uint16_t*)(uintptr_t)avail;
  a[0] = 0;
  a[2] = 0; /* ring[0] = head 0 */
  compiler_barrier();
  a[1] = 1; /* idx */
  compiler_barrier();
  MMIO16(notify + (uint64_t)notify_off * notify_mult) = 0;
  volatile uint16_t* u = (volatile uint16_t*)(uintptr_t)used;
  for (uint32_t spin = 0; u[1] != 1; ++spin)
    if (spin > 10000000) return 16;
  uint32_t len = *(volatile uint32_t*)(uintptr_t)(used + 8);
  if (len != 64) return 17;
  const volatile uint8_t* b = (const volatile uint8_t*)(uintptr_t)buf;
  uint32_t sum = 0, nonzero = 0;
  for (int i = 0; i < 64; ++i) {
    sum = sum * 31 + b[i];
    nonzero += b[i] != 0;
  }
  if (nonzero < 16) return 18; /* 64 random bytes are not mostly zero */
  gprintf("virtio-rng ok len=%u nonzero=%u sum=%x\n", len, nonzero, sum);
  return 0;
}
