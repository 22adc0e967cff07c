#include "vmm/base/log.h"

#include <stdio.h>
#include <time.h>
#include <unistd.h>

#include <mutex>

namespace microvmm {
namespace {
std::atomic<int> g_level{static_cast<int>(LogLevel::kInfo)};
std::mutex g_mu;

int64_t NowMs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return int64_t{ts.tv_sec} * 1000 + ts.tv_nsec / 1000000;
}
}  // namespace

void SetLogLevel(LogLevel level) { g_level = static_cast<int>(level); }
LogLevel GetLogLevel() { return static_cast<LogLevel>(g_level.load()); }

void LogLine(LogLevel level, const char* file, int line, const std::string& msg) {
  static const char kTag[] = {'D', 'I', 'W', 'E'};
  timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  struct tm tm;
  gmtime_r(&ts.tv_sec, &tm);
  const char* base = file;
  for (const char* p = file; *p; ++p)
    if (*p == '/') base = p + 1;
  std::string out = absl::StrFormat("%c %02d:%02d:%02d.%06d %s:%d] %s\n",
                                    kTag[static_cast<int>(level)], tm.tm_hour, tm.tm_min,
                                    tm.tm_sec, ts.tv_nsec / 1000, base, line, msg);
  std::lock_guard<std::mutex> lock(g_mu);
  (void)!::write(STDERR_FILENO, out.data(), out.size());
}

bool RateLimiter::Allow(uint64_t* suppressed) {
  int64_t now = NowMs();
  int64_t last = last_ms_.load();
  if (now - last >= interval_ms_ && last_ms_.compare_exchange_strong(last, now)) {
    used_ = 0;
  }
  if (used_.fetch_add(1) < burst_) {
    *suppressed = dropped_.exchange(0);
    return true;
  }
  dropped_.fetch_add(1);
  return false;
}

}  // namespace microvmm
