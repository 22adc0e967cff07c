// Exit-driven post-copy end to end minus the kernel feature this host lacks (KVM Userfault): the
// production vCPU loop takes scripted KVM_EXIT_MEMORY_FAULT exits (userfault flag), its handler is
// the one the migration destination installs (PostcopyMemory::ResolveVcpuExit), and a fetcher
// thread plays the source answering each vCPU's lane. Checked: each vCPU's pages are requested
// on its own lane by its own thread, the guest re-enters only once its page is in guest RAM with
// the source's content, the KVM userfault bitmap is cleared, and a fault that cannot be served
// stops the vCPU with an error instead of re-entering.
#include <unistd.h>

#include <algorithm>
#include <deque>
#include <mutex>
#include <memory>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "gtest/gtest.h"
#include "migration/postcopy/kvm_userfault.h"
#include "migration/postcopy/postcopy_memory.h"
#include "tests/util/fake_exit_source.h"
#include "vmm/bus.h"
#include "vmm/exit_status.h"
#include "vmm/memory/guest_memory.h"
#include "vmm/vcpu.h"

namespace microvmm::migration {
namespace {

using testing::FakeExitSource;
using testing::Fault;
using testing::Step;
using testing::StopBox;

constexpr uint64_t kRam = 16ULL << 20;
constexpr int kVcpus = 2;

uint8_t Byte(uint64_t gpa) { return static_cast<uint8_t>(1 + (gpa / kPageSize) % 251); }

struct Rig {
  std::unique_ptr<GuestMemory> mem;
  KvmUserfaultBitmap bitmap;
  std::unique_ptr<PostcopyMemory> pc;
  absl::Mutex mu;
  std::deque<std::pair<int, uint64_t>> requests;  // (lane, gpa)
  std::vector<std::pair<int, pid_t>> requesters;  // (lane, thread that asked)
  bool stop = false;
  std::thread fetcher;

  Rig() {
    auto m = GuestMemory::Create(kRam);
    EXPECT_TRUE(m.ok()) << m.status();
    mem = std::move(*m);
    PostcopyOptions opt;
    opt.lanes = kVcpus;
    auto p = PostcopyMemory::Create(
        mem.get(), opt,
        [this](int lane, uint64_t gpa) {
          absl::MutexLock l(&mu);
          requests.push_back({lane, gpa});
          requesters.push_back({lane, ::gettid()});
        },
        [](pid_t) { return kVmmLane; });
    EXPECT_TRUE(p.ok()) << p.status();
    pc = std::move(*p);
    for (size_t i = 0; i < mem->regions().size(); ++i) {
      const auto& r = mem->regions()[i];
      EXPECT_TRUE(bitmap.AddSlot(i, r.gpa, r.size).ok());
    }
    pc->AttachKvmUserfault(&bitmap);
    EXPECT_TRUE(pc->Start({}, {}).ok());  // every page missing
  }
  ~Rig() {
    {
      absl::MutexLock l(&mu);
      stop = true;
    }
    if (fetcher.joinable()) fetcher.join();
  }
  // Answers requests with the source's content, except pages in `withhold`.
  void ServeExcept(std::vector<uint64_t> withhold = {}) {
    fetcher = std::thread([this, withhold] {
      std::vector<uint8_t> page(kPageSize);
      for (;;) {
        std::pair<int, uint64_t> req;
        {
          absl::MutexLock l(&mu);
          auto ready = [this] { return !requests.empty() || stop; };
          mu.Await(absl::Condition(&ready));
          if (requests.empty()) return;
          req = requests.front();
          requests.pop_front();
        }
        if (std::find(withhold.begin(), withhold.end(), req.second) != withhold.end()) continue;
        std::fill(page.begin(), page.end(), Byte(req.second));
        auto r = pc->Install(req.second, page);
        EXPECT_TRUE(r.ok()) << r.status();
      }
    });
  }
  Vcpu::MemoryFaultFn Handler(std::atomic<bool>* stopping) {
    return [this, stopping](int id, uint64_t gpa, uint64_t size, uint64_t flags) {
      EXPECT_TRUE(flags & KVM_MEMORY_EXIT_FLAG_USERFAULT);
      return pc->ResolveVcpuExit(id, gpa, size, [stopping] { return stopping->load(); },
                                 absl::Milliseconds(5));
    };
  }
};

// A handler wrapper that records, on the vCPU thread, what guest RAM holds once the handler
// returned (i.e. what the guest sees when it re-enters).
struct Seen {
  std::mutex mu;
  std::vector<std::pair<uint64_t, uint8_t>> bytes;
  std::vector<bool> bit_clear;
};

TEST(ExitDrivenPostcopyTest, EachVcpuFetchesOnItsLaneAndReEntersWithThePage) {
  Rig rig;
  rig.ServeExcept();
  std::atomic<bool> stopping{false};
  Bus pio{"pio"}, mmio{"mmio"};
  StopBox box[kVcpus];
  Seen seen[kVcpus];
  std::vector<std::unique_ptr<Vcpu>> vcpus;
  std::vector<std::vector<uint64_t>> pages(kVcpus);
  for (int v = 0; v < kVcpus; ++v) {
    std::vector<Step> script;
    for (int i = 0; i < 16; ++i) {
      uint64_t gpa = (v * 1024 + i * 17) * kPageSize + 8 * i;  // unaligned accesses
      pages[v].push_back(gpa & ~(kPageSize - 1));
      Step st = Fault(gpa);
      st.size = 8;  // an 8-byte access inside one page
      script.push_back(st);
    }
    auto handler = rig.Handler(&stopping);
    Seen* s = &seen[v];
    GuestMemory* mem = rig.mem.get();
    KvmUserfaultBitmap* bm = &rig.bitmap;
    vcpus.push_back(std::make_unique<Vcpu>(
        v, std::make_unique<FakeExitSource>(std::move(script)), &pio, &mmio, box[v].Fn(),
        Vcpu::RingFullFn{},
        [handler, s, mem, bm](int id, uint64_t gpa, uint64_t size, uint64_t flags) {
          absl::Status st = handler(id, gpa, size, flags);
          uint8_t b = 0;
          EXPECT_TRUE(mem->Read(gpa, &b, 1).ok());
          std::lock_guard l(s->mu);
          s->bytes.push_back({gpa, b});
          s->bit_clear.push_back(!bm->Test(gpa));
          return st;
        }));
  }
  for (auto& v : vcpus) v->Start();
  for (int v = 0; v < kVcpus; ++v) {
    ASSERT_TRUE(box[v].Wait()) << "vCPU " << v << " hung";
    vcpus[v]->Join();
    EXPECT_EQ(box[v].stop->status, kExitOk) << box[v].stop->reason;  // ran to its HLT
    ASSERT_EQ(seen[v].bytes.size(), 16u);
    for (size_t i = 0; i < seen[v].bytes.size(); ++i) {
      EXPECT_EQ(seen[v].bytes[i].second, Byte(seen[v].bytes[i].first)) << "vCPU " << v;
      EXPECT_TRUE(seen[v].bit_clear[i]) << "vCPU " << v << " re-entered with the bit set";
    }
  }
  // Every request was made by the faulting vCPU's own thread, on its own lane.
  absl::MutexLock l(&rig.mu);
  ASSERT_EQ(rig.requesters.size(), 2u * 16);
  std::vector<pid_t> lane_tid(kVcpus, 0);
  for (auto [lane, tid] : rig.requesters) {
    ASSERT_GE(lane, 0);
    ASSERT_LT(lane, kVcpus);
    if (lane_tid[lane] == 0) lane_tid[lane] = tid;
    EXPECT_EQ(lane_tid[lane], tid) << "lane " << lane << " served from two threads";
  }
  EXPECT_NE(lane_tid[0], lane_tid[1]);
  EXPECT_NE(lane_tid[0], ::gettid());
}

TEST(ExitDrivenPostcopyTest, UnservedFaultStopsTheVcpuWithoutReEntering) {
  // The page never comes and the VM is being stopped: the handler gives up, the vCPU stops with
  // an error, and the guest never ran on with a missing (or zero-filled) page.
  Rig rig;
  const uint64_t withheld = 5 * kPageSize;
  rig.ServeExcept({withheld});
  std::atomic<bool> stopping{false};
  Bus pio{"pio"}, mmio{"mmio"};
  StopBox box;
  auto* src = new FakeExitSource({Fault(withheld + 12), Fault(9 * kPageSize)});
  Vcpu vcpu(0, std::unique_ptr<ExitSource>(src), &pio, &mmio, box.Fn(), Vcpu::RingFullFn{},
            rig.Handler(&stopping));
  vcpu.Start();
  for (int i = 0; i < 20; ++i) usleep(2000);  // many handler poll periods: still waiting
  EXPECT_EQ(src->runs(), 1) << "the vCPU re-entered without its page";
  stopping = true;
  ASSERT_TRUE(box.Wait());
  vcpu.Join();
  EXPECT_NE(box.stop->status, kExitOk);
  EXPECT_EQ(src->runs(), 1);
  EXPECT_TRUE(rig.bitmap.Test(withheld));
}

}  // namespace
}  // namespace microvmm::migration
