// Status helpers shared by every module.
#ifndef MICROVMM_VMM_BASE_STATUS_H_
#define MICROVMM_VMM_BASE_STATUS_H_

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace microvmm {

// errno-carrying status: "<what>: <strerror>" with a code derived from errno.
absl::Status ErrnoStatus(int err, absl::string_view what);

}  // namespace microvmm

#endif  // MICROVMM_VMM_BASE_STATUS_H_
