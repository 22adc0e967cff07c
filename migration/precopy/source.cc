#include "migration/precopy/source.h"

#include <algorithm>
#include <random>
#include <thread>
#include <unistd.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "api/address.h"
#include "migration/dirty/dirty_tracker.h"
#include "migration/precopy/destination.h"
#include "migration/stream/page_codec.h"
#include "proto/migration.grpc.pb.h"
#include "vmm/base/log.h"
#include "vmm/memory/guest_memory.h"

namespace microvmm::migration {
namespace {

constexpr int kPagesPerBatch = 64;

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
  return o;
}

// One migration attempt: connections, page streams, iterations, switchover.
class MigrationSource::Session {
 public:
  explicit Session(MigrationSource* owner)
      : o_(owner), vm_(owner->vm_), mem_(owner->vm_->memory()),
        limiter_(owner->options_.bandwidth_limit) {}

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
    uint64_t done_in_pass = pages_sent_ - pass_start_pages_;
    uint64_t total = pass_pages_;
    if (total > 0) p.set_remaining_pages(total > done_in_pass ? total - done_in_pass : 0);
    p.set_elapsed_ms(absl::ToInt64Milliseconds(absl::Now() - start_));
  }
  // Outcome after Run(): was the VM handed over (Ready received)?
  bool committed() const { return committed_; }
  bool paused_by_us() const { return paused_by_us_; }

 private:
  struct Stream {
    std::shared_ptr<grpc::Channel> channel;
    std::unique_ptr<Migration::Stub> stub;
    std::unique_ptr<grpc::ClientContext> ctx;
    PagesSummary summary;
    std::unique_ptr<grpc::ClientWriter<PageBatch>> writer;
    uint64_t pages_sent = 0;
    std::vector<uint64_t> todo;
    absl::Status status;
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
  absl::Time start_ = absl::Now();
  absl::Mutex ctx_mu_;
  bool cancelled_ ABSL_GUARDED_BY(ctx_mu_) = false;
  std::unique_ptr<grpc::ClientContext> control_ctx_;
  std::vector<std::unique_ptr<Stream>> streams_;
  std::atomic<uint64_t> bytes_sent_{0}, pages_sent_{0}, zero_pages_{0};
  std::atomic<uint64_t> pass_pages_{0}, pass_start_pages_{0};  // the pass being sent
  // Per RAM region, the [start, end) offsets of its memfd that hold data at the start of this
  // pass (SEEK_DATA/SEEK_HOLE). A page in a hole was never touched: it is sent as a ZERO tag
  // without reading it (reading would allocate it). A write after the snapshot makes the page
  // dirty, so it goes again in the next pass.
  std::vector<std::vector<std::pair<uint64_t, uint64_t>>> extents_;
  void SnapshotExtents();
  bool InHole(uint64_t gpa) const;
  bool committed_ = false;
  bool paused_by_us_ = false;
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
  auto ch = grpc::CreateCustomChannel(o_->options_.destination, creds, args);
  // Short waits so that a cancel is noticed while connecting.
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (!ch->WaitForConnected(absl::ToChronoTime(
      std::min(deadline, absl::Now() + absl::Milliseconds(100))))) {
    if (Cancelled()) return absl::CancelledError("migration cancelled while connecting");
    if (absl::Now() >= deadline)
      return absl::UnavailableError(
          absl::StrCat("cannot connect to the destination ", o_->options_.destination,
                       " (is `vmm --incoming` listening there?)"));
  }
  return ch;
}

absl::Status MigrationSource::Session::OpenStreams() {
  for (uint32_t i = 0; i < o_->options_.streams; ++i) {
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
    hello.set_stream(i);
    if (!s->writer->Write(hello))
      return absl::UnavailableError(absl::StrCat("page stream ", i, " could not be opened"));
    streams_.push_back(std::move(s));
  }
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
  for (uint64_t gpa : s.todo) {
    PageRecord* rec = batch.add_pages();
    if (InHole(gpa)) {
      batch_bytes += EncodeZeroPage(gpa, rec);
    } else {
      auto host = mem_.HostPtr(gpa, kPageSize);
      if (!host.ok()) return host.status();
      batch_bytes += EncodePage(gpa, *host, rec);
    }
    if (rec->codec() == ZERO) ++zero_pages_;
    if (batch.pages_size() >= kPagesPerBatch)
      if (absl::Status st = flush(); !st.ok()) return st;
  }
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
  pass_start_pages_ = pages_sent_.load();
  pass_pages_ = dirty.Count();
  SnapshotExtents();
  for (auto& s : streams_) s->todo.clear();
  dirty.ForEachSetPage(
      [&](uint64_t gpa) { streams_[StreamForPage(gpa, n)]->todo.push_back(gpa); });
  dirty.ClearAll();
  std::vector<std::thread> workers;
  for (size_t i = 1; i < streams_.size(); ++i)
    workers.emplace_back([this, i, iteration] { streams_[i]->status = SendStream(i, iteration); });
  streams_[0]->status = SendStream(0, iteration);
  for (auto& w : workers) w.join();
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
  if (absl::Status s = OpenStreams(); !s.ok()) return s;

  // Pre-copy iterations while the guest runs.
  if (absl::Status s = tracker.Start(); !s.ok()) return s;
  DirtySet dirty = DirtySet::ForMemory(mem_);
  uint32_t iteration = 0;
  absl::Time last_sync = absl::Now();
  uint64_t bandwidth = 0;
  Progress([&](MigrationProgress& p) { p.set_phase(MIGRATION_PRECOPY); });
  for (;;) {
    if (Cancelled()) return absl::CancelledError("migration cancelled");
    if (absl::Status s = tracker.Sync(dirty); !s.ok()) return s;
    absl::Time now = absl::Now();
    uint64_t remaining = dirty.Count();
    uint64_t dirty_rate =
        iteration == 0 ? 0 : static_cast<uint64_t>(remaining / std::max(1e-6, absl::ToDoubleSeconds(now - last_sync)));
    last_sync = now;
    absl::Duration expected =
        bandwidth == 0 ? absl::InfiniteDuration()
                       : absl::Seconds(static_cast<double>(remaining * kPageSize) / bandwidth);
    Progress([&](MigrationProgress& p) {
      p.set_iteration(iteration);
      p.set_remaining_pages(remaining);
      p.set_dirty_pages_per_s(dirty_rate);
      p.set_expected_downtime_ms(expected == absl::InfiniteDuration() ? 0 : absl::ToInt64Milliseconds(expected));
    });
    if (iteration > 0 && (expected <= opt.downtime_limit ||
                          (opt.max_iterations != 0 && iteration >= opt.max_iterations)))
      break;
    absl::Time t0 = absl::Now();
    uint64_t b0 = bytes_sent_;
    if (absl::Status s = SendPages(dirty, iteration); !s.ok()) return s;
    double secs = std::max(1e-6, absl::ToDoubleSeconds(absl::Now() - t0));
    uint64_t sent = bytes_sent_ - b0;
    if (sent > 0) bandwidth = static_cast<uint64_t>(sent / secs);
    Progress([&](MigrationProgress& p) {
      p.set_bytes_sent(bytes_sent_);
      p.set_pages_sent(pages_sent_);
      p.set_zero_pages(zero_pages_);
      p.set_bandwidth_bytes_per_s(bandwidth);
    });
    LOG_INFO("migration %s: iteration %d sent %d pages (%d KiB) in %d ms", o_->id_, iteration,
             remaining, sent / 1024, static_cast<int>(secs * 1000));
    ++iteration;
  }

  // Switchover: stop the guest, send what is left and the state.
  Progress([&](MigrationProgress& p) { p.set_phase(MIGRATION_SWITCHOVER); });
  int64_t pause_ns = absl::ToUnixNanos(absl::Now());
  absl::Time pause_time = absl::Now();
  if (absl::Status s = vm_->Pause(); !s.ok()) return s;
  paused_by_us_ = true;
  if (absl::Status s = tracker.Sync(dirty); !s.ok()) return s;
  uint64_t final_pages = dirty.Count();
  if (absl::Status s = SendPages(dirty, iteration); !s.ok()) return s;
  if (absl::Status s = CloseStreams(); !s.ok()) return s;
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
    p.set_iteration(iteration);
    p.set_remaining_pages(0);
    p.set_source_pause_unix_ns(pause_ns);
    p.set_destination_resume_unix_ns(resume_ns);
    if (resume_ns != 0)
      p.set_downtime_ms(std::max<int64_t>(0, (resume_ns - pause_ns) / 1000000));
    else
      p.set_downtime_ms(absl::ToInt64Milliseconds(local_downtime));
    p.set_total_ms(absl::ToInt64Milliseconds(absl::Now() - start_));
  });
  LOG_INFO("migration %s: switchover sent %d final pages; downtime %d ms", o_->id_, final_pages,
           resume_ns ? (resume_ns - pause_ns) / 1000000 : absl::ToInt64Milliseconds(local_downtime));
  if (result.ok()) vm_->MarkMigrated(absl::StrCat("migrated to ", o_->options_.destination));
  return result;
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
  std::unique_ptr<MigrationSource> m(new MigrationSource(vm, std::move(options)));
  m->session_ = std::make_unique<Session>(m.get());
  m->thread_ = std::thread([p = m.get()] { p->Run(); });
  return m;
}

void MigrationSource::Run() {
  absl::Status s = session_->Run();
  if (!s.ok() && !session_->committed()) {
    // Nothing changes for the guest: stop logging dirty pages, resume if we paused it.
    session_->CancelRpcs();
    (void)vm_->dirty_tracker().Stop();
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
  }
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
