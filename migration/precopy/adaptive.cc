#include "migration/precopy/adaptive.h"

#include <cstring>

#include "absl/strings/str_format.h"
#include "migration/stream/page_codec.h"
#include "migration/stream/xbzrle.h"
#include "vmm/base/log.h"

namespace microvmm::migration {
namespace {

constexpr uint64_t kRecordHeader = 12;  // gpa + codec + length on the wire (as EncodePage)

// Offers pages spread evenly over `pages` (every n/max-th) to `take(gpa, host)` until it has
// accepted `max` of them (it returns whether it did).
template <typename Take>
void ForSpreadPages(GuestMemory& mem, const DirtySet& pages, uint32_t max, Take&& take) {
  const uint64_t n = pages.Count();
  if (n == 0 || max == 0) return;
  const uint64_t stride = std::max<uint64_t>(1, n / max);
  uint64_t k = 0;
  uint32_t taken = 0;
  pages.ForEachSetPage([&](uint64_t gpa) {
    if (k++ % stride != 0 || taken >= max) return;
    auto host = mem.HostPtr(gpa, kPageSize);
    if (host.ok() && take(gpa, *host)) ++taken;
  });
}

}  // namespace

absl::Status PageEncoder::SetCompression(bool on, uint32_t threads) {
  if (!on) {
    compressor_.reset();
    return absl::OkStatus();
  }
  if (compressor_ != nullptr && compressor_->threads() == static_cast<int>(threads))
    return absl::OkStatus();
  PageCompressorOptions o;
  o.threads = static_cast<int>(threads);
  auto c = PageCompressor::Create(o);
  if (!c.ok()) return c.status();
  compressor_ = std::move(*c);
  return absl::OkStatus();
}

absl::Status PageEncoder::SetDelta(bool on, uint64_t cache_bytes) {
  if (!on) {
    delta_.reset();  // the destination keeps its pages; nothing refers to the cache any more
    return absl::OkStatus();
  }
  if (delta_ != nullptr) return absl::OkStatus();
  DeltaCacheOptions o;
  o.requested_bytes = cache_bytes;
  auto d = DeltaCache::Create(o);
  if (!d.ok()) return d.status();
  delta_ = std::move(*d);
  LOG_INFO("migration: delta cache of %d MiB%s%s", delta_->capacity_bytes() >> 20,
           delta_->capacity_note().empty() ? "" : ": ", delta_->capacity_note());
  return absl::OkStatus();
}

absl::StatusOr<uint64_t> PageEncoder::Encode(
    GuestMemory& mem, std::span<const uint64_t> gpas, const std::function<bool(uint64_t)>& hole,
    bool first_pass, google::protobuf::RepeatedPtrField<PageRecord>* out) {
  uint64_t wire = 0;
  // With delta on, each page is snapshotted first: the delta, the cached copy and the bytes sent
  // must be the same version while the guest keeps writing. Without delta the compressor (or
  // EncodePage) reads the guest page itself, as the fixed configuration does. Pages that go in
  // full are handed to the compressor together.
  std::vector<uint8_t> buf(delta_ != nullptr ? gpas.size() * kPageSize : 0);
  std::vector<PageCompressor::Page> full;
  std::string delta;
  const size_t max_delta = MaxDelta();
  for (size_t i = 0; i < gpas.size(); ++i) {
    const uint64_t gpa = gpas[i];
    if (hole(gpa)) {
      if (delta_) delta_->Invalidate(gpa);
      wire += EncodeZeroPage(gpa, out->Add());
      continue;
    }
    auto host = mem.HostPtr(gpa, kPageSize);
    if (!host.ok()) return host.status();
    const uint8_t* page = *host;
    if (delta_ != nullptr) {
      uint8_t* copy = buf.data() + i * kPageSize;
      std::memcpy(copy, *host, kPageSize);
      page = copy;
    }
    if (IsZeroPage(page)) {
      if (delta_) delta_->Invalidate(gpa);
      wire += EncodeZeroPage(gpa, out->Add());
      continue;
    }
    content_pages_.fetch_add(1, std::memory_order_relaxed);
    if (delta_ != nullptr &&
        delta_->EncodeAndUpdate(gpa, std::span<const uint8_t>(page, kPageSize), max_delta, &delta,
                                /*insert_on_miss=*/!first_pass) == DeltaCache::Result::kDelta) {
      PageRecord* rec = out->Add();
      rec->set_gpa(gpa);
      rec->set_codec(XBZRLE);
      rec->set_data(delta);
      wire += kRecordHeader + delta.size();
      delta_pages_.fetch_add(1, std::memory_order_relaxed);
      continue;
    }
    full.push_back({gpa, page});
  }
  if (compressor_ != nullptr) {
    const int before = out->size();
    wire += compressor_->EncodeBatch(full, out);
    uint64_t n = 0;
    for (int i = before; i < out->size(); ++i) n += out->Get(i).codec() == LZ4 || out->Get(i).codec() == ZSTD;
    compressed_pages_.fetch_add(n, std::memory_order_relaxed);
  } else {
    for (const PageCompressor::Page& p : full) wire += EncodePage(p.gpa, p.data, out->Add());
  }
  return wire;
}

PageEncoder::Sample PageEncoder::SampleCompressibility(GuestMemory& mem, const DirtySet& pages,
                                                       uint32_t max) {
  Sample s;
  if (max == 0 || pages.Empty()) return s;
  if (sampler_ == nullptr) {
    PageCompressorOptions o;
    o.threads = 1;
    o.sample_every = 1;  // never skipped by its own ratio estimate
    o.pages_per_task = max;
    auto c = PageCompressor::Create(o);
    if (!c.ok()) return s;
    sampler_ = std::move(*c);
  }
  std::vector<PageCompressor::Page> sample;
  ForSpreadPages(mem, pages, max, [&](uint64_t gpa, const uint8_t* host) {
    sample.push_back({gpa, host});
    return true;
  });
  if (sample.empty()) return s;
  const PageCompressorStats before = sampler_->stats();
  google::protobuf::RepeatedPtrField<PageRecord> recs;
  sampler_->EncodeBatch(sample, &recs);
  const PageCompressorStats after = sampler_->stats();
  const uint64_t zero = after.pages_zero - before.pages_zero;
  const uint64_t in = after.bytes_in - before.bytes_in, outb = after.bytes_out - before.bytes_out;
  s.zero_share = static_cast<double>(zero) / sample.size();
  s.ratio = outb > 0 ? static_cast<double>(in) / outb : 0;
  return s;
}

size_t PageEncoder::MaxDelta() const {
  // A delta must beat what the page would cost otherwise: about half a page compressed.
  return compressor_ ? kPageSize / 2 : kPageSize * 7 / 8;
}

PageEncoder::DeltaSample PageEncoder::SampleDelta(GuestMemory& mem, const DirtySet& pages,
                                                  uint32_t max) {
  DeltaSample s;
  // 1. Compare last call's copies with the pages now, where the page is about to be re-sent: the
  //    previous copy stands for the version the destination would hold (what the cache would),
  //    the content now for the next version sent.
  const size_t max_delta = MaxDelta();
  std::string delta;
  uint64_t hit_bytes = 0;
  uint32_t hits = 0;
  for (size_t i = 0; i < probe_gpas_.size(); ++i) {
    if (!pages.Test(probe_gpas_[i])) continue;
    auto host = mem.HostPtr(probe_gpas_[i], kPageSize);
    if (!host.ok() || IsZeroPage(*host)) continue;
    ++s.pages;
    if (XbzrleEncode(std::span<const uint8_t>(probe_data_.data() + i * kPageSize, kPageSize),
                     std::span<const uint8_t>(*host, kPageSize), max_delta, &delta)) {
      ++hits;
      hit_bytes += delta.size();
    }
  }
  if (s.pages > 0) s.hit_rate = static_cast<double>(hits) / s.pages;
  if (hits > 0) s.size_ratio = static_cast<double>(hit_bytes) / hits / kPageSize;

  // 2. New probe: up to `max` non-zero pages spread evenly over `pages`. A stable working set
  //    gives the same gpas pass after pass, so most of them are comparable next time.
  probe_gpas_.clear();
  probe_data_.resize(static_cast<size_t>(max) * kPageSize);
  ForSpreadPages(mem, pages, max, [&](uint64_t gpa, const uint8_t* host) {
    if (IsZeroPage(host)) return false;
    std::memcpy(probe_data_.data() + probe_gpas_.size() * kPageSize, host, kPageSize);
    probe_gpas_.push_back(gpa);
    return true;
  });
  probe_data_.resize(probe_gpas_.size() * kPageSize);
  return s;
}

double PageEncoder::TakeDeltaHitRate() {
  const uint64_t d = delta_pages_.load(), c = content_pages_.load();
  const uint64_t dd = d - last_delta_, dc = c - last_content_;
  last_delta_ = d;
  last_content_ = c;
  return dc == 0 ? 0 : static_cast<double>(dd) / dc;
}

absl::StatusOr<std::unique_ptr<AdaptiveMigration>> AdaptiveMigration::Create(
    const PolicyConfig& config, Vm* vm) {
  auto p = MigrationPolicy::Create(config);
  if (!p.ok()) return p.status();
  return std::unique_ptr<AdaptiveMigration>(new AdaptiveMigration(std::move(*p), vm));
}

AdaptiveMigration::~AdaptiveMigration() { ReleaseThrottle(); }

void AdaptiveMigration::ReleaseThrottle() {
  if (throttle_ == 0) return;
  if (auto r = vm_->SetThrottle(0); !r.ok())
    LOG_WARN("migration: releasing the vCPU throttle failed: %s", r.status().ToString());
  throttle_ = 0;
}

absl::Status AdaptiveMigration::Apply(const PolicySettings& s) {
  if (absl::Status st = encoder_.SetCompression(s.compress(), s.compress_threads()); !st.ok())
    return st;
  if (absl::Status st = encoder_.SetDelta(s.delta(), s.delta_cache_bytes()); !st.ok()) return st;
  if (s.throttle_percent() != throttle_) {
    auto r = vm_->SetThrottle(static_cast<int>(s.throttle_percent()));
    if (!r.ok()) return r.status();
    throttle_ = static_cast<uint32_t>(*r);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<PolicyDecision>> AdaptiveMigration::Observe(IterationMetrics m,
                                                                       const DirtySet& dirty) {
  PageEncoder::Sample sample = encoder_.SampleCompressibility(vm_->memory(), dirty);
  m.set_compression_ratio(sample.ratio);
  m.set_zero_share(sample.zero_share);
  m.set_delta_hit_rate(encoder_.TakeDeltaHitRate());
  const PageEncoder::DeltaSample ds = encoder_.SampleDelta(vm_->memory(), dirty);
  m.set_delta_sample_pages(ds.pages);
  m.set_delta_sample_hit_rate(ds.hit_rate);
  m.set_delta_sample_size_ratio(ds.size_ratio);
  if (auto idle = probe_.IdleCores(); idle.ok()) m.set_idle_host_cores(*idle);
  if (auto mem = probe_.FreeMemoryBytes(); mem.ok()) m.set_free_host_memory_bytes(*mem);
  std::vector<PolicyDecision> d = policy_->Observe(m);
  if (absl::Status s = Apply(policy_->settings()); !s.ok()) return s;
  return d;
}

}  // namespace microvmm::migration
