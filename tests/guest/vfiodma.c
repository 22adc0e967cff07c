/* vfiodma: drives the DMA engine of the vfio-user test device
 * (tests/vfio/user/test_server/test_device.h, PCI 1234:11f0) attached with
 * `vmm --vfio-user SOCKET`. vCPU 0 only, polled, no interrupts.
 *
 * Args (optional): iters=N (default 3) rounds, len=BYTES (default 9000, at most 60 KiB),
 * wait=N: PCI hotplug mode. The device is not there at boot: print "vfiodma waiting for
 * hotplug", rescan bus 0 up to N times (a short spin between scans) until 1234:11f0 appears
 * (freestanding guests run no AML: a rescan is their hotplug notification), print "vfiodma
 * hotplug seen scans=S", then check the VMM's ACPI hotplug register block (vmm/pci/hotplug.h,
 * port 0xAE00): PCIU has the slot's bit set, and writing that bit clears it (W1C).
 *
 * Each round: fill the source buffer with a pattern that depends on the round, clear the
 * destination, program SRC/DST/LEN/OP=copy and ring the doorbell; poll COMPLETED until it moved by
 * one and check STATUS == done; compare dst with src byte by byte. Then a FILL of dst with a
 * round-dependent byte, checked the same way. The buffers start at odd offsets inside pages so
 * every DMA crosses page boundaries unaligned. Guest-physical = virtual (identity mapping).
 * Success: "vfiodma ok copies=N fills=N" and exit 0. Failures print "vfiodma FAIL ..." and exit:
 *   70 bad args or RAM smaller than 19 MiB
 *   71 no 1234:11f0 function on bus 0
 *   72 BAR 0 absent, I/O, 64-bit above 4 GiB or zero
 *   73 DMA did not complete (COMPLETED did not move within the poll budget)
 *   74 the device reported a DMA error (STATUS == error), or completed with STATUS != done
 *   75 copied data differs from the source
 *   76 filled data differs from the fill byte
 *   77 the scratch register does not read back what was written (BAR access broken)
 *   78 wait=N: the hotplug register's slot bit was not set, or not cleared by writing it */
#include "lib/guest.h"
#include "lib/dmaengine.h"
#include "lib/virtio.h" /* pci_cfg_read/pci_cfg_write/pci_find */

#define VENDOR DMAENGINE_VENDOR
#define DEVICE DMAENGINE_DEVICE

#define BUF_BASE 0x1200000ull           /* 18 MiB: above the image and virtioblk's rings */
#define SRC_ADDR (BUF_BASE + 0x123)      /* unaligned on purpose */
#define DST_ADDR (BUF_BASE + 0x10000 + 0x0a5)
#define MAX_LEN 0xf000u
#define HOTPLUG_PCIU 0xae00 /* vmm/pci/hotplug.h: slots added, write 1 to clear */
#define SPINS 1000000u

#define MMIO64(a) (*(volatile uint64_t*)(uintptr_t)(a))

static uint64_t bar0;

static void reg_write(uint64_t reg, uint64_t v) { MMIO64(bar0 + reg) = v; }
static uint64_t reg_read(uint64_t reg) { return MMIO64(bar0 + reg); }

static int fail(int code, const char* what, uint64_t a, uint64_t b) {
  gprintf("vfiodma FAIL %s (0x%lx 0x%lx)\n", what, a, b);
  return code;
}

/* Rings the doorbell and waits until the completed counter moved past `before`. */
static int run_dma(uint64_t before) {
  compiler_barrier(); /* buffer stores before the doorbell (x86 keeps store order) */
  reg_write(REG_DOORBELL, 1);
  uint32_t spins = 0;
  while (reg_read(REG_COMPLETED) == before) {
    uint64_t st = reg_read(REG_STATUS);
    if (st == STATUS_ERROR) return fail(74, "dma status error", st, before);
    if (++spins >= SPINS) return fail(73, "dma timeout", before, reg_read(REG_STATUS));
    cpu_relax();
  }
  uint64_t st = reg_read(REG_STATUS);
  if (st != STATUS_DONE) return fail(74, "dma status", st, reg_read(REG_COMPLETED));
  compiler_barrier(); /* read the buffers only after the completion */
  return 0;
}

int guest_main(uint64_t cpu, uint64_t ncpus, const char* args, uint64_t ram_size) {
  (void)ncpus;
  if (cpu != 0) return 0;
  uint64_t iters = arg_u64(args, "iters", 3);
  uint64_t len = arg_u64(args, "len", 9000);
  if (len == 0 || len > MAX_LEN || iters == 0)
    return fail(70, "bad args", iters, len);
  if (guest_ram_top(ram_size) < BUF_BASE + 0x100000) return fail(70, "RAM too small", ram_size, 0);

  uint64_t wait = arg_u64(args, "wait", 0);
  int bdf = pci_find(VENDOR, DEVICE, 0);
  if (wait > 0) {
    if (bdf >= 0) return fail(71, "device present before hotplug", (uint64_t)bdf, 0);
    gprintf("vfiodma waiting for hotplug\n");
    uint64_t scans = 0;
    while (bdf < 0 && scans < wait) {
      for (volatile uint32_t i = 0; i < 2000; ++i) cpu_relax();
      bdf = pci_find(VENDOR, DEVICE, 0);
      ++scans;
    }
    if (bdf < 0) return fail(71, "no 1234:11f0 device after scans", scans, 0);
    gprintf("vfiodma hotplug seen scans=%lu\n", scans);
    uint32_t bit = 1u << (bdf >> 3);
    uint32_t up = inl(HOTPLUG_PCIU);
    if (!(up & bit)) return fail(78, "hotplug PCIU bit not set", up, bit);
    outl(HOTPLUG_PCIU, bit);
    up = inl(HOTPLUG_PCIU);
    if (up & bit) return fail(78, "hotplug PCIU bit not cleared", up, bit);
    gprintf("vfiodma hotplug register ok slot=%d\n", bdf >> 3);
  }
  if (bdf < 0) return fail(71, "no 1234:11f0 device", 0, 0);
  uint32_t b = pci_cfg_read((uint32_t)bdf, 0x10);
  uint64_t addr = b & ~0xfull;
  if ((b & 0x6) == 0x4) addr |= (uint64_t)pci_cfg_read((uint32_t)bdf, 0x14) << 32;
  if ((b & 1) || addr == 0 || addr + 0x2000 > 0x100000000ull)
    return fail(72, "bar0", b, addr);
  bar0 = addr;
  /* Memory decoding + bus mastering (the device may only DMA with bus master set). */
  pci_cfg_write((uint32_t)bdf, 0x04, pci_cfg_read((uint32_t)bdf, 0x04) | 0x6);
  gprintf("vfiodma found %02x.%x bar0=0x%lx\n", bdf >> 3, bdf & 7, bar0);

  reg_write(REG_SCRATCH, 0x5a5a0000c3c3ull);
  if (reg_read(REG_SCRATCH) != 0x5a5a0000c3c3ull)
    return fail(77, "scratch readback", reg_read(REG_SCRATCH), 0x5a5a0000c3c3ull);

  volatile uint8_t* src = (volatile uint8_t*)(uintptr_t)SRC_ADDR;
  volatile uint8_t* dst = (volatile uint8_t*)(uintptr_t)DST_ADDR;
  uint64_t copies = 0, fills = 0;
  for (uint64_t it = 0; it < iters; ++it) {
    for (uint64_t i = 0; i < len; ++i) {
      src[i] = (uint8_t)(i * 7 + it * 31 + (i >> 8));
      dst[i] = 0;
    }
    reg_write(REG_SRC, SRC_ADDR);
    reg_write(REG_DST, DST_ADDR);
    reg_write(REG_LEN, len);
    reg_write(REG_OP, OP_COPY);
    int rc = run_dma(reg_read(REG_COMPLETED));
    if (rc != 0) return rc;
    for (uint64_t i = 0; i < len; ++i)
      if (dst[i] != src[i]) return fail(75, "copy mismatch at", i, dst[i]);
    ++copies;

    uint8_t fb = (uint8_t)(0xa0 + it);
    reg_write(REG_OP, OP_FILL);
    reg_write(REG_PATTERN, fb);
    rc = run_dma(reg_read(REG_COMPLETED));
    if (rc != 0) return rc;
    for (uint64_t i = 0; i < len; ++i)
      if (dst[i] != fb) return fail(76, "fill mismatch at", i, dst[i]);
    ++fills;
    gprintf("vfiodma round %lu ok\n", it);
  }
  gprintf("vfiodma ok copies=%lu fills=%lu\n", copies, fills);
  return 0;
}
