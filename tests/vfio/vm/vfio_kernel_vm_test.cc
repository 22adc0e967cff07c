// `--vfio` (VmConfig.vfio) end to end in a real KVM VM, with the kernel's VFIO replaced by the
// fake of tests/vfio/kernel (this machine has no /dev/vfio): the VM opens the device through
// KernelVfioDevice (cdev + iommufd), builds the PCI model with memslot BAR maps and a resampling
// INTx irqfd on real KVM, DMA-maps guest RAM, and the vfiodma test guest drives the device's DMA
// engine through trapped BAR0 accesses. The fake's BAR0 is the DMA engine of the vfio-user test
// device (register layout in tests/vfio/user/test_server/test_device.h); its DMA goes through the
// IOMMU mappings the fake received (iova -> the VMM's vaddr of guest RAM), so the guest's check
// of the copied/filled bytes proves the iova = gpa mapping is right.
// Also: bad configurations are refused before the guest runs with a clear message (missing
// device, wrong driver, busy device, non-viable group, same device twice).
#include <errno.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <optional>
#include <string>

#include "absl/strings/str_format.h"
#include "absl/time/time.h"
#include "devices/vfio/kernel/vfio_uapi.h"
#include "gtest/gtest.h"
#include "tests/util/subprocess.h"
#include "tests/vfio/kernel/fake_vfio_kernel.h"
#include "tests/vfio/user/test_server/test_device.h"
#include "vmm/base/fd.h"
#include "vmm/memory/guest_memory.h"
#include "vmm/vm.h"

namespace microvmm::testing {
namespace {

namespace td = vfio_user::testdev;
using vfio::testing::FakeVfioKernel;

constexpr char kBdf[] = "0000:3b:00.0";
constexpr char kSysfs[] = "/sys/bus/pci/devices/0000:3b:00.0";

// FakeVfioKernel whose BAR0 page 0 is the test DMA engine; page 1 (scratch) is a sparse mmap
// area, so the VM maps it into the guest as a memslot. INTA#, no MSI-X capability.
class DmaDeviceKernel : public FakeVfioKernel {
 public:
  DmaDeviceKernel() {
    AddPciDevice(kBdf, "vfio-pci", "42", "vfio3");
    SetIommufdPresent(true);
    const uint32_t rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
    for (auto& r : regions) r = Region{};
    regions[0] = {.size = td::kBar0Size, .flags = rw | VFIO_REGION_INFO_FLAG_MMAP};
    regions[0].sparse = std::vector<vfio::MmapArea>{{td::kScratchOffset, td::kScratchSize}};
    regions[VFIO_PCI_CONFIG_REGION_INDEX] = {.size = 256, .flags = rw};
    for (auto& r : regions) r.data.assign(r.size, 0);
    std::vector<uint8_t>& c = regions[VFIO_PCI_CONFIG_REGION_INDEX].data;
    Put(c, 0x00, 2, td::kVendorId);
    Put(c, 0x02, 2, td::kDeviceId);
    Put(c, 0x08, 4, 0x00ff0000);  // class ff: unclassified
    Put(c, 0x10, 4, 0x0);         // BAR0: 32-bit memory
    c[0x3d] = 1;                  // INTA#
  }

  ssize_t Pread(int fd, void* buf, size_t count, off_t offset) override {
    if (!IsBar0Regs(offset, count)) return FakeVfioKernel::Pread(fd, buf, count, offset);
    std::memcpy(buf, reinterpret_cast<const uint8_t*>(regs_) + offset, count);
    return count;
  }
  ssize_t Pwrite(int fd, const void* buf, size_t count, off_t offset) override {
    if (!IsBar0Regs(offset, count)) return FakeVfioKernel::Pwrite(fd, buf, count, offset);
    const uint64_t reg = offset / 8;
    if (reg == td::kRegStatus / 8 || reg == td::kRegCompleted / 8) return count;  // read-only
    std::memcpy(reinterpret_cast<uint8_t*>(regs_) + offset, buf, count);
    if (reg == td::kRegDoorbell / 8) RunDma();
    return count;
  }

  uint64_t completed() const { return regs_[td::kRegCompleted / 8]; }
  int dma_errors = 0;

 private:
  static void Put(std::vector<uint8_t>& b, uint32_t off, unsigned n, uint32_t v) {
    for (unsigned i = 0; i < n; ++i) b[off + i] = static_cast<uint8_t>(v >> (8 * i));
  }
  // Accesses inside the register block of BAR0 (region 0 starts at file offset 0).
  static bool IsBar0Regs(off_t offset, size_t count) {
    return offset >= 0 && static_cast<uint64_t>(offset) + count <= td::kNumRegs * 8 &&
           offset / 8 == (offset + static_cast<off_t>(count) - 1) / 8;
  }
  // Host address of [iova, iova+len) if one IOMMU mapping covers it (what the real IOMMU
  // would translate), else nullptr.
  uint8_t* Translate(uint64_t iova, uint64_t len, bool write) {
    auto it = dma.upper_bound(iova);
    if (it == dma.begin()) return nullptr;
    --it;
    const auto& [start, m] = *it;
    if (iova - start > m.size || len > m.size - (iova - start) || (write && !m.writable))
      return nullptr;
    return reinterpret_cast<uint8_t*>(m.vaddr) + (iova - start);
  }
  void RunDma() {
    uint64_t* r = regs_;
    const bool master = regions[VFIO_PCI_CONFIG_REGION_INDEX].data[0x04] & 0x4;
    const uint64_t len = r[td::kRegLen / 8];
    uint8_t* dst = Translate(r[td::kRegDst / 8], len, true);
    uint8_t* src = r[td::kRegOp / 8] == td::kOpCopy ? Translate(r[td::kRegSrc / 8], len, false)
                                                    : dst;
    if (!master || len == 0 || len > td::kMaxDmaLen || dst == nullptr || src == nullptr ||
        r[td::kRegOp / 8] > td::kOpFill) {
      r[td::kRegStatus / 8] = td::kStatusError;
      ++dma_errors;
      return;
    }
    if (r[td::kRegOp / 8] == td::kOpCopy) {
      std::memmove(dst, src, len);
    } else {
      std::memset(dst, static_cast<int>(r[td::kRegPattern / 8] & 0xff), len);
    }
    r[td::kRegStatus / 8] = td::kStatusDone;
    r[td::kRegCompleted / 8]++;
  }

  uint64_t regs_[td::kNumRegs] = {};
};

VmConfig DmaConfig(const TempDir& dir) {
  VmConfig c;
  c.set_vcpus(1);
  c.set_memory_mib(32);
  c.set_test_guest("vfiodma");
  c.set_test_guest_args("iters=2 len=5000");
  c.mutable_serial()->set_mode(SerialConfig::FILE);
  c.mutable_serial()->set_path(dir.File("serial.log"));
  c.add_vfio()->set_sysfs_path(kSysfs);
  return c;
}

// No device at creation (hot-attach tests): `guest` with `args`.
VmConfig NoDeviceConfig(const TempDir& dir, const std::string& guest, const std::string& args) {
  VmConfig c = DmaConfig(dir);
  c.clear_vfio();
  c.set_test_guest(guest);
  c.set_test_guest_args(args);
  return c;
}

// Restores the real system calls whatever the test does.
struct ScopedFakeVfio {
  explicit ScopedFakeVfio(vfio::VfioSys* sys) { SetVfioSysForTesting(sys); }
  ~ScopedFakeVfio() { SetVfioSysForTesting(nullptr); }
};

// The function is wired as the VM wires kernel VFIO: all 32 MiB of guest RAM DMA-mapped
// (writable), INTA# as a KVM irqfd with a resamplefd; the only device, at 00:01.0.
void ExpectWired(const DmaDeviceKernel& k, Vm& vm) {
  uint64_t mapped = 0;
  for (const auto& [iova, m] : k.dma) {
    EXPECT_TRUE(m.writable);
    mapped += m.size;
  }
  EXPECT_EQ(mapped, uint64_t{32} << 20);
  EXPECT_NE(k.irqs[VFIO_PCI_INTX_IRQ_INDEX].triggers[0], -1) << "INTx trigger eventfd";
  EXPECT_NE(k.irqs[VFIO_PCI_INTX_IRQ_INDEX].unmask_fd, -1) << "INTx unmask = KVM resamplefd";
  auto devs = vm.DeviceStatuses();
  ASSERT_EQ(devs.size(), 1u);
  EXPECT_EQ(devs[0].kind(), "vfio");
  EXPECT_EQ(devs[0].pci_address(), "0000:00:01.0");
}

// The guest ran `copies` copies and as many fills through the device and exited 0.
void ExpectGuestDroveDma(Vm& vm, const DmaDeviceKernel& k, const TempDir& dir, int copies) {
  auto exit = vm.WaitForExitFor(absl::Seconds(120));
  const std::string serial = ReadFileOrEmpty(dir.File("serial.log"));
  ASSERT_TRUE(exit.has_value()) << "guest did not finish; serial:\n" << serial;
  EXPECT_EQ(exit->status, 0) << exit->reason << "\n" << serial;
  EXPECT_NE(serial.find(absl::StrFormat("vfiodma ok copies=%d fills=%d", copies, copies)),
            std::string::npos)
      << serial;
  EXPECT_EQ(k.completed(), 2u * copies);
  EXPECT_EQ(k.dma_errors, 0);
}

// Destroying the VM releases the function: DMA unmapped, device fds closed.
void ExpectReleasedOnDestroy(std::unique_ptr<Vm> vm, const DmaDeviceKernel& k) {
  vm.reset();
  EXPECT_TRUE(k.dma.empty());
  EXPECT_EQ(k.open_fd_count(), 0);
}

TEST(VfioKernelVm, GuestDrivesDmaThroughKernelVfioPath) {
  REQUIRE_KVM();
  TempDir dir;
  DmaDeviceKernel k;
  ScopedFakeVfio hook(&k);
  auto vm = Vm::Create(DmaConfig(dir));
  ASSERT_TRUE(vm.ok()) << vm.status();

  // Built: all guest RAM DMA-mapped at iova = gpa, the scratch page mmapped, INTx connected.
  ExpectWired(k, **vm);
  ASSERT_TRUE(k.dma.count(0));
  auto host0 = (*vm)->memory().HostPtr(0, 4096);
  ASSERT_TRUE(host0.ok());
  EXPECT_EQ(reinterpret_cast<uint8_t*>(k.dma.at(0).vaddr), *host0);
  EXPECT_NE(std::find(k.mmaps.begin(), k.mmaps.end(),
                      std::make_pair(uint32_t{0}, uint64_t{td::kScratchOffset})),
            k.mmaps.end())
      << "the mappable scratch page of BAR0 was not mmapped for a memslot";

  ASSERT_TRUE((*vm)->Boot().ok());
  ExpectGuestDroveDma(**vm, k, dir, 2);
  // The guest enabled bus mastering through the config shadow -> device command register.
  EXPECT_TRUE(k.regions[VFIO_PCI_CONFIG_REGION_INDEX].data[0x04] & 0x4);
  ExpectReleasedOnDestroy(std::move(*vm), k);
}

// The device's INTx trigger eventfd is attached to KVM as an irqfd: KVM consumes the counter in
// the eventfd's wake-up, so right after a write nothing is left to read (an eventfd nobody
// consumed would poll readable).
TEST(VfioKernelVm, IntxTriggerIsConsumedByKvm) {
  REQUIRE_KVM();
  TempDir dir;
  DmaDeviceKernel k;
  ScopedFakeVfio hook(&k);
  auto vm = Vm::Create(DmaConfig(dir));
  ASSERT_TRUE(vm.ok()) << vm.status();
  const int trigger = k.irqs[VFIO_PCI_INTX_IRQ_INDEX].triggers[0];
  ASSERT_GE(trigger, 0);
  uint64_t one = 1;
  ASSERT_EQ(::write(trigger, &one, sizeof(one)), static_cast<ssize_t>(sizeof(one)));
  pollfd p{trigger, POLLIN, 0};
  EXPECT_EQ(::poll(&p, 1, 0), 0) << "INTx trigger eventfd not consumed: no KVM irqfd on it";
  // Control: a plain eventfd written the same way stays readable.
  ScopedFd plain(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  ASSERT_EQ(::write(plain.get(), &one, sizeof(one)), static_cast<ssize_t>(sizeof(one)));
  pollfd q{plain.get(), POLLIN, 0};
  EXPECT_EQ(::poll(&q, 1, 0), 1);
}

// Kernel VFIO pins guest RAM at DMA map: post-copy could not keep the device's view right, so it
// is refused even for a class with a DMA model (the fake is the 1234:11f0 engine).
TEST(VfioKernelVm, PostcopyRefusedForKernelVfio) {
  REQUIRE_KVM();
  TempDir dir;
  DmaDeviceKernel k;
  ScopedFakeVfio hook(&k);
  auto vm = Vm::Create(DmaConfig(dir));
  ASSERT_TRUE(vm.ok()) << vm.status();
  absl::Status s = (*vm)->CheckPassthroughPostcopy();
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_NE(s.message().find("the IOMMU pins guest RAM"), absl::string_view::npos) << s;
  EXPECT_FALSE((*vm)->SetPassthroughPostcopy([](uint64_t, uint64_t) { return absl::OkStatus(); })
                   .ok());
}

absl::Status CreateError(DmaDeviceKernel& k, VmConfig c) {
  ScopedFakeVfio hook(&k);
  auto vm = Vm::Create(c);
  return vm.ok() ? absl::OkStatus() : vm.status();
}

TEST(VfioKernelVm, RefusalsNameTheDeviceAndTheReason) {
  REQUIRE_KVM();
  TempDir dir;
  {
    DmaDeviceKernel k;
    VmConfig c = DmaConfig(dir);
    c.mutable_vfio(0)->set_sysfs_path("/sys/bus/pci/devices/0000:3c:00.0");
    absl::Status s = CreateError(k, c);
    EXPECT_FALSE(s.ok());
    EXPECT_NE(s.message().find("vfio device 0 (/sys/bus/pci/devices/0000:3c:00.0)"),
              absl::string_view::npos) << s;
    EXPECT_NE(s.message().find("no PCI device 0000:3c:00.0"), absl::string_view::npos) << s;
    EXPECT_EQ(k.open_fd_count(), 0);
  }
  {
    DmaDeviceKernel k;
    k.symlinks[std::string(kSysfs) + "/driver"] = "../../../bus/pci/drivers/nvme";
    absl::Status s = CreateError(k, DmaConfig(dir));
    EXPECT_NE(s.message().find("not bound to vfio-pci (driver: nvme)"), absl::string_view::npos)
        << s;
  }
  {
    DmaDeviceKernel k;
    k.device_busy = true;  // another VMM holds it
    absl::Status s = CreateError(k, DmaConfig(dir));
    EXPECT_FALSE(s.ok());
    EXPECT_NE(s.message().find(kBdf), absl::string_view::npos) << s;
    EXPECT_NE(s.message().find("in use by another process"), absl::string_view::npos) << s;
    EXPECT_EQ(k.open_fd_count(), 0) << "fds leaked on a refused device";
  }
  {
    DmaDeviceKernel k;
    k.SetIommufdPresent(false);  // group path
    k.dirs.erase(std::string(kSysfs) + "/vfio-dev");
    k.AddGroupPeer("0000:3b:00.1", "snd_hda_intel");
    absl::Status s = CreateError(k, DmaConfig(dir));
    EXPECT_FALSE(s.ok());
    EXPECT_NE(s.message().find("0000:3b:00.1"), absl::string_view::npos)
        << "names the peer keeping the group non-viable: " << s;
  }
  {
    // Without the hook: the real kernel (no VFIO on this machine, or no such device anyway).
    VmConfig c = DmaConfig(dir);
    c.mutable_vfio(0)->set_sysfs_path("/sys/bus/pci/devices/ffff:ff:1f.7");
    auto vm = Vm::Create(c);
    ASSERT_FALSE(vm.ok());
    EXPECT_NE(vm.status().message().find("no PCI device ffff:ff:1f.7"), absl::string_view::npos)
        << vm.status();
  }
}

// Hot-attach tests: a VM with no device at creation, the fake kernel serving kSysfs.
class HotAttach : public ::testing::Test {
 protected:
  // Creates the VM running `guest` with `args` (into vm_); false (test failed) if it cannot.
  bool Create(const std::string& guest, const std::string& args,
              std::optional<BalloonConfig> balloon = std::nullopt) {
    VmConfig c = NoDeviceConfig(dir_, guest, args);
    if (balloon.has_value()) *c.mutable_balloon() = *balloon;
    auto vm = Vm::Create(c);
    EXPECT_TRUE(vm.ok()) << vm.status();
    if (!vm.ok()) return false;
    vm_ = std::move(*vm);
    return true;
  }
  absl::StatusOr<uint8_t> Attach(const std::string& path) {
    VfioConfig v;
    v.set_sysfs_path(path);
    return vm_->AttachVfio(v);
  }

  TempDir dir_;
  DmaDeviceKernel k_;
  ScopedFakeVfio hook_{&k_};
  std::unique_ptr<Vm> vm_;  // last: destroyed before the fake kernel serving its devices
};

// Hot-attach (Vm::AttachVfio, what AttachDevice{vfio} calls): the vfiodma guest boots with no
// device, rescans bus 0 until the function appears, checks the ACPI hotplug register and drives
// the DMA engine through the same kernel VFIO path as a device given at creation.
TEST_F(HotAttach, DeviceDrivenByRunningGuest) {
  REQUIRE_KVM();
  ASSERT_TRUE(Create("vfiodma", "wait=100000000 iters=2 len=5000"));
  EXPECT_EQ(k_.open_fd_count(), 0);
  ASSERT_TRUE(vm_->Boot().ok());
  ASSERT_TRUE(WaitForFileContains(dir_.File("serial.log"), "vfiodma waiting for hotplug\n",
                                  absl::Seconds(30)))
      << ReadFileOrEmpty(dir_.File("serial.log"));

  absl::StatusOr<uint8_t> slot = Attach(kSysfs);
  ASSERT_TRUE(slot.ok()) << slot.status();
  EXPECT_EQ(*slot, 1);  // no other device: the first free slot

  ExpectGuestDroveDma(*vm_, k_, dir_, 2);
  const std::string serial = ReadFileOrEmpty(dir_.File("serial.log"));
  EXPECT_NE(serial.find("vfiodma hotplug register ok slot=1\n"), std::string::npos) << serial;
  ExpectWired(k_, *vm_);  // as a device given at creation
  // Recorded with its slot, so a migration destination puts it there.
  const VmConfig now = vm_->config();
  ASSERT_EQ(now.vfio_size(), 1);
  EXPECT_EQ(now.vfio(0).sysfs_path(), kSysfs);
  EXPECT_EQ(now.vfio(0).pci_slot(), 1u);
  ExpectReleasedOnDestroy(std::move(vm_), k_);
}

// Refused hot-attaches leave nothing behind (no fds, DMA maps, PCI slot or config entry): the
// next good attach still gets slot 1. Attach works on a CREATED VM too (no guest needed).
TEST_F(HotAttach, RefusalsLeaveNothingAttached) {
  REQUIRE_KVM();
  ASSERT_TRUE(Create("idle", ""));
  DmaDeviceKernel& k = k_;
  auto nothing_attached = [&](const char* what) {
    EXPECT_EQ(k.open_fd_count(), 0) << what;
    EXPECT_TRUE(k.dma.empty()) << what;
    EXPECT_EQ(vm_->config().vfio_size(), 0) << what;
    EXPECT_TRUE(vm_->DeviceStatuses().empty()) << what;
  };

  absl::StatusOr<uint8_t> r = Attach("/sys/bus/pci/devices/0000:3c:00.0");
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("vfio /sys/bus/pci/devices/0000:3c:00.0: "),
            absl::string_view::npos) << r.status();
  EXPECT_NE(r.status().message().find("no PCI device 0000:3c:00.0"), absl::string_view::npos)
      << r.status();
  nothing_attached("no such device");

  EXPECT_EQ(Attach("").status().code(), absl::StatusCode::kInvalidArgument);

  k.device_busy = true;
  r = Attach(kSysfs);
  EXPECT_NE(r.status().message().find("in use by another process"), absl::string_view::npos)
      << r.status();
  nothing_attached("busy device");
  k.device_busy = false;

  // Fails after the device is open and its INTx wired: DMA mapping refused by the IOMMU.
  k.FailIoctl(vfio::uapi::kIommuIoasMap, ENOMEM);
  r = Attach(kSysfs);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("IOMMU_IOAS_MAP"), absl::string_view::npos) << r.status();
  nothing_attached("DMA map failure");

  r = Attach(kSysfs);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, 1);
  const uint64_t mapped = k.dma.size();
  const int fds = k.open_fd_count();
  // The same function again, however spelled: ALREADY_EXISTS naming the PCI address.
  for (const char* again : {"0000:3B:00.0", "/sys/bus/pci/devices/0000:3b:00.0/"}) {
    r = Attach(again);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kAlreadyExists) << r.status();
    EXPECT_NE(r.status().message().find("0000:3b:00.0"), absl::string_view::npos) << r.status();
  }
  EXPECT_EQ(k.dma.size(), mapped);
  EXPECT_EQ(k.open_fd_count(), fds);
  EXPECT_EQ(vm_->config().vfio_size(), 1);

  ASSERT_TRUE(vm_->Shutdown().ok());
  r = Attach("0000:3b:00.1");
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition) << r.status();
}

// A VM with a virtio-balloon refuses a kernel VFIO hot-attach as creation refuses --balloon with
// --vfio: the device is never opened.
TEST_F(HotAttach, RefusedWithBalloon) {
  REQUIRE_KVM();
  BalloonConfig balloon;
  balloon.set_free_page_reporting(true);
  ASSERT_TRUE(Create("idle", "", balloon));
  absl::StatusOr<uint8_t> r = Attach(kSysfs);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition) << r.status();
  EXPECT_NE(r.status().message().find("virtio-balloon cannot be used with a VFIO device"),
            absl::string_view::npos) << r.status();
  EXPECT_EQ(k_.open_fd_count(), 0);
  EXPECT_EQ(vm_->config().vfio_size(), 0);
}

// A migration destination (or any config) with VfioConfig.pci_slot puts the function there.
TEST(VfioKernelVm, FixedSlotHonouredAtCreation) {
  REQUIRE_KVM();
  TempDir dir;
  DmaDeviceKernel k;
  ScopedFakeVfio hook(&k);
  VmConfig c = DmaConfig(dir);
  c.mutable_vfio(0)->set_pci_slot(7);
  auto vm = Vm::Create(c);
  ASSERT_TRUE(vm.ok()) << vm.status();
  auto devs = (*vm)->DeviceStatuses();
  ASSERT_EQ(devs.size(), 1u);
  EXPECT_EQ(devs[0].pci_address(), "0000:00:07.0");
  vm->reset();
  c.mutable_vfio(0)->set_pci_slot(32);
  auto bad = Vm::Create(c);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("PCI slot 32 out of range"), absl::string_view::npos)
      << bad.status();
  EXPECT_EQ(k.open_fd_count(), 0);
}

// Migration destination: the local function replaces the source's path, but a hot-attached
// function keeps the source's slot (where its guest found it).
TEST(VfioKernelConfig, LocalSettingsKeepTheSourceSlot) {
  VmConfig source;
  source.set_vcpus(1);
  source.set_memory_mib(32);
  source.add_vfio()->set_sysfs_path("0000:3b:00.0");
  VfioConfig* hot = source.add_vfio();
  hot->set_sysfs_path("0000:3b:00.1");
  hot->set_pci_slot(5);
  VmConfig local;
  local.add_vfio()->set_sysfs_path("0000:5e:00.0");
  local.add_vfio()->set_sysfs_path("0000:5e:00.1");
  ASSERT_TRUE(ApplyLocalSettings(source, local).ok());
  EXPECT_EQ(source.vfio(0).sysfs_path(), "0000:5e:00.0");
  EXPECT_EQ(source.vfio(0).pci_slot(), 0u);
  EXPECT_EQ(source.vfio(1).sysfs_path(), "0000:5e:00.1");
  EXPECT_EQ(source.vfio(1).pci_slot(), 5u);
}

TEST(VfioKernelConfig, SameDeviceTwiceRefused) {
  VmConfig c;
  c.set_vcpus(1);
  c.set_memory_mib(32);
  c.set_test_guest("hello");
  c.add_vfio()->set_sysfs_path("/sys/bus/pci/devices/0000:3b:00.0/");
  c.add_vfio()->set_sysfs_path("0000:3B:00.0");
  absl::Status s = ValidateAndDefaultConfig(c);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("vfio device 1"), absl::string_view::npos) << s;
  EXPECT_NE(s.message().find("given twice"), absl::string_view::npos) << s;
  c.mutable_vfio(1)->set_sysfs_path("0000:3b:00.1");
  EXPECT_TRUE(ValidateAndDefaultConfig(c).ok());
  c.mutable_vfio(1)->set_sysfs_path("");
  EXPECT_FALSE(ValidateAndDefaultConfig(c).ok());
}

// The IOMMU pins guest RAM for a kernel VFIO device: a balloon could not give pages back.
TEST(VfioKernelConfig, BalloonRefusedWithKernelVfioButNotWithVfioUser) {
  VmConfig c;
  c.set_vcpus(1);
  c.set_memory_mib(32);
  c.set_test_guest("hello");
  c.mutable_balloon()->set_free_page_reporting(true);
  c.add_vfio()->set_sysfs_path("0000:3b:00.0");
  absl::Status s = ValidateAndDefaultConfig(c);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("virtio-balloon cannot be used with a VFIO device"),
            absl::string_view::npos)
      << s;
  c.clear_vfio();
  c.add_vfio_user()->set_socket("/tmp/some.sock");  // shares the memfd: discards reach it
  EXPECT_TRUE(ValidateAndDefaultConfig(c).ok()) << ValidateAndDefaultConfig(c);
}

}  // namespace
}  // namespace microvmm::testing
