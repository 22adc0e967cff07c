// Devices through the control API and vmmctl, against a real `vmm --api-socket` process (so the
// VMM resolves paths in its own working directory, not the client's): `vmmctl create` with
// --rng/--disk/--balloon/--vsock and relative paths, `info` / `info --json` listing the devices,
// `balloon --target` and `balloon-stats`, and the refusals (target >= memory, no balloon, a bad
// device config that leaves the VMM up for a corrected CreateVm). Needs /dev/kvm.
//
// The test guest (`idle`) has no virtio drivers: device status stays 0, the balloon's actual
// size stays 0 and no statistics arrive. The tests assert exactly that rather than pretend.
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "api/vmmctl_lib.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/util/subprocess.h"

namespace microvmm::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

void WriteImage(const std::string& path) {
  FILE* f = fopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr) << path;
  std::string data(1 << 20, '\0');
  ASSERT_EQ(fwrite(data.data(), 1, data.size(), f), data.size());
  ASSERT_EQ(fclose(f), 0);
}

bool Exists(const std::string& path) {
  struct stat st;
  return ::lstat(path.c_str(), &st) == 0;
}

// A `vmm --api-socket` without a VM, started in the test's own working directory (the runfiles
// tree), and vmmctl run in-process from `dir` (the client's cwd differs from the VMM's).
class DevicesApiTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!KvmAvailable()) return;  // the test body skips
    socket_ = dir_.File("api.sock");
    vmm_.emplace(std::vector<std::string>{Runfile("vmm/vmm"), "--api-socket", socket_},
                 dir_.File("vmm.out"), dir_.File("vmm.err"));
    ASSERT_TRUE(WaitForFileContains(dir_.File("vmm.err"), "API listening", absl::Seconds(20)))
        << ReadFileOrEmpty(dir_.File("vmm.err"));
  }
  void TearDown() override {
    if (!vmm_) return;
    std::string out, err;
    (void)Ctl({"shutdown"}, &out, &err);
    std::optional<int> status = vmm_->Wait(absl::Seconds(20));
    EXPECT_TRUE(status.has_value()) << "vmm did not exit after shutdown";
    vmm_.reset();
  }

  // `vmmctl --socket S args...` with the working directory set to dir_ for the call.
  int Ctl(std::vector<std::string> args, std::string* out, std::string* err) {
    args.insert(args.begin(), {"--socket", socket_});
    char old[4096];
    EXPECT_NE(getcwd(old, sizeof(old)), nullptr);
    EXPECT_EQ(chdir(dir_.path().c_str()), 0);
    std::ostringstream o, e;
    const int rc = vmmctl::Run(args, o, e);
    EXPECT_EQ(chdir(old), 0);
    *out = o.str();
    *err = e.str();
    return rc;
  }

  TempDir dir_;
  std::string socket_;
  std::optional<Subprocess> vmm_;
};

TEST_F(DevicesApiTest, CreateWithDevicesInfoAndBalloon) {
  REQUIRE_KVM();
  WriteImage(dir_.File("a.img"));
  WriteImage(dir_.File("b.img"));
  std::string out, err;
  // Relative paths: only valid in dir_, the client's cwd. vmmctl must make them absolute.
  ASSERT_EQ(Ctl({"create", "--test-guest", "idle", "--memory", "64", "--serial", "file:serial",
                 "--rng", "--disk", "a.img", "--disk", "path=./b.img,ro,serial=second",
                 "--balloon", "target=4", "--vsock", "cid=7,uds=v.sock"},
                &out, &err),
            0)
      << err << ReadFileOrEmpty(dir_.File("vmm.err"));
  // The VMM bound the vsock socket where the client meant it, not in its own cwd.
  EXPECT_TRUE(Exists(dir_.File("v.sock")));

  ASSERT_EQ(Ctl({"boot"}, &out, &err), 0) << err;
  ASSERT_TRUE(WaitForFileContains(dir_.File("serial"), "idle\n", absl::Seconds(30)))
      << ReadFileOrEmpty(dir_.File("vmm.err"));

  // Devices in PCI slot order (rng, disks in order, balloon, vsock); no driver: status 0x00.
  ASSERT_EQ(Ctl({"info"}, &out, &err), 0) << err;
  EXPECT_THAT(out, HasSubstr("state:       RUNNING\n"));
  EXPECT_THAT(out, HasSubstr("device:      virtio-rng at 0000:00:01.0, status 0x00"));
  EXPECT_THAT(out, HasSubstr("device:      virtio-blk at 0000:00:02.0, status 0x00"));
  EXPECT_THAT(out, HasSubstr("device:      virtio-blk at 0000:00:03.0, status 0x00"));
  EXPECT_THAT(out, HasSubstr("device:      virtio-balloon at 0000:00:04.0, status 0x00"));
  EXPECT_THAT(out, HasSubstr("device:      virtio-vsock at 0000:00:05.0, status 0x00"));
  EXPECT_EQ(CountOccurrences(out, "device:"), 5) << out;

  ASSERT_EQ(Ctl({"info", "--json"}, &out, &err), 0) << err;
  EXPECT_THAT(out, HasSubstr("\"devices\": ["));
  EXPECT_EQ(CountOccurrences(out, "\"kind\": \"blk\""), 2) << out;
  for (const char* kind : {"rng", "balloon", "vsock"})
    EXPECT_EQ(CountOccurrences(out, absl::StrCat("\"kind\": \"", kind, "\"")), 1) << kind;
  EXPECT_THAT(out, HasSubstr("\"pci_address\": \"0000:00:05.0\""));
  // The stored config carries the absolute paths vmmctl sent.
  EXPECT_THAT(out, HasSubstr(absl::StrCat("\"path\": \"", dir_.File("a.img"), "\"")));
  EXPECT_THAT(out, HasSubstr(absl::StrCat("\"path\": \"", dir_.File("b.img"), "\"")));
  EXPECT_THAT(out, HasSubstr(absl::StrCat("\"uds_path\": \"", dir_.File("v.sock"), "\"")));
  EXPECT_THAT(out, HasSubstr("\"serial\": \"second\""));

  // The initial target from create, then a new one.
  ASSERT_EQ(Ctl({"balloon-stats"}, &out, &err), 0) << err;
  EXPECT_THAT(out, HasSubstr("target:      4 MiB\n"));
  ASSERT_EQ(Ctl({"balloon", "--target", "8"}, &out, &err), 0) << err;
  ASSERT_EQ(Ctl({"balloon-stats"}, &out, &err), 0) << err;
  EXPECT_THAT(out, HasSubstr("target:      8 MiB\n"));
  // No balloon driver in the idle guest: nothing given back, no statistics.
  EXPECT_THAT(out, HasSubstr("actual:      0 MiB (guest-reported)\n"));
  EXPECT_THAT(out, HasSubstr("inflated:    0 MiB"));
  EXPECT_THAT(out, HasSubstr("stats:       none yet\n"));
  ASSERT_EQ(Ctl({"balloon-stats", "--json"}, &out, &err), 0) << err;
  EXPECT_THAT(out, HasSubstr("\"target_mib\": \"8\""));  // uint64 is a JSON string
  EXPECT_THAT(out, HasSubstr("\"stats_age_ms\": \"-1\""));

  // Targets at or above guest memory are refused with the reason; the old target stays.
  for (const char* bad : {"64", "1G"}) {
    EXPECT_EQ(Ctl({"balloon", "--target", bad}, &out, &err), 1) << bad;
    EXPECT_THAT(err, HasSubstr("INVALID_ARGUMENT")) << bad;
    EXPECT_THAT(err, HasSubstr("must be below guest memory (64 MiB)")) << bad;
    EXPECT_EQ(CountOccurrences(err, "\n"), 1) << err;
  }
  // A malformed size is a usage error (2), caught by vmmctl itself.
  EXPECT_EQ(Ctl({"balloon", "--target", "lots"}, &out, &err), 2);
  EXPECT_THAT(err, HasSubstr("--target"));
  ASSERT_EQ(Ctl({"balloon-stats"}, &out, &err), 0) << err;
  EXPECT_THAT(out, HasSubstr("target:      8 MiB\n"));
  // 0 deflates completely.
  ASSERT_EQ(Ctl({"balloon", "--target", "0"}, &out, &err), 0) << err;
  ASSERT_EQ(Ctl({"balloon-stats"}, &out, &err), 0) << err;
  EXPECT_THAT(out, HasSubstr("target:      0 MiB\n"));

  ASSERT_EQ(Ctl({"shutdown"}, &out, &err), 0) << err;
  std::optional<int> status = vmm_->Wait(absl::Seconds(20));
  ASSERT_TRUE(status.has_value());
  EXPECT_EQ(*status, 0) << ReadFileOrEmpty(dir_.File("vmm.err"));
  vmm_.reset();
  EXPECT_FALSE(Exists(dir_.File("v.sock"))) << "vsock socket left behind";
}

TEST_F(DevicesApiTest, BadDeviceConfigIsRefusedAndTheVmmStaysUp) {
  REQUIRE_KVM();
  std::string out, err;
  // The image does not exist: CreateVm fails with the path in the message, no VM is left.
  EXPECT_EQ(Ctl({"create", "--test-guest", "idle", "--memory", "64", "--serial", "none", "--disk",
                 "missing.img", "--vsock", "cid=7,uds=v.sock"},
                &out, &err),
            1);
  EXPECT_THAT(err, HasSubstr(dir_.File("missing.img")));
  EXPECT_THAT(err, HasSubstr("does not exist"));
  EXPECT_FALSE(Exists(dir_.File("v.sock"))) << "socket of a VM that was never created";
  // Reserved CID, balloon target >= memory: refused too.
  EXPECT_EQ(Ctl({"create", "--test-guest", "idle", "--memory", "64", "--vsock", "cid=2,uds=v.sock"},
                &out, &err),
            1);
  EXPECT_THAT(err, HasSubstr("CID 2"));
  EXPECT_EQ(
      Ctl({"create", "--test-guest", "idle", "--memory", "64", "--balloon", "target=64"}, &out,
          &err),
      1);
  EXPECT_THAT(err, HasSubstr("below guest memory"));
  // A syntax error in a device spec never reaches the VMM: usage error.
  EXPECT_EQ(Ctl({"create", "--test-guest", "idle", "--disk", "a.img,cache=none"}, &out, &err), 2);
  EXPECT_THAT(err, HasSubstr("cache"));

  // The VMM is still there and takes a good config: rng only, no balloon.
  ASSERT_EQ(Ctl({"create", "--test-guest", "idle", "--memory", "64", "--serial", "file:serial",
                 "--rng"},
                &out, &err),
            0)
      << err;
  ASSERT_EQ(Ctl({"boot"}, &out, &err), 0) << err;
  ASSERT_TRUE(WaitForFileContains(dir_.File("serial"), "idle\n", absl::Seconds(30)));
  ASSERT_EQ(Ctl({"info"}, &out, &err), 0) << err;
  EXPECT_THAT(out, HasSubstr("device:      virtio-rng at 0000:00:01.0"));
  EXPECT_EQ(CountOccurrences(out, "device:"), 1) << out;
  EXPECT_THAT(out, Not(HasSubstr("virtio-balloon")));

  // Without a balloon both balloon commands fail and say why.
  EXPECT_EQ(Ctl({"balloon", "--target", "8"}, &out, &err), 1);
  EXPECT_THAT(err, HasSubstr("FAILED_PRECONDITION"));
  EXPECT_THAT(err, HasSubstr("no virtio-balloon"));
  EXPECT_EQ(Ctl({"balloon-stats"}, &out, &err), 1);
  EXPECT_THAT(err, HasSubstr("no virtio-balloon"));
  EXPECT_EQ(out, "");
}

}  // namespace
}  // namespace microvmm::testing
