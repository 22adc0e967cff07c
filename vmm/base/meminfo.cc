#include "vmm/base/meminfo.h"

#include <limits>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"

namespace microvmm {

absl::StatusOr<uint64_t> ParseMemAvailable(absl::string_view meminfo) {
  bool found = false;
  uint64_t kib = 0;
  for (absl::string_view line : absl::StrSplit(meminfo, '\n')) {
    if (!absl::ConsumePrefix(&line, "MemAvailable:")) continue;
    if (found) return absl::InvalidArgumentError("meminfo: MemAvailable appears twice");
    found = true;
    std::vector<absl::string_view> f =
        absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    if (f.size() != 2 || f[1] != "kB") {
      return absl::InvalidArgumentError(
          absl::StrFormat("meminfo: MemAvailable line is not '<number> kB': '%s'", line));
    }
    kib = 0;
    constexpr uint64_t kLimit = std::numeric_limits<uint64_t>::max() / 1024;  // bytes fit
    for (char c : f[0]) {
      const uint64_t d = static_cast<uint64_t>(c - '0');
      if (!absl::ascii_isdigit(static_cast<unsigned char>(c)) || kib > (kLimit - d) / 10) {
        return absl::InvalidArgumentError(
            absl::StrFormat("meminfo: bad MemAvailable value '%s'", f[0]));
      }
      kib = kib * 10 + d;
    }
  }
  if (!found) return absl::InvalidArgumentError("meminfo: no MemAvailable line");
  return kib * 1024;
}

}  // namespace microvmm
