// The control API driving a real VM (needs /dev/kvm): the full life cycle
// CreateVm -> Boot -> Pause -> Resume -> Shutdown, state preconditions, double CreateVm, and an
// ApiServer given an already created VM (the `vmm --test-guest ... --api-socket ...` case).
#include <stdlib.h>
#include <unistd.h>

#include <fstream>
#include <sstream>
#include <string>

#include "absl/strings/match.h"
#include "api/server.h"
#include "api/vmmctl_lib.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/api/api_harness.h"

namespace microvmm {
namespace {

using ::microvmm::testing::ApiHarness;
using ::testing::HasSubstr;

// memwalk with gens=0 runs until stopped.
VmConfig ForeverGuest(const std::string& serial_file) {
  VmConfig config;
  config.set_vcpus(2);
  config.set_memory_mib(64);
  config.set_test_guest("memwalk");
  config.set_test_guest_args("mib=4 gens=0");
  if (serial_file.empty()) {
    config.mutable_serial()->set_mode(SerialConfig::NONE);
  } else {
    config.mutable_serial()->set_mode(SerialConfig::FILE);
    config.mutable_serial()->set_path(serial_file);
  }
  return config;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

int CountOf(const std::string& text, const std::string& needle) {
  int found = 0;
  for (size_t pos = text.find(needle); pos != std::string::npos; pos = text.find(needle, pos + 1)) {
    ++found;
  }
  return found;
}

// Waits (up to 5 s) until the file at `path` contains `needle` at least `count` times.
bool WaitForOutput(const std::string& path, const std::string& needle, int count = 1) {
  const absl::Time deadline = absl::Now() + absl::Seconds(5);
  while (absl::Now() < deadline) {
    if (CountOf(ReadFile(path), needle) >= count) return true;
    absl::SleepFor(absl::Milliseconds(5));
  }
  return false;
}

void ExpectPrecondition(const grpc::Status& status, const char* state) {
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << status.error_message();
  EXPECT_THAT(status.error_message(), HasSubstr(state));
}

TEST(ApiKvmTest, LifeCycle) {
  SKIP_WITHOUT_KVM();
  ApiHarness h;
  const std::string serial = h.dir() + "/serial.log";
  grpc::Status status = h.CreateVm(ForeverGuest(serial));
  ASSERT_TRUE(status.ok()) << status.error_message();
  VmInfo info;
  ASSERT_TRUE(h.GetInfo(&info).ok());
  EXPECT_EQ(info.state(), CREATED);
  EXPECT_EQ(info.vcpus(), 2u);
  EXPECT_EQ(info.memory_mib(), 64u);
  EXPECT_EQ(info.uptime_ms(), 0u);
  EXPECT_EQ(info.config().test_guest(), "memwalk");
  EXPECT_EQ(info.config().serial().path(), serial);
  ExpectPrecondition(h.Pause(), "CREATED");
  ExpectPrecondition(h.Resume(), "CREATED");

  status = h.Boot();
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(h.State(), RUNNING);
  ExpectPrecondition(h.Boot(), "RUNNING");
  ExpectPrecondition(h.Resume(), "RUNNING");
  // The guest really runs: it prints its banner and completes generations.
  ASSERT_TRUE(WaitForOutput(serial, "memwalk start")) << ReadFile(serial);
  ASSERT_TRUE(WaitForOutput(serial, "memwalk gen=", 2)) << ReadFile(serial);
  absl::SleepFor(absl::Milliseconds(50));

  status = h.Pause();
  ASSERT_TRUE(status.ok()) << status.error_message();
  ASSERT_TRUE(h.GetInfo(&info).ok());
  EXPECT_EQ(info.state(), PAUSED);
  EXPECT_GE(info.uptime_ms(), 40u);
  ExpectPrecondition(h.Pause(), "PAUSED");
  ExpectPrecondition(h.Boot(), "PAUSED");
  // Paused: no guest progress.
  const std::string paused_output = ReadFile(serial);
  absl::SleepFor(absl::Milliseconds(100));
  EXPECT_EQ(ReadFile(serial), paused_output);

  status = h.Resume();
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(h.State(), RUNNING);
  EXPECT_EQ(h.exit_calls(), 0);
  // Resumed: progress again.
  EXPECT_TRUE(WaitForOutput(serial, "memwalk gen=", CountOf(paused_output, "memwalk gen=") + 1))
      << ReadFile(serial);

  status = h.Shutdown();
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(h.WaitForExitCallback(), kExitOk);
  ASSERT_TRUE(h.GetInfo(&info).ok());
  EXPECT_EQ(info.state(), EXITED);
  EXPECT_EQ(info.exit_status(), kExitOk);
  EXPECT_FALSE(info.exit_reason().empty());
  std::printf("exit reason: %s, uptime %llu ms\n", info.exit_reason().c_str(),
              static_cast<unsigned long long>(info.uptime_ms()));
  ExpectPrecondition(h.Boot(), "EXITED");
  ExpectPrecondition(h.Resume(), "EXITED");
  EXPECT_TRUE(h.Shutdown().ok());  // idempotent; the callback fired once
  EXPECT_EQ(h.exit_calls(), 1);
}

TEST(ApiKvmTest, ShutdownWhilePaused) {
  SKIP_WITHOUT_KVM();
  ApiHarness h;
  ASSERT_TRUE(h.CreateVm(ForeverGuest("")).ok());
  ASSERT_TRUE(h.Boot().ok());
  ASSERT_TRUE(h.Pause().ok());
  ASSERT_TRUE(h.Shutdown().ok());
  EXPECT_EQ(h.WaitForExitCallback(), kExitOk);
  EXPECT_EQ(h.State(), EXITED);
}

// A guest that ends by itself: GetInfo reports why, and Shutdown's exit callback carries the
// guest's status (memwalk exits 4 when its region does not fit in RAM).
TEST(ApiKvmTest, GuestExitStatusReachesExitCallback) {
  SKIP_WITHOUT_KVM();
  ApiHarness h;
  VmConfig config = ForeverGuest("");
  config.set_vcpus(1);
  config.set_test_guest_args("mib=1000");
  ASSERT_TRUE(h.CreateVm(config).ok());
  ASSERT_TRUE(h.Boot().ok());
  VmInfo info;
  const absl::Time deadline = absl::Now() + absl::Seconds(5);
  while (absl::Now() < deadline && h.State() != EXITED) absl::SleepFor(absl::Milliseconds(5));
  ASSERT_TRUE(h.GetInfo(&info).ok());
  ASSERT_EQ(info.state(), EXITED);
  EXPECT_EQ(info.exit_status(), 4);
  EXPECT_THAT(info.exit_reason(), HasSubstr("4"));
  ExpectPrecondition(h.Pause(), "EXITED");
  EXPECT_EQ(h.exit_calls(), 0);  // the process stays up until Shutdown
  ASSERT_TRUE(h.Shutdown().ok());
  EXPECT_EQ(h.WaitForExitCallback(), 4);
  ASSERT_TRUE(h.GetInfo(&info).ok());
  EXPECT_EQ(info.exit_status(), 4);  // Shutdown did not overwrite the guest's exit
}

// GetInfo reports each disk's guest I/O (the adaptive migration policy reads it as the guest's
// I/O rate): the virtioblk guest reads, writes and reads back one sector.
TEST(ApiKvmTest, DiskIoBytesAreReported) {
  SKIP_WITHOUT_KVM();
  char path[] = "/tmp/mvmm-iobytes-XXXXXX";
  int fd = mkstemp(path);
  ASSERT_GE(fd, 0);
  ASSERT_EQ(ftruncate(fd, 1 << 20), 0);
  close(fd);
  ApiHarness h;
  VmConfig config;
  config.set_vcpus(1);
  config.set_memory_mib(64);
  config.set_test_guest("virtioblk");
  config.set_test_guest_args("write=3:5a");
  config.add_disks()->set_path(path);
  config.mutable_serial()->set_mode(SerialConfig::NONE);
  ASSERT_TRUE(h.CreateVm(config).ok());
  ASSERT_TRUE(h.Boot().ok());
  const absl::Time deadline = absl::Now() + absl::Seconds(60);
  while (absl::Now() < deadline && h.State() != EXITED) absl::SleepFor(absl::Milliseconds(10));
  VmInfo info;
  ASSERT_TRUE(h.GetInfo(&info).ok());
  unlink(path);
  ASSERT_EQ(info.state(), EXITED);
  EXPECT_EQ(info.exit_status(), 0) << info.exit_reason();
  ASSERT_EQ(info.devices_size(), 1);
  EXPECT_EQ(info.devices(0).kind(), "blk");
  // Pre-write read + write + read-back of 512-byte sectors (GET_ID adds up to 20).
  EXPECT_GE(info.devices(0).io_bytes(), 3u * 512);
  EXPECT_LE(info.devices(0).io_bytes(), 3u * 512 + 64);
}

// The virtiorng guest's queue kicks (16-bit writes to the notify register) reach the device
// through KVM ioeventfds on the device event loop, not as MMIO exits; GetInfo reports them.
TEST(ApiKvmTest, VirtioKicksGoThroughIoeventfd) {
  SKIP_WITHOUT_KVM();
  ApiHarness h;
  VmConfig config;
  config.set_vcpus(1);
  config.set_memory_mib(64);
  config.set_test_guest("virtiorng");
  config.set_rng(true);
  config.mutable_serial()->set_mode(SerialConfig::NONE);
  ASSERT_TRUE(h.CreateVm(config).ok());
  ASSERT_TRUE(h.Boot().ok());
  const absl::Time deadline = absl::Now() + absl::Seconds(60);
  while (absl::Now() < deadline && h.State() != EXITED) absl::SleepFor(absl::Milliseconds(10));
  VmInfo info;
  ASSERT_TRUE(h.GetInfo(&info).ok());
  ASSERT_EQ(info.state(), EXITED);
  EXPECT_EQ(info.exit_status(), 0) << info.exit_reason();
  ASSERT_EQ(info.devices_size(), 1);
  const DeviceStatus& d = info.devices(0);
  EXPECT_EQ(d.kind(), "rng");
  EXPECT_EQ(d.pci_address(), "0000:00:01.0");
  EXPECT_EQ(d.device_status() & 0x4, 0x4u) << "DRIVER_OK";
  EXPECT_GE(d.kicks_ioeventfd(), 1u);
  EXPECT_EQ(d.kicks_trapped(), 0u);

  // No balloon on this VM: both balloon calls are refused with a clear reason.
  grpc::ClientContext c1, c2;
  SetBalloonResponse r1;
  SetBalloonRequest req;
  req.set_target_mib(8);
  grpc::Status s = h.stub().SetBalloon(&c1, req, &r1);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(s.error_message(), HasSubstr("no virtio-balloon"));
  BalloonStatus b;
  s = h.stub().GetBalloonStats(&c2, GetBalloonStatsRequest(), &b);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  ASSERT_TRUE(h.Shutdown().ok());
}

TEST(ApiKvmTest, DoubleCreateIsFailedPrecondition) {
  SKIP_WITHOUT_KVM();
  ApiHarness h;
  grpc::Status status = h.CreateVm(ForeverGuest(""));
  ASSERT_TRUE(status.ok()) << status.error_message();
  status = h.CreateVm(ForeverGuest(""));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(status.error_message(), HasSubstr("already exists"));
  // Even a bad config: one VM per process is checked first.
  status = h.CreateVm(VmConfig());
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(h.State(), CREATED);
  ASSERT_TRUE(h.Shutdown().ok());  // shutdown of a never-booted VM
  EXPECT_EQ(h.WaitForExitCallback(), kExitOk);
}

TEST(ApiKvmTest, ServesPrecreatedVm) {
  SKIP_WITHOUT_KVM();
  VmConfig config = ForeverGuest("");
  ASSERT_TRUE(ValidateAndDefaultConfig(config).ok());
  absl::StatusOr<std::unique_ptr<Vm>> vm = Vm::Create(config);
  ASSERT_TRUE(vm.ok()) << vm.status();
  ASSERT_TRUE((*vm)->Boot().ok());
  Vm* raw = vm->get();
  ApiHarness h(std::move(*vm));
  EXPECT_EQ(h.api().vm(), raw);
  EXPECT_EQ(h.State(), RUNNING);
  grpc::Status status = h.CreateVm(ForeverGuest(""));
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(status.error_message(), HasSubstr("RUNNING"));
  ASSERT_TRUE(h.Pause().ok());
  ASSERT_TRUE(h.Resume().ok());
  ASSERT_TRUE(h.Shutdown().ok());
  EXPECT_EQ(h.WaitForExitCallback(), kExitOk);
  EXPECT_EQ(raw->state(), RunState::kExited);
}

int RunVmmctl(std::vector<std::string> args, std::string* out, std::string* err) {
  std::ostringstream o, e;
  const int rc = vmmctl::Run(args, o, e);
  *out = o.str();
  *err = e.str();
  return rc;
}

TEST(ApiKvmTest, VmmctlLifeCycle) {
  SKIP_WITHOUT_KVM();
  ApiHarness h;
  const std::string& s = h.socket();
  std::string out, err;
  ASSERT_EQ(RunVmmctl({"--socket", s, "create", "--test-guest", "memwalk", "--test-guest-args",
                       "mib=4 gens=0", "--vcpus", "2", "--memory", "64", "--serial", "none"},
                      &out, &err),
            0)
      << err;
  ASSERT_EQ(RunVmmctl({"--socket", s, "boot"}, &out, &err), 0) << err;
  ASSERT_EQ(RunVmmctl({"--socket", s, "pause"}, &out, &err), 0) << err;
  ASSERT_EQ(RunVmmctl({"--socket", s, "info"}, &out, &err), 0) << err;
  EXPECT_THAT(out, HasSubstr("state:       PAUSED\n"));
  EXPECT_THAT(out, HasSubstr("vcpus:       2\n"));
  EXPECT_THAT(out, HasSubstr("memory:      64 MiB\n"));
  EXPECT_THAT(out, HasSubstr("test guest:  memwalk\n"));
  EXPECT_EQ(RunVmmctl({"--socket", s, "pause"}, &out, &err), 1);
  EXPECT_TRUE(absl::StartsWith(err,
                               "vmmctl: FAILED_PRECONDITION: cannot pause: the VM state is "
                               "PAUSED"))
      << err;
  ASSERT_EQ(RunVmmctl({"--socket", s, "resume"}, &out, &err), 0) << err;
  ASSERT_EQ(RunVmmctl({"--socket", s, "shutdown"}, &out, &err), 0) << err;
  EXPECT_EQ(h.WaitForExitCallback(), kExitOk);
  ASSERT_EQ(RunVmmctl({"--socket", s, "info", "--json"}, &out, &err), 0) << err;
  EXPECT_THAT(out, HasSubstr("\"state\": \"EXITED\""));
  std::printf("%s", out.c_str());
}

}  // namespace
}  // namespace microvmm
