#include "vmm/throttle.h"

#include <algorithm>

#include "absl/strings/str_format.h"
#include "vmm/base/log.h"

namespace microvmm {
namespace {
// The timer thread never re-checks sooner than this (CPU-time deadlines can only be later in
// wall time, so this just bounds its wake-up rate when a vCPU is nearly due).
constexpr std::chrono::nanoseconds kMinTick{50'000};
}  // namespace

std::chrono::nanoseconds VcpuThrottle::Quantum(int percent, const ThrottleOptions& o) {
  if (percent <= 0) return o.slice;
  // Sleep per quantum = quantum x P/(100-P) <= max_sleep.
  auto q = o.max_sleep * (100 - percent) / percent;
  return std::clamp(q, o.min_run, o.slice);
}

absl::StatusOr<std::unique_ptr<VcpuThrottle>> VcpuThrottle::Create(std::vector<Vcpu*> vcpus,
                                                                   ThrottleOptions options) {
  if (options.max_percent < 1 || options.max_percent > 99)
    return absl::InvalidArgumentError(
        absl::StrFormat("throttle max_percent must be 1..99, got %d", options.max_percent));
  if (options.slice.count() <= 0 || options.max_sleep.count() <= 0 ||
      options.min_run.count() <= 0 || options.min_run > options.slice)
    return absl::InvalidArgumentError(
        "throttle slice, max_sleep and min_run must be positive, min_run <= slice");
  for (Vcpu* v : vcpus)
    if (v == nullptr) return absl::InvalidArgumentError("throttle: null vCPU");
  return std::unique_ptr<VcpuThrottle>(new VcpuThrottle(std::move(vcpus), options));
}

VcpuThrottle::VcpuThrottle(std::vector<Vcpu*> vcpus, ThrottleOptions options)
    : vcpus_(std::move(vcpus)), options_(options) {
  timer_ = std::thread([this] { TimerLoop(); });
}

VcpuThrottle::~VcpuThrottle() {
  (void)SetPercent(0);
  {
    std::lock_guard lock(mu_);
    stop_ = true;
    cv_.notify_all();
  }
  timer_.join();
}

absl::StatusOr<int> VcpuThrottle::SetPercent(int percent) {
  if (percent < 0 || percent > 99)
    return absl::InvalidArgumentError(
        absl::StrFormat("throttle percent must be 0..99, got %d", percent));
  const int applied = std::min(percent, options_.max_percent);
  std::lock_guard lock(mu_);
  if (applied == percent_) return applied;
  const int64_t quantum = Quantum(applied, options_).count();
  for (Vcpu* v : vcpus_) v->SetThrottle(applied, quantum, options_.max_sleep.count());
  LOG_INFO("vCPU throttle %d%% -> %d%%%s", percent_, applied,
           applied != percent ? absl::StrFormat(" (capped from %d%%)", percent) : "");
  percent_ = applied;
  changed_ = true;
  cv_.notify_all();
  return applied;
}

int VcpuThrottle::percent() const {
  std::lock_guard lock(mu_);
  return percent_;
}

VcpuThrottle::Stats VcpuThrottle::stats() const {
  Stats s;
  s.percent = percent();
  for (Vcpu* v : vcpus_) s.vcpus.push_back(v->throttle_stats());
  return s;
}

void VcpuThrottle::TimerLoop() {
  std::unique_lock lock(mu_);
  while (!stop_) {
    if (percent_ == 0) {
      cv_.wait(lock, [this] { return stop_ || percent_ != 0; });
      continue;
    }
    changed_ = false;
    lock.unlock();
    // Kick whoever is due; sleep until the earliest vCPU can next be due.
    std::chrono::nanoseconds wait = options_.slice;
    for (Vcpu* v : vcpus_) {
      int64_t next = v->ThrottleTick();
      if (next >= 0) wait = std::min(wait, std::chrono::nanoseconds(next));
    }
    wait = std::max(wait, kMinTick);
    lock.lock();
    cv_.wait_for(lock, wait, [this] { return stop_ || changed_; });
  }
}

}  // namespace microvmm
