#include "devices/virtio/balloon/balloon.h"

#include <sys/timerfd.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/strings/str_format.h"
#include "devices/virtio/balloon/balloon_state.pb.h"
#include "vmm/base/log.h"
#include "vmm/base/status.h"

namespace microvmm::virtio {
namespace {

constexpr uint64_t Bit(int n) { return uint64_t{1} << n; }

// PFN data read per inflate/deflate chain at most (Linux sends 256 PFNs per chain).
constexpr uint64_t kMaxPfnBytesPerChain = 4 * 1024 * 1024;
// struct virtio_balloon_stat is packed: le16 tag, le64 value.
constexpr uint64_t kStatEntryBytes = 10;
constexpr uint64_t kMaxStatEntries = 128;

// The queue feature that makes each optional role exist.
int RoleFeature(int role) {
  switch (role) {
    case VirtioBalloon::kStats:
      return kBalloonFStatsVq;
    case VirtioBalloon::kFreePage:
      return kBalloonFFreePageHint;
    case VirtioBalloon::kReporting:
      return kBalloonFReporting;
    default:
      return -1;
  }
}

const char* RoleName(int role) {
  static const char* const kNames[] = {"inflateq", "deflateq", "statsq", "free_page_vq",
                                       "reporting_vq"};
  return role >= 0 && role < VirtioBalloon::kNumRoles ? kNames[role] : "none";
}

uint64_t AlignUp(uint64_t v) { return (v + kPageSize - 1) & ~(kPageSize - 1); }
uint64_t AlignDown(uint64_t v) { return v & ~(kPageSize - 1); }

uint64_t OfferedFeatures(const VirtioBalloonOptions& o) {
  uint64_t f = Bit(kFeatureVersion1) | Bit(kFeatureIndirectDesc) | Bit(kFeatureEventIdx) |
               Bit(kBalloonFStatsVq);
  if (o.deflate_on_oom) f |= Bit(kBalloonFDeflateOnOom);
  if (o.free_page_hinting) f |= Bit(kBalloonFFreePageHint);
  if (o.free_page_reporting) f |= Bit(kBalloonFReporting);
  return f;
}

// 1 + the highest spec queue index among the offered features (covers both numberings).
uint32_t QueueCount(uint64_t features) {
  uint32_t n = 2;
  for (int role = VirtioBalloon::kStats; role < VirtioBalloon::kNumRoles; ++role)
    if (features & Bit(RoleFeature(role))) n = static_cast<uint32_t>(role) + 1;
  return n;
}

}  // namespace

absl::StatusOr<std::unique_ptr<VirtioBalloon>> VirtioBalloon::Create(
    GuestMemory* mem, EventLoop* loop, const VirtioBalloonOptions& options) {
  if (mem == nullptr) return absl::InvalidArgumentError("virtio-balloon: no guest memory");
  if (options.stats_interval_s > 0 && loop == nullptr)
    return absl::InvalidArgumentError("virtio-balloon: stats_interval needs an EventLoop");
  std::unique_ptr<VirtioBalloon> dev(new VirtioBalloon(mem, loop, options));
  if (options.stats_interval_s > 0) {
    dev->timer_.reset(::timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC));
    if (!dev->timer_.valid()) return ErrnoStatus(errno, "virtio-balloon: timerfd_create");
    struct itimerspec its = {};
    its.it_interval.tv_sec = options.stats_interval_s;
    its.it_value.tv_sec = options.stats_interval_s;
    if (::timerfd_settime(dev->timer_.get(), 0, &its, nullptr) != 0)
      return ErrnoStatus(errno, "virtio-balloon: timerfd_settime");
    VirtioBalloon* self = dev.get();
    absl::Status s = loop->Add(dev->timer_.get(), EPOLLIN, [self](uint32_t) { self->OnTimer(); });
    if (!s.ok()) {
      dev->timer_.reset();  // not registered: the destructor must not Remove() it
      return s;
    }
  }
  return dev;
}

VirtioBalloon::VirtioBalloon(GuestMemory* mem, EventLoop* loop, const VirtioBalloonOptions& options)
    : mem_(mem),
      loop_(loop),
      options_(options),
      features_(OfferedFeatures(options)),
      num_queues_(QueueCount(features_)) {
  num_pages_ = static_cast<uint32_t>(
      std::min<uint64_t>(options.initial_target_bytes >> kBalloonPfnShift, UINT32_MAX));
  for (const GuestMemory::Region& r : mem_->regions()) {
    RegionBits b;
    b.gpa = r.gpa;
    b.pages = r.size / kPageSize;
    b.bits.assign((b.pages + 63) / 64, 0);
    inflated_.push_back(std::move(b));
  }
}

VirtioBalloon::~VirtioBalloon() {
  if (loop_ != nullptr && timer_.valid()) loop_->Remove(timer_.get());
}

std::vector<uint32_t> VirtioBalloon::queue_max_sizes() const {
  return std::vector<uint32_t>(num_queues_, kQueueSize);
}

// --- Config space ---------------------------------------------------------------------------

void VirtioBalloon::ReadConfig(uint64_t offset, std::span<uint8_t> data) {
  std::lock_guard<std::mutex> l(mu_);
  const uint32_t words[4] = {num_pages_, actual_, cmd_id_, poison_val_};
  for (size_t i = 0; i < data.size(); ++i) {
    uint64_t off = offset + i;
    data[i] = off < kBalloonConfigSize ? static_cast<uint8_t>(words[off / 4] >> (8 * (off % 4)))
                                       : 0;
  }
}

void VirtioBalloon::WriteConfig(uint64_t offset, std::span<const uint8_t> data) {
  std::lock_guard<std::mutex> l(mu_);
  // The driver may write `actual` and `poison_val`; num_pages and the cmd id are read-only.
  for (size_t i = 0; i < data.size(); ++i) {
    uint64_t off = offset + i;
    uint32_t* word = off >= 4 && off < 8 ? &actual_ : off >= 12 && off < 16 ? &poison_val_ : nullptr;
    if (word == nullptr) continue;
    unsigned shift = 8 * (off % 4);
    *word = (*word & ~(0xffu << shift)) | (uint32_t{data[i]} << shift);
  }
}

// --- Activation -----------------------------------------------------------------------------

absl::Status VirtioBalloon::Activate(uint64_t features, std::span<Virtqueue* const> queues,
                                     QueueSignal signal) {
  if (queues.size() != num_queues_)
    return absl::InvalidArgumentError(absl::StrFormat(
        "virtio-balloon: %d queues given, %d expected", queues.size(), num_queues_));
  std::lock_guard<std::mutex> l(mu_);
  // The two candidate numberings of the negotiated queues (see the header).
  std::vector<int> spec(num_queues_, -1), packed(num_queues_, -1);
  spec[0] = packed[0] = kInflate;
  spec[1] = packed[1] = kDeflate;
  uint32_t next = 2;
  for (int role = kStats; role < kNumRoles; ++role) {
    if (!(features & Bit(RoleFeature(role)))) continue;
    if (static_cast<uint32_t>(role) >= num_queues_)  // feature not offered
      return absl::InvalidArgumentError("virtio-balloon: queue feature was not offered");
    spec[role] = role;
    packed[next++] = role;
  }
  auto explains = [&](const std::vector<int>& layout) {
    for (uint32_t i = 0; i < num_queues_; ++i)
      if (queues[i] != nullptr && queues[i]->active() && layout[i] < 0) return false;
    return true;
  };
  bool use_packed = spec != packed && explains(packed) && !explains(spec);
  if (!explains(spec) && !explains(packed))
    LOG_WARN("virtio-balloon: enabled queues match no layout of features 0x%x", features);
  role_of_index_ = use_packed ? packed : spec;

  negotiated_ = features;
  signal_ = std::move(signal);
  queue_.fill(nullptr);
  index_.fill(-1);
  signal_pending_.assign(num_queues_, false);
  for (uint32_t i = 0; i < num_queues_; ++i) {
    int role = role_of_index_[i];
    if (role < 0) continue;
    queue_[role] = queues[i];
    index_[role] = static_cast<int>(i);
  }
  active_ = true;
  if (use_packed) LOG_INFO("virtio-balloon: driver uses contiguous queue numbering");

  // After a restore: hold the saved stats buffer again; complete any other chain still in flight
  // (their effects are idempotent). Signals for those wait for the next event (see header).
  std::optional<uint16_t> held = std::exchange(restored_stats_head_, std::nullopt);
  for (int role = 0; role < kNumRoles; ++role) {
    Virtqueue* q = queue_[role];
    if (q == nullptr || !q->active()) continue;
    for (uint16_t head : q->InFlightHeads()) {
      if (role == kStats && held == head && !stats_head_) {
        stats_head_ = head;
        continue;
      }
      auto chain = q->ReadInFlightChain(head);
      if (!chain.ok()) break;  // queue now in error; the transport notices
      HandleChainLocked(static_cast<Role>(role), *chain);
    }
  }
  if (held && stats_head_ != held)
    LOG_WARN("virtio-balloon: saved stats buffer %d is not in flight on the stats queue", *held);
  return absl::OkStatus();
}

void VirtioBalloon::Reset() {
  std::lock_guard<std::mutex> l(mu_);
  active_ = false;
  negotiated_ = 0;
  signal_ = nullptr;
  queue_.fill(nullptr);
  index_.fill(-1);
  role_of_index_.clear();
  signal_pending_.clear();
  quiesced_ = false;
  stats_request_pending_ = false;
  stats_head_.reset();
  restored_stats_head_.reset();
  guest_cmd_id_ = kBalloonCmdIdStop;
  // A reset driver starts with an empty balloon and owns all of RAM again (inflated pages come
  // back zero-filled on touch). The target and the hinting command id are host state and stay.
  actual_ = 0;
  poison_val_ = 0;
  ClearInflatedLocked();
}

// --- Queue processing -----------------------------------------------------------------------

void VirtioBalloon::ProcessQueue(uint16_t index) {
  std::lock_guard<std::mutex> l(mu_);
  if (!active_ || index >= role_of_index_.size() || role_of_index_[index] < 0) return;
  FlushPendingLocked();
  DrainLocked(static_cast<Role>(role_of_index_[index]));
  FlushPendingLocked();
}

void VirtioBalloon::DrainLocked(Role role) {
  Virtqueue* q = queue_[role];
  if (q == nullptr || !q->active()) return;
  for (;;) {
    auto chain = q->PopChain();
    if (!chain.ok() || !chain->has_value()) break;  // empty, or the queue is in error
    HandleChainLocked(role, **chain);
  }
}

void VirtioBalloon::HandleChainLocked(Role role, DescriptorChain& chain) {
  switch (role) {
    case kInflate:
    case kDeflate:
      HandleInflateLocked(chain, role == kInflate);
      break;
    case kStats:
      HandleStatsLocked(chain);
      return;  // kept (or returned) by the handler
    case kFreePage:
      HandleHintLocked(chain);
      break;
    case kReporting:
      HandleReportLocked(chain);
      break;
    default:
      break;
  }
  // The device writes nothing into any balloon buffer: used length 0.
  ReturnLocked(role, chain.head());
}

void VirtioBalloon::ReturnLocked(Role role, uint16_t head) {
  Virtqueue* q = queue_[role];
  if (q == nullptr) return;
  absl::Status s = q->AddUsed(head, 0);
  if (!s.ok()) {
    LOG_WARN_RATELIMITED("virtio-balloon: %s: %s", RoleName(role), s.ToString());
    return;
  }
  signal_pending_[index_[role]] = true;
}

void VirtioBalloon::FlushPendingLocked() {
  quiesced_ = false;
  if (stats_request_pending_) {
    stats_request_pending_ = false;
    ReturnStatsBufferLocked();
  }
  for (size_t i = 0; i < signal_pending_.size(); ++i) {
    if (!signal_pending_[i]) continue;
    signal_pending_[i] = false;
    int role = role_of_index_[i];
    if (role >= 0 && queue_[role] != nullptr && queue_[role]->NeedsNotification() && signal_)
      signal_(static_cast<uint16_t>(i));
  }
}

// Inflate: discard each page and track it; deflate: stop tracking it. Consecutive PFNs are
// discarded as one range.
void VirtioBalloon::HandleInflateLocked(const DescriptorChain& chain, bool inflate) {
  uint64_t total = chain.readable_bytes();
  if (total % 4 != 0)
    LOG_WARN_RATELIMITED("virtio-balloon: PFN array of %d bytes is not a multiple of 4", total);
  if (total > kMaxPfnBytesPerChain) {
    LOG_WARN_RATELIMITED("virtio-balloon: %d bytes of PFNs in one chain, using the first %d",
                         total, kMaxPfnBytesPerChain);
    total = kMaxPfnBytesPerChain;
  }
  total &= ~uint64_t{3};
  uint64_t run_gpa = 0, run_len = 0;
  auto flush = [&] {
    if (run_len == 0) return;
    absl::Status s = mem_->Discard(run_gpa, run_len);
    if (!s.ok()) LOG_WARN_RATELIMITED("virtio-balloon: inflate: %s", s.ToString());
    run_len = 0;
  };
  uint32_t pfns[256];
  for (uint64_t off = 0; off < total;) {
    uint64_t want = std::min<uint64_t>(sizeof(pfns), total - off);
    uint64_t got = chain.ReadAt(off, std::span<uint8_t>(reinterpret_cast<uint8_t*>(pfns), want));
    if (got != want) break;  // cannot happen: readable_bytes() covers it
    off += got;
    for (uint64_t i = 0; i < got / 4; ++i) {
      uint64_t gpa = uint64_t{pfns[i]} << kBalloonPfnShift;  // le32 on x86
      if (!mem_->Contains(gpa, kPageSize)) {
        ++ignored_pfns_;
        LOG_WARN_RATELIMITED("virtio-balloon: %s PFN 0x%x outside guest RAM ignored",
                             inflate ? "inflate" : "deflate", pfns[i]);
        continue;
      }
      bool was = TestSetLocked(gpa, inflate);
      if (!inflate) {
        if (was) --inflated_count_;
        continue;
      }
      if (!was) ++inflated_count_;
      if (run_len != 0 && gpa == run_gpa + run_len && mem_->Contains(run_gpa, run_len + kPageSize)) {
        run_len += kPageSize;
      } else {
        flush();
        run_gpa = gpa;
        run_len = kPageSize;
      }
    }
  }
  flush();
}

// statsq (spec "Memory Statistics"): the driver's buffer carries tagged values; the device keeps
// it and returns it (used length 0) to ask for new values, the driver then refills and re-adds it.
void VirtioBalloon::HandleStatsLocked(const DescriptorChain& chain) {
  uint64_t n = std::min<uint64_t>(chain.readable_bytes() / kStatEntryBytes, kMaxStatEntries);
  if (n > 0) {
    std::array<std::optional<uint64_t>, kBalloonStatTags> values{};
    for (uint64_t i = 0; i < n; ++i) {
      uint8_t e[kStatEntryBytes];
      if (chain.ReadAt(i * kStatEntryBytes, std::span<uint8_t>(e, sizeof(e))) != sizeof(e)) break;
      uint16_t tag;
      uint64_t val;
      std::memcpy(&tag, e, 2);
      std::memcpy(&val, e + 2, 8);
      if (tag < kBalloonStatTags) values[tag] = val;  // unknown (newer) tags are skipped
    }
    stats_ = values;
    stats_time_ = absl::Now();
  }
  // A driver has one stats buffer; should it send another, give the older one back.
  if (stats_head_) ReturnLocked(kStats, *stats_head_);
  stats_head_ = chain.head();
}

bool VirtioBalloon::ReturnStatsBufferLocked() {
  if (!active_ || !stats_head_ || queue_[kStats] == nullptr) return false;
  uint16_t head = *std::exchange(stats_head_, std::nullopt);
  ReturnLocked(kStats, head);
  return true;
}

// reporting_vq (spec "Free Page Reporting"): every buffer is a range of free guest memory; the
// device may drop its contents (the guest expects zeros or old data on reuse).
void VirtioBalloon::HandleReportLocked(const DescriptorChain& chain) {
  for (const auto* list : {&chain.writable(), &chain.readable()}) {
    for (const GuestBuffer& b : *list) {
      uint64_t start = AlignUp(b.gpa), end = AlignDown(b.gpa + b.len);
      if (end <= start) continue;
      absl::Status s = mem_->Discard(start, end - start);
      if (!s.ok()) {
        LOG_WARN_RATELIMITED("virtio-balloon: report: %s", s.ToString());
        continue;
      }
      bytes_reported_ += end - start;
    }
  }
}

// free_page_vq (spec "Free Page Hinting"): a device-readable buffer carries the le32 command id
// the driver's following hints belong to (or STOP when it is done); device-writable buffers are
// the hinted free ranges themselves, which the device must neither read nor write. Hints are
// accepted only while the last id the driver sent is the current cmd_id and a sink is set.
void VirtioBalloon::HandleHintLocked(const DescriptorChain& chain) {
  if (chain.readable_bytes() >= 4) {
    uint32_t id = 0;
    chain.ReadAt(0, std::span<uint8_t>(reinterpret_cast<uint8_t*>(&id), 4));
    if (id == kBalloonCmdIdStop) {
      if (sink_ != nullptr && guest_cmd_id_ == cmd_id_ && cmd_id_ >= kBalloonCmdIdFirst)
        sink_->OnHintingDone(cmd_id_);
      guest_cmd_id_ = kBalloonCmdIdStop;
    } else {
      guest_cmd_id_ = id;  // a stale id makes the hints that follow stale as well
    }
  } else if (chain.readable_bytes() > 0) {
    LOG_WARN_RATELIMITED("virtio-balloon: %d-byte hint command id ignored", chain.readable_bytes());
  }
  bool current = sink_ != nullptr && cmd_id_ >= kBalloonCmdIdFirst && guest_cmd_id_ == cmd_id_;
  if (!current) return;
  for (const GuestBuffer& b : chain.writable()) {
    // Only whole pages are free for the migration code's purposes.
    uint64_t start = AlignUp(b.gpa), end = AlignDown(b.gpa + b.len);
    if (end <= start) continue;
    sink_->OnHintRangeFree(start, end - start);
    bytes_hinted_ += end - start;
  }
}

// --- Host control ---------------------------------------------------------------------------

void VirtioBalloon::SetTarget(uint64_t bytes) {
  {
    std::lock_guard<std::mutex> l(mu_);
    num_pages_ = static_cast<uint32_t>(std::min<uint64_t>(bytes >> kBalloonPfnShift, UINT32_MAX));
  }
  NotifyConfigChanged();
}

uint64_t VirtioBalloon::target_bytes() const {
  std::lock_guard<std::mutex> l(mu_);
  return uint64_t{num_pages_} << kBalloonPfnShift;
}

uint64_t VirtioBalloon::actual_bytes() const {
  std::lock_guard<std::mutex> l(mu_);
  return uint64_t{actual_} << kBalloonPfnShift;
}

uint64_t VirtioBalloon::inflated_pages() const {
  std::lock_guard<std::mutex> l(mu_);
  return inflated_count_;
}

bool VirtioBalloon::IsInflated(uint64_t gpa) const {
  std::lock_guard<std::mutex> l(mu_);
  const RegionBits* r = FindBitsLocked(gpa);
  if (r == nullptr) return false;
  uint64_t pg = (gpa - r->gpa) / kPageSize;
  return (r->bits[pg / 64] >> (pg % 64)) & 1;
}

bool VirtioBalloon::RequestStats() {
  std::lock_guard<std::mutex> l(mu_);
  if (quiesced_) {
    // Returning the buffer would write the used ring: wait for the VM to run again.
    if (!active_ || !stats_head_) return false;
    stats_request_pending_ = true;
    return true;
  }
  bool sent = ReturnStatsBufferLocked();
  FlushPendingLocked();
  return sent;
}

void VirtioBalloon::OnTimer() {
  uint64_t expirations;
  (void)!::read(timer_.get(), &expirations, sizeof(expirations));
  std::lock_guard<std::mutex> l(mu_);
  if (!active_) return;
  // The loop only runs while the VM runs, so a tick also ends a quiesce.
  FlushPendingLocked();
  ReturnStatsBufferLocked();
  FlushPendingLocked();
}

std::optional<BalloonStats> VirtioBalloon::GetStats() const {
  std::lock_guard<std::mutex> l(mu_);
  if (stats_time_ == absl::InfinitePast()) return std::nullopt;
  BalloonStats s;
  std::optional<uint64_t>* fields[kBalloonStatTags] = {
      &s.swap_in,      &s.swap_out,         &s.major_faults,     &s.minor_faults,
      &s.free_memory,  &s.total_memory,     &s.available_memory, &s.disk_caches,
      &s.hugetlb_allocations, &s.hugetlb_failures, &s.oom_kills, &s.alloc_stalls,
      &s.async_scans,  &s.direct_scans,     &s.async_reclaims,   &s.direct_reclaims};
  for (int i = 0; i < kBalloonStatTags; ++i) *fields[i] = stats_[i];
  s.timestamp = stats_time_;
  return s;
}

absl::StatusOr<uint32_t> VirtioBalloon::StartFreePageHinting(FreePageHintSink* sink) {
  if (!(features_ & Bit(kBalloonFFreePageHint)))
    return absl::FailedPreconditionError("virtio-balloon: free page hinting not offered");
  if (sink == nullptr) return absl::InvalidArgumentError("virtio-balloon: no hint sink");
  uint32_t id;
  {
    std::lock_guard<std::mutex> l(mu_);
    id = next_cmd_id_;
    next_cmd_id_ = next_cmd_id_ == UINT32_MAX ? kBalloonCmdIdFirst : next_cmd_id_ + 1;
    cmd_id_ = id;
    sink_ = sink;
  }
  NotifyConfigChanged();
  return id;
}

void VirtioBalloon::StopFreePageHinting() {
  {
    std::lock_guard<std::mutex> l(mu_);
    cmd_id_ = kBalloonCmdIdStop;
    sink_ = nullptr;
  }
  NotifyConfigChanged();
}

void VirtioBalloon::FinishFreePageHinting() {
  {
    std::lock_guard<std::mutex> l(mu_);
    cmd_id_ = kBalloonCmdIdDone;
    sink_ = nullptr;
  }
  NotifyConfigChanged();
}

uint32_t VirtioBalloon::free_page_hint_cmd_id() const {
  std::lock_guard<std::mutex> l(mu_);
  return cmd_id_;
}

uint64_t VirtioBalloon::bytes_reported() const {
  std::lock_guard<std::mutex> l(mu_);
  return bytes_reported_;
}

uint64_t VirtioBalloon::bytes_hinted() const {
  std::lock_guard<std::mutex> l(mu_);
  return bytes_hinted_;
}

uint64_t VirtioBalloon::ignored_pfns() const {
  std::lock_guard<std::mutex> l(mu_);
  return ignored_pfns_;
}

int VirtioBalloon::queue_index(Role role) const {
  std::lock_guard<std::mutex> l(mu_);
  return role < kNumRoles ? index_[role] : -1;
}

// --- Inflated-page bitmap -------------------------------------------------------------------

const VirtioBalloon::RegionBits* VirtioBalloon::FindBitsLocked(uint64_t gpa) const {
  for (const RegionBits& r : inflated_)
    if (gpa >= r.gpa && (gpa - r.gpa) / kPageSize < r.pages) return &r;
  return nullptr;
}

VirtioBalloon::RegionBits* VirtioBalloon::FindBitsLocked(uint64_t gpa) {
  return const_cast<RegionBits*>(std::as_const(*this).FindBitsLocked(gpa));
}

bool VirtioBalloon::TestSetLocked(uint64_t gpa, bool value) {
  RegionBits* r = FindBitsLocked(gpa);
  if (r == nullptr) return false;
  uint64_t pg = (gpa - r->gpa) / kPageSize;
  uint64_t mask = uint64_t{1} << (pg % 64);
  bool old = r->bits[pg / 64] & mask;
  if (value)
    r->bits[pg / 64] |= mask;
  else
    r->bits[pg / 64] &= ~mask;
  return old;
}

void VirtioBalloon::ClearInflatedLocked() {
  for (RegionBits& r : inflated_) std::fill(r.bits.begin(), r.bits.end(), 0);
  inflated_count_ = 0;
}

// --- Save / restore -------------------------------------------------------------------------

void VirtioBalloon::Quiesce() {
  // All work is synchronous: nothing is left running. Remember that the VM is paused so that
  // RequestStats() does not write the used ring until it runs again.
  std::lock_guard<std::mutex> l(mu_);
  quiesced_ = true;
}

std::string VirtioBalloon::SaveState() const {
  std::lock_guard<std::mutex> l(mu_);
  BalloonState st;
  st.set_num_pages(num_pages_);
  st.set_actual(actual_);
  st.set_free_page_hint_cmd_id(cmd_id_);
  st.set_poison_val(poison_val_);
  for (const RegionBits& r : inflated_) {
    uint64_t pg = 0;
    while (pg < r.pages) {
      if (r.bits[pg / 64] == 0 && pg % 64 == 0) {  // skip empty words quickly
        pg += 64;
        continue;
      }
      if (!((r.bits[pg / 64] >> (pg % 64)) & 1)) {
        ++pg;
        continue;
      }
      uint64_t first = pg;
      while (pg < r.pages && ((r.bits[pg / 64] >> (pg % 64)) & 1)) ++pg;
      BalloonPageRange* range = st.add_inflated();
      range->set_first_pfn(r.gpa / kPageSize + first);
      range->set_num_pages(pg - first);
    }
  }
  if (stats_head_) {
    st.set_stats_buffer_held(true);
    st.set_stats_buffer_head(*stats_head_);
  }
  st.set_next_cmd_id(next_cmd_id_);
  for (int tag = 0; tag < kBalloonStatTags; ++tag) {
    if (!stats_[tag]) continue;
    BalloonStat* s = st.add_last_stats();
    s->set_tag(tag);
    s->set_value(*stats_[tag]);
  }
  if (stats_time_ != absl::InfinitePast()) st.set_last_stats_unix_ns(absl::ToUnixNanos(stats_time_));
  st.set_bytes_reported(bytes_reported_);
  st.set_bytes_hinted(bytes_hinted_);
  st.set_ignored_pfns(ignored_pfns_);
  return st.SerializeAsString();
}

absl::Status VirtioBalloon::RestoreState(const std::string& state) {
  BalloonState st;
  if (!st.ParseFromString(state))
    return absl::InvalidArgumentError("virtio-balloon restore: unparsable state");
  if (st.stats_buffer_held() && st.stats_buffer_head() >= kMaxQueueSize)
    return absl::InvalidArgumentError("virtio-balloon restore: bad stats buffer head");
  if (st.next_cmd_id() != 0 && st.next_cmd_id() < kBalloonCmdIdFirst)
    return absl::InvalidArgumentError("virtio-balloon restore: bad next command id");
  for (const BalloonStat& s : st.last_stats())
    if (s.tag() >= kBalloonStatTags)
      return absl::InvalidArgumentError("virtio-balloon restore: bad stats tag");
  constexpr uint64_t kMaxPfn = uint64_t{1} << 40;  // far beyond any RAM; keeps shifts exact
  uint64_t total_pages = 0;  // ranges do not overlap, so they cannot add up to more than RAM
  for (const BalloonPageRange& r : st.inflated()) {
    total_pages += std::min(r.num_pages(), kMaxPfn);
    if (total_pages > mem_->ram_bytes() / kPageSize)
      return absl::InvalidArgumentError("virtio-balloon restore: inflated ranges exceed RAM");
    if (r.num_pages() == 0 || r.first_pfn() >= kMaxPfn || r.num_pages() >= kMaxPfn ||
        !mem_->Contains(r.first_pfn() * kPageSize, r.num_pages() * kPageSize))
      return absl::InvalidArgumentError(absl::StrFormat(
          "virtio-balloon restore: inflated range pfn 0x%x +%d outside guest RAM", r.first_pfn(),
          r.num_pages()));
  }

  std::lock_guard<std::mutex> l(mu_);
  num_pages_ = st.num_pages();
  actual_ = st.actual();
  cmd_id_ = st.free_page_hint_cmd_id();
  poison_val_ = st.poison_val();
  ClearInflatedLocked();
  for (const BalloonPageRange& r : st.inflated())
    for (uint64_t i = 0; i < r.num_pages(); ++i)
      if (!TestSetLocked((r.first_pfn() + i) * kPageSize, true)) ++inflated_count_;
  stats_head_.reset();
  restored_stats_head_.reset();
  if (st.stats_buffer_held()) restored_stats_head_ = static_cast<uint16_t>(st.stats_buffer_head());
  next_cmd_id_ = st.next_cmd_id() == 0 ? kBalloonCmdIdFirst : st.next_cmd_id();
  stats_.fill(std::nullopt);
  for (const BalloonStat& s : st.last_stats()) stats_[s.tag()] = s.value();
  stats_time_ = st.last_stats_unix_ns() != 0 ? absl::FromUnixNanos(st.last_stats_unix_ns())
                                             : absl::InfinitePast();
  bytes_reported_ = st.bytes_reported();
  bytes_hinted_ = st.bytes_hinted();
  ignored_pfns_ = st.ignored_pfns();
  sink_ = nullptr;  // a hinting session does not survive a restore
  guest_cmd_id_ = kBalloonCmdIdStop;
  quiesced_ = false;
  stats_request_pending_ = false;
  return absl::OkStatus();
}

}  // namespace microvmm::virtio
