// Fuzz target for the XBZRLE page-record decoder (xbzrle.h), plus an encoder round trip.
//
// The input is a hostile source: a delta for a page the destination holds. The target checks,
// and aborts on a violation:
//  - XbzrleApply never writes outside the page (guard bytes on both sides stay intact);
//  - on error the page is byte-for-byte unchanged, and XbzrleValidate agrees with XbzrleApply;
//  - on success, encoding old -> new yields a delta that validates, is no larger than
//    XbzrleMaxDeltaSize, applies back to exactly `new`, is deterministic, and is refused by a
//    max_out one byte smaller.
//
// Input layout:
//   [0]    page size: {4096, 256, 17, 1}[byte & 3]
//   [1]    seed of the destination page's initial content
//   [2..]  the delta
//
// Build modes:
//  - plain (Bazel cc_binary): main() runs every file (or every file in every directory) named
//    on the command line once: the regression-corpus runner (//tests/stream:xbzrle_fuzz_corpus_test).
//  - libFuzzer: clang++ -fsanitize=fuzzer,address -DMVMM_LIBFUZZER (no main here); see
//    migration/stream/BUILD.bazel for the command line.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "migration/stream/xbzrle.h"
#include "vmm/base/fuzz_main.h"

namespace {

using microvmm::migration::XbzrleApply;
using microvmm::migration::XbzrleEncode;
using microvmm::migration::XbzrleMaxDeltaSize;
using microvmm::migration::XbzrleValidate;

constexpr size_t kGuard = 64;
constexpr size_t kSizes[4] = {4096, 256, 17, 1};

#define FUZZ_CHECK(cond) MVMM_FUZZ_CHECK("xbzrle_fuzz", cond)

bool GuardsIntact(const std::vector<uint8_t>& buf, size_t n) {
  for (size_t i = 0; i < kGuard; ++i) {
    if (buf[i] != 0xA5 || buf[kGuard + n + i] != 0x5A) return false;
  }
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 2) return 0;
  const size_t n = kSizes[data[0] & 3];
  const uint8_t seed = data[1];
  std::span<const uint8_t> delta(data + 2, size - 2);

  // [guard][page][guard]
  std::vector<uint8_t> buf(kGuard + n + kGuard);
  std::memset(buf.data(), 0xA5, kGuard);
  std::memset(buf.data() + kGuard + n, 0x5A, kGuard);
  uint8_t* page = buf.data() + kGuard;
  for (size_t i = 0; i < n; ++i) page[i] = static_cast<uint8_t>(i * 131 + seed);
  const std::vector<uint8_t> old_page(page, page + n);

  const absl::Status valid = XbzrleValidate(delta, n);
  const absl::Status applied = XbzrleApply(delta, std::span<uint8_t>(page, n));
  FUZZ_CHECK(valid.ok() == applied.ok());
  FUZZ_CHECK(GuardsIntact(buf, n));
  if (!applied.ok()) {
    FUZZ_CHECK(applied.code() == absl::StatusCode::kInvalidArgument);
    FUZZ_CHECK(std::memcmp(page, old_page.data(), n) == 0);
    return 0;
  }

  // Round trip through the encoder.
  const std::vector<uint8_t> new_page(page, page + n);
  std::string enc;
  FUZZ_CHECK(XbzrleEncode(old_page, new_page, XbzrleMaxDeltaSize(n), &enc));
  FUZZ_CHECK(enc.size() <= XbzrleMaxDeltaSize(n));
  std::span<const uint8_t> enc_span(reinterpret_cast<const uint8_t*>(enc.data()), enc.size());
  FUZZ_CHECK(XbzrleValidate(enc_span, n).ok());
  std::vector<uint8_t> copy = old_page;
  FUZZ_CHECK(XbzrleApply(enc_span, copy).ok());
  FUZZ_CHECK(copy == new_page);
  std::string again;
  FUZZ_CHECK(XbzrleEncode(old_page, new_page, enc.size(), &again) && again == enc);
  FUZZ_CHECK(!XbzrleEncode(old_page, new_page, enc.size() - 1, &again));
  return 0;
}

#ifndef MVMM_LIBFUZZER
int main(int argc, char** argv) {
  return microvmm::RunFuzzInputs(argc, argv, "xbzrle_fuzz", LLVMFuzzerTestOneInput);
}
#endif
