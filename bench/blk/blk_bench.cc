// virtio-blk host-side benchmark: io_uring engine vs synchronous (preadv/pwritev) engine.
//
// Builds GuestMemory + a split virtqueue laid out by the test driver + VirtioBlock (no KVM) and
// plays the guest driver on the main thread: keeps `qd` requests outstanding, kicks the device
// (ProcessQueue, what a trapped notify does on a vCPU thread) after each batch of new requests,
// and waits for the used-buffer notification (an eventfd, like an irqfd; with EVENT_IDX the
// driver re-arms used_event before sleeping, as Linux does) — or spins with --spin. io_uring completions arrive on the EventLoop thread; the sync
// engine completes inside ProcessQueue. Workloads: random 4 KiB reads at QD 1 and 32, sequential
// 128 KiB reads and writes at QD 4, each through the page cache and with O_DIRECT.
//
// Prints one JSON document on stdout (and to --out FILE): per case IOPS, MiB/s, mean latency,
// process CPU time, and the io_uring/sync ratios.
#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <sys/vfs.h>
#include <time.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "devices/virtio/blk/blk.h"
#include "tests/virtio/virtq_driver.h"
#include "vmm/event_loop.h"
#include "vmm/memory/guest_memory.h"

namespace microvmm::virtio {
namespace {

using testing::TestDriver;
using Engine = BlockOptions::Engine;

struct Args {
  double seconds = 1.2;  // per case
  uint64_t file_mib = 256;
  std::string dir = "/var/tmp";
  std::string out;
  bool direct = true;
  bool spin = false;  // poll the used ring instead of sleeping on the notification
};

struct Workload {
  std::string name;
  bool write;
  bool random;
  uint32_t block;  // bytes per request
  uint32_t qd;
};

struct Result {
  std::string workload;
  std::string engine;
  bool direct;
  uint32_t qd;
  uint32_t block;
  uint64_t ops;
  double seconds;
  double iops;
  double mib_s;
  double mean_latency_us;
  double cpu_seconds;
};

double CpuSeconds() {
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + ts.tv_nsec / 1e9;
}

[[noreturn]] void Die(const std::string& msg) {
  std::fprintf(stderr, "blk_bench: %s\n", msg.c_str());
  std::exit(1);
}

absl::StatusOr<Result> RunCase(const Args& args, const std::string& path, GuestMemory* mem,
                               EventLoop* loop, const Workload& w, Engine engine, bool direct) {
  BlockOptions o;
  o.path = path;
  o.engine = engine;
  o.direct = direct;
  auto dev_or = VirtioBlock::Create(o, mem, loop);
  if (!dev_or.ok()) return dev_or.status();
  std::unique_ptr<VirtioBlock> dev = std::move(*dev_or);
  auto q = std::make_unique<Virtqueue>(mem, 0, VirtioBlock::kQueueSize);
  TestDriver drv(mem, VirtioBlock::kQueueSize);
  uint64_t features = dev->device_features();
  absl::Status s = drv.Configure(*q, features);
  if (!s.ok()) return s;
  Virtqueue* qs[] = {q.get()};
  ScopedFd irq(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!irq.valid()) return absl::InternalError("eventfd");
  const int irq_fd = irq.get();
  s = dev->Activate(features, qs, [irq_fd](uint16_t) {
    uint64_t one = 1;
    (void)!::write(irq_fd, &one, 8);
  });
  if (!s.ok()) return s;

  // One slot per outstanding request: header, data buffer (4 KiB-aligned), status byte.
  struct Slot {
    uint64_t hdr, data, status;
  };
  std::vector<Slot> slots(w.qd);
  uint64_t next = 0x100000;
  for (Slot& sl : slots) {
    sl.hdr = next;
    sl.status = next + 64;
    sl.data = next + 4096;
    next += 4096 + ((w.block + 4095) & ~uint64_t{4095});
  }
  if (next > mem->ram_bytes()) return absl::ResourceExhaustedError("guest RAM too small");
  std::vector<uint8_t> fill(w.block, 0x5a);
  for (const Slot& sl : slots) (void)mem->Write(sl.data, fill.data(), fill.size());

  const uint64_t blocks = args.file_mib * (1ULL << 20) / w.block;
  std::mt19937_64 rng(12345);
  uint64_t seq = 0;
  std::map<uint16_t, size_t> head_to_slot;
  auto issue = [&](size_t i) {
    const Slot& sl = slots[i];
    uint64_t blk = w.random ? rng() % blocks : (seq++ % blocks);
    uint32_t type = w.write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN;
    uint64_t sector = blk * w.block / 512;
    uint8_t h[16] = {};
    std::memcpy(h, &type, 4);
    std::memcpy(h + 8, &sector, 8);
    (void)mem->Write(sl.hdr, h, 16);
    uint8_t unset = 0xee;
    (void)mem->Write(sl.status, &unset, 1);
    uint16_t head = drv.AddChain({{sl.hdr, 16, false}, {sl.data, w.block, !w.write},
                                  {sl.status, 1, true}});
    head_to_slot[head] = i;
  };

  const auto t0 = std::chrono::steady_clock::now();
  const auto deadline = t0 + std::chrono::duration<double>(args.seconds);
  const double cpu0 = CpuSeconds();
  for (size_t i = 0; i < slots.size(); ++i) issue(i);
  dev->ProcessQueue(0);
  uint64_t ops = 0, errors = 0;
  auto last = t0;
  bool stopping = false;
  size_t outstanding = slots.size();
  while (outstanding > 0) {
    bool reissued = false;
    while (auto e = drv.GetUsed()) {
      size_t i = head_to_slot.at(static_cast<uint16_t>(e->id));
      uint8_t st = 0xff;
      (void)mem->Read(slots[i].status, &st, 1);
      if (st != VIRTIO_BLK_S_OK) ++errors;
      --outstanding;
      auto now = std::chrono::steady_clock::now();
      if (!stopping) {
        ++ops;
        last = now;
        if (now >= deadline) stopping = true;
      }
      if (!stopping) {
        issue(i);
        ++outstanding;
        reissued = true;
      }
    }
    if (reissued) {
      dev->ProcessQueue(0);
    } else if (!args.spin && outstanding > 0) {
      // Nothing used: ask for an interrupt at the next used entry, re-check, then sleep.
      drv.SetUsedEvent(drv.last_used());
      __atomic_thread_fence(__ATOMIC_SEQ_CST);
      if (drv.UsedIdx() != drv.last_used()) continue;
      pollfd pfd{irq_fd, POLLIN, 0};
      if (::poll(&pfd, 1, 1000) == 0)
        return absl::DeadlineExceededError(absl::StrFormat(
            "no completion for 1 s (%d outstanding, used idx %d)", outstanding, drv.UsedIdx()));
      uint64_t v;
      (void)!::read(irq_fd, &v, 8);
    }
  }
  const double cpu = CpuSeconds() - cpu0;
  if (errors > 0) return absl::InternalError(absl::StrFormat("%d requests failed", errors));
  Result r;
  r.workload = w.name;
  r.engine = engine == Engine::kIoUring ? "io_uring" : "sync";
  r.direct = direct;
  r.qd = w.qd;
  r.block = w.block;
  r.ops = ops;
  r.seconds = std::chrono::duration<double>(last - t0).count();
  r.iops = ops / r.seconds;
  r.mib_s = r.iops * w.block / (1 << 20);
  r.mean_latency_us = r.seconds / ops * w.qd * 1e6;  // Little's law
  r.cpu_seconds = cpu;
  return r;
}

std::string MakeFile(const Args& args) {
  std::string path = absl::StrFormat("%s/blk_bench.%d.img", args.dir, getpid());
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  if (fd < 0) Die("cannot create " + path + ": " + std::strerror(errno));
  // Real data (not a sparse file: reading holes costs no I/O).
  std::vector<uint8_t> buf(1 << 20);
  std::mt19937_64 rng(1);
  for (size_t i = 0; i < buf.size(); i += 8) {
    uint64_t v = rng();
    std::memcpy(&buf[i], &v, 8);
  }
  for (uint64_t m = 0; m < args.file_mib; ++m) {
    buf[0] = static_cast<uint8_t>(m);
    if (::pwrite(fd, buf.data(), buf.size(), static_cast<off_t>(m << 20)) !=
        static_cast<ssize_t>(buf.size()))
      Die("writing the test file failed");
  }
  ::fdatasync(fd);
  ::close(fd);
  return path;
}

int Main(int argc, char** argv) {
  Args args;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto val = [&]() -> std::string {
      if (i + 1 >= argc) Die("missing value for " + a);
      return argv[++i];
    };
    if (a == "--seconds") {
      args.seconds = std::atof(val().c_str());
    } else if (a == "--file-mib") {
      args.file_mib = std::strtoull(val().c_str(), nullptr, 10);
    } else if (a == "--dir") {
      args.dir = val();
    } else if (a == "--out") {
      args.out = val();
    } else if (a == "--spin") {
      args.spin = true;
    } else if (a == "--no-direct") {
      args.direct = false;
    } else {
      std::fprintf(stderr,
                   "usage: blk_bench [--seconds S per case (1.2)] [--file-mib N (256)] "
                   "[--dir DIR (/var/tmp)] [--no-direct] [--spin] [--out FILE]\n");
      return a == "--help" ? 0 : 2;
    }
  }
  if (args.file_mib < 1 || args.seconds <= 0) Die("bad arguments");

  auto mem = GuestMemory::Create(64ULL << 20);
  if (!mem.ok()) Die(mem.status().ToString());
  auto loop = EventLoop::Create("blk-bench");
  if (!loop.ok()) Die(loop.status().ToString());
  std::string path = MakeFile(args);

  const std::vector<Workload> workloads = {
      {"randread-4k-qd1", false, true, 4096, 1},
      {"randread-4k-qd32", false, true, 4096, 32},
      {"seqread-128k-qd4", false, false, 128 * 1024, 4},
      {"seqwrite-128k-qd4", true, false, 128 * 1024, 4},
  };
  std::vector<bool> modes = {false};
  std::string direct_note = "skipped (--no-direct)";
  if (args.direct) {
    // Probe: Create fails clearly if the filesystem refuses O_DIRECT.
    BlockOptions o;
    o.path = path;
    o.direct = true;
    o.engine = Engine::kSync;
    auto probe = VirtioBlock::Create(o, mem->get(), loop->get());
    if (probe.ok()) {
      modes.push_back(true);
      direct_note = "measured";
    } else {
      direct_note = "unsupported: " + std::string(probe.status().message());
    }
  }

  std::vector<Result> results;
  for (bool direct : modes) {
    for (const Workload& w : workloads) {
      for (Engine e : {Engine::kIoUring, Engine::kSync}) {
        auto r = RunCase(args, path, mem->get(), loop->get(), w, e, direct);
        if (!r.ok()) {
          ::unlink(path.c_str());
          Die(w.name + ": " + r.status().ToString());
        }
        std::fprintf(stderr, "%-8s %-18s %-8s %10.0f IOPS %9.1f MiB/s  lat %8.1f us  cpu %.2f s\n",
                     direct ? "direct" : "buffered", w.name.c_str(), r->engine.c_str(), r->iops,
                     r->mib_s, r->mean_latency_us, r->cpu_seconds);
        results.push_back(*r);
      }
    }
  }
  ::unlink(path.c_str());

  struct statfs sfs;
  std::string fstype = "unknown";
  if (::statfs(args.dir.c_str(), &sfs) == 0)
    fstype = sfs.f_type == 0xEF53 ? "ext4" : sfs.f_type == 0x01021994 ? "tmpfs"
                                          : absl::StrFormat("0x%x", sfs.f_type);
  utsname u;
  ::uname(&u);

  std::string j = "{\n";
  j += "  \"benchmark\": \"virtio-blk io_uring vs sync engine (host-side, no KVM)\",\n";
  j += absl::StrFormat("  \"kernel\": \"%s\",\n  \"filesystem\": \"%s\",\n", u.release, fstype);
  j += absl::StrFormat("  \"file_mib\": %d,\n  \"seconds_per_case\": %.2f,\n", args.file_mib,
                       args.seconds);
  j += absl::StrFormat("  \"direct\": \"%s\",\n", direct_note);
  j += absl::StrFormat("  \"completion_wait\": \"%s\",\n",
                       args.spin ? "spin on the used ring" : "eventfd notification (EVENT_IDX)");
  j += "  \"cases\": [\n";
  for (size_t i = 0; i < results.size(); ++i) {
    const Result& r = results[i];
    j += absl::StrFormat(
        "    {\"workload\": \"%s\", \"mode\": \"%s\", \"engine\": \"%s\", \"block_bytes\": %d, "
        "\"qd\": %d, \"ops\": %d, \"seconds\": %.3f, \"iops\": %.0f, \"mib_s\": %.1f, "
        "\"mean_latency_us\": %.1f, \"cpu_seconds\": %.3f}%s\n",
        r.workload, r.direct ? "direct" : "buffered", r.engine, r.block, r.qd, r.ops, r.seconds,
        r.iops, r.mib_s, r.mean_latency_us, r.cpu_seconds, i + 1 < results.size() ? "," : "");
  }
  j += "  ],\n  \"ratios_io_uring_over_sync\": {\n";
  std::vector<std::string> lines;
  for (size_t i = 0; i + 1 < results.size(); i += 2) {
    const Result& a = results[i];      // io_uring
    const Result& b = results[i + 1];  // sync
    lines.push_back(absl::StrFormat("    \"%s/%s\": {\"throughput\": %.3f, \"cpu_per_op\": %.3f}",
                                    a.direct ? "direct" : "buffered", a.workload, a.iops / b.iops,
                                    (a.cpu_seconds / a.ops) / (b.cpu_seconds / b.ops)));
  }
  for (size_t i = 0; i < lines.size(); ++i) j += lines[i] + (i + 1 < lines.size() ? ",\n" : "\n");
  j += "  }\n}\n";
  std::fputs(j.c_str(), stdout);
  if (!args.out.empty()) {
    FILE* f = std::fopen(args.out.c_str(), "w");
    if (f == nullptr) Die("cannot write " + args.out);
    std::fputs(j.c_str(), f);
    std::fclose(f);
  }
  return 0;
}

}  // namespace
}  // namespace microvmm::virtio

int main(int argc, char** argv) { return microvmm::virtio::Main(argc, argv); }
