// API addresses as users write them (--api-socket, vmmctl --socket) -> gRPC addresses.
#ifndef MICROVMM_API_ADDRESS_H_
#define MICROVMM_API_ADDRESS_H_

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace microvmm {

// Longest unix socket path that fits sockaddr_un.sun_path (with its NUL).
inline constexpr size_t kMaxUnixSocketPath = 107;

struct ApiAddress {
  std::string grpc;       // what grpc::ServerBuilder / grpc::CreateChannel take
  std::string unix_path;  // the socket file for unix-domain addresses, empty otherwise
};

// Accepted forms:
//   /abs/path, ./rel, rel.sock (no ':')  -> unix:<path>
//   unix:<path>, unix:///abs/path        -> as is (unix_path = the file)
//   unix-abstract:<name>                 -> as is (no file)
//   host:port, dns:..., ipv4:..., ipv6:.. -> as is (TCP)
// Errors (INVALID_ARGUMENT): empty address or path, unix path longer than kMaxUnixSocketPath.
absl::StatusOr<ApiAddress> ParseApiAddress(absl::string_view address);

}  // namespace microvmm

#endif  // MICROVMM_API_ADDRESS_H_
