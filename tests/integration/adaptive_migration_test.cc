// Adaptive pre-copy between two real VMM processes. A bandwidth limit far below memwalk's dirty
// rate keeps plain pre-copy from converging; the policy (tuned to act after two passes) climbs
// its ladder. The memwalk guest verifies every page of its region each generation, on the
// destination too, so a compressed or delta-encoded page that decodes wrong shows up as "FAIL".
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "proto/vmm.grpc.pb.h"
#include "tests/util/subprocess.h"

namespace microvmm::testing {
namespace {

class AdaptiveMigrationTest : public ::testing::Test {
 protected:
  void SetUp() override {}
  void StartBoth() {
    dst_ = std::make_unique<Subprocess>(
        std::vector<std::string>{Runfile("vmm/vmm"), "--incoming", dir_.File("dst.sock"),
                                 "--serial", "file:" + dir_.File("dst.log")},
        dir_.File("dst.out"), dir_.File("dst.err"));
    // One vCPU keeps a host core free for the migration threads (and compression).
    src_ = std::make_unique<Subprocess>(
        std::vector<std::string>{Runfile("vmm/vmm"), "--test-guest", "memwalk", "--vcpus", "1",
                                 "--memory", "64", "--test-guest-args", "mib=2", "--serial",
                                 "file:" + dir_.File("src.log"), "--api-socket",
                                 dir_.File("src.sock")},
        dir_.File("src.out"), dir_.File("src.err"));
    ASSERT_TRUE(WaitForFileContains(dir_.File("src.log"), "memwalk gen=2 ok", absl::Seconds(30)))
        << Errs();
    stub_ = Vmm::NewStub(
        grpc::CreateChannel("unix:" + dir_.File("src.sock"), grpc::InsecureChannelCredentials()));
  }
  // A policy that reacts after two passes, with the given ladder.
  static PolicyConfig QuickPolicy(std::vector<PolicyStep> ladder) {
    PolicyConfig p;
    for (PolicyStep s : ladder) p.add_ladder(s);
    p.set_window(2);
    p.set_confirm_iterations(1);
    p.set_settle_iterations(1);
    p.set_min_idle_cores(0);  // the test host may be busy: compress anyway
    return p;
  }
  // 1 MiB/s: memwalk rewrites its 2 MiB tens of times per second, far faster than that.
  // The pass limit only bounds a broken run (an assertion fails instead of a hang).
  grpc::Status Start(const PolicyConfig* policy, uint32_t max_iterations = 40) {
    StartMigrationRequest req;
    req.set_destination(dir_.File("dst.sock"));
    req.set_bandwidth_limit_bytes_per_s(1024 * 1024);
    req.set_downtime_limit_ms(300);
    req.set_max_iterations(max_iterations);
    if (policy) *req.mutable_policy() = *policy;
    StartMigrationResponse resp;
    grpc::ClientContext c;
    return stub_->StartMigration(&c, req, &resp);
  }
  MigrationProgress WaitEnd() {
    grpc::ClientContext c;
    WatchMigrationRequest w;
    w.set_interval_ms(100);
    auto reader = stub_->WatchMigration(&c, w);
    MigrationProgress p, last;
    while (reader->Read(&p)) last = p;
    reader->Finish();
    return last;
  }
  void ExpectGuestContinues() {
    auto st = src_->Wait(absl::Seconds(10));
    ASSERT_TRUE(st.has_value()) << "source did not exit after migrating" << Errs();
    EXPECT_EQ(*st, 0) << Errs();
    int gen_src = MaxGeneration(ReadFileOrEmpty(dir_.File("src.log")));
    EXPECT_TRUE(WaitForGeneration(dir_.File("dst.log"), gen_src + 2, absl::Seconds(60))) << Errs();
    std::string dlog = ReadFileOrEmpty(dir_.File("dst.log"));
    EXPECT_EQ(dlog.find("FAIL"), std::string::npos) << dlog;
  }
  static std::string Decisions(const MigrationProgress& p) {
    std::string out;
    for (const PolicyDecision& d : p.policy_decisions())
      absl::StrAppend(&out, "\n  pass ", d.iteration(), " ", PolicyStep_Name(d.step()), " ",
                      PolicyDecision::Action_Name(d.action()), ": ", d.reason());
    return out;
  }
  static bool Has(const MigrationProgress& p, PolicyStep step, PolicyDecision::Action action) {
    for (const PolicyDecision& d : p.policy_decisions())
      if (d.step() == step && d.action() == action) return true;
    return false;
  }
  std::string Errs() {
    return "\nsource stderr:\n" + ReadFileOrEmpty(dir_.File("src.err")) +
           "\ndestination stderr:\n" + ReadFileOrEmpty(dir_.File("dst.err"));
  }

  TempDir dir_;
  std::unique_ptr<Subprocess> src_, dst_;
  std::unique_ptr<Vmm::Stub> stub_;
};

TEST_F(AdaptiveMigrationTest, DeltaEncodingMakesItConvergeAndEveryPageArrivesIntact) {
  REQUIRE_KVM();
  StartBoth();
  PolicyConfig policy = QuickPolicy({STEP_DELTA});
  ASSERT_TRUE(Start(&policy).ok());
  MigrationProgress p = WaitEnd();
  ASSERT_EQ(p.phase(), MIGRATION_COMPLETED) << p.error() << Decisions(p) << Errs();
  EXPECT_TRUE(Has(p, STEP_DELTA, PolicyDecision::ENABLE)) << Decisions(p);
  EXPECT_FALSE(Has(p, STEP_DELTA, PolicyDecision::DISABLE)) << Decisions(p);
  EXPECT_GT(p.delta_pages(), 0u) << Decisions(p);
  EXPECT_LT(p.iteration(), 40u) << "converged only by the pass limit" << Decisions(p);
  for (const PolicyDecision& d : p.policy_decisions())
    EXPECT_FALSE(d.reason().empty()) << "a decision without its numbers";
  ExpectGuestContinues();
}

TEST_F(AdaptiveMigrationTest, CompressionMakesItConvergeAndEveryPageArrivesIntact) {
  REQUIRE_KVM();
  StartBoth();
  PolicyConfig policy = QuickPolicy({STEP_COMPRESS});
  ASSERT_TRUE(Start(&policy).ok());
  MigrationProgress p = WaitEnd();
  ASSERT_EQ(p.phase(), MIGRATION_COMPLETED) << p.error() << Decisions(p) << Errs();
  EXPECT_TRUE(Has(p, STEP_COMPRESS, PolicyDecision::ENABLE)) << Decisions(p);
  EXPECT_GT(p.compressed_pages(), 0u) << Decisions(p);
  EXPECT_LT(p.iteration(), 40u) << "converged only by the pass limit" << Decisions(p);
  ExpectGuestContinues();
}

TEST_F(AdaptiveMigrationTest, ThrottleOnlyLadderThrottlesAndReleasesAtSwitchover) {
  // Throttling alone cannot beat a 1 MiB/s link here; the pass limit ends it. The throttle is
  // applied (and tuned) while it runs, and the guest on the destination runs unthrottled.
  REQUIRE_KVM();
  StartBoth();
  PolicyConfig policy = QuickPolicy({STEP_THROTTLE});
  ASSERT_TRUE(Start(&policy, /*max_iterations=*/6).ok());
  MigrationProgress p = WaitEnd();
  ASSERT_EQ(p.phase(), MIGRATION_COMPLETED) << p.error() << Decisions(p) << Errs();
  EXPECT_TRUE(Has(p, STEP_THROTTLE, PolicyDecision::ENABLE)) << Decisions(p);
  ExpectGuestContinues();
}

TEST_F(AdaptiveMigrationTest, BadPolicyIsRefusedAndTheVmKeepsRunning) {
  REQUIRE_KVM();
  StartBoth();
  PolicyConfig dup = QuickPolicy({STEP_DELTA, STEP_DELTA});
  grpc::Status s = Start(&dup);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("duplicate"), std::string::npos) << s.error_message();
  PolicyConfig window = QuickPolicy({});
  window.set_window(1);
  s = Start(&window);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_NE(s.error_message().find("window"), std::string::npos) << s.error_message();
  // A policy steers pre-copy passes: with pure post-copy there are none.
  StartMigrationRequest req;
  req.set_destination(dir_.File("dst.sock"));
  req.set_mode(StartMigrationRequest::POSTCOPY);
  *req.mutable_policy() = QuickPolicy({});
  StartMigrationResponse resp;
  grpc::ClientContext c;
  s = stub_->StartMigration(&c, req, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  // Still running, still verifying.
  int gen = MaxGeneration(ReadFileOrEmpty(dir_.File("src.log")));
  EXPECT_TRUE(WaitForGeneration(dir_.File("src.log"), gen + 1, absl::Seconds(30))) << Errs();
}

}  // namespace
}  // namespace microvmm::testing
