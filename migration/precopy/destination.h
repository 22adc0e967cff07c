// Destination side of live migration: the `Migration` gRPC service. Builds an empty VM from the
// source's header, writes incoming pages into its RAM, restores the state and runs it.
#ifndef MICROVMM_MIGRATION_PRECOPY_DESTINATION_H_
#define MICROVMM_MIGRATION_PRECOPY_DESTINATION_H_

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "migration/stream/page_codec.h"
#include "proto/migration.grpc.pb.h"
#include "vmm/vm.h"

namespace microvmm::migration {

inline constexpr uint32_t kMigrationFormatVersion = 1;
inline constexpr uint32_t kMaxPageStreams = 16;

class MigrationDestination final : public Migration::Service {
 public:
  // Called exactly once: with the running VM after a successful migration, or with the error
  // that ended it (everything received so far has then been discarded).
  using DoneFn = std::function<void(absl::StatusOr<std::unique_ptr<Vm>>)>;
  // `local`: this host's settings for the arriving VM — its serial console and, if given, the
  // device backends (disk paths, taps, vsock socket), see ApplyLocalSettings() in vmm/vm.h;
  // the source's settings name the source host's files.
  MigrationDestination(VmConfig local, DoneFn done);
  ~MigrationDestination() override;

  grpc::Status Control(grpc::ServerContext* ctx,
                       grpc::ServerReaderWriter<DestinationMessage, SourceMessage>* stream) override;
  grpc::Status Pages(grpc::ServerContext* ctx, grpc::ServerReader<PageBatch>* reader,
                     PagesSummary* summary) override;

 private:
  absl::Status RunControl(grpc::ServerContext* ctx,
                          grpc::ServerReaderWriter<DestinationMessage, SourceMessage>* stream);
  absl::Status AcceptHeader(const MigrationHeader& h);
  void Finish(absl::StatusOr<std::unique_ptr<Vm>> result);

  const VmConfig local_;
  DoneFn done_;
  absl::Mutex mu_;
  bool started_ ABSL_GUARDED_BY(mu_) = false;   // a Control stream took the one migration
  bool finished_ ABSL_GUARDED_BY(mu_) = false;  // done_ was called
  std::string migration_id_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<Vm> vm_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<ReceivedPages> received_pages_;  // set with vm_, then only used by page streams
  uint32_t streams_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<uint64_t> received_ ABSL_GUARDED_BY(mu_);
  std::vector<int> stream_state_ ABSL_GUARDED_BY(mu_);  // 0 unseen, 1 open, 2 closed
  std::string page_error_ ABSL_GUARDED_BY(mu_);
  int pages_in_progress_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace microvmm::migration

#endif  // MICROVMM_MIGRATION_PRECOPY_DESTINATION_H_
