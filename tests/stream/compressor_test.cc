// PageCompressor: output decodes back to the input for both codecs, the per-page RAW/ZERO rules,
// the busy and poor-ratio fallbacks (made deterministic by blocking the pool through
// options.worker_hook), and many sender threads at once.
#include "migration/stream/compressor.h"

#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "migration/stream/page_codec.h"
#include "tests/stream/test_pages.h"

namespace microvmm::migration {
namespace {

using testing::Kind;
using testing::MakePage;
using Records = google::protobuf::RepeatedPtrField<PageRecord>;

// Pages of the given kinds, stored contiguously; Page entries point into the storage.
struct PageSet {
  std::vector<std::vector<uint8_t>> data;
  std::vector<PageCompressor::Page> pages;
  PageSet(const std::vector<Kind>& kinds, uint64_t first_gpa, uint64_t seed) {
    for (size_t i = 0; i < kinds.size(); ++i) data.push_back(MakePage(kinds[i], seed + i));
    for (size_t i = 0; i < kinds.size(); ++i)
      pages.push_back({first_gpa + i * kPageSize, data[i].data()});
  }
};

std::vector<Kind> Repeat(Kind k, size_t n) { return std::vector<Kind>(n, k); }

// Decodes `recs` into fresh memory and checks every page against `set`.
void ExpectDecodesTo(const Records& recs, const PageSet& set) {
  auto mem = GuestMemory::Create(64 << 20);
  ASSERT_TRUE(mem.ok());
  ASSERT_EQ(recs.size(), static_cast<int>(set.pages.size()));
  for (int i = 0; i < recs.size(); ++i) {
    ASSERT_EQ(recs[i].gpa(), set.pages[i].gpa);
    ASSERT_TRUE(DecodePageInto(recs[i], **mem).ok()) << i;
    const uint8_t* want = set.pages[i].data;
    std::vector<uint8_t> zero(kPageSize, 0);
    if (want == nullptr) want = zero.data();
    ASSERT_EQ(std::memcmp(*(*mem)->HostPtr(recs[i].gpa(), kPageSize), want, kPageSize), 0) << i;
  }
}

uint64_t WireBytes(const Records& recs) {
  uint64_t n = 0;
  for (const auto& r : recs) n += 12 + r.data().size();
  return n;
}

// Blocks every worker in the hook until Release(); Entered() waits until `n` workers are in it.
struct Gate {
  std::mutex mu;
  std::condition_variable cv;
  int inside = 0;
  bool open = false;
  void Hook() {
    std::unique_lock<std::mutex> l(mu);
    ++inside;
    cv.notify_all();
    cv.wait(l, [&] { return open; });
  }
  void WaitEntered(int n) {
    std::unique_lock<std::mutex> l(mu);
    cv.wait(l, [&] { return inside >= n; });
  }
  void Release() {
    std::lock_guard<std::mutex> l(mu);
    open = true;
    cv.notify_all();
  }
};

TEST(PageCompressorTest, RejectsBadOptions) {
  PageCompressorOptions o;
  o.codec = RAW;
  EXPECT_FALSE(PageCompressor::Create(o).ok());
  o = {};
  o.codec = ZSTD;
  o.level = 1000;
  EXPECT_FALSE(PageCompressor::Create(o).ok());
  o = {};
  o.pages_per_task = 0;
  EXPECT_FALSE(PageCompressor::Create(o).ok());
  o = {};
  o.sample_every = 0;
  EXPECT_FALSE(PageCompressor::Create(o).ok());
  auto c = PageCompressor::Create({});
  ASSERT_TRUE(c.ok());
  EXPECT_GE((*c)->threads(), 1);
  EXPECT_GE(DefaultCompressorThreads(), 1);
}

TEST(PageCompressorTest, RoundTripsEveryPageKindWithBothCodecs) {
  for (PageCodec codec : {LZ4, ZSTD}) {
    SCOPED_TRACE(codec);
    PageCompressorOptions o;
    o.codec = codec;
    o.threads = 2;
    o.pages_per_task = 3;
    o.queue_capacity = 100;  // never busy and
    o.sample_every = 1;      // never skip: this test is about the per-page rules
    auto c = PageCompressor::Create(o);
    ASSERT_TRUE(c.ok());
    std::vector<Kind> kinds;
    for (int rep = 0; rep < 4; ++rep)
      for (Kind k : testing::kAllKinds) kinds.push_back(k);
    PageSet set(kinds, 0x100000, 1);
    set.pages[1].data = nullptr;  // a (random) page known to be zero, e.g. a hole: no data read
    Records recs;
    uint64_t wire = (*c)->EncodeBatch(set.pages, &recs);
    EXPECT_EQ(wire, WireBytes(recs));
    ExpectDecodesTo(recs, set);
    for (int i = 0; i < recs.size(); ++i) {
      Kind k = kinds[i];
      PageCodec want = set.pages[i].data == nullptr || k == Kind::kZero ? ZERO
                       : k == Kind::kRandom                           ? RAW
                                                                      : codec;
      EXPECT_EQ(recs[i].codec(), want) << i << " " << testing::KindName(k);
      if (want == codec) {
        EXPECT_LE(recs[i].data().size(), kPageSize * 7 / 8);
      }
    }
    PageCompressorStats s = (*c)->stats();
    EXPECT_EQ(s.pages, kinds.size());
    EXPECT_EQ(s.pages_zero, 5u);  // 4 zero pages + the nullptr one
    EXPECT_EQ(s.pages_raw_incompressible, 3u);  // the other random pages
    EXPECT_EQ(s.pages_compressed, kinds.size() - 5 - 3);
    EXPECT_EQ(s.pages_raw_busy + s.pages_raw_poor_ratio, 0u);
    EXPECT_EQ(s.bytes_in, (kinds.size() - 5) * kPageSize);
    EXPECT_LT(s.bytes_out, s.bytes_in);
    EXPECT_GT(s.sampled_ratio, 0);
    EXPECT_LT(s.sampled_ratio, 1);
    EXPECT_DOUBLE_EQ(s.zero_share, 5.0 / kinds.size());
  }
}

TEST(PageCompressorTest, ThresholdSendsBarelyCompressiblePagesRaw) {
  PageCompressorOptions o;
  o.threads = 1;
  o.sample_every = 1;
  o.max_compressed_bytes = 16;  // nothing but a near-empty page fits
  auto c = PageCompressor::Create(o);
  ASSERT_TRUE(c.ok());
  PageSet set({Kind::kText, Kind::kPattern}, 0, 4);
  Records recs;
  (*c)->EncodeBatch(set.pages, &recs);
  EXPECT_EQ(recs[0].codec(), RAW);
  EXPECT_EQ(recs[1].codec(), RAW);
  EXPECT_EQ((*c)->stats().pages_raw_incompressible, 2u);
  ExpectDecodesTo(recs, set);
}

TEST(PageCompressorTest, BusyPoolMakesTheCallerSendRaw) {
  Gate gate;
  PageCompressorOptions o;
  o.threads = 1;
  o.queue_capacity = 1;   // one task may wait behind the busy worker
  o.pages_per_task = 16;
  o.sample_every = 1;
  o.worker_hook = [&] { gate.Hook(); };
  auto c = PageCompressor::Create(o);
  ASSERT_TRUE(c.ok());

  PageSet first(Repeat(Kind::kText, 16), 0, 10);
  Records first_recs;
  std::thread sender([&] { (*c)->EncodeBatch(first.pages, &first_recs); });
  gate.WaitEntered(1);  // the only worker is now stuck on `first`

  // 64 pages = 4 tasks: one fits the queue, three find no free worker and no slot. Those must be
  // encoded right here without waiting; the queued one waits for the gate, so run this batch on
  // its own thread and check the caller-side result before opening the gate.
  PageSet second(Repeat(Kind::kText, 64), 0x200000, 20);
  second.data[20].assign(kPageSize, 0);  // a zero page in a busy task: ZERO, not counted as busy
  Records second_recs;
  std::thread sender2([&] { (*c)->EncodeBatch(second.pages, &second_recs); });
  for (;;) {  // the three rejected tasks are counted before the caller starts waiting
    if ((*c)->stats().pages_raw_busy == 47) break;
    std::this_thread::yield();
  }
  // And a third batch while the queue is full: everything goes raw, immediately, on this thread.
  PageSet third(Repeat(Kind::kText, 8), 0x400000, 30);
  Records third_recs;
  (*c)->EncodeBatch(third.pages, &third_recs);
  for (const auto& r : third_recs) EXPECT_EQ(r.codec(), RAW);
  EXPECT_EQ((*c)->stats().pages_raw_busy, 47u + 8u);

  gate.Release();
  sender.join();
  sender2.join();
  for (const auto& r : first_recs) EXPECT_EQ(r.codec(), LZ4);
  for (int i = 0; i < 64; ++i) {
    PageCodec want = i < 16 ? LZ4 : i == 20 ? ZERO : RAW;  // task 0 was queued, 1..3 rejected
    EXPECT_EQ(second_recs[i].codec(), want) << i;
  }
  ExpectDecodesTo(first_recs, first);
  ExpectDecodesTo(second_recs, second);
  ExpectDecodesTo(third_recs, third);
  PageCompressorStats s = (*c)->stats();
  EXPECT_EQ(s.pages_compressed, 32u);
  EXPECT_EQ(s.pages_zero, 1u);
  EXPECT_EQ(s.pages, 16u + 64u + 8u);
}

TEST(PageCompressorTest, NoQueueStillUsesAFreeWorkerForEveryBatchOfOneSender) {
  // One sender, one worker, no queue: every batch finds the worker free (it is free again before
  // the previous batch's caller wakes up), so nothing is ever encoded raw-because-busy.
  PageCompressorOptions o;
  o.threads = 1;
  o.queue_capacity = 0;
  o.pages_per_task = 64;
  o.sample_every = 1;
  auto c = PageCompressor::Create(o);
  ASSERT_TRUE(c.ok());
  PageSet set(Repeat(Kind::kText, 64), 0, 40);
  for (int b = 0; b < 200; ++b) {
    Records recs;
    (*c)->EncodeBatch(set.pages, &recs);
    if (b % 50 == 0) ExpectDecodesTo(recs, set);
  }
  EXPECT_EQ((*c)->stats().pages_raw_busy, 0u);
  EXPECT_EQ((*c)->stats().pages_compressed, 200u * 64);
}

TEST(PageCompressorTest, SubmitLetsASenderOverlapBatches) {
  Gate gate;
  PageCompressorOptions o;
  o.threads = 2;
  o.queue_capacity = 8;
  o.pages_per_task = 16;
  o.sample_every = 1;
  o.worker_hook = [&] { gate.Hook(); };
  auto c = PageCompressor::Create(o);
  ASSERT_TRUE(c.ok());
  PageSet a(Repeat(Kind::kText, 32), 0, 70), b(Repeat(Kind::kPattern, 32), 0x100000, 80);
  Records ra, rb;
  // Both batches are handed over without waiting although no worker can make progress yet.
  auto pa = (*c)->Submit(a.pages, &ra);
  auto pb = (*c)->Submit(b.pages, &rb);
  EXPECT_EQ(ra.size(), 32);
  EXPECT_EQ(rb.size(), 32);
  gate.WaitEntered(2);
  gate.Release();
  uint64_t wb = pb->Wait();  // waiting out of order is fine
  uint64_t wa = pa->Wait();
  EXPECT_EQ(pa->Wait(), wa);  // idempotent
  EXPECT_EQ(wa, WireBytes(ra));
  EXPECT_EQ(wb, WireBytes(rb));
  ExpectDecodesTo(ra, a);
  ExpectDecodesTo(rb, b);
  EXPECT_EQ((*c)->stats().pages_compressed, 64u);
  // Dropping a Pending waits for it.
  Records rc;
  (*c)->Submit(a.pages, &rc).reset();
  ExpectDecodesTo(rc, a);
}

TEST(PageCompressorTest, PoorRatioSkipsCompressionUntilASampleIsGoodAgain) {
  PageCompressorOptions o;
  o.threads = 1;
  o.sample_every = 4;
  o.ratio_weight = 1.0;  // the estimate is the last compressed batch: easy to reason about
  auto c = PageCompressor::Create(o);
  ASSERT_TRUE(c.ok());
  PageSet random(Repeat(Kind::kRandom, 32), 0, 50);
  PageSet text(Repeat(Kind::kText, 32), 0x100000, 60);
  auto send = [&](const PageSet& set) {
    Records recs;
    (*c)->EncodeBatch(set.pages, &recs);
    ExpectDecodesTo(recs, set);
    return recs;
  };
  send(random);  // batch 0: sample; ratio 1.0 > 0.85
  EXPECT_DOUBLE_EQ((*c)->stats().sampled_ratio, 1.0);
  for (int i = 1; i < 4; ++i) send(text);  // batches 1-3: skipped although they'd compress
  PageCompressorStats s = (*c)->stats();
  EXPECT_EQ(s.pages_raw_poor_ratio, 3u * 32);
  EXPECT_EQ(s.pages_compressed, 0u);
  EXPECT_EQ(s.bytes_in, 32u * kPageSize);  // only the sample went through the pool
  Records sample = send(text);  // batch 4: sample -> good ratio
  for (const auto& r : sample) EXPECT_EQ(r.codec(), LZ4);
  EXPECT_LT((*c)->stats().sampled_ratio, 0.85);
  Records after = send(text);  // batch 5: compressed again
  for (const auto& r : after) EXPECT_EQ(r.codec(), LZ4);
  s = (*c)->stats();
  EXPECT_EQ(s.pages_compressed, 64u);
  EXPECT_EQ(s.pages_raw_poor_ratio, 96u);
  EXPECT_EQ(s.sampled_batches, 2u);
  EXPECT_EQ(s.batches, 6u);
}

TEST(PageCompressorTest, ManySendersAtOnce) {
  PageCompressorOptions o;
  o.threads = 2;
  o.pages_per_task = 8;
  o.queue_capacity = 2;  // small: some tasks go raw-busy, which must be just as correct
  auto c = PageCompressor::Create(o);
  ASSERT_TRUE(c.ok());
  constexpr int kSenders = 4, kBatches = 40, kPages = 64;
  std::vector<Kind> kinds;
  for (int i = 0; i < kPages; ++i) kinds.push_back(testing::kAllKinds[(i * 7) % 5]);
  std::vector<std::unique_ptr<PageSet>> sets;
  for (int t = 0; t < kSenders; ++t)
    sets.push_back(std::make_unique<PageSet>(kinds, t * (8ULL << 20), 100 * t));
  std::vector<std::vector<Records>> out(kSenders, std::vector<Records>(kBatches));
  std::vector<uint64_t> wire(kSenders, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < kSenders; ++t)
    threads.emplace_back([&, t] {
      for (int b = 0; b < kBatches; ++b) wire[t] += (*c)->EncodeBatch(sets[t]->pages, &out[t][b]);
    });
  for (auto& th : threads) th.join();
  uint64_t total_wire = 0;
  for (int t = 0; t < kSenders; ++t)
    for (int b = 0; b < kBatches; ++b) {
      ExpectDecodesTo(out[t][b], *sets[t]);
      total_wire += WireBytes(out[t][b]);
    }
  EXPECT_EQ(total_wire, wire[0] + wire[1] + wire[2] + wire[3]);
  PageCompressorStats s = (*c)->stats();
  EXPECT_EQ(s.batches, uint64_t{kSenders} * kBatches);
  EXPECT_EQ(s.pages, uint64_t{kSenders} * kBatches * kPages);
  // Every page is accounted for exactly once.
  EXPECT_EQ(s.pages_zero + s.pages_compressed + s.pages_raw_incompressible + s.pages_raw_busy +
                s.pages_raw_poor_ratio,
            s.pages);
  EXPECT_GT(s.pages_compressed, 0u);
}

}  // namespace
}  // namespace microvmm::migration
