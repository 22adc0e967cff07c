// PageCompressor: compresses batches of guest pages for the migration page streams on a pool of
// worker threads, never holding the sender back.
//
// Codec choice (bench/codec/codec_bench.cc, numbers in bench/results/codec.json and
// bench/README.md, "Page compression codec"): LZ4 (default acceleration 1). Per 4 KiB page, one
// thread, the "typical guest" mix (2026-11-22, 2-core dev machine, load 1.5-2):
//     codec      compress MB/s  decompress MB/s  wire ratio (7/8 RAW rule)
//     lz4              579          2947             0.573
//     zstd -5          461          1495             0.636
//     zstd -1          226           765             0.512
//     zstd 1           151           511             0.460
//     zstd 3           155           522             0.455
// zstd's negative levels lose to lz4 on both speed and ratio; zstd 1..3 saves another ~20% of
// the bytes at a quarter of the speed, and its decoder (~0.5 GB/s per core) would cap the
// receiver far below the 2.5 GB/s loopback link. With the 2-4 spare cores a migration host
// has, lz4 keeps up with a ~1-2.5 GB/s link (pages the pool can't take go RAW anyway); zstd
// would leave most pages raw-because-busy. Random (encrypted) pages cost lz4 ~2.3 GB/s to
// reject, and the ratio sampling below stops even that.
// The decoder (page_codec.cc) accepts LZ4 and ZSTD records regardless, so the encoder codec can
// change without a protocol change (options.codec).
//
// Policy, per page: all-zero pages stay ZERO tags; a page whose compressed form is larger than
// `max_compressed_bytes` (default 7/8 page) goes RAW. Per batch:
//  - busy: a batch is cut into tasks of `pages_per_task` pages; a task that finds no free worker
//    and no free queue slot is encoded RAW/ZERO on the calling thread instead of waiting
//    (stats.pages_raw_busy): compression may only help the link, never slow the sender.
//  - poor ratio: every `sample_every`-th batch is compressed in full (a sample); every compressed
//    batch updates a running wire-ratio estimate (compressed-or-raw bytes / page bytes of the
//    non-zero pages). While that estimate is above `poor_ratio`, non-sample batches skip
//    compression and go RAW on the caller (stats.pages_raw_poor_ratio).
// Pages are copied to a worker-local buffer before compression: the guest keeps running during
// pre-copy and a codec must not see its input change mid-way (the page is dirty again anyway and
// will be re-sent; the copy only guarantees a well-formed record).
#ifndef MICROVMM_MIGRATION_STREAM_COMPRESSOR_H_
#define MICROVMM_MIGRATION_STREAM_COMPRESSOR_H_

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <span>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "google/protobuf/repeated_ptr_field.h"
#include "proto/migration.pb.h"
#include "vmm/memory/guest_memory.h"

namespace microvmm::migration {

// Host CPUs this process may use minus the 1-minute load average (rounded up), at least 1.
int DefaultCompressorThreads();

struct PageCompressorOptions {
  int threads = 0;                 // 0: DefaultCompressorThreads()
  PageCodec codec = LZ4;           // LZ4 or ZSTD
  int level = 1;                   // LZ4: acceleration (>= 1); ZSTD: compression level
  int queue_capacity = -1;         // tasks waiting beyond free workers; -1: 2 * threads
  uint32_t pages_per_task = 16;    // >= 1
  uint32_t max_compressed_bytes = kPageSize * 7 / 8;
  uint32_t sample_every = 16;      // >= 1; 1 = every batch is a sample (never skip)
  double poor_ratio = 0.85;        // skip compression while the estimate is above this
  double ratio_weight = 0.25;      // weight of the newest batch in the running estimate
  // Testing only: runs on a worker right before it encodes a task (e.g. to block the pool).
  std::function<void()> worker_hook;
};

struct PageCompressorStats {
  uint64_t batches = 0, sampled_batches = 0;
  uint64_t pages = 0;
  uint64_t pages_zero = 0;
  uint64_t pages_compressed = 0;        // sent as options.codec
  uint64_t pages_raw_incompressible = 0;  // compressed, but not below max_compressed_bytes
  uint64_t pages_raw_busy = 0;          // no worker free: encoded on the caller
  uint64_t pages_raw_poor_ratio = 0;    // compression skipped by the ratio estimate
  uint64_t bytes_in = 0;   // page bytes of the non-zero pages a worker tried to compress
  uint64_t bytes_out = 0;  // record data bytes produced for those pages (compressed or raw)
  double sampled_ratio = 0;  // running estimate of bytes_out/bytes_in (0 until the first batch)
  double zero_share = 0;     // pages_zero / pages
};

class PageCompressor {
 public:
  // One page to send: `data` points at kPageSize bytes that stay mapped until the batch is
  // done (they may change meanwhile), or is nullptr for a page known to be zero.
  struct Page {
    uint64_t gpa;
    const uint8_t* data;
  };

  struct TaskResult {
    uint64_t wire = 0, in = 0, out = 0;
  };

  // A submitted batch. Wait() (or the destructor) blocks until the workers are done with it.
  class Pending {
   public:
    ~Pending() { Wait(); }
    // Returns the wire bytes of the batch's records (12 + data each, as EncodePage counts).
    uint64_t Wait();

   private:
    friend class PageCompressor;
    explicit Pending(PageCompressor* owner) : owner_(owner) {}
    PageCompressor* const owner_;
    std::vector<PageRecord*> recs_;
    std::mutex mu_;
    std::condition_variable cv_;
    size_t remaining_ = 0;  // accepted tasks not finished yet; guarded by mu_
    TaskResult sum_;        // from the workers; guarded by mu_
    uint64_t caller_wire_ = 0;
    bool waited_ = false;
    uint64_t wire_ = 0;
  };

  static absl::StatusOr<std::unique_ptr<PageCompressor>> Create(PageCompressorOptions options);
  // Every Pending must be finished (waited or destroyed) first.
  ~PageCompressor();
  PageCompressor(const PageCompressor&) = delete;
  PageCompressor& operator=(const PageCompressor&) = delete;

  // Appends one record per page to `out`, in order (the records are filled by the time Wait()
  // returns), hands the batch to the workers and returns without waiting for them; tasks no
  // worker or queue slot can take are encoded RAW/ZERO right here first. `pages` and `out` must
  // outlive the Pending, and `out` must not be modified before Wait(). Lets a sender compress
  // batch k+1 while it writes batch k. Thread-safe: any number of sender threads at once.
  std::unique_ptr<Pending> Submit(std::span<const Page> pages,
                                  google::protobuf::RepeatedPtrField<PageRecord>* out);
  // Submit + Wait.
  uint64_t EncodeBatch(std::span<const Page> pages,
                       google::protobuf::RepeatedPtrField<PageRecord>* out) {
    return Submit(pages, out)->Wait();
  }

  PageCompressorStats stats() const;
  int threads() const { return static_cast<int>(workers_.size()); }
  const PageCompressorOptions& options() const { return options_; }

 private:
  struct Task {
    const Page* pages;
    PageRecord* const* recs;
    size_t n;
    Pending* pending;
  };

  explicit PageCompressor(PageCompressorOptions options);
  void WorkerLoop();
  // Worker side: zero check, compress, RAW fallback for one task.
  TaskResult CompressTask(const Task& t, std::vector<uint8_t>& page, std::vector<char>& dst,
                          void* codec_state);
  uint64_t EncodeRawOnCaller(const Page* pages, PageRecord* const* recs, size_t n);

  const PageCompressorOptions options_;
  std::vector<std::thread> workers_;

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Task> queue_;  // guarded by mu_
  size_t busy_ = 0;         // workers encoding a task; guarded by mu_
  bool stop_ = false;       // guarded by mu_

  std::atomic<uint64_t> batches_{0}, sampled_batches_{0}, pages_{0}, pages_zero_{0},
      pages_compressed_{0}, pages_raw_incompressible_{0}, pages_raw_busy_{0},
      pages_raw_poor_ratio_{0}, bytes_in_{0}, bytes_out_{0};
  mutable std::mutex ratio_mu_;
  double ratio_ = 0;        // guarded by ratio_mu_
  bool have_ratio_ = false;  // guarded by ratio_mu_
};

}  // namespace microvmm::migration

#endif  // MICROVMM_MIGRATION_STREAM_COMPRESSOR_H_
