// Page codec benchmark: per-page (4 KiB, independent) compression and decompression speed and
// ratio for zstd levels -5..3 and lz4 (default and accelerated), single thread, on synthetic page
// sets that stand in for guest memory. Prints one JSON document (bench/results/codec.json).
//
//   bazel run -c opt //bench/codec:codec_bench -- [--pages N] [--min-seconds S] > bench/results/codec.json
//
// Page sets (all deterministic, seeded; all-zero pages never reach the compressor — the stream
// sends them as ZERO tags — so none of the sets contains one):
//   random   uniformly random bytes: encrypted / already compressed data.
//   zeroish  zero page with 1..8 runs of 8..64 random bytes: freshly allocated, sparsely used.
//   text     words from a 200-word vocabulary with spaces/newlines/punctuation: page cache of
//            logs, configs, source.
//   struct   arrays of 64-byte records: kernel-style pointers (0xffff8880'xxxxxxxx), small
//            counters, flags, zero padding: slab/heap objects.
//   code     consecutive 4 KiB pieces of this benchmark's own executable (machine code + rodata).
//   mix      the "typical guest" mix: 25% text, 25% struct, 20% code, 15% zeroish, 15% random
//            (an assumption, documented in bench/README.md; real guests vary a lot).
#include <lz4.h>
#include <zstd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_format.h"
#include "migration/stream/compressor.h"

namespace {

constexpr size_t kPage = 4096;
constexpr size_t kRawThreshold = kPage * 7 / 8;  // compressor sends RAW above this
using Page = std::vector<uint8_t>;

Page RandomPage(std::mt19937_64& rng) {
  Page p(kPage);
  for (size_t i = 0; i < kPage; i += 8) {
    uint64_t v = rng();
    std::memcpy(&p[i], &v, 8);
  }
  return p;
}

Page ZeroishPage(std::mt19937_64& rng) {
  Page p(kPage, 0);
  int runs = 1 + rng() % 8;
  for (int r = 0; r < runs; ++r) {
    size_t len = 8 + rng() % 57, off = rng() % (kPage - len);
    for (size_t i = 0; i < len; ++i) p[off + i] = static_cast<uint8_t>(rng());
  }
  return p;
}

Page TextPage(std::mt19937_64& rng, const std::vector<std::string>& vocab) {
  static const char* kSep[] = {" ", " ", " ", " ", ", ", ".\n", "\n", ": ", " = ", "\t"};
  std::string s;
  while (s.size() < kPage) {
    s += vocab[std::min<size_t>(rng() % vocab.size(), rng() % vocab.size())];  // skewed
    s += kSep[rng() % 10];
  }
  return Page(s.begin(), s.begin() + kPage);
}

Page StructPage(std::mt19937_64& rng) {
  Page p(kPage, 0);
  for (size_t off = 0; off < kPage; off += 64) {
    uint64_t f[8] = {};
    f[0] = 0xffff888000000000ULL | ((rng() % 0x100000) << 6);  // next
    f[1] = 0xffff888000000000ULL | ((rng() % 0x100000) << 6);  // prev
    f[2] = rng() % 1000;                                         // refcount
    f[3] = (rng() % 4 == 0) ? rng() & 0xffff : 0;                // flags
    f[4] = 0xffffffff81000000ULL + (rng() % 0x1000000);          // ops pointer (kernel text)
    f[5] = rng() % 2 ? rng() : 0;                                // some payload
    std::memcpy(&p[off], f, 64);
  }
  return p;
}

std::vector<Page> CodePages(size_t n) {
  std::ifstream in("/proc/self/exe", std::ios::binary);
  std::vector<uint8_t> exe((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<Page> out;
  for (size_t off = 0; out.size() < n && exe.size() >= kPage; off += kPage) {
    if (off + kPage > exe.size()) off = 0;
    Page p(exe.begin() + off, exe.begin() + off + kPage);
    bool zero = true;
    for (uint8_t b : p) zero &= b == 0;
    if (!zero) out.push_back(std::move(p));
  }
  return out;
}

struct Codec {
  std::string name;
  bool zstd;
  int level;  // zstd level or lz4 acceleration
};

struct Result {
  double comp_mbs, decomp_mbs, ratio, wire_ratio, compressed_share;
};

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

Result Measure(const Codec& c, const std::vector<Page>& pages, double min_seconds) {
  ZSTD_CCtx* cctx = ZSTD_createCCtx();
  ZSTD_DCtx* dctx = ZSTD_createDCtx();
  std::vector<std::vector<char>> out(pages.size(), std::vector<char>(kPage + 512));
  std::vector<size_t> sizes(pages.size());
  auto compress_all = [&] {
    for (size_t i = 0; i < pages.size(); ++i) {
      if (c.zstd) {
        sizes[i] = ZSTD_compressCCtx(cctx, out[i].data(), out[i].size(), pages[i].data(), kPage, c.level);
        if (ZSTD_isError(sizes[i])) std::abort();
      } else {
        int n = LZ4_compress_fast(reinterpret_cast<const char*>(pages[i].data()), out[i].data(), kPage,
                                  static_cast<int>(out[i].size()), c.level);
        if (n <= 0) std::abort();
        sizes[i] = n;
      }
    }
  };
  std::vector<uint8_t> dst(kPage);
  auto decompress_all = [&] {
    for (size_t i = 0; i < pages.size(); ++i) {
      size_t n = c.zstd ? ZSTD_decompressDCtx(dctx, dst.data(), kPage, out[i].data(), sizes[i])
                        : static_cast<size_t>(LZ4_decompress_safe(out[i].data(),
                              reinterpret_cast<char*>(dst.data()), sizes[i], kPage));
      if (n != kPage) std::abort();
    }
  };
  auto rate = [&](auto fn) {
    fn();  // warm-up
    int reps = 0;
    double t0 = Now(), t;
    do {
      fn();
      ++reps;
      t = Now() - t0;
    } while (t < min_seconds);
    return static_cast<double>(reps) * pages.size() * kPage / t / 1e6;
  };
  Result r{};
  r.comp_mbs = rate(compress_all);
  r.decomp_mbs = rate(decompress_all);
  uint64_t total = 0, wire = 0, compressed = 0;
  for (size_t i = 0; i < pages.size(); ++i) {
    total += sizes[i];
    bool use = sizes[i] <= kRawThreshold;  // the compressor's RAW fallback
    wire += use ? sizes[i] : kPage;
    compressed += use;
  }
  // Round-trip check of the last page (decompress_all left it in dst).
  if (std::memcmp(dst.data(), pages.back().data(), kPage) != 0) std::abort();
  r.ratio = static_cast<double>(total) / (pages.size() * kPage);
  r.wire_ratio = static_cast<double>(wire) / (pages.size() * kPage);
  r.compressed_share = static_cast<double>(compressed) / pages.size();
  ZSTD_freeCCtx(cctx);
  ZSTD_freeDCtx(dctx);
  return r;
}

// PageCompressor end to end: `senders` threads each encode 64-page batches of `pages` (cycling)
// for `seconds`; reports input MB/s (all pages, zero tags included) and the policy's stats.
std::string PoolRun(const std::vector<Page>& pages, microvmm::PageCodec codec, int threads,
                    int senders, double seconds) {
  namespace mig = microvmm::migration;
  mig::PageCompressorOptions o;
  o.codec = codec;
  o.threads = threads;
  auto c = mig::PageCompressor::Create(o);
  if (!c.ok()) std::abort();
  std::vector<uint64_t> wire(senders, 0), sent(senders, 0);
  std::vector<std::thread> ts;
  double t0 = Now();
  for (int s = 0; s < senders; ++s)
    ts.emplace_back([&, s] {
      std::vector<mig::PageCompressor::Page> batch;
      size_t next = s * 997;
      while (Now() - t0 < seconds) {
        batch.clear();
        for (int i = 0; i < 64; ++i, ++next)
          batch.push_back({next * kPage, pages[next % pages.size()].data()});
        google::protobuf::RepeatedPtrField<microvmm::PageRecord> recs;
        wire[s] += (*c)->EncodeBatch(batch, &recs);
        sent[s] += batch.size();
      }
    });
  for (auto& t : ts) t.join();
  double dt = Now() - t0;
  uint64_t w = 0, n = 0;
  for (int s = 0; s < senders; ++s) w += wire[s], n += sent[s];
  mig::PageCompressorStats st = (*c)->stats();
  return absl::StrFormat(
      "{\"codec\": \"%s\", \"threads\": %d, \"senders\": %d, \"input_mbs\": %.0f, "
      "\"wire_ratio\": %.4f, \"compressed_share\": %.3f, \"raw_busy_share\": %.3f, "
      "\"raw_incompressible_share\": %.3f, \"sampled_ratio\": %.3f}",
      codec == microvmm::LZ4 ? "lz4" : "zstd1", threads, senders, n * kPage / dt / 1e6,
      static_cast<double>(w) / (n * kPage), static_cast<double>(st.pages_compressed) / st.pages,
      static_cast<double>(st.pages_raw_busy) / st.pages,
      static_cast<double>(st.pages_raw_incompressible) / st.pages, st.sampled_ratio);
}

std::string LoadAvg() {
  std::ifstream f("/proc/loadavg");
  std::string a, b, c;
  f >> a >> b >> c;
  return a + " " + b + " " + c;
}

}  // namespace

int main(int argc, char** argv) {
  size_t n = 2048;
  double min_seconds = 0.3;
  bool pool_only = false;
  for (int i = 1; i < argc; ++i)
    if (!std::strcmp(argv[i], "--pool-only")) pool_only = true;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--pages")) n = std::strtoul(argv[i + 1], nullptr, 10);
    else if (!std::strcmp(argv[i], "--min-seconds")) min_seconds = std::strtod(argv[i + 1], nullptr);
  }
  std::mt19937_64 rng(42);
  std::vector<std::string> vocab;
  for (int w = 0; w < 200; ++w) {
    std::string s;
    int len = 2 + rng() % 9;
    for (int k = 0; k < len; ++k) s += static_cast<char>('a' + rng() % 26);
    vocab.push_back(s);
  }
  std::vector<std::pair<std::string, std::vector<Page>>> sets;
  auto make = [&](auto gen) {
    std::vector<Page> v;
    for (size_t i = 0; i < n; ++i) v.push_back(gen());
    return v;
  };
  sets.push_back({"random", make([&] { return RandomPage(rng); })});
  sets.push_back({"zeroish", make([&] { return ZeroishPage(rng); })});
  sets.push_back({"text", make([&] { return TextPage(rng, vocab); })});
  sets.push_back({"struct", make([&] { return StructPage(rng); })});
  std::vector<Page> code = CodePages(n);
  sets.push_back({"code", code});
  std::vector<Page> mix;
  for (size_t i = 0; i < n; ++i) {
    int k = rng() % 100;
    if (k < 25) mix.push_back(TextPage(rng, vocab));
    else if (k < 50) mix.push_back(StructPage(rng));
    else if (k < 70) mix.push_back(code[rng() % code.size()]);
    else if (k < 85) mix.push_back(ZeroishPage(rng));
    else mix.push_back(RandomPage(rng));
  }
  sets.push_back({"mix", mix});

  if (pool_only) {  // PageCompressor on the mix: --pool-only prints just this
    std::printf("{\n  \"loadavg_start\": \"%s\",\n  \"pool\": [\n", LoadAvg().c_str());
    bool first = true;
    for (auto codec : {microvmm::LZ4, microvmm::ZSTD})
      for (int threads : {1, 2})
        for (int senders : {1, 2, 4}) {
          std::printf("%s    %s", first ? "" : ",\n",
                      PoolRun(mix, codec, threads, senders, 1.0).c_str());
          std::fflush(stdout);
          first = false;
        }
    std::printf("\n  ],\n  \"loadavg_end\": \"%s\"\n}\n", LoadAvg().c_str());
    return 0;
  }
  std::vector<Codec> codecs = {{"lz4", false, 1}, {"lz4-fast4", false, 4}, {"lz4-fast16", false, 16}};
  for (int l = -5; l <= 3; ++l)
    if (l != 0) codecs.push_back({absl::StrFormat("zstd%d", l), true, l});

  std::printf("{\n  \"loadavg_start\": \"%s\",\n", LoadAvg().c_str());
  std::printf("  \"page_size\": %zu,\n  \"pages_per_set\": %zu,\n  \"raw_threshold\": %zu,\n",
              kPage, n, kRawThreshold);
  std::printf("  \"lz4_version\": \"%s\",\n  \"zstd_version\": \"%s\",\n", LZ4_versionString(),
              ZSTD_versionString());
  std::printf("  \"note\": \"single thread, each page compressed independently; MB/s of page "
              "bytes (1e6); ratio = compressed/original; wire_ratio counts pages above "
              "raw_threshold as raw\",\n  \"results\": [\n");
  bool first = true;
  for (const auto& [set, pages] : sets) {
    for (const Codec& c : codecs) {
      Result r = Measure(c, pages, min_seconds);
      std::printf("%s    {\"set\": \"%s\", \"codec\": \"%s\", \"compress_mbs\": %.0f, "
                  "\"decompress_mbs\": %.0f, \"ratio\": %.4f, \"wire_ratio\": %.4f, "
                  "\"compressed_share\": %.3f}",
                  first ? "" : ",\n", set.c_str(), c.name.c_str(), r.comp_mbs, r.decomp_mbs, r.ratio,
                  r.wire_ratio, r.compressed_share);
      std::fflush(stdout);
      first = false;
    }
  }
  std::printf("\n  ],\n  \"loadavg_end\": \"%s\"\n}\n", LoadAvg().c_str());
  return 0;
}
