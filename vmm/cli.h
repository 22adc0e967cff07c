// Command line of the `vmm` binary. Parsing is pure (unit tested); main.cc acts on the result.
#ifndef MICROVMM_VMM_CLI_H_
#define MICROVMM_VMM_CLI_H_

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "proto/vm_config.pb.h"

namespace microvmm {

struct VmmOptions {
  bool help = false;
  bool has_vm = false;      // a kernel or test guest was given: build and boot it at start
  VmConfig config;
  std::string api_socket;   // empty: no API server
  std::string incoming;     // listen here for an incoming migration instead of booting
  std::string log_level = "info";
  std::string tls_cert, tls_key, tls_ca;
};

absl::StatusOr<VmmOptions> ParseVmmArgs(const std::vector<std::string>& args);

// Parses "stdout", "none" or "file:PATH".
absl::StatusOr<SerialConfig> ParseSerialSpec(const std::string& spec);
// Parses a memory size: "512" (MiB), "512M", "2G".
absl::StatusOr<uint64_t> ParseMemoryMib(const std::string& spec);

std::string VmmUsage();

}  // namespace microvmm

#endif  // MICROVMM_VMM_CLI_H_
