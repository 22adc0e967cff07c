// Deterministic random-mutation tests: thousands of structurally plausible but corrupted
// messages in each direction. Pass = no crash, no hang, and the peer is still usable after.
#include <random>
#include <vector>

#include "tests/vfio/user/test_util.h"

namespace microvmm::vfio_user::testing {
namespace {

namespace td = testdev;

// A valid-looking payload for `cmd`, then mutated.
std::vector<uint8_t> Mutated(std::mt19937_64& rng, uint16_t cmd) {
  PayloadBuilder b;
  auto small = [&](uint64_t n) { return rng() % n; };
  switch (cmd) {
    case kCmdDmaMap: b.Add(DmaMapPayload{32, uint32_t(small(4)), small(1 << 20), small(1 << 24), small(1 << 20)}); break;
    case kCmdDmaUnmap: b.Add(DmaUnmapPayload{24, 0, small(1 << 24), small(1 << 20)}); break;
    case kCmdDeviceGetInfo: b.Add(DeviceInfoPayload{16, 0, 0, 0}); break;
    case kCmdDeviceGetRegionInfo: b.Add(RegionInfoPayload{uint32_t(small(200)), 0, uint32_t(small(12)), 0, 0, 0}); break;
    case kCmdDeviceGetIrqInfo: b.Add(IrqInfoPayload{16, 0, uint32_t(small(8)), 0}); break;
    case kCmdDeviceSetIrqs:
      b.Add(IrqSetPayload{20, uint32_t(1u << small(3)) | uint32_t(8u << small(3)), uint32_t(small(6)),
                          uint32_t(small(6)), uint32_t(small(6))});
      b.AddZeros(small(8));
      break;
    case kCmdRegionRead:
    case kCmdRegionWrite: {
      uint32_t count = 1u << small(4);
      b.Add(RegionAccessPayload{small(0x2100), uint32_t(small(9)), count});
      if (cmd == kCmdRegionWrite) {
        for (uint32_t i = 0; i < count; ++i) b.Add(uint8_t(rng()));
      }
      break;
    }
    case kCmdDeviceFeature: {
      b.Add(FeaturePayload{uint32_t(small(256)),
                           uint32_t(small(10)) | uint32_t((1u << 16) << small(3))});
      const int kind = small(3);
      if (kind == 0) b.Add(MigDeviceStateData{uint32_t(small(9)), 0});
      if (kind == 1) b.Add(DmaLoggingControl{uint64_t{1} << (9 + small(8)), uint32_t(small(3)), 0}).Add(DmaLoggingRange{small(1 << 22), small(1 << 20)});
      if (kind == 2) b.Add(DmaLoggingReport{small(1 << 22), small(1 << 22), uint64_t{1} << (9 + small(8))});
      break;
    }
    case kCmdMigDataRead: b.Add(MigDataPayload{uint32_t(small(9000)), uint32_t(small(9000))}); break;
    case kCmdMigDataWrite: {
      uint32_t n = small(64);
      b.Add(MigDataPayload{8, n}).AddZeros(n);
      break;
    }
    default: b.AddZeros(small(40)); break;
  }
  std::vector<uint8_t> v = b.bytes();
  // Mutations: flip bytes, truncate, extend.
  const int flips = small(4);
  for (int i = 0; i < flips && !v.empty(); ++i) v[small(v.size())] = uint8_t(rng());
  if (small(6) == 0 && !v.empty()) v.resize(small(v.size()));
  if (small(6) == 0) v.resize(v.size() + small(32), uint8_t(rng()));
  return v;
}

TEST(FuzzTest, RandomCommandsNeverBreakTheServer) {
  td::ServerOptions o;
  o.allow_reply_delay = false;
  InProcessServer srv(o);
  ScopedFd sock = srv.Start();
  RawHandshake(sock.get());
  GuestRam ram = GuestRam::Make();
  std::mt19937_64 rng(12345);
  const uint16_t cmds[] = {kCmdDmaMap, kCmdDmaUnmap, kCmdDeviceGetInfo, kCmdDeviceGetRegionInfo,
                           kCmdDeviceGetIrqInfo, kCmdDeviceSetIrqs, kCmdRegionRead, kCmdRegionWrite,
                           kCmdDeviceReset, kCmdDeviceFeature, kCmdMigDataRead, kCmdMigDataWrite,
                           kCmdDmaRead, 0, 99};
  int errors = 0, oks = 0;
  for (int i = 0; i < 5000; ++i) {
    const uint16_t cmd = cmds[rng() % std::size(cmds)];
    std::vector<uint8_t> p = Mutated(rng, cmd);
    std::vector<int> fds;
    if ((cmd == kCmdDmaMap || cmd == kCmdDeviceSetIrqs) && rng() % 2) fds.push_back(ram.fd.get());
    const uint16_t id = static_cast<uint16_t>(i);
    ASSERT_TRUE(SendCmd(sock.get(), id, cmd, p, fds).ok()) << i;
    // The device may DMA through the socket (fd-less mappings): refuse those, then get our reply.
    for (;;) {
      auto m = RecvMessage(sock.get(), 5000);
      ASSERT_TRUE(m.ok()) << "iteration " << i << " cmd " << cmd << ": " << m.status();
      if (!m->is_reply()) {
        ASSERT_TRUE(SendErrorReply(sock.get(), *m, EFAULT).ok());
        continue;
      }
      ASSERT_EQ(m->hdr.msg_id, id);
      ASSERT_EQ(m->hdr.command, cmd);
      (m->is_error() ? errors : oks)++;
      break;
    }
  }
  EXPECT_GT(errors, 100);
  EXPECT_GT(oks, 100);  // the mutations are not all trivially rejected
  DeviceInfoPayload gi{16, 0, 0, 0};
  ASSERT_TRUE(SendCmd(sock.get(), 1, kCmdDeviceGetInfo, Bytes(gi)).ok());
  auto m = RecvMessage(sock.get(), 5000);
  ASSERT_TRUE(m.ok());
  EXPECT_FALSE(m->is_error());
}

TEST(FuzzTest, RandomRepliesNeverCrashTheClient) {
  std::mt19937_64 rng(777);
  FakeServer fs([&](int fd) {
    FakeServerHandshake(fd);
    std::mt19937_64 r2(99);
    for (;;) {
      auto m = RecvMessage(fd, 5000);
      if (!m.ok()) return;
      // Answer with a mutation of a plausible reply: the request itself, resized and flipped.
      std::vector<uint8_t> p = m->payload;
      p.resize(r2() % 96, uint8_t(r2()));
      for (int i = 0; i < 3 && !p.empty(); ++i) p[r2() % p.size()] = uint8_t(r2());
      if (r2() % 8 == 0) {
        SendErrorReply(fd, *m, r2() % 200).IgnoreError();
      } else {
        SendReply(fd, *m, p).IgnoreError();
      }
    }
  });
  auto d = VfioUserDevice::FromSocket(fs.TakeClientEnd(), "vfio-user:fuzz");
  ASSERT_TRUE(d.ok()) << d.status();
  VfioUserDevice* dev = d->get();
  int failures = 0;
  for (int i = 0; i < 3000; ++i) {
    uint8_t buf[64];
    uint64_t bm[4] = {};
    absl::Status s;
    switch (rng() % 8) {
      case 0: s = dev->GetInfo().status(); break;
      case 1: s = dev->GetRegionInfo(rng() % 9).status(); break;
      case 2: s = dev->GetIrqInfo(rng() % 5).status(); break;
      case 3: s = dev->RegionRead(0, rng() % 64, {buf, 1 + rng() % 64}); break;
      case 4: s = dev->ReadMigData(buf).status(); break;
      case 5: s = dev->ReportDmaDirty(0, 256 * 4096, 4096, bm); break;
      case 6: s = dev->GetMigState().status(); break;
      case 7: s = dev->GetMigrationCaps().status(); break;
    }
    if (!s.ok()) ++failures;
    ASSERT_FALSE(dev->broken()) << i << ": " << s;  // id/command are right: payload errors only
  }
  EXPECT_GT(failures, 1000);
  d->reset();
}

}  // namespace
}  // namespace microvmm::vfio_user::testing
