// Fuzz target for the device side of a split virtqueue (devices/virtio/queue.h).
//
// The input is a hostile guest: it supplies the queue configuration, a small program of device
// operations, and the guest RAM image (descriptor table, rings, indirect tables, data), and may
// rewrite guest memory between operations (a concurrently misbehaving driver). The target
// checks invariants and aborts on a violation:
//  - every buffer of a popped chain lies inside guest RAM; byte counts add up;
//  - once in the error state the queue stays there and writes nothing more;
//  - used->idx in guest memory always equals the device's next_used;
//  - every page the device modified is marked in the dirty bitmap (pages not marked dirty must
//    still be all zero at the end of a run, since the harness zeroes RAM between runs).
//
// Input layout:
//   [0]      log2(queue size) (mod 7: 1..64 entries)
//   [1]      bit0 INDIRECT_DESC, bit1 EVENT_IDX, bit2 take ring addresses from [4..15]
//   [2]      number of program bytes P that follow the 16-byte header
//   [3]      unused
//   [4..15]  desc, avail, used addresses (u32 LE each, used when [1] bit2)
//   [16..16+P) program (see RunOp)
//   rest     guest RAM image, copied to GPA 0 (at most kImageMax bytes)
//
// Build modes:
//  - plain (Bazel cc_binary): main() runs every file (or every file in every directory) named
//    on the command line once: a regression-corpus runner, also usable under ASan.
//  - libFuzzer: clang++ -fsanitize=fuzzer,address -DMVMM_LIBFUZZER (no main here).
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "devices/virtio/queue.h"
#include "vmm/base/fuzz_main.h"
#include "vmm/base/log.h"
#include "vmm/memory/guest_memory.h"

namespace {

using microvmm::GuestMemory;
using microvmm::kPageSize;
using microvmm::virtio::DescriptorChain;
using microvmm::virtio::Virtqueue;

constexpr uint64_t kRamBytes = 2ULL << 20;
constexpr size_t kImageMax = 256 * 1024;
constexpr uint64_t kMaxCopy = 64 * 1024;  // per chain and direction

#define FUZZ_CHECK(cond) MVMM_FUZZ_CHECK("queue_fuzz", cond)

GuestMemory& Ram() {
  static GuestMemory* mem = [] {
    microvmm::SetLogLevel(microvmm::LogLevel::kError);
    auto m = GuestMemory::Create(kRamBytes);
    if (!m.ok()) {
      std::fprintf(stderr, "queue_fuzz: %s\n", std::string(m.status().message()).c_str());
      std::abort();
    }
    return m->release();
  }();
  return *mem;
}

uint32_t Le32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

class Harness {
 public:
  Harness(GuestMemory& mem, const uint8_t* data, size_t size) : mem_(mem) {
    const uint8_t* hdr = data;
    size_t prog_len = std::min<size_t>(hdr[2], size - 16);
    prog_.assign(data + 16, data + 16 + prog_len);
    const uint8_t* image = data + 16 + prog_len;
    size_t image_len = std::min(size - 16 - prog_len, kImageMax);
    if (image_len > 0) FUZZ_CHECK(mem_.Write(0, image, image_len).ok());

    uint32_t qsize = 1u << (hdr[0] % 7);
    uint64_t features = 0;
    if (hdr[1] & 1) features |= 1ULL << microvmm::virtio::kFeatureIndirectDesc;
    if (hdr[1] & 2) features |= 1ULL << microvmm::virtio::kFeatureEventIdx;
    uint64_t desc = 0, avail = 16ULL * qsize, used = (avail + 6 + 2ULL * qsize + 3) & ~3ULL;
    if (hdr[1] & 4) {
      desc = Le32(hdr + 4);
      avail = Le32(hdr + 8);
      used = Le32(hdr + 12);
    }
    q_ = std::make_unique<Virtqueue>(&mem_, 0, 64);
    (void)q_->set_size(qsize);
    (void)q_->set_desc_addr(desc);
    (void)q_->set_avail_addr(avail);
    (void)q_->set_used_addr(used);
    (void)q_->set_features(features);
    (void)q_->set_ready(true);
    active_ = q_->Activate().ok();
  }

  void Run() {
    if (!active_) {
      FUZZ_CHECK(!q_->PopChain().ok());
      return;
    }
    for (pc_ = 0; pc_ < prog_.size();) RunOp(prog_[pc_++]);
    // Drain: pop everything still available, then complete everything.
    for (int i = 0; i < 256 && Pop(); ++i) {
    }
    while (!inflight_.empty()) Complete(/*newest=*/false);
    q_->NeedsNotification();
    CheckUsedIdx();
  }

 private:
  uint8_t Next() { return pc_ < prog_.size() ? prog_[pc_++] : 0; }

  void RunOp(uint8_t op) {
    switch (op % 10) {
      case 0: Pop(); break;
      case 1: Complete(false); break;
      case 2: Complete(true); break;
      case 3: q_->NeedsNotification(); break;
      case 4: q_->DisableNotifications(); break;
      case 5: q_->EnableNotifications(); break;
      case 6: SaveRestore(); break;
      case 7: {  // the guest scribbles on its memory between device operations
        uint32_t off = (uint32_t{Next()} << 8 | Next()) * 4 % kImageMax;
        uint8_t v = Next();
        FUZZ_CHECK(mem_.Write(off, &v, 1).ok());
        // The guest may legitimately write its own copy of the used ring (it only hurts itself):
        // re-baseline the checks that compare it with what the device wrote.
        if (off >= q_->used_addr() && off < q_->used_addr() + 4) overlap_ = true;
        if (error_used_.has_value()) error_used_ = UsedRingSnapshot();
        break;
      }
      case 8: {
        std::vector<uint16_t> heads = q_->InFlightHeads();
        if (heads.empty()) break;
        auto c = q_->ReadInFlightChain(heads[Next() % heads.size()]);
        if (c.ok()) CheckChain(*c);
        else FUZZ_CHECK(q_->in_error());
        break;
      }
      case 9: {
        auto p = q_->PendingAvail();
        if (p.ok()) FUZZ_CHECK(*p <= q_->size());
        break;
      }
    }
    AfterOp();
  }

  void AfterOp() {
    if (q_->in_error()) {
      if (!error_used_.has_value()) error_used_ = UsedRingSnapshot();
      FUZZ_CHECK(!q_->PopChain().ok());
      FUZZ_CHECK(UsedRingSnapshot() == *error_used_);  // nothing more written after an error
    } else {
      CheckUsedIdx();
    }
  }

  std::vector<uint8_t> UsedRingSnapshot() {
    std::vector<uint8_t> v(microvmm::virtio::UsedRingBytes(q_->size()));
    FUZZ_CHECK(mem_.Read(q_->used_addr(), v.data(), v.size()).ok());
    return v;
  }

  void CheckUsedIdx() {
    if (q_->in_error() || !q_->active()) return;
    uint16_t idx = 0;
    FUZZ_CHECK(mem_.Read(q_->used_addr() + 2, &idx, 2).ok());
    // The rings may overlap (allowed; the guest only hurts itself), so a popped chain's
    // writable buffer can legitimately cover used->idx. Only check when it cannot.
    // Before the device's first AddUsed, used->idx is whatever the guest image put there.
    if (!overlap_ && device_wrote_used_) FUZZ_CHECK(idx == q_->next_used());
  }

  void CheckChain(const DescriptorChain& c) {
    FUZZ_CHECK(c.head() < q_->size());
    uint64_t r = 0, w = 0;
    for (const auto& b : c.readable()) {
      FUZZ_CHECK(b.len > 0 && mem_.Contains(b.gpa, b.len));
      r += b.len;
    }
    for (const auto& b : c.writable()) {
      FUZZ_CHECK(b.len > 0 && mem_.Contains(b.gpa, b.len));
      w += b.len;
      uint64_t used_lo = q_->used_addr(), used_hi = used_lo + 4;
      if (b.gpa < used_hi && used_lo < b.gpa + b.len) overlap_ = true;
    }
    FUZZ_CHECK(r == c.readable_bytes() && w == c.writable_bytes());
    FUZZ_CHECK(r + w <= (1ULL << 32));
  }

  bool Pop() {
    auto c = q_->PopChain();
    if (!c.ok()) {
      FUZZ_CHECK(q_->in_error() || !q_->active());
      return false;
    }
    if (!c->has_value()) return false;
    DescriptorChain& chain = **c;
    CheckChain(chain);
    // Touch the data like a device would: read the head and the tail, fill the writable part.
    std::vector<uint8_t> buf(std::min<uint64_t>(chain.readable_bytes(), kMaxCopy));
    FUZZ_CHECK(chain.Read(buf) == buf.size());
    if (chain.readable_bytes() > 16) {
      uint8_t tail[16];
      FUZZ_CHECK(chain.ReadAt(chain.readable_bytes() - 16, tail) == 16);
    }
    std::vector<uint8_t> out(std::min<uint64_t>(chain.writable_bytes(), kMaxCopy), 0xA5);
    FUZZ_CHECK(chain.Write(out) == out.size());
    if (chain.writable_bytes() > 4) {
      uint8_t t[4] = {1, 2, 3, 4};
      FUZZ_CHECK(chain.WriteAt(chain.writable_bytes() - 4, t) == 4);
      FUZZ_CHECK(chain.bytes_written() == std::min<uint64_t>(chain.writable_bytes(), UINT32_MAX));
    }
    inflight_.push_back(std::move(chain));
    FUZZ_CHECK(inflight_.size() <= q_->size());
    return true;
  }

  void Complete(bool newest) {
    if (inflight_.empty()) return;
    DescriptorChain c = newest ? std::move(inflight_.back()) : std::move(inflight_.front());
    if (newest) inflight_.pop_back();
    else inflight_.pop_front();
    absl::Status s = q_->AddUsed(c.head(), c.bytes_written());
    FUZZ_CHECK(s.ok() || q_->in_error());
    if (s.ok()) device_wrote_used_ = true;
    // A completed head is no longer in flight: completing it twice is refused.
    if (s.ok()) FUZZ_CHECK(!q_->AddUsed(c.head(), 0).ok());
  }

  void SaveRestore() {
    microvmm::VirtqueueState st = q_->SaveState();
    std::string wire = st.SerializeAsString();
    microvmm::VirtqueueState st2;
    FUZZ_CHECK(st2.ParseFromString(wire));
    auto q2 = std::make_unique<Virtqueue>(&mem_, 0, 64);
    FUZZ_CHECK(q2->RestoreState(st2).ok());
    FUZZ_CHECK(q2->SaveState().SerializeAsString() == wire);
    FUZZ_CHECK(q2->in_error() == q_->in_error());
    q_ = std::move(q2);
  }

  GuestMemory& mem_;
  std::unique_ptr<Virtqueue> q_;
  bool active_ = false;
  bool overlap_ = false;
  bool device_wrote_used_ = false;
  std::vector<uint8_t> prog_;
  size_t pc_ = 0;
  std::deque<DescriptorChain> inflight_;
  std::optional<std::vector<uint8_t>> error_used_;
};

// Zeroes every page dirtied by the last run; any non-zero page that is not dirty was written
// behind the dirty bitmap's back.
void ScrubRam(GuestMemory& mem) {
  const GuestMemory::Region& r = mem.regions()[0];
  std::vector<uint64_t> dirty = mem.TakeDirty(0);
  for (uint64_t pg = 0; pg < r.size / kPageSize; ++pg) {
    uint8_t* p = r.host + pg * kPageSize;
    if ((dirty[pg / 64] >> (pg % 64)) & 1) {
      std::memset(p, 0, kPageSize);
    } else {
      static const uint8_t zero[kPageSize] = {};
      FUZZ_CHECK(std::memcmp(p, zero, kPageSize) == 0);
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 16) return 0;
  GuestMemory& mem = Ram();
  {
    Harness h(mem, data, size);
    h.Run();
  }
  ScrubRam(mem);
  return 0;
}

#ifndef MVMM_LIBFUZZER
int main(int argc, char** argv) {
  return microvmm::RunFuzzInputs(argc, argv, "queue_fuzz", LLVMFuzzerTestOneInput);
}
#endif
