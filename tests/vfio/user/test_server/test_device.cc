#include "tests/vfio/user/test_server/test_device.h"

#include <poll.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <thread>

#include "absl/strings/str_cat.h"
#include "vmm/base/log.h"
#include "vmm/base/status.h"

namespace microvmm::vfio_user::testdev {

namespace {

constexpr uint32_t kNumRegions = 9;  // VFIO_PCI_NUM_REGIONS
constexpr uint32_t kNumIrqs = 5;     // VFIO_PCI_NUM_IRQS
constexpr uint32_t kBlobMagic = 0x54554656;  // "VFUT"
constexpr uint32_t kBlobVersion = 1;
constexpr size_t kMaxDmaMappings = 256;

template <typename T>
void Put(std::vector<uint8_t>& v, const T& x) {
  const auto* p = reinterpret_cast<const uint8_t*>(&x);
  v.insert(v.end(), p, p + sizeof(T));
}

void Put16(uint8_t* p, uint16_t v) { std::memcpy(p, &v, 2); }
void Put32(uint8_t* p, uint32_t v) { std::memcpy(p, &v, 4); }
uint16_t Get16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

}  // namespace

absl::StatusOr<std::unique_ptr<TestDeviceServer>> TestDeviceServer::Create(
    const ServerOptions& options) {
  std::unique_ptr<TestDeviceServer> s(new TestDeviceServer(options));
  absl::Status st = s->Init();
  if (!st.ok()) return st;
  return s;
}

TestDeviceServer::~TestDeviceServer() = default;

absl::Status TestDeviceServer::Init() {
  // BAR0 is backed by a memfd of the whole BAR size; only the scratch page is ever mapped by the
  // client (sparse mmap), the register page stays trapped.
  scratch_fd_.reset(::memfd_create("vfio-user-test-bar0", MFD_CLOEXEC));
  if (!scratch_fd_.valid()) return ErrnoStatus(errno, "memfd_create");
  if (::ftruncate(scratch_fd_.get(), kBar0Size) != 0) return ErrnoStatus(errno, "ftruncate");
  void* p = ::mmap(nullptr, kBar0Size, PROT_READ | PROT_WRITE, MAP_SHARED, scratch_fd_.get(), 0);
  if (p == MAP_FAILED) return ErrnoStatus(errno, "mmap bar0");
  scratch_map_ = ScopedMmap(p, kBar0Size);
  scratch_ = static_cast<uint8_t*>(p) + kScratchOffset;

  // Writable config bits: command register, BAR0/BAR2 address bits, MSI-X enable/function mask.
  wmask_[0x04] = 0x06;  // memory space, bus master
  wmask_[0x05] = 0x04;  // INTx disable
  Put32(&wmask_[0x10], static_cast<uint32_t>(~(kBar0Size - 1)));
  Put32(&wmask_[0x18], static_cast<uint32_t>(~(kBar2Size - 1)));
  wmask_[kMsixCapOffset + 3] = 0xc0;
  ResetDevice();
  return absl::OkStatus();
}

void TestDeviceServer::ResetDevice() {
  std::memset(st_.regs, 0, sizeof(st_.regs));
  completed_ = 0;
  uint8_t* c = st_.config;
  std::memset(c, 0, kConfigSize);
  Put16(c + 0x00, kVendorId);
  Put16(c + 0x02, options_.device_id);
  Put16(c + 0x06, 0x0010);   // status: capability list
  c[0x0b] = 0xff;            // class: unassigned
  Put32(c + 0x10, 0);        // BAR0: 32-bit memory
  Put32(c + 0x18, 0);        // BAR2: 32-bit memory
  c[0x34] = kMsixCapOffset;  // capability pointer
  c[kMsixCapOffset] = 0x11;  // MSI-X
  c[kMsixCapOffset + 1] = 0;
  Put16(c + kMsixCapOffset + 2, kMsixVectors - 1);
  Put32(c + kMsixCapOffset + 4, 0 | 2);                // table: BAR2 offset 0
  Put32(c + kMsixCapOffset + 8, kMsixPbaOffset | 2);   // PBA: BAR2 offset 0x800
  std::memset(st_.msix_table, 0, sizeof(st_.msix_table));
  for (uint32_t v = 0; v < kMsixVectors; ++v) st_.msix_table[v * 16 + 12] = 1;  // masked
  st_.pba = 0;
  std::memset(scratch_, 0, kScratchSize);
  mig_ = vfio::MigState::kRunning;
  mig_out_.clear();
  mig_out_pos_ = 0;
  mig_in_.clear();
}

uint64_t TestDeviceServer::completed_dmas() {
  std::lock_guard<std::mutex> l(mu_);
  return completed_;
}
vfio::MigState TestDeviceServer::mig_state() {
  std::lock_guard<std::mutex> l(mu_);
  return mig_;
}
size_t TestDeviceServer::num_dma_mappings() {
  std::lock_guard<std::mutex> l(mu_);
  return dma_.size();
}

absl::Status TestDeviceServer::Serve(int sock) {
  {
    std::lock_guard<std::mutex> l(mu_);
    version_done_ = false;
    sock_ = sock;
  }
  absl::Status result;
  for (;;) {
    auto m = RecvMessage(sock, -1, sizeof(Header) + options_.max_data_xfer_size + 4096);
    if (!m.ok()) {
      if (!absl::IsUnavailable(m.status()) ||
          m.status().message().find("mid-message") != absl::string_view::npos) {
        LOG_WARN("vfio-user test server: dropping client: %s", m.status().ToString());
        result = m.status();
      }
      break;
    }
    if (m->type() != kFlagTypeCommand) {
      LOG_WARN("vfio-user test server: ignoring unexpected message type %u", m->type());
      continue;
    }
    Reply r;
    bool close_after = false;
    {
      std::lock_guard<std::mutex> l(mu_);
      if (m->hdr.command == kCmdVersion) {
        // Spec: close when the proposed version cannot be supported. A repeated VERSION on an
        // established session only gets an error reply.
        close_after = !version_done_;
        r = HandleVersion(*m);
        close_after = close_after && r.error != 0;
      } else if (!version_done_) {
        r.error = EINVAL;  // VERSION must come first
      } else {
        r = Handle(*m);
      }
    }
    if (close_after) break;
    if (m->hdr.flags & kFlagNoReply) continue;
    Header h{};
    h.msg_id = m->hdr.msg_id;
    h.command = m->hdr.command;
    h.flags = kFlagTypeReply;
    if (r.error != 0) {
      h.flags |= kFlagError;
      h.error = static_cast<uint32_t>(r.error);
      r.payload.clear();  // spec: an error reply is the header only
      r.fds.clear();
    }
    absl::Status s = SendMessage(sock, h, r.payload, r.fds);
    if (!s.ok()) break;
  }
  // Hang up (the caller owns the fd, but the peer must see the connection end now).
  ::shutdown(sock, SHUT_RDWR);
  // Connection resources go with the connection.
  std::lock_guard<std::mutex> l(mu_);
  sock_ = -1;
  dma_.clear();
  for (auto& fd : msix_fds_) fd.reset();
  logging_ = false;
  dirty_.clear();
  return result;
}

TestDeviceServer::Reply TestDeviceServer::HandleVersion(const Message& m) {
  Reply r;
  auto v = ReadAt<VersionPayload>(m.payload, 0);
  if (!v.ok() || !m.fds.empty() || version_done_) {
    r.error = EINVAL;
    return r;
  }
  if (v->major != kVersionMajor) {
    r.error = ENOTSUP;
    return r;
  }
  absl::string_view json(reinterpret_cast<const char*>(m.payload.data()) + 4,
                         m.payload.size() - 4);
  if (!json.empty()) {
    if (json.back() != '\0') {
      r.error = EINVAL;
      return r;
    }
    json.remove_suffix(1);
  }
  auto client_caps = ParseVersionJson(json);
  if (!client_caps.ok()) {
    r.error = EINVAL;
    return r;
  }
  client_max_xfer_ = std::min(client_caps->max_data_xfer_size, options_.max_data_xfer_size);
  VersionCaps caps;
  caps.max_msg_fds = kMsixVectors;
  caps.max_data_xfer_size = options_.max_data_xfer_size;
  caps.migration = options_.migration;
  std::string out = EncodeVersionJson(caps);
  Put(r.payload, VersionPayload{options_.reply_major,
                                std::min<uint16_t>(v->minor, options_.reply_minor)});
  r.payload.insert(r.payload.end(), out.c_str(), out.c_str() + out.size() + 1);
  version_done_ = true;
  return r;
}

TestDeviceServer::Reply TestDeviceServer::Handle(const Message& m) {
  Reply r;
  // Only these commands may carry fds; any other fd is refused (and closed by ScopedFd).
  if (!m.fds.empty() && m.hdr.command != kCmdDmaMap && m.hdr.command != kCmdDeviceSetIrqs) {
    r.error = EINVAL;
    return r;
  }
  switch (m.hdr.command) {
    case kCmdDmaMap: return HandleDmaMap(m);
    case kCmdDmaUnmap: return HandleDmaUnmap(m);
    case kCmdDeviceGetInfo: {
      auto p = ReadAt<DeviceInfoPayload>(m.payload, 0);
      if (!p.ok() || m.payload.size() != sizeof(DeviceInfoPayload) ||
          p->argsz < sizeof(DeviceInfoPayload)) {
        r.error = EINVAL;
        return r;
      }
      Put(r.payload, DeviceInfoPayload{sizeof(DeviceInfoPayload), kDeviceFlagReset | kDeviceFlagPci,
                                       kNumRegions, kNumIrqs});
      return r;
    }
    case kCmdDeviceGetRegionInfo: return HandleRegionInfo(m);
    case kCmdDeviceGetIrqInfo: return HandleIrqInfo(m);
    case kCmdDeviceSetIrqs: return HandleSetIrqs(m);
    case kCmdRegionRead: return HandleRegionAccess(m, false);
    case kCmdRegionWrite: return HandleRegionAccess(m, true);
    case kCmdDeviceReset:
      if (!m.payload.empty()) {
        r.error = EINVAL;
        return r;
      }
      ResetDevice();
      return r;
    case kCmdDeviceFeature: return HandleFeature(m);
    case kCmdMigDataRead: return HandleMigDataRead(m);
    case kCmdMigDataWrite: return HandleMigDataWrite(m);
    default:
      r.error = ENOTSUP;
      return r;
  }
}

TestDeviceServer::Reply TestDeviceServer::HandleDmaMap(const Message& m) {
  Reply r;
  auto p = ReadAt<DmaMapPayload>(m.payload, 0);
  if (!p.ok() || m.payload.size() != sizeof(DmaMapPayload) || p->argsz != sizeof(DmaMapPayload) ||
      p->size == 0 || p->address + p->size < p->address || m.fds.size() > 1 ||
      (p->flags & ~(kDmaFlagRead | kDmaFlagWrite)) != 0 || p->size > (uint64_t{1} << 46)) {
    r.error = EINVAL;
    return r;
  }
  auto it = dma_.lower_bound(p->address);
  if ((it != dma_.end() && it->first < p->address + p->size) ||
      (it != dma_.begin() && std::prev(it)->first + std::prev(it)->second.size > p->address)) {
    r.error = EEXIST;
    return r;
  }
  if (dma_.size() >= kMaxDmaMappings) {
    r.error = ENOSPC;
    return r;
  }
  DmaRegion reg;
  reg.size = p->size;
  reg.flags = p->flags;
  if (!m.fds.empty()) {
    // mmap needs a page-aligned file offset: map from the page below and remember the delta.
    const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
    const uint64_t delta = p->offset % page;
    if (p->offset + p->size < p->offset) {
      r.error = EINVAL;
      return r;
    }
    // A mapping past the end of the file would SIGBUS us on access: refuse it. (A client that
    // shrinks the file afterwards can still do that; real servers seal or catch SIGBUS.)
    struct stat sb;
    if (::fstat(m.fds[0].get(), &sb) != 0 || !S_ISREG(sb.st_mode) ||
        p->offset + p->size > static_cast<uint64_t>(sb.st_size)) {
      r.error = EINVAL;
      return r;
    }
    int prot = ((p->flags & kDmaFlagRead) ? PROT_READ : 0) |
               ((p->flags & kDmaFlagWrite) ? PROT_WRITE : 0);
    void* a = ::mmap(nullptr, p->size + delta, prot, MAP_SHARED, m.fds[0].get(),
                     static_cast<off_t>(p->offset - delta));
    if (a == MAP_FAILED) {
      r.error = errno;
      return r;
    }
    reg.map = ScopedMmap(a, p->size + delta);
    reg.delta = delta;
  }
  dma_.emplace(p->address, std::move(reg));
  return r;
}

TestDeviceServer::Reply TestDeviceServer::HandleDmaUnmap(const Message& m) {
  Reply r;
  auto p = ReadAt<DmaUnmapPayload>(m.payload, 0);
  if (!p.ok() || m.payload.size() != sizeof(DmaUnmapPayload) || p->flags != 0) {
    r.error = EINVAL;
    return r;
  }
  auto it = dma_.find(p->address);
  if (it == dma_.end() || it->second.size != p->size) {
    r.error = ENOENT;
    return r;
  }
  dma_.erase(it);  // DMA is synchronous here, so nothing is in flight
  Put(r.payload, *p);  // spec: the reply echoes the entry
  return r;
}

TestDeviceServer::Reply TestDeviceServer::HandleRegionInfo(const Message& m) {
  Reply r;
  auto p = ReadAt<RegionInfoPayload>(m.payload, 0);
  if (!p.ok() || m.payload.size() != sizeof(RegionInfoPayload) || p->index >= kNumRegions ||
      p->argsz < sizeof(RegionInfoPayload)) {
    r.error = EINVAL;
    return r;
  }
  RegionInfoPayload info{sizeof(RegionInfoPayload), 0, p->index, 0, 0, 0};
  std::vector<uint8_t> caps;
  switch (p->index) {
    case vfio::kBar0RegionIndex: {
      info.size = kBar0Size;
      info.flags = kRegionFlagRead | kRegionFlagWrite | kRegionFlagMmap | kRegionFlagCaps;
      info.cap_offset = sizeof(RegionInfoPayload);
      Put(caps, CapHeader{kCapSparseMmap, 1, 0});
      Put(caps, SparseMmapCap{1, 0});
      Put(caps, SparseMmapArea{kScratchOffset, kScratchSize});
      break;
    }
    case 2:
      info.size = kBar2Size;
      info.flags = kRegionFlagRead | kRegionFlagWrite;
      break;
    case vfio::kConfigRegionIndex:
      info.size = kConfigSize;
      info.flags = kRegionFlagRead | kRegionFlagWrite;
      break;
    default:
      break;  // absent
  }
  info.argsz = static_cast<uint32_t>(sizeof(RegionInfoPayload) + caps.size());
  if (p->argsz < info.argsz) {
    // Too small for the caps: report the size needed, without caps or fd (like VFIO).
    info.flags &= ~kRegionFlagCaps;
    info.cap_offset = 0;
    Put(r.payload, info);
    return r;
  }
  Put(r.payload, info);
  r.payload.insert(r.payload.end(), caps.begin(), caps.end());
  if (info.flags & kRegionFlagMmap) r.fds.push_back(scratch_fd_.get());
  return r;
}

TestDeviceServer::Reply TestDeviceServer::HandleIrqInfo(const Message& m) {
  Reply r;
  auto p = ReadAt<IrqInfoPayload>(m.payload, 0);
  if (!p.ok() || m.payload.size() != sizeof(IrqInfoPayload) || p->index >= kNumIrqs ||
      p->argsz < sizeof(IrqInfoPayload)) {
    r.error = EINVAL;
    return r;
  }
  IrqInfoPayload info{sizeof(IrqInfoPayload), 0, p->index, 0};
  if (p->index == vfio::kMsixIrqIndex) {
    info.count = kMsixVectors;
    info.flags = kIrqInfoEventfd | kIrqInfoNoresize;
  }
  Put(r.payload, info);
  return r;
}

TestDeviceServer::Reply TestDeviceServer::HandleSetIrqs(const Message& m) {
  Reply r;
  r.error = EINVAL;
  auto p = ReadAt<IrqSetPayload>(m.payload, 0);
  if (!p.ok() || p->argsz != m.payload.size()) return r;
  const uint32_t data = p->flags & kIrqSetDataTypeMask;
  const uint32_t action = p->flags & kIrqSetActionTypeMask;
  if ((p->flags & ~(kIrqSetDataTypeMask | kIrqSetActionTypeMask)) != 0 ||
      __builtin_popcount(data) != 1 || __builtin_popcount(action) != 1) {
    return r;
  }
  if (p->index >= kNumIrqs) return r;
  if (p->index != vfio::kMsixIrqIndex) {
    // Only MSI-X is implemented. Disabling an index that has nothing is fine.
    if (data == kIrqSetDataNone && p->count == 0 && m.fds.empty()) r.error = 0;
    return r;
  }
  if (action != kIrqSetActionTrigger) {
    r.error = ENOTSUP;  // MASK/UNMASK actions: the guest masks through the MSI-X table instead
    return r;
  }
  if (p->start > kMsixVectors || p->count > kMsixVectors - p->start) return r;
  const size_t extra = m.payload.size() - sizeof(IrqSetPayload);
  if (data == kIrqSetDataNone) {
    if (extra != 0 || !m.fds.empty()) return r;
    if (p->count == 0) {
      for (auto& fd : msix_fds_) fd.reset();  // disable the whole index
    } else {
      for (uint32_t v = p->start; v < p->start + p->count; ++v) RaiseMsix(v);
    }
  } else if (data == kIrqSetDataBool) {
    if (extra != p->count || !m.fds.empty()) return r;
    for (uint32_t i = 0; i < p->count; ++i) {
      if (m.payload[sizeof(IrqSetPayload) + i]) RaiseMsix(p->start + i);
    }
  } else {  // eventfds: exactly `count` of them, or none to de-assign
    if (extra != 0 || (!m.fds.empty() && m.fds.size() != p->count)) return r;
    for (uint32_t i = 0; i < p->count; ++i) {
      int fd = m.fds.empty() ? -1 : ::fcntl(m.fds[i].get(), F_DUPFD_CLOEXEC, 0);
      msix_fds_[p->start + i].reset(fd);
    }
  }
  r.error = 0;
  return r;
}

TestDeviceServer::Reply TestDeviceServer::HandleRegionAccess(const Message& m, bool write) {
  Reply r;
  auto p = ReadAt<RegionAccessPayload>(m.payload, 0);
  if (!p.ok() || p->count == 0 || p->count > options_.max_data_xfer_size ||
      m.payload.size() != sizeof(RegionAccessPayload) + (write ? p->count : 0)) {
    r.error = EINVAL;
    return r;
  }
  std::vector<uint8_t> buf(p->count);
  if (write) std::memcpy(buf.data(), m.payload.data() + sizeof(RegionAccessPayload), p->count);
  bool ok = false;
  switch (p->region) {
    case vfio::kBar0RegionIndex: ok = Bar0Access(write, p->offset, buf.data(), p->count); break;
    case 2: ok = Bar2Access(write, p->offset, buf.data(), p->count); break;
    case vfio::kConfigRegionIndex: ok = ConfigAccess(write, p->offset, buf.data(), p->count); break;
    default: break;
  }
  if (!ok) {
    r.error = EINVAL;
    return r;
  }
  Put(r.payload, *p);
  if (!write) r.payload.insert(r.payload.end(), buf.begin(), buf.end());
  return r;
}

bool TestDeviceServer::ConfigAccess(bool write, uint64_t off, uint8_t* data, uint32_t n) {
  if (off > kConfigSize || kConfigSize - off < n) return false;
  if (!write) {
    std::memcpy(data, st_.config + off, n);
    return true;
  }
  for (uint32_t i = 0; i < n; ++i) {
    uint8_t& b = st_.config[off + i];
    b = static_cast<uint8_t>((b & ~wmask_[off + i]) | (data[i] & wmask_[off + i]));
  }
  DeliverPending();  // MSI-X enable / function mask may have changed
  return true;
}

bool TestDeviceServer::Bar0Access(bool write, uint64_t off, uint8_t* data, uint32_t n) {
  if (off > kBar0Size || kBar0Size - off < n) return false;
  if (off >= kScratchOffset) {  // the mappable page: same memory the client may mmap
    if (write) {
      std::memcpy(scratch_ + (off - kScratchOffset), data, n);
    } else {
      std::memcpy(data, scratch_ + (off - kScratchOffset), n);
    }
    return true;
  }
  // Registers: naturally aligned 4- or 8-byte accesses only.
  if ((n != 4 && n != 8) || off % n != 0) return false;
  const uint64_t reg = off / 8;
  if (reg >= kNumRegs) {  // unimplemented register space reads as zero, ignores writes
    if (!write) std::memset(data, 0, n);
    return true;
  }
  auto* bytes = reinterpret_cast<uint8_t*>(&st_.regs[reg]) + off % 8;
  if (!write) {
    std::memcpy(data, bytes, n);
    return true;
  }
  if (reg * 8 == kRegStatus || reg * 8 == kRegCompleted) return true;  // read-only
  std::memcpy(bytes, data, n);
  if (reg * 8 == kRegDoorbell) {
    if (Running()) {
      RunDma();
    } else {
      st_.regs[kRegStatus / 8] = kStatusPending;  // runs when the device runs again
    }
    uint64_t delay = options_.allow_reply_delay
                         ? std::min<uint64_t>(st_.regs[kRegReplyDelayMs / 8], 60000)
                         : 0;
    if (delay > 0) {
      // Test hook for client timeouts: the lock is held on purpose, a stuck device is stuck.
      std::this_thread::sleep_for(std::chrono::milliseconds(delay));
    }
  }
  return true;
}

bool TestDeviceServer::Bar2Access(bool write, uint64_t off, uint8_t* data, uint32_t n) {
  if (off > kBar2Size || kBar2Size - off < n) return false;
  if (off + n <= sizeof(st_.msix_table)) {
    if (!write) {
      std::memcpy(data, st_.msix_table + off, n);
    } else {
      std::memcpy(st_.msix_table + off, data, n);
      DeliverPending();  // an unmask delivers what is pending
    }
    return true;
  }
  if (off >= kMsixPbaOffset && off + n <= kMsixPbaOffset + 8) {
    if (!write) std::memcpy(data, reinterpret_cast<uint8_t*>(&st_.pba) + (off - kMsixPbaOffset), n);
    return true;  // PBA is read-only
  }
  if (!write) std::memset(data, 0, n);
  return true;
}

bool TestDeviceServer::Running() const {
  return mig_ == vfio::MigState::kRunning || mig_ == vfio::MigState::kPreCopy;
}

uint8_t* TestDeviceServer::Translate(uint64_t gpa, uint64_t len, bool write) {
  auto it = dma_.upper_bound(gpa);
  if (it == dma_.begin()) return nullptr;
  --it;
  const DmaRegion& reg = it->second;
  const uint64_t off = gpa - it->first;
  if (off >= reg.size || reg.size - off < len || reg.map.get() == nullptr) return nullptr;
  if (write ? !(reg.flags & kDmaFlagWrite) : !(reg.flags & kDmaFlagRead)) return nullptr;
  return static_cast<uint8_t*>(reg.map.get()) + reg.delta + off;
}

void TestDeviceServer::MarkDirty(uint64_t gpa, uint64_t len) {
  if (!logging_ || len == 0) return;
  for (uint64_t pg = gpa / log_page_; pg <= (gpa + len - 1) / log_page_; ++pg) {
    bool tracked = log_ranges_.empty();
    for (const auto& rg : log_ranges_) {
      if (pg * log_page_ < rg.iova + rg.size && (pg + 1) * log_page_ > rg.iova) tracked = true;
    }
    if (tracked) dirty_.insert(pg);
  }
}

bool TestDeviceServer::SocketDmaAllowed(uint64_t gpa, uint64_t len, bool write) {
  auto it = dma_.upper_bound(gpa);
  if (it == dma_.begin()) return false;
  --it;
  const DmaRegion& reg = it->second;
  const uint64_t off = gpa - it->first;
  return reg.map.get() == nullptr && off < reg.size && reg.size - off >= len &&
         (reg.flags & (write ? kDmaFlagWrite : kDmaFlagRead)) && sock_ >= 0;
}

bool TestDeviceServer::SocketDma(bool write, uint64_t gpa, uint8_t* buf, uint64_t len) {
  // The client is blocked waiting for our reply to its doorbell write and serves these meanwhile.
  for (uint64_t done = 0; done < len;) {
    const uint64_t n = std::min<uint64_t>(len - done, client_max_xfer_);
    PayloadBuilder b;
    b.Add(DmaAccessPayload{gpa + done, n});
    if (write) b.AddBytes({buf + done, n});
    Header h{};
    h.msg_id = next_dma_id_++;
    h.command = write ? kCmdDmaWrite : kCmdDmaRead;
    h.flags = kFlagTypeCommand;
    if (!SendMessage(sock_, h, b.span()).ok()) return false;
    auto m = RecvMessage(sock_, 5000, sizeof(Header) + client_max_xfer_ + 4096);
    if (!m.ok() || !m->is_reply() || m->is_error() || m->hdr.msg_id != h.msg_id ||
        m->hdr.command != h.command) {
      return false;
    }
    if (!write) {
      auto acc = ReadAt<DmaAccessPayload>(m->payload, 0);
      if (!acc.ok() || acc->address != gpa + done || acc->count != n ||
          m->payload.size() != sizeof(DmaAccessPayload) + n) {
        return false;
      }
      std::memcpy(buf + done, m->payload.data() + sizeof(DmaAccessPayload), n);
    }
    done += n;
  }
  return true;
}

void TestDeviceServer::RunDma() {
  uint64_t* regs = st_.regs;
  const uint64_t len = regs[kRegLen / 8];
  const uint64_t op = regs[kRegOp / 8];
  const uint64_t src_gpa = regs[kRegSrc / 8], dst_gpa = regs[kRegDst / 8];
  bool ok = false;
  if (len > 0 && len <= kMaxDmaLen && (op == kOpCopy || op == kOpFill)) {
    uint8_t* dst = Translate(dst_gpa, len, /*write=*/true);
    uint8_t* src = op == kOpCopy ? Translate(src_gpa, len, /*write=*/false) : nullptr;
    const bool dst_sock = dst == nullptr && SocketDmaAllowed(dst_gpa, len, true);
    const bool src_sock = op == kOpCopy && src == nullptr && SocketDmaAllowed(src_gpa, len, false);
    if ((dst != nullptr || dst_sock) && (op == kOpFill || src != nullptr || src_sock)) {
      // Stage through a bounce buffer whenever the socket is involved.
      std::vector<uint8_t> bounce;
      const uint8_t* data = src;
      ok = true;
      if (op == kOpFill) {
        bounce.assign(len, static_cast<uint8_t>(regs[kRegPattern / 8]));
        data = bounce.data();
      } else if (src_sock) {
        bounce.resize(len);
        ok = SocketDma(false, src_gpa, bounce.data(), len);
        data = bounce.data();
      }
      if (ok) {
        if (dst_sock) {
          ok = SocketDma(true, dst_gpa, const_cast<uint8_t*>(data), len);
        } else {
          std::memmove(dst, data, len);
        }
      }
    }
  }
  if (ok) {
    MarkDirty(dst_gpa, len);
    regs[kRegCompleted / 8] = ++completed_;
  }
  regs[kRegStatus / 8] = ok ? kStatusDone : kStatusError;
  RaiseMsix(0);
}

bool TestDeviceServer::VectorMasked(uint32_t v) const {
  const uint16_t ctl = Get16(st_.config + kMsixCapOffset + 2);
  return !(ctl & 0x8000) || (ctl & 0x4000) || (st_.msix_table[v * 16 + 12] & 1);
}

void TestDeviceServer::RaiseMsix(uint32_t v) {
  if (v >= kMsixVectors) return;
  if (VectorMasked(v) || !msix_fds_[v].valid()) {
    st_.pba |= uint64_t{1} << v;
    return;
  }
  uint64_t one = 1;
  if (::write(msix_fds_[v].get(), &one, sizeof(one)) != sizeof(one)) {
    LOG_WARN_RATELIMITED("vfio-user test server: eventfd write failed: %s", strerror(errno));
  }
}

void TestDeviceServer::DeliverPending() {
  for (uint32_t v = 0; v < kMsixVectors; ++v) {
    if ((st_.pba & (uint64_t{1} << v)) && !VectorMasked(v) && msix_fds_[v].valid()) {
      st_.pba &= ~(uint64_t{1} << v);
      RaiseMsix(v);
    }
  }
}

// ---- Migration ----

TestDeviceServer::Reply TestDeviceServer::HandleFeature(const Message& m) {
  Reply r;
  auto p = ReadAt<FeaturePayload>(m.payload, 0);
  if (!p.ok()) {
    r.error = EINVAL;
    return r;
  }
  const uint32_t feature = p->flags & kFeatureMaskIndex;
  const bool get = p->flags & kFeatureGet, set = p->flags & kFeatureSet,
             probe = p->flags & kFeatureProbe;
  if ((p->flags & ~(kFeatureMaskIndex | kFeatureGet | kFeatureSet | kFeatureProbe)) != 0 ||
      (get && set && !probe) || (!get && !set && !probe)) {
    r.error = EINVAL;
    return r;
  }
  std::span<const uint8_t> data(m.payload.data() + sizeof(FeaturePayload),
                                m.payload.size() - sizeof(FeaturePayload));
  bool can_get = false, can_set = false;
  switch (feature) {
    case kFeatureMigration: can_get = options_.migration; break;
    case kFeatureMigDeviceState: can_get = can_set = options_.migration; break;
    case kFeatureDmaLoggingStart:
    case kFeatureDmaLoggingStop: can_set = options_.dma_logging; break;
    case kFeatureDmaLoggingReport: can_get = options_.dma_logging; break;
    default: break;
  }
  if ((get && !can_get) || (set && !can_set) || (!can_get && !can_set)) {
    r.error = ENOTTY;  // what VFIO returns for an unsupported feature
    return r;
  }
  auto reply_with = [&](std::span<const uint8_t> out) {
    const size_t total = sizeof(FeaturePayload) + out.size();
    if (p->argsz < total) {
      r.error = EINVAL;  // the client did not leave room for the reply
      return r;
    }
    Put(r.payload, FeaturePayload{static_cast<uint32_t>(total), p->flags});
    r.payload.insert(r.payload.end(), out.begin(), out.end());
    return r;
  };
  if (probe) return reply_with({});
  switch (feature) {
    case kFeatureMigration: {
      uint64_t f = kMigrationStopCopy | kMigrationPreCopy;
      return reply_with({reinterpret_cast<uint8_t*>(&f), sizeof(f)});
    }
    case kFeatureMigDeviceState: {
      if (set) {
        auto d = ReadAt<MigDeviceStateData>(data, 0);
        if (!d.ok() || data.size() != sizeof(MigDeviceStateData)) {
          r.error = EINVAL;
          return r;
        }
        int err = SetMigState(static_cast<vfio::MigState>(d->device_state));
        if (err != 0) {
          r.error = err;
          return r;
        }
      }
      MigDeviceStateData out{static_cast<uint32_t>(mig_), 0};
      return reply_with({reinterpret_cast<uint8_t*>(&out), sizeof(out)});
    }
    case kFeatureDmaLoggingStart: {
      auto c = ReadAt<DmaLoggingControl>(data, 0);
      if (!c.ok() || logging_ || c->page_size < 512 || c->page_size > (1u << 30) ||
          (c->page_size & (c->page_size - 1)) != 0 || c->num_ranges > 1024 ||
          data.size() != sizeof(DmaLoggingControl) + c->num_ranges * sizeof(DmaLoggingRange)) {
        r.error = EINVAL;
        return r;
      }
      log_ranges_.clear();
      for (uint32_t i = 0; i < c->num_ranges; ++i) {
        auto rg = *ReadAt<DmaLoggingRange>(data, sizeof(DmaLoggingControl) + i * sizeof(DmaLoggingRange));
        if (rg.length == 0 || rg.iova + rg.length < rg.iova) {
          r.error = EINVAL;
          return r;
        }
        log_ranges_.push_back({rg.iova, rg.length});
      }
      log_page_ = c->page_size;
      dirty_.clear();
      logging_ = true;
      return reply_with(data);
    }
    case kFeatureDmaLoggingStop:
      if (!logging_) {
        r.error = EINVAL;
        return r;
      }
      logging_ = false;
      dirty_.clear();
      return reply_with({});
    case kFeatureDmaLoggingReport: {
      auto rep = ReadAt<DmaLoggingReport>(data, 0);
      if (!rep.ok() || !logging_ || data.size() != sizeof(DmaLoggingReport) ||
          rep->page_size < 512 || (rep->page_size & (rep->page_size - 1)) != 0 ||
          rep->length == 0 || rep->iova + rep->length < rep->iova) {
        r.error = EINVAL;
        return r;
      }
      const uint64_t pages = (rep->length + rep->page_size - 1) / rep->page_size;
      const uint64_t words = (pages + 63) / 64;
      if (words * 8 + 64 > options_.max_data_xfer_size) {
        r.error = E2BIG;
        return r;
      }
      std::vector<uint8_t> out(sizeof(DmaLoggingReport) + words * 8, 0);
      std::memcpy(out.data(), &*rep, sizeof(DmaLoggingReport));
      auto* bits = out.data() + sizeof(DmaLoggingReport);
      const uint64_t end = rep->iova + rep->length;
      // Logged pages overlapping the range, re-expressed in the report's page size; reported
      // pages are cleared.
      auto it = dirty_.lower_bound(rep->iova / log_page_);
      while (it != dirty_.end() && *it * log_page_ < end) {
        const uint64_t lo = std::max(*it * log_page_, rep->iova);
        const uint64_t hi = std::min((*it + 1) * log_page_, end);
        if (lo < hi) {
          for (uint64_t b = (lo - rep->iova) / rep->page_size;
               b <= (hi - 1 - rep->iova) / rep->page_size; ++b) {
            bits[b / 8] |= static_cast<uint8_t>(1u << (b % 8));
          }
        }
        it = dirty_.erase(it);
      }
      return reply_with(out);
    }
  }
  r.error = ENOTTY;
  return r;
}

int TestDeviceServer::SetMigState(vfio::MigState to) {
  using S = vfio::MigState;
  const S from = mig_;
  // Direct arcs of the v2 FSM without P2P (vfio-user spec "Direct State Transitions").
  auto arc = [&](S a, S b) { return from == a && to == b; };
  if (arc(S::kRunning, S::kStop) || arc(S::kStopCopy, S::kStop)) {
    mig_out_.clear();
    mig_out_pos_ = 0;
  } else if (arc(S::kResuming, S::kStop)) {
    // The stream must start with the pre-copy part, byte for byte, then the state.
    const std::vector<uint8_t> pre = PrecopyPart();
    if (mig_in_.size() < pre.size() || !std::equal(pre.begin(), pre.end(), mig_in_.begin())) {
      mig_in_.clear();
      return EINVAL;
    }
    mig_in_.erase(mig_in_.begin(), mig_in_.begin() + pre.size());
    if (!LoadBlob(mig_in_)) {
      mig_in_.clear();
      return EINVAL;  // stay in RESUMING: the client may retry with a correct stream
    }
    mig_in_.clear();
  } else if (arc(S::kPreCopy, S::kRunning)) {
    mig_out_.clear();
    mig_out_pos_ = 0;
  } else if (arc(S::kStop, S::kRunning)) {
  } else if (arc(S::kRunning, S::kPreCopy)) {
    // The pre-copy part of the stream (options_.precopy_bytes of a fixed pattern; none by
    // default: reads return 0, nothing now).
    mig_out_ = PrecopyPart();
    mig_out_pos_ = 0;
  } else if (arc(S::kPreCopy, S::kStopCopy)) {
    // Whatever pre-copy data was not read yet, then the final state.
    mig_out_.erase(mig_out_.begin(), mig_out_.begin() + mig_out_pos_);
    std::vector<uint8_t> b = SaveBlob();
    mig_out_.insert(mig_out_.end(), b.begin(), b.end());
    mig_out_pos_ = 0;
  } else if (arc(S::kStop, S::kStopCopy)) {
    mig_out_ = PrecopyPart();  // no pre-copy phase: the whole stream now
    std::vector<uint8_t> b = SaveBlob();  // the device is stopped: this is its final state
    mig_out_.insert(mig_out_.end(), b.begin(), b.end());
    mig_out_pos_ = 0;
  } else if (arc(S::kStop, S::kResuming)) {
    mig_in_.clear();
  } else {
    return EINVAL;
  }
  mig_ = to;
  if (Running() && st_.regs[kRegStatus / 8] == kStatusPending) RunDma();
  return 0;
}

std::vector<uint8_t> TestDeviceServer::PrecopyPart() const {
  std::vector<uint8_t> b(options_.precopy_bytes);
  for (size_t i = 0; i < b.size(); ++i) b[i] = static_cast<uint8_t>(i * 131 + (i >> 12) + 7);
  return b;
}

std::vector<uint8_t> TestDeviceServer::SaveBlob() {
  std::memcpy(st_.scratch, scratch_, kScratchSize);
  std::vector<uint8_t> b;
  Put(b, kBlobMagic);
  Put(b, kBlobVersion);
  Put(b, completed_);
  Put(b, st_);
  return b;
}

bool TestDeviceServer::LoadBlob(const std::vector<uint8_t>& b) {
  const size_t want = 4 + 4 + 8 + sizeof(State);
  if (b.size() != want) return false;
  uint32_t magic, version;
  uint64_t completed;
  std::memcpy(&magic, b.data(), 4);
  std::memcpy(&version, b.data() + 4, 4);
  std::memcpy(&completed, b.data() + 8, 8);
  if (magic != kBlobMagic || version != kBlobVersion) return false;
  State s;
  std::memcpy(&s, b.data() + 16, sizeof(State));
  if (s.regs[kRegStatus / 8] > kStatusPending || s.regs[kRegCompleted / 8] != completed ||
      Get16(s.config) != kVendorId || Get16(s.config + 2) != options_.device_id) {
    return false;
  }
  st_ = s;
  completed_ = completed;
  std::memcpy(scratch_, st_.scratch, kScratchSize);
  return true;
}

TestDeviceServer::Reply TestDeviceServer::HandleMigDataRead(const Message& m) {
  Reply r;
  auto p = ReadAt<MigDataPayload>(m.payload, 0);
  if (!p.ok() || m.payload.size() != sizeof(MigDataPayload) ||
      p->size > options_.max_data_xfer_size || p->argsz < sizeof(MigDataPayload) + p->size ||
      (mig_ != vfio::MigState::kPreCopy && mig_ != vfio::MigState::kStopCopy)) {
    r.error = EINVAL;
    return r;
  }
  const size_t n = std::min<size_t>(p->size, mig_out_.size() - mig_out_pos_);
  Put(r.payload, MigDataPayload{static_cast<uint32_t>(sizeof(MigDataPayload) + n),
                                static_cast<uint32_t>(n)});
  r.payload.insert(r.payload.end(), mig_out_.begin() + mig_out_pos_,
                   mig_out_.begin() + mig_out_pos_ + n);
  mig_out_pos_ += n;
  return r;
}

TestDeviceServer::Reply TestDeviceServer::HandleMigDataWrite(const Message& m) {
  Reply r;
  auto p = ReadAt<MigDataPayload>(m.payload, 0);
  const size_t max_blob = options_.precopy_bytes + 16 + sizeof(State);
  if (!p.ok() || mig_ != vfio::MigState::kResuming ||
      m.payload.size() != sizeof(MigDataPayload) + p->size) {
    r.error = EINVAL;
    return r;
  }
  if (mig_in_.size() + p->size > max_blob) {
    r.error = EFBIG;  // bounded: more than a device state can be
    return r;
  }
  mig_in_.insert(mig_in_.end(), m.payload.begin() + sizeof(MigDataPayload), m.payload.end());
  return r;
}

// ---- Listening ----

absl::Status TestDeviceServer::ListenAndServe(const std::string& path, void (*on_ready)()) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof(addr.sun_path)) return absl::InvalidArgumentError("path too long");
  std::memcpy(addr.sun_path, path.data(), path.size());
  listen_fd_.reset(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!listen_fd_.valid()) return ErrnoStatus(errno, "socket");
  ::unlink(path.c_str());
  if (::bind(listen_fd_.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    return ErrnoStatus(errno, absl::StrCat("bind ", path));
  }
  if (::listen(listen_fd_.get(), 4) != 0) return ErrnoStatus(errno, "listen");
  if (on_ready) on_ready();
  while (!stop_) {
    pollfd p{listen_fd_.get(), POLLIN, 0};
    int r = ::poll(&p, 1, 100);
    if (r <= 0) continue;
    ScopedFd conn(::accept4(listen_fd_.get(), nullptr, nullptr, SOCK_CLOEXEC));
    if (!conn.valid()) continue;
    absl::Status s = Serve(conn.get());
    if (!s.ok()) LOG_INFO("vfio-user test server: client session ended: %s", s.ToString());
  }
  ::unlink(path.c_str());
  return absl::OkStatus();
}

void TestDeviceServer::Stop() { stop_ = true; }

}  // namespace microvmm::vfio_user::testdev
