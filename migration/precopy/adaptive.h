// Adaptive pre-copy (issue 7): the measures a migration can take when it does not converge, and
// the policy that picks them.
//
//   PageEncoder        how pages travel: as they are, compressed (lz4 on a worker pool, see
//                      migration/stream/compressor.h) and/or as XBZRLE deltas against a bounded
//                      cache of what was sent (migration/stream/delta_cache.h).
//   AdaptiveMigration  once per pre-copy pass: measures (dirty rate, bandwidth, sampled
//                      compressibility and zero share, delta hit rate, idle host cores, free host
//                      memory), asks MigrationPolicy (migration/policy) and applies its settings
//                      to the encoder, the vCPU throttle and the switch to post-copy.
#ifndef MICROVMM_MIGRATION_PRECOPY_ADAPTIVE_H_
#define MICROVMM_MIGRATION_PRECOPY_ADAPTIVE_H_

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "migration/dirty/dirty_tracker.h"
#include "migration/policy/host_probe.h"
#include "migration/policy/policy.h"
#include "migration/stream/compressor.h"
#include "migration/stream/delta_cache.h"
#include "proto/migration.pb.h"
#include "proto/policy.pb.h"
#include "vmm/memory/guest_memory.h"
#include "vmm/vm.h"

namespace microvmm::migration {

class PageEncoder {
 public:
  PageEncoder() = default;

  // Encodes the pages `gpas` (each once) into records appended to `out`, in any order; returns
  // their wire bytes. `hole(gpa)`: no memory behind the page at the source (a ZERO record, not
  // read). With delta on, each page is copied once so that the delta, the cached copy and the
  // bytes sent are the same snapshot even while the guest writes it. `first_pass`: pages seen
  // for the first time are not cached (most are sent once). Thread-safe: one call per sender
  // thread at a time; Set*() only between passes.
  absl::StatusOr<uint64_t> Encode(GuestMemory& mem, std::span<const uint64_t> gpas,
                                  const std::function<bool(uint64_t)>& hole, bool first_pass,
                                  google::protobuf::RepeatedPtrField<PageRecord>* out);
  bool active() const { return compressor_ != nullptr || delta_ != nullptr; }

  absl::Status SetCompression(bool on, uint32_t threads);
  absl::Status SetDelta(bool on, uint64_t cache_bytes);

  // Compressibility of up to `max` pages spread over `pages` (raw/compressed, zero share),
  // measured with the codec the encoder uses, whether compression is on or not.
  struct Sample {
    double ratio = 0;       // 0: nothing compressible sampled
    double zero_share = 0;
  };
  Sample SampleCompressibility(GuestMemory& mem, const DirtySet& pages, uint32_t max = 64);

  // Delta-ability probe, so that delta is enabled only where it can help. Call once per pass
  // with the pages about to be sent (as SampleCompressibility). Pages copied at the previous
  // call that are in `pages` again are compared with their content now: a hit is an XBZRLE
  // delta that fits the threshold Encode() would apply (with the current compression setting).
  // Then up to `max` non-zero pages spread over `pages` are copied for the next call (memory
  // bounded: max pages). Zero pages are not compared (they travel as ZERO records anyway).
  struct DeltaSample {
    uint32_t pages = 0;       // compared pages; 0: nothing to compare yet
    double hit_rate = 0;      // share of `pages` whose delta fits
    double size_ratio = 0;    // mean delta size / page size over the hits
  };
  DeltaSample SampleDelta(GuestMemory& mem, const DirtySet& pages, uint32_t max = 64);

  uint64_t compressed_pages() const { return compressed_pages_.load(); }
  uint64_t delta_pages() const { return delta_pages_.load(); }
  // Share of the pages sent with content since the previous call that went as deltas.
  double TakeDeltaHitRate();

 private:
  std::unique_ptr<PageCompressor> compressor_;
  std::unique_ptr<DeltaCache> delta_;
  std::unique_ptr<PageCompressor> sampler_;  // one thread, samples every batch
  // Largest delta worth sending instead of the page (Encode and SampleDelta).
  size_t MaxDelta() const;
  std::vector<uint64_t> probe_gpas_;  // pages copied by the last SampleDelta
  std::vector<uint8_t> probe_data_;   // their content then, kPageSize each
  std::atomic<uint64_t> compressed_pages_{0}, delta_pages_{0}, content_pages_{0};
  uint64_t last_delta_ = 0, last_content_ = 0;
};

class AdaptiveMigration {
 public:
  // `config` must be valid (ValidatePolicyConfig). `vm` outlives this object.
  static absl::StatusOr<std::unique_ptr<AdaptiveMigration>> Create(const PolicyConfig& config,
                                                                   Vm* vm);
  ~AdaptiveMigration();  // releases the vCPU throttle

  PageEncoder& encoder() { return encoder_; }

  // After the dirty sync of a pre-copy pass: `m` carries what the sender measured (iteration,
  // elapsed, remaining, dirty rate, bandwidth before encoding, downtime limit and expectation);
  // the rest is measured here. Applies the policy's settings and returns its new decisions.
  absl::StatusOr<std::vector<PolicyDecision>> Observe(IterationMetrics m, const DirtySet& dirty);
  bool switch_to_postcopy() const { return policy_->settings().switch_to_postcopy(); }
  const PolicySettings& settings() const { return policy_->settings(); }
  PolicyTendency tendency() const { return policy_->tendency(); }
  // Releases the throttle (switchover, cancel, failure). Idempotent.
  void ReleaseThrottle();

 private:
  AdaptiveMigration(std::unique_ptr<MigrationPolicy> policy, Vm* vm)
      : policy_(std::move(policy)), vm_(vm) {}
  absl::Status Apply(const PolicySettings& s);

  std::unique_ptr<MigrationPolicy> policy_;
  Vm* const vm_;
  HostProbe probe_;
  PageEncoder encoder_;
  uint32_t throttle_ = 0;
};

}  // namespace microvmm::migration

#endif  // MICROVMM_MIGRATION_PRECOPY_ADAPTIVE_H_
