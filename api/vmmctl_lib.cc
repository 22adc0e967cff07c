#include "api/vmmctl_lib.h"

#include <sys/ioctl.h>
#include <unistd.h>

#include <chrono>
#include <algorithm>
#include <climits>
#include <cmath>
#include <ostream>
#include <map>
#include <set>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "api/address.h"
#include "api/tls.h"
#include "google/protobuf/util/json_util.h"
#include "proto/vmm.grpc.pb.h"
#include "vmm/device_spec.h"

namespace microvmm::vmmctl {

namespace {

// attach takes one device (AttachDeviceRequest.device is a oneof).
constexpr char kOneAttachDevice[] = "give one of --vfio-user and --vfio (one device per attach)";

constexpr struct {
  Command command;
  const char* name;
} kCommands[] = {
    {Command::kCreate, "create"},
    {Command::kBoot, "boot"},
    {Command::kPause, "pause"},
    {Command::kResume, "resume"},
    {Command::kShutdown, "shutdown"},
    {Command::kInfo, "info"},
    {Command::kMigrate, "migrate"},
    {Command::kMigrateCancel, "migrate-cancel"},
    {Command::kMigratePostcopy, "migrate-postcopy"},
    {Command::kMigrateStatus, "migrate-status"},
    {Command::kReceive, "receive"},
    {Command::kBalloon, "balloon"},
    {Command::kBalloonStats, "balloon-stats"},
    {Command::kMigrateRecover, "migrate-recover"},
    {Command::kAttach, "attach"},
};

// "create, boot, ..., receive" for error messages.
std::string CommandList() {
  std::vector<std::string> names;
  for (const auto& c : kCommands) names.push_back(c.name);
  return absl::StrJoin(names, ", ");
}

absl::Status UsageError(absl::string_view message) { return absl::InvalidArgumentError(message); }

// Parses a decimal unsigned integer: digits only, no sign, no spaces, no overflow.
bool ParseUnsigned(absl::string_view text, uint64_t max, uint64_t* out) {
  if (text.empty() || text.size() > 20) return false;
  uint64_t value = 0;
  for (char c : text) {
    if (c < '0' || c > '9') return false;
    const uint64_t digit = c - '0';
    if (value > (max - digit) / 10) return false;
    value = value * 10 + digit;
  }
  *out = value;
  return true;
}

bool IsGlobalFlag(absl::string_view name) {
  return name == "--socket" || name == "--timeout" || name == "--tls-cert" ||
         name == "--tls-key" || name == "--tls-ca";
}

// Flags each command takes (besides the global ones); `true` = takes a value.
std::vector<std::pair<absl::string_view, bool>> CommandFlags(Command command) {
  switch (command) {
    case Command::kCreate:
      return {{"--kernel", true},     {"--initrd", true},         {"--cmdline", true},
              {"--vcpus", true},      {"--memory", true},         {"--serial", true},
              {"--test-guest", true}, {"--test-guest-args", true}, {"--rng", false},
              {"--disk", true},       {"--net", true},            {"--balloon", true},
              {"--vsock", true},      {"--vfio-user", true},      {"--vfio", true}};
    case Command::kInfo:
    case Command::kMigrateStatus:
      return {{"--json", false}};
    case Command::kMigrate:
      return {{"--to", true},      {"--downtime-ms", true},    {"--bandwidth", true},
              {"--streams", true}, {"--max-iterations", true}, {"--no-wait", false},
              {"--postcopy", false}, {"--postcopy-after", true},
              {"--adaptive", false}, {"--profile", true}, {"--ladder", true},
              {"--allow-postcopy", false}, {"--json", false}};
    case Command::kMigrateRecover:
      return {{"--to", true}};
    case Command::kReceive:
      return {{"--listen", true}, {"--serial", true}, {"--disk", true}, {"--net", true},
              {"--vsock", true}};
    case Command::kBalloon:
      return {{"--target", true}};
    case Command::kBalloonStats:
      return {{"--json", false}};
    case Command::kAttach:
      return {{"--vfio-user", true}, {"--vfio", true}};
    default:
      return {};
  }
}

std::string HelpHint(const std::optional<Command>& command) {
  if (command.has_value())
    return absl::StrCat(" (see 'vmmctl ", CommandName(*command), " --help')");
  return " (see 'vmmctl --help')";
}

std::string Absolute(absl::string_view path, absl::string_view cwd) {
  if (path.empty() || path.front() == '/' || cwd.empty()) return std::string(path);
  absl::string_view rel = path;
  while (absl::StartsWith(rel, "./")) rel.remove_prefix(2);
  if (cwd.back() == '/') return absl::StrCat(cwd, rel);
  return absl::StrCat(cwd, "/", rel);
}

// A uint32 flag value >= `min`; `what` completes "expected a whole number of ...".
absl::Status ParseUint32Flag(absl::string_view name, absl::string_view value, uint32_t min,
                             absl::string_view what, uint32_t* out) {
  uint64_t number = 0;
  if (!ParseUnsigned(value, UINT32_MAX, &number) || number < min) {
    return UsageError(absl::StrCat("bad ", name, " value '", value, "': expected ", what));
  }
  *out = static_cast<uint32_t>(number);
  return absl::OkStatus();
}

// An API address flag (--to, --listen): non-empty and well formed.
absl::Status CheckAddressFlag(absl::string_view name, absl::string_view value) {
  if (value.empty()) return UsageError(absl::StrCat("flag ", name, " needs a non-empty value"));
  absl::StatusOr<ApiAddress> address = ParseApiAddress(value);
  if (!address.ok()) {
    return UsageError(
        absl::StrCat("bad ", name, " value '", value, "': ", address.status().message()));
  }
  return absl::OkStatus();
}

std::string FormatJson(const google::protobuf::Message& message) {
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = true;
  options.always_print_primitive_fields = true;
  options.preserve_proto_field_names = true;
  std::string json;
  if (!google::protobuf::util::MessageToJsonString(message, &json, options).ok()) {
    return "{}\n";
  }
  if (json.empty() || json.back() != '\n') json += '\n';
  return json;
}

double Mib(uint64_t bytes) { return static_cast<double>(bytes) / (1024.0 * 1024.0); }

// "2024-05-01 12:00:00.123456789 UTC".
std::string FormatUnixNanos(int64_t ns) {
  return absl::FormatTime("%Y-%m-%d %H:%M:%E9S UTC", absl::FromUnixNanos(ns), absl::UTCTimeZone());
}

std::string Cwd() {
  std::string cwd;
  if (char* dir = getcwd(nullptr, 0); dir != nullptr) {
    cwd = dir;
    free(dir);
  }
  return cwd;
}

std::string SerialText(const SerialConfig& serial) {
  switch (serial.mode()) {
    case SerialConfig::STDOUT:
      return "stdout (of the VMM process)";
    case SerialConfig::FILE:
      return absl::StrCat("file ", serial.path());
    case SerialConfig::NONE:
      return "none";
    default:
      return "default (stdout)";
  }
}

}  // namespace

std::optional<Command> CommandFromName(absl::string_view name) {
  for (const auto& c : kCommands) {
    if (name == c.name) return c.command;
  }
  return std::nullopt;
}

const char* CommandName(Command command) {
  for (const auto& c : kCommands) {
    if (command == c.command) return c.name;
  }
  return "?";
}

absl::StatusOr<SerialConfig> ParseSerial(absl::string_view value) {
  SerialConfig serial;
  if (value == "stdout") {
    serial.set_mode(SerialConfig::STDOUT);
  } else if (value == "none") {
    serial.set_mode(SerialConfig::NONE);
  } else if (absl::StartsWith(value, "file:")) {
    absl::string_view path = value.substr(5);
    if (path.empty()) return UsageError("--serial file: needs a path (--serial file:PATH)");
    serial.set_mode(SerialConfig::FILE);
    serial.set_path(std::string(path));
  } else {
    return UsageError(
        absl::StrCat("bad --serial value '", value, "': expected stdout, none or file:PATH"));
  }
  return serial;
}

absl::StatusOr<absl::Duration> ParseTimeout(absl::string_view value) {
  absl::Duration timeout;
  double seconds = 0;
  bool ok = false;
  if (!value.empty() && (absl::ascii_isdigit(value.back()) || value.back() == '.')) {
    ok = absl::SimpleAtod(value, &seconds) && seconds == seconds;  // not NaN
    if (ok) timeout = absl::Seconds(seconds);
  } else {
    ok = absl::ParseDuration(value, &timeout);
  }
  if (!ok || timeout <= absl::ZeroDuration() || timeout == absl::InfiniteDuration()) {
    return UsageError(absl::StrCat("bad --timeout value '", value,
                                   "': expected a positive number of seconds or a duration "
                                   "like 500ms"));
  }
  return timeout;
}

absl::StatusOr<Options> ParseArgs(const std::vector<std::string>& args) {
  Options options;
  std::set<std::string, std::less<>> seen;
  bool vcpus_set = false;
  bool memory_set = false;

  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    if (arg.empty()) return UsageError("empty argument" + HelpHint(options.command));
    if (arg.front() != '-') {
      if (options.command.has_value()) {
        return UsageError(absl::StrCat("unexpected argument '", arg, "' after command '",
                                       CommandName(*options.command), "'",
                                       HelpHint(options.command)));
      }
      if (arg == "help" && !options.help) {
        options.help = true;  // `vmmctl help [command]`
        continue;
      }
      std::optional<Command> command = CommandFromName(arg);
      if (!command.has_value()) {
        return UsageError(absl::StrCat("unknown command '", arg, "' (commands: ", CommandList(),
                                       "; see 'vmmctl --help')"));
      }
      options.command = command;
      continue;
    }

    // A flag: --name, --name=value or --name value.
    std::string name = arg;
    std::optional<std::string> value;
    if (const size_t eq = arg.find('='); eq != std::string::npos) {
      name = arg.substr(0, eq);
      value = arg.substr(eq + 1);
    }
    if (name == "-h") name = "--help";
    if (name == "--help") {
      if (value.has_value()) return UsageError("flag --help takes no value");
      options.help = true;
      continue;
    }

    bool takes_value = false;
    bool known = IsGlobalFlag(name);
    if (known) {
      takes_value = true;
    } else if (options.command.has_value()) {
      for (const auto& [flag, needs_value] : CommandFlags(*options.command)) {
        if (name == flag) {
          known = true;
          takes_value = needs_value;
        }
      }
    }
    if (!known) {
      if (!options.command.has_value()) {
        for (const auto& c : kCommands) {
          for (const auto& [flag, unused] : CommandFlags(c.command)) {
            if (name == flag) {
              return UsageError(absl::StrCat("flag ", name, " belongs after the command (",
                                             "vmmctl --socket PATH ", c.name, " ", name, " ...)"));
            }
          }
        }
        return UsageError(absl::StrCat("unknown flag '", name, "'", HelpHint(options.command)));
      }
      return UsageError(absl::StrCat("unknown flag '", name, "' for command '",
                                     CommandName(*options.command), "'",
                                     HelpHint(options.command)));
    }
    if (!seen.insert(name).second && name != "--disk" && name != "--net")
      return UsageError(absl::StrCat("flag ", name, " given twice"));

    if (!takes_value) {
      if (value.has_value()) return UsageError(absl::StrCat("flag ", name, " takes no value"));
    } else if (!value.has_value()) {
      if (i + 1 >= args.size()) return UsageError(absl::StrCat("flag ", name, " needs a value"));
      value = args[++i];
    }

    if (name == "--socket") {
      if (value->empty()) return UsageError("--socket needs a non-empty path");
      options.socket = *value;
    } else if (name == "--tls-cert" || name == "--tls-key" || name == "--tls-ca") {
      if (value->empty()) return UsageError(absl::StrCat("flag ", name, " needs a file"));
      (name == "--tls-cert" ? options.tls_cert
                            : name == "--tls-key" ? options.tls_key : options.tls_ca) = *value;
    } else if (name == "--timeout") {
      absl::StatusOr<absl::Duration> timeout = ParseTimeout(*value);
      if (!timeout.ok()) return timeout.status();
      options.timeout = *timeout;
    } else if (name == "--json") {
      options.json = true;
    } else if (name == "--kernel" || name == "--initrd" || name == "--test-guest") {
      if (value->empty())
        return UsageError(absl::StrCat("flag ", name, " needs a non-empty value"));
      if (name == "--kernel") options.config.set_kernel(*value);
      if (name == "--initrd") options.config.set_initrd(*value);
      if (name == "--test-guest") options.config.set_test_guest(*value);
    } else if (name == "--cmdline") {
      options.config.set_cmdline(*value);
    } else if (name == "--test-guest-args") {
      options.config.set_test_guest_args(*value);
    } else if (name == "--vcpus") {
      uint64_t vcpus = 0;
      if (!ParseUnsigned(*value, UINT32_MAX, &vcpus)) {
        return UsageError(
            absl::StrCat("bad --vcpus value '", *value, "': expected a whole number of vCPUs"));
      }
      options.config.set_vcpus(static_cast<uint32_t>(vcpus));
      vcpus_set = true;
    } else if (name == "--memory") {
      // Like the vmm command line: MiB, or a size with an M or G suffix.
      absl::string_view number = *value;
      uint64_t multiplier = 1;
      if (!number.empty() && (number.back() == 'M' || number.back() == 'm')) {
        number.remove_suffix(1);
      } else if (!number.empty() && (number.back() == 'G' || number.back() == 'g')) {
        number.remove_suffix(1);
        multiplier = 1024;
      }
      uint64_t mib = 0;
      if (!ParseUnsigned(number, UINT64_MAX / multiplier, &mib)) {
        return UsageError(absl::StrCat("bad --memory value '", *value,
                                       "': expected MiB or a size like 512M / 2G"));
      }
      mib *= multiplier;
      options.config.set_memory_mib(mib);
      memory_set = true;
    } else if (name == "--serial") {
      absl::StatusOr<SerialConfig> serial = ParseSerial(*value);
      if (!serial.ok()) return serial.status();
      if (*options.command == Command::kReceive) {
        *options.receive.mutable_serial() = *serial;
      } else {
        *options.config.mutable_serial() = *serial;
      }
    } else if (name == "--to") {
      if (absl::Status s = CheckAddressFlag(name, *value); !s.ok()) return s;
      options.migration.set_destination(*value);
    } else if (name == "--listen") {
      if (absl::Status s = CheckAddressFlag(name, *value); !s.ok()) return s;
      options.receive.set_listen_address(*value);
    } else if (name == "--downtime-ms") {
      uint32_t ms = 0;
      if (absl::Status s =
              ParseUint32Flag(name, *value, 1, "a whole number of milliseconds >= 1", &ms);
          !s.ok()) {
        return s;
      }
      options.migration.set_downtime_limit_ms(ms);
    } else if (name == "--streams") {
      uint32_t streams = 0;
      if (absl::Status s =
              ParseUint32Flag(name, *value, 1, "a whole number of streams >= 1", &streams);
          !s.ok()) {
        return s;
      }
      options.migration.set_streams(streams);
    } else if (name == "--postcopy") {
      options.migration.set_mode(StartMigrationRequest::POSTCOPY);
    } else if (name == "--adaptive") {
      options.migration.mutable_policy();
    } else if (name == "--profile") {
      if (*value == "default") {
        options.migration.mutable_policy()->set_profile(PolicyConfig::PROFILE_DEFAULT);
      } else if (*value == "latency") {
        options.migration.mutable_policy()->set_profile(PolicyConfig::PROFILE_LATENCY_SENSITIVE);
      } else {
        return UsageError(absl::StrCat("bad --profile value '", *value,
                                       "': expected 'default' or 'latency'"));
      }
    } else if (name == "--ladder") {
      PolicyConfig* policy = options.migration.mutable_policy();
      policy->clear_ladder();
      for (absl::string_view step : absl::StrSplit(*value, ',')) {
        if (step == "compress") {
          policy->add_ladder(STEP_COMPRESS);
        } else if (step == "delta") {
          policy->add_ladder(STEP_DELTA);
        } else if (step == "throttle") {
          policy->add_ladder(STEP_THROTTLE);
        } else if (step == "postcopy") {
          policy->add_ladder(STEP_POSTCOPY);
        } else {
          return UsageError(absl::StrCat("bad --ladder step '", step,
                                         "': expected compress, delta, throttle or postcopy "
                                         "separated by commas"));
        }
      }
    } else if (name == "--allow-postcopy") {
      options.migration.mutable_policy()->set_allow_postcopy(true);
    } else if (name == "--postcopy-after") {
      uint32_t n = 0;
      if (absl::Status s = ParseUint32Flag(name, *value, 1, "a whole number of passes >= 1", &n);
          !s.ok()) {
        return s;
      }
      options.migration.set_postcopy_after_iterations(n);
    } else if (name == "--max-iterations") {
      uint32_t iterations = 0;
      if (absl::Status s = ParseUint32Flag(
              name, *value, 0, "a whole number of iterations (0: unlimited)", &iterations);
          !s.ok()) {
        return s;
      }
      options.migration.set_max_iterations(iterations);
    } else if (name == "--bandwidth") {
      absl::StatusOr<uint64_t> bandwidth = ParseBandwidth(*value);
      if (!bandwidth.ok()) return bandwidth.status();
      options.migration.set_bandwidth_limit_bytes_per_s(*bandwidth);
    } else if (name == "--target") {
      absl::StatusOr<uint64_t> mib = ParseSizeMib(*value, "--target");
      if (!mib.ok()) return UsageError(std::string(mib.status().message()));
      options.balloon_target_mib = *mib;
    } else if (name == "--rng") {
      options.config.set_rng(true);
    } else if (name == "--disk") {
      absl::StatusOr<DiskConfig> d = ParseDiskSpec(*value);
      if (!d.ok()) return UsageError(std::string(d.status().message()));
      if (*options.command == Command::kReceive) {
        *options.receive.add_disks() = *d;
      } else {
        *options.config.add_disks() = *d;
      }
    } else if (name == "--net") {
      absl::StatusOr<NetConfig> n = ParseNetSpec(*value);
      if (!n.ok()) return UsageError(std::string(n.status().message()));
      if (*options.command == Command::kReceive) {
        *options.receive.add_nets() = *n;
      } else {
        *options.config.add_nets() = *n;
      }
    } else if (name == "--balloon") {
      absl::StatusOr<BalloonConfig> b = ParseBalloonSpec(*value);
      if (!b.ok()) return UsageError(std::string(b.status().message()));
      *options.config.mutable_balloon() = *b;
    } else if (name == "--vsock") {
      absl::StatusOr<VsockConfig> v = ParseVsockSpec(*value);
      if (!v.ok()) return UsageError(std::string(v.status().message()));
      if (*options.command == Command::kReceive) {
        *options.receive.mutable_vsock() = *v;
      } else {
        *options.config.mutable_vsock() = *v;
      }
    } else if (name == "--vfio-user") {
      absl::StatusOr<VfioUserConfig> v = ParseVfioUserSpec(*value);
      if (!v.ok()) return UsageError(std::string(v.status().message()));
      if (*options.command == Command::kAttach) {
        if (options.attach.has_vfio()) return UsageError(kOneAttachDevice);
        *options.attach.mutable_vfio_user() = *v;
      } else {
        *options.config.add_vfio_user() = *v;
      }
    } else if (name == "--vfio") {
      // Not made absolute: a sysfs path is absolute already, a bare "DDDD:BB:DD.F" is no file.
      absl::StatusOr<VfioConfig> v = ParseVfioSpec(*value);
      if (!v.ok()) return UsageError(std::string(v.status().message()));
      if (*options.command == Command::kAttach) {
        if (options.attach.has_vfio_user()) return UsageError(kOneAttachDevice);
        *options.attach.mutable_vfio() = *v;
      } else {
        *options.config.add_vfio() = *v;
      }
    } else if (name == "--no-wait") {
      options.no_wait = true;
    }
  }

  if (options.help) return options;
  if (!options.command.has_value()) {
    return UsageError(absl::StrCat("missing command (", CommandList(), "; see 'vmmctl --help')"));
  }
  if (options.socket.empty()) {
    return UsageError(
        absl::StrCat("missing --socket PATH (the VMM's --api-socket)", HelpHint(options.command)));
  }
  if (*options.command == Command::kCreate) {
    if (!vcpus_set) options.config.set_vcpus(kDefaultVcpus);
    if (!memory_set) options.config.set_memory_mib(kDefaultMemoryMib);
  }
  if (*options.command == Command::kAttach &&
      options.attach.device_case() == AttachDeviceRequest::DEVICE_NOT_SET) {
    return UsageError(absl::StrCat(
        "missing --vfio-user SOCKET or --vfio PATH (the device to attach)",
        HelpHint(options.command)));
  }
  if (*options.command == Command::kBalloon && !options.balloon_target_mib.has_value()) {
    return UsageError(absl::StrCat("missing --target SIZE", HelpHint(options.command)));
  }
  if ((*options.command == Command::kMigrate || *options.command == Command::kMigrateRecover) &&
      options.migration.destination().empty()) {
    return UsageError(absl::StrCat("missing --to ADDR (the destination VMM's --incoming address)",
                                   HelpHint(options.command)));
  }
  if (*options.command == Command::kReceive && options.receive.listen_address().empty()) {
    return UsageError(absl::StrCat("missing --listen ADDR (where to wait for the migration)",
                                   HelpHint(options.command)));
  }
  return options;
}

absl::StatusOr<uint64_t> ParseBandwidth(absl::string_view value) {
  absl::string_view number = value;
  uint64_t multiplier = 1;
  if (!number.empty()) {
    switch (number.back()) {
      case 'K':
      case 'k':
        multiplier = uint64_t{1} << 10;
        break;
      case 'M':
      case 'm':
        multiplier = uint64_t{1} << 20;
        break;
      case 'G':
      case 'g':
        multiplier = uint64_t{1} << 30;
        break;
      default:
        break;
    }
    if (multiplier != 1) number.remove_suffix(1);
  }
  uint64_t amount = 0;
  if (!ParseUnsigned(number, UINT64_MAX / multiplier, &amount)) {
    return UsageError(absl::StrCat("bad --bandwidth value '", value,
                                   "': expected bytes per second, optionally with a binary "
                                   "suffix K, M or G (64M = 64 MiB/s)"));
  }
  return amount * multiplier;
}

std::string AbsoluteAddress(absl::string_view address, absl::string_view cwd) {
  if (address.empty() || absl::StartsWith(address, "unix-abstract:")) return std::string(address);
  if (absl::StartsWith(address, "unix:")) {
    absl::string_view path = address.substr(5);
    if (path.empty() || path.front() == '/') return std::string(address);
    return absl::StrCat("unix:", Absolute(path, cwd));
  }
  if (address.front() == '.' || address.find(':') == absl::string_view::npos) {
    return Absolute(address, cwd);
  }
  return std::string(address);  // host:port, dns:, ipv4:, ipv6:
}

StartMigrationRequest BuildStartMigrationRequest(const StartMigrationRequest& flags,
                                                 absl::string_view cwd) {
  StartMigrationRequest request = flags;
  request.set_destination(AbsoluteAddress(flags.destination(), cwd));
  return request;
}

ReceiveMigrationRequest BuildReceiveMigrationRequest(const ReceiveMigrationRequest& flags,
                                                     absl::string_view cwd) {
  ReceiveMigrationRequest request = flags;
  request.set_listen_address(AbsoluteAddress(flags.listen_address(), cwd));
  for (DiskConfig& d : *request.mutable_disks()) d.set_path(Absolute(d.path(), cwd));
  if (request.has_vsock())
    request.mutable_vsock()->set_uds_path(Absolute(request.vsock().uds_path(), cwd));
  if (request.has_serial() && request.serial().mode() == SerialConfig::FILE) {
    request.mutable_serial()->set_path(Absolute(request.serial().path(), cwd));
  }
  return request;
}

AttachDeviceRequest BuildAttachDeviceRequest(const AttachDeviceRequest& flags,
                                             absl::string_view cwd) {
  AttachDeviceRequest request = flags;
  if (request.has_vfio_user())
    request.mutable_vfio_user()->set_socket(Absolute(request.vfio_user().socket(), cwd));
  return request;
}

CreateVmRequest BuildCreateVmRequest(const VmConfig& config, absl::string_view cwd) {
  CreateVmRequest request;
  VmConfig* c = request.mutable_config();
  *c = config;
  if (!c->kernel().empty()) c->set_kernel(Absolute(c->kernel(), cwd));
  if (!c->initrd().empty()) c->set_initrd(Absolute(c->initrd(), cwd));
  if (c->test_guest().find('/') != std::string::npos) {
    c->set_test_guest(Absolute(c->test_guest(), cwd));
  }
  if (c->has_serial() && c->serial().mode() == SerialConfig::FILE) {
    c->mutable_serial()->set_path(Absolute(c->serial().path(), cwd));
  }
  for (DiskConfig& d : *c->mutable_disks()) d.set_path(Absolute(d.path(), cwd));
  if (c->has_vsock()) c->mutable_vsock()->set_uds_path(Absolute(c->vsock().uds_path(), cwd));
  for (VfioUserConfig& v : *c->mutable_vfio_user()) v.set_socket(Absolute(v.socket(), cwd));
  return request;
}

std::string GeneralHelp() {
  return absl::StrCat(
      "vmmctl: control a microvmm VMM process through its gRPC API socket.\n"
      "\n"
      "usage: vmmctl --socket PATH [--timeout SECONDS] <command> [flags]\n"
      "       vmmctl --help | vmmctl <command> --help\n"
      "\n"
      "global flags (before or after the command):\n"
      "  --socket PATH       API socket of the VMM (its --api-socket). Also accepts\n"
      "                      unix:PATH, unix-abstract:NAME or host:port. Required.\n"
      "  --timeout SECONDS   deadline of the call: seconds (10, 2.5) or a duration\n"
      "                      (500ms, 1m). Default 10.\n"
      "  --tls-cert PEM --tls-key PEM --tls-ca PEM\n"
      "                      mutual TLS for a TCP API (the VMM's --tls-* files): all\n"
      "                      three together.\n"
      "  --help, -h          show help (of a command after it) and exit.\n"
      "\n"
      "commands:\n"
      "  create            build the VM from a configuration (nothing runs yet)\n"
      "  boot              start the vCPUs of a created VM\n"
      "  pause             stop every vCPU of a running VM\n"
      "  resume            restart the vCPUs of a paused VM\n"
      "  shutdown          stop the VM for good; the VMM process then exits\n"
      "  info              show the VM state, size, uptime, exit status and configuration\n"
      "  migrate           live-migrate the running VM to another VMM and follow it\n"
      "  migrate-postcopy  switch the running migration to post-copy\n"
      "  migrate-cancel    stop the running migration (the VM stays here)\n"
      "  migrate-status    show the progress or outcome of the last migration\n"
      "  migrate-recover   continue a post-copy whose connections broke (POSTCOPY_PAUSED)\n"
      "  receive           make a VMM without a VM wait for an incoming migration\n"
      "  balloon           set the virtio-balloon target (memory taken from the guest)\n"
      "  balloon-stats     show the balloon and the guest's memory statistics\n"
      "  attach            hot-plug a device into the VM (PCI hotplug)\n"
      "\n",
      CommandHelp(Command::kCreate), "\n", CommandHelp(Command::kInfo), "\n",
      CommandHelp(Command::kMigrate), "\n", CommandHelp(Command::kMigratePostcopy), "\n",
      CommandHelp(Command::kMigrateCancel), "\n",
      CommandHelp(Command::kMigrateStatus), "\n", CommandHelp(Command::kMigrateRecover), "\n",
      CommandHelp(Command::kReceive), "\n", CommandHelp(Command::kAttach),
      "\n"
      "exit status: 0 success, 1 the call failed (printed as 'vmmctl: CODE: message') or the\n"
      "migration did not complete, 2 bad command line.\n");
}

std::string CommandHelp(Command command) {
  switch (command) {
    case Command::kCreate:
      return absl::StrCat(
          "vmmctl --socket PATH create [flags]: build the VM (CreateVm). Give exactly one of\n"
          "--kernel or --test-guest. Relative paths are made absolute here (the VMM resolves\n"
          "paths in its own working directory).\n"
          "  --kernel PATH           Linux kernel: bzImage or PVH ELF vmlinux\n"
          "  --initrd PATH           initial ramdisk (with --kernel)\n"
          "  --cmdline STRING        kernel command line (default chosen by the VMM)\n"
          "  --vcpus N               number of vCPUs (default ",
          kDefaultVcpus,
          ")\n"
          "  --memory SIZE           guest RAM: MiB, or with suffix M/G (512M, 2G) (default ",
          kDefaultMemoryMib,
          ")\n"
          "  --serial MODE           guest serial console: stdout (the VMM's stdout, the\n"
          "                          default), file:PATH (append to PATH) or none\n"
          "  --test-guest NAME|PATH  built-in test guest (hello, smp, memwalk, fault) or a path\n"
          "                          to a flat binary linked at 0x100000\n"
          "  --test-guest-args STR   argument string passed to the test guest\n"
          "\n",
          DeviceFlagsHelp());
    case Command::kBoot:
      return "vmmctl --socket PATH boot: start the vCPUs of a created VM (Boot). No flags.\n";
    case Command::kPause:
      return "vmmctl --socket PATH pause: stop every vCPU of a running VM (Pause). No flags.\n";
    case Command::kResume:
      return "vmmctl --socket PATH resume: restart a paused VM (Resume). No flags.\n";
    case Command::kShutdown:
      return "vmmctl --socket PATH shutdown: stop the VM for good (Shutdown); the VMM process\n"
             "exits with the VM's exit status after replying. No flags.\n";
    case Command::kInfo:
      return "vmmctl --socket PATH info [--json]: show the VM (GetInfo).\n"
             "  --json                  print the VmInfo message as JSON (proto field names)\n";
    case Command::kMigrate:
      return "vmmctl --socket PATH migrate --to ADDR [flags]: live-migrate the running VM to the\n"
             "VMM listening on ADDR (started with 'vmm --incoming ADDR', or after 'vmmctl\n"
             "receive'), then follow it until it ends (StartMigration, WatchMigration). On a\n"
             "terminal one progress line is redrawn (phase, iteration, a bar of the RAM sent in\n"
             "the first pass / still dirty afterwards, MiB sent, MiB/s, dirty pages/s, expected\n"
             "downtime); otherwise one line is printed per progress update. At the end a summary\n"
             "(phase, total time, downtime with the pause and resume times, bytes / pages / zero\n"
             "pages sent, iterations, dirty tracking) is printed. Exit status 0 only if the\n"
             "migration COMPLETED (the source VMM then exits); 1 if it failed or was cancelled\n"
             "(the VM keeps running here). Following it has no deadline (--timeout applies to\n"
             "starting it only); interrupting vmmctl does not stop the migration: use\n"
             "migrate-cancel.\n"
             "  --to ADDR               destination: socket path, unix:PATH or HOST:PORT (a\n"
             "                          relative path is made absolute here). Required.\n"
             "  --downtime-ms N         longest acceptable pause of the guest in ms (default of\n"
             "                          the VMM: 300); pre-copy iterates until it fits\n"
             "  --bandwidth RATE        bandwidth limit in bytes/s, with an optional binary\n"
             "                          suffix K, M or G (64M = 64 MiB/s; 0 = unlimited, the\n"
             "                          default; the VMM requires at least 64K)\n"
             "  --streams N             parallel page streams (default of the VMM: 2, max 16)\n"
             "  --max-iterations N      switch over after N pre-copy iterations even if the\n"
             "                          downtime limit is not met (default 0: unlimited)\n"
             "  --postcopy              pure post-copy: hand the VM over at once; the\n"
             "                          destination pulls pages on demand (per vCPU) while the\n"
             "                          rest is pushed\n"
             "  --postcopy-after N      pre-copy, then post-copy if not converged after N passes\n"
             "                          (also at any time: vmmctl migrate-postcopy)\n"
             "  --adaptive              adaptive pre-copy: a policy watches each pass (dirty\n"
             "                          rate, bandwidth, compressibility, idle cores, free\n"
             "                          memory) and, while it does not converge, climbs a\n"
             "                          ladder: compression, delta encoding, vCPU throttling\n"
             "                          (interrupts still delivered), post-copy. Every decision\n"
             "                          is printed with the numbers behind it. Implied by:\n"
             "  --profile P             default, or latency: never throttle the guest\n"
             "  --ladder LIST           the ladder's steps in order, comma-separated, from\n"
             "                          compress,delta,throttle,postcopy (default: all four)\n"
             "  --allow-postcopy        let the ladder end in post-copy (off by default: once\n"
             "                          switched, a lost link pauses the VM until recovered)\n"
             "  --no-wait               only start it: print the migration id and exit\n"
             "  --json                  print the final MigrationProgress as JSON (proto field\n"
             "                          names) instead of the summary, and no progress lines\n"
             "                          when not on a terminal (with --no-wait: the\n"
             "                          StartMigrationResponse)\n";
    case Command::kMigratePostcopy:
      return "vmmctl --socket PATH migrate-postcopy: switch the running pre-copy migration to\n"
             "post-copy now (StartPostcopy). No flags.\n";
    case Command::kMigrateCancel:
      return "vmmctl --socket PATH migrate-cancel: stop the running migration (CancelMigration).\n"
             "The VM keeps running on this VMM; a migration past the point of no return (the\n"
             "destination has everything) cannot be cancelled. No flags.\n";
    case Command::kMigrateRecover:
      return "vmmctl --socket PATH migrate-recover --to ADDR: a post-copy migration lost its\n"
             "connections (phase POSTCOPY_PAUSED; both copies of the VM are paused): reconnect\n"
             "to the same destination VMM at ADDR and continue (RecoverMigration); follow it\n"
             "with 'vmmctl migrate-status'.\n"
             "  --to ADDR               the destination's migration address (may be a new one)\n";
    case Command::kMigrateStatus:
      return "vmmctl --socket PATH migrate-status [--json]: show the current or last migration\n"
             "of this VMM (the first WatchMigration message), like the summary of 'migrate'\n"
             "plus the live rates while it runs. Exit status 0 whatever its phase.\n"
             "  --json                  print the MigrationProgress message as JSON (proto\n"
             "                          field names)\n";
    case Command::kAttach:
      return "vmmctl --socket PATH attach (--vfio-user SOCKET | --vfio PATH): hot-plug a PCI\n"
             "function into the VM (created, running or paused) through AttachDevice; prints\n"
             "its PCI address. The guest is told by an ACPI hotplug event (Linux: acpiphp).\n"
             "Refused while a migration runs, when the device is already attached or no slot\n"
             "is free. Hot-unplug/eject is not supported. Give exactly one of:\n"
             "  --vfio-user SOCKET      the vfio-user server's unix socket (a relative path is\n"
             "                          made absolute here)\n"
             "  --vfio PATH             a host PCI function bound to vfio-pci (kernel VFIO):\n"
             "                          /sys/bus/pci/devices/DDDD:BB:DD.F or DDDD:BB:DD.F.\n"
             "                          Refused for a VM with a virtio-balloon (the IOMMU pins\n"
             "                          guest RAM)\n";
    case Command::kBalloon:
      return "vmmctl --socket PATH balloon --target SIZE: ask the guest's balloon driver to\n"
             "give SIZE (MiB, or with suffix M/G) of its memory back to the host (SetBalloon);\n"
             "0 deflates it. The VM needs a balloon (create --balloon).\n";
    case Command::kBalloonStats:
      return "vmmctl --socket PATH balloon-stats [--json]: balloon target and actual size,\n"
             "bytes given back through free-page reporting and hinting, and the guest's last\n"
             "memory statistics (GetBalloonStats).\n"
             "  --json                  print the BalloonStatus message as JSON\n";
    case Command::kReceive:
      return "vmmctl --socket PATH receive --listen ADDR [--serial MODE]: make this VMM (which\n"
             "must have no VM) listen for one incoming migration (ReceiveMigration); returns\n"
             "once it listens. The VM arrives running; 'info' then shows it.\n"
             "  --listen ADDR           where to listen: socket path, unix:PATH or HOST:PORT (a\n"
             "                          relative path is made absolute here). Required.\n"
             "  --serial MODE           console of the arriving guest here: stdout (the VMM's\n"
             "                          stdout, the default), file:PATH (append) or none\n"
             "  --disk SPEC / --net SPEC / --vsock SPEC\n"
             "                          this host's backends for the arriving VM's disks, nets\n"
             "                          and vsock (as for create; as many as the VM has, same\n"
             "                          order; guest-visible settings come from the source)\n";
  }
  return "";
}

std::string FormatVmInfo(const VmInfo& info) {
  std::string out = absl::StrFormat("state:       %s\n", VmRunState_Name(info.state()));
  if (info.state() == NOT_CREATED) return out;
  absl::StrAppendFormat(&out, "vcpus:       %u\n", info.vcpus());
  absl::StrAppendFormat(&out, "memory:      %u MiB\n", info.memory_mib());
  absl::StrAppendFormat(&out, "uptime:      %.3f s\n", info.uptime_ms() / 1000.0);
  if (info.state() == EXITED) {
    absl::StrAppendFormat(&out, "exit status: %d\n", info.exit_status());
    absl::StrAppendFormat(&out, "exit reason: %s\n", info.exit_reason());
  }
  const VmConfig& c = info.config();
  if (!c.kernel().empty()) absl::StrAppendFormat(&out, "kernel:      %s\n", c.kernel());
  if (!c.initrd().empty()) absl::StrAppendFormat(&out, "initrd:      %s\n", c.initrd());
  if (!c.cmdline().empty()) absl::StrAppendFormat(&out, "cmdline:     %s\n", c.cmdline());
  if (!c.test_guest().empty()) {
    absl::StrAppendFormat(&out, "test guest:  %s\n", c.test_guest());
    if (!c.test_guest_args().empty()) {
      absl::StrAppendFormat(&out, "guest args:  %s\n", c.test_guest_args());
    }
  }
  absl::StrAppendFormat(&out, "serial:      %s\n", SerialText(c.serial()));
  if (!info.migration_note().empty())
    absl::StrAppendFormat(&out, "migration:   %s\n", info.migration_note());
  int vfio_user = 0, vfio = 0;
  for (const DeviceStatus& d : info.devices()) {
    if (d.kind() == "vfio-user") {  // not virtio: no status register or kicks
      const int i = vfio_user++;
      absl::StrAppendFormat(&out, "device:      vfio-user at %s (%s)\n", d.pci_address(),
                            i < c.vfio_user_size() ? c.vfio_user(i).socket() : "?");
      continue;
    }
    if (d.kind() == "vfio") {  // kernel VFIO passthrough
      const int i = vfio++;
      absl::StrAppendFormat(&out, "device:      vfio at %s (%s)\n", d.pci_address(),
                            i < c.vfio_size() ? c.vfio(i).sysfs_path() : "?");
      continue;
    }
    absl::StrAppendFormat(&out, "device:      virtio-%s at %s, status 0x%02x, kicks %u (%u trapped)\n",
                          d.kind(), d.pci_address(), d.device_status(),
                          d.kicks_ioeventfd() + d.kicks_trapped(), d.kicks_trapped());
  }
  return out;
}

std::string FormatBalloonStatus(const BalloonStatus& b) {
  std::string out = absl::StrFormat("target:      %u MiB\n", b.target_mib());
  absl::StrAppendFormat(&out, "actual:      %u MiB (guest-reported)\n", b.actual_mib());
  absl::StrAppendFormat(&out, "inflated:    %u MiB released on the host\n", b.inflated_mib());
  absl::StrAppendFormat(&out, "reported:    %u bytes (free-page reporting)\n", b.reported_bytes());
  absl::StrAppendFormat(&out, "hinted:      %u bytes (free-page hinting)\n", b.hinted_bytes());
  if (b.stats_age_ms() < 0) {
    out += "stats:       none yet\n";
  } else {
    absl::StrAppendFormat(&out, "stats:       %.1f s old\n", b.stats_age_ms() / 1000.0);
    std::map<std::string, uint64_t> sorted(b.stats().begin(), b.stats().end());
    for (const auto& [k, v] : sorted) absl::StrAppendFormat(&out, "  %-20s %u\n", k, v);
  }
  return out;
}

std::string FormatVmInfoJson(const VmInfo& info) { return FormatJson(info); }

std::string MigrationPhaseName(MigrationPhase phase) {
  const std::string& name = MigrationPhase_Name(phase);
  if (name.empty()) return absl::StrCat("PHASE_", static_cast<int>(phase));
  absl::string_view short_name = name;
  absl::ConsumePrefix(&short_name, "MIGRATION_");
  return std::string(short_name);
}

bool IsTerminalMigrationPhase(MigrationPhase phase) {
  // POSTCOPY_PAUSED is not final for the migration, but a watch ends there (it needs
  // 'vmmctl migrate-recover').
  return phase == MIGRATION_COMPLETED || phase == MIGRATION_FAILED ||
         phase == MIGRATION_CANCELLED || phase == MIGRATION_POSTCOPY_PAUSED;
}

std::string FormatPolicyDecision(const PolicyDecision& d) {
  std::string step(PolicyStep_Name(d.step()));
  if (absl::StartsWith(step, "STEP_")) step = step.substr(5);
  return absl::StrCat("policy: pass ", d.iteration(), ": ",
                      PolicyDecision::Action_Name(d.action()), " ", absl::AsciiStrToLower(step),
                      " (", PolicyTendency_Name(d.tendency()), "): ", d.reason());
}

std::string FormatMigrationProgressLine(const MigrationProgress& p) {
  constexpr int kBarWidth = 20;
  const MigrationPhase phase = p.phase();
  const bool first_pass =
      p.iteration() == 0 && !IsTerminalMigrationPhase(phase) && phase != MIGRATION_SWITCHOVER;
  const uint64_t ram_pages = p.ram_bytes() / kMigrationPageSize;
  // First pass: the share of RAM sent (rounded down). Later: the share of RAM still dirty,
  // i.e. left to send (rounded up, so that anything left shows).
  double fraction = 0;
  int filled = 0;
  int percent = 0;
  if (first_pass) {
    if (p.ram_bytes() > 0) {
      fraction = std::min(1.0, static_cast<double>(p.pages_sent() + p.hole_pages_not_sent()) *
                                   kMigrationPageSize /
                                   static_cast<double>(p.ram_bytes()));
    }
    filled = static_cast<int>(std::floor(fraction * kBarWidth));
    percent = static_cast<int>(std::floor(fraction * 100));
  } else {
    if (ram_pages > 0) {
      fraction = std::min(1.0, static_cast<double>(p.remaining_pages()) / ram_pages);
    }
    filled = static_cast<int>(std::ceil(fraction * kBarWidth));
    percent = static_cast<int>(std::ceil(fraction * 100));
  }
  const std::string bar = std::string(filled, '#') + std::string(kBarWidth - filled, '-');
  const std::string expected =
      p.bandwidth_bytes_per_s() == 0 ? "?" : absl::StrFormat("~%u ms", p.expected_downtime_ms());
  return absl::StrFormat(
      "%6.1fs %-10s iter %-2u [%s] %3d%% %s  %.1f MiB sent  %.1f MiB/s  %u dirty pages/s  "
      "expected downtime %s",
      p.elapsed_ms() / 1000.0, MigrationPhaseName(phase), p.iteration(), bar, percent,
      first_pass ? "sent" : "left", Mib(p.bytes_sent()), Mib(p.bandwidth_bytes_per_s()),
      p.dirty_pages_per_s(), expected);
}

std::string FormatMigrationSummary(const MigrationProgress& p) {
  std::string out;
  auto line = [&out](absl::string_view key, absl::string_view value) {
    absl::StrAppendFormat(&out, "%-21s%s\n", absl::StrCat(key, ":"), value);
  };
  const bool terminal = IsTerminalMigrationPhase(p.phase());
  line("phase", MigrationPhaseName(p.phase()));
  if (!p.error().empty()) {
    line("error", absl::StrReplaceAll(p.error(), {{"\r", ""}, {"\n", "; "}}));
  }
  if (!p.migration_id().empty()) line("migration id", p.migration_id());
  if (!p.destination().empty()) line("destination", p.destination());
  if (terminal) {
    const uint64_t total_ms = p.total_ms() != 0 ? p.total_ms() : p.elapsed_ms();
    line("total time", absl::StrFormat("%.3f s", total_ms / 1000.0));
  } else {
    line("elapsed", absl::StrFormat("%.3f s", p.elapsed_ms() / 1000.0));
  }
  if (p.phase() == MIGRATION_COMPLETED || p.source_pause_unix_ns() != 0) {
    line("downtime",
         absl::StrCat(p.downtime_ms(), " ms",
                      p.destination_resume_unix_ns() == 0 && p.source_pause_unix_ns() != 0
                          ? " (measured on the source: no resume time from the destination)"
                          : ""));
    line("source paused",
         p.source_pause_unix_ns() != 0 ? FormatUnixNanos(p.source_pause_unix_ns()) : "-");
    line("destination resumed", p.destination_resume_unix_ns() != 0
                                    ? FormatUnixNanos(p.destination_resume_unix_ns())
                                    : "-");
  }
  line("bytes sent", absl::StrFormat("%u (%.1f MiB)", p.bytes_sent(), Mib(p.bytes_sent())));
  line("pages sent", absl::StrCat(p.pages_sent()));
  line("zero pages", absl::StrCat(p.zero_pages()));
  if (p.hole_pages_not_sent() != 0)
    line("holes not sent", absl::StrFormat("%u pages (%.1f MiB: never touched, ballooned or "
                                           "reported free)",
                                           p.hole_pages_not_sent(),
                                           Mib(p.hole_pages_not_sent() * kMigrationPageSize)));
  if (p.free_page_hint_bytes() != 0 || p.free_page_skipped_bytes() != 0)
    line("free-page hints", absl::StrFormat("%.1f MiB hinted free, %.1f MiB not sent",
                                            Mib(p.free_page_hint_bytes()),
                                            Mib(p.free_page_skipped_bytes())));
  // `iteration` counts the pre-copy passes; the switchover sends the last pages in one more.
  line("iterations", p.phase() == MIGRATION_COMPLETED || p.phase() == MIGRATION_SWITCHOVER
                         ? absl::StrCat(p.iteration(), " pre-copy + switchover")
                         : absl::StrCat(p.iteration()));
  if (!terminal) {
    line("remaining pages", absl::StrCat(p.remaining_pages()));
    line("dirty rate", absl::StrCat(p.dirty_pages_per_s(), " pages/s"));
    line("bandwidth", absl::StrFormat("%.1f MiB/s", Mib(p.bandwidth_bytes_per_s())));
    line("expected downtime", p.bandwidth_bytes_per_s() == 0
                                  ? std::string("? (no bandwidth measured yet)")
                                  : absl::StrCat(p.expected_downtime_ms(), " ms"));
  }
  if (p.compressed_pages() != 0 || p.delta_pages() != 0)
    line("encoded pages", absl::StrFormat("%u compressed, %u as deltas", p.compressed_pages(),
                                          p.delta_pages()));
  if (p.policy_decisions_size() != 0 || p.has_policy_settings()) {
    const PolicySettings& s = p.policy_settings();
    line("adaptive policy",
         absl::StrFormat("%d decisions; tendency %s; compression %s, delta %s, throttle %u%%",
                         p.policy_decisions_size(), PolicyTendency_Name(p.policy_tendency()),
                         s.compress() ? absl::StrCat("on (", s.compress_threads(), " threads)")
                                      : std::string("off"),
                         s.delta() ? "on" : "off", s.throttle_percent()));
  }
  if (p.postcopy()) {
    const PostcopyStats& pc = p.postcopy_stats();
    line("post-copy", absl::StrFormat("%u pages pulled on demand, %u pushed, %u still missing",
                                      pc.pulled(), pc.pushed(), pc.missing_pages()));
    for (const LaneStats& l : pc.lanes()) {
      if (l.faults() == 0) continue;
      line(l.lane() < 0 ? std::string("  VMM faults") : absl::StrCat("  vCPU ", l.lane(), " faults"),
           absl::StrFormat("%u, latency p50 %.0f us / p99 %.0f us, blocked %.1f ms", l.faults(),
                           l.p50_us(), l.p99_us(), l.blocked_ms()));
    }
  }
  line("dirty tracking", p.dirty_tracking().empty() ? "-" : p.dirty_tracking());
  if (p.ram_bytes() != 0) line("RAM", absl::StrFormat("%.0f MiB", Mib(p.ram_bytes())));
  return out;
}

std::string FormatMigrationProgressJson(const MigrationProgress& progress) {
  return FormatJson(progress);
}

std::string FormatRpcError(const grpc::Status& status, absl::string_view socket,
                           absl::Duration timeout) {
  const std::string code =
      absl::StatusCodeToString(static_cast<absl::StatusCode>(status.error_code()));
  std::string message = absl::StrReplaceAll(status.error_message(), {{"\r", ""}, {"\n", "; "}});
  switch (status.error_code()) {
    case grpc::StatusCode::UNAVAILABLE:
      message = absl::StrCat("cannot reach the VMM at '", socket,
                             "' (is the VMM running with this --api-socket?): ", message);
      break;
    case grpc::StatusCode::DEADLINE_EXCEEDED:
      message = absl::StrCat("no reply from the VMM at '", socket, "' within ",
                             absl::FormatDuration(timeout),
                             " (is the VMM running? raise --timeout if it is busy): ", message);
      break;
    default:
      break;
  }
  return absl::StrCat("vmmctl: ", code, ": ", message);
}

namespace {

std::chrono::system_clock::time_point Deadline(absl::Duration timeout) {
  return std::chrono::system_clock::now() + absl::ToChronoMilliseconds(timeout);
}

// Terminal width of stdout (0 if unknown).
int TerminalColumns() {
  struct winsize ws = {};
  if (ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) != 0) return 0;
  return ws.ws_col;
}

// `migrate`: StartMigration (with the --timeout deadline), then WatchMigration (no deadline)
// until a terminal phase.
int RunMigrate(Vmm::Stub& stub, const Options& options, std::ostream& out, std::ostream& err,
               bool out_is_tty) {
  const StartMigrationRequest request = BuildStartMigrationRequest(options.migration, Cwd());
  StartMigrationResponse started;
  const absl::Time started_at = absl::Now();
  {
    grpc::ClientContext context;
    context.set_deadline(Deadline(options.timeout));
    grpc::Status status = stub.StartMigration(&context, request, &started);
    if (!status.ok()) {
      err << FormatRpcError(status, options.socket, options.timeout) << "\n";
      return 1;
    }
  }
  if (options.no_wait) {
    if (options.json) {
      out << FormatJson(started);
    } else {
      out << "migration " << started.migration_id() << " to " << request.destination()
          << " started (follow it with 'vmmctl migrate-status')\n";
    }
    return 0;
  }
  if (!options.json) {
    out << "migration " << started.migration_id() << " to " << request.destination() << " started\n"
        << std::flush;
  }

  // No deadline: a migration may take far longer than --timeout. The VMM was just reachable;
  // if it goes away the call fails (UNAVAILABLE) rather than waiting.
  grpc::ClientContext context;
  WatchMigrationRequest watch;
  watch.set_interval_ms(200);
  std::unique_ptr<grpc::ClientReader<MigrationProgress>> reader =
      stub.WatchMigration(&context, watch);
  const int columns = out_is_tty ? TerminalColumns() : 0;
  MigrationProgress progress;
  MigrationProgress last;
  bool received = false;
  bool drawn = false;
  std::string last_line;
  int decisions_printed = 0;
  while (reader->Read(&progress)) {
    last = progress;
    received = true;
    // Adaptive migration: each new policy decision on a line of its own, as it happens.
    if (!options.json) {
      for (; decisions_printed < progress.policy_decisions_size(); ++decisions_printed) {
        if (drawn) out << "\r\x1b[K";
        out << FormatPolicyDecision(progress.policy_decisions(decisions_printed)) << "\n";
      }
    }
    if (out_is_tty) {
      // The VMM refreshes elapsed_ms only at iteration boundaries: keep the redrawn clock moving.
      MigrationProgress shown = progress;
      if (!IsTerminalMigrationPhase(shown.phase())) {
        shown.set_elapsed_ms(std::max<uint64_t>(
            shown.elapsed_ms(), absl::ToInt64Milliseconds(absl::Now() - started_at)));
      }
      std::string line = FormatMigrationProgressLine(shown);
      if (columns > 1 && line.size() >= static_cast<size_t>(columns)) line.resize(columns - 1);
      out << "\r" << line << "\x1b[K" << std::flush;
      drawn = true;
    } else if (!options.json) {
      std::string line = FormatMigrationProgressLine(progress);
      if (line != last_line) out << line << "\n" << std::flush;  // only when something changed
      last_line = std::move(line);
    }
    if (IsTerminalMigrationPhase(progress.phase())) break;
  }
  if (drawn) out << (options.json ? "\r\x1b[K" : "\n") << std::flush;
  const bool finished = received && IsTerminalMigrationPhase(last.phase());
  // After a terminal phase the VMM ends the stream; cancel anyway so that Finish never waits.
  if (finished) context.TryCancel();
  grpc::Status status = reader->Finish();
  if (!finished) {
    if (status.ok()) {
      status = grpc::Status(grpc::StatusCode::UNAVAILABLE,
                            "the progress stream ended before the migration did");
    }
    err << "vmmctl: "
        << absl::StatusCodeToString(static_cast<absl::StatusCode>(status.error_code()))
        << ": lost the progress of migration " << started.migration_id() << " from the VMM at '"
        << options.socket
        << "': " << absl::StrReplaceAll(status.error_message(), {{"\r", ""}, {"\n", "; "}})
        << " (it may still be running: see 'vmmctl migrate-status')\n";
    if (received && !options.json) out << FormatMigrationSummary(last);
    return 1;
  }
  out << (options.json ? FormatMigrationProgressJson(last) : FormatMigrationSummary(last));
  if (last.phase() != MIGRATION_COMPLETED) {
    err << "vmmctl: migration " << MigrationPhaseName(last.phase()) << ": "
        << (last.error().empty() ? "(no error message)"
                                 : absl::StrReplaceAll(last.error(), {{"\r", ""}, {"\n", "; "}}))
        << "\n";
    if (last.phase() == MIGRATION_POSTCOPY_PAUSED)
      err << "vmmctl: the VM is paused on both hosts; once the destination is reachable run "
             "'vmmctl --socket "
          << options.socket << " migrate-recover --to ADDR'\n";
    return 1;
  }
  return 0;
}

// `migrate-status`: the first WatchMigration message, then cancel the call.
int RunMigrateStatus(Vmm::Stub& stub, const Options& options, std::ostream& out,
                     std::ostream& err) {
  grpc::ClientContext context;
  context.set_deadline(Deadline(options.timeout));
  WatchMigrationRequest watch;
  watch.set_interval_ms(20);  // the first message comes after one interval (or at the end)
  std::unique_ptr<grpc::ClientReader<MigrationProgress>> reader =
      stub.WatchMigration(&context, watch);
  MigrationProgress progress;
  const bool received = reader->Read(&progress);
  if (received) context.TryCancel();
  grpc::Status status = reader->Finish();
  if (!received) {
    if (status.ok()) {
      status = grpc::Status(grpc::StatusCode::UNKNOWN, "WatchMigration sent no progress");
    }
    err << FormatRpcError(status, options.socket, options.timeout) << "\n";
    return 1;
  }
  out << (options.json ? FormatMigrationProgressJson(progress) : FormatMigrationSummary(progress));
  return 0;
}

}  // namespace

int Run(const std::vector<std::string>& args, std::ostream& out, std::ostream& err,
        bool out_is_tty) {
  absl::StatusOr<Options> parsed = ParseArgs(args);
  if (!parsed.ok()) {
    err << "vmmctl: usage: " << parsed.status().message() << "\n";
    return 2;
  }
  const Options& options = *parsed;
  if (options.help) {
    out << (options.command.has_value() ? CommandHelp(*options.command) : GeneralHelp());
    return 0;
  }
  absl::StatusOr<ApiAddress> address = ParseApiAddress(options.socket);
  if (!address.ok()) {
    err << "vmmctl: usage: bad --socket: " << address.status().message() << "\n";
    return 2;
  }

  absl::StatusOr<TlsCredentials> tls =
      LoadTlsCredentials({options.tls_cert, options.tls_key, options.tls_ca});
  if (!tls.ok()) {
    err << "vmmctl: usage: " << tls.status().message() << "\n";
    return 2;
  }
  std::shared_ptr<grpc::Channel> channel = grpc::CreateChannel(
      address->grpc, tls->channel ? tls->channel : grpc::InsecureChannelCredentials());
  std::unique_ptr<Vmm::Stub> stub = Vmm::NewStub(channel);
  if (*options.command == Command::kMigrate) {
    return RunMigrate(*stub, options, out, err, out_is_tty);
  }
  if (*options.command == Command::kMigrateStatus) {
    return RunMigrateStatus(*stub, options, out, err);
  }
  grpc::ClientContext context;
  context.set_deadline(Deadline(options.timeout));

  grpc::Status status;
  switch (*options.command) {
    case Command::kCreate: {
      CreateVmRequest request = BuildCreateVmRequest(options.config, Cwd());
      CreateVmResponse response;
      status = stub->CreateVm(&context, request, &response);
      break;
    }
    case Command::kBoot: {
      BootResponse response;
      status = stub->Boot(&context, BootRequest(), &response);
      break;
    }
    case Command::kPause: {
      PauseResponse response;
      status = stub->Pause(&context, PauseRequest(), &response);
      break;
    }
    case Command::kResume: {
      ResumeResponse response;
      status = stub->Resume(&context, ResumeRequest(), &response);
      break;
    }
    case Command::kShutdown: {
      ShutdownResponse response;
      status = stub->Shutdown(&context, ShutdownRequest(), &response);
      break;
    }
    case Command::kInfo: {
      VmInfo info;
      status = stub->GetInfo(&context, GetInfoRequest(), &info);
      if (status.ok()) out << (options.json ? FormatVmInfoJson(info) : FormatVmInfo(info));
      break;
    }
    case Command::kMigratePostcopy: {
      StartPostcopyResponse response;
      status = stub->StartPostcopy(&context, StartPostcopyRequest(), &response);
      break;
    }
    case Command::kMigrateRecover: {
      RecoverMigrationRequest request;
      request.set_destination(AbsoluteAddress(options.migration.destination(), Cwd()));
      RecoverMigrationResponse response;
      status = stub->RecoverMigration(&context, request, &response);
      if (status.ok()) out << "post-copy recovery via " << request.destination() << " started\n";
      break;
    }
    case Command::kMigrateCancel: {
      CancelMigrationResponse response;
      status = stub->CancelMigration(&context, CancelMigrationRequest(), &response);
      break;
    }
    case Command::kReceive: {
      ReceiveMigrationRequest request = BuildReceiveMigrationRequest(options.receive, Cwd());
      ReceiveMigrationResponse response;
      status = stub->ReceiveMigration(&context, request, &response);
      break;
    }
    case Command::kBalloon: {
      SetBalloonRequest request;
      request.set_target_mib(*options.balloon_target_mib);
      SetBalloonResponse response;
      status = stub->SetBalloon(&context, request, &response);
      break;
    }
    case Command::kAttach: {
      AttachDeviceRequest request = BuildAttachDeviceRequest(options.attach, Cwd());
      AttachDeviceResponse response;
      status = stub->AttachDevice(&context, request, &response);
      if (status.ok()) {
        out << "attached "
            << (request.has_vfio() ? "vfio " + request.vfio().sysfs_path()
                                   : "vfio-user " + request.vfio_user().socket())
            << " at " << response.pci_address() << "\n";
      }
      break;
    }
    case Command::kBalloonStats: {
      BalloonStatus b;
      status = stub->GetBalloonStats(&context, GetBalloonStatsRequest(), &b);
      if (status.ok()) out << (options.json ? FormatJson(b) : FormatBalloonStatus(b));
      break;
    }
    case Command::kMigrate:
    case Command::kMigrateStatus:
      break;  // handled above
  }
  if (!status.ok()) {
    err << FormatRpcError(status, options.socket, options.timeout) << "\n";
    return 1;
  }
  return 0;
}

}  // namespace microvmm::vmmctl
