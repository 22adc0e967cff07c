// gRPC control API (service microvmm.Vmm) of one VMM process driving at most one VM.
#ifndef MICROVMM_API_SERVER_H_
#define MICROVMM_API_SERVER_H_

#include <functional>
#include <memory>
#include <vector>
#include <thread>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "grpcpp/grpcpp.h"
#include "proto/vmm.grpc.pb.h"
#include "api/listen.h"
#include "api/tls.h"
#include "migration/precopy/incoming.h"
#include "migration/precopy/source.h"
#include "vmm/vm.h"

namespace microvmm {

// Implements microvmm.Vmm for ONE VM per process. Every RPC is serialized by one mutex (VM
// operations are short: Pause returns once the vCPUs are out of KVM_RUN).
//
// Shutdown is special: it stops the VM (if any), replies, and once the reply has been sent (or
// the call is otherwise finished, e.g. cancelled by the client) calls the `on_exit` callback
// given at construction with the status the process should exit with (the VM's exit status, 0
// if no VM was ever created). The callback runs on a gRPC thread, exactly once per ApiServer;
// it must not block on grpc::Server::Shutdown() itself (which waits for this very call) -
// typically it wakes the owner's main thread, which shuts the grpc::Server down and exits.
//
// The owner must shut the grpc::Server down before destroying the ApiServer.
class ApiServer final : public Vmm::WithCallbackMethod_Shutdown<Vmm::Service> {
 public:
  using ExitCallback = std::function<void(int exit_status)>;

  // No VM yet: waits for CreateVm.
  explicit ApiServer(ExitCallback on_exit);
  // Serves an already created (and possibly booted) VM, e.g. built from command-line flags.
  // CreateVm is then refused with FAILED_PRECONDITION. `vm` must not be null.
  ApiServer(std::unique_ptr<Vm> vm, ExitCallback on_exit);
  ~ApiServer() override;

  ApiServer(const ApiServer&) = delete;
  ApiServer& operator=(const ApiServer&) = delete;

  grpc::Status CreateVm(grpc::ServerContext* context, const CreateVmRequest* request,
                        CreateVmResponse* response) override;
  grpc::Status Boot(grpc::ServerContext* context, const BootRequest* request,
                    BootResponse* response) override;
  grpc::Status Pause(grpc::ServerContext* context, const PauseRequest* request,
                     PauseResponse* response) override;
  grpc::Status Resume(grpc::ServerContext* context, const ResumeRequest* request,
                      ResumeResponse* response) override;
  grpc::ServerUnaryReactor* Shutdown(grpc::CallbackServerContext* context,
                                     const ShutdownRequest* request,
                                     ShutdownResponse* response) override;
  grpc::Status GetInfo(grpc::ServerContext* context, const GetInfoRequest* request,
                       VmInfo* response) override;
  grpc::Status StartPostcopy(grpc::ServerContext* context, const StartPostcopyRequest* request,
                             StartPostcopyResponse* response) override;
  grpc::Status SetBalloon(grpc::ServerContext* context, const SetBalloonRequest* request,
                          SetBalloonResponse* response) override;
  grpc::Status GetBalloonStats(grpc::ServerContext* context,
                               const GetBalloonStatsRequest* request,
                               BalloonStatus* response) override;
  grpc::Status AttachDevice(grpc::ServerContext* context, const AttachDeviceRequest* request,
                            AttachDeviceResponse* response) override;
  grpc::Status StartMigration(grpc::ServerContext* context, const StartMigrationRequest* request,
                              StartMigrationResponse* response) override;
  grpc::Status CancelMigration(grpc::ServerContext* context, const CancelMigrationRequest* request,
                               CancelMigrationResponse* response) override;
  grpc::Status WatchMigration(grpc::ServerContext* context, const WatchMigrationRequest* request,
                              grpc::ServerWriter<MigrationProgress>* writer) override;
  grpc::Status RecoverMigration(grpc::ServerContext* context,
                                const RecoverMigrationRequest* request,
                                RecoverMigrationResponse* response) override;
  grpc::Status ReceiveMigration(grpc::ServerContext* context,
                                const ReceiveMigrationRequest* request,
                                ReceiveMigrationResponse* response) override;

  // mTLS for outgoing migrations and ReceiveMigration listeners (call before serving).
  void SetTls(TlsCredentials tls) { tls_ = std::move(tls); }

  // Serves a VM that arrived by an incoming migration (vmm --incoming). No VM may exist yet.
  absl::Status AdoptVm(std::unique_ptr<Vm> vm);

  // The VM, or nullptr before CreateVm. Once set, the pointer stays valid for the lifetime of
  // this ApiServer (the VM is never replaced), so the owner may e.g. WaitForExitFor() on it to
  // notice a guest-initiated exit. Vm methods must be thread-safe for that.
  Vm* vm() const ABSL_LOCKS_EXCLUDED(mu_);

  // True once a Shutdown RPC has been accepted.
  bool shutdown_requested() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  class ShutdownReactor;

  // The state name for messages: NOT_CREATED, CREATED, RUNNING, PAUSED, EXITED.
  std::string StateNameLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Calls the exit callback unless it already ran.
  void FireExitOnce(int status);
  // After a completed outgoing migration the VMM exits (the VM runs elsewhere now).
  void MonitorMigration(migration::MigrationSource* m);

  const ExitCallback on_exit_;
  mutable absl::Mutex mu_;
  std::unique_ptr<Vm> vm_ ABSL_GUARDED_BY(mu_);
  bool shutdown_requested_ ABSL_GUARDED_BY(mu_) = false;
  bool exit_fired_ ABSL_GUARDED_BY(mu_) = false;
  std::unique_ptr<migration::MigrationSource> migration_ ABSL_GUARDED_BY(mu_);
  std::vector<std::unique_ptr<migration::MigrationSource>> old_migrations_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<migration::IncomingMigration> incoming_ ABSL_GUARDED_BY(mu_);
  std::thread migration_monitor_;
  TlsCredentials tls_;
};

// Maps the Vm's state to the API's.
VmRunState ToRunState(RunState state);

// Starts a gRPC server (with server reflection, so grpcurl-style tools can use it) serving
// `service`, which must outlive the returned server. `address` is as in ParseApiAddress:
// a unix socket path, unix:PATH, unix-abstract:NAME or host:port.
// For a unix socket file: a stale socket left by a dead VMM is removed first; the call fails
// with FAILED_PRECONDITION if the path exists and is not a socket or if another process is
// still accepting connections on it, and with UNAVAILABLE if binding fails (e.g. the directory
// does not exist or is not writable). For TCP, `selected_port` (if not null) receives the port
// actually bound (useful with port 0).
// `credentials`: mTLS server credentials (null: insecure).
absl::StatusOr<std::unique_ptr<grpc::Server>> StartApiServer(
    absl::string_view address, ApiServer* service, int* selected_port = nullptr,
    std::shared_ptr<grpc::ServerCredentials> credentials = nullptr);

}  // namespace microvmm

#endif  // MICROVMM_API_SERVER_H_
