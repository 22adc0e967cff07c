#include "api/server.h"

#include <errno.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/time.h"
#include "api/address.h"
#include "api/listen.h"

namespace microvmm {

VmRunState ToRunState(RunState state) {
  switch (state) {
    case RunState::kCreated:
      return CREATED;
    case RunState::kRunning:
      return RUNNING;
    case RunState::kPaused:
      return PAUSED;
    case RunState::kExited:
      return EXITED;
  }
  return VM_RUN_STATE_UNSPECIFIED;
}

namespace {

grpc::Status FailedPrecondition(std::string message) {
  return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, std::move(message));
}

}  // namespace

// Replies to Shutdown and, once the call is completely done (reply sent, or the call failed /
// was cancelled), calls the owner's exit callback.
class ApiServer::ShutdownReactor final : public grpc::ServerUnaryReactor {
 public:
  ShutdownReactor(const ExitCallback* on_exit, int exit_status)
      : on_exit_(on_exit), exit_status_(exit_status) {}

  void OnDone() override {
    if (on_exit_ != nullptr && *on_exit_) (*on_exit_)(exit_status_);
    delete this;
  }
  void OnCancel() override {}

 private:
  const ExitCallback* const on_exit_;  // null: not the first Shutdown, do not fire again
  const int exit_status_;
};

ApiServer::ApiServer(ExitCallback on_exit) : on_exit_(std::move(on_exit)) {}

ApiServer::ApiServer(std::unique_ptr<Vm> vm, ExitCallback on_exit)
    : on_exit_(std::move(on_exit)), vm_(std::move(vm)) {}

ApiServer::~ApiServer() {
  std::unique_ptr<migration::MigrationSource> m;
  std::unique_ptr<migration::IncomingMigration> in;
  {
    absl::MutexLock lock(&mu_);
    m = std::move(migration_);
    in = std::move(incoming_);
  }
  if (m) m->Cancel();
  if (migration_monitor_.joinable()) migration_monitor_.join();
  m.reset();
  in.reset();
}

void ApiServer::FireExitOnce(int status) {
  {
    absl::MutexLock lock(&mu_);
    if (exit_fired_) return;
    exit_fired_ = true;
  }
  if (on_exit_) on_exit_(status);
}

absl::Status ApiServer::AdoptVm(std::unique_ptr<Vm> vm) {
  absl::MutexLock lock(&mu_);
  if (vm_ != nullptr) return absl::FailedPreconditionError("a VM already exists");
  vm_ = std::move(vm);
  return absl::OkStatus();
}

void ApiServer::MonitorMigration(migration::MigrationSource* m) {
  MigrationProgress p = m->Wait(absl::InfiniteDuration());
  if (p.phase() == MIGRATION_COMPLETED) {
    absl::SleepFor(absl::Milliseconds(300));  // let WatchMigration callers get the final report
    FireExitOnce(kExitOk);
  }
}

grpc::Status ApiServer::StartMigration(grpc::ServerContext*, const StartMigrationRequest* request,
                                       StartMigrationResponse* response) {
  auto options = migration::SourceOptionsFromRequest(*request);
  if (!options.ok()) return ToGrpcStatus(options.status());
  absl::MutexLock lock(&mu_);
  if (shutdown_requested_) return FailedPrecondition("the VMM is shutting down");
  if (vm_ == nullptr) return FailedPrecondition("cannot migrate: no VM");
  if (migration_ != nullptr && !migration_->done())
    return FailedPrecondition("a migration is already running (CancelMigration first)");
  if (migration_ != nullptr && migration_->progress().phase() == MIGRATION_COMPLETED)
    return FailedPrecondition("the VM has already been migrated away");
  if (migration_monitor_.joinable()) {
    mu_.Unlock();
    migration_monitor_.join();
    mu_.Lock();
  }
  options->credentials = tls_.channel;
  auto m = migration::MigrationSource::Start(vm_.get(), *options);
  if (!m.ok()) return ToGrpcStatus(m.status());
  // A finished attempt stays alive: WatchMigration callers may still hold it.
  if (migration_ != nullptr) old_migrations_.push_back(std::move(migration_));
  migration_ = std::move(*m);
  response->set_migration_id(migration_->id());
  migration_monitor_ = std::thread([this, p = migration_.get()] { MonitorMigration(p); });
  return grpc::Status::OK;
}

grpc::Status ApiServer::CancelMigration(grpc::ServerContext*, const CancelMigrationRequest*,
                                        CancelMigrationResponse*) {
  absl::MutexLock lock(&mu_);
  if (migration_ == nullptr || migration_->done())
    return FailedPrecondition("no migration is running");
  MigrationPhase phase = migration_->progress().phase();
  if (phase == MIGRATION_POSTCOPY || phase == MIGRATION_POSTCOPY_PAUSED)
    return FailedPrecondition(
        "the migration is in post-copy: the VM runs at the destination and needs the pages "
        "still here, so it cannot be cancelled");
  migration_->Cancel();
  return grpc::Status::OK;
}

grpc::Status ApiServer::StartPostcopy(grpc::ServerContext*, const StartPostcopyRequest*,
                                      StartPostcopyResponse*) {
  absl::MutexLock lock(&mu_);
  if (migration_ == nullptr || migration_->done())
    return FailedPrecondition("no migration is running");
  return ToGrpcStatus(migration_->StartPostcopy());
}

grpc::Status ApiServer::WatchMigration(grpc::ServerContext* context,
                                       const WatchMigrationRequest* request,
                                       grpc::ServerWriter<MigrationProgress>* writer) {
  migration::MigrationSource* m;
  {
    absl::MutexLock lock(&mu_);
    if (migration_ == nullptr) return FailedPrecondition("no migration has been started");
    m = migration_.get();  // lives as long as this ApiServer (never replaced while running)
  }
  absl::Duration interval =
      absl::Milliseconds(request->interval_ms() == 0 ? 200 : std::max(20u, request->interval_ms()));
  for (;;) {
    MigrationProgress p = m->Wait(interval);
    // POSTCOPY_PAUSED ends a watch too: it waits for an operator (RecoverMigration), who then
    // watches again.
    bool last = p.phase() == MIGRATION_COMPLETED || p.phase() == MIGRATION_FAILED ||
                p.phase() == MIGRATION_CANCELLED || p.phase() == MIGRATION_POSTCOPY_PAUSED;
    if (!writer->Write(p) || last || context->IsCancelled()) break;
  }
  return grpc::Status::OK;
}

grpc::Status ApiServer::RecoverMigration(grpc::ServerContext*,
                                         const RecoverMigrationRequest* request,
                                         RecoverMigrationResponse*) {
  if (request->destination().empty())
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "destination is required");
  auto addr = ParseApiAddress(request->destination());
  if (!addr.ok()) return ToGrpcStatus(addr.status());
  absl::MutexLock lock(&mu_);
  if (migration_ == nullptr) return FailedPrecondition("no migration has been started");
  // The monitor thread keeps waiting: a paused post-copy is not over.
  return ToGrpcStatus(migration_->RecoverPostcopy(addr->grpc));
}

grpc::Status ApiServer::ReceiveMigration(grpc::ServerContext*,
                                         const ReceiveMigrationRequest* request,
                                         ReceiveMigrationResponse*) {
  if (request->listen_address().empty())
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "listen_address is required");
  absl::MutexLock lock(&mu_);
  if (shutdown_requested_) return FailedPrecondition("the VMM is shutting down");
  if (vm_ != nullptr) return FailedPrecondition("cannot receive a migration: a VM already exists");
  if (incoming_ != nullptr) return FailedPrecondition("already listening for a migration");
  VmConfig local;
  *local.mutable_serial() = request->serial();
  if (local.serial().mode() == SerialConfig::MODE_UNSPECIFIED)
    local.mutable_serial()->set_mode(SerialConfig::STDOUT);
  *local.mutable_disks() = request->disks();
  *local.mutable_nets() = request->nets();
  if (request->has_vsock()) *local.mutable_vsock() = request->vsock();
  auto in = migration::IncomingMigration::Listen(
      request->listen_address(), local, [this](absl::StatusOr<std::unique_ptr<Vm>> vm) {
        if (vm.ok()) {
          (void)AdoptVm(std::move(*vm));
        } else {
          FireExitOnce(kExitIncomingFailed);
        }
      },
      tls_.server);
  if (!in.ok()) return ToGrpcStatus(in.status());
  incoming_ = std::move(*in);
  return grpc::Status::OK;
}

Vm* ApiServer::vm() const {
  absl::MutexLock lock(&mu_);
  return vm_.get();
}

bool ApiServer::shutdown_requested() const {
  absl::MutexLock lock(&mu_);
  return shutdown_requested_;
}

std::string ApiServer::StateNameLocked() const {
  if (vm_ == nullptr) return "NOT_CREATED";
  return VmRunState_Name(ToRunState(vm_->state())).c_str();
}

grpc::Status ApiServer::CreateVm(grpc::ServerContext*, const CreateVmRequest* request,
                                 CreateVmResponse*) {
  absl::MutexLock lock(&mu_);
  if (shutdown_requested_) {
    return FailedPrecondition("cannot create a VM: the VMM is shutting down");
  }
  if (vm_ != nullptr) {
    return FailedPrecondition(absl::StrCat("cannot create a VM: a VM already exists (state ",
                                           StateNameLocked(),
                                           "); a VMM process runs exactly one VM"));
  }
  VmConfig config = request->config();
  // proto3 enums are open: a client may send any number, and ValidateAndDefaultConfig does not
  // reject unknown serial modes.
  if (!SerialConfig::Mode_IsValid(config.serial().mode())) {
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        absl::StrCat("unknown serial mode ", config.serial().mode(),
                                     " (STDOUT=1, FILE=2, NONE=3)"));
  }
  if (absl::Status valid = ValidateAndDefaultConfig(config); !valid.ok()) {
    return ToGrpcStatus(valid);
  }
  absl::StatusOr<std::unique_ptr<Vm>> vm = Vm::Create(config);
  if (!vm.ok()) return ToGrpcStatus(vm.status());
  if (*vm == nullptr) return grpc::Status(grpc::StatusCode::INTERNAL, "Vm::Create returned null");
  vm_ = std::move(*vm);
  return grpc::Status::OK;
}

namespace {

// Runs `op` on `vm` if it is in state `needed`; otherwise FAILED_PRECONDITION naming the state.
grpc::Status Transition(Vm* vm, bool shutting_down, const char* verb, RunState needed,
                        absl::Status (Vm::*op)()) {
  const std::string needed_name = VmRunState_Name(ToRunState(needed));
  if (vm == nullptr) {
    if (shutting_down) {
      return FailedPrecondition(absl::StrCat("cannot ", verb, ": the VMM is shutting down"));
    }
    return FailedPrecondition(absl::StrCat("cannot ", verb,
                                           ": the VM state is NOT_CREATED (call CreateVm first; ",
                                           verb, " needs ", needed_name, ")"));
  }
  const RunState state = vm->state();
  if (state != needed) {
    return FailedPrecondition(absl::StrCat("cannot ", verb, ": the VM state is ",
                                           VmRunState_Name(ToRunState(state)), " (", verb,
                                           " needs ", needed_name, ")"));
  }
  return ToGrpcStatus((vm->*op)());
}

}  // namespace

grpc::Status ApiServer::Boot(grpc::ServerContext*, const BootRequest*, BootResponse*) {
  absl::MutexLock lock(&mu_);
  return Transition(vm_.get(), shutdown_requested_, "boot", RunState::kCreated, &Vm::Boot);
}

grpc::Status ApiServer::Pause(grpc::ServerContext*, const PauseRequest*, PauseResponse*) {
  absl::MutexLock lock(&mu_);
  return Transition(vm_.get(), shutdown_requested_, "pause", RunState::kRunning, &Vm::Pause);
}

grpc::Status ApiServer::Resume(grpc::ServerContext*, const ResumeRequest*, ResumeResponse*) {
  absl::MutexLock lock(&mu_);
  return Transition(vm_.get(), shutdown_requested_, "resume", RunState::kPaused, &Vm::Resume);
}

grpc::ServerUnaryReactor* ApiServer::Shutdown(grpc::CallbackServerContext*, const ShutdownRequest*,
                                              ShutdownResponse*) {
  grpc::Status reply = grpc::Status::OK;
  int exit_status = kExitOk;
  bool fire = false;
  {
    absl::MutexLock lock(&mu_);
    shutdown_requested_ = true;
    if (vm_ != nullptr) {
      absl::Status stopped = vm_->Shutdown();
      if (std::optional<VmExit> exit = vm_->exit_info(); exit.has_value()) {
        exit_status = exit->status;
      } else if (!stopped.ok()) {
        exit_status = kExitVmmError;
      }
      if (!stopped.ok()) {
        reply = grpc::Status(static_cast<grpc::StatusCode>(stopped.code()),
                             absl::StrCat("VM shutdown failed: ", stopped.message(),
                                          "; the VMM exits anyway with status ", exit_status));
      }
    }
    if (!exit_fired_) {
      exit_fired_ = true;
      fire = true;
    }
  }
  auto* reactor = new ShutdownReactor(fire ? &on_exit_ : nullptr, exit_status);
  reactor->Finish(reply);
  return reactor;
}

grpc::Status ApiServer::GetInfo(grpc::ServerContext*, const GetInfoRequest*, VmInfo* info) {
  absl::MutexLock lock(&mu_);
  if (vm_ == nullptr) {
    info->set_state(NOT_CREATED);
    return grpc::Status::OK;
  }
  const RunState state = vm_->state();
  info->set_state(ToRunState(state));
  const VmConfig& config = vm_->config();
  info->set_vcpus(config.vcpus());
  info->set_memory_mib(config.memory_mib());
  const int64_t uptime_ms = absl::ToInt64Milliseconds(vm_->uptime());
  info->set_uptime_ms(uptime_ms > 0 ? static_cast<uint64_t>(uptime_ms) : 0);
  if (state == RunState::kExited) {
    if (std::optional<VmExit> exit = vm_->exit_info(); exit.has_value()) {
      info->set_exit_reason(exit->reason);
      info->set_exit_status(exit->status);
    }
  }
  *info->mutable_config() = config;
  for (DeviceStatus& d : vm_->DeviceStatuses()) *info->add_devices() = std::move(d);
  info->set_migration_note(vm_->migration_note());
  return grpc::Status::OK;
}

namespace {
grpc::Status NoVm(bool shutting_down, const char* verb) {
  return FailedPrecondition(absl::StrCat(
      "cannot ", verb, shutting_down ? ": the VMM is shutting down"
                                     : ": the VM state is NOT_CREATED (call CreateVm first)"));
}
}  // namespace

grpc::Status ApiServer::SetBalloon(grpc::ServerContext*, const SetBalloonRequest* request,
                                   SetBalloonResponse*) {
  absl::MutexLock lock(&mu_);
  if (vm_ == nullptr) return NoVm(shutdown_requested_, "set the balloon");
  return ToGrpcStatus(vm_->SetBalloonTarget(request->target_mib()));
}

grpc::Status ApiServer::GetBalloonStats(grpc::ServerContext*, const GetBalloonStatsRequest*,
                                        BalloonStatus* response) {
  absl::MutexLock lock(&mu_);
  if (vm_ == nullptr) return NoVm(shutdown_requested_, "read the balloon");
  absl::StatusOr<BalloonStatus> b = vm_->GetBalloonStatus();
  if (!b.ok()) return ToGrpcStatus(b.status());
  *response = std::move(*b);
  return grpc::Status::OK;
}

grpc::Status ApiServer::AttachDevice(grpc::ServerContext*, const AttachDeviceRequest* request,
                                     AttachDeviceResponse* response) {
  if (!request->vm_id().empty())
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                        absl::StrCat("unknown vm_id '", request->vm_id(),
                                     "': this VMM serves one VM, leave vm_id empty"));
  switch (request->device_case()) {
    case AttachDeviceRequest::kVfioUser:
      if (request->vfio_user().socket().empty())
        return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "vfio_user.socket is required");
      break;
    case AttachDeviceRequest::kVfio:
      if (request->vfio().sysfs_path().empty())
        return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "vfio.sysfs_path is required");
      break;
    default:
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT,
                          "no device given (AttachDeviceRequest.vfio_user or .vfio)");
  }
  // Held for the whole attach: no migration can start meanwhile (StartMigration takes mu_).
  absl::MutexLock lock(&mu_);
  if (vm_ == nullptr) return NoVm(shutdown_requested_, "attach a device");
  if (shutdown_requested_)
    return FailedPrecondition("cannot attach a device: the VMM is shutting down");
  if (migration_ != nullptr && !migration_->done())
    return FailedPrecondition(
        "cannot attach a device while a migration is running (the destination would not have "
        "it); wait for it to end or CancelMigration");
  if (migration_ != nullptr && migration_->progress().phase() == MIGRATION_COMPLETED)
    return FailedPrecondition("cannot attach a device: the VM has been migrated away");
  if (vm_->state() == RunState::kExited)
    return FailedPrecondition("cannot attach a device: the VM state is EXITED");
  absl::StatusOr<uint8_t> slot = request->has_vfio() ? vm_->AttachVfio(request->vfio())
                                                     : vm_->AttachVfioUser(request->vfio_user());
  if (!slot.ok()) return ToGrpcStatus(slot.status());
  response->set_pci_slot(*slot);
  response->set_pci_address(absl::StrFormat("0000:00:%02x.0", *slot));
  return grpc::Status::OK;
}

absl::StatusOr<std::unique_ptr<grpc::Server>> StartApiServer(
    absl::string_view address, ApiServer* service, int* selected_port,
    std::shared_ptr<grpc::ServerCredentials> credentials) {
  if (service == nullptr) return absl::InvalidArgumentError("StartApiServer: null service");
  return StartGrpcServer(address, service, "API", selected_port, std::move(credentials));
}

}  // namespace microvmm
