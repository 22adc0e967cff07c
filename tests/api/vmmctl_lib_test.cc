// Unit tests of vmmctl's argument parsing, request building and formatting (no server).
#include "api/vmmctl_lib.h"

#include <stdlib.h>
#include <unistd.h>

#include <filesystem>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "api/address.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "proto/vmm.grpc.pb.h"

namespace microvmm::vmmctl {
namespace {

using ::testing::ElementsAre;
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

TEST(ParseArgs, AdaptiveMigrationFlags) {
  absl::StatusOr<Options> o = Parse({"--socket", "/s", "migrate", "--to", "/d", "--adaptive"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_TRUE(o->migration.has_policy());
  EXPECT_EQ(o->migration.policy().ladder_size(), 0) << "empty ladder = the VMM's default";
  o = Parse({"--socket", "/s", "migrate", "--to", "/d", "--profile", "latency", "--ladder",
             "delta,compress", "--allow-postcopy"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->migration.policy().profile(), PolicyConfig::PROFILE_LATENCY_SENSITIVE);
  ASSERT_EQ(o->migration.policy().ladder_size(), 2);
  EXPECT_EQ(o->migration.policy().ladder(0), STEP_DELTA);
  EXPECT_EQ(o->migration.policy().ladder(1), STEP_COMPRESS);
  EXPECT_TRUE(o->migration.policy().allow_postcopy());
  EXPECT_THAT(ParseError({"--socket", "/s", "migrate", "--to", "/d", "--profile", "fast"}),
              HasSubstr("bad --profile value 'fast'"));
  EXPECT_THAT(ParseError({"--socket", "/s", "migrate", "--to", "/d", "--ladder", "delta,zip"}),
              HasSubstr("bad --ladder step 'zip'"));
  EXPECT_THAT(ParseError({"--socket", "/s", "migrate", "--to", "/d", "--ladder", "delta,,compress"}),
              HasSubstr("bad --ladder step ''"));
}

TEST(ParseArgs, PostcopyCommandsAndFlags) {
  absl::StatusOr<Options> o = Parse({"--socket", "/s", "migrate", "--to", "/d", "--postcopy"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->migration.mode(), StartMigrationRequest::POSTCOPY);
  o = Parse({"--socket", "/s", "migrate", "--to", "/d", "--postcopy-after", "3"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->migration.postcopy_after_iterations(), 3u);
  EXPECT_THAT(ParseError({"--socket", "/s", "migrate", "--to", "/d", "--postcopy-after", "0"}),
              HasSubstr("--postcopy-after"));
  o = Parse({"--socket", "/s", "migrate-postcopy"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(*o->command, Command::kMigratePostcopy);
  o = Parse({"--socket", "/s", "migrate-recover", "--to", "/d2"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(*o->command, Command::kMigrateRecover);
  EXPECT_THAT(ParseError({"--socket", "/s", "migrate-recover"}), HasSubstr("--to"));
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
  EXPECT_THAT(ParseError({"--socket", "/s", "reboot"}),
              HasSubstr("migrate, migrate-cancel, migrate-postcopy, migrate-status, receive"));
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
       {"--socket",          "--timeout", "--help",           "--kernel",  "--initrd",
        "--cmdline",         "--vcpus",   "--memory",         "--serial",  "--test-guest ",
        "--test-guest-args", "--json",    "file:PATH",        "--to",      "--downtime-ms",
        "--bandwidth",       "--streams", "--max-iterations", "--no-wait", "--listen"}) {
    EXPECT_THAT(general, HasSubstr(flag));
  }
  for (const char* command : {"create", "boot", "pause", "resume", "shutdown", "info", "migrate",
                              "migrate-cancel", "migrate-status", "receive"}) {
    EXPECT_THAT(general, HasSubstr(command));
    EXPECT_THAT(CommandHelp(*CommandFromName(command)), HasSubstr(command));
  }
  EXPECT_THAT(CommandHelp(Command::kCreate), HasSubstr("--test-guest-args"));
  EXPECT_THAT(CommandHelp(Command::kInfo), HasSubstr("--json"));
  // Every flag a command accepts is documented in its own help.
  for (const char* flag : {"--to ADDR", "--downtime-ms N", "--bandwidth RATE", "--streams N",
                           "--max-iterations N", "--no-wait", "--json"}) {
    EXPECT_THAT(CommandHelp(Command::kMigrate), HasSubstr(flag));
  }
  EXPECT_THAT(CommandHelp(Command::kMigrateStatus), HasSubstr("--json"));
  EXPECT_THAT(CommandHelp(Command::kMigrateCancel), HasSubstr("No flags"));
  EXPECT_THAT(CommandHelp(Command::kReceive), HasSubstr("--listen ADDR"));
  EXPECT_THAT(CommandHelp(Command::kReceive), HasSubstr("--serial MODE"));
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

TEST(ParseArgs, MigrateWithEveryFlag) {
  absl::StatusOr<Options> o =
      Parse({"--socket", "/s", "migrate", "--to", "/tmp/dst.sock", "--downtime-ms=50",
             "--bandwidth", "64M", "--streams", "4", "--max-iterations=10", "--no-wait", "--json"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(*o->command, Command::kMigrate);
  EXPECT_EQ(o->migration.destination(), "/tmp/dst.sock");
  EXPECT_EQ(o->migration.downtime_limit_ms(), 50u);
  EXPECT_EQ(o->migration.bandwidth_limit_bytes_per_s(), 64u << 20);
  EXPECT_EQ(o->migration.streams(), 4u);
  EXPECT_EQ(o->migration.max_iterations(), 10u);
  EXPECT_TRUE(o->no_wait);
  EXPECT_TRUE(o->json);
}

TEST(ParseArgs, MigrateDefaultsAreZeroForTheVmm) {
  absl::StatusOr<Options> o = Parse({"migrate", "--to=127.0.0.1:7000", "--socket=/s"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->migration.destination(), "127.0.0.1:7000");
  EXPECT_EQ(o->migration.downtime_limit_ms(), 0u);  // 0: the VMM's defaults
  EXPECT_EQ(o->migration.bandwidth_limit_bytes_per_s(), 0u);
  EXPECT_EQ(o->migration.streams(), 0u);
  EXPECT_EQ(o->migration.max_iterations(), 0u);
  EXPECT_FALSE(o->no_wait);
  EXPECT_FALSE(o->json);
  // Explicit zeros where 0 has a meaning of its own.
  o = Parse({"--socket=/s", "migrate", "--to=d.sock", "--bandwidth=0", "--max-iterations", "0"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->migration.bandwidth_limit_bytes_per_s(), 0u);
  EXPECT_EQ(o->migration.max_iterations(), 0u);
}

TEST(ParseArgs, MigrateErrors) {
  EXPECT_THAT(ParseError({"--socket", "/s", "migrate"}), HasSubstr("missing --to ADDR"));
  EXPECT_THAT(ParseError({"--socket", "/s", "migrate"}), HasSubstr("'vmmctl migrate --help'"));
  EXPECT_THAT(ParseError({"migrate", "--to", "/d"}), HasSubstr("missing --socket"));
  EXPECT_THAT(ParseError({"--socket", "/s", "migrate", "--to"}),
              HasSubstr("flag --to needs a value"));
  EXPECT_THAT(ParseError({"--socket", "/s", "migrate", "--to="}),
              HasSubstr("flag --to needs a non-empty value"));
  EXPECT_THAT(ParseError({"--socket", "/s", "migrate", "--to", "/" + std::string(200, 'd')}),
              HasSubstr("bad --to value"));
  EXPECT_THAT(ParseError({"--socket", "/s", "migrate", "--to", "unix:"}),
              HasSubstr("bad --to value 'unix:'"));
  EXPECT_THAT(ParseError({"--socket", "/s", "migrate", "--to", "/a", "--to", "/b"}),
              HasSubstr("flag --to given twice"));
  EXPECT_THAT(ParseError({"--socket", "/s", "--to", "/d", "migrate"}),
              HasSubstr("flag --to belongs after the command (vmmctl --socket PATH migrate"));
  EXPECT_THAT(ParseError({"--socket", "/s", "migrate", "--to=/d", "--no-wait=1"}),
              HasSubstr("flag --no-wait takes no value"));
  EXPECT_THAT(ParseError({"--socket", "/s", "migrate", "--to=/d", "--listen=/l"}),
              HasSubstr("unknown flag '--listen' for command 'migrate'"));
  EXPECT_THAT(ParseError({"--socket", "/s", "migrate", "--to=/d", "now"}),
              HasSubstr("unexpected argument 'now'"));
  for (const char* bad : {"0", "-1", "1.5", "", "x", "4294967296", "10ms"}) {
    EXPECT_THAT(ParseError({"--socket", "/s", "migrate", "--to=/d", "--downtime-ms", bad}),
                HasSubstr("bad --downtime-ms value"))
        << bad;
  }
  for (const char* bad : {"0", "-2", "two", "", "4294967296"}) {
    EXPECT_THAT(ParseError({"--socket", "/s", "migrate", "--to=/d", "--streams", bad}),
                HasSubstr("bad --streams value"))
        << bad;
  }
  for (const char* bad : {"-1", "", "many", "4294967296"}) {
    EXPECT_THAT(ParseError({"--socket", "/s", "migrate", "--to=/d", "--max-iterations", bad}),
                HasSubstr("bad --max-iterations value"))
        << bad;
  }
  EXPECT_THAT(ParseError({"--socket", "/s", "migrate", "--to=/d", "--bandwidth", "fast"}),
              HasSubstr("bad --bandwidth value 'fast'"));
  // Range checks (streams <= 16, bandwidth >= 64K) are the VMM's.
  absl::StatusOr<Options> o =
      Parse({"--socket", "/s", "migrate", "--to=/d", "--streams=4294967295", "--bandwidth=1"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(o->migration.streams(), 4294967295u);
  EXPECT_EQ(o->migration.bandwidth_limit_bytes_per_s(), 1u);
}

TEST(ParseBandwidth, SuffixesAreBinary) {
  for (auto [text, bytes] : std::vector<std::pair<std::string, uint64_t>>{
           {"0", 0},
           {"65536", 65536},
           {"64K", 64 * 1024},
           {"64k", 64 * 1024},
           {"1M", 1 << 20},
           {"100m", 100ull << 20},
           {"1G", 1ull << 30},
           {"3g", 3ull << 30},
           {"0K", 0},
           {"18446744073709551615", 18446744073709551615ull},
           {"17179869183G", 17179869183ull << 30}}) {
    absl::StatusOr<uint64_t> b = ParseBandwidth(text);
    ASSERT_TRUE(b.ok()) << text << ": " << b.status();
    EXPECT_EQ(*b, bytes) << text;
  }
  for (const char* bad :
       {"", "K", "M", "1.5M", "-1", "+1", " 1M", "1M ", "1T", "1KB", "1Ki", "1MiB", "0x10", "10 M",
        "18446744073709551616", "17179869184G", "18014398509481984K"}) {
    absl::StatusOr<uint64_t> b = ParseBandwidth(bad);
    EXPECT_FALSE(b.ok()) << bad;
    EXPECT_EQ(b.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_THAT(std::string(b.status().message()), HasSubstr("binary suffix K, M or G")) << bad;
  }
}

TEST(ParseArgs, MigrateStatusAndCancel) {
  absl::StatusOr<Options> o = Parse({"--socket", "/s", "migrate-status", "--json"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(*o->command, Command::kMigrateStatus);
  EXPECT_TRUE(o->json);
  o = Parse({"--socket", "/s", "migrate-status"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_FALSE(o->json);
  o = Parse({"migrate-cancel", "--socket", "/s", "--timeout", "3"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(*o->command, Command::kMigrateCancel);
  EXPECT_THAT(ParseError({"--socket", "/s", "migrate-cancel", "--json"}),
              HasSubstr("unknown flag '--json' for command 'migrate-cancel'"));
  EXPECT_THAT(ParseError({"--socket", "/s", "migrate-status", "--to=/d"}),
              HasSubstr("unknown flag '--to' for command 'migrate-status'"));
  for (auto [name, command] :
       std::vector<std::pair<std::string, Command>>{{"migrate", Command::kMigrate},
                                                    {"migrate-cancel", Command::kMigrateCancel},
                                                    {"migrate-status", Command::kMigrateStatus},
                                                    {"receive", Command::kReceive}}) {
    EXPECT_EQ(CommandFromName(name), command);
    EXPECT_EQ(CommandName(command), name);
    o = Parse({name, "--help"});  // help needs neither --socket nor the required flags
    ASSERT_TRUE(o.ok()) << name << ": " << o.status();
    EXPECT_TRUE(o->help);
    EXPECT_EQ(*o->command, command);
  }
}

TEST(ParseArgs, Receive) {
  absl::StatusOr<Options> o =
      Parse({"--socket", "/s", "receive", "--listen", "/tmp/in.sock", "--serial=file:g.log"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(*o->command, Command::kReceive);
  EXPECT_EQ(o->receive.listen_address(), "/tmp/in.sock");
  EXPECT_EQ(o->receive.serial().mode(), SerialConfig::FILE);
  EXPECT_EQ(o->receive.serial().path(), "g.log");
  EXPECT_FALSE(o->config.has_serial());  // not the create config

  o = Parse({"--socket", "/s", "receive", "--listen=0.0.0.0:7000"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_FALSE(o->receive.has_serial());  // the VMM's default (stdout)

  EXPECT_THAT(ParseError({"--socket", "/s", "receive"}), HasSubstr("missing --listen ADDR"));
  EXPECT_THAT(ParseError({"--socket", "/s", "receive", "--listen="}),
              HasSubstr("flag --listen needs a non-empty value"));
  EXPECT_THAT(ParseError({"--socket", "/s", "receive", "--listen=/l", "--serial", "tty"}),
              HasSubstr("bad --serial value 'tty'"));
  EXPECT_THAT(
      ParseError({"--socket", "/s", "receive", "--listen=/l", "--serial=none", "--serial=stdout"}),
      HasSubstr("flag --serial given twice"));
  EXPECT_THAT(ParseError({"--socket", "/s", "receive", "--listen=/l", "--to=/d"}),
              HasSubstr("unknown flag '--to' for command 'receive'"));
  EXPECT_THAT(ParseError({"--socket", "/s", "receive", "--listen=/l", "--vcpus=2"}),
              HasSubstr("unknown flag '--vcpus' for command 'receive'"));
}

TEST(AbsoluteAddress, OnlyRelativeUnixPathsChange) {
  EXPECT_EQ(AbsoluteAddress("dst.sock", "/home/u"), "/home/u/dst.sock");
  EXPECT_EQ(AbsoluteAddress("./run/dst.sock", "/home/u/"), "/home/u/run/dst.sock");
  EXPECT_EQ(AbsoluteAddress("../dst.sock", "/home/u"), "/home/u/../dst.sock");
  EXPECT_EQ(AbsoluteAddress("unix:dst.sock", "/home/u"), "unix:/home/u/dst.sock");
  EXPECT_EQ(AbsoluteAddress("/tmp/dst.sock", "/home/u"), "/tmp/dst.sock");
  EXPECT_EQ(AbsoluteAddress("unix:/tmp/dst.sock", "/home/u"), "unix:/tmp/dst.sock");
  EXPECT_EQ(AbsoluteAddress("unix:///tmp/dst.sock", "/home/u"), "unix:///tmp/dst.sock");
  EXPECT_EQ(AbsoluteAddress("unix-abstract:dst", "/home/u"), "unix-abstract:dst");
  EXPECT_EQ(AbsoluteAddress("10.0.0.2:7000", "/home/u"), "10.0.0.2:7000");
  EXPECT_EQ(AbsoluteAddress("localhost:7000", "/home/u"), "localhost:7000");
  EXPECT_EQ(AbsoluteAddress("dns:///host:7000", "/home/u"), "dns:///host:7000");
  EXPECT_EQ(AbsoluteAddress("[::1]:7000", "/home/u"), "[::1]:7000");
  EXPECT_EQ(AbsoluteAddress("dst.sock", ""), "dst.sock");  // no cwd: unchanged
}

TEST(BuildStartMigrationRequest, FromParsedFlags) {
  absl::StatusOr<Options> o =
      Parse({"--socket", "/s", "migrate", "--to", "run/dst.sock", "--downtime-ms", "75",
             "--bandwidth=512K", "--streams=3", "--max-iterations=5"});
  ASSERT_TRUE(o.ok()) << o.status();
  StartMigrationRequest r = BuildStartMigrationRequest(o->migration, "/w");
  EXPECT_EQ(r.destination(), "/w/run/dst.sock");
  EXPECT_EQ(r.downtime_limit_ms(), 75u);
  EXPECT_EQ(r.bandwidth_limit_bytes_per_s(), 512u * 1024);
  EXPECT_EQ(r.streams(), 3u);
  EXPECT_EQ(r.max_iterations(), 5u);

  o = Parse({"--socket", "/s", "migrate", "--to", "host:7000"});
  ASSERT_TRUE(o.ok()) << o.status();
  r = BuildStartMigrationRequest(o->migration, "/w");
  EXPECT_EQ(r.destination(), "host:7000");
  EXPECT_EQ(r.downtime_limit_ms(), 0u);
  EXPECT_EQ(r.streams(), 0u);
}

TEST(BuildReceiveMigrationRequest, FromParsedFlags) {
  absl::StatusOr<Options> o = Parse(
      {"--socket", "/s", "receive", "--listen", "in.sock", "--serial", "file:logs/guest.log"});
  ASSERT_TRUE(o.ok()) << o.status();
  ReceiveMigrationRequest r = BuildReceiveMigrationRequest(o->receive, "/w");
  EXPECT_EQ(r.listen_address(), "/w/in.sock");
  EXPECT_EQ(r.serial().mode(), SerialConfig::FILE);
  EXPECT_EQ(r.serial().path(), "/w/logs/guest.log");

  o = Parse({"--socket", "/s", "receive", "--listen", "0.0.0.0:7000", "--serial", "none"});
  ASSERT_TRUE(o.ok()) << o.status();
  r = BuildReceiveMigrationRequest(o->receive, "/w");
  EXPECT_EQ(r.listen_address(), "0.0.0.0:7000");
  EXPECT_EQ(r.serial().mode(), SerialConfig::NONE);
  EXPECT_FALSE(BuildReceiveMigrationRequest(ReceiveMigrationRequest(), "/w").has_serial());
}

// A migration part-way: 64 MiB of RAM.
MigrationProgress Progress(MigrationPhase phase, uint32_t iteration) {
  MigrationProgress p;
  p.set_phase(phase);
  p.set_migration_id("0123456789abcdef");
  p.set_destination("unix:/tmp/dst.sock");
  p.set_iteration(iteration);
  p.set_ram_bytes(64ull << 20);
  p.set_dirty_tracking("ring");
  return p;
}

TEST(MigrationPhaseName, ShortNames) {
  EXPECT_EQ(MigrationPhaseName(MIGRATION_PRECOPY), "PRECOPY");
  EXPECT_EQ(MigrationPhaseName(MIGRATION_SWITCHOVER), "SWITCHOVER");
  EXPECT_EQ(MigrationPhaseName(MIGRATION_COMPLETED), "COMPLETED");
  EXPECT_EQ(MigrationPhaseName(MIGRATION_PHASE_UNSPECIFIED), "PHASE_UNSPECIFIED");
  EXPECT_EQ(MigrationPhaseName(static_cast<MigrationPhase>(42)), "PHASE_42");
  EXPECT_TRUE(IsTerminalMigrationPhase(MIGRATION_COMPLETED));
  EXPECT_TRUE(IsTerminalMigrationPhase(MIGRATION_FAILED));
  EXPECT_TRUE(IsTerminalMigrationPhase(MIGRATION_CANCELLED));
  EXPECT_FALSE(IsTerminalMigrationPhase(MIGRATION_SWITCHOVER));
  EXPECT_FALSE(IsTerminalMigrationPhase(MIGRATION_PRECOPY));
  EXPECT_FALSE(IsTerminalMigrationPhase(MIGRATION_NONE));
}

TEST(FormatMigrationProgressLine, FirstPassShowsRamSent) {
  MigrationProgress p = Progress(MIGRATION_PRECOPY, 0);
  p.set_elapsed_ms(1500);
  EXPECT_EQ(FormatMigrationProgressLine(p),
            "   1.5s PRECOPY    iter 0  [--------------------]   0% sent  0.0 MiB sent  "
            "0.0 MiB/s  0 dirty pages/s  expected downtime ?");
  p.set_pages_sent(8192);  // half of 64 MiB
  p.set_bytes_sent(20ull << 20);
  p.set_bandwidth_bytes_per_s(100ull << 20);
  p.set_expected_downtime_ms(0);
  EXPECT_EQ(FormatMigrationProgressLine(p),
            "   1.5s PRECOPY    iter 0  [##########----------]  50% sent  20.0 MiB sent  "
            "100.0 MiB/s  0 dirty pages/s  expected downtime ~0 ms");
  p.set_pages_sent(16383);  // one page short: not 100% yet
  EXPECT_THAT(FormatMigrationProgressLine(p), HasSubstr("[###################-]  99% sent"));
  p.set_pages_sent(99999);  // more than RAM (never above 100%)
  EXPECT_THAT(FormatMigrationProgressLine(p), HasSubstr("[####################] 100% sent"));
  p.set_phase(MIGRATION_SETUP);
  p.set_pages_sent(0);
  EXPECT_THAT(FormatMigrationProgressLine(p), HasSubstr(" SETUP      iter 0  [----------"));
  p.set_ram_bytes(0);  // not known yet: no division by zero
  EXPECT_THAT(FormatMigrationProgressLine(p), HasSubstr("[--------------------]   0% sent"));
}

TEST(FormatMigrationProgressLine, LaterPassesShowRamStillDirty) {
  MigrationProgress p = Progress(MIGRATION_PRECOPY, 3);
  p.set_elapsed_ms(12345);
  p.set_remaining_pages(4096);  // a quarter of RAM
  p.set_bytes_sent(96ull << 20);
  p.set_pages_sent(24576);
  p.set_bandwidth_bytes_per_s(50ull << 20);
  p.set_dirty_pages_per_s(1500);
  p.set_expected_downtime_ms(320);
  EXPECT_EQ(FormatMigrationProgressLine(p),
            "  12.3s PRECOPY    iter 3  [#####---------------]  25% left  96.0 MiB sent  "
            "50.0 MiB/s  1500 dirty pages/s  expected downtime ~320 ms");
  p.set_remaining_pages(1);  // anything left shows
  EXPECT_THAT(FormatMigrationProgressLine(p), HasSubstr("[#-------------------]   1% left"));
  p.set_phase(MIGRATION_SWITCHOVER);
  EXPECT_THAT(FormatMigrationProgressLine(p), HasSubstr(" SWITCHOVER iter 3 "));
  p.set_phase(MIGRATION_COMPLETED);
  p.set_remaining_pages(0);
  EXPECT_THAT(FormatMigrationProgressLine(p), HasSubstr(" COMPLETED  iter 3  [-----"));
  EXPECT_THAT(FormatMigrationProgressLine(p), HasSubstr("]   0% left"));
  // Switchover straight after the first pass is not "first pass" any more.
  MigrationProgress q = Progress(MIGRATION_SWITCHOVER, 0);
  q.set_remaining_pages(16384);
  EXPECT_THAT(FormatMigrationProgressLine(q), HasSubstr("[####################] 100% left"));
  // One line, plain ASCII.
  const std::string line = FormatMigrationProgressLine(p);
  EXPECT_EQ(line.find('\n'), std::string::npos);
  EXPECT_EQ(line.find('\r'), std::string::npos);
  for (char c : line) EXPECT_TRUE(c >= 0x20 && c < 0x7f) << line;
}

TEST(FormatMigrationSummary, Completed) {
  MigrationProgress p = Progress(MIGRATION_COMPLETED, 2);
  p.set_total_ms(2345);
  p.set_elapsed_ms(2300);
  p.set_downtime_ms(37);
  p.set_source_pause_unix_ns(1700000000123456789);
  p.set_destination_resume_unix_ns(1700000000160456789);
  p.set_bytes_sent(15860316);
  p.set_pages_sent(18141);
  p.set_zero_pages(14322);
  p.set_remaining_pages(0);
  p.set_bandwidth_bytes_per_s(35ull << 20);
  EXPECT_EQ(FormatMigrationSummary(p),
            "phase:               COMPLETED\n"
            "migration id:        0123456789abcdef\n"
            "destination:         unix:/tmp/dst.sock\n"
            "total time:          2.345 s\n"
            "downtime:            37 ms\n"
            "source paused:       2023-11-14 22:13:20.123456789 UTC\n"
            "destination resumed: 2023-11-14 22:13:20.160456789 UTC\n"
            "bytes sent:          15860316 (15.1 MiB)\n"
            "pages sent:          18141\n"
            "zero pages:          14322\n"
            "iterations:          2 pre-copy + switchover\n"
            "dirty tracking:      ring\n"
            "RAM:                 64 MiB\n");
  // No resume time from the destination: the downtime was measured on the source.
  p.set_destination_resume_unix_ns(0);
  const std::string text = FormatMigrationSummary(p);
  EXPECT_THAT(text, HasSubstr("downtime:            37 ms (measured on the source"));
  EXPECT_THAT(text, HasSubstr("destination resumed: -\n"));
}

TEST(FormatMigrationSummary, FailedAndCancelled) {
  MigrationProgress p = Progress(MIGRATION_FAILED, 1);
  p.set_elapsed_ms(1200);  // total_ms is only set after a switchover
  p.set_error("page stream to the destination failed:\nconnection reset");
  p.set_bytes_sent(1 << 20);
  p.set_pages_sent(256);
  p.set_remaining_pages(12);
  const std::string text = FormatMigrationSummary(p);
  EXPECT_THAT(text, HasSubstr("phase:               FAILED\n"
                              "error:               page stream to the destination failed:; "
                              "connection reset\n"));
  EXPECT_THAT(text, HasSubstr("total time:          1.200 s\n"));
  EXPECT_THAT(text, HasSubstr("bytes sent:          1048576 (1.0 MiB)\n"));
  EXPECT_THAT(text, HasSubstr("iterations:          1\n"));
  EXPECT_THAT(text, Not(HasSubstr("downtime")));   // the guest was never paused
  EXPECT_THAT(text, Not(HasSubstr("remaining")));  // live rates only while running

  p.set_phase(MIGRATION_CANCELLED);
  p.set_error("migration cancelled");
  EXPECT_THAT(FormatMigrationSummary(p), HasSubstr("phase:               CANCELLED\n"
                                                   "error:               migration cancelled\n"));
}

TEST(FormatMigrationSummary, RunningShowsLiveRates) {
  MigrationProgress p = Progress(MIGRATION_PRECOPY, 4);
  p.set_elapsed_ms(601804);
  p.set_remaining_pages(2051);
  p.set_dirty_pages_per_s(1019);
  p.set_bandwidth_bytes_per_s(4ull << 20);
  p.set_expected_downtime_ms(1987);
  const std::string text = FormatMigrationSummary(p);
  EXPECT_THAT(text, HasSubstr("phase:               PRECOPY\n"));
  EXPECT_THAT(text, HasSubstr("elapsed:             601.804 s\n"));
  EXPECT_THAT(text, Not(HasSubstr("total time")));
  EXPECT_THAT(text, HasSubstr("iterations:          4\n"));
  EXPECT_THAT(text, HasSubstr("remaining pages:     2051\n"));
  EXPECT_THAT(text, HasSubstr("dirty rate:          1019 pages/s\n"));
  EXPECT_THAT(text, HasSubstr("bandwidth:           4.0 MiB/s\n"));
  EXPECT_THAT(text, HasSubstr("expected downtime:   1987 ms\n"));
  p.set_bandwidth_bytes_per_s(0);
  EXPECT_THAT(FormatMigrationSummary(p), HasSubstr("expected downtime:   ? (no bandwidth"));

  MigrationProgress empty;  // a snapshot with nothing set
  EXPECT_THAT(FormatMigrationSummary(empty), HasSubstr("phase:               PHASE_UNSPECIFIED\n"));
  EXPECT_THAT(FormatMigrationSummary(empty), HasSubstr("dirty tracking:      -\n"));
  EXPECT_THAT(FormatMigrationSummary(empty), Not(HasSubstr("RAM")));
}

TEST(FormatMigrationProgressJson, ProtoFieldNames) {
  MigrationProgress p = Progress(MIGRATION_COMPLETED, 2);
  p.set_downtime_ms(37);
  p.set_source_pause_unix_ns(1700000000123456789);
  const std::string json = FormatMigrationProgressJson(p);
  EXPECT_THAT(json, HasSubstr("\"phase\": \"MIGRATION_COMPLETED\""));
  EXPECT_THAT(json, HasSubstr("\"migration_id\": \"0123456789abcdef\""));
  EXPECT_THAT(json, HasSubstr("\"downtime_ms\": \"37\""));
  EXPECT_THAT(json, HasSubstr("\"source_pause_unix_ns\": \"1700000000123456789\""));
  EXPECT_THAT(json, HasSubstr("\"destination_resume_unix_ns\": \"0\""));  // always printed
  EXPECT_THAT(json, HasSubstr("\"dirty_tracking\": \"ring\""));
  EXPECT_THAT(json, HasSubstr("\"error\": \"\""));
  EXPECT_EQ(json.back(), '\n');
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

TEST(Run, MigrationCommandsWithoutServerFailFast) {
  for (std::vector<std::string> args :
       std::vector<std::vector<std::string>>{{"migrate", "--to", "/tmp/d.sock"},
                                             {"migrate", "--to", "/tmp/d.sock", "--no-wait"},
                                             {"migrate-status"},
                                             {"migrate-cancel"},
                                             {"receive", "--listen", "/tmp/in.sock"}}) {
    args.insert(args.begin(), {"--socket", "/nonexistent/vmmctl-test.sock", "--timeout", "5"});
    std::string out, err;
    const absl::Time start = absl::Now();
    EXPECT_EQ(RunCli(args, &out, &err), 1) << args[4];
    EXPECT_LT(absl::Now() - start, absl::Seconds(5)) << args[4];
    EXPECT_EQ(out, "") << args[4];
    EXPECT_TRUE(absl::StartsWith(
        err, "vmmctl: UNAVAILABLE: cannot reach the VMM at '/nonexistent/vmmctl-test.sock'"))
        << args[4] << ": " << err;
    EXPECT_EQ(err.find('\n'), err.size() - 1) << err;
  }
}

TEST(Run, MigrationUsageErrors) {
  std::string out, err;
  EXPECT_EQ(RunCli({"--socket", "/s", "migrate", "--bandwidth", "1T", "--to=/d"}, &out, &err), 2);
  EXPECT_TRUE(absl::StartsWith(err, "vmmctl: usage: bad --bandwidth value '1T'")) << err;
  EXPECT_EQ(RunCli({"--socket", "/s", "receive"}, &out, &err), 2);
  EXPECT_TRUE(absl::StartsWith(err, "vmmctl: usage: missing --listen ADDR")) << err;
  EXPECT_EQ(RunCli({"migrate", "--help"}, &out, &err), 0);
  EXPECT_EQ(out, CommandHelp(Command::kMigrate));
  EXPECT_EQ(RunCli({"help", "receive"}, &out, &err), 0);
  EXPECT_EQ(out, CommandHelp(Command::kReceive));
}

// A scripted Vmm service for the migration commands: StartMigration records its request,
// WatchMigration streams `script` (one message every `step`), the others record their calls.
class FakeVmm final : public Vmm::Service {
 public:
  std::vector<MigrationProgress> script;
  absl::Duration step = absl::Milliseconds(1);
  grpc::Status start_status = grpc::Status::OK;
  grpc::Status watch_status = grpc::Status::OK;  // returned after the script

  grpc::Status StartMigration(grpc::ServerContext*, const StartMigrationRequest* request,
                              StartMigrationResponse* response) override {
    absl::MutexLock lock(&mu_);
    start_requests_.push_back(*request);
    if (!start_status.ok()) return start_status;
    response->set_migration_id("0123456789abcdef");
    return grpc::Status::OK;
  }
  grpc::Status CancelMigration(grpc::ServerContext*, const CancelMigrationRequest*,
                               CancelMigrationResponse*) override {
    absl::MutexLock lock(&mu_);
    ++cancels_;
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "no migration is running");
  }
  grpc::Status WatchMigration(grpc::ServerContext* context, const WatchMigrationRequest* request,
                              grpc::ServerWriter<MigrationProgress>* writer) override {
    {
      absl::MutexLock lock(&mu_);
      watch_intervals_.push_back(request->interval_ms());
      has_deadline_.push_back(context->deadline() != std::chrono::system_clock::time_point::max());
    }
    for (const MigrationProgress& p : script) {
      absl::SleepFor(step);
      if (context->IsCancelled()) {
        absl::MutexLock lock(&mu_);
        ++watches_cancelled_;
        return grpc::Status::CANCELLED;
      }
      if (!writer->Write(p)) {
        // The client went away (e.g. migrate-status after its first message).
        absl::MutexLock lock(&mu_);
        ++watches_cancelled_;
        return grpc::Status::CANCELLED;
      }
    }
    return watch_status;
  }
  grpc::Status ReceiveMigration(grpc::ServerContext*, const ReceiveMigrationRequest* request,
                                ReceiveMigrationResponse*) override {
    absl::MutexLock lock(&mu_);
    receive_requests_.push_back(*request);
    return grpc::Status::OK;
  }

  std::vector<StartMigrationRequest> start_requests() {
    absl::MutexLock lock(&mu_);
    return start_requests_;
  }
  std::vector<ReceiveMigrationRequest> receive_requests() {
    absl::MutexLock lock(&mu_);
    return receive_requests_;
  }
  std::vector<uint32_t> watch_intervals() {
    absl::MutexLock lock(&mu_);
    return watch_intervals_;
  }
  std::vector<bool> has_deadline() {
    absl::MutexLock lock(&mu_);
    return has_deadline_;
  }
  int cancels() {
    absl::MutexLock lock(&mu_);
    return cancels_;
  }

 private:
  absl::Mutex mu_;
  std::vector<StartMigrationRequest> start_requests_;
  std::vector<ReceiveMigrationRequest> receive_requests_;
  std::vector<uint32_t> watch_intervals_;
  std::vector<bool> has_deadline_;
  int cancels_ = 0;
  int watches_cancelled_ = 0;
};

// FakeVmm served on a unix socket in a fresh /tmp directory (TEST_TMPDIR is too long).
class FakeVmmTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/vmmctl.XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    socket_ = dir_ + "/api.sock";
  }
  void Serve() {
    grpc::ServerBuilder builder;
    builder.AddListeningPort("unix:" + socket_, grpc::InsecureServerCredentials());
    builder.RegisterService(&vmm_);
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
  }
  void TearDown() override {
    if (server_) server_->Shutdown(std::chrono::system_clock::now());
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
  int Vmmctl(std::vector<std::string> args, std::string* out, std::string* err, bool tty = false) {
    args.insert(args.begin(), {"--socket", socket_});
    std::ostringstream o, e;
    const int rc = vmmctl::Run(args, o, e, tty);
    *out = o.str();
    *err = e.str();
    return rc;
  }

  FakeVmm vmm_;
  std::string dir_;
  std::string socket_;
  std::unique_ptr<grpc::Server> server_;
};

std::vector<MigrationProgress> CompletedScript() {
  MigrationProgress setup = Progress(MIGRATION_SETUP, 0);
  MigrationProgress first = Progress(MIGRATION_PRECOPY, 0);
  first.set_elapsed_ms(100);
  MigrationProgress second = Progress(MIGRATION_PRECOPY, 1);
  second.set_elapsed_ms(900);
  second.set_pages_sent(16384);
  second.set_bytes_sent(16ull << 20);
  second.set_remaining_pages(2048);
  second.set_bandwidth_bytes_per_s(40ull << 20);
  second.set_dirty_pages_per_s(3000);
  second.set_expected_downtime_ms(200);
  MigrationProgress done = second;
  done.set_phase(MIGRATION_COMPLETED);
  done.set_remaining_pages(0);
  done.set_pages_sent(18432);
  done.set_bytes_sent(24ull << 20);
  done.set_total_ms(1100);
  done.set_downtime_ms(40);
  done.set_source_pause_unix_ns(1700000000000000000);
  done.set_destination_resume_unix_ns(1700000000040000000);
  // The same snapshot twice (nothing changed between two intervals) prints once.
  return {setup, first, first, second, second, done};
}

TEST_F(FakeVmmTest, MigrateFollowsToCompletion) {
  vmm_.script = CompletedScript();
  vmm_.step = absl::Milliseconds(150);  // 900 ms in all: longer than --timeout
  Serve();
  std::string out, err;
  EXPECT_EQ(Vmmctl({"--timeout", "300ms", "migrate", "--to", "dst.sock", "--bandwidth", "1G",
                    "--streams", "4"},
                   &out, &err),
            0)
      << err;
  EXPECT_EQ(err, "");
  ASSERT_EQ(vmm_.start_requests().size(), 1u);
  const StartMigrationRequest request = vmm_.start_requests()[0];
  EXPECT_TRUE(absl::StartsWith(request.destination(), "/")) << request.destination();
  EXPECT_TRUE(absl::EndsWith(request.destination(), "/dst.sock")) << request.destination();
  EXPECT_EQ(request.bandwidth_limit_bytes_per_s(), 1ull << 30);
  EXPECT_EQ(request.streams(), 4u);
  EXPECT_EQ(request.downtime_limit_ms(), 0u);
  EXPECT_THAT(vmm_.has_deadline(), ElementsAre(false));  // following has no deadline

  // Not a TTY: a start line, one line per changed update, then the summary.
  std::vector<std::string> lines = absl::StrSplit(out, '\n');
  ASSERT_GE(lines.size(), 6u) << out;
  EXPECT_EQ(lines[0],
            absl::StrCat("migration 0123456789abcdef to ", request.destination(), " started"));
  EXPECT_EQ(lines[1], FormatMigrationProgressLine(vmm_.script[0]));
  EXPECT_EQ(lines[2], FormatMigrationProgressLine(vmm_.script[1]));
  EXPECT_EQ(lines[3], FormatMigrationProgressLine(vmm_.script[3]));
  EXPECT_EQ(lines[4], FormatMigrationProgressLine(vmm_.script[5]));
  EXPECT_EQ(absl::StrJoin(lines.begin() + 5, lines.end(), "\n"),
            FormatMigrationSummary(vmm_.script[5]));
  EXPECT_EQ(out.find('\r'), std::string::npos);
}

TEST_F(FakeVmmTest, MigrateOnTtyRedrawsOneLine) {
  vmm_.script = CompletedScript();
  Serve();
  std::string out, err;
  EXPECT_EQ(Vmmctl({"migrate", "--to", "/tmp/d.sock"}, &out, &err, /*tty=*/true), 0) << err;
  EXPECT_THAT(out, HasSubstr("\r" + FormatMigrationProgressLine(vmm_.script[5]) + "\x1b[K\n" +
                             FormatMigrationSummary(vmm_.script[5])));
  // Every snapshot redrawn in place: one '\r' each, newlines only before the summary.
  EXPECT_EQ(std::count(out.begin(), out.end(), '\r'), 6);
  EXPECT_THAT(out, HasSubstr(" SETUP "));
}

TEST_F(FakeVmmTest, MigrateJsonPrintsOnlyTheFinalProgress) {
  vmm_.script = CompletedScript();
  Serve();
  std::string out, err;
  EXPECT_EQ(Vmmctl({"migrate", "--to", "/tmp/d.sock", "--json"}, &out, &err), 0) << err;
  EXPECT_EQ(out, FormatMigrationProgressJson(vmm_.script[5]));
  EXPECT_EQ(err, "");
}

TEST_F(FakeVmmTest, MigrateFailedExits1WithTheError) {
  MigrationProgress failed = Progress(MIGRATION_FAILED, 0);
  failed.set_error("destination refused the header");
  failed.set_elapsed_ms(30);
  vmm_.script = {Progress(MIGRATION_SETUP, 0), failed};
  Serve();
  std::string out, err;
  EXPECT_EQ(Vmmctl({"migrate", "--to", "/tmp/d.sock"}, &out, &err), 1);
  EXPECT_EQ(err, "vmmctl: migration FAILED: destination refused the header\n");
  EXPECT_THAT(out, HasSubstr(FormatMigrationSummary(failed)));

  EXPECT_EQ(Vmmctl({"migrate", "--to", "/tmp/d.sock", "--json"}, &out, &err), 1);
  EXPECT_EQ(out, FormatMigrationProgressJson(failed));
  EXPECT_EQ(err, "vmmctl: migration FAILED: destination refused the header\n");
}

TEST_F(FakeVmmTest, MigrateStreamEndingEarlyIsAnError) {
  vmm_.script = {Progress(MIGRATION_PRECOPY, 0)};
  vmm_.watch_status = grpc::Status(grpc::StatusCode::UNAVAILABLE, "VMM going away");
  Serve();
  std::string out, err;
  EXPECT_EQ(Vmmctl({"migrate", "--to", "/tmp/d.sock"}, &out, &err), 1);
  EXPECT_EQ(err, absl::StrCat("vmmctl: UNAVAILABLE: lost the progress of migration "
                              "0123456789abcdef from the VMM at '",
                              socket_,
                              "': VMM going away (it may still be running: see 'vmmctl "
                              "migrate-status')\n"));
  EXPECT_THAT(out, HasSubstr(FormatMigrationSummary(vmm_.script[0])));  // the last known state

  vmm_.watch_status = grpc::Status::OK;  // ends cleanly, but without a terminal phase
  EXPECT_EQ(Vmmctl({"migrate", "--to", "/tmp/d.sock"}, &out, &err), 1);
  EXPECT_THAT(err, HasSubstr("the progress stream ended before the migration did"));
}

TEST_F(FakeVmmTest, MigrateStartErrorAndNoWait) {
  vmm_.start_status = grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                                   "cannot migrate: the VM is PAUSED (migration needs RUNNING)");
  Serve();
  std::string out, err;
  EXPECT_EQ(Vmmctl({"migrate", "--to", "/tmp/d.sock"}, &out, &err), 1);
  EXPECT_EQ(out, "");
  EXPECT_EQ(err,
            "vmmctl: FAILED_PRECONDITION: cannot migrate: the VM is PAUSED (migration needs "
            "RUNNING)\n");
  EXPECT_TRUE(vmm_.watch_intervals().empty());

  vmm_.start_status = grpc::Status::OK;
  EXPECT_EQ(Vmmctl({"migrate", "--to", "/tmp/d.sock", "--no-wait"}, &out, &err), 0) << err;
  EXPECT_EQ(out,
            "migration 0123456789abcdef to /tmp/d.sock started (follow it with 'vmmctl "
            "migrate-status')\n");
  EXPECT_EQ(Vmmctl({"migrate", "--to", "/tmp/d.sock", "--no-wait", "--json"}, &out, &err), 0);
  EXPECT_THAT(out, HasSubstr("\"migration_id\": \"0123456789abcdef\""));
  EXPECT_TRUE(vmm_.watch_intervals().empty());  // --no-wait never watches
}

TEST_F(FakeVmmTest, MigrateStatusReadsOneMessage) {
  MigrationProgress running = Progress(MIGRATION_PRECOPY, 2);
  running.set_remaining_pages(100);
  vmm_.script = std::vector<MigrationProgress>(50, running);  // would stream for a while
  vmm_.step = absl::Milliseconds(50);
  Serve();
  std::string out, err;
  const absl::Time start = absl::Now();
  EXPECT_EQ(Vmmctl({"migrate-status"}, &out, &err), 0) << err;
  EXPECT_LT(absl::Now() - start, absl::Seconds(2));  // did not wait for the whole stream
  EXPECT_EQ(out, FormatMigrationSummary(running));
  EXPECT_EQ(err, "");
  EXPECT_EQ(Vmmctl({"migrate-status", "--json"}, &out, &err), 0) << err;
  EXPECT_EQ(out, FormatMigrationProgressJson(running));
  EXPECT_THAT(vmm_.has_deadline(), ElementsAre(true, true));  // status keeps --timeout

  vmm_.script.clear();  // no message at all
  vmm_.watch_status =
      grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "no migration has been started");
  EXPECT_EQ(Vmmctl({"migrate-status"}, &out, &err), 1);
  EXPECT_EQ(out, "");
  EXPECT_EQ(err, "vmmctl: FAILED_PRECONDITION: no migration has been started\n");
}

TEST_F(FakeVmmTest, CancelAndReceive) {
  Serve();
  std::string out, err;
  EXPECT_EQ(Vmmctl({"migrate-cancel"}, &out, &err), 1);
  EXPECT_EQ(err, "vmmctl: FAILED_PRECONDITION: no migration is running\n");
  EXPECT_EQ(vmm_.cancels(), 1);

  EXPECT_EQ(Vmmctl({"receive", "--listen", "in.sock", "--serial", "file:g.log"}, &out, &err), 0)
      << err;
  EXPECT_EQ(out, "");
  ASSERT_EQ(vmm_.receive_requests().size(), 1u);
  const ReceiveMigrationRequest r = vmm_.receive_requests()[0];
  EXPECT_TRUE(absl::StartsWith(r.listen_address(), "/")) << r.listen_address();
  EXPECT_TRUE(absl::EndsWith(r.listen_address(), "/in.sock")) << r.listen_address();
  EXPECT_EQ(r.serial().mode(), SerialConfig::FILE);
  EXPECT_TRUE(absl::EndsWith(r.serial().path(), "/g.log")) << r.serial().path();
}

TEST(ParseArgs, AttachVfioUser) {
  absl::StatusOr<Options> o = Parse({"--socket", "/s", "attach", "--vfio-user", "dev.sock"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(*o->command, Command::kAttach);
  EXPECT_EQ(CommandFromName("attach"), Command::kAttach);
  EXPECT_EQ(o->attach.vfio_user().socket(), "dev.sock");
  EXPECT_EQ(o->config.vfio_user_size(), 0);  // not a create flag here
  const AttachDeviceRequest r = BuildAttachDeviceRequest(o->attach, "/work/dir");
  EXPECT_EQ(r.vfio_user().socket(), "/work/dir/dev.sock");
  EXPECT_EQ(BuildAttachDeviceRequest(o->attach, "/x").vm_id(), "");
  o = Parse({"--socket", "/s", "attach", "--vfio-user", "/abs/dev.sock"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(BuildAttachDeviceRequest(o->attach, "/w").vfio_user().socket(), "/abs/dev.sock");

  EXPECT_THAT(ParseError({"--socket", "/s", "attach"}), HasSubstr("missing --vfio-user SOCKET"));
  EXPECT_THAT(ParseError({"--socket", "/s", "attach", "--rng"}), HasSubstr("--rng"));
  EXPECT_THAT(GeneralHelp(), HasSubstr("attach"));
  EXPECT_THAT(CommandHelp(Command::kAttach), HasSubstr("--vfio-user SOCKET"));
  EXPECT_THAT(CommandHelp(Command::kAttach), HasSubstr("not supported"));
}

TEST(ParseArgs, AttachVfio) {
  absl::StatusOr<Options> o =
      Parse({"--socket", "/s", "attach", "--vfio", "/sys/bus/pci/devices/0000:3b:00.0"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(*o->command, Command::kAttach);
  EXPECT_TRUE(o->attach.has_vfio());
  EXPECT_FALSE(o->attach.has_vfio_user());
  EXPECT_EQ(o->config.vfio_size(), 0);  // not a create flag here
  // A sysfs path or a bare PCI address is not a file of the client: never made absolute.
  const AttachDeviceRequest r = BuildAttachDeviceRequest(o->attach, "/work/dir");
  EXPECT_EQ(r.vfio().sysfs_path(), "/sys/bus/pci/devices/0000:3b:00.0");
  EXPECT_EQ(r.vfio().pci_slot(), 0u);  // the VMM picks it
  o = Parse({"--socket", "/s", "attach", "--vfio=0000:3b:00.0"});
  ASSERT_TRUE(o.ok()) << o.status();
  EXPECT_EQ(BuildAttachDeviceRequest(o->attach, "/w").vfio().sysfs_path(), "0000:3b:00.0");

  EXPECT_THAT(ParseError({"--socket", "/s", "attach"}), HasSubstr("--vfio PATH"));
  EXPECT_THAT(ParseError({"--socket", "/s", "attach", "--vfio", "0000:3b:00.0", "--vfio-user",
                          "d.sock"}),
              HasSubstr("one of --vfio-user and --vfio"));
  EXPECT_THAT(ParseError({"--socket", "/s", "attach", "--vfio", "0000:3b:00.0", "--vfio",
                          "0000:3b:00.1"}),
              HasSubstr("given twice"));
  EXPECT_THAT(ParseError({"--socket", "/s", "attach", "--vfio", ""}), HasSubstr("--vfio"));
  EXPECT_THAT(CommandHelp(Command::kAttach), HasSubstr("--vfio PATH"));
  EXPECT_THAT(CommandHelp(Command::kAttach), HasSubstr("balloon"));
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
