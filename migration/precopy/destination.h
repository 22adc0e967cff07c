// Destination side of live migration: the `Migration` gRPC service. Builds an empty VM from the
// source's header, writes incoming pages into its RAM, restores the state and runs it.
#ifndef MICROVMM_MIGRATION_PRECOPY_DESTINATION_H_
#define MICROVMM_MIGRATION_PRECOPY_DESTINATION_H_

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "migration/postcopy/postcopy_memory.h"
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
  grpc::Status Demand(grpc::ServerContext* ctx,
                      grpc::ServerReaderWriter<PageRequest, PageBatch>* stream) override;

 private:
  absl::Status RunControl(grpc::ServerContext* ctx,
                          grpc::ServerReaderWriter<DestinationMessage, SourceMessage>* stream);
  absl::Status AcceptHeader(const MigrationHeader& h);
  void Finish(absl::StatusOr<std::unique_ptr<Vm>> result);
  // Waits until page streams [first, first + counts.size()) are closed with exactly `counts`.
  absl::Status WaitStreamsClosed(uint32_t first, const google::protobuf::RepeatedField<uint64_t>& counts);
  // Pre-copy Flush: waits until every pre-copy page stream delivered at least `counts` records.
  // Passthrough devices' pre-copy data (DeviceData), kept per PCI slot until the state comes;
  // RestoreMigratedState puts it in front of each device's blob (checking that nothing is
  // missing or left over) and restores the VM.
  absl::Status AddDeviceData(const DeviceData& d);
  absl::Status RestoreMigratedState(Vm* vm, VmState state);
  static constexpr size_t kMaxDeviceDataChunk = size_t{1} << 20;
  static constexpr uint64_t kMaxDeviceData = uint64_t{1} << 30;
  std::map<uint32_t, std::string> device_data_;  // control thread only
  uint64_t device_data_bytes_ = 0;
  // Fails fast when a stream ends short or `ctx` (the control call) is cancelled.
  absl::Status WaitStreamsReached(const google::protobuf::RepeatedField<uint64_t>& counts,
                                  grpc::ServerContext* ctx);
  static constexpr absl::Duration kFlushTimeout = absl::Seconds(60);
  absl::Status RunPostcopy(grpc::ServerReaderWriter<DestinationMessage, SourceMessage>* stream,
                           const StartPostcopy& sp, Vm* vm);
  // PostcopyMemory's FetchFn: queues a request on `lane`'s demand stream.
  void FetchOnLane(int lane, uint64_t gpa);
  // The source or a lane went away before every page arrived (before Go: recorded, applied once
  // the guest runs). The guest is paused, waiting threads stay blocked (no page is zero-filled);
  // the VM carries a note for the API.
  void FailPostcopy(const absl::Status& why);
  PostcopyStats PostcopyStatsNow() const;
  // After Go (or a recovery's Go): stats reporter, PostcopyComplete for push streams
  // [first_push, streams_), every page present, PostcopyDone. On failure the migration becomes
  // recoverable (FailPostcopy).
  void ServePostcopy(grpc::ServerReaderWriter<DestinationMessage, SourceMessage>* stream,
                     uint32_t first_push);
  // A new Control stream whose first message is Recover (after FailPostcopy).
  absl::Status RunRecover(grpc::ServerReaderWriter<DestinationMessage, SourceMessage>* stream,
                          const Recover& r);

  struct Lane {
    absl::Mutex mu;
    grpc::ServerReaderWriter<PageRequest, PageBatch>* stream ABSL_GUARDED_BY(mu) = nullptr;
    std::vector<uint64_t> pending ABSL_GUARDED_BY(mu);  // asked before the lane was open
    bool seen ABSL_GUARDED_BY(mu) = false;  // opened in this connection generation
  };

  const VmConfig local_;
  DoneFn done_;
  absl::Mutex mu_;
  bool started_ ABSL_GUARDED_BY(mu_) = false;   // a Control stream took the one migration
  bool finished_ ABSL_GUARDED_BY(mu_) = false;  // done_ was called
  std::string migration_id_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<Vm> vm_ ABSL_GUARDED_BY(mu_);
  Vm* vm_raw_ ABSL_GUARDED_BY(mu_) = nullptr;  // stays valid after vm_ was handed over
  std::unique_ptr<ReceivedPages> received_pages_;  // set with vm_, then only used by page streams
  uint32_t streams_ ABSL_GUARDED_BY(mu_) = 0;
  std::vector<uint64_t> received_ ABSL_GUARDED_BY(mu_);
  std::vector<int> stream_state_ ABSL_GUARDED_BY(mu_);  // 0 unseen, 1 open, 2 closed
  std::string page_error_ ABSL_GUARDED_BY(mu_);
  int pages_in_progress_ ABSL_GUARDED_BY(mu_) = 0;

  // Post-copy.
  uint32_t precopy_streams_ ABSL_GUARDED_BY(mu_) = 0;  // page streams below this are pre-copy
  std::vector<std::unique_ptr<Lane>> lanes_;  // vCPUs + 1 (VMM threads); sized at the header
  std::unique_ptr<PostcopyMemory> prepared_postcopy_;  // built at the header, until the switch
  absl::Status prepared_error_;                        // why it could not be built
  // Exit-driven post-copy: where KVM offers KVM Userfault (probed at the header), one bitmap
  // slot per RAM region; vCPUs then take their missing-page faults as exits on their own thread.
  std::unique_ptr<KvmUserfaultBitmap> kvm_userfault_;
  std::unique_ptr<PostcopyMemory> postcopy_;  // set before any push stream or lane answer
  std::atomic<bool> postcopy_running_{false};  // between Go and PostcopyDone
  absl::Mutex early_mu_;        // orders FailPostcopy against Go
  absl::Status early_failure_;  // FailPostcopy before Go, applied after it (guarded by early_mu_)
  std::atomic<bool> postcopy_failed_{false};
  Vm* postcopy_vm_ = nullptr;  // owned by whoever took it from done_ (outlives this service)
  // Recovery. A generation counts connection sets: handlers of an older one (still winding down
  // after the link dropped) must not fail the recovered migration.
  std::atomic<uint64_t> generation_{0};
  std::string recover_id_ ABSL_GUARDED_BY(mu_);  // set while a failed post-copy may recover
  bool recovering_ ABSL_GUARDED_BY(mu_) = false;
  uint32_t push_first_ ABSL_GUARDED_BY(mu_) = 0;  // first push stream of this generation
  std::atomic<bool> paused_by_failure_{false};  // FailPostcopy paused the guest
  std::atomic<bool> failure_pause_done_{true};   // its pause thread has returned
};

}  // namespace microvmm::migration

#endif  // MICROVMM_MIGRATION_PRECOPY_DESTINATION_H_
