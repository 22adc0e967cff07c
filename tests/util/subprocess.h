// Test helpers: run a binary from the test's runfiles as a child process with its output in
// files, wait with a timeout, and skip loudly when /dev/kvm is missing.
#ifndef MICROVMM_TESTS_UTIL_SUBPROCESS_H_
#define MICROVMM_TESTS_UTIL_SUBPROCESS_H_

#include <sys/types.h>

#include <optional>
#include <string>
#include <vector>

#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace microvmm::testing {

// Path of a runfile, e.g. Runfile("vmm/vmm").
std::string Runfile(const std::string& workspace_relative);

// A fresh short directory under /tmp (unix socket paths must be < 108 bytes), removed with its
// contents on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  const std::string& path() const { return path_; }
  std::string File(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

class Subprocess {
 public:
  // Starts `argv[0]` with stdout/stderr redirected to the given files (appended).
  Subprocess(std::vector<std::string> argv, const std::string& stdout_path,
             const std::string& stderr_path);
  ~Subprocess();  // kills (SIGKILL) if still running

  pid_t pid() const { return pid_; }
  // Exit status (WEXITSTATUS, or 128+signal), or nullopt on timeout.
  std::optional<int> Wait(absl::Duration timeout);
  void Signal(int sig);

 private:
  pid_t pid_ = -1;
  std::optional<int> status_;
};

std::string ReadFileOrEmpty(const std::string& path);
// Polls `path` until it contains `needle` (true) or the timeout passes (false).
bool WaitForFileContains(const std::string& path, const std::string& needle,
                         absl::Duration timeout);
int CountOccurrences(const std::string& haystack, const std::string& needle);

// A TCP port on 127.0.0.1 that was free a moment ago (-1 on error).
int FreeLoopbackPort();

// The memwalk test guest prints "memwalk gen=N ok" per verified generation: the highest N in
// `log` (0 if none), and a poll of the file at `path` until it reaches `gen`.
int MaxGeneration(const std::string& log);
bool WaitForGeneration(const std::string& path, int gen, absl::Duration timeout);

// True if /dev/kvm can be opened read-write.
bool KvmAvailable();

}  // namespace microvmm::testing

// Skips the current test when /dev/kvm is unusable, saying so loudly on stderr too.
#define REQUIRE_KVM()                                                                  \
  do {                                                                                 \
    if (!::microvmm::testing::KvmAvailable()) {                                        \
      fprintf(stderr, "\n*** KVM UNAVAILABLE: /dev/kvm cannot be opened; this KVM test " \
                      "did NOT run ***\n");                                            \
      GTEST_SKIP() << "KVM UNAVAILABLE: /dev/kvm cannot be opened; this KVM test did NOT run"; \
    }                                                                                  \
  } while (0)

#endif  // MICROVMM_TESTS_UTIL_SUBPROCESS_H_
