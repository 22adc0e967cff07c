/* virtioblk: a minimal virtio 1.x PCI driver for the VMM's virtio-blk device
 * (vmm --disk path=FILE[,ro]...). Transport code: lib/virtio.{c,h}.
 *
 * Args (all optional; space separated):
 *   disk=N            use the Nth (from 0) 1af4:1042 function found on bus 0 (default 0)
 *   read=S:BB         read sector S, every byte must be 0xBB (hex byte)
 *   write=S:BB        write sector S filled with 0xBB, FLUSH, read it back and compare
 *   ro                the disk is read-only: the device must offer VIRTIO_BLK_F_RO, the write
 *                     must fail with VIRTIO_BLK_S_IOERR and the read-back must show the sector
 *                     unchanged (no FLUSH); without "ro" the device must NOT offer RO
 *   oob               a read of sector `capacity` (one past the end) must fail with IOERR
 *
 * Steps: find the device, negotiate VERSION_1 + FLUSH (nothing else), print
 * "capacity=N" (512-byte sectors, from the device config), set up queue 0 (8 entries, at 17 MiB),
 * then one request at a time, polled: read / write / flush / read-back, GET_ID -> "serial=STR"
 * (the ID string up to its NUL, at most 20 bytes, non-printable bytes as '?'), oob.
 * Success: "virtio-blk ok" and exit 0. A failing step prints "virtio-blk FAIL ..." and exits:
 *   30 bad args (malformed read=/write=) or RAM smaller than 17 MiB + 128 KiB
 *   31 no such virtio-blk function on bus 0
 *   32 BAR 0 could not be moved below 4 GiB
 *   33 common, notify or device-config capability missing
 *   34 VERSION_1 not offered
 *   35 FEATURES_OK not accepted
 *   36 queue 0 absent or smaller than 8 entries
 *   37 DEVICE_NEEDS_RESET (or FAILED) after DRIVER_OK or after the last request
 *   38 a request timed out (used ring did not advance within 10 M polls)
 *   39 bad used element: wrong id, status byte not written, or len != 513 for a good read
 *      (GET_ID's used len is not checked: the device may write fewer than 20 bytes)
 *   40 RO feature offered without "ro", or not offered with "ro"
 *   41 a sector from the args is not below the capacity
 *   42 read (or pre-write read) failed
 *   43 read data differs from the pattern
 *   44 write failed (rw), or with "ro" did not fail with IOERR
 *   45 FLUSH not offered or failed
 *   46 read-back failed or differs (pattern for rw, the previous contents for ro)
 *   47 GET_ID failed
 *   48 out-of-range read (oob) did not fail with IOERR */
#include "lib/guest.h"
#include "lib/virtio.h"

#define RING_BASE 0x1100000ull /* 17 MiB: above the image, below memwalk's region */
#define HDR_ADDR (RING_BASE + 0x10000)    /* struct virtio_blk_outhdr, 16 bytes */
#define STATUS_ADDR (RING_BASE + 0x10100) /* 1 status byte */
#define DATA_ADDR (RING_BASE + 0x11000)   /* one sector */
#define SAVED_ADDR (RING_BASE + 0x12000)  /* the write sector before the write */
#define SECTOR 512
#define SPINS 10000000u

#define BLK_F_RO (1ull << 5)
#define BLK_F_FLUSH (1ull << 9)
#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_T_FLUSH 4
#define BLK_T_GET_ID 8
#define BLK_S_OK 0
#define BLK_S_IOERR 1
#define BLK_ID_BYTES 20
#define NO_STATUS 0xff /* preset: the device did not write the status byte */

static struct virtio_pci vp;
static struct virtq q;

#define FAIL(status, ...)                 \
  do {                                    \
    print_lock();                         \
    gputs("virtio-blk FAIL ");            \
    gprintf(__VA_ARGS__);                 \
    print_unlock();                       \
    return status;                        \
  } while (0)

/* "S:BB" (S decimal or 0x hex, BB one or two hex digits) -> true on success. */
static bool parse_sector_byte(const char* v, size_t n, uint64_t* sector, uint8_t* byte) {
  size_t i = 0;
  uint64_t s = 0;
  unsigned base = 10;
  if (n > 2 && v[0] == '0' && (v[1] == 'x' || v[1] == 'X')) {
    base = 16;
    i = 2;
  }
  size_t digits = 0;
  for (; i < n && v[i] != ':'; ++i, ++digits) {
    char c = v[i];
    unsigned d;
    if (c >= '0' && c <= '9') d = (unsigned)(c - '0');
    else if (base == 16 && c >= 'a' && c <= 'f') d = (unsigned)(c - 'a' + 10);
    else if (base == 16 && c >= 'A' && c <= 'F') d = (unsigned)(c - 'A' + 10);
    else return false;
    if (s > (~0ull - d) / base) return false;
    s = s * base + d;
  }
  if (digits == 0 || i >= n) return false; /* no sector or no ':' */
  ++i;
  if (n - i > 2 && v[i] == '0' && (v[i + 1] == 'x' || v[i + 1] == 'X')) i += 2;
  if (n - i < 1 || n - i > 2) return false;
  unsigned b = 0;
  for (; i < n; ++i) {
    char c = v[i];
    if (c >= '0' && c <= '9') b = b * 16 + (unsigned)(c - '0');
    else if (c >= 'a' && c <= 'f') b = b * 16 + (unsigned)(c - 'a' + 10);
    else if (c >= 'A' && c <= 'F') b = b * 16 + (unsigned)(c - 'A' + 10);
    else return false;
  }
  *sector = s;
  *byte = (uint8_t)b;
  return true;
}

/* One request as a chain header -> [data] -> status (descriptors 0, 1, 2; without data 0 -> 2).
 * Returns 0 and the device's status byte in *st, or an exit status (38, 39). */
static int blk_request(uint32_t type, uint64_t sector, uint32_t data_len, bool data_in,
                       uint8_t* st) {
  volatile uint32_t* hdr = (volatile uint32_t*)(uintptr_t)HDR_ADDR;
  hdr[0] = type;
  hdr[1] = 0; /* reserved (ioprio) */
  hdr[2] = (uint32_t)sector;
  hdr[3] = (uint32_t)(sector >> 32);
  *(volatile uint8_t*)(uintptr_t)STATUS_ADDR = NO_STATUS;
  virtq_set_desc(&q, 0, HDR_ADDR, 16, VIRTQ_DESC_F_NEXT, data_len ? 1 : 2);
  if (data_len)
    virtq_set_desc(&q, 1, DATA_ADDR, data_len,
                   VIRTQ_DESC_F_NEXT | (data_in ? VIRTQ_DESC_F_WRITE : 0), 2);
  virtq_set_desc(&q, 2, STATUS_ADDR, 1, VIRTQ_DESC_F_WRITE, 0);
  virtq_kick(&q, 0);
  uint32_t id, len;
  if (virtq_wait(&q, SPINS, &id, &len) != 0)
    FAIL(38, "request type=%u sector=%lu timed out\n", type, (unsigned long)sector);
  *st = *(volatile uint8_t*)(uintptr_t)STATUS_ADDR;
  if (id != 0 || *st == NO_STATUS)
    FAIL(39, "request type=%u: used id=%u len=%u status=0x%x\n", type, id, len, *st);
  /* Used len = bytes the device wrote into the chain: data + status for a good read. */
  if (*st == BLK_S_OK && type == BLK_T_IN && len != data_len + 1)
    FAIL(39, "request type=%u: used len=%u, expected %u\n", type, len, data_len + 1);
  return 0;
}

static void fill(uint64_t addr, uint8_t v) {
  volatile uint8_t* p = (volatile uint8_t*)(uintptr_t)addr;
  for (int i = 0; i < SECTOR; ++i) p[i] = v;
}

/* Index of the first byte of the sector at `addr` that differs from `want` (or from the sector
 * at `other` if nonzero); -1 if none. */
static int first_diff(uint64_t addr, uint8_t want, uint64_t other) {
  const volatile uint8_t* p = (const volatile uint8_t*)(uintptr_t)addr;
  const volatile uint8_t* o = (const volatile uint8_t*)(uintptr_t)other;
  for (int i = 0; i < SECTOR; ++i)
    if (p[i] != (other ? o[i] : want)) return i;
  return -1;
}

int guest_main(uint64_t cpu, uint64_t ncpus, const char* args, uint64_t ram_size) {
  (void)ncpus;
  if (cpu != 0) return 0;
  if (ram_size < RING_BASE + 0x20000) FAIL(30, "RAM too small\n");
  size_t n;
  const char* v;
  uint64_t rsector = 0, wsector = 0;
  uint8_t rbyte = 0, wbyte = 0;
  bool do_read = false, do_write = false;
  if ((v = arg_get(args, "read", &n)) != NULL) {
    if (!parse_sector_byte(v, n, &rsector, &rbyte)) FAIL(30, "bad read= (want SECTOR:HEXBYTE)\n");
    do_read = true;
  }
  if ((v = arg_get(args, "write", &n)) != NULL) {
    if (!parse_sector_byte(v, n, &wsector, &wbyte)) FAIL(30, "bad write= (want SECTOR:HEXBYTE)\n");
    do_write = true;
  }
  bool ro = arg_get(args, "ro", &n) != NULL;
  bool oob = arg_get(args, "oob", &n) != NULL;

  int bdf = pci_find(VIRTIO_PCI_VENDOR, VIRTIO_PCI_DEVICE_BLK, (uint32_t)arg_u64(args, "disk", 0));
  if (bdf < 0) FAIL(31, "no virtio-blk device disk=%lu\n", (unsigned long)arg_u64(args, "disk", 0));
  /* A distinct 64 KiB slot per function in the 32-bit window, clear of virtiorng's 0xe0200000
   * and of the allocator's first-fit 32-bit BARs from 0xe0100000 (BAR 0 is 32 KiB). */
  int e = virtio_pci_open(&vp, (uint32_t)bdf, 0xf0000000u + ((uint32_t)bdf << 16));
  if (e == VIRTIO_EBAR) FAIL(32, "BAR 0 move below 4 GiB failed\n");
  if (e != 0 || vp.device_cfg == 0) FAIL(33, "virtio capabilities missing\n");
  uint64_t offered;
  e = virtio_negotiate(&vp, VIRTIO_F_VERSION_1 | BLK_F_FLUSH, &offered);
  if (e == VIRTIO_ENOVERSION1) FAIL(34, "VERSION_1 not offered (features 0x%lx)\n",
                                    (unsigned long)offered);
  if (e != 0) FAIL(35, "FEATURES_OK not accepted\n");
  /* struct virtio_blk_config: le64 capacity at offset 0, in 512-byte sectors. */
  uint64_t capacity = virtio_cfg_read64(&vp, 0);
  gprintf("capacity=%lu\n", (unsigned long)capacity);
  if (ro != !!(offered & BLK_F_RO))
    FAIL(40, "RO %s but the guest was told %s\n", offered & BLK_F_RO ? "offered" : "not offered",
         ro ? "ro" : "rw");
  if ((do_read && rsector >= capacity) || (do_write && wsector >= capacity))
    FAIL(41, "sector beyond capacity %lu\n", (unsigned long)capacity);
  if (virtq_setup(&vp, &q, 0, 8, RING_BASE) != 0) FAIL(36, "queue 0 unusable\n");
  if (virtio_driver_ok(&vp) != 0) FAIL(37, "DEVICE_NEEDS_RESET after DRIVER_OK\n");

  uint8_t st;
  int rc, i;
  if (do_read) {
    fill(DATA_ADDR, (uint8_t)~rbyte); /* so that a read that moves no data cannot pass */
    if ((rc = blk_request(BLK_T_IN, rsector, SECTOR, true, &st)) != 0) return rc;
    if (st != BLK_S_OK) FAIL(42, "read sector=%lu status=%u\n", (unsigned long)rsector, st);
    if ((i = first_diff(DATA_ADDR, rbyte, 0)) >= 0)
      FAIL(43, "read sector=%lu byte=%d got=0x%x want=0x%x\n", (unsigned long)rsector, i,
           ((volatile uint8_t*)(uintptr_t)DATA_ADDR)[i], rbyte);
    gprintf("read ok sector=%lu\n", (unsigned long)rsector);
  }
  if (do_write) {
    /* The current contents: what a refused write must leave in place. */
    fill(DATA_ADDR, (uint8_t)~wbyte);
    if ((rc = blk_request(BLK_T_IN, wsector, SECTOR, true, &st)) != 0) return rc;
    if (st != BLK_S_OK) FAIL(42, "pre-write read sector=%lu status=%u\n", (unsigned long)wsector, st);
    memcpy((void*)(uintptr_t)SAVED_ADDR, (const void*)(uintptr_t)DATA_ADDR, SECTOR);

    fill(DATA_ADDR, wbyte);
    if ((rc = blk_request(BLK_T_OUT, wsector, SECTOR, false, &st)) != 0) return rc;
    if (ro && st != BLK_S_IOERR) FAIL(44, "write to read-only disk: status=%u, want IOERR\n", st);
    if (!ro && st != BLK_S_OK) FAIL(44, "write sector=%lu status=%u\n", (unsigned long)wsector, st);
    if (!ro) {
      if (!(offered & BLK_F_FLUSH)) FAIL(45, "FLUSH not offered\n");
      if ((rc = blk_request(BLK_T_FLUSH, 0, 0, false, &st)) != 0) return rc;
      if (st != BLK_S_OK) FAIL(45, "flush status=%u\n", st);
    }
    fill(DATA_ADDR, (uint8_t)~wbyte);
    if ((rc = blk_request(BLK_T_IN, wsector, SECTOR, true, &st)) != 0) return rc;
    if (st != BLK_S_OK) FAIL(46, "read-back sector=%lu status=%u\n", (unsigned long)wsector, st);
    if ((i = first_diff(DATA_ADDR, wbyte, ro ? SAVED_ADDR : 0)) >= 0)
      FAIL(46, "read-back sector=%lu byte=%d got=0x%x\n", (unsigned long)wsector, i,
           ((volatile uint8_t*)(uintptr_t)DATA_ADDR)[i]);
    gprintf(ro ? "write refused sector=%lu\n" : "write ok sector=%lu\n", (unsigned long)wsector);
  }

  fill(DATA_ADDR, 0);
  if ((rc = blk_request(BLK_T_GET_ID, 0, BLK_ID_BYTES, true, &st)) != 0) return rc;
  if (st != BLK_S_OK) FAIL(47, "GET_ID status=%u\n", st);
  print_lock();
  gputs("serial=");
  const volatile char* id = (const volatile char*)(uintptr_t)DATA_ADDR;
  for (i = 0; i < BLK_ID_BYTES && id[i] != 0; ++i)
    gputc(id[i] >= 0x20 && id[i] < 0x7f ? id[i] : '?');
  gputc('\n');
  print_unlock();

  if (oob) {
    if ((rc = blk_request(BLK_T_IN, capacity, SECTOR, true, &st)) != 0) return rc;
    if (st != BLK_S_IOERR) FAIL(48, "read of sector %lu (= capacity) status=%u, want IOERR\n",
                                (unsigned long)capacity, st);
    gprintf("oob refused\n");
  }
  if (virtio_status(&vp) & (VIRTIO_S_NEEDS_RESET | VIRTIO_S_FAILED))
    FAIL(37, "DEVICE_NEEDS_RESET after the requests\n");
  gprintf("virtio-blk ok\n");
  return 0;
}
