// Post-copy demand-paging microbenchmark (background.md §1): T threads playing vCPUs each touch
// every page of their own region once; every page is missing; the "source" answers from memory
// at once (no network). Compared in one run, for MINOR (memfd alias write + UFFDIO_CONTINUE)
// and MISSING (UFFDIO_COPY):
//   sharded-inline : PostcopyMemory (per-address-shard uffds + reader threads); FetchFn installs
//                    the page inline (a zero-latency answer)
//   sharded-lanes  : PostcopyMemory; FetchFn queues the request to the lane's responder thread,
//                    which installs it (the shape of per-vCPU network demand lanes)
//   single         : one uffd, one handler thread that reads, fetches and installs synchronously
//                    (QEMU's model). At T=1 this is the raw fault round-trip baseline.
// Latency = per-touch time seen by the vCPU thread (fault -> woken). JSON to stdout and --out.
#include <fcntl.h>
#include <linux/falloc.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <deque>
#include <fstream>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "migration/postcopy/postcopy_memory.h"
#include "migration/postcopy/uffd.h"
#include "vmm/base/log.h"
#include "vmm/memory/guest_memory.h"

namespace microvmm::migration {
namespace {

using Mode = PostcopyOptions::Mode;

int64_t NowNs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

struct Result {
  std::string mode, handler;
  int threads = 0, shards = 0;
  uint64_t pages = 0;
  double seconds = 0, pages_per_s = 0, mib_s = 0, p50_us = 0, p99_us = 0, max_us = 0;
  double internal_p50_us = -1, internal_p99_us = -1;  // PostcopyMemory's own metric
  uint64_t bad = 0;
};

// Runs T toucher threads over [host, host+bytes), region i = i-th T-th. `on_start(i)` runs in
// toucher i before the start barrier (registers its tid).
template <typename OnStart>
void Touch(uint8_t* host, uint64_t bytes, int threads, const std::vector<uint8_t>& src,
           OnStart on_start, Result* res) {
  std::vector<std::vector<uint32_t>> lat(threads);
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  std::atomic<uint64_t> bad{0};
  std::vector<std::thread> ts;
  const uint64_t per = bytes / threads / kPageSize;
  for (int i = 0; i < threads; ++i)
    ts.emplace_back([&, i] {
      on_start(i);
      lat[i].reserve(per);
      ready++;
      while (!go.load()) {
      }
      for (uint64_t p = i * per; p < (i + 1) * per; ++p) {
        int64_t t0 = NowNs();
        uint8_t v = *reinterpret_cast<volatile uint8_t*>(host + p * kPageSize + 5);
        lat[i].push_back(static_cast<uint32_t>(std::min<int64_t>(NowNs() - t0, UINT32_MAX)));
        if (v != src[p * kPageSize + 5]) bad++;
      }
    });
  while (ready.load() < threads) std::this_thread::yield();
  int64_t t0 = NowNs();
  go = true;
  for (auto& t : ts) t.join();
  res->seconds = static_cast<double>(NowNs() - t0) / 1e9;
  std::vector<uint32_t> all;
  for (auto& l : lat) all.insert(all.end(), l.begin(), l.end());
  std::sort(all.begin(), all.end());
  res->pages = all.size();
  res->threads = threads;
  res->pages_per_s = static_cast<double>(all.size()) / res->seconds;
  res->mib_s = res->pages_per_s * kPageSize / (1 << 20);
  res->p50_us = all[all.size() / 2] / 1e3;
  res->p99_us = all[all.size() * 99 / 100] / 1e3;
  res->max_us = all.back() / 1e3;
  res->bad = bad.load();
}

std::vector<std::vector<uint64_t>> NoBits(const GuestMemory& mem) {
  std::vector<std::vector<uint64_t>> b;
  for (const auto& r : mem.regions()) b.emplace_back((r.size / kPageSize + 63) / 64, 0);
  return b;
}

absl::StatusOr<Result> RunSharded(Mode mode, bool lanes_threads, int threads, uint64_t bytes,
                                  const std::vector<uint8_t>& src) {
  auto mem = GuestMemory::Create(bytes);
  if (!mem.ok()) return mem.status();
  std::vector<std::atomic<pid_t>> tids(threads);
  for (auto& t : tids) t = 0;
  PostcopyMemory* pc_raw = nullptr;
  // Per-lane responder queues (sharded-lanes only).
  struct Lane {
    std::mutex mu;
    std::condition_variable cv;
    std::deque<uint64_t> q;
    bool stop = false;
  };
  std::vector<std::unique_ptr<Lane>> lanes;
  for (int i = 0; i < threads + 1; ++i) lanes.push_back(std::make_unique<Lane>());
  auto install = [&](uint64_t gpa) {
    auto r = pc_raw->Install(gpa, std::span<const uint8_t>(src.data() + gpa, kPageSize));
    if (!r.ok()) LOG_ERROR("install: %s", r.status().ToString());
  };
  PostcopyOptions opt;
  opt.mode = mode;
  opt.lanes = threads;
  auto pc = PostcopyMemory::Create(
      mem->get(), opt,
      [&](int lane, uint64_t gpa) {
        if (!lanes_threads) return install(gpa);
        Lane& l = *lanes[lane < 0 ? threads : lane];
        {
          std::lock_guard<std::mutex> g(l.mu);
          l.q.push_back(gpa);
        }
        l.cv.notify_one();
      },
      [&](pid_t tid) {
        for (int i = 0; i < threads; ++i)
          if (tids[i].load(std::memory_order_relaxed) == tid) return i;
        return kVmmLane;
      });
  if (!pc.ok()) return pc.status();
  pc_raw = pc->get();
  std::vector<std::thread> responders;
  if (lanes_threads)
    for (auto& lp : lanes)
      responders.emplace_back([&, l = lp.get()] {
        std::unique_lock<std::mutex> g(l->mu);
        for (;;) {
          l->cv.wait(g, [&] { return !l->q.empty() || l->stop; });
          if (l->q.empty()) return;
          uint64_t gpa = l->q.front();
          l->q.pop_front();
          g.unlock();
          install(gpa);
          g.lock();
        }
      });
  if (absl::Status s = (*pc)->Start(NoBits(**mem), NoBits(**mem)); !s.ok()) return s;
  Result res;
  Touch((*mem)->regions()[0].host, bytes, threads, src,
        [&](int i) { tids[i] = gettid(); }, &res);
  for (auto& l : lanes) {
    {
      std::lock_guard<std::mutex> g(l->mu);
      l->stop = true;
    }
    l->cv.notify_one();
  }
  for (auto& t : responders) t.join();
  res.mode = mode == Mode::kMinor ? "minor" : "missing";
  res.handler = lanes_threads ? "sharded-lanes" : "sharded-inline";
  res.shards = (*pc)->shards();
  auto st = (*pc)->stats();
  double p50 = 0, p99 = 0;
  for (const auto& l : st.lanes) {
    p50 = std::max(p50, l.p50_us);
    p99 = std::max(p99, l.p99_us);
  }
  res.internal_p50_us = p50;  // worst lane
  res.internal_p99_us = p99;
  // Only the touched prefix (bytes rounded down per thread) is complete; no Finish() needed.
  return res;
}

absl::StatusOr<Result> RunSingle(Mode mode, int threads, uint64_t bytes,
                                 const std::vector<uint8_t>& src) {
  auto mem = GuestMemory::Create(bytes);
  if (!mem.ok()) return mem.status();
  const GuestMemory::Region& r = (*mem)->regions()[0];
  bool minor = mode == Mode::kMinor;
  auto u = Userfaultfd::Open(minor ? (1u << 10) /*MINOR_SHMEM*/ : 0);
  if (!u.ok()) return u.status();
  ScopedMmap alias;
  if (minor) {
    void* p = mmap(nullptr, r.size, PROT_READ | PROT_WRITE, MAP_SHARED, r.memfd.get(), 0);
    if (p == MAP_FAILED) return absl::InternalError("mmap alias");
    alias = ScopedMmap(p, r.size);
  }
  auto reg = u->Register(r.host, r.size,
                         minor ? Userfaultfd::kMissing | Userfaultfd::kMinor : Userfaultfd::kMissing);
  if (!reg.ok()) return reg.status();
  ScopedFd stop(eventfd(0, EFD_CLOEXEC));
  std::thread handler([&] {
    pollfd fds[2] = {{u->fd(), POLLIN, 0}, {stop.get(), POLLIN, 0}};
    Userfaultfd::Event ev[1];
    for (;;) {
      poll(fds, 2, -1);
      if (fds[1].revents) return;
      auto n = u->ReadEvents(ev);  // one at a time: read, fetch, install, next
      if (!n.ok() || *n == 0) continue;
      uint64_t off = (ev[0].address & ~(kPageSize - 1)) - reinterpret_cast<uint64_t>(r.host);
      absl::StatusOr<bool> ok;
      if (minor) {
        memcpy(static_cast<uint8_t*>(alias.get()) + off, src.data() + off, kPageSize);
        ok = u->Continue(r.host + off, kPageSize);
      } else {
        ok = u->Copy(r.host + off, src.data() + off, kPageSize);
      }
      if (!ok.ok()) LOG_ERROR("single handler: %s", ok.status().ToString());
    }
  });
  Result res;
  Touch(r.host, bytes, threads, src, [](int) {}, &res);
  uint64_t one = 1;
  if (write(stop.get(), &one, 8) != 8) LOG_ERROR("stop");
  handler.join();
  res.mode = minor ? "minor" : "missing";
  res.handler = "single";
  res.shards = 1;
  return res;
}

std::string ToJson(const Result& r) {
  return absl::StrFormat(
      "{\"mode\": \"%s\", \"handler\": \"%s\", \"threads\": %d, \"shards\": %d, \"pages\": %d, "
      "\"seconds\": %.4f, \"pages_per_s\": %.0f, \"mib_s\": %.1f, \"fault_p50_us\": %.2f, "
      "\"fault_p99_us\": %.2f, \"fault_max_us\": %.1f, \"internal_worst_lane_p50_us\": %.2f, "
      "\"internal_worst_lane_p99_us\": %.2f, \"bad_pages\": %d}",
      r.mode, r.handler, r.threads, r.shards, r.pages, r.seconds, r.pages_per_s, r.mib_s,
      r.p50_us, r.p99_us, r.max_us, r.internal_p50_us, r.internal_p99_us, r.bad);
}

int Main(int argc, char** argv) {
  uint64_t mib = 256;
  std::string out, threads_arg = "1,2,4,8";
  int reps = 1;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&] { return i + 1 < argc ? std::string(argv[++i]) : std::string(); };
    if (a == "--mib") {
      if (!absl::SimpleAtoi(next(), &mib)) return 2;
    } else if (a == "--out") {
      out = next();
    } else if (a == "--threads") {
      threads_arg = next();
    } else if (a == "--reps") {
      if (!absl::SimpleAtoi(next(), &reps)) return 2;
    } else {
      fprintf(stderr,
              "usage: postcopy_bench [--mib N (256, multiple of 16)] [--threads 1,2,4,8] "
              "[--reps R (1)] [--out FILE]\n");
      return a == "--help" ? 0 : 2;
    }
  }
  SetLogLevel(LogLevel::kWarning);
  std::vector<int> tlist;
  for (absl::string_view s : absl::StrSplit(threads_arg, ',')) {
    int t;
    if (!absl::SimpleAtoi(s, &t) || t < 1) return 2;
    tlist.push_back(t);
  }
  const uint64_t bytes = mib << 20;
  std::vector<uint8_t> src(bytes);
  for (uint64_t i = 0; i < bytes; ++i) src[i] = static_cast<uint8_t>(1 + (i * 31 + i / 4096) % 255);
  std::vector<std::string> rows;
  std::vector<Result> results;
  for (Mode mode : {Mode::kMinor, Mode::kMissing})
    for (int t : tlist)
      for (int rep = 0; rep < reps; ++rep)
        for (int h = 0; h < 3; ++h) {
          absl::StatusOr<Result> r = h == 0   ? RunSingle(mode, t, bytes, src)
                                     : h == 1 ? RunSharded(mode, false, t, bytes, src)
                                              : RunSharded(mode, true, t, bytes, src);
          if (!r.ok()) {
            fprintf(stderr, "run failed: %s\n", r.status().ToString().c_str());
            return 1;
          }
          fprintf(stderr, "%-7s %-14s T=%d shards=%d: %8.0f pages/s %7.1f MiB/s p50 %6.2f us "
                  "p99 %7.2f us%s\n", r->mode.c_str(), r->handler.c_str(), t, r->shards,
                  r->pages_per_s, r->mib_s, r->p50_us, r->p99_us,
                  r->bad ? " BAD CONTENT" : "");
          if (r->bad) return 1;
          rows.push_back(ToJson(*r));
          results.push_back(*r);
        }
  // Median over reps per (mode, handler, threads): the host is shared and noisy.
  std::vector<std::string> summary;
  for (size_t i = 0; i < results.size(); ++i) {
    const Result& a = results[i];
    bool first = true;
    for (size_t j = 0; j < i; ++j)
      if (results[j].mode == a.mode && results[j].handler == a.handler &&
          results[j].threads == a.threads)
        first = false;
    if (!first) continue;
    std::vector<double> pps, p50, p99;
    for (const Result& b : results)
      if (b.mode == a.mode && b.handler == a.handler && b.threads == a.threads) {
        pps.push_back(b.pages_per_s);
        p50.push_back(b.p50_us);
        p99.push_back(b.p99_us);
      }
    auto med = [](std::vector<double> v) {
      std::sort(v.begin(), v.end());
      return v[v.size() / 2];
    };
    summary.push_back(absl::StrFormat(
        "{\"mode\": \"%s\", \"handler\": \"%s\", \"threads\": %d, \"reps\": %d, "
        "\"median_pages_per_s\": %.0f, \"median_mib_s\": %.1f, \"median_fault_p50_us\": %.2f, "
        "\"median_fault_p99_us\": %.2f}",
        a.mode, a.handler, a.threads, pps.size(), med(pps), med(pps) * kPageSize / (1 << 20),
        med(p50), med(p99)));
  }
  std::string loadavg;
  std::getline(std::ifstream("/proc/loadavg"), loadavg);
  unsigned cpus = std::thread::hardware_concurrency();
  std::string json = absl::StrFormat(
      "{\n  \"benchmark\": \"postcopy_demand\",\n  \"host_cpus\": %d,\n  \"mib\": %d,\n"
      "  \"note\": \"every page missing, source answers from memory; latency = vCPU-side "
      "per-touch time; single = one handler thread reading+installing synchronously (T=1: raw "
      "fault round trip)\",\n  \"loadavg_at_end\": \"%s\",\n  \"summary\": [\n    %s\n  ],\n"
      "  \"runs\": [\n    %s\n  ]\n}\n",
      cpus, mib, loadavg, absl::StrJoin(summary, ",\n    "), absl::StrJoin(rows, ",\n    "));
  fputs(json.c_str(), stdout);
  if (!out.empty()) std::ofstream(out) << json;
  return 0;
}

}  // namespace
}  // namespace microvmm::migration

int main(int argc, char** argv) { return microvmm::migration::Main(argc, argv); }
