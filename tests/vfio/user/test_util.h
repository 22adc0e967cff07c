// Shared helpers for the vfio-user tests: guest memory in a memfd, an in-process server on a
// socketpair, and a scripted fake server for hostile-server tests.
#ifndef MICROVMM_TESTS_VFIO_USER_TEST_UTIL_H_
#define MICROVMM_TESTS_VFIO_USER_TEST_UTIL_H_

#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "devices/vfio/user/client.h"
#include "devices/vfio/user/protocol.h"
#include "gtest/gtest.h"
#include "tests/vfio/user/test_server/test_device.h"

namespace microvmm::vfio_user::testing {

inline constexpr uint64_t kGuestIova = 0x100000;
inline constexpr uint64_t kGuestSize = 1 << 20;
inline constexpr uint64_t kPage = 4096;

struct GuestRam {
  ScopedFd fd;
  ScopedMmap map;
  uint8_t* at(uint64_t iova) { return static_cast<uint8_t*>(map.get()) + (iova - kGuestIova); }
  static GuestRam Make() {
    GuestRam g;
    g.fd.reset(::memfd_create("guest-ram", MFD_CLOEXEC));
    EXPECT_TRUE(g.fd.valid());
    EXPECT_EQ(::ftruncate(g.fd.get(), kGuestSize), 0);
    void* p = ::mmap(nullptr, kGuestSize, PROT_READ | PROT_WRITE, MAP_SHARED, g.fd.get(), 0);
    EXPECT_NE(p, MAP_FAILED);
    g.map = ScopedMmap(p, kGuestSize);
    return g;
  }
};

// A TestDeviceServer serving one end of a socketpair on its own thread.
class InProcessServer {
 public:
  explicit InProcessServer(const testdev::ServerOptions& o = {}) {
    auto s = testdev::TestDeviceServer::Create(o);
    EXPECT_TRUE(s.ok()) << s.status();
    server_ = std::move(*s);
  }
  ~InProcessServer() { Join(); }
  // Starts serving a new connection and returns the client end.
  ScopedFd Start() {
    Join();
    int sv[2];
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    server_end_.reset(sv[1]);
    thread_ = std::thread([this] { last_status_ = server_->Serve(server_end_.get()); });
    return ScopedFd(sv[0]);
  }
  std::unique_ptr<VfioUserDevice> Connect(const ClientOptions& o = {}) {
    auto d = VfioUserDevice::FromSocket(Start(), "vfio-user:test", o);
    EXPECT_TRUE(d.ok()) << d.status();
    return d.ok() ? std::move(*d) : nullptr;
  }
  void Join() {
    if (thread_.joinable()) thread_.join();
    server_end_.reset();
  }
  testdev::TestDeviceServer* server() { return server_.get(); }
  absl::Status last_status() const { return last_status_; }

 private:
  std::unique_ptr<testdev::TestDeviceServer> server_;
  ScopedFd server_end_;
  std::thread thread_;
  absl::Status last_status_;
};

inline absl::Status WriteReg(vfio::VfioDevice* d, uint64_t off, uint64_t v) {
  return d->RegionWrite(vfio::kBar0RegionIndex, off, {reinterpret_cast<uint8_t*>(&v), 8});
}
inline uint64_t ReadReg(vfio::VfioDevice* d, uint64_t off) {
  uint64_t v = ~0ull;
  absl::Status s = d->RegionRead(vfio::kBar0RegionIndex, off, {reinterpret_cast<uint8_t*>(&v), 8});
  EXPECT_TRUE(s.ok()) << s;
  return v;
}
inline absl::Status StartFill(vfio::VfioDevice* d, uint64_t dst, uint64_t len, uint8_t pattern) {
  for (auto [reg, val] : {std::pair{testdev::kRegDst, dst}, {testdev::kRegLen, len},
                          {testdev::kRegOp, testdev::kOpFill}, {testdev::kRegPattern, uint64_t{pattern}}}) {
    absl::Status s = WriteReg(d, reg, val);
    if (!s.ok()) return s;
  }
  return WriteReg(d, testdev::kRegDoorbell, 1);
}
inline absl::Status StartCopy(vfio::VfioDevice* d, uint64_t src, uint64_t dst, uint64_t len) {
  for (auto [reg, val] : {std::pair{testdev::kRegSrc, src}, {testdev::kRegDst, dst},
                          {testdev::kRegLen, len}, {testdev::kRegOp, testdev::kOpCopy}}) {
    absl::Status s = WriteReg(d, reg, val);
    if (!s.ok()) return s;
  }
  return WriteReg(d, testdev::kRegDoorbell, 1);
}

// ---- raw protocol helpers for hostile peers ----

inline Header MakeHeader(uint16_t id, uint16_t cmd, uint32_t flags) {
  Header h{};
  h.msg_id = id;
  h.command = cmd;
  h.flags = flags;
  return h;
}
inline absl::Status SendCmd(int fd, uint16_t id, uint16_t cmd, std::span<const uint8_t> payload,
                            std::span<const int> fds = {}) {
  return SendMessage(fd, MakeHeader(id, cmd, kFlagTypeCommand), payload, fds);
}
inline absl::Status SendReply(int fd, const Message& req, std::span<const uint8_t> payload,
                              std::span<const int> fds = {}) {
  return SendMessage(fd, MakeHeader(req.hdr.msg_id, req.hdr.command, kFlagTypeReply), payload, fds);
}
inline absl::Status SendErrorReply(int fd, const Message& req, uint32_t err) {
  Header h = MakeHeader(req.hdr.msg_id, req.hdr.command, kFlagTypeReply | kFlagError);
  h.error = err;
  return SendMessage(fd, h, {});
}
// Writes raw bytes (for broken framing).
inline void SendRaw(int fd, const void* p, size_t n) {
  ASSERT_EQ(::send(fd, p, n, MSG_NOSIGNAL), static_cast<ssize_t>(n));
}
template <typename T>
std::span<const uint8_t> Bytes(const T& v) {
  return {reinterpret_cast<const uint8_t*>(&v), sizeof(T)};
}

// Client side of the handshake, for raw clients talking to the test server.
inline void RawHandshake(int fd) {
  std::string json = EncodeVersionJson({});
  PayloadBuilder b;
  b.Add(VersionPayload{kVersionMajor, kVersionMinor});
  b.AddBytes({reinterpret_cast<const uint8_t*>(json.c_str()), json.size() + 1});
  ASSERT_TRUE(SendCmd(fd, 1, kCmdVersion, b.span()).ok());
  auto m = RecvMessage(fd, 5000);
  ASSERT_TRUE(m.ok()) << m.status();
  ASSERT_FALSE(m->is_error());
}

// Server side of the handshake, for fake servers.
inline Message FakeServerHandshake(int fd, const std::string& json =
                                               R"({"capabilities":{"max_msg_fds":8}})") {
  auto m = RecvMessage(fd, 5000);
  EXPECT_TRUE(m.ok()) << m.status();
  if (!m.ok()) return {};
  EXPECT_EQ(m->hdr.command, kCmdVersion);
  PayloadBuilder b;
  b.Add(VersionPayload{kVersionMajor, kVersionMinor});
  b.AddBytes({reinterpret_cast<const uint8_t*>(json.c_str()), json.size() + 1});
  EXPECT_TRUE(SendReply(fd, *m, b.span()).ok());
  return std::move(*m);
}

// Runs `script` on a thread against the server end of a socketpair.
class FakeServer {
 public:
  explicit FakeServer(std::function<void(int)> script) {
    int sv[2];
    EXPECT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    client_end_.reset(sv[0]);
    server_end_.reset(sv[1]);
    thread_ = std::thread([this, script] {
      script(server_end_.get());
    });
  }
  ~FakeServer() { Finish(); }
  ScopedFd TakeClientEnd() { return std::move(client_end_); }
  void Finish() {
    if (thread_.joinable()) thread_.join();
  }
  void CloseServerEnd() { server_end_.reset(); }

 private:
  ScopedFd client_end_, server_end_;
  std::thread thread_;
};

}  // namespace microvmm::vfio_user::testing

#endif  // MICROVMM_TESTS_VFIO_USER_TEST_UTIL_H_
