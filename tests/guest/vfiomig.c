/* vfiomig: keeps the DMA engine of the vfio-user test device (tests/vfio/user/test_server,
 * PCI 1234:11f0) busy writing guest RAM while the VM is live-migrated, and checks after every
 * generation that each page the DEVICE wrote holds what it wrote, and that the device's own
 * state (its completed-DMA counter and scratch register) went along. vCPU 0 only, polled.
 *
 * The CPU never writes the DMA region, it only reads it: a page the device wrote reaches the
 * destination only if the VMM's migration merged the device's DMA dirty log (a CPU dirty log
 * cannot see those writes). Each generation G: for every page p of the region, one FILL DMA of
 * the whole page with byte (G*13 + p) & 0xff; then every byte of every page is compared. A
 * migration in the middle of a generation leaves pages filled on the source that are verified on
 * the destination: a page sent before its last DMA and not sent again reads as the previous
 * generation's byte.
 *
 * Args: pages=N (default 256, at most 2048) pages in the region, gens=N generations (default 0:
 * forever), every=N print a line every N generations (default 1), wait=N: the device may be
 * hot-attached after boot: print "vfiomig waiting for hotplug" and rescan bus 0 up to N times.
 * Output: "vfiomig found ..." once, "vfiomig gen=G ok completed=C" per generation (C = the device's
 * completed counter, which must equal the DMAs this guest issued: a device whose state did not
 * migrate starts again at 0), "vfiomig done gens=G" after gens=N. Failures print
 * "vfiomig FAIL ..." and exit:
 *   70 bad args or RAM too small   71 no 1234:11f0 function   72 bad BAR 0
 *   73 a DMA did not complete       74 DMA error status
 *   75 a DMA-written byte differs   76 completed counter differs  77 scratch register differs */
#include "lib/guest.h"
#include "lib/dmaengine.h"
#include "lib/virtio.h" /* pci_cfg_read/pci_cfg_write/pci_find */

#define VENDOR DMAENGINE_VENDOR
#define DEVICE DMAENGINE_DEVICE

#define REGION 0x1400000ull /* 20 MiB: above the image */
#define PAGE 4096ull
#define MAX_PAGES 2048ull
#define SCRATCH_VALUE 0x6d69677261746521ull
#define SPINS 10000000u

#define MMIO64(a) (*(volatile uint64_t*)(uintptr_t)(a))

static uint64_t bar0;

static void reg_write(uint64_t reg, uint64_t v) { MMIO64(bar0 + reg) = v; }
static uint64_t reg_read(uint64_t reg) { return MMIO64(bar0 + reg); }

static int fail(int code, const char* what, uint64_t a, uint64_t b, uint64_t c) {
  gprintf("vfiomig FAIL %s (0x%lx 0x%lx 0x%lx)\n", what, a, b, c);
  return code;
}

int guest_main(uint64_t cpu, uint64_t ncpus, const char* args, uint64_t ram_size) {
  (void)ncpus;
  if (cpu != 0) return 0;
  uint64_t pages = arg_u64(args, "pages", 256);
  uint64_t gens = arg_u64(args, "gens", 0);
  uint64_t every = arg_u64(args, "every", 1);
  if (pages == 0 || pages > MAX_PAGES || every == 0) return fail(70, "bad args", pages, every, 0);
  if (guest_ram_top(ram_size) < REGION + pages * PAGE)
    return fail(70, "RAM too small", ram_size, pages, 0);
  int bdf = pci_find(VENDOR, DEVICE, 0);
  uint64_t wait = arg_u64(args, "wait", 0);
  if (wait > 0 && bdf < 0) {
    /* Hot-attach: rescan bus 0 until the device appears (a freestanding guest runs no AML). */
    gprintf("vfiomig waiting for hotplug\n");
    for (uint64_t scans = 0; bdf < 0 && scans < wait; ++scans) {
      for (volatile uint32_t i = 0; i < 2000; ++i) cpu_relax();
      bdf = pci_find(VENDOR, DEVICE, 0);
    }
  }
  if (bdf < 0) return fail(71, "no 1234:11f0 device", 0, 0, 0);
  uint32_t b = pci_cfg_read((uint32_t)bdf, 0x10);
  uint64_t addr = b & ~0xfull;
  if ((b & 0x6) == 0x4) addr |= (uint64_t)pci_cfg_read((uint32_t)bdf, 0x14) << 32;
  if ((b & 1) || addr == 0 || addr + 0x2000 > 0x100000000ull) return fail(72, "bar0", b, addr, 0);
  bar0 = addr;
  pci_cfg_write((uint32_t)bdf, 0x04, pci_cfg_read((uint32_t)bdf, 0x04) | 0x6);
  reg_write(REG_SCRATCH, SCRATCH_VALUE);
  uint64_t issued = reg_read(REG_COMPLETED);
  gprintf("vfiomig found %02x.%x bar0=0x%lx pages=%lu completed=%lu\n", bdf >> 3, bdf & 7, bar0,
          pages, issued);

  reg_write(REG_LEN, PAGE);
  reg_write(REG_OP, OP_FILL);
  volatile uint8_t* region = (volatile uint8_t*)(uintptr_t)REGION;
  for (uint64_t g = 1; gens == 0 || g <= gens; ++g) {
    for (uint64_t p = 0; p < pages; ++p) {
      /* LEN and OP stay programmed; the device's state carries them across a migration. */
      reg_write(REG_DST, REGION + p * PAGE);
      reg_write(REG_PATTERN, (g * 13 + p) & 0xff);
      compiler_barrier();
      reg_write(REG_DOORBELL, 1);
      ++issued;
      uint32_t spins = 0;
      uint64_t done;
      while ((done = reg_read(REG_COMPLETED)) < issued) {
        uint64_t st = reg_read(REG_STATUS);
        if (st == STATUS_ERROR) return fail(74, "dma status error", g, p, st);
        if (++spins >= SPINS) return fail(73, "dma timeout", g, p, done);
        cpu_relax();
      }
      if (done != issued) return fail(76, "completed counter", g, issued, done);
      uint64_t st = reg_read(REG_STATUS);
      if (st != STATUS_DONE) return fail(74, "dma status", g, p, st);
    }
    compiler_barrier();
    for (uint64_t p = 0; p < pages; ++p) {
      const uint8_t want = (uint8_t)((g * 13 + p) & 0xff);
      volatile uint64_t* w = (volatile uint64_t*)(region + p * PAGE);
      const uint64_t want8 = 0x0101010101010101ull * want;
      for (uint64_t i = 0; i < PAGE / 8; ++i)
        if (w[i] != want8) return fail(75, "dma-written page differs", g, REGION + p * PAGE + i * 8, w[i]);
    }
    if (reg_read(REG_SCRATCH) != SCRATCH_VALUE)
      return fail(77, "scratch register", g, reg_read(REG_SCRATCH), SCRATCH_VALUE);
    if (g % every == 0) gprintf("vfiomig gen=%lu ok completed=%lu\n", g, issued);
  }
  gprintf("vfiomig done gens=%lu\n", gens);
  return 0;
}
