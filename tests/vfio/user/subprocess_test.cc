// Client against the vfio_user_test_server binary running as a separate process.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>

#include <cstdlib>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "tests/vfio/user/test_util.h"

extern char** environ;

namespace microvmm::vfio_user::testing {
namespace {

namespace td = testdev;
using vfio::MigState;

std::string ServerBinary() {
  const char* srcdir = std::getenv("TEST_SRCDIR");
  const char* ws = std::getenv("TEST_WORKSPACE");
  return std::string(srcdir ? srcdir : ".") + "/" + (ws ? ws : "microvmm") +
         "/tests/vfio/user/test_server/vfio_user_test_server";
}

// Unix socket paths must stay short (TEST_TMPDIR is too long): a fresh /tmp directory.
class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/vfu-XXXXXX";
    path_ = ::mkdtemp(tmpl);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// The server process; killed (SIGKILL) on destruction if still running.
class ServerProcess {
 public:
  explicit ServerProcess(const std::string& socket) {
    int out[2];
    EXPECT_EQ(::pipe2(out, O_CLOEXEC), 0);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, out[1], 1);
    std::string bin = ServerBinary();
    std::vector<char*> argv = {bin.data(), const_cast<char*>("--socket"),
                               const_cast<char*>(socket.c_str()), nullptr};
    int r = posix_spawn(&pid_, bin.c_str(), &fa, nullptr, argv.data(), environ);
    posix_spawn_file_actions_destroy(&fa);
    ::close(out[1]);
    ScopedFd rd(out[0]);
    EXPECT_EQ(r, 0) << "spawn " << bin;
    if (r != 0) {
      pid_ = -1;
      return;
    }
    // Wait for "READY" (the socket is listening).
    std::string got;
    while (got.find("READY") == std::string::npos) {
      pollfd p{rd.get(), POLLIN, 0};
      if (::poll(&p, 1, 10000) <= 0) break;
      char buf[64];
      ssize_t n = ::read(rd.get(), buf, sizeof(buf));
      if (n <= 0) break;
      got.append(buf, n);
    }
    EXPECT_NE(got.find("READY"), std::string::npos) << "server did not start";
  }
  ~ServerProcess() { Kill(SIGKILL); }
  // Sends `sig` and reaps; returns the wait status.
  int Kill(int sig) {
    if (pid_ <= 0) return -1;
    ::kill(pid_, sig);
    int status = 0;
    ::waitpid(pid_, &status, 0);
    pid_ = -1;
    return status;
  }

 private:
  pid_t pid_ = -1;
};

std::vector<uint8_t> ReadAllMigData(vfio::VfioDevice* d) {
  std::vector<uint8_t> blob;
  uint8_t buf[4096];
  for (;;) {
    auto n = d->ReadMigData(buf);
    EXPECT_TRUE(n.ok()) << n.status();
    if (!n.ok() || *n == 0) break;
    blob.insert(blob.end(), buf, buf + *n);
  }
  return blob;
}

TEST(SubprocessTest, EndToEndDmaMsixAndMigrationBetweenProcesses) {
  TempDir dir;
  const std::string sock_a = dir.path() + "/a.sock", sock_b = dir.path() + "/b.sock";
  ServerProcess a(sock_a);
  GuestRam ram = GuestRam::Make();
  auto dev = VfioUserDevice::Connect(sock_a);
  ASSERT_TRUE(dev.ok()) << dev.status();
  EXPECT_EQ((*dev)->name(), "vfio-user:" + sock_a);
  auto info = (*dev)->GetInfo();
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->num_regions, 9u);
  ASSERT_TRUE((*dev)->DmaMap(kGuestIova, kGuestSize, ram.map.get(), ram.fd.get(), 0, true).ok());

  ScopedFd efd(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  int fds[1] = {efd.get()};
  ASSERT_TRUE((*dev)->SetIrqs(vfio::kMsixIrqIndex, 0, fds).ok());
  uint16_t ctl = 0x8000;
  ASSERT_TRUE((*dev)->RegionWrite(vfio::kConfigRegionIndex, td::kMsixCapOffset + 2, Bytes(ctl)).ok());
  uint32_t unmask = 0;
  ASSERT_TRUE((*dev)->RegionWrite(2, 12, Bytes(unmask)).ok());
  ASSERT_TRUE(StartFill(dev->get(), kGuestIova + 0x1000, 0x100, 0x3c).ok());
  EXPECT_EQ(ram.at(kGuestIova + 0x10ff)[0], 0x3c);
  uint64_t ev = 0;
  ASSERT_EQ(::read(efd.get(), &ev, 8), 8);  // MSI-X vector 0 fired from the other process
  EXPECT_EQ(ev, 1u);

  ASSERT_TRUE(WriteReg(dev->get(), td::kRegScratch, 0xabcdef).ok());
  ASSERT_TRUE((*dev)->SetMigState(MigState::kStop).ok());
  ASSERT_TRUE((*dev)->SetMigState(MigState::kStopCopy).ok());
  std::vector<uint8_t> blob = ReadAllMigData(dev->get());
  ASSERT_FALSE(blob.empty());
  ASSERT_TRUE((*dev)->SetMigState(MigState::kStop).ok());
  dev->reset();
  a.Kill(SIGKILL);

  ServerProcess b(sock_b);
  auto dst = VfioUserDevice::Connect(sock_b);
  ASSERT_TRUE(dst.ok()) << dst.status();
  ASSERT_TRUE((*dst)->DmaMap(kGuestIova, kGuestSize, ram.map.get(), ram.fd.get(), 0, true).ok());
  ASSERT_TRUE((*dst)->SetMigState(MigState::kStop).ok());
  ASSERT_TRUE((*dst)->SetMigState(MigState::kResuming).ok());
  ASSERT_TRUE((*dst)->WriteMigData(blob).ok());
  ASSERT_TRUE((*dst)->SetMigState(MigState::kStop).ok());
  ASSERT_TRUE((*dst)->SetMigState(MigState::kRunning).ok());
  EXPECT_EQ(ReadReg(dst->get(), td::kRegScratch), 0xabcdefu);
  EXPECT_EQ(ReadReg(dst->get(), td::kRegCompleted), 1u);
  ASSERT_TRUE(StartFill(dst->get(), kGuestIova + 0x2000, 0x10, 0x4d).ok());
  EXPECT_EQ(ram.at(kGuestIova + 0x200f)[0], 0x4d);
  EXPECT_EQ(ReadReg(dst->get(), td::kRegCompleted), 2u);
}

TEST(SubprocessTest, ServerKilledMidRequestIsClearError) {
  TempDir dir;
  const std::string sock = dir.path() + "/s.sock";
  ServerProcess srv(sock);
  GuestRam ram = GuestRam::Make();
  ClientOptions o;
  o.reply_timeout_ms = 30000;  // the kill, not the timeout, must end the wait
  auto dev = VfioUserDevice::Connect(sock, o);
  ASSERT_TRUE(dev.ok()) << dev.status();
  ASSERT_TRUE((*dev)->DmaMap(kGuestIova, kGuestSize, ram.map.get(), ram.fd.get(), 0, true).ok());
  ASSERT_TRUE(WriteReg(dev->get(), td::kRegReplyDelayMs, 20000).ok());
  // The server performs the DMA and then sits on the reply. Once the DMA's bytes are visible in
  // guest memory the server is inside the request: kill it then.
  volatile uint8_t* flag = ram.at(kGuestIova);
  std::thread killer([&] {
    while (*flag != 0x99) std::this_thread::yield();
    srv.Kill(SIGKILL);
  });
  absl::Status s = StartFill(dev->get(), kGuestIova, 1, 0x99);
  killer.join();
  EXPECT_TRUE(absl::IsUnavailable(s)) << s;
  EXPECT_NE(s.message().find("server closed the connection"), absl::string_view::npos) << s;
  EXPECT_TRUE((*dev)->broken());
  EXPECT_TRUE(absl::IsUnavailable((*dev)->GetInfo().status()));
  // The socket file is left behind by the killed server: connecting is refused.
  auto again = VfioUserDevice::Connect(sock);
  EXPECT_TRUE(absl::IsUnavailable(again.status())) << again.status();
}

TEST(SubprocessTest, ConnectErrors) {
  TempDir dir;
  auto none = VfioUserDevice::Connect(dir.path() + "/missing.sock");
  EXPECT_TRUE(absl::IsNotFound(none.status())) << none.status();
  EXPECT_NE(none.status().message().find("no such socket"), absl::string_view::npos);
  // A bound socket nobody listens on.
  const std::string path = dir.path() + "/deaf.sock";
  ScopedFd s(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  std::memcpy(addr.sun_path, path.c_str(), path.size());
  ASSERT_EQ(::bind(s.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  auto refused = VfioUserDevice::Connect(path);
  EXPECT_TRUE(absl::IsUnavailable(refused.status())) << refused.status();
  EXPECT_NE(refused.status().message().find("refused"), absl::string_view::npos);
  EXPECT_TRUE(absl::IsInvalidArgument(VfioUserDevice::Connect(std::string(200, 'x')).status()));
}

TEST(SubprocessTest, ReconnectKeepsDeviceStateDropsMappingsAndSigtermExits) {
  TempDir dir;
  const std::string sock = dir.path() + "/s.sock";
  ServerProcess srv(sock);
  GuestRam ram = GuestRam::Make();
  {
    auto dev = VfioUserDevice::Connect(sock);
    ASSERT_TRUE(dev.ok()) << dev.status();
    ASSERT_TRUE((*dev)->DmaMap(kGuestIova, kGuestSize, ram.map.get(), ram.fd.get(), 0, true).ok());
    ASSERT_TRUE(WriteReg(dev->get(), td::kRegScratch, 1234).ok());
  }
  auto dev = VfioUserDevice::Connect(sock);
  ASSERT_TRUE(dev.ok()) << dev.status();
  EXPECT_EQ(ReadReg(dev->get(), td::kRegScratch), 1234u);  // device state kept
  ASSERT_TRUE(StartFill(dev->get(), kGuestIova, 8, 1).ok());
  EXPECT_EQ(ReadReg(dev->get(), td::kRegStatus), td::kStatusError);  // old mapping is gone
  ASSERT_TRUE((*dev)->DmaMap(kGuestIova, kGuestSize, ram.map.get(), ram.fd.get(), 0, true).ok());
  ASSERT_TRUE(StartFill(dev->get(), kGuestIova, 8, 1).ok());
  EXPECT_EQ(ReadReg(dev->get(), td::kRegStatus), td::kStatusDone);
  int status = srv.Kill(SIGTERM);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << status;
}

}  // namespace
}  // namespace microvmm::vfio_user::testing
