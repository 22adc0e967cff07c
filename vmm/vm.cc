#include "vmm/vm.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <fstream>
#include <mutex>
#include <sstream>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "devices/legacy/i8042.h"
#include "devices/legacy/serial.h"
#include "tests/guest/embedded.h"
#include "vmm/base/log.h"
#include "vmm/boot/layout.h"
#include "vmm/boot/linux_loader.h"
#include "vmm/boot/mptable.h"
#include "vmm/boot/x86_setup.h"
#include "vmm/bus.h"
#include "vmm/kvm/kvm.h"
#include "vmm/memory/guest_memory.h"
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
  explicit VmImpl(VmConfig config) : config_(std::move(config)), pio_("pio"), mmio_("mmio") {}
  ~VmImpl() override { StopAll(); }

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
  absl::Status LoadGuest();
  absl::Status SetupVcpus();
  // Records the first exit and stops every vCPU. Callable from vCPU threads.
  void RequestExit(int status, std::string reason);
  void StopAll();
  absl::Status CheckState(RunState want, const char* op) const;

  VmConfig config_;
  std::optional<Kvm> kvm_;
  std::optional<KvmVm> vm_;
  std::unique_ptr<GuestMemory> mem_;
  Bus pio_;
  Bus mmio_;
  std::shared_ptr<Serial> serial_;
  std::vector<std::unique_ptr<Vcpu>> vcpus_;

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

  auto mem = GuestMemory::Create(config_.memory_mib() << 20);
  if (!mem.ok()) return mem.status();
  mem_ = std::move(*mem);
  uint32_t slot = 0;
  for (const auto& r : mem_->regions()) {
    if (absl::Status s = vm_->SetUserMemoryRegion(slot++, 0, r.gpa, r.size, r.host); !s.ok())
      return s;
  }
  if (absl::Status s = SetupDevices(); !s.ok()) return s;
  if (absl::Status s = LoadGuest(); !s.ok()) return s;
  return SetupVcpus();
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
  if (absl::Status s = pio_.Insert(
          std::make_shared<I8042>([this] { RequestExit(kExitOk, "guest reset via i8042"); }),
          0x60, 5);
      !s.ok())
    return s;
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

absl::Status VmImpl::LoadGuest() {
  if (absl::Status s = WriteBootTables(*mem_); !s.ok()) return s;
  if (absl::Status s = WriteMpTable(*mem_, config_.vcpus()); !s.ok()) return s;
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
    auto entry = LoadLinux(*mem_, {*kernel, initrd, config_.cmdline()});
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
  auto supported = kvm_->GetSupportedCpuid();
  if (!supported.ok()) return supported.status();
  for (uint32_t i = 0; i < config_.vcpus(); ++i) {
    auto kv = KvmVcpu::Create(*kvm_, *vm_, i);
    if (!kv.ok()) return kv.status();
    auto vcpu = std::make_unique<Vcpu>(std::move(*kv), &pio_, &mmio_, [this](const VcpuStop& s) {
      RequestExit(s.status, s.reason);
    });
    KvmVcpu& k = vcpu->kvm();
    if (absl::Status s = k.SetCpuid(BuildVcpuCpuid(*supported, i, config_.vcpus())); !s.ok())
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
    if (boot_cpu || !linux_) {
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
  std::lock_guard lock(mu_);
  if (absl::Status s = CheckState(RunState::kRunning, "pause"); !s.ok()) return s;
  for (auto& v : vcpus_) v->RequestPause();
  for (auto& v : vcpus_) v->WaitPaused();
  state_ = RunState::kPaused;
  return absl::OkStatus();
}

absl::Status VmImpl::Resume() {
  std::lock_guard lock(mu_);
  if (absl::Status s = CheckState(RunState::kPaused, "resume"); !s.ok()) return s;
  for (auto& v : vcpus_) v->Resume();
  state_ = RunState::kRunning;
  return absl::OkStatus();
}

absl::Status VmImpl::Shutdown() {
  RequestExit(kExitOk, "shutdown requested");
  StopAll();
  return absl::OkStatus();
}

}  // namespace

absl::Status ValidateAndDefaultConfig(VmConfig& c) {
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
    if (absl::Status s = CheckReadableFile(c.kernel(), "kernel"); !s.ok()) return s;
    if (!c.initrd().empty())
      if (absl::Status s = CheckReadableFile(c.initrd(), "initrd"); !s.ok()) return s;
    if (c.cmdline().empty()) c.set_cmdline(kDefaultCmdline);
    if (!c.test_guest_args().empty())
      return absl::InvalidArgumentError("test_guest_args given without a test guest");
  } else {
    if (!c.initrd().empty() || !c.cmdline().empty())
      return absl::InvalidArgumentError("initrd/cmdline only apply to a Linux kernel");
    if (testguest::Find(c.test_guest()) == nullptr) {
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
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Vm>> Vm::Create(const VmConfig& config) {
  VmConfig c = config;
  if (absl::Status s = ValidateAndDefaultConfig(c); !s.ok()) return s;
  auto vm = std::make_unique<VmImpl>(std::move(c));
  if (absl::Status s = vm->Build(); !s.ok()) return s;
  return vm;
}

}  // namespace microvmm
