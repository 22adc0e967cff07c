// Adaptive pre-copy migration policy: a tendency detector over per-iteration metrics and a
// ladder of measures (default compression -> delta -> throttle -> post-copy), each tuned before
// the next is taken. Pure and deterministic: no threads, no clock (time comes in with the
// metrics), so recorded metric traces replay exactly.
//
// Use (sender thread, once per pre-copy iteration, after its dirty sync):
//   auto policy = MigrationPolicy::Create(config);          // once, config validated
//   for (const PolicyDecision& d : policy->Observe(metrics)) publish d (WatchMigration);
//   apply policy->settings() (compression, delta, throttle; switch_to_postcopy => post-copy).
#ifndef MICROVMM_MIGRATION_POLICY_POLICY_H_
#define MICROVMM_MIGRATION_POLICY_POLICY_H_

#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "proto/policy.pb.h"

namespace microvmm::migration {

// Checks `config` and returns it with every default filled in (ladder, optional fields).
// InvalidArgument names the offending field: unknown or duplicate ladder steps, values out of
// range. A LATENCY_SENSITIVE profile may list THROTTLE (it is skipped, visibly).
absl::StatusOr<PolicyConfig> ValidatePolicyConfig(const PolicyConfig& config);

const char* StepName(PolicyStep step);
const char* TendencyName(PolicyTendency tendency);
const char* ActionName(PolicyDecision::Action action);

// Classifies the recent iterations as CONVERGING / STALLED / DIVERGING.
//
// Signal: over a sliding window of `window` iterations, compare the floor (minimum) of
// remaining bytes in the newest half with the floor in the oldest half. Floors, not means or
// a regression slope, because pre-copy traces oscillate (a pass that happened to follow a burst
// of writes, then a quiet one): an oscillation shorter than half a window has the same floor in
// both halves and reads as STALLED, not as alternating converging / diverging. The mean dirty
// rate over bandwidth in the newest half marks DIVERGING even when remaining bytes are capped by
// the working set. Expected downtime at or under the limit is CONVERGING at once (switchover is
// possible).
// Hysteresis: any other change of tendency must be seen `confirm_iterations` times in a row.
// Evident divergence (see Evident() in policy.cc: dirty rate >= diverge_dirty_ratio x bandwidth
// with remaining bytes not falling, or dirty rate pinned at the bandwidth with remaining bytes
// flat) seen `confirm_iterations` passes in a row reads DIVERGING at once, without waiting for a
// full window; oscillations (remaining swinging by more than the thresholds) never qualify.
class TendencyDetector {
 public:
  explicit TendencyDetector(const PolicyConfig& validated_config);

  // Adds one iteration and returns the (filtered) tendency.
  PolicyTendency Add(const IterationMetrics& m);
  PolicyTendency tendency() const { return tendency_; }
  // The numbers behind the last classification, for decision reasons.
  std::string Explain() const { return explain_; }
  // Passes in a row with evident divergence; >= confirm_iterations: DIVERGING without a window.
  uint32_t evident_streak() const { return evident_streak_; }
  bool evident() const { return evident_streak_ >= confirm_; }

 private:
  struct Sample {
    uint64_t remaining;
    uint64_t dirty;
    uint64_t bandwidth;
    bool downtime_ok;
  };
  PolicyTendency Classify(const IterationMetrics& m);
  bool Evident(const Sample& prev, const Sample& cur, std::string* why) const;

  const uint32_t window_;
  const uint32_t confirm_;
  const double converge_threshold_;
  const double diverge_threshold_;
  const double diverge_dirty_ratio_;
  std::deque<Sample> samples_;
  PolicyTendency tendency_ = TENDENCY_UNKNOWN;
  PolicyTendency candidate_ = TENDENCY_UNKNOWN;
  uint32_t candidate_count_ = 0;
  uint32_t evident_streak_ = 0;
  std::string evident_why_;
  std::string explain_;
};

// The ladder. Rules (see policy.cc for details):
// - acts only when the tendency has been non-CONVERGING for `window` iterations in a row, or
//   the detector sees evident divergence (TendencyDetector::evident()), and at most once every
//   `settle_iterations` (so the last change can show its effect);
// - delta is skipped when its sampled hit rate (IterationMetrics.delta_sample_*, at least
//   `min_delta_sample_pages` pages) is under `min_delta_hit_rate`: no cache is filled in vain;
// - a rung with a knob (compression threads, throttle percent) is tuned up first; the next rung
//   is taken when the knob hits its cap or the last step moved its metric by less than
//   `min_tune_effect` (compression: bandwidth; throttle: dirty rate);
// - a rung whose precondition fails is skipped with a SKIP decision carrying the numbers;
// - delta is disabled again when its hit rate stays under `min_delta_hit_rate`;
// - throttle is released as soon as expected downtime is under the limit (and re-applied at
//   its last percent if the migration stops converging again);
// - post-copy is final: after SWITCH, Observe returns nothing more.
class MigrationPolicy {
 public:
  static absl::StatusOr<std::unique_ptr<MigrationPolicy>> Create(const PolicyConfig& config);

  // Feeds one iteration; returns the decisions taken (possibly several: skips, then an enable),
  // each also logged with LOG_INFO.
  std::vector<PolicyDecision> Observe(const IterationMetrics& metrics);

  const PolicySettings& settings() const { return settings_; }
  PolicyTendency tendency() const { return detector_.tendency(); }
  const PolicyConfig& config() const { return config_; }

 private:
  explicit MigrationPolicy(const PolicyConfig& validated_config);

  // Per-rung state of the current rung.
  struct Rung {
    bool active = false;     // enabled (its knob in effect)
    bool done = false;       // nothing more to do on it: move on
    uint64_t metric_at_action = 0;  // bandwidth (compress) / dirty rate (throttle) at last action
  };

  void Emit(PolicyStep step, PolicyDecision::Action action, std::string reason);
  void MaybeReleaseThrottle();
  void MaybeDisableDelta();
  void Climb();
  static bool DirtyRatePinned(const IterationMetrics& m);
  // Tries to tune the current (active) rung; false if it is exhausted (reason appended).
  bool TryTune(PolicyStep step, std::string* why_not);
  // Tries to engage `step`; false if its precondition fails (reason in *why_not).
  bool TryEnable(PolicyStep step, std::string* why_not);
  std::string Numbers() const;

  const PolicyConfig config_;
  TendencyDetector detector_;
  PolicySettings settings_;
  size_t rung_index_ = 0;  // into config_.ladder(); == size: exhausted
  Rung rung_;
  bool exhausted_reported_ = false;
  uint32_t throttle_resume_percent_ = 0;  // last percent before a release (0: none)
  uint64_t delta_enabled_at_ = 0;         // observation number when delta went on
  uint64_t observations_ = 0;
  uint64_t last_action_ = 0;  // observation number of the last ladder action
  uint32_t nonconverging_streak_ = 0;
  IterationMetrics current_;
  std::string prefix_;  // why the previous rung was left; Emit puts it into the next reason
  std::vector<PolicyDecision>* out_ = nullptr;
};

}  // namespace microvmm::migration

#endif  // MICROVMM_MIGRATION_POLICY_POLICY_H_
