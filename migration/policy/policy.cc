#include "migration/policy/policy.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "vmm/base/log.h"

namespace microvmm::migration {
namespace {

constexpr uint64_t kMiB = 1024 * 1024;

std::string Bytes(uint64_t b) { return absl::StrFormat("%.1f MiB", b / double(kMiB)); }
std::string Rate(uint64_t b) { return absl::StrFormat("%.1f MiB/s", b / double(kMiB)); }

// (after - before) / before; "infinite" growth from 0 counts as a large change.
double RelChange(uint64_t before, uint64_t after) {
  if (before == 0) return after == 0 ? 0.0 : 1e9;
  return (double(after) - double(before)) / double(before);
}

// Metrics come from our own sender, but a NaN or negative share must not poison comparisons.
double Clean(double v, double hi) {
  if (!std::isfinite(v) || v < 0) return 0;
  return std::min(v, hi);
}

IterationMetrics Sanitized(const IterationMetrics& in) {
  IterationMetrics m = in;
  m.set_compression_ratio(Clean(m.compression_ratio(), 1e6));
  m.set_zero_share(Clean(m.zero_share(), 1.0));
  m.set_delta_hit_rate(Clean(m.delta_hit_rate(), 1.0));
  m.set_delta_sample_hit_rate(Clean(m.delta_sample_hit_rate(), 1.0));
  m.set_delta_sample_size_ratio(Clean(m.delta_sample_size_ratio(), 1.0));
  m.set_idle_host_cores(Clean(m.idle_host_cores(), 1e6));
  return m;
}

bool InRange(double v, double lo, double hi) { return v >= lo && v <= hi; }  // false for NaN

absl::Status Bad(const std::string& what) {
  return absl::InvalidArgumentError("policy config: " + what);
}

}  // namespace

const char* StepName(PolicyStep step) {
  switch (step) {
    case STEP_COMPRESS: return "COMPRESS";
    case STEP_DELTA: return "DELTA";
    case STEP_THROTTLE: return "THROTTLE";
    case STEP_POSTCOPY: return "POSTCOPY";
    default: return "NONE";
  }
}

const char* TendencyName(PolicyTendency t) {
  switch (t) {
    case TENDENCY_CONVERGING: return "CONVERGING";
    case TENDENCY_STALLED: return "STALLED";
    case TENDENCY_DIVERGING: return "DIVERGING";
    default: return "UNKNOWN";
  }
}

const char* ActionName(PolicyDecision::Action a) {
  switch (a) {
    case PolicyDecision::ENABLE: return "ENABLE";
    case PolicyDecision::TUNE: return "TUNE";
    case PolicyDecision::DISABLE: return "DISABLE";
    case PolicyDecision::SKIP: return "SKIP";
    case PolicyDecision::SWITCH: return "SWITCH";
    case PolicyDecision::EXHAUSTED: return "EXHAUSTED";
    default: return "NONE";
  }
}

absl::StatusOr<PolicyConfig> ValidatePolicyConfig(const PolicyConfig& in) {
  PolicyConfig c = in;
  if (!PolicyConfig::Profile_IsValid(c.profile())) {
    return Bad(absl::StrFormat("unknown profile %d", c.profile()));
  }
  if (c.ladder_size() == 0) {
    for (PolicyStep s : {STEP_COMPRESS, STEP_DELTA, STEP_THROTTLE, STEP_POSTCOPY}) c.add_ladder(s);
  }
  bool seen[5] = {};
  for (int i = 0; i < c.ladder_size(); ++i) {
    const int s = c.ladder(i);  // proto3 enums are open: any int can arrive
    if (s <= STEP_UNSPECIFIED || s > STEP_POSTCOPY) {
      return Bad(absl::StrFormat("ladder[%d]: unknown step %d", i, s));
    }
    if (seen[s]) {
      return Bad(absl::StrFormat("ladder[%d]: duplicate step %s", i, StepName(PolicyStep(s))));
    }
    seen[s] = true;
  }

#define MVMM_DEFAULT(field, value) \
  if (!c.has_##field()) c.set_##field(value)
  MVMM_DEFAULT(window, 4);
  MVMM_DEFAULT(confirm_iterations, 2);
  MVMM_DEFAULT(converge_threshold, 0.10);
  MVMM_DEFAULT(diverge_threshold, 0.10);
  MVMM_DEFAULT(diverge_dirty_ratio, 1.5);
  MVMM_DEFAULT(settle_iterations, 2);
  MVMM_DEFAULT(min_tune_effect, 0.05);
  MVMM_DEFAULT(min_compression_ratio, 1.5);
  MVMM_DEFAULT(min_idle_cores, 1.0);
  MVMM_DEFAULT(max_compress_threads, 4);
  MVMM_DEFAULT(delta_cache_bytes, 256 * kMiB);
  MVMM_DEFAULT(delta_min_cache_bytes, 16 * kMiB);
  MVMM_DEFAULT(delta_max_free_share, 0.25);
  MVMM_DEFAULT(min_delta_hit_rate, 0.2);
  MVMM_DEFAULT(min_delta_sample_pages, 8);
  MVMM_DEFAULT(throttle_initial_percent, 20);
  MVMM_DEFAULT(throttle_step_percent, 10);
  MVMM_DEFAULT(throttle_max_percent, 80);
  MVMM_DEFAULT(throttle_max_guest_io_bytes_per_s, 0);
#undef MVMM_DEFAULT

#define MVMM_RANGE(field, lo, hi)                                                        \
  if (!InRange(double(c.field()), lo, hi)) {                                             \
    return Bad(absl::StrFormat("%s = %g out of range [%g, %g]", #field, double(c.field()), \
                               double(lo), double(hi)));                                 \
  }
  MVMM_RANGE(window, 2, 64);
  MVMM_RANGE(confirm_iterations, 1, 16);
  MVMM_RANGE(converge_threshold, 0.001, 0.99);
  MVMM_RANGE(diverge_threshold, 0.001, 10);
  // Below 1 "dirtying slower than we send" would count as diverging.
  MVMM_RANGE(diverge_dirty_ratio, 1.0, 100);
  MVMM_RANGE(settle_iterations, 1, 64);
  MVMM_RANGE(min_tune_effect, 0, 0.99);
  MVMM_RANGE(min_compression_ratio, 1.0, 1000);
  MVMM_RANGE(min_idle_cores, 0, 1024);  // 0: compress even on a busy host (the pool then
                                        // sends what it cannot take raw)
  MVMM_RANGE(max_compress_threads, 1, 64);
  MVMM_RANGE(delta_min_cache_bytes, 1, double(c.delta_cache_bytes()));
  MVMM_RANGE(delta_max_free_share, 0.01, 1.0);
  MVMM_RANGE(min_delta_hit_rate, 0, 1.0);
  MVMM_RANGE(min_delta_sample_pages, 1, 4096);
  MVMM_RANGE(throttle_initial_percent, 1, 99);
  MVMM_RANGE(throttle_step_percent, 1, 99);
  MVMM_RANGE(throttle_max_percent, double(c.throttle_initial_percent()), 99);
#undef MVMM_RANGE
  return c;
}

// ---------------------------------------------------------------------------------------------
// TendencyDetector

TendencyDetector::TendencyDetector(const PolicyConfig& c)
    : window_(std::max(c.window(), 2u)),  // guards a config that skipped validation
      confirm_(std::max(c.confirm_iterations(), 1u)),
      converge_threshold_(c.converge_threshold()),
      diverge_threshold_(c.diverge_threshold()),
      diverge_dirty_ratio_(c.diverge_dirty_ratio()) {}

// One pass's evidence of divergence, judged against the previous pass alone (no window).
// (a) The guest dirties at least diverge_dirty_ratio x the bandwidth and the remaining bytes did
//     not fall by converge_threshold: pre-copy loses ground (or sits at the working-set cap).
// (b) The measured dirty rate is pinned at the bandwidth (the whole working set is dirtied
//     within each pass, whatever the guest's real rate) and the remaining bytes stayed flat
//     (within -converge_threshold .. +diverge_threshold): each pass re-sends what the previous
//     one left. A pinned rate with a larger swing is a burst or an oscillation (a pinned rate
//     physically keeps remaining flat): left to the window.
bool TendencyDetector::Evident(const Sample& prev, const Sample& cur, std::string* why) const {
  if (cur.bandwidth == 0 || cur.downtime_ok) return false;
  const double ratio = double(cur.dirty) / double(cur.bandwidth);
  const double change = RelChange(prev.remaining, cur.remaining);
  const bool pinned = std::abs(ratio - 1.0) <= 0.1;  // as MigrationPolicy::DirtyRatePinned
  const bool a = ratio >= diverge_dirty_ratio_ && change > -converge_threshold_;
  const bool b = pinned && change > -converge_threshold_ && change < diverge_threshold_;
  if (!a && !b) return false;
  *why = absl::StrFormat("dirty/bandwidth %.2f%s, remaining %s -> %s (%+.0f%%)", ratio,
                         a ? "" : " (pinned at the bandwidth)", Bytes(prev.remaining),
                         Bytes(cur.remaining), std::min(change, 99.99) * 100);
  return true;
}

PolicyTendency TendencyDetector::Classify(const IterationMetrics& m) {
  if (m.downtime_limit_ms() > 0 && m.expected_downtime_ms() <= m.downtime_limit_ms()) {
    explain_ = absl::StrFormat("expected downtime %d ms <= limit %d ms", m.expected_downtime_ms(),
                               m.downtime_limit_ms());
    return TENDENCY_CONVERGING;
  }
  // Evident divergence needs no full window: QEMU's auto-converge acts at its 3rd sync, and a
  // guest that outruns the link by a margin, or re-dirties its whole working set each pass, does
  // not need 4 passes to show it. Its own hysteresis: confirm_iterations passes in a row.
  if (evident_streak_ >= confirm_) {
    explain_ = absl::StrFormat("evident divergence for %d passes in a row: %s", evident_streak_,
                               evident_why_);
    return TENDENCY_DIVERGING;
  }
  if (samples_.size() < window_) {
    explain_ = absl::StrFormat("%d of %d iterations seen", samples_.size(), window_);
    return TENDENCY_UNKNOWN;
  }
  // Oldest half vs newest half (an odd middle sample belongs to neither).
  const size_t half = window_ / 2;
  uint64_t old_floor = UINT64_MAX, new_floor = UINT64_MAX, dirty = 0, bandwidth = 0;
  for (size_t i = 0; i < half; ++i) old_floor = std::min(old_floor, samples_[i].remaining);
  for (size_t i = samples_.size() - half; i < samples_.size(); ++i) {
    new_floor = std::min(new_floor, samples_[i].remaining);
    dirty += samples_[i].dirty;
    bandwidth += samples_[i].bandwidth;
  }
  const double change = RelChange(old_floor, new_floor);
  const double ratio = bandwidth ? double(dirty) / double(bandwidth)
                                 : (dirty ? std::numeric_limits<double>::infinity() : 0.0);
  explain_ = absl::StrFormat(
      "floor of remaining %s -> %s (%+.0f%%) over %d iterations, dirty/bandwidth %.2f",
      Bytes(old_floor), Bytes(new_floor), std::min(change, 99.99) * 100, window_, ratio);
  if (change <= -converge_threshold_) return TENDENCY_CONVERGING;
  if (change >= diverge_threshold_ || ratio >= diverge_dirty_ratio_) return TENDENCY_DIVERGING;
  return TENDENCY_STALLED;
}

PolicyTendency TendencyDetector::Add(const IterationMetrics& m) {
  const bool downtime_ok = m.downtime_limit_ms() > 0 &&
                           m.expected_downtime_ms() <= m.downtime_limit_ms();
  const Sample cur{m.remaining_bytes(), m.dirty_bytes_per_s(), m.bandwidth_bytes_per_s(),
                   downtime_ok};
  std::string why;
  if (!samples_.empty() && Evident(samples_.back(), cur, &why)) {
    ++evident_streak_;
    evident_why_ = std::move(why);
  } else {
    evident_streak_ = 0;
  }
  samples_.push_back(cur);
  while (samples_.size() > window_) samples_.pop_front();
  const PolicyTendency raw = Classify(m);
  if (raw == TENDENCY_UNKNOWN || raw == tendency_) {
    candidate_count_ = 0;
  } else if (tendency_ == TENDENCY_UNKNOWN || downtime_ok || evident()) {
    // First classification, switchover already possible, or evident divergence (which had its
    // own confirm_iterations passes in a row): no reason to wait.
    tendency_ = raw;
    candidate_count_ = 0;
  } else {
    if (raw != candidate_) {
      candidate_ = raw;
      candidate_count_ = 0;
    }
    if (++candidate_count_ >= confirm_) {
      tendency_ = raw;
      candidate_count_ = 0;
    } else {
      explain_ += absl::StrFormat(" (reads %s, %d/%d to confirm)", TendencyName(raw),
                                  candidate_count_, confirm_);
    }
  }
  return tendency_;
}

// ---------------------------------------------------------------------------------------------
// MigrationPolicy

absl::StatusOr<std::unique_ptr<MigrationPolicy>> MigrationPolicy::Create(
    const PolicyConfig& config) {
  absl::StatusOr<PolicyConfig> valid = ValidatePolicyConfig(config);
  if (!valid.ok()) return valid.status();
  return std::unique_ptr<MigrationPolicy>(new MigrationPolicy(*valid));
}

MigrationPolicy::MigrationPolicy(const PolicyConfig& c) : config_(c), detector_(c) {}

std::string MigrationPolicy::Numbers() const {
  const IterationMetrics& m = current_;
  std::string s = absl::StrFormat(
      "remaining %s, dirty %s, bandwidth %s, expected downtime %d ms vs limit %d ms",
      Bytes(m.remaining_bytes()), Rate(m.dirty_bytes_per_s()), Rate(m.bandwidth_bytes_per_s()),
      m.expected_downtime_ms(), m.downtime_limit_ms());
  // Per-vCPU rates (dirty ring): name the hottest vCPU, it tells whether one thread dominates.
  uint64_t total = 0;
  int hottest = -1;
  for (int i = 0; i < m.vcpu_dirty_bytes_per_s_size(); ++i) {
    total += m.vcpu_dirty_bytes_per_s(i);
    if (hottest < 0 || m.vcpu_dirty_bytes_per_s(i) > m.vcpu_dirty_bytes_per_s(hottest)) hottest = i;
  }
  if (total > 0) {
    s += absl::StrFormat(", hottest vCPU %d at %s (%.0f%%)", hottest,
                         Rate(m.vcpu_dirty_bytes_per_s(hottest)),
                         100.0 * m.vcpu_dirty_bytes_per_s(hottest) / total);
  }
  return s;
}

void MigrationPolicy::Emit(PolicyStep step, PolicyDecision::Action action, std::string reason) {
  PolicyDecision d;
  d.set_iteration(current_.iteration());
  d.set_step(step);
  d.set_action(action);
  *d.mutable_settings() = settings_;
  d.set_tendency(detector_.tendency());
  d.set_reason(absl::StrFormat("%s %s: %s%s [tendency %s for %d iterations: %s; %s]",
                               ActionName(action), StepName(step), prefix_, reason,
                               TendencyName(detector_.tendency()), nonconverging_streak_,
                               detector_.Explain(), Numbers()));
  *d.mutable_metrics() = current_;
  prefix_.clear();
  LOG_INFO("migration policy: iteration %d: %s", d.iteration(), d.reason());
  out_->push_back(std::move(d));
}

std::vector<PolicyDecision> MigrationPolicy::Observe(const IterationMetrics& metrics) {
  std::vector<PolicyDecision> out;
  if (settings_.switch_to_postcopy()) return out;  // final
  out_ = &out;
  current_ = Sanitized(metrics);
  ++observations_;
  const PolicyTendency t = detector_.Add(current_);
  const bool converging = t == TENDENCY_CONVERGING || t == TENDENCY_UNKNOWN;
  nonconverging_streak_ = converging ? 0 : nonconverging_streak_ + 1;

  MaybeReleaseThrottle();
  MaybeDisableDelta();
  // "Not converging for the window", and the previous action has had time to show its effect.
  // A throttle whose effect cannot show (dirty rate pinned at the bandwidth: the whole working
  // set is dirty each pass) has nothing to wait for: it steps every pass, as long as the
  // migration does not converge.
  const bool pinned_throttle =
      rung_index_ < size_t(config_.ladder_size()) &&
      config_.ladder(rung_index_) == STEP_THROTTLE && rung_.active && !rung_.done &&
      DirtyRatePinned(current_);
  // Evident divergence (see TendencyDetector) does not wait for a full window of it.
  if (((nonconverging_streak_ >= config_.window() || (detector_.evident() && !converging)) &&
       observations_ - last_action_ >= config_.settle_iterations()) ||
      (pinned_throttle && !converging)) {
    Climb();
  }
  out_ = nullptr;
  return out;
}

void MigrationPolicy::MaybeReleaseThrottle() {
  const IterationMetrics& m = current_;
  if (settings_.throttle_percent() == 0 || m.downtime_limit_ms() == 0 ||
      m.expected_downtime_ms() > m.downtime_limit_ms()) {
    return;
  }
  // Throttling is the one measure that costs the guest directly: give it back as soon as the
  // rest fits the downtime limit. It comes back at this percent if convergence is lost.
  const uint32_t was = settings_.throttle_percent();
  throttle_resume_percent_ = was;
  settings_.set_throttle_percent(0);
  Emit(STEP_THROTTLE, PolicyDecision::DISABLE,
       absl::StrFormat("released (was %d%%): expected downtime %d ms <= limit %d ms", was,
                       m.expected_downtime_ms(), m.downtime_limit_ms()));
}

void MigrationPolicy::MaybeDisableDelta() {
  // The first pass after enabling only fills the cache (a page is cached as it is sent; hits
  // start with its next re-send): judge the hit rate from the pass after that on.
  if (!settings_.delta() ||
      observations_ - delta_enabled_at_ < config_.settle_iterations() + 1) {
    return;
  }
  const double hit = current_.delta_hit_rate();
  if (hit >= config_.min_delta_hit_rate()) return;
  settings_.set_delta(false);
  settings_.set_delta_cache_bytes(0);
  if (rung_index_ < size_t(config_.ladder_size()) &&
      config_.ladder(rung_index_) == STEP_DELTA) {
    rung_.done = true;
  }
  Emit(STEP_DELTA, PolicyDecision::DISABLE,
       absl::StrFormat("delta hit rate %.0f%% < %.0f%% after %d iterations: cache not worth it",
                       hit * 100, config_.min_delta_hit_rate() * 100,
                       observations_ - delta_enabled_at_));
}

// The measured dirty rate is pages dirtied since the last sync over the time since; when the
// guest re-dirties its whole working set every pass it equals working set / pass time, i.e. the
// bandwidth, whatever the guest's real rate (or a throttle) is.
bool MigrationPolicy::DirtyRatePinned(const IterationMetrics& m) {
  const double bw = static_cast<double>(m.bandwidth_bytes_per_s());
  return bw > 0 && std::abs(static_cast<double>(m.dirty_bytes_per_s()) - bw) <= 0.1 * bw;
}

void MigrationPolicy::Climb() {
  // A throttle released on convergence comes back first, at the percent it had.
  if (throttle_resume_percent_ > 0 && settings_.throttle_percent() == 0) {
    settings_.set_throttle_percent(throttle_resume_percent_);
    throttle_resume_percent_ = 0;
    rung_.metric_at_action = current_.dirty_bytes_per_s();
    last_action_ = observations_;
    Emit(STEP_THROTTLE, PolicyDecision::ENABLE,
         absl::StrFormat("re-applied at %d%%: convergence lost", settings_.throttle_percent()));
    return;
  }
  while (rung_index_ < size_t(config_.ladder_size())) {
    const PolicyStep step = config_.ladder(rung_index_);
    if (rung_.active && !rung_.done) {
      std::string why;
      if (TryTune(step, &why)) {
        last_action_ = observations_;
        return;
      }
      prefix_ = absl::StrFormat("%s done (%s); ", StepName(step), why);
      rung_.done = true;
    }
    if (rung_.done) {
      ++rung_index_;
      rung_ = Rung{};
      continue;
    }
    std::string why;
    if (TryEnable(step, &why)) {
      rung_.active = true;
      last_action_ = observations_;
      return;
    }
    Emit(step, PolicyDecision::SKIP, why);
    ++rung_index_;
    rung_ = Rung{};
  }
  if (exhausted_reported_) {
    prefix_.clear();
  } else {
    exhausted_reported_ = true;
    Emit(STEP_UNSPECIFIED, PolicyDecision::EXHAUSTED,
         "no ladder step left; pre-copy continues until it converges or hits its "
                 "iteration limit");
  }
}

bool MigrationPolicy::TryTune(PolicyStep step, std::string* why_not) {
  const IterationMetrics& m = current_;
  const double min_effect = config_.min_tune_effect();
  switch (step) {
    case STEP_COMPRESS: {
      // More threads help only while compression (not the link) is the bottleneck: the
      // effective bandwidth must have risen since the last step.
      const double gain = RelChange(rung_.metric_at_action, m.bandwidth_bytes_per_s());
      const uint32_t threads = settings_.compress_threads();
      if (gain < min_effect) {
        *why_not = absl::StrFormat(
            "bandwidth %s -> %s (%+.0f%%) after the last step, under the %.0f%% needed",
            Rate(rung_.metric_at_action), Rate(m.bandwidth_bytes_per_s()),
            std::min(gain, 99.99) * 100, min_effect * 100);
        return false;
      }
      if (threads >= config_.max_compress_threads()) {
        *why_not = absl::StrFormat("at the cap of %d threads", threads);
        return false;
      }
      if (m.idle_host_cores() < config_.min_idle_cores()) {
        *why_not = absl::StrFormat("idle host cores %.2f < %.2f for another thread",
                                   m.idle_host_cores(), config_.min_idle_cores());
        return false;
      }
      settings_.set_compress_threads(threads + 1);
      Emit(step, PolicyDecision::TUNE,
           absl::StrFormat("compression threads %d -> %d: bandwidth %s -> %s (%+.0f%%) after "
                           "the last step, idle host cores %.2f",
                           threads, threads + 1, Rate(rung_.metric_at_action),
                           Rate(m.bandwidth_bytes_per_s()), std::min(gain, 99.99) * 100,
                           m.idle_host_cores()));
      rung_.metric_at_action = m.bandwidth_bytes_per_s();
      return true;
    }
    case STEP_THROTTLE: {
      // A throttle step must lower the dirty rate (it does not when devices, not vCPUs, dirty).
      const double drop = -RelChange(rung_.metric_at_action, m.dirty_bytes_per_s());
      const uint32_t pct = settings_.throttle_percent();
      // When the guest re-dirties its whole working set every pass, the measured dirty rate is
      // the working set over the pass time, i.e. about the bandwidth, whatever the throttle
      // does: the effect cannot be seen, so keep stepping (as long as it does not converge).
      const bool saturated = DirtyRatePinned(m);
      if (drop < min_effect && !saturated) {
        *why_not = absl::StrFormat(
            "dirty rate %s -> %s (%+.0f%%) after the last step, under the %.0f%% drop needed",
            Rate(rung_.metric_at_action), Rate(m.dirty_bytes_per_s()),
            std::min(-drop, 99.99) * 100, min_effect * 100);
        return false;
      }
      if (pct >= config_.throttle_max_percent()) {
        *why_not = absl::StrFormat("at the cap of %d%%", pct);
        return false;
      }
      const uint32_t next =
          std::min(pct + config_.throttle_step_percent(), config_.throttle_max_percent());
      settings_.set_throttle_percent(next);
      Emit(step, PolicyDecision::TUNE,
           drop < min_effect
               ? absl::StrFormat("throttle %d%% -> %d%%: dirty rate %s pinned at the bandwidth "
                                 "%s (the whole working set is dirty each pass), effect not "
                                 "measurable",
                                 pct, next, Rate(m.dirty_bytes_per_s()),
                                 Rate(m.bandwidth_bytes_per_s()))
               : absl::StrFormat("throttle %d%% -> %d%%: dirty rate %s -> %s (-%.0f%%) after the "
                                 "last step",
                                 pct, next, Rate(rung_.metric_at_action),
                                 Rate(m.dirty_bytes_per_s()), drop * 100));
      rung_.metric_at_action = m.dirty_bytes_per_s();
      return true;
    }
    default:
      *why_not = "no knob to tune";
      return false;
  }
}

bool MigrationPolicy::TryEnable(PolicyStep step, std::string* why_not) {
  const IterationMetrics& m = current_;
  switch (step) {
    case STEP_COMPRESS: {
      const double ratio = m.compression_ratio();
      if (ratio == 0) {
        *why_not = "compressibility not sampled";
        return false;
      }
      if (ratio < config_.min_compression_ratio()) {
        *why_not = absl::StrFormat(
            "sampled compression ratio %.2fx < %.2fx (zero pages %.0f%%): pages do not compress",
            ratio, config_.min_compression_ratio(), m.zero_share() * 100);
        return false;
      }
      if (m.idle_host_cores() < config_.min_idle_cores()) {
        *why_not = absl::StrFormat("idle host cores %.2f < %.2f: no core to compress on",
                                   m.idle_host_cores(), config_.min_idle_cores());
        return false;
      }
      settings_.set_compress(true);
      settings_.set_compress_threads(1);
      rung_.metric_at_action = m.bandwidth_bytes_per_s();
      Emit(step, PolicyDecision::ENABLE,
           absl::StrFormat("compression on, 1 thread: sampled ratio %.2fx >= %.2fx, zero pages "
                           "%.0f%%, idle host cores %.2f",
                           ratio, config_.min_compression_ratio(), m.zero_share() * 100,
                           m.idle_host_cores()));
      return true;
    }
    case STEP_DELTA: {
      // Measured before enabling (PageEncoder::SampleDelta): pages whose every byte changes
      // (random content, encrypted or compressed data) make no delta, and a cache would only be
      // filled in vain for a few passes before its own hit rate disabled it. Too few sampled
      // pages: no judgement, enable as without a sample (the hit rate check after settling
      // still applies).
      const uint32_t sampled = m.delta_sample_pages();
      const bool judged = sampled >= config_.min_delta_sample_pages();
      std::string sample =
          judged ? absl::StrFormat("sampled delta hit rate %.0f%% of %d pages",
                                   m.delta_sample_hit_rate() * 100, sampled)
                 : absl::StrFormat("delta not sampled (%d of %d pages needed)", sampled,
                                   config_.min_delta_sample_pages());
      if (judged && m.delta_sample_hit_rate() > 0) {
        absl::StrAppendFormat(&sample, ", mean delta %.1f%% of a page",
                              m.delta_sample_size_ratio() * 100);
      }
      if (judged && m.delta_sample_hit_rate() < config_.min_delta_hit_rate()) {
        *why_not = absl::StrFormat("%s < %.0f%%: pages do not delta-encode", sample,
                                   config_.min_delta_hit_rate() * 100);
        return false;
      }
      const uint64_t free = m.free_host_memory_bytes();
      const uint64_t cap = uint64_t(double(free) * config_.delta_max_free_share());
      const uint64_t cache = std::min<uint64_t>(config_.delta_cache_bytes(), cap);
      if (cache < config_.delta_min_cache_bytes()) {
        *why_not = absl::StrFormat(
            "free host memory %s: %.0f%% of it is %s < the %s minimum cache", Bytes(free),
            config_.delta_max_free_share() * 100, Bytes(cap),
            Bytes(config_.delta_min_cache_bytes()));
        return false;
      }
      settings_.set_delta(true);
      settings_.set_delta_cache_bytes(cache);
      delta_enabled_at_ = observations_;
      Emit(step, PolicyDecision::ENABLE,
           absl::StrFormat("delta on with a %s cache (free host memory %s), %s", Bytes(cache),
                           Bytes(free), sample));
      return true;
    }
    case STEP_THROTTLE: {
      if (config_.profile() == PolicyConfig::PROFILE_LATENCY_SENSITIVE) {
        *why_not = "latency-sensitive profile never throttles";
        return false;
      }
      const uint64_t io_cap = config_.throttle_max_guest_io_bytes_per_s();
      if (io_cap > 0 && m.guest_io_bytes_per_s() >= io_cap) {
        *why_not = absl::StrFormat("guest I/O %s >= %s: throttling would hurt its latency",
                                   Rate(m.guest_io_bytes_per_s()), Rate(io_cap));
        return false;
      }
      settings_.set_throttle_percent(config_.throttle_initial_percent());
      rung_.metric_at_action = m.dirty_bytes_per_s();
      Emit(step, PolicyDecision::ENABLE,
           absl::StrFormat("throttle vCPUs %d%%: dirty rate %s vs bandwidth %s, guest I/O %s",
                           settings_.throttle_percent(), Rate(m.dirty_bytes_per_s()),
                           Rate(m.bandwidth_bytes_per_s()), Rate(m.guest_io_bytes_per_s())));
      return true;
    }
    case STEP_POSTCOPY: {
      if (!config_.allow_postcopy()) {
        *why_not = "post-copy not allowed by the config";
        return false;
      }
      settings_.set_switch_to_postcopy(true);
      Emit(step, PolicyDecision::SWITCH, "last resort: pre-copy cannot converge");
      return true;
    }
    default:
      *why_not = "unknown step";
      return false;
  }
}

}  // namespace microvmm::migration
