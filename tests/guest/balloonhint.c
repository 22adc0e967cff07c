/* balloonhint: a minimal virtio-balloon free page hinting driver (virtio spec "Free Page Hinting",
 * VIRTIO_BALLOON_F_FREE_PAGE_HINT) for the VMM's balloon (vmm --balloon hinting, 1af4:1045).
 * Transport code: lib/virtio.{c,h}. Only vCPU 0 runs; other vCPUs halt.
 *
 * Args (all optional; space separated):
 *   mib=N        region size in MiB (default 48), at base_mib (default 16; at least 9: the free
 *                page queue's rings live at 8 MiB, just above the image)
 *   keep=N       MiB at the start of the region the guest keeps using (default 4); the rest is
 *                "free" and is what the guest hints
 *   gens=N       stop after N generations (default 0 = forever)
 *   chunk_kib=N  bytes per hint buffer, in KiB (default 4096 = Linux's hint block; multiple of 4,
 *                at most 1 GiB)
 *   reuse=1      after the first complete hinting run, write a recognizable stamp into the first
 *                page of every hint buffer and verify those pages in every later generation (a
 *                hinted page the guest writes again must be migrated again); they then count as
 *                allocated and are left out of later hints
 *   nohint       no device at all: fill and walk only (the baseline of the migration tests)
 *   corrupt=G    checks the checker: after generation G, one word of the keep region is flipped
 *
 * Steps: find the balloon, negotiate VERSION_1 + FREE_PAGE_HINT and nothing else (no STATS_VQ,
 * so the device has no stats buffer to hold), set up only free_page_vq: with the features we
 * accept its spec index is 3 (0 inflateq, 1 deflateq, no statsq at 2); inflateq/deflateq stay
 * disabled because the guest never changes the balloon size (the device treats disabled queues as
 * unused and picks the spec numbering since queue 3 is enabled), DRIVER_OK ->
 * "balloonhint ready queue=3". Then every page of the region is stamped ("touched"; the whole
 * region is now data the VMM would migrate), "balloonhint filled ...", and generations run over
 * the keep region exactly like memwalk (verify stamp(g-1), write stamp(g); the fill is g = 0):
 * "balloonhint gen=G ok". Every 256 keep-region pages and after each generation the guest polls
 * free_page_hint_cmd_id (config offset 8; no interrupts: a few ms between polls). When it changes:
 *   - to a new id >= 2: one hinting run: an outbuf with the le32 id, then the free region as
 *     device-writable buffers of chunk_kib each (the device never touches their contents), then
 *     an outbuf with VIRTIO_BALLOON_CMD_ID_STOP (0); the id is re-read before every 16 buffers
 *     (one notification per 16 too) and the run ends early (still with STOP) if it changed. The guest waits until the device returned
 *     every buffer, then prints "balloonhint hinted id=X bytes=Y" (" aborted" appended if the id
 *     changed during the run).
 *   - to STOP (0): "balloonhint cmd stop"; to DONE (1): "balloonhint cmd done" (the host no longer
 *     needs the hints: a real guest would give the pages back to its allocator).
 * Free pages are never verified: once hinted their contents are indeterminate (spec), except for
 * pages the guest wrote after the hint (reuse=1), whose new contents the device must preserve.
 * All state is in guest RAM and registers, so the walk continues across a live migration.
 *
 * Exit statuses (0 only with gens=N after N generations: "balloonhint finished gens=N"):
 *   50 bad args, or the region is not in RAM above the image
 *   51 no 1af4:1045 on bus 0
 *   52 BAR 0 could not be moved below 4 GiB, or common/notify/device capability missing
 *   53 VERSION_1 not offered, or FEATURES_OK not accepted
 *   54 FREE_PAGE_HINT not offered: the guest refuses to run (device set FAILED)
 *   55 free_page_vq (queue 3) absent or smaller than 64 entries
 *   56 DEVICE_NEEDS_RESET (or FAILED) after DRIVER_OK or while hinting
 *   57 the device did not return hint buffers within the spin budget (20 M polls)
 *   58 keep-region mismatch: "balloonhint FAIL pfn=0x.. gen=G expected ... got ..."
 *   59 reused-page mismatch: "balloonhint FAIL reused pfn=0x.. expected ... got ..." */
#include "lib/guest.h"
#include "lib/virtio.h"

#define PAGE 4096ull
#define RING_BASE 0x800000ull           /* 8 MiB: the image ends at or below it */
#define SCRATCH (RING_BASE + 0x3000)    /* one le32 command id per descriptor slot */
#define QSIZE 64
#define FREE_PAGE_VQ 3
#define F_FREE_PAGE_HINT (1ull << 3)
#define CFG_CMD_ID 8 /* struct virtio_balloon_config.free_page_hint_cmd_id */
#define CMD_ID_STOP 0
#define CMD_ID_DONE 1
#define SPINS 20000000u
#define RENOTIFY 65536u /* re-notify (and check status) this often while waiting */
#define POLL_PAGES 256  /* keep-region pages between two polls of the command id */
#define NOTIFY_BATCH 16 /* hint buffers per notification and per re-read of the command id */

#define STAMP_MAGIC 0x42414c48494e5400ull /* "BALHINT\0" */
#define REUSE_MAGIC 0x5245555345440000ull /* "REUSED\0\0" */

enum {
  EXIT_ARGS = 50,
  EXIT_NODEV = 51,
  EXIT_BAR = 52,
  EXIT_FEATURES = 53,
  EXIT_NOHINT = 54,
  EXIT_QUEUE = 55,
  EXIT_NEEDS_RESET = 56,
  EXIT_TIMEOUT = 57,
  EXIT_MISMATCH = 58,
  EXIT_REUSED_MISMATCH = 59,
};

/* Region geometry and hinting state (guest RAM: survives a live migration). */
static uint64_t free_start, free_end, chunk; /* bytes */
static bool reuse;
static uint32_t last_id = CMD_ID_STOP;
static uint32_t reuse_id; /* id after whose run the reused pages were written; 0: none yet */

static struct virtio_pci vp;
static struct virtq q;
static uint16_t free_desc[QSIZE];
static uint32_t nfree, outstanding, unnotified;

static inline uint64_t mix(uint64_t pfn, uint64_t gen) {
  uint64_t h = pfn * 0x9e3779b97f4a7c15ull ^ gen * 0xc2b2ae3d27d4eb4full;
  return h ^ (h >> 29);
}

static inline volatile uint64_t* page_ptr(uint64_t pfn) {
  return (volatile uint64_t*)(uintptr_t)(pfn * PAGE);
}

/* Stamp words at page offsets 0, 8, 2048, 4088. */
static void write_stamp(uint64_t pfn, uint64_t magic, uint64_t gen) {
  volatile uint64_t* pg = page_ptr(pfn);
  const uint64_t h = mix(pfn, gen) ^ magic;
  pg[0] = magic ^ pfn;
  pg[1] = gen;
  pg[256] = h;
  pg[511] = ~h;
}

/* Returns 0 if pfn holds stamp(magic, gen), else prints the FAIL line and returns `status`. */
static int check_stamp(uint64_t pfn, uint64_t magic, uint64_t gen, const char* what,
                       uint64_t run_gen, int status) {
  volatile uint64_t* pg = page_ptr(pfn);
  const uint64_t g0 = pg[0], g1 = pg[1], g2 = pg[256], g3 = pg[511];
  const uint64_t h = mix(pfn, gen) ^ magic;
  if (((g0 ^ (magic ^ pfn)) | (g1 ^ gen) | (g2 ^ h) | (g3 ^ ~h)) == 0) return 0;
  gprintf("balloonhint FAIL %spfn=0x%lx gen=%lu expected 0x%016lx,0x%016lx,0x%016lx,0x%016lx"
          " got 0x%016lx,0x%016lx,0x%016lx,0x%016lx\n",
          what, (unsigned long)pfn, (unsigned long)run_gen, (unsigned long)(magic ^ pfn),
          (unsigned long)gen, (unsigned long)h, (unsigned long)~h, (unsigned long)g0,
          (unsigned long)g1, (unsigned long)g2, (unsigned long)g3);
  return status;
}

/* ---- free_page_vq: single-descriptor chains, descriptor slots from a free list ---- */

static void notify(void) {
  virtq_notify(&q);
  unnotified = 0;
}

static void reap(void) {
  uint32_t id, len;
  while (virtq_wait(&q, 0, &id, &len) == 0) {
    /* A bogus or repeated id from the device is dropped rather than corrupting the list. */
    if (id < QSIZE && nfree < QSIZE && outstanding > 0) {
      free_desc[nfree++] = (uint16_t)id;
      outstanding--;
    }
  }
}

/* Waits (bounded) until at most `limit` buffers are outstanding. A notification the device had
 * not acted on when the VM was paused (live migration switch-over) is not redelivered, so the
 * wait re-notifies now and then; it also checks for DEVICE_NEEDS_RESET. */
static int wait_outstanding(uint32_t limit) {
  if (unnotified) notify();
  for (uint32_t spin = 0; ; ++spin) {
    reap();
    if (outstanding <= limit) return 0;
    if (spin >= SPINS) return EXIT_TIMEOUT;
    if (spin % RENOTIFY == RENOTIFY - 1) {
      if (virtio_status(&vp) & (VIRTIO_S_NEEDS_RESET | VIRTIO_S_FAILED)) return EXIT_NEEDS_RESET;
      virtq_notify(&q);
    }
    cpu_relax();
  }
}

/* Publishes a one-descriptor chain. Notifications are batched (each is a VM exit): the device is
 * notified before any wait and every NOTIFY_BATCH chains. */
static int post(uint64_t addr, uint32_t len, uint16_t flags) {
  if (nfree == 0) {
    int e = wait_outstanding(QSIZE - 1);
    if (e) return e;
  }
  uint16_t d = free_desc[--nfree];
  virtq_set_desc(&q, d, addr, len, flags, 0);
  virtq_publish(&q, d);
  outstanding++;
  if (++unnotified == NOTIFY_BATCH) notify();
  return 0;
}

/* An outbuf carrying a le32 command id, in the scratch word of the slot it will use. */
static int post_cmd_id(uint32_t id) {
  if (nfree == 0) {
    int e = wait_outstanding(QSIZE - 1);
    if (e) return e;
  }
  uint64_t buf = SCRATCH + 8ull * free_desc[nfree - 1];
  *(volatile uint32_t*)(uintptr_t)buf = id;
  return post(buf, 4, 0);
}

static uint32_t cmd_id(void) { return virtio_cfg_read32(&vp, CFG_CMD_ID); }

/* One hinting run for `id` over the free region in chunks; `skip` bytes at the start of each
 * chunk are allocated (reused) and not hinted. Returns 0, -1 if aborted, or an exit status. */
static int hint_run(uint32_t id, uint64_t skip) {
  int e = post_cmd_id(id);
  uint64_t bytes = 0;
  bool aborted = false;
  uint32_t n = 0;
  for (uint64_t c = free_start; e == 0 && c < free_end; c += chunk) {
    if (n++ % NOTIFY_BATCH == 0 && cmd_id() != id) { /* the host moved on: stop (spec) */
      aborted = true;
      break;
    }
    uint64_t len = (free_end - c < chunk ? free_end - c : chunk) - skip;
    if (len == 0) continue;
    e = post(c + skip, (uint32_t)len, VIRTQ_DESC_F_WRITE);
    if (e == 0) bytes += len;
  }
  if (e == 0) e = post_cmd_id(CMD_ID_STOP);
  if (e == 0) e = wait_outstanding(0);
  if (e == EXIT_TIMEOUT) gprintf("balloonhint FAIL id=%u buffers not returned\n", id);
  if (e == EXIT_NEEDS_RESET) gprintf("balloonhint FAIL id=%u device needs reset\n", id);
  if (e) return e;
  gprintf("balloonhint hinted id=%u bytes=%lu%s\n", id, (unsigned long)bytes,
          aborted ? " aborted" : "");
  return aborted ? -1 : 0;
}

static int setup_device(void) {
  int bdf = pci_find(VIRTIO_PCI_VENDOR, VIRTIO_PCI_DEVICE_BALLOON, 0);
  if (bdf < 0) {
    gprintf("balloonhint FAIL no virtio-balloon device\n");
    return EXIT_NODEV;
  }
  /* A 64 KiB slot in the 32-bit window like virtioblk's (BAR 0 is 32 KiB). */
  if (virtio_pci_open(&vp, (uint32_t)bdf, 0xf0000000u + ((uint32_t)bdf << 16)) != 0 ||
      vp.device_cfg == 0) {
    gprintf("balloonhint FAIL BAR 0 or capabilities\n");
    return EXIT_BAR;
  }
  uint64_t offered;
  if (virtio_negotiate(&vp, VIRTIO_F_VERSION_1 | F_FREE_PAGE_HINT, &offered) != 0) {
    gprintf("balloonhint FAIL negotiation offered=0x%lx\n", (unsigned long)offered);
    return EXIT_FEATURES;
  }
  if (!(offered & F_FREE_PAGE_HINT)) {
    virtio_set_failed(&vp);
    gprintf("balloonhint FAIL FREE_PAGE_HINT not offered (features 0x%lx)\n",
            (unsigned long)offered);
    return EXIT_NOHINT;
  }
  if (virtq_setup(&vp, &q, FREE_PAGE_VQ, QSIZE, RING_BASE) != 0) {
    gprintf("balloonhint FAIL free_page_vq\n");
    return EXIT_QUEUE;
  }
  for (nfree = 0; nfree < QSIZE; ++nfree) free_desc[nfree] = (uint16_t)(QSIZE - 1 - nfree);
  outstanding = 0;
  if (virtio_driver_ok(&vp) != 0) {
    gprintf("balloonhint FAIL device needs reset after DRIVER_OK\n");
    return EXIT_NEEDS_RESET;
  }
  gprintf("balloonhint ready queue=%u features=0x%lx\n", FREE_PAGE_VQ,
          (unsigned long)(offered & (VIRTIO_F_VERSION_1 | F_FREE_PAGE_HINT)));
  return 0;
}

/* Polls free_page_hint_cmd_id and acts on a change. Returns 0 or an exit status. */
static int poll_cmd(void) {
  uint32_t id = cmd_id();
  if (id == last_id) return 0;
  last_id = id;
  if (id == CMD_ID_STOP) {
    gprintf("balloonhint cmd stop\n");
    return 0;
  }
  if (id == CMD_ID_DONE) {
    gprintf("balloonhint cmd done\n");
    return 0;
  }
  int e = hint_run(id, reuse_id != 0 ? PAGE : 0);
  if (e > 0) return e;
  if (e == 0 && reuse && reuse_id == 0) {
    /* Write into pages that were just hinted: the device must keep what we write now. */
    uint32_t n = 0;
    for (uint64_t a = free_start; a < free_end; a += chunk, ++n)
      write_stamp(a / PAGE, REUSE_MAGIC, id);
    reuse_id = id;
    gprintf("balloonhint reused pages=%u id=%u\n", n, id);
  }
  return 0;
}

int guest_main(uint64_t cpu, uint64_t ncpus, const char* args, uint64_t ram_size) {
  (void)ncpus;
  if (cpu != 0) return 0;
  const uint64_t mib = arg_u64(args, "mib", 48), keep = arg_u64(args, "keep", 4);
  const uint64_t base_mib = arg_u64(args, "base_mib", 16), gens = arg_u64(args, "gens", 0);
  const uint64_t chunk_kib = arg_u64(args, "chunk_kib", 4096);
  const uint64_t corrupt = arg_u64(args, "corrupt", 0);
  const bool nohint = arg_get(args, "nohint", NULL) != NULL;
  reuse = arg_u64(args, "reuse", 0) != 0;

  if (mib == 0 || mib > (1ull << 20) || keep > mib || base_mib < 9 || base_mib > (1ull << 20) ||
      chunk_kib == 0 || chunk_kib % 4 != 0 || chunk_kib > (1ull << 20)) {
    gprintf("balloonhint FAIL bad args (need 0 < mib, keep <= mib, base_mib >= 9, chunk_kib a"
            " nonzero multiple of 4 up to 1 GiB)\n");
    return EXIT_ARGS;
  }
  const uint64_t base = base_mib << 20, end = base + (mib << 20);
  if (base < guest_image_end() || end > guest_ram_top(ram_size)) {
    gprintf("balloonhint FAIL region [0x%lx, 0x%lx) not in RAM (ram_size=0x%lx)\n",
            (unsigned long)base, (unsigned long)end, (unsigned long)ram_size);
    return EXIT_ARGS;
  }
  chunk = chunk_kib << 10;
  free_start = base + (keep << 20);
  free_end = end;
  const uint64_t first = base / PAGE, keep_end = free_start / PAGE, last = end / PAGE;
  gprintf("balloonhint start mib=%lu keep=%lu base_mib=%lu chunk_kib=%lu reuse=%u%s\n",
          (unsigned long)mib, (unsigned long)keep, (unsigned long)base_mib,
          (unsigned long)chunk_kib, reuse ? 1 : 0, nohint ? " nohint" : "");
  if (!nohint) {
    int e = setup_device();
    if (e) return e;
  }

  /* Touch everything; then all but `keep` MiB counts as freed. */
  for (uint64_t pfn = first; pfn < last; ++pfn) write_stamp(pfn, STAMP_MAGIC, 0);
  gprintf("balloonhint filled mib=%lu free_mib=%lu\n", (unsigned long)mib,
          (unsigned long)(mib - keep));

  for (uint64_t gen = 1; gens == 0 || gen <= gens; ++gen) {
    for (uint64_t pfn = first; pfn < keep_end; ++pfn) {
      int e = check_stamp(pfn, STAMP_MAGIC, gen - 1, "", gen, EXIT_MISMATCH);
      if (e) return e;
      write_stamp(pfn, STAMP_MAGIC, gen);
      /* Answer a new command id within a few ms: migration sends the first pass meanwhile and a
       * page hinted after it went out saves nothing. */
      if (!nohint && pfn % POLL_PAGES == 0 && (e = poll_cmd()) != 0) return e;
    }
    if (reuse_id != 0) {
      for (uint64_t a = free_start; a < free_end; a += chunk) {
        int e = check_stamp(a / PAGE, REUSE_MAGIC, reuse_id, "reused ", gen, EXIT_REUSED_MISMATCH);
        if (e) return e;
      }
    }
    gprintf("balloonhint gen=%lu ok\n", (unsigned long)gen);
    if (corrupt == gen && keep_end > first) page_ptr(first)[1] ^= 1;
    if (!nohint) {
      int e = poll_cmd();
      if (e) return e;
    }
  }
  gprintf("balloonhint finished gens=%lu\n", (unsigned long)gens);
  return 0;
}
