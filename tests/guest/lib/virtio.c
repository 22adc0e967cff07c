/* Minimal virtio 1.x PCI driver pieces for the test guests (see virtio.h). */
#include "virtio.h"

/* struct virtio_pci_common_cfg field offsets (virtio 1.x 4.1.4.3). */
#define COMMON_DFSELECT 0x00
#define COMMON_DF 0x04
#define COMMON_GFSELECT 0x08
#define COMMON_GF 0x0c
#define COMMON_STATUS 0x14
#define COMMON_CFGGEN 0x15
#define COMMON_Q_SELECT 0x16
#define COMMON_Q_SIZE 0x18
#define COMMON_Q_MSIX 0x1a
#define COMMON_Q_ENABLE 0x1c
#define COMMON_Q_NOFF 0x1e
#define COMMON_Q_DESC 0x20
#define COMMON_Q_AVAIL 0x28
#define COMMON_Q_USED 0x30

/* virtio_pci_cap cfg_type values. */
#define CAP_COMMON 1
#define CAP_NOTIFY 2
#define CAP_DEVICE 4

uint32_t pci_cfg_read(uint32_t bdf, uint32_t reg) {
  outl(0xcf8, 0x80000000u | (bdf << 8) | (reg & 0xfc));
  return inl(0xcfc);
}

void pci_cfg_write(uint32_t bdf, uint32_t reg, uint32_t v) {
  outl(0xcf8, 0x80000000u | (bdf << 8) | (reg & 0xfc));
  outl(0xcfc, v);
}

int pci_find(uint16_t vendor, uint16_t device, uint32_t nth) {
  uint32_t want = ((uint32_t)device << 16) | vendor;
  for (uint32_t dev = 0; dev < 32; ++dev) {
    uint32_t id0 = pci_cfg_read(dev << 3, 0);
    if ((id0 & 0xffff) == 0xffff) continue; /* no device */
    /* Header type bit 7: multi-function; otherwise only function 0 exists. */
    uint32_t nfn = (pci_cfg_read(dev << 3, 0x0c) >> 16) & 0x80 ? 8 : 1;
    for (uint32_t fn = 0; fn < nfn; ++fn) {
      uint32_t bdf = dev << 3 | fn;
      if (pci_cfg_read(bdf, 0) == want && nth-- == 0) return (int)bdf;
    }
  }
  return -1;
}

static void common_write8(struct virtio_pci* vp, uint32_t off, uint8_t v) {
  MMIO8(vp->common + off) = v;
}

uint8_t virtio_status(const struct virtio_pci* vp) { return MMIO8(vp->common + COMMON_STATUS); }

int virtio_pci_open(struct virtio_pci* vp, uint32_t bdf, uint32_t low_bar) {
  vp->bdf = bdf;
  uint64_t bar = (pci_cfg_read(bdf, 0x10) & ~0xfull) | ((uint64_t)pci_cfg_read(bdf, 0x14) << 32);
  if (bar + 0x8000 > 0x100000000ull) {
    pci_cfg_write(bdf, 0x04, pci_cfg_read(bdf, 0x04) & ~0x2u); /* memory decode off */
    pci_cfg_write(bdf, 0x10, low_bar | (pci_cfg_read(bdf, 0x10) & 0xf));
    pci_cfg_write(bdf, 0x14, 0);
    bar = (pci_cfg_read(bdf, 0x10) & ~0xfull) | ((uint64_t)pci_cfg_read(bdf, 0x14) << 32);
    if (bar != low_bar) return VIRTIO_EBAR;
  }
  vp->bar = bar;
  pci_cfg_write(bdf, 0x04, pci_cfg_read(bdf, 0x04) | 0x6); /* memory decode + bus master */
  vp->common = vp->notify = vp->device_cfg = 0;
  vp->notify_mult = 0;
  /* Capability list; the 48-iteration bound stops a looping list (at most 48 caps fit). */
  uint32_t cap = pci_cfg_read(bdf, 0x34) & 0xfc;
  for (int n = 0; cap != 0 && n < 48; ++n, cap = (pci_cfg_read(bdf, cap) >> 8) & 0xfc) {
    uint32_t w0 = pci_cfg_read(bdf, cap);
    if ((w0 & 0xff) != 0x09) continue; /* vendor-specific = virtio_pci_cap */
    /* Only BAR 0 is mapped by us; our VMM puts every structure there. */
    if ((pci_cfg_read(bdf, cap + 4) & 0xff) != 0) continue;
    uint32_t type = w0 >> 24, off = pci_cfg_read(bdf, cap + 8);
    if (type == CAP_COMMON) vp->common = bar + off;
    if (type == CAP_DEVICE) vp->device_cfg = bar + off;
    if (type == CAP_NOTIFY) {
      vp->notify = bar + off;
      vp->notify_mult = pci_cfg_read(bdf, cap + 16);
    }
  }
  if (vp->common == 0 || vp->notify == 0) return VIRTIO_ECAPS;
  return 0;
}

int virtio_negotiate(struct virtio_pci* vp, uint64_t wanted, uint64_t* offered) {
  common_write8(vp, COMMON_STATUS, 0); /* reset */
  common_write8(vp, COMMON_STATUS, VIRTIO_S_ACKNOWLEDGE);
  common_write8(vp, COMMON_STATUS, VIRTIO_S_ACKNOWLEDGE | VIRTIO_S_DRIVER);
  uint64_t f = 0;
  for (uint32_t w = 0; w < 2; ++w) {
    MMIO32(vp->common + COMMON_DFSELECT) = w;
    f |= (uint64_t)MMIO32(vp->common + COMMON_DF) << (32 * w);
  }
  *offered = f;
  if (!(f & VIRTIO_F_VERSION_1)) return VIRTIO_ENOVERSION1;
  uint64_t accept = f & wanted;
  for (uint32_t w = 0; w < 2; ++w) {
    MMIO32(vp->common + COMMON_GFSELECT) = w;
    MMIO32(vp->common + COMMON_GF) = (uint32_t)(accept >> (32 * w));
  }
  common_write8(vp, COMMON_STATUS, VIRTIO_S_ACKNOWLEDGE | VIRTIO_S_DRIVER | VIRTIO_S_FEATURES_OK);
  if (!(virtio_status(vp) & VIRTIO_S_FEATURES_OK)) return VIRTIO_EFEATURES;
  return 0;
}

int virtio_driver_ok(struct virtio_pci* vp) {
  common_write8(vp, COMMON_STATUS, VIRTIO_S_ACKNOWLEDGE | VIRTIO_S_DRIVER | VIRTIO_S_FEATURES_OK |
                                       VIRTIO_S_DRIVER_OK);
  if (virtio_status(vp) & (VIRTIO_S_NEEDS_RESET | VIRTIO_S_FAILED)) return VIRTIO_ENEEDSRESET;
  return 0;
}

void virtio_set_failed(struct virtio_pci* vp) {
  common_write8(vp, COMMON_STATUS, virtio_status(vp) | VIRTIO_S_FAILED);
}

uint32_t virtio_cfg_read32(const struct virtio_pci* vp, uint32_t off) {
  return MMIO32(vp->device_cfg + off);
}

uint64_t virtio_cfg_read64(const struct virtio_pci* vp, uint32_t off) {
  uint64_t v;
  uint8_t gen;
  int tries = 0;
  do {
    gen = MMIO8(vp->common + COMMON_CFGGEN);
    v = MMIO32(vp->device_cfg + off) | ((uint64_t)MMIO32(vp->device_cfg + off + 4) << 32);
  } while (MMIO8(vp->common + COMMON_CFGGEN) != gen && ++tries < 100);
  return v;
}

static void common_write64(struct virtio_pci* vp, uint32_t off, uint64_t v) {
  MMIO32(vp->common + off) = (uint32_t)v;
  MMIO32(vp->common + off + 4) = (uint32_t)(v >> 32);
}

int virtq_setup(struct virtio_pci* vp, struct virtq* q, uint16_t index, uint16_t size,
                uint64_t ring_base) {
  MMIO16(vp->common + COMMON_Q_SELECT) = index;
  uint16_t max = MMIO16(vp->common + COMMON_Q_SIZE);
  if (max == 0 || max < size || size > 256) return VIRTIO_EQSIZE;
  MMIO16(vp->common + COMMON_Q_SIZE) = size;
  uint64_t desc = ring_base, avail = ring_base + 0x1000, used = ring_base + 0x2000;
  memset((void*)(uintptr_t)ring_base, 0, 0x3000); /* fresh rings: idx 0, flags 0 */
  q->index = index;
  q->size = size;
  q->desc = (volatile struct virtq_desc*)(uintptr_t)desc;
  q->avail = (volatile uint16_t*)(uintptr_t)avail;
  q->used = (volatile uint16_t*)(uintptr_t)used;
  q->avail_idx = 0;
  q->last_used = 0;
  q->avail[0] = 1; /* VIRTQ_AVAIL_F_NO_INTERRUPT: we poll */
  common_write64(vp, COMMON_Q_DESC, desc);
  common_write64(vp, COMMON_Q_AVAIL, avail);
  common_write64(vp, COMMON_Q_USED, used);
  MMIO16(vp->common + COMMON_Q_MSIX) = 0xffff; /* VIRTIO_MSI_NO_VECTOR */
  uint16_t notify_off = MMIO16(vp->common + COMMON_Q_NOFF);
  q->notify_addr = vp->notify + (uint64_t)notify_off * vp->notify_mult;
  MMIO16(vp->common + COMMON_Q_ENABLE) = 1;
  return 0;
}

void virtq_set_desc(struct virtq* q, uint16_t i, uint64_t addr, uint32_t len, uint16_t flags,
                    uint16_t next) {
  q->desc[i].addr = addr;
  q->desc[i].len = len;
  q->desc[i].flags = flags;
  q->desc[i].next = (flags & VIRTQ_DESC_F_NEXT) ? next : 0;
}

void virtq_publish(struct virtq* q, uint16_t head) {
  q->avail[2 + q->avail_idx % q->size] = head;
  /* x86 stores are not reordered with other stores: a compiler barrier is enough to make the
   * descriptors and buffers visible before idx, and idx before the notification. */
  compiler_barrier();
  q->avail[1] = ++q->avail_idx;
  compiler_barrier();
}

void virtq_notify(struct virtq* q) {
  /* The notification data is the queue index (no NOTIFICATION_DATA feature). */
  MMIO16(q->notify_addr) = q->index;
}

void virtq_kick(struct virtq* q, uint16_t head) {
  virtq_publish(q, head);
  virtq_notify(q);
}

int virtq_wait(struct virtq* q, uint32_t max_spins, uint32_t* id, uint32_t* len) {
  for (uint32_t spin = 0; q->used[1] == q->last_used; ++spin) {
    if (spin >= max_spins) return VIRTIO_ETIMEOUT;
    cpu_relax();
  }
  compiler_barrier(); /* read the element (and buffers) only after seeing idx move */
  volatile uint32_t* elem = (volatile uint32_t*)(q->used + 2) + 2 * (q->last_used % q->size);
  *id = elem[0];
  *len = elem[1];
  q->last_used++;
  return 0;
}
