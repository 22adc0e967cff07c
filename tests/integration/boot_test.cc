// KVM integration tests: the real `vmm` binary boots the freestanding test guests.
#include <signal.h>

#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/util/subprocess.h"

namespace microvmm::testing {
namespace {

struct Result {
  std::optional<int> status;
  std::string serial;
  std::string stderr_text;
};

class BootTest : public ::testing::Test {
 protected:
  Result RunVmm(std::vector<std::string> flags, absl::Duration timeout = absl::Seconds(60)) {
    std::vector<std::string> argv = {Runfile("vmm/vmm"), "--serial", "file:" + dir_.File("serial")};
    argv.insert(argv.end(), flags.begin(), flags.end());
    Subprocess p(argv, dir_.File("stdout"), dir_.File("stderr"));
    Result r;
    r.status = p.Wait(timeout);
    r.serial = ReadFileOrEmpty(dir_.File("serial"));
    r.stderr_text = ReadFileOrEmpty(dir_.File("stderr"));
    return r;
  }
  TempDir dir_;
};

TEST_F(BootTest, HelloPrintsAndExitsZero) {
  REQUIRE_KVM();
  Result r = RunVmm({"--test-guest", "hello"});
  ASSERT_TRUE(r.status.has_value()) << "vmm did not exit";
  EXPECT_EQ(*r.status, 0) << r.stderr_text;
  EXPECT_EQ(r.serial, "hello from guest\n");
}

TEST_F(BootTest, SmpCountsOnEveryVcpu) {
  REQUIRE_KVM();
  for (int n : {2, 4}) {
    std::remove(dir_.File("serial").c_str());
    Result r = RunVmm({"--test-guest", "smp", "--vcpus", std::to_string(n), "--test-guest-args",
                       "iters=500"});
    ASSERT_TRUE(r.status.has_value());
    EXPECT_EQ(*r.status, 0) << r.stderr_text << r.serial;
    for (int i = 0; i < n; ++i)
      EXPECT_NE(r.serial.find("cpu " + std::to_string(i) + " count 500\n"), std::string::npos)
          << "vCPU " << i << " of " << n << " missing in:\n" << r.serial;
    EXPECT_NE(r.serial.find("smp ok ncpus=" + std::to_string(n)), std::string::npos) << r.serial;
  }
}

TEST_F(BootTest, MemwalkVerifiesEveryGeneration) {
  REQUIRE_KVM();
  Result r = RunVmm({"--test-guest", "memwalk", "--vcpus", "2", "--memory", "64",
                     "--test-guest-args", "mib=4 gens=4"});
  ASSERT_TRUE(r.status.has_value());
  EXPECT_EQ(*r.status, 0) << r.stderr_text << r.serial;
  for (int g = 1; g <= 4; ++g)
    EXPECT_NE(r.serial.find("memwalk gen=" + std::to_string(g) + " ok"), std::string::npos);
  EXPECT_NE(r.serial.find("memwalk done gens=4"), std::string::npos);
  EXPECT_EQ(r.serial.find("FAIL"), std::string::npos);
}

TEST_F(BootTest, MemwalkNeedsEnoughRam) {
  REQUIRE_KVM();
  // 16 MiB of RAM cannot hold a region starting at 16 MiB: the guest reports it (status 4).
  Result r = RunVmm({"--test-guest", "memwalk", "--memory", "16", "--test-guest-args", "mib=4"});
  ASSERT_TRUE(r.status.has_value());
  EXPECT_EQ(*r.status, 4) << r.serial;
}

TEST_F(BootTest, PciConf1ShowsTheHostBridge) {
  REQUIRE_KVM();
  Result r = RunVmm({"--test-guest", "pciscan"});
  ASSERT_TRUE(r.status.has_value());
  EXPECT_EQ(*r.status, 0) << r.serial << r.stderr_text;
  EXPECT_NE(r.serial.find("pci 00:0.0 8086:d57 class 60000\n"), std::string::npos) << r.serial;
  EXPECT_NE(r.serial.find("pciscan done 1\n"), std::string::npos) << r.serial;
}

TEST_F(BootTest, GuestDriverReadsVirtioRngOverPci) {
  REQUIRE_KVM();
  // The guest's own minimal virtio driver: conf1 scan, capabilities, VERSION_1, one queue,
  // one request polled to completion (tests/guest/virtiorng.c).
  Result r = RunVmm({"--test-guest", "virtiorng", "--rng", "--memory", "64"});
  ASSERT_TRUE(r.status.has_value());
  EXPECT_EQ(*r.status, 0) << "driver step failed (status 10..20, see virtiorng.c)\n"
                          << r.serial << r.stderr_text;
  EXPECT_NE(r.serial.find("virtio-rng ok len=64"), std::string::npos) << r.serial;
  // Without --rng the device is absent and the driver says so (status 10).
  std::remove(dir_.File("serial").c_str());
  Result none = RunVmm({"--test-guest", "virtiorng", "--memory", "64"});
  ASSERT_TRUE(none.status.has_value());
  EXPECT_EQ(*none.status, 10);
}

TEST_F(BootTest, TestExitStatusPassesThrough) {
  REQUIRE_KVM();
  Result r = RunVmm({"--test-guest", "fault", "--test-guest-args", "mode=exit status=7"});
  ASSERT_TRUE(r.status.has_value());
  EXPECT_EQ(*r.status, 7);
}

TEST_F(BootTest, I8042ResetExitsZero) {
  REQUIRE_KVM();
  Result r = RunVmm({"--test-guest", "fault", "--test-guest-args", "mode=reset"});
  ASSERT_TRUE(r.status.has_value());
  EXPECT_EQ(*r.status, 0) << r.serial << r.stderr_text;
  EXPECT_NE(r.serial.find("fault: i8042 reset"), std::string::npos);
  EXPECT_EQ(r.serial.find("still running"), std::string::npos);
  EXPECT_NE(r.stderr_text.find("i8042"), std::string::npos) << r.stderr_text;
}

TEST_F(BootTest, GuestPanicHasDistinctStatusAndRegisterDump) {
  REQUIRE_KVM();
  Result r = RunVmm({"--test-guest", "fault", "--test-guest-args", "mode=panic"});
  ASSERT_TRUE(r.status.has_value());
  EXPECT_EQ(*r.status, 73);
  EXPECT_NE(r.stderr_text.find("guest panic"), std::string::npos) << r.stderr_text;
  EXPECT_NE(r.stderr_text.find("RIP="), std::string::npos) << r.stderr_text;
}

TEST_F(BootTest, TripleFaultIsAGuestCrashWithRegisterDump) {
  REQUIRE_KVM();
  Result r = RunVmm({"--test-guest", "fault", "--test-guest-args", "mode=triple"});
  ASSERT_TRUE(r.status.has_value());
  EXPECT_EQ(*r.status, 71);
  EXPECT_NE(r.stderr_text.find("triple fault"), std::string::npos) << r.stderr_text;
  EXPECT_NE(r.stderr_text.find("CR3="), std::string::npos) << r.stderr_text;
}

TEST_F(BootTest, SigtermShutsDownCleanly) {
  REQUIRE_KVM();
  std::vector<std::string> argv = {Runfile("vmm/vmm"), "--serial", "file:" + dir_.File("serial"),
                                   "--test-guest", "memwalk", "--memory", "64",
                                   "--test-guest-args", "mib=2"};
  Subprocess p(argv, dir_.File("stdout"), dir_.File("stderr"));
  ASSERT_TRUE(WaitForFileContains(dir_.File("serial"), "memwalk gen=2 ok", absl::Seconds(30)));
  p.Signal(SIGTERM);
  auto st = p.Wait(absl::Seconds(10));
  ASSERT_TRUE(st.has_value()) << "vmm ignored SIGTERM";
  EXPECT_EQ(*st, 0);
}

// Bad input: one clear error line, status 1, nothing started.
class BadInputTest : public BootTest {
 protected:
  void ExpectRejected(std::vector<std::string> flags, const std::string& needle) {
    Result r = RunVmm(flags, absl::Seconds(20));
    ASSERT_TRUE(r.status.has_value());
    EXPECT_EQ(*r.status, 1) << r.stderr_text;
    EXPECT_NE(r.stderr_text.find("vmm: error: "), std::string::npos) << r.stderr_text;
    EXPECT_NE(r.stderr_text.find(needle), std::string::npos) << r.stderr_text;
    EXPECT_EQ(CountOccurrences(r.stderr_text, "\n"), 1) << "not one line:\n" << r.stderr_text;
    EXPECT_EQ(r.serial, "") << "guest output despite the error";
  }
};

TEST_F(BadInputTest, MissingKernel) {
  ExpectRejected({"--kernel", dir_.File("nope")}, "No such file");
}

TEST_F(BadInputTest, CorruptKernel) {
  REQUIRE_KVM();  // the image is only parsed once KVM objects exist
  {
    FILE* f = fopen(dir_.File("bzImage").c_str(), "w");
    std::string junk(8192, 'x');
    fwrite(junk.data(), 1, junk.size(), f);
    fclose(f);
  }
  ExpectRejected({"--kernel", dir_.File("bzImage")}, "kernel image");
}

TEST_F(BadInputTest, UnreadableInitrd) {
  {
    FILE* f = fopen(dir_.File("k").c_str(), "w");
    fputs("x", f);
    fclose(f);
  }
  ExpectRejected({"--kernel", dir_.File("k"), "--initrd", dir_.File("missing-initrd")}, "initrd");
}

TEST_F(BadInputTest, UnknownFlag) { ExpectRejected({"--frobnicate", "1"}, "unknown flag"); }

TEST_F(BadInputTest, ZeroVcpus) {
  ExpectRejected({"--test-guest", "hello", "--vcpus", "0"}, "vcpus");
}

TEST_F(BadInputTest, MoreMemoryThanTheHost) {
  ExpectRejected({"--test-guest", "hello", "--memory", "4096G"}, "more than the host");
}

TEST_F(BadInputTest, UnknownTestGuest) {
  ExpectRejected({"--test-guest", "nosuchguest"}, "hello");
}

}  // namespace
}  // namespace microvmm::testing
