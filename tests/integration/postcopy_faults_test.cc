// Post-copy live migration with a hostile peer.
//
// Hostile source -> real destination (`vmm --incoming`): a real source VMM first migrates a
// memwalk guest in pure post-copy to a recording fake destination in this process (it gets the
// header, the StartPostcopy with a real VmState and every pushed page: a consistent snapshot of
// the paused guest). The test then replays that snapshot as a raw gRPC client against a real
// destination, with one hostile change per test. The replayed guest really runs there: memwalk
// verifies every page it walks each generation, so a zero-filled, stale or overwritten page
// prints FAIL in the destination's serial log.
//
// Hostile destination -> real source: the same fake destination in other modes (bad or huge
// PageRequests, no Resumed, a malformed RecoverState).
//
// What the code defines as a clean failure:
// - before Go: the destination exits 75 ("vmm: error: incoming migration failed: <why>") and the
//   guest never ran there (empty serial log);
// - after Go: the destination's VM is PAUSED with a migration_note saying why (post-copy pages
//   are never zero-filled), the process stays up for a recovery;
// - the source: FAILED (no Resumed: its VM stays paused, never runs twice) or POSTCOPY_PAUSED.
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "proto/migration.grpc.pb.h"
#include "proto/vmm.grpc.pb.h"
#include "tests/util/subprocess.h"

namespace microvmm::testing {
namespace {

constexpr int kExitIncomingFailed = 75;
constexpr uint64_t kPage = 4096;
constexpr uint64_t kWalkBase = 16ull << 20;  // memwalk's default base_mib=16
constexpr char kWalkArgs[] = "mib=2";

std::string Describe(const MigrationProgress& p) {
  return absl::StrCat("phase=", MigrationPhase_Name(p.phase()), " error='", p.error(), "'");
}

// Peak RSS (VmHWM) of `pid` in KiB, 0 if unknown.
uint64_t PeakRssKib(pid_t pid) {
  std::ifstream f(absl::StrCat("/proc/", pid, "/status"));
  std::string line;
  while (std::getline(f, line))
    if (line.rfind("VmHWM:", 0) == 0) return std::strtoull(line.c_str() + 6, nullptr, 10);
  return 0;
}

// Threads of `pid` with their name and wait channel (diagnostics for a stuck pause).
std::string Threads(pid_t pid) {
  std::string out = "\nthreads (name wchan):";
  for (int tid = pid; tid < pid + 4096; ++tid) {
    std::string base = absl::StrCat("/proc/", pid, "/task/", tid, "/");
    std::string comm = ReadFileOrEmpty(base + "comm");
    if (comm.empty()) continue;
    if (!comm.empty() && comm.back() == '\n') comm.pop_back();
    absl::StrAppend(&out, "\n  ", tid, " ", comm, " ", ReadFileOrEmpty(base + "wchan"));
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// Fake destination: records a post-copy migration, or misbehaves in one of several ways.

enum class DstMode { kRecord, kBadRequests, kHugeRequest, kNoResumed, kBadRecoverState };

class FakeDestination final : public Migration::Service {
 public:
  explicit FakeDestination(DstMode mode) : mode_(mode) {}

  bool Serve(const std::string& path) {
    grpc::ServerBuilder b;
    b.AddListeningPort("unix:" + path, grpc::InsecureServerCredentials());
    b.SetMaxReceiveMessageSize(-1);
    b.RegisterService(this);
    server_ = b.BuildAndStart();
    return server_ != nullptr;
  }
  void Stop() {
    stop_ = true;
    if (server_) server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
    server_.reset();
  }
  ~FakeDestination() override { Stop(); }

  grpc::Status Control(grpc::ServerContext*,
                       grpc::ServerReaderWriter<DestinationMessage, SourceMessage>* s) override {
    SourceMessage m;
    DestinationMessage r;
    if (!s->Read(&m)) return grpc::Status(grpc::StatusCode::ABORTED, "no first message");
    if (m.has_recover()) {
      ++recovers_;
      // Hostile: one region map of the wrong length.
      r.mutable_recover_state()->add_present(std::string(3, '\xff'));
      r.mutable_recover_state()->set_first_push_stream(4);
      s->Write(r);
      while (s->Read(&m)) {
      }
      return grpc::Status::OK;
    }
    {
      std::lock_guard<std::mutex> l(mu_);
      header_ = m.header();
    }
    r.mutable_accepted();
    s->Write(r);
    if (!s->Read(&m) || !m.has_start_postcopy())
      return grpc::Status(grpc::StatusCode::ABORTED, "fake destination wants StartPostcopy");
    {
      std::lock_guard<std::mutex> l(mu_);
      sp_ = m.start_postcopy();
    }
    r.Clear();
    r.mutable_ready();
    s->Write(r);
    if (!s->Read(&m) || !m.has_go()) return grpc::Status(grpc::StatusCode::ABORTED, "no Go");
    if (mode_ == DstMode::kNoResumed) {
      go_ = true;
      return grpc::Status(grpc::StatusCode::UNAVAILABLE, "hostile destination: no Resumed");
    }
    r.Clear();
    r.mutable_resumed()->set_resume_unix_ns(absl::ToUnixNanos(absl::Now()));
    s->Write(r);
    go_ = true;
    if (mode_ == DstMode::kBadRecoverState) {
      absl::SleepFor(absl::Milliseconds(200));
      return grpc::Status(grpc::StatusCode::UNAVAILABLE, "hostile destination: link lost");
    }
    while (s->Read(&m) && !m.has_postcopy_complete()) {
    }
    // Every push stream has ended (the source closes them before PostcopyComplete).
    for (int i = 0; i < 500 && open_pages_.load() > 0; ++i) absl::SleepFor(absl::Milliseconds(10));
    // The hostile requests on lane 0 get their answers before the migration may end.
    const size_t want = mode_ == DstMode::kHugeRequest ? 512 : mode_ == DstMode::kBadRequests ? 1 : 0;
    for (int i = 0; i < 2000 && answers() < want; ++i) absl::SleepFor(absl::Milliseconds(10));
    r.Clear();
    r.mutable_postcopy_done();
    s->Write(r);
    done_ = true;
    return grpc::Status::OK;
  }

  grpc::Status Pages(grpc::ServerContext*, grpc::ServerReader<PageBatch>* rd,
                     PagesSummary* sum) override {
    ++open_pages_;
    PageBatch b;
    uint64_t n = 0;
    while (rd->Read(&b)) {
      std::lock_guard<std::mutex> l(mu_);
      for (const PageRecord& rec : b.pages()) {
        pages_[rec.gpa()] = rec;
        ++n;
      }
    }
    sum->set_pages(n);
    --open_pages_;
    return grpc::Status::OK;
  }

  grpc::Status Demand(grpc::ServerContext*,
                      grpc::ServerReaderWriter<PageRequest, PageBatch>* s) override {
    PageBatch b;
    if (!s->Read(&b)) return grpc::Status::OK;
    const uint32_t lane = b.stream();
    if (lane == 0 && (mode_ == DstMode::kBadRequests || mode_ == DstMode::kHugeRequest)) {
      while (!go_.load() && !stop_.load()) absl::SleepFor(absl::Milliseconds(5));
      PageRequest req;
      if (mode_ == DstMode::kBadRequests) {
        for (uint64_t g : {kWalkBase + 1, uint64_t{1} << 40, ~uint64_t{0} & ~(kPage - 1),
                           uint64_t{64} << 20})  // the last: just past the 64 MiB of RAM
          req.add_gpas(g);
        s->Write(req);
        req.Clear();
        req.add_gpas(kWalkBase);  // a valid one afterwards: the lane still serves
        s->Write(req);
      } else {
        for (int i = 0; i < 1000000; ++i) req.add_gpas(kWalkBase + (i % 512) * kPage);
        s->Write(req);
      }
    }
    while (s->Read(&b)) {
      std::lock_guard<std::mutex> l(mu_);
      for (const PageRecord& rec : b.pages()) lane_answers_.push_back(rec.gpa());
    }
    return grpc::Status::OK;
  }

  size_t answers() {
    std::lock_guard<std::mutex> l(mu_);
    return lane_answers_.size();
  }

  std::mutex mu_;
  MigrationHeader header_;
  StartPostcopy sp_;
  std::map<uint64_t, PageRecord> pages_;
  std::vector<uint64_t> lane_answers_;
  std::atomic<bool> go_{false}, done_{false}, stop_{false};
  std::atomic<int> open_pages_{0}, recovers_{0};

 private:
  const DstMode mode_;
  std::unique_ptr<grpc::Server> server_;
};

// ---------------------------------------------------------------------------------------------
// Source VMM helpers shared by both directions.

class PostcopyFaultsBase : public ::testing::Test {
 protected:
  void StartSource(TempDir& dir) {
    src_ = std::make_unique<Subprocess>(
        std::vector<std::string>{Runfile("vmm/vmm"), "--test-guest", "memwalk", "--vcpus", "2",
                                 "--memory", "64", "--test-guest-args", kWalkArgs, "--serial",
                                 "file:" + dir.File("src.log"), "--api-socket",
                                 dir.File("src.sock")},
        dir.File("src.out"), dir.File("src.err"));
    ASSERT_TRUE(WaitForFileContains(dir.File("src.log"), "memwalk gen=2 ok", absl::Seconds(30)))
        << ReadFileOrEmpty(dir.File("src.err"));
    src_stub_ = Vmm::NewStub(
        grpc::CreateChannel("unix:" + dir.File("src.sock"), grpc::InsecureChannelCredentials()));
  }
  grpc::Status StartPostcopyMigration(const std::string& to) {
    StartMigrationRequest req;
    req.set_destination(to);
    req.set_streams(2);
    req.set_mode(StartMigrationRequest::POSTCOPY);
    StartMigrationResponse resp;
    grpc::ClientContext c;
    c.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    return src_stub_->StartMigration(&c, req, &resp);
  }
  // Watches until the migration ends or pauses (or `timeout`).
  MigrationProgress WaitEnd(absl::Duration timeout) {
    grpc::ClientContext c;
    c.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
    WatchMigrationRequest w;
    w.set_interval_ms(50);
    auto reader = src_stub_->WatchMigration(&c, w);
    MigrationProgress p, last;
    while (reader->Read(&p)) last = p;
    (void)reader->Finish();
    return last;
  }
  VmInfo SrcInfo() {
    VmInfo info;
    grpc::ClientContext c;
    c.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    (void)src_stub_->GetInfo(&c, GetInfoRequest(), &info);
    return info;
  }
  void Mark(const std::string& what) {
    fprintf(stderr, "[%6.2f s] %s\n", absl::ToDoubleSeconds(absl::Now() - start_), what.c_str());
  }

  absl::Time start_ = absl::Now();
  std::unique_ptr<Subprocess> src_;
  std::unique_ptr<Vmm::Stub> src_stub_;
};

// ---------------------------------------------------------------------------------------------
// The snapshot a hostile source replays: recorded once per test binary.

struct Snapshot {
  MigrationHeader header;
  StartPostcopy sp;
  std::map<uint64_t, PageRecord> pages;  // every page the source pushed (all non-zero ones)
  int last_gen = 0;                      // memwalk's last verified generation at the source
  std::string error;                     // why recording failed
};

class Recorder : public PostcopyFaultsBase {
 public:
  void TestBody() override {}
  Snapshot Record() {
    Snapshot out;
    TempDir dir;
    StartSource(dir);
    if (::testing::Test::HasFatalFailure()) {
      out.error = "source did not start";
      return out;
    }
    FakeDestination fake(DstMode::kRecord);
    if (!fake.Serve(dir.File("rec.sock"))) {
      out.error = "cannot serve";
      return out;
    }
    grpc::Status s = StartPostcopyMigration(dir.File("rec.sock"));
    if (!s.ok()) {
      out.error = s.error_message();
      return out;
    }
    MigrationProgress p = WaitEnd(absl::Seconds(60));
    if (p.phase() != MIGRATION_COMPLETED) {
      out.error = Describe(p) + ReadFileOrEmpty(dir.File("src.err"));
      return out;
    }
    (void)src_->Wait(absl::Seconds(10));
    fake.Stop();
    std::lock_guard<std::mutex> l(fake.mu_);
    out.header = fake.header_;
    out.sp = fake.sp_;
    out.pages = fake.pages_;
    out.last_gen = MaxGeneration(ReadFileOrEmpty(dir.File("src.log")));
    return out;
  }
};

const Snapshot& GetSnapshot() {
  static Snapshot* snap = [] {
    Recorder r;
    auto* s = new Snapshot(r.Record());
    fprintf(stderr, "snapshot: %zu pages pushed, source at memwalk gen %d, state %zu bytes %s\n",
            s->pages.size(), s->last_gen, s->sp.state().ByteSizeLong(), s->error.c_str());
    return s;
  }();
  return *snap;
}

PageRecord Raw(uint64_t gpa, const std::string& data) {
  PageRecord r;
  r.set_gpa(gpa);
  r.set_codec(RAW);
  r.set_data(data);
  return r;
}

// ---------------------------------------------------------------------------------------------
// Hostile source: replays the snapshot against a real `vmm --incoming`.

class HostileSourceTest : public PostcopyFaultsBase {
 protected:
  void SetUp() override {
    if (!KvmAvailable()) GTEST_SKIP() << "KVM UNAVAILABLE: this KVM test did NOT run";
    snap_ = &GetSnapshot();
    ASSERT_TRUE(snap_->error.empty()) << "recording the post-copy snapshot failed: "
                                      << snap_->error;
    sp_ = snap_->sp;
    id_ = snap_->header.migration_id();
    dst_ = std::make_unique<Subprocess>(
        std::vector<std::string>{Runfile("vmm/vmm"), "--incoming", dir_.File("dst.sock"),
                                 "--serial", "file:" + dir_.File("dst.log"), "--api-socket",
                                 dir_.File("dstapi.sock")},
        dir_.File("dst.out"), dir_.File("dst.err"));
    ASSERT_TRUE(WaitForFileContains(dir_.File("dst.err"), "waiting for an incoming migration",
                                    absl::Seconds(10)))
        << Err();
    ch_ = grpc::CreateChannel("unix:" + dir_.File("dst.sock"), grpc::InsecureChannelCredentials());
    mig_ = Migration::NewStub(ch_);
    dst_api_ = Vmm::NewStub(grpc::CreateChannel("unix:" + dir_.File("dstapi.sock"),
                                                grpc::InsecureChannelCredentials()));
  }
  void TearDown() override {
    for (auto& l : lanes_) {
      l->ctx.TryCancel();
      if (l->t.joinable()) l->t.join();
    }
    if (control_) control_->ctx.TryCancel();
  }
  std::string Err() { return "\ndestination stderr:\n" + ReadFileOrEmpty(dir_.File("dst.err")); }

  // --- protocol steps -------------------------------------------------------------------------
  struct ControlCall {
    grpc::ClientContext ctx;
    std::unique_ptr<grpc::ClientReaderWriter<SourceMessage, DestinationMessage>> rw;
  };
  std::unique_ptr<ControlCall> OpenControl() {
    auto c = std::make_unique<ControlCall>();
    c->ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    c->rw = mig_->Control(&c->ctx);
    return c;
  }
  bool Send(const SourceMessage& m) { return control_->rw->Write(m); }
  // Next reply on Control that is not PostcopyStats (which are remembered).
  bool Next(DestinationMessage* r) {
    while (control_->rw->Read(r)) {
      if (!r->has_postcopy_stats()) return true;
      last_stats_ = r->postcopy_stats();
    }
    return false;
  }
  // Header accepted.
  void Header() {
    control_ = OpenControl();
    SourceMessage m;
    *m.mutable_header() = snap_->header;
    ASSERT_TRUE(Send(m));
    DestinationMessage r;
    ASSERT_TRUE(Next(&r) && r.has_accepted()) << Err();
  }
  // The pre-copy page streams, each with the given pages (on the stream that carries them:
  // StreamForPage in migration/stream/page_codec.h, 256 KiB chunks round robin), then
  // closed; `sp_.pages_per_stream` is set to match.
  void PrecopyStreams(const std::vector<PageRecord>& recs = {}) {
    const uint32_t n = snap_->header.page_streams();
    sp_.clear_pages_per_stream();
    for (uint32_t i = 0; i < n; ++i) {
      PageBatch b;
      b.set_migration_id(id_);
      b.set_stream(i);
      for (const PageRecord& r : recs)
        if ((r.gpa() >> 18) % n == i) *b.add_pages() = r;
      grpc::ClientContext ctx;
      PagesSummary sum;
      auto w = mig_->Pages(&ctx, &sum);
      ASSERT_TRUE(w->Write(b));
      w->WritesDone();
      grpc::Status s = w->Finish();
      ASSERT_TRUE(s.ok()) << s.error_message() << Err();
      sp_.add_pages_per_stream(b.pages_size());
    }
  }
  struct LaneCall {
    grpc::ClientContext ctx;
    std::unique_ptr<grpc::ClientReaderWriter<PageBatch, PageRequest>> rw;
    std::mutex wmu;
    std::thread t;
    grpc::Status status;
  };
  // Opens the demand lanes; each answers requests from the snapshot.
  void OpenLanes() {
    for (uint32_t i = 0; i < sp_.lanes(); ++i) {
      auto l = std::make_unique<LaneCall>();
      l->rw = mig_->Demand(&l->ctx);
      PageBatch hello;
      hello.set_migration_id(id_);
      hello.set_stream(i);
      ASSERT_TRUE(l->rw->Write(hello));
      LaneCall* lp = l.get();
      l->t = std::thread([this, lp, i] {
        PageRequest req;
        while (lp->rw->Read(&req)) {
          PageBatch b;
          b.set_migration_id(id_);
          b.set_stream(i);
          for (uint64_t g : req.gpas()) {
            ++requested_;
            auto it = snap_->pages.find(g);
            if (it != snap_->pages.end()) {
              *b.add_pages() = it->second;
            } else {
              PageRecord* z = b.add_pages();
              z->set_gpa(g);
              z->set_codec(ZERO);
            }
          }
          if (!answer_lanes_.load()) continue;
          std::lock_guard<std::mutex> lock(lp->wmu);
          if (!lp->rw->Write(b)) break;
        }
        lp->status = lp->rw->Finish();
      });
      lanes_.push_back(std::move(l));
    }
  }
  bool LaneWrite(uint32_t lane, const PageBatch& b) {
    std::lock_guard<std::mutex> lock(lanes_[lane]->wmu);
    return lanes_[lane]->rw->Write(b);
  }
  // StartPostcopy (sp_ as modified by the test); true if the destination said Ready.
  bool StartPostcopyReady() {
    SourceMessage m;
    *m.mutable_start_postcopy() = sp_;
    if (!Send(m)) return false;
    DestinationMessage r;
    return Next(&r) && r.has_ready();
  }
  // Everything up to Ready, the happy way.
  void UpToReady(const std::vector<PageRecord>& precopy = {}) {
    ASSERT_NO_FATAL_FAILURE(Header());
    ASSERT_NO_FATAL_FAILURE(PrecopyStreams(precopy));
    ASSERT_NO_FATAL_FAILURE(OpenLanes());
    ASSERT_TRUE(StartPostcopyReady()) << Err();
  }
  // Go -> Resumed.
  void Go() {
    SourceMessage m;
    m.mutable_go();
    ASSERT_TRUE(Send(m));
    DestinationMessage r;
    ASSERT_TRUE(Next(&r) && r.has_resumed()) << Err();
  }
  // Go, then time for the guest to run into missing pages (nothing answers them in the tests
  // that call this): both vCPUs wait in the kernel (FailureRightAfterGoPausesGuest covers a
  // failure right at Go).
  void GoAndLetGuestBlock() {
    ASSERT_NO_FATAL_FAILURE(Go());
    absl::SleepFor(absl::Milliseconds(500));
  }
  // One push stream with `index`; returns its status.
  grpc::Status Push(uint32_t index, const std::vector<PageRecord>& recs, PagesSummary* sum) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    auto w = mig_->Pages(&ctx, sum);
    PageBatch b;
    b.set_migration_id(id_);
    b.set_stream(index);
    bool ok = w->Write(b);
    for (size_t i = 0; ok && i < recs.size(); i += 64) {
      b.clear_pages();
      for (size_t j = i; j < recs.size() && j < i + 64; ++j) *b.add_pages() = recs[j];
      ok = w->Write(b);
    }
    w->WritesDone();
    return w->Finish();
  }
  // Pushes every snapshot page not in `skip` (plus `extra` first on the first stream), then
  // PostcopyComplete; true if PostcopyDone came back.
  bool PushAllAndComplete(const std::vector<PageRecord>& extra = {},
                          const std::map<uint64_t, bool>& skip = {}, bool expect_ok = true) {
    const uint32_t n = sp_.push_streams(), first = snap_->header.page_streams();
    std::vector<std::vector<PageRecord>> per(n);
    per[0] = extra;
    size_t k = 0;
    for (const auto& [gpa, rec] : snap_->pages)
      if (!skip.count(gpa)) per[k++ % n].push_back(rec);
    SourceMessage m;
    for (uint32_t i = 0; i < n; ++i) {
      PagesSummary sum;
      grpc::Status s = Push(first + i, per[i], &sum);
      if (expect_ok) {
        EXPECT_TRUE(s.ok()) << "push stream " << first + i << ": " << s.error_message();
      }
      push_errors_ += s.error_message();
      m.mutable_postcopy_complete()->add_pages_per_stream(per[i].size());
    }
    if (!Send(m)) return false;
    DestinationMessage r;
    if (!Next(&r)) return false;
    if (r.has_postcopy_done()) last_stats_ = r.postcopy_done().stats();
    return r.has_postcopy_done();
  }

  // --- expectations ---------------------------------------------------------------------------
  // Before Go: the destination exits 75 saying `why`, and the guest never ran there.
  void ExpectDestinationFailed(const std::string& why) {
    std::optional<int> st = dst_->Wait(absl::Seconds(40));
    ASSERT_TRUE(st.has_value()) << "destination still running" << Err();
    std::string err = ReadFileOrEmpty(dir_.File("dst.err"));
    EXPECT_EQ(*st, kExitIncomingFailed) << err;
    EXPECT_NE(err.find("incoming migration failed"), std::string::npos) << err;
    EXPECT_NE(err.find(why), std::string::npos) << "want '" << why << "' in:\n" << err;
    EXPECT_EQ(ReadFileOrEmpty(dir_.File("dst.log")), "") << "the guest ran on the destination";
  }
  VmInfo DstInfo() {
    VmInfo info;
    grpc::ClientContext c;
    c.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
    (void)dst_api_->GetInfo(&c, GetInfoRequest(), &info);
    return info;
  }
  // After Go: the destination's VM ends up PAUSED with a note naming `why`; the process lives on,
  // the guest printed no FAIL and does not move any more.
  void ExpectPausedWithNote(const std::string& why) {
    VmInfo info;
    for (absl::Time end = absl::Now() + absl::Seconds(20); absl::Now() < end;) {
      info = DstInfo();
      if (info.state() == PAUSED && !info.migration_note().empty()) break;
      absl::SleepFor(absl::Milliseconds(50));
    }
    EXPECT_EQ(info.state(), PAUSED) << Err() << Threads(dst_->pid());
    EXPECT_NE(info.migration_note().find("post-copy migration failed"), std::string::npos)
        << info.migration_note();
    EXPECT_NE(info.migration_note().find(why), std::string::npos)
        << "want '" << why << "' in note: " << info.migration_note();
    EXPECT_FALSE(dst_->Wait(absl::ZeroDuration()).has_value()) << "destination exited" << Err();
    std::string before = ReadFileOrEmpty(dir_.File("dst.log"));
    EXPECT_EQ(before.find("FAIL"), std::string::npos) << before;
    absl::SleepFor(absl::Milliseconds(300));
    EXPECT_EQ(ReadFileOrEmpty(dir_.File("dst.log")), before) << "paused guest still runs";
  }
  // The replayed guest continues on the destination: later generations, no FAIL, no restart.
  void ExpectGuestContinues() {
    const std::string log = dir_.File("dst.log");
    EXPECT_TRUE(WaitForGeneration(log, snap_->last_gen + 2, absl::Seconds(60)))
        << ReadFileOrEmpty(log) << Err();
    std::string dlog = ReadFileOrEmpty(log);
    EXPECT_EQ(dlog.find("FAIL"), std::string::npos) << dlog;
    EXPECT_EQ(dlog.find("memwalk start"), std::string::npos) << "guest restarted: " << dlog;
    VmInfo info = DstInfo();
    EXPECT_EQ(info.state(), RUNNING);
    EXPECT_EQ(info.migration_note(), "");
  }
  // A memwalk page of the snapshot (its content is a generation stamp the guest verifies).
  const PageRecord& WalkPage(uint64_t i) {
    auto it = snap_->pages.find(kWalkBase + i * kPage);
    EXPECT_NE(it, snap_->pages.end()) << "memwalk page not in the snapshot";
    return it->second;
  }
  // Sets bit `gpa` in map `m` (a region-0 map of the right size is created if empty).
  void SetBit(google::protobuf::RepeatedPtrField<std::string>* m, uint64_t gpa) {
    const uint64_t pages = snap_->header.regions(0).size() / kPage;
    if (m->empty())
      for (int i = 0; i < snap_->header.regions_size(); ++i)
        m->Add(std::string((snap_->header.regions(i).size() / kPage + 63) / 64 * 8, '\0'));
    ASSERT_LT(gpa / kPage, pages);
    std::string& b = *m->Mutable(0);
    b[gpa / kPage / 8] = static_cast<char>(b[gpa / kPage / 8] | (1 << (gpa / kPage % 8)));
  }

  TempDir dir_;
  const Snapshot* snap_ = nullptr;
  StartPostcopy sp_;
  std::string id_;
  std::unique_ptr<Subprocess> dst_;
  std::shared_ptr<grpc::Channel> ch_;
  std::unique_ptr<Migration::Stub> mig_;
  std::unique_ptr<Vmm::Stub> dst_api_;
  std::unique_ptr<ControlCall> control_;
  std::vector<std::unique_ptr<LaneCall>> lanes_;
  std::atomic<bool> answer_lanes_{true};
  std::atomic<uint64_t> requested_{0};
  PostcopyStats last_stats_;
  std::string push_errors_;
};

// The harness itself: an unmodified replay completes and the guest runs on, verified by memwalk.
TEST_F(HostileSourceTest, FaithfulReplayCompletes) {
  ASSERT_NO_FATAL_FAILURE(UpToReady());
  ASSERT_NO_FATAL_FAILURE(Go());
  absl::SleepFor(absl::Milliseconds(300));  // some pages travel on demand first
  ASSERT_TRUE(PushAllAndComplete()) << Err();
  EXPECT_EQ(last_stats_.missing_pages(), 0u);
  EXPECT_GT(requested_.load(), 0u) << "the guest faulted on no page";
  ExpectGuestContinues();
}

// The harness can fail: the same replay with one memwalk page pushed with wrong content makes
// the guest print FAIL (so the "no FAIL" checks of the other tests mean something).
TEST_F(HostileSourceTest, HarnessDetectsACorruptPage) {
  answer_lanes_ = false;  // the corrupt copy below must be the one installed
  ASSERT_NO_FATAL_FAILURE(UpToReady());
  ASSERT_NO_FATAL_FAILURE(Go());
  const uint64_t gpa = WalkPage(5).gpa();
  ASSERT_TRUE(PushAllAndComplete({Raw(gpa, std::string(kPage, 'Z'))}, {{gpa, true}})) << Err();
  EXPECT_TRUE(WaitForFileContains(dir_.File("dst.log"), "FAIL", absl::Seconds(30)))
      << ReadFileOrEmpty(dir_.File("dst.log"));
}

// --- StartPostcopy validation (before Go: exit 75, the guest never runs) ----------------------

TEST_F(HostileSourceTest, PresentMapWithWrongRegionCountIsRefused) {
  sp_.add_present(std::string(8, '\0'));
  ASSERT_NO_FATAL_FAILURE(Header());
  ASSERT_NO_FATAL_FAILURE(PrecopyStreams());
  ASSERT_NO_FATAL_FAILURE(OpenLanes());
  EXPECT_FALSE(StartPostcopyReady());
  ExpectDestinationFailed("present map: 2 regions, expected 1");
}

TEST_F(HostileSourceTest, ZeroMapWithWrongLengthIsRefused) {
  sp_.mutable_zero(0)->append("xx");
  ASSERT_NO_FATAL_FAILURE(Header());
  ASSERT_NO_FATAL_FAILURE(PrecopyStreams());
  ASSERT_NO_FATAL_FAILURE(OpenLanes());
  EXPECT_FALSE(StartPostcopyReady());
  ExpectDestinationFailed("zero map of region 0");
}

TEST_F(HostileSourceTest, ZeroLanesAreRefused) {
  ASSERT_NO_FATAL_FAILURE(Header());
  ASSERT_NO_FATAL_FAILURE(PrecopyStreams());
  sp_.set_lanes(0);
  EXPECT_FALSE(StartPostcopyReady());
  ExpectDestinationFailed("0 demand lanes announced");
}

TEST_F(HostileSourceTest, AbsurdLanesAreRefused) {
  ASSERT_NO_FATAL_FAILURE(Header());
  ASSERT_NO_FATAL_FAILURE(PrecopyStreams());
  sp_.set_lanes(1000000);
  EXPECT_FALSE(StartPostcopyReady());
  ExpectDestinationFailed("1000000 demand lanes announced");
}

TEST_F(HostileSourceTest, AbsurdPushStreamsAreRefused) {
  sp_.set_push_streams(1000000);
  ASSERT_NO_FATAL_FAILURE(Header());
  ASSERT_NO_FATAL_FAILURE(PrecopyStreams());
  ASSERT_NO_FATAL_FAILURE(OpenLanes());
  EXPECT_FALSE(StartPostcopyReady());
  ExpectDestinationFailed("bad number of push streams");
}

TEST_F(HostileSourceTest, StartPostcopyTwiceIsRefused) {
  ASSERT_NO_FATAL_FAILURE(UpToReady());
  EXPECT_FALSE(StartPostcopyReady());
  ExpectDestinationFailed("did not send Go");
}

TEST_F(HostileSourceTest, CompleteAfterStartPostcopyIsRefused) {
  ASSERT_NO_FATAL_FAILURE(UpToReady());
  SourceMessage m;
  m.mutable_complete()->add_pages_per_stream(0);
  ASSERT_TRUE(Send(m));
  DestinationMessage r;
  EXPECT_FALSE(Next(&r));
  ExpectDestinationFailed("did not send Go");
}

TEST_F(HostileSourceTest, PostcopyCompleteBeforeStartPostcopyIsRefused) {
  ASSERT_NO_FATAL_FAILURE(Header());
  SourceMessage m;
  m.mutable_postcopy_complete()->add_pages_per_stream(0);
  ASSERT_TRUE(Send(m));
  DestinationMessage r;
  EXPECT_FALSE(Next(&r));
  ExpectDestinationFailed("expected Complete");
}

// The source's control stream vanishes right after Ready, before Go.
TEST_F(HostileSourceTest, ControlVanishesBeforeGo) {
  ASSERT_NO_FATAL_FAILURE(UpToReady());
  control_->ctx.TryCancel();
  ExpectDestinationFailed("before Go");
}

TEST_F(HostileSourceTest, RecoverOnFreshDestinationIsRefused) {
  control_ = OpenControl();
  SourceMessage m;
  m.mutable_recover()->set_migration_id(id_);
  m.mutable_recover()->set_push_streams(1);
  ASSERT_TRUE(Send(m));
  DestinationMessage r;
  EXPECT_FALSE(Next(&r));
  ExpectDestinationFailed("not a header");
}

// A page marked both present and zero: "present" wins (the destination's copy is current), so
// the page sent in pre-copy is kept, never replaced by zeros. memwalk would print FAIL.
TEST_F(HostileSourceTest, ZeroBitOnPresentPageKeepsTheData) {
  std::vector<PageRecord> pre;
  for (uint64_t i = 0; i < 64; ++i) pre.push_back(WalkPage(i));
  for (const PageRecord& r : pre) {
    ASSERT_NO_FATAL_FAILURE(SetBit(sp_.mutable_present(), r.gpa()));
    ASSERT_NO_FATAL_FAILURE(SetBit(sp_.mutable_zero(), r.gpa()));
  }
  ASSERT_NO_FATAL_FAILURE(UpToReady(pre));
  ASSERT_NO_FATAL_FAILURE(Go());
  std::map<uint64_t, bool> skip;
  for (const PageRecord& r : pre) skip[r.gpa()] = true;
  ASSERT_TRUE(PushAllAndComplete({}, skip)) << Err();
  ExpectGuestContinues();
}

// --- Demand lanes (after Go) -------------------------------------------------------------------

TEST_F(HostileSourceTest, LaneHelloWithWrongMigrationIdIsRefused) {
  grpc::ClientContext ctx;
  auto rw = mig_->Demand(&ctx);
  ASSERT_NO_FATAL_FAILURE(Header());
  PageBatch hello;
  hello.set_migration_id("not-" + id_);
  hello.set_stream(0);
  rw->Write(hello);
  rw->WritesDone();
  grpc::Status s = rw->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();
  // The real migration is not disturbed.
  ASSERT_NO_FATAL_FAILURE(PrecopyStreams());
  ASSERT_NO_FATAL_FAILURE(OpenLanes());
  ASSERT_TRUE(StartPostcopyReady()) << Err();
  ASSERT_NO_FATAL_FAILURE(Go());
  ASSERT_TRUE(PushAllAndComplete()) << Err();
  ExpectGuestContinues();
}

TEST_F(HostileSourceTest, LaneIndexOutOfRangeIsRefused) {
  ASSERT_NO_FATAL_FAILURE(Header());
  grpc::ClientContext ctx;
  auto rw = mig_->Demand(&ctx);
  PageBatch hello;
  hello.set_migration_id(id_);
  hello.set_stream(snap_->sp.lanes());
  rw->Write(hello);
  rw->WritesDone();
  grpc::Status s = rw->Finish();
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_NE(s.error_message().find("bad demand lane"), std::string::npos) << s.error_message();
}

// A lane answer batch naming another migration (after a valid hello) must not be installed.
// Fixed bug: Demand() checked the id of the hello only; later batches were installed whatever
// migration (or lane) they named.
TEST_F(HostileSourceTest, LaneBatchForWrongMigrationPausesGuest) {
  answer_lanes_ = false;  // nothing honest arrives: the guest waits for its pages
  ASSERT_NO_FATAL_FAILURE(UpToReady());
  ASSERT_NO_FATAL_FAILURE(GoAndLetGuestBlock());
  PageBatch b;
  b.set_migration_id("other-migration");
  b.set_stream(0);
  *b.add_pages() = WalkPage(0);
  LaneWrite(0, b);
  ExpectPausedWithNote("other-migration");
}

// Regression: a post-copy failure within ~1 ms of Go (here: a bad lane answer sent right behind
// Go) used to make FailPostcopy's Vm::Pause() never return (3 runs out of 4): a vCPU signalled
// just as it entered a userfault for a missing page retries the fault in the kernel on this KVM
// (wchan "0", not "handle_userfault"), so Vcpu::BlockedOnMissingPage() stayed false and Pause()
// signalled it every 5 ms forever. Pause now also asks post-copy whether the vCPU waits for a
// page (PostcopyMemory::LaneWaiting) and leaves it alone.
TEST_F(HostileSourceTest, FailureRightAfterGoPausesGuest) {
  answer_lanes_ = false;
  ASSERT_NO_FATAL_FAILURE(UpToReady());
  SourceMessage m;
  m.mutable_go();
  ASSERT_TRUE(Send(m));
  PageBatch b;
  b.set_migration_id(id_);
  b.set_stream(0);
  *b.add_pages() = Raw(WalkPage(0).gpa(), "short");
  LaneWrite(0, b);
  ExpectPausedWithNote("length 5");
}

struct BadLanePage {
  const char* name;
  std::function<PageRecord(const PageRecord& good)> make;
  const char* why;
};

class BadLanePageTest : public HostileSourceTest,
                        public ::testing::WithParamInterface<BadLanePage> {};

TEST_P(BadLanePageTest, PausesGuestWithNote) {
  answer_lanes_ = false;
  ASSERT_NO_FATAL_FAILURE(UpToReady());
  ASSERT_NO_FATAL_FAILURE(GoAndLetGuestBlock());
  PageBatch b;
  b.set_migration_id(id_);
  b.set_stream(0);
  *b.add_pages() = GetParam().make(WalkPage(1));
  LaneWrite(0, b);
  ExpectPausedWithNote(GetParam().why);
}

INSTANTIATE_TEST_SUITE_P(
    Pages, BadLanePageTest,
    ::testing::Values(
        BadLanePage{"Unaligned",
                    [](const PageRecord& g) {
                      PageRecord r = g;
                      r.set_gpa(g.gpa() + 8);
                      return r;
                    },
                    "outside guest RAM"},
        BadLanePage{"OutOfRange",
                    [](const PageRecord& g) {
                      PageRecord r = g;
                      r.set_gpa(uint64_t{1} << 40);
                      return r;
                    },
                    "outside guest RAM"},
        BadLanePage{"ShortRaw",
                    [](const PageRecord& g) { return Raw(g.gpa(), std::string(100, 'x')); },
                    "length 100"},
        BadLanePage{"LongRaw",
                    [](const PageRecord& g) { return Raw(g.gpa(), std::string(8192, 'x')); },
                    "length 8192"},
        BadLanePage{"UnknownCodec",
                    [](const PageRecord& g) {
                      PageRecord r = g;
                      r.set_codec(static_cast<PageCodec>(42));
                      return r;
                    },
                    "bad codec 42"}),
    [](const ::testing::TestParamInfo<BadLanePage>& i) { return std::string(i.param.name); });

// A page nobody asked for, then the same page again with other content: installed once, the
// second copy never overwrites the first (memwalk would see the 0x5a bytes as FAIL).
TEST_F(HostileSourceTest, UnrequestedAndDuplicateLanePagesInstalledOnce) {
  ASSERT_NO_FATAL_FAILURE(UpToReady());
  ASSERT_NO_FATAL_FAILURE(Go());
  PageBatch b;
  b.set_migration_id(id_);
  b.set_stream(0);
  for (uint64_t i = 0; i < 64; ++i) *b.add_pages() = WalkPage(i);
  ASSERT_TRUE(LaneWrite(0, b));
  b.clear_pages();
  for (uint64_t i = 0; i < 64; ++i) *b.add_pages() = Raw(WalkPage(i).gpa(), std::string(kPage, 'Z'));
  ASSERT_TRUE(LaneWrite(0, b));
  absl::SleepFor(absl::Milliseconds(500));
  ASSERT_TRUE(PushAllAndComplete()) << Err();
  EXPECT_GE(last_stats_.duplicates(), 64u);
  ExpectGuestContinues();
}

// --- Push streams ------------------------------------------------------------------------------

// A pushed page for a gpa already present (sent in pre-copy and marked present) must not be
// overwritten: the bogus copy is all 'Z', the guest verifies the real one.
TEST_F(HostileSourceTest, PushForPresentPageDoesNotOverwrite) {
  std::vector<PageRecord> pre, bogus;
  std::map<uint64_t, bool> skip;
  for (uint64_t i = 0; i < 128; ++i) {
    pre.push_back(WalkPage(i));
    bogus.push_back(Raw(WalkPage(i).gpa(), std::string(kPage, 'Z')));
    skip[WalkPage(i).gpa()] = true;
    ASSERT_NO_FATAL_FAILURE(SetBit(sp_.mutable_present(), WalkPage(i).gpa()));
  }
  ASSERT_NO_FATAL_FAILURE(UpToReady(pre));
  ASSERT_NO_FATAL_FAILURE(Go());
  ASSERT_TRUE(PushAllAndComplete(bogus, skip)) << Err();
  EXPECT_GE(last_stats_.duplicates(), 128u);
  ExpectGuestContinues();
}

TEST_F(HostileSourceTest, PushStreamIndexBeyondPushStreamsIsRefused) {
  ASSERT_NO_FATAL_FAILURE(UpToReady());
  ASSERT_NO_FATAL_FAILURE(Go());
  PagesSummary sum;
  grpc::Status s = Push(snap_->header.page_streams() + sp_.push_streams(),
                        {Raw(WalkPage(0).gpa(), std::string(kPage, 'Z'))}, &sum);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  // The migration goes on undisturbed.
  ASSERT_TRUE(PushAllAndComplete()) << Err();
  ExpectGuestContinues();
}

TEST_F(HostileSourceTest, BadPushedPageFailsAtPostcopyComplete) {
  answer_lanes_ = false;
  ASSERT_NO_FATAL_FAILURE(UpToReady());
  ASSERT_NO_FATAL_FAILURE(GoAndLetGuestBlock());
  EXPECT_FALSE(PushAllAndComplete({Raw(WalkPage(0).gpa(), "short")}, {}, /*expect_ok=*/false));
  EXPECT_NE(push_errors_.find("length 5"), std::string::npos) << push_errors_;
  ExpectPausedWithNote("length 5");
}

// --- Control after Go --------------------------------------------------------------------------

TEST_F(HostileSourceTest, CompleteInsteadOfPostcopyCompletePausesGuest) {
  answer_lanes_ = false;
  ASSERT_NO_FATAL_FAILURE(UpToReady());
  ASSERT_NO_FATAL_FAILURE(GoAndLetGuestBlock());
  SourceMessage m;
  m.mutable_complete();
  ASSERT_TRUE(Send(m));
  ExpectPausedWithNote("went away before it pushed every page");
}

// Recover while the post-copy runs fine (nothing paused), and with a wrong id once it failed.
TEST_F(HostileSourceTest, RecoverRefusedUnlessPausedAndMatching) {
  answer_lanes_ = false;
  ASSERT_NO_FATAL_FAILURE(UpToReady());
  ASSERT_NO_FATAL_FAILURE(GoAndLetGuestBlock());
  auto recover = [&](const std::string& id) {
    auto c = OpenControl();
    SourceMessage m;
    m.mutable_recover()->set_migration_id(id);
    m.mutable_recover()->set_push_streams(1);
    c->rw->Write(m);
    DestinationMessage r;
    EXPECT_FALSE(c->rw->Read(&r)) << "got a reply to a bad Recover";
    return c->rw->Finish();
  };
  grpc::Status s = recover(id_);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();
  // Now the source "goes away": the post-copy fails and waits for a recovery.
  control_->ctx.TryCancel();
  ExpectPausedWithNote("went away");
  s = recover("not-" + id_);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();
  EXPECT_EQ(DstInfo().state(), PAUSED);
}

// ---------------------------------------------------------------------------------------------
// Hostile destination -> real source.

class HostileDestinationTest : public PostcopyFaultsBase {
 protected:
  void SetUp() override {
    if (!KvmAvailable()) GTEST_SKIP() << "KVM UNAVAILABLE: this KVM test did NOT run";
  }
  std::string Err() { return "\nsource stderr:\n" + ReadFileOrEmpty(dir_.File("src.err")); }
  // The source's guest is not running any more, and never ran after the switchover.
  void ExpectSourceGuestStopped() {
    const int gen = MaxGeneration(ReadFileOrEmpty(dir_.File("src.log")));
    absl::SleepFor(absl::Milliseconds(500));
    EXPECT_EQ(MaxGeneration(ReadFileOrEmpty(dir_.File("src.log"))), gen)
        << "the source's guest runs after the switchover";
  }
  TempDir dir_;
};

TEST_F(HostileDestinationTest, BadPageRequestsAreIgnored) {
  ASSERT_NO_FATAL_FAILURE(StartSource(dir_));
  FakeDestination fake(DstMode::kBadRequests);
  ASSERT_TRUE(fake.Serve(dir_.File("fake.sock")));
  ASSERT_TRUE(StartPostcopyMigration(dir_.File("fake.sock")).ok());
  MigrationProgress p = WaitEnd(absl::Seconds(60));
  EXPECT_EQ(p.phase(), MIGRATION_COMPLETED) << Describe(p) << Err();
  {
    std::lock_guard<std::mutex> l(fake.mu_);
    EXPECT_EQ(fake.lane_answers_, std::vector<uint64_t>{kWalkBase})
        << "only the valid request is answered";
  }
  EXPECT_NE(ReadFileOrEmpty(dir_.File("src.err")).find("outside guest RAM"), std::string::npos)
      << Err();
  std::optional<int> st = src_->Wait(absl::Seconds(15));
  ASSERT_TRUE(st.has_value()) << Err();
  EXPECT_EQ(*st, 0);
  ExpectSourceGuestStopped();
}

// 1e6 gpas (512 distinct pages) in one request, ~4 MiB on the wire: the answer must not be built
// as one 4 GiB batch.
// Fixed bug: ServeLane encoded every gpa into one PageBatch; gRPC could not serialize it and
// aborted the source VMM ("assertion failed: serializer_(msg_).ok()"), killing its VM.
TEST_F(HostileDestinationTest, HugePageRequestIsBounded) {
  ASSERT_NO_FATAL_FAILURE(StartSource(dir_));
  FakeDestination fake(DstMode::kHugeRequest);
  ASSERT_TRUE(fake.Serve(dir_.File("fake.sock")));
  // VmHWM is the process's peak RSS so far: sampled until the source exits.
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> peak_kib{0};
  std::thread sampler([&] {
    while (!stop.load()) {
      uint64_t k = PeakRssKib(src_->pid());
      if (k > peak_kib.load()) peak_kib = k;
      absl::SleepFor(absl::Milliseconds(5));
    }
  });
  ASSERT_TRUE(StartPostcopyMigration(dir_.File("fake.sock")).ok());
  MigrationProgress p = WaitEnd(absl::Seconds(90));
  EXPECT_EQ(p.phase(), MIGRATION_COMPLETED) << Describe(p) << Err();
  {
    // 512 distinct pages were asked for: each answered once, not 1e6 times.
    std::lock_guard<std::mutex> l(fake.mu_);
    EXPECT_EQ(fake.lane_answers_.size(), 512u);
  }
  // The source VMM exits by itself after a completed migration: cleanly, not by an abort.
  std::optional<int> st = src_->Wait(absl::Seconds(15));
  stop = true;
  sampler.join();
  ASSERT_TRUE(st.has_value()) << Err();
  EXPECT_EQ(*st, 0) << Err();
  Mark(absl::StrCat("huge request: ", Describe(p), ", source peak RSS ", peak_kib / 1024, " MiB"));
  EXPECT_GT(peak_kib.load(), 0u);
  EXPECT_LT(peak_kib.load(), 1024u * 1024u) << "source peak RSS " << peak_kib << " KiB" << Err();
}

TEST_F(HostileDestinationTest, NoResumedLeavesSourcePausedNeverRunsTwice) {
  ASSERT_NO_FATAL_FAILURE(StartSource(dir_));
  FakeDestination fake(DstMode::kNoResumed);
  ASSERT_TRUE(fake.Serve(dir_.File("fake.sock")));
  ASSERT_TRUE(StartPostcopyMigration(dir_.File("fake.sock")).ok());
  MigrationProgress p = WaitEnd(absl::Seconds(60));
  EXPECT_EQ(p.phase(), MIGRATION_FAILED) << Describe(p) << Err();
  EXPECT_NE(p.error().find("did not confirm"), std::string::npos) << Describe(p);
  EXPECT_NE(SrcInfo().state(), RUNNING);
  ExpectSourceGuestStopped();
  EXPECT_FALSE(src_->Wait(absl::ZeroDuration()).has_value()) << "source exited" << Err();
  src_->Signal(SIGKILL);
}

TEST_F(HostileDestinationTest, BadRecoverStateKeepsMigrationPaused) {
  ASSERT_NO_FATAL_FAILURE(StartSource(dir_));
  FakeDestination fake(DstMode::kBadRecoverState);
  ASSERT_TRUE(fake.Serve(dir_.File("fake.sock")));
  ASSERT_TRUE(StartPostcopyMigration(dir_.File("fake.sock")).ok());
  MigrationProgress p = WaitEnd(absl::Seconds(60));
  ASSERT_EQ(p.phase(), MIGRATION_POSTCOPY_PAUSED) << Describe(p) << Err();
  RecoverMigrationRequest r;
  r.set_destination(dir_.File("fake.sock"));
  RecoverMigrationResponse resp;
  grpc::ClientContext c;
  grpc::Status s = src_stub_->RecoverMigration(&c, r, &resp);
  ASSERT_TRUE(s.ok()) << s.error_message();
  p = WaitEnd(absl::Seconds(30));
  EXPECT_EQ(fake.recovers_.load(), 1);
  EXPECT_EQ(p.phase(), MIGRATION_POSTCOPY_PAUSED) << Describe(p) << Err();
  EXPECT_NE(p.error().find("RecoverState"), std::string::npos) << Describe(p);
  EXPECT_NE(SrcInfo().state(), RUNNING);
  ExpectSourceGuestStopped();
  EXPECT_FALSE(src_->Wait(absl::ZeroDuration()).has_value()) << "source exited" << Err();
  src_->Signal(SIGKILL);
}

}  // namespace
}  // namespace microvmm::testing
