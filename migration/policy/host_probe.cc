#include "migration/policy/host_probe.h"

#include <cerrno>
#include <fstream>
#include <sstream>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "vmm/base/status.h"

namespace microvmm::migration {

absl::StatusOr<std::string> HostProbe::ReadProcFile(const std::string& path) {
  std::ifstream f(path);
  if (!f) return ErrnoStatus(errno, "open " + path);
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

absl::StatusOr<ProcStatCpu> ParseProcStat(const std::string& text) {
  ProcStatCpu out;
  bool have_total = false;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    if (!absl::ConsumePrefix(&line, "cpu")) continue;
    if (!line.empty() && line[0] != ' ') {  // "cpuN ..."
      ++out.cpus;
      continue;
    }
    // "cpu  user nice system idle iowait irq softirq steal guest guest_nice"
    std::vector<absl::string_view> f = absl::StrSplit(line, ' ', absl::SkipEmpty());
    if (f.size() < 4) return absl::InvalidArgumentError("/proc/stat: short cpu line");
    uint64_t v[8] = {};
    for (size_t i = 0; i < 8 && i < f.size(); ++i) {
      if (!absl::SimpleAtoi(f[i], &v[i])) {
        return absl::InvalidArgumentError("/proc/stat: bad number in cpu line");
      }
    }
    out.idle = v[3] + v[4];
    for (uint64_t x : v) out.total += x;  // guest/guest_nice (fields 9, 10) are in user/nice
    have_total = true;
  }
  if (!have_total || out.cpus == 0) return absl::InvalidArgumentError("/proc/stat: no cpu lines");
  return out;
}

absl::StatusOr<double> HostProbe::IdleCores() {
  absl::StatusOr<std::string> text = reader_("/proc/stat");
  if (!text.ok()) return text.status();
  absl::StatusOr<ProcStatCpu> now = ParseProcStat(*text);
  if (!now.ok()) return now.status();
  ProcStatCpu delta = *now;
  if (last_) {
    if (now->total < last_->total || now->idle < last_->idle) {
      return absl::InternalError("/proc/stat: counters went backwards");
    }
    delta.total -= last_->total;
    delta.idle -= last_->idle;
  }
  last_ = *now;
  if (delta.total == 0) return last_idle_cores_;
  last_idle_cores_ = double(delta.idle) / double(delta.total) * now->cpus;
  return last_idle_cores_;
}

absl::StatusOr<uint64_t> HostProbe::FreeMemoryBytes() {
  absl::StatusOr<std::string> text = reader_("/proc/meminfo");
  if (!text.ok()) return text.status();
  return ParseMemAvailable(*text);
}

}  // namespace microvmm::migration
