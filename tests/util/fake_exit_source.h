// A scripted stand-in for KVM_RUN behind the vCPU loop's ExitSource seam: tests drive the
// production vCPU loop (vmm/vcpu) with chosen exits, without /dev/kvm.
#ifndef MICROVMM_TESTS_UTIL_FAKE_EXIT_SOURCE_H_
#define MICROVMM_TESTS_UTIL_FAKE_EXIT_SOURCE_H_

#include <errno.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <optional>
#include <vector>

#include "vmm/vcpu.h"

namespace microvmm::testing {

constexpr uint64_t kUf = KVM_MEMORY_EXIT_FLAG_USERFAULT;
constexpr uint64_t kFakeRip = 0xfeedf00dULL;

// One scripted KVM_RUN result.
struct Step {
  uint32_t reason = KVM_EXIT_HLT;
  int ret = 0;                // KVM_RUN's return (-errno)
  bool keep_reason = false;   // model a failing KVM_RUN that leaves exit_reason untouched
  uint64_t flags = 0, gpa = 0, size = 0;  // memory_fault
  uint16_t port = 0;          // KVM_EXIT_IO (1-byte OUT)
  uint8_t byte = 0;
  uint64_t mmio_addr = 0;     // KVM_EXIT_MMIO (4-byte read)
};

inline Step Fault(uint64_t gpa, uint64_t flags = kUf, int ret = -EFAULT) {
  Step s;
  s.reason = KVM_EXIT_MEMORY_FAULT;
  s.ret = ret;
  s.flags = flags;
  s.gpa = gpa;
  s.size = 4096;
  return s;
}

// Plays `script`, then halts. Honours immediate_exit like KVM. Used by one vCPU thread.
class FakeExitSource : public ExitSource {
 public:
  explicit FakeExitSource(std::vector<Step> script) : script_(std::move(script)) {
    static_assert(sizeof(kvm_run) + 64 <= sizeof(page_));
  }
  int Run() override {
    kvm_run* r = run();
    if (r->immediate_exit) return -EINTR;
    runs_.fetch_add(1);
    if (next_ >= script_.size()) {
      r->exit_reason = KVM_EXIT_HLT;
      return 0;
    }
    const Step& s = script_[next_++];
    if (s.keep_reason) return s.ret;
    r->exit_reason = s.reason;
    if (s.reason == KVM_EXIT_MEMORY_FAULT) {
      *KvmRunMemoryFault(r) = {s.flags, s.gpa, s.size};
    } else if (s.reason == KVM_EXIT_IO) {
      r->io = {};
      r->io.direction = KVM_EXIT_IO_OUT;
      r->io.size = 1;
      r->io.port = s.port;
      r->io.count = 1;
      r->io.data_offset = sizeof(kvm_run);
      page_[sizeof(kvm_run)] = s.byte;
    } else if (s.reason == KVM_EXIT_MMIO) {
      r->mmio = {};
      r->mmio.phys_addr = s.mmio_addr;
      r->mmio.len = 4;
      r->mmio.is_write = 0;
    }
    return s.ret;
  }
  kvm_run* run() override { return reinterpret_cast<kvm_run*>(page_); }
  absl::StatusOr<kvm_regs> GetRegs() override {
    kvm_regs regs{};
    regs.rip = kFakeRip;
    return regs;
  }
  absl::StatusOr<kvm_sregs> GetSregs() override { return kvm_sregs{}; }

  int runs() const { return runs_.load(); }
  uint32_t mmio_result() const {
    uint32_t v;
    std::memcpy(&v, reinterpret_cast<const kvm_run*>(page_)->mmio.data, 4);
    return v;
  }

 private:
  alignas(64) uint8_t page_[4096] = {};
  std::vector<Step> script_;
  size_t next_ = 0;
  std::atomic<int> runs_{0};
};

// Collects the vCPU's stop report.
struct StopBox {
  std::mutex mu;
  std::condition_variable cv;
  std::optional<VcpuStop> stop;
  Vcpu::StopFn Fn() {
    return [this](const VcpuStop& s) {
      std::lock_guard lock(mu);
      stop = s;
      cv.notify_all();
    };
  }
  // Hang guard only (a broken loop must fail the test, not time it out); not a timing assertion.
  bool Wait() {
    std::unique_lock lock(mu);
    return cv.wait_for(lock, std::chrono::seconds(60), [this] { return stop.has_value(); });
  }
};

}  // namespace microvmm::testing

#endif  // MICROVMM_TESTS_UTIL_FAKE_EXIT_SOURCE_H_
