/* pciscan: enumerates PCI bus 0 through configuration mechanism #1 (ports 0xCF8/0xCFC) and
 * prints one line per function found: "pci 00:DD.F VVVV:DDDD class CCCCCC". Ends with
 * "pciscan done N" and exits 0, or exits 2 if no host bridge (class 0x0600) is at 00:00.0. */
#include "lib/guest.h"

static uint32_t conf1_read(uint32_t dev, uint32_t fn, uint32_t reg) {
  outl(0xcf8, 0x80000000u | (dev << 11) | (fn << 8) | (reg & 0xfc));
  return inl(0xcfc);
}

int guest_main(uint64_t cpu, uint64_t ncpus, const char* args, uint64_t ram_size) {
  (void)ncpus;
  (void)args;
  (void)ram_size;
  if (cpu != 0) return 0;
  int found = 0, bridge = 0;
  for (uint32_t dev = 0; dev < 32; ++dev) {
    for (uint32_t fn = 0; fn < 8; ++fn) {
      uint32_t id = conf1_read(dev, fn, 0);
      if ((id & 0xffff) == 0xffff) {
        if (fn == 0) break;
        continue;
      }
      uint32_t cls = conf1_read(dev, fn, 8) >> 8;
      gprintf("pci 00:%x.%u %x:%x class %x\n", dev, fn, id & 0xffff, id >> 16, cls);
      if (dev == 0 && fn == 0 && (cls >> 8) == 0x0600) bridge = 1;
      ++found;
      uint32_t hdr = conf1_read(dev, 0, 0xc) >> 16;
      if (fn == 0 && !(hdr & 0x80)) break; /* not multi-function */
    }
  }
  gprintf("pciscan done %d\n", found);
  return bridge ? 0 : 2;
}
