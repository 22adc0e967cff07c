// KVM integration tests of a vfio-user device attached at VM creation (`vmm --vfio-user SOCKET`),
// through the real binaries: vfio_user_test_server (tests/vfio/user/test_server: a PCI DMA
// engine with MSI-X) as the device process and the vfiodma test guest as its driver.
//  - the guest finds 1234:11f0, programs DMA copies and fills of its own RAM through trapped BAR
//    accesses and verifies the data the server wrote into guest memory;
//  - a second VM on the same server works too (the server drops the first connection's DMA
//    mappings, the device state survives);
//  - bad --vfio-user configurations are refused before the guest runs with one clear
//    "vmm: error:" line (no such socket, connection refused, not a vfio-user server, version
//    mismatch, same socket twice);
// Live migration of such VMs: vfio_migration_test.cc.
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "tests/util/subprocess.h"
#include "tests/vfio/user/test_server/test_device.h"

namespace microvmm::testing {
namespace {

constexpr char kServer[] = "tests/vfio/user/test_server/vfio_user_test_server";

// A bound unix socket at `path`; with `listen` it accepts connections into its backlog (nobody
// ever accepts or answers), without it connecting is refused. -1 on error.
int BindUnix(const std::string& path, bool listen) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  snprintf(a.sun_path, sizeof(a.sun_path), "%s", path.c_str());
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 ||
      (listen && ::listen(fd, 4) != 0)) {
    ::close(fd);
    return -1;
  }
  return fd;
}

struct Result {
  std::optional<int> status;
  std::string serial;
  std::string stderr_text;
};

class VfioUserTest : public ::testing::Test {
 protected:
  // Starts the device server on `name` in the test directory and waits for its READY line.
  std::string StartServer(const std::string& name) {
    const std::string sock = dir_.File(name);
    servers_.push_back(std::make_unique<Subprocess>(
        std::vector<std::string>{Runfile(kServer), "--socket", sock}, dir_.File(name + ".out"),
        dir_.File(name + ".err")));
    EXPECT_TRUE(WaitForFileContains(dir_.File(name + ".out"), "READY\n", absl::Seconds(20)))
        << "vfio_user_test_server did not get ready: " << ReadFileOrEmpty(dir_.File(name + ".err"));
    return sock;
  }

  Result RunVmm(const std::string& tag, const std::vector<std::string>& flags,
                absl::Duration timeout = absl::Seconds(60)) {
    std::vector<std::string> argv = {Runfile("vmm/vmm"), "--serial", "file:" + dir_.File(tag),
                                     "--memory", "64"};
    argv.insert(argv.end(), flags.begin(), flags.end());
    Subprocess p(argv, dir_.File(tag + ".out"), dir_.File(tag + ".err"));
    Result r;
    r.status = p.Wait(timeout);
    r.serial = ReadFileOrEmpty(dir_.File(tag));
    r.stderr_text = ReadFileOrEmpty(dir_.File(tag + ".err"));
    return r;
  }

  // Runs vmmctl against `api`; returns its exit status and puts stdout+stderr in *out.
  std::optional<int> Ctl(const std::string& api, const std::vector<std::string>& args,
                         const std::string& tag, std::string* out) {
    std::vector<std::string> a = {Runfile("api/vmmctl"), "--socket", api, "--timeout", "5"};
    a.insert(a.end(), args.begin(), args.end());
    Subprocess p(a, dir_.File(tag + ".out"), dir_.File(tag + ".err"));
    std::optional<int> st = p.Wait(absl::Seconds(30));
    *out = ReadFileOrEmpty(dir_.File(tag + ".out")) + ReadFileOrEmpty(dir_.File(tag + ".err"));
    return st;
  }

  // The guest never ran: status 1, exactly one "vmm: error:" line containing every needle.
  void ExpectRefused(const Result& r, const std::vector<std::string>& needles) {
    ASSERT_TRUE(r.status.has_value()) << "vmm did not exit";
    EXPECT_EQ(*r.status, 1) << r.stderr_text;
    EXPECT_EQ(r.stderr_text.rfind("vmm: error: ", 0), 0u) << r.stderr_text;
    EXPECT_EQ(CountOccurrences(r.stderr_text, "\n"), 1) << "not one line:\n" << r.stderr_text;
    for (const std::string& n : needles)
      EXPECT_NE(r.stderr_text.find(n), std::string::npos) << "no '" << n << "' in " << r.stderr_text;
    EXPECT_EQ(r.serial, "") << "the guest ran";
  }

  TempDir dir_;  // declared first: destroyed after the processes using it
  std::vector<std::unique_ptr<Subprocess>> servers_;
};

TEST_F(VfioUserTest, GuestDmaThroughVfioUserDevice) {
  REQUIRE_KVM();
  const std::string sock = StartServer("dev.sock");
  Result r = RunVmm("serial1", {"--test-guest", "vfiodma", "--vfio-user", sock});
  ASSERT_TRUE(r.status.has_value()) << "vmm did not exit:\n" << r.serial << r.stderr_text;
  EXPECT_EQ(*r.status, 0) << r.serial << r.stderr_text;
  EXPECT_NE(r.serial.find("vfiodma ok copies=3 fills=3\n"), std::string::npos)
      << r.serial << r.stderr_text;
  EXPECT_EQ(r.serial.find("FAIL"), std::string::npos) << r.serial;

  // The same server serves a second VM (new connection, new DMA mappings; other sizes).
  r = RunVmm("serial2", {"--test-guest", "vfiodma", "--test-guest-args", "iters=2 len=61440",
                         "--vfio-user", sock});
  ASSERT_TRUE(r.status.has_value()) << "second vmm did not exit:\n" << r.serial << r.stderr_text;
  EXPECT_EQ(*r.status, 0) << r.serial << r.stderr_text;
  EXPECT_NE(r.serial.find("vfiodma ok copies=2 fills=2\n"), std::string::npos)
      << r.serial << r.stderr_text;
}

TEST_F(VfioUserTest, WithoutTheDeviceTheGuestReportsIt) {
  REQUIRE_KVM();  // the guest's own failure path, so a pass above means the device was found
  Result r = RunVmm("serial", {"--test-guest", "vfiodma"});
  ASSERT_TRUE(r.status.has_value());
  EXPECT_EQ(*r.status, 71) << r.serial << r.stderr_text;
  EXPECT_NE(r.serial.find("vfiodma FAIL no 1234:11f0 device"), std::string::npos) << r.serial;
}

TEST_F(VfioUserTest, MissingSocketIsRefused) {
  REQUIRE_KVM();
  const std::string sock = dir_.File("absent.sock");
  ExpectRefused(RunVmm("serial", {"--test-guest", "vfiodma", "--vfio-user", sock}),
                {"vfio-user", sock, "no such socket"});
}

TEST_F(VfioUserTest, ConnectionRefusedIsRefused) {
  REQUIRE_KVM();
  const std::string sock = dir_.File("dead.sock");
  int fd = BindUnix(sock, /*listen=*/false);  // a socket file nobody listens on
  ASSERT_GE(fd, 0);
  Result r = RunVmm("serial", {"--test-guest", "vfiodma", "--vfio-user", sock});
  ::close(fd);
  ExpectRefused(r, {"vfio-user", sock, "connection refused"});
}

TEST_F(VfioUserTest, NotAVfioUserServerIsRefused) {
  REQUIRE_KVM();
  const std::string sock = dir_.File("mute.sock");
  int fd = BindUnix(sock, /*listen=*/true);  // connects, never answers the VERSION request
  ASSERT_GE(fd, 0);
  Result r = RunVmm("serial", {"--test-guest", "vfiodma", "--vfio-user", sock});
  ::close(fd);
  ExpectRefused(r, {"vfio-user", sock, "not a vfio-user server", "VERSION"});
}

TEST_F(VfioUserTest, VersionMismatchIsRefused) {
  REQUIRE_KVM();
  // The test device in-process, answering VERSION with a major version we do not speak.
  vfio_user::testdev::ServerOptions o;
  o.reply_major = vfio_user::kVersionMajor + 1;
  auto server = vfio_user::testdev::TestDeviceServer::Create(o);
  ASSERT_TRUE(server.ok()) << server.status();
  const std::string sock = dir_.File("v2.sock");
  std::thread t([&] { (void)(*server)->ListenAndServe(sock); });
  absl::Cleanup stop = [&] {
    (*server)->Stop();
    t.join();
  };
  ASSERT_TRUE(WaitForFileContains("/proc/net/unix", sock, absl::Seconds(10)));
  Result r = RunVmm("serial", {"--test-guest", "vfiodma", "--vfio-user", sock});
  ExpectRefused(r, {"vfio-user device 0", sock, "version mismatch"});
}

TEST_F(VfioUserTest, SameSocketTwiceIsRefused) {
  REQUIRE_KVM();
  const std::string sock = StartServer("dev.sock");
  ExpectRefused(RunVmm("serial", {"--test-guest", "vfiodma", "--vfio-user", sock, "--vfio-user",
                                  sock}),
                {"vfio-user device 1", sock, "already used by another vfio-user device"});
}


}  // namespace
}  // namespace microvmm::testing
