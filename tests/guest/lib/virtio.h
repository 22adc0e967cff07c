/* Minimal virtio 1.x (modern) PCI driver pieces for the test guests: PCI conf1 access, device
 * discovery on bus 0, vendor-capability parsing, feature negotiation, one split virtqueue driven
 * by polling (no interrupts: queue MSI-X vector = NO_VECTOR, avail ring NO_INTERRUPT).
 *
 * Everything is single-vCPU and synchronous: the caller fills descriptors, calls virtq_kick()
 * and then virtq_wait(), which spins a bounded number of times on the used ring.
 *
 * Functions return 0 or one of the VIRTIO_E* codes below; each guest maps them to its own
 * documented exit statuses. */
#ifndef TESTS_GUEST_LIB_VIRTIO_H_
#define TESTS_GUEST_LIB_VIRTIO_H_

#include "guest.h"

#define VIRTIO_PCI_VENDOR 0x1af4
#define VIRTIO_PCI_DEVICE_RNG 0x1044
#define VIRTIO_PCI_DEVICE_BLK 0x1042
#define VIRTIO_PCI_DEVICE_BALLOON 0x1045

#define VIRTIO_F_VERSION_1 (1ull << 32)

/* Device status bits. */
#define VIRTIO_S_ACKNOWLEDGE 1
#define VIRTIO_S_DRIVER 2
#define VIRTIO_S_DRIVER_OK 4
#define VIRTIO_S_FEATURES_OK 8
#define VIRTIO_S_NEEDS_RESET 0x40
#define VIRTIO_S_FAILED 0x80

/* Split-ring descriptor flags. */
#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2

enum {
  VIRTIO_EBAR = 1,         /* BAR 0 could not be moved below 4 GiB */
  VIRTIO_ECAPS = 2,        /* common or notify capability missing */
  VIRTIO_ENOVERSION1 = 3,  /* device does not offer VERSION_1 */
  VIRTIO_EFEATURES = 4,    /* device cleared FEATURES_OK */
  VIRTIO_EQSIZE = 5,       /* queue absent or smaller than requested */
  VIRTIO_ENEEDSRESET = 6,  /* DEVICE_NEEDS_RESET (or FAILED) after DRIVER_OK / a request */
  VIRTIO_ETIMEOUT = 7,     /* used ring did not advance within the spin budget */
};

/* ---- PCI configuration space via conf1 (ports 0xcf8/0xcfc), bus 0 ---- */
/* bdf = device << 3 | function (bus 0 only). */
uint32_t pci_cfg_read(uint32_t bdf, uint32_t reg);
void pci_cfg_write(uint32_t bdf, uint32_t reg, uint32_t v);
/* bdf of the nth (from 0) function on bus 0 with the given vendor:device ID, or -1. Scans
 * functions 1..7 only of multi-function devices. */
int pci_find(uint16_t vendor, uint16_t device, uint32_t nth);

/* ---- MMIO ---- */
#define MMIO8(a) (*(volatile uint8_t*)(uintptr_t)(a))
#define MMIO16(a) (*(volatile uint16_t*)(uintptr_t)(a))
#define MMIO32(a) (*(volatile uint32_t*)(uintptr_t)(a))

/* ---- Transport ---- */
struct virtio_pci {
  uint32_t bdf;
  uint64_t bar;         /* BAR 0 (all of our device's capabilities live there) */
  uint64_t common;      /* struct virtio_pci_common_cfg */
  uint64_t notify;      /* notification area base */
  uint32_t notify_mult; /* notify_off_multiplier */
  uint64_t device_cfg;  /* device-specific config (0 if the device has none) */
};

/* Reads BAR 0 and the vendor capabilities; enables memory decode + bus master. Our page tables
 * map only the first 4 GiB, so a BAR placed above is moved to `low_bar` (in the 32-bit PCI
 * window, aligned to the BAR size) with decode off while it changes, as firmware may. */
int virtio_pci_open(struct virtio_pci* vp, uint32_t bdf, uint32_t low_bar);

/* Reset, ACKNOWLEDGE, DRIVER; stores the device's 64 feature bits in *offered; accepts
 * offered & wanted (wanted must include VERSION_1, which the device must offer); FEATURES_OK
 * and checks that it stuck. */
int virtio_negotiate(struct virtio_pci* vp, uint64_t wanted, uint64_t* offered);

/* Sets DRIVER_OK (after the queues); fails if the device then reports NEEDS_RESET/FAILED. */
int virtio_driver_ok(struct virtio_pci* vp);
uint8_t virtio_status(const struct virtio_pci* vp);
/* Sets FAILED (keeping the other bits): the driver gives up on the device (virtio 1.x 3.1.1). */
void virtio_set_failed(struct virtio_pci* vp);

/* Reads a 32-bit device config field at `off`: one aligned access, consistent by itself. */
uint32_t virtio_cfg_read32(const struct virtio_pci* vp, uint32_t off);

/* Reads a 64-bit little-endian device config field at `off` with two 32-bit accesses, retried
 * while config_generation changes (virtio 1.x 4.1.4.3: a multi-access read is only consistent
 * if the generation did not move). */
uint64_t virtio_cfg_read64(const struct virtio_pci* vp, uint32_t off);

/* ---- One split virtqueue ---- */
struct virtq_desc {
  uint64_t addr;
  uint32_t len;
  uint16_t flags;
  uint16_t next;
};

struct virtq {
  uint16_t index;
  uint16_t size;
  volatile struct virtq_desc* desc;
  volatile uint16_t* avail; /* flags, idx, ring[size] */
  volatile uint16_t* used;  /* flags, idx, then {u32 id, u32 len}[size] */
  uint16_t avail_idx;       /* next avail->idx to publish */
  uint16_t last_used;       /* used->idx already consumed */
  uint64_t notify_addr;
};

/* Sets up queue `index` with `size` entries (<= the device's max) at `ring_base` (page aligned,
 * 12 KiB used: desc, avail and used rings one page each, so size <= 256), no MSI-X vector, and
 * enables it. Call between virtio_negotiate() and virtio_driver_ok(). */
int virtq_setup(struct virtio_pci* vp, struct virtq* q, uint16_t index, uint16_t size,
                uint64_t ring_base);

/* Fills descriptor i; `next` is used only when flags has VIRTQ_DESC_F_NEXT. */
void virtq_set_desc(struct virtq* q, uint16_t i, uint64_t addr, uint32_t len, uint16_t flags,
                    uint16_t next);

/* Publishes chain `head` in the avail ring and notifies the device. */
void virtq_kick(struct virtq* q, uint16_t head);
/* The two halves of virtq_kick: publish without notifying (to batch chains), and notify. A
 * notification with nothing new published is harmless (the device finds the ring empty). */
void virtq_publish(struct virtq* q, uint16_t head);
void virtq_notify(struct virtq* q);

/* Spins (at most max_spins polls) until the used ring has a new entry; returns its id and len.
 * VIRTIO_ETIMEOUT if nothing arrived (at once with max_spins = 0: a non-blocking poll). */
int virtq_wait(struct virtq* q, uint32_t max_spins, uint32_t* id, uint32_t* len);

#endif /* TESTS_GUEST_LIB_VIRTIO_H_ */
