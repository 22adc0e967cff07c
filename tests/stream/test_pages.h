// Deterministic page contents shared by the stream tests.
#ifndef MICROVMM_TESTS_STREAM_TEST_PAGES_H_
#define MICROVMM_TESTS_STREAM_TEST_PAGES_H_

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "vmm/memory/guest_memory.h"

namespace microvmm::migration::testing {

enum class Kind { kZero, kRandom, kText, kSparse, kPattern };
inline constexpr Kind kAllKinds[] = {Kind::kZero, Kind::kRandom, Kind::kText, Kind::kSparse,
                                     Kind::kPattern};

inline const char* KindName(Kind k) {
  switch (k) {
    case Kind::kZero: return "zero";
    case Kind::kRandom: return "random";
    case Kind::kText: return "text";
    case Kind::kSparse: return "sparse";
    case Kind::kPattern: return "pattern";
  }
  return "?";
}

inline std::vector<uint8_t> MakePage(Kind k, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> p(kPageSize, 0);
  switch (k) {
    case Kind::kZero:
      break;
    case Kind::kRandom:
      for (auto& b : p) b = static_cast<uint8_t>(rng());
      break;
    case Kind::kText: {
      static const char* kWords[] = {"guest ", "memory ", "page ", "dirty ", "migrate\n", "the ",
                                     "kvm ", "vcpu ", "= 0x", "ffff ", "\t"};
      std::string s;
      while (s.size() < kPageSize) s += kWords[rng() % 11];
      std::copy(s.begin(), s.begin() + kPageSize, p.begin());
      break;
    }
    case Kind::kSparse:
      for (int i = 0; i < 4; ++i) p[rng() % kPageSize] = static_cast<uint8_t>(1 + rng() % 255);
      p[kPageSize - 1] = 0x5a;  // non-zero at the very end
      break;
    case Kind::kPattern:
      for (size_t i = 0; i < kPageSize; ++i) p[i] = static_cast<uint8_t>(i * 7 + seed);
      break;
  }
  return p;
}

}  // namespace microvmm::migration::testing

#endif  // MICROVMM_TESTS_STREAM_TEST_PAGES_H_
