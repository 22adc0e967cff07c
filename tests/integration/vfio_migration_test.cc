// KVM integration tests: live migration of a VM with a passthrough device (issue 6), through the
// real binaries. Each VMM has its own vfio_user_test_server (tests/vfio/user/test_server: a PCI
// DMA engine with VFIO migration v2 and DMA logging); the vfiomig guest has the DEVICE fill
// pages of guest RAM by DMA (the CPU only reads them) and checks after every generation that each
// page holds what the device wrote, and that the device's completed counter and scratch register
// continue (tests/guest/vfiomig.c).
//  - pre-copy: the device's DMA-written pages reach the destination only through its DMA dirty
//    log; its state (registers, counter, scratch page) travels in VmState;
//  - post-copy (pure, and after pre-copy passes): the device runs at the destination only with
//    its DMA targets present (prefetched; doorbells gated), pages still missing are fetched;
//  - a failed migration (destination killed) leaves the device running on the source;
//  - a device without migration support is refused by StartMigration, the VM keeps running;
//  - a destination without its own --vfio-user server is refused at the header.
#include <signal.h>

#include <optional>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "tests/util/subprocess.h"

namespace microvmm::testing {
namespace {

constexpr char kServer[] = "tests/vfio/user/test_server/vfio_user_test_server";

// Highest G of the "vfiomig gen=G ok" lines, 0 if none.
int MaxGen(const std::string& serial) {
  int best = 0;
  for (absl::string_view line : absl::StrSplit(serial, '\n')) {
    if (!absl::ConsumePrefix(&line, "vfiomig gen=")) continue;
    auto sp = line.find(' ');
    int g = 0;
    if (sp != absl::string_view::npos && absl::SimpleAtoi(line.substr(0, sp), &g) && g > best)
      best = g;
  }
  return best;
}

class VfioMigrationTest : public ::testing::Test {
 protected:
  std::string StartServer(const std::string& name, std::vector<std::string> extra = {}) {
    const std::string sock = dir_.File(name);
    std::vector<std::string> argv = {Runfile(kServer), "--socket", sock};
    argv.insert(argv.end(), extra.begin(), extra.end());
    procs_.push_back(
        std::make_unique<Subprocess>(argv, dir_.File(name + ".out"), dir_.File(name + ".err")));
    EXPECT_TRUE(WaitForFileContains(dir_.File(name + ".out"), "READY\n", absl::Seconds(20)))
        << "vfio_user_test_server did not get ready: " << ReadFileOrEmpty(dir_.File(name + ".err"));
    return sock;
  }

  // The source: the vfiomig guest on a device of `sock`, with an API socket.
  Subprocess* StartSource(const std::string& sock, const std::string& guest_args = "pages=192") {
    procs_.push_back(std::make_unique<Subprocess>(
        std::vector<std::string>{Runfile("vmm/vmm"), "--serial", "file:" + dir_.File("src.serial"),
                                 "--memory", "64", "--test-guest", "vfiomig", "--test-guest-args",
                                 guest_args, "--vfio-user", sock, "--api-socket", Api()},
        dir_.File("src.out"), dir_.File("src.err")));
    return procs_.back().get();
  }
  Subprocess* StartDestination(const std::vector<std::string>& flags) {
    std::vector<std::string> argv = {Runfile("vmm/vmm"), "--incoming", DstAddr(), "--serial",
                                     "file:" + dir_.File("dst.serial")};
    argv.insert(argv.end(), flags.begin(), flags.end());
    procs_.push_back(
        std::make_unique<Subprocess>(argv, dir_.File("dst.out"), dir_.File("dst.err")));
    EXPECT_TRUE(WaitForFileContains("/proc/net/unix", dir_.File("dst.sock"), absl::Seconds(20)))
        << ReadFileOrEmpty(dir_.File("dst.err"));
    return procs_.back().get();
  }
  std::string Api() { return dir_.File("api.sock"); }
  std::string DstAddr() { return "unix:" + dir_.File("dst.sock"); }
  std::string SrcSerial() { return ReadFileOrEmpty(dir_.File("src.serial")); }
  std::string DstSerial() { return ReadFileOrEmpty(dir_.File("dst.serial")); }
  std::string Logs() {
    return absl::StrCat("--- src serial\n", SrcSerial(), "--- src err\n",
                        ReadFileOrEmpty(dir_.File("src.err")), "--- dst serial\n", DstSerial(),
                        "--- dst err\n", ReadFileOrEmpty(dir_.File("dst.err")));
  }

  std::optional<int> Ctl(const std::vector<std::string>& args, const std::string& tag,
                         std::string* out, absl::Duration wait = absl::Seconds(120)) {
    std::vector<std::string> a = {Runfile("api/vmmctl"), "--socket", Api(), "--timeout", "10"};
    a.insert(a.end(), args.begin(), args.end());
    Subprocess p(a, dir_.File(tag + ".out"), dir_.File(tag + ".err"));
    std::optional<int> st = p.Wait(wait);
    *out = ReadFileOrEmpty(dir_.File(tag + ".out")) + ReadFileOrEmpty(dir_.File(tag + ".err"));
    return st;
  }

  // Waits until the guest on `serial_file` completed generation `gen`.
  bool WaitGen(const std::string& serial_file, int gen, absl::Duration timeout) {
    return WaitForFileContains(dir_.File(serial_file), absl::StrCat("vfiomig gen=", gen, " ok"),
                               timeout);
  }

  // Migrates with `flags` and checks the guest continues on the destination: at least two more
  // generations there, every DMA-written page and the device state verified by the guest.
  void MigrateAndCheck(const std::vector<std::string>& flags,
                       const std::vector<std::string>& server_flags = {}) {
    const std::string src_sock = StartServer("src-dev.sock", server_flags);
    const std::string dst_sock = StartServer("dst-dev.sock", server_flags);
    Subprocess* src = StartSource(src_sock);
    ASSERT_TRUE(WaitGen("src.serial", 2, absl::Seconds(60))) << Logs();
    Subprocess* dst = StartDestination({"--vfio-user", dst_sock});
    std::vector<std::string> args = {"migrate", "--to", DstAddr()};
    args.insert(args.end(), flags.begin(), flags.end());
    std::string out;
    std::optional<int> st = Ctl(args, "migrate", &out);
    ASSERT_TRUE(st.has_value()) << "vmmctl migrate hung\n" << Logs();
    ASSERT_EQ(*st, 0) << out << Logs();
    EXPECT_NE(out.find("COMPLETED"), std::string::npos) << out;
    // The source VMM exits once the VM runs at the destination.
    std::optional<int> src_status = src->Wait(absl::Seconds(30));
    ASSERT_TRUE(src_status.has_value()) << "source did not exit\n" << Logs();
    EXPECT_EQ(*src_status, 0) << Logs();
    const int last_src = MaxGen(SrcSerial());
    // The generation in flight at the switchover is verified at the destination, then more.
    ASSERT_TRUE(WaitGen("dst.serial", last_src + 2, absl::Seconds(120)))
        << "the guest did not continue on the destination\n" << Logs();
    EXPECT_EQ(DstSerial().find("FAIL"), std::string::npos) << Logs();
    EXPECT_EQ(SrcSerial().find("FAIL"), std::string::npos) << Logs();
    // The device's DMA log was the source of those pages (not an all-dirty fallback).
    EXPECT_NE(ReadFileOrEmpty(dir_.File("src.err")).find("DMA dirty tracking: device DMA log"),
              std::string::npos)
        << Logs();
    dst->Signal(SIGTERM);
    EXPECT_TRUE(dst->Wait(absl::Seconds(20)).has_value());
  }

  TempDir dir_;  // declared first: destroyed after the processes using it
  std::vector<std::unique_ptr<Subprocess>> procs_;
};

TEST_F(VfioMigrationTest, PrecopyCarriesDmaWrittenPagesAndDeviceState) {
  REQUIRE_KVM();
  // Several passes while the device writes (bandwidth-limited so that DMA lands between them;
  // the device dirties faster than 256 KiB/s, so the switchover comes after 4 passes).
  MigrateAndCheck({"--bandwidth", "256K", "--max-iterations", "4"});
}

// A device with pre-copy data (3 MB ahead of its state): the data goes during the passes, not
// in the state at the switchover; the destination device checks the whole stream byte for byte.
TEST_F(VfioMigrationTest, DevicePrecopyDataTravelsDuringThePasses) {
  REQUIRE_KVM();
  MigrateAndCheck({"--bandwidth", "4M", "--max-iterations", "3"},
                  {"--precopy-bytes", "3000000"});
  const std::string err = ReadFileOrEmpty(dir_.File("src.err"));
  EXPECT_NE(err.find("2929 KiB of passthrough device pre-copy data went during the passes"),
            std::string::npos)
      << err;
}

// Post-copy after pre-copy passes, with device pre-copy data: the destination merges what came
// during the passes with the state's rest.
TEST_F(VfioMigrationTest, DevicePrecopyDataWithPostcopy) {
  REQUIRE_KVM();
  MigrateAndCheck({"--postcopy-after", "2", "--bandwidth", "1M"}, {"--precopy-bytes", "3000000"});
}

TEST_F(VfioMigrationTest, PurePostcopyFetchesWhatTheDeviceDmasBeforeItDoes) {
  REQUIRE_KVM();
  // Pages arrive slowly (256 KiB/s push): the guest rings doorbells for pages still missing.
  MigrateAndCheck({"--postcopy", "--bandwidth", "256K"});
}

TEST_F(VfioMigrationTest, PostcopyAfterPrecopyPasses) {
  REQUIRE_KVM();
  MigrateAndCheck({"--postcopy-after", "2", "--bandwidth", "256K"});
}

TEST_F(VfioMigrationTest, PostcopyIsRefusedForADeviceClassWithoutDmaModel) {
  REQUIRE_KVM();
  const std::string sock = StartServer("dev.sock", {"--device-id", "11f1"});
  procs_.push_back(std::make_unique<Subprocess>(
      std::vector<std::string>{Runfile("vmm/vmm"), "--serial", "file:" + dir_.File("src.serial"),
                               "--memory", "64", "--test-guest", "idle", "--vfio-user", sock,
                               "--api-socket", Api()},
      dir_.File("src.out"), dir_.File("src.err")));
  ASSERT_TRUE(WaitForFileContains("/proc/net/unix", Api(), absl::Seconds(20))) << Logs();
  for (const std::vector<std::string>& flags :
       {std::vector<std::string>{"--postcopy"}, std::vector<std::string>{"--postcopy-after", "3"},
        std::vector<std::string>{"--adaptive", "--allow-postcopy"}}) {
    std::vector<std::string> args = {"migrate", "--to", DstAddr()};
    args.insert(args.end(), flags.begin(), flags.end());
    std::string out;
    std::optional<int> st = Ctl(args, "migrate", &out);
    ASSERT_TRUE(st.has_value()) << "vmmctl migrate hung";
    EXPECT_NE(*st, 0) << out;
    EXPECT_NE(out.find("post-copy is not possible with the vfio-user device " + sock +
                       " (PCI 1234:11f1): there is no DMA model of its class"),
              std::string::npos)
        << flags[0] << ": " << out;
  }
  std::string out;
  std::optional<int> st = Ctl({"info"}, "info", &out);
  ASSERT_TRUE(st.has_value());
  EXPECT_NE(out.find("RUNNING"), std::string::npos) << out;
}

// A device hot-attached to the running source (vmmctl attach) migrates like one given at
// creation: its config entry (with its PCI slot) travels, the destination connects its own
// server and puts it at the same slot, the guest continues.
TEST_F(VfioMigrationTest, HotAttachedDeviceMigrates) {
  REQUIRE_KVM();
  const std::string src_sock = StartServer("src-dev.sock");
  const std::string dst_sock = StartServer("dst-dev.sock");
  procs_.push_back(std::make_unique<Subprocess>(
      std::vector<std::string>{Runfile("vmm/vmm"), "--serial", "file:" + dir_.File("src.serial"),
                               "--memory", "64", "--rng", "--test-guest", "vfiomig",
                               "--test-guest-args", "pages=128 wait=100000000", "--api-socket",
                               Api()},
      dir_.File("src.out"), dir_.File("src.err")));
  Subprocess* src = procs_.back().get();
  ASSERT_TRUE(WaitForFileContains(dir_.File("src.serial"), "vfiomig waiting for hotplug",
                                  absl::Seconds(30)))
      << Logs();
  std::string out;
  std::optional<int> st = Ctl({"attach", "--vfio-user", src_sock}, "attach", &out);
  ASSERT_TRUE(st.has_value() && *st == 0) << out << Logs();
  EXPECT_NE(out.find("at 0000:00:02.0"), std::string::npos) << out;  // after the rng at 01
  ASSERT_TRUE(WaitGen("src.serial", 2, absl::Seconds(60))) << Logs();
  Subprocess* dst = StartDestination({"--vfio-user", dst_sock});
  st = Ctl({"migrate", "--to", DstAddr()}, "migrate", &out);
  ASSERT_TRUE(st.has_value()) << "vmmctl migrate hung\n" << Logs();
  ASSERT_EQ(*st, 0) << out << Logs();
  ASSERT_TRUE(src->Wait(absl::Seconds(30)).has_value()) << Logs();
  const int last_src = MaxGen(SrcSerial());
  ASSERT_TRUE(WaitGen("dst.serial", last_src + 2, absl::Seconds(120))) << Logs();
  EXPECT_EQ(DstSerial().find("FAIL"), std::string::npos) << Logs();
  EXPECT_NE(ReadFileOrEmpty(dir_.File("dst.err")).find("at 0000:00:02.0"), std::string::npos)
      << "the destination put the device elsewhere\n" << Logs();
  dst->Signal(SIGTERM);
  EXPECT_TRUE(dst->Wait(absl::Seconds(20)).has_value());
}

TEST_F(VfioMigrationTest, DestinationKilledMidwayLeavesTheDeviceRunningOnTheSource) {
  REQUIRE_KVM();
  const std::string src_sock = StartServer("src-dev.sock");
  const std::string dst_sock = StartServer("dst-dev.sock");
  Subprocess* src = StartSource(src_sock);
  ASSERT_TRUE(WaitGen("src.serial", 1, absl::Seconds(60))) << Logs();
  Subprocess* dst = StartDestination({"--vfio-user", dst_sock});
  // Slow enough to be killed in the first pass (the guest's ~0.8 MiB at 64 KiB/s).
  Subprocess ctl({Runfile("api/vmmctl"), "--socket", Api(), "migrate", "--to", DstAddr(),
                  "--bandwidth", "64K"},
                 dir_.File("migrate.out"), dir_.File("migrate.err"));
  ASSERT_TRUE(WaitForFileContains(dir_.File("src.err"), "DMA dirty tracking", absl::Seconds(20)))
      << Logs();
  absl::SleepFor(absl::Seconds(2));
  dst->Signal(SIGKILL);
  ASSERT_TRUE(dst->Wait(absl::Seconds(10)).has_value());
  // The migration fails; the VM and its device keep running on the source.
  std::optional<int> st = ctl.Wait(absl::Seconds(60));
  ASSERT_TRUE(st.has_value()) << "vmmctl migrate did not end after the destination died";
  std::string out =
      ReadFileOrEmpty(dir_.File("migrate.out")) + ReadFileOrEmpty(dir_.File("migrate.err"));
  EXPECT_EQ(*st, 1) << out;
  EXPECT_NE(out.find("FAILED"), std::string::npos) << out;
  st = Ctl({"info"}, "info", &out);
  EXPECT_NE(out.find("RUNNING"), std::string::npos) << out;
  const int gen = MaxGen(SrcSerial());
  ASSERT_TRUE(WaitGen("src.serial", gen + 2, absl::Seconds(60)))
      << "the guest (or its device) stopped after the failed migration\n" << out << Logs();
  EXPECT_EQ(SrcSerial().find("FAIL"), std::string::npos) << Logs();
  src->Signal(SIGTERM);
  EXPECT_TRUE(src->Wait(absl::Seconds(20)).has_value());
}

TEST_F(VfioMigrationTest, DeviceWithoutMigrationIsRefusedAndTheVmKeepsRunning) {
  REQUIRE_KVM();
  const std::string sock = StartServer("dev.sock", {"--no-migration"});
  Subprocess* src = StartSource(sock);
  ASSERT_TRUE(WaitGen("src.serial", 1, absl::Seconds(60))) << Logs();
  std::string out;
  std::optional<int> st = Ctl({"migrate", "--to", DstAddr()}, "migrate", &out);
  ASSERT_TRUE(st.has_value()) << "vmmctl migrate hung";
  EXPECT_NE(*st, 0) << "migration of a VM with a device that cannot migrate was accepted\n" << out;
  EXPECT_NE(out.find("cannot migrate: the VM has a vfio-user device (" + sock +
                     ") that cannot migrate"),
            std::string::npos)
      << out;
  const int gen = MaxGen(SrcSerial());
  ASSERT_TRUE(WaitGen("src.serial", gen + 2, absl::Seconds(60)))
      << "the guest stopped after the refused migration\n" << Logs();
  EXPECT_EQ(SrcSerial().find("FAIL"), std::string::npos) << Logs();
  src->Signal(SIGTERM);
  EXPECT_TRUE(src->Wait(absl::Seconds(20)).has_value());
}

TEST_F(VfioMigrationTest, DestinationWithoutItsOwnDeviceServerIsRefused) {
  REQUIRE_KVM();
  const std::string src_sock = StartServer("src-dev.sock");
  Subprocess* src = StartSource(src_sock);
  ASSERT_TRUE(WaitGen("src.serial", 1, absl::Seconds(60))) << Logs();
  Subprocess* dst = StartDestination({});  // no --vfio-user here
  std::string out;
  std::optional<int> st = Ctl({"migrate", "--to", DstAddr()}, "migrate", &out);
  ASSERT_TRUE(st.has_value()) << "vmmctl migrate hung";
  EXPECT_NE(*st, 0) << out;
  EXPECT_NE(out.find("the migrating VM has 1 vfio-user devices, 0 given here"), std::string::npos)
      << out;
  std::optional<int> dst_status = dst->Wait(absl::Seconds(20));
  ASSERT_TRUE(dst_status.has_value()) << "destination did not give up\n" << Logs();
  EXPECT_EQ(*dst_status, 75) << Logs();
  const int gen = MaxGen(SrcSerial());
  ASSERT_TRUE(WaitGen("src.serial", gen + 2, absl::Seconds(60))) << Logs();
  EXPECT_EQ(SrcSerial().find("FAIL"), std::string::npos) << Logs();
  src->Signal(SIGTERM);
  EXPECT_TRUE(src->Wait(absl::Seconds(20)).has_value());
}

}  // namespace
}  // namespace microvmm::testing
