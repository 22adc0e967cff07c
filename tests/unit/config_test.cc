// Unit tests of ValidateAndDefaultConfig (vmm/vm.h): limits, exactly-one-guest rule, file checks,
// built-in test guest names and the defaults it fills in. Builds nothing, needs no KVM.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/guest/embedded.h"
#include "vmm/cli.h"
#include "vmm/vm.h"

namespace microvmm {
namespace {

using ::testing::HasSubstr;

class ConfigTest : public testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::TempDir();
    if (dir_.empty() || dir_.back() != '/') dir_ += "/";
    kernel_ = dir_ + "config_test_kernel.bin";
    std::ofstream(kernel_) << "not really a kernel";
    initrd_ = dir_ + "config_test_initrd.img";
    std::ofstream(initrd_) << "initrd";
  }
  void TearDown() override {
    ::unlink(kernel_.c_str());
    ::unlink(initrd_.c_str());
  }

  VmConfig TestGuestConfig() {
    VmConfig c;
    c.set_vcpus(1);
    c.set_memory_mib(64);
    c.set_test_guest("hello");
    return c;
  }
  VmConfig KernelConfig() {
    VmConfig c;
    c.set_vcpus(2);
    c.set_memory_mib(128);
    c.set_kernel(kernel_);
    return c;
  }
  static void ExpectInvalid(VmConfig c, const char* why) {
    absl::Status s = ValidateAndDefaultConfig(c);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << why << ": " << s;
  }

  std::string dir_, kernel_, initrd_;
};

uint64_t HostMemTotalMibForTest() {
  std::ifstream f("/proc/meminfo");
  std::string key, unit;
  uint64_t kb = 0;
  while (f >> key >> kb >> unit)
    if (key == "MemTotal:") return kb / 1024;
  return 0;
}

TEST_F(ConfigTest, ValidTestGuest) {
  VmConfig c = TestGuestConfig();
  absl::Status s = ValidateAndDefaultConfig(c);
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_EQ(c.serial().mode(), SerialConfig::STDOUT) << "unspecified serial defaults to stdout";
  EXPECT_TRUE(c.cmdline().empty()) << "no kernel command line for a test guest";
}

TEST_F(ConfigTest, ValidKernelGetsDefaults) {
  VmConfig c = KernelConfig();
  absl::Status s = ValidateAndDefaultConfig(c);
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_EQ(c.serial().mode(), SerialConfig::STDOUT);
  // The only console is the 8250 at ttyS0; a default command line must send output there.
  EXPECT_THAT(c.cmdline(), HasSubstr("console=ttyS0"));
  // ...and it is the default the usage text documents.
  EXPECT_THAT(VmmUsage(), HasSubstr("\"" + c.cmdline() + "\""));
}

TEST_F(ConfigTest, ExplicitValuesPreserved) {
  VmConfig c = KernelConfig();
  c.set_cmdline("root=/dev/vda");
  c.set_initrd(initrd_);
  c.mutable_serial()->set_mode(SerialConfig::NONE);
  ASSERT_TRUE(ValidateAndDefaultConfig(c).ok());
  EXPECT_EQ(c.cmdline(), "root=/dev/vda");
  EXPECT_EQ(c.serial().mode(), SerialConfig::NONE);
}

TEST_F(ConfigTest, VcpuLimits) {
  VmConfig c = KernelConfig();
  c.set_vcpus(0);
  ExpectInvalid(c, "0 vCPUs");
  c.set_vcpus(255);  // MP table: APIC ids 0..254, 255 is broadcast
  ExpectInvalid(c, "255 vCPUs");
  c.set_vcpus(254);
  EXPECT_TRUE(ValidateAndDefaultConfig(c).ok());
  c.set_vcpus(1);
  EXPECT_TRUE(ValidateAndDefaultConfig(c).ok());
}

TEST_F(ConfigTest, TestGuestVcpuLimit) {
  VmConfig c = TestGuestConfig();
  c.set_vcpus(64);
  EXPECT_TRUE(ValidateAndDefaultConfig(c).ok());
  c.set_vcpus(65);
  ExpectInvalid(c, "65 vCPUs for a test guest (documented max 64)");
}

TEST_F(ConfigTest, MemoryLimits) {
  VmConfig c = TestGuestConfig();
  c.set_memory_mib(15);
  ExpectInvalid(c, "15 MiB < 16");
  c.set_memory_mib(0);
  ExpectInvalid(c, "0 MiB");
  c.set_memory_mib(16);
  EXPECT_TRUE(ValidateAndDefaultConfig(c).ok());
  c.set_memory_mib(17);
  ExpectInvalid(c, "odd MiB");
  c.set_memory_mib(129);
  ExpectInvalid(c, "odd MiB");
}

TEST_F(ConfigTest, MemoryAboveHostRejected) {
  uint64_t host = HostMemTotalMibForTest();
  ASSERT_GT(host, 0u);
  VmConfig c = TestGuestConfig();
  c.set_memory_mib((host + 2) & ~1ULL);  // even, above MemTotal
  ExpectInvalid(c, "more than host RAM");
  c.set_memory_mib(1ULL << 40);
  ExpectInvalid(c, "absurd size");
}

TEST_F(ConfigTest, ExactlyOneGuest) {
  VmConfig neither;
  neither.set_vcpus(1);
  neither.set_memory_mib(64);
  ExpectInvalid(neither, "neither kernel nor test guest");
  VmConfig both = KernelConfig();
  both.set_test_guest("hello");
  ExpectInvalid(both, "both kernel and test guest");
}

TEST_F(ConfigTest, KernelFileChecks) {
  VmConfig c = KernelConfig();
  c.set_kernel(dir_ + "does-not-exist/bzImage");
  ExpectInvalid(c, "missing kernel");
  c.set_kernel(dir_);
  ExpectInvalid(c, "kernel is a directory");
  c.set_kernel("/dev/null");
  ExpectInvalid(c, "kernel is a character device");
}

TEST_F(ConfigTest, UnreadableKernelRejected) {
  if (::geteuid() == 0) GTEST_SKIP() << "root can read mode-000 files";
  ASSERT_EQ(::chmod(kernel_.c_str(), 0), 0);
  ExpectInvalid(KernelConfig(), "unreadable kernel");
}

TEST_F(ConfigTest, InitrdFileChecks) {
  VmConfig c = KernelConfig();
  c.set_initrd(dir_ + "nope.img");
  ExpectInvalid(c, "missing initrd");
  c.set_initrd(dir_);
  ExpectInvalid(c, "initrd is a directory");
}

TEST_F(ConfigTest, LinuxOnlyFieldsWithTestGuest) {
  VmConfig c = TestGuestConfig();
  c.set_initrd(initrd_);
  ExpectInvalid(c, "initrd with a test guest");
  c = TestGuestConfig();
  c.set_cmdline("quiet");
  ExpectInvalid(c, "cmdline with a test guest");
  c = KernelConfig();
  c.set_test_guest_args("mib=8");
  ExpectInvalid(c, "test_guest_args with a kernel");
}

TEST_F(ConfigTest, UnknownTestGuestListsBuiltIns) {
  VmConfig c = TestGuestConfig();
  c.set_test_guest("no-such-guest");
  absl::Status s = ValidateAndDefaultConfig(c);
  ASSERT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  std::vector<std::string> names = testguest::Names();
  ASSERT_FALSE(names.empty());
  for (const std::string& n : names) EXPECT_THAT(std::string(s.message()), HasSubstr(n));
  // Every advertised name is itself accepted.
  for (const std::string& n : names) {
    VmConfig ok = TestGuestConfig();
    ok.set_test_guest(n);
    EXPECT_TRUE(ValidateAndDefaultConfig(ok).ok()) << n;
  }
}

TEST_F(ConfigTest, TestGuestByPath) {
  VmConfig c = TestGuestConfig();
  c.set_test_guest(kernel_);  // any readable regular file is a flat binary candidate
  EXPECT_TRUE(ValidateAndDefaultConfig(c).ok());
  c.set_test_guest(dir_ + "missing/guest.bin");
  ExpectInvalid(c, "missing test guest file");
  c.set_test_guest(dir_);
  ExpectInvalid(c, "test guest path is a directory");
}

TEST_F(ConfigTest, SerialFileNeedsPath) {
  VmConfig c = TestGuestConfig();
  c.mutable_serial()->set_mode(SerialConfig::FILE);
  ExpectInvalid(c, "FILE without path");
  c.mutable_serial()->set_path(dir_ + "serial.log");
  EXPECT_TRUE(ValidateAndDefaultConfig(c).ok());
  EXPECT_EQ(c.serial().mode(), SerialConfig::FILE);
}

TEST_F(ConfigTest, DeviceConfigChecks) {
  auto with = [&](auto edit) {
    VmConfig c = TestGuestConfig();
    edit(c);
    return c;
  };
  VmConfig ok = with([&](VmConfig& c) {
    c.add_disks()->set_path(kernel_);
    c.add_nets()->set_tap("tap0");
    c.mutable_balloon()->set_target_mib(32);
    c.mutable_vsock()->set_guest_cid(3);
    c.mutable_vsock()->set_uds_path(dir_ + "v.sock");
  });
  EXPECT_TRUE(ValidateAndDefaultConfig(ok).ok());
  ExpectInvalid(with([&](VmConfig& c) { c.add_disks(); }), "disk without path");
  ExpectInvalid(with([&](VmConfig& c) {
                  c.add_disks()->set_path(kernel_);
                  c.add_disks()->set_path(dir_ + "./config_test_kernel.bin");
                }),
                "same file twice");
  ExpectInvalid(with([&](VmConfig& c) {
                  DiskConfig* d = c.add_disks();
                  d->set_path(kernel_);
                  d->set_serial(std::string(21, 's'));
                }),
                "serial > 20 bytes");
  ExpectInvalid(with([&](VmConfig& c) {
                  c.add_nets()->set_tap("tap0");
                  c.add_nets()->set_tap("tap0");
                }),
                "tap twice");
  ExpectInvalid(with([&](VmConfig& c) {
                  NetConfig* a = c.add_nets();
                  a->set_tap("tap0");
                  a->set_mac("52:54:00:00:00:01");
                  NetConfig* b = c.add_nets();
                  b->set_tap("tap1");
                  b->set_mac("52:54:00:00:00:01");
                }),
                "MAC twice");
  ExpectInvalid(with([&](VmConfig& c) {
                  NetConfig* a = c.add_nets();
                  a->set_tap("tap0");
                  a->set_mac("52:54:00:12:34:56");
                  NetConfig* b = c.add_nets();
                  b->set_tap("tap1");
                  b->set_mac("52-54-00-12-34-56");
                }),
                "same MAC in another notation");
  ExpectInvalid(with([&](VmConfig& c) {
                  NetConfig* a = c.add_nets();
                  a->set_tap("tap0");
                  a->set_mac("01:00:5e:00:00:01");
                }),
                "multicast MAC");
  ExpectInvalid(with([&](VmConfig& c) { c.mutable_balloon()->set_target_mib(64); }),
                "balloon as big as RAM");
  for (uint32_t cid : {0u, 1u, 2u, 0xffffffffu}) {
    ExpectInvalid(with([&](VmConfig& c) {
                    c.mutable_vsock()->set_guest_cid(cid);
                    c.mutable_vsock()->set_uds_path(dir_ + "v.sock");
                  }),
                  "reserved CID");
  }
  ExpectInvalid(with([&](VmConfig& c) { c.mutable_vsock()->set_guest_cid(3); }), "no uds path");
}

}  // namespace
}  // namespace microvmm
