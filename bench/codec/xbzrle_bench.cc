// XBZRLE delta benchmark (migration/stream/xbzrle.h): delta size and single-thread encode /
// apply throughput for 4 KiB pages with a given fraction of changed bytes. Prints one JSON
// document (bench/results/xbzrle.json).
//
//   bazel run -c opt //bench/codec:xbzrle_bench -- [--pages N] [--min-seconds S] > bench/results/xbzrle.json
//
// Each case is a set of N (old, new) page pairs (default 2048 pairs = 16 MiB, larger than the
// L2 cache, like a real sender walking guest RAM). Old pages are random bytes; every changed
// byte really differs (xor with a non-zero value). Change patterns:
//   scattered  each byte changed independently with probability f (worst case for run count)
//   words      aligned 8-byte words changed (whole word), count chosen so ~f of bytes change —
//              closer to what a CPU's stores produce
// Throughput is page bytes (4096 per page) per second. Encoding uses max_out = the all-changed
// size so every delta is produced in full (a sender with a smaller max_out stops earlier).
// "apply" applies the delta in place to a page (the destination's work).
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "migration/stream/xbzrle.h"

namespace {

using microvmm::migration::XbzrleApply;
using microvmm::migration::XbzrleEncode;
using microvmm::migration::XbzrleMaxDeltaSize;

constexpr size_t kPage = 4096;
using Clock = std::chrono::steady_clock;

struct Case {
  std::vector<uint8_t> old_pages, new_pages;  // N pages each, contiguous
  double changed_fraction = 0;                // measured
};

Case MakeCase(size_t pages, double f, bool words, uint64_t seed) {
  std::mt19937_64 rng(seed);
  Case c;
  c.old_pages.resize(pages * kPage);
  for (size_t i = 0; i < c.old_pages.size(); i += 8) {
    uint64_t v = rng();
    std::memcpy(&c.old_pages[i], &v, 8);
  }
  c.new_pages = c.old_pages;
  std::uniform_real_distribution<double> u(0, 1);
  size_t changed = 0;
  for (size_t p = 0; p < pages; ++p) {
    uint8_t* page = &c.new_pages[p * kPage];
    if (words) {
      for (size_t w = 0; w < kPage / 8; ++w) {
        if (u(rng) < f) {
          for (size_t i = 0; i < 8; ++i) page[w * 8 + i] ^= static_cast<uint8_t>(1 + rng() % 255);
          changed += 8;
        }
      }
    } else {
      for (size_t i = 0; i < kPage; ++i) {
        if (u(rng) < f) {
          page[i] ^= static_cast<uint8_t>(1 + rng() % 255);
          ++changed;
        }
      }
    }
  }
  c.changed_fraction = static_cast<double>(changed) / static_cast<double>(pages * kPage);
  return c;
}

template <typename F>
double MBps(size_t pages, double min_seconds, F&& one_pass) {
  size_t passes = 0;
  const auto t0 = Clock::now();
  double secs = 0;
  do {
    one_pass();
    ++passes;
    secs = std::chrono::duration<double>(Clock::now() - t0).count();
  } while (secs < min_seconds);
  return static_cast<double>(passes * pages * kPage) / secs / 1e6;
}

}  // namespace

int main(int argc, char** argv) {
  size_t pages = 2048;
  double min_seconds = 0.5;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--pages")) pages = std::strtoul(argv[i + 1], nullptr, 10);
    else if (!std::strcmp(argv[i], "--min-seconds")) min_seconds = std::strtod(argv[i + 1], nullptr);
  }
  const double fractions[] = {0.0, 0.001, 0.01, 0.1, 0.5};
  std::string out = absl::StrFormat(
      "{\n  \"benchmark\": \"xbzrle\",\n  \"page_size\": %d,\n  \"pages_per_case\": %d,\n"
      "  \"threads\": 1,\n  \"units\": \"throughput = MB (1e6) of page bytes per second\",\n",
      kPage, pages);

  // Baselines: what reading two pages and copying one costs on this machine.
  {
    Case c = MakeCase(pages, 0, false, 1);
    volatile int sink = 0;
    double cmp = MBps(pages, min_seconds, [&] {
      for (size_t p = 0; p < pages; ++p)
        sink = sink + std::memcmp(&c.old_pages[p * kPage], &c.new_pages[p * kPage], kPage);
    });
    std::vector<uint8_t> dst(kPage);
    double cpy = MBps(pages, min_seconds, [&] {
      for (size_t p = 0; p < pages; ++p) std::memcpy(dst.data(), &c.old_pages[p * kPage], kPage);
      sink = sink + dst[0];
    });
    out += absl::StrFormat("  \"baseline\": {\"memcmp_MBps\": %.0f, \"memcpy_MBps\": %.0f},\n",
                           cmp, cpy);
  }

  out += "  \"cases\": [\n";
  bool first = true;
  for (bool words : {false, true}) {
    for (double f : fractions) {
      Case c = MakeCase(pages, f, words, 1000 + static_cast<uint64_t>(f * 1e6) + words);
      std::vector<std::string> deltas(pages);
      size_t total = 0, fits_7_8 = 0;
      for (size_t p = 0; p < pages; ++p) {
        std::span<const uint8_t> o(&c.old_pages[p * kPage], kPage), n(&c.new_pages[p * kPage], kPage);
        if (!XbzrleEncode(o, n, XbzrleMaxDeltaSize(kPage), &deltas[p])) std::abort();
        total += deltas[p].size();
        fits_7_8 += deltas[p].size() <= kPage * 7 / 8;
      }
      std::string scratch;
      const double enc = MBps(pages, min_seconds, [&] {
        for (size_t p = 0; p < pages; ++p) {
          std::span<const uint8_t> o(&c.old_pages[p * kPage], kPage),
              n(&c.new_pages[p * kPage], kPage);
          XbzrleEncode(o, n, XbzrleMaxDeltaSize(kPage), &scratch);
        }
      });
      // Applying a delta again to its result is a no-op content-wise, so the destination
      // pages can be reused across passes.
      std::vector<uint8_t> dst = c.old_pages;
      const double dec = MBps(pages, min_seconds, [&] {
        for (size_t p = 0; p < pages; ++p) {
          std::span<const uint8_t> d(reinterpret_cast<const uint8_t*>(deltas[p].data()),
                                     deltas[p].size());
          if (!XbzrleApply(d, std::span<uint8_t>(&dst[p * kPage], kPage)).ok()) std::abort();
        }
      });
      if (dst != c.new_pages) std::abort();
      out += absl::StrFormat(
          "%s    {\"pattern\": \"%s\", \"target_changed\": %.3f, \"changed_bytes_fraction\": %.5f, "
          "\"mean_delta_bytes\": %.1f, \"delta_ratio\": %.4f, \"pages_fitting_7_8\": %.3f, "
          "\"encode_MBps\": %.0f, \"apply_MBps\": %.0f}",
          first ? "" : ",\n", words ? "words" : "scattered", f, c.changed_fraction,
          static_cast<double>(total) / pages, static_cast<double>(total) / (pages * kPage),
          static_cast<double>(fits_7_8) / pages, enc, dec);
      first = false;
    }
  }
  out += "\n  ]\n}\n";
  std::fputs(out.c_str(), stdout);
  return 0;
}
