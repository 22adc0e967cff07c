// A minimal virtio *driver* side for tests: lays out a split virtqueue in GuestMemory the way a
// guest driver does (descriptor table, available ring, used ring, indirect tables), offers
// chains, reads back the used ring, and can poke arbitrary (hostile) values anywhere.
#ifndef MICROVMM_TESTS_VIRTIO_VIRTQ_DRIVER_H_
#define MICROVMM_TESTS_VIRTIO_VIRTQ_DRIVER_H_

#include <cstdint>
#include <cstring>
#include <map>
#include <optional>
#include <utility>
#include <vector>

#include "devices/virtio/queue.h"
#include "vmm/memory/guest_memory.h"

namespace microvmm::virtio::testing {

// One buffer element of a chain as the driver sees it.
struct Seg {
  uint64_t gpa;
  uint32_t len;
  bool write;  // device-writable
};

struct UsedElem {
  uint32_t id;
  uint32_t len;
};

class TestDriver {
 public:
  // Places the rings at `base` (descriptor table), followed by the available ring and the
  // (4-aligned) used ring, exactly the sizes of the spec's table.
  TestDriver(GuestMemory* mem, uint32_t size, uint64_t base = 0x10000)
      : mem_(mem), size_(size) {
    desc_addr = base;
    avail_addr = desc_addr + DescTableBytes(size);
    used_addr = (avail_addr + AvailRingBytes(size) + 3) & ~uint64_t{3};
    for (uint32_t i = 0; i < size; ++i) free_.push_back(static_cast<uint16_t>(size - 1 - i));
    // A driver zeroes its rings before handing them to the device.
    std::vector<uint8_t> zero(used_addr + UsedRingBytes(size) - desc_addr, 0);
    Check(mem_->Write(desc_addr, zero.data(), zero.size()));
  }

  uint64_t desc_addr = 0, avail_addr = 0, used_addr = 0;
  uint32_t size() const { return size_; }
  uint64_t end() const { return used_addr + UsedRingBytes(size_); }

  // Transport-side setup + activation of `q` for this layout.
  absl::Status Configure(Virtqueue& q, uint64_t features) {
    absl::Status s;
    for (absl::Status x : {q.set_size(size_), q.set_desc_addr(desc_addr),
                           q.set_avail_addr(avail_addr), q.set_used_addr(used_addr),
                           q.set_features(features), q.set_ready(true)})
      if (!x.ok()) return x;
    return q.Activate();
  }

  // --- Raw access -------------------------------------------------------------------------
  void WriteDesc(uint64_t table, uint32_t i, uint64_t addr, uint32_t len, uint16_t flags,
                 uint16_t next) {
    uint8_t d[16];
    std::memcpy(d, &addr, 8);
    std::memcpy(d + 8, &len, 4);
    std::memcpy(d + 12, &flags, 2);
    std::memcpy(d + 14, &next, 2);
    Check(mem_->Write(table + 16ULL * i, d, 16));
  }
  void Desc(uint32_t i, uint64_t addr, uint32_t len, uint16_t flags, uint16_t next = 0) {
    WriteDesc(desc_addr, i, addr, len, flags, next);
  }
  void SetAvailRing(uint16_t slot, uint16_t head) { Put16(avail_addr + 4 + 2ULL * slot, head); }
  void SetAvailIdx(uint16_t v) {
    avail_idx_ = v;
    Put16(avail_addr + 2, v);
  }
  uint16_t avail_idx() const { return avail_idx_; }
  // Puts `head` into the next available slot and bumps avail->idx.
  void Publish(uint16_t head) {
    SetAvailRing(avail_idx_ % size_, head);
    SetAvailIdx(avail_idx_ + 1);
  }
  void SetAvailFlags(uint16_t f) { Put16(avail_addr, f); }
  void SetUsedEvent(uint16_t v) { Put16(avail_addr + 4 + 2ULL * size_, v); }

  uint16_t UsedFlags() const { return Get16(used_addr); }
  uint16_t UsedIdx() const { return Get16(used_addr + 2); }
  uint16_t AvailEvent() const { return Get16(used_addr + 4 + 8ULL * size_); }
  UsedElem UsedAt(uint16_t slot) const {
    UsedElem e;
    Check(mem_->Read(used_addr + 4 + 8ULL * (slot % size_), &e, sizeof(e)));
    return e;
  }
  // Snapshot of the whole used ring (to prove the device stopped writing it).
  std::vector<uint8_t> UsedRingBytesNow() const {
    std::vector<uint8_t> v(UsedRingBytes(size_));
    Check(mem_->Read(used_addr, v.data(), v.size()));
    return v;
  }

  // --- Driver behaviour ---------------------------------------------------------------------
  size_t free_descriptors() const { return free_.size(); }

  // Builds a chain from free descriptors (in order) and publishes it. Returns the head.
  uint16_t AddChain(const std::vector<Seg>& segs) {
    std::vector<uint16_t> ids = Alloc(segs.size());
    for (size_t i = 0; i < segs.size(); ++i) {
      uint16_t flags = (segs[i].write ? kDescFWrite : 0) | (i + 1 < segs.size() ? kDescFNext : 0);
      Desc(ids[i], segs[i].gpa, segs[i].len, flags, i + 1 < segs.size() ? ids[i + 1] : 0);
    }
    chains_[ids[0]] = ids;
    Publish(ids[0]);
    return ids[0];
  }

  // `prefix` direct descriptors followed by one descriptor pointing to an indirect table at
  // `table_gpa` holding `segs`. Returns the head.
  uint16_t AddIndirectChain(const std::vector<Seg>& segs, uint64_t table_gpa,
                            const std::vector<Seg>& prefix = {}) {
    for (size_t i = 0; i < segs.size(); ++i) {
      uint16_t flags = (segs[i].write ? kDescFWrite : 0) | (i + 1 < segs.size() ? kDescFNext : 0);
      WriteDesc(table_gpa, i, segs[i].gpa, segs[i].len, flags,
                static_cast<uint16_t>(i + 1 < segs.size() ? i + 1 : 0));
    }
    std::vector<uint16_t> ids = Alloc(prefix.size() + 1);
    for (size_t i = 0; i < prefix.size(); ++i)
      Desc(ids[i], prefix[i].gpa, prefix[i].len,
           (prefix[i].write ? kDescFWrite : 0) | kDescFNext, ids[i + 1]);
    Desc(ids.back(), table_gpa, static_cast<uint32_t>(16 * segs.size()), kDescFIndirect, 0);
    chains_[ids[0]] = ids;
    Publish(ids[0]);
    return ids[0];
  }

  // Consumes the next used element, if any, and frees its descriptors.
  std::optional<UsedElem> GetUsed() {
    if (UsedIdx() == last_used_) return std::nullopt;
    UsedElem e = UsedAt(last_used_++);
    auto it = chains_.find(static_cast<uint16_t>(e.id));
    if (it != chains_.end()) {
      for (uint16_t id : it->second) free_.push_back(id);
      chains_.erase(it);
    }
    return e;
  }
  uint16_t last_used() const { return last_used_; }
  // For tests that start at arbitrary ring positions (restore / wrap-around).
  void SetRingPositions(uint16_t avail_idx, uint16_t used_idx) {
    SetAvailIdx(avail_idx);
    Put16(used_addr + 2, used_idx);
    last_used_ = used_idx;
  }

 private:
  static void Check(const absl::Status& s) {
    if (!s.ok()) __builtin_trap();  // a test-driver bug, not a device one
  }
  std::vector<uint16_t> Alloc(size_t n) {
    if (n > free_.size()) __builtin_trap();
    std::vector<uint16_t> ids;
    for (size_t i = 0; i < n; ++i) {
      ids.push_back(free_.back());
      free_.pop_back();
    }
    return ids;
  }
  void Put16(uint64_t gpa, uint16_t v) { Check(mem_->Write(gpa, &v, 2)); }
  uint16_t Get16(uint64_t gpa) const {
    uint16_t v = 0;
    Check(mem_->Read(gpa, &v, 2));
    return v;
  }

  GuestMemory* mem_;
  uint32_t size_;
  uint16_t avail_idx_ = 0;
  uint16_t last_used_ = 0;
  std::vector<uint16_t> free_;
  std::map<uint16_t, std::vector<uint16_t>> chains_;
};

}  // namespace microvmm::virtio::testing

#endif  // MICROVMM_TESTS_VIRTIO_VIRTQ_DRIVER_H_
