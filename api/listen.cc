#include "api/listen.h"

#include <errno.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <string>

#include "absl/strings/str_cat.h"
#include "api/address.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"

namespace microvmm {

namespace {

// Prepares a unix socket path for bind(): removes a stale socket, refuses anything else.
absl::Status PrepareSocketPath(const std::string& path) {
  struct stat st;
  if (lstat(path.c_str(), &st) != 0) {
    if (errno == ENOENT) return absl::OkStatus();
    return absl::FailedPreconditionError(
        absl::StrCat("cannot use socket '", path, "': ", std::strerror(errno)));
  }
  if (!S_ISSOCK(st.st_mode)) {
    return absl::FailedPreconditionError(absl::StrCat(
        "socket path '", path,
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
          "socket '", path, "' is in use: another process is accepting connections on it"));
    }
  }
  if (unlink(path.c_str()) != 0 && errno != ENOENT) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot remove stale socket '", path, "': ", std::strerror(errno)));
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

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

absl::StatusOr<std::unique_ptr<grpc::Server>> StartGrpcServer(
    absl::string_view address, grpc::Service* service, absl::string_view what, int* selected_port,
    std::shared_ptr<grpc::ServerCredentials> credentials) {
  if (service == nullptr) return absl::InvalidArgumentError("StartGrpcServer: null service");
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
  builder.AddListeningPort(parsed->grpc,
                           credentials ? credentials : grpc::InsecureServerCredentials(), &port);
  builder.SetMaxReceiveMessageSize(64 << 20);
  // Notice a peer that vanished without closing the connection (e.g. a migration source whose
  // host died), and accept the 2 s keepalive pings our migration client sends on its otherwise
  // idle control connection (gRPC's default policy would answer them with GOAWAY).
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, 10000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 5000);
  builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MIN_RECV_PING_INTERVAL_WITHOUT_DATA_MS, 1000);
  builder.AddChannelArgument(GRPC_ARG_HTTP2_MAX_PING_STRIKES, 0);
  builder.RegisterService(service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr) {
    return absl::UnavailableError(absl::StrCat("cannot serve the ", what, " on '", parsed->grpc, "'",
                                               parsed->unix_path.empty()
                                                   ? " (address in use or not resolvable?)"
                                                   : ExplainUnixBindFailure(parsed->unix_path)));
  }
  if (selected_port != nullptr) *selected_port = port;
  return server;
}

}  // namespace microvmm
