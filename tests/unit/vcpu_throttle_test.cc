// VcpuThrottle + the vCPU loop's throttle sleeps, driven through the ExitSource seam by a fake
// "computing guest" (Run() burns CPU until the vCPU is kicked, like KVM_RUN on a guest loop that
// never exits). No /dev/kvm. Assertions use counters; the only time bounds are hang guards (and
// lower bounds that hold by construction: a sleep never ends before its deadline unless woken).
#include <errno.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <thread>

#include "gtest/gtest.h"
#include "vmm/bus.h"
#include "vmm/throttle.h"
#include "vmm/throttle_wake.h"
#include "vmm/vcpu.h"

namespace microvmm {
namespace {

using std::chrono::milliseconds;
using std::chrono::nanoseconds;
using std::chrono::seconds;

// Burns CPU until run()->immediate_exit is set (Kick), then returns -EINTR, like KVM_RUN.
class SpinSource : public ExitSource {
 public:
  int Run() override {
    if (Ie()) return -EINTR;  // the pause path's completion run, or a kick before entry
    runs_.fetch_add(1);
    while (!Ie()) {
    }
    return -EINTR;
  }
  kvm_run* run() override { return reinterpret_cast<kvm_run*>(page_); }
  absl::StatusOr<kvm_regs> GetRegs() override { return kvm_regs{}; }
  absl::StatusOr<kvm_sregs> GetSregs() override { return kvm_sregs{}; }
  uint64_t runs() const { return runs_.load(); }

 protected:
  bool Ie() { return __atomic_load_n(&run()->immediate_exit, __ATOMIC_ACQUIRE) != 0; }
  alignas(64) uint8_t page_[4096] = {};
  std::atomic<uint64_t> runs_{0};
};

// A guest halted inside KVM_RUN (in-kernel LAPIC): Run() blocks without burning CPU until kicked.
class HaltSource : public SpinSource {
 public:
  int Run() override {
    if (Ie()) return -EINTR;
    runs_.fetch_add(1);
    while (!Ie()) std::this_thread::sleep_for(std::chrono::microseconds(200));
    return -EINTR;
  }
};

// Polls `cond` until true or `limit` (a hang guard, not a timing assertion).
bool WaitFor(const std::function<bool()>& cond, seconds limit = seconds(20)) {
  auto end = std::chrono::steady_clock::now() + limit;
  while (!cond()) {
    if (std::chrono::steady_clock::now() > end) return false;
    std::this_thread::sleep_for(milliseconds(1));
  }
  return true;
}

struct Harness {
  Bus pio{"pio"};
  Bus mmio{"mmio"};
  SpinSource* source = nullptr;
  std::unique_ptr<Vcpu> vcpu;
  std::unique_ptr<VcpuThrottle> throttle;  // destroyed first

  explicit Harness(ThrottleOptions o, bool halted_guest = false) {
    auto src = halted_guest ? std::make_unique<HaltSource>() : std::make_unique<SpinSource>();
    source = src.get();
    vcpu = std::make_unique<Vcpu>(0, std::move(src), &pio, &mmio, [](const VcpuStop&) {});
    auto t = VcpuThrottle::Create({vcpu.get()}, o);
    EXPECT_TRUE(t.ok()) << t.status();
    throttle = std::move(*t);
  }
  ~Harness() {
    throttle.reset();
    vcpu.reset();
  }
  Vcpu::ThrottleStats stats() { return vcpu->throttle_stats(); }
};

// Options under which one sleep at 99% lasts ~29.7 s (300 ms quantum x 99): longer than every
// hang guard below, so a missing wake-up fails the test instead of passing late.
ThrottleOptions LongSleepOptions() {
  ThrottleOptions o;
  o.max_percent = 99;
  o.slice = milliseconds(300);
  o.max_sleep = seconds(60);
  o.min_run = milliseconds(1);
  return o;
}

// Starts the vCPU at 99% and waits until it is inside its first (long) throttle sleep.
void EnterLongSleep(Harness& h) {
  h.vcpu->Start();
  ASSERT_EQ(*h.throttle->SetPercent(99), 99);
  ASSERT_TRUE(WaitFor([&] { return h.stats().sleeping; }, seconds(60)));
  ASSERT_EQ(h.stats().sleeps, 1u);
}

TEST(ThrottleMathTest, SleepIsProportionalCappedAndOwed) {
  constexpr int64_t ms = 1'000'000;
  auto p = PlanThrottleSleep(50, 2 * ms, 0, 4 * ms);
  EXPECT_EQ(p.sleep_ns, 2 * ms);
  EXPECT_EQ(p.debt_ns, 0);
  p = PlanThrottleSleep(80, 1 * ms, 0, 4 * ms);  // 80/20 x 1 ms
  EXPECT_EQ(p.sleep_ns, 4 * ms);
  EXPECT_EQ(p.debt_ns, 0);
  p = PlanThrottleSleep(50, 10 * ms, 0, 4 * ms);  // 10 ms owed: 4 now, 4 owed, 2 forgiven
  EXPECT_EQ(p.sleep_ns, 4 * ms);
  EXPECT_EQ(p.debt_ns, 4 * ms);
  p = PlanThrottleSleep(50, 1 * ms, 2 * ms, 4 * ms);  // debt is paid
  EXPECT_EQ(p.sleep_ns, 3 * ms);
  EXPECT_EQ(p.debt_ns, 0);
  p = PlanThrottleSleep(0, 10 * ms, 3 * ms, 4 * ms);  // released: nothing
  EXPECT_EQ(p.sleep_ns, 0);
  EXPECT_EQ(p.debt_ns, 0);
  p = PlanThrottleSleep(99, INT64_MAX, INT64_MAX, 4 * ms);  // no overflow
  EXPECT_EQ(p.sleep_ns, 4 * ms);
  EXPECT_EQ(p.debt_ns, 4 * ms);
}

TEST(ThrottleMathTest, QuantumShrinksWithPercentWithinBounds) {
  ThrottleOptions o;  // slice 10 ms, max_sleep 10 ms, min_run 250 us
  EXPECT_EQ(VcpuThrottle::Quantum(50, o), milliseconds(10));
  EXPECT_EQ(VcpuThrottle::Quantum(80, o), std::chrono::microseconds(2500));
  EXPECT_EQ(VcpuThrottle::Quantum(90, o), std::chrono::nanoseconds(1'111'111));
  EXPECT_EQ(VcpuThrottle::Quantum(10, o), milliseconds(10));          // capped by slice
  EXPECT_EQ(VcpuThrottle::Quantum(99, o), std::chrono::microseconds(250));  // min_run
}

TEST(VcpuThrottleTest, InvalidOptionsAndPercentAreClearErrors) {
  ThrottleOptions o;
  o.max_percent = 100;
  auto t = VcpuThrottle::Create({}, o);
  ASSERT_FALSE(t.ok());
  EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(t.status().message().find("max_percent"), absl::string_view::npos) << t.status();
  o.max_percent = 50;
  o.min_run = seconds(1);  // > slice
  EXPECT_EQ(VcpuThrottle::Create({}, o).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(VcpuThrottle::Create({nullptr}).status().code(), absl::StatusCode::kInvalidArgument);

  Harness h(ThrottleOptions{});
  ASSERT_EQ(*h.throttle->SetPercent(30), 30);
  for (int bad : {-1, 100, 1000}) {
    auto r = h.throttle->SetPercent(bad);
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(r.status().message().find("0..99"), absl::string_view::npos) << r.status();
    EXPECT_EQ(h.throttle->percent(), 30) << "a bad value must change nothing";
  }
}

TEST(VcpuThrottleTest, PercentIsCappedByMaxPercent) {
  ThrottleOptions o;
  o.max_percent = 40;
  Harness h(o);
  auto r = h.throttle->SetPercent(80);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, 40);
  EXPECT_EQ(h.throttle->percent(), 40);
  EXPECT_EQ(h.throttle->stats().percent, 40);
  EXPECT_EQ(*h.throttle->SetPercent(99), 40);
  EXPECT_EQ(*h.throttle->SetPercent(25), 25);
  EXPECT_EQ(*h.throttle->SetPercent(0), 0);
}

// At 50% with a 10 ms quantum and 10 ms max sleep, the vCPU alternates: ~10 ms in Run() (until
// the timer thread kicks it), then a 10 ms sleep outside Run().
TEST(VcpuThrottleTest, At50PercentVcpuSleepsOutsideRunBetweenRuns) {
  ThrottleOptions o;
  o.slice = milliseconds(10);
  o.max_sleep = milliseconds(10);
  o.min_run = milliseconds(1);
  Harness h(o);
  h.vcpu->Start();
  ASSERT_TRUE(WaitFor([&] { return h.source->runs() >= 1; }));
  EXPECT_EQ(h.stats().sleeps, 0u) << "unthrottled: no sleeps";
  ASSERT_EQ(*h.throttle->SetPercent(50), 50);
  ASSERT_TRUE(WaitFor([&] { return h.stats().sleeps >= 10; }, seconds(60)));
  Vcpu::ThrottleStats s = h.stats();
  const uint64_t runs = h.source->runs();
  // Every sleep follows >= 10 ms of run time at 1:1, capped at 10 ms: each completed one lasted
  // >= 10 ms (only an interrupt could end it early, and none is raised here).
  EXPECT_GE(s.throttled_ns, (s.sleeps - 1) * 10'000'000ull);
  EXPECT_EQ(s.irq_wakeups, 0u);
  // Run() was re-entered between sleeps, and not spinning on spurious kicks.
  EXPECT_GE(runs, s.sleeps);
  EXPECT_LE(runs, 2 * s.sleeps + 4);
  EXPECT_EQ(h.throttle->stats().vcpus.size(), 1u);
  EXPECT_EQ(h.throttle->stats().vcpus[0].sleeps >= s.sleeps, true);

  // Released: the vCPU stays in Run() (nobody kicks it) and sleeps no more.
  ASSERT_EQ(*h.throttle->SetPercent(0), 0);
  ASSERT_TRUE(WaitFor([&] { return !h.stats().sleeping; }));
  const uint64_t sleeps_after = h.stats().sleeps;
  std::this_thread::sleep_for(milliseconds(100));
  EXPECT_EQ(h.stats().sleeps, sleeps_after);
}

// An idle guest (halted inside KVM_RUN) burns no CPU: it is neither kicked nor made to sleep,
// although its wall-clock run phase is 10x the quantum.
TEST(VcpuThrottleTest, IdleVcpuIsNotThrottled) {
  ThrottleOptions o;
  o.slice = milliseconds(10);
  o.max_sleep = milliseconds(10);
  o.min_run = milliseconds(1);
  Harness h(o, /*halted_guest=*/true);
  h.vcpu->Start();
  ASSERT_EQ(*h.throttle->SetPercent(50), 50);
  ASSERT_TRUE(WaitFor([&] { return h.source->runs() >= 1; }));
  std::this_thread::sleep_for(milliseconds(100));
  const uint64_t runs = h.source->runs();
  EXPECT_EQ(h.stats().sleeps, 0u);
  EXPECT_LE(runs, 3u) << "idle vCPU kicked repeatedly";
}

TEST(VcpuThrottleTest, InterruptEndsLongSleepAtOnce) {
  Harness h(LongSleepOptions());
  ASSERT_NO_FATAL_FAILURE(EnterLongSleep(h));
  const uint64_t runs = h.source->runs();
  NoteInterruptRaised();
  // The sleep has ~29 s left: only the wake-up can satisfy this within the guard.
  ASSERT_TRUE(WaitFor([&] { return h.source->runs() > runs; }))
      << "vCPU did not re-enter Run() after an interrupt";
  // Counted as cut short by an interrupt (a sleep that ran out would not count).
  EXPECT_EQ(h.stats().irq_wakeups, 1u);
}

TEST(VcpuThrottleTest, ReleaseWakesSleeper) {
  Harness h(LongSleepOptions());
  ASSERT_NO_FATAL_FAILURE(EnterLongSleep(h));
  const uint64_t runs = h.source->runs();
  ASSERT_EQ(*h.throttle->SetPercent(0), 0);
  ASSERT_TRUE(WaitFor([&] { return h.source->runs() > runs; }))
      << "vCPU did not re-enter Run() after release";
  Vcpu::ThrottleStats s = h.stats();
  EXPECT_FALSE(s.sleeping);
  EXPECT_EQ(s.irq_wakeups, 0u);
  EXPECT_EQ(h.throttle->percent(), 0);
}

TEST(VcpuThrottleTest, PauseAndStopWhileSleeping) {
  Harness h(LongSleepOptions());
  ASSERT_NO_FATAL_FAILURE(EnterLongSleep(h));
  h.vcpu->RequestPause();
  ASSERT_TRUE(h.vcpu->WaitPausedFor(milliseconds(20000))) << "sleeping vCPU did not park";
  EXPECT_FALSE(h.stats().sleeping);
  const uint64_t runs = h.source->runs();
  h.vcpu->Resume();
  ASSERT_TRUE(WaitFor([&] { return h.source->runs() > runs; }));
  // Still throttled after resume: it sleeps again after its next quantum.
  ASSERT_TRUE(WaitFor([&] { return h.stats().sleeping && h.stats().sleeps == 2; }, seconds(60)));
  h.vcpu->RequestStop();
  ASSERT_TRUE(h.vcpu->WaitPausedFor(milliseconds(20000))) << "sleeping vCPU did not stop";
  h.vcpu->Join();
  EXPECT_EQ(h.stats().irq_wakeups, 0u);
}

}  // namespace
}  // namespace microvmm
