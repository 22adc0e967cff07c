#include "migration/precopy/source.h"

#include <algorithm>
#include <bit>
#include <random>
#include <thread>
#include <unistd.h>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "api/address.h"
#include "migration/dirty/dirty_tracker.h"
#include "migration/precopy/destination.h"
#include "migration/precopy/adaptive.h"
#include "migration/precopy/free_page_filter.h"
#include "migration/stream/page_codec.h"
#include "proto/migration.grpc.pb.h"
#include "vmm/base/log.h"
#include "vmm/memory/guest_memory.h"

namespace microvmm::migration {
namespace {

constexpr int kPagesPerBatch = 64;
// Longest wait for the guest's free-page hints before the first pre-copy pass.
constexpr absl::Duration kHintWait = absl::Seconds(3);
// Passthrough devices' pre-copy data per control message (the destination takes up to 1 MiB).
constexpr size_t kDeviceDataChunk = size_t{1} << 20;

std::string NewMigrationId() {
  std::random_device rd;
  return absl::StrFormat("%08x%08x", rd(), rd());
}

absl::Status FromGrpc(const grpc::Status& s, absl::string_view what) {
  if (s.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(s.error_code()),
                      absl::StrCat(what, ": ", s.error_message()));
}

// Token bucket shared by all page streams.
class BandwidthLimiter {
 public:
  explicit BandwidthLimiter(uint64_t bytes_per_s) : rate_(bytes_per_s) {}
  void Acquire(uint64_t bytes, const std::atomic<bool>& cancel) {
    if (rate_ == 0) return;
    absl::Duration wait;
    {
      absl::MutexLock lock(&mu_);
      absl::Time now = absl::Now();
      if (last_ == absl::InfinitePast()) last_ = now;
      tokens_ = std::min<double>(tokens_ + absl::ToDoubleSeconds(now - last_) * rate_,
                                 std::max<double>(rate_ / 10.0, 256 * 1024));
      last_ = now;
      tokens_ -= bytes;
      wait = tokens_ < 0 ? absl::Seconds(-tokens_ / rate_) : absl::ZeroDuration();
    }
    while (wait > absl::ZeroDuration() && !cancel) {
      absl::Duration step = std::min(wait, absl::Milliseconds(50));
      absl::SleepFor(step);
      wait -= step;
    }
  }

 private:
  const uint64_t rate_;
  absl::Mutex mu_;
  double tokens_ = 0;
  absl::Time last_ = absl::InfinitePast();
};

}  // namespace

absl::StatusOr<SourceOptions> SourceOptionsFromRequest(const StartMigrationRequest& req) {
  SourceOptions o;
  if (req.destination().empty()) return absl::InvalidArgumentError("destination is required");
  auto addr = ParseApiAddress(req.destination());
  if (!addr.ok()) return addr.status();
  o.destination = addr->grpc;
  if (req.downtime_limit_ms() != 0) o.downtime_limit = absl::Milliseconds(req.downtime_limit_ms());
  o.bandwidth_limit = req.bandwidth_limit_bytes_per_s();
  if (req.bandwidth_limit_bytes_per_s() != 0 && req.bandwidth_limit_bytes_per_s() < 64 * 1024)
    return absl::InvalidArgumentError("bandwidth limit below 64 KiB/s");
  if (req.streams() != 0) o.streams = req.streams();
  if (o.streams > kMaxPageStreams)
    return absl::InvalidArgumentError(absl::StrCat("streams must be 1..", kMaxPageStreams));
  o.max_iterations = req.max_iterations();
  if (!StartMigrationRequest::Mode_IsValid(req.mode()))
    return absl::InvalidArgumentError("unknown migration mode");
  o.postcopy = req.mode() == StartMigrationRequest::POSTCOPY;
  o.postcopy_after_iterations = req.postcopy_after_iterations();
  if (o.postcopy && o.postcopy_after_iterations != 0)
    return absl::InvalidArgumentError(
        "postcopy_after_iterations applies to a pre-copy; mode POSTCOPY switches at once");
  if (req.has_policy()) {
    if (o.postcopy)
      return absl::InvalidArgumentError(
          "an adaptive policy steers pre-copy passes; mode POSTCOPY runs none");
    auto p = ValidatePolicyConfig(req.policy());
    if (!p.ok())
      return absl::InvalidArgumentError(absl::StrCat("policy: ", p.status().message()));
    o.policy = *p;
  }
  return o;
}

// One migration attempt: connections, page streams, iterations, switchover.
class MigrationSource::Session {
 public:
  explicit Session(MigrationSource* owner)
      : o_(owner), vm_(owner->vm_), mem_(owner->vm_->memory()),
        limiter_(owner->options_.bandwidth_limit), destination_(owner->options_.destination) {}

  absl::Status Run();
  void CancelRpcs() {
    absl::MutexLock lock(&ctx_mu_);
    cancelled_ = true;
    if (control_ctx_) control_ctx_->TryCancel();
    for (auto& s : streams_)
      if (s->ctx) s->ctx->TryCancel();
  }
  // Counters that move during a pass (progress between dirty syncs).
  void FillLive(MigrationProgress& p) const {
    p.set_bytes_sent(std::max<uint64_t>(p.bytes_sent(), bytes_sent_));
    p.set_pages_sent(std::max<uint64_t>(p.pages_sent(), pages_sent_));
    p.set_zero_pages(std::max<uint64_t>(p.zero_pages(), zero_pages_));
    p.set_hole_pages_not_sent(std::max<uint64_t>(p.hole_pages_not_sent(), holes_not_sent_));
    uint64_t done_in_pass = pages_sent_ + holes_not_sent_ - pass_start_pages_;
    uint64_t total = pass_pages_;
    if (total > 0) p.set_remaining_pages(total > done_in_pass ? total - done_in_pass : 0);
    p.set_elapsed_ms(absl::ToInt64Milliseconds(absl::Now() - start_));
    FillHints(p);
    FillEncoding(p);
  }
  // Free-page hint counters, if the VM's balloon hints.
  void FillEncoding(MigrationProgress& p) const {
    if (adaptive_ == nullptr) return;
    p.set_compressed_pages(adaptive_->encoder().compressed_pages());
    p.set_delta_pages(adaptive_->encoder().delta_pages());
  }
  void FillHints(MigrationProgress& p) const {
    if (hints_) {
      p.set_free_page_hint_bytes(hints_->hinted_bytes());
      p.set_free_page_skipped_bytes(hints_->skipped_bytes());
    }
  }
  // Gives hinted pages back to the guest if a hinting session was started (idempotent).
  void EndHints() {
    if (hints_active_) vm_->FinishFreePageHints();
    hints_active_ = false;
  }
  // Outcome after Run(): was the VM handed over (Ready received)?
  bool committed() const { return committed_.load(); }
  bool paused_by_us() const { return paused_by_us_; }
  // The destination runs the VM in post-copy (Resumed received): a failure now can be recovered.
  bool postcopy_live() const { return postcopy_live_.load(); }
  // Post-copy recovery to `destination` after a failed post-copy (see migration.proto).
  absl::Status Recover(const std::string& destination);

 private:
  struct Stream {
    std::shared_ptr<grpc::Channel> channel;
    std::unique_ptr<Migration::Stub> stub;
    std::unique_ptr<grpc::ClientContext> ctx;
    PagesSummary summary;
    std::unique_ptr<grpc::ClientWriter<PageBatch>> writer;
    uint64_t pages_sent = 0;
    std::vector<uint64_t> todo;
    std::vector<uint64_t> sent;  // pages of `todo` actually sent in this pass
    std::vector<uint64_t> nonzero;  // pages of `sent` that went with content (not ZERO)
    size_t stopped_at = 0;       // todo[stopped_at..] not sent (a switch to post-copy)
    absl::Status status;
    bool finished = false;       // writer->Finish() was called
  };
  using ControlStream = grpc::ClientReaderWriter<SourceMessage, DestinationMessage>;

  // Post-copy, after the pre-copy passes (if any): pause, hand the state over with maps of what
  // the destination already has, then answer demand lanes and push the rest.
  // `stale`: pages harvested dirty but not sent yet (the final harvest is added here).
  absl::Status RunPostcopy(ControlStream& control, bool tracking, uint32_t iteration,
                           DirtySet& stale);
  // After Go/Resumed: pushes on streams_[push_base..], answers lanes, PostcopyComplete, Done.
  absl::Status PostcopyLoop(ControlStream& control, size_t push_base);
  // Opens the demand lanes (a connection of their own) and starts serving them.
  absl::Status OpenLanes(uint32_t nlanes);
  absl::Status OpenPageStream(uint32_t index);
  // Serves one demand lane until the destination closes it.
  void ServeLane(uint32_t lane);
  // Pushes missing pages on push stream `index` until none is left.
  absl::Status PushStream(uint32_t index);
  // Next pages to push (at most `max`), following the locality hint; empty when all are out.
  std::vector<uint64_t> NextPushBatch(size_t max);
  // Marks `gpa` as on its way to the destination; false if it already was.
  bool MarkDelivered(uint64_t gpa);
  bool PageIndex(uint64_t gpa, uint64_t* index) const;

  struct LaneConn {
    std::unique_ptr<grpc::ClientContext> ctx;
    std::unique_ptr<grpc::ClientReaderWriter<PageBatch, PageRequest>> stream;
    std::thread thread;
    absl::Mutex write_mu;
  };

  absl::StatusOr<std::shared_ptr<grpc::Channel>> Connect();
  absl::Status OpenStreams();
  // Sends every page in `dirty` (and clears it), spread over the streams in parallel.
  absl::Status SendPages(DirtySet& dirty, uint32_t iteration);
  absl::Status SendStream(uint32_t index, uint32_t iteration);
  absl::Status CloseStreams();
  void Progress(const std::function<void(MigrationProgress&)>& fn) {
    absl::MutexLock lock(&o_->mu_);
    fn(o_->progress_);
    o_->progress_.set_elapsed_ms(absl::ToInt64Milliseconds(absl::Now() - start_));
  }
  bool Cancelled() const { return o_->cancel_.load(); }

  MigrationSource* const o_;
  Vm* const vm_;
  GuestMemory& mem_;
  BandwidthLimiter limiter_;
  std::string destination_;  // changes only between attempts (recovery), on the run thread
  std::atomic<bool> postcopy_live_{false};
  absl::Time start_ = absl::Now();
  absl::Mutex ctx_mu_;
  bool cancelled_ ABSL_GUARDED_BY(ctx_mu_) = false;
  std::unique_ptr<grpc::ClientContext> control_ctx_;
  std::vector<std::unique_ptr<Stream>> streams_;
  std::atomic<uint64_t> bytes_sent_{0}, pages_sent_{0}, zero_pages_{0};
  std::atomic<uint64_t> pass_pages_{0}, pass_start_pages_{0};  // the pass being sent
  // Pages in a hole (never touched, ballooned out, or reported free by the guest and discarded)
  // that the destination already holds as zeros: never sent (counted here instead).
  std::atomic<uint64_t> holes_not_sent_{0};
  // Per RAM region, the [start, end) offsets of its memfd that hold data at the start of this
  // pass (SEEK_DATA/SEEK_HOLE). A page in a hole was never touched: it is sent as a ZERO tag
  // without reading it (reading would allocate it). A write after the snapshot makes the page
  // dirty, so it goes again in the next pass.
  std::vector<std::vector<std::pair<uint64_t, uint64_t>>> extents_;
  void SnapshotExtents();
  bool InHole(uint64_t gpa) const;
  // Encodes the page at `gpa` into `rec`: a ZERO tag for a page in a hole of the snapshot (not
  // read, which would allocate it), else its content. Returns the record's size on the wire.
  absl::StatusOr<uint64_t> EncodeGuestPage(uint64_t gpa, PageRecord* rec);
  std::atomic<bool> committed_{false};
  bool paused_by_us_ = false;
  DirtySet sent_;    // pages sent at least once in pre-copy passes
  DirtySet unsent_;  // harvested dirty, then left unsent by a pass cut short for post-copy
  // Pages ever sent with content: only those need a ZERO record when they become a hole (a fresh
  // destination's RAM is all zeros; see ReceivedPages). Read-only while a pass runs.
  DirtySet nonzero_;
  // Post-copy: pages written after the last extents snapshot (empty before post-copy; in
  // pre-copy such a page is dirty and simply goes again in the next pass).
  DirtySet written_after_snapshot_;
  // Post-copy.
  std::shared_ptr<grpc::Channel> lane_channel_;
  std::vector<std::unique_ptr<LaneConn>> lanes_;
  std::vector<std::pair<uint64_t, uint64_t>> page_base_;  // per region: first gpa, first index
  uint64_t total_pages_ = 0;
  std::unique_ptr<std::atomic<uint64_t>[]> push_todo_;   // bit per page: missing at the destination
  std::unique_ptr<std::atomic<uint64_t>[]> delivered_;   // bit per page: pushed or answered
  absl::Mutex push_mu_;
  uint64_t push_cursor_ ABSL_GUARDED_BY(push_mu_) = 0;   // page index
  uint64_t push_left_ ABSL_GUARDED_BY(push_mu_) = 0;
  std::atomic<uint64_t> locality_hint_{UINT64_MAX};      // page index after the last demand
  uint64_t last_hint_ ABSL_GUARDED_BY(push_mu_) = UINT64_MAX;
  std::atomic<uint64_t> pulled_pages_{0}, pushed_pages_{0};
  PostcopyStats last_stats_;  // from the destination (reader thread only, then copied)
  absl::Mutex stats_mu_;
  std::unique_ptr<FreePageFilter> hints_;  // VM with a hinting balloon
  std::unique_ptr<AdaptiveMigration> adaptive_;  // with a policy (SourceOptions::policy)
 public:
  void ReleaseThrottle() {
    if (adaptive_) adaptive_->ReleaseThrottle();
  }
 private:
  bool hints_active_ = false;
};

absl::StatusOr<std::shared_ptr<grpc::Channel>> MigrationSource::Session::Connect() {
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);  // one connection per channel
  args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 2000);
  args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 3000);
  args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
  args.SetMaxSendMessageSize(-1);
  auto creds = o_->options_.credentials ? o_->options_.credentials
                                        : grpc::InsecureChannelCredentials();
  auto ch = grpc::CreateCustomChannel(destination_, creds, args);
  // Short waits so that a cancel is noticed while connecting.
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (!ch->WaitForConnected(absl::ToChronoTime(
      std::min(deadline, absl::Now() + absl::Milliseconds(100))))) {
    if (Cancelled()) return absl::CancelledError("migration cancelled while connecting");
    if (absl::Now() >= deadline)
      return absl::UnavailableError(
          absl::StrCat("cannot connect to the destination ", destination_,
                       " (is `vmm --incoming` listening there?)"));
  }
  return ch;
}

absl::Status MigrationSource::Session::OpenStreams() {
  for (uint32_t i = 0; i < o_->options_.streams; ++i)
    if (absl::Status s = OpenPageStream(i); !s.ok()) return s;
  return absl::OkStatus();
}

absl::Status MigrationSource::Session::SendStream(uint32_t index, uint32_t iteration) {
  Stream& s = *streams_[index];
  PageBatch batch;
  batch.set_migration_id(o_->id_);
  batch.set_stream(index);
  batch.set_iteration(iteration);
  uint64_t batch_bytes = 0;
  auto flush = [&]() -> absl::Status {
    if (batch.pages_size() == 0) return absl::OkStatus();
    limiter_.Acquire(batch_bytes, o_->cancel_);
    if (Cancelled()) return absl::CancelledError("migration cancelled");
    if (!s.writer->Write(batch)) {
      grpc::Status st = s.writer->Finish();
      return FromGrpc(st.ok() ? grpc::Status(grpc::StatusCode::UNAVAILABLE, "stream closed") : st,
                      "page stream to the destination failed");
    }
    s.pages_sent += batch.pages_size();
    pages_sent_ += batch.pages_size();
    bytes_sent_ += batch_bytes;
    batch.clear_pages();
    batch_bytes = 0;
    return absl::OkStatus();
  };
  PageEncoder* encoder =
      adaptive_ != nullptr && adaptive_->encoder().active() ? &adaptive_->encoder() : nullptr;
  std::vector<uint64_t> pending;
  auto encode_pending = [&]() -> absl::Status {
    if (pending.empty()) return absl::OkStatus();
    const int before = batch.pages_size();
    auto size = encoder->Encode(
        mem_, pending, [this](uint64_t gpa) { return InHole(gpa); }, iteration == 0,
        batch.mutable_pages());
    if (!size.ok()) return size.status();
    batch_bytes += *size;
    for (int r = before; r < batch.pages_size(); ++r) {
      if (batch.pages(r).codec() == ZERO)
        ++zero_pages_;
      else
        s.nonzero.push_back(batch.pages(r).gpa());
    }
    pending.clear();
    return absl::OkStatus();
  };
  s.stopped_at = s.todo.size();
  for (size_t i = 0; i < s.todo.size(); ++i) {
    const uint64_t gpa = s.todo[i];
    if (o_->postcopy_requested_.load()) {  // the rest goes in post-copy
      s.stopped_at = i;
      break;
    }
    if (hints_ && hints_->Skip(gpa)) continue;  // hinted free, not written since
    if (!nonzero_.Test(gpa) && InHole(gpa)) {      // the destination has it as zeros already
      ++holes_not_sent_;
      continue;
    }
    s.sent.push_back(gpa);
    if (encoder != nullptr) {  // adaptive: compression / delta, a batch at a time
      pending.push_back(gpa);
      if (pending.size() >= kPagesPerBatch)
        if (absl::Status st = encode_pending(); !st.ok()) return st;
      if (batch.pages_size() >= kPagesPerBatch)
        if (absl::Status st = flush(); !st.ok()) return st;
      continue;
    }
    PageRecord* rec = batch.add_pages();
    auto size = EncodeGuestPage(gpa, rec);
    if (!size.ok()) return size.status();
    batch_bytes += *size;
    if (rec->codec() == ZERO)
      ++zero_pages_;
    else
      s.nonzero.push_back(gpa);
    if (batch.pages_size() >= kPagesPerBatch)
      if (absl::Status st = flush(); !st.ok()) return st;
  }
  if (absl::Status st = encode_pending(); !st.ok()) return st;
  return flush();
}

void MigrationSource::Session::SnapshotExtents() {
  extents_.assign(mem_.regions().size(), {});
  for (size_t i = 0; i < mem_.regions().size(); ++i) {
    const auto& r = mem_.regions()[i];
    off_t pos = 0;
    for (;;) {
      off_t data = lseek(r.memfd.get(), pos, SEEK_DATA);
      if (data < 0 || static_cast<uint64_t>(data) >= r.size) break;  // ENXIO: no more data
      off_t hole = lseek(r.memfd.get(), data, SEEK_HOLE);
      if (hole < 0) hole = r.size;
      extents_[i].push_back({static_cast<uint64_t>(data), static_cast<uint64_t>(hole)});
      pos = hole;
      if (static_cast<uint64_t>(pos) >= r.size) break;
    }
    if (extents_[i].empty() && lseek(r.memfd.get(), 0, SEEK_DATA) < 0 && errno != ENXIO)
      extents_[i].push_back({0, r.size});  // SEEK_DATA unsupported: treat all as data
  }
}

absl::StatusOr<uint64_t> MigrationSource::Session::EncodeGuestPage(uint64_t gpa, PageRecord* rec) {
  if (InHole(gpa) && !written_after_snapshot_.Test(gpa)) return EncodeZeroPage(gpa, rec);
  auto host = mem_.HostPtr(gpa, kPageSize);
  if (!host.ok()) return host.status();
  return EncodePage(gpa, *host, rec);
}

bool MigrationSource::Session::InHole(uint64_t gpa) const {
  for (size_t i = 0; i < mem_.regions().size() && i < extents_.size(); ++i) {
    const auto& r = mem_.regions()[i];
    if (gpa < r.gpa || gpa - r.gpa >= r.size) continue;
    uint64_t off = gpa - r.gpa;
    const auto& ex = extents_[i];
    auto it = std::upper_bound(ex.begin(), ex.end(), std::make_pair(off, UINT64_MAX));
    if (it == ex.begin()) return true;
    --it;
    return off >= it->second;
  }
  return false;
}

absl::Status MigrationSource::Session::SendPages(DirtySet& dirty, uint32_t iteration) {
  const uint32_t n = streams_.size();
  pass_start_pages_ = pages_sent_.load() + holes_not_sent_.load();
  pass_pages_ = dirty.Count();
  SnapshotExtents();
  for (auto& s : streams_) {
    s->todo.clear();
    s->sent.clear();
    s->nonzero.clear();
  }
  dirty.ForEachSetPage(
      [&](uint64_t gpa) { streams_[StreamForPage(gpa, n)]->todo.push_back(gpa); });
  dirty.ClearAll();
  std::vector<std::thread> workers;
  for (size_t i = 1; i < streams_.size(); ++i)
    workers.emplace_back([this, i, iteration] { streams_[i]->status = SendStream(i, iteration); });
  streams_[0]->status = SendStream(0, iteration);
  for (auto& w : workers) w.join();
  for (auto& s : streams_) {
    for (uint64_t gpa : s->sent) sent_.Set(gpa);
    for (uint64_t gpa : s->nonzero) nonzero_.Set(gpa);
    for (size_t i = s->stopped_at; i < s->todo.size(); ++i) unsent_.Set(s->todo[i]);
  }
  pass_pages_ = 0;
  for (auto& s : streams_)
    if (!s->status.ok()) return s->status;
  return absl::OkStatus();
}

absl::Status MigrationSource::Session::CloseStreams() {
  for (uint32_t i = 0; i < streams_.size(); ++i) {
    Stream& s = *streams_[i];
    s.writer->WritesDone();
    grpc::Status st = s.writer->Finish();
    if (!st.ok()) return FromGrpc(st, absl::StrCat("page stream ", i));
    if (s.summary.pages() != s.pages_sent)
      return absl::DataLossError(absl::StrFormat("page stream %d: destination got %d of %d pages",
                                                 i, s.summary.pages(), s.pages_sent));
  }
  return absl::OkStatus();
}

absl::Status MigrationSource::Session::Run() {
  const SourceOptions& opt = o_->options_;
  DirtyTracker& tracker = vm_->dirty_tracker();
  Progress([&](MigrationProgress& p) {
    p.set_phase(MIGRATION_SETUP);
    p.set_dirty_tracking(tracker.mode() == DirtyTracker::Mode::kRing ? "ring" : "bitmap");
    p.set_ram_bytes(mem_.ram_bytes());
  });
  auto ch = Connect();
  if (!ch.ok()) return ch.status();
  auto stub = Migration::NewStub(*ch);
  {
    absl::MutexLock lock(&ctx_mu_);
    if (cancelled_) return absl::CancelledError("migration cancelled");
    control_ctx_ = std::make_unique<grpc::ClientContext>();
  }
  auto control = stub->Control(control_ctx_.get());
  auto control_error = [&](absl::string_view what) {
    grpc::Status st = control->Finish();
    if (!st.ok()) return FromGrpc(st, "destination");
    return absl::UnavailableError(absl::StrCat("destination closed the control stream ", what));
  };

  SourceMessage msg;
  MigrationHeader* h = msg.mutable_header();
  h->set_format_version(kMigrationFormatVersion);
  h->set_migration_id(o_->id_);
  *h->mutable_config() = vm_->config();
  for (const auto& r : mem_.regions()) {
    MemoryRegionInfo* ri = h->add_regions();
    ri->set_gpa(r.gpa);
    ri->set_size(r.size);
  }
  h->set_page_size(kPageSize);
  h->set_page_streams(opt.streams);
  h->set_vm_state_version(1);
  char host[256] = {};
  gethostname(host, sizeof(host) - 1);
  h->set_source_host(host);
  if (!control->Write(msg)) return control_error("before the header");
  DestinationMessage reply;
  if (!control->Read(&reply)) return control_error("refusing the header");
  if (!reply.has_accepted()) return absl::InternalError("destination did not accept the header");
  const bool flush = reply.accepted().flush();
  const bool device_data = reply.accepted().device_data();
  uint64_t device_data_sent = 0;
  if (absl::Status s = OpenStreams(); !s.ok()) return s;
  // Pre-copy barrier (see Flush in migration.proto): returns once the destination holds every
  // page handed to the streams so far.
  auto flush_streams = [&]() -> absl::Status {
    msg.Clear();
    for (auto& s : streams_) msg.mutable_flush()->add_pages_per_stream(s->pages_sent);
    if (!control->Write(msg)) return control_error("during pre-copy");
    if (!control->Read(&reply)) return control_error("during pre-copy");
    if (!reply.has_flushed()) return absl::InternalError("destination did not answer Flush");
    return absl::OkStatus();
  };
  // The switchover's fixed cost, added to every expected-downtime estimate: two control round
  // trips (Complete/Ready, Go/Resumed), measured now on the empty pipes, plus the last dirty
  // sync (taken again while paused).
  absl::Duration round_trip = absl::ZeroDuration();
  if (flush && !opt.postcopy) {
    absl::Time t = absl::Now();
    if (absl::Status s = flush_streams(); !s.ok()) return s;
    round_trip = absl::Now() - t;
  }
  sent_ = DirtySet::ForMemory(mem_);
  unsent_ = DirtySet::ForMemory(mem_);
  nonzero_ = DirtySet::ForMemory(mem_);
  if (opt.postcopy) {
    DirtySet none = DirtySet::ForMemory(mem_);
    return RunPostcopy(*control, /*tracking=*/false, 0, none);
  }

  // Pre-copy iterations while the guest runs. Dirty logging first, then the free-page hints
  // (background.md §4): a page written after its hint is then always caught by the log.
  if (absl::Status s = tracker.Start(); !s.ok()) return s;
  DirtySet dirty = DirtySet::ForMemory(mem_);
  DirtySet fresh = DirtySet::ForMemory(mem_);  // one harvest, before it joins `dirty`
  if (vm_->config().balloon().free_page_hinting()) {
    // The first harvest reports every page (not writes): take it before any hint exists, so
    // that only real writes after a hint ever withdraw it.
    if (absl::Status s = tracker.Sync(dirty); !s.ok()) return s;
    hints_ = std::make_unique<FreePageFilter>(mem_);
    auto id = vm_->StartFreePageHints(hints_.get());
    if (id.ok()) {
      hints_active_ = true;
      LOG_INFO("migration %s: asked the guest for free-page hints (command id %d)", o_->id_, *id);
      // Give the guest a moment to report its free pages before the first pass reaches them
      // (a responsive guest answers in milliseconds; one that does not costs at most this).
      const absl::Time give_up = absl::Now() + kHintWait;
      while (!hints_->guest_done() && absl::Now() < give_up && !Cancelled())
        absl::SleepFor(absl::Milliseconds(2));
      LOG_INFO("migration %s: %s free-page hints (%d KiB) before the first pass", o_->id_,
               hints_->guest_done() ? "all" : "partial", hints_->hinted_bytes() / 1024);
    } else {
      LOG_WARN("migration %s: no free-page hints: %s", o_->id_, id.status().message());
      hints_.reset();
    }
  }
  if (opt.policy) {
    auto a = AdaptiveMigration::Create(*opt.policy, vm_);
    if (!a.ok()) return a.status();
    adaptive_ = std::move(*a);
    LOG_INFO("migration %s: adaptive policy on (%s)", o_->id_, opt.policy->ShortDebugString());
  }
  uint32_t iteration = 0;
  absl::Time last_sync = absl::Now();
  uint64_t bandwidth = 0;
  uint64_t effective_bandwidth = 0;  // guest-page bytes/s before encoding (compression shows)
  auto guest_io_bytes = [this] {  // guest disk + network bytes so far
    uint64_t io = 0;
    for (const DeviceStatus& d : vm_->DeviceStatuses()) io += d.io_bytes();
    return io;
  };
  uint64_t last_io_bytes = guest_io_bytes();  // at the previous pass
  Progress([&](MigrationProgress& p) { p.set_phase(MIGRATION_PRECOPY); });
  for (;;) {
    if (Cancelled()) return absl::CancelledError("migration cancelled");
    if (o_->postcopy_requested_.load()) return RunPostcopy(*control, true, iteration, dirty);
    fresh.ClearAll();
    DirtySyncStats sync_stats;
    const absl::Time sync_start = absl::Now();
    if (absl::Status s = tracker.Sync(fresh, &sync_stats); !s.ok()) return s;
    // Pages passthrough devices wrote by DMA (and their pre-copy data, read as it comes).
    if (auto pt = vm_->SyncPassthroughMigration(fresh); !pt.ok()) return pt.status();
    const absl::Duration sync_time = absl::Now() - sync_start;  // taken again at the switchover
    // That data travels now, while the guest runs, not in the state at the switchover.
    if (device_data) {
      for (Vm::PassthroughData& d : vm_->TakePassthroughPrecopyData(kDeviceDataChunk)) {
        msg.Clear();
        DeviceData* dd = msg.mutable_device_data();
        dd->set_slot(d.slot);
        dd->set_offset(d.offset);
        device_data_sent += d.data.size();
        *dd->mutable_data() = std::move(d.data);
        if (!control->Write(msg)) return control_error("during pre-copy");
      }
    }
    if (hints_) hints_->ClearDirty(fresh);  // written since their hint: send them
    dirty.Or(fresh);
    absl::Time now = absl::Now();
    const double since_sync = absl::ToDoubleSeconds(now - last_sync);
    uint64_t remaining = dirty.Count();
    uint64_t dirty_rate =
        iteration == 0 ? 0 : static_cast<uint64_t>(remaining / std::max(1e-6, since_sync));
    last_sync = now;
    const uint64_t rate = adaptive_ ? effective_bandwidth : bandwidth;
    absl::Duration expected =
        rate == 0 ? absl::InfiniteDuration()
                  : absl::Seconds(static_cast<double>(remaining * kPageSize) / rate) +
                        2 * round_trip + sync_time;
    if (adaptive_ && iteration > 0) {
      IterationMetrics m;
      m.set_iteration(iteration);
      m.set_elapsed_ms(absl::ToInt64Milliseconds(now - start_));
      m.set_remaining_bytes(remaining * kPageSize);
      m.set_dirty_bytes_per_s(dirty_rate * kPageSize);
      // Per vCPU where the dirty ring tells who wrote (bitmap mode: none).
      for (const VcpuDirtyCount& c : sync_stats.per_vcpu)
        m.add_vcpu_dirty_bytes_per_s(
            static_cast<uint64_t>(c.pages * kPageSize / std::max(1e-3, since_sync)));
      m.set_bandwidth_bytes_per_s(effective_bandwidth);
      m.set_downtime_limit_ms(absl::ToInt64Milliseconds(opt.downtime_limit));
      const uint64_t io = guest_io_bytes();
      if (io >= last_io_bytes)
        m.set_guest_io_bytes_per_s(
            static_cast<uint64_t>((io - last_io_bytes) / std::max(1e-3, since_sync)));
      last_io_bytes = io;
      m.set_expected_downtime_ms(expected == absl::InfiniteDuration()
                                     ? UINT32_MAX
                                     : absl::ToInt64Milliseconds(expected));
      auto decisions = adaptive_->Observe(m, dirty);
      if (!decisions.ok()) return decisions.status();
      Progress([&](MigrationProgress& p) {
        for (PolicyDecision& d : *decisions) *p.add_policy_decisions() = std::move(d);
        p.set_policy_tendency(adaptive_->tendency());
        *p.mutable_policy_settings() = adaptive_->settings();
        p.set_throttle_percent(adaptive_->settings().throttle_percent());
      });
      if (adaptive_->switch_to_postcopy()) {
        LOG_INFO("migration %s: the adaptive policy switches to post-copy", o_->id_);
        adaptive_->ReleaseThrottle();
        o_->postcopy_requested_ = true;
        return RunPostcopy(*control, true, iteration, dirty);
      }
    }
    Progress([&](MigrationProgress& p) {
      p.set_iteration(iteration);
      p.set_remaining_pages(remaining);
      p.set_dirty_pages_per_s(dirty_rate);
      p.set_expected_downtime_ms(expected == absl::InfiniteDuration() ? 0 : absl::ToInt64Milliseconds(expected));
    });
    if (iteration > 0 && expected <= opt.downtime_limit) break;
    if (opt.postcopy_after_iterations != 0 && iteration >= opt.postcopy_after_iterations) {
      LOG_INFO("migration %s: not converged after %d passes: switching to post-copy", o_->id_,
               iteration);
      o_->postcopy_requested_ = true;
      return RunPostcopy(*control, true, iteration, dirty);
    }
    if (opt.max_iterations != 0 && iteration >= opt.max_iterations) break;
    absl::Time t0 = absl::Now();
    uint64_t b0 = bytes_sent_, p0 = pages_sent_ - zero_pages_;
    if (absl::Status s = SendPages(dirty, iteration); !s.ok()) return s;
    // Until the destination holds the pass: what still sits in socket buffers or a shaped
    // link's queue belongs to this pass's time, not to the next one (or to the downtime).
    if (flush)
      if (absl::Status s = flush_streams(); !s.ok()) return s;
    double secs = std::max(1e-6, absl::ToDoubleSeconds(absl::Now() - t0));
    uint64_t sent = bytes_sent_ - b0;
    if (sent > 0) bandwidth = static_cast<uint64_t>(sent / secs);
    if (uint64_t pages = pages_sent_ - zero_pages_ - p0; pages > 0)
      effective_bandwidth = static_cast<uint64_t>(pages * kPageSize / secs);
    Progress([&](MigrationProgress& p) {
      p.set_bytes_sent(bytes_sent_);
      p.set_pages_sent(pages_sent_);
      p.set_zero_pages(zero_pages_);
      p.set_hole_pages_not_sent(holes_not_sent_);
      p.set_bandwidth_bytes_per_s(bandwidth);
      FillEncoding(p);
    });
    LOG_INFO("migration %s: iteration %d sent %d pages (%d KiB) in %d ms", o_->id_, iteration,
             remaining, sent / 1024, static_cast<int>(secs * 1000));
    ++iteration;
  }

  // Switchover: stop the guest, send what is left and the state.
  Progress([&](MigrationProgress& p) { p.set_phase(MIGRATION_SWITCHOVER); });
  if (adaptive_) adaptive_->ReleaseThrottle();  // converged (or out of passes): not needed now
  int64_t pause_ns = absl::ToUnixNanos(absl::Now());
  absl::Time pause_time = absl::Now();
  if (hints_) vm_->StopFreePageHints();  // no hint may arrive after the last harvest
  if (absl::Status s = vm_->Pause(); !s.ok()) return s;
  paused_by_us_ = true;
  // Passthrough devices stop (their state is read) before the last harvest: no DMA follows.
  if (absl::Status s = vm_->StopPassthroughDevices(dirty); !s.ok()) return s;
  if (absl::Status s = tracker.Sync(dirty); !s.ok()) return s;
  if (hints_) hints_->ClearDirty(dirty);
  uint64_t final_pages = dirty.Count();
  if (absl::Status s = SendPages(dirty, iteration); !s.ok()) return s;
  if (absl::Status s = CloseStreams(); !s.ok()) return s;
  // The guest gets its hinted pages back (command id DONE travels in the balloon's state).
  EndHints();
  auto state = vm_->SaveState();
  if (!state.ok()) return state.status();
  msg.Clear();
  Complete* c = msg.mutable_complete();
  *c->mutable_state() = *state;
  for (auto& s : streams_) c->add_pages_per_stream(s->pages_sent);
  c->set_source_pause_unix_ns(pause_ns);
  if (!control->Write(msg)) return control_error("before the final state");
  if (!control->Read(&reply)) return control_error("before it was ready");
  if (!reply.has_ready()) return absl::InternalError("destination sent no Ready");

  // Point of no return: the destination has everything; this VM must never run again.
  committed_ = true;
  (void)tracker.Stop();
  msg.Clear();
  msg.mutable_go();
  absl::Status result = absl::OkStatus();
  int64_t resume_ns = 0;
  if (!control->Write(msg) || !control->Read(&reply) || !reply.has_resumed()) {
    result = absl::UnknownError(
        "the destination did not confirm that it resumed the VM; the source VM stays paused so "
        "that it never runs twice — check the destination");
  } else {
    resume_ns = reply.resumed().resume_unix_ns();
    control->WritesDone();
    (void)control->Finish();
  }
  absl::Duration local_downtime = absl::Now() - pause_time;
  Progress([&](MigrationProgress& p) {
    p.set_bytes_sent(bytes_sent_);
    p.set_pages_sent(pages_sent_);
    p.set_zero_pages(zero_pages_);
    p.set_hole_pages_not_sent(holes_not_sent_);
    p.set_iteration(iteration);
    p.set_remaining_pages(0);
    p.set_source_pause_unix_ns(pause_ns);
    p.set_destination_resume_unix_ns(resume_ns);
    if (resume_ns != 0)
      p.set_downtime_ms(std::max<int64_t>(0, (resume_ns - pause_ns) / 1000000));
    else
      p.set_downtime_ms(absl::ToInt64Milliseconds(local_downtime));
    p.set_total_ms(absl::ToInt64Milliseconds(absl::Now() - start_));
    FillHints(p);
    FillEncoding(p);
  });
  if (device_data_sent > 0)
    LOG_INFO("migration %s: %d KiB of passthrough device pre-copy data went during the passes",
             o_->id_, device_data_sent / 1024);
  LOG_INFO("migration %s: switchover sent %d final pages; downtime %d ms", o_->id_, final_pages,
           resume_ns ? (resume_ns - pause_ns) / 1000000 : absl::ToInt64Milliseconds(local_downtime));
  if (result.ok()) vm_->MarkMigrated(absl::StrCat("migrated to ", o_->options_.destination));
  return result;
}

// ---- Post-copy (source) --------------------------------------------------------------------

bool MigrationSource::Session::PageIndex(uint64_t gpa, uint64_t* index) const {
  for (size_t i = 0; i < mem_.regions().size(); ++i) {
    const auto& r = mem_.regions()[i];
    if (gpa >= r.gpa && gpa - r.gpa < r.size) {
      *index = page_base_[i].second + (gpa - r.gpa) / kPageSize;
      return true;
    }
  }
  return false;
}

bool MigrationSource::Session::MarkDelivered(uint64_t gpa) {
  uint64_t i;
  if (!PageIndex(gpa, &i)) return false;
  uint64_t bit = 1ULL << (i % 64);
  return !(delivered_[i / 64].fetch_or(bit, std::memory_order_acq_rel) & bit);
}

std::vector<uint64_t> MigrationSource::Session::NextPushBatch(size_t max) {
  std::vector<uint64_t> out;
  absl::MutexLock lock(&push_mu_);
  // Follow the guest: after a demand fault, push what comes right after it.
  uint64_t hint = locality_hint_.load();
  if (hint != last_hint_ && hint < total_pages_) {
    push_cursor_ = hint;
    last_hint_ = hint;
  }
  uint64_t scanned = 0;
  const uint64_t words = (total_pages_ + 63) / 64;
  while (out.size() < max && push_left_ > 0 && scanned <= total_pages_ + 64) {
    uint64_t w = push_cursor_ / 64;
    uint64_t avail = push_todo_[w].load() & ~delivered_[w].load();
    avail &= ~0ULL << (push_cursor_ % 64);  // from the cursor on
    if (avail == 0) {
      scanned += 64 - push_cursor_ % 64;
      push_cursor_ = ((w + 1) % words) * 64;
      continue;
    }
    uint64_t i = w * 64 + static_cast<uint64_t>(__builtin_ctzll(avail));
    push_cursor_ = i + 1 >= total_pages_ ? 0 : i + 1;
    scanned += 1;
    uint64_t bit = 1ULL << (i % 64);
    if (delivered_[w].fetch_or(bit) & bit) continue;  // a lane answered it meanwhile
    --push_left_;
    // Index -> gpa.
    for (size_t r = page_base_.size(); r-- > 0;)
      if (i >= page_base_[r].second) {
        out.push_back(page_base_[r].first + (i - page_base_[r].second) * kPageSize);
        break;
      }
  }
  if (out.empty()) push_left_ = 0;  // a full scan found nothing: everything is out
  return out;
}

absl::Status MigrationSource::Session::OpenPageStream(uint32_t index) {
  auto s = std::make_unique<Stream>();
  auto ch = Connect();
  if (!ch.ok()) return ch.status();
  s->channel = *ch;
  s->stub = Migration::NewStub(s->channel);
  {
    absl::MutexLock lock(&ctx_mu_);
    if (cancelled_) return absl::CancelledError("migration cancelled");
    s->ctx = std::make_unique<grpc::ClientContext>();
  }
  s->writer = s->stub->Pages(s->ctx.get(), &s->summary);
  PageBatch hello;  // registers the stream index at the destination
  hello.set_migration_id(o_->id_);
  hello.set_stream(index);
  if (!s->writer->Write(hello))
    return absl::UnavailableError(absl::StrCat("page stream ", index, " could not be opened"));
  streams_.push_back(std::move(s));
  return absl::OkStatus();
}

void MigrationSource::Session::ServeLane(uint32_t lane) {
  LaneConn& l = *lanes_[lane];
  PageRequest req;
  while (l.stream->Read(&req)) {
    PageBatch batch;
    batch.set_migration_id(o_->id_);
    batch.set_stream(lane);
    uint64_t bytes = 0;
    auto flush = [&] {
      if (batch.pages_size() == 0) return true;
      absl::MutexLock lock(&l.write_mu);
      if (!l.stream->Write(batch)) return false;
      pulled_pages_ += batch.pages_size();
      pages_sent_ += batch.pages_size();
      bytes_sent_ += bytes;
      batch.clear_pages();
      bytes = 0;
      return true;
    };
    // The destination may ask for any number of gpas (a hostile one: 1e6 copies of one page,
    // which once made a 4 GiB batch that gRPC could not serialize and aborted on): each page is
    // answered once per request, in batches of kPagesPerBatch.
    absl::flat_hash_set<uint64_t> answered;
    bool ok = true;
    for (uint64_t gpa : req.gpas()) {
      if (gpa % kPageSize != 0 || !mem_.Contains(gpa, kPageSize)) {
        LOG_WARN_RATELIMITED("migration %s: lane %d asked for page 0x%x outside guest RAM",
                             o_->id_, lane, gpa);
        continue;
      }
      if (!answered.insert(gpa).second) continue;
      MarkDelivered(gpa);
      uint64_t index;
      if (PageIndex(gpa, &index)) locality_hint_ = index + 1;
      // Inside RAM (checked above): encoding cannot fail.
      bytes += EncodeGuestPage(gpa, batch.add_pages()).value_or(0);
      if (batch.pages_size() >= kPagesPerBatch && !(ok = flush())) break;
    }
    if (!ok || !flush()) break;
  }
}

absl::Status MigrationSource::Session::PushStream(uint32_t index) {
  Stream& s = *streams_[index];
  PageBatch batch;
  batch.set_migration_id(o_->id_);
  batch.set_stream(index);  // = its index in streams_ (after the pre-copy ones)
  for (;;) {
    if (Cancelled()) return absl::CancelledError("migration cancelled");
    std::vector<uint64_t> pages = NextPushBatch(kPagesPerBatch);
    if (pages.empty()) return absl::OkStatus();
    batch.clear_pages();
    uint64_t bytes = 0;
    for (uint64_t gpa : pages) {
      auto size = EncodeGuestPage(gpa, batch.add_pages());
      if (!size.ok()) return size.status();
      bytes += *size;
    }
    limiter_.Acquire(bytes, o_->cancel_);
    if (!s.writer->Write(batch)) {
      grpc::Status st = s.writer->Finish();
      s.finished = true;
      return FromGrpc(st.ok() ? grpc::Status(grpc::StatusCode::UNAVAILABLE, "stream closed") : st,
                      "post-copy push stream to the destination failed");
    }
    s.pages_sent += batch.pages_size();
    pushed_pages_ += batch.pages_size();
    pages_sent_ += batch.pages_size();
    bytes_sent_ += bytes;
  }
}

namespace {
std::string WordsToBytes(const std::vector<uint64_t>& w) {
  return std::string(reinterpret_cast<const char*>(w.data()), w.size() * sizeof(uint64_t));
}
}  // namespace

absl::Status MigrationSource::Session::RunPostcopy(ControlStream& control, bool tracking,
                                                   uint32_t iteration, DirtySet& stale) {
  const SourceOptions& opt = o_->options_;
  DirtyTracker& tracker = vm_->dirty_tracker();
  Progress([&](MigrationProgress& p) {
    p.set_phase(MIGRATION_SWITCHOVER);
    p.set_postcopy(true);
    p.set_iteration(iteration);
  });
  auto control_error = [&](absl::string_view what) {
    grpc::Status st = control.Finish();
    if (!st.ok()) return FromGrpc(st, "destination");
    return absl::UnavailableError(absl::StrCat("destination closed the control stream ", what));
  };
  // Demand lanes (multiplexed on one connection of their own, away from the bulk push) must be
  // up before the destination can fault (its state restore may already touch missing pages);
  // they are opened while the guest still runs, to keep that out of the downtime.
  const uint32_t nlanes = vm_->config().vcpus() + 1;
  if (absl::Status s = OpenLanes(nlanes); !s.ok()) return s;
  // Nothing more travels on the pre-copy streams (what is still dirty goes by demand or push):
  // close them while the guest still runs, which keeps their round trips out of the downtime.
  if (absl::Status s = CloseStreams(); !s.ok()) return s;
  std::vector<uint64_t> precopy_counts;
  for (auto& s : streams_) precopy_counts.push_back(s->pages_sent);
  // Holes of guest RAM (zero at the source, nothing to send) are found with SEEK_DATA/SEEK_HOLE,
  // which walks the whole memfd: done before the pause. A page written after this snapshot is
  // caught by dirty logging (started here for a pure post-copy) and never taken for a hole.
  if (!tracking) {
    if (absl::Status s = tracker.Start(); !s.ok()) return s;
    DirtySet first = DirtySet::ForMemory(mem_);  // the first harvest may report every page
    if (absl::Status s = tracker.Sync(first); !s.ok()) return s;
    tracking = true;
  }
  SnapshotExtents();
  const absl::Time pause_time = absl::Now();
  const int64_t pause_ns = absl::ToUnixNanos(pause_time);
  if (hints_) vm_->StopFreePageHints();
  if (absl::Status s = vm_->Pause(); !s.ok()) return s;
  paused_by_us_ = true;
  const absl::Time paused_time = absl::Now();
  // Passthrough devices stop; what they wrote by DMA is stale at the destination (their DMA log
  // runs from the start of the migration, also for a pure post-copy).
  if (absl::Status s = vm_->StopPassthroughDevices(stale); !s.ok()) return s;
  if (tracking) {
    if (absl::Status s = tracker.Sync(stale); !s.ok()) return s;
    if (hints_) hints_->ClearDirty(stale);
  }
  stale.Or(unsent_);
  written_after_snapshot_ = DirtySet::ForMemory(mem_);
  written_after_snapshot_.Or(stale);
  EndHints();  // the guest's hinted pages are free again (DONE travels in the balloon state)
  const absl::Time synced_time = absl::Now();

  // What the destination has (present), what it can make up (zero), what must travel (push).
  page_base_.clear();
  total_pages_ = 0;
  for (const auto& r : mem_.regions()) {
    page_base_.push_back({r.gpa, total_pages_});
    total_pages_ += r.size / kPageSize;
  }
  const uint64_t words = (total_pages_ + 63) / 64;
  push_todo_ = std::make_unique<std::atomic<uint64_t>[]>(words);
  delivered_ = std::make_unique<std::atomic<uint64_t>[]>(words);
  for (uint64_t w = 0; w < words; ++w) {
    push_todo_[w].store(0);
    delivered_[w].store(0);
  }
  ::microvmm::StartPostcopy* sp = nullptr;
  SourceMessage msg;
  sp = msg.mutable_start_postcopy();
  uint64_t missing = 0, present_pages = 0, zero_pages = 0;
  // Word at a time (64 pages): this runs while the guest is paused.
  const std::vector<std::vector<uint64_t>> hinted =
      hints_ ? hints_->Snapshot() : std::vector<std::vector<uint64_t>>();
  for (size_t ri = 0; ri < mem_.regions().size(); ++ri) {
    const auto& r = mem_.regions()[ri];
    const uint64_t pages = r.size / kPageSize, nw = (pages + 63) / 64;
    // Pages holding data at the source (SnapshotExtents); the rest are holes = zero.
    std::vector<uint64_t> data(nw, 0);
    for (const auto& [start, end] : extents_[ri])
      for (uint64_t pg = start / kPageSize; pg < (end + kPageSize - 1) / kPageSize && pg < pages;
           ++pg) {
        if (pg % 64 == 0 && pg + 64 <= end / kPageSize) {  // whole word
          data[pg / 64] = ~0ULL;
          pg += 63;
          continue;
        }
        data[pg / 64] |= 1ULL << (pg % 64);
      }
    std::span<const uint64_t> sent_w = sent_.region(ri).words(), stale_w = stale.region(ri).words();
    std::vector<uint64_t> present(nw), zero(nw);
    const uint64_t base = page_base_[ri].second;
    for (uint64_t w = 0; w < nw; ++w) {
      const uint64_t valid = (w == nw - 1 && pages % 64) ? (1ULL << (pages % 64)) - 1 : ~0ULL;
      const uint64_t pres = sent_w[w] & ~stale_w[w] & valid;
      const uint64_t hint = hinted.empty() ? 0 : hinted[ri][w];
      const uint64_t zw = ((~data[w] & ~stale_w[w]) | hint) & ~pres & valid;
      const uint64_t push = valid & ~pres & ~zw;
      present[w] = pres;
      zero[w] = zw;
      present_pages += std::popcount(pres);
      zero_pages += std::popcount(zw);
      missing += std::popcount(push);
      if (base % 64 == 0) {  // the region's pages start on a word of the global map
        push_todo_[base / 64 + w].store(push, std::memory_order_relaxed);
        continue;
      }
      for (uint64_t bits = push; bits != 0; bits &= bits - 1) {  // global index (any alignment)
        uint64_t i = base + w * 64 + static_cast<uint64_t>(std::countr_zero(bits));
        push_todo_[i / 64].fetch_or(1ULL << (i % 64), std::memory_order_relaxed);
      }
    }
    sp->add_present(WordsToBytes(present));
    sp->add_zero(WordsToBytes(zero));
  }
  const absl::Time maps_time = absl::Now();

  {
    absl::MutexLock lock(&push_mu_);
    push_cursor_ = 0;
    push_left_ = missing;
  }
  auto state = vm_->SaveState();
  if (!state.ok()) return state.status();
  *sp->mutable_state() = std::move(*state);
  for (uint64_t n : precopy_counts) sp->add_pages_per_stream(n);
  sp->set_source_pause_unix_ns(pause_ns);
  sp->set_lanes(nlanes);
  sp->set_push_streams(opt.streams);
  LOG_INFO("migration %s: post-copy switchover: %d pages present at the destination, %d zero, "
           "%d to pull or push; state ready %.1f ms after the pause (vCPUs parked %.1f, last "
           "harvest + streams closed %.1f, maps %.1f, device/vCPU state %.1f)",
           o_->id_, present_pages, zero_pages, missing,
           absl::ToDoubleMilliseconds(absl::Now() - pause_time),
           absl::ToDoubleMilliseconds(paused_time - pause_time),
           absl::ToDoubleMilliseconds(synced_time - paused_time),
           absl::ToDoubleMilliseconds(maps_time - synced_time),
           absl::ToDoubleMilliseconds(absl::Now() - maps_time));

  if (!control.Write(msg)) return control_error("before the post-copy state");
  DestinationMessage reply;
  if (!control.Read(&reply)) return control_error("before it was ready for post-copy");
  if (!reply.has_ready()) return absl::InternalError("destination sent no Ready");

  // Point of no return.
  committed_ = true;
  if (tracking) (void)tracker.Stop();
  const size_t push_base = streams_.size();
  for (uint32_t i = 0; i < opt.streams; ++i)
    if (absl::Status s = OpenPageStream(opt.streams + i); !s.ok()) return s;
  msg.Clear();
  msg.mutable_go();
  if (!control.Write(msg) || !control.Read(&reply) || !reply.has_resumed())
    return absl::UnknownError(
        "the destination did not confirm that it resumed the VM; the source VM stays paused so "
        "that it never runs twice — check the destination");
  const int64_t resume_ns = reply.resumed().resume_unix_ns();
  postcopy_live_ = true;
  Progress([&](MigrationProgress& p) {
    p.set_phase(MIGRATION_POSTCOPY);
    p.set_source_pause_unix_ns(pause_ns);
    p.set_destination_resume_unix_ns(resume_ns);
    p.set_downtime_ms(std::max<int64_t>(0, (resume_ns - pause_ns) / 1000000));
  });
  return PostcopyLoop(control, push_base);
}

absl::Status MigrationSource::Session::OpenLanes(uint32_t nlanes) {
  auto ch = Connect();
  if (!ch.ok()) return ch.status();
  lane_channel_ = *ch;
  auto lane_stub = Migration::NewStub(lane_channel_);
  lanes_.clear();  // a recovery: the old lanes were joined when the post-copy failed
  for (uint32_t i = 0; i < nlanes; ++i) {
    auto l = std::make_unique<LaneConn>();
    {
      absl::MutexLock lock(&ctx_mu_);
      if (cancelled_) return absl::CancelledError("migration cancelled");
      l->ctx = std::make_unique<grpc::ClientContext>();
    }
    l->stream = lane_stub->Demand(l->ctx.get());
    PageBatch hello;
    hello.set_migration_id(o_->id_);
    hello.set_stream(i);
    if (!l->stream->Write(hello)) {
      l->ctx->TryCancel();
      (void)l->stream->Finish();
      for (auto& o : lanes_) {
        o->ctx->TryCancel();
        (void)o->stream->Finish();
      }
      lanes_.clear();
      return absl::UnavailableError(absl::StrCat("demand lane ", i, " could not be opened"));
    }
    lanes_.push_back(std::move(l));
  }
  for (uint32_t i = 0; i < nlanes; ++i)
    lanes_[i]->thread = std::thread([this, i] { ServeLane(i); });
  return absl::OkStatus();
}

absl::Status MigrationSource::Session::PostcopyLoop(ControlStream& control, size_t push_base) {
  const SourceOptions& opt = o_->options_;
  SourceMessage msg;

  // Destination reports (stats, then done) arrive on the control stream.
  std::atomic<bool> done{false};
  std::thread reader([&] {
    DestinationMessage m;
    while (control.Read(&m)) {
      if (m.has_postcopy_stats() || m.has_postcopy_done()) {
        PostcopyStats st = m.has_postcopy_done() ? m.postcopy_done().stats() : m.postcopy_stats();
        Progress([&](MigrationProgress& p) {
          *p.mutable_postcopy_stats() = st;
          p.set_remaining_pages(st.missing_pages());
        });
      }
      if (m.has_postcopy_done()) {
        done = true;
        break;
      }
    }
  });
  std::vector<absl::Status> push_status(opt.streams);
  std::vector<std::thread> pushers;
  for (uint32_t i = 0; i < opt.streams; ++i)
    pushers.emplace_back(
        [this, i, push_base, &push_status] { push_status[i] = PushStream(push_base + i); });
  for (auto& t : pushers) t.join();
  absl::Status result;
  for (const absl::Status& s : push_status)
    if (result.ok() && !s.ok()) result = s;
  std::vector<uint64_t> push_counts;
  if (result.ok()) {
    for (size_t i = push_base; i < streams_.size(); ++i) {
      Stream& s = *streams_[i];
      s.writer->WritesDone();
      grpc::Status st = s.writer->Finish();
      s.finished = true;
      if (!st.ok() && result.ok()) result = FromGrpc(st, "post-copy push stream");
      push_counts.push_back(s.pages_sent);
    }
  }
  if (result.ok()) {
    msg.Clear();
    for (uint64_t n : push_counts) msg.mutable_postcopy_complete()->add_pages_per_stream(n);
    if (!control.Write(msg)) result = absl::UnavailableError("destination went away");
  }
  if (result.ok()) {
    reader.join();
    if (!done)
      result = absl::UnavailableError("the destination did not confirm the end of post-copy");
  } else {
    CancelRpcs();
    reader.join();
    for (size_t i = push_base; i < streams_.size(); ++i)
      if (!streams_[i]->finished) {
        (void)streams_[i]->writer->Finish();  // cancelled: returns at once
        streams_[i]->finished = true;
      }
  }
  for (auto& l : lanes_) {
    {
      absl::MutexLock lock(&l->write_mu);
      l->stream->WritesDone();
    }
    if (!result.ok()) l->ctx->TryCancel();
    l->thread.join();
    (void)l->stream->Finish();
  }
  if (result.ok()) {
    control.WritesDone();
    (void)control.Finish();
  }
  Progress([&](MigrationProgress& p) {
    p.set_bytes_sent(bytes_sent_);
    p.set_pages_sent(pages_sent_);
    p.set_zero_pages(zero_pages_);
    p.set_hole_pages_not_sent(holes_not_sent_);
    p.set_remaining_pages(result.ok() ? 0 : p.remaining_pages());
    p.set_total_ms(absl::ToInt64Milliseconds(absl::Now() - start_));
    FillHints(p);
    FillEncoding(p);
  });
  LOG_INFO("migration %s: post-copy %s: %d pages pulled on demand, %d pushed", o_->id_,
           result.ok() ? "complete" : "failed", pulled_pages_.load(), pushed_pages_.load());
  if (!result.ok())
    return absl::Status(result.code(),
                        absl::StrCat("post-copy: ", result.message(),
                                     " (the VM runs at the destination; this copy stays paused)"));
  vm_->MarkMigrated(absl::StrCat("migrated to ", destination_, " (post-copy)"));
  return absl::OkStatus();
}

absl::Status MigrationSource::Session::Recover(const std::string& destination) {
  destination_ = destination;
  {
    absl::MutexLock lock(&ctx_mu_);
    cancelled_ = false;  // CancelRpcs() of the failed attempt; a user cancel stops nothing here
    control_ctx_ = std::make_unique<grpc::ClientContext>();
  }
  auto ch = Connect();
  if (!ch.ok()) return ch.status();
  auto stub = Migration::NewStub(*ch);
  auto control = stub->Control(control_ctx_.get());
  auto control_error = [&](absl::string_view what) {
    grpc::Status st = control->Finish();
    if (!st.ok()) return FromGrpc(st, "destination");
    return absl::UnavailableError(absl::StrCat("destination closed the control stream ", what));
  };
  const uint32_t nstreams = o_->options_.streams;
  SourceMessage msg;
  msg.mutable_recover()->set_migration_id(o_->id_);
  msg.mutable_recover()->set_push_streams(nstreams);
  if (!control->Write(msg)) return control_error("before the recovery request");
  DestinationMessage reply;
  if (!control->Read(&reply)) return control_error("refusing the recovery");
  if (!reply.has_recover_state()) return absl::InternalError("destination sent no RecoverState");
  const RecoverState& rs = reply.recover_state();
  // The destination numbers this recovery's push streams after every index it ever granted
  // (an earlier recovery may have failed before opening all of its streams): skip the gap.
  if (rs.first_push_stream() < streams_.size() || rs.first_push_stream() > 64 * kMaxPageStreams)
    return absl::InternalError(absl::StrFormat("destination numbers push streams from %d, not %d",
                                               rs.first_push_stream(), streams_.size()));
  while (streams_.size() < rs.first_push_stream()) {
    streams_.push_back(std::make_unique<Stream>());
    streams_.back()->finished = true;  // never opened
  }
  if (static_cast<size_t>(rs.present_size()) != mem_.regions().size())
    return absl::InvalidArgumentError("RecoverState: wrong number of regions");
  // Push again every page the destination lacks (and the source sent before, if at all: the
  // answer may have died with the connection). Zero pages stay out, as at the switchover.
  uint64_t missing = 0;
  for (size_t ri = 0; ri < mem_.regions().size(); ++ri) {
    const uint64_t pages = mem_.regions()[ri].size / kPageSize;
    const std::string& b = rs.present(static_cast<int>(ri));
    if (b.size() != (pages + 63) / 64 * 8)
      return absl::InvalidArgumentError("RecoverState: bad present map size");
    for (uint64_t p = 0; p < pages; ++p) {
      const bool present = (static_cast<uint8_t>(b[p / 8]) >> (p % 8)) & 1;
      const uint64_t i = page_base_[ri].second + p;
      const uint64_t bit = 1ULL << (i % 64);
      if (present) {
        push_todo_[i / 64].fetch_and(~bit);
        delivered_[i / 64].fetch_or(bit);
      } else {
        delivered_[i / 64].fetch_and(~bit);
        if (push_todo_[i / 64].load() & bit) ++missing;
      }
    }
  }
  {
    absl::MutexLock lock(&push_mu_);
    push_cursor_ = 0;
    push_left_ = missing;
    last_hint_ = UINT64_MAX;
  }
  LOG_INFO("migration %s: post-copy recovery via %s: %d pages still to push", o_->id_,
           destination_, missing);
  if (absl::Status s = OpenLanes(vm_->config().vcpus() + 1); !s.ok()) return s;
  const size_t push_base = streams_.size();
  auto fail = [&](absl::Status s) {
    CancelRpcs();
    for (auto& l : lanes_) {
      l->ctx->TryCancel();
      l->thread.join();
      (void)l->stream->Finish();
    }
    lanes_.clear();
    for (size_t i = push_base; i < streams_.size(); ++i)
      if (!streams_[i]->finished) {
        (void)streams_[i]->writer->Finish();
        streams_[i]->finished = true;
      }
    return s;
  };
  for (uint32_t i = 0; i < nstreams; ++i)
    if (absl::Status s = OpenPageStream(push_base + i); !s.ok()) return fail(s);
  msg.Clear();
  msg.mutable_go();
  if (!control->Write(msg) || !control->Read(&reply) || !reply.has_resumed())
    return fail(absl::UnavailableError("the destination did not resume after the recovery"));
  Progress([&](MigrationProgress& p) {
    p.set_phase(MIGRATION_POSTCOPY);
    p.clear_error();
  });
  return PostcopyLoop(*control, push_base);
}

absl::Status MigrationSource::StartPostcopy() {
  absl::MutexLock lock(&mu_);
  if (done_) return absl::FailedPreconditionError("the migration is over");
  if (progress_.phase() != MIGRATION_SETUP && progress_.phase() != MIGRATION_PRECOPY)
    return absl::FailedPreconditionError(
        absl::StrCat("the migration is past pre-copy (", MigrationPhase_Name(progress_.phase()),
                     ")"));
  if (absl::Status s = vm_->CheckPassthroughPostcopy(); !s.ok()) return s;
  postcopy_requested_ = true;
  return absl::OkStatus();
}

MigrationSource::MigrationSource(Vm* vm, SourceOptions options)
    : vm_(vm), options_(std::move(options)), id_(NewMigrationId()) {
  progress_.set_phase(MIGRATION_SETUP);
  progress_.set_migration_id(id_);
  progress_.set_destination(options_.destination);
}

absl::StatusOr<std::unique_ptr<MigrationSource>> MigrationSource::Start(Vm* vm,
                                                                        SourceOptions options) {
  if (vm->state() != RunState::kRunning)
    return absl::FailedPreconditionError(absl::StrCat(
        "cannot migrate: the VM is ", RunStateName(vm->state()), " (migration needs RUNNING)"));
  if (options.streams == 0 || options.streams > kMaxPageStreams)
    return absl::InvalidArgumentError(absl::StrCat("streams must be 1..", kMaxPageStreams));
  // Passthrough devices (VFIO, vfio-user) write guest RAM behind the dirty tracker's back and
  // have state of their own: each must support migration (uAPI v2), checked here so that the
  // caller gets the refusal; from now on they log their DMA (see Vm::StartPassthroughMigration).
  const bool may_postcopy = options.postcopy || options.postcopy_after_iterations != 0 ||
                            (options.policy && options.policy->allow_postcopy());
  if (may_postcopy)
    if (absl::Status s = vm->CheckPassthroughPostcopy(); !s.ok())
      return absl::Status(s.code(), absl::StrCat("cannot migrate: ", s.message()));
  auto passthrough = vm->StartPassthroughMigration();
  if (!passthrough.ok())
    return absl::Status(passthrough.status().code(),
                        absl::StrCat("cannot migrate: ", passthrough.status().message()));
  std::unique_ptr<MigrationSource> m(new MigrationSource(vm, std::move(options)));
  m->session_ = std::make_unique<Session>(m.get());
  m->thread_ = std::thread([p = m.get()] { p->Run(); });
  return m;
}

void MigrationSource::Run() { Conclude(session_->Run()); }

absl::Status MigrationSource::RecoverPostcopy(const std::string& destination) {
  {
    absl::MutexLock lock(&mu_);
    if (progress_.phase() != MIGRATION_POSTCOPY_PAUSED || recovering_)
      return absl::FailedPreconditionError(absl::StrCat(
          "no paused post-copy to recover (migration is ", MigrationPhase_Name(progress_.phase()),
          ")"));
    recovering_ = true;
  }
  if (thread_.joinable()) thread_.join();  // the attempt that failed has returned
  {
    absl::MutexLock lock(&mu_);
    progress_.set_phase(MIGRATION_POSTCOPY);
    progress_.set_destination(destination);
  }
  thread_ = std::thread([this, destination] { Conclude(session_->Recover(destination)); });
  return absl::OkStatus();
}

void MigrationSource::Conclude(absl::Status s) {
  session_->ReleaseThrottle();  // whatever the outcome, the guest runs (or ends) at full speed
  if (!s.ok() && session_->postcopy_live()) {
    // The destination runs the guest and waits (paused) for the pages still here: keep them.
    LOG_ERROR("migration %s: post-copy paused: %s", id_, s.message());
    absl::MutexLock lock(&mu_);
    progress_.set_phase(MIGRATION_POSTCOPY_PAUSED);
    progress_.set_error(absl::StrCat(
        s.message(), "; recover with RecoverMigration (vmmctl migrate-recover --to ADDR)"));
    recovering_ = false;
    return;
  }
  if (!s.ok() && !session_->committed()) {
    // Nothing changes for the guest: stop logging dirty pages, resume if we paused it.
    session_->CancelRpcs();
    session_->EndHints();
    (void)vm_->dirty_tracker().Stop();
    vm_->CancelPassthroughMigration();  // devices back to RUNNING before the vCPUs resume
    if (session_->paused_by_us() && vm_->state() == RunState::kPaused) (void)vm_->Resume();
    LOG_WARN("migration %s failed, VM continues on the source: %s", id_, s.message());
  } else if (!s.ok()) {
    LOG_ERROR("migration %s: %s", id_, s.message());
  }
  absl::MutexLock lock(&mu_);
  if (s.ok()) {
    progress_.set_phase(MIGRATION_COMPLETED);
  } else {
    progress_.set_phase(cancel_ && !session_->committed() ? MIGRATION_CANCELLED : MIGRATION_FAILED);
    progress_.set_error(std::string(s.message()));
  }
  recovering_ = false;
  done_ = true;
}

MigrationSource::~MigrationSource() {
  Cancel();
  if (thread_.joinable()) thread_.join();
}

void MigrationSource::Cancel() {
  {
    absl::MutexLock lock(&mu_);
    if (done_) return;
    if (progress_.phase() == MIGRATION_POSTCOPY_PAUSED && !recovering_) {
      // Only when the VMM goes away (the API refuses to cancel a post-copy): give up recovery.
      progress_.set_phase(MIGRATION_FAILED);
      progress_.set_error(absl::StrCat("post-copy abandoned while paused: ", progress_.error()));
      done_ = true;
      return;
    }
  }
  // Past Ready the VM belongs to the destination: cancelling would strand a post-copy guest.
  if (session_ && session_->committed()) return;
  cancel_ = true;
  if (session_) session_->CancelRpcs();
}

MigrationProgress MigrationSource::progress() const {
  absl::MutexLock lock(&mu_);
  MigrationProgress p = progress_;
  if (!done_ && session_) session_->FillLive(p);
  return p;
}

bool MigrationSource::done() const {
  absl::MutexLock lock(&mu_);
  return done_;
}

MigrationProgress MigrationSource::Wait(absl::Duration timeout) const {
  absl::MutexLock lock(&mu_);
  mu_.AwaitWithTimeout(absl::Condition(&done_), timeout);
  MigrationProgress p = progress_;
  if (!done_ && session_) session_->FillLive(p);
  return p;
}

}  // namespace microvmm::migration
