/* memwalk: stamps every 4 KiB page of [base_mib, base_mib + mib) MiB each generation and verifies
 * the previous generation's stamp first. Building block for live-migration tests: all state that
 * matters is in guest memory and vCPU registers, so it keeps verifying after a migration.
 *
 * Args: mib (default 8), gens (default 0 = forever), base_mib (default 16), fill (optional).
 * fill=random: besides the stamp, every other word of each page is rewritten each generation with
 * pseudo-random data that changes with (pfn, gen), so pages neither compress nor delta-encode
 * against their previous generation (for migration benchmarks; see fill_random).
 * Those words are not verified; without `fill` the rest of the page is never written (default).
 * The pages are split into ncpus contiguous shares (vCPU c owns pages [P*c/n, P*(c+1)/n)).
 * Generation g = 1, 2, ...: each vCPU checks each of its pages holds stamp(pfn, g-1) (all four
 * words zero for g = 1: fresh RAM), then writes stamp(pfn, g). All vCPUs meet at a barrier; vCPU 0
 * prints "memwalk gen=G ok". After `gens` generations (if nonzero): "memwalk done gens=G", exit 0.
 * Mismatch: "memwalk FAIL cpu=C pfn=0x.. gen=G expected w0,w1,w2,w3 got w0,w1,w2,w3", exit 3
 * (G is the generation being run; the expected words are generation G-1's stamp).
 * Region outside RAM (or overlapping the image): error line, exit 4.
 *
 * Stamp (pfn = physical address >> 12), words at page offsets 0, 8, 2048, 4088:
 *   w0 = 0x4d454d57414c4b00 ^ pfn, w1 = gen, w2 = mix(pfn, gen), w3 = ~w2.
 * A zero, stale (older generation) or misplaced (other pfn) page fails at least one word. */
#include "lib/guest.h"

#define PAGE_SHIFT 12
#define STAMP_MAGIC 0x4d454d57414c4b00ull /* "MEMWALK\0" */
#define EXIT_MISMATCH 3
#define EXIT_NO_RAM 4

static struct barrier gen_barrier;

static inline uint64_t mix(uint64_t pfn, uint64_t gen) {
  uint64_t h = pfn * 0x9e3779b97f4a7c15ull ^ gen * 0xc2b2ae3d27d4eb4full;
  return h ^ (h >> 29);
}

/* Stamp of (pfn, gen); gen 0 is the all-zero page (fresh RAM). */
static inline void stamp(uint64_t pfn, uint64_t gen, uint64_t w[4]) {
  if (gen == 0) {
    w[0] = w[1] = w[2] = w[3] = 0;
    return;
  }
  w[0] = STAMP_MAGIC ^ pfn;
  w[1] = gen;
  w[2] = mix(pfn, gen);
  w[3] = ~w[2];
}

/* Cold path: the words read are passed in (not re-read) so the report shows what failed. */
static void report_mismatch(uint64_t cpu, uint64_t pfn, uint64_t gen, uint64_t g0, uint64_t g1,
                            uint64_t g2, uint64_t g3) __attribute__((noinline, cold, noreturn));
static void report_mismatch(uint64_t cpu, uint64_t pfn, uint64_t gen, uint64_t g0, uint64_t g1,
                            uint64_t g2, uint64_t g3) {
  uint64_t want[4];
  stamp(pfn, gen - 1, want);
  gprintf("memwalk FAIL cpu=%lu pfn=0x%lx gen=%lu expected 0x%016lx,0x%016lx,0x%016lx,0x%016lx"
          " got 0x%016lx,0x%016lx,0x%016lx,0x%016lx\n",
          (unsigned long)cpu, (unsigned long)pfn, (unsigned long)gen, (unsigned long)want[0],
          (unsigned long)want[1], (unsigned long)want[2], (unsigned long)want[3],
          (unsigned long)g0, (unsigned long)g1, (unsigned long)g2, (unsigned long)g3);
  test_exit(EXIT_MISMATCH);
}

/* fill=random: the page is first overwritten with a 4 KiB window of a 64 KiB pool of LCG output
 * (made once, in bss), at a word offset chosen by `h` = mix(pfn, gen), with one `rep movsq`: one
 * instruction per page instead of a ~3000-instruction generator loop, which this emulating KVM
 * runs at well under 1 MiB/s. Full 64-bit LCG outputs do not repeat inside a window, so LZ4 finds
 * nothing to match, and a page's window moves every generation, so an XBZRLE delta against the
 * previous generation is as big as the page. The stamp words are written afterwards. */
#define POOL_WORDS 8192
static uint64_t pool[POOL_WORDS + 512];

static void pool_init(void) {
  uint64_t x = 0x2545f4914f6cdd1dull;
  for (int i = 0; i < POOL_WORDS + 512; i++) {
    x = x * 6364136223846793005ull + 1442695040888963407ull;
    pool[i] = x;
  }
}

static inline void fill_random(volatile uint64_t* pg, uint64_t h) {
  const uint64_t* src = pool + (h % POOL_WORDS);
  void* dst = (void*)(uintptr_t)pg;
  uint64_t n = 512;
  __asm__ volatile("rep movsq" : "+D"(dst), "+S"(src), "+c"(n) : : "memory");
}

/* One generation over pages [first, last) (pfns). Returns only if every page verified.
 * About 35 instructions per page (plus one `rep movsq` of 512 words with fill=random). */
static void walk(uint64_t cpu, uint64_t first, uint64_t last, uint64_t gen, bool random) {
  const uint64_t prev = gen - 1;
  for (uint64_t pfn = first; pfn < last; pfn++) {
    volatile uint64_t* pg = (volatile uint64_t*)(uintptr_t)(pfn << PAGE_SHIFT);
    const uint64_t g0 = pg[0], g1 = pg[1], g2 = pg[256], g3 = pg[511];
    uint64_t want[4];
    stamp(pfn, prev, want);
    if ((g0 ^ want[0]) | (g1 ^ want[1]) | (g2 ^ want[2]) | (g3 ^ want[3])) {
      report_mismatch(cpu, pfn, gen, g0, g1, g2, g3);
    }
    const uint64_t h = mix(pfn, gen);
    if (random) fill_random(pg, h);
    pg[0] = STAMP_MAGIC ^ pfn;
    pg[1] = gen;
    pg[256] = h;
    pg[511] = ~h;
  }
}

int guest_main(uint64_t cpu, uint64_t ncpus, const char* args, uint64_t ram_size) {
  const uint64_t mib = arg_u64(args, "mib", 8);
  const uint64_t gens = arg_u64(args, "gens", 0);
  const uint64_t base_mib = arg_u64(args, "base_mib", 16);
  const bool random = arg_eq(args, "fill", "random");

  const uint64_t base = base_mib << 20;
  const uint64_t end = base + (mib << 20);
  const uint64_t top = guest_ram_top(ram_size);
  if (mib == 0 || mib > (1ull << 20) || base_mib > (1ull << 20) || base < guest_image_end() ||
      end > top) {
    if (cpu == 0) {
      gprintf("memwalk: region [0x%lx, 0x%lx) does not fit in RAM [0x%lx, 0x%lx) (ram_size=0x%lx)\n",
              (unsigned long)base, (unsigned long)end, (unsigned long)guest_image_end(),
              (unsigned long)top, (unsigned long)ram_size);
      return EXIT_NO_RAM;
    }
    return 0;
  }

  const uint64_t first_pfn = base >> PAGE_SHIFT;
  const uint64_t npages = (mib << 20) >> PAGE_SHIFT;
  const uint64_t first = first_pfn + npages * cpu / ncpus;
  const uint64_t last = first_pfn + npages * (cpu + 1) / ncpus;

  /* Every vCPU fills the pool (identical values, so the overlapping writes are harmless): no
   * vCPU can copy from it before it is complete, without an extra barrier. */
  if (random) pool_init();
  if (cpu == 0) {
    gprintf("memwalk start mib=%lu base_mib=%lu gens=%lu ncpus=%lu%s\n", (unsigned long)mib,
            (unsigned long)base_mib, (unsigned long)gens, (unsigned long)ncpus,
            random ? " fill=random" : "");
  }

  for (uint64_t gen = 1; gens == 0 || gen <= gens; gen++) {
    walk(cpu, first, last, gen, random);
    barrier_wait(&gen_barrier, (uint32_t)ncpus);
    if (cpu == 0) gprintf("memwalk gen=%lu ok\n", (unsigned long)gen);
  }
  if (cpu == 0) gprintf("memwalk done gens=%lu\n", (unsigned long)gens);
  return 0;
}
