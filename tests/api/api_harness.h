// Test harness: a real in-process ApiServer on a unix socket in a fresh /tmp directory
// (Bazel's TEST_TMPDIR is too long for sun_path), a client stub, and the exit callback recorded.
#ifndef MICROVMM_TESTS_API_API_HARNESS_H_
#define MICROVMM_TESTS_API_API_HARNESS_H_

#include <stdlib.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>

#include "absl/synchronization/notification.h"
#include "absl/time/time.h"
#include "api/server.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "proto/vmm.grpc.pb.h"

namespace microvmm::testing {

// A fresh directory under /tmp, removed (recursively) on destruction.
class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/vmmapi.XXXXXX";
    if (mkdtemp(tmpl) != nullptr) path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    if (!path_.empty()) std::filesystem::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

class ApiHarness {
 public:
  // Serves `vm` (if null: an ApiServer without a VM, waiting for CreateVm).
  explicit ApiHarness(std::unique_ptr<Vm> vm = nullptr) {
    auto on_exit = [this](int status) {
      exit_calls_.fetch_add(1);
      exit_status_.store(status);
      if (!exited_.HasBeenNotified()) exited_.Notify();
    };
    api_ = vm ? std::make_unique<ApiServer>(std::move(vm), on_exit)
              : std::make_unique<ApiServer>(on_exit);
    EXPECT_FALSE(dir_.path().empty()) << "mkdtemp failed";
    socket_ = dir_.path() + "/api.sock";
    absl::StatusOr<std::unique_ptr<grpc::Server>> server = StartApiServer(socket_, api_.get());
    EXPECT_TRUE(server.ok()) << server.status();
    if (server.ok()) server_ = std::move(*server);
    stub_ =
        Vmm::NewStub(grpc::CreateChannel("unix:" + socket_, grpc::InsecureChannelCredentials()));
  }
  ~ApiHarness() {
    if (server_) server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
    server_.reset();
    api_.reset();
  }

  Vmm::Stub& stub() { return *stub_; }
  ApiServer& api() { return *api_; }
  const std::string& socket() const { return socket_; }
  const std::string& dir() const { return dir_.path(); }

  // Waits for the exit callback; its status, or -1 on timeout.
  int WaitForExitCallback(absl::Duration timeout = absl::Seconds(5)) {
    if (!exited_.WaitForNotificationWithTimeout(timeout)) return -1;
    return exit_status_.load();
  }
  int exit_calls() const { return exit_calls_.load(); }

  // Convenience RPCs with a 10 s deadline.
  grpc::Status CreateVm(const VmConfig& config) {
    CreateVmRequest request;
    *request.mutable_config() = config;
    CreateVmResponse response;
    auto ctx = Context();
    return stub_->CreateVm(ctx.get(), request, &response);
  }
  grpc::Status Boot() {
    BootResponse response;
    auto ctx = Context();
    return stub_->Boot(ctx.get(), BootRequest(), &response);
  }
  grpc::Status Pause() {
    PauseResponse response;
    auto ctx = Context();
    return stub_->Pause(ctx.get(), PauseRequest(), &response);
  }
  grpc::Status Resume() {
    ResumeResponse response;
    auto ctx = Context();
    return stub_->Resume(ctx.get(), ResumeRequest(), &response);
  }
  grpc::Status Shutdown() {
    ShutdownResponse response;
    auto ctx = Context();
    return stub_->Shutdown(ctx.get(), ShutdownRequest(), &response);
  }
  grpc::Status GetInfo(VmInfo* info) {
    auto ctx = Context();
    return stub_->GetInfo(ctx.get(), GetInfoRequest(), info);
  }
  VmRunState State() {
    VmInfo info;
    grpc::Status s = GetInfo(&info);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return info.state();
  }

 private:
  static std::unique_ptr<grpc::ClientContext> Context() {
    auto ctx = std::make_unique<grpc::ClientContext>();
    ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    return ctx;
  }

  TempDir dir_;
  std::string socket_;
  std::unique_ptr<ApiServer> api_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<Vmm::Stub> stub_;
  absl::Notification exited_;
  std::atomic<int> exit_calls_{0};
  std::atomic<int> exit_status_{-1};
};

// True if /dev/kvm can be opened; otherwise prints the KVM UNAVAILABLE line to stderr.
inline bool KvmAvailable() {
  if (access("/dev/kvm", R_OK | W_OK) == 0) return true;
  std::fprintf(stderr, "KVM UNAVAILABLE: /dev/kvm missing — this KVM test did not run\n");
  return false;
}

#define SKIP_WITHOUT_KVM()                                                             \
  do {                                                                                 \
    if (!::microvmm::testing::KvmAvailable()) {                                        \
      GTEST_SKIP() << "KVM UNAVAILABLE: /dev/kvm missing — this KVM test did not run"; \
    }                                                                                  \
  } while (0)

}  // namespace microvmm::testing

#endif  // MICROVMM_TESTS_API_API_HARNESS_H_
