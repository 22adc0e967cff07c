// Host-side inputs of the migration policy: idle host cores (from /proc/stat deltas) and free
// host memory (MemAvailable from /proc/meminfo). The file reader is injectable for tests.
#ifndef MICROVMM_MIGRATION_POLICY_HOST_PROBE_H_
#define MICROVMM_MIGRATION_POLICY_HOST_PROBE_H_

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <utility>

#include "absl/status/statusor.h"
#include "vmm/base/meminfo.h"

namespace microvmm::migration {

// Parsers, exposed for tests.
struct ProcStatCpu {
  uint64_t idle = 0;   // idle + iowait jiffies
  uint64_t total = 0;  // user..steal jiffies (guest time is already inside user/nice)
  int cpus = 0;        // "cpuN" lines
};
absl::StatusOr<ProcStatCpu> ParseProcStat(const std::string& text);

class HostProbe {
 public:
  // Returns the whole content of a file such as "/proc/stat".
  using Reader = std::function<absl::StatusOr<std::string>(const std::string& path)>;
  static absl::StatusOr<std::string> ReadProcFile(const std::string& path);

  explicit HostProbe(Reader reader = ReadProcFile) : reader_(std::move(reader)) {}

  // Idle CPUs (idle + iowait share of all CPU time, times the number of CPUs) since the
  // previous call. The first call has no previous sample and averages since boot. When no
  // time passed between two calls (same counters) it returns the previous value.
  absl::StatusOr<double> IdleCores();
  // MemAvailable in bytes.
  absl::StatusOr<uint64_t> FreeMemoryBytes();

 private:
  Reader reader_;
  std::optional<ProcStatCpu> last_;
  double last_idle_cores_ = 0;
};


}  // namespace microvmm::migration

#endif  // MICROVMM_MIGRATION_POLICY_HOST_PROBE_H_
