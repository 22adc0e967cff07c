// Fuzz target for the page-record decoder (DecodePageInto, migration/stream/page_codec.h) over
// every codec, plus an encoder round trip through PageCompressor.
//
// The input is a hostile migration source: it picks the record's codec, its gpa and its data.
// Invariants (abort on violation):
//  - the neighbouring pages are never written;
//  - a rejected record leaves the target page exactly as it was, with INVALID_ARGUMENT
//    (UNIMPLEMENTED only for XBZRLE, whose decoder is not wired here yet);
//  - an accepted record wrote exactly what the codec says: RAW = the data, ZERO = zeros,
//    LZ4/ZSTD = an independent decompression of the data that yields exactly one page;
//  - unknown codecs, unaligned and out-of-RAM gpas are never accepted;
//  - encode mode: whatever page content, PageCompressor's record decodes back to it.
//
// Input layout:
//   [0]   codec number (mod 8: 0 unspecified, 1 RAW, 2 ZERO, 3 LZ4, 4 ZSTD, 5 XBZRLE, 6-7 unknown)
//   [1]   bit0: encode mode (the data is a page, zero-padded/truncated; codec LZ4 if [0] is odd
//         else ZSTD); bits1-2: gpa = 0 target page, 1 target+1..4095 ([2]), 2 last RAM page,
//         3 out of RAM (u32 from the data, shifted); bit3: pass a ReceivedPages tracker
//   [2]   level for encode mode / unaligned offset
//   rest  record data
//
// Build modes:
//  - plain (Bazel cc_binary): main() runs every file (or every file in every directory) named
//    on the command line once: a regression-corpus runner, also usable under ASan.
//  - libFuzzer: clang++ -fsanitize=fuzzer,address -DMVMM_LIBFUZZER (no main here); see BUILD.
#include <lz4.h>
#include <zstd.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include "migration/stream/compressor.h"
#include "migration/stream/page_codec.h"
#include "migration/stream/xbzrle.h"
#include "vmm/base/fuzz_main.h"
#include "vmm/base/log.h"
#include "vmm/memory/guest_memory.h"

namespace {

using microvmm::GuestMemory;
using microvmm::kPageSize;
namespace mig = microvmm::migration;

constexpr uint64_t kRamBytes = 2ULL << 20;
constexpr uint64_t kTarget = 0x10000;
constexpr uint8_t kFill = 0xa5, kGuard = 0x3c;
size_t accepted = 0, rejected = 0, encoded = 0;  // for the plain runner's summary

#define FUZZ_CHECK(cond) MVMM_FUZZ_CHECK("page_record_fuzz", cond)

GuestMemory& Ram() {
  static GuestMemory* mem = [] {
    microvmm::SetLogLevel(microvmm::LogLevel::kError);
    auto m = GuestMemory::Create(kRamBytes);
    if (!m.ok()) std::abort();
    return m->release();
  }();
  return *mem;
}

uint8_t* Host(uint64_t gpa) { return *Ram().HostPtr(gpa, kPageSize); }

bool All(const uint8_t* p, uint8_t v) {
  for (size_t i = 0; i < kPageSize; ++i)
    if (p[i] != v) return false;
  return true;
}

// The page `rec` must have produced, computed independently of page_codec.cc; false if the
// record must not be accepted.
// `tracked`: the decoder is given a ReceivedPages in which this page was never received.
bool Expected(const microvmm::PageRecord& rec, bool tracked, std::vector<uint8_t>& out) {
  out.assign(kPageSize, 0);
  const std::string& d = rec.data();
  switch (rec.codec()) {
    case microvmm::RAW:
      if (d.size() != kPageSize) return false;
      std::memcpy(out.data(), d.data(), kPageSize);
      return true;
    case microvmm::ZERO:
      return d.empty();
    case microvmm::LZ4: {
      // Capacity exactly one page: LZ4's end-of-block rules (last match >= 12 bytes before the
      // end of the output) are relative to the capacity, and the record is defined as a block
      // that decodes into one page.
      int n = LZ4_decompress_safe(d.data(), reinterpret_cast<char*>(out.data()), d.size(), kPageSize);
      return n == static_cast<int>(kPageSize);
    }
    case microvmm::ZSTD: {
      // The wire rule: exactly one frame, whose header declares the page size.
      if (ZSTD_getFrameContentSize(d.data(), d.size()) != kPageSize ||
          ZSTD_findFrameCompressedSize(d.data(), d.size()) != d.size())
        return false;
      std::vector<char> big(2 * kPageSize);
      size_t n = ZSTD_decompress(big.data(), big.size(), d.data(), d.size());
      if (ZSTD_isError(n) || n != kPageSize) return false;
      std::memcpy(out.data(), big.data(), kPageSize);
      return true;
    }
    case microvmm::XBZRLE: {
      // A delta applies to the page this side holds (kFill here), and only to a received one.
      if (tracked) return false;
      out.assign(kPageSize, kFill);
      return mig::XbzrleApply(std::span<const uint8_t>(
                                  reinterpret_cast<const uint8_t*>(d.data()), d.size()),
                              out)
          .ok();
    }
    default:
      return false;
  }
}

void EncodeRoundTrip(bool lz4, int level, const uint8_t* data, size_t size) {
  static std::unique_ptr<mig::PageCompressor> comp[2];
  auto& c = comp[lz4];
  if (!c) {
    mig::PageCompressorOptions o;
    o.threads = 1;
    o.codec = lz4 ? microvmm::LZ4 : microvmm::ZSTD;
    o.level = lz4 ? 1 + level % 8 : level % 8 - 3;  // zstd -3..4
    o.queue_capacity = 1000;
    o.sample_every = 1;
    auto r = mig::PageCompressor::Create(o);
    FUZZ_CHECK(r.ok());
    c = std::move(*r);
  }
  std::vector<uint8_t> page(kPageSize, 0);
  std::memcpy(page.data(), data, std::min<size_t>(size, kPageSize));
  mig::PageCompressor::Page p{kTarget, page.data()};
  google::protobuf::RepeatedPtrField<microvmm::PageRecord> recs;
  c->EncodeBatch({&p, 1}, &recs);
  FUZZ_CHECK(recs.size() == 1);
  std::memset(Host(kTarget), kFill, kPageSize);
  FUZZ_CHECK(mig::DecodePageInto(recs[0], Ram()).ok());
  FUZZ_CHECK(std::memcmp(Host(kTarget), page.data(), kPageSize) == 0);
  ++encoded;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 3) return 0;
  const uint8_t codec = data[0] % 8, flags = data[1], arg = data[2];
  data += 3;
  size -= 3;
  if (flags & 1) {
    EncodeRoundTrip(codec & 1, arg, data, size);
    return 0;
  }
  uint64_t gpa = kTarget;
  switch ((flags >> 1) & 3) {
    case 1: gpa = kTarget + 1 + (arg * 16 + (size ? data[0] : 0)) % (kPageSize - 1); break;
    case 2: gpa = kRamBytes - kPageSize; break;
    case 3: {
      uint32_t v = 0;
      std::memcpy(&v, data, std::min<size_t>(size, 4));
      gpa = kRamBytes + (static_cast<uint64_t>(v) << 12);
      break;
    }
  }
  microvmm::PageRecord rec;
  rec.set_gpa(gpa);
  rec.set_codec(static_cast<microvmm::PageCodec>(codec));
  rec.set_data(data, size);

  // Page under test + its neighbours (guards), for the in-RAM cases.
  const bool in_ram = gpa % kPageSize == 0 && gpa < kRamBytes;
  const uint64_t page = gpa & ~(kPageSize - 1);
  const bool low_guard = page >= kPageSize && page - kPageSize < kRamBytes;
  const bool high_guard = page + kPageSize < kRamBytes;
  if (page < kRamBytes) std::memset(Host(page), kFill, kPageSize);
  if (low_guard) std::memset(Host(page - kPageSize), kGuard, kPageSize);
  if (high_guard) std::memset(Host(page + kPageSize), kGuard, kPageSize);

  std::unique_ptr<mig::ReceivedPages> received;
  if (flags & 8) received = std::make_unique<mig::ReceivedPages>(Ram());
  absl::Status s = mig::DecodePageInto(rec, Ram(), received.get());

  std::vector<uint8_t> want;
  const bool valid = in_ram && Expected(rec, received != nullptr, want);
  if (low_guard) FUZZ_CHECK(All(Host(page - kPageSize), kGuard));
  if (high_guard) FUZZ_CHECK(All(Host(page + kPageSize), kGuard));
  ++(s.ok() ? accepted : rejected);
  if (s.ok()) {
    FUZZ_CHECK(valid);
    if (rec.codec() == microvmm::ZERO && received)  // untouched page of a fresh VM: store skipped
      FUZZ_CHECK(All(Host(page), kFill));
    else
      FUZZ_CHECK(std::memcmp(Host(page), want.data(), kPageSize) == 0);
  } else {
    FUZZ_CHECK(!valid);
    FUZZ_CHECK(s.code() == absl::StatusCode::kInvalidArgument);
    if (page < kRamBytes) FUZZ_CHECK(All(Host(page), kFill));
  }
  return 0;
}

#ifndef MVMM_LIBFUZZER
int main(int argc, char** argv) {
  int rc = microvmm::RunFuzzInputs(argc, argv, "page_record_fuzz", LLVMFuzzerTestOneInput);
  if (rc == 0)
    std::printf("page_record_fuzz: %zu records accepted, %zu rejected, %zu encoder round trips\n",
                accepted, rejected, encoded);
  return rc;
}
#endif
