// Live migration between two real VMM processes: the memwalk guest keeps writing and verifying
// generation-stamped pages while it moves; on the destination it must continue (next
// generations, no FAIL, no restart).
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <memory>
#include <string>
#include <vector>

#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "proto/vmm.grpc.pb.h"
#include "tests/util/subprocess.h"

namespace microvmm::testing {
namespace {


class MigrationTest : public ::testing::Test {
 protected:
  void StartSource(std::vector<std::string> extra = {}) {
    std::vector<std::string> argv = {Runfile("vmm/vmm"), "--test-guest", "memwalk", "--vcpus", "2",
                                     "--memory", "64", "--test-guest-args", "mib=8",
                                     "--serial", "file:" + dir_.File("src.log"),
                                     "--api-socket", dir_.File("src.sock")};
    argv.insert(argv.end(), extra.begin(), extra.end());
    src_ = std::make_unique<Subprocess>(argv, dir_.File("src.out"), dir_.File("src.err"));
    ASSERT_TRUE(WaitForFileContains(dir_.File("src.log"), "memwalk gen=2 ok", absl::Seconds(30)))
        << ReadFileOrEmpty(dir_.File("src.err"));
    auto ch = grpc::CreateChannel("unix:" + dir_.File("src.sock"), grpc::InsecureChannelCredentials());
    stub_ = Vmm::NewStub(ch);
  }
  void StartDestination(const std::string& listen, std::vector<std::string> extra = {}) {
    std::vector<std::string> argv = {Runfile("vmm/vmm"), "--incoming", listen, "--serial",
                                     "file:" + dir_.File("dst.log")};
    argv.insert(argv.end(), extra.begin(), extra.end());
    dst_ = std::make_unique<Subprocess>(argv, dir_.File("dst.out"), dir_.File("dst.err"));
  }
  // A CA and one certificate (SAN localhost + 127.0.0.1, client+server use) signed by it.
  std::vector<std::string> MakeTls() {
    std::string d = dir_.path();
    std::string cmd =
        "cd " + d + " && openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem "
        "-days 1 -subj /CN=test-ca 2>/dev/null && "
        "openssl req -newkey rsa:2048 -nodes -keyout vmm.key -out vmm.csr -subj /CN=localhost "
        "2>/dev/null && printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\\nextendedKeyUsage="
        "serverAuth,clientAuth\\n' > ext && openssl x509 -req -in vmm.csr -CA ca.pem -CAkey "
        "ca.key -CAcreateserial -out vmm.pem -days 1 -extfile ext 2>/dev/null";
    EXPECT_EQ(system(cmd.c_str()), 0) << cmd;
    return {"--tls-cert", d + "/vmm.pem", "--tls-key", d + "/vmm.key", "--tls-ca", d + "/ca.pem"};
  }
  // Starts the migration and watches it to the end.
  MigrationProgress Migrate(const std::string& to, uint32_t streams = 2) {
    StartMigrationRequest req;
    req.set_destination(to);
    req.set_streams(streams);
    req.set_downtime_limit_ms(300);
    StartMigrationResponse resp;
    grpc::ClientContext c1;
    grpc::Status s = stub_->StartMigration(&c1, req, &resp);
    EXPECT_TRUE(s.ok()) << s.error_message();
    MigrationProgress last;
    grpc::ClientContext c2;
    WatchMigrationRequest w;
    w.set_interval_ms(100);
    auto reader = stub_->WatchMigration(&c2, w);
    MigrationProgress p;
    while (reader->Read(&p)) last = p;
    reader->Finish();
    return last;
  }
  std::string Errs() {
    return "\nsource stderr:\n" + ReadFileOrEmpty(dir_.File("src.err")) +
           "\ndestination stderr:\n" + ReadFileOrEmpty(dir_.File("dst.err"));
  }

  TempDir dir_;
  std::unique_ptr<Subprocess> src_, dst_;
  std::unique_ptr<Vmm::Stub> stub_;
};

TEST_F(MigrationTest, MemwalkMovesOverUnixSocketAndKeepsVerifying) {
  REQUIRE_KVM();
  StartDestination(dir_.File("dst.sock"));
  StartSource();
  MigrationProgress p = Migrate(dir_.File("dst.sock"));
  ASSERT_EQ(p.phase(), MIGRATION_COMPLETED) << p.error() << Errs();
  EXPECT_GT(p.pages_sent(), 0u);
  // Most of the 64 MiB was never touched: no memory behind it at the source, nothing sent.
  EXPECT_GT(p.hole_pages_not_sent(), 8192u);
  EXPECT_GT(p.destination_resume_unix_ns(), p.source_pause_unix_ns());
  int gen_src = MaxGeneration(ReadFileOrEmpty(dir_.File("src.log")));
  // Source exits 0 once its VM runs elsewhere.
  auto st = src_->Wait(absl::Seconds(10));
  ASSERT_TRUE(st.has_value()) << "source did not exit after migrating" << Errs();
  EXPECT_EQ(*st, 0) << Errs();
  // Destination continues where the source stopped and keeps verifying every page.
  std::string want = "memwalk gen=" + std::to_string(gen_src + 3) + " ok";
  EXPECT_TRUE(WaitForFileContains(dir_.File("dst.log"), want, absl::Seconds(30)))
      << "dst log:\n" << ReadFileOrEmpty(dir_.File("dst.log")) << Errs();
  std::string dlog = ReadFileOrEmpty(dir_.File("dst.log"));
  EXPECT_EQ(dlog.find("FAIL"), std::string::npos) << dlog;
  EXPECT_EQ(dlog.find("memwalk start"), std::string::npos) << "guest restarted: " << dlog;
  dst_->Signal(SIGTERM);
  auto dst_status = dst_->Wait(absl::Seconds(10));
  ASSERT_TRUE(dst_status.has_value());
  EXPECT_EQ(*dst_status, 0);
}

TEST_F(MigrationTest, VmWithVirtioRngMigrates) {
  REQUIRE_KVM();
  StartDestination(dir_.File("dst.sock"));
  StartSource({"--rng"});  // device + queue state travel in VmState
  MigrationProgress p = Migrate(dir_.File("dst.sock"));
  ASSERT_EQ(p.phase(), MIGRATION_COMPLETED) << p.error() << Errs();
  int gen_src = MaxGeneration(ReadFileOrEmpty(dir_.File("src.log")));
  EXPECT_TRUE(WaitForGeneration(dir_.File("dst.log"), gen_src + 2, absl::Seconds(30))) << Errs();
  EXPECT_EQ(ReadFileOrEmpty(dir_.File("dst.log")).find("FAIL"), std::string::npos);
}

// Every virtio device kind except net (needs a tap; see tests/virtio/net) travels in VmState.
// The destination gives its own vsock socket path (the source still listens on its own until
// it exits) and its own disk path (here a copy of the image: "this host's storage").
TEST_F(MigrationTest, VmWithAllDevicesMigratesWithLocalBackends) {
  REQUIRE_KVM();
  const std::string img = dir_.File("disk.img"), img2 = dir_.File("disk2.img");
  ASSERT_EQ(system(("truncate -s 1M " + img + " && truncate -s 1M " + img2).c_str()), 0);
  StartDestination(dir_.File("dst.sock"),
                   {"--disk", "path=" + img2 + ",engine=sync", "--vsock",
                    "cid=7,uds=" + dir_.File("dst.vsock")});
  StartSource({"--rng", "--disk", "path=" + img + ",serial=d0", "--balloon",
               "target=8,stats=1,reporting,hinting", "--vsock",
               "cid=7,uds=" + dir_.File("src.vsock")});
  MigrationProgress p = Migrate(dir_.File("dst.sock"));
  ASSERT_EQ(p.phase(), MIGRATION_COMPLETED) << p.error() << Errs();
  int gen_src = MaxGeneration(ReadFileOrEmpty(dir_.File("src.log")));
  EXPECT_TRUE(WaitForGeneration(dir_.File("dst.log"), gen_src + 2, absl::Seconds(30))) << Errs();
  EXPECT_EQ(ReadFileOrEmpty(dir_.File("dst.log")).find("FAIL"), std::string::npos);
  auto st = src_->Wait(absl::Seconds(10));
  ASSERT_TRUE(st.has_value()) << Errs();
  EXPECT_EQ(*st, 0);
  EXPECT_NE(access(dir_.File("src.vsock").c_str(), F_OK), 0) << "source vsock socket left behind";
  EXPECT_EQ(access(dir_.File("dst.vsock").c_str(), F_OK), 0) << "destination vsock not listening";
  dst_->Signal(SIGTERM);
  EXPECT_TRUE(dst_->Wait(absl::Seconds(10)).has_value());
}

// Local backends that do not fit the migrating VM are refused before anything runs there; the
// source keeps running.
TEST_F(MigrationTest, LocalBackendsThatDoNotFitAreRefused) {
  REQUIRE_KVM();
  const std::string img = dir_.File("disk.img");
  ASSERT_EQ(system(("truncate -s 1M " + img).c_str()), 0);
  StartDestination(dir_.File("dst.sock"), {"--disk", img, "--disk", img + "2"});
  StartSource({"--disk", img});
  MigrationProgress p = Migrate(dir_.File("dst.sock"));
  EXPECT_EQ(p.phase(), MIGRATION_FAILED) << Errs();
  EXPECT_NE(p.error().find("1 disks, 2 given here"), std::string::npos) << p.error();
  auto dst_status = dst_->Wait(absl::Seconds(10));
  ASSERT_TRUE(dst_status.has_value());
  EXPECT_EQ(*dst_status, 75);
  // The source VM still runs.
  int gen = MaxGeneration(ReadFileOrEmpty(dir_.File("src.log")));
  EXPECT_TRUE(WaitForGeneration(dir_.File("src.log"), gen + 2, absl::Seconds(30))) << Errs();
}

TEST_F(MigrationTest, MutualTlsOverTcp) {
  REQUIRE_KVM();
  std::vector<std::string> tls = MakeTls();
  std::string addr = "127.0.0.1:" + std::to_string(FreeLoopbackPort());
  StartDestination(addr, tls);
  StartSource(tls);
  MigrationProgress p = Migrate(addr);
  ASSERT_EQ(p.phase(), MIGRATION_COMPLETED) << p.error() << Errs();
  int gen_src = MaxGeneration(ReadFileOrEmpty(dir_.File("src.log")));
  EXPECT_TRUE(WaitForFileContains(dir_.File("dst.log"),
                                  "memwalk gen=" + std::to_string(gen_src + 2) + " ok",
                                  absl::Seconds(30)))
      << Errs();
  EXPECT_EQ(ReadFileOrEmpty(dir_.File("dst.log")).find("FAIL"), std::string::npos);
}

TEST_F(MigrationTest, TlsDestinationRefusesSourceWithoutCertificate) {
  REQUIRE_KVM();
  std::vector<std::string> tls = MakeTls();
  std::string addr = "127.0.0.1:" + std::to_string(FreeLoopbackPort());
  StartDestination(addr, tls);
  StartSource();  // no certificate: the handshake must fail, the VM must stay here
  MigrationProgress p = Migrate(addr);
  EXPECT_EQ(p.phase(), MIGRATION_FAILED) << Errs();
  GetInfoRequest req;
  VmInfo info;
  grpc::ClientContext ctx;
  ASSERT_TRUE(stub_->GetInfo(&ctx, req, &info).ok());
  EXPECT_EQ(info.state(), RUNNING);
  int gen = MaxGeneration(ReadFileOrEmpty(dir_.File("src.log")));
  EXPECT_TRUE(WaitForFileContains(dir_.File("src.log"),
                                  "memwalk gen=" + std::to_string(gen + 2) + " ok",
                                  absl::Seconds(30)));
  EXPECT_EQ(ReadFileOrEmpty(dir_.File("dst.log")), "") << "guest ran on the destination";
}

TEST_F(MigrationTest, TcpApiRequiresClientCertificate) {
  REQUIRE_KVM();
  std::vector<std::string> tls = MakeTls();
  std::string api = "127.0.0.1:" + std::to_string(FreeLoopbackPort());
  std::vector<std::string> argv = {Runfile("vmm/vmm"), "--test-guest", "memwalk", "--memory", "64",
                                   "--test-guest-args", "mib=2", "--serial",
                                   "file:" + dir_.File("src.log"), "--api-socket", api};
  argv.insert(argv.end(), tls.begin(), tls.end());
  Subprocess vmm(argv, dir_.File("src.out"), dir_.File("src.err"));
  ASSERT_TRUE(WaitForFileContains(dir_.File("src.log"), "gen=1 ok", absl::Seconds(30)));
  auto ctl = [&](std::vector<std::string> extra, const std::string& out) {
    std::vector<std::string> a = {Runfile("api/vmmctl"), "--socket", api, "--timeout", "3"};
    a.insert(a.end(), extra.begin(), extra.end());
    a.push_back("info");
    Subprocess p(a, dir_.File(out), dir_.File(out + ".err"));
    return p.Wait(absl::Seconds(20));
  };
  auto with = ctl(tls, "with");
  ASSERT_TRUE(with.has_value());
  EXPECT_EQ(*with, 0) << ReadFileOrEmpty(dir_.File("with.err"));
  EXPECT_NE(ReadFileOrEmpty(dir_.File("with")).find("RUNNING"), std::string::npos);
  auto without = ctl({}, "without");
  ASSERT_TRUE(without.has_value());
  EXPECT_EQ(*without, 1) << "plaintext client got through to an mTLS API";
}

}  // namespace
}  // namespace microvmm::testing
