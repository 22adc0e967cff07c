/* virtiorng: a minimal virtio 1.x PCI driver for the VMM's virtio-rng device (vmm --rng):
 * finds 1af4:1044 on bus 0 via conf1, walks its vendor capabilities, negotiates VERSION_1,
 * sets up queue 0 with 8 entries in RAM at 17 MiB, posts one 64-byte device-writable buffer,
 * notifies, polls the used ring and checks the bytes. Prints "virtio-rng ok len=64 ..." and exits
 * 0. BAR 0 is moved below 4 GiB (to 0xe0200000) if it was placed above. Transport code:
 * lib/virtio.{c,h}.
 *
 * Exit status of the step that failed:
 *   10 no 1af4:1044 on bus 0
 *   11 common or notify capability missing
 *   12 VERSION_1 not offered
 *   13 FEATURES_OK not accepted
 *   14 queue 0 smaller than 8 entries
 *   15 DEVICE_NEEDS_RESET after DRIVER_OK
 *   16 used ring did not advance (10 M polls)
 *   17 used element: len != 64 or id != 0
 *   18 fewer than 16 of the 64 bytes nonzero
 *   19 RAM smaller than 17 MiB + 128 KiB
 *   20 BAR 0 could not be moved below 4 GiB */
#include "lib/guest.h"
#include "lib/virtio.h"

#define RING_BASE 0x1100000ull /* 17 MiB: above the image, below memwalk's region */

int guest_main(uint64_t cpu, uint64_t ncpus, const char* args, uint64_t ram_size) {
  (void)ncpus;
  (void)args;
  if (cpu != 0) return 0;
  if (ram_size < RING_BASE + 0x20000) return 19;
  int bdf = pci_find(VIRTIO_PCI_VENDOR, VIRTIO_PCI_DEVICE_RNG, 0);
  if (bdf < 0) return 10;
  struct virtio_pci vp;
  struct virtq q;
  uint64_t offered;
  int e = virtio_pci_open(&vp, (uint32_t)bdf, 0xe0200000u);
  if (e == VIRTIO_EBAR) return 20;
  if (e != 0) return 11;
  e = virtio_negotiate(&vp, VIRTIO_F_VERSION_1, &offered);
  if (e == VIRTIO_ENOVERSION1) return 12;
  if (e != 0) return 13;
  if (virtq_setup(&vp, &q, 0, 8, RING_BASE) != 0) return 14;
  if (virtio_driver_ok(&vp) != 0) return 15;
  uint64_t buf = RING_BASE + 0x10000;
  /* One descriptor: 64 device-writable bytes. */
  virtq_set_desc(&q, 0, buf, 64, VIRTQ_DESC_F_WRITE, 0);
  virtq_kick(&q, 0);
  uint32_t id, len;
  if (virtq_wait(&q, 10000000, &id, &len) != 0) return 16;
  if (len != 64 || id != 0) return 17;
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
