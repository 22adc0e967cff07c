// The adaptive migration policy on metric traces: recorded tables (open loop: the numbers do not
// react to the policy) and a small workload model (closed loop: the next iteration's numbers
// follow the settings the policy chose), so "tuned before the next rung" and "finishes where a
// fixed configuration does not" can be observed.
#include "migration/policy/policy.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace microvmm::migration {
namespace {

using ::testing::HasSubstr;

constexpr double kMiB = 1024.0 * 1024.0;
constexpr uint64_t kLimitMs = 300;

// Host/guest conditions shared by all rows of a recorded trace.
struct Host {
  double ratio = 2.5;        // sampled compression ratio
  double zero = 0.1;
  double hit = 0.5;          // delta hit rate
  double idle = 1.5;         // idle host cores
  double free_gib = 8;
  double io_mibps = 1;
  // Delta probe (PageEncoder::SampleDelta): compared pages, their hit rate and delta size.
  uint32_t sample_pages = 0;
  double sample_hit = 0;
  double sample_size = 0;
};

// One recorded iteration: remaining MiB, dirty MiB/s, bandwidth MiB/s.
struct Row {
  double remaining, dirty, bw;
};

IterationMetrics Metrics(uint32_t iter, const Row& r, const Host& h) {
  IterationMetrics m;
  m.set_iteration(iter);
  m.set_elapsed_ms(iter * 1000);
  m.set_remaining_bytes(uint64_t(r.remaining * kMiB));
  m.set_dirty_bytes_per_s(uint64_t(r.dirty * kMiB));
  m.set_bandwidth_bytes_per_s(uint64_t(r.bw * kMiB));
  m.set_compression_ratio(h.ratio);
  m.set_zero_share(h.zero);
  m.set_delta_hit_rate(h.hit);
  m.set_idle_host_cores(h.idle);
  m.set_free_host_memory_bytes(uint64_t(h.free_gib * 1024 * kMiB));
  m.set_guest_io_bytes_per_s(uint64_t(h.io_mibps * kMiB));
  m.set_delta_sample_pages(h.sample_pages);
  m.set_delta_sample_hit_rate(h.sample_hit);
  m.set_delta_sample_size_ratio(h.sample_size);
  m.set_downtime_limit_ms(kLimitMs);
  m.set_expected_downtime_ms(uint64_t(r.remaining / r.bw * 1000));
  return m;
}

std::unique_ptr<MigrationPolicy> NewPolicy(const PolicyConfig& c) {
  auto p = MigrationPolicy::Create(c);
  EXPECT_TRUE(p.ok()) << p.status();
  return p.ok() ? std::move(*p) : nullptr;
}

// Replays a recorded trace; returns every decision and the tendency after each row.
struct Replay {
  std::vector<PolicyDecision> decisions;
  std::vector<PolicyTendency> tendencies;
};
Replay Play(MigrationPolicy& p, const std::vector<Row>& rows, const Host& h = {}) {
  Replay r;
  uint32_t iter = 0;
  for (const Row& row : rows) {
    IterationMetrics m = Metrics(++iter, row, h);
    for (PolicyDecision& d : p.Observe(m)) {
      EXPECT_EQ(d.iteration(), iter);
      EXPECT_EQ(d.metrics().remaining_bytes(), m.remaining_bytes());  // the triggering numbers
      EXPECT_THAT(d.reason(), HasSubstr("expected downtime"));
      r.decisions.push_back(std::move(d));
    }
    r.tendencies.push_back(p.tendency());
  }
  return r;
}

int TendencyChanges(const std::vector<PolicyTendency>& t) {
  int n = 0;
  for (size_t i = 1; i < t.size(); ++i) n += t[i] != t[i - 1];
  return n;
}

std::vector<Row> Repeat(const std::vector<Row>& pattern, int times) {
  std::vector<Row> out;
  for (int i = 0; i < times; ++i) out.insert(out.end(), pattern.begin(), pattern.end());
  return out;
}

// "STEP ACTION" list, for comparing ladder sequences.
std::vector<std::string> Steps(const std::vector<PolicyDecision>& ds) {
  std::vector<std::string> out;
  for (const auto& d : ds) {
    out.push_back(std::string(StepName(d.step())) + " " + ActionName(d.action()));
  }
  return out;
}

// Closed-loop model of a pre-copy migration: each pass sends what is dirty, and what the guest
// dirtied meanwhile is the next pass's work (capped by the working set).
struct Workload {
  double ram_mib = 4096;
  double wss_mib = 1024;        // working set
  double wss_growth = 0.0;      // per iteration
  double dirty_mibps = 3000;    // unthrottled
  double link_mibps = 100;
  double ratio = 2.0;           // compression cap
  double per_thread = 0.4;      // each compression thread adds this much effective bandwidth
  double hit = 0.3;             // delta hit rate
  double host_idle = 3.5;       // idle cores without our compression threads
  double free_gib = 8;
  double io_mibps = 1;
};

class Sim {
 public:
  explicit Sim(Workload w) : w_(w), remaining_(w.ram_mib), wss_(w.wss_mib) {}
  IterationMetrics Next(const PolicySettings& s) {
    const double comp = s.compress() ? std::min(w_.ratio, 1 + w_.per_thread * s.compress_threads())
                                     : 1.0;
    const double bw = w_.link_mibps * comp * (s.delta() ? 1 + w_.hit : 1.0);
    const double dirty = w_.dirty_mibps * (1 - s.throttle_percent() / 100.0);
    wss_ *= 1 + w_.wss_growth;
    remaining_ = std::min(wss_, dirty * (remaining_ / bw));
    Host h{w_.ratio, 0.05, s.delta() ? w_.hit : 0.0,
           w_.host_idle - (s.compress() ? s.compress_threads() : 0), w_.free_gib, w_.io_mibps};
    IterationMetrics m = Metrics(++iter_, {remaining_, dirty, bw}, h);
    // Two vCPUs, the first one dirtying three quarters.
    m.add_vcpu_dirty_bytes_per_s(uint64_t(dirty * 0.75 * kMiB));
    m.add_vcpu_dirty_bytes_per_s(uint64_t(dirty * 0.25 * kMiB));
    return m;
  }

 private:
  Workload w_;
  double remaining_, wss_;
  uint32_t iter_ = 0;
};

// Runs the policy against the model until post-copy or `max_iter`.
std::vector<PolicyDecision> RunSim(MigrationPolicy& p, const Workload& w, int max_iter,
                                   std::vector<PolicySettings>* history = nullptr,
                                   IterationMetrics* last = nullptr) {
  Sim sim(w);
  std::vector<PolicyDecision> all;
  for (int i = 0; i < max_iter && !p.settings().switch_to_postcopy(); ++i) {
    IterationMetrics m = sim.Next(p.settings());
    for (auto& d : p.Observe(m)) all.push_back(std::move(d));
    if (history) history->push_back(p.settings());
    if (last) *last = m;
  }
  return all;
}

// --- recorded traces ---------------------------------------------------------------------

TEST(TendencyTest, ConvergingTraceTakesNoRung) {
  auto p = NewPolicy({});
  // Dirty rate half the bandwidth: every pass leaves about half of the previous one.
  const std::vector<Row> rows = {{4096, 50, 100}, {2100, 50, 100}, {1000, 55, 100},
                                 {520, 50, 100},  {260, 48, 100},  {130, 50, 100},
                                 {70, 50, 100},   {40, 50, 100},   {25, 50, 100}};
  Replay r = Play(*p, rows);
  EXPECT_TRUE(r.decisions.empty()) << r.decisions[0].reason();
  EXPECT_EQ(r.tendencies[3], TENDENCY_CONVERGING);  // first full window
  EXPECT_EQ(r.tendencies.back(), TENDENCY_CONVERGING);
  EXPECT_EQ(TendencyChanges(r.tendencies), 1);  // UNKNOWN -> CONVERGING, nothing else
  EXPECT_FALSE(p->settings().compress());
  EXPECT_EQ(p->settings().throttle_percent(), 0u);
}

TEST(TendencyTest, DivergingTrace) {
  PolicyConfig c;
  TendencyDetector det(*ValidatePolicyConfig(c));
  const std::vector<Row> rows = {{1000, 90, 100}, {1150, 90, 100}, {1300, 95, 100},
                                 {1500, 95, 100}, {1700, 99, 100}};
  PolicyTendency t = TENDENCY_UNKNOWN;
  uint32_t i = 0;
  for (const Row& row : rows) t = det.Add(Metrics(++i, row, {}));
  EXPECT_EQ(t, TENDENCY_DIVERGING);
  EXPECT_THAT(det.Explain(), HasSubstr("floor of remaining"));
}

TEST(TendencyTest, DirtyFasterThanBandwidthIsDivergingEvenAtTheWorkingSetCap) {
  TendencyDetector det(*ValidatePolicyConfig({}));
  PolicyTendency t = TENDENCY_UNKNOWN;
  for (uint32_t i = 1; i <= 4; ++i) t = det.Add(Metrics(i, {1024, 200, 100}, {}));
  EXPECT_EQ(t, TENDENCY_DIVERGING);
  EXPECT_THAT(det.Explain(), HasSubstr("dirty/bandwidth 2.00"));
}

TEST(TendencyTest, OscillatingTraceDoesNotFlap) {
  // Period 2 (a pass after a write burst, then a quiet one), default window of 4.
  auto p = NewPolicy({});
  Replay r = Play(*p, Repeat({{800, 90, 100}, {400, 90, 100}}, 12));
  EXPECT_EQ(r.tendencies.back(), TENDENCY_STALLED);
  EXPECT_EQ(TendencyChanges(r.tendencies), 1);  // UNKNOWN -> STALLED only
  // Stalled is not converging, so the ladder climbs - but nothing is switched on and off again.
  for (const auto& d : r.decisions) EXPECT_NE(d.action(), PolicyDecision::DISABLE) << d.reason();
  ASSERT_FALSE(r.decisions.empty());
  // Dirty rate pinned at the bandwidth (90 of 100), but remaining swings by 50%: not evident
  // divergence, so the policy waits for its full window of STALLED (passes 4..7).
  EXPECT_EQ(r.decisions[0].iteration(), 7u);

  // Period 3 with a window of 6: each half holds a whole period.
  PolicyConfig c;
  c.set_window(6);
  auto p3 = NewPolicy(c);
  Replay r3 = Play(*p3, Repeat({{800, 90, 100}, {500, 90, 100}, {650, 90, 100}}, 8));
  EXPECT_EQ(r3.tendencies.back(), TENDENCY_STALLED);
  EXPECT_EQ(TendencyChanges(r3.tendencies), 1);

  // Period 3 with the default window: raw readings cycle, hysteresis holds one tendency.
  auto p4 = NewPolicy({});
  Replay r4 = Play(*p4, Repeat({{800, 90, 100}, {500, 90, 100}, {650, 90, 100}}, 8));
  EXPECT_LE(TendencyChanges(r4.tendencies), 1);
}

TEST(TendencyTest, OscillatingAroundTheDowntimeLimitStaysConverging) {
  auto p = NewPolicy({});
  // Expected downtime 250 ms / 350 ms against a 300 ms limit.
  Replay r = Play(*p, Repeat({{25, 90, 100}, {35, 90, 100}}, 10));
  EXPECT_TRUE(r.decisions.empty());
  for (PolicyTendency t : r.tendencies) EXPECT_EQ(t, TENDENCY_CONVERGING);
}

// --- evident divergence: acting before a full window ---------------------------------------

TEST(EvidentDivergenceTest, ActsAtPassThreeWhenDivergenceIsEvident) {
  // Dirty rate twice the bandwidth, remaining at the working-set cap: evidence at passes 2 and
  // 3 (each compared with the previous one), the ladder acts at pass 3 - QEMU's auto-converge
  // would at its third sync. Without evidence the first action would wait for pass 7.
  auto p = NewPolicy({});
  Replay r = Play(*p, std::vector<Row>(6, {1024, 200, 100}));
  ASSERT_FALSE(r.decisions.empty());
  EXPECT_EQ(r.decisions[0].iteration(), 3u);
  EXPECT_EQ(r.tendencies[0], TENDENCY_UNKNOWN);
  EXPECT_EQ(r.tendencies[1], TENDENCY_UNKNOWN);  // one pass of evidence: not yet
  EXPECT_EQ(r.tendencies[2], TENDENCY_DIVERGING);
  EXPECT_THAT(r.decisions[0].reason(), HasSubstr("evident divergence for 2 passes in a row"));
  EXPECT_THAT(r.decisions[0].reason(), HasSubstr("dirty/bandwidth 2.00"));
  EXPECT_EQ(TendencyChanges(r.tendencies), 1);  // and it stays DIVERGING once the window fills
}

TEST(EvidentDivergenceTest, PinnedAtTheBandwidthWithFlatRemainingIsEvident) {
  // The bench's random workload: 16 MiB re-dirtied within each 4.4 s pass over a 3.65 MiB/s
  // link; the measured dirty rate is pinned at the bandwidth.
  PolicyConfig c;
  c.add_ladder(STEP_THROTTLE);
  auto p = NewPolicy(c);
  Replay r = Play(*p, std::vector<Row>(5, {16.1, 3.6, 3.65}));
  ASSERT_FALSE(r.decisions.empty());
  EXPECT_EQ(Steps(r.decisions)[0], "THROTTLE ENABLE");
  EXPECT_EQ(r.decisions[0].iteration(), 3u);
  EXPECT_THAT(r.decisions[0].reason(), HasSubstr("(pinned at the bandwidth)"));
}

TEST(EvidentDivergenceTest, NotEvidentWaitsForTheWindow) {
  // Stalled well under the bandwidth (dirty 0.7x): no evidence, the window decides (STALLED from
  // pass 4, acted on after 4 non-converging passes: pass 7).
  auto p = NewPolicy({});
  Replay r = Play(*p, std::vector<Row>(8, {1024, 70, 100}));
  ASSERT_FALSE(r.decisions.empty());
  EXPECT_EQ(r.decisions[0].iteration(), 7u);
  EXPECT_EQ(r.tendencies.back(), TENDENCY_STALLED);

  // Evidence interrupted by a pass where remaining fell by 30%: the streak starts over.
  auto p2 = NewPolicy({});
  Replay r2 = Play(*p2, {{1024, 200, 100}, {1024, 200, 100}, {700, 200, 100},
                         {700, 200, 100}, {700, 200, 100}});
  ASSERT_FALSE(r2.decisions.empty());
  EXPECT_EQ(r2.decisions[0].iteration(), 5u);  // evidence at 4 and 5
  EXPECT_EQ(r2.tendencies[2], TENDENCY_UNKNOWN);
}

// --- delta probe before enabling delta -------------------------------------------------------

TEST(DeltaSampleTest, RandomContentSkipsDeltaWithTheSampledNumbers) {
  // The bench's random workload: nothing compresses (1.02x), every byte of a page changes
  // (sampled hit rate 0% of 64 pages): delta is skipped instead of filling a cache for 2 passes,
  // and the throttle comes in the same pass.
  auto p = NewPolicy({});
  Host h;
  h.ratio = 1.02;
  h.idle = 0;
  h.sample_pages = 64;
  h.sample_hit = 0;
  Replay r = Play(*p, std::vector<Row>(3, {16.1, 3.6, 3.65}), h);  // (pass 4 tunes the throttle)
  ASSERT_EQ(Steps(r.decisions),
            (std::vector<std::string>{"COMPRESS SKIP", "DELTA SKIP", "THROTTLE ENABLE"}));
  EXPECT_THAT(r.decisions[1].reason(),
              HasSubstr("sampled delta hit rate 0% of 64 pages < 20%"));
  for (const auto& d : r.decisions) {
    EXPECT_EQ(d.iteration(), 3u);
    EXPECT_FALSE(d.settings().delta());
  }
  EXPECT_EQ(p->settings().throttle_percent(), 20u);
}

TEST(DeltaSampleTest, FewWordWritesEnableDelta) {
  // The bench's compressible workload (4 words of each page rewritten): deltas of ~1% of a page.
  auto p = NewPolicy({});
  Host h;
  h.idle = 0;  // the 2-core host: no core to compress on
  h.sample_pages = 64;
  h.sample_hit = 1.0;
  h.sample_size = 0.012;
  Replay r = Play(*p, std::vector<Row>(4, {32.1, 3.6, 3.65}), h);
  ASSERT_EQ(Steps(r.decisions), (std::vector<std::string>{"COMPRESS SKIP", "DELTA ENABLE"}));
  EXPECT_THAT(r.decisions[1].reason(),
              HasSubstr("sampled delta hit rate 100% of 64 pages, mean delta 1.2% of a page"));
  EXPECT_TRUE(p->settings().delta());
}

TEST(DeltaSampleTest, TooFewSampledPagesKeepTheOldBehaviour) {
  PolicyConfig c;
  c.add_ladder(STEP_DELTA);
  auto p = NewPolicy(c);
  Host h;
  h.sample_pages = 7;  // < min_delta_sample_pages (8)
  h.sample_hit = 0;
  Replay r = Play(*p, std::vector<Row>(4, {1024, 200, 100}), h);
  ASSERT_EQ(Steps(r.decisions), (std::vector<std::string>{"DELTA ENABLE"}));
  EXPECT_THAT(r.decisions[0].reason(), HasSubstr("delta not sampled (7 of 8 pages needed)"));

  // A configured threshold counts, and a hit rate just at min_delta_hit_rate enables.
  c.set_min_delta_sample_pages(4);
  auto p2 = NewPolicy(c);
  h.sample_hit = 0.2;
  Replay r2 = Play(*p2, std::vector<Row>(4, {1024, 200, 100}), h);
  ASSERT_EQ(Steps(r2.decisions), (std::vector<std::string>{"DELTA ENABLE"}));
  EXPECT_THAT(r2.decisions[0].reason(), HasSubstr("sampled delta hit rate 20% of 7 pages"));
  h.sample_hit = 0.19;
  auto p3 = NewPolicy(c);
  Replay r3 = Play(*p3, std::vector<Row>(4, {1024, 200, 100}), h);
  ASSERT_EQ(Steps(r3.decisions), (std::vector<std::string>{"DELTA SKIP", "NONE EXHAUSTED"}));
}

TEST(PolicyTest, SkipReasonsCarryTheNumbersThenExhaustedOnce) {
  PolicyConfig c;
  c.set_throttle_max_guest_io_bytes_per_s(50 * 1024 * 1024);
  auto p = NewPolicy(c);  // allow_postcopy defaults to false
  Host h;
  h.ratio = 1.1;
  h.free_gib = 32.0 / 1024;  // 32 MiB
  h.io_mibps = 200;
  Replay r = Play(*p, std::vector<Row>(12, {1024, 200, 100}), h);
  ASSERT_EQ(Steps(r.decisions),
            (std::vector<std::string>{"COMPRESS SKIP", "DELTA SKIP", "THROTTLE SKIP",
                                      "POSTCOPY SKIP", "NONE EXHAUSTED"}));
  EXPECT_THAT(r.decisions[0].reason(), HasSubstr("sampled compression ratio 1.10x < 1.50x"));
  EXPECT_THAT(r.decisions[1].reason(), HasSubstr("free host memory 32.0 MiB"));
  EXPECT_THAT(r.decisions[1].reason(), HasSubstr("8.0 MiB < the 16.0 MiB minimum"));
  EXPECT_THAT(r.decisions[2].reason(), HasSubstr("guest I/O 200.0 MiB/s >= 50.0 MiB/s"));
  EXPECT_THAT(r.decisions[3].reason(), HasSubstr("post-copy not allowed"));
  EXPECT_THAT(r.decisions[0].reason(), HasSubstr("tendency DIVERGING"));
  EXPECT_THAT(r.decisions[0].reason(), HasSubstr("dirty/bandwidth 2.00"));
  for (const auto& d : r.decisions) EXPECT_EQ(d.tendency(), TENDENCY_DIVERGING);
}

TEST(PolicyTest, CompressionSkippedWithoutIdleCores) {
  auto p = NewPolicy({});
  Host h;
  h.idle = 0.3;
  Replay r = Play(*p, std::vector<Row>(8, {1024, 200, 100}), h);
  ASSERT_GE(r.decisions.size(), 2u);
  EXPECT_EQ(Steps(r.decisions)[0], "COMPRESS SKIP");
  EXPECT_THAT(r.decisions[0].reason(), HasSubstr("idle host cores 0.30 < 1.00"));
  EXPECT_EQ(Steps(r.decisions)[1], "DELTA ENABLE");
  EXPECT_EQ(r.decisions[1].settings().delta_cache_bytes(), 256u << 20);
}

TEST(PolicyTest, DeltaDisabledWhenHitRateStaysPoor) {
  PolicyConfig c;
  c.add_ladder(STEP_DELTA);
  c.add_ladder(STEP_THROTTLE);
  auto p = NewPolicy(c);
  Host h;
  h.hit = 0.05;
  Replay r = Play(*p, std::vector<Row>(10, {1024, 200, 100}), h);
  ASSERT_GE(r.decisions.size(), 3u);
  EXPECT_EQ(Steps(r.decisions)[0], "DELTA ENABLE");
  const PolicyDecision* disable = nullptr;
  for (const auto& d : r.decisions)
    if (d.step() == STEP_DELTA && d.action() == PolicyDecision::DISABLE) disable = &d;
  ASSERT_NE(disable, nullptr);
  EXPECT_THAT(disable->reason(), HasSubstr("delta hit rate 5% < 20%"));
  EXPECT_FALSE(disable->settings().delta());
  // The first pass after enabling only fills the cache: judged no earlier than settle + 1
  // passes later (settle 2 by default).
  EXPECT_GE(disable->iteration(), r.decisions[0].iteration() + 3);
  const std::vector<std::string> steps = Steps(r.decisions);
  EXPECT_NE(std::find(steps.begin(), steps.end(), "THROTTLE ENABLE"), steps.end());
  EXPECT_FALSE(p->settings().delta());
}

TEST(PolicyTest, ThrottleKeepsSteppingWhenTheDirtyRateIsPinnedAtTheBandwidth) {
  // A guest that re-dirties its whole working set each pass: the measured dirty rate is the
  // working set over the pass time = the bandwidth, whatever the throttle does. The throttle
  // then keeps stepping up to its cap (it cannot be judged by a drop that cannot show).
  PolicyConfig c;
  c.add_ladder(STEP_THROTTLE);
  auto p = NewPolicy(c);
  Replay r = Play(*p, std::vector<Row>(24, {512, 100, 100}));
  const std::vector<std::string> steps = Steps(r.decisions);
  ASSERT_GE(steps.size(), 3u);
  EXPECT_EQ(steps[0], "THROTTLE ENABLE");
  EXPECT_EQ(steps[1], "THROTTLE TUNE");
  EXPECT_THAT(r.decisions[1].reason(), HasSubstr("effect not measurable"));
  EXPECT_EQ(p->settings().throttle_percent(), 80u) << "stepped to the cap";
  // Nothing to wait for between steps: one step per pass (20 -> 80 % in 6 passes).
  std::vector<uint32_t> tune_passes;
  for (const auto& d : r.decisions)
    if (d.step() == STEP_THROTTLE && d.action() == PolicyDecision::TUNE)
      tune_passes.push_back(d.iteration());
  ASSERT_EQ(tune_passes.size(), 6u);
  for (size_t i = 1; i < tune_passes.size(); ++i)
    EXPECT_EQ(tune_passes[i], tune_passes[i - 1] + 1);
}

TEST(PolicyTest, ThrottleReleasedOnConvergenceAndReappliedWhenLost) {
  PolicyConfig c;
  c.add_ladder(STEP_THROTTLE);
  auto p = NewPolicy(c);
  // Diverging evidently (dirty 3x the bandwidth, remaining flat): throttle goes on at pass 3
  // (2 passes of evidence after the first), so the release comes at pass 4, before the rung
  // could be judged.
  std::vector<Row> rows(3, {1000, 300, 100});
  rows.push_back({20, 100, 100});              // 200 ms <= 300 ms: released at once
  rows.insert(rows.end(), 10, {1000, 300, 100});  // diverging again
  Replay r = Play(*p, rows);
  // The recorded dirty rate does not react to the throttle, so the rung ends without tuning.
  ASSERT_EQ(Steps(r.decisions), (std::vector<std::string>{"THROTTLE ENABLE", "THROTTLE DISABLE",
                                                          "THROTTLE ENABLE", "NONE EXHAUSTED"}));
  EXPECT_EQ(r.decisions[0].settings().throttle_percent(), 20u);
  EXPECT_EQ(r.decisions[0].iteration(), 3u);
  EXPECT_EQ(r.decisions[1].iteration(), 4u);
  // Lost again: evident after 2 passes of evidence (5, 6), re-applied at once.
  EXPECT_EQ(r.decisions[2].iteration(), 6u);
  EXPECT_EQ(r.decisions[1].settings().throttle_percent(), 0u);
  EXPECT_THAT(r.decisions[1].reason(), HasSubstr("expected downtime 200 ms <= limit 300 ms"));
  EXPECT_THAT(r.decisions[2].reason(), HasSubstr("re-applied at 20%"));
  EXPECT_EQ(r.decisions[2].settings().throttle_percent(), 20u);
  EXPECT_THAT(r.decisions[3].reason(), HasSubstr("under the 5% drop needed"));
  EXPECT_EQ(p->settings().throttle_percent(), 20u);  // kept: still not converging
}

TEST(PolicyTest, AfterPostcopySwitchNothingMoreHappens) {
  PolicyConfig c;
  c.add_ladder(STEP_POSTCOPY);
  c.set_allow_postcopy(true);
  auto p = NewPolicy(c);
  Replay r = Play(*p, std::vector<Row>(20, {1024, 200, 100}));
  ASSERT_EQ(Steps(r.decisions), (std::vector<std::string>{"POSTCOPY SWITCH"}));
  EXPECT_TRUE(p->settings().switch_to_postcopy());
}

// --- closed loop --------------------------------------------------------------------------

TEST(LadderTest, DivergingClimbsInOrderTuningEachRungThenPostcopy) {
  PolicyConfig c;
  c.set_allow_postcopy(true);
  auto p = NewPolicy(c);
  Workload w;
  w.wss_growth = 0.02;
  std::vector<PolicySettings> hist;
  std::vector<PolicyDecision> ds = RunSim(*p, w, 100, &hist);
  EXPECT_EQ(Steps(ds), (std::vector<std::string>{
                           "COMPRESS ENABLE", "COMPRESS TUNE", "COMPRESS TUNE",  // 1 -> 3 threads
                           "DELTA ENABLE",                                        // no knob
                           "THROTTLE ENABLE", "THROTTLE TUNE", "THROTTLE TUNE",   // 20 -> 40
                           "THROTTLE TUNE", "THROTTLE TUNE", "THROTTLE TUNE",     // -> 70
                           "THROTTLE TUNE",                                       // -> 80 (cap)
                           "POSTCOPY SWITCH"}));
  ASSERT_EQ(ds.size(), 12u);
  EXPECT_EQ(ds[2].settings().compress_threads(), 3u);
  // The third thread left 0.5 idle cores: no fourth although max_compress_threads is 4.
  EXPECT_THAT(ds[3].reason(), HasSubstr("COMPRESS done (idle host cores 0.50 < 1.00"));
  EXPECT_THAT(ds[4].reason(), HasSubstr("DELTA done (no knob to tune)"));
  EXPECT_EQ(ds[10].settings().throttle_percent(), 80u);
  EXPECT_THAT(ds[11].reason(), HasSubstr("THROTTLE done (at the cap of 80%)"));
  EXPECT_THAT(ds[11].reason(), HasSubstr("hottest vCPU 0"));
  // Tuning steps are one knob notch at a time and each knob only goes up while pre-copy runs.
  for (size_t i = 1; i < hist.size(); ++i) {
    EXPECT_GE(hist[i].compress_threads(), hist[i - 1].compress_threads());
    EXPECT_GE(hist[i].throttle_percent(), hist[i - 1].throttle_percent());
    EXPECT_LE(hist[i].throttle_percent() - hist[i - 1].throttle_percent(), 20u);
  }
  EXPECT_TRUE(p->settings().switch_to_postcopy());
  EXPECT_TRUE(p->Observe(Sim(w).Next(p->settings())).empty());
}

TEST(LadderTest, TuningStopsWhenItHasNoEffect) {
  PolicyConfig c;
  c.add_ladder(STEP_COMPRESS);
  auto p = NewPolicy(c);
  Workload w;
  w.ratio = 1.6;  // compressible enough to enable, but the second thread gains nothing more
  w.per_thread = 0.6;
  std::vector<PolicyDecision> ds = RunSim(*p, w, 30);
  ASSERT_EQ(Steps(ds), (std::vector<std::string>{"COMPRESS ENABLE", "COMPRESS TUNE",
                                                 "NONE EXHAUSTED"}));
  EXPECT_THAT(ds[2].reason(), HasSubstr("+0%) after the last step, under the 5% needed"));
  EXPECT_EQ(p->settings().compress_threads(), 2u);
}

TEST(LadderTest, LatencySensitiveNeverThrottles) {
  PolicyConfig c;
  c.set_profile(PolicyConfig::PROFILE_LATENCY_SENSITIVE);
  c.set_allow_postcopy(true);
  auto p = NewPolicy(c);
  Workload w;
  std::vector<PolicySettings> hist;
  std::vector<PolicyDecision> ds = RunSim(*p, w, 100, &hist);
  for (const auto& s : hist) EXPECT_EQ(s.throttle_percent(), 0u);
  auto it = std::find_if(ds.begin(), ds.end(),
                         [](const PolicyDecision& d) { return d.step() == STEP_THROTTLE; });
  ASSERT_NE(it, ds.end());
  EXPECT_EQ(it->action(), PolicyDecision::SKIP);
  EXPECT_THAT(it->reason(), HasSubstr("latency-sensitive profile never throttles"));
  EXPECT_EQ(Steps(ds).back(), "POSTCOPY SWITCH");
}

TEST(LadderTest, CustomOrder) {
  PolicyConfig c;
  c.add_ladder(STEP_THROTTLE);
  c.add_ladder(STEP_COMPRESS);
  c.add_ladder(STEP_POSTCOPY);
  c.set_allow_postcopy(true);
  c.set_throttle_max_percent(40);
  auto p = NewPolicy(c);
  std::vector<PolicyDecision> ds = RunSim(*p, Workload{}, 100);
  EXPECT_EQ(Steps(ds), (std::vector<std::string>{
                           "THROTTLE ENABLE", "THROTTLE TUNE", "THROTTLE TUNE",
                           "COMPRESS ENABLE", "COMPRESS TUNE", "COMPRESS TUNE",
                           "POSTCOPY SWITCH"}));
}

// The goal of the issue: a migration that a fixed configuration never finishes converges with
// the policy, and the decisions say why.
TEST(LadderTest, FinishesWhereAFixedConfigurationDoesNot) {
  Workload w;
  w.wss_mib = 2048;
  w.dirty_mibps = 150;  // 1.5x the link
  w.ratio = 3.0;
  const int kMaxIterations = 30;

  IterationMetrics last;
  Sim fixed(w);
  for (int i = 0; i < kMaxIterations; ++i) last = fixed.Next(PolicySettings{});
  EXPECT_GT(last.expected_downtime_ms(), kLimitMs);  // pre-copy alone never gets there

  auto p = NewPolicy({});
  std::vector<PolicyDecision> ds = RunSim(*p, w, kMaxIterations, nullptr, &last);
  EXPECT_LE(last.expected_downtime_ms(), kLimitMs);
  EXPECT_EQ(p->tendency(), TENDENCY_CONVERGING);
  ASSERT_FALSE(ds.empty());
  EXPECT_EQ(Steps(ds)[0], "COMPRESS ENABLE");
  EXPECT_THAT(ds[0].reason(), HasSubstr("sampled ratio 3.00x >= 1.50x"));
  EXPECT_FALSE(p->settings().switch_to_postcopy());
  EXPECT_EQ(p->settings().throttle_percent(), 0u);
}

// --- config validation --------------------------------------------------------------------

TEST(PolicyConfigTest, DefaultsFilled) {
  absl::StatusOr<PolicyConfig> c = ValidatePolicyConfig({});
  ASSERT_TRUE(c.ok()) << c.status();
  ASSERT_EQ(c->ladder_size(), 4);
  EXPECT_EQ(c->ladder(0), STEP_COMPRESS);
  EXPECT_EQ(c->ladder(3), STEP_POSTCOPY);
  EXPECT_EQ(c->window(), 4u);
  EXPECT_EQ(c->throttle_max_percent(), 80u);
  EXPECT_FALSE(c->allow_postcopy());
}

void ExpectInvalid(const PolicyConfig& c, const std::string& what) {
  absl::StatusOr<PolicyConfig> v = ValidatePolicyConfig(c);
  ASSERT_FALSE(v.ok()) << what;
  EXPECT_EQ(v.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(v.status().message()), HasSubstr(what));
  EXPECT_FALSE(MigrationPolicy::Create(c).ok());
}

TEST(PolicyConfigTest, Errors) {
  PolicyConfig c;
  c.add_ladder(STEP_COMPRESS);
  c.add_ladder(static_cast<PolicyStep>(9));
  ExpectInvalid(c, "ladder[1]: unknown step 9");

  c.Clear();
  c.add_ladder(STEP_UNSPECIFIED);
  ExpectInvalid(c, "ladder[0]: unknown step 0");

  c.Clear();
  c.add_ladder(STEP_THROTTLE);
  c.add_ladder(STEP_DELTA);
  c.add_ladder(STEP_THROTTLE);
  ExpectInvalid(c, "ladder[2]: duplicate step THROTTLE");

  c.Clear();
  c.set_window(1);
  ExpectInvalid(c, "window = 1 out of range [2, 64]");

  c.Clear();
  c.set_converge_threshold(1.5);
  ExpectInvalid(c, "converge_threshold = 1.5 out of range");

  c.Clear();
  c.set_diverge_threshold(std::nan(""));
  ExpectInvalid(c, "diverge_threshold");

  c.Clear();
  c.set_throttle_initial_percent(50);
  c.set_throttle_max_percent(30);
  ExpectInvalid(c, "throttle_max_percent = 30 out of range [50, 99]");

  c.Clear();
  c.set_max_compress_threads(0);
  ExpectInvalid(c, "max_compress_threads = 0");

  c.Clear();
  c.set_delta_cache_bytes(1 << 20);  // below the 16 MiB default minimum
  ExpectInvalid(c, "delta_min_cache_bytes");

  c.Clear();
  c.set_profile(static_cast<PolicyConfig::Profile>(7));
  ExpectInvalid(c, "unknown profile 7");

  c.Clear();
  c.set_min_delta_hit_rate(-0.1);
  ExpectInvalid(c, "min_delta_hit_rate");

  c.Clear();
  c.set_min_delta_sample_pages(0);
  ExpectInvalid(c, "min_delta_sample_pages = 0 out of range [1, 4096]");
}

TEST(PolicyTest, HostileMetricValuesDoNotBreakIt) {
  auto p = NewPolicy({});
  IterationMetrics m = Metrics(1, {1024, 200, 0.0001}, {});
  m.set_compression_ratio(std::nan(""));
  m.set_idle_host_cores(-3);
  m.set_delta_hit_rate(std::numeric_limits<double>::infinity());
  m.set_bandwidth_bytes_per_s(0);
  m.set_downtime_limit_ms(0);
  for (uint32_t i = 1; i < 20; ++i) {
    m.set_iteration(i);
    for (const auto& d : p->Observe(m)) {
      if (d.step() == STEP_COMPRESS) {
        EXPECT_EQ(d.action(), PolicyDecision::SKIP) << d.reason();
      }
    }
  }
  EXPECT_FALSE(p->settings().compress());
}

}  // namespace
}  // namespace microvmm::migration
