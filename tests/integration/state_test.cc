// Save the complete state of a running test guest, restore it into a second VM in the same
// process (memory copied by hand), and check the guest continues there as if nothing happened.
#include <cstring>
#include <thread>

#include "gtest/gtest.h"
#include "tests/util/subprocess.h"
#include "vmm/memory/guest_memory.h"
#include "vmm/vm.h"

namespace microvmm::testing {
namespace {

VmConfig MemwalkConfig(const std::string& serial, VmConfig::DirtyTracking dt) {
  VmConfig c;
  c.set_vcpus(2);
  c.set_memory_mib(64);
  c.set_test_guest("memwalk");
  c.set_test_guest_args("mib=4");
  c.mutable_serial()->set_mode(SerialConfig::FILE);
  c.mutable_serial()->set_path(serial);
  c.set_dirty_tracking(dt);
  return c;
}


class StateTest : public ::testing::TestWithParam<VmConfig::DirtyTracking> {};

TEST_P(StateTest, SaveRestoreIntoSecondVmContinuesTheGuest) {
  REQUIRE_KVM();
  TempDir dir;
  auto a = Vm::Create(MemwalkConfig(dir.File("a.log"), GetParam()));
  ASSERT_TRUE(a.ok()) << a.status();
  ASSERT_TRUE((*a)->Boot().ok());
  ASSERT_TRUE(WaitForFileContains(dir.File("a.log"), "memwalk gen=3 ok", absl::Seconds(30)));
  ASSERT_TRUE((*a)->Pause().ok());
  auto st = (*a)->SaveState();
  ASSERT_TRUE(st.ok()) << st.status();
  int gen_a = MaxGeneration(ReadFileOrEmpty(dir.File("a.log")));

  VmConfig cb = MemwalkConfig(dir.File("b.log"), GetParam());
  auto b = Vm::CreateIncoming(cb);
  ASSERT_TRUE(b.ok()) << b.status();
  const auto& ra = (*a)->memory().regions();
  const auto& rb = (*b)->memory().regions();
  ASSERT_EQ(ra.size(), rb.size());
  for (size_t i = 0; i < ra.size(); ++i) std::memcpy(rb[i].host, ra[i].host, ra[i].size);
  ASSERT_TRUE((*b)->RestoreState(*st).ok());
  (*a)->MarkMigrated("moved to b");
  EXPECT_EQ((*a)->state(), RunState::kExited);
  ASSERT_TRUE((*b)->Boot().ok());
  // b continues with the generation after the last one a completed, and verifies all pages.
  std::string want = "memwalk gen=" + std::to_string(gen_a + 2) + " ok";
  EXPECT_TRUE(WaitForFileContains(dir.File("b.log"), want, absl::Seconds(30)))
      << "b log:\n" << ReadFileOrEmpty(dir.File("b.log"));
  std::string blog = ReadFileOrEmpty(dir.File("b.log"));
  EXPECT_EQ(blog.find("FAIL"), std::string::npos) << blog;
  EXPECT_EQ(blog.find("memwalk start"), std::string::npos) << "guest restarted instead of resuming";
  ASSERT_TRUE((*b)->Shutdown().ok());
}

TEST_P(StateTest, RestoreRejectsMismatchedState) {
  REQUIRE_KVM();
  TempDir dir;
  auto a = Vm::Create(MemwalkConfig(dir.File("a.log"), GetParam()));
  ASSERT_TRUE(a.ok()) << a.status();
  auto st = (*a)->SaveState();  // CREATED: allowed
  ASSERT_TRUE(st.ok()) << st.status();
  VmConfig one = MemwalkConfig(dir.File("b.log"), GetParam());
  one.set_vcpus(1);
  auto b = Vm::CreateIncoming(one);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ((*b)->RestoreState(*st).code(), absl::StatusCode::kInvalidArgument);
  VmState bad = *st;
  bad.mutable_vcpus(0)->set_regs("short");
  auto c = Vm::CreateIncoming(MemwalkConfig(dir.File("c.log"), GetParam()));
  ASSERT_TRUE(c.ok());
  absl::Status s = (*c)->RestoreState(bad);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  bad = *st;
  bad.set_format_version(99);
  EXPECT_EQ((*c)->RestoreState(bad).code(), absl::StatusCode::kInvalidArgument);
}

TEST_P(StateTest, SaveNeedsPausedVm) {
  REQUIRE_KVM();
  TempDir dir;
  auto a = Vm::Create(MemwalkConfig(dir.File("a.log"), GetParam()));
  ASSERT_TRUE(a.ok());
  ASSERT_TRUE((*a)->Boot().ok());
  EXPECT_EQ((*a)->SaveState().status().code(), absl::StatusCode::kFailedPrecondition);
}

INSTANTIATE_TEST_SUITE_P(Tracking, StateTest,
                         ::testing::Values(VmConfig::DIRTY_RING, VmConfig::DIRTY_BITMAP),
                         [](const auto& info) {
                           return info.param == VmConfig::DIRTY_RING ? std::string("ring")
                                                                     : std::string("bitmap");
                         });

}  // namespace
}  // namespace microvmm::testing
