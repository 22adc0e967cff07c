#include "migration/stream/compressor.h"

#include <sched.h>

#include <cmath>
#include <cstdio>
#include <cstring>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "lz4.h"
#include "migration/stream/page_codec.h"
#include "zstd.h"

namespace microvmm::migration {

namespace {
constexpr uint64_t kRecordOverhead = 12;  // gpa + codec + length, as EncodePage counts
}  // namespace

int DefaultCompressorThreads() {
  cpu_set_t set;
  int cpus = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : 1;
  double load = 0;
  if (FILE* f = std::fopen("/proc/loadavg", "r")) {
    if (std::fscanf(f, "%lf", &load) != 1) load = 0;
    std::fclose(f);
  }
  int idle = cpus - static_cast<int>(std::ceil(load));
  return idle < 1 ? 1 : idle;
}

absl::StatusOr<std::unique_ptr<PageCompressor>> PageCompressor::Create(PageCompressorOptions o) {
  if (o.codec != LZ4 && o.codec != ZSTD)
    return absl::InvalidArgumentError("page compressor codec must be LZ4 or ZSTD");
  if (o.codec == LZ4 && o.level < 1)
    return absl::InvalidArgumentError("LZ4 acceleration must be >= 1");
  if (o.codec == ZSTD && (o.level < ZSTD_minCLevel() || o.level > ZSTD_maxCLevel()))
    return absl::InvalidArgumentError(absl::StrFormat("zstd level %d out of range", o.level));
  if (o.threads < 0 || o.pages_per_task == 0 || o.sample_every == 0 ||
      o.max_compressed_bytes == 0 || o.ratio_weight <= 0 || o.ratio_weight > 1)
    return absl::InvalidArgumentError("bad page compressor options");
  if (o.threads == 0) o.threads = DefaultCompressorThreads();
  if (o.queue_capacity < 0) o.queue_capacity = 2 * o.threads;
  return std::unique_ptr<PageCompressor>(new PageCompressor(std::move(o)));
}

PageCompressor::PageCompressor(PageCompressorOptions options) : options_(std::move(options)) {
  for (int i = 0; i < options_.threads; ++i) workers_.emplace_back([this] { WorkerLoop(); });
}

PageCompressor::~PageCompressor() {
  {
    std::lock_guard<std::mutex> l(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  for (auto& t : workers_) t.join();
}

void PageCompressor::WorkerLoop() {
  std::vector<uint8_t> page(kPageSize);
  std::vector<char> dst(ZSTD_COMPRESSBOUND(kPageSize) + LZ4_COMPRESSBOUND(kPageSize));
  // Per-worker codec state, created once (LZ4 extState / zstd CCtx).
  std::vector<char> lz4_state;
  std::unique_ptr<ZSTD_CCtx, size_t (*)(ZSTD_CCtx*)> cctx(nullptr, ZSTD_freeCCtx);
  void* state = nullptr;
  if (options_.codec == LZ4) {
    lz4_state.resize(LZ4_sizeofState());
    state = lz4_state.data();
  } else {
    cctx.reset(ZSTD_createCCtx());
    state = cctx.get();  // nullptr (allocation failure) -> pages go RAW
  }
  for (;;) {
    Task t;
    {
      std::unique_lock<std::mutex> l(mu_);
      cv_.wait(l, [&] { return stop_ || !queue_.empty(); });
      if (queue_.empty()) return;  // stop_
      t = queue_.front();
      queue_.pop_front();
      ++busy_;
    }
    if (options_.worker_hook) options_.worker_hook();
    TaskResult r = CompressTask(t, page, dst, state);
    {
      // Free again before the waiter learns the task is done: its next batch must find this
      // worker available, not race it back to cv_.wait().
      std::lock_guard<std::mutex> l(mu_);
      --busy_;
    }
    std::lock_guard<std::mutex> l(t.pending->mu_);
    t.pending->sum_.wire += r.wire;
    t.pending->sum_.in += r.in;
    t.pending->sum_.out += r.out;
    if (--t.pending->remaining_ == 0) t.pending->cv_.notify_one();
  }
}

PageCompressor::TaskResult PageCompressor::CompressTask(const Task& t, std::vector<uint8_t>& page,
                                                        std::vector<char>& dst, void* state) {
  TaskResult r;
  uint64_t zero = 0, compressed = 0, incompressible = 0;
  for (size_t i = 0; i < t.n; ++i) {
    const Page& pg = t.pages[i];
    PageRecord* rec = t.recs[i];
    if (pg.data == nullptr) {
      r.wire += EncodeZeroPage(pg.gpa, rec);
      ++zero;
      continue;
    }
    std::memcpy(page.data(), pg.data, kPageSize);  // stable snapshot (see header)
    if (IsZeroPage(page.data())) {
      r.wire += EncodeZeroPage(pg.gpa, rec);
      ++zero;
      continue;
    }
    size_t n = 0;
    if (options_.codec == LZ4) {
      int c = LZ4_compress_fast_extState(state, reinterpret_cast<const char*>(page.data()),
                                         dst.data(), kPageSize, static_cast<int>(dst.size()),
                                         options_.level);
      n = c > 0 ? static_cast<size_t>(c) : 0;
    } else if (state != nullptr) {
      size_t c = ZSTD_compressCCtx(static_cast<ZSTD_CCtx*>(state), dst.data(), dst.size(),
                                   page.data(), kPageSize, options_.level);
      n = ZSTD_isError(c) ? 0 : c;
    }
    rec->set_gpa(pg.gpa);
    if (n != 0 && n <= options_.max_compressed_bytes) {
      rec->set_codec(options_.codec);
      rec->set_data(dst.data(), n);
      ++compressed;
    } else {
      rec->set_codec(RAW);
      rec->set_data(page.data(), kPageSize);
      ++incompressible;
    }
    r.in += kPageSize;
    r.out += rec->data().size();
    r.wire += kRecordOverhead + rec->data().size();
  }
  pages_zero_.fetch_add(zero, std::memory_order_relaxed);
  pages_compressed_.fetch_add(compressed, std::memory_order_relaxed);
  pages_raw_incompressible_.fetch_add(incompressible, std::memory_order_relaxed);
  return r;
}

uint64_t PageCompressor::EncodeRawOnCaller(const Page* pages, PageRecord* const* recs, size_t n) {
  uint64_t wire = 0, zero = 0;
  for (size_t i = 0; i < n; ++i) {
    wire += pages[i].data == nullptr ? EncodeZeroPage(pages[i].gpa, recs[i])
                                     : EncodePage(pages[i].gpa, pages[i].data, recs[i]);
    zero += recs[i]->codec() == ZERO;
  }
  pages_zero_.fetch_add(zero, std::memory_order_relaxed);
  return wire;
}

std::unique_ptr<PageCompressor::Pending> PageCompressor::Submit(
    std::span<const Page> pages, google::protobuf::RepeatedPtrField<PageRecord>* out) {
  std::unique_ptr<Pending> p(new Pending(this));
  if (pages.empty()) return p;
  auto& recs = p->recs_;
  recs.resize(pages.size());
  for (auto& r : recs) r = out->Add();
  pages_.fetch_add(pages.size(), std::memory_order_relaxed);

  const uint64_t index = batches_.fetch_add(1, std::memory_order_relaxed);
  const bool sample = index % options_.sample_every == 0;
  if (sample) {
    sampled_batches_.fetch_add(1, std::memory_order_relaxed);
  } else {
    bool poor;
    {
      std::lock_guard<std::mutex> l(ratio_mu_);
      poor = have_ratio_ && ratio_ > options_.poor_ratio;
    }
    if (poor) {
      p->caller_wire_ = EncodeRawOnCaller(pages.data(), recs.data(), pages.size());
      uint64_t zero = 0;
      for (auto* r : recs) zero += r->codec() == ZERO;
      pages_raw_poor_ratio_.fetch_add(pages.size() - zero, std::memory_order_relaxed);
      return p;
    }
  }

  std::vector<size_t> rejected;  // first page of each task no worker could take
  size_t accepted = 0;
  {
    std::lock_guard<std::mutex> l(mu_);
    for (size_t i = 0; i < pages.size(); i += options_.pages_per_task) {
      size_t n = std::min<size_t>(options_.pages_per_task, pages.size() - i);
      // Accept while a worker is free for it or a queue slot is free; otherwise the caller
      // encodes it raw (below, outside the lock). A worker not yet started counts as free.
      const size_t free_workers = workers_.size() - busy_;
      if (queue_.size() < options_.queue_capacity + free_workers) {
        queue_.push_back(Task{&pages[i], &recs[i], n, p.get()});
        ++accepted;
      } else {
        rejected.push_back(i);
      }
    }
    // Under mu_: no worker can finish (and decrement) one of these tasks before this is set.
    std::lock_guard<std::mutex> pl(p->mu_);
    p->remaining_ = accepted;
  }
  if (accepted > 0) cv_.notify_all();
  for (size_t i : rejected) {
    size_t n = std::min<size_t>(options_.pages_per_task, pages.size() - i);
    p->caller_wire_ += EncodeRawOnCaller(&pages[i], &recs[i], n);
    uint64_t zero = 0;
    for (size_t k = i; k < i + n; ++k) zero += recs[k]->codec() == ZERO;
    pages_raw_busy_.fetch_add(n - zero, std::memory_order_relaxed);
  }
  return p;
}

uint64_t PageCompressor::Pending::Wait() {
  if (waited_) return wire_;
  TaskResult sum;
  {
    std::unique_lock<std::mutex> l(mu_);
    cv_.wait(l, [&] { return remaining_ == 0; });
    sum = sum_;
  }
  waited_ = true;
  wire_ = caller_wire_ + sum.wire;
  PageCompressor& c = *owner_;
  c.bytes_in_.fetch_add(sum.in, std::memory_order_relaxed);
  c.bytes_out_.fetch_add(sum.out, std::memory_order_relaxed);
  if (sum.in > 0) {  // update the estimate from what the workers actually compressed
    double ratio = static_cast<double>(sum.out) / static_cast<double>(sum.in);
    std::lock_guard<std::mutex> l(c.ratio_mu_);
    c.ratio_ = c.have_ratio_ ? (1 - c.options_.ratio_weight) * c.ratio_ +
                                   c.options_.ratio_weight * ratio
                             : ratio;
    c.have_ratio_ = true;
  }
  return wire_;
}

PageCompressorStats PageCompressor::stats() const {
  PageCompressorStats s;
  s.batches = batches_.load();
  s.sampled_batches = sampled_batches_.load();
  s.pages = pages_.load();
  s.pages_zero = pages_zero_.load();
  s.pages_compressed = pages_compressed_.load();
  s.pages_raw_incompressible = pages_raw_incompressible_.load();
  s.pages_raw_busy = pages_raw_busy_.load();
  s.pages_raw_poor_ratio = pages_raw_poor_ratio_.load();
  s.bytes_in = bytes_in_.load();
  s.bytes_out = bytes_out_.load();
  {
    std::lock_guard<std::mutex> l(ratio_mu_);
    s.sampled_ratio = ratio_;
  }
  s.zero_share = s.pages ? static_cast<double>(s.pages_zero) / s.pages : 0;
  return s;
}

}  // namespace microvmm::migration
