// Minimal logger: timestamped lines on stderr, formatted with absl::StrFormat.
// Abseil 20220623 has no absl/log, so the project carries this one.
#ifndef MICROVMM_VMM_BASE_LOG_H_
#define MICROVMM_VMM_BASE_LOG_H_

#include <atomic>
#include <cstdint>
#include <string>

#include "absl/strings/str_format.h"

namespace microvmm {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2, kError = 3 };

void SetLogLevel(LogLevel level);
LogLevel GetLogLevel();
void LogLine(LogLevel level, const char* file, int line, const std::string& msg);

// Allows `burst` messages, then one per `interval_ms`; counts what it suppressed.
class RateLimiter {
 public:
  RateLimiter(int burst, int64_t interval_ms) : burst_(burst), interval_ms_(interval_ms) {}
  // True if a message may be logged now; `suppressed` receives the number dropped since.
  bool Allow(uint64_t* suppressed);

 private:
  const int burst_;
  const int64_t interval_ms_;
  std::atomic<int> used_{0};
  std::atomic<int64_t> last_ms_{0};
  std::atomic<uint64_t> dropped_{0};
};

}  // namespace microvmm

#define MVMM_LOG(level, ...)                                                     \
  do {                                                                            \
    if (static_cast<int>(level) >= static_cast<int>(::microvmm::GetLogLevel())) { \
      ::microvmm::LogLine(level, __FILE__, __LINE__, absl::StrFormat(__VA_ARGS__)); \
    }                                                                             \
  } while (0)
#define LOG_DEBUG(...) MVMM_LOG(::microvmm::LogLevel::kDebug, __VA_ARGS__)
#define LOG_INFO(...) MVMM_LOG(::microvmm::LogLevel::kInfo, __VA_ARGS__)
#define LOG_WARN(...) MVMM_LOG(::microvmm::LogLevel::kWarning, __VA_ARGS__)
#define LOG_ERROR(...) MVMM_LOG(::microvmm::LogLevel::kError, __VA_ARGS__)

// Rate-limited warning for guest-triggerable conditions (one limiter per call site).
#define LOG_WARN_RATELIMITED(...)                                              \
  do {                                                                         \
    static ::microvmm::RateLimiter _mvmm_rl(10, 1000);                         \
    uint64_t _mvmm_dropped = 0;                                                \
    if (_mvmm_rl.Allow(&_mvmm_dropped)) {                                      \
      if (_mvmm_dropped) LOG_WARN("(%d similar messages suppressed)", _mvmm_dropped); \
      LOG_WARN(__VA_ARGS__);                                                   \
    }                                                                          \
  } while (0)

#endif  // MICROVMM_VMM_BASE_LOG_H_
