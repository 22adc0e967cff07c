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
#include "absl/time/time.h"
#include "api/address.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"

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

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
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

ApiServer::~ApiServer() = default;

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
  return grpc::Status::OK;
}

namespace {

// Prepares a unix socket path for bind(): removes a stale socket, refuses anything else.
absl::Status PrepareSocketPath(const std::string& path) {
  struct stat st;
  if (lstat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return absl::OkStatus();
    return absl::FailedPreconditionError(
        absl::StrCat("cannot use API socket '", path, "': ", std::strerror(errno)));
  }
  if (!S_ISSOCK(st.st_mode)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "API socket path '", path,
        "' exists and is not a socket; refusing to replace it (remove it or pick another path)"));
  }
  // A socket: is a live process still serving on it?
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd >= 0) {
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path, path.data(), path.size());  // length checked by ParseApiAddress
    const int rc = connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
    close(fd);
    if (rc == 0) {
      return absl::FailedPreconditionError(absl::StrCat(
          "API socket '", path, "' is in use: another process is accepting connections on it"));
    }
  }
  if (unlink(path.c_str()) != 0 && errno != ENOENT) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot remove stale API socket '", path, "': ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

// Best-effort explanation of why binding a unix socket failed.
std::string ExplainUnixBindFailure(const std::string& path) {
  const size_t slash = path.rfind('/');
  const std::string dir =
      slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  struct stat st;
  if (stat(dir.c_str(), &st) != 0) {
    return absl::StrCat(": directory '", dir, "' does not exist or is not accessible (",
                        std::strerror(errno), ")");
  }
  if (!S_ISDIR(st.st_mode)) return absl::StrCat(": '", dir, "' is not a directory");
  if (access(dir.c_str(), W_OK | X_OK) != 0) {
    return absl::StrCat(": directory '", dir, "' is not writable (", std::strerror(errno), ")");
  }
  return " (see the gRPC error logged above)";
}

}  // namespace

absl::StatusOr<std::unique_ptr<grpc::Server>> StartApiServer(absl::string_view address,
                                                             ApiServer* service,
                                                             int* selected_port) {
  if (service == nullptr) return absl::InvalidArgumentError("StartApiServer: null service");
  absl::StatusOr<ApiAddress> parsed = ParseApiAddress(address);
  if (!parsed.ok()) return parsed.status();
  if (!parsed->unix_path.empty()) {
    if (absl::Status prepared = PrepareSocketPath(parsed->unix_path); !prepared.ok()) {
      return prepared;
    }
  }

  static const bool reflection_initialized = [] {
    grpc::reflection::InitProtoReflectionServerBuilderPlugin();
    return true;
  }();
  (void)reflection_initialized;

  int port = 0;
  grpc::ServerBuilder builder;
  builder.AddListeningPort(parsed->grpc, grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr) {
    return absl::UnavailableError(absl::StrCat("cannot serve the API on '", parsed->grpc, "'",
                                               parsed->unix_path.empty()
                                                   ? " (address in use or not resolvable?)"
                                                   : ExplainUnixBindFailure(parsed->unix_path)));
  }
  if (selected_port != nullptr) *selected_port = port;
  return server;
}

}  // namespace microvmm
