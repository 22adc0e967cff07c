// PCI hotplug of a vfio-user device into a running VM through the API (AttachDevice), with a
// real VM (needs /dev/kvm; skips loudly without) and the real vfio_user_test_server process:
//  - the vfiodma guest boots with no device, rescans bus 0 until the hot-attached 1234:11f0
//    shows up, checks + acknowledges the ACPI hotplug register (W1C) and drives the device's
//    DMA engine ("vfiodma ok"); GetInfo then lists the device and its config;
//  - refusals leave nothing attached: socket missing / refused, same socket twice, VM exited,
//    migration running, no free slot.
//  - the same for a kernel VFIO function (AttachDevice{vfio}, `vmmctl attach --vfio`) opened
//    through the fake VFIO kernel of tests/vfio/kernel (this machine has no /dev/vfio); the
//    guest driving a hot-attached kernel function is tests/vfio/vm/vfio_kernel_vm_test.
#include <sys/socket.h>
#include <sys/un.h>
#include <linux/vfio.h>
#include <unistd.h>

#include <chrono>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "api/server.h"
#include "api/vmmctl_lib.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "proto/vmm.grpc.pb.h"
#include "tests/util/subprocess.h"
#include "tests/vfio/kernel/fake_vfio_kernel.h"
#include "vmm/vm.h"

namespace microvmm::testing {
namespace {

constexpr char kServer[] = "tests/vfio/user/test_server/vfio_user_test_server";

std::unique_ptr<grpc::ClientContext> Ctx(int seconds = 20) {
  auto c = std::make_unique<grpc::ClientContext>();
  c->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(seconds));
  return c;
}

// A fake host function 0000:3b:00.0 bound to vfio-pci (cdev + iommufd): a config space with
// ids, no BARs, no interrupts; restores the real system calls on destruction.
class FakeFunction : public vfio::testing::FakeVfioKernel {
 public:
  FakeFunction() {
    AddPciDevice("0000:3b:00.0", "vfio-pci", "42", "vfio3");
    SetIommufdPresent(true);
    for (auto& r : regions) r = Region{};
    Region& c = regions[VFIO_PCI_CONFIG_REGION_INDEX];
    c = {.size = 256, .flags = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE};
    c.data.assign(256, 0);
    c.data[0] = 0x34, c.data[1] = 0x12, c.data[2] = 0xf0, c.data[3] = 0x11;  // 1234:11f0
    c.data[0x0a] = 0x80, c.data[0x0b] = 0xff;  // class ff (unclassified)
    SetVfioSysForTesting(this);
  }
  ~FakeFunction() override { SetVfioSysForTesting(nullptr); }
};

class HotplugTest : public ::testing::Test {
 protected:
  void SetUp() override {
    api_ = std::make_unique<ApiServer>([](int) {});
    auto server = StartApiServer(dir_.File("api.sock"), api_.get());
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
    stub_ = Vmm::NewStub(
        grpc::CreateChannel("unix:" + dir_.File("api.sock"), grpc::InsecureChannelCredentials()));
  }
  void TearDown() override {
    if (server_) server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(5));
    server_.reset();
    api_.reset();
  }

  std::string StartServer(const std::string& name) {
    const std::string sock = dir_.File(name);
    servers_.push_back(std::make_unique<Subprocess>(
        std::vector<std::string>{Runfile(kServer), "--socket", sock}, dir_.File(name + ".out"),
        dir_.File(name + ".err")));
    EXPECT_TRUE(WaitForFileContains(dir_.File(name + ".out"), "READY\n", absl::Seconds(20)))
        << ReadFileOrEmpty(dir_.File(name + ".err"));
    return sock;
  }

  VmConfig Guest(const std::string& name, const std::string& args) {
    VmConfig c;
    c.set_vcpus(1);
    c.set_memory_mib(64);
    c.set_test_guest(name);
    c.set_test_guest_args(args);
    c.mutable_serial()->set_mode(SerialConfig::FILE);
    c.mutable_serial()->set_path(dir_.File("serial"));
    return c;
  }

  void CreateAndBoot(const VmConfig& c, bool boot = true) {
    CreateVmRequest req;
    *req.mutable_config() = c;
    CreateVmResponse resp;
    grpc::Status s = stub_->CreateVm(Ctx().get(), req, &resp);
    ASSERT_TRUE(s.ok()) << s.error_message();
    if (!boot) return;
    BootResponse b;
    s = stub_->Boot(Ctx().get(), BootRequest(), &b);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }

  grpc::Status AttachKernel(const std::string& sysfs_path, AttachDeviceResponse* resp) {
    AttachDeviceRequest req;
    req.mutable_vfio()->set_sysfs_path(sysfs_path);
    return stub_->AttachDevice(Ctx().get(), req, resp);
  }

  grpc::Status Attach(const std::string& socket, AttachDeviceResponse* resp) {
    AttachDeviceRequest req;
    req.mutable_vfio_user()->set_socket(socket);
    return stub_->AttachDevice(Ctx().get(), req, resp);
  }

  VmInfo Info() {
    VmInfo info;
    grpc::Status s = stub_->GetInfo(Ctx().get(), GetInfoRequest(), &info);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return info;
  }

  static int VfioUserDevices(const VmInfo& info) {
    int n = 0;
    for (const DeviceStatus& d : info.devices()) n += d.kind() == "vfio-user";
    return n;
  }

  TempDir dir_;  // first: destroyed last
  // Kernel VFIO tests: outlives the VM (api_), whose device fds it serves.
  std::unique_ptr<FakeFunction> fake_;
  std::vector<std::unique_ptr<Subprocess>> servers_;
  std::unique_ptr<ApiServer> api_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<Vmm::Stub> stub_;
};

TEST_F(HotplugTest, GuestFindsAndDrivesHotAttachedDevice) {
  REQUIRE_KVM();
  const std::string sock = StartServer("dev.sock");
  CreateAndBoot(Guest("vfiodma", "wait=100000000"));
  ASSERT_TRUE(WaitForFileContains(dir_.File("serial"), "vfiodma waiting for hotplug\n",
                                  absl::Seconds(30)))
      << ReadFileOrEmpty(dir_.File("serial"));
  EXPECT_EQ(VfioUserDevices(Info()), 0);

  AttachDeviceResponse resp;
  grpc::Status s = Attach(sock, &resp);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(resp.pci_slot(), 1u);  // no other device: the first free slot
  EXPECT_EQ(resp.pci_address(), "0000:00:01.0");

  std::optional<VmExit> exit = api_->vm()->WaitForExitFor(absl::Seconds(120));
  const std::string serial = ReadFileOrEmpty(dir_.File("serial"));
  ASSERT_TRUE(exit.has_value()) << "guest did not finish:\n" << serial;
  EXPECT_EQ(exit->status, 0) << exit->reason << "\n" << serial;
  EXPECT_NE(serial.find("vfiodma hotplug seen scans="), std::string::npos) << serial;
  EXPECT_NE(serial.find("vfiodma hotplug register ok slot=1\n"), std::string::npos) << serial;
  EXPECT_NE(serial.find("vfiodma ok copies=3 fills=3\n"), std::string::npos) << serial;
  EXPECT_EQ(serial.find("FAIL"), std::string::npos) << serial;

  VmInfo info = Info();
  ASSERT_EQ(info.config().vfio_user_size(), 1);
  EXPECT_EQ(info.config().vfio_user(0).socket(), sock);
  ASSERT_EQ(VfioUserDevices(info), 1);
  for (const DeviceStatus& d : info.devices()) {
    if (d.kind() == "vfio-user") {
      EXPECT_EQ(d.pci_address(), "0000:00:01.0");
    }
  }
}

TEST_F(HotplugTest, RefusalsLeaveNothingAttached) {
  REQUIRE_KVM();
  const std::string sock = StartServer("dev.sock");
  CreateAndBoot(Guest("idle", ""));
  AttachDeviceResponse resp;

  const std::string absent = dir_.File("absent.sock");
  grpc::Status s = Attach(absent, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND) << s.error_message();
  EXPECT_NE(s.error_message().find("no such socket"), std::string::npos) << s.error_message();
  EXPECT_NE(s.error_message().find(absent), std::string::npos) << s.error_message();

  const std::string dead = dir_.File("dead.sock");  // bound, nobody listens
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(fd, 0);
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  snprintf(a.sun_path, sizeof(a.sun_path), "%s", dead.c_str());
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  s = Attach(dead, &resp);
  ::close(fd);
  EXPECT_NE(s.error_code(), grpc::StatusCode::OK);
  EXPECT_NE(s.error_message().find("connection refused"), std::string::npos) << s.error_message();
  EXPECT_EQ(VfioUserDevices(Info()), 0);
  EXPECT_EQ(Info().config().vfio_user_size(), 0);

  // The successful attach through vmmctl (same client code as the binary).
  std::ostringstream out, err;
  EXPECT_EQ(vmmctl::Run({"--socket", dir_.File("api.sock"), "attach", "--vfio-user", sock}, out,
                        err),
            0)
      << err.str();
  EXPECT_EQ(out.str(), absl::StrCat("attached vfio-user ", sock, " at 0000:00:01.0\n"));
  std::ostringstream out2, err2;
  EXPECT_EQ(vmmctl::Run({"--socket", dir_.File("api.sock"), "attach", "--vfio-user", sock}, out2,
                        err2),
            1);
  EXPECT_NE(err2.str().find("ALREADY_EXISTS"), std::string::npos) << err2.str();
  s = Attach(sock, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::ALREADY_EXISTS) << s.error_message();
  EXPECT_EQ(VfioUserDevices(Info()), 1);
  EXPECT_EQ(Info().config().vfio_user_size(), 1);

  ASSERT_TRUE(api_->vm()->Shutdown().ok());
  s = Attach(dir_.File("other.sock"), &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();
  EXPECT_NE(s.error_message().find("EXITED"), std::string::npos) << s.error_message();
}

TEST_F(HotplugTest, RefusedWhileMigrating) {
  REQUIRE_KVM();
  CreateAndBoot(Guest("idle", ""));
  // A destination that accepts connections but never answers: the migration stays in setup.
  const std::string dst = dir_.File("dst.sock");
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  ASSERT_GE(fd, 0);
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  snprintf(a.sun_path, sizeof(a.sun_path), "%s", dst.c_str());
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  ASSERT_EQ(::listen(fd, 8), 0);
  StartMigrationRequest m;
  m.set_destination(dst);
  StartMigrationResponse mr;
  grpc::Status s = stub_->StartMigration(Ctx().get(), m, &mr);
  ASSERT_TRUE(s.ok()) << s.error_message();
  AttachDeviceResponse resp;
  s = Attach(dir_.File("dev.sock"), &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();
  EXPECT_NE(s.error_message().find("migration"), std::string::npos) << s.error_message();
  s = AttachKernel("0000:3b:00.0", &resp);  // refused before any device is looked at
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();
  EXPECT_NE(s.error_message().find("migration"), std::string::npos) << s.error_message();
  CancelMigrationResponse cr;
  (void)stub_->CancelMigration(Ctx().get(), CancelMigrationRequest(), &cr);
  ::close(fd);
}

TEST_F(HotplugTest, NoFreeSlot) {
  REQUIRE_KVM();
  // 31 disks take every slot after the host bridge (CREATED is enough: attach works there too).
  VmConfig c = Guest("idle", "");
  for (int i = 0; i < 31; ++i) {
    const std::string path = dir_.File(absl::StrCat("d", i, ".img"));
    ASSERT_EQ(::truncate(path.c_str(), 0), -1);  // does not exist yet
    FILE* f = fopen(path.c_str(), "w");
    ASSERT_NE(f, nullptr);
    ASSERT_EQ(::ftruncate(fileno(f), 4096), 0);
    fclose(f);
    c.add_disks()->set_path(path);
  }
  CreateAndBoot(c, /*boot=*/false);
  AttachDeviceResponse resp;
  grpc::Status s = Attach(dir_.File("dev.sock"), &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
  EXPECT_NE(s.error_message().find("slot"), std::string::npos) << s.error_message();
}

TEST_F(HotplugTest, KernelVfioAttachThroughApiAndVmmctl) {
  REQUIRE_KVM();
  fake_ = std::make_unique<FakeFunction>();
  FakeFunction& k = *fake_;
  CreateAndBoot(Guest("idle", ""));
  AttachDeviceResponse resp;
  grpc::Status s = AttachKernel("", &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_NE(s.error_message().find("sysfs_path"), std::string::npos) << s.error_message();
  s = AttachKernel("/sys/bus/pci/devices/0000:3c:00.0", &resp);
  EXPECT_NE(s.error_code(), grpc::StatusCode::OK);
  EXPECT_NE(s.error_message().find("no PCI device 0000:3c:00.0"), std::string::npos)
      << s.error_message();
  EXPECT_EQ(Info().config().vfio_size(), 0);
  EXPECT_EQ(k.open_fd_count(), 0);

  std::ostringstream out, err;
  EXPECT_EQ(vmmctl::Run({"--socket", dir_.File("api.sock"), "attach", "--vfio",
                         "/sys/bus/pci/devices/0000:3b:00.0"},
                        out, err),
            0)
      << err.str();
  EXPECT_EQ(out.str(), "attached vfio /sys/bus/pci/devices/0000:3b:00.0 at 0000:00:01.0\n");
  EXPECT_FALSE(k.dma.empty()) << "guest RAM DMA-mapped";
  s = AttachKernel("0000:3B:00.0", &resp);  // the same function, spelled differently
  EXPECT_EQ(s.error_code(), grpc::StatusCode::ALREADY_EXISTS) << s.error_message();

  VmInfo info = Info();
  ASSERT_EQ(info.config().vfio_size(), 1);
  EXPECT_EQ(info.config().vfio(0).pci_slot(), 1u);
  int found = 0;
  for (const DeviceStatus& d : info.devices()) {
    if (d.kind() == "vfio") {
      ++found;
      EXPECT_EQ(d.pci_address(), "0000:00:01.0");
    }
  }
  EXPECT_EQ(found, 1);
}

TEST_F(HotplugTest, KernelVfioAttachRefusedWithBalloon) {
  REQUIRE_KVM();
  fake_ = std::make_unique<FakeFunction>();
  FakeFunction& k = *fake_;
  VmConfig c = Guest("idle", "");
  c.mutable_balloon();  // present, default settings
  CreateAndBoot(c, /*boot=*/false);
  AttachDeviceResponse resp;
  grpc::Status s = AttachKernel("0000:3b:00.0", &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();
  EXPECT_NE(s.error_message().find("virtio-balloon"), std::string::npos) << s.error_message();
  EXPECT_NE(s.error_message().find("IOMMU pins guest RAM"), std::string::npos)
      << s.error_message();
  EXPECT_EQ(k.open_fd_count(), 0);
  EXPECT_EQ(Info().config().vfio_size(), 0);
}

}  // namespace
}  // namespace microvmm::testing
