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

enum class Command {
  kCreate,
  kBoot,
  kPause,
  kResume,
  kShutdown,
  kInfo,
  kMigrate,
  kMigrateCancel,
  kMigratePostcopy,
  kMigrateStatus,
  kReceive,
  kBalloon,
  kBalloonStats,
  kMigrateRecover,
  kAttach,
};

// "create", "boot", ..., "migrate-status", "receive" -> Command; nullopt for anything else.
std::optional<Command> CommandFromName(absl::string_view name);
const char* CommandName(Command command);

// Defaults of `vmmctl create` (the API itself has none for these).
inline constexpr uint32_t kDefaultVcpus = 1;
inline constexpr uint64_t kDefaultMemoryMib = 128;
inline constexpr absl::Duration kDefaultTimeout = absl::Seconds(10);
// Guest page size, to turn MigrationProgress page counts into bytes.
inline constexpr uint64_t kMigrationPageSize = 4096;

struct Options {
  std::string socket;                        // --socket (required unless help)
  absl::Duration timeout = kDefaultTimeout;  // --timeout
  std::string tls_cert, tls_key, tls_ca;     // --tls-cert/--tls-key/--tls-ca (TCP API with mTLS)
  std::optional<Command> command;            // nullopt only when help is set
  bool help = false;                         // --help / -h / `help [command]`
  bool json = false;                         // info / migrate / migrate-status --json
  VmConfig config;                           // create flags (vcpus/memory defaulted)
  // migrate flags, as given (destination not yet made absolute; 0 = the VMM's default).
  StartMigrationRequest migration;
  bool no_wait = false;             // migrate --no-wait
  ReceiveMigrationRequest receive;  // receive flags, as given
  std::optional<uint64_t> balloon_target_mib;  // balloon --target
  AttachDeviceRequest attach;  // attach --vfio-user/--vfio (socket not yet made absolute)
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

// --bandwidth: bytes per second, optionally with a binary suffix K, M or G (case-insensitive):
// "1048576", "512K", "64M", "1G". 0 means unlimited.
absl::StatusOr<uint64_t> ParseBandwidth(absl::string_view value);

// A unix socket address given with a relative path ("dst.sock", "./run/d.sock", "unix:d.sock")
// made absolute against `cwd` (the VMM resolves it in its own working directory). Absolute
// paths, unix-abstract: names and host:port addresses are returned unchanged.
std::string AbsoluteAddress(absl::string_view address, absl::string_view cwd);

// The request for `attach`: the parsed device with its socket path made absolute against `cwd`.
AttachDeviceRequest BuildAttachDeviceRequest(const AttachDeviceRequest& flags,
                                             absl::string_view cwd);

// The requests for `migrate` and `receive`: the parsed flags with addresses (and the receive
// serial file) made absolute against `cwd`.
StartMigrationRequest BuildStartMigrationRequest(const StartMigrationRequest& flags,
                                                 absl::string_view cwd);
ReceiveMigrationRequest BuildReceiveMigrationRequest(const ReceiveMigrationRequest& flags,
                                                     absl::string_view cwd);

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
std::string FormatBalloonStatus(const BalloonStatus& status);

// "PRECOPY", "COMPLETED", ... (the MigrationPhase name without MIGRATION_).
std::string MigrationPhaseName(MigrationPhase phase);
// COMPLETED, FAILED or CANCELLED: the last message of WatchMigration.
bool IsTerminalMigrationPhase(MigrationPhase phase);

// One progress line (no newline, no terminal control codes, ASCII only): elapsed time, phase,
// iteration, a bar (first pass: share of RAM sent; later: share of RAM still dirty), MiB sent,
// bandwidth, dirty pages/s and expected downtime. `migrate` redraws it with '\r' on a TTY and
// prints one per update otherwise.
// One adaptive-policy decision as printed by `migrate` ("policy: pass N: ACTION step ...").
std::string FormatPolicyDecision(const PolicyDecision& decision);
std::string FormatMigrationProgressLine(const MigrationProgress& progress);

// Multi-line "key: value" summary of a migration (what `migrate` prints at the end and
// `migrate-status` prints): phase, error, total time, downtime with both timestamps, bytes /
// pages / zero pages sent, iterations, dirty tracking mode; plus the live rates while running.
std::string FormatMigrationSummary(const MigrationProgress& progress);
// The MigrationProgress as JSON (proto field names, every field printed).
std::string FormatMigrationProgressJson(const MigrationProgress& progress);

// One line (no trailing newline): "vmmctl: <CODE>: <message>", with a hint naming `socket` when
// the VMM could not be reached.
std::string FormatRpcError(const grpc::Status& status, absl::string_view socket,
                           absl::Duration timeout);

// Runs vmmctl: returns the process exit status (0 ok, 1 RPC error or a migration that did not
// complete, 2 usage error). `out_is_tty`: `out` is the terminal's stdout, so `migrate` redraws
// one progress line in place (else it prints one line per progress update).
int Run(const std::vector<std::string>& args, std::ostream& out, std::ostream& err,
        bool out_is_tty = false);

}  // namespace microvmm::vmmctl

#endif  // MICROVMM_API_VMMCTL_LIB_H_
