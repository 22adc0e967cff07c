// Source side of pre-copy live migration: one thread drives dirty tracking, page streams and the
// switchover. Any failure before the destination's Ready leaves the VM running here untouched.
#ifndef MICROVMM_MIGRATION_PRECOPY_SOURCE_H_
#define MICROVMM_MIGRATION_PRECOPY_SOURCE_H_

#include <atomic>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"
#include "proto/policy.pb.h"
#include "proto/vmm.pb.h"
#include "vmm/vm.h"

namespace microvmm::migration {

struct SourceOptions {
  std::string destination;  // unix socket path, unix:PATH, unix-abstract:NAME or HOST:PORT
  absl::Duration downtime_limit = absl::Milliseconds(300);
  uint64_t bandwidth_limit = 0;  // bytes/s, 0 = unlimited
  uint32_t streams = 2;
  uint32_t max_iterations = 0;   // 0 = unlimited
  bool postcopy = false;         // pure post-copy: switch right after the header
  uint32_t postcopy_after_iterations = 0;  // pre-copy, then post-copy after N passes (0: never)
  std::shared_ptr<grpc::ChannelCredentials> credentials;  // null: insecure
  // Adaptive pre-copy (validated, defaults filled); unset: the fixed configuration above.
  std::optional<PolicyConfig> policy;
};

// Validates and fills defaults from the API request.
absl::StatusOr<SourceOptions> SourceOptionsFromRequest(const StartMigrationRequest& req);

class MigrationSource {
 public:
  // Starts migrating `vm` (RUNNING). `vm` must outlive this object.
  static absl::StatusOr<std::unique_ptr<MigrationSource>> Start(Vm* vm, SourceOptions options);
  ~MigrationSource();  // cancels if still running, joins

  MigrationProgress progress() const;
  bool done() const;
  void Cancel();
  // Switches a running pre-copy to post-copy at the next opportunity (the current pass stops).
  // FailedPrecondition when the migration is over or already past its switchover.
  absl::Status StartPostcopy();
  // Post-copy recovery: the migration is MIGRATION_POSTCOPY_PAUSED (its connections broke after
  // the destination resumed the VM). Reconnects to `destination` (grpc target) in the
  // background; the phase goes back to MIGRATION_POSTCOPY, then COMPLETED, or PAUSED again.
  absl::Status RecoverPostcopy(const std::string& destination);
  // Waits until the migration ended or `timeout` passed; returns the latest progress.
  MigrationProgress Wait(absl::Duration timeout) const;
  const std::string& id() const { return id_; }

 private:
  MigrationSource(Vm* vm, SourceOptions options);
  void Run();
  void Conclude(absl::Status s);  // end of an attempt: COMPLETED/FAILED/.../POSTCOPY_PAUSED
  class Session;

  Vm* const vm_;
  const SourceOptions options_;
  const std::string id_;
  std::atomic<bool> cancel_{false};
  std::atomic<bool> postcopy_requested_{false};
  mutable absl::Mutex mu_;
  MigrationProgress progress_ ABSL_GUARDED_BY(mu_);
  bool done_ ABSL_GUARDED_BY(mu_) = false;  // final (POSTCOPY_PAUSED is not)
  bool recovering_ ABSL_GUARDED_BY(mu_) = false;
  std::unique_ptr<Session> session_;
  std::thread thread_;
};

}  // namespace microvmm::migration

#endif  // MICROVMM_MIGRATION_PRECOPY_SOURCE_H_
