#include "api/vmmctl_lib.h"

#include <unistd.h>

#include <chrono>
#include <climits>
#include <ostream>
#include <set>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_replace.h"
#include "api/address.h"
#include "google/protobuf/util/json_util.h"
#include "proto/vmm.grpc.pb.h"

namespace microvmm::vmmctl {

namespace {

constexpr struct {
  Command command;
  const char* name;
} kCommands[] = {
    {Command::kCreate, "create"}, {Command::kBoot, "boot"},         {Command::kPause, "pause"},
    {Command::kResume, "resume"}, {Command::kShutdown, "shutdown"}, {Command::kInfo, "info"},
};

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

bool IsGlobalFlag(absl::string_view name) { return name == "--socket" || name == "--timeout"; }

// Flags each command takes (besides the global ones); `true` = takes a value.
std::vector<std::pair<absl::string_view, bool>> CommandFlags(Command command) {
  switch (command) {
    case Command::kCreate:
      return {{"--kernel", true},     {"--initrd", true},         {"--cmdline", true},
              {"--vcpus", true},      {"--memory", true},         {"--serial", true},
              {"--test-guest", true}, {"--test-guest-args", true}};
    case Command::kInfo:
      return {{"--json", false}};
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
        return UsageError(absl::StrCat(
            "unknown command '", arg,
            "' (commands: create, boot, pause, resume, shutdown, info; see 'vmmctl --help')"));
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
    if (!seen.insert(name).second) return UsageError(absl::StrCat("flag ", name, " given twice"));

    if (!takes_value) {
      if (value.has_value()) return UsageError(absl::StrCat("flag ", name, " takes no value"));
    } else if (!value.has_value()) {
      if (i + 1 >= args.size()) return UsageError(absl::StrCat("flag ", name, " needs a value"));
      value = args[++i];
    }

    if (name == "--socket") {
      if (value->empty()) return UsageError("--socket needs a non-empty path");
      options.socket = *value;
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
      *options.config.mutable_serial() = *serial;
    }
  }

  if (options.help) return options;
  if (!options.command.has_value()) {
    return UsageError(
        "missing command (create, boot, pause, resume, shutdown, info; see "
        "'vmmctl --help')");
  }
  if (options.socket.empty()) {
    return UsageError(
        absl::StrCat("missing --socket PATH (the VMM's --api-socket)", HelpHint(options.command)));
  }
  if (*options.command == Command::kCreate) {
    if (!vcpus_set) options.config.set_vcpus(kDefaultVcpus);
    if (!memory_set) options.config.set_memory_mib(kDefaultMemoryMib);
  }
  return options;
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
      "  --help, -h          show help (of a command after it) and exit.\n"
      "\n"
      "commands:\n"
      "  create    build the VM from a configuration (nothing runs yet)\n"
      "  boot      start the vCPUs of a created VM\n"
      "  pause     stop every vCPU of a running VM\n"
      "  resume    restart the vCPUs of a paused VM\n"
      "  shutdown  stop the VM for good; the VMM process then exits\n"
      "  info      show the VM state, size, uptime, exit status and configuration\n"
      "\n",
      CommandHelp(Command::kCreate), "\n", CommandHelp(Command::kInfo),
      "\n"
      "exit status: 0 success, 1 the call failed (printed as 'vmmctl: CODE: message'),\n"
      "2 bad command line.\n");
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
          "  --test-guest-args STR   argument string passed to the test guest\n");
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
  return out;
}

std::string FormatVmInfoJson(const VmInfo& info) {
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = true;
  options.always_print_primitive_fields = true;
  options.preserve_proto_field_names = true;
  std::string json;
  if (!google::protobuf::util::MessageToJsonString(info, &json, options).ok()) {
    return "{}\n";
  }
  if (json.empty() || json.back() != '\n') json += '\n';
  return json;
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

int Run(const std::vector<std::string>& args, std::ostream& out, std::ostream& err) {
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

  std::shared_ptr<grpc::Channel> channel =
      grpc::CreateChannel(address->grpc, grpc::InsecureChannelCredentials());
  std::unique_ptr<Vmm::Stub> stub = Vmm::NewStub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() +
                       absl::ToChronoMilliseconds(options.timeout));

  grpc::Status status;
  switch (*options.command) {
    case Command::kCreate: {
      std::string cwd;
      if (char* dir = getcwd(nullptr, 0); dir != nullptr) {
        cwd = dir;
        free(dir);
      }
      CreateVmRequest request = BuildCreateVmRequest(options.config, cwd);
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
  }
  if (!status.ok()) {
    err << FormatRpcError(status, options.socket, options.timeout) << "\n";
    return 1;
  }
  return 0;
}

}  // namespace microvmm::vmmctl
