#include "api/address.h"

#include "absl/status/status.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace microvmm {

namespace {

absl::StatusOr<ApiAddress> UnixAddress(std::string grpc, std::string path,
                                       absl::string_view original) {
  if (path.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("API address '", original, "' has an empty socket path"));
  }
  if (path.size() > kMaxUnixSocketPath) {
    return absl::InvalidArgumentError(absl::StrCat("unix socket path '", path, "' is too long (",
                                                   path.size(), " bytes, at most ",
                                                   kMaxUnixSocketPath, ")"));
  }
  return ApiAddress{std::move(grpc), std::move(path)};
}

}  // namespace

absl::StatusOr<ApiAddress> ParseApiAddress(absl::string_view address) {
  if (address.empty()) return absl::InvalidArgumentError("empty API address");
  if (absl::StartsWith(address, "unix-abstract:")) {
    if (address.size() == absl::string_view("unix-abstract:").size()) {
      return absl::InvalidArgumentError(
          absl::StrCat("API address '", address, "' has an empty abstract socket name"));
    }
    return ApiAddress{std::string(address), ""};
  }
  if (absl::StartsWith(address, "unix:")) {
    absl::string_view path = address.substr(5);
    // unix:///abs/path is the URI form of unix:/abs/path.
    if (absl::StartsWith(path, "//")) path.remove_prefix(2);
    return UnixAddress(std::string(address), std::string(path), address);
  }
  if (address.front() == '/' || address.front() == '.' ||
      address.find(':') == absl::string_view::npos) {
    return UnixAddress(absl::StrCat("unix:", address), std::string(address), address);
  }
  return ApiAddress{std::string(address), ""};
}

}  // namespace microvmm
