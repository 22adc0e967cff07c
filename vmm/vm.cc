#include "vmm/vm.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <fstream>
#include <mutex>
#include <set>
#include <sstream>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "devices/legacy/i8042.h"
#include "devices/legacy/serial.h"
#include "devices/vfio/pci/vfio_pci_device.h"
#include "devices/vfio/user/client.h"
#include "devices/virtio/pci_transport.h"
#include "devices/virtio/balloon/balloon.h"
#include "devices/virtio/blk/blk.h"
#include "devices/virtio/net/net.h"
#include "devices/virtio/rng.h"
#include "devices/virtio/vsock/vsock.h"
#include "migration/dirty/dirty_tracker.h"
#include "vmm/pci/msix.h"
#include "vmm/pci/bar_allocator.h"
#include "vmm/pci/gsi_router.h"
#include "vmm/pci/pci_root.h"
#include "tests/guest/embedded.h"
#include "vmm/base/log.h"
#include "vmm/boot/acpi.h"
#include "vmm/boot/layout.h"
#include "vmm/boot/linux_loader.h"
#include "vmm/boot/mptable.h"
#include "vmm/boot/x86_setup.h"
#include "vmm/bus.h"
#include "vmm/event_loop.h"
#include "vmm/kvm/kvm.h"
#include "vmm/memory/guest_memory.h"
#include "vmm/throttle.h"
#include "vmm/vcpu.h"

namespace microvmm {

const char* RunStateName(RunState s) {
  switch (s) {
    case RunState::kCreated: return "CREATED";
    case RunState::kRunning: return "RUNNING";
    case RunState::kPaused: return "PAUSED";
    case RunState::kExited: return "EXITED";
  }
  return "?";
}

Vm::~Vm() = default;

namespace {

constexpr uint32_t kMaxVcpus = 254;        // MP table / xAPIC ID limit
constexpr uint32_t kMaxTestGuestVcpus = 64;  // tests/guest stack array
constexpr uint64_t kMinMemoryMib = 16;
constexpr uint16_t kTestExitPort = 0xf4;
constexpr uint16_t kPvpanicPort = 0x505;
constexpr uint16_t kSerialPort = 0x3f8;
constexpr uint32_t kSerialIrq = 4;
constexpr char kDefaultCmdline[] = "console=ttyS0 reboot=k panic=1";

// The balloon may take any part of guest RAM but all of it (at creation and SetBalloon).
absl::Status CheckBalloonTarget(uint64_t target_mib, uint64_t memory_mib) {
  if (target_mib < memory_mib) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrFormat(
      "balloon target %d MiB must be below guest memory (%d MiB)", target_mib, memory_mib));
}

absl::StatusOr<uint64_t> HostMemTotalMib() {
  std::ifstream f("/proc/meminfo");
  std::string key;
  uint64_t kb;
  while (f >> key >> kb) {
    if (key == "MemTotal:") return kb / 1024;
    f.ignore(1 << 10, '\n');
  }
  return absl::InternalError("cannot read MemTotal from /proc/meminfo");
}

absl::Status CheckReadableFile(const std::string& path, const char* what) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0)
    return absl::InvalidArgumentError(absl::StrCat(what, " '", path, "': ", strerror(errno)));
  if (!S_ISREG(st.st_mode))
    return absl::InvalidArgumentError(absl::StrCat(what, " '", path, "' is not a regular file"));
  if (::access(path.c_str(), R_OK) != 0)
    return absl::InvalidArgumentError(absl::StrCat(what, " '", path, "': ", strerror(errno)));
  return absl::OkStatus();
}

absl::StatusOr<std::vector<uint8_t>> ReadFile(const std::string& path, const char* what,
                                              uint64_t max_bytes) {
  ScopedFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd.valid())
    return absl::InvalidArgumentError(absl::StrCat(what, " '", path, "': ", strerror(errno)));
  struct stat st;
  if (::fstat(fd.get(), &st) != 0) return ErrnoStatus(errno, absl::StrCat("stat ", path));
  if (static_cast<uint64_t>(st.st_size) > max_bytes)
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s '%s' is %d bytes, larger than guest RAM allows", what, path, st.st_size));
  std::vector<uint8_t> buf(st.st_size);
  size_t off = 0;
  while (off < buf.size()) {
    ssize_t n = ::read(fd.get(), buf.data() + off, buf.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0)
      return absl::InvalidArgumentError(absl::StrCat(what, " '", path, "': short read"));
    off += n;
  }
  return buf;
}

// Port device forwarding writes to a callback (test exit, pvpanic).
class PortCallback : public BusDevice {
 public:
  explicit PortCallback(std::function<void(uint32_t)> fn) : fn_(std::move(fn)) {}
  void Read(uint64_t, std::span<uint8_t> data) override {
    for (auto& b : data) b = 0;
  }
  void Write(uint64_t, std::span<const uint8_t> data) override {
    uint32_t v = 0;
    std::memcpy(&v, data.data(), std::min<size_t>(data.size(), 4));
    fn_(v);
  }

 private:
  std::function<void(uint32_t)> fn_;
};

class VmImpl : public Vm {
 public:
  VmImpl(VmConfig config, bool incoming)
      : config_(std::move(config)), incoming_(incoming), pio_("pio"), mmio_("mmio") {}
  ~VmImpl() override {
    StopAll();
    if (loop_) loop_->Pause();  // no device handler runs while the devices are torn down
    tracker_.reset();  // before the vCPUs whose rings it maps
  }

  absl::Status Build();

  absl::Status Boot() override;
  absl::Status Pause() override;
  absl::Status Resume() override;
  absl::Status Shutdown() override;
  RunState state() const override {
    std::lock_guard lock(mu_);
    return state_;
  }
  std::optional<VmExit> exit_info() const override {
    std::lock_guard lock(mu_);
    return exit_;
  }
  absl::Duration uptime() const override {
    std::lock_guard lock(mu_);
    if (boot_time_ == absl::InfinitePast()) return absl::ZeroDuration();
    absl::Time end = state_ == RunState::kExited ? exit_time_ : absl::Now();
    return end - boot_time_;
  }
  const VmConfig& config() const override { return config_; }
  absl::StatusOr<VmState> SaveState() override;
  absl::Status RestoreState(const VmState& state) override;
  GuestMemory& memory() override { return *mem_; }
  migration::DirtyTracker& dirty_tracker() override { return *tracker_; }
  std::vector<pid_t> VcpuThreadIds() const override {
    std::vector<pid_t> out;
    for (const auto& v : vcpus_) out.push_back(v->tid());
    return out;
  }
  bool KvmUserfaultAvailable() override {
    static std::once_flag once;
    static bool available = false;
    std::call_once(once, [&] {
      std::string why;
      auto ok = ProbeKvmUserfault(*kvm_, &why);
      available = ok.ok() && *ok;
    });
    return available;
  }
  absl::Status SetMemoryFaultHandler(
      std::function<absl::Status(int, uint64_t, uint64_t, uint64_t)> fn) override {
    if (state() != RunState::kCreated)
      return absl::FailedPreconditionError("memory fault handler: the VM already runs");
    for (auto& v : vcpus_) v->SetMemoryFaultHandler(fn);
    return absl::OkStatus();
  }
  void SetVcpuWaitingProbe(std::function<bool(int)> waiting) override {
    std::lock_guard lock(mu_);
    waiting_probe_ = std::move(waiting);
  }
  absl::StatusOr<int> SetThrottle(int percent) override {
    std::lock_guard lock(throttle_mu_);
    if (throttle_ == nullptr) {
      if (percent == 0) return 0;
      std::vector<Vcpu*> v;
      for (auto& c : vcpus_) v.push_back(c.get());
      auto t = VcpuThrottle::Create(std::move(v));
      if (!t.ok()) return t.status();
      throttle_ = std::move(*t);
    }
    return throttle_->SetPercent(percent);
  }
  int throttle_percent() const override {
    std::lock_guard lock(throttle_mu_);
    return throttle_ ? throttle_->percent() : 0;
  }
  absl::Status SetRamUserfault(const std::vector<const void*>& bitmaps) override {
    const auto& regions = mem_->regions();
    if (!bitmaps.empty() && bitmaps.size() != regions.size())
      return absl::InvalidArgumentError(absl::StrFormat(
          "%d userfault bitmaps for %d RAM regions", bitmaps.size(), regions.size()));
    for (size_t i = 0; i < regions.size(); ++i) {
      const auto& r = regions[i];
      const void* bm = bitmaps.empty() ? nullptr : bitmaps[i];
      if (absl::Status s = vm_->SetUserMemoryRegion2(RamSlot(i), bm ? KVM_MEM_USERFAULT : 0,
                                                     r.gpa, r.size, r.host, bm);
          !s.ok())
        return s;
    }
    return absl::OkStatus();
  }
  void SetMigrationNote(const std::string& note) override {
    std::lock_guard lock(mu_);
    migration_note_ = note;
  }
  std::string migration_note() const override {
    std::lock_guard lock(mu_);
    return migration_note_;
  }
  std::vector<DeviceStatus> DeviceStatuses() const override;
  absl::Status SetBalloonTarget(uint64_t target_mib) override;
  absl::StatusOr<BalloonStatus> GetBalloonStatus() override;
  absl::StatusOr<uint32_t> StartFreePageHints(virtio::FreePageHintSink* sink) override {
    if (balloon_ == nullptr || !config_.balloon().free_page_hinting())
      return absl::FailedPreconditionError("the VM has no virtio-balloon with free-page hinting");
    return balloon_->StartFreePageHinting(sink);
  }
  void StopFreePageHints() override {
    if (balloon_ != nullptr && config_.balloon().free_page_hinting())
      balloon_->StopFreePageHinting();
  }
  void FinishFreePageHints() override {
    if (balloon_ != nullptr && config_.balloon().free_page_hinting())
      balloon_->FinishFreePageHinting();
  }
  void MarkMigrated(const std::string& reason) override {
    RequestExit(kExitOk, reason);
    StopAll();
  }
  VmExit WaitForExit() override {
    std::unique_lock lock(mu_);
    cv_.wait(lock, [this] { return exit_.has_value(); });
    return *exit_;
  }
  std::optional<VmExit> WaitForExitFor(absl::Duration timeout) override {
    std::unique_lock lock(mu_);
    if (!cv_.wait_for(lock, absl::ToChronoNanoseconds(timeout),
                      [this] { return exit_.has_value(); }))
      return std::nullopt;
    return *exit_;
  }

 private:
  absl::Status SetupDevices();
  absl::Status SetupVirtioDevices();
  // vfio-user PCI functions (config_.vfio_user), after the virtio devices on the bus.
  absl::Status SetupVfioUserDevices();
  // Puts `dev` on the PCI bus behind a virtio-pci transport with one MSI-X vector per queue
  // plus one for configuration changes.
  absl::Status AddVirtio(const std::string& kind, std::unique_ptr<virtio::VirtioDevice> dev);
  absl::Status LoadGuest();
  absl::Status SetupVcpus();
  // Records the first exit and stops every vCPU. Callable from vCPU threads.
  void RequestExit(int status, std::string reason);
  void StopAll();
  absl::Status CheckState(RunState want, const char* op) const;
  absl::Status ProbeMsrs();
  void Prefill();

  VmConfig config_;
  const bool incoming_;
  std::unique_ptr<migration::DirtyTracker> tracker_;
  std::vector<uint32_t> msr_indices_;  // MSRs saved with each vCPU
  int xsave2_size_ = 0;
  CpuidTable supported_cpuid_;  // KVM_GET_SUPPORTED_CPUID, read once per VM
  std::shared_ptr<I8042> i8042_;
  std::optional<Kvm> kvm_;
  std::optional<KvmVm> vm_;
  std::unique_ptr<GuestMemory> mem_;
  std::shared_ptr<Serial> serial_;
  // Owns KVM_SET_GSI_ROUTING (IOAPIC/PIC defaults + MSI routes). Declared after vm_ and before
  // the devices so devices (their MSI-X tables, ioeventfds) go first on destruction.
  std::unique_ptr<pci::GsiRouter> gsi_router_;
  // Device work off the vCPU threads (ioeventfds, backends). Outlives the devices.
  std::unique_ptr<EventLoop> loop_;
  struct VirtioSlot {
    std::string kind;  // "rng", "blk", "net", "balloon", "vsock"
    std::unique_ptr<virtio::VirtioDevice> device;
    virtio::VirtioPciDevice* pci = nullptr;  // owned by pci_
    uint8_t pci_slot = 0;
  };
  std::vector<VirtioSlot> virtio_;  // declared before pci_: outlive their transports
  struct VfioUserSlot {
    std::string socket;
    std::shared_ptr<vfio::VfioPciDevice> device;  // shared with pci_
    uint8_t pci_slot = 0;
  };
  std::vector<VfioUserSlot> vfio_user_;  // DMA-mapped into mem_ until destroyed (Detach)
  virtio::VirtioBalloon* balloon_ = nullptr;  // in virtio_, if configured
  std::unique_ptr<pci::PciRootBus> pci_;
  // The buses hold shared_ptrs to devices (and PCI window dispatchers): declared after everything
  // those devices use (router, guest memory, KVM fds), so they are destroyed first.
  Bus pio_;
  Bus mmio_;
  std::vector<std::unique_ptr<Vcpu>> vcpus_;
  std::function<bool(int)> waiting_probe_;  // guarded by mu_ (SetVcpuWaitingProbe)
  // After vcpus_: destroyed first (its timer thread kicks them).
  mutable std::mutex throttle_mu_;
  std::unique_ptr<VcpuThrottle> throttle_;

  // Boot entry.
  bool linux_ = false;
  LinuxEntry linux_entry_;
  uint64_t test_entry_ = 0;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  RunState state_ = RunState::kCreated;
  std::optional<VmExit> exit_;
  absl::Time boot_time_ = absl::InfinitePast();
  absl::Time exit_time_ = absl::InfinitePast();
  std::string migration_note_;
  bool pausing_ = false;  // Pause() is waiting for the vCPUs (state_ still kRunning)
};

absl::Status VmImpl::Build() {
  auto kvm = Kvm::Open();
  if (!kvm.ok()) return kvm.status();
  kvm_.emplace(std::move(*kvm));
  auto vm = KvmVm::Create(*kvm_);
  if (!vm.ok()) return vm.status();
  vm_.emplace(std::move(*vm));
  // Addresses in the top of the 32-bit gap, below the IOAPIC/LAPIC, that KVM needs for VMX.
  if (absl::Status s = vm_->SetIdentityMapAddr(0xfeffc000); !s.ok()) return s;
  if (absl::Status s = vm_->SetTssAddr(0xfeffd000); !s.ok()) return s;
  if (absl::Status s = vm_->CreateIrqchip(); !s.ok()) return s;
  if (absl::Status s = vm_->CreatePit2(); !s.ok()) return s;
  // The dirty ring can only be switched on before vCPUs exist.
  if (config_.dirty_tracking() != VmConfig::DIRTY_BITMAP) {
    auto ring = migration::DirtyTracker::EnableDirtyRing(*vm_, 1 << 20);
    if (!ring.ok()) {
      if (config_.dirty_tracking() == VmConfig::DIRTY_RING)
        return absl::FailedPreconditionError(
            absl::StrCat("dirty ring requested but unavailable: ", ring.status().message()));
      LOG_INFO("KVM dirty ring unavailable (%s): migration will use the dirty bitmap",
               ring.status().message());
    }
  }
  xsave2_size_ = std::max(0, vm_->CheckExtension(KVM_CAP_XSAVE2));
  auto cpuid = kvm_->GetSupportedCpuid();
  if (!cpuid.ok()) return cpuid.status();
  supported_cpuid_ = std::move(*cpuid);
  auto router = pci::GsiRouter::Create(*vm_);
  if (!router.ok()) return router.status();
  gsi_router_ = std::move(*router);

  auto mem = GuestMemory::Create(config_.memory_mib() << 20);
  if (!mem.ok()) return mem.status();
  mem_ = std::move(*mem);
  uint32_t slot = 0;
  for (const auto& r : mem_->regions()) {
    if (absl::Status s = vm_->SetUserMemoryRegion(RamSlot(slot++), 0, r.gpa, r.size, r.host);
        !s.ok())
      return s;
  }
  if (absl::Status s = SetupDevices(); !s.ok()) return s;
  if (!incoming_) {
    if (absl::Status s = LoadGuest(); !s.ok()) return s;
    Prefill();
  }
  if (absl::Status s = SetupVcpus(); !s.ok()) return s;
  if (absl::Status s = ProbeMsrs(); !s.ok()) return s;
  std::vector<KvmVcpu*> kv;
  for (auto& v : vcpus_) kv.push_back(&v->kvm());
  migration::DirtyTracker::Mode mode =
      config_.dirty_tracking() == VmConfig::DIRTY_RING     ? migration::DirtyTracker::Mode::kRing
      : config_.dirty_tracking() == VmConfig::DIRTY_BITMAP ? migration::DirtyTracker::Mode::kBitmap
                                                           : migration::DirtyTracker::Mode::kAuto;
  auto tracker = migration::DirtyTracker::Create(*vm_, *mem_, kv, mode);
  if (!tracker.ok()) return tracker.status();
  tracker_ = std::move(*tracker);
  return absl::OkStatus();
}

void VmImpl::Prefill() {
  const std::string& p = config_.prefill();
  if (p.empty() || p == "zero") return;
  constexpr uint64_t kStart = 16ULL << 20;
  uint64_t x = 0x9e3779b97f4a7c15ULL;
  for (const auto& r : mem_->regions()) {
    for (uint64_t off = 0; off < r.size; off += kPageSize) {
      uint64_t gpa = r.gpa + off;
      if (gpa < kStart) continue;
      if (p == "half" && ((gpa / kPageSize) & 1)) continue;
      uint64_t* w = reinterpret_cast<uint64_t*>(r.host + off);
      for (size_t i = 0; i < kPageSize / 8; ++i) {
        x ^= x << 13;  // xorshift64: fast, incompressible enough for a benchmark
        x ^= x >> 7;
        x ^= x << 17;
        w[i] = x;
      }
    }
  }
}

absl::Status VmImpl::ProbeMsrs() {
  auto all = kvm_->GetMsrIndexList();
  if (!all.ok()) return all.status();
  // Keep the MSRs this KVM lets us read (KVM_GET_MSRS stops at the first one it rejects).
  std::vector<uint32_t> todo = *all;
  KvmVcpu& k = vcpus_.at(0)->kvm();
  while (!todo.empty()) {
    auto got = k.GetMsrs(todo);
    if (!got.ok()) return got.status();
    for (const auto& e : *got) msr_indices_.push_back(e.index);
    size_t n = got->size();
    if (n >= todo.size()) break;
    todo.erase(todo.begin(), todo.begin() + n + 1);  // skip the rejected one
  }
  return absl::OkStatus();
}

absl::Status VmImpl::SetupDevices() {
  ScopedFd out;
  switch (config_.serial().mode()) {
    case SerialConfig::STDOUT:
    case SerialConfig::MODE_UNSPECIFIED:
      out.reset(::fcntl(STDOUT_FILENO, F_DUPFD_CLOEXEC, 3));
      break;
    case SerialConfig::FILE:
      out.reset(::open(config_.serial().path().c_str(),
                       O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644));
      if (!out.valid())
        return absl::InvalidArgumentError(
            absl::StrCat("serial output file '", config_.serial().path(), "': ", strerror(errno)));
      break;
    default:
      break;
  }
  KvmVm* vm = &*vm_;
  serial_ = std::make_shared<Serial>(
      [vm] {
        (void)vm->IrqLine(kSerialIrq, true);
        (void)vm->IrqLine(kSerialIrq, false);
      },
      std::move(out));
  if (absl::Status s = pio_.Insert(serial_, kSerialPort, 8); !s.ok()) return s;
  // PCI root bus: conf1 at 0xCF8 (and reset control 0xCF9), ECAM, BAR windows in the 32-bit gap
  // and above RAM; a host bridge at 00:00.0. Devices are added before Attach().
  auto windows =
      pci::PciWindows::Default(mem_->ram_bytes(), pci::PhysAddressBits(supported_cpuid_));
  if (!windows.ok()) return windows.status();
  pci_ = std::make_unique<pci::PciRootBus>(*windows);
  pci_->set_reset_callback([this] { RequestExit(kExitOk, "guest reset via port 0xCF9"); });
  if (absl::Status s = SetupVirtioDevices(); !s.ok()) return s;
  if (absl::Status s = SetupVfioUserDevices(); !s.ok()) return s;
  if (absl::Status s = pci_->Attach(pio_, mmio_); !s.ok()) return s;
  for (VirtioSlot& v : virtio_)
    if (absl::Status s = v.pci->EnableIoEventFds(&*vm_, loop_.get()); !s.ok()) return s;
  i8042_ = std::make_shared<I8042>([this] { RequestExit(kExitOk, "guest reset via i8042"); });
  if (absl::Status s = pio_.Insert(i8042_, 0x60, 5); !s.ok()) return s;
  if (absl::Status s = pio_.Insert(std::make_shared<PortCallback>([this](uint32_t v) {
                                     int status = static_cast<int>(v & 0xff);
                                     RequestExit(status,
                                                 absl::StrCat("test guest exit, status ", status));
                                   }),
                                   kTestExitPort, 4);
      !s.ok())
    return s;
  return pio_.Insert(std::make_shared<PortCallback>([this](uint32_t v) {
                       Vcpu* cur = CurrentVcpu();
                       RequestExit(kExitGuestPanic,
                                   absl::StrFormat("guest panic (pvpanic event 0x%x) on vCPU %d\n%s",
                                                   v & 0xff, cur ? cur->id() : -1,
                                                   cur ? cur->DumpRegisters() : ""));
                     }),
                     kPvpanicPort, 1);
}

absl::Status VmImpl::AddVirtio(const std::string& kind,
                               std::unique_ptr<virtio::VirtioDevice> dev) {
  auto msix = pci::MsixTable::Create(
      *gsi_router_, static_cast<uint32_t>(dev->queue_max_sizes().size() + 1));
  if (!msix.ok()) return msix.status();
  auto pci = virtio::VirtioPciDevice::Create(mem_.get(), dev.get(), std::move(*msix));
  if (!pci.ok()) return pci.status();
  VirtioSlot slot{kind, std::move(dev), pci->get()};
  auto at = pci_->AddDevice(std::shared_ptr<pci::PciDevice>(std::move(*pci)));
  if (!at.ok()) return at.status();
  slot.pci_slot = *at;
  virtio_.push_back(std::move(slot));
  return absl::OkStatus();
}

std::vector<DeviceStatus> VmImpl::DeviceStatuses() const {
  std::vector<DeviceStatus> out;
  for (const VirtioSlot& v : virtio_) {
    DeviceStatus d;
    d.set_kind(v.kind);
    d.set_pci_address(absl::StrFormat("0000:00:%02x.0", v.pci_slot));
    d.set_device_status(v.pci->device_status());
    d.set_kicks_ioeventfd(v.pci->kicks_ioeventfd());
    d.set_kicks_trapped(v.pci->kicks_trapped());
    if (v.kind == "blk") {
      const virtio::BlockStats st = static_cast<virtio::VirtioBlock*>(v.device.get())->stats();
      d.set_io_bytes(st.bytes_read + st.bytes_written);
    } else if (v.kind == "net") {
      const virtio::NetStats st = static_cast<virtio::VirtioNet*>(v.device.get())->stats();
      d.set_io_bytes(st.rx_bytes + st.tx_bytes);
    }
    out.push_back(std::move(d));
  }
  for (const VfioUserSlot& v : vfio_user_) {
    DeviceStatus d;
    d.set_kind("vfio-user");
    d.set_pci_address(absl::StrFormat("0000:00:%02x.0", v.pci_slot));
    out.push_back(std::move(d));
  }
  return out;
}

absl::Status VmImpl::SetBalloonTarget(uint64_t target_mib) {
  if (balloon_ == nullptr)
    return absl::FailedPreconditionError("the VM has no virtio-balloon (create it with a balloon)");
  if (absl::Status s = CheckBalloonTarget(target_mib, config_.memory_mib()); !s.ok()) return s;
  balloon_->SetTarget(target_mib << 20);
  return absl::OkStatus();
}

absl::StatusOr<BalloonStatus> VmImpl::GetBalloonStatus() {
  if (balloon_ == nullptr)
    return absl::FailedPreconditionError("the VM has no virtio-balloon (create it with a balloon)");
  BalloonStatus st;
  st.set_target_mib(balloon_->target_bytes() >> 20);
  st.set_actual_mib(balloon_->actual_bytes() >> 20);
  st.set_inflated_mib((balloon_->inflated_pages() * kPageSize) >> 20);
  st.set_reported_bytes(balloon_->bytes_reported());
  st.set_hinted_bytes(balloon_->bytes_hinted());
  st.set_stats_age_ms(-1);
  if (std::optional<virtio::BalloonStats> s = balloon_->GetStats(); s.has_value()) {
    auto put = [&](const char* name, const std::optional<uint64_t>& v) {
      if (v.has_value()) (*st.mutable_stats())[name] = *v;
    };
    put("swap-in", s->swap_in);
    put("swap-out", s->swap_out);
    put("major-faults", s->major_faults);
    put("minor-faults", s->minor_faults);
    put("free-memory", s->free_memory);
    put("total-memory", s->total_memory);
    put("available-memory", s->available_memory);
    put("disk-caches", s->disk_caches);
    put("hugetlb-allocations", s->hugetlb_allocations);
    put("hugetlb-failures", s->hugetlb_failures);
    put("oom-kills", s->oom_kills);
    put("alloc-stalls", s->alloc_stalls);
    put("async-scans", s->async_scans);
    put("direct-scans", s->direct_scans);
    put("async-reclaims", s->async_reclaims);
    put("direct-reclaims", s->direct_reclaims);
    st.set_stats_age_ms(absl::ToInt64Milliseconds(absl::Now() - s->timestamp));
  }
  return st;
}

absl::Status VmImpl::SetupVirtioDevices() {
  auto loop = EventLoop::Create("vmm-devices");
  if (!loop.ok()) return loop.status();
  loop_ = std::move(*loop);
  if (config_.rng())
    if (absl::Status s = AddVirtio("rng", std::make_unique<virtio::VirtioRng>()); !s.ok())
      return s;
  for (int i = 0; i < config_.disks_size(); ++i) {
    const DiskConfig& d = config_.disks(i);
    virtio::BlockOptions o;
    o.path = d.path();
    o.read_only = d.read_only();
    o.direct = d.direct();
    o.serial = d.serial();
    o.engine = d.engine() == DiskConfig::SYNC ? virtio::BlockOptions::Engine::kSync
                                              : virtio::BlockOptions::Engine::kIoUring;
    auto dev = virtio::VirtioBlock::Create(o, mem_.get(), loop_.get());
    if (!dev.ok())
      return absl::Status(dev.status().code(),
                          absl::StrCat("disk ", i, ": ", dev.status().message()));
    if (absl::Status s = AddVirtio("blk", std::move(*dev)); !s.ok()) return s;
  }
  for (int i = 0; i < config_.nets_size(); ++i) {
    const NetConfig& n = config_.nets(i);
    virtio::NetOptions o;
    o.tap = n.tap();
    if (!n.mac().empty()) {
      auto mac = virtio::ParseMac(n.mac());
      if (!mac.ok())
        return absl::InvalidArgumentError(absl::StrCat("net ", i, ": ", mac.status().message()));
      o.mac = *mac;
    }
    auto dev = virtio::VirtioNet::Create(o, mem_.get(), loop_.get());
    if (!dev.ok())
      return absl::Status(dev.status().code(),
                          absl::StrCat("net ", i, " (tap ", n.tap(), "): ", dev.status().message()));
    if (absl::Status s = AddVirtio("net", std::move(*dev)); !s.ok()) return s;
  }
  if (config_.has_balloon()) {
    const BalloonConfig& b = config_.balloon();
    virtio::VirtioBalloonOptions o;
    o.initial_target_bytes = b.target_mib() << 20;
    o.deflate_on_oom = b.deflate_on_oom();
    o.free_page_reporting = b.free_page_reporting();
    o.free_page_hinting = b.free_page_hinting();
    o.stats_interval_s = b.stats_interval_s();
    auto dev = virtio::VirtioBalloon::Create(mem_.get(), loop_.get(), o);
    if (!dev.ok()) return dev.status();
    balloon_ = dev->get();
    if (absl::Status s = AddVirtio("balloon", std::move(*dev)); !s.ok()) return s;
  }
  if (config_.has_vsock()) {
    virtio::VsockOptions o;
    o.guest_cid = config_.vsock().guest_cid();
    o.uds_path = config_.vsock().uds_path();
    auto dev = virtio::VirtioVsock::Create(o, mem_.get(), loop_.get());
    if (!dev.ok())
      return dev.status();
    if (absl::Status s = AddVirtio("vsock", std::move(*dev)); !s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::Status VmImpl::SetupVfioUserDevices() {
  for (int i = 0; i < config_.vfio_user_size(); ++i) {
    const std::string& socket = config_.vfio_user(i).socket();
    // The client prefixes its errors with its name "vfio-user:SOCKET: ": we say it once.
    auto fail = [&](const absl::Status& s, absl::string_view what = "") {
      absl::string_view msg = s.message();
      absl::ConsumePrefix(&msg, absl::StrCat("vfio-user:", socket, ": "));
      return absl::Status(s.code(), absl::StrFormat("vfio-user device %d (%s): %s%s", i, socket,
                                                    what, msg));
    };
    auto dev = vfio_user::VfioUserDevice::Connect(socket);
    if (!dev.ok()) {
      // A peer that accepts but does not speak vfio-user fails the version handshake with no
      // reply (timeout) or a malformed one: say what that most likely means.
      if (absl::IsDeadlineExceeded(dev.status()) || absl::IsDataLoss(dev.status()))
        return fail(dev.status(), "not a vfio-user server (version handshake failed): ");
      return fail(dev.status());
    }
    // No BarMapper: every BAR access traps (simple, and correct for any server). No INTx:
    // the device interrupts through MSI-X (KVM irqfds from the GsiRouter).
    vfio::VfioPciOptions o;
    o.gsi_router = gsi_router_.get();
    auto pci = vfio::VfioPciDevice::Create(std::move(*dev), o);
    if (!pci.ok()) return fail(pci.status());
    // iova = gpa over all guest RAM. Writes by the server into guest RAM bypass the VMM's dirty
    // tracking: migration of such a VM is refused (MigrationSource::Start).
    if (absl::Status s = (*pci)->AttachDma(*mem_); !s.ok()) return fail(s);
    auto at = pci_->AddDevice(*pci);
    if (!at.ok()) return fail(at.status());
    vfio_user_.push_back({socket, std::move(*pci), *at});
    LOG_INFO("vfio-user device %d (%s) at 0000:00:%02x.0", i, socket, *at);
  }
  return absl::OkStatus();
}

absl::Status VmImpl::LoadGuest() {
  if (absl::Status s = WriteBootTables(*mem_); !s.ok()) return s;
  // Both an MP table (acpi=off kernels, kernels without ACPI) and ACPI tables (MADT with every
  // vCPU, MCFG for the PCI ECAM, a DSDT describing the PCI host bridge and COM1).
  if (absl::Status s = WriteMpTable(*mem_, config_.vcpus()); !s.ok()) return s;
  AcpiConfig acpi;
  acpi.num_vcpus = config_.vcpus();
  acpi.pci_windows = pci_->windows();
  auto rsdp = WriteAcpiTables(*mem_, acpi);
  if (!rsdp.ok()) return rsdp.status();
  if (!config_.kernel().empty()) {
    linux_ = true;
    auto kernel = ReadFile(config_.kernel(), "kernel", mem_->ram_bytes());
    if (!kernel.ok()) return kernel.status();
    std::vector<uint8_t> initrd;
    if (!config_.initrd().empty()) {
      auto i = ReadFile(config_.initrd(), "initrd", mem_->ram_bytes());
      if (!i.ok()) return i.status();
      initrd = std::move(*i);
    }
    LinuxBootSpec spec{*kernel, initrd, config_.cmdline()};
    spec.rsdp_addr = *rsdp;
    auto entry = LoadLinux(*mem_, spec);
    if (!entry.ok()) return entry.status();
    linux_entry_ = *entry;
    return absl::OkStatus();
  }
  // Test guest: built-in image or a flat binary file, loaded at 1 MiB.
  std::vector<uint8_t> file;
  std::span<const uint8_t> image;
  uint64_t mem_end = 0;
  if (const testguest::Image* img = testguest::Find(config_.test_guest())) {
    image = std::span<const uint8_t>(img->data, img->size);
    mem_end = img->mem_end;
  } else {
    auto f = ReadFile(config_.test_guest(), "test guest", mem_->ram_bytes());
    if (!f.ok()) return f.status();
    file = std::move(*f);
    image = file;
    mem_end = layout::kHighMemStart + file.size();
  }
  if (!mem_->Contains(layout::kHighMemStart, mem_end - layout::kHighMemStart))
    return absl::InvalidArgumentError("test guest does not fit in guest RAM");
  if (absl::Status s = mem_->Write(layout::kHighMemStart, image.data(), image.size()); !s.ok())
    return s;
  const std::string& args = config_.test_guest_args();
  if (args.size() + 1 > layout::kCmdlineMax)
    return absl::InvalidArgumentError("test guest arguments too long");
  if (absl::Status s = mem_->Write(layout::kCmdline, args.c_str(), args.size() + 1); !s.ok())
    return s;
  test_entry_ = layout::kHighMemStart;
  return absl::OkStatus();
}

absl::Status VmImpl::SetupVcpus() {
  for (uint32_t i = 0; i < config_.vcpus(); ++i) {
    auto kv = KvmVcpu::Create(*kvm_, *vm_, i);
    if (!kv.ok()) return kv.status();
    auto vcpu = std::make_unique<Vcpu>(
        std::move(*kv), &pio_, &mmio_,
        [this](const VcpuStop& s) { RequestExit(s.status, s.reason); },
        [this](int id) { return tracker_->HandleRingFull(id); });
    KvmVcpu& k = vcpu->kvm();
    if (absl::Status s = k.SetCpuid(BuildVcpuCpuid(supported_cpuid_, i, config_.vcpus())); !s.ok())
      return s;
    if (absl::Status s = k.SetMsrs(BootMsrs()); !s.ok()) return s;
    if (absl::Status s = k.SetFpu(BootFpu()); !s.ok()) return s;
    // LAPIC: LINT0 = ExtINT, LINT1 = NMI (virtual wire mode until the guest sets up its APIC).
    auto lapic = k.GetLapic();
    if (!lapic.ok()) return lapic.status();
    auto set_lvt = [&](int reg, uint32_t mode) {
      uint32_t v;
      std::memcpy(&v, &lapic->regs[reg], 4);
      v = (v & ~0x700u) | (mode << 8);
      std::memcpy(&lapic->regs[reg], &v, 4);
    };
    set_lvt(0x350, 0x7);
    set_lvt(0x360, 0x4);
    if (absl::Status s = k.SetLapic(*lapic); !s.ok()) return s;

    bool boot_cpu = i == 0;
    if (!incoming_ && (boot_cpu || !linux_)) {
      auto sregs = k.GetSregs();
      if (!sregs.ok()) return sregs.status();
      kvm_regs regs{};
      regs.rflags = 0x2;
      if (linux_ && linux_entry_.pvh) {
        SetupProtectedModeSregs(*sregs);
        regs.rip = linux_entry_.rip;
        regs.rbx = linux_entry_.boot_info;
      } else if (linux_) {
        SetupLongModeSregs(*sregs);
        regs.rip = linux_entry_.rip;
        regs.rsi = linux_entry_.boot_info;
      } else {
        SetupLongModeSregs(*sregs);
        regs.rip = test_entry_;
        regs.rdi = i;
        regs.rsi = config_.vcpus();
        regs.rdx = layout::kCmdline;
        regs.rcx = mem_->ram_bytes();
      }
      if (absl::Status s = k.SetSregs(*sregs); !s.ok()) return s;
      if (absl::Status s = k.SetRegs(regs); !s.ok()) return s;
      // With an in-kernel LAPIC, APs wait for INIT/SIPI; test guests start every vCPU at once.
      if (!boot_cpu)
        if (absl::Status s = k.SetMpState(KVM_MP_STATE_RUNNABLE); !s.ok()) return s;
    }
    vcpus_.push_back(std::move(vcpu));
  }
  return absl::OkStatus();
}

void VmImpl::RequestExit(int status, std::string reason) {
  {
    std::lock_guard lock(mu_);
    if (exit_.has_value()) return;
    exit_ = VmExit{status, reason};
    exit_time_ = absl::Now();
    state_ = RunState::kExited;
  }
  if (status == kExitOk || status < 64)
    LOG_INFO("VM exit: %s", reason);
  else
    LOG_ERROR("VM exit (status %d): %s", status, reason);
  for (auto& v : vcpus_) v->RequestStop();
  cv_.notify_all();
}

void VmImpl::StopAll() {
  for (auto& v : vcpus_) v->RequestStop();
  for (auto& v : vcpus_) v->Join();
}

absl::Status VmImpl::CheckState(RunState want, const char* op) const {
  if (state_ != want)
    return absl::FailedPreconditionError(
        absl::StrFormat("cannot %s: VM is %s", op, RunStateName(state_)));
  return absl::OkStatus();
}

absl::Status VmImpl::Boot() {
  std::lock_guard lock(mu_);
  if (absl::Status s = CheckState(RunState::kCreated, "boot"); !s.ok()) return s;
  boot_time_ = absl::Now();
  state_ = RunState::kRunning;
  for (auto& v : vcpus_) v->Start();
  return absl::OkStatus();
}

absl::Status VmImpl::Pause() {
  {
    std::lock_guard lock(mu_);
    if (absl::Status s = CheckState(RunState::kRunning, "pause"); !s.ok()) return s;
    if (pausing_) return absl::FailedPreconditionError("cannot pause: a pause is in progress");
    pausing_ = true;
  }
  // Not under mu_: a vCPU may take a while to park (post-copy: one waiting for a page parks
  // only after it arrives), and state(), GetInfo etc. must keep answering meanwhile.
  for (auto& v : vcpus_) v->RequestPause();
  // Wait until every vCPU is parked. One waiting for a post-copy page in the kernel runs no guest
  // code; it is not kicked (see Vcpu::BlockedOnMissingPage) and parks at its next exit.
  std::function<bool(int)> waiting;
  {
    std::lock_guard lock(mu_);
    waiting = waiting_probe_;
  }
  for (;;) {
    bool all = true;
    for (auto& v : vcpus_) {
      if (v->paused() || v->BlockedOnMissingPage() || (waiting && waiting(v->id()))) continue;
      all = false;
      if (!v->WaitPausedFor(std::chrono::milliseconds(5))) v->RequestPause();  // kick again
    }
    if (all) break;
  }
  // Then the devices: no handler runs, and nothing a device started still writes guest memory.
  loop_->Pause();
  for (VirtioSlot& v : virtio_) v.device->Quiesce();
  std::lock_guard lock(mu_);
  pausing_ = false;
  if (state_ == RunState::kRunning) state_ = RunState::kPaused;  // not if it exited meanwhile
  return absl::OkStatus();
}

absl::Status VmImpl::Resume() {
  std::lock_guard lock(mu_);
  if (absl::Status s = CheckState(RunState::kPaused, "resume"); !s.ok()) return s;
  loop_->Resume();
  for (VirtioSlot& v : virtio_) v.device->Resume();
  for (auto& v : vcpus_) v->Resume();
  state_ = RunState::kRunning;
  return absl::OkStatus();
}

constexpr uint32_t kStateFormatVersion = 1;

absl::StatusOr<VmState> VmImpl::SaveState() {
  std::lock_guard lock(mu_);
  if (state_ != RunState::kPaused && state_ != RunState::kCreated)
    return absl::FailedPreconditionError(
        absl::StrFormat("cannot save state: VM is %s (needs PAUSED)", RunStateName(state_)));
  VmState st;
  st.set_format_version(kStateFormatVersion);
  *st.mutable_config() = config_;
  for (auto& v : vcpus_) {
    KvmVcpu& k = v->kvm();
    VcpuState* vs = st.add_vcpus();
    vs->set_id(k.id());
    auto regs = k.GetRegs();
    auto sregs = k.GetSregs();
    auto xsave = k.GetXsave(xsave2_size_);
    auto xcrs = k.GetXcrs();
    auto lapic = k.GetLapic();
    auto events = k.GetEvents();
    auto dregs = k.GetDebugRegs();
    auto mp = k.GetMpState();
    auto msrs = k.GetMsrs(msr_indices_);
    for (const absl::Status& s : {regs.status(), sregs.status(), xsave.status(), xcrs.status(),
                                  lapic.status(), events.status(), dregs.status(), mp.status(),
                                  msrs.status()})
      if (!s.ok()) return s;
    vs->set_regs(ToBytes(*regs));
    vs->set_sregs(ToBytes(*sregs));
    vs->set_xsave(*xsave);
    vs->set_xcrs(ToBytes(*xcrs));
    vs->set_lapic(ToBytes(*lapic));
    vs->set_events(ToBytes(*events));
    vs->set_debugregs(ToBytes(*dregs));
    vs->set_mp_state(mp->mp_state);
    vs->set_tsc_khz(k.GetTscKhz());
    for (const auto& e : *msrs) {
      MsrEntry* m = vs->add_msrs();
      m->set_index(e.index);
      m->set_value(e.data);
    }
  }
  for (uint32_t chip = 0; chip < 3; ++chip) {
    auto c = vm_->GetIrqchip(chip);
    if (!c.ok()) return c.status();
    std::string b = ToBytes(*c);
    if (chip == 0) st.mutable_irqchip()->set_pic_master(b);
    if (chip == 1) st.mutable_irqchip()->set_pic_slave(b);
    if (chip == 2) st.mutable_irqchip()->set_ioapic(b);
  }
  auto pit = vm_->GetPit2();
  if (!pit.ok()) return pit.status();
  st.set_pit(ToBytes(*pit));
  auto clock = vm_->GetClock();
  if (!clock.ok()) return clock.status();
  st.set_clock(ToBytes(*clock));
  *st.mutable_serial() = serial_->SaveState();
  *st.mutable_i8042() = i8042_->SaveState();
  for (const VirtioSlot& v : virtio_) {
    VirtioDeviceState* d = st.add_virtio_devices();
    d->set_kind(v.kind);
    *d->mutable_transport() = v.pci->SaveState();
  }
  return st;
}

absl::Status VmImpl::RestoreState(const VmState& st) {
  std::lock_guard lock(mu_);
  if (absl::Status s = CheckState(RunState::kCreated, "restore state"); !s.ok()) return s;
  if (st.format_version() != kStateFormatVersion)
    return absl::InvalidArgumentError(absl::StrFormat(
        "saved state has format version %d, this VMM reads %d", st.format_version(),
        kStateFormatVersion));
  if (static_cast<size_t>(st.vcpus_size()) != vcpus_.size())
    return absl::InvalidArgumentError(absl::StrFormat(
        "saved state has %d vCPUs, this VM has %d", st.vcpus_size(), vcpus_.size()));
  // VM-wide first: the in-kernel irqchip before LAPIC state references it.
  auto pic0 = FromBytes<kvm_irqchip>(st.irqchip().pic_master(), "PIC master");
  auto pic1 = FromBytes<kvm_irqchip>(st.irqchip().pic_slave(), "PIC slave");
  auto ioapic = FromBytes<kvm_irqchip>(st.irqchip().ioapic(), "IOAPIC");
  auto pit = FromBytes<kvm_pit_state2>(st.pit(), "PIT");
  auto clock = FromBytes<kvm_clock_data>(st.clock(), "kvmclock");
  for (const absl::Status& s :
       {pic0.status(), pic1.status(), ioapic.status(), pit.status(), clock.status()})
    if (!s.ok()) return s;
  for (const kvm_irqchip* c : {&*pic0, &*pic1, &*ioapic})
    if (absl::Status s = vm_->SetIrqchip(*c); !s.ok()) return s;
  if (absl::Status s = vm_->SetPit2(*pit); !s.ok()) return s;
  for (int i = 0; i < st.vcpus_size(); ++i) {
    const VcpuState& vs = st.vcpus(i);
    KvmVcpu& k = vcpus_[i]->kvm();
    auto regs = FromBytes<kvm_regs>(vs.regs(), "regs");
    auto sregs = FromBytes<kvm_sregs>(vs.sregs(), "sregs");
    auto xcrs = FromBytes<kvm_xcrs>(vs.xcrs(), "xcrs");
    auto lapic = FromBytes<kvm_lapic_state>(vs.lapic(), "LAPIC");
    auto events = FromBytes<kvm_vcpu_events>(vs.events(), "vCPU events");
    auto dregs = FromBytes<kvm_debugregs>(vs.debugregs(), "debug registers");
    for (const absl::Status& s : {regs.status(), sregs.status(), xcrs.status(), lapic.status(),
                                  events.status(), dregs.status()})
      if (!s.ok()) return absl::InvalidArgumentError(absl::StrCat("vCPU ", i, ": ", s.message()));
    if (vs.tsc_khz() != 0 && vs.tsc_khz() != k.GetTscKhz())
      if (absl::Status s = k.SetTscKhz(vs.tsc_khz()); !s.ok())
        LOG_WARN("vCPU %d: cannot set TSC frequency %d kHz: %s", i, vs.tsc_khz(), s.message());
    std::vector<kvm_msr_entry> msrs;
    for (const MsrEntry& m : vs.msrs()) {
      kvm_msr_entry e{};
      e.index = m.index();
      e.data = m.value();
      msrs.push_back(e);
    }
    for (const absl::Status& s :
         {k.SetSregs(*sregs), k.SetRegs(*regs), k.SetXsave(vs.xsave()), k.SetXcrs(*xcrs),
          k.SetLapic(*lapic), k.SetMsrs(msrs), k.SetMpState(vs.mp_state()), k.SetEvents(*events),
          k.SetDebugRegs(*dregs)})
      if (!s.ok()) return absl::InternalError(absl::StrCat("vCPU ", i, " restore: ", s.message()));
  }
  if (absl::Status s = vm_->SetClock(*clock); !s.ok()) return s;
  serial_->RestoreState(st.serial());
  i8042_->RestoreState(st.i8042());
  if (static_cast<size_t>(st.virtio_devices_size()) != virtio_.size())
    return absl::InvalidArgumentError(absl::StrFormat(
        "saved state has %d virtio devices, this VM has %d", st.virtio_devices_size(),
        virtio_.size()));
  for (size_t i = 0; i < virtio_.size(); ++i) {
    const VirtioDeviceState& d = st.virtio_devices(static_cast<int>(i));
    if (d.kind() != virtio_[i].kind)
      return absl::InvalidArgumentError(absl::StrFormat(
          "saved state has virtio device %d of kind '%s', this VM has '%s'", i, d.kind(),
          virtio_[i].kind));
    if (absl::Status s = virtio_[i].pci->RestoreState(d.transport()); !s.ok())
      return absl::InvalidArgumentError(
          absl::StrFormat("virtio-%s state: %s", d.kind(), s.message()));
  }
  if (absl::Status s = pci_->RemapAll(); !s.ok()) return s;
  for (VirtioSlot& v : virtio_)  // notify registers at the restored BAR addresses
    if (absl::Status s = v.pci->EnableIoEventFds(&*vm_, loop_.get()); !s.ok()) return s;
  return absl::OkStatus();
}

absl::Status VmImpl::Shutdown() {
  RequestExit(kExitOk, "shutdown requested");
  StopAll();
  return absl::OkStatus();
}

}  // namespace

namespace {
absl::Status ValidateConfig(VmConfig& c, bool incoming);
}

absl::Status ValidateAndDefaultConfig(VmConfig& c) { return ValidateConfig(c, false); }

absl::Status ApplyLocalSettings(VmConfig& c, const VmConfig& local) {
  *c.mutable_serial() = local.serial();
  if (local.disks_size() > 0) {
    if (local.disks_size() != c.disks_size())
      return absl::InvalidArgumentError(absl::StrFormat(
          "the migrating VM has %d disks, %d given here", c.disks_size(), local.disks_size()));
    for (int i = 0; i < c.disks_size(); ++i) {
      DiskConfig* d = c.mutable_disks(i);
      d->set_path(local.disks(i).path());
      d->set_direct(local.disks(i).direct());
      d->set_engine(local.disks(i).engine());
    }
  }
  if (local.nets_size() > 0) {
    if (local.nets_size() != c.nets_size())
      return absl::InvalidArgumentError(absl::StrFormat(
          "the migrating VM has %d net devices, %d given here", c.nets_size(), local.nets_size()));
    for (int i = 0; i < c.nets_size(); ++i) c.mutable_nets(i)->set_tap(local.nets(i).tap());
  }
  if (local.has_vsock()) {
    if (!c.has_vsock())
      return absl::InvalidArgumentError("a vsock is given here but the migrating VM has none");
    if (local.vsock().guest_cid() != 0 && local.vsock().guest_cid() != c.vsock().guest_cid())
      return absl::InvalidArgumentError(absl::StrFormat(
          "vsock guest CID %d given here, the migrating VM has %d (the guest's CID cannot change)",
          local.vsock().guest_cid(), c.vsock().guest_cid()));
    c.mutable_vsock()->set_uds_path(local.vsock().uds_path());
  }
  return absl::OkStatus();
}

namespace {
// Device configuration that can be checked without opening anything (the devices' Create()
// report missing files, taps that cannot be opened, sockets in use, still before boot).
absl::Status ValidateDeviceConfig(const VmConfig& c) {
  std::set<std::string> paths, taps, macs;
  for (int i = 0; i < c.disks_size(); ++i) {
    const DiskConfig& d = c.disks(i);
    std::string what = absl::StrCat("disk ", i);
    if (d.path().empty()) return absl::InvalidArgumentError(absl::StrCat(what, ": no path"));
    if (!DiskConfig::Engine_IsValid(d.engine()))
      return absl::InvalidArgumentError(absl::StrCat(what, ": unknown engine"));
    if (d.serial().size() > 20)
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": serial '", d.serial(), "' is longer than 20 bytes"));
    char* real = ::realpath(d.path().c_str(), nullptr);
    std::string key = real != nullptr ? real : d.path();
    ::free(real);
    if (!paths.insert(key).second)
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": '", d.path(), "' is already used by another disk"));
  }
  for (int i = 0; i < c.nets_size(); ++i) {
    const NetConfig& n = c.nets(i);
    std::string what = absl::StrCat("net ", i);
    if (n.tap().empty()) return absl::InvalidArgumentError(absl::StrCat(what, ": no tap name"));
    if (!taps.insert(n.tap()).second)
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": tap '", n.tap(), "' is already used by another net device"));
    // Compared as addresses (52-54-00-.. == 52:54:00:..), defaults included.
    virtio::MacAddress mac = virtio::DefaultMac(n.tap());
    if (!n.mac().empty()) {
      auto parsed = virtio::ParseMac(n.mac());
      if (!parsed.ok())
        return absl::InvalidArgumentError(absl::StrCat(what, ": ", parsed.status().message()));
      mac = *parsed;
    }
    if (!macs.insert(virtio::FormatMac(mac)).second)
      return absl::InvalidArgumentError(absl::StrCat(
          what, ": MAC ", virtio::FormatMac(mac), " is already used by another net device"));
  }
  if (c.has_balloon())
    if (absl::Status s = CheckBalloonTarget(c.balloon().target_mib(), c.memory_mib()); !s.ok())
      return s;
  std::set<std::string> vfio_sockets;
  for (int i = 0; i < c.vfio_user_size(); ++i) {
    const std::string& sock = c.vfio_user(i).socket();
    if (sock.empty())
      return absl::InvalidArgumentError(absl::StrCat("vfio-user device ", i, ": no socket path"));
    // One client per server connection: the same server twice would be one device seen twice.
    char* real = ::realpath(sock.c_str(), nullptr);
    std::string key = real != nullptr ? real : sock;
    ::free(real);
    if (!vfio_sockets.insert(key).second)
      return absl::InvalidArgumentError(absl::StrCat(
          "vfio-user device ", i, ": socket '", sock, "' is already used by another vfio-user device"));
  }
  if (c.has_vsock()) {
    // CIDs 0-2 are reserved (hypervisor, local, host); 2^32-1 is VMADDR_CID_ANY.
    if (c.vsock().guest_cid() < 3 || c.vsock().guest_cid() == 0xffffffffu)
      return absl::InvalidArgumentError(absl::StrFormat(
          "vsock guest CID %d is reserved (use 3 or above)", c.vsock().guest_cid()));
    if (c.vsock().uds_path().empty())
      return absl::InvalidArgumentError("vsock needs a unix socket path (uds_path)");
  }
  return absl::OkStatus();
}

// `incoming`: the guest image files are not needed (memory and state come from the source).
absl::Status ValidateConfig(VmConfig& c, bool incoming) {
  if (c.vcpus() == 0) return absl::InvalidArgumentError("vcpus must be at least 1");
  if (c.vcpus() > kMaxVcpus)
    return absl::InvalidArgumentError(absl::StrCat("vcpus must be at most ", kMaxVcpus));
  if (c.memory_mib() < kMinMemoryMib)
    return absl::InvalidArgumentError(
        absl::StrCat("memory must be at least ", kMinMemoryMib, " MiB (got ", c.memory_mib(), ")"));
  if (c.memory_mib() % 2 != 0)
    return absl::InvalidArgumentError("memory must be a multiple of 2 MiB");
  auto host = HostMemTotalMib();
  if (!host.ok()) return host.status();
  if (c.memory_mib() > *host)
    return absl::InvalidArgumentError(absl::StrFormat(
        "memory %d MiB is more than the host has (%d MiB)", c.memory_mib(), *host));
  bool has_kernel = !c.kernel().empty();
  bool has_test = !c.test_guest().empty();
  if (has_kernel == has_test)
    return absl::InvalidArgumentError(
        "exactly one of kernel (Linux boot) or test_guest must be given");
  if (has_kernel) {
    if (!incoming)
      if (absl::Status s = CheckReadableFile(c.kernel(), "kernel"); !s.ok()) return s;
    if (!incoming && !c.initrd().empty())
      if (absl::Status s = CheckReadableFile(c.initrd(), "initrd"); !s.ok()) return s;
    if (c.cmdline().empty()) c.set_cmdline(kDefaultCmdline);
    if (!c.test_guest_args().empty())
      return absl::InvalidArgumentError("test_guest_args given without a test guest");
  } else {
    if (!c.initrd().empty() || !c.cmdline().empty())
      return absl::InvalidArgumentError("initrd/cmdline only apply to a Linux kernel");
    if (!incoming && testguest::Find(c.test_guest()) == nullptr) {
      if (c.test_guest().find('/') == std::string::npos)
        return absl::InvalidArgumentError(
            absl::StrCat("unknown test guest '", c.test_guest(),
                         "' (built in: ", absl::StrJoin(testguest::Names(), ", "),
                         "; or give a path to a flat binary)"));
      if (absl::Status s = CheckReadableFile(c.test_guest(), "test guest"); !s.ok()) return s;
    }
    if (c.vcpus() > kMaxTestGuestVcpus)
      return absl::InvalidArgumentError(
          absl::StrCat("test guests support at most ", kMaxTestGuestVcpus, " vCPUs"));
  }
  if (!SerialConfig::Mode_IsValid(c.serial().mode()))
    return absl::InvalidArgumentError(
        absl::StrCat("unknown serial mode ", static_cast<int>(c.serial().mode())));
  if (c.serial().mode() == SerialConfig::MODE_UNSPECIFIED)
    c.mutable_serial()->set_mode(SerialConfig::STDOUT);
  if (c.serial().mode() == SerialConfig::FILE && c.serial().path().empty())
    return absl::InvalidArgumentError("serial mode FILE needs a path");
  if (!c.prefill().empty() && c.prefill() != "random" && c.prefill() != "half" &&
      c.prefill() != "zero")
    return absl::InvalidArgumentError(
        absl::StrCat("bad prefill '", c.prefill(), "': expected random, half or zero"));
  if (!VmConfig::DirtyTracking_IsValid(c.dirty_tracking()))
    return absl::InvalidArgumentError("unknown dirty_tracking mode");
  return ValidateDeviceConfig(c);
}
}  // namespace

absl::StatusOr<std::unique_ptr<Vm>> Vm::Create(const VmConfig& config) {
  VmConfig c = config;
  if (absl::Status s = ValidateAndDefaultConfig(c); !s.ok()) return s;
  auto vm = std::make_unique<VmImpl>(std::move(c), /*incoming=*/false);
  if (absl::Status s = vm->Build(); !s.ok()) return s;
  return vm;
}

absl::StatusOr<std::unique_ptr<Vm>> Vm::CreateIncoming(const VmConfig& config) {
  VmConfig c = config;
  if (absl::Status s = ValidateConfig(c, /*incoming=*/true); !s.ok()) return s;
  auto vm = std::make_unique<VmImpl>(std::move(c), /*incoming=*/true);
  if (absl::Status s = vm->Build(); !s.ok()) return s;
  return vm;
}

}  // namespace microvmm
