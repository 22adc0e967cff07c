// The vCPU loop's post-copy path (KVM_EXIT_MEMORY_FAULT + KVM Userfault flag), driven through the
// ExitSource seam by a scripted fake: no /dev/kvm, no KVM Userfault needed. The loop under test
// is the production loop; only the source of exits is fake.
#include <errno.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "vmm/bus.h"
#include "vmm/exit_status.h"
#include "tests/util/fake_exit_source.h"
#include "vmm/vcpu.h"

namespace microvmm {
namespace {

using testing::FakeExitSource;
using testing::Fault;
using testing::kFakeRip;
using testing::kUf;
using testing::Step;
using testing::StopBox;

struct FaultCall {
  int vcpu;
  uint64_t gpa, size, flags;
  pid_t tid;
};

class RecordingDevice : public BusDevice {
 public:
  void Read(uint64_t offset, std::span<uint8_t> data) override {
    for (size_t i = 0; i < data.size(); ++i) data[i] = 0xa0 + i;
  }
  void Write(uint64_t offset, std::span<const uint8_t> data) override {
    written.assign(data.begin(), data.end());
  }
  std::vector<uint8_t> written;
};

struct Harness {
  Bus pio{"pio"};
  Bus mmio{"mmio"};
  StopBox box;
  FakeExitSource* source = nullptr;  // owned by the vCPU
  std::unique_ptr<Vcpu> vcpu;

  void Make(int id, std::vector<Step> script, Vcpu::MemoryFaultFn fn) {
    auto src = std::make_unique<FakeExitSource>(std::move(script));
    source = src.get();
    vcpu = std::make_unique<Vcpu>(id, std::move(src), &pio, &mmio, box.Fn(), Vcpu::RingFullFn{},
                                  std::move(fn));
  }
};

TEST(VcpuMemoryFaultTest, UserfaultCallsHandlerOnVcpuThreadAndReEnters) {
  Harness h;
  std::mutex mu;
  std::vector<FaultCall> calls;
  // The second fault comes with KVM_RUN == 0: handled the same way.
  h.Make(3, {Fault(0x5000), Fault(0x7123, kUf | KVM_MEMORY_EXIT_FLAG_PRIVATE, 0)},
         [&](int id, uint64_t gpa, uint64_t size, uint64_t flags) {
           std::lock_guard lock(mu);
           calls.push_back({id, gpa, size, flags, ::gettid()});
           return absl::OkStatus();
         });
  h.vcpu->Start();
  const pid_t tid = h.vcpu->tid();
  EXPECT_NE(tid, 0);
  EXPECT_NE(tid, ::gettid());
  ASSERT_TRUE(h.box.Wait());
  h.vcpu->Join();

  EXPECT_EQ(h.box.stop->status, kExitOk) << h.box.stop->reason;
  EXPECT_EQ(h.box.stop->reason, "vCPU 3 halted");
  EXPECT_EQ(h.source->runs(), 3);  // fault, fault, HLT: re-entered after each fault
  ASSERT_EQ(calls.size(), 2u);
  EXPECT_EQ(calls[0].vcpu, 3);
  EXPECT_EQ(calls[0].gpa, 0x5000u);
  EXPECT_EQ(calls[0].size, 4096u);
  EXPECT_EQ(calls[0].flags, kUf);
  EXPECT_EQ(calls[1].gpa, 0x7123u);
  EXPECT_EQ(calls[1].flags, kUf | KVM_MEMORY_EXIT_FLAG_PRIVATE);
  for (const FaultCall& c : calls) EXPECT_EQ(c.tid, tid) << "handler not on the vCPU thread";
}

TEST(VcpuMemoryFaultTest, HandlerErrorStopsVmWithReason) {
  Harness h;
  int called = 0;
  h.Make(1, {Fault(0x9000), Fault(0xa000)}, [&](int, uint64_t, uint64_t, uint64_t) {
    ++called;
    return absl::UnavailableError("source closed the connection");
  });
  h.vcpu->Start();
  ASSERT_TRUE(h.box.Wait());
  h.vcpu->Join();
  EXPECT_EQ(h.box.stop->status, kExitVmmError);
  EXPECT_NE(h.box.stop->reason.find(
                "post-copy: page 0x9000 could not be fetched: source closed the connection"),
            std::string::npos)
      << h.box.stop->reason;
  EXPECT_EQ(called, 1);
  EXPECT_EQ(h.source->runs(), 1);  // never re-entered
}

TEST(VcpuMemoryFaultTest, FaultWithoutUserfaultFlagStopsWithRegisterDump) {
  Harness h;
  int called = 0;
  h.Make(0, {Fault(0x4000, KVM_MEMORY_EXIT_FLAG_PRIVATE)},
         [&](int, uint64_t, uint64_t, uint64_t) {
           ++called;
           return absl::OkStatus();
         });
  h.vcpu->Start();
  ASSERT_TRUE(h.box.Wait());
  h.vcpu->Join();
  EXPECT_EQ(called, 0);
  EXPECT_EQ(h.box.stop->status, kExitKvmError);
  const std::string& r = h.box.stop->reason;
  EXPECT_NE(r.find("gpa 0x4000"), std::string::npos) << r;
  EXPECT_NE(r.find("not a userfault"), std::string::npos) << r;
  EXPECT_NE(r.find("RIP=00000000feedf00d"), std::string::npos) << r;
}

TEST(VcpuMemoryFaultTest, UserfaultWithoutHandlerStopsWithRegisterDump) {
  Harness h;
  h.Make(2, {Fault(0x6000)}, {});
  h.vcpu->Start();
  ASSERT_TRUE(h.box.Wait());
  h.vcpu->Join();
  EXPECT_EQ(h.box.stop->status, kExitVmmError);
  const std::string& r = h.box.stop->reason;
  EXPECT_NE(r.find("vCPU 2: post-copy userfault at gpa 0x6000"), std::string::npos) << r;
  EXPECT_NE(r.find("no memory fault handler"), std::string::npos) << r;
  EXPECT_NE(r.find("RIP=00000000feedf00d"), std::string::npos) << r;
}

TEST(VcpuMemoryFaultTest, HandlerSetBySetterIsUsed) {
  Harness h;
  h.Make(0, {Fault(0x3000)}, {});
  int called = 0;
  h.vcpu->SetMemoryFaultHandler([&](int, uint64_t gpa, uint64_t, uint64_t) {
    called += gpa == 0x3000;
    return absl::OkStatus();
  });
  h.vcpu->Start();
  ASSERT_TRUE(h.box.Wait());
  h.vcpu->Join();
  EXPECT_EQ(called, 1);
  EXPECT_EQ(h.box.stop->status, kExitOk) << h.box.stop->reason;
}

// After a memory fault, a later KVM_RUN failing with plain EFAULT leaves the old exit_reason in
// kvm_run: it must be reported as a failed KVM_RUN, not taken for a second fault.
TEST(VcpuMemoryFaultTest, StaleMemoryFaultReasonIsNotAFault) {
  Harness h;
  int called = 0;
  Step plain_efault;
  plain_efault.ret = -EFAULT;
  plain_efault.keep_reason = true;
  h.Make(0, {Fault(0x2000), plain_efault}, [&](int, uint64_t, uint64_t, uint64_t) {
    ++called;
    return absl::OkStatus();
  });
  h.vcpu->Start();
  ASSERT_TRUE(h.box.Wait());
  h.vcpu->Join();
  EXPECT_EQ(called, 1);
  EXPECT_EQ(h.box.stop->status, kExitVmmError);
  EXPECT_NE(h.box.stop->reason.find("KVM_RUN failed: Bad address"), std::string::npos)
      << h.box.stop->reason;
}

// Existing exits go through the same seam unchanged: port write, MMIO read, then HLT.
TEST(VcpuMemoryFaultTest, IoAndMmioExitsStillDispatched) {
  Harness h;
  auto port = std::make_shared<RecordingDevice>();
  auto mmio = std::make_shared<RecordingDevice>();
  ASSERT_TRUE(h.pio.Insert(port, 0x3f8, 8).ok());
  ASSERT_TRUE(h.mmio.Insert(mmio, 0xd0000000, 0x1000).ok());
  Step out;
  out.reason = KVM_EXIT_IO;
  out.port = 0x3f9;
  out.byte = 0x42;
  Step rd;
  rd.reason = KVM_EXIT_MMIO;
  rd.mmio_addr = 0xd0000010;
  h.Make(0, {out, Fault(0x1000), rd}, [](int, uint64_t, uint64_t, uint64_t) {
    return absl::OkStatus();
  });
  h.vcpu->Start();
  ASSERT_TRUE(h.box.Wait());
  h.vcpu->Join();
  EXPECT_EQ(h.box.stop->status, kExitOk) << h.box.stop->reason;
  EXPECT_EQ(port->written, std::vector<uint8_t>{0x42});
  EXPECT_EQ(h.source->mmio_result(), 0xa3a2a1a0u);
}

// Per-vCPU lanes: vCPU 0's handler blocks (a slow fetch); vCPUs 1..3 flood faults and must all
// be served to completion meanwhile, each on its own thread.
TEST(VcpuMemoryFaultTest, FaultsFromSeveralVcpusAreHandledConcurrently) {
  constexpr int kVcpus = 4;
  constexpr int kFaults = 500;
  std::mutex mu;
  std::condition_variable cv;
  bool v0_inside = false, v0_release = false;
  std::atomic<int> served[kVcpus] = {};
  std::atomic<int> wrong_thread{0};
  std::vector<std::unique_ptr<Harness>> hs;

  auto handler = [&](int id, uint64_t gpa, uint64_t, uint64_t) -> absl::Status {
    if (hs[id]->vcpu->tid() != ::gettid()) wrong_thread.fetch_add(1);
    if (gpa != (uint64_t(id) << 32) + served[id].load() * 4096) wrong_thread.fetch_add(1000);
    if (id == 0) {
      std::unique_lock lock(mu);
      v0_inside = true;
      cv.notify_all();
      cv.wait(lock, [&] { return v0_release; });
    }
    served[id].fetch_add(1);
    return absl::OkStatus();
  };
  for (int id = 0; id < kVcpus; ++id) {
    std::vector<Step> script;
    int n = id == 0 ? 1 : kFaults;
    for (int i = 0; i < n; ++i) script.push_back(Fault((uint64_t(id) << 32) + i * 4096ULL));
    hs.push_back(std::make_unique<Harness>());
    hs.back()->Make(id, std::move(script), handler);
  }
  hs[0]->vcpu->Start();
  {
    std::unique_lock lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, std::chrono::seconds(60), [&] { return v0_inside; }));
  }
  for (int id = 1; id < kVcpus; ++id) hs[id]->vcpu->Start();
  for (int id = 1; id < kVcpus; ++id) {
    ASSERT_TRUE(hs[id]->box.Wait());
    EXPECT_EQ(hs[id]->box.stop->status, kExitOk) << hs[id]->box.stop->reason;
    EXPECT_EQ(served[id].load(), kFaults);
  }
  // vCPU 0 is still inside its fetch: nobody waited for it.
  EXPECT_EQ(served[0].load(), 0);
  EXPECT_FALSE(hs[0]->box.stop.has_value());
  {
    std::lock_guard lock(mu);
    v0_release = true;
    cv.notify_all();
  }
  ASSERT_TRUE(hs[0]->box.Wait());
  EXPECT_EQ(served[0].load(), 1);
  EXPECT_EQ(hs[0]->box.stop->status, kExitOk);
  EXPECT_EQ(wrong_thread.load(), 0);
  for (auto& h : hs) h->vcpu->Join();
}

// Pause/resume still works with a handler installed (immediate_exit path through the seam).
TEST(VcpuMemoryFaultTest, PauseWhileHandlerRunsParksAfterIt) {
  Harness h;
  std::mutex mu;
  std::condition_variable cv;
  bool inside = false, release = false;
  h.Make(0, {Fault(0x1000), Fault(0x2000)}, [&](int, uint64_t gpa, uint64_t, uint64_t) {
    if (gpa == 0x1000) {
      std::unique_lock lock(mu);
      inside = true;
      cv.notify_all();
      cv.wait(lock, [&] { return release; });
    }
    return absl::OkStatus();
  });
  h.vcpu->Start();
  {
    std::unique_lock lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, std::chrono::seconds(60), [&] { return inside; }));
  }
  h.vcpu->RequestPause();
  {
    std::lock_guard lock(mu);
    release = true;
    cv.notify_all();
  }
  h.vcpu->WaitPaused();
  EXPECT_FALSE(h.box.stop.has_value());
  EXPECT_EQ(h.source->runs(), 1);  // parked right after the handler, before re-entering
  h.vcpu->Resume();
  ASSERT_TRUE(h.box.Wait());
  h.vcpu->Join();
  EXPECT_EQ(h.box.stop->status, kExitOk) << h.box.stop->reason;
  EXPECT_EQ(h.source->runs(), 3);
}

}  // namespace
}  // namespace microvmm
