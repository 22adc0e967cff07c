// Unit tests of vmmctl's argument parsing, request building and formatting (no server).
#include "api/vmmctl_lib.h"

#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "api/address.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace microvmm::vmmctl {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

absl::StatusOr<Options> Parse(std::vector<std::string> args) { return ParseArgs(args); }

// The error message of a failed parse ("" if it succeeded, to fail the expectation).
std::string ParseError(std::vector<std::string> args) {
  absl::StatusOr<Options> options = ParseArgs(args);
  if (options.ok()) return "";
  EXPECT_EQ(options.status().code(), absl::StatusCode::kInvalidArgument);
  return std::string(options.status().message());
}

TEST(ParseArgs, CreateWithEveryFlag) {
  absl::StatusOr<Options> o =
      Parse({"--socket", "/tmp/x.sock", "create", "--kernel", "/k", "--initrd=/i", "--cmdline",
             "console=ttyS0 quiet", "--vcpus", "2", "--memory=64", "--serial", "file:/tmp/s.log",
             "--test-guest", "memwalk", "--test-guest-args", "mib=4 gens=0"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->socket, "/tmp/x.sock");
  ASSERT_TRUE(o->command.has_value());
  EXPECT_EQ(*o->command, Command::kCreate);
  EXPECT_FALSE(o->help);
  EXPECT_EQ(o->timeout, kDefaultTimeout);
  EXPECT_EQ(o->config.kernel(), "/k");
  EXPECT_EQ(o->config.initrd(), "/i");
  EXPECT_EQ(o->config.cmdline(), "console=ttyS0 quiet");
  EXPECT_EQ(o->config.vcpus(), 2u);
  EXPECT_EQ(o->config.memory_mib(), 64u);
  EXPECT_EQ(o->config.serial().mode(), SerialConfig::FILE);
  EXPECT_EQ(o->config.serial().path(), "/tmp/s.log");
  EXPECT_EQ(o->config.test_guest(), "memwalk");
  EXPECT_EQ(o->config.test_guest_args(), "mib=4 gens=0");
}

TEST(ParseArgs, CreateDefaults) {
  absl::StatusOr<Options> o = Parse({"--socket=/s", "create", "--test-guest", "hello"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->config.vcpus(), kDefaultVcpus);
  EXPECT_EQ(o->config.memory_mib(), kDefaultMemoryMib);
  EXPECT_FALSE(o->config.has_serial());
  EXPECT_TRUE(o->config.kernel().empty());
}

TEST(ParseArgs, EmptyCmdlineAndGuestArgsAllowed) {
  absl::StatusOr<Options> o =
      Parse({"--socket=/s", "create", "--kernel=/k", "--cmdline=", "--test-guest-args", ""});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->config.cmdline(), "");
}

TEST(ParseArgs, ValueMayStartWithDash) {
  absl::StatusOr<Options> o = Parse({"--socket=/s", "create", "--kernel=/k", "--cmdline", "-v"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->config.cmdline(), "-v");
}

TEST(ParseArgs, SimpleCommands) {
  for (auto [name, command] :
       std::vector<std::pair<std::string, Command>>{{"boot", Command::kBoot},
                                                    {"pause", Command::kPause},
                                                    {"resume", Command::kResume},
                                                    {"shutdown", Command::kShutdown},
                                                    {"info", Command::kInfo}}) {
    absl::StatusOr<Options> o = Parse({"--socket", "/s", name});
    ASSERT_TRUE(o.ok()) << name << ": " << o.status();
    EXPECT_EQ(*o->command, command) << name;
    EXPECT_EQ(CommandFromName(name), command);
    EXPECT_EQ(CommandName(command), name);
  }
  EXPECT_EQ(CommandFromName("reboot"), std::nullopt);
}

TEST(ParseArgs, GlobalFlagsAfterCommand) {
  absl::StatusOr<Options> o = Parse({"info", "--json", "--socket", "/s", "--timeout=2.5"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(*o->command, Command::kInfo);
  EXPECT_TRUE(o->json);
  EXPECT_EQ(o->socket, "/s");
  EXPECT_EQ(o->timeout, absl::Milliseconds(2500));
}

TEST(ParseArgs, Help) {
  absl::StatusOr<Options> o = Parse({"--help"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_TRUE(o->help);
  EXPECT_FALSE(o->command.has_value());

  o = Parse({"create", "--help"});  // no --socket needed for help
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_TRUE(o->help);
  EXPECT_EQ(*o->command, Command::kCreate);

  o = Parse({"help", "info"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_TRUE(o->help);
  EXPECT_EQ(*o->command, Command::kInfo);

  o = Parse({"-h"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_TRUE(o->help);
}

TEST(ParseArgs, Errors) {
  EXPECT_THAT(ParseError({}), HasSubstr("missing command"));
  EXPECT_THAT(ParseError({"--socket", "/s"}), HasSubstr("missing command"));
  EXPECT_THAT(ParseError({"info"}), HasSubstr("missing --socket"));
  EXPECT_THAT(ParseError({"--socket", "/s", "reboot"}), HasSubstr("unknown command 'reboot'"));
  EXPECT_THAT(ParseError({"--socket", "/s", "--bogus", "info"}),
              HasSubstr("unknown flag '--bogus'"));
  EXPECT_THAT(ParseError({"--socket", "/s", "boot", "--json"}),
              HasSubstr("unknown flag '--json' for command 'boot'"));
  EXPECT_THAT(ParseError({"--socket", "/s", "info", "--kernel=/k"}),
              HasSubstr("unknown flag '--kernel' for command 'info'"));
  EXPECT_THAT(ParseError({"--socket", "/s", "--kernel", "/k", "create"}),
              HasSubstr("flag --kernel belongs after the command"));
  EXPECT_THAT(ParseError({"--socket", "/s", "info", "extra"}),
              HasSubstr("unexpected argument 'extra'"));
  EXPECT_THAT(ParseError({"info", "--socket"}), HasSubstr("flag --socket needs a value"));
  EXPECT_THAT(ParseError({"--socket=", "info"}), HasSubstr("--socket needs a non-empty path"));
  EXPECT_THAT(ParseError({"--socket", "/a", "--socket", "/b", "info"}),
              HasSubstr("flag --socket given twice"));
  EXPECT_THAT(ParseError({"--socket", "/s", "create", "--vcpus", "1", "--vcpus=2"}),
              HasSubstr("flag --vcpus given twice"));
  EXPECT_THAT(ParseError({"--socket", "/s", "info", "--json=yes"}),
              HasSubstr("flag --json takes no value"));
  EXPECT_THAT(ParseError({"--help=1"}), HasSubstr("flag --help takes no value"));
  EXPECT_THAT(ParseError({"--socket", "/s", "create", "--kernel="}),
              HasSubstr("flag --kernel needs a non-empty value"));
  EXPECT_THAT(ParseError({"--socket", "/s", "create", "--kernel"}),
              HasSubstr("flag --kernel needs a value"));
  EXPECT_THAT(ParseError({"--socket", "/s", ""}), HasSubstr("empty argument"));
  EXPECT_THAT(ParseError({"--socket", "/s", "-x", "info"}), HasSubstr("unknown flag '-x'"));
}

TEST(ParseArgs, BadNumbers) {
  for (const char* bad : {"two", "-1", "+1", " 1", "1.5", "", "4294967296", "0x10"}) {
    EXPECT_THAT(ParseError({"--socket", "/s", "create", "--vcpus", bad}),
                HasSubstr("bad --vcpus value"))
        << bad;
  }
  for (const char* bad :
       {"64MiB", "-64", "18446744073709551616", "", "M", "1.5G", "1T", "18014398509481984G"}) {
    EXPECT_THAT(ParseError({"--socket", "/s", "create", "--memory", bad}),
                HasSubstr("bad --memory value"))
        << bad;
  }
  absl::StatusOr<Options> o = Parse(
      {"--socket", "/s", "create", "--vcpus", "4294967295", "--memory", "18446744073709551615"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->config.vcpus(), 4294967295u);
  EXPECT_EQ(o->config.memory_mib(), 18446744073709551615u);
  for (auto [text, mib] : std::vector<std::pair<std::string, uint64_t>>{
           {"512", 512}, {"512M", 512}, {"512m", 512}, {"2G", 2048}, {"1g", 1024}}) {
    o = Parse({"--socket", "/s", "create", "--memory", text});
    ASSERT_TRUE(o.ok()) << text << ": " << o.status();
    EXPECT_EQ(o->config.memory_mib(), mib) << text;
  }
  // Range checks (vcpus >= 1, memory >= 16) are the VMM's: vmmctl passes 0 through.
  o = Parse({"--socket", "/s", "create", "--vcpus", "0", "--memory", "0"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->config.vcpus(), 0u);
}

TEST(ParseTimeout, GoodAndBad) {
  EXPECT_EQ(*ParseTimeout("10"), absl::Seconds(10));
  EXPECT_EQ(*ParseTimeout("0.25"), absl::Milliseconds(250));
  EXPECT_EQ(*ParseTimeout("500ms"), absl::Milliseconds(500));
  EXPECT_EQ(*ParseTimeout("1m"), absl::Minutes(1));
  for (const char* bad : {"", "0", "-1", "abc", "10x", "inf", "nan", "-5s", "0s"}) {
    absl::StatusOr<absl::Duration> t = ParseTimeout(bad);
    EXPECT_FALSE(t.ok()) << bad;
    EXPECT_THAT(std::string(t.status().message()), HasSubstr("bad --timeout value")) << bad;
  }
  EXPECT_THAT(ParseError({"--socket", "/s", "--timeout", "0", "info"}),
              HasSubstr("bad --timeout value '0'"));
}

TEST(ParseSerial, Modes) {
  absl::StatusOr<SerialConfig> s = ParseSerial("stdout");
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->mode(), SerialConfig::STDOUT);
  s = ParseSerial("none");
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->mode(), SerialConfig::NONE);
  s = ParseSerial("file:/var/log/guest.log");
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->mode(), SerialConfig::FILE);
  EXPECT_EQ(s->path(), "/var/log/guest.log");
  s = ParseSerial("file:a:b");  // everything after the first colon is the path
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->path(), "a:b");

  EXPECT_THAT(std::string(ParseSerial("file:").status().message()), HasSubstr("needs a path"));
  for (const char* bad : {"", "tty", "STDOUT", "file", "FILE:/x", "none:", "stdout "}) {
    absl::StatusOr<SerialConfig> r = ParseSerial(bad);
    EXPECT_FALSE(r.ok()) << bad;
    EXPECT_THAT(std::string(r.status().message()), HasSubstr("expected stdout, none or file:PATH"))
        << bad;
  }
  EXPECT_THAT(ParseError({"--socket", "/s", "create", "--serial", "tty"}),
              HasSubstr("bad --serial value 'tty'"));
}

TEST(BuildCreateVmRequest, CopiesConfigAndMakesPathsAbsolute) {
  VmConfig config;
  config.set_vcpus(2);
  config.set_memory_mib(64);
  config.set_kernel("images/vmlinux");
  config.set_initrd("./initrd.img");
  config.set_cmdline("console=ttyS0");
  config.mutable_serial()->set_mode(SerialConfig::FILE);
  config.mutable_serial()->set_path("out/serial.log");
  CreateVmRequest r = BuildCreateVmRequest(config, "/home/u");
  EXPECT_EQ(r.config().vcpus(), 2u);
  EXPECT_EQ(r.config().memory_mib(), 64u);
  EXPECT_EQ(r.config().kernel(), "/home/u/images/vmlinux");
  EXPECT_EQ(r.config().initrd(), "/home/u/initrd.img");
  EXPECT_EQ(r.config().cmdline(), "console=ttyS0");
  EXPECT_EQ(r.config().serial().mode(), SerialConfig::FILE);
  EXPECT_EQ(r.config().serial().path(), "/home/u/out/serial.log");

  VmConfig guest;
  guest.set_test_guest("memwalk");  // a built-in name stays a name
  guest.set_test_guest_args("mib=4");
  EXPECT_EQ(BuildCreateVmRequest(guest, "/w").config().test_guest(), "memwalk");
  EXPECT_EQ(BuildCreateVmRequest(guest, "/w").config().test_guest_args(), "mib=4");
  guest.set_test_guest("out/guest.bin");  // a path is made absolute
  EXPECT_EQ(BuildCreateVmRequest(guest, "/w/").config().test_guest(), "/w/out/guest.bin");
  guest.set_test_guest("/abs/guest.bin");
  EXPECT_EQ(BuildCreateVmRequest(guest, "/w").config().test_guest(), "/abs/guest.bin");
  EXPECT_FALSE(BuildCreateVmRequest(guest, "/w").config().has_serial());
}

TEST(BuildCreateVmRequest, FromParsedFlags) {
  absl::StatusOr<Options> o = Parse(
      {"--socket", "/s", "create", "--test-guest", "smp", "--vcpus", "2", "--serial", "none"});
  ASSERT_TRUE(o.ok()) << o.status();
  CreateVmRequest r = BuildCreateVmRequest(o->config, "/cwd");
  EXPECT_EQ(r.config().test_guest(), "smp");
  EXPECT_EQ(r.config().vcpus(), 2u);
  EXPECT_EQ(r.config().memory_mib(), kDefaultMemoryMib);
  EXPECT_EQ(r.config().serial().mode(), SerialConfig::NONE);
}

TEST(Help, DocumentsEveryFlagAndCommand) {
  const std::string general = GeneralHelp();
  for (const char* flag :
       {"--socket", "--timeout", "--help", "--kernel", "--initrd", "--cmdline", "--vcpus",
        "--memory", "--serial", "--test-guest ", "--test-guest-args", "--json", "file:PATH"}) {
    EXPECT_THAT(general, HasSubstr(flag));
  }
  for (const char* command : {"create", "boot", "pause", "resume", "shutdown", "info"}) {
    EXPECT_THAT(general, HasSubstr(command));
    EXPECT_THAT(CommandHelp(*CommandFromName(command)), HasSubstr(command));
  }
  EXPECT_THAT(CommandHelp(Command::kCreate), HasSubstr("--test-guest-args"));
  EXPECT_THAT(CommandHelp(Command::kInfo), HasSubstr("--json"));
}

TEST(FormatVmInfo, Readable) {
  VmInfo info;
  info.set_state(NOT_CREATED);
  EXPECT_EQ(FormatVmInfo(info), "state:       NOT_CREATED\n");

  info.set_state(EXITED);
  info.set_vcpus(2);
  info.set_memory_mib(64);
  info.set_uptime_ms(1234);
  info.set_exit_reason("shutdown requested");
  info.set_exit_status(0);
  info.mutable_config()->set_test_guest("memwalk");
  info.mutable_config()->set_test_guest_args("mib=4 gens=0");
  info.mutable_config()->mutable_serial()->set_mode(SerialConfig::NONE);
  const std::string text = FormatVmInfo(info);
  EXPECT_THAT(text, HasSubstr("state:       EXITED\n"));
  EXPECT_THAT(text, HasSubstr("vcpus:       2\n"));
  EXPECT_THAT(text, HasSubstr("memory:      64 MiB\n"));
  EXPECT_THAT(text, HasSubstr("uptime:      1.234 s\n"));
  EXPECT_THAT(text, HasSubstr("exit status: 0\n"));
  EXPECT_THAT(text, HasSubstr("exit reason: shutdown requested\n"));
  EXPECT_THAT(text, HasSubstr("test guest:  memwalk\n"));
  EXPECT_THAT(text, HasSubstr("guest args:  mib=4 gens=0\n"));
  EXPECT_THAT(text, HasSubstr("serial:      none\n"));

  info.set_state(RUNNING);
  EXPECT_THAT(FormatVmInfo(info), Not(HasSubstr("exit")));
}

TEST(FormatVmInfo, Json) {
  VmInfo info;
  info.set_state(RUNNING);
  info.set_vcpus(2);
  info.set_memory_mib(64);
  const std::string json = FormatVmInfoJson(info);
  EXPECT_THAT(json, HasSubstr("\"state\": \"RUNNING\""));
  EXPECT_THAT(json, HasSubstr("\"vcpus\": 2"));
  EXPECT_THAT(json, HasSubstr("\"memory_mib\": \"64\""));  // proto3 JSON: 64-bit as string
  EXPECT_THAT(json, HasSubstr("\"exit_status\": 0"));      // primitives always printed
  EXPECT_EQ(json.back(), '\n');
}

TEST(FormatRpcError, OneLineWithCodeAndHints) {
  EXPECT_EQ(FormatRpcError(grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "vcpus must be >= 1"),
                           "/s", absl::Seconds(10)),
            "vmmctl: INVALID_ARGUMENT: vcpus must be >= 1");
  const std::string unavailable = FormatRpcError(
      grpc::Status(grpc::StatusCode::UNAVAILABLE, "failed to connect\nto all addresses"),
      "/tmp/x.sock", absl::Seconds(10));
  EXPECT_THAT(unavailable, HasSubstr("vmmctl: UNAVAILABLE: cannot reach the VMM at '/tmp/x.sock'"));
  EXPECT_THAT(unavailable, HasSubstr("VMM running"));
  EXPECT_EQ(unavailable.find('\n'), std::string::npos);
  const std::string deadline =
      FormatRpcError(grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "Deadline Exceeded"),
                     "/tmp/x.sock", absl::Seconds(3));
  EXPECT_THAT(deadline, HasSubstr("vmmctl: DEADLINE_EXCEEDED: no reply from the VMM at "
                                  "'/tmp/x.sock' within 3s"));
  EXPECT_THAT(deadline, HasSubstr("--timeout"));
}

int RunCli(std::vector<std::string> args, std::string* out, std::string* err) {
  std::ostringstream o, e;
  const int rc = Run(args, o, e);
  *out = o.str();
  *err = e.str();
  return rc;
}

TEST(Run, HelpGoesToStdout) {
  std::string out, err;
  EXPECT_EQ(RunCli({"--help"}, &out, &err), 0);
  EXPECT_EQ(out, GeneralHelp());
  EXPECT_EQ(err, "");
  EXPECT_EQ(RunCli({"create", "--help"}, &out, &err), 0);
  EXPECT_EQ(out, CommandHelp(Command::kCreate));
}

TEST(Run, UsageErrorIsOneLineAndExit2) {
  std::string out, err;
  EXPECT_EQ(RunCli({"--socket", "/s", "frobnicate"}, &out, &err), 2);
  EXPECT_EQ(out, "");
  EXPECT_TRUE(absl::StartsWith(err, "vmmctl: usage: unknown command 'frobnicate'")) << err;
  EXPECT_EQ(err.find('\n'), err.size() - 1) << err;

  const std::string long_path = "/tmp/" + std::string(200, 'x');
  EXPECT_EQ(RunCli({"--socket", long_path, "info"}, &out, &err), 2);
  EXPECT_THAT(err, HasSubstr("too long"));
}

TEST(Run, NoServerIsRpcErrorNamingTheSocket) {
  std::string out, err;
  const absl::Time start = absl::Now();
  EXPECT_EQ(
      RunCli({"--socket", "/nonexistent/vmmctl-test.sock", "--timeout", "5", "info"}, &out, &err),
      1);
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));  // fails fast, no waiting for the deadline
  EXPECT_EQ(out, "");
  EXPECT_TRUE(absl::StartsWith(
      err, "vmmctl: UNAVAILABLE: cannot reach the VMM at '/nonexistent/vmmctl-test.sock'"))
      << err;
  EXPECT_EQ(err.find('\n'), err.size() - 1) << err;
}

}  // namespace
}  // namespace microvmm::vmmctl

namespace microvmm {
namespace {

using ::testing::HasSubstr;

TEST(ParseApiAddress, Forms) {
  absl::StatusOr<ApiAddress> a = ParseApiAddress("/tmp/x.sock");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->grpc, "unix:/tmp/x.sock");
  EXPECT_EQ(a->unix_path, "/tmp/x.sock");

  a = ParseApiAddress("rel.sock");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->grpc, "unix:rel.sock");
  EXPECT_EQ(a->unix_path, "rel.sock");

  a = ParseApiAddress("./run/a.sock");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->grpc, "unix:./run/a.sock");

  a = ParseApiAddress("unix:/tmp/y.sock");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->grpc, "unix:/tmp/y.sock");
  EXPECT_EQ(a->unix_path, "/tmp/y.sock");

  a = ParseApiAddress("unix:///tmp/z.sock");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->grpc, "unix:///tmp/z.sock");
  EXPECT_EQ(a->unix_path, "/tmp/z.sock");

  a = ParseApiAddress("unix-abstract:vmm-1");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->grpc, "unix-abstract:vmm-1");
  EXPECT_EQ(a->unix_path, "");

  a = ParseApiAddress("127.0.0.1:7000");
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(a->grpc, "127.0.0.1:7000");
  EXPECT_EQ(a->unix_path, "");
}

TEST(ParseApiAddress, Errors) {
  EXPECT_THAT(std::string(ParseApiAddress("").status().message()), HasSubstr("empty"));
  EXPECT_THAT(std::string(ParseApiAddress("unix:").status().message()), HasSubstr("empty"));
  EXPECT_THAT(std::string(ParseApiAddress("unix-abstract:").status().message()),
              HasSubstr("empty"));
  const std::string ok_path = "/" + std::string(kMaxUnixSocketPath - 1, 'a');
  EXPECT_TRUE(ParseApiAddress(ok_path).ok());
  absl::StatusOr<ApiAddress> a = ParseApiAddress(ok_path + "a");
  EXPECT_EQ(a.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(a.status().message()), HasSubstr("too long (108 bytes, at most 107)"));
}

}  // namespace
}  // namespace microvmm
