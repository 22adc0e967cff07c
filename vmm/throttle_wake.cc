#include "vmm/throttle_wake.h"

#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <climits>

namespace microvmm {
namespace {
std::atomic<uint32_t> g_irq_generation{0};
std::atomic<uint32_t> g_wake_word{0};  // the futex word
std::atomic<int> g_sleepers{0};
static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t) &&
              std::atomic<uint32_t>::is_always_lock_free);

uint32_t* FutexWord() { return reinterpret_cast<uint32_t*>(&g_wake_word); }

void BumpAndWake() {
  // seq_cst pairs with Wait(): either we see the sleeper counted, or its futex value check (made
  // after it counted itself) sees the bumped word and it does not block.
  g_wake_word.fetch_add(1, std::memory_order_seq_cst);
  if (g_sleepers.load(std::memory_order_seq_cst) > 0)
    ::syscall(SYS_futex, FutexWord(), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
}
}  // namespace

void NoteInterruptRaised() {
  g_irq_generation.fetch_add(1, std::memory_order_seq_cst);
  BumpAndWake();
}

namespace throttle_wake {

uint32_t InterruptGeneration() { return g_irq_generation.load(std::memory_order_seq_cst); }
uint32_t WakeWord() { return g_wake_word.load(std::memory_order_seq_cst); }
void WakeAll() { BumpAndWake(); }

void Wait(uint32_t seen, int64_t timeout_ns) {
  if (timeout_ns <= 0) return;
  timespec ts{static_cast<time_t>(timeout_ns / 1000000000),
              static_cast<long>(timeout_ns % 1000000000)};
  g_sleepers.fetch_add(1, std::memory_order_seq_cst);
  // Relative timeout; EINTR/EAGAIN/ETIMEDOUT all just return: the caller re-checks.
  ::syscall(SYS_futex, FutexWord(), FUTEX_WAIT_PRIVATE, seen, &ts, nullptr, 0);
  g_sleepers.fetch_sub(1, std::memory_order_seq_cst);
}

}  // namespace throttle_wake
}  // namespace microvmm
