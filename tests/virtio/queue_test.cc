// Tests of devices/virtio/queue.h (device side of a split virtqueue) against the test driver in
// virtq_driver.h: normal traffic, indirect chains, out-of-order completion, 16-bit index
// wrap-around, notification suppression both ways, every hostile-driver case (-> error state,
// nothing touched outside guest RAM), dirty tracking of device writes, save/restore. No KVM.
#include "devices/virtio/queue.h"

#include <cstdint>
#include <atomic>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <mutex>
#include <thread>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tests/virtio/virtq_driver.h"
#include "vmm/memory/guest_memory.h"

namespace microvmm::virtio {
namespace {

using testing::Seg;
using testing::TestDriver;
using testing::UsedElem;

constexpr uint64_t kMiB = 1ULL << 20;
constexpr uint64_t kRam = 4 * kMiB;
constexpr uint64_t kIndirect = 1ULL << kFeatureIndirectDesc;
constexpr uint64_t kEventIdx = 1ULL << kFeatureEventIdx;
constexpr uint64_t kVersion1 = 1ULL << kFeatureVersion1;
constexpr uint64_t kData = 0x100000;  // data buffers live from 1 MiB up

std::unique_ptr<GuestMemory> MakeRam(uint64_t bytes = kRam) {
  auto m = GuestMemory::Create(bytes);
  if (!m.ok()) {
    ADD_FAILURE() << m.status();
    return nullptr;
  }
  return std::move(*m);
}

std::vector<uint8_t> Pattern(size_t n, uint8_t seed) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>(seed + i * 7);
  return v;
}

void Fill(GuestMemory& mem, uint64_t gpa, const std::vector<uint8_t>& bytes) {
  ASSERT_TRUE(mem.Write(gpa, bytes.data(), bytes.size()).ok());
}

std::vector<uint8_t> Peek(GuestMemory& mem, uint64_t gpa, size_t n) {
  std::vector<uint8_t> v(n);
  EXPECT_TRUE(mem.Read(gpa, v.data(), n).ok());
  return v;
}

DescriptorChain PopOk(Virtqueue& q) {
  auto c = q.PopChain();
  EXPECT_TRUE(c.ok()) << c.status();
  if (!c.ok() || !c->has_value()) {
    ADD_FAILURE() << "no chain available";
    return DescriptorChain();
  }
  return std::move(**c);
}

// A fixture with RAM, a driver and a queue of `size` activated with `features`.
struct Rig {
  std::unique_ptr<GuestMemory> mem;
  std::unique_ptr<TestDriver> drv;
  std::unique_ptr<Virtqueue> q;

  explicit Rig(uint32_t size, uint64_t features = kVersion1 | kIndirect, uint64_t ram = kRam) {
    mem = MakeRam(ram);
    drv = std::make_unique<TestDriver>(mem.get(), size);
    q = std::make_unique<Virtqueue>(mem.get(), 0);
    absl::Status s = drv->Configure(*q, features);
    EXPECT_TRUE(s.ok()) << s;
  }
};

// ===========================================================================================
// Activation

TEST(VirtqueueActivateTest, ValidatesConfiguration) {
  auto mem = MakeRam(2 * kMiB);
  struct Case {
    const char* name;
    uint32_t size;
    uint64_t desc, avail, used;
    bool ready;
    const char* expect;  // substring of the error, nullptr = ok
  } cases[] = {
      {"ok", 256, 0x1000, 0x2000, 0x3000, true, nullptr},
      {"not ready", 256, 0x1000, 0x2000, 0x3000, false, "not ready"},
      {"size 0", 0, 0x1000, 0x2000, 0x3000, true, "power of 2"},
      {"size 3", 3, 0x1000, 0x2000, 0x3000, true, "power of 2"},
      {"size 65536", 65536, 0x1000, 0x2000, 0x3000, true, "power of 2"},
      {"desc misaligned", 16, 0x1008, 0x2000, 0x3000, true, "descriptor table address"},
      {"avail misaligned", 16, 0x1000, 0x2001, 0x3000, true, "available ring address"},
      {"used misaligned", 16, 0x1000, 0x2000, 0x3002, true, "used ring address"},
      {"desc outside RAM", 16, 2 * kMiB, 0x2000, 0x3000, true, "descriptor table"},
      {"desc crossing RAM end", 16, 2 * kMiB - 16 * 8, 0x2000, 0x3000, true, "descriptor table"},
      {"avail crossing RAM end", 16, 0x1000, 2 * kMiB - 2 * 16, 0x3000, true, "available ring"},
      {"used crossing RAM end", 16, 0x1000, 0x2000, 2 * kMiB - 8 * 16, true, "used ring"},
      {"used near 2^64", 16, 0x1000, 0x2000, ~uint64_t{0} - 3, true, "used ring"},
      {"desc in MMIO gap", 16, kMmioGapStart, 0x2000, 0x3000, true, "descriptor table"},
      {"max size", 32768, 0x0, 0x80000, 0xA0000, true, nullptr},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    Virtqueue q(mem.get(), 3);
    ASSERT_TRUE(q.set_size(c.size).ok());
    ASSERT_TRUE(q.set_desc_addr(c.desc).ok());
    ASSERT_TRUE(q.set_avail_addr(c.avail).ok());
    ASSERT_TRUE(q.set_used_addr(c.used).ok());
    ASSERT_TRUE(q.set_ready(c.ready).ok());
    absl::Status s = q.Activate();
    if (c.expect == nullptr) {
      EXPECT_TRUE(s.ok()) << s;
      EXPECT_TRUE(q.active());
    } else {
      EXPECT_FALSE(s.ok());
      EXPECT_NE(std::string(s.message()).find(c.expect), std::string::npos) << s;
      EXPECT_NE(std::string(s.message()).find("virtqueue 3"), std::string::npos) << s;
      EXPECT_FALSE(q.active());
      EXPECT_FALSE(q.in_error());  // a bad configuration is not a runtime error state
      EXPECT_FALSE(q.PopChain().ok());
    }
  }
}

TEST(VirtqueueActivateTest, SizeAboveDeviceMaxRejected) {
  auto mem = MakeRam();
  TestDriver drv(mem.get(), 512);
  Virtqueue q(mem.get(), 0, /*max_size=*/256);
  EXPECT_EQ(q.size(), 256u);
  EXPECT_FALSE(drv.Configure(q, 0).ok());
}

TEST(VirtqueueActivateTest, ConfigurationLockedWhileActive) {
  Rig r(16);
  EXPECT_FALSE(r.q->set_desc_addr(0x5000).ok());
  EXPECT_FALSE(r.q->set_size(8).ok());
  EXPECT_FALSE(r.q->Activate().ok());  // already active
  EXPECT_EQ(r.q->desc_addr(), r.drv->desc_addr);
}

TEST(VirtqueueActivateTest, NotActiveRefusesWork) {
  auto mem = MakeRam();
  Virtqueue q(mem.get(), 0);
  EXPECT_EQ(q.PopChain().status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_FALSE(q.AddUsed(0, 0).ok());
  EXPECT_FALSE(q.NeedsNotification());
}

// ===========================================================================================
// Normal traffic

TEST(VirtqueueTest, EmptyRingPopsNothing) {
  Rig r(16);
  auto c = r.q->PopChain();
  ASSERT_TRUE(c.ok());
  EXPECT_FALSE(c->has_value());
  EXPECT_EQ(*r.q->PendingAvail(), 0);
}

TEST(VirtqueueTest, SingleReadableDescriptor) {
  Rig r(16);
  auto data = Pattern(100, 1);
  Fill(*r.mem, kData, data);
  uint16_t head = r.drv->AddChain({{kData, 100, false}});
  EXPECT_EQ(*r.q->PendingAvail(), 1);
  DescriptorChain c = PopOk(*r.q);
  EXPECT_EQ(c.head(), head);
  ASSERT_EQ(c.readable().size(), 1u);
  EXPECT_EQ(c.readable()[0], (GuestBuffer{kData, 100}));
  EXPECT_TRUE(c.writable().empty());
  EXPECT_EQ(c.readable_bytes(), 100u);
  std::vector<uint8_t> got(200, 0xEE);
  EXPECT_EQ(c.Read(got), 100u);
  got.resize(100);
  EXPECT_EQ(got, data);
  EXPECT_EQ(c.readable_remaining(), 0u);

  ASSERT_TRUE(r.q->AddUsed(c.head(), 0).ok());
  EXPECT_EQ(r.drv->UsedIdx(), 1);
  UsedElem e = r.drv->UsedAt(0);
  EXPECT_EQ(e.id, head);
  EXPECT_EQ(e.len, 0u);
  EXPECT_TRUE(r.q->NeedsNotification());
  EXPECT_FALSE(r.q->NeedsNotification());  // nothing new since
}

TEST(VirtqueueTest, MultiDescriptorChainReadWriteAcrossBoundaries) {
  Rig r(16);
  // Header 16 bytes + 2 data segments readable, then 3 writable segments of odd sizes.
  auto hdr = Pattern(16, 10), d1 = Pattern(1000, 20), d2 = Pattern(37, 30);
  Fill(*r.mem, kData, hdr);
  Fill(*r.mem, kData + 0x1000, d1);
  Fill(*r.mem, kData + 0x2000 - 10, d2);
  uint16_t head = r.drv->AddChain({{kData, 16, false},
                                   {kData + 0x1000, 1000, false},
                                   {kData + 0x2000 - 10, 37, false},
                                   {kData + 0x3000, 5, true},
                                   {kData + 0x4000 - 3, 7, true},
                                   {kData + 0x5000, 100, true}});
  DescriptorChain c = PopOk(*r.q);
  EXPECT_EQ(c.head(), head);
  EXPECT_EQ(c.descriptor_count(), 6u);
  EXPECT_EQ(c.readable().size(), 3u);
  EXPECT_EQ(c.writable().size(), 3u);
  EXPECT_EQ(c.readable_bytes(), 1053u);
  EXPECT_EQ(c.writable_bytes(), 112u);

  std::vector<uint8_t> all;
  all.insert(all.end(), hdr.begin(), hdr.end());
  all.insert(all.end(), d1.begin(), d1.end());
  all.insert(all.end(), d2.begin(), d2.end());
  // Sequential reads in odd-sized pieces.
  std::vector<uint8_t> got;
  for (size_t piece : {3u, 13u, 500u, 600u, 100u}) {
    std::vector<uint8_t> b(piece);
    uint64_t n = c.Read(b);
    got.insert(got.end(), b.begin(), b.begin() + n);
  }
  EXPECT_EQ(got, all);
  // Random access.
  std::vector<uint8_t> mid(30);
  EXPECT_EQ(c.ReadAt(1000, mid), 30u);
  EXPECT_EQ(0, std::memcmp(mid.data(), all.data() + 1000, 30));
  EXPECT_EQ(c.ReadAt(1053, mid), 0u);
  EXPECT_EQ(c.ReadAt(~uint64_t{0}, mid), 0u);

  // Writes spill across the three writable buffers; too much data is cut short.
  auto out = Pattern(200, 99);
  EXPECT_EQ(c.Write(std::span<const uint8_t>(out.data(), 8)), 8u);  // 5 + 3
  EXPECT_EQ(c.Write(std::span<const uint8_t>(out.data() + 8, 192)), 104u);
  EXPECT_EQ(c.writable_remaining(), 0u);
  EXPECT_EQ(c.bytes_written(), 112u);
  EXPECT_EQ(Peek(*r.mem, kData + 0x3000, 5), std::vector<uint8_t>(out.begin(), out.begin() + 5));
  EXPECT_EQ(Peek(*r.mem, kData + 0x4000 - 3, 7),
            std::vector<uint8_t>(out.begin() + 5, out.begin() + 12));
  EXPECT_EQ(Peek(*r.mem, kData + 0x5000, 100),
            std::vector<uint8_t>(out.begin() + 12, out.begin() + 112));
  // The readable buffers were not written.
  EXPECT_EQ(Peek(*r.mem, kData, 16), hdr);

  ASSERT_TRUE(r.q->AddUsed(c.head(), c.bytes_written()).ok());
  EXPECT_EQ(r.drv->UsedAt(0).len, 112u);
}

TEST(VirtqueueTest, WriteOnlyChainAndWriteAt) {
  Rig r(8);
  r.drv->AddChain({{kData, 64, true}});
  DescriptorChain c = PopOk(*r.q);
  EXPECT_TRUE(c.readable().empty());
  std::vector<uint8_t> b(4);
  EXPECT_EQ(c.Read(b), 0u);
  auto tail = Pattern(4, 5);
  EXPECT_EQ(c.WriteAt(60, tail), 4u);
  EXPECT_EQ(c.bytes_written(), 64u);
  EXPECT_EQ(c.WriteAt(64, tail), 0u);
  EXPECT_EQ(Peek(*r.mem, kData + 60, 4), tail);
}

TEST(VirtqueueTest, IndirectChain) {
  Rig r(8);
  auto a = Pattern(300, 1);
  Fill(*r.mem, kData, a);
  const uint64_t table = 0x200000;
  uint16_t head = r.drv->AddIndirectChain(
      {{kData, 100, false}, {kData + 100, 200, false}, {kData + 0x1000, 50, true},
       {kData + 0x2000, 60, true}},
      table);
  DescriptorChain c = PopOk(*r.q);
  EXPECT_EQ(c.head(), head);
  EXPECT_EQ(c.descriptor_count(), 5u);  // the pointer + 4 in the table
  EXPECT_EQ(c.readable_bytes(), 300u);
  EXPECT_EQ(c.writable_bytes(), 110u);
  std::vector<uint8_t> got(300);
  EXPECT_EQ(c.Read(got), 300u);
  EXPECT_EQ(got, a);
  const std::vector<uint8_t> out = Pattern(110, 3);
  EXPECT_EQ(c.Write(out), 110u);
  EXPECT_EQ(Peek(*r.mem, kData + 0x1000, 50), std::vector<uint8_t>(out.begin(), out.begin() + 50));
  EXPECT_EQ(Peek(*r.mem, kData + 0x2000, 60), std::vector<uint8_t>(out.begin() + 50, out.end()));
  ASSERT_TRUE(r.q->AddUsed(head, 110).ok());
  EXPECT_EQ(r.drv->UsedAt(0).id, head);
}

TEST(VirtqueueTest, DirectDescriptorsFollowedByIndirect) {
  // Spec: the device MUST handle zero or more chained descriptors followed by one INDIRECT.
  Rig r(8);
  const uint64_t table = 0x200000;
  r.drv->AddIndirectChain({{kData + 0x100, 8, false}, {kData + 0x1000, 16, true}}, table,
                          {{kData, 4, false}, {kData + 0x80, 4, false}});
  DescriptorChain c = PopOk(*r.q);
  ASSERT_EQ(c.readable().size(), 3u);
  EXPECT_EQ(c.readable()[0].gpa, kData);
  EXPECT_EQ(c.readable()[1].gpa, kData + 0x80);
  EXPECT_EQ(c.readable()[2].gpa, kData + 0x100);
  ASSERT_EQ(c.writable().size(), 1u);
  EXPECT_EQ(c.descriptor_count(), 5u);
}

TEST(VirtqueueTest, IndirectWriteFlagOnPointerIgnored) {
  Rig r(8);
  const uint64_t table = 0x200000;
  r.drv->WriteDesc(table, 0, kData, 10, 0, 0);  // readable
  r.drv->Desc(0, table, 16, kDescFIndirect | kDescFWrite);
  r.drv->Publish(0);
  DescriptorChain c = PopOk(*r.q);
  EXPECT_EQ(c.readable().size(), 1u);
  EXPECT_TRUE(c.writable().empty());
}

TEST(VirtqueueTest, IndirectTableOfExactlyQueueSize) {
  Rig r(4);
  const uint64_t table = 0x200000;
  r.drv->AddIndirectChain({{kData, 1, false}, {kData + 1, 1, false}, {kData + 2, 1, true},
                           {kData + 3, 1, true}},
                          table);
  DescriptorChain c = PopOk(*r.q);
  EXPECT_EQ(c.readable().size() + c.writable().size(), 4u);
}

TEST(VirtqueueTest, ZeroLengthDescriptorsAcceptedAndSkipped) {
  Rig r(8);
  // Zero-length descriptors, even with an address outside RAM, are never accessed.
  r.drv->AddChain({{kData, 0, false},
                   {~uint64_t{0}, 0, false},
                   {kData, 8, false},
                   {kData + 0x1000, 0, true},
                   {kData + 0x2000, 8, true}});
  DescriptorChain c = PopOk(*r.q);
  EXPECT_EQ(c.descriptor_count(), 5u);
  ASSERT_EQ(c.readable().size(), 1u);
  ASSERT_EQ(c.writable().size(), 1u);
  EXPECT_EQ(c.writable()[0].gpa, kData + 0x2000);
  EXPECT_FALSE(r.q->in_error());
}

TEST(VirtqueueTest, FullChainOfQueueSizeDescriptors) {
  Rig r(8);
  std::vector<Seg> segs;
  for (int i = 0; i < 8; ++i) segs.push_back({kData + 0x100ULL * i, 16, i >= 5});
  r.drv->AddChain(segs);
  DescriptorChain c = PopOk(*r.q);
  EXPECT_EQ(c.descriptor_count(), 8u);
  EXPECT_EQ(c.readable().size(), 5u);
  EXPECT_EQ(c.writable().size(), 3u);
}

TEST(VirtqueueTest, ManyInFlightCompletedOutOfOrder) {
  Rig r(16);
  std::vector<uint16_t> heads;
  for (int i = 0; i < 16; ++i)
    heads.push_back(r.drv->AddChain({{kData + 0x1000ULL * i, 8, true}}));
  std::vector<DescriptorChain> chains;
  for (int i = 0; i < 16; ++i) chains.push_back(PopOk(*r.q));
  auto empty = r.q->PopChain();
  ASSERT_TRUE(empty.ok());
  EXPECT_FALSE(empty->has_value());
  EXPECT_EQ(r.q->InFlightHeads().size(), 16u);
  for (int i = 0; i < 16; ++i) EXPECT_EQ(chains[i].head(), heads[i]);
  EXPECT_EQ(r.q->InFlightHeads(), heads);  // in pop order

  // Complete in a scrambled order; the used ring records completion order.
  std::vector<int> order(16);
  std::iota(order.begin(), order.end(), 0);
  std::mt19937 rng(42);
  std::shuffle(order.begin(), order.end(), rng);
  for (int k = 0; k < 16; ++k) {
    DescriptorChain& c = chains[order[k]];
    uint32_t v = 0xC0DE0000u + order[k];
    c.Write(std::span<const uint8_t>(reinterpret_cast<uint8_t*>(&v), 4));
    ASSERT_TRUE(r.q->AddUsed(c.head(), 4).ok());
    // Double completion is a device bug: refused, queue unaffected.
    EXPECT_EQ(r.q->AddUsed(c.head(), 4).code(), absl::StatusCode::kFailedPrecondition);
  }
  EXPECT_FALSE(r.q->in_error());
  EXPECT_TRUE(r.q->InFlightHeads().empty());
  for (int k = 0; k < 16; ++k) {
    auto e = r.drv->GetUsed();
    ASSERT_TRUE(e.has_value());
    EXPECT_EQ(e->id, heads[order[k]]);
    EXPECT_EQ(e->len, 4u);
  }
  // Driver reuses the descriptors: more traffic flows.
  for (int i = 0; i < 16; ++i) r.drv->AddChain({{kData, 8, false}});
  for (int i = 0; i < 16; ++i) {
    DescriptorChain c = PopOk(*r.q);
    ASSERT_TRUE(r.q->AddUsed(c.head(), 0).ok());
  }
  EXPECT_EQ(r.drv->UsedIdx(), 32);
}

TEST(VirtqueueTest, PopDoesNotWaitForCompletion) {
  Rig r(4);
  r.drv->AddChain({{kData, 8, false}});
  DescriptorChain a = PopOk(*r.q);
  r.drv->AddChain({{kData, 8, false}});
  DescriptorChain b = PopOk(*r.q);
  EXPECT_NE(a.head(), b.head());
  ASSERT_TRUE(r.q->AddUsed(b.head(), 0).ok());
  ASSERT_TRUE(r.q->AddUsed(a.head(), 0).ok());
}

TEST(VirtqueueTest, IndexWrapAroundPast65535) {
  for (uint64_t features : {uint64_t{0}, kEventIdx}) {
    SCOPED_TRACE(features);
    Rig r(4, features);
    for (uint32_t i = 0; i < 70000; ++i) {
      // Two in flight most of the time, completed in reverse order.
      uint16_t h1 = r.drv->AddChain({{kData, 4, false}, {kData + 0x1000, 4, true}});
      uint16_t h2 = r.drv->AddChain({{kData + 0x2000, 4, true}});
      DescriptorChain c1 = PopOk(*r.q);
      DescriptorChain c2 = PopOk(*r.q);
      ASSERT_EQ(c1.head(), h1);
      ASSERT_EQ(c2.head(), h2);
      ASSERT_TRUE(r.q->AddUsed(c2.head(), 4).ok());
      ASSERT_TRUE(r.q->AddUsed(c1.head(), 1).ok());
      auto e2 = r.drv->GetUsed();
      auto e1 = r.drv->GetUsed();
      ASSERT_TRUE(e1 && e2);
      ASSERT_EQ(e2->id, h2);
      ASSERT_EQ(e1->id, h1);
      r.q->NeedsNotification();
    }
    EXPECT_EQ(r.q->next_avail(), static_cast<uint16_t>(140000));
    EXPECT_EQ(r.drv->UsedIdx(), static_cast<uint16_t>(140000));
    EXPECT_FALSE(r.q->in_error());
  }
}

TEST(VirtqueueTest, StartNearWrapViaRestore) {
  Rig r(8);
  VirtqueueState st = r.q->SaveState();
  st.set_next_avail(65533);
  st.set_next_used(65533);
  st.set_signalled_used(65533);
  ASSERT_TRUE(r.q->RestoreState(st).ok());
  r.drv->SetRingPositions(65533, 65533);
  for (int i = 0; i < 6; ++i) r.drv->AddChain({{kData, 4, true}});
  EXPECT_EQ(r.drv->avail_idx(), 3);
  EXPECT_EQ(*r.q->PendingAvail(), 6);
  for (int i = 0; i < 6; ++i) {
    DescriptorChain c = PopOk(*r.q);
    ASSERT_TRUE(r.q->AddUsed(c.head(), 4).ok());
  }
  EXPECT_EQ(r.drv->UsedIdx(), 3);
  for (int i = 0; i < 6; ++i) EXPECT_TRUE(r.drv->GetUsed().has_value());
}

TEST(VirtqueueTest, ConcurrentDriverPopperAndCompleter) {
  // Three threads: the "guest driver" offers requests and reaps completions, one device thread
  // pops, another completes (out of order) -- as a block device with an I/O thread would.
  constexpr uint32_t kSize = 64;
  constexpr uint64_t kRequests = 20000;
  Rig r(kSize);
  std::mutex mu;
  std::deque<DescriptorChain> popped;
  std::atomic<bool> failed{false};
  std::atomic<uint64_t> completed{0};

  std::thread popper([&] {
    while (completed.load() < kRequests && !failed.load()) {
      auto c = r.q->PopChain();
      if (!c.ok()) {
        failed = true;
        break;
      }
      if (!c->has_value()) {
        std::this_thread::yield();
        continue;
      }
      std::lock_guard<std::mutex> l(mu);
      popped.push_back(std::move(**c));
    }
  });
  std::thread completer([&] {
    std::mt19937 rng(1);
    while (completed.load() < kRequests && !failed.load()) {
      std::optional<DescriptorChain> c;
      {
        std::lock_guard<std::mutex> l(mu);
        if (!popped.empty()) {
          if (rng() % 2) {
            c = std::move(popped.front());
            popped.pop_front();
          } else {
            c = std::move(popped.back());
            popped.pop_back();
          }
        }
      }
      if (!c) {
        std::this_thread::yield();
        continue;
      }
      uint64_t req[2];
      if (c->Read(std::span<uint8_t>(reinterpret_cast<uint8_t*>(req), 16)) != 16) failed = true;
      uint64_t resp = req[1] * 3;
      if (c->Write(std::span<const uint8_t>(reinterpret_cast<uint8_t*>(&resp), 8)) != 8)
        failed = true;
      if (!r.q->AddUsed(c->head(), c->bytes_written()).ok()) failed = true;
      r.q->NeedsNotification();
      completed.fetch_add(1);
    }
  });

  // Driver: slots 0..kSize/2-1 each own a request and a response area.
  std::vector<uint32_t> free_slots;
  for (uint32_t i = 0; i < kSize / 2; ++i) free_slots.push_back(i);
  std::map<uint16_t, std::pair<uint32_t, uint64_t>> outstanding;  // head -> (slot, seq)
  uint64_t next_seq = 0, reaped = 0, bad = 0;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(40);
  while (reaped < kRequests && !failed.load() && std::chrono::steady_clock::now() < deadline) {
    while (next_seq < kRequests && !free_slots.empty() && r.drv->free_descriptors() >= 2) {
      uint32_t slot = free_slots.back();
      free_slots.pop_back();
      uint64_t req[2] = {slot, next_seq};
      if (!r.mem->Write(kData + 16ULL * slot, req, 16).ok()) failed = true;
      uint16_t head = r.drv->AddChain(
          {{kData + 16ULL * slot, 16, false}, {kData + 0x10000 + 8ULL * slot, 8, true}});
      outstanding[head] = {slot, next_seq++};
    }
    while (auto e = r.drv->GetUsed()) {
      auto it = outstanding.find(static_cast<uint16_t>(e->id));
      if (it == outstanding.end()) {  // unknown id: the threads are joined below, then fail
        failed = true;
        break;
      }
      uint64_t resp = 0;
      if (!r.mem->Read(kData + 0x10000 + 8ULL * it->second.first, &resp, 8).ok()) ++bad;
      if (resp != it->second.second * 3 || e->len != 8) ++bad;
      free_slots.push_back(it->second.first);
      outstanding.erase(it);
      ++reaped;
    }
    std::this_thread::yield();
  }
  failed = failed.load() || reaped < kRequests;
  completed = kRequests;  // release the device threads in any case
  popper.join();
  completer.join();
  EXPECT_FALSE(failed.load());
  EXPECT_EQ(reaped, kRequests);
  EXPECT_EQ(bad, 0u);
  EXPECT_FALSE(r.q->in_error());
}

// ===========================================================================================
// Used-buffer notifications (device -> driver)

TEST(VirtqueueNotifyTest, NoInterruptFlagWithoutEventIdx) {
  Rig r(8, 0);
  r.drv->AddChain({{kData, 4, true}});
  r.drv->AddChain({{kData, 4, true}});
  DescriptorChain a = PopOk(*r.q), b = PopOk(*r.q);
  r.drv->SetAvailFlags(kAvailFNoInterrupt);
  ASSERT_TRUE(r.q->AddUsed(a.head(), 0).ok());
  EXPECT_FALSE(r.q->NeedsNotification());
  r.drv->SetAvailFlags(0);
  EXPECT_FALSE(r.q->NeedsNotification());  // nothing used since the last decision
  ASSERT_TRUE(r.q->AddUsed(b.head(), 0).ok());
  EXPECT_TRUE(r.q->NeedsNotification());
  // used_event is ignored without EVENT_IDX.
  r.drv->SetUsedEvent(100);
  r.drv->AddChain({{kData, 4, true}});
  ASSERT_TRUE(r.q->AddUsed(PopOk(*r.q).head(), 0).ok());
  EXPECT_TRUE(r.q->NeedsNotification());
}

TEST(VirtqueueNotifyTest, EventIdxIgnoresNoInterruptFlag) {
  Rig r(8, kEventIdx);
  r.drv->SetAvailFlags(kAvailFNoInterrupt);
  r.drv->SetUsedEvent(0);
  r.drv->AddChain({{kData, 4, true}});
  ASSERT_TRUE(r.q->AddUsed(PopOk(*r.q).head(), 0).ok());
  EXPECT_TRUE(r.q->NeedsNotification());  // used idx went 0 -> 1, used_event 0
}

TEST(VirtqueueNotifyTest, EventIdxSpecExample) {
  // Spec: used_event 0 -> notify after the first buffer is used (and again after the 65536th).
  Rig r(4, kEventIdx);
  r.drv->SetUsedEvent(0);
  int notified = 0;
  for (int i = 0; i < 65537; ++i) {
    r.drv->AddChain({{kData, 4, true}});
    ASSERT_TRUE(r.q->AddUsed(PopOk(*r.q).head(), 0).ok());
    r.drv->GetUsed();
    if (r.q->NeedsNotification()) {
      ++notified;
      EXPECT_TRUE(i == 0 || i == 65536) << i;
    }
  }
  EXPECT_EQ(notified, 2);
}

// Reference: the device must notify iff the used idx passed through used_event, i.e. an entry
// was written at index used_event: used_event in {old, ..., new-1} (mod 2^16). Deliberately not
// the vring_need_event formula.
bool ReferenceNeedEvent(uint16_t used_event, uint16_t new_idx, uint16_t old_idx) {
  for (uint16_t i = old_idx; i != new_idx; ++i)
    if (i == used_event) return true;
  return false;
}

TEST(VirtqueueNotifyTest, EventIdxMatchesVringNeedEventRandomized) {
  Rig r(16, kEventIdx);
  std::mt19937 rng(7);
  uint16_t last_decision = 0;
  int notifies = 0, decisions = 0;
  for (int round = 0; round < 20000; ++round) {
    int batch = 1 + rng() % 16;
    // The driver sets used_event near the current index most of the time.
    uint16_t used_event = (rng() % 4 == 0)
                              ? static_cast<uint16_t>(rng())
                              : static_cast<uint16_t>(r.drv->UsedIdx() + rng() % 20 - 2);
    r.drv->SetUsedEvent(used_event);
    for (int i = 0; i < batch; ++i) r.drv->AddChain({{kData, 4, true}});
    for (int i = 0; i < batch; ++i) ASSERT_TRUE(r.q->AddUsed(PopOk(*r.q).head(), 0).ok());
    while (r.drv->GetUsed()) {
    }
    uint16_t now = r.drv->UsedIdx();
    bool expect = ReferenceNeedEvent(used_event, now, last_decision);
    ASSERT_EQ(expect, VringNeedEvent(used_event, now, last_decision));
    ASSERT_EQ(r.q->NeedsNotification(), expect)
        << "used_event " << used_event << " old " << last_decision << " new " << now;
    last_decision = now;
    notifies += expect;
    ++decisions;
  }
  EXPECT_GT(notifies, 100);
  EXPECT_LT(notifies, decisions);
}

TEST(VirtqueueNotifyTest, VringNeedEventFormula) {
  EXPECT_TRUE(VringNeedEvent(0, 1, 0));
  EXPECT_FALSE(VringNeedEvent(1, 1, 0));
  EXPECT_TRUE(VringNeedEvent(5, 10, 3));
  EXPECT_FALSE(VringNeedEvent(10, 10, 3));
  EXPECT_TRUE(VringNeedEvent(65535, 2, 65534));  // across the wrap
  EXPECT_FALSE(VringNeedEvent(2, 2, 65534));
  EXPECT_FALSE(VringNeedEvent(7, 7, 7));
}

// ===========================================================================================
// Available-buffer notification suppression (driver -> device)

TEST(VirtqueueSuppressTest, NoNotifyFlagWithoutEventIdx) {
  Rig r(8, 0);
  EXPECT_EQ(r.drv->UsedFlags(), 0);
  r.q->DisableNotifications();
  EXPECT_EQ(r.drv->UsedFlags(), kUsedFNoNotify);
  EXPECT_FALSE(r.q->EnableNotifications());
  EXPECT_EQ(r.drv->UsedFlags(), 0);
  r.q->DisableNotifications();
  r.drv->AddChain({{kData, 4, false}});
  EXPECT_TRUE(r.q->EnableNotifications());  // pending work found on re-enable
  EXPECT_EQ(r.drv->AvailEvent(), 0);        // not used without EVENT_IDX
}

TEST(VirtqueueSuppressTest, AvailEventWithEventIdx) {
  Rig r(8, kEventIdx);
  EXPECT_FALSE(r.q->EnableNotifications());
  EXPECT_EQ(r.drv->AvailEvent(), 0);
  r.drv->AddChain({{kData, 4, false}});
  r.drv->AddChain({{kData, 4, false}});
  DescriptorChain a = PopOk(*r.q);
  EXPECT_EQ(r.drv->AvailEvent(), 1);  // follows next_avail while enabled
  EXPECT_EQ(r.drv->UsedFlags(), 0);   // flags stay 0 with EVENT_IDX
  r.q->DisableNotifications();
  EXPECT_EQ(r.drv->UsedFlags(), 0);
  DescriptorChain b = PopOk(*r.q);
  EXPECT_EQ(r.drv->AvailEvent(), 1);  // no longer updated
  // Driver side: would it kick after adding one more (avail idx 2 -> 3)?
  EXPECT_FALSE(VringNeedEvent(r.drv->AvailEvent(), 3, 2));
  r.drv->AddChain({{kData, 4, false}});
  EXPECT_TRUE(r.q->EnableNotifications());  // already pending
  EXPECT_EQ(r.drv->AvailEvent(), 2);
  PopOk(*r.q);
  EXPECT_EQ(r.drv->AvailEvent(), 3);
  EXPECT_TRUE(VringNeedEvent(r.drv->AvailEvent(), 4, 3));  // next add kicks
  r.q->SetAvailEvent(1234);
  EXPECT_EQ(r.drv->AvailEvent(), 1234);
}

// ===========================================================================================
// Hostile drivers: every violation -> sticky error state, no further ring writes.

// Runs `setup` on a fresh rig (size 8 unless given), pops, expects an error mentioning
// `expect`, then checks the queue is stopped and the used ring untouched.
void ExpectBroken(const std::function<void(Rig&)>& setup, const char* expect,
                  uint32_t size = 8, uint64_t features = kIndirect | kVersion1,
                  uint64_t ram = kRam) {
  Rig r(size, features, ram);
  // One good request in flight first, to show it cannot be completed after the error.
  r.drv->AddChain({{kData, 4, true}});
  DescriptorChain good = PopOk(*r.q);
  setup(r);
  std::vector<uint8_t> used_before = r.drv->UsedRingBytesNow();
  auto c = r.q->PopChain();
  ASSERT_FALSE(c.ok()) << "expected an error containing '" << expect << "'";
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(c.status().message()).find(expect), std::string::npos) << c.status();
  EXPECT_TRUE(r.q->in_error());
  EXPECT_EQ(r.q->error(), c.status());
  // Sticky: stays stopped.
  EXPECT_EQ(r.q->PopChain().status(), c.status());
  EXPECT_EQ(r.q->PendingAvail().status(), c.status());
  EXPECT_FALSE(r.q->AddUsed(good.head(), 4).ok());
  EXPECT_FALSE(r.q->NeedsNotification());
  r.q->DisableNotifications();
  EXPECT_FALSE(r.q->EnableNotifications());
  EXPECT_EQ(r.drv->UsedRingBytesNow(), used_before);
  // Saved and restored as such.
  VirtqueueState st = r.q->SaveState();
  EXPECT_TRUE(st.error());
  Virtqueue q2(r.mem.get(), 0);
  ASSERT_TRUE(q2.RestoreState(st).ok());
  EXPECT_TRUE(q2.in_error());
  EXPECT_FALSE(q2.PopChain().ok());
  // Reset recovers.
  r.q->Reset();
  EXPECT_FALSE(r.q->in_error());
  EXPECT_FALSE(r.q->active());
}

TEST(VirtqueueHostileTest, HeadIndexOutOfRange) {
  ExpectBroken([](Rig& r) { r.drv->Publish(8); }, "head index 8 >= queue size 8");
  ExpectBroken([](Rig& r) { r.drv->Publish(0xFFFF); }, "head index");
}

TEST(VirtqueueHostileTest, AvailIdxJumpsTooFarAhead) {
  ExpectBroken([](Rig& r) { r.drv->SetAvailIdx(r.drv->avail_idx() + 9); }, "ahead");
  // 8 more would exceed the ring with one chain already in flight.
  ExpectBroken([](Rig& r) { r.drv->SetAvailIdx(r.drv->avail_idx() + 8); }, "ahead");
  // Going backwards looks like a jump of ~65535.
  ExpectBroken([](Rig& r) { r.drv->SetAvailIdx(r.drv->avail_idx() - 1); }, "ahead");
}

TEST(VirtqueueHostileTest, AvailIdxJumpDetectedByPendingAvail) {
  Rig r(8);
  r.drv->SetAvailIdx(100);
  EXPECT_FALSE(r.q->PendingAvail().ok());
  EXPECT_TRUE(r.q->in_error());
}

TEST(VirtqueueHostileTest, HeadAlreadyInFlight) {
  ExpectBroken(
      [](Rig& r) {
        r.drv->Desc(0, kData, 4, kDescFWrite);
        r.drv->Publish(r.q->InFlightHeads()[0]);
      },
      "already in flight");
}

TEST(VirtqueueHostileTest, DescriptorLoop) {
  ExpectBroken(
      [](Rig& r) {
        r.drv->Desc(1, kData, 4, kDescFNext, 2);
        r.drv->Desc(2, kData, 4, kDescFNext, 3);
        r.drv->Desc(3, kData, 4, kDescFNext, 1);
        r.drv->Publish(1);
      },
      "loop");
  ExpectBroken(
      [](Rig& r) {
        r.drv->Desc(5, kData, 4, kDescFNext, 5);  // self loop
        r.drv->Publish(5);
      },
      "loop");
}

TEST(VirtqueueHostileTest, ChainLongerThanQueue) {
  // With 8 descriptors, a chain of more than 8 must revisit one: 1 -> 2 -> ... -> 7 -> 1 -> ...
  // is caught by the walk bound once the 9th descriptor would be visited.
  ExpectBroken(
      [](Rig& r) {
        for (int i = 1; i < 8; ++i) r.drv->Desc(i, kData, 1, kDescFNext, i == 7 ? 1 : i + 1);
        r.drv->Publish(1);
      },
      "more than 8 descriptors in the descriptor table (loop or chain too long)");
}

TEST(VirtqueueHostileTest, NextIndexOutOfRange) {
  ExpectBroken(
      [](Rig& r) {
        r.drv->Desc(1, kData, 4, kDescFNext, 8);
        r.drv->Publish(1);
      },
      "next index 8 out of range");
}

TEST(VirtqueueHostileTest, BufferOutsideRam) {
  ExpectBroken(
      [](Rig& r) {
        r.drv->Desc(1, kRam, 1, 0);
        r.drv->Publish(1);
      },
      "not inside guest RAM");
  ExpectBroken(
      [](Rig& r) {
        r.drv->Desc(1, kRam - 8, 9, kDescFWrite);  // crosses the end of RAM
        r.drv->Publish(1);
      },
      "not inside guest RAM");
  ExpectBroken(
      [](Rig& r) {
        r.drv->Desc(1, kMmioGapStart, 4, 0);
        r.drv->Publish(1);
      },
      "not inside guest RAM");
}

TEST(VirtqueueHostileTest, BufferAddressOverflow) {
  ExpectBroken(
      [](Rig& r) {
        r.drv->Desc(1, ~uint64_t{0} - 10, 100, 0);
        r.drv->Publish(1);
      },
      "wraps the address space");
  ExpectBroken(
      [](Rig& r) {
        r.drv->Desc(1, ~uint64_t{0}, 1, 0);
        r.drv->Publish(1);
      },
      "wraps the address space");
  ExpectBroken(
      [](Rig& r) {
        r.drv->Desc(1, ~uint64_t{0} - 1, 1, 0);
        r.drv->Publish(1);
      },
      "not inside guest RAM");
}

TEST(VirtqueueHostileTest, ChainLongerThan4GiB) {
  // Four 1.5 GiB writable descriptors in a 8 GiB guest would be 6 GiB: the spec forbids > 2^32.
  // Same memory reused (the device never reads it at pop time). Needs RAM above 4 GiB; the
  // memfd is sparse (MAP_NORESERVE), so this costs nothing.
  const uint64_t ram = 8ULL << 30;
  ExpectBroken(
      [](Rig& r) {
        const uint32_t big = 3u << 29;  // 1.5 GiB
        r.drv->Desc(1, 1ULL << 32, big, kDescFWrite | kDescFNext, 2);
        r.drv->Desc(2, 1ULL << 32, big, kDescFWrite | kDescFNext, 3);
        r.drv->Desc(3, 1ULL << 32, big, kDescFWrite, 0);
        r.drv->Publish(1);
      },
      "longer than 2^32 bytes", 8, kIndirect, ram);
}

TEST(VirtqueueHostileTest, ReadableAfterWritable) {
  ExpectBroken(
      [](Rig& r) {
        r.drv->Desc(1, kData, 4, kDescFWrite | kDescFNext, 2);
        r.drv->Desc(2, kData, 4, 0);
        r.drv->Publish(1);
      },
      "device-readable descriptor after a device-writable one");
  // Also across the direct/indirect boundary.
  ExpectBroken(
      [](Rig& r) {
        r.drv->WriteDesc(0x200000, 0, kData, 4, 0, 0);
        r.drv->Desc(1, kData, 4, kDescFWrite | kDescFNext, 2);
        r.drv->Desc(2, 0x200000, 16, kDescFIndirect);
        r.drv->Publish(1);
      },
      "device-readable descriptor after a device-writable one");
  // And inside an indirect table.
  ExpectBroken(
      [](Rig& r) {
        r.drv->WriteDesc(0x200000, 0, kData, 4, kDescFWrite | kDescFNext, 1);
        r.drv->WriteDesc(0x200000, 1, kData, 4, 0, 0);
        r.drv->Desc(1, 0x200000, 32, kDescFIndirect);
        r.drv->Publish(1);
      },
      "device-readable descriptor after a device-writable one");
}

TEST(VirtqueueHostileTest, IndirectWithoutFeature) {
  ExpectBroken(
      [](Rig& r) {
        r.drv->WriteDesc(0x200000, 0, kData, 4, 0, 0);
        r.drv->Desc(1, 0x200000, 16, kDescFIndirect);
        r.drv->Publish(1);
      },
      "VIRTIO_F_INDIRECT_DESC not negotiated", 8, kVersion1);
}

TEST(VirtqueueHostileTest, IndirectLengthNotMultipleOf16) {
  ExpectBroken(
      [](Rig& r) {
        r.drv->Desc(1, 0x200000, 24, kDescFIndirect);
        r.drv->Publish(1);
      },
      "not a non-zero multiple of 16");
  ExpectBroken(
      [](Rig& r) {
        r.drv->Desc(1, 0x200000, 0, kDescFIndirect);
        r.drv->Publish(1);
      },
      "not a non-zero multiple of 16");
}

TEST(VirtqueueHostileTest, IndirectTableTooLarge) {
  ExpectBroken(
      [](Rig& r) {
        r.drv->Desc(1, 0x200000, 16 * 9, kDescFIndirect);  // 9 entries > queue size 8
        r.drv->Publish(1);
      },
      "longer than the queue");
  ExpectBroken(
      [](Rig& r) {
        r.drv->Desc(1, 0x200000, 0xFFFFFFF0u, kDescFIndirect);
        r.drv->Publish(1);
      },
      "longer than the queue");
}

TEST(VirtqueueHostileTest, IndirectTableOutsideRam) {
  ExpectBroken(
      [](Rig& r) {
        r.drv->Desc(1, kRam - 16, 32, kDescFIndirect);
        r.drv->Publish(1);
      },
      "indirect table");
  ExpectBroken(
      [](Rig& r) {
        r.drv->Desc(1, ~uint64_t{0} - 15, 32, kDescFIndirect);
        r.drv->Publish(1);
      },
      "indirect table");
}

TEST(VirtqueueHostileTest, NestedIndirect) {
  ExpectBroken(
      [](Rig& r) {
        r.drv->WriteDesc(0x200000, 0, 0x201000, 16, kDescFIndirect, 0);
        r.drv->WriteDesc(0x201000, 0, kData, 4, 0, 0);
        r.drv->Desc(1, 0x200000, 16, kDescFIndirect);
        r.drv->Publish(1);
      },
      "nested indirect");
}

TEST(VirtqueueHostileTest, IndirectWithNext) {
  ExpectBroken(
      [](Rig& r) {
        r.drv->WriteDesc(0x200000, 0, kData, 4, 0, 0);
        r.drv->Desc(1, 0x200000, 16, kDescFIndirect | kDescFNext, 2);
        r.drv->Desc(2, kData, 4, kDescFWrite);
        r.drv->Publish(1);
      },
      "both INDIRECT and NEXT");
}

TEST(VirtqueueHostileTest, LoopInsideIndirectTable) {
  ExpectBroken(
      [](Rig& r) {
        r.drv->WriteDesc(0x200000, 0, kData, 4, kDescFNext, 1);
        r.drv->WriteDesc(0x200000, 1, kData, 4, kDescFNext, 0);
        r.drv->Desc(1, 0x200000, 32, kDescFIndirect);
        r.drv->Publish(1);
      },
      "indirect table (loop");
}

TEST(VirtqueueHostileTest, IndirectNextOutOfRange) {
  ExpectBroken(
      [](Rig& r) {
        r.drv->WriteDesc(0x200000, 0, kData, 4, kDescFNext, 2);  // table has 2 entries
        r.drv->Desc(1, 0x200000, 32, kDescFIndirect);
        r.drv->Publish(1);
      },
      "next index 2 out of range (indirect table of 2)");
}

TEST(VirtqueueHostileTest, MaxSizeLoopIsBounded) {
  // A 32768-entry ring whose every descriptor points to the next, closing into a loop: the walk
  // stops after 32768 steps.
  auto mem = MakeRam(8 * kMiB);
  TestDriver drv(mem.get(), 32768);
  Virtqueue q(mem.get(), 0);
  ASSERT_TRUE(drv.Configure(q, 0).ok());
  for (uint32_t i = 0; i < 32768; ++i)
    drv.Desc(i, kData, 1, kDescFNext, static_cast<uint16_t>((i + 1) % 32768));
  drv.Publish(0);
  auto c = q.PopChain();
  EXPECT_FALSE(c.ok());
  EXPECT_TRUE(q.in_error());
}

TEST(VirtqueueHostileTest, ReadInFlightChainRevalidates) {
  Rig r(8);
  uint16_t head = r.drv->AddChain({{kData, 4, false}, {kData + 8, 4, true}});
  DescriptorChain c = PopOk(*r.q);
  auto again = r.q->ReadInFlightChain(head);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->readable(), c.readable());
  EXPECT_EQ(again->writable(), c.writable());
  EXPECT_EQ(r.q->ReadInFlightChain(head + 1).status().code(),
            absl::StatusCode::kFailedPrecondition);
  // The guest scribbles over descriptors it no longer owns: caught on the re-walk.
  r.drv->Desc(head, kData, 4, kDescFNext, head);
  EXPECT_FALSE(r.q->ReadInFlightChain(head).ok());
  EXPECT_TRUE(r.q->in_error());
}

// ===========================================================================================
// Dirty tracking

TEST(VirtqueueDirtyTest, EveryDeviceWrittenPageIsDirty) {
  for (uint64_t features : {kIndirect, kIndirect | kEventIdx}) {
    SCOPED_TRACE(features);
    Rig r(16, features);
    const uint64_t rd = 0x180000, w1 = 0x200000 + 0x800, w2 = 0x280000;
    // Writable: 3 pages + a bit starting mid-page, then a separate page.
    r.drv->AddChain({{rd, 8192, false}, {w1, 3 * 4096 + 100, true}, {w2, 4096, true}});
    r.mem->TakeDirty(0);  // forget the driver's own setup writes
    DescriptorChain c = PopOk(*r.q);
    std::vector<uint8_t> in(8192);
    EXPECT_EQ(c.Read(in), 8192u);
    std::vector<uint8_t> out(3 * 4096 + 100 + 10, 0x5A);
    EXPECT_EQ(c.Write(out), out.size());
    ASSERT_TRUE(r.q->AddUsed(c.head(), c.bytes_written()).ok());

    std::vector<uint64_t> expect_dirty;
    for (uint64_t p = w1 & ~(kPageSize - 1); p < w1 + 3 * 4096 + 100; p += kPageSize)
      expect_dirty.push_back(p);
    expect_dirty.push_back(w2);
    expect_dirty.push_back(r.drv->used_addr & ~(kPageSize - 1));  // used element + idx
    for (uint64_t p : expect_dirty) EXPECT_TRUE(r.mem->TestDirty(p)) << std::hex << p;
    if (features & kEventIdx) {  // avail_event lives at the end of the used ring
      uint64_t ae = r.drv->used_addr + 4 + 8 * 16;
      EXPECT_TRUE(r.mem->TestDirty(ae)) << std::hex << ae;
    }
    // Pages the device only read are clean.
    EXPECT_FALSE(r.mem->TestDirty(rd));
    EXPECT_FALSE(r.mem->TestDirty(rd + 4096));
    if ((r.drv->desc_addr & ~(kPageSize - 1)) != (r.drv->used_addr & ~(kPageSize - 1))) {
      EXPECT_FALSE(r.mem->TestDirty(r.drv->desc_addr));
    }
    EXPECT_FALSE(r.mem->TestDirty(w2 + 4096));
    // Exactly the expected set of pages (plus the used ring's last page if it spans two).
    std::vector<uint64_t> bits = r.mem->TakeDirty(0);
    size_t count = 0;
    for (uint64_t w : bits) count += __builtin_popcountll(w);
    uint64_t used_first = r.drv->used_addr / kPageSize;
    uint64_t used_last = (r.drv->used_addr + UsedRingBytes(16) - 1) / kPageSize;
    EXPECT_LE(count, expect_dirty.size() + (used_last - used_first));
    EXPECT_GE(count, expect_dirty.size());
  }
}

TEST(VirtqueueDirtyTest, SuppressionWritesAreDirty) {
  Rig r(8, 0);
  r.mem->TakeDirty(0);
  r.q->DisableNotifications();
  EXPECT_TRUE(r.mem->TestDirty(r.drv->used_addr));
}

// ===========================================================================================
// Save / restore

TEST(VirtqueueStateTest, SaveRestoreContinuesWithInFlight) {
  for (uint64_t features : {kIndirect, kIndirect | kEventIdx}) {
    SCOPED_TRACE(features);
    Rig r(8, features);
    uint16_t h[4];
    for (int i = 0; i < 4; ++i)
      h[i] = r.drv->AddChain({{kData + 0x100ULL * i, 16, false}, {kData + 0x1000ULL * i, 16, true}});
    DescriptorChain c0 = PopOk(*r.q);
    DescriptorChain c1 = PopOk(*r.q);
    DescriptorChain c2 = PopOk(*r.q);
    ASSERT_TRUE(r.q->AddUsed(c1.head(), 16).ok());
    r.q->NeedsNotification();
    r.q->DisableNotifications();

    VirtqueueState st = r.q->SaveState();
    EXPECT_EQ(st.size(), 8u);
    EXPECT_TRUE(st.ready());
    EXPECT_TRUE(st.active());
    EXPECT_EQ(st.desc_addr(), r.drv->desc_addr);
    EXPECT_EQ(st.avail_addr(), r.drv->avail_addr);
    EXPECT_EQ(st.used_addr(), r.drv->used_addr);
    EXPECT_EQ(st.features(), features);
    EXPECT_EQ(st.next_avail(), 3u);
    EXPECT_EQ(st.next_used(), 1u);
    EXPECT_FALSE(st.notifications_enabled());
    ASSERT_EQ(st.in_flight_size(), 2);
    EXPECT_EQ(st.in_flight(0), h[0]);
    EXPECT_EQ(st.in_flight(1), h[2]);

    // Through the wire format, into a brand-new queue object.
    std::string wire;
    ASSERT_TRUE(st.SerializeToString(&wire));
    VirtqueueState st2;
    ASSERT_TRUE(st2.ParseFromString(wire));
    Virtqueue q2(r.mem.get(), 0);
    ASSERT_TRUE(q2.RestoreState(st2).ok());
    EXPECT_TRUE(q2.active());
    EXPECT_EQ(q2.InFlightHeads(), (std::vector<uint16_t>{h[0], h[2]}));
    EXPECT_EQ(q2.next_avail(), 3);
    EXPECT_EQ(q2.next_used(), 1);

    // Re-process an in-flight request from its descriptors...
    auto rc0 = q2.ReadInFlightChain(h[0]);
    ASSERT_TRUE(rc0.ok());
    EXPECT_EQ(rc0->readable(), c0.readable());
    EXPECT_EQ(rc0->Write(Pattern(16, 1)), 16u);
    ASSERT_TRUE(q2.AddUsed(h[0], 16).ok());
    // ... or just complete one that was finished before the snapshot.
    ASSERT_TRUE(q2.AddUsed(h[2], 0).ok());
    // The not-yet-popped chain and new ones flow through the new queue.
    DescriptorChain c3 = PopOk(q2);
    EXPECT_EQ(c3.head(), h[3]);
    ASSERT_TRUE(q2.AddUsed(c3.head(), 16).ok());
    // Finish the old queue's notion of the driver's used ring: 4 completions total.
    std::vector<uint32_t> ids;
    while (auto e = r.drv->GetUsed()) ids.push_back(e->id);
    EXPECT_EQ(ids, (std::vector<uint32_t>{h[1], h[0], h[2], h[3]}));
    r.drv->AddChain({{kData, 4, true}});
    DescriptorChain c4 = PopOk(q2);
    ASSERT_TRUE(q2.AddUsed(c4.head(), 0).ok());
    EXPECT_EQ(r.drv->UsedIdx(), 5);
    EXPECT_FALSE(q2.in_error());
  }
}

TEST(VirtqueueStateTest, RoundTripIsIdentity) {
  Rig r(16, kIndirect | kEventIdx);
  for (int i = 0; i < 5; ++i) r.drv->AddChain({{kData, 4, true}});
  for (int i = 0; i < 5; ++i) PopOk(*r.q);
  ASSERT_TRUE(r.q->AddUsed(r.q->InFlightHeads()[2], 1).ok());
  VirtqueueState a = r.q->SaveState();
  Virtqueue q2(r.mem.get(), 0);
  ASSERT_TRUE(q2.RestoreState(a).ok());
  VirtqueueState b = q2.SaveState();
  EXPECT_EQ(a.SerializeAsString(), b.SerializeAsString());
}

TEST(VirtqueueStateTest, InactiveQueueRoundTrip) {
  auto mem = MakeRam();
  Virtqueue q(mem.get(), 0);
  ASSERT_TRUE(q.set_size(64).ok());
  ASSERT_TRUE(q.set_desc_addr(0x4000).ok());
  VirtqueueState st = q.SaveState();
  Virtqueue q2(mem.get(), 0);
  ASSERT_TRUE(q2.RestoreState(st).ok());
  EXPECT_EQ(q2.size(), 64u);
  EXPECT_EQ(q2.desc_addr(), 0x4000u);
  EXPECT_FALSE(q2.active());
}

TEST(VirtqueueStateTest, RestoreRejectsInvalidState) {
  Rig r(8);
  r.drv->AddChain({{kData, 4, true}});
  r.drv->AddChain({{kData, 4, true}});
  PopOk(*r.q);
  PopOk(*r.q);
  const VirtqueueState good = r.q->SaveState();
  struct Case {
    const char* name;
    std::function<void(VirtqueueState&)> mutate;
  } cases[] = {
      {"size 0", [](VirtqueueState& s) { s.set_size(0); }},
      {"size 6", [](VirtqueueState& s) { s.set_size(6); }},
      {"size too big", [](VirtqueueState& s) { s.set_size(65536); }},
      {"index > 16 bits", [](VirtqueueState& s) { s.set_next_avail(70000); }},
      {"head >= size", [](VirtqueueState& s) { s.set_in_flight(1, 8); }},
      {"duplicate head", [](VirtqueueState& s) { s.set_in_flight(1, s.in_flight(0)); }},
      {"count mismatch", [](VirtqueueState& s) { s.add_in_flight(5); }},
      {"count mismatch 2", [](VirtqueueState& s) { s.set_next_used(1); }},
      {"used misaligned", [](VirtqueueState& s) { s.set_used_addr(s.used_addr() + 2); }},
      {"desc outside RAM", [](VirtqueueState& s) { s.set_desc_addr(kRam); }},
      {"not ready", [](VirtqueueState& s) { s.set_ready(false); }},
      {"inactive with in-flight", [](VirtqueueState& s) { s.set_active(false); }},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    VirtqueueState st = good;
    c.mutate(st);
    Virtqueue q2(r.mem.get(), 0);
    absl::Status s = q2.RestoreState(st);
    EXPECT_FALSE(s.ok());
    EXPECT_FALSE(q2.active());
    EXPECT_FALSE(q2.PopChain().ok());
  }
  Virtqueue q3(r.mem.get(), 0);
  EXPECT_TRUE(q3.RestoreState(good).ok());
  // Into a device with a smaller max size.
  Virtqueue small(r.mem.get(), 0, 4);
  EXPECT_FALSE(small.RestoreState(good).ok());
}

// ===========================================================================================
// Reset

TEST(VirtqueueResetTest, BackToInitialState) {
  Rig r(8, kIndirect | kEventIdx);
  r.drv->AddChain({{kData, 4, true}});
  PopOk(*r.q);
  r.q->DisableNotifications();
  r.q->Reset();
  EXPECT_FALSE(r.q->active());
  EXPECT_FALSE(r.q->ready());
  EXPECT_EQ(r.q->size(), kMaxQueueSize);
  EXPECT_EQ(r.q->desc_addr(), 0u);
  EXPECT_EQ(r.q->features(), 0u);
  EXPECT_EQ(r.q->next_avail(), 0);
  EXPECT_EQ(r.q->next_used(), 0);
  EXPECT_TRUE(r.q->InFlightHeads().empty());
  EXPECT_TRUE(r.q->notifications_enabled());
  EXPECT_FALSE(r.q->PopChain().ok());
  // The driver re-initialises its rings and the queue works again.
  auto fresh = std::make_unique<TestDriver>(r.mem.get(), 8);
  ASSERT_TRUE(fresh->Configure(*r.q, kIndirect).ok());
  fresh->AddChain({{kData, 4, true}});
  DescriptorChain c = PopOk(*r.q);
  ASSERT_TRUE(r.q->AddUsed(c.head(), 4).ok());
  EXPECT_EQ(fresh->UsedIdx(), 1);
}

}  // namespace
}  // namespace microvmm::virtio
