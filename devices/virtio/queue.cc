#include "devices/virtio/queue.h"

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstring>
#include <string>
#include <utility>

#include "absl/strings/str_format.h"
#include "vmm/base/log.h"

namespace microvmm::virtio {

static_assert(std::endian::native == std::endian::little,
              "virtio 1.x rings are little-endian; this implementation reads them natively");

namespace {

constexpr uint64_t kMaxChainBytes = 1ULL << 32;  // "MUST NOT add a descriptor chain longer than 2^32"

// 16-bit ring fields shared with the guest: accessed atomically (no tearing, no compiler
// re-fetch). Alignment is guaranteed by the ring alignment checks at activation.
uint16_t LoadU16(const uint8_t* p, std::memory_order order) {
  return std::atomic_ref<uint16_t>(*reinterpret_cast<uint16_t*>(const_cast<uint8_t*>(p)))
      .load(order);
}
void StoreU16(uint8_t* p, uint16_t v, std::memory_order order) {
  std::atomic_ref<uint16_t>(*reinterpret_cast<uint16_t*>(p)).store(v, order);
}

bool IsPowerOfTwo(uint32_t v) { return v != 0 && (v & (v - 1)) == 0; }

}  // namespace

// ---------------------------------------------------------------------------------------------
// DescriptorChain

uint64_t DescriptorChain::ReadAt(uint64_t offset, std::span<uint8_t> dst) const {
  uint64_t done = 0;
  for (const GuestBuffer& b : readable_) {
    if (done == dst.size()) break;
    if (offset >= b.len) {
      offset -= b.len;
      continue;
    }
    uint64_t n = std::min<uint64_t>(b.len - offset, dst.size() - done);
    // Cannot fail: every buffer was checked against guest RAM when the chain was popped.
    if (!mem_->Read(b.gpa + offset, dst.data() + done, n).ok()) break;
    done += n;
    offset = 0;
  }
  return done;
}

uint64_t DescriptorChain::WriteAt(uint64_t offset, std::span<const uint8_t> src) {
  const uint64_t start = offset;
  uint64_t done = 0;
  for (const GuestBuffer& b : writable_) {
    if (done == src.size()) break;
    if (offset >= b.len) {
      offset -= b.len;
      continue;
    }
    uint64_t n = std::min<uint64_t>(b.len - offset, src.size() - done);
    if (!mem_->Write(b.gpa + offset, src.data() + done, n).ok()) break;  // marks dirty pages
    done += n;
    offset = 0;
  }
  if (done > 0) written_hwm_ = std::max(written_hwm_, start + done);
  return done;
}

uint64_t DescriptorChain::Read(std::span<uint8_t> dst) {
  uint64_t n = ReadAt(read_pos_, dst);
  read_pos_ += n;
  return n;
}

uint64_t DescriptorChain::Write(std::span<const uint8_t> src) {
  uint64_t n = WriteAt(write_pos_, src);
  write_pos_ += n;
  return n;
}

uint32_t DescriptorChain::bytes_written() const {
  return static_cast<uint32_t>(std::min<uint64_t>(written_hwm_, UINT32_MAX));
}

// ---------------------------------------------------------------------------------------------
// Virtqueue: configuration

Virtqueue::Virtqueue(GuestMemory* mem, uint16_t index, uint32_t max_size)
    : mem_(mem),
      index_(index),
      max_size_(IsPowerOfTwo(max_size) && max_size <= kMaxQueueSize ? max_size : kMaxQueueSize),
      size_(max_size_) {
  ResetLocked();
}

#define MVMM_VQ_SETTER(name, field, type)                                                  \
  absl::Status Virtqueue::name(type v) {                                                   \
    std::lock_guard<std::mutex> l(mu_);                                                    \
    if (active_)                                                                           \
      return absl::FailedPreconditionError(                                                \
          absl::StrFormat("virtqueue %u: %s while the queue is active", index_, #name));   \
    field = v;                                                                             \
    return absl::OkStatus();                                                               \
  }
MVMM_VQ_SETTER(set_size, size_, uint32_t)
MVMM_VQ_SETTER(set_desc_addr, desc_addr_, uint64_t)
MVMM_VQ_SETTER(set_avail_addr, avail_addr_, uint64_t)
MVMM_VQ_SETTER(set_used_addr, used_addr_, uint64_t)
MVMM_VQ_SETTER(set_ready, ready_, bool)
MVMM_VQ_SETTER(set_features, features_, uint64_t)
#undef MVMM_VQ_SETTER

uint32_t Virtqueue::size() const {
  std::lock_guard<std::mutex> l(mu_);
  return size_;
}
uint64_t Virtqueue::desc_addr() const {
  std::lock_guard<std::mutex> l(mu_);
  return desc_addr_;
}
uint64_t Virtqueue::avail_addr() const {
  std::lock_guard<std::mutex> l(mu_);
  return avail_addr_;
}
uint64_t Virtqueue::used_addr() const {
  std::lock_guard<std::mutex> l(mu_);
  return used_addr_;
}
bool Virtqueue::ready() const {
  std::lock_guard<std::mutex> l(mu_);
  return ready_;
}
uint64_t Virtqueue::features() const {
  std::lock_guard<std::mutex> l(mu_);
  return features_;
}
bool Virtqueue::active() const {
  std::lock_guard<std::mutex> l(mu_);
  return active_;
}
bool Virtqueue::in_error() const {
  std::lock_guard<std::mutex> l(mu_);
  return !error_.ok();
}
absl::Status Virtqueue::error() const {
  std::lock_guard<std::mutex> l(mu_);
  return error_;
}
bool Virtqueue::notifications_enabled() const {
  std::lock_guard<std::mutex> l(mu_);
  return notifications_enabled_;
}
uint16_t Virtqueue::next_avail() const {
  std::lock_guard<std::mutex> l(mu_);
  return next_avail_;
}
uint16_t Virtqueue::next_used() const {
  std::lock_guard<std::mutex> l(mu_);
  return next_used_;
}

absl::Status Virtqueue::ValidateConfigLocked() const {
  auto bad = [this](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrFormat("virtqueue %u: %s", index_, what));
  };
  if (!ready_) return bad("not ready");
  if (!IsPowerOfTwo(size_) || size_ > max_size_)
    return bad(absl::StrFormat("queue size %u is not a power of 2 in [1, %u]", size_, max_size_));
  struct Part {
    const char* name;
    uint64_t gpa, align, bytes;
  } parts[] = {
      {"descriptor table", desc_addr_, kDescAlign, DescTableBytes(size_)},
      {"available ring", avail_addr_, kAvailAlign, AvailRingBytes(size_)},
      {"used ring", used_addr_, kUsedAlign, UsedRingBytes(size_)},
  };
  for (const Part& p : parts) {
    if (p.gpa % p.align != 0)
      return bad(absl::StrFormat("%s address 0x%x is not %u-byte aligned", p.name, p.gpa,
                                 p.align));
    if (p.gpa + p.bytes < p.gpa || !mem_->Contains(p.gpa, p.bytes))
      return bad(absl::StrFormat("%s [0x%x, +0x%x) is not inside guest RAM", p.name, p.gpa,
                                 p.bytes));
  }
  return absl::OkStatus();
}

absl::Status Virtqueue::Activate() {
  std::lock_guard<std::mutex> l(mu_);
  if (active_)
    return absl::FailedPreconditionError(
        absl::StrFormat("virtqueue %u is already active", index_));
  absl::Status s = ValidateConfigLocked();
  if (!s.ok()) return s;
  desc_host_ = *mem_->HostPtr(desc_addr_, DescTableBytes(size_));
  avail_host_ = *mem_->HostPtr(avail_addr_, AvailRingBytes(size_));
  used_host_ = *mem_->HostPtr(used_addr_, UsedRingBytes(size_));
  in_flight_.assign(size_, 0);
  in_flight_count_ = 0;
  active_ = true;
  if (!notifications_enabled_ && !event_idx()) WriteUsedFlagsLocked(kUsedFNoNotify);
  return absl::OkStatus();
}

absl::Status Virtqueue::CheckUsableLocked() const {
  if (!error_.ok()) return error_;
  if (!active_)
    return absl::FailedPreconditionError(absl::StrFormat("virtqueue %u is not active", index_));
  return absl::OkStatus();
}

absl::Status Virtqueue::FailLocked(const std::string& what) {
  std::string msg = absl::StrFormat("virtqueue %u: %s", index_, what);
  LOG_WARN_RATELIMITED("%s; queue stopped, device needs reset", msg);
  error_ = absl::InvalidArgumentError(msg);
  return error_;
}

// ---------------------------------------------------------------------------------------------
// Ring access

uint16_t Virtqueue::LoadAvailIdxLocked() const {
  // Acquire: ring entries and descriptors are read only after the index that exposed them.
  return LoadU16(avail_host_ + 2, std::memory_order_acquire);
}

void Virtqueue::WriteAvailEventLocked(uint16_t value) {
  uint64_t off = 4 + 8ULL * size_;
  StoreU16(used_host_ + off, value, std::memory_order_relaxed);
  mem_->MarkDirty(used_addr_ + off, 2);
}

void Virtqueue::WriteUsedFlagsLocked(uint16_t value) {
  StoreU16(used_host_, value, std::memory_order_relaxed);
  mem_->MarkDirty(used_addr_, 2);
}

absl::StatusOr<DescriptorChain> Virtqueue::WalkChainLocked(uint16_t head) {
  if (head >= size_)
    return FailLocked(absl::StrFormat("head index %u >= queue size %u", head, size_));
  DescriptorChain chain;
  chain.mem_ = mem_;
  chain.head_ = head;

  const uint8_t* table = desc_host_;  // current table: the ring's, or one indirect table
  uint32_t table_entries = size_;
  bool in_indirect = false;
  uint32_t idx = head;
  uint32_t walked = 0;  // descriptors visited in the current table: bounds loops
  bool seen_writable = false;
  uint64_t total_bytes = 0;

  for (;;) {
    if (idx >= table_entries)
      return FailLocked(absl::StrFormat("chain %u: next index %u out of range (%s table of %u)",
                                        head, idx, in_indirect ? "indirect" : "descriptor",
                                        table_entries));
    if (++walked > table_entries)
      return FailLocked(absl::StrFormat(
          "chain %u: more than %u descriptors in the %s table (loop or chain too long)", head,
          table_entries, in_indirect ? "indirect" : "descriptor"));
    // One fetch of the descriptor into a private copy: the guest can change the table at any
    // time, so everything below decides on the copy only.
    RawDesc d;
    std::memcpy(&d, table + uint64_t{idx} * kDescSize, sizeof(d));
    ++chain.descriptor_count_;

    if (d.flags & kDescFIndirect) {
      if (!indirect())
        return FailLocked(absl::StrFormat(
            "chain %u: INDIRECT descriptor but VIRTIO_F_INDIRECT_DESC not negotiated", head));
      if (in_indirect)
        return FailLocked(absl::StrFormat("chain %u: nested indirect descriptor", head));
      if (d.flags & kDescFNext)
        return FailLocked(
            absl::StrFormat("chain %u: descriptor has both INDIRECT and NEXT set", head));
      if (d.len == 0 || d.len % kDescSize != 0)
        return FailLocked(absl::StrFormat(
            "chain %u: indirect table length %u is not a non-zero multiple of 16", head, d.len));
      if (d.len / kDescSize > size_)
        return FailLocked(absl::StrFormat(
            "chain %u: indirect table of %u entries is longer than the queue (%u)", head,
            d.len / kDescSize, size_));
      if (d.addr + d.len < d.addr)
        return FailLocked(absl::StrFormat(
            "chain %u: indirect table [0x%x, +0x%x) wraps the address space", head, d.addr,
            d.len));
      auto host = mem_->HostPtr(d.addr, d.len);
      if (!host.ok())
        return FailLocked(absl::StrFormat(
            "chain %u: indirect table [0x%x, +0x%x) is not inside guest RAM", head, d.addr,
            d.len));
      // The WRITE flag of the pointer descriptor is ignored (spec: the device MUST ignore it).
      table = *host;
      table_entries = d.len / kDescSize;
      in_indirect = true;
      idx = 0;
      walked = 0;
      continue;
    }

    if (d.len > 0) {
      if (d.addr + d.len < d.addr)
        return FailLocked(absl::StrFormat("chain %u: buffer [0x%x, +0x%x) wraps the address space",
                                          head, d.addr, d.len));
      if (!mem_->Contains(d.addr, d.len))
        return FailLocked(absl::StrFormat("chain %u: buffer [0x%x, +0x%x) is not inside guest RAM",
                                          head, d.addr, d.len));
    }
    total_bytes += d.len;
    if (total_bytes > kMaxChainBytes)
      return FailLocked(absl::StrFormat("chain %u: longer than 2^32 bytes", head));
    if (d.flags & kDescFWrite) {
      seen_writable = true;
      if (d.len > 0) {
        chain.writable_.push_back({d.addr, d.len});
        chain.writable_bytes_ += d.len;
      }
    } else {
      if (seen_writable)
        return FailLocked(absl::StrFormat(
            "chain %u: device-readable descriptor after a device-writable one", head));
      if (d.len > 0) {
        chain.readable_.push_back({d.addr, d.len});
        chain.readable_bytes_ += d.len;
      }
    }
    if (!(d.flags & kDescFNext)) break;
    idx = d.next;
  }
  return chain;
}

// ---------------------------------------------------------------------------------------------
// Processing

absl::StatusOr<uint16_t> Virtqueue::PendingAvail() {
  std::lock_guard<std::mutex> l(mu_);
  absl::Status s = CheckUsableLocked();
  if (!s.ok()) return s;
  uint16_t avail_idx = LoadAvailIdxLocked();
  uint16_t pending = avail_idx - next_avail_;
  // Every outstanding chain (offered but not popped, or popped but not used) owns at least its
  // head descriptor, so a valid driver never has more than `size` of them.
  if (pending > size_ - in_flight_count_)
    return FailLocked(absl::StrFormat(
        "available index %u is %u ahead of the device (%u), with %u in flight, queue size %u",
        avail_idx, pending, next_avail_, in_flight_count_, size_));
  return pending;
}

absl::StatusOr<std::optional<DescriptorChain>> Virtqueue::PopChain() {
  std::lock_guard<std::mutex> l(mu_);
  absl::Status s = CheckUsableLocked();
  if (!s.ok()) return s;
  uint16_t avail_idx = LoadAvailIdxLocked();
  uint16_t pending = avail_idx - next_avail_;
  if (pending > size_ - in_flight_count_)
    return FailLocked(absl::StrFormat(
        "available index %u is %u ahead of the device (%u), with %u in flight, queue size %u",
        avail_idx, pending, next_avail_, in_flight_count_, size_));
  if (pending == 0) return std::optional<DescriptorChain>();

  std::atomic_thread_fence(std::memory_order_acquire);
  uint16_t head =
      LoadU16(avail_host_ + 4 + 2ULL * (next_avail_ % size_), std::memory_order_relaxed);
  if (head >= size_)
    return FailLocked(absl::StrFormat("available ring entry %u: head index %u >= queue size %u",
                                      next_avail_, head, size_));
  if (in_flight_[head] != 0)
    return FailLocked(
        absl::StrFormat("available ring entry %u: head %u is already in flight", next_avail_,
                        head));
  absl::StatusOr<DescriptorChain> chain = WalkChainLocked(head);
  if (!chain.ok()) return chain.status();

  in_flight_[head] = ++pop_seq_;
  ++in_flight_count_;
  ++next_avail_;
  if (event_idx() && notifications_enabled_) WriteAvailEventLocked(next_avail_);
  return std::optional<DescriptorChain>(std::move(*chain));
}

absl::Status Virtqueue::AddUsed(uint16_t head, uint32_t len) {
  std::lock_guard<std::mutex> l(mu_);
  absl::Status s = CheckUsableLocked();
  if (!s.ok()) return s;
  if (head >= size_ || in_flight_[head] == 0)
    return absl::FailedPreconditionError(
        absl::StrFormat("virtqueue %u: AddUsed(%u): head is not in flight", index_, head));
  struct {
    uint32_t id;
    uint32_t len;
  } elem = {head, len};
  uint64_t elem_gpa = used_addr_ + 4 + 8ULL * (next_used_ % size_);
  s = mem_->Write(elem_gpa, &elem, sizeof(elem));  // marks the page dirty
  if (!s.ok()) return FailLocked(absl::StrFormat("writing used element: %s", s.message()));
  ++next_used_;
  // Release: the element (and the buffer contents written before) become visible before idx.
  StoreU16(used_host_ + 2, next_used_, std::memory_order_release);
  mem_->MarkDirty(used_addr_ + 2, 2);
  in_flight_[head] = 0;
  --in_flight_count_;
  used_since_signal_ = std::min<uint32_t>(used_since_signal_ + 1, 0x10000);
  return absl::OkStatus();
}

bool Virtqueue::NeedsNotification() {
  std::lock_guard<std::mutex> l(mu_);
  if (!CheckUsableLocked().ok()) return false;
  if (used_since_signal_ == 0) return false;
  // Full fence: the used->idx store must be visible before we read the driver's suppression
  // state, or a driver re-enabling interrupts concurrently could miss this completion.
  std::atomic_thread_fence(std::memory_order_seq_cst);
  bool notify;
  if (event_idx()) {
    uint16_t used_event =
        LoadU16(avail_host_ + 4 + 2ULL * size_, std::memory_order_relaxed);
    notify = !signalled_used_valid_ || used_since_signal_ >= 0x10000 ||
             VringNeedEvent(used_event, next_used_, signalled_used_);
  } else {
    notify = !(LoadU16(avail_host_, std::memory_order_relaxed) & kAvailFNoInterrupt);
  }
  signalled_used_ = next_used_;
  signalled_used_valid_ = true;
  used_since_signal_ = 0;
  return notify;
}

void Virtqueue::DisableNotifications() {
  std::lock_guard<std::mutex> l(mu_);
  notifications_enabled_ = false;
  if (!CheckUsableLocked().ok()) return;
  // With EVENT_IDX, flags must stay 0; avail_event simply stops following next_avail.
  if (!event_idx()) WriteUsedFlagsLocked(kUsedFNoNotify);
}

bool Virtqueue::EnableNotifications() {
  std::lock_guard<std::mutex> l(mu_);
  notifications_enabled_ = true;
  if (!CheckUsableLocked().ok()) return false;
  if (event_idx())
    WriteAvailEventLocked(next_avail_);
  else
    WriteUsedFlagsLocked(0);
  // Full fence: publish the request before re-reading avail->idx (else a chain added just now,
  // without a notification because suppression was still visible, could go unnoticed).
  std::atomic_thread_fence(std::memory_order_seq_cst);
  return LoadAvailIdxLocked() != next_avail_;
}

void Virtqueue::SetAvailEvent(uint16_t avail_event) {
  std::lock_guard<std::mutex> l(mu_);
  if (!CheckUsableLocked().ok() || !event_idx()) return;
  WriteAvailEventLocked(avail_event);
}

std::vector<uint16_t> Virtqueue::InFlightHeads() const {
  std::lock_guard<std::mutex> l(mu_);
  return InFlightHeadsLocked();
}

std::vector<uint16_t> Virtqueue::InFlightHeadsLocked() const {
  std::vector<std::pair<uint64_t, uint16_t>> v;
  for (size_t h = 0; h < in_flight_.size(); ++h)
    if (in_flight_[h] != 0) v.push_back({in_flight_[h], static_cast<uint16_t>(h)});
  std::sort(v.begin(), v.end());
  std::vector<uint16_t> out;
  out.reserve(v.size());
  for (const auto& [seq, h] : v) out.push_back(h);
  return out;
}

absl::StatusOr<DescriptorChain> Virtqueue::ReadInFlightChain(uint16_t head) {
  std::lock_guard<std::mutex> l(mu_);
  absl::Status s = CheckUsableLocked();
  if (!s.ok()) return s;
  if (head >= size_ || in_flight_[head] == 0)
    return absl::FailedPreconditionError(
        absl::StrFormat("virtqueue %u: head %u is not in flight", index_, head));
  return WalkChainLocked(head);
}

// ---------------------------------------------------------------------------------------------
// Reset, save, restore

void Virtqueue::ResetLocked() {
  size_ = max_size_;
  desc_addr_ = avail_addr_ = used_addr_ = 0;
  ready_ = false;
  features_ = 0;
  active_ = false;
  error_ = absl::OkStatus();
  next_avail_ = next_used_ = 0;
  signalled_used_ = 0;
  signalled_used_valid_ = true;  // used idx 0 and nothing signalled: exactly known
  used_since_signal_ = 0;
  notifications_enabled_ = true;
  in_flight_.clear();
  in_flight_count_ = 0;
  pop_seq_ = 0;
  desc_host_ = avail_host_ = used_host_ = nullptr;
}

void Virtqueue::Reset() {
  std::lock_guard<std::mutex> l(mu_);
  ResetLocked();
}

VirtqueueState Virtqueue::SaveState() const {
  std::lock_guard<std::mutex> l(mu_);
  VirtqueueState st;
  st.set_size(size_);
  st.set_ready(ready_);
  st.set_desc_addr(desc_addr_);
  st.set_avail_addr(avail_addr_);
  st.set_used_addr(used_addr_);
  st.set_features(features_);
  st.set_active(active_);
  st.set_next_avail(next_avail_);
  st.set_next_used(next_used_);
  st.set_signalled_used(signalled_used_);
  st.set_signalled_used_valid(signalled_used_valid_);
  st.set_used_since_signal(used_since_signal_);
  st.set_notifications_enabled(notifications_enabled_);
  st.set_error(!error_.ok());
  if (!error_.ok()) st.set_error_message(std::string(error_.message()));
  for (uint16_t h : InFlightHeadsLocked()) st.add_in_flight(h);
  return st;
}

absl::Status Virtqueue::RestoreState(const VirtqueueState& st) {
  std::lock_guard<std::mutex> l(mu_);
  ResetLocked();
  auto bad = [this](const std::string& what) {
    ResetLocked();
    return absl::InvalidArgumentError(
        absl::StrFormat("virtqueue %u: invalid saved state: %s", index_, what));
  };
  if (!IsPowerOfTwo(st.size()) || st.size() > max_size_)
    return bad(absl::StrFormat("size %u is not a power of 2 in [1, %u]", st.size(), max_size_));
  if (st.next_avail() > 0xFFFF || st.next_used() > 0xFFFF || st.signalled_used() > 0xFFFF)
    return bad("ring index out of 16-bit range");
  size_ = st.size();
  desc_addr_ = st.desc_addr();
  avail_addr_ = st.avail_addr();
  used_addr_ = st.used_addr();
  ready_ = st.ready();
  features_ = st.features();
  next_avail_ = static_cast<uint16_t>(st.next_avail());
  next_used_ = static_cast<uint16_t>(st.next_used());
  signalled_used_ = static_cast<uint16_t>(st.signalled_used());
  signalled_used_valid_ = st.signalled_used_valid();
  used_since_signal_ = std::min<uint32_t>(st.used_since_signal(), 0x10000);
  notifications_enabled_ = st.notifications_enabled();

  uint16_t outstanding = next_avail_ - next_used_;
  if (static_cast<uint64_t>(st.in_flight_size()) != outstanding)
    return bad(absl::StrFormat("%d heads in flight but next_avail - next_used = %u",
                               st.in_flight_size(), outstanding));
  if (!st.active()) {
    if (st.in_flight_size() != 0) return bad("in-flight heads on an inactive queue");
    if (st.error()) return bad("error state on an inactive queue");
    return absl::OkStatus();
  }
  absl::Status s = ValidateConfigLocked();
  if (!s.ok()) return bad(std::string(s.message()));
  desc_host_ = *mem_->HostPtr(desc_addr_, DescTableBytes(size_));
  avail_host_ = *mem_->HostPtr(avail_addr_, AvailRingBytes(size_));
  used_host_ = *mem_->HostPtr(used_addr_, UsedRingBytes(size_));
  in_flight_.assign(size_, 0);
  for (uint32_t h : st.in_flight()) {
    if (h >= size_) return bad(absl::StrFormat("in-flight head %u >= size %u", h, size_));
    if (in_flight_[h] != 0) return bad(absl::StrFormat("in-flight head %u listed twice", h));
    in_flight_[h] = ++pop_seq_;
  }
  in_flight_count_ = st.in_flight_size();
  active_ = true;
  if (st.error()) {
    error_ = absl::InvalidArgumentError(st.error_message().empty()
                                            ? absl::StrFormat("virtqueue %u: error", index_)
                                            : st.error_message());
  }
  return absl::OkStatus();
}

}  // namespace microvmm::virtio
