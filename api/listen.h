// Starting a gRPC server on a VMM address (unix socket path, unix:, unix-abstract:, HOST:PORT).
#ifndef MICROVMM_API_LISTEN_H_
#define MICROVMM_API_LISTEN_H_

#include <memory>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "grpcpp/grpcpp.h"

namespace microvmm {

// absl::Status -> grpc::Status (same numeric codes and message).
grpc::Status ToGrpcStatus(const absl::Status& status);

// Serves `service` (which must outlive the server) with server reflection. For a unix socket
// file, a stale socket left by a dead process is replaced; a path that is not a socket, or a
// socket another process still accepts on, is refused (FAILED_PRECONDITION); bind failures are
// UNAVAILABLE with the reason. `what` names the server in messages ("API", "migration").
// `selected_port` receives the TCP port bound (useful with port 0). Null credentials: insecure.
absl::StatusOr<std::unique_ptr<grpc::Server>> StartGrpcServer(
    absl::string_view address, grpc::Service* service, absl::string_view what,
    int* selected_port = nullptr, std::shared_ptr<grpc::ServerCredentials> credentials = nullptr);

}  // namespace microvmm

#endif  // MICROVMM_API_LISTEN_H_
