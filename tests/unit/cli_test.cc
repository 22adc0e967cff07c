// Unit tests of vmm/cli.h: the `vmm` command line (ParseVmmArgs, ParseSerialSpec, ParseMemoryMib)
// and that VmmUsage() documents exactly what the parser accepts.
#include "vmm/cli.h"

#include <map>
#include <regex>
#include <set>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace microvmm {
namespace {

using ::testing::HasSubstr;
using Args = std::vector<std::string>;

void ExpectInvalid(const Args& a) {
  auto r = ParseVmmArgs(a);
  std::string joined;
  for (const auto& s : a) joined += "[" + s + "] ";
  ASSERT_FALSE(r.ok()) << joined;
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << joined << r.status();
}

TEST(ParseVmmArgsTest, KernelWithMachineFlags) {
  auto r = ParseVmmArgs({"--kernel", "/boot/bzImage", "--initrd", "/boot/initrd", "--cmdline",
                         "console=ttyS0 quiet", "--vcpus", "4", "--memory", "512", "--serial",
                         "file:/tmp/console.log", "--log-level", "debug"});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(r->has_vm);
  EXPECT_FALSE(r->help);
  EXPECT_EQ(r->config.kernel(), "/boot/bzImage");
  EXPECT_EQ(r->config.initrd(), "/boot/initrd");
  EXPECT_EQ(r->config.cmdline(), "console=ttyS0 quiet");
  EXPECT_EQ(r->config.vcpus(), 4u);
  EXPECT_EQ(r->config.memory_mib(), 512u);
  EXPECT_EQ(r->config.serial().mode(), SerialConfig::FILE);
  EXPECT_EQ(r->config.serial().path(), "/tmp/console.log");
  EXPECT_EQ(r->log_level, "debug");
  EXPECT_TRUE(r->api_socket.empty());
}

TEST(ParseVmmArgsTest, Defaults) {
  auto r = ParseVmmArgs({"--test-guest", "hello"});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(r->has_vm);
  EXPECT_EQ(r->config.test_guest(), "hello");
  // Documented defaults: 1 vCPU, 128 MiB, serial to stdout, log level info.
  EXPECT_EQ(r->config.vcpus(), 1u);
  EXPECT_EQ(r->config.memory_mib(), 128u);
  EXPECT_EQ(r->config.serial().mode(), SerialConfig::STDOUT);
  EXPECT_EQ(r->log_level, "info");
}

TEST(ParseVmmArgsTest, TestGuestWithArgsAndApiSocket) {
  auto r = ParseVmmArgs({"--test-guest", "memwalk", "--test-guest-args", "mib=8 gens=10",
                         "--api-socket", "/run/vmm.sock"});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(r->has_vm);
  EXPECT_EQ(r->config.test_guest_args(), "mib=8 gens=10");
  EXPECT_EQ(r->api_socket, "/run/vmm.sock");
}

TEST(ParseVmmArgsTest, ApiSocketAloneIsEnough) {
  auto r = ParseVmmArgs({"--api-socket", "/run/vmm.sock"});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_FALSE(r->has_vm);
  EXPECT_EQ(r->api_socket, "/run/vmm.sock");
}

TEST(ParseVmmArgsTest, EqualsForm) {
  auto r = ParseVmmArgs({"--kernel=/k", "--memory=1G", "--vcpus=2", "--serial=none",
                         "--cmdline=root=/dev/vda console=ttyS0"});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->config.kernel(), "/k");
  EXPECT_EQ(r->config.memory_mib(), 1024u);
  EXPECT_EQ(r->config.vcpus(), 2u);
  EXPECT_EQ(r->config.serial().mode(), SerialConfig::NONE);
  // Only the first '=' separates flag and value.
  EXPECT_EQ(r->config.cmdline(), "root=/dev/vda console=ttyS0");
}

TEST(ParseVmmArgsTest, ValueMayLookLikeAFlag) {
  auto r = ParseVmmArgs({"--kernel", "/k", "--cmdline", "--foo"});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->config.cmdline(), "--foo");
}

TEST(ParseVmmArgsTest, Help) {
  for (const char* h : {"-h", "--help"}) {
    auto r = ParseVmmArgs({h});
    ASSERT_TRUE(r.ok()) << h << ": " << r.status();
    EXPECT_TRUE(r->help);
  }
}

TEST(ParseVmmArgsTest, UnknownFlag) {
  ExpectInvalid({"--kernel", "/k", "--bogus", "1"});
  ExpectInvalid({"--kernel", "/k", "--bogus=1"});
  ExpectInvalid({"--kernel", "/k", "--kern", "/x"});  // no prefix matching
  ExpectInvalid({"--kernel", "/k", "-kernel", "/x"});
  auto r = ParseVmmArgs({"--kernel", "/k", "--frobnicate"});
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("--frobnicate"));
}

TEST(ParseVmmArgsTest, PositionalArgumentRejected) {
  ExpectInvalid({"--kernel", "/k", "extra"});
  ExpectInvalid({"bzImage"});
}

TEST(ParseVmmArgsTest, MissingValue) {
  for (const char* f : {"--kernel", "--initrd", "--cmdline", "--test-guest", "--test-guest-args",
                        "--vcpus", "--memory", "--serial", "--api-socket", "--log-level",
                        "--dirty-tracking", "--prefill", "--tls-cert", "--tls-key", "--tls-ca",
                        "--incoming"}) {
    SCOPED_TRACE(f);
    ExpectInvalid({"--test-guest", "hello", f});
  }
}

TEST(ParseVmmArgsTest, BadVcpus) {
  for (const char* v : {"two", "", "-1", "-0", "1.5", "4x", "0x4", "99999999999"}) {
    SCOPED_TRACE(v);
    ExpectInvalid({"--test-guest", "hello", "--vcpus", v});
  }
}

TEST(ParseVmmArgsTest, MemorySizes) {
  auto r = ParseVmmArgs({"--test-guest", "hello", "--memory", "2G"});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->config.memory_mib(), 2048u);
  r = ParseVmmArgs({"--test-guest", "hello", "--memory", "256M"});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->config.memory_mib(), 256u);
  ExpectInvalid({"--test-guest", "hello", "--memory", "12x"});
  ExpectInvalid({"--test-guest", "hello", "--memory", "-64"});
}

TEST(ParseVmmArgsTest, BadSerial) {
  ExpectInvalid({"--test-guest", "hello", "--serial", "file:"});
  ExpectInvalid({"--test-guest", "hello", "--serial", "tty"});
  ExpectInvalid({"--test-guest", "hello", "--serial", ""});
}

TEST(ParseVmmArgsTest, Incoming) {
  auto r = ParseVmmArgs({"--incoming", "127.0.0.1:4444", "--serial", "none"});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->incoming, "127.0.0.1:4444");
  EXPECT_FALSE(r->has_vm);
  ExpectInvalid({"--incoming", "/tmp/x.sock", "--test-guest", "hello"});  // guest comes by migration
}

TEST(ParseVmmArgsTest, DirtyTracking) {
  auto r = ParseVmmArgs({"--test-guest", "hello", "--dirty-tracking", "ring"});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->config.dirty_tracking(), VmConfig::DIRTY_RING);
  r = ParseVmmArgs({"--test-guest", "hello", "--dirty-tracking", "bitmap"});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->config.dirty_tracking(), VmConfig::DIRTY_BITMAP);
  ExpectInvalid({"--test-guest", "hello", "--dirty-tracking", "pml"});
}

TEST(ParseVmmArgsTest, BadLogLevel) {
  ExpectInvalid({"--test-guest", "hello", "--log-level", "verbose"});
  for (const char* l : {"debug", "info", "warn", "error"}) {
    auto r = ParseVmmArgs({"--test-guest", "hello", "--log-level", l});
    ASSERT_TRUE(r.ok()) << l;
    EXPECT_EQ(r->log_level, l);
  }
}

TEST(ParseVmmArgsTest, EmptyApiSocket) {
  ExpectInvalid({"--api-socket", ""});
  ExpectInvalid({"--test-guest", "hello", "--api-socket="});
}

TEST(ParseVmmArgsTest, NothingToDo) {
  ExpectInvalid({});
  ExpectInvalid({"--vcpus", "2", "--memory", "256"});
  ExpectInvalid({"--serial", "none"});
}

TEST(ParseVmmArgsTest, InitrdOrCmdlineWithoutKernel) {
  ExpectInvalid({"--initrd", "/i", "--api-socket", "/s"});
  ExpectInvalid({"--cmdline", "quiet", "--api-socket", "/s"});
}

TEST(ParseSerialSpecTest, Modes) {
  auto s = ParseSerialSpec("stdout");
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->mode(), SerialConfig::STDOUT);
  s = ParseSerialSpec("none");
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->mode(), SerialConfig::NONE);
  s = ParseSerialSpec("file:/var/log/guest.log");
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->mode(), SerialConfig::FILE);
  EXPECT_EQ(s->path(), "/var/log/guest.log");
  s = ParseSerialSpec("file:relative:with:colons");
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->path(), "relative:with:colons");
}

TEST(ParseSerialSpecTest, Errors) {
  for (const char* bad : {"", "file:", "file", "FILE:/x", "stdout ", "null", "/tmp/x"}) {
    auto s = ParseSerialSpec(bad);
    ASSERT_FALSE(s.ok()) << "'" << bad << "'";
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  }
}

TEST(ParseMemoryMibTest, Units) {
  struct {
    const char* in;
    uint64_t mib;
  } ok[] = {{"512", 512}, {"512M", 512}, {"512m", 512}, {"2G", 2048},
            {"2g", 2048}, {"1", 1},      {"16G", 16384}};
  for (auto c : ok) {
    auto r = ParseMemoryMib(c.in);
    ASSERT_TRUE(r.ok()) << c.in << ": " << r.status();
    EXPECT_EQ(*r, c.mib) << c.in;
  }
}

TEST(ParseMemoryMibTest, Errors) {
  for (const char* bad : {"", "M", "G", "12x", "12K", "1.5G", "-1", "-1G", "0x10", "2GB", "G2",
                          "99999999999999999999", "18446744073709551615G"}) {
    auto r = ParseMemoryMib(bad);
    EXPECT_FALSE(r.ok()) << "'" << bad << "' parsed as " << (r.ok() ? *r : 0);
  }
}

TEST(ParseMemoryMibTest, GigabyteSuffixNeverWraps) {
  // Whatever the limit, a G value is either rejected or exactly 1024x.
  for (uint64_t g : {1ULL, 1024ULL, 1ULL << 20, 1ULL << 30, (1ULL << 54) + 1, 1ULL << 60}) {
    auto r = ParseMemoryMib(std::to_string(g) + "G");
    if (r.ok()) {
      EXPECT_EQ(*r / 1024, g);
      EXPECT_EQ(*r % 1024, 0u);
    }
  }
}

// Every flag the parser accepts, with a value it accepts. The test checks both directions: each is
// accepted by ParseVmmArgs and documented in VmmUsage(), and every --flag in VmmUsage() is one the
// parser knows.
const std::map<std::string, std::string>& FlagSamples() {
  static const auto* m = new std::map<std::string, std::string>{
      {"--kernel", "/k"},         {"--initrd", "/i"},      {"--cmdline", "quiet"},
      {"--test-guest", "hello"},  {"--test-guest-args", "a=1"}, {"--vcpus", "2"},
      {"--memory", "256"},        {"--serial", "none"},    {"--api-socket", "/run/s"},
      {"--log-level", "warn"},     {"--dirty-tracking", "bitmap"}, {"--prefill", "half"},
      {"--tls-cert", "/c"},        {"--tls-key", "/k"},     {"--tls-ca", "/a"},
      {"--incoming", "/run/in.sock"}, {"--rng", ""},  // "": a switch without a value
      {"--disk", "path=/d.img,ro"}, {"--net", "tap=tap0"}, {"--balloon", "target=64"},
      {"--vsock", "cid=3,uds=/run/v.sock"}, {"--vfio-user", "/run/dev.sock"},
      {"--vfio", "/sys/bus/pci/devices/0000:01:00.0"},
  };
  return *m;
}

bool UsageMentions(const std::string& usage, const std::string& flag) {
  // As a whole word: "--test-guest" must not be satisfied by "--test-guest-args".
  std::regex re("(^|[^-a-z])" + flag + "([^-a-z]|$)");
  return std::regex_search(usage, re);
}

TEST(VmmUsageTest, DocumentsEveryAcceptedFlag) {
  const std::string usage = VmmUsage();
  for (const auto& [flag, value] : FlagSamples()) {
    SCOPED_TRACE(flag);
    // initrd/cmdline only with a kernel; everything also with an API socket so there's work.
    // --incoming receives its guest by migration, so it goes without --kernel.
    Args args = flag == "--incoming" ? Args{flag, value}
                                     : Args{"--kernel", "/k", "--api-socket", "/run/x", flag, value};
    if (value.empty()) args.pop_back();
    auto r = ParseVmmArgs(args);
    EXPECT_TRUE(r.ok()) << r.status();
    EXPECT_TRUE(UsageMentions(usage, flag)) << "usage does not mention " << flag;
  }
  for (const char* h : {"-h", "--help"}) {
    EXPECT_TRUE(ParseVmmArgs({h}).ok());
    EXPECT_TRUE(UsageMentions(usage, h)) << h;
  }
}

TEST(VmmUsageTest, MentionsOnlyRealFlags) {
  const std::string usage = VmmUsage();
  std::regex flag_re("--[a-z][a-z-]*[a-z]");
  std::set<std::string> seen;
  for (auto it = std::sregex_iterator(usage.begin(), usage.end(), flag_re);
       it != std::sregex_iterator(); ++it)
    seen.insert(it->str());
  ASSERT_FALSE(seen.empty());
  for (const std::string& f : seen) {
    if (f == "--help") continue;
    EXPECT_TRUE(FlagSamples().count(f)) << "usage documents " << f
                                        << " which this test (and maybe the parser) doesn't know";
    Args a = {"--kernel", "/k", f, FlagSamples().count(f) ? FlagSamples().at(f) : "x"};
    if (a.back().empty()) a.pop_back();
    auto r = ParseVmmArgs(a);
    if (!r.ok()) {
      EXPECT_THAT(std::string(r.status().message()), ::testing::Not(HasSubstr("unknown")))
          << f << " documented but rejected as unknown";
    }
  }
  // Repeatable device flags accumulate; the single ones refuse a second use.
  auto two = ParseVmmArgs({"--kernel", "/k", "--disk", "/a.img", "--disk", "path=/b.img,ro",
                           "--net", "tap0", "--net", "tap=tap1,mac=52:54:00:00:00:02"});
  ASSERT_TRUE(two.ok()) << two.status();
  ASSERT_EQ(two->config.disks_size(), 2);
  EXPECT_EQ(two->config.disks(1).path(), "/b.img");
  EXPECT_TRUE(two->config.disks(1).read_only());
  ASSERT_EQ(two->config.nets_size(), 2);
  EXPECT_EQ(two->config.nets(1).mac(), "52:54:00:00:00:02");
  auto vfio = ParseVmmArgs({"--kernel", "/k", "--vfio", "/sys/bus/pci/devices/0000:01:00.0",
                            "--vfio", "path=0000:02:00.1"});
  ASSERT_TRUE(vfio.ok()) << vfio.status();
  ASSERT_EQ(vfio->config.vfio_size(), 2);
  EXPECT_EQ(vfio->config.vfio(0).sysfs_path(), "/sys/bus/pci/devices/0000:01:00.0");
  EXPECT_EQ(vfio->config.vfio(1).sysfs_path(), "0000:02:00.1");
  EXPECT_FALSE(ParseVmmArgs({"--kernel", "/k", "--vfio", "path="}).ok());
  EXPECT_FALSE(ParseVmmArgs({"--kernel", "/k", "--balloon", "on", "--balloon", "on"}).ok());
  EXPECT_FALSE(ParseVmmArgs({"--kernel", "/k", "--disk", "path=/a,bogus"}).ok());
  // The parser rejects something the usage doesn't mention.
  EXPECT_FALSE(ParseVmmArgs({"--kernel", "/k", "--not-a-flag", "x"}).ok());
}

}  // namespace
}  // namespace microvmm
