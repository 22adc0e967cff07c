#include "devices/vfio/user/client.h"

#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <algorithm>
#include <chrono>
#include <cerrno>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "vmm/base/log.h"
#include "vmm/base/status.h"

namespace microvmm::vfio_user {

namespace {

constexpr uint32_t kNumPciRegions = 9;  // VFIO_PCI_NUM_REGIONS
// Region info replies larger than this (caps included) are refused.
constexpr uint32_t kMaxRegionInfoSize = 64 * 1024;

absl::Status Prefixed(const std::string& name, const absl::Status& s) {
  return absl::Status(s.code(), absl::StrCat(name, ": ", s.message()));
}

}  // namespace

absl::StatusOr<std::unique_ptr<VfioUserDevice>> VfioUserDevice::Connect(
    const std::string& socket_path, const ClientOptions& options) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (socket_path.empty() || socket_path.size() >= sizeof(addr.sun_path)) {
    return absl::InvalidArgumentError(
        absl::StrCat("vfio-user: socket path empty or too long: ", socket_path));
  }
  std::memcpy(addr.sun_path, socket_path.data(), socket_path.size());
  ScopedFd sock(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!sock.valid()) return ErrnoStatus(errno, "vfio-user: socket");
  int r;
  do {
    r = ::connect(sock.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  } while (r < 0 && errno == EINTR);
  if (r < 0) {
    int err = errno;
    if (err == ENOENT) {
      return absl::NotFoundError(absl::StrCat("vfio-user: no such socket: ", socket_path));
    }
    if (err == ECONNREFUSED) {
      return absl::UnavailableError(
          absl::StrCat("vfio-user: connection refused (no server listening): ", socket_path));
    }
    return ErrnoStatus(err, absl::StrCat("vfio-user: connect ", socket_path));
  }
  return FromSocket(std::move(sock), absl::StrCat("vfio-user:", socket_path), options);
}

absl::StatusOr<std::unique_ptr<VfioUserDevice>> VfioUserDevice::FromSocket(
    ScopedFd sock, std::string name, const ClientOptions& options) {
  if (options.max_data_xfer_size < 512 || options.max_data_xfer_size > kDefaultMaxDataXfer) {
    return absl::InvalidArgumentError("vfio-user: max_data_xfer_size must be in [512, 1 MiB]");
  }
  std::unique_ptr<VfioUserDevice> dev(new VfioUserDevice(std::move(sock), std::move(name), options));
  absl::Status s = dev->Handshake();
  if (!s.ok()) return s;
  return dev;
}

absl::Status VfioUserDevice::Broken(absl::Status s) {
  broken_ = true;
  return Prefixed(name_, s);
}

absl::Status VfioUserDevice::Handshake() {
  VersionCaps ours;
  ours.max_msg_fds = kMaxFdsPerMessage;
  ours.max_data_xfer_size = options_.max_data_xfer_size;
  ours.migration = true;
  std::string json = EncodeVersionJson(ours);
  PayloadBuilder b;
  b.Add(VersionPayload{kVersionMajor, kVersionMinor});
  b.AddBytes({reinterpret_cast<const uint8_t*>(json.c_str()), json.size() + 1});  // with NUL
  auto reply = Request(kCmdVersion, b.span());
  if (!reply.ok()) {
    if (absl::IsUnavailable(reply.status()) && broken_) {
      // The spec has the server close the connection when it cannot support our version.
      return absl::FailedPreconditionError(absl::StrCat(
          name_, ": vfio-user: server closed the connection during version negotiation"));
    }
    if (!broken_) {  // an error reply: the server refused the session
      broken_ = true;
      return absl::FailedPreconditionError(
          absl::StrCat("version negotiation refused: ", reply.status().message()));
    }
    return reply.status();
  }
  auto v = ReadAt<VersionPayload>(reply->payload, 0);
  if (!v.ok()) return Broken(v.status());
  if (v->major != kVersionMajor || v->minor > kVersionMinor) {
    broken_ = true;
    return absl::FailedPreconditionError(
        absl::StrFormat("%s: vfio-user: version mismatch: we proposed %u.%u, server replied %u.%u",
                        name_, kVersionMajor, kVersionMinor, v->major, v->minor));
  }
  absl::string_view rest(reinterpret_cast<const char*>(reply->payload.data()) + 4,
                         reply->payload.size() - 4);
  if (!rest.empty()) {
    if (rest.back() != '\0') {
      return Broken(absl::DataLossError("vfio-user: version JSON not NUL-terminated"));
    }
    rest.remove_suffix(1);
  }
  auto caps = ParseVersionJson(rest);
  if (!caps.ok()) return Broken(caps.status());
  server_caps_ = *caps;
  max_xfer_ = std::min(options_.max_data_xfer_size, server_caps_.max_data_xfer_size);
  return absl::OkStatus();
}

absl::StatusOr<Message> VfioUserDevice::Request(uint16_t command, std::span<const uint8_t> payload,
                                                std::span<const int> fds) {
  std::lock_guard<std::mutex> lock(mu_);
  return RequestLocked(command, payload, fds);
}

absl::StatusOr<Message> VfioUserDevice::RequestLocked(uint16_t command,
                                                      std::span<const uint8_t> payload,
                                                      std::span<const int> fds) {
  if (broken_) {
    return absl::UnavailableError(
        absl::StrCat(name_, ": vfio-user connection is broken (earlier error); reconnect"));
  }
  if (fds.size() > server_caps_.max_msg_fds) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: %u fds exceed the server's max_msg_fds %u", name_, fds.size(),
        server_caps_.max_msg_fds));
  }
  uint16_t id = next_id_++;
  Header hdr{};
  hdr.msg_id = id;
  hdr.command = command;
  hdr.flags = kFlagTypeCommand;
  absl::Status s = SendMessage(sock_.get(), hdr, payload, fds);
  if (!s.ok()) return Broken(s);
  // One deadline for the whole exchange, so a server that keeps sending its own commands
  // cannot hold us forever.
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::milliseconds(std::max(options_.reply_timeout_ms, 0));
  for (;;) {
    int wait_ms = -1;
    if (options_.reply_timeout_ms >= 0) {
      wait_ms = static_cast<int>(std::max<int64_t>(
          0, std::chrono::duration_cast<std::chrono::milliseconds>(
                 deadline - std::chrono::steady_clock::now())
                 .count()));
    }
    auto m = RecvMessage(sock_.get(), wait_ms);
    if (!m.ok()) {
      if (absl::IsDeadlineExceeded(m.status())) {
        return Broken(absl::DeadlineExceededError(absl::StrFormat(
            "vfio-user: no reply to %s within %d ms", CommandName(command),
            options_.reply_timeout_ms)));
      }
      if (absl::IsUnavailable(m.status())) {
        return Broken(absl::UnavailableError(absl::StrCat(
            "vfio-user: server closed the connection while we waited for the reply to ",
            CommandName(command))));
      }
      return Broken(m.status());
    }
    if (!m->is_reply()) {
      if (m->type() != kFlagTypeCommand) {
        return Broken(absl::DataLossError(
            absl::StrFormat("vfio-user: message with unknown type %u", m->type())));
      }
      s = ServeServerCommand(*m);
      if (!s.ok()) return Broken(s);
      continue;
    }
    if (m->hdr.msg_id != id || m->hdr.command != command) {
      return Broken(absl::DataLossError(absl::StrFormat(
          "vfio-user: unexpected reply (id %u command %s) while waiting for id %u command %s",
          m->hdr.msg_id, CommandName(m->hdr.command), id, CommandName(command))));
    }
    if (!m->fds.empty() && command != kCmdDeviceGetRegionInfo) {
      // Only region info replies may carry an fd; the rest are closed by ScopedFd.
      return Broken(absl::DataLossError(absl::StrFormat(
          "vfio-user: unexpected file descriptors in the reply to %s", CommandName(command))));
    }
    if (m->is_error()) {
      int err = m->hdr.error != 0 ? static_cast<int>(m->hdr.error) : EIO;
      if (err < 0 || err > 4095) err = EIO;
      absl::Status e = ErrnoStatus(err, absl::StrCat("vfio-user: server failed ",
                                                     CommandName(command)));
      if (err == ENOTTY || err == ENOTSUP || err == ENOSYS) {
        e = absl::UnimplementedError(e.message());  // what VFIO says for "no such feature"
      }
      return Prefixed(name_, e);
    }
    return std::move(*m);
  }
}

absl::Status VfioUserDevice::ServeServerCommand(const Message& m) {
  // Server-initiated DMA over the socket, only for mappings without a shared fd.
  Header reply{};
  reply.msg_id = m.hdr.msg_id;
  reply.command = m.hdr.command;
  reply.flags = kFlagTypeReply;
  auto fail = [&](int err) {
    reply.flags |= kFlagError;
    reply.error = static_cast<uint32_t>(err);
    return (m.hdr.flags & kFlagNoReply) ? absl::OkStatus()
                                        : SendMessage(sock_.get(), reply, {});
  };
  if (!m.fds.empty()) return fail(EINVAL);
  if (m.hdr.command != kCmdDmaRead && m.hdr.command != kCmdDmaWrite) {
    LOG_WARN_RATELIMITED("%s: server sent unsupported command %u", name_, m.hdr.command);
    return fail(ENOTSUP);
  }
  auto acc = ReadAt<DmaAccessPayload>(m.payload, 0);
  if (!acc.ok()) return fail(EINVAL);
  const bool write = m.hdr.command == kCmdDmaWrite;
  const uint64_t count = acc->count;
  if (count == 0 || count > max_xfer_ ||
      (write && m.payload.size() != sizeof(DmaAccessPayload) + count) ||
      (!write && m.payload.size() != sizeof(DmaAccessPayload))) {
    return fail(EINVAL);
  }
  auto it = dma_.upper_bound(acc->address);
  if (it == dma_.begin()) return fail(EFAULT);
  --it;
  const uint64_t off = acc->address - it->first;
  if (off >= it->second.size || it->second.size - off < count || it->second.shared_fd ||
      it->second.vaddr == nullptr || (write && !it->second.writable)) {
    return fail(EFAULT);
  }
  PayloadBuilder b;
  if (write) {
    std::memcpy(it->second.vaddr + off, m.payload.data() + sizeof(DmaAccessPayload), count);
    b.Add(acc->address).Add(static_cast<uint32_t>(count));  // reply count is 4 bytes (spec)
  } else {
    b.Add(*acc).AddBytes({it->second.vaddr + off, count});
  }
  if (m.hdr.flags & kFlagNoReply) return absl::OkStatus();
  return SendMessage(sock_.get(), reply, b.span());
}

absl::StatusOr<vfio::DeviceInfo> VfioUserDevice::GetInfo() {
  DeviceInfoPayload req{sizeof(DeviceInfoPayload), 0, 0, 0};
  auto m = Request(kCmdDeviceGetInfo, {reinterpret_cast<uint8_t*>(&req), sizeof(req)});
  if (!m.ok()) return m.status();
  auto p = ReadAt<DeviceInfoPayload>(m->payload, 0);
  if (!p.ok()) return Prefixed(name_, p.status());
  if (p->num_regions > 64 || p->num_irqs > 64) {
    return Prefixed(name_, absl::DataLossError("vfio-user: implausible region/irq count"));
  }
  vfio::DeviceInfo info;
  info.num_regions = p->num_regions;
  info.num_irqs = p->num_irqs;
  info.is_pci = (p->flags & kDeviceFlagPci) != 0;
  info.can_reset = (p->flags & kDeviceFlagReset) != 0;
  return info;
}

absl::StatusOr<vfio::RegionInfo> VfioUserDevice::GetRegionInfo(uint32_t index) {
  std::lock_guard<std::mutex> lock(mu_);
  uint32_t argsz = sizeof(RegionInfoPayload) + 1024;
  for (int attempt = 0; attempt < 2; ++attempt) {
    RegionInfoPayload req{argsz, 0, index, 0, 0, 0};
    auto m = RequestLocked(kCmdDeviceGetRegionInfo, {reinterpret_cast<uint8_t*>(&req), sizeof(req)},
                           {});
    if (!m.ok()) return m.status();
    auto bad = [&](absl::string_view why) {
      return Prefixed(name_, absl::DataLossError(
                                 absl::StrFormat("vfio-user: region %u info: %s", index, why)));
    };
    auto p = ReadAt<RegionInfoPayload>(m->payload, 0);
    if (!p.ok()) return bad("reply too short");
    if (p->index != index) return bad("wrong index in reply");
    if (p->argsz > m->payload.size()) {
      // Spec: argsz in the reply is the size needed; retry once with that much room.
      if (p->argsz > kMaxRegionInfoSize || attempt > 0) return bad("reply too large");
      argsz = p->argsz;
      continue;
    }
    vfio::RegionInfo info;
    info.index = index;
    info.size = p->size;
    info.readable = p->flags & kRegionFlagRead;
    info.writable = p->flags & kRegionFlagWrite;
    info.mappable = p->flags & kRegionFlagMmap;
    if (info.mappable && m->fds.size() != 1) return bad("mappable region without exactly one fd");
    if (!info.mappable && !m->fds.empty()) return bad("fd for a region that is not mappable");
    if (p->size != 0 && p->offset + p->size < p->offset) return bad("offset overflows");
    const std::span<const uint8_t> pl(m->payload.data(), p->argsz);
    if (p->flags & kRegionFlagCaps) {
      uint32_t off = p->cap_offset;
      // Walk the chain; each `next` must move forward, which bounds the walk.
      for (int n = 0; off != 0; ++n) {
        if (n > 16 || off < sizeof(RegionInfoPayload) || off % 4 != 0) return bad("bad cap chain");
        auto ch = ReadAt<CapHeader>(pl, off);
        if (!ch.ok()) return bad("cap header out of bounds");
        if (ch->id == kCapSparseMmap) {
          auto sp = ReadAt<SparseMmapCap>(pl, off + sizeof(CapHeader));
          if (!sp.ok()) return bad("sparse mmap cap out of bounds");
          size_t areas_at = off + sizeof(CapHeader) + sizeof(SparseMmapCap);
          if (sp->nr_areas > (pl.size() - std::min(pl.size(), areas_at)) / sizeof(SparseMmapArea)) {
            return bad("sparse mmap areas out of bounds");
          }
          for (uint32_t i = 0; i < sp->nr_areas; ++i) {
            auto a = *ReadAt<SparseMmapArea>(pl, areas_at + i * sizeof(SparseMmapArea));
            if (a.size == 0) continue;
            if (a.offset > p->size || p->size - a.offset < a.size) {
              return bad("sparse mmap area outside the region");
            }
            info.mmap_areas.push_back({a.offset, a.size});
          }
          if (info.mmap_areas.empty()) info.mappable = false;  // sparse with no areas: none
        }
        if (ch->next != 0 && ch->next <= off) return bad("cap chain goes backwards");
        off = ch->next;
      }
    }
    regions_[index] = info;
    if (p->flags & kRegionFlagMmap) {
      region_fds_[index] = {std::move(m->fds[0]), p->offset};
    } else {
      region_fds_.erase(index);
    }
    return info;
  }
  return Prefixed(name_, absl::DataLossError("vfio-user: region info size keeps growing"));
}

absl::StatusOr<vfio::IrqInfo> VfioUserDevice::GetIrqInfo(uint32_t index) {
  IrqInfoPayload req{sizeof(IrqInfoPayload), 0, index, 0};
  auto m = Request(kCmdDeviceGetIrqInfo, {reinterpret_cast<uint8_t*>(&req), sizeof(req)});
  if (!m.ok()) return m.status();
  auto p = ReadAt<IrqInfoPayload>(m->payload, 0);
  if (!p.ok()) return Prefixed(name_, p.status());
  if (p->index != index) {
    return Prefixed(name_, absl::DataLossError("vfio-user: irq info for the wrong index"));
  }
  if (p->count > 2048) {  // MSI-X maximum
    return Prefixed(name_, absl::DataLossError("vfio-user: implausible irq count"));
  }
  vfio::IrqInfo info;
  info.index = index;
  info.count = p->count;
  info.eventfd = p->flags & kIrqInfoEventfd;
  info.maskable = p->flags & kIrqInfoMaskable;
  info.automasked = p->flags & kIrqInfoAutomasked;
  return info;
}

absl::Status VfioUserDevice::RegionAccess(bool write, uint32_t index, uint64_t offset,
                                          uint8_t* data, uint32_t count) {
  PayloadBuilder b;
  b.Add(RegionAccessPayload{offset, index, count});
  if (write) b.AddBytes({data, count});
  auto m = Request(write ? kCmdRegionWrite : kCmdRegionRead, b.span());
  if (!m.ok()) return m.status();
  auto p = ReadAt<RegionAccessPayload>(m->payload, 0);
  const size_t want = sizeof(RegionAccessPayload) + (write ? 0 : count);
  if (!p.ok() || p->offset != offset || p->region != index || m->payload.size() != want) {
    return Prefixed(name_, absl::DataLossError("vfio-user: malformed region access reply"));
  }
  if (p->count != count) {
    return Prefixed(name_, absl::DataLossError(absl::StrFormat(
                               "vfio-user: short region %s (%u of %u bytes)",
                               write ? "write" : "read", p->count, count)));
  }
  if (!write) std::memcpy(data, m->payload.data() + sizeof(RegionAccessPayload), count);
  return absl::OkStatus();
}

absl::Status VfioUserDevice::RegionRead(uint32_t index, uint64_t offset, std::span<uint8_t> data) {
  for (size_t done = 0; done < data.size();) {
    uint32_t n = static_cast<uint32_t>(std::min<size_t>(data.size() - done, max_xfer_));
    absl::Status s = RegionAccess(false, index, offset + done, data.data() + done, n);
    if (!s.ok()) return s;
    done += n;
  }
  return absl::OkStatus();
}

absl::Status VfioUserDevice::RegionWrite(uint32_t index, uint64_t offset,
                                         std::span<const uint8_t> data) {
  for (size_t done = 0; done < data.size();) {
    uint32_t n = static_cast<uint32_t>(std::min<size_t>(data.size() - done, max_xfer_));
    absl::Status s = RegionAccess(true, index, offset + done,
                                  const_cast<uint8_t*>(data.data()) + done, n);
    if (!s.ok()) return s;
    done += n;
  }
  return absl::OkStatus();
}

absl::StatusOr<ScopedMmap> VfioUserDevice::MapRegion(uint32_t index, uint64_t offset,
                                                     uint64_t size) {
  std::lock_guard<std::mutex> lock(mu_);
  auto r = regions_.find(index);
  auto f = region_fds_.find(index);
  if (r == regions_.end() || f == region_fds_.end() || !r->second.mappable) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "%s: region %u is not mappable (call GetRegionInfo first)", name_, index));
  }
  const vfio::RegionInfo& info = r->second;
  if (size == 0 || offset > info.size || info.size - offset < size) {
    return absl::OutOfRangeError(absl::StrFormat("%s: map [%#x, +%#x) outside region %u", name_,
                                                 offset, size, index));
  }
  bool inside = info.mmap_areas.empty();
  for (const auto& a : info.mmap_areas) {
    if (offset >= a.offset && offset - a.offset <= a.size && a.size - (offset - a.offset) >= size) {
      inside = true;
    }
  }
  if (!inside) {
    return absl::OutOfRangeError(absl::StrFormat("%s: map [%#x, +%#x) not inside an mmap area",
                                                 name_, offset, size));
  }
  int prot = (info.readable ? PROT_READ : 0) | (info.writable ? PROT_WRITE : 0);
  void* p = ::mmap(nullptr, size, prot, MAP_SHARED, f->second.first.get(),
                   static_cast<off_t>(f->second.second + offset));
  if (p == MAP_FAILED) return ErrnoStatus(errno, absl::StrCat(name_, ": mmap region"));
  return ScopedMmap(p, size);
}

absl::Status VfioUserDevice::SetIrqs(uint32_t index, uint32_t start, std::span<const int> fds) {
  if (fds.empty()) {  // spec: DATA_NONE | TRIGGER with start = count = 0 disables the index
    IrqSetPayload req{sizeof(IrqSetPayload), kIrqSetDataNone | kIrqSetActionTrigger, index, 0, 0};
    return Request(kCmdDeviceSetIrqs, {reinterpret_cast<uint8_t*>(&req), sizeof(req)}).status();
  }
  // Each message carries one contiguous run of valid fds, or a run of -1 (disconnect: DATA_EVENTFD
  // with no fds attached de-assigns those vectors).
  size_t i = 0;
  while (i < fds.size()) {
    const bool disconnect = fds[i] < 0;
    size_t j = i;
    while (j < fds.size() && (fds[j] < 0) == disconnect &&
           (disconnect || j - i < server_caps_.max_msg_fds)) {
      ++j;
    }
    IrqSetPayload req{sizeof(IrqSetPayload), kIrqSetDataEventfd | kIrqSetActionTrigger, index,
                      static_cast<uint32_t>(start + i), static_cast<uint32_t>(j - i)};
    std::span<const int> run = disconnect ? std::span<const int>() : fds.subspan(i, j - i);
    absl::Status s =
        Request(kCmdDeviceSetIrqs, {reinterpret_cast<uint8_t*>(&req), sizeof(req)}, run).status();
    if (!s.ok()) return s;
    i = j;
  }
  return absl::OkStatus();
}

absl::Status VfioUserDevice::SetIrqUnmaskFd(uint32_t index, int unmask_fd) {
  IrqSetPayload req{sizeof(IrqSetPayload), kIrqSetDataEventfd | kIrqSetActionUnmask, index, 0, 1};
  std::span<const int> fds;
  if (unmask_fd >= 0) fds = {&unmask_fd, 1};
  return Request(kCmdDeviceSetIrqs, {reinterpret_cast<uint8_t*>(&req), sizeof(req)}, fds).status();
}

absl::Status VfioUserDevice::Reset() {
  return Request(kCmdDeviceReset, {}).status();
}

absl::Status VfioUserDevice::DmaMap(uint64_t iova, uint64_t size, void* vaddr, int fd,
                                    uint64_t fd_offset, bool writable) {
  if (size == 0 || iova + size < iova) {
    return absl::InvalidArgumentError(absl::StrCat(name_, ": bad DMA range"));
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = dma_.lower_bound(iova);
    if ((it != dma_.end() && it->first < iova + size) ||
        (it != dma_.begin() && std::prev(it)->first + std::prev(it)->second.size > iova)) {
      return absl::AlreadyExistsError(absl::StrFormat(
          "%s: DMA range [%#x, +%#x) overlaps an existing mapping", name_, iova, size));
    }
  }
  DmaMapPayload req{sizeof(DmaMapPayload), kDmaFlagRead | (writable ? kDmaFlagWrite : 0u),
                    fd >= 0 ? fd_offset : 0, iova, size};
  std::span<const int> fds;
  if (fd >= 0) fds = {&fd, 1};
  absl::Status s =
      Request(kCmdDmaMap, {reinterpret_cast<uint8_t*>(&req), sizeof(req)}, fds).status();
  if (!s.ok()) return s;
  std::lock_guard<std::mutex> lock(mu_);
  dma_[iova] = DmaMapping{size, static_cast<uint8_t*>(vaddr), writable, fd >= 0};
  return absl::OkStatus();
}

absl::Status VfioUserDevice::DmaUnmap(uint64_t iova, uint64_t size) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = dma_.find(iova);
    if (it == dma_.end() || it->second.size != size) {
      return absl::NotFoundError(absl::StrFormat(
          "%s: no DMA mapping exactly at [%#x, +%#x)", name_, iova, size));
    }
  }
  DmaUnmapPayload req{sizeof(DmaUnmapPayload), 0, iova, size};
  absl::Status s = Request(kCmdDmaUnmap, {reinterpret_cast<uint8_t*>(&req), sizeof(req)}).status();
  if (!s.ok()) return s;
  std::lock_guard<std::mutex> lock(mu_);
  dma_.erase(iova);
  return absl::OkStatus();
}

absl::StatusOr<Message> VfioUserDevice::Feature(uint32_t flags, std::span<const uint8_t> data,
                                                uint32_t reply_data_max) {
  PayloadBuilder b;
  b.Add(FeaturePayload{static_cast<uint32_t>(sizeof(FeaturePayload) + reply_data_max), flags});
  b.AddBytes(data);
  auto m = Request(kCmdDeviceFeature, b.span());
  if (!m.ok()) return m;
  auto p = ReadAt<FeaturePayload>(m->payload, 0);
  if (!p.ok() || (p->flags & kFeatureMaskIndex) != (flags & kFeatureMaskIndex)) {
    return Prefixed(name_, absl::DataLossError("vfio-user: malformed DEVICE_FEATURE reply"));
  }
  return m;
}

absl::StatusOr<vfio::MigrationCaps> VfioUserDevice::GetMigrationCaps() {
  vfio::MigrationCaps caps;
  auto m = Feature(kFeatureGet | kFeatureMigration, {}, sizeof(uint64_t));
  if (!m.ok()) {
    // An error reply (not a transport failure) means the server has no migration support.
    if (broken_) return m.status();
    return caps;
  }
  auto flags = ReadAt<uint64_t>(m->payload, sizeof(FeaturePayload));
  if (!flags.ok()) return Prefixed(name_, flags.status());
  caps.supported = (*flags & kMigrationStopCopy) != 0;
  caps.p2p = (*flags & kMigrationP2p) != 0;
  caps.pre_copy = (*flags & kMigrationPreCopy) != 0;
  auto probe = Feature(kFeatureProbe | kFeatureSet | kFeatureDmaLoggingStart, {}, 0);
  if (!probe.ok() && broken_) return probe.status();
  caps.dma_logging = probe.ok();
  return caps;
}

absl::StatusOr<vfio::MigState> VfioUserDevice::GetMigState() {
  auto m = Feature(kFeatureGet | kFeatureMigDeviceState, {}, sizeof(MigDeviceStateData));
  if (!m.ok()) return m.status();
  auto d = ReadAt<MigDeviceStateData>(m->payload, sizeof(FeaturePayload));
  if (!d.ok()) return Prefixed(name_, d.status());
  if (d->device_state > static_cast<uint32_t>(vfio::MigState::kPreCopyP2p)) {
    return Prefixed(name_, absl::DataLossError(
                               absl::StrFormat("vfio-user: unknown device state %u", d->device_state)));
  }
  return static_cast<vfio::MigState>(d->device_state);
}

absl::Status VfioUserDevice::SetMigState(vfio::MigState state) {
  MigDeviceStateData d{static_cast<uint32_t>(state), 0};
  auto m = Feature(kFeatureSet | kFeatureMigDeviceState,
                   {reinterpret_cast<uint8_t*>(&d), sizeof(d)}, sizeof(d));
  if (!m.ok()) {
    return absl::Status(m.status().code(),
                        absl::StrCat(m.status().message(), " (to ", vfio::MigStateName(state), ")"));
  }
  auto now = ReadAt<MigDeviceStateData>(m->payload, sizeof(FeaturePayload));
  if (!now.ok() || now->device_state != static_cast<uint32_t>(state)) {
    return Prefixed(name_, absl::DataLossError(absl::StrCat(
                               "vfio-user: server did not confirm the move to ",
                               vfio::MigStateName(state))));
  }
  return absl::OkStatus();
}

absl::StatusOr<size_t> VfioUserDevice::ReadMigData(std::span<uint8_t> buf) {
  if (buf.empty()) return 0;
  uint32_t want = static_cast<uint32_t>(std::min<size_t>(buf.size(), max_xfer_));
  MigDataPayload req{static_cast<uint32_t>(sizeof(MigDataPayload) + want), want};
  auto m = Request(kCmdMigDataRead, {reinterpret_cast<uint8_t*>(&req), sizeof(req)});
  if (!m.ok()) return m.status();
  auto p = ReadAt<MigDataPayload>(m->payload, 0);
  if (!p.ok() || p->size > want || m->payload.size() != sizeof(MigDataPayload) + p->size) {
    return Prefixed(name_, absl::DataLossError("vfio-user: malformed MIG_DATA_READ reply"));
  }
  std::memcpy(buf.data(), m->payload.data() + sizeof(MigDataPayload), p->size);
  return static_cast<size_t>(p->size);
}

absl::Status VfioUserDevice::WriteMigData(std::span<const uint8_t> data) {
  for (size_t done = 0; done < data.size();) {
    uint32_t n = static_cast<uint32_t>(std::min<size_t>(data.size() - done, max_xfer_));
    PayloadBuilder b;
    b.Add(MigDataPayload{sizeof(MigDataPayload), n}).AddBytes(data.subspan(done, n));
    absl::Status s = Request(kCmdMigDataWrite, b.span()).status();
    if (!s.ok()) return s;
    done += n;
  }
  return absl::OkStatus();
}

absl::Status VfioUserDevice::StartDmaLogging(std::span<const vfio::DmaRange> ranges,
                                             uint64_t page_size) {
  if (page_size == 0 || (page_size & (page_size - 1)) != 0) {
    return absl::InvalidArgumentError(absl::StrCat(name_, ": page size must be a power of two"));
  }
  PayloadBuilder b;
  b.Add(DmaLoggingControl{page_size, static_cast<uint32_t>(ranges.size()), 0});
  for (const auto& r : ranges) b.Add(DmaLoggingRange{r.iova, r.size});
  auto m = Feature(kFeatureSet | kFeatureDmaLoggingStart, b.span(),
                   static_cast<uint32_t>(b.span().size()));
  if (!m.ok()) return m.status();
  // The device may choose another tracking granularity; reports are converted by the server to
  // the page size each report asks for, so nothing else depends on it here.
  return absl::OkStatus();
}

absl::Status VfioUserDevice::ReportDmaDirty(uint64_t iova, uint64_t size, uint64_t page_size,
                                            std::span<uint64_t> bitmap) {
  if (page_size == 0 || (page_size & (page_size - 1)) != 0 || size == 0 || iova + size < iova) {
    return absl::InvalidArgumentError(absl::StrCat(name_, ": bad dirty report arguments"));
  }
  const uint64_t pages = (size + page_size - 1) / page_size;
  if (bitmap.size() < (pages + 63) / 64) {
    return absl::InvalidArgumentError(absl::StrCat(name_, ": dirty bitmap too small"));
  }
  // Chunk so one reply's bitmap stays well inside the message limit; chunks are multiples of 64
  // pages so bitmap words line up.
  const uint64_t max_pages = uint64_t{max_xfer_ / 2 / 8} * 64;
  for (uint64_t first = 0; first < pages; first += max_pages) {
    const uint64_t n = std::min(max_pages, pages - first);
    const uint64_t chunk_iova = iova + first * page_size;
    const uint64_t chunk_len = std::min(n * page_size, size - first * page_size);
    const uint32_t words = static_cast<uint32_t>((n + 63) / 64);
    DmaLoggingReport rep{chunk_iova, chunk_len, page_size};
    auto m = Feature(kFeatureGet | kFeatureDmaLoggingReport,
                     {reinterpret_cast<uint8_t*>(&rep), sizeof(rep)},
                     static_cast<uint32_t>(sizeof(rep) + words * 8));
    if (!m.ok()) return m.status();
    auto echo = ReadAt<DmaLoggingReport>(m->payload, sizeof(FeaturePayload));
    const size_t bits_at = sizeof(FeaturePayload) + sizeof(DmaLoggingReport);
    if (!echo.ok() || echo->iova != chunk_iova || echo->length != chunk_len ||
        echo->page_size != page_size || m->payload.size() != bits_at + words * 8) {
      return Prefixed(name_, absl::DataLossError("vfio-user: malformed DMA_LOGGING_REPORT reply"));
    }
    for (uint32_t w = 0; w < words; ++w) {
      uint64_t word;
      std::memcpy(&word, m->payload.data() + bits_at + w * 8, 8);
      if (w == words - 1 && n % 64 != 0) word &= (uint64_t{1} << (n % 64)) - 1;  // spec: zero
      bitmap[first / 64 + w] |= word;
    }
  }
  return absl::OkStatus();
}

absl::Status VfioUserDevice::StopDmaLogging() {
  return Feature(kFeatureSet | kFeatureDmaLoggingStop, {}, 0).status();
}

}  // namespace microvmm::vfio_user
