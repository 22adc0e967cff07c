// vmmctl: command-line client of the VMM control API (service microvmm.Vmm).
// The parsing and formatting live here so they can be unit tested; vmmctl.cc only calls Run().
#ifndef MICROVMM_API_VMMCTL_LIB_H_
#define MICROVMM_API_VMMCTL_LIB_H_

#include <iosfwd>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"
#include "proto/vm_config.pb.h"
#include "proto/vmm.pb.h"

namespace microvmm::vmmctl {

enum class Command { kCreate, kBoot, kPause, kResume, kShutdown, kInfo };

// "create", "boot", ... -> Command; nullopt for anything else.
std::optional<Command> CommandFromName(absl::string_view name);
const char* CommandName(Command command);

// Defaults of `vmmctl create` (the API itself has none for these).
inline constexpr uint32_t kDefaultVcpus = 1;
inline constexpr uint64_t kDefaultMemoryMib = 128;
inline constexpr absl::Duration kDefaultTimeout = absl::Seconds(10);

struct Options {
  std::string socket;                        // --socket (required unless help)
  absl::Duration timeout = kDefaultTimeout;  // --timeout
  std::optional<Command> command;            // nullopt only when help is set
  bool help = false;                         // --help / -h / `help [command]`
  bool json = false;                         // info --json
  VmConfig config;                           // create flags (vcpus/memory defaulted)
};

// Parses the arguments after argv[0]. Global flags (--socket, --timeout, --help) may appear
// before or after the command; command flags only after it. Flags are `--name value` or
// `--name=value`. Unknown flags, unknown commands, stray arguments, missing or malformed values
// and repeated flags are INVALID_ARGUMENT errors with a one-line message.
absl::StatusOr<Options> ParseArgs(const std::vector<std::string>& args);

// --serial: "stdout", "none" or "file:PATH" (PATH non-empty).
absl::StatusOr<SerialConfig> ParseSerial(absl::string_view value);

// --timeout: seconds ("10", "2.5") or an absl duration ("500ms", "1m").  Must be > 0.
absl::StatusOr<absl::Duration> ParseTimeout(absl::string_view value);

// The request for `create`: `config` with relative file paths (kernel, initrd, serial file,
// test guest given as a path, i.e. containing '/') made absolute against `cwd`, since the VMM
// process resolves them against its own working directory.
CreateVmRequest BuildCreateVmRequest(const VmConfig& config, absl::string_view cwd);

// Help texts (every flag documented). Empty command: the general help.
std::string GeneralHelp();
std::string CommandHelp(Command command);

// Human-readable VmInfo (one "key: value" per line) and its JSON form.
std::string FormatVmInfo(const VmInfo& info);
std::string FormatVmInfoJson(const VmInfo& info);

// One line (no trailing newline): "vmmctl: <CODE>: <message>", with a hint naming `socket` when
// the VMM could not be reached.
std::string FormatRpcError(const grpc::Status& status, absl::string_view socket,
                           absl::Duration timeout);

// Runs vmmctl: returns the process exit status (0 ok, 1 RPC error, 2 usage error).
int Run(const std::vector<std::string>& args, std::ostream& out, std::ostream& err);

}  // namespace microvmm::vmmctl

#endif  // MICROVMM_API_VMMCTL_LIB_H_
