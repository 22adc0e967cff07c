#include "vmm/pci/msix.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "vmm/base/log.h"
#include "vmm/throttle_wake.h"

namespace microvmm::pci {

namespace {

// Guest-writable bits of each byte of a table entry: Message Address bits 1:0 read 0 (dword
// aligned), vector control has only the mask bit.
constexpr uint8_t kEntryWriteMask[kMsixEntryBytes] = {0xfc, 0xff, 0xff, 0xff, 0xff, 0xff,
                                                      0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                                                      0x01, 0x00, 0x00, 0x00};

uint8_t EntryByte(const MsixEntry& e, uint32_t i) {
  uint32_t word = i < 4 ? e.address_lo : i < 8 ? e.address_hi : i < 12 ? e.data : e.control;
  return static_cast<uint8_t>(word >> (8 * (i % 4)));
}

void SetEntryByte(MsixEntry& e, uint32_t i, uint8_t b) {
  uint32_t* word = i < 4 ? &e.address_lo : i < 8 ? &e.address_hi : i < 12 ? &e.data : &e.control;
  uint32_t shift = 8 * (i % 4);
  uint8_t m = kEntryWriteMask[i];
  uint8_t old = static_cast<uint8_t>(*word >> shift);
  uint8_t now = static_cast<uint8_t>((old & ~m) | (b & m));
  *word = (*word & ~(0xffu << shift)) | (uint32_t{now} << shift);
}

}  // namespace

absl::StatusOr<std::unique_ptr<MsixTable>> MsixTable::Create(GsiRouter& router,
                                                             uint16_t num_vectors) {
  if (num_vectors == 0 || num_vectors > kMsixMaxVectors)
    return absl::InvalidArgumentError(
        absl::StrCat("MSI-X vector count ", num_vectors, " outside 1..", kMsixMaxVectors));
  std::vector<uint32_t> gsis;
  std::vector<EventFd> events;
  absl::Status err;
  for (uint16_t v = 0; v < num_vectors && err.ok(); ++v) {
    auto gsi = router.AllocateGsi();
    if (!gsi.ok()) {
      err = gsi.status();
      break;
    }
    gsis.push_back(*gsi);
    auto ev = EventFd::Create();
    if (!ev.ok()) {
      err = ev.status();
      break;
    }
    events.push_back(std::move(*ev));
  }
  if (!err.ok()) {
    (void)router.FreeGsis(gsis);
    return err;
  }
  return std::unique_ptr<MsixTable>(new MsixTable(router, std::move(gsis), std::move(events)));
}

MsixTable::MsixTable(GsiRouter& router, std::vector<uint32_t> gsis, std::vector<EventFd> events)
    : router_(router),
      gsis_(std::move(gsis)),
      events_(std::move(events)),
      entries_(gsis_.size()),
      attached_(gsis_.size(), false),
      routed_(gsis_.size()) {}

MsixTable::~MsixTable() {
  std::lock_guard lock(mu_);
  for (uint16_t v = 0; v < num_vectors(); ++v)
    if (attached_[v])
      if (absl::Status s = router_.DeassignIrqfd(events_[v].fd(), gsis_[v]); !s.ok())
        LOG_WARN("MSI-X vector %d: %s", v, s.message());
  if (absl::Status s = router_.FreeGsis(gsis_); !s.ok()) LOG_WARN("MSI-X: %s", s.message());
}

absl::StatusOr<uint32_t> MsixTable::AddCapability(PciConfigSpace& cfg, int table_bar,
                                                  uint32_t table_offset, int pba_bar,
                                                  uint32_t pba_offset) {
  auto check = [&](const char* what, int bar, uint32_t off, uint64_t len) -> absl::Status {
    BarType t = cfg.bar_type(bar);
    if (bar < 0 || bar > 5 || (t != BarType::kMem32 && t != BarType::kMem64))
      return absl::InvalidArgumentError(
          absl::StrCat("MSI-X ", what, ": BAR ", bar, " is not a memory BAR"));
    if (off % 8 != 0)
      return absl::InvalidArgumentError(absl::StrFormat("MSI-X %s offset 0x%x not 8-byte aligned",
                                                        what, off));
    if (off + len > cfg.bar_size(bar))
      return absl::InvalidArgumentError(absl::StrFormat(
          "MSI-X %s (0x%x bytes at 0x%x) does not fit BAR %d (0x%x bytes)", what, len, off, bar,
          cfg.bar_size(bar)));
    return absl::OkStatus();
  };
  if (absl::Status s = check("table", table_bar, table_offset, table_bytes()); !s.ok()) return s;
  if (absl::Status s = check("PBA", pba_bar, pba_offset, pba_bytes()); !s.ok()) return s;
  if (table_bar == pba_bar && table_offset < pba_offset + pba_bytes() &&
      pba_offset < table_offset + table_bytes())
    return absl::InvalidArgumentError("MSI-X table and PBA overlap");
  uint16_t control = static_cast<uint16_t>(num_vectors() - 1);
  uint32_t table = table_offset | static_cast<uint32_t>(table_bar);
  uint32_t pba = pba_offset | static_cast<uint32_t>(pba_bar);
  uint8_t body[kMsixCapabilityBytes] = {
      kCapIdMsix,
      0,
      static_cast<uint8_t>(control),
      static_cast<uint8_t>(control >> 8),
      static_cast<uint8_t>(table),
      static_cast<uint8_t>(table >> 8),
      static_cast<uint8_t>(table >> 16),
      static_cast<uint8_t>(table >> 24),
      static_cast<uint8_t>(pba),
      static_cast<uint8_t>(pba >> 8),
      static_cast<uint8_t>(pba >> 16),
      static_cast<uint8_t>(pba >> 24),
  };
  uint8_t writable[kMsixCapabilityBytes] = {};
  writable[3] = (kMsixControlEnable | kMsixControlFunctionMask) >> 8;
  auto off = cfg.AddCapability(body, writable);
  if (!off.ok()) return off.status();
  uint32_t ctl = *off + 2;
  cfg.AddWriteObserver(ctl, 2, [this, &cfg, ctl] {
    SetMessageControl(static_cast<uint16_t>(cfg.ReadRaw(ctl, 2)));
  });
  std::lock_guard lock(mu_);
  table_bar_ = table_bar;
  table_offset_ = table_offset;
  pba_bar_ = pba_bar;
  pba_offset_ = pba_offset;
  return *off;
}

bool MsixTable::ReadBar(int bar, uint64_t offset, std::span<uint8_t> data) {
  if (bar == table_bar_ && offset >= table_offset_ && offset < table_offset_ + table_bytes()) {
    ReadTable(offset - table_offset_, data);
    return true;
  }
  if (bar == pba_bar_ && offset >= pba_offset_ && offset < pba_offset_ + pba_bytes()) {
    ReadPba(offset - pba_offset_, data);
    return true;
  }
  return false;
}

bool MsixTable::WriteBar(int bar, uint64_t offset, std::span<const uint8_t> data) {
  if (bar == table_bar_ && offset >= table_offset_ && offset < table_offset_ + table_bytes()) {
    WriteTable(offset - table_offset_, data);
    return true;
  }
  // The PBA is read-only.
  return bar == pba_bar_ && offset >= pba_offset_ && offset < pba_offset_ + pba_bytes();
}

void MsixTable::ReadTable(uint64_t offset, std::span<uint8_t> data) {
  std::lock_guard lock(mu_);
  for (size_t i = 0; i < data.size(); ++i) {
    uint64_t off = offset + i;
    uint64_t v = off / kMsixEntryBytes;
    data[i] = v < entries_.size() ? EntryByte(entries_[v], off % kMsixEntryBytes) : 0;
  }
}

void MsixTable::WriteTable(uint64_t offset, std::span<const uint8_t> data) {
  std::lock_guard lock(mu_);
  uint64_t first = UINT64_MAX, last = 0;
  for (size_t i = 0; i < data.size(); ++i) {
    uint64_t off = offset + i;
    uint64_t v = off / kMsixEntryBytes;
    if (v >= entries_.size()) continue;
    SetEntryByte(entries_[v], off % kMsixEntryBytes, data[i]);
    first = std::min(first, v);
    last = std::max(last, v);
  }
  if (first != UINT64_MAX)
    ReconcileLocked(static_cast<uint16_t>(first), static_cast<uint16_t>(last + 1));
}

void MsixTable::ReadPba(uint64_t offset, std::span<uint8_t> data) const {
  std::lock_guard lock(mu_);
  for (size_t i = 0; i < data.size(); ++i) {
    uint64_t off = offset + i;
    uint8_t b = 0;
    for (uint64_t bit = 0; bit < 8; ++bit) {
      uint64_t v = off * 8 + bit;
      if (v < entries_.size() && !attached_[v] && events_[v].Pending()) b |= 1u << bit;
    }
    data[i] = b;
  }
}

void MsixTable::SetMessageControl(uint16_t control) {
  std::lock_guard lock(mu_);
  uint16_t c = control & (kMsixControlEnable | kMsixControlFunctionMask);
  if (c == control_) return;
  control_ = c;
  ReconcileLocked(0, num_vectors());
}

uint16_t MsixTable::message_control() const {
  std::lock_guard lock(mu_);
  return control_ | static_cast<uint16_t>(num_vectors() - 1);
}

void MsixTable::Trigger(uint16_t v) const {
  if (v >= events_.size()) return;
  (void)events_[v].Signal(1);
  NoteInterruptRaised();  // a throttled vCPU sleeping outside KVM_RUN must take it now
}

bool MsixTable::DeliverableLocked(uint16_t v) const {
  return (control_ & kMsixControlEnable) && !(control_ & kMsixControlFunctionMask) &&
         !(entries_[v].control & kMsixVectorMasked);
}

void MsixTable::ReconcileLocked(uint16_t first, uint16_t last) {
  std::vector<MsiRoute> routes;
  std::vector<uint16_t> attach;
  for (uint16_t v = first; v < last; ++v) {
    if (DeliverableLocked(v)) {
      MsiRoute r{gsis_[v], entries_[v].address(), entries_[v].data};
      if (!routed_[v] || routed_[v]->address != r.address || routed_[v]->data != r.data)
        routes.push_back(r);
      if (!attached_[v]) attach.push_back(v);
    } else if (attached_[v]) {
      // From now on writes to the eventfd accumulate: the pending bit.
      absl::Status s = router_.DeassignIrqfd(events_[v].fd(), gsis_[v]);
      if (s.ok())
        attached_[v] = false;
      else
        NoteError(s);
    }
  }
  if (!routes.empty()) {
    absl::Status s = router_.SetMsiRoutes(routes);
    if (!s.ok()) {
      NoteError(s);
      return;  // don't attach vectors whose route is stale
    }
    for (const MsiRoute& r : routes)
      for (uint16_t v = first; v < last; ++v)
        if (gsis_[v] == r.gsi) routed_[v] = r;
  }
  for (uint16_t v : attach) {
    // Take the pending count ourselves and re-signal after attaching: the write then goes
    // through KVM's irqfd wakeup, which delivers it and leaves the counter at 0.
    absl::StatusOr<uint64_t> pending = events_[v].Consume();
    absl::Status s = router_.AssignIrqfd(events_[v].fd(), gsis_[v]);
    if (s.ok()) attached_[v] = true;
    else NoteError(s);
    if (pending.ok() && *pending > 0) (void)events_[v].Signal(s.ok() ? 1 : *pending);
  }
}

void MsixTable::NoteError(const absl::Status& s) {
  LOG_WARN_RATELIMITED("MSI-X: %s", s.message());
  if (status_.ok()) status_ = s;
}

bool MsixTable::enabled() const {
  std::lock_guard lock(mu_);
  return control_ & kMsixControlEnable;
}

bool MsixTable::function_masked() const {
  std::lock_guard lock(mu_);
  return control_ & kMsixControlFunctionMask;
}

bool MsixTable::masked(uint16_t v) const {
  std::lock_guard lock(mu_);
  return v >= entries_.size() || !DeliverableLocked(v);
}

bool MsixTable::pending(uint16_t v) const {
  std::lock_guard lock(mu_);
  return v < entries_.size() && !attached_[v] && events_[v].Pending();
}

MsixEntry MsixTable::entry(uint16_t v) const {
  std::lock_guard lock(mu_);
  return entries_.at(v);
}

void MsixTable::Reset() {
  std::lock_guard lock(mu_);
  control_ = 0;
  for (MsixEntry& e : entries_) e = MsixEntry{};
  ReconcileLocked(0, num_vectors());
  for (const EventFd& e : events_) (void)e.Consume();
}

absl::Status MsixTable::status() const {
  std::lock_guard lock(mu_);
  return status_;
}

MsixState MsixTable::SaveState() const {
  std::lock_guard lock(mu_);
  MsixState s;
  s.set_message_control(control_);
  for (uint16_t v = 0; v < num_vectors(); ++v) {
    MsixVectorState* vs = s.add_vectors();
    vs->set_address_lo(entries_[v].address_lo);
    vs->set_address_hi(entries_[v].address_hi);
    vs->set_data(entries_[v].data);
    vs->set_control(entries_[v].control);
    vs->set_pending(!attached_[v] && events_[v].Pending());
  }
  return s;
}

absl::Status MsixTable::RestoreState(const MsixState& s) {
  if (s.vectors_size() != num_vectors())
    return absl::InvalidArgumentError(absl::StrCat("saved MSI-X table has ", s.vectors_size(),
                                                   " vectors, this one ", num_vectors()));
  std::lock_guard lock(mu_);
  control_ = s.message_control() & (kMsixControlEnable | kMsixControlFunctionMask);
  for (uint16_t v = 0; v < num_vectors(); ++v) {
    const MsixVectorState& vs = s.vectors(v);
    entries_[v].address_lo = vs.address_lo() & ~0x3u;
    entries_[v].address_hi = vs.address_hi();
    entries_[v].data = vs.data();
    entries_[v].control = vs.control() & kMsixVectorMasked;
    (void)events_[v].Consume();
    if (vs.pending()) (void)events_[v].Signal(1);
  }
  ReconcileLocked(0, num_vectors());
  return status_;
}

}  // namespace microvmm::pci
