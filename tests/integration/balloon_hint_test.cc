// virtio-balloon free page hinting end to end: the balloonhint test guest
// (tests/guest/balloonhint.c: its own virtio-pci driver, exit statuses 50..59) against the real
// `vmm --balloon hinting`, alone and while it live-migrates (the migration source starts a hinting
// session, the guest hints its 44 MiB of freed memory, the source skips those pages).
#include <algorithm>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "proto/vmm.grpc.pb.h"
#include "tests/util/subprocess.h"

namespace microvmm::testing {
namespace {

constexpr uint64_t kMiB = 1 << 20;
// Guest defaults: a 48 MiB region at 16 MiB, 4 MiB kept in use, 44 MiB freed and hinted in
// 4 MiB buffers.
constexpr uint64_t kFreeBytes = 44 * kMiB;

// Highest N of "balloonhint gen=N ok" in `log` (0 if none).
int MaxGen(const std::string& log) {
  int best = 0;
  const std::string key = "balloonhint gen=";
  for (size_t p = log.find(key); p != std::string::npos; p = log.find(key, p + 1))
    best = std::max(best, atoi(log.c_str() + p + key.size()));
  return best;
}

class BalloonHintTest : public ::testing::Test {
 protected:
  struct Result {
    std::optional<int> status;
    std::string serial, err;
  };
  // Runs the guest to its exit.
  Result Run(std::vector<std::string> flags, const std::string& guest_args) {
    std::vector<std::string> argv = {Runfile("vmm/vmm"), "--test-guest", "balloonhint",
                                     "--memory", "96", "--test-guest-args", guest_args,
                                     "--serial", "file:" + dir_.File("serial")};
    argv.insert(argv.end(), flags.begin(), flags.end());
    Subprocess p(argv, dir_.File("out"), dir_.File("err"));
    Result r;
    r.status = p.Wait(absl::Seconds(60));
    r.serial = ReadFileOrEmpty(dir_.File("serial"));
    r.err = ReadFileOrEmpty(dir_.File("err"));
    return r;
  }

  // Source VMM running the guest with `flags`/`guest_args` (serial <tag>.src, API <tag>.api),
  // once its walk runs; `stub_` talks to it.
  bool StartSource(const std::string& tag, std::vector<std::string> flags,
                   const std::string& guest_args) {
    const std::string src_log = dir_.File(tag + ".src");
    std::vector<std::string> argv = {Runfile("vmm/vmm"), "--test-guest", "balloonhint", "--memory",
                                     "96", "--test-guest-args", guest_args, "--serial",
                                     "file:" + src_log, "--api-socket", dir_.File(tag + ".api")};
    argv.insert(argv.end(), flags.begin(), flags.end());
    src_ = std::make_unique<Subprocess>(argv, dir_.File(tag + ".src.out"),
                                        dir_.File(tag + ".src.err"));
    if (!WaitForFileContains(src_log, "balloonhint gen=3 ok", absl::Seconds(30))) {
      ADD_FAILURE() << "guest did not start:\n" << ReadFileOrEmpty(src_log) << Errs(tag);
      return false;
    }
    stub_ = Vmm::NewStub(
        grpc::CreateChannel("unix:" + dir_.File(tag + ".api"), grpc::InsecureChannelCredentials()));
    return true;
  }
  // Destination VMM listening on <dst>.sock (serial <dst>.dst).
  void StartDestination(const std::string& dst) {
    dst_ = std::make_unique<Subprocess>(
        std::vector<std::string>{Runfile("vmm/vmm"), "--incoming", dir_.File(dst + ".sock"),
                                 "--serial", "file:" + dir_.File(dst + ".dst")},
        dir_.File(dst + ".dst.out"), dir_.File(dst + ".dst.err"));
  }
  bool StartMigration(const std::string& dst, uint64_t bytes_per_s,
                      uint32_t postcopy_after = 0) {
    StartMigrationRequest req;
    req.set_postcopy_after_iterations(postcopy_after);
    req.set_destination(dir_.File(dst + ".sock"));
    req.set_bandwidth_limit_bytes_per_s(bytes_per_s);
    req.set_downtime_limit_ms(postcopy_after ? 1 : 300);  // post-copy case: never converge
    StartMigrationResponse resp;
    grpc::ClientContext ctx;
    grpc::Status s = stub_->StartMigration(&ctx, req, &resp);
    EXPECT_TRUE(s.ok()) << s.error_message();
    return s.ok();
  }
  MigrationProgress WatchToEnd() {
    MigrationProgress last, p;
    grpc::ClientContext ctx;
    WatchMigrationRequest w;
    w.set_interval_ms(100);
    auto reader = stub_->WatchMigration(&ctx, w);
    while (reader->Read(&p)) last = p;
    reader->Finish();
    return last;
  }
  // Source + destination, then a migration at 64 MiB/s: the first pass takes ~1 s, so the
  // guest's hints (a few ms after the session starts) arrive before it reaches the free pages.
  MigrationProgress Migrate(const std::string& tag, std::vector<std::string> flags,
                            const std::string& guest_args, uint32_t postcopy_after = 0) {
    StartDestination(tag);
    if (!StartSource(tag, flags, guest_args) ||
        !StartMigration(tag, 64 * kMiB, postcopy_after))
      return MigrationProgress();
    return WatchToEnd();
  }

  // After a completed migration: the source exits 0, the destination continues the walk (3 more
  // generations than the source reached, nothing restarted, no FAIL). Returns the dst log.
  std::string CheckDestinationContinues(const std::string& tag, const std::string& dst) {
    int gen_src = MaxGen(ReadFileOrEmpty(dir_.File(tag + ".src")));
    auto st = src_->Wait(absl::Seconds(10));
    EXPECT_TRUE(st.has_value() && *st == 0) << "source did not exit 0" << Errs(tag);
    const std::string dst_log = dir_.File(dst + ".dst");
    EXPECT_TRUE(WaitForFileContains(dst_log, "balloonhint gen=" + std::to_string(gen_src + 3) + " ok",
                                    absl::Seconds(30)))
        << "dst log:\n" << ReadFileOrEmpty(dst_log) << Errs(tag);
    std::string log = ReadFileOrEmpty(dst_log);
    EXPECT_EQ(log.find("FAIL"), std::string::npos) << log;
    EXPECT_EQ(log.find("balloonhint start"), std::string::npos) << "guest restarted: " << log;
    dst_->Signal(SIGTERM);
    EXPECT_TRUE(dst_->Wait(absl::Seconds(10)).has_value());
    return log;
  }

  std::string Errs(const std::string& tag) {
    return "\nsource stderr:\n" + ReadFileOrEmpty(dir_.File(tag + ".src.err")) +
           "\ndestination stderr:\n" + ReadFileOrEmpty(dir_.File(tag + ".dst.err"));
  }

  TempDir dir_;
  std::unique_ptr<Subprocess> src_, dst_;
  std::unique_ptr<Vmm::Stub> stub_;
};

// The driver finds the balloon, negotiates VERSION_1 + FREE_PAGE_HINT, sets up free_page_vq at
// its spec index 3, touches 48 MiB and verifies generations of the 4 MiB it keeps. Nothing asks
// for hints here, so none are sent.
TEST_F(BalloonHintTest, NegotiatesAndRunsGenerations) {
  REQUIRE_KVM();
  Result r = Run({"--balloon", "hinting"}, "gens=3");
  ASSERT_TRUE(r.status.has_value()) << "vmm did not exit";
  EXPECT_EQ(*r.status, 0) << r.serial << r.err;
  EXPECT_NE(r.serial.find("balloonhint ready queue=3 features=0x100000008\n"), std::string::npos)
      << r.serial;
  EXPECT_NE(r.serial.find("balloonhint filled mib=48 free_mib=44\n"), std::string::npos);
  EXPECT_NE(r.serial.find("balloonhint gen=3 ok\n"), std::string::npos) << r.serial;
  EXPECT_NE(r.serial.find("balloonhint finished gens=3\n"), std::string::npos);
  EXPECT_EQ(r.serial.find("hinted"), std::string::npos) << r.serial;
}

// A balloon without hinting: the guest refuses to run (its distinct status 54).
TEST_F(BalloonHintTest, RefusesBalloonWithoutHinting) {
  REQUIRE_KVM();
  Result r = Run({"--balloon", "on"}, "gens=3");
  ASSERT_TRUE(r.status.has_value());
  EXPECT_EQ(*r.status, 54) << r.serial << r.err;
  EXPECT_NE(r.serial.find("FREE_PAGE_HINT not offered"), std::string::npos) << r.serial;
  EXPECT_EQ(r.serial.find("gen=1 ok"), std::string::npos);
}

TEST_F(BalloonHintTest, NoBalloonNoRun) {
  REQUIRE_KVM();
  Result r = Run({}, "gens=3");
  ASSERT_TRUE(r.status.has_value());
  EXPECT_EQ(*r.status, 51) << r.serial << r.err;
}

// The same guest migrated twice: without hinting (balloon without the feature, guest in its
// `nohint` baseline mode: same fill, same walk) the 48 MiB it touched go over the wire; with
// hinting the guest answers the source's hinting session with its 44 MiB of freed memory, and
// those are not sent. With reuse=1 the guest writes one page of every hinted 4 MiB buffer right
// after hinting: those writes must still arrive (the destination verifies them every
// generation), and the destination guest gets the command id DONE (hinted pages back).
TEST_F(BalloonHintTest, HintsCutWhatMigrationSendsAndRewrittenPagesStillArrive) {
  REQUIRE_KVM();
  MigrationProgress without = Migrate("plain", {"--balloon", "on"}, "nohint");
  ASSERT_EQ(without.phase(), MIGRATION_COMPLETED) << without.error() << Errs("plain");
  EXPECT_EQ(without.free_page_hint_bytes(), 0u);
  CheckDestinationContinues("plain", "plain");

  MigrationProgress with = Migrate("hint", {"--balloon", "hinting"}, "reuse=1");
  ASSERT_EQ(with.phase(), MIGRATION_COMPLETED) << with.error() << Errs("hint");
  const std::string src_log = ReadFileOrEmpty(dir_.File("hint.src"));
  EXPECT_NE(src_log.find("balloonhint hinted id=2 bytes=" + std::to_string(kFreeBytes) + "\n"),
            std::string::npos)
      << src_log;
  EXPECT_NE(src_log.find("balloonhint reused pages=11 id=2\n"), std::string::npos) << src_log;
  EXPECT_EQ(with.free_page_hint_bytes(), kFreeBytes);
  EXPECT_GE(with.free_page_skipped_bytes(), kFreeBytes * 3 / 4);
  // "Most of the freed memory" no longer crosses the wire.
  EXPECT_GE(without.bytes_sent(), 48 * kMiB);
  EXPECT_LE(with.bytes_sent() + kFreeBytes * 3 / 4, without.bytes_sent())
      << "with hints " << with.bytes_sent() << " bytes, without " << without.bytes_sent();
  std::string dst_log = CheckDestinationContinues("hint", "hint");
  EXPECT_NE(dst_log.find("balloonhint cmd done\n"), std::string::npos) << dst_log;
  std::printf("bytes sent: %lu without hints, %lu with; hinted %lu, not sent %lu\n",
              (unsigned long)without.bytes_sent(), (unsigned long)with.bytes_sent(),
              (unsigned long)with.free_page_hint_bytes(),
              (unsigned long)with.free_page_skipped_bytes());
}

// A cancelled migration ends its hinting session with DONE (the guest may use the pages again);
// the next migration starts a new session (id 3) and the guest hints again, now without the 11
// pages it reused after the first session; that migration completes and the walk (reused pages
// included) continues on the destination.
TEST_F(BalloonHintTest, CancelledMigrationEndsSessionAndNextOneHintsAgain) {
  REQUIRE_KVM();
  StartDestination("first");
  ASSERT_TRUE(StartSource("src", {"--balloon", "hinting"}, "reuse=1"));
  // 64 KiB/s: the migration cannot finish before it is cancelled.
  ASSERT_TRUE(StartMigration("first", 64 * 1024));
  const std::string src_log = dir_.File("src.src");
  ASSERT_TRUE(WaitForFileContains(src_log, "balloonhint reused pages=11 id=2\n", absl::Seconds(30)))
      << ReadFileOrEmpty(src_log) << Errs("src");
  EXPECT_NE(ReadFileOrEmpty(src_log).find("balloonhint hinted id=2 bytes=" +
                                          std::to_string(kFreeBytes) + "\n"),
            std::string::npos);
  {
    grpc::ClientContext ctx;
    CancelMigrationRequest req;
    CancelMigrationResponse resp;
    grpc::Status s = stub_->CancelMigration(&ctx, req, &resp);
    ASSERT_TRUE(s.ok()) << s.error_message();
  }
  EXPECT_EQ(WatchToEnd().phase(), MIGRATION_CANCELLED);
  EXPECT_TRUE(WaitForFileContains(src_log, "balloonhint cmd done\n", absl::Seconds(10)))
      << ReadFileOrEmpty(src_log);

  StartDestination("second");  // (replacing dst_ kills the first destination if it still runs)
  ASSERT_TRUE(StartMigration("second", 64 * kMiB));
  MigrationProgress p = WatchToEnd();
  ASSERT_EQ(p.phase(), MIGRATION_COMPLETED) << p.error() << Errs("src");
  const uint64_t second = kFreeBytes - 11 * 4096;
  EXPECT_NE(ReadFileOrEmpty(src_log).find("balloonhint hinted id=3 bytes=" +
                                          std::to_string(second) + "\n"),
            std::string::npos)
      << ReadFileOrEmpty(src_log);
  EXPECT_EQ(p.free_page_hint_bytes(), second);
  CheckDestinationContinues("src", "second");
}

// Post-copy after one pass with hints: pages hinted free and never written again become zero
// pages at the destination (not fetched, not pushed); the pages the guest reused after its hint
// are dirty, so they are fetched or pushed with their new content (the guest verifies them).
TEST_F(BalloonHintTest, HintedPagesAreZeroPagesInPostcopy) {
  REQUIRE_KVM();
  MigrationProgress p = Migrate("pc", {"--balloon", "hinting"}, "reuse=1", /*postcopy_after=*/1);
  ASSERT_EQ(p.phase(), MIGRATION_COMPLETED) << p.error() << Errs("pc");
  EXPECT_TRUE(p.postcopy());
  EXPECT_EQ(p.free_page_hint_bytes(), kFreeBytes);
  EXPECT_EQ(p.postcopy_stats().missing_pages(), 0u);
  // Far less than the 48 MiB the guest touched crossed the wire.
  EXPECT_LT(p.bytes_sent(), 16 * kMiB) << p.bytes_sent();
  std::string dst_log = CheckDestinationContinues("pc", "pc");
  EXPECT_NE(dst_log.find("cmd done"), std::string::npos) << dst_log;
}

}  // namespace
}  // namespace microvmm::testing
