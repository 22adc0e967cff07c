// The plain (non-libFuzzer) build of a fuzz target: runs every input file once (a regression
// corpus in CI). Files and directories (searched recursively) are given on the command line.
//   int main(int argc, char** argv) { return RunFuzzInputs(argc, argv, "name", Fn); }
#ifndef MICROVMM_VMM_BASE_FUZZ_MAIN_H_
#define MICROVMM_VMM_BASE_FUZZ_MAIN_H_

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <vector>

// An invariant of a fuzz target: on failure, name the target, file, line and condition, then
// abort (libFuzzer records the input). Each target defines
//   #define FUZZ_CHECK(cond) MVMM_FUZZ_CHECK("name", cond)
#define MVMM_FUZZ_CHECK(name, cond)                                                        \
  do {                                                                                     \
    if (!(cond)) {                                                                         \
      std::fprintf(stderr, "%s: invariant failed at %s:%d: %s\n", name, __FILE__, __LINE__, \
                   #cond);                                                                 \
      std::abort();                                                                        \
    }                                                                                      \
  } while (0)

namespace microvmm {

// Returns main's exit status: 0 if every input ran (a failing check aborts the process), 1 if a
// file could not be read, 2 without inputs.
inline int RunFuzzInputs(int argc, char** argv, const char* name,
                         int (*fn)(const uint8_t* data, size_t size)) {
  std::vector<std::filesystem::path> files;
  for (int i = 1; i < argc; ++i) {
    std::filesystem::path p(argv[i]);
    if (std::filesystem::is_directory(p)) {
      for (const auto& e : std::filesystem::recursive_directory_iterator(p))
        if (e.is_regular_file()) files.push_back(e.path());
    } else {
      files.push_back(p);
    }
  }
  if (files.empty()) {
    std::fprintf(stderr, "usage: %s FILE_OR_DIR...  (runs each input once)\n", argv[0]);
    return 2;
  }
  for (const auto& f : files) {
    std::ifstream in(f, std::ios::binary);
    if (!in) {
      std::fprintf(stderr, "%s: cannot read %s\n", name, f.c_str());
      return 1;
    }
    std::vector<uint8_t> bytes((std::istreambuf_iterator<char>(in)),
                               std::istreambuf_iterator<char>());
    fn(bytes.data(), bytes.size());
  }
  std::printf("%s: %zu inputs ran cleanly\n", name, files.size());
  return 0;
}

}  // namespace microvmm

#endif  // MICROVMM_VMM_BASE_FUZZ_MAIN_H_
