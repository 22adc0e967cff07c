#include "vmm/vm.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
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
#include "devices/vfio/kernel/kernel_vfio_device.h"
#include "devices/vfio/pci/dma_footprint.h"
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
#include "vmm/pci/hotplug.h"
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
#include "vmm/vfio/kvm_glue.h"
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
std::atomic<vfio::VfioSys*> g_vfio_sys_for_testing{nullptr};
}  // namespace

void SetVfioSysForTesting(vfio::VfioSys* sys) { g_vfio_sys_for_testing.store(sys); }

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

// A file path as a comparison key: its canonical form if it exists, else as given.
std::string RealPathKey(const std::string& path) {
  char* real = ::realpath(path.c_str(), nullptr);
  std::string key = real != nullptr ? real : path;
  ::free(real);
  return key;
}

// The PCI address a --vfio path names, as a comparison key: "/sys/bus/pci/devices/X/",
// "/sys/devices/.../X" and "X" all name function X (the last path component), case-folded.
std::string VfioBdf(std::string path) {
  while (path.size() > 1 && path.back() == '/') path.pop_back();
  return absl::AsciiStrToLower(path.substr(path.find_last_of('/') + 1));
}

// Kernel VFIO pins guest RAM in the IOMMU: a page the balloon discards would stay mapped for
// the device while the guest's next access gets a fresh page (the two views split). vfio-user
// shares the memfd itself, so a discard reaches the device's mapping too.
constexpr char kBalloonWithVfio[] =
    "a virtio-balloon cannot be used with a VFIO device: the IOMMU pins guest RAM, so pages "
    "the balloon gives back would stay mapped for the device (drop --balloon, or use "
    "--vfio-user)";

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
  VmConfig config() const override {
    std::lock_guard lock(devices_mu_);
    return config_;
  }
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
  absl::StatusOr<uint8_t> AttachVfioUser(const VfioUserConfig& config) override;
  absl::StatusOr<uint8_t> AttachVfio(const VfioConfig& config) override;
  absl::StatusOr<int> StartPassthroughMigration() override;
  absl::StatusOr<uint64_t> SyncPassthroughMigration(migration::DirtySet& dirty) override;
  absl::Status StopPassthroughDevices(migration::DirtySet& dirty) override;
  std::vector<PassthroughData> TakePassthroughPrecopyData(size_t max_chunk) override;
  void CancelPassthroughMigration() override;
  int passthrough_devices() const override { return static_cast<int>(Passthrough().size()); }
  absl::Status CheckPassthroughPostcopy() const override;
  absl::Status SetPassthroughPostcopy(EnsurePresentFn ensure) override;
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
  // The ACPI hotplug register block + GED interrupt, for the slots still free.
  absl::Status SetupPciHotplug();
  // vfio-user PCI functions (config_.vfio_user), after the virtio devices on the bus.
  absl::Status SetupVfioUserDevices();
  // Connects to the vfio-user server at `socket` and builds its PCI function with DMA over all
  // guest RAM (not on the bus yet). Errors start with `label`.
  absl::StatusOr<std::shared_ptr<vfio::VfioPciDevice>> OpenVfioUser(const std::string& socket,
                                                                    const std::string& label);
  // Kernel VFIO PCI functions (config_.vfio), after the vfio-user ones.
  absl::Status SetupVfioKernelDevices();
  // Hot-attach preconditions: not exited, no incoming post-copy in progress.
  absl::Status AttachAllowed() const;
  // Opens the kernel VFIO function at `path` and puts it at `slot` of bus 0 (free) with its
  // INTx on PciIntxGsi(slot, pin), BARs as memslots and DMA over all guest RAM; records it in
  // vfio_. Shared by creation and hot-attach. On error nothing stays (the device's destructor
  // undoes DMA maps, irqfds and memslots). Errors start with `label`.
  absl::Status AddVfioKernel(const std::string& path, uint8_t slot, const std::string& label);
  // The slot for a passthrough function: `fixed` (1..31, must be free; a migration destination
  // puts a hot-attached function where the source had it) or, for 0, the first free one
  // (`hotplug`: among the slots the DSDT describes as hotpluggable).
  absl::StatusOr<uint8_t> PickSlot(uint32_t fixed, bool hotplug) const;
  // Every passthrough PCI function (kernel VFIO and vfio-user), by PCI slot: the order of
  // VmState.vfio_devices at both ends of a migration.
  struct PassthroughRef {
    const char* kind;  // "vfio" or "vfio-user"
    std::string what;  // sysfs path or socket, for errors
    vfio::VfioPciDevice* device;
    uint8_t slot;
    // `s` with "<kind> device <what>: " in front.
    absl::Status Error(const absl::Status& s) const {
      return absl::Status(s.code(), absl::StrCat(kind, " device ", what, ": ", s.message()));
    }
  };
  std::vector<PassthroughRef> Passthrough() const;
  // Reads DMA dirty logs of the migrating functions into `dirty`.
  absl::Status SyncPassthroughDirty(migration::DirtySet& dirty);
  // Post-copy: makes the guest-RAM parts of `ranges` present with `ensure`, retrying while the
  // pages cannot come (source away) until they do or the VM exits.
  void EnsureDmaTargets(const EnsurePresentFn& ensure, const std::vector<vfio::DmaRange>& ranges,
                        const std::string& who);
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
  // Kernel VFIO: direct BAR maps as memslots, INTx as resampling irqfds. Before the devices
  // that use them (destroyed after them).
  std::unique_ptr<MemslotBarMapper> vfio_bar_mapper_;
  std::unique_ptr<KvmIntxRouter> vfio_intx_router_;
  struct VirtioSlot {
    std::string kind;  // "rng", "blk", "net", "balloon", "vsock"
    std::unique_ptr<virtio::VirtioDevice> device;
    virtio::VirtioPciDevice* pci = nullptr;  // owned by pci_
    uint8_t pci_slot = 0;
  };
  std::vector<VirtioSlot> virtio_;  // declared before pci_: outlive their transports
  struct PassthroughSlot {
    std::string what;  // vfio-user socket or sysfs path
    std::shared_ptr<vfio::VfioPciDevice> device;  // shared with pci_
    uint8_t pci_slot = 0;
  };
  // DMA-mapped into mem_ until destroyed (Detach); grow on AttachVfioUser / AttachVfio
  // (devices_mu_).
  std::vector<PassthroughSlot> vfio_user_;  // config_.vfio_user
  std::vector<PassthroughSlot> vfio_;       // config_.vfio
  // Passthrough migration (source): each function taking part, with its whole migration stream
  // once StopPassthroughDevices read it (for SaveState) and how much of it went ahead
  // (TakePassthroughPrecopyData). Destination: the functions RestoreState left stopped, run at
  // Boot().
  struct PassthroughMigrating {
    PassthroughRef ref;
    std::string blob;
    uint64_t sent = 0;
  };
  std::vector<PassthroughMigrating> pt_migrating_;
  bool pt_stopped_ = false;  // StopPassthroughDevices filled the blobs
  std::vector<vfio::VfioPciDevice*> pt_restored_;
  // Post-copy (destination): how to make guest pages present for passthrough DMA.
  EnsurePresentFn pt_ensure_;
  // PCI hotplug (AttachVfioUser, AttachVfio). devices_mu_ guards what hot-attach appends to
  // while others read: vfio_user_, vfio_, config_.vfio_user, config_.vfio. attach_mu_
  // serializes attaches.
  mutable std::mutex devices_mu_;
  std::mutex attach_mu_;
  std::shared_ptr<pci::PciHotplugController> hotplug_;  // also on pio_
  uint32_t hotplug_slots_ = 0;  // slots free after SetupDevices: ACPI hotplug objects exist
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
  if (absl::Status s = SetupVfioKernelDevices(); !s.ok()) return s;
  if (absl::Status s = pci_->Attach(pio_, mmio_); !s.ok()) return s;
  if (absl::Status s = SetupPciHotplug(); !s.ok()) return s;
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
  std::lock_guard lock(devices_mu_);
  for (const auto& [kind, slots] : {std::pair{"vfio-user", &vfio_user_}, std::pair{"vfio", &vfio_}})
    for (const PassthroughSlot& v : *slots) {
      DeviceStatus d;
      d.set_kind(kind);
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

absl::StatusOr<std::shared_ptr<vfio::VfioPciDevice>> VmImpl::OpenVfioUser(
    const std::string& socket, const std::string& label) {
  // The client prefixes its errors with its name "vfio-user:SOCKET: ": we say it once.
  auto fail = [&](const absl::Status& s, absl::string_view what = "") {
    absl::string_view msg = s.message();
    absl::ConsumePrefix(&msg, absl::StrCat("vfio-user:", socket, ": "));
    return absl::Status(s.code(), absl::StrCat(label, ": ", what, msg));
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
  // tracking: migration reads the device's DMA dirty log (StartPassthroughMigration).
  if (absl::Status s = (*pci)->AttachDma(*mem_); !s.ok()) return fail(s);
  return std::move(*pci);
}

absl::Status VmImpl::SetupVfioUserDevices() {
  for (int i = 0; i < config_.vfio_user_size(); ++i) {
    const std::string& socket = config_.vfio_user(i).socket();
    auto pci = OpenVfioUser(socket, absl::StrFormat("vfio-user device %d (%s)", i, socket));
    if (!pci.ok()) return pci.status();
    auto fail = [&](const absl::Status& s) {
      return absl::Status(s.code(), absl::StrFormat("vfio-user device %d (%s): %s", i, socket,
                                                    s.message()));
    };
    // A function hot-attached to the source of a migration keeps its slot here.
    auto at = PickSlot(config_.vfio_user(i).pci_slot(), /*hotplug=*/false);
    if (!at.ok()) return fail(at.status());
    if (absl::Status s = pci_->AddDevice(*at, 0, *pci); !s.ok()) return fail(s);
    vfio_user_.push_back({socket, std::move(*pci), *at});
    LOG_INFO("vfio-user device %d (%s) at 0000:00:%02x.0", i, socket, *at);
  }
  return absl::OkStatus();
}

absl::Status VmImpl::SetupPciHotplug() {
  for (uint8_t d = 1; d < pci::kDevicesPerBus; ++d)
    if (pci_->device(d, 0) == nullptr) hotplug_slots_ |= 1u << d;
  KvmVm* vm = &*vm_;
  hotplug_ = std::make_shared<pci::PciHotplugController>([vm](bool level) {
    if (absl::Status s = vm->IrqLine(pci::kPciHotplugGsi, level); !s.ok())
      LOG_WARN_RATELIMITED("PCI hotplug interrupt: %s", s.message());
  });
  return pio_.Insert(hotplug_, pci::kPciHotplugIoBase, pci::kPciHotplugIoLen);
}

absl::Status VmImpl::AttachAllowed() const {
  std::lock_guard lock(mu_);
  if (state_ == RunState::kExited)
    return absl::FailedPreconditionError("cannot attach a device: the VM has exited");
  // An incoming post-copy still brings pages in: a new device could DMA into missing pages
  // (only the functions present at the switchover have their doorbells gated).
  if (waiting_probe_)
    return absl::FailedPreconditionError(
        "cannot attach a device while the VM's incoming post-copy migration is still bringing "
        "its memory in; retry when it has completed");
  return absl::OkStatus();
}

absl::StatusOr<uint8_t> VmImpl::AttachVfioUser(const VfioUserConfig& c) {
  std::lock_guard attach(attach_mu_);
  if (absl::Status s = AttachAllowed(); !s.ok()) return s;
  const std::string& socket = c.socket();
  if (socket.empty()) return absl::InvalidArgumentError("vfio-user: no socket path");
  // The same server twice would be one device seen twice (as ValidateDeviceConfig refuses).
  const std::string key = RealPathKey(socket);
  {
    std::lock_guard lock(devices_mu_);
    for (const VfioUserConfig& v : config_.vfio_user())
      if (RealPathKey(v.socket()) == key)
        return absl::AlreadyExistsError(
            absl::StrCat("vfio-user socket '", socket, "' is already attached to this VM"));
  }
  // Only slots the DSDT describes are hotpluggable (a guest running AML could not see others).
  auto free_slot = PickSlot(0, /*hotplug=*/true);
  if (!free_slot.ok()) return free_slot.status();
  const uint8_t slot = *free_slot;
  // From here on, an error destroys `pci`: ~VfioPciDevice detaches DMA and interrupts.
  auto pci = OpenVfioUser(socket, absl::StrCat("vfio-user ", socket));
  if (!pci.ok()) return pci.status();
  auto fail = [&](const absl::Status& s) {
    return absl::Status(s.code(), absl::StrFormat("vfio-user %s: %s", socket, s.message()));
  };
  // The commit point: one config-cycle-locked insertion; vCPUs see the slot empty or complete.
  if (absl::Status s = pci_->AddDevice(slot, 0, *pci); !s.ok()) return fail(s);
  {
    std::lock_guard lock(devices_mu_);
    vfio_user_.push_back({socket, std::move(*pci), slot});
    VfioUserConfig* added = config_.add_vfio_user();
    *added = c;
    added->set_pci_slot(slot);  // a migration destination puts it at the same slot
  }
  hotplug_->SlotAdded(slot);
  LOG_INFO("vfio-user device (%s) hot-attached at 0000:00:%02x.0", socket, slot);
  return slot;
}

absl::Status VmImpl::SetupVfioKernelDevices() {
  for (int i = 0; i < config_.vfio_size(); ++i) {
    const std::string& path = config_.vfio(i).sysfs_path();
    const std::string label = absl::StrFormat("vfio device %d (%s)", i, path);
    // The slot is chosen first: the INTx GSI depends on it (the DSDT's _PRT, PciIntxGsi).
    auto slot = PickSlot(config_.vfio(i).pci_slot(), /*hotplug=*/false);
    if (!slot.ok())
      return absl::Status(slot.status().code(), absl::StrCat(label, ": ", slot.status().message()));
    if (absl::Status s = AddVfioKernel(path, *slot, label); !s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::StatusOr<uint8_t> VmImpl::PickSlot(uint32_t fixed, bool hotplug) const {
  if (fixed != 0) {
    if (fixed >= pci::kDevicesPerBus)
      return absl::InvalidArgumentError(absl::StrCat("PCI slot ", fixed, " out of range"));
    if (pci_->device(static_cast<uint8_t>(fixed), 0) != nullptr)
      return absl::AlreadyExistsError(absl::StrCat("PCI slot ", fixed, " is taken"));
    return static_cast<uint8_t>(fixed);
  }
  for (uint8_t d = 1; d < pci::kDevicesPerBus; ++d)
    if ((!hotplug || (hotplug_slots_ & (1u << d))) && pci_->device(d, 0) == nullptr) return d;
  return absl::ResourceExhaustedError(hotplug ? "no free hotpluggable PCI slot on bus 0"
                                              : "no free PCI slot on bus 0");
}

absl::Status VmImpl::AddVfioKernel(const std::string& path, uint8_t slot,
                                   const std::string& label) {
  auto fail = [&](const absl::Status& s) {
    return absl::Status(s.code(), absl::StrCat(label, ": ", s.message()));
  };
  vfio::VfioSys* sys = g_vfio_sys_for_testing.load();
  if (sys == nullptr) sys = &vfio::VfioSys::Real();
  // Missing device, wrong driver, non-viable group, busy: KernelVfioDevice says which.
  auto dev = vfio::OpenKernelVfioDevice(path, *sys);
  if (!dev.ok()) return fail(dev.status());
  if (vfio_bar_mapper_ == nullptr) {  // the first kernel VFIO function (creation or attach)
    // Memslot ids above any RAM slot (RamSlot(i) = i; GuestMemory has a handful of regions).
    constexpr uint32_t kFirstBarMemslot = 256;
    vfio_bar_mapper_ = MemslotBarMapper::ForVm(*vm_, kFirstBarMemslot);
    vfio_intx_router_ = std::make_unique<KvmIntxRouter>(*vm_);
  }
  uint8_t pin = 0;  // the function's interrupt pin register (0: no INTx, 1..4: INTA#..INTD#)
  if (absl::Status s = (*dev)->RegionRead(vfio::kConfigRegionIndex, pci::kRegInterruptPin,
                                          std::span<uint8_t>(&pin, 1));
      !s.ok())
    return fail(s);
  vfio::VfioPciOptions o;
  o.gsi_router = gsi_router_.get();
  o.bar_mapper = vfio_bar_mapper_.get();
  if (pin >= 1 && pin <= 4) {
    o.intx_router = vfio_intx_router_.get();
    o.intx_gsi = PciIntxGsi(slot, pin - 1);
  }
  // From here on, an error destroys `pci`: ~VfioPciDevice detaches DMA and interrupts.
  auto pci = vfio::VfioPciDevice::Create(std::move(*dev), o);
  if (!pci.ok()) return fail(pci.status());
  // iova = gpa over all guest RAM (the kernel pins it). Device writes bypass the VMM's dirty
  // tracking (KVM never sees them).
  if (absl::Status s = (*pci)->AttachDma(*mem_); !s.ok()) return fail(s);
  // The commit point: one config-cycle-locked insertion; vCPUs see the slot empty or complete.
  if (absl::Status s = pci_->AddDevice(slot, 0, *pci); !s.ok()) return fail(s);
  const bool intx = (*pci)->intx_trigger_fd() >= 0;  // pin set and the device offers INTx
  {
    std::lock_guard lock(devices_mu_);
    vfio_.push_back({path, std::move(*pci), slot});
  }
  if (intx)
    LOG_INFO("%s at 0000:00:%02x.0, INT%c# on GSI %d", label, slot, 'A' + pin - 1, o.intx_gsi);
  else
    LOG_INFO("%s at 0000:00:%02x.0, no INTx", label, slot);
  return absl::OkStatus();
}

absl::StatusOr<uint8_t> VmImpl::AttachVfio(const VfioConfig& c) {
  std::lock_guard attach(attach_mu_);
  if (absl::Status s = AttachAllowed(); !s.ok()) return s;
  const std::string& path = c.sysfs_path();
  const std::string bdf = VfioBdf(path);
  if (bdf.empty()) return absl::InvalidArgumentError("vfio: no PCI device path");
  if (balloon_ != nullptr) return absl::FailedPreconditionError(kBalloonWithVfio);
  {
    std::lock_guard lock(devices_mu_);
    for (const VfioConfig& v : config_.vfio())
      if (VfioBdf(v.sysfs_path()) == bdf)
        return absl::AlreadyExistsError(absl::StrCat("PCI device ", bdf, " ('", path,
                                                     "') is already attached to this VM"));
  }
  auto slot = PickSlot(0, /*hotplug=*/true);
  if (!slot.ok()) return slot.status();
  if (absl::Status s = AddVfioKernel(path, *slot, absl::StrCat("vfio ", path)); !s.ok()) return s;
  {
    std::lock_guard lock(devices_mu_);
    VfioConfig* added = config_.add_vfio();
    *added = c;
    added->set_pci_slot(*slot);  // a migration destination puts it at the same slot
  }
  hotplug_->SlotAdded(*slot);
  return *slot;
}

absl::Status VmImpl::LoadGuest() {
  if (absl::Status s = WriteBootTables(*mem_); !s.ok()) return s;
  // Both an MP table (acpi=off kernels, kernels without ACPI) and ACPI tables (MADT with every
  // vCPU, MCFG for the PCI ECAM, a DSDT describing the PCI host bridge and COM1).
  if (absl::Status s = WriteMpTable(*mem_, config_.vcpus()); !s.ok()) return s;
  AcpiConfig acpi;
  acpi.num_vcpus = config_.vcpus();
  acpi.pci_windows = pci_->windows();
  acpi.sb_aml = pci::BuildPciHotplugAml(hotplug_slots_);
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
  std::vector<vfio::VfioPciDevice*> restored;
  EnsurePresentFn ensure;
  {
    std::lock_guard lock(mu_);
    if (absl::Status s = CheckState(RunState::kCreated, "boot"); !s.ok()) return s;
    restored.swap(pt_restored_);
    ensure = pt_ensure_;
  }
  // Passthrough functions restored from a migration run first, their interrupts connected.
  // Not under mu_: making their DMA targets present may wait for the network (and asks state()).
  for (vfio::VfioPciDevice* d : restored) {
    // Post-copy: what the restored state will DMA must be here before the device runs.
    if (ensure && d->dma_model() != nullptr)
      EnsureDmaTargets(ensure, d->dma_model()->AtRun(), d->name());
    auto m = d->migration();
    absl::Status s = m.ok() ? (*m)->Run() : m.status();
    if (!s.ok()) return absl::Status(s.code(), absl::StrCat(d->name(), ": ", s.message()));
  }
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
  *st.mutable_config() = config();  // locked: AttachVfioUser appends to it
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
  if (hotplug_) st.set_pci_hotplug_pending(hotplug_->pending_up());
  // A passthrough function's state lives in the device: only a stop-and-copy reads it.
  std::vector<PassthroughRef> pt = Passthrough();
  if (!pt.empty() && (!pt_stopped_ || pt_migrating_.size() != pt.size()))
    return absl::FailedPreconditionError(absl::StrFormat(
        "cannot save state: the %s device %s was not stopped for migration (its state is read "
        "only by a migration's stop-and-copy)", pt[0].kind, pt[0].what));
  for (size_t i = 0; i < pt.size(); ++i) {
    VfioDeviceState* d = st.add_vfio_devices();
    d->set_kind(pt[i].kind);
    d->set_slot(pt[i].slot);
    // The start of the stream may have travelled already (TakePassthroughPrecopyData).
    const uint64_t sent = pt_migrating_[i].sent;
    const std::string& blob = pt_migrating_[i].blob;
    if (sent > blob.size())
      return absl::InternalError(absl::StrCat(pt[i].what, ": more device data sent than read"));
    d->set_blob_offset(sent);
    if (!d->mutable_pci()->ParseFromString(pt[i].device->SaveState(std::span<const uint8_t>(
            reinterpret_cast<const uint8_t*>(blob.data()) + sent, blob.size() - sent))))
      return absl::InternalError(absl::StrCat(pt[i].what, ": device state does not parse"));
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
  std::vector<PassthroughRef> pt = Passthrough();
  if (static_cast<size_t>(st.vfio_devices_size()) != pt.size())
    return absl::InvalidArgumentError(absl::StrFormat(
        "saved state has %d passthrough devices, this VM has %d", st.vfio_devices_size(),
        pt.size()));
  for (size_t i = 0; i < pt.size(); ++i) {
    const VfioDeviceState& d = st.vfio_devices(static_cast<int>(i));
    if (d.kind() != pt[i].kind || d.slot() != pt[i].slot)
      return absl::InvalidArgumentError(absl::StrFormat(
          "saved state has a %s device at PCI slot %d, this VM has a %s device (%s) at slot %d",
          d.kind(), d.slot(), pt[i].kind, pt[i].what, pt[i].slot));
  }
  for (size_t i = 0; i < pt.size(); ++i) {
    // Loaded now (RESUMING), run at Boot() once the guest can take its interrupts.
    if (absl::Status s = pt[i].device->RestoreState(
            st.vfio_devices(static_cast<int>(i)).pci().SerializeAsString(), /*run=*/false);
        !s.ok())
      return pt[i].Error(s);
    pt_restored_.push_back(pt[i].device);
  }
  if (hotplug_) {
    hotplug_->RestorePending(st.pci_hotplug_pending());
  } else if (st.pci_hotplug_pending() != 0) {
    return absl::InvalidArgumentError("saved state has a pending PCI hotplug event, this VM has "
                                      "no hotplug controller");
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

// Pre-copy data read from a passthrough device per pass, at most (the rest waits for the next
// pass or the stop-and-copy).
constexpr size_t kPassthroughDrainPerPass = size_t{64} << 20;

std::vector<VmImpl::PassthroughRef> VmImpl::Passthrough() const {
  std::vector<PassthroughRef> out;
  {
    std::lock_guard lock(devices_mu_);
    for (const auto& [kind, slots] :
         {std::pair{"vfio", &vfio_}, std::pair{"vfio-user", &vfio_user_}})
      for (const PassthroughSlot& v : *slots)
        out.push_back({kind, v.what, v.device.get(), v.pci_slot});
  }
  std::sort(out.begin(), out.end(),
            [](const PassthroughRef& a, const PassthroughRef& b) { return a.slot < b.slot; });
  return out;
}

absl::StatusOr<int> VmImpl::StartPassthroughMigration() {
  std::vector<PassthroughRef> pt = Passthrough();
  // Every function must be able to migrate before any is touched.
  std::vector<vfio::VfioMigrationDriver*> drivers;
  for (const PassthroughRef& p : pt) {
    auto m = p.device->migration();
    if (!m.ok())
      return absl::FailedPreconditionError(absl::StrFormat(
          "the VM has a %s device (%s) that cannot migrate: %s", p.kind, p.what,
          m.status().message()));
    drivers.push_back(*m);
  }
  pt_migrating_.clear();
  for (const PassthroughRef& p : pt) pt_migrating_.push_back({p});
  pt_stopped_ = false;
  for (size_t i = 0; i < pt.size(); ++i) {
    absl::Status s = drivers[i]->StartPreCopy().status();
    if (s.ok()) s = drivers[i]->StartDirtyTracking(pt[i].device->dma_ranges());
    if (!s.ok()) {
      CancelPassthroughMigration();
      return pt[i].Error(s);
    }
    LOG_INFO("migration: %s device %s: %s, DMA dirty tracking: %s", pt[i].kind, pt[i].what,
             drivers[i]->state() == vfio::MigState::kPreCopy ? "pre-copy" : "no pre-copy",
             vfio::DirtySourceName(drivers[i]->dirty_source()));
  }
  return static_cast<int>(pt.size());
}

absl::Status VmImpl::SyncPassthroughDirty(migration::DirtySet& dirty) {
  for (const PassthroughMigrating& pm : pt_migrating_) {
    auto m = pm.ref.device->migration();
    if (!m.ok()) return m.status();
    absl::Status s = (*m)->SyncDirty([&](const vfio::DmaRange& r, std::span<const uint64_t> bm) {
      dirty.OrRange(r.iova, r.size / kPageSize, bm);  // iova = gpa (AttachDma)
    });
    if (!s.ok()) return pm.ref.Error(s);
  }
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> VmImpl::SyncPassthroughMigration(migration::DirtySet& dirty) {
  uint64_t bytes = 0;
  for (const PassthroughMigrating& pm : pt_migrating_) {
    auto m = pm.ref.device->migration();
    if (!m.ok()) return m.status();
    if ((*m)->state() != vfio::MigState::kPreCopy) continue;
    auto n = (*m)->DrainPreCopy(kPassthroughDrainPerPass);
    if (!n.ok()) return pm.ref.Error(n.status());
    bytes += *n;
  }
  if (absl::Status s = SyncPassthroughDirty(dirty); !s.ok()) return s;
  return bytes;
}

absl::Status VmImpl::StopPassthroughDevices(migration::DirtySet& dirty) {
  {
    std::lock_guard lock(mu_);
    if (state_ != RunState::kPaused)
      return absl::FailedPreconditionError("passthrough devices are stopped only while paused");
  }
  std::vector<std::string> blobs;
  for (const PassthroughMigrating& pm : pt_migrating_) {
    auto m = pm.ref.device->migration();
    if (!m.ok()) return m.status();
    auto blob = (*m)->StopAndCopy();
    if (!blob.ok()) return pm.ref.Error(blob.status());
    blobs.push_back(std::move(*blob));
  }
  // Stopped: no DMA follows, so this harvest is the last.
  if (absl::Status s = SyncPassthroughDirty(dirty); !s.ok()) return s;
  for (size_t i = 0; i < blobs.size(); ++i) pt_migrating_[i].blob = std::move(blobs[i]);
  pt_stopped_ = true;
  return absl::OkStatus();
}

absl::Status VmImpl::CheckPassthroughPostcopy() const {
  for (const PassthroughRef& p : Passthrough()) {
    // Kernel VFIO pins guest RAM in the IOMMU when it is DMA-mapped (at creation): the pages
    // post-copy installs later are not the ones the device would see.
    if (absl::string_view(p.kind) == "vfio")
      return absl::FailedPreconditionError(absl::StrFormat(
          "post-copy is not possible with the VFIO device %s: the IOMMU pins guest RAM when it "
          "is mapped for DMA, so pages arriving later would not be the ones the device sees; "
          "use pre-copy",
          p.what));
    if (p.device->dma_model() == nullptr)
      return absl::FailedPreconditionError(absl::StrFormat(
          "post-copy is not possible with the %s device %s (PCI %04x:%04x): there is no DMA "
          "model of its class, so it could DMA into guest pages that have not arrived yet "
          "(devices/vfio/pci/dma_footprint.h); use pre-copy",
          p.kind, p.what, p.device->config().ReadRaw(0, 2), p.device->config().ReadRaw(2, 2)));
  }
  return absl::OkStatus();
}

void VmImpl::EnsureDmaTargets(const EnsurePresentFn& ensure,
                              const std::vector<vfio::DmaRange>& ranges, const std::string& who) {
  for (const vfio::DmaRange& r : ranges) {
    for (const GuestMemory::Region& reg : mem_->regions()) {
      // Only guest RAM: the device cannot reach anything else through its DMA mapping.
      const uint64_t begin = std::max(r.iova, reg.gpa);
      const uint64_t end = std::min(r.iova + r.size, reg.gpa + reg.size);
      if (begin >= end) continue;
      for (int attempt = 0;; ++attempt) {
        absl::Status s = ensure(begin, end - begin);
        if (s.ok()) break;
        if (!absl::IsUnavailable(s) && !absl::IsDeadlineExceeded(s)) {
          LOG_ERROR("%s: cannot make its DMA target [0x%x, 0x%x) present: %s", who, begin, end,
                    s.message());
          break;
        }
        if (state() == RunState::kExited) return;
        if (absl::IsUnavailable(s)) absl::SleepFor(absl::Milliseconds(100));  // source away
        if (attempt % 10 == 0)
          LOG_WARN("%s: waiting for its DMA target [0x%x, 0x%x): %s", who, begin, end,
                   s.message());
      }
    }
  }
}

absl::Status VmImpl::SetPassthroughPostcopy(EnsurePresentFn ensure) {
  std::vector<PassthroughRef> pt = Passthrough();
  if (!ensure) {
    for (const PassthroughRef& p : pt) p.device->SetBarWriteGate(nullptr);
    pt_ensure_ = nullptr;
    return absl::OkStatus();
  }
  if (absl::Status s = CheckPassthroughPostcopy(); !s.ok()) return s;
  pt_ensure_ = ensure;
  for (const PassthroughRef& p : pt)
    p.device->SetBarWriteGate(
        [this, ensure, who = p.device->name()](const std::vector<vfio::DmaRange>& targets) {
          EnsureDmaTargets(ensure, targets, who);
        });
  return absl::OkStatus();
}

std::vector<Vm::PassthroughData> VmImpl::TakePassthroughPrecopyData(size_t max_chunk) {
  std::vector<PassthroughData> out;
  for (PassthroughMigrating& pm : pt_migrating_) {
    auto m = pm.ref.device->migration();
    if (!m.ok()) continue;
    const std::string_view blob = (*m)->blob();
    while (pm.sent < blob.size()) {
      const size_t n = std::min<size_t>(max_chunk, blob.size() - pm.sent);
      out.push_back({pm.ref.slot, pm.sent, std::string(blob.substr(pm.sent, n))});
      pm.sent += n;
    }
  }
  return out;
}

void VmImpl::CancelPassthroughMigration() {
  for (const PassthroughMigrating& pm : pt_migrating_) {
    const PassthroughRef& p = pm.ref;
    auto m = p.device->migration();
    if (!m.ok()) continue;
    if ((*m)->dirty_tracking())
      if (absl::Status s = (*m)->StopDirtyTracking(); !s.ok())
        LOG_WARN("%s device %s: stopping DMA dirty tracking: %s", p.kind, p.what, s.message());
    if (absl::Status s = (*m)->Cancel(); !s.ok())
      LOG_ERROR("%s device %s: back to RUNNING after the migration: %s", p.kind, p.what,
                s.message());
  }
  pt_migrating_.clear();
  pt_stopped_ = false;
}

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
  // A passthrough function is a different device instance here (its own vfio-user server or
  // host function): never the source's, so each must be given, in the same order.
  if (local.vfio_user_size() != c.vfio_user_size())
    return absl::InvalidArgumentError(absl::StrFormat(
        "the migrating VM has %d vfio-user devices, %d given here (each needs its own device "
        "server at the destination: --vfio-user SOCKET, in the source's order)",
        c.vfio_user_size(), local.vfio_user_size()));
  for (int i = 0; i < c.vfio_user_size(); ++i)
    c.mutable_vfio_user(i)->set_socket(local.vfio_user(i).socket());
  if (local.vfio_size() != c.vfio_size())
    return absl::InvalidArgumentError(absl::StrFormat(
        "the migrating VM has %d VFIO devices, %d given here (--vfio PATH of a function of the "
        "same model, in the source's order)", c.vfio_size(), local.vfio_size()));
  for (int i = 0; i < c.vfio_size(); ++i)  // pci_slot stays the source's (hot-attached)
    c.mutable_vfio(i)->set_sysfs_path(local.vfio(i).sysfs_path());
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
    if (!paths.insert(RealPathKey(d.path())).second)
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
    if (!vfio_sockets.insert(RealPathKey(sock)).second)
      return absl::InvalidArgumentError(absl::StrCat(
          "vfio-user device ", i, ": socket '", sock, "' is already used by another vfio-user device"));
  }
  std::set<std::string> vfio_bdfs;
  for (int i = 0; i < c.vfio_size(); ++i) {
    // One device fd per function, whichever path names it.
    std::string bdf = VfioBdf(c.vfio(i).sysfs_path());
    if (bdf.empty())
      return absl::InvalidArgumentError(absl::StrCat("vfio device ", i, ": no PCI device path"));
    if (!vfio_bdfs.insert(bdf).second)
      return absl::InvalidArgumentError(absl::StrCat("vfio device ", i, ": PCI device ", bdf,
                                                     " ('", c.vfio(i).sysfs_path(),
                                                     "') is given twice"));
  }
  if (c.vfio_size() > 0 && c.has_balloon()) return absl::InvalidArgumentError(kBalloonWithVfio);
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
