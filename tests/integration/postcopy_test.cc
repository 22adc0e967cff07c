// Post-copy live migration between two real VMM processes. The memwalk guest rewrites and
// verifies generation-stamped pages on 2 vCPUs: on the destination every page it reads must be
// the source's (a missing page served as zeros, or a stale one, makes it print FAIL).
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "proto/vmm.grpc.pb.h"
#include "tests/util/subprocess.h"

namespace microvmm::testing {
namespace {

// A unix-socket forwarder standing for the network between the hosts: accepts on `listen` and
// copies bytes both ways to `target`. Cut() drops every connection and stops accepting (the
// link is down); Start() again restores it.
class LinkProxy {
 public:
  LinkProxy(std::string listen, std::string target)
      : listen_(std::move(listen)), target_(std::move(target)) {}
  ~LinkProxy() { Cut(); }

  bool Start() {
    unlink(listen_.c_str());
    lfd_ = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_un a = Addr(listen_);
    if (lfd_ < 0 || bind(lfd_, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 ||
        listen(lfd_, 64) != 0)
      return false;
    stop_ = false;
    acceptor_ = std::thread([this] { AcceptLoop(); });
    return true;
  }
  void Cut() {
    stop_ = true;
    if (acceptor_.joinable()) acceptor_.join();
    if (lfd_ >= 0) close(lfd_);
    lfd_ = -1;
    std::vector<std::thread> pumps;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (int fd : fds_) shutdown(fd, SHUT_RDWR);
      pumps.swap(pumps_);
    }
    for (auto& t : pumps) t.join();
    std::lock_guard<std::mutex> lock(mu_);
    for (int fd : fds_) close(fd);
    fds_.clear();
  }
  int connections() const { return accepted_.load(); }

 private:
  static sockaddr_un Addr(const std::string& path) {
    sockaddr_un a = {};
    a.sun_family = AF_UNIX;
    std::strncpy(a.sun_path, path.c_str(), sizeof(a.sun_path) - 1);
    return a;
  }
  void AcceptLoop() {
    while (!stop_) {
      pollfd p = {lfd_, POLLIN, 0};
      if (poll(&p, 1, 50) <= 0) continue;
      int c = accept4(lfd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (c < 0) continue;
      int t = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
      sockaddr_un a = Addr(target_);
      if (t < 0 || connect(t, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
        close(c);
        if (t >= 0) close(t);
        continue;
      }
      ++accepted_;
      std::lock_guard<std::mutex> lock(mu_);
      fds_.push_back(c);
      fds_.push_back(t);
      pumps_.emplace_back([c, t] { Pump(c, t); });
    }
  }
  // Copies both ways until either side closes; then shuts both down.
  static void Pump(int a, int b) {
    char buf[65536];
    for (;;) {
      pollfd p[2] = {{a, POLLIN, 0}, {b, POLLIN, 0}};
      if (poll(p, 2, 1000) < 0) break;
      bool done = false;
      for (int i = 0; i < 2 && !done; ++i) {
        if (!(p[i].revents & (POLLIN | POLLHUP | POLLERR))) continue;
        ssize_t n = read(p[i].fd, buf, sizeof(buf));
        if (n <= 0) {
          done = true;
          break;
        }
        int to = p[i].fd == a ? b : a;
        for (ssize_t off = 0; off < n;) {
          ssize_t w = write(to, buf + off, n - off);
          if (w <= 0) {
            done = true;
            break;
          }
          off += w;
        }
      }
      if (done) break;
    }
    shutdown(a, SHUT_RDWR);
    shutdown(b, SHUT_RDWR);
  }

  const std::string listen_, target_;
  int lfd_ = -1;
  std::atomic<bool> stop_{false};
  std::atomic<int> accepted_{0};
  std::thread acceptor_;
  std::mutex mu_;
  std::vector<int> fds_;
  std::vector<std::thread> pumps_;
};

class PostcopyTest : public ::testing::Test {
 protected:
  void StartSource(const std::string& args = "mib=8",
                   const std::string& ready = "memwalk gen=2 ok") {
    src_ = std::make_unique<Subprocess>(
        std::vector<std::string>{Runfile("vmm/vmm"), "--test-guest", "memwalk", "--vcpus", "2",
                                 "--memory", "64", "--test-guest-args", args, "--serial",
                                 "file:" + dir_.File("src.log"), "--api-socket",
                                 dir_.File("src.sock")},
        dir_.File("src.out"), dir_.File("src.err"));
    ASSERT_TRUE(WaitForFileContains(dir_.File("src.log"), ready, absl::Seconds(30)))
        << Errs();
    src_stub_ = Vmm::NewStub(
        grpc::CreateChannel("unix:" + dir_.File("src.sock"), grpc::InsecureChannelCredentials()));
  }
  void StartDestination() {
    dst_ = std::make_unique<Subprocess>(
        std::vector<std::string>{Runfile("vmm/vmm"), "--incoming", dir_.File("dst.sock"),
                                 "--serial", "file:" + dir_.File("dst.log"), "--api-socket",
                                 dir_.File("dstapi.sock")},
        dir_.File("dst.out"), dir_.File("dst.err"));
    dst_stub_ = Vmm::NewStub(grpc::CreateChannel("unix:" + dir_.File("dstapi.sock"),
                                                 grpc::InsecureChannelCredentials()));
  }
  grpc::Status Start(StartMigrationRequest req) {
    req.set_destination(dir_.File("dst.sock"));
    req.set_streams(2);
    StartMigrationResponse resp;
    grpc::ClientContext c;
    return src_stub_->StartMigration(&c, req, &resp);
  }
  MigrationProgress Progress() {
    grpc::ClientContext c;
    WatchMigrationRequest w;
    auto reader = src_stub_->WatchMigration(&c, w);
    MigrationProgress p;
    reader->Read(&p);
    c.TryCancel();
    reader->Finish();
    return p;
  }
  MigrationProgress WaitEnd() {
    grpc::ClientContext c;
    WatchMigrationRequest w;
    w.set_interval_ms(100);
    auto reader = src_stub_->WatchMigration(&c, w);
    MigrationProgress p, last;
    while (reader->Read(&p)) last = p;
    reader->Finish();
    return last;
  }
  // The destination keeps verifying: generations beyond the source's last, no FAIL, no restart.
  void ExpectGuestContinues() {
    int gen_src = MaxGeneration(ReadFileOrEmpty(dir_.File("src.log")));
    EXPECT_TRUE(WaitForGeneration(dir_.File("dst.log"), gen_src + 3, absl::Seconds(60))) << Errs();
    std::string dlog = ReadFileOrEmpty(dir_.File("dst.log"));
    EXPECT_EQ(dlog.find("FAIL"), std::string::npos) << dlog;
    EXPECT_EQ(dlog.find("memwalk start"), std::string::npos) << "guest restarted: " << dlog;
  }
  std::string Errs() {
    return "\nsource stderr:\n" + ReadFileOrEmpty(dir_.File("src.err")) +
           "\ndestination stderr:\n" + ReadFileOrEmpty(dir_.File("dst.err"));
  }

  TempDir dir_;
  std::unique_ptr<Subprocess> src_, dst_;
  std::unique_ptr<Vmm::Stub> src_stub_, dst_stub_;
};

TEST_F(PostcopyTest, PurePostcopyEveryPageArrives) {
  REQUIRE_KVM();
  StartDestination();
  StartSource();
  StartMigrationRequest req;
  req.set_mode(StartMigrationRequest::POSTCOPY);
  grpc::Status s = Start(req);
  ASSERT_TRUE(s.ok()) << s.error_message();
  MigrationProgress p = WaitEnd();
  ASSERT_EQ(p.phase(), MIGRATION_COMPLETED) << p.error() << Errs();
  EXPECT_TRUE(p.postcopy());
  EXPECT_EQ(p.iteration(), 0u) << "pure post-copy runs no pre-copy pass";
  const PostcopyStats& st = p.postcopy_stats();
  EXPECT_EQ(st.missing_pages(), 0u);
  EXPECT_GT(st.pushed(), 0u);
  // Both vCPUs touched missing pages and were served on their own lanes.
  uint64_t vcpu_faults = 0;
  int lanes_with_faults = 0;
  for (const LaneStats& l : st.lanes())
    if (l.lane() >= 0 && l.faults() > 0) {
      vcpu_faults += l.faults();
      ++lanes_with_faults;
    }
  EXPECT_GT(vcpu_faults, 0u);
  EXPECT_EQ(lanes_with_faults, 2) << "faults of both vCPUs expected";
  EXPECT_GT(st.pulled(), 0u);
  auto st_src = src_->Wait(absl::Seconds(10));
  ASSERT_TRUE(st_src.has_value()) << Errs();
  EXPECT_EQ(*st_src, 0);
  ExpectGuestContinues();
}

TEST_F(PostcopyTest, PurePostcopyWhileTheGuestFillsFreshRam) {
  // The switchover's hole map (pages with no memory at the source: zero, never sent) is taken
  // while the guest still runs and turns holes into data (memwalk's first generation writes
  // fresh RAM); pages written after it must travel with their content (dirty logging covers
  // that window, which is too short to hit on purpose here). A page wrongly taken for a hole
  // shows up as "memwalk FAIL" in the next generation on the destination.
  REQUIRE_KVM();
  StartDestination();
  StartSource("mib=40", "memwalk start");
  StartMigrationRequest req;
  req.set_mode(StartMigrationRequest::POSTCOPY);
  grpc::Status s = Start(req);
  ASSERT_TRUE(s.ok()) << s.error_message();
  MigrationProgress p = WaitEnd();
  ASSERT_EQ(p.phase(), MIGRATION_COMPLETED) << p.error() << Errs();
  EXPECT_EQ(p.postcopy_stats().missing_pages(), 0u);
  EXPECT_GT(p.postcopy_stats().pushed() + p.postcopy_stats().pulled(), 0u);
  auto st_src = src_->Wait(absl::Seconds(10));
  ASSERT_TRUE(st_src.has_value()) << Errs();
  EXPECT_EQ(*st_src, 0);
  // The migration landed inside generation 1 (still filling fresh RAM).
  EXPECT_LE(MaxGeneration(ReadFileOrEmpty(dir_.File("src.log"))), 1) << "started too late";
  ExpectGuestContinues();
}

TEST_F(PostcopyTest, SwitchFromPrecopyMidway) {
  REQUIRE_KVM();
  StartDestination();
  StartSource("mib=24");
  StartMigrationRequest req;
  req.set_bandwidth_limit_bytes_per_s(4 << 20);  // pre-copy of ~24 MiB takes seconds
  grpc::Status s = Start(req);
  ASSERT_TRUE(s.ok()) << s.error_message();
  // Wait until pre-copy has sent something, then switch.
  absl::Time deadline = absl::Now() + absl::Seconds(30);
  while (absl::Now() < deadline && Progress().pages_sent() < 1000)
    absl::SleepFor(absl::Milliseconds(20));
  grpc::ClientContext c;
  StartPostcopyResponse r;
  s = src_stub_->StartPostcopy(&c, StartPostcopyRequest(), &r);
  ASSERT_TRUE(s.ok()) << s.error_message();
  MigrationProgress p = WaitEnd();
  ASSERT_EQ(p.phase(), MIGRATION_COMPLETED) << p.error() << Errs();
  EXPECT_TRUE(p.postcopy());
  EXPECT_EQ(p.postcopy_stats().missing_pages(), 0u);
  ExpectGuestContinues();
  // Where no migration runs (the destination's VMM), StartPostcopy has nothing to switch.
  grpc::ClientContext c2;
  s = dst_stub_->StartPostcopy(&c2, StartPostcopyRequest(), &r);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();
}

TEST_F(PostcopyTest, PostcopyAfterIterations) {
  REQUIRE_KVM();
  StartDestination();
  StartSource();
  StartMigrationRequest req;
  req.set_postcopy_after_iterations(1);
  req.set_downtime_limit_ms(1);  // never converges by itself
  grpc::Status s = Start(req);
  ASSERT_TRUE(s.ok()) << s.error_message();
  MigrationProgress p = WaitEnd();
  ASSERT_EQ(p.phase(), MIGRATION_COMPLETED) << p.error() << Errs();
  EXPECT_TRUE(p.postcopy());
  EXPECT_GE(p.iteration(), 1u);
  ExpectGuestContinues();
}

// The source dies in the middle of post-copy: the destination pauses the guest, says why through
// its API, and never lets the guest see a page it did not receive.
TEST_F(PostcopyTest, SourceKilledMidPostcopyPausesDestination) {
  REQUIRE_KVM();
  StartDestination();
  StartSource("mib=24");
  StartMigrationRequest req;
  req.set_mode(StartMigrationRequest::POSTCOPY);
  req.set_bandwidth_limit_bytes_per_s(256 << 10);  // the push takes ~100 s
  grpc::Status s = Start(req);
  ASSERT_TRUE(s.ok()) << s.error_message();
  absl::Time deadline = absl::Now() + absl::Seconds(30);
  while (absl::Now() < deadline && Progress().phase() != MIGRATION_POSTCOPY)
    absl::SleepFor(absl::Milliseconds(20));
  ASSERT_EQ(Progress().phase(), MIGRATION_POSTCOPY) << Errs();
  absl::SleepFor(absl::Milliseconds(500));  // the guest runs a little on the destination
  src_->Signal(SIGKILL);
  (void)src_->Wait(absl::Seconds(10));
  VmInfo info;
  deadline = absl::Now() + absl::Seconds(30);
  while (absl::Now() < deadline) {
    grpc::ClientContext c;
    c.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));  // never hang
    if (dst_stub_->GetInfo(&c, GetInfoRequest(), &info).ok() && info.state() == PAUSED &&
        !info.migration_note().empty())
      break;
    absl::SleepFor(absl::Milliseconds(50));
  }
  EXPECT_EQ(info.state(), PAUSED) << Errs();
  EXPECT_NE(info.migration_note().find("post-copy migration failed"), std::string::npos)
      << info.migration_note();
  EXPECT_NE(info.migration_note().find("never zero-filled"), std::string::npos);
  std::string dlog = ReadFileOrEmpty(dir_.File("dst.log"));
  EXPECT_EQ(dlog.find("FAIL"), std::string::npos) << dlog;
  // Paused, and no page is made up for it: the guest's output does not move.
  std::string before = ReadFileOrEmpty(dir_.File("dst.log"));
  absl::SleepFor(absl::Milliseconds(500));
  EXPECT_EQ(ReadFileOrEmpty(dir_.File("dst.log")), before);
  dst_->Signal(SIGKILL);
}

// The link drops in the middle of post-copy and comes back: both sides pause (the source keeps
// every page, the destination's guest waits), RecoverMigration reconnects and the migration
// completes without a single page lost.
TEST_F(PostcopyTest, LinkDropMidPostcopyRecovers) {
  REQUIRE_KVM();
  signal(SIGPIPE, SIG_IGN);  // the proxy writes into sockets that the cut closes
  StartDestination();
  LinkProxy proxy(dir_.File("proxy.sock"), dir_.File("dst.sock"));
  ASSERT_TRUE(proxy.Start());
  // The guest pulls what it walks on demand (unlimited): 32 MiB take it a few seconds here.
  StartSource("mib=32");
  StartMigrationRequest req;
  req.set_mode(StartMigrationRequest::POSTCOPY);
  req.set_bandwidth_limit_bytes_per_s(256 << 10);  // the push alone would take ~2 min
  req.set_destination(dir_.File("proxy.sock"));
  req.set_streams(2);
  {
    StartMigrationResponse resp;
    grpc::ClientContext c;
    grpc::Status s = src_stub_->StartMigration(&c, req, &resp);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }
  absl::Time deadline = absl::Now() + absl::Seconds(30);
  while (absl::Now() < deadline && Progress().phase() != MIGRATION_POSTCOPY)
    absl::SleepFor(absl::Milliseconds(20));
  ASSERT_EQ(Progress().phase(), MIGRATION_POSTCOPY) << Errs();
  absl::SleepFor(absl::Milliseconds(300));  // the guest runs a little on the destination
  proxy.Cut();

  // The source pauses the migration (a watch ends there) and says how to go on.
  MigrationProgress p = WaitEnd();
  ASSERT_EQ(p.phase(), MIGRATION_POSTCOPY_PAUSED) << p.error() << Errs();
  EXPECT_NE(p.error().find("RecoverMigration"), std::string::npos) << p.error();
  EXPECT_GT(p.remaining_pages(), 0u) << "the cut came after the push ended; nothing to recover";
  VmInfo info;
  deadline = absl::Now() + absl::Seconds(30);
  while (absl::Now() < deadline) {
    grpc::ClientContext c;
    c.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
    if (dst_stub_->GetInfo(&c, GetInfoRequest(), &info).ok() && info.state() == PAUSED &&
        !info.migration_note().empty())
      break;
    absl::SleepFor(absl::Milliseconds(50));
  }
  ASSERT_EQ(info.state(), PAUSED) << Errs();
  EXPECT_NE(info.migration_note().find("post-copy migration failed"), std::string::npos)
      << info.migration_note();
  auto recover = [&] {
    RecoverMigrationRequest r;
    r.set_destination(dir_.File("proxy.sock"));
    RecoverMigrationResponse resp;
    grpc::ClientContext c;
    return src_stub_->RecoverMigration(&c, r, &resp);
  };
  // While the link is still down a recovery fails (after the connect timeout) and leaves the
  // migration paused and recoverable; a second one at the same time is refused.
  grpc::Status s = recover();
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(recover().error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  p = WaitEnd();
  ASSERT_EQ(p.phase(), MIGRATION_POSTCOPY_PAUSED) << p.error() << Errs();
  EXPECT_NE(p.error().find("cannot connect"), std::string::npos) << p.error();
  // The link is back: recover over it.
  const int before_recover = proxy.connections();
  ASSERT_TRUE(proxy.Start());
  s = recover();
  ASSERT_TRUE(s.ok()) << s.error_message();
  p = WaitEnd();
  ASSERT_EQ(p.phase(), MIGRATION_COMPLETED) << p.error() << Errs();
  EXPECT_GT(proxy.connections(), before_recover) << "recovery used new connections";
  EXPECT_EQ(p.postcopy_stats().missing_pages(), 0u);
  ExpectGuestContinues();
  grpc::ClientContext c;
  ASSERT_TRUE(dst_stub_->GetInfo(&c, GetInfoRequest(), &info).ok());
  EXPECT_EQ(info.state(), RUNNING);
  EXPECT_EQ(info.migration_note(), "");
  auto st_src = src_->Wait(absl::Seconds(10));
  ASSERT_TRUE(st_src.has_value()) << Errs();
  EXPECT_EQ(*st_src, 0);
}

// Nothing to recover: RecoverMigration is refused where no post-copy is paused.
TEST_F(PostcopyTest, RecoverWithoutPausedPostcopyIsRefused) {
  REQUIRE_KVM();
  StartSource();
  RecoverMigrationRequest r;
  r.set_destination(dir_.File("dst.sock"));
  RecoverMigrationResponse resp;
  grpc::ClientContext c;
  grpc::Status s = src_stub_->RecoverMigration(&c, r, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();
}

}  // namespace
}  // namespace microvmm::testing
