// The control API against a real in-process server on a unix socket: requests that need no
// KVM (no VM, bad configurations, Shutdown without a VM, socket handling, reflection, vmmctl).
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/match.h"
#include "api/server.h"
#include "api/vmmctl_lib.h"
#include "gmock/gmock.h"
#include "grpcpp/generic/generic_stub.h"
#include "gtest/gtest.h"
#include "tests/api/api_harness.h"

namespace microvmm {
namespace {

using ::microvmm::testing::ApiHarness;
using ::microvmm::testing::TempDir;
using ::testing::HasSubstr;
using ::testing::Not;

VmConfig GoodGuestConfig() {
  VmConfig config;
  config.set_vcpus(1);
  config.set_memory_mib(32);
  config.set_test_guest("hello");
  config.mutable_serial()->set_mode(SerialConfig::NONE);
  return config;
}

TEST(ApiServerTest, NotCreatedState) {
  ApiHarness h;
  VmInfo info;
  ASSERT_TRUE(h.GetInfo(&info).ok());
  EXPECT_EQ(info.state(), NOT_CREATED);
  EXPECT_EQ(info.vcpus(), 0u);
  EXPECT_EQ(info.uptime_ms(), 0u);

  for (auto [name, status] : {std::pair{"boot", h.Boot()}, std::pair{"pause", h.Pause()},
                              std::pair{"resume", h.Resume()}}) {
    EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << name;
    EXPECT_THAT(status.error_message(), HasSubstr("NOT_CREATED")) << name;
    EXPECT_THAT(status.error_message(), HasSubstr(std::string("cannot ") + name)) << name;
  }
  EXPECT_EQ(h.State(), NOT_CREATED);
  EXPECT_EQ(h.exit_calls(), 0);
  EXPECT_EQ(h.api().vm(), nullptr);
}

TEST(ApiServerTest, BadConfigsAreInvalidArgument) {
  ApiHarness h;
  TempDir scratch;
  struct Case {
    const char* name;
    VmConfig config;
  };
  std::vector<Case> cases;
  cases.push_back({"empty request", VmConfig()});
  {
    VmConfig c = GoodGuestConfig();
    c.set_vcpus(0);
    cases.push_back({"vcpus=0", c});
  }
  {
    VmConfig c = GoodGuestConfig();
    c.set_memory_mib(0);
    cases.push_back({"memory 0", c});
  }
  {
    VmConfig c = GoodGuestConfig();
    c.clear_test_guest();
    cases.push_back({"neither kernel nor test guest", c});
  }
  {
    VmConfig c = GoodGuestConfig();
    c.set_kernel("/bin/true");
    cases.push_back({"both kernel and test guest", c});
  }
  {
    VmConfig c = GoodGuestConfig();
    c.clear_test_guest();
    c.set_kernel(scratch.path() + "/no-such-vmlinux");
    cases.push_back({"nonexistent kernel file", c});
  }
  {
    VmConfig c = GoodGuestConfig();
    c.set_vcpus(4000000000u);
    cases.push_back({"absurd vcpus", c});
  }
  {
    VmConfig c = GoodGuestConfig();
    c.set_memory_mib(~0ull);
    cases.push_back({"absurd odd memory", c});
  }
  {
    VmConfig c = GoodGuestConfig();
    c.set_memory_mib(1ull << 62);
    cases.push_back({"absurd even memory", c});
  }
  {
    VmConfig c = GoodGuestConfig();
    c.set_test_guest("no-such-guest");
    cases.push_back({"unknown test guest", c});
  }
  {
    VmConfig c = GoodGuestConfig();
    c.mutable_serial()->set_mode(SerialConfig::FILE);
    cases.push_back({"serial file without path", c});
  }
  {
    VmConfig c = GoodGuestConfig();
    c.mutable_serial()->set_mode(static_cast<SerialConfig::Mode>(42));
    cases.push_back({"unknown serial mode", c});
  }
  {
    VmConfig c = GoodGuestConfig();
    c.set_initrd("/nonexistent-initrd");
    cases.push_back({"initrd with a test guest", c});
  }
  for (const Case& c : cases) {
    grpc::Status status = h.CreateVm(c.config);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT)
        << c.name << ": " << status.error_message();
    EXPECT_FALSE(status.error_message().empty()) << c.name;
    std::printf("%-32s -> %s\n", c.name, status.error_message().c_str());
  }
  EXPECT_EQ(h.State(), NOT_CREATED);  // nothing was created
  EXPECT_EQ(h.api().vm(), nullptr);
}

TEST(ApiServerTest, ShutdownWithoutVmRepliesThenFiresExitOnce) {
  ApiHarness h;
  grpc::Status status = h.Shutdown();
  ASSERT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(h.WaitForExitCallback(), 0);
  EXPECT_TRUE(h.api().shutdown_requested());

  // The process is going away: no new VM, but the API still answers until then.
  status = h.CreateVm(GoodGuestConfig());
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(status.error_message(), HasSubstr("shutting down"));
  status = h.Boot();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(status.error_message(), HasSubstr("shutting down"));
  EXPECT_EQ(h.State(), NOT_CREATED);

  EXPECT_TRUE(h.Shutdown().ok());  // accepted again, but the callback fired only once
  absl::SleepFor(absl::Milliseconds(100));
  EXPECT_EQ(h.exit_calls(), 1);
}

TEST(StartApiServerTest, RefusesNonSocketPath) {
  TempDir dir;
  const std::string path = dir.path() + "/not-a-socket";
  std::ofstream(path) << "precious data\n";
  ApiServer api(nullptr);
  absl::StatusOr<std::unique_ptr<grpc::Server>> server = StartApiServer(path, &api);
  ASSERT_FALSE(server.ok());
  EXPECT_EQ(server.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(server.status().message()), HasSubstr("exists and is not a socket"));
  std::ifstream in(path);
  std::string line;
  std::getline(in, line);
  EXPECT_EQ(line, "precious data");  // untouched

  server = StartApiServer(dir.path(), &api);  // a directory is not a socket either
  ASSERT_FALSE(server.ok());
  EXPECT_THAT(std::string(server.status().message()), HasSubstr("is not a socket"));
}

TEST(StartApiServerTest, ReplacesStaleSocket) {
  TempDir dir;
  const std::string path = dir.path() + "/api.sock";
  {  // A socket file nobody listens on any more (a VMM that died).
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    ASSERT_GE(fd, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strcpy(addr.sun_path, path.c_str());
    ASSERT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    close(fd);
  }
  struct stat st;
  ASSERT_EQ(lstat(path.c_str(), &st), 0);
  ASSERT_TRUE(S_ISSOCK(st.st_mode));

  ApiServer api(nullptr);
  absl::StatusOr<std::unique_ptr<grpc::Server>> server = StartApiServer(path, &api);
  ASSERT_TRUE(server.ok()) << server.status();
  auto stub = Vmm::NewStub(grpc::CreateChannel("unix:" + path, grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  VmInfo info;
  ASSERT_TRUE(stub->GetInfo(&ctx, GetInfoRequest(), &info).ok());
  EXPECT_EQ(info.state(), NOT_CREATED);
  (*server)->Shutdown();
}

TEST(StartApiServerTest, RefusesSocketInUse) {
  ApiHarness h;  // serving on h.socket()
  ApiServer other(nullptr);
  absl::StatusOr<std::unique_ptr<grpc::Server>> server = StartApiServer(h.socket(), &other);
  ASSERT_FALSE(server.ok());
  EXPECT_EQ(server.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(server.status().message()), HasSubstr("in use"));
  EXPECT_EQ(h.State(), NOT_CREATED);  // the first server still works
}

TEST(StartApiServerTest, ClearBindErrors) {
  TempDir dir;
  ApiServer api(nullptr);
  absl::StatusOr<std::unique_ptr<grpc::Server>> server =
      StartApiServer(dir.path() + "/missing-dir/api.sock", &api);
  ASSERT_FALSE(server.ok());
  EXPECT_EQ(server.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(server.status().message()), HasSubstr("missing-dir' does not exist"));

  server = StartApiServer("/tmp/" + std::string(150, 'x'), &api);
  ASSERT_FALSE(server.ok());
  EXPECT_EQ(server.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(server.status().message()), HasSubstr("too long"));

  server = StartApiServer("", &api);
  EXPECT_EQ(server.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(StartApiServerTest, AbstractAndTcpAddresses) {
  ApiServer api(nullptr);
  const std::string abstract = "unix-abstract:vmmapi-test-" + std::to_string(getpid());
  absl::StatusOr<std::unique_ptr<grpc::Server>> server = StartApiServer(abstract, &api);
  ASSERT_TRUE(server.ok()) << server.status();
  {
    auto stub = Vmm::NewStub(grpc::CreateChannel(abstract, grpc::InsecureChannelCredentials()));
    grpc::ClientContext ctx;
    VmInfo info;
    EXPECT_TRUE(stub->GetInfo(&ctx, GetInfoRequest(), &info).ok());
  }
  (*server)->Shutdown();

  int port = 0;
  server = StartApiServer("127.0.0.1:0", &api, &port);
  ASSERT_TRUE(server.ok()) << server.status();
  EXPECT_GT(port, 0);
  {
    auto stub = Vmm::NewStub(grpc::CreateChannel("127.0.0.1:" + std::to_string(port),
                                                 grpc::InsecureChannelCredentials()));
    grpc::ClientContext ctx;
    VmInfo info;
    EXPECT_TRUE(stub->GetInfo(&ctx, GetInfoRequest(), &info).ok());
    EXPECT_EQ(info.state(), NOT_CREATED);
  }
  (*server)->Shutdown();
}

// grpcurl-style tools list services through server reflection. No reflection client stubs ship
// with Debian, so speak grpc.reflection.v1alpha by hand: ServerReflectionRequest{list_services:
// "*"} is field 7 (string): bytes 0x3a 0x01 '*'.
TEST(StartApiServerTest, ServerReflectionListsVmm) {
  ApiHarness h;
  auto channel = grpc::CreateChannel("unix:" + h.socket(), grpc::InsecureChannelCredentials());
  grpc::GenericStub stub(channel);
  grpc::CompletionQueue cq;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  auto next = [&cq](intptr_t want) {
    void* tag = nullptr;
    bool ok = false;
    EXPECT_TRUE(cq.Next(&tag, &ok));
    EXPECT_EQ(reinterpret_cast<intptr_t>(tag), want);
    return ok;
  };
  std::unique_ptr<grpc::GenericClientAsyncReaderWriter> call =
      stub.PrepareCall(&ctx, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", &cq);
  call->StartCall(reinterpret_cast<void*>(1));
  ASSERT_TRUE(next(1));
  const char request_bytes[] = {0x3a, 0x01, '*'};
  grpc::Slice slice(request_bytes, sizeof(request_bytes));
  grpc::ByteBuffer request(&slice, 1);
  call->Write(request, reinterpret_cast<void*>(2));
  ASSERT_TRUE(next(2));
  call->WritesDone(reinterpret_cast<void*>(3));
  ASSERT_TRUE(next(3));
  grpc::ByteBuffer response;
  call->Read(&response, reinterpret_cast<void*>(4));
  ASSERT_TRUE(next(4));
  std::vector<grpc::Slice> slices;
  ASSERT_TRUE(response.Dump(&slices).ok());
  std::string bytes;
  for (const grpc::Slice& s : slices)
    bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  EXPECT_THAT(bytes, HasSubstr("microvmm.Vmm"));
  grpc::Status status;
  call->Finish(&status, reinterpret_cast<void*>(5));
  next(5);
  EXPECT_TRUE(status.ok()) << status.error_message();
}

// vmmctl end to end against the in-process server.
int RunVmmctl(std::vector<std::string> args, std::string* out, std::string* err) {
  std::ostringstream o, e;
  const int rc = vmmctl::Run(args, o, e);
  *out = o.str();
  *err = e.str();
  return rc;
}

TEST(VmmctlTest, AgainstServerWithoutVm) {
  ApiHarness h;
  std::string out, err;
  ASSERT_EQ(RunVmmctl({"--socket", h.socket(), "info"}, &out, &err), 0) << err;
  EXPECT_EQ(out, "state:       NOT_CREATED\n");
  ASSERT_EQ(RunVmmctl({"info", "--json", "--socket", h.socket()}, &out, &err), 0) << err;
  EXPECT_THAT(out, HasSubstr("\"state\": \"NOT_CREATED\""));

  EXPECT_EQ(RunVmmctl({"--socket", h.socket(), "boot"}, &out, &err), 1);
  EXPECT_TRUE(absl::StartsWith(err, "vmmctl: FAILED_PRECONDITION: cannot boot: ")) << err;
  EXPECT_THAT(err, HasSubstr("NOT_CREATED"));
  EXPECT_EQ(err.find('\n'), err.size() - 1) << err;

  EXPECT_EQ(RunVmmctl({"--socket", h.socket(), "create", "--test-guest", "hello", "--vcpus", "0"},
                      &out, &err),
            1);
  EXPECT_TRUE(absl::StartsWith(err, "vmmctl: INVALID_ARGUMENT: ")) << err;

  EXPECT_EQ(
      RunVmmctl({"--socket", h.socket(), "create", "--kernel", "no/such/vmlinux"}, &out, &err), 1);
  EXPECT_TRUE(absl::StartsWith(err, "vmmctl: INVALID_ARGUMENT: ")) << err;

  ASSERT_EQ(RunVmmctl({"--socket", h.socket(), "shutdown"}, &out, &err), 0) << err;
  EXPECT_EQ(h.WaitForExitCallback(), 0);
}

}  // namespace
}  // namespace microvmm
