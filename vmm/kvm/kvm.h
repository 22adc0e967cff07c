// RAII wrappers around the KVM API: every ioctl the VMM issues goes through this file.
#ifndef MICROVMM_VMM_KVM_KVM_H_
#define MICROVMM_VMM_KVM_KVM_H_

#include "vmm/kvm/linux_kvm.h"

#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "vmm/base/fd.h"
#include "vmm/base/status.h"

namespace microvmm {

// Raw uAPI struct <-> bytes (saved state). FromBytes checks the size.
template <typename T>
std::string ToBytes(const T& v) {
  return std::string(reinterpret_cast<const char*>(&v), sizeof(T));
}
template <typename T>
absl::StatusOr<T> FromBytes(const std::string& b, const char* what) {
  if (b.size() != sizeof(T))
    return absl::InvalidArgumentError(std::string("saved ") + what + " has " +
                                      std::to_string(b.size()) + " bytes, expected " +
                                      std::to_string(sizeof(T)));
  T v;
  std::memcpy(&v, b.data(), sizeof(T));
  return v;
}

// Holds struct kvm_cpuid2 with its flexible array.
class CpuidTable {
 public:
  CpuidTable() = default;
  explicit CpuidTable(std::vector<kvm_cpuid_entry2> entries) : entries_(std::move(entries)) {}
  std::vector<kvm_cpuid_entry2>& entries() { return entries_; }
  const std::vector<kvm_cpuid_entry2>& entries() const { return entries_; }
  kvm_cpuid_entry2* Find(uint32_t function, uint32_t index = 0);
  // Builds the ioctl buffer.
  std::vector<uint8_t> ToKvm() const;

 private:
  std::vector<kvm_cpuid_entry2> entries_;
};

class Kvm {
 public:
  static absl::StatusOr<Kvm> Open(const char* path = "/dev/kvm");
  int fd() const { return fd_.get(); }
  int CheckExtension(long cap) const;  // <= 0: unsupported
  absl::StatusOr<int> VcpuMmapSize() const;
  absl::StatusOr<CpuidTable> GetSupportedCpuid() const;
  absl::StatusOr<std::vector<uint32_t>> GetMsrIndexList() const;

 private:
  explicit Kvm(ScopedFd fd) : fd_(std::move(fd)) {}
  ScopedFd fd_;
};

class KvmVm {
 public:
  static absl::StatusOr<KvmVm> Create(const Kvm& kvm);
  int fd() const { return fd_.get(); }
  int CheckExtension(long cap) const;
  absl::Status SetTssAddr(uint64_t addr);
  absl::Status SetIdentityMapAddr(uint64_t addr);
  absl::Status CreateIrqchip();
  absl::Status CreatePit2();
  absl::Status SetUserMemoryRegion(uint32_t slot, uint32_t flags, uint64_t gpa, uint64_t size,
                                   void* host);
  // KVM_SET_USER_MEMORY_REGION2 (needs KVM_CAP_USER_MEMORY2). With KVM_MEM_USERFAULT in `flags`,
  // `userfault_bitmap` is the slot's bitmap (one bit per page, unsigned-long words, set = a vCPU
  // access exits with KVM_EXIT_MEMORY_FAULT + KVM_MEMORY_EXIT_FLAG_USERFAULT); it must stay
  // mapped for the memslot's lifetime (see migration/postcopy/kvm_userfault.h).
  absl::Status SetUserMemoryRegion2(uint32_t slot, uint32_t flags, uint64_t gpa, uint64_t size,
                                    void* host, const void* userfault_bitmap = nullptr);
  absl::Status IrqLine(uint32_t irq, bool level);
  absl::Status EnableCap(uint32_t cap, uint64_t arg0 = 0);
  absl::StatusOr<ScopedFd> CreateVcpu(int id);

  // In-kernel device state (saved/restored while every vCPU is paused).
  absl::StatusOr<kvm_irqchip> GetIrqchip(uint32_t chip_id) const;
  absl::Status SetIrqchip(const kvm_irqchip& chip);
  absl::StatusOr<kvm_pit_state2> GetPit2() const;
  absl::Status SetPit2(const kvm_pit_state2& pit);
  absl::StatusOr<kvm_clock_data> GetClock() const;
  absl::Status SetClock(const kvm_clock_data& clock);

  // Interrupt routing and eventfd plumbing (used by //vmm/pci).
  // KVM_SET_GSI_ROUTING: replaces the VM's whole GSI routing table with `entries`.
  absl::Status SetGsiRouting(const std::vector<kvm_irq_routing_entry>& entries);
  // KVM_IRQFD: a write to eventfd `fd` raises `gsi` (edge). Deassign takes the same pair.
  absl::Status AssignIrqfd(int fd, uint32_t gsi);
  absl::Status DeassignIrqfd(int fd, uint32_t gsi);
  // KVM_IRQFD with KVM_IRQFD_FLAG_RESAMPLE: level-triggered. A write to `fd` asserts IOAPIC pin
  // `gsi`; when the guest EOIs it KVM de-asserts the line and signals `resample_fd` (VFIO INTx
  // unmask). Deassign takes the trigger fd and gsi.
  absl::Status AssignResampleIrqfd(int fd, int resample_fd, uint32_t gsi);
  absl::Status DeassignResampleIrqfd(int fd, uint32_t gsi) { return DeassignIrqfd(fd, gsi); }
  // KVM_IOEVENTFD: a guest write of `len` bytes (1/2/4/8; 0 = any length, MMIO only) to `addr`
  // (a port if `pio`) signals `fd` in the kernel instead of exiting; with `datamatch` only
  // writes of that value do. Deassign needs exactly the parameters given to assign.
  absl::Status AssignIoeventfd(int fd, uint64_t addr, uint32_t len, bool pio,
                               std::optional<uint64_t> datamatch);
  absl::Status DeassignIoeventfd(int fd, uint64_t addr, uint32_t len, bool pio,
                                 std::optional<uint64_t> datamatch);

 private:
  explicit KvmVm(ScopedFd fd) : fd_(std::move(fd)) {}
  ScopedFd fd_;
};

class KvmVcpu {
 public:
  static absl::StatusOr<KvmVcpu> Create(const Kvm& kvm, const KvmVm& vm, int id);
  int fd() const { return fd_.get(); }
  int id() const { return id_; }
  kvm_run* run() const { return static_cast<kvm_run*>(run_.get()); }

  // KVM_RUN; returns the raw result: 0 on exit, -errno (EINTR/EAGAIN handled by the caller).
  int Run();

  absl::StatusOr<kvm_regs> GetRegs() const;
  absl::Status SetRegs(const kvm_regs& regs);
  absl::StatusOr<kvm_sregs> GetSregs() const;
  absl::Status SetSregs(const kvm_sregs& sregs);
  absl::StatusOr<kvm_fpu> GetFpu() const;
  absl::Status SetFpu(const kvm_fpu& fpu);
  absl::Status SetCpuid(const CpuidTable& cpuid);
  absl::Status SetMsrs(const std::vector<kvm_msr_entry>& msrs);
  absl::StatusOr<std::vector<kvm_msr_entry>> GetMsrs(const std::vector<uint32_t>& indices) const;
  absl::StatusOr<kvm_lapic_state> GetLapic() const;
  absl::Status SetLapic(const kvm_lapic_state& lapic);
  absl::StatusOr<kvm_mp_state> GetMpState() const;
  absl::Status SetMpState(uint32_t state);

  // Full state; xsave is KVM_GET_XSAVE2-sized when the kernel offers it, else struct kvm_xsave.
  absl::StatusOr<std::string> GetXsave(int xsave2_size) const;
  absl::Status SetXsave(const std::string& xsave);
  absl::StatusOr<kvm_xcrs> GetXcrs() const;
  absl::Status SetXcrs(const kvm_xcrs& xcrs);
  absl::StatusOr<kvm_vcpu_events> GetEvents() const;
  absl::Status SetEvents(const kvm_vcpu_events& events);
  absl::StatusOr<kvm_debugregs> GetDebugRegs() const;
  absl::Status SetDebugRegs(const kvm_debugregs& regs);
  // 0 when KVM cannot tell.
  uint32_t GetTscKhz() const;
  absl::Status SetTscKhz(uint32_t khz);

  void SetImmediateExit(bool on) { run()->immediate_exit = on ? 1 : 0; }

 private:
  KvmVcpu(ScopedFd fd, ScopedMmap run, int id)
      : fd_(std::move(fd)), run_(std::move(run)), id_(id) {}
  ScopedFd fd_;
  ScopedMmap run_;
  int id_;
};

// Does this KVM implement "KVM Userfault" as the VMM uses it? Decided by behaviour, not by a cap
// number (it changed between patch versions): a scratch VM must accept a KVM_MEM_USERFAULT
// memslot, and a tiny real-mode vCPU reading a page marked in the bitmap must get
// KVM_EXIT_MEMORY_FAULT with the USERFAULT flag for that page, then read the right byte once the
// bit is cleared. false + the reason (logged, and stored in *reason if given) when any step fails;
// an error only when the scratch VM itself cannot be set up.
absl::StatusOr<bool> ProbeKvmUserfault(Kvm& kvm, std::string* reason = nullptr);

}  // namespace microvmm

#endif  // MICROVMM_VMM_KVM_KVM_H_
