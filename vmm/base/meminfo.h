// /proc/meminfo: the host's available memory (MemAvailable), for bounding caches.
#ifndef MICROVMM_VMM_BASE_MEMINFO_H_
#define MICROVMM_VMM_BASE_MEMINFO_H_

#include <cstdint>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace microvmm {

// Bytes of MemAvailable in the text of /proc/meminfo. Strict: exactly one "MemAvailable: <n> kB"
// line with a decimal number that fits in bytes, else INVALID_ARGUMENT naming what is wrong.
absl::StatusOr<uint64_t> ParseMemAvailable(absl::string_view meminfo);

}  // namespace microvmm

#endif  // MICROVMM_VMM_BASE_MEMINFO_H_
