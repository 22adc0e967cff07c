// Malformed messages from each side: a raw socket plays the hostile client against the test
// server, and a scripted fake server plays the hostile server against the client.
#include <sys/eventfd.h>
#include <sys/socket.h>

#include <vector>

#include "tests/vfio/user/test_util.h"

namespace microvmm::vfio_user::testing {
namespace {

namespace td = testdev;

// ======================= hostile client -> test server =======================

class HostileClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    sock_ = srv_.Start();
    RawHandshake(sock_.get());
  }
  // Sends a command and expects an error reply with `err` (0: any errno).
  void ExpectErrno(uint16_t cmd, std::span<const uint8_t> payload, uint32_t err,
                   std::span<const int> fds = {}) {
    const uint16_t id = next_id_++;
    ASSERT_TRUE(SendCmd(sock_.get(), id, cmd, payload, fds).ok());
    auto m = RecvMessage(sock_.get(), 5000);
    ASSERT_TRUE(m.ok()) << CommandName(cmd) << ": " << m.status();
    EXPECT_EQ(m->hdr.msg_id, id);
    EXPECT_EQ(m->hdr.command, cmd);
    EXPECT_TRUE(m->is_reply());
    EXPECT_TRUE(m->is_error()) << CommandName(cmd) << " payload size " << payload.size();
    if (err != 0) {
      EXPECT_EQ(m->hdr.error, err) << CommandName(cmd);
    }
    EXPECT_TRUE(m->payload.empty());  // spec: an error reply is the header only
  }
  // The server still answers a well-formed request.
  void ExpectAlive() {
    DeviceInfoPayload req{sizeof(DeviceInfoPayload), 0, 0, 0};
    const uint16_t id = next_id_++;
    ASSERT_TRUE(SendCmd(sock_.get(), id, kCmdDeviceGetInfo, Bytes(req)).ok());
    auto m = RecvMessage(sock_.get(), 5000);
    ASSERT_TRUE(m.ok()) << m.status();
    EXPECT_EQ(m->hdr.msg_id, id);
    EXPECT_FALSE(m->is_error());
  }
  // The server hung up on us.
  void ExpectDropped() {
    auto m = RecvMessage(sock_.get(), 5000);
    EXPECT_TRUE(absl::IsUnavailable(m.status())) << m.status();
    sock_.reset();
    srv_.Join();
  }
  InProcessServer srv_;
  ScopedFd sock_;
  uint16_t next_id_ = 100;
};

TEST(HostileClientHandshake, CommandsBeforeVersionAreRefused) {
  InProcessServer srv;
  ScopedFd s = srv.Start();
  DeviceInfoPayload req{sizeof(DeviceInfoPayload), 0, 0, 0};
  ASSERT_TRUE(SendCmd(s.get(), 7, kCmdDeviceGetInfo, Bytes(req)).ok());
  auto m = RecvMessage(s.get(), 5000);
  ASSERT_TRUE(m.ok());
  EXPECT_TRUE(m->is_error());
  EXPECT_EQ(m->hdr.error, static_cast<uint32_t>(EINVAL));
  RawHandshake(s.get());  // and the session can still start properly
}

TEST(HostileClientHandshake, WrongMajorOrGarbageJsonClosesConnection) {
  InProcessServer srv;
  for (int variant = 0; variant < 3; ++variant) {
    ScopedFd s = srv.Start();
    PayloadBuilder b;
    if (variant == 0) {
      b.Add(VersionPayload{7, 0});
    } else if (variant == 1) {
      b.Add(VersionPayload{0, 1});
      std::string bad = "{\"capabilities\":{{{";  // unbalanced, NUL-terminated
      b.AddBytes({reinterpret_cast<const uint8_t*>(bad.c_str()), bad.size() + 1});
    } else {
      b.Add(uint16_t{0});  // too short
    }
    ASSERT_TRUE(SendCmd(s.get(), 1, kCmdVersion, b.span()).ok());
    auto m = RecvMessage(s.get(), 5000);
    EXPECT_TRUE(absl::IsUnavailable(m.status())) << variant << ": " << m.status();
  }
}

TEST_F(HostileClientTest, ShortPayloadForEveryCommandGetsErrorReply) {
  uint8_t junk[3] = {1, 2, 3};
  for (uint16_t cmd = 2; cmd <= 40; ++cmd) {
    if (cmd != kCmdDeviceReset) ExpectErrno(cmd, {}, 0);
    ExpectErrno(cmd, junk, 0);
  }
  ExpectErrno(kCmdVersion, {}, EINVAL);  // a second VERSION
  ExpectAlive();
}

TEST_F(HostileClientTest, BadFieldsGetErrorReplies) {
  // Region access: offset overflow, zero count, count/payload mismatch, too big, bad region.
  RegionAccessPayload ra{~0ull - 3, vfio::kBar0RegionIndex, 8};
  ExpectErrno(kCmdRegionRead, Bytes(ra), EINVAL);
  ra = {0, vfio::kBar0RegionIndex, 0};
  ExpectErrno(kCmdRegionRead, Bytes(ra), EINVAL);
  PayloadBuilder w;
  w.Add(RegionAccessPayload{td::kScratchOffset, vfio::kBar0RegionIndex, 100}).AddZeros(4);
  ExpectErrno(kCmdRegionWrite, w.span(), EINVAL);
  ra = {0, vfio::kBar0RegionIndex, 0x7fffffff};
  ExpectErrno(kCmdRegionRead, Bytes(ra), EINVAL);
  ra = {0, 0xffffffff, 4};
  ExpectErrno(kCmdRegionRead, Bytes(ra), EINVAL);
  // Info queries with out-of-range indices.
  RegionInfoPayload ri{sizeof(RegionInfoPayload), 0, 1000, 0, 0, 0};
  ExpectErrno(kCmdDeviceGetRegionInfo, Bytes(ri), EINVAL);
  IrqInfoPayload ii{sizeof(IrqInfoPayload), 0, 99, 0};
  ExpectErrno(kCmdDeviceGetIrqInfo, Bytes(ii), EINVAL);
  // SET_IRQS: start+count overflow, argsz mismatch, fd count mismatch, two data types.
  ScopedFd efd(::eventfd(0, EFD_CLOEXEC));
  int one_fd[1] = {efd.get()};
  IrqSetPayload is{sizeof(IrqSetPayload), kIrqSetDataEventfd | kIrqSetActionTrigger,
                   vfio::kMsixIrqIndex, 0xffffffff, 2};
  ExpectErrno(kCmdDeviceSetIrqs, Bytes(is), EINVAL, one_fd);
  is = {sizeof(IrqSetPayload) + 8, kIrqSetDataEventfd | kIrqSetActionTrigger, vfio::kMsixIrqIndex,
        0, 1};
  ExpectErrno(kCmdDeviceSetIrqs, Bytes(is), EINVAL, one_fd);
  is = {sizeof(IrqSetPayload), kIrqSetDataEventfd | kIrqSetActionTrigger, vfio::kMsixIrqIndex, 0, 2};
  ExpectErrno(kCmdDeviceSetIrqs, Bytes(is), EINVAL, one_fd);
  is = {sizeof(IrqSetPayload), kIrqSetDataEventfd | kIrqSetDataBool | kIrqSetActionTrigger,
        vfio::kMsixIrqIndex, 0, 1};
  ExpectErrno(kCmdDeviceSetIrqs, Bytes(is), EINVAL, one_fd);
  // DMA_MAP: zero size, address overflow, unknown flags, larger than the file, overlap.
  GuestRam ram = GuestRam::Make();
  int ram_fd[1] = {ram.fd.get()};
  DmaMapPayload dm{sizeof(DmaMapPayload), kDmaFlagRead, 0, 0x1000, 0};
  ExpectErrno(kCmdDmaMap, Bytes(dm), EINVAL, ram_fd);
  dm = {sizeof(DmaMapPayload), kDmaFlagRead, 0, ~0ull - 100, 4096};
  ExpectErrno(kCmdDmaMap, Bytes(dm), EINVAL, ram_fd);
  dm = {sizeof(DmaMapPayload), 0x80, 0, 0x1000, 4096};
  ExpectErrno(kCmdDmaMap, Bytes(dm), EINVAL, ram_fd);
  dm = {sizeof(DmaMapPayload), kDmaFlagRead, 0, 0x1000, 2 * kGuestSize};
  ExpectErrno(kCmdDmaMap, Bytes(dm), EINVAL, ram_fd);
  dm = {sizeof(DmaMapPayload), kDmaFlagRead, kGuestSize - 4096, 0x1000, 8192};
  ExpectErrno(kCmdDmaMap, Bytes(dm), EINVAL, ram_fd);
  int two_fds[2] = {ram.fd.get(), ram.fd.get()};
  dm = {sizeof(DmaMapPayload), kDmaFlagRead, 0, 0x1000, 4096};
  ExpectErrno(kCmdDmaMap, Bytes(dm), EINVAL, two_fds);
  ScopedFd not_a_file(::eventfd(0, EFD_CLOEXEC));
  int bad_fd[1] = {not_a_file.get()};
  ExpectErrno(kCmdDmaMap, Bytes(dm), EINVAL, bad_fd);
  ASSERT_TRUE(SendCmd(sock_.get(), 1, kCmdDmaMap, Bytes(dm), ram_fd).ok());
  auto ok = RecvMessage(sock_.get(), 5000);
  ASSERT_TRUE(ok.ok());
  EXPECT_FALSE(ok->is_error());
  dm.address = 0x1800;
  ExpectErrno(kCmdDmaMap, Bytes(dm), EEXIST, ram_fd);
  DmaUnmapPayload du{sizeof(DmaUnmapPayload), 0, 0x1000, 8192};
  ExpectErrno(kCmdDmaUnmap, Bytes(du), ENOENT);
  // Unexpected fds on a command that takes none.
  DeviceInfoPayload gi{sizeof(DeviceInfoPayload), 0, 0, 0};
  ExpectErrno(kCmdDeviceGetInfo, Bytes(gi), EINVAL, one_fd);
  // DEVICE_FEATURE: GET|SET together, no action, unknown feature, bad logging requests.
  FeaturePayload fp{64, kFeatureGet | kFeatureSet | kFeatureMigDeviceState};
  ExpectErrno(kCmdDeviceFeature, Bytes(fp), EINVAL);
  fp = {64, kFeatureMigDeviceState};
  ExpectErrno(kCmdDeviceFeature, Bytes(fp), EINVAL);
  fp = {64, kFeatureGet | 0x1234};
  ExpectErrno(kCmdDeviceFeature, Bytes(fp), ENOTTY);
  fp = {0, kFeatureGet | kFeatureMigration};  // no room for the reply
  ExpectErrno(kCmdDeviceFeature, Bytes(fp), EINVAL);
  PayloadBuilder ls;
  ls.Add(FeaturePayload{64, kFeatureSet | kFeatureDmaLoggingStart})
      .Add(DmaLoggingControl{4096, 1000, 0});  // claims 1000 ranges, carries none
  ExpectErrno(kCmdDeviceFeature, ls.span(), EINVAL);
  PayloadBuilder lz;
  lz.Add(FeaturePayload{64, kFeatureSet | kFeatureDmaLoggingStart})
      .Add(DmaLoggingControl{4095, 0, 0});  // page size not a power of two
  ExpectErrno(kCmdDeviceFeature, lz.span(), EINVAL);
  PayloadBuilder rp;
  rp.Add(FeaturePayload{64, kFeatureGet | kFeatureDmaLoggingReport})
      .Add(DmaLoggingReport{0, 4096, 4096});  // logging not started
  ExpectErrno(kCmdDeviceFeature, rp.span(), EINVAL);
  PayloadBuilder lg;
  lg.Add(FeaturePayload{64, kFeatureSet | kFeatureDmaLoggingStart}).Add(DmaLoggingControl{4096, 0, 0});
  ASSERT_TRUE(SendCmd(sock_.get(), 2, kCmdDeviceFeature, lg.span()).ok());
  ASSERT_TRUE(RecvMessage(sock_.get(), 5000).ok());
  PayloadBuilder huge;
  huge.Add(FeaturePayload{~0u, kFeatureGet | kFeatureDmaLoggingReport})
      .Add(DmaLoggingReport{0, ~0ull / 2, 4096});  // bitmap would be 2^48 bytes
  ExpectErrno(kCmdDeviceFeature, huge.span(), E2BIG);
  // Migration data in the wrong state / oversized.
  MigDataPayload md{~0u, 0x7fffffff};
  ExpectErrno(kCmdMigDataRead, Bytes(md), EINVAL);
  PayloadBuilder mw;
  mw.Add(MigDataPayload{8, 1000}).AddZeros(10);  // size disagrees with the payload
  ExpectErrno(kCmdMigDataWrite, mw.span(), EINVAL);
  ExpectAlive();
}

TEST_F(HostileClientTest, ReplyTypeAndNoReplyMessagesGetNoAnswer) {
  DeviceInfoPayload gi{sizeof(DeviceInfoPayload), 0, 0, 0};
  ASSERT_TRUE(SendMessage(sock_.get(), MakeHeader(50, kCmdDeviceGetInfo, kFlagTypeReply), Bytes(gi)).ok());
  ASSERT_TRUE(SendMessage(sock_.get(), MakeHeader(51, kCmdDeviceGetInfo, 7), Bytes(gi)).ok());
  ASSERT_TRUE(SendMessage(sock_.get(), MakeHeader(52, kCmdDeviceGetInfo, kFlagNoReply), Bytes(gi)).ok());
  ASSERT_TRUE(SendMessage(sock_.get(), MakeHeader(53, 999, kFlagNoReply), {}).ok());
  ExpectAlive();  // the first answer we see is the one for this request
}

TEST_F(HostileClientTest, UndersizedHeaderDropsConnection) {
  Header h = MakeHeader(1, kCmdDeviceGetInfo, 0);
  h.msg_size = 8;
  SendRaw(sock_.get(), &h, sizeof(h));
  ExpectDropped();
  EXPECT_TRUE(absl::IsDataLoss(srv_.last_status())) << srv_.last_status();
}

TEST_F(HostileClientTest, OversizedHeaderDropsConnectionWithoutAllocating) {
  Header h = MakeHeader(1, kCmdRegionWrite, 0);
  h.msg_size = 0xffffffff;
  SendRaw(sock_.get(), &h, sizeof(h));
  ExpectDropped();
  EXPECT_TRUE(absl::IsDataLoss(srv_.last_status())) << srv_.last_status();
}

TEST_F(HostileClientTest, TruncatedMessageThenCloseEndsSession) {
  Header h = MakeHeader(1, kCmdRegionWrite, 0);
  h.msg_size = 100;
  SendRaw(sock_.get(), &h, sizeof(h));
  SendRaw(sock_.get(), "abc", 3);
  sock_.reset();
  srv_.Join();
  EXPECT_TRUE(absl::IsUnavailable(srv_.last_status())) << srv_.last_status();
  // Device state survives; a new client is served.
  sock_ = srv_.Start();
  RawHandshake(sock_.get());
  ExpectAlive();
}

TEST_F(HostileClientTest, TooManyFdsDropsConnection) {
  std::vector<ScopedFd> owned;
  std::vector<int> fds;
  for (int i = 0; i < 40; ++i) {
    owned.emplace_back(::eventfd(0, EFD_CLOEXEC));
    fds.push_back(owned.back().get());
  }
  Header h = MakeHeader(9, kCmdDeviceSetIrqs, 0);
  h.msg_size = sizeof(h);
  iovec iov{&h, sizeof(h)};
  std::vector<char> ctrl(CMSG_SPACE(sizeof(int) * fds.size()));
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = ctrl.data();
  msg.msg_controllen = ctrl.size();
  cmsghdr* c = CMSG_FIRSTHDR(&msg);
  c->cmsg_level = SOL_SOCKET;
  c->cmsg_type = SCM_RIGHTS;
  c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
  std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  ASSERT_EQ(::sendmsg(sock_.get(), &msg, MSG_NOSIGNAL), static_cast<ssize_t>(sizeof(h)));
  ExpectDropped();
  EXPECT_TRUE(absl::IsDataLoss(srv_.last_status())) << srv_.last_status();
}

// ======================= hostile server -> client =======================

void DrainUntilClosed(int fd) {
  for (;;) {
    auto m = RecvMessage(fd, 5000);
    if (!m.ok()) return;
  }
}

absl::StatusOr<std::unique_ptr<VfioUserDevice>> ConnectTo(FakeServer& fs, int timeout_ms = 5000) {
  ClientOptions o;
  o.reply_timeout_ms = timeout_ms;
  return VfioUserDevice::FromSocket(fs.TakeClientEnd(), "vfio-user:fake", o);
}

TEST(HostileServerHandshake, ClosedWithoutReply) {
  FakeServer fs([](int fd) {
    (void)RecvMessage(fd, 5000);
    ::shutdown(fd, SHUT_RDWR);
  });
  auto d = ConnectTo(fs);
  ASSERT_FALSE(d.ok());
  EXPECT_TRUE(absl::IsFailedPrecondition(d.status())) << d.status();
}

TEST(HostileServerHandshake, BadVersionReplies) {
  struct Case {
    std::vector<uint8_t> payload;
    absl::StatusCode code;
  };
  auto version = [](uint16_t major, uint16_t minor, std::string json, bool nul) {
    PayloadBuilder b;
    b.Add(VersionPayload{major, minor});
    b.AddBytes({reinterpret_cast<const uint8_t*>(json.c_str()), json.size() + (nul ? 1 : 0)});
    return b.bytes();
  };
  std::vector<Case> cases = {
      {version(0, 9, "{}", true), absl::StatusCode::kFailedPrecondition},  // minor above ours
      {version(3, 0, "{}", true), absl::StatusCode::kFailedPrecondition},
      {{0, 0}, absl::StatusCode::kDataLoss},                                // too short
      {version(0, 1, "{}", false), absl::StatusCode::kDataLoss},            // no NUL
      {version(0, 1, "{\"a\":{{", true), absl::StatusCode::kInvalidArgument},
      {version(0, 1, R"({"capabilities":{"max_data_xfer_size":1}})", true),
       absl::StatusCode::kInvalidArgument},
      {version(0, 1, R"({"capabilities":{"max_msg_fds":"x"}})", true),
       absl::StatusCode::kInvalidArgument},
      {version(0, 1, std::string(5000, ' '), true), absl::StatusCode::kInvalidArgument},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    FakeServer fs([&](int fd) {
      auto m = RecvMessage(fd, 5000);
      ASSERT_TRUE(m.ok());
      ASSERT_TRUE(SendReply(fd, *m, cases[i].payload).ok());
      DrainUntilClosed(fd);
    });
    auto d = ConnectTo(fs);
    ASSERT_FALSE(d.ok()) << i;
    EXPECT_EQ(d.status().code(), cases[i].code) << i << ": " << d.status();
  }
}

TEST(HostileServerHandshake, CapsAreNegotiatedAndRespected) {
  std::vector<size_t> fds_per_message;
  FakeServer fs([&](int fd) {
    FakeServerHandshake(fd, R"({"capabilities":{"max_msg_fds":2,"max_data_xfer_size":4096}})");
    for (;;) {
      auto m = RecvMessage(fd, 5000);
      if (!m.ok()) return;
      if (m->hdr.command == kCmdDeviceSetIrqs) fds_per_message.push_back(m->fds.size());
      SendReply(fd, *m, {}).IgnoreError();
    }
  });
  auto d = ConnectTo(fs);
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ((*d)->max_data_xfer(), 4096u);
  EXPECT_EQ((*d)->server_caps().max_msg_fds, 2u);
  // Three eventfds with max_msg_fds 2: split into two SET_IRQS messages.
  ScopedFd e1(::eventfd(0, EFD_CLOEXEC)), e2(::eventfd(0, EFD_CLOEXEC)), e3(::eventfd(0, EFD_CLOEXEC));
  int three[3] = {e1.get(), e2.get(), e3.get()};
  ASSERT_TRUE((*d)->SetIrqs(vfio::kMsixIrqIndex, 0, three).ok());
  d->reset();
  fs.Finish();
  EXPECT_EQ(fds_per_message, (std::vector<size_t>{2, 1}));
}

// One request after a good handshake; `respond` scripts the fake server's answer.
absl::Status OneRequest(std::function<void(int, const Message&)> respond,
                        std::function<absl::Status(VfioUserDevice*)> call, bool* broken,
                        int timeout_ms = 5000) {
  FakeServer fs([&](int fd) {
    FakeServerHandshake(fd);
    auto m = RecvMessage(fd, 5000);
    if (!m.ok()) return;
    respond(fd, *m);
    DrainUntilClosed(fd);
  });
  auto d = ConnectTo(fs, timeout_ms);
  EXPECT_TRUE(d.ok()) << d.status();
  if (!d.ok()) return d.status();
  absl::Status s = call(d->get());
  *broken = (*d)->broken();
  d->reset();
  return s;
}

absl::Status GetInfoCall(VfioUserDevice* d) { return d->GetInfo().status(); }

TEST(HostileServer, ReplyWithWrongIdOrCommand) {
  bool broken = false;
  absl::Status s = OneRequest(
      [](int fd, const Message& req) {
        Message other;
        other.hdr = req.hdr;
        other.hdr.msg_id ^= 0x55;
        DeviceInfoPayload p{16, 0, 1, 1};
        SendReply(fd, other, Bytes(p)).IgnoreError();
      },
      GetInfoCall, &broken);
  EXPECT_TRUE(absl::IsDataLoss(s)) << s;
  EXPECT_NE(s.message().find("unexpected reply"), absl::string_view::npos) << s;
  EXPECT_TRUE(broken);

  s = OneRequest(
      [](int fd, const Message& req) {
        Message other;
        other.hdr = req.hdr;
        other.hdr.command = kCmdDeviceReset;
        SendReply(fd, other, {}).IgnoreError();
      },
      GetInfoCall, &broken);
  EXPECT_TRUE(absl::IsDataLoss(s)) << s;
  EXPECT_TRUE(broken);
}

TEST(HostileServer, ErrorReplyCarriesErrno) {
  bool broken = true;
  absl::Status s = OneRequest(
      [](int fd, const Message& req) { SendErrorReply(fd, req, EPERM).IgnoreError(); },
      GetInfoCall, &broken);
  EXPECT_TRUE(absl::IsPermissionDenied(s)) << s;
  EXPECT_NE(s.message().find("Operation not permitted"), absl::string_view::npos) << s;
  EXPECT_NE(s.message().find("DEVICE_GET_INFO"), absl::string_view::npos) << s;
  EXPECT_FALSE(broken);
  // A nonsense errno becomes EIO rather than something arbitrary.
  s = OneRequest(
      [](int fd, const Message& req) { SendErrorReply(fd, req, 0xffffff).IgnoreError(); },
      GetInfoCall, &broken);
  EXPECT_NE(s.message().find("Input/output error"), absl::string_view::npos) << s;
}

TEST(HostileServer, ClosedMidRequestOrMidMessage) {
  bool broken = false;
  absl::Status s = OneRequest([](int fd, const Message&) { ::shutdown(fd, SHUT_RDWR); },
                              GetInfoCall, &broken);
  EXPECT_TRUE(absl::IsUnavailable(s)) << s;
  EXPECT_NE(s.message().find("server closed the connection"), absl::string_view::npos) << s;
  EXPECT_TRUE(broken);
  s = OneRequest(
      [](int fd, const Message& req) {
        Header h = MakeHeader(req.hdr.msg_id, req.hdr.command, kFlagTypeReply);
        h.msg_size = 32;
        ::send(fd, &h, 10, MSG_NOSIGNAL);
        ::shutdown(fd, SHUT_RDWR);
      },
      GetInfoCall, &broken);
  EXPECT_TRUE(absl::IsUnavailable(s)) << s;
  EXPECT_TRUE(broken);
}

TEST(HostileServer, NoReplyTimesOut) {
  bool broken = false;
  absl::Status s = OneRequest([](int, const Message&) {}, GetInfoCall, &broken, 100);
  EXPECT_TRUE(absl::IsDeadlineExceeded(s)) << s;
  EXPECT_TRUE(broken);
}

TEST(HostileServer, EndlessServerCommandsStillTimeOut) {
  bool broken = false;
  absl::Status s = OneRequest(
      [](int fd, const Message&) {
        // Keep the client busy with DMA_READs it must refuse, never answering its request.
        for (uint16_t id = 0; id < 60000; ++id) {
          if (!SendCmd(fd, id, kCmdDmaRead, Bytes(DmaAccessPayload{0, 8})).ok()) return;
          if (!RecvMessage(fd, 5000).ok()) return;
        }
      },
      GetInfoCall, &broken, 200);
  EXPECT_TRUE(absl::IsDeadlineExceeded(s)) << s;
  EXPECT_TRUE(broken);
}

TEST(HostileServer, OversizedOrUndersizedReplyHeader) {
  for (uint32_t size : {0x7fffffffu, 4u}) {
    bool broken = false;
    absl::Status s = OneRequest(
        [size](int fd, const Message& req) {
          Header h = MakeHeader(req.hdr.msg_id, req.hdr.command, kFlagTypeReply);
          h.msg_size = size;
          ::send(fd, &h, sizeof(h), MSG_NOSIGNAL);
        },
        GetInfoCall, &broken);
    EXPECT_TRUE(absl::IsDataLoss(s)) << s;
    EXPECT_TRUE(broken);
  }
}

TEST(HostileServer, ShortOrImplausibleInfoReplies) {
  bool broken = false;
  absl::Status s = OneRequest(
      [](int fd, const Message& req) {
        uint32_t short_payload[2] = {16, 0};
        SendReply(fd, req, {reinterpret_cast<uint8_t*>(short_payload), 8}).IgnoreError();
      },
      GetInfoCall, &broken);
  EXPECT_TRUE(absl::IsDataLoss(s)) << s;
  s = OneRequest(
      [](int fd, const Message& req) {
        DeviceInfoPayload p{16, 0, 0xffffffff, 1};
        SendReply(fd, req, Bytes(p)).IgnoreError();
      },
      GetInfoCall, &broken);
  EXPECT_TRUE(absl::IsDataLoss(s)) << s;
  s = OneRequest(
      [](int fd, const Message& req) {
        IrqInfoPayload p{16, 0, 5, 1};  // index differs from the request's
        SendReply(fd, req, Bytes(p)).IgnoreError();
      },
      [](VfioUserDevice* d) { return d->GetIrqInfo(2).status(); }, &broken);
  EXPECT_TRUE(absl::IsDataLoss(s)) << s;
}

TEST(HostileServer, UnexpectedFdInReply) {
  bool broken = false;
  absl::Status s = OneRequest(
      [](int fd, const Message& req) {
        ScopedFd e(::eventfd(0, EFD_CLOEXEC));
        int f[1] = {e.get()};
        DeviceInfoPayload p{16, 0, 1, 1};
        SendReply(fd, req, Bytes(p), f).IgnoreError();
      },
      GetInfoCall, &broken);
  EXPECT_TRUE(absl::IsDataLoss(s)) << s;
}

// Region info replies: every malformed capability layout is refused.
std::vector<uint8_t> RegionInfoReply(uint32_t flags, uint64_t size, uint32_t cap_offset,
                                     std::vector<uint8_t> caps, uint32_t argsz_override = 0) {
  PayloadBuilder b;
  uint32_t argsz = static_cast<uint32_t>(sizeof(RegionInfoPayload) + caps.size());
  b.Add(RegionInfoPayload{argsz_override ? argsz_override : argsz, flags, 0, cap_offset, size, 0});
  b.AddBytes(caps);
  return b.bytes();
}
std::vector<uint8_t> SparseCap(uint32_t next, uint32_t nr, std::vector<SparseMmapArea> areas) {
  PayloadBuilder b;
  b.Add(CapHeader{kCapSparseMmap, 1, next}).Add(SparseMmapCap{nr, 0});
  for (auto& a : areas) b.Add(a);
  return b.bytes();
}

TEST(HostileServer, MalformedRegionInfo) {
  const uint32_t rwmc = kRegionFlagRead | kRegionFlagWrite | kRegionFlagMmap | kRegionFlagCaps;
  struct Case {
    const char* what;
    std::vector<uint8_t> payload;
    bool with_fd;
  };
  std::vector<Case> cases = {
      {"cap chain loops", RegionInfoReply(rwmc, 0x2000, 32, SparseCap(32, 1, {{0, 0x1000}})), true},
      {"cap offset beyond payload", RegionInfoReply(rwmc, 0x2000, 4096, {}), true},
      {"cap offset inside header", RegionInfoReply(rwmc, 0x2000, 8, SparseCap(0, 0, {})), true},
      {"too many areas", RegionInfoReply(rwmc, 0x2000, 32, SparseCap(0, 1000000, {{0, 0x1000}})), true},
      {"area outside region",
       RegionInfoReply(rwmc, 0x2000, 32, SparseCap(0, 1, {{0x1000, ~0ull - 10}})), true},
      {"mappable without fd", RegionInfoReply(rwmc, 0x2000, 32, SparseCap(0, 1, {{0, 0x1000}})), false},
      {"fd on non-mappable", RegionInfoReply(kRegionFlagRead, 0x2000, 0, {}), true},
      {"argsz larger than allowed", RegionInfoReply(kRegionFlagRead, 0x1000, 0, {}, 1 << 30), false},
      {"too short", std::vector<uint8_t>(20, 0), false},
  };
  for (const auto& c : cases) {
    bool broken = false;
    absl::Status s = OneRequest(
        [&](int fd, const Message& req) {
          ScopedFd memfd(::memfd_create("r", MFD_CLOEXEC));
          int f[1] = {memfd.get()};
          SendReply(fd, req, c.payload, c.with_fd ? std::span<const int>(f) : std::span<const int>())
              .IgnoreError();
        },
        [](VfioUserDevice* d) { return d->GetRegionInfo(0).status(); }, &broken);
    EXPECT_TRUE(absl::IsDataLoss(s)) << c.what << ": " << s;
  }
}

TEST(HostileServer, MalformedRegionReadReplies) {
  struct Case {
    const char* what;
    RegionAccessPayload hdr;
    size_t data;
  };
  std::vector<Case> cases = {
      {"short count", {0, 0, 2}, 2},
      {"wrong offset", {8, 0, 4}, 4},
      {"wrong region", {0, 1, 4}, 4},
      {"more data than asked", {0, 0, 4}, 64},
      {"missing data", {0, 0, 4}, 0},
  };
  for (const auto& c : cases) {
    bool broken = false;
    absl::Status s = OneRequest(
        [&](int fd, const Message& req) {
          PayloadBuilder b;
          b.Add(c.hdr).AddZeros(c.data);
          SendReply(fd, req, b.span()).IgnoreError();
        },
        [](VfioUserDevice* d) {
          uint8_t buf[4];
          return d->RegionRead(0, 0, buf);
        },
        &broken);
    EXPECT_TRUE(absl::IsDataLoss(s)) << c.what << ": " << s;
  }
}

TEST(HostileServer, MalformedMigrationAndDirtyReplies) {
  bool broken = false;
  absl::Status s = OneRequest(
      [](int fd, const Message& req) {
        PayloadBuilder b;
        b.Add(MigDataPayload{8 + 64, 64}).AddZeros(64);  // more than the 16 asked for
        SendReply(fd, req, b.span()).IgnoreError();
      },
      [](VfioUserDevice* d) {
        uint8_t buf[16];
        return d->ReadMigData(buf).status();
      },
      &broken);
  EXPECT_TRUE(absl::IsDataLoss(s)) << s;
  s = OneRequest(
      [](int fd, const Message& req) {
        PayloadBuilder b;
        b.Add(FeaturePayload{0, req.payload[4] | 0u | (kFeatureGet | kFeatureDmaLoggingReport)})
            .Add(DmaLoggingReport{0, 64 * 4096, 4096});  // bitmap missing
        SendReply(fd, req, b.span()).IgnoreError();
      },
      [](VfioUserDevice* d) {
        uint64_t bm[1] = {0};
        return d->ReportDmaDirty(0, 64 * 4096, 4096, bm);
      },
      &broken);
  EXPECT_TRUE(absl::IsDataLoss(s)) << s;
  s = OneRequest(
      [](int fd, const Message& req) {
        PayloadBuilder b;
        b.Add(FeaturePayload{16, kFeatureGet | kFeatureMigDeviceState})
            .Add(MigDeviceStateData{99, 0});
        SendReply(fd, req, b.span()).IgnoreError();
      },
      [](VfioUserDevice* d) { return d->GetMigState().status(); }, &broken);
  EXPECT_TRUE(absl::IsDataLoss(s)) << s;
  s = OneRequest(  // SET acknowledged with a different state than asked
      [](int fd, const Message& req) {
        PayloadBuilder b;
        b.Add(FeaturePayload{16, kFeatureSet | kFeatureMigDeviceState})
            .Add(MigDeviceStateData{static_cast<uint32_t>(vfio::MigState::kRunning), 0});
        SendReply(fd, req, b.span()).IgnoreError();
      },
      [](VfioUserDevice* d) { return d->SetMigState(vfio::MigState::kStop); }, &broken);
  EXPECT_TRUE(absl::IsDataLoss(s)) << s;
}

TEST(HostileServerHandshake, ErrorReplyToVersionIsRefusal) {
  FakeServer fs([](int fd) {
    auto m = RecvMessage(fd, 5000);
    ASSERT_TRUE(m.ok());
    SendErrorReply(fd, *m, ENOTSUP).IgnoreError();
    DrainUntilClosed(fd);
  });
  auto d = ConnectTo(fs);
  EXPECT_TRUE(absl::IsFailedPrecondition(d.status())) << d.status();
}

TEST(HostileServer, ServerInitiatedDmaIsServedOnlyInsideFdlessMappings) {
  std::vector<uint8_t> mem(8192, 0);
  for (int i = 0; i < 16; ++i) mem[100 + i] = static_cast<uint8_t>(0xa0 + i);
  FakeServer fs([&](int fd) {
    FakeServerHandshake(fd);
    auto map = RecvMessage(fd, 5000);
    ASSERT_TRUE(map.ok());
    ASSERT_EQ(map->hdr.command, kCmdDmaMap);
    EXPECT_TRUE(map->fds.empty());  // no fd: the server must go through the socket
    ASSERT_TRUE(SendReply(fd, *map, {}).ok());
    auto req = RecvMessage(fd, 5000);
    ASSERT_TRUE(req.ok());
    // DMA_WRITE 4 bytes at iova 0x5008.
    PayloadBuilder w;
    w.Add(DmaAccessPayload{0x5008, 4}).AddBytes(std::vector<uint8_t>{1, 2, 3, 4});
    ASSERT_TRUE(SendCmd(fd, 900, kCmdDmaWrite, w.span()).ok());
    auto wr = RecvMessage(fd, 5000);
    ASSERT_TRUE(wr.ok());
    EXPECT_FALSE(wr->is_error());
    EXPECT_EQ(wr->hdr.msg_id, 900);
    // DMA_READ 16 bytes at iova 0x5000 + 100.
    ASSERT_TRUE(SendCmd(fd, 901, kCmdDmaRead, Bytes(DmaAccessPayload{0x5064, 16})).ok());
    auto rd = RecvMessage(fd, 5000);
    ASSERT_TRUE(rd.ok());
    ASSERT_FALSE(rd->is_error());
    ASSERT_EQ(rd->payload.size(), sizeof(DmaAccessPayload) + 16);
    EXPECT_EQ(rd->payload[sizeof(DmaAccessPayload)], 0xa0);
    EXPECT_EQ(rd->payload[sizeof(DmaAccessPayload) + 15], 0xaf);
    // Outside the mapping, zero length, and a length mismatch: refused.
    PayloadBuilder out;
    out.Add(DmaAccessPayload{0x5000 + 8190, 4}).AddZeros(4);
    ASSERT_TRUE(SendCmd(fd, 902, kCmdDmaWrite, out.span()).ok());
    ASSERT_TRUE(SendCmd(fd, 903, kCmdDmaRead, Bytes(DmaAccessPayload{0x5000, 0})).ok());
    PayloadBuilder mism;
    mism.Add(DmaAccessPayload{0x5000, 100}).AddZeros(4);
    ASSERT_TRUE(SendCmd(fd, 904, kCmdDmaWrite, mism.span()).ok());
    ASSERT_TRUE(SendCmd(fd, 905, kCmdRegionRead, {}).ok());  // not a server->client command
    for (int id = 902; id <= 905; ++id) {
      auto e = RecvMessage(fd, 5000);
      ASSERT_TRUE(e.ok());
      EXPECT_EQ(e->hdr.msg_id, id);
      EXPECT_TRUE(e->is_error()) << id;
    }
    DeviceInfoPayload p{16, kDeviceFlagPci, 9, 5};
    ASSERT_TRUE(SendReply(fd, *req, Bytes(p)).ok());
    DrainUntilClosed(fd);
  });
  auto d = ConnectTo(fs);
  ASSERT_TRUE(d.ok()) << d.status();
  ASSERT_TRUE((*d)->DmaMap(0x5000, mem.size(), mem.data(), -1, 0, true).ok());
  auto info = (*d)->GetInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->num_regions, 9u);
  EXPECT_EQ(mem[8], 1);
  EXPECT_EQ(mem[11], 4);
  EXPECT_EQ(mem[8191], 0);
  d->reset();
}

}  // namespace
}  // namespace microvmm::vfio_user::testing
