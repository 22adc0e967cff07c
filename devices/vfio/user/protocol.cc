#include "devices/vfio/user/protocol.h"

#include <poll.h>
#include <sys/socket.h>
#include <time.h>

#include <cerrno>
#include <cstring>

#include <algorithm>
#include <optional>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_format.h"
#include "vmm/base/status.h"

namespace microvmm::vfio_user {

const char* CommandName(uint16_t cmd) {
  switch (cmd) {
    case kCmdVersion: return "VERSION";
    case kCmdDmaMap: return "DMA_MAP";
    case kCmdDmaUnmap: return "DMA_UNMAP";
    case kCmdDeviceGetInfo: return "DEVICE_GET_INFO";
    case kCmdDeviceGetRegionInfo: return "DEVICE_GET_REGION_INFO";
    case kCmdDeviceGetRegionIoFds: return "DEVICE_GET_REGION_IO_FDS";
    case kCmdDeviceGetIrqInfo: return "DEVICE_GET_IRQ_INFO";
    case kCmdDeviceSetIrqs: return "DEVICE_SET_IRQS";
    case kCmdRegionRead: return "REGION_READ";
    case kCmdRegionWrite: return "REGION_WRITE";
    case kCmdDmaRead: return "DMA_READ";
    case kCmdDmaWrite: return "DMA_WRITE";
    case kCmdDeviceReset: return "DEVICE_RESET";
    case kCmdRegionWriteMulti: return "REGION_WRITE_MULTI";
    case kCmdDeviceFeature: return "DEVICE_FEATURE";
    case kCmdMigDataRead: return "MIG_DATA_READ";
    case kCmdMigDataWrite: return "MIG_DATA_WRITE";
  }
  return "UNKNOWN";
}

absl::Status SendMessage(int sock, Header hdr, std::span<const uint8_t> payload,
                         std::span<const int> fds) {
  if (payload.size() > kMaxMessageSize - sizeof(Header)) {
    return absl::InvalidArgumentError("vfio-user: message too large");
  }
  if (fds.size() > kMaxFdsPerMessage) return absl::InvalidArgumentError("vfio-user: too many fds");
  hdr.msg_size = static_cast<uint32_t>(sizeof(Header) + payload.size());

  iovec iov[2] = {{&hdr, sizeof(hdr)},
                  {const_cast<uint8_t*>(payload.data()), payload.size()}};
  size_t iov_count = payload.empty() ? 1 : 2;
  alignas(cmsghdr) char ctrl[CMSG_SPACE(sizeof(int) * kMaxFdsPerMessage)];
  size_t total = sizeof(hdr) + payload.size();
  size_t sent = 0;
  bool fds_pending = !fds.empty();
  iovec* cur = iov;
  while (sent < total) {
    msghdr msg{};
    msg.msg_iov = cur;
    msg.msg_iovlen = iov_count - (cur - iov);
    if (fds_pending) {  // fds ride with the first byte only
      std::memset(ctrl, 0, sizeof(ctrl));
      msg.msg_control = ctrl;
      msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
      cmsghdr* c = CMSG_FIRSTHDR(&msg);
      c->cmsg_level = SOL_SOCKET;
      c->cmsg_type = SCM_RIGHTS;
      c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
      std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
    }
    ssize_t n = ::sendmsg(sock, &msg, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EPIPE || errno == ECONNRESET) {
        return absl::UnavailableError("vfio-user: peer closed the connection");
      }
      return ErrnoStatus(errno, "vfio-user: sendmsg");
    }
    fds_pending = false;
    sent += static_cast<size_t>(n);
    // Advance the iovecs past what was sent.
    size_t left = static_cast<size_t>(n);
    while (left > 0 && cur < iov + iov_count) {
      if (left >= cur->iov_len) {
        left -= cur->iov_len;
        ++cur;
      } else {
        cur->iov_base = static_cast<uint8_t*>(cur->iov_base) + left;
        cur->iov_len -= left;
        left = 0;
      }
    }
  }
  return absl::OkStatus();
}

namespace {

int64_t NowMs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return int64_t{ts.tv_sec} * 1000 + ts.tv_nsec / 1000000;
}

// Waits until `sock` is readable or the deadline passes (deadline < 0: forever).
absl::Status WaitReadable(int sock, int64_t deadline_ms) {
  for (;;) {
    int timeout = -1;
    if (deadline_ms >= 0) {
      // At or past the deadline, still take what is already there (poll with 0).
      timeout = static_cast<int>(std::clamp<int64_t>(deadline_ms - NowMs(), 0, 1 << 30));
    }
    pollfd p{sock, POLLIN, 0};
    int r = ::poll(&p, 1, timeout);
    if (r < 0) {
      if (errno == EINTR) continue;
      return ErrnoStatus(errno, "vfio-user: poll");
    }
    if (r > 0) return absl::OkStatus();
    if (timeout == 0) return absl::DeadlineExceededError("vfio-user: timed out waiting for peer");
  }
}

// Reads exactly buf.size() bytes, collecting any SCM_RIGHTS fds into `fds`.
// `at_boundary`: EOF before the first byte is a clean close.
absl::Status RecvExact(int sock, std::span<uint8_t> buf, int64_t deadline_ms,
                       std::vector<ScopedFd>* fds, bool at_boundary) {
  size_t got = 0;
  while (got < buf.size()) {
    absl::Status w = WaitReadable(sock, deadline_ms);
    if (!w.ok()) return w;
    iovec iov{buf.data() + got, buf.size() - got};
    alignas(cmsghdr) char ctrl[CMSG_SPACE(sizeof(int) * kMaxFdsPerMessage)];
    msghdr msg{};
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = ctrl;
    msg.msg_controllen = sizeof(ctrl);
    ssize_t n = ::recvmsg(sock, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      if (errno == ECONNRESET) return absl::UnavailableError("vfio-user: peer closed the connection");
      return ErrnoStatus(errno, "vfio-user: recvmsg");
    }
    // Take ownership of every fd first so none leaks on an error below.
    for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c != nullptr; c = CMSG_NXTHDR(&msg, c)) {
      if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
      size_t nfds = (c->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t i = 0; i < nfds; ++i) {
        int fd;
        std::memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof(int));
        fds->emplace_back(fd);
      }
    }
    if ((msg.msg_flags & MSG_CTRUNC) || fds->size() > kMaxFdsPerMessage) {
      return absl::DataLossError("vfio-user: too many file descriptors in one message");
    }
    if (n == 0) {
      if (got == 0 && at_boundary) {
        return absl::UnavailableError("vfio-user: peer closed the connection");
      }
      return absl::UnavailableError("vfio-user: peer closed the connection mid-message");
    }
    got += static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<Message> RecvMessage(int sock, int timeout_ms, uint32_t max_size) {
  int64_t deadline = timeout_ms < 0 ? -1 : NowMs() + timeout_ms;
  Message m;
  absl::Status s = RecvExact(sock, {reinterpret_cast<uint8_t*>(&m.hdr), sizeof(Header)}, deadline,
                             &m.fds, /*at_boundary=*/true);
  if (!s.ok()) return s;
  if (m.hdr.msg_size < sizeof(Header) || m.hdr.msg_size > max_size) {
    return absl::DataLossError(
        absl::StrFormat("vfio-user: bad message size %u (command %u)", m.hdr.msg_size,
                        m.hdr.command));
  }
  m.payload.resize(m.hdr.msg_size - sizeof(Header));
  if (!m.payload.empty()) {
    s = RecvExact(sock, m.payload, deadline, &m.fds, /*at_boundary=*/false);
    if (!s.ok()) return s;
  }
  return m;  // RecvExact already bounded m.fds by kMaxFdsPerMessage after every recvmsg
}

std::string EncodeVersionJson(const VersionCaps& caps) {
  std::string s = absl::StrFormat(R"({"capabilities":{"max_msg_fds":%u,"max_data_xfer_size":%u)",
                                  caps.max_msg_fds, caps.max_data_xfer_size);
  if (caps.migration) s += absl::StrFormat(R"(,"migration":{"pgsize":%u})", caps.pgsize);
  s += "}}";
  return s;
}

namespace {

// Finds `"key"` followed by ':' and an unsigned integer. Returns nullopt if absent.
absl::StatusOr<std::optional<uint64_t>> FindNumber(absl::string_view json, absl::string_view key) {
  std::string quoted = absl::StrCat("\"", key, "\"");
  size_t pos = json.find(quoted);
  if (pos == absl::string_view::npos) return std::optional<uint64_t>();
  pos += quoted.size();
  while (pos < json.size() && absl::ascii_isspace(json[pos])) ++pos;
  if (pos >= json.size() || json[pos] != ':') {
    return absl::InvalidArgumentError(absl::StrCat("vfio-user: version JSON: bad value for ", key));
  }
  ++pos;
  while (pos < json.size() && absl::ascii_isspace(json[pos])) ++pos;
  size_t end = pos;
  while (end < json.size() && end - pos < 20 && absl::ascii_isdigit(json[end])) ++end;
  uint64_t v;
  if (end == pos || !absl::SimpleAtoi(json.substr(pos, end - pos), &v)) {
    return absl::InvalidArgumentError(absl::StrCat("vfio-user: version JSON: bad number for ", key));
  }
  return std::optional<uint64_t>(v);
}

}  // namespace

absl::StatusOr<VersionCaps> ParseVersionJson(absl::string_view json) {
  VersionCaps caps;
  if (json.empty()) return caps;
  if (json.size() > 4096) return absl::InvalidArgumentError("vfio-user: version JSON too long");
  int depth = 0;
  bool in_string = false;
  for (char c : json) {
    if (static_cast<unsigned char>(c) < 0x20 && !absl::ascii_isspace(c)) {
      return absl::InvalidArgumentError("vfio-user: version JSON has control characters");
    }
    if (c == '"') in_string = !in_string;
    if (in_string) continue;
    if (c == '{' || c == '[') ++depth;
    if (c == '}' || c == ']') --depth;
    if (depth < 0 || depth > 8) return absl::InvalidArgumentError("vfio-user: version JSON malformed");
  }
  if (depth != 0 || in_string || json.front() != '{') {
    return absl::InvalidArgumentError("vfio-user: version JSON malformed");
  }
  auto fds = FindNumber(json, "max_msg_fds");
  if (!fds.ok()) return fds.status();
  if (fds->has_value()) caps.max_msg_fds = static_cast<uint32_t>(std::min<uint64_t>(**fds, 1024));
  auto xfer = FindNumber(json, "max_data_xfer_size");
  if (!xfer.ok()) return xfer.status();
  if (xfer->has_value()) {
    if (**xfer < 512) return absl::InvalidArgumentError("vfio-user: max_data_xfer_size too small");
    caps.max_data_xfer_size = static_cast<uint32_t>(std::min<uint64_t>(**xfer, 1u << 30));
  }
  caps.migration = json.find("\"migration\"") != absl::string_view::npos;
  auto pg = FindNumber(json, "pgsize");
  if (!pg.ok()) return pg.status();
  if (pg->has_value()) {
    uint64_t p = **pg;
    if (p < 512 || p > (1ull << 30) || (p & (p - 1)) != 0) {
      return absl::InvalidArgumentError("vfio-user: bad migration pgsize");
    }
    caps.pgsize = p;
  }
  return caps;
}

}  // namespace microvmm::vfio_user
