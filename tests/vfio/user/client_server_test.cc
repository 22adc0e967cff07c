// Client <-> test server in one process (server thread on a socketpair).
#include <sys/eventfd.h>

#include <vector>

#include "tests/vfio/user/test_util.h"

namespace microvmm::vfio_user::testing {
namespace {

using vfio::MigState;
namespace td = testdev;

class ClientServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ram_ = GuestRam::Make();
    dev_ = srv_.Connect();
    ASSERT_NE(dev_, nullptr);
  }
  void MapRam(vfio::VfioDevice* d) {
    ASSERT_TRUE(d->DmaMap(kGuestIova, kGuestSize, ram_.map.get(), ram_.fd.get(), 0, true).ok());
  }
  void TearDown() override {
    dev_.reset();
    srv_.Join();
  }
  InProcessServer srv_;
  GuestRam ram_;
  std::unique_ptr<VfioUserDevice> dev_;
};

TEST_F(ClientServerTest, InfoRegionsIrqs) {
  auto info = dev_->GetInfo();
  ASSERT_TRUE(info.ok()) << info.status();
  EXPECT_EQ(info->num_regions, 9u);
  EXPECT_EQ(info->num_irqs, 5u);
  EXPECT_TRUE(info->is_pci);
  EXPECT_TRUE(info->can_reset);

  auto bar0 = dev_->GetRegionInfo(vfio::kBar0RegionIndex);
  ASSERT_TRUE(bar0.ok()) << bar0.status();
  EXPECT_EQ(bar0->size, td::kBar0Size);
  EXPECT_TRUE(bar0->readable && bar0->writable && bar0->mappable);
  ASSERT_EQ(bar0->mmap_areas.size(), 1u);
  EXPECT_EQ(bar0->mmap_areas[0].offset, td::kScratchOffset);
  EXPECT_EQ(bar0->mmap_areas[0].size, td::kScratchSize);

  auto bar2 = dev_->GetRegionInfo(2);
  ASSERT_TRUE(bar2.ok());
  EXPECT_EQ(bar2->size, td::kBar2Size);
  EXPECT_FALSE(bar2->mappable);
  auto cfg = dev_->GetRegionInfo(vfio::kConfigRegionIndex);
  ASSERT_TRUE(cfg.ok());
  EXPECT_EQ(cfg->size, td::kConfigSize);
  auto bar1 = dev_->GetRegionInfo(1);
  ASSERT_TRUE(bar1.ok());
  EXPECT_EQ(bar1->size, 0u);

  auto bad = dev_->GetRegionInfo(9);
  EXPECT_TRUE(absl::IsInvalidArgument(bad.status())) << bad.status();
  EXPECT_FALSE(dev_->broken());  // an error reply is not a transport failure

  auto msix = dev_->GetIrqInfo(vfio::kMsixIrqIndex);
  ASSERT_TRUE(msix.ok());
  EXPECT_EQ(msix->count, td::kMsixVectors);
  EXPECT_TRUE(msix->eventfd);
  auto intx = dev_->GetIrqInfo(vfio::kIntxIrqIndex);
  ASSERT_TRUE(intx.ok());
  EXPECT_EQ(intx->count, 0u);
  EXPECT_FALSE(dev_->GetIrqInfo(7).ok());
}

TEST_F(ClientServerTest, ConfigAndRegionReadWrite) {
  uint8_t id[4];
  ASSERT_TRUE(dev_->RegionRead(vfio::kConfigRegionIndex, 0, id).ok());
  EXPECT_EQ(id[0] | id[1] << 8, td::kVendorId);
  EXPECT_EQ(id[2] | id[3] << 8, td::kDeviceId);
  // BAR sizing through config space: write all ones, read back the size mask.
  uint32_t ones = 0xffffffff, bar = 0;
  ASSERT_TRUE(dev_->RegionWrite(vfio::kConfigRegionIndex, 0x10, Bytes(ones)).ok());
  ASSERT_TRUE(dev_->RegionRead(vfio::kConfigRegionIndex, 0x10,
                               {reinterpret_cast<uint8_t*>(&bar), 4}).ok());
  EXPECT_EQ(bar, static_cast<uint32_t>(~(td::kBar0Size - 1)));
  // Vendor id is read-only.
  uint16_t junk = 0xdead;
  ASSERT_TRUE(dev_->RegionWrite(vfio::kConfigRegionIndex, 0, Bytes(junk)).ok());
  ASSERT_TRUE(dev_->RegionRead(vfio::kConfigRegionIndex, 0, id).ok());
  EXPECT_EQ(id[0] | id[1] << 8, td::kVendorId);

  ASSERT_TRUE(WriteReg(dev_.get(), td::kRegScratch, 0x1122334455667788ull).ok());
  EXPECT_EQ(ReadReg(dev_.get(), td::kRegScratch), 0x1122334455667788ull);
  ASSERT_TRUE(WriteReg(dev_.get(), td::kRegCompleted, 99).ok());  // read-only register
  EXPECT_EQ(ReadReg(dev_.get(), td::kRegCompleted), 0u);

  // Out of range and misaligned accesses are errors, and the connection survives them.
  uint8_t buf[8];
  EXPECT_FALSE(dev_->RegionRead(vfio::kBar0RegionIndex, td::kBar0Size - 4, buf).ok());
  EXPECT_FALSE(dev_->RegionRead(vfio::kBar0RegionIndex, 3, {buf, 4}).ok());
  EXPECT_FALSE(dev_->RegionRead(5, 0, {buf, 4}).ok());
  EXPECT_FALSE(dev_->broken());
  EXPECT_EQ(ReadReg(dev_.get(), td::kRegScratch), 0x1122334455667788ull);
}

TEST(ClientServerChunking, LargeAccessesAreSplitByMaxXfer) {
  InProcessServer srv;
  ClientOptions o;
  o.max_data_xfer_size = 512;
  auto dev = srv.Connect(o);
  ASSERT_NE(dev, nullptr);
  EXPECT_EQ(dev->max_data_xfer(), 512u);
  std::vector<uint8_t> out(td::kScratchSize), in(td::kScratchSize);
  for (size_t i = 0; i < out.size(); ++i) out[i] = static_cast<uint8_t>(i * 7 + 3);
  ASSERT_TRUE(dev->RegionWrite(vfio::kBar0RegionIndex, td::kScratchOffset, out).ok());
  ASSERT_TRUE(dev->RegionRead(vfio::kBar0RegionIndex, td::kScratchOffset, in).ok());
  EXPECT_EQ(in, out);
}

TEST_F(ClientServerTest, MapRegionSharesScratchPage) {
  ASSERT_TRUE(dev_->GetRegionInfo(vfio::kBar0RegionIndex).ok());
  auto m = dev_->MapRegion(vfio::kBar0RegionIndex, td::kScratchOffset, td::kScratchSize);
  ASSERT_TRUE(m.ok()) << m.status();
  auto* p = static_cast<uint8_t*>(m->get());
  p[10] = 0x5a;
  uint8_t b[4];
  ASSERT_TRUE(dev_->RegionRead(vfio::kBar0RegionIndex, td::kScratchOffset + 8, b).ok());
  EXPECT_EQ(b[2], 0x5a);
  uint8_t w[4] = {1, 2, 3, 4};
  ASSERT_TRUE(dev_->RegionWrite(vfio::kBar0RegionIndex, td::kScratchOffset + 100, w).ok());
  EXPECT_EQ(p[103], 4);
  // The register page is not in an mmap area; BAR2 is not mappable at all.
  EXPECT_TRUE(absl::IsOutOfRange(dev_->MapRegion(vfio::kBar0RegionIndex, 0, 4096).status()));
  EXPECT_FALSE(dev_->MapRegion(2, 0, 4096).ok());
}

TEST_F(ClientServerTest, DmaFillAndCopyVisibleInMemfd) {
  MapRam(dev_.get());
  EXPECT_EQ(srv_.server()->num_dma_mappings(), 1u);
  uint8_t* ram = ram_.at(kGuestIova);
  ASSERT_TRUE(StartFill(dev_.get(), kGuestIova + 0x3000, 0x1800, 0xab).ok());
  EXPECT_EQ(ReadReg(dev_.get(), td::kRegStatus), td::kStatusDone);
  for (uint64_t i = 0; i < kGuestSize; ++i) {
    const bool in = i >= 0x3000 && i < 0x4800;
    ASSERT_EQ(ram[i], in ? 0xab : 0) << i;
  }
  for (int i = 0; i < 256; ++i) ram[0x10000 + i] = static_cast<uint8_t>(i);
  ASSERT_TRUE(StartCopy(dev_.get(), kGuestIova + 0x10000, kGuestIova + 0x20010, 256).ok());
  for (int i = 0; i < 256; ++i) ASSERT_EQ(ram[0x20010 + i], i);
  EXPECT_EQ(ReadReg(dev_.get(), td::kRegCompleted), 2u);

  // DMA that leaves the mapping fails inside the device and writes nothing.
  ASSERT_TRUE(StartFill(dev_.get(), kGuestIova + kGuestSize - 16, 32, 0xcc).ok());
  EXPECT_EQ(ReadReg(dev_.get(), td::kRegStatus), td::kStatusError);
  EXPECT_EQ(ram[kGuestSize - 1], 0);
  ASSERT_TRUE(StartFill(dev_.get(), 0, 16, 0xcc).ok());  // unmapped iova
  EXPECT_EQ(ReadReg(dev_.get(), td::kRegStatus), td::kStatusError);
  EXPECT_EQ(ReadReg(dev_.get(), td::kRegCompleted), 2u);
}

TEST_F(ClientServerTest, DmaMapUnmapRules) {
  MapRam(dev_.get());
  // Overlap is refused (client-side check, before the wire).
  EXPECT_TRUE(absl::IsAlreadyExists(
      dev_->DmaMap(kGuestIova + 4096, 4096, ram_.map.get(), ram_.fd.get(), 0, true)));
  EXPECT_TRUE(absl::IsNotFound(dev_->DmaUnmap(kGuestIova, 4096)));
  ASSERT_TRUE(dev_->DmaUnmap(kGuestIova, kGuestSize).ok());
  EXPECT_EQ(srv_.server()->num_dma_mappings(), 0u);
  ASSERT_TRUE(StartFill(dev_.get(), kGuestIova, 16, 1).ok());
  EXPECT_EQ(ReadReg(dev_.get(), td::kRegStatus), td::kStatusError);
  // Read-only mapping: the device may read (copy source) but not write.
  ASSERT_TRUE(dev_->DmaMap(kGuestIova, kGuestSize, ram_.map.get(), ram_.fd.get(), 0, false).ok());
  ASSERT_TRUE(StartFill(dev_.get(), kGuestIova, 16, 1).ok());
  EXPECT_EQ(ReadReg(dev_.get(), td::kRegStatus), td::kStatusError);
  EXPECT_EQ(ram_.at(kGuestIova)[0], 0);
  // Mapping at a non-zero, non-page-aligned fd offset.
  ASSERT_TRUE(dev_->DmaMap(0x10000000, 8192, nullptr, ram_.fd.get(), 0x2100, true).ok());
  ASSERT_TRUE(StartFill(dev_.get(), 0x10000000, 4, 0x77).ok());
  EXPECT_EQ(ReadReg(dev_.get(), td::kRegStatus), td::kStatusDone);
  EXPECT_EQ(ram_.at(kGuestIova)[0x2100], 0x77);
  EXPECT_EQ(ram_.at(kGuestIova)[0x20ff], 0);
}

TEST(ClientServerSocketDma, FdlessMappingUsesDmaReadWriteMessages) {
  InProcessServer srv;
  ClientOptions o;
  o.max_data_xfer_size = 512;  // forces the server to split its DMA messages
  auto dev = srv.Connect(o);
  ASSERT_NE(dev, nullptr);
  std::vector<uint8_t> mem(64 * 1024, 0);
  ASSERT_TRUE(dev->DmaMap(0x40000, mem.size(), mem.data(), -1, 0, true).ok());
  vfio::DmaRange range{0x40000, mem.size()};
  ASSERT_TRUE(dev->StartDmaLogging({&range, 1}, kPage).ok());
  ASSERT_TRUE(StartFill(dev.get(), 0x40000 + 100, 3000, 0xe5).ok());
  EXPECT_EQ(ReadReg(dev.get(), td::kRegStatus), td::kStatusDone);
  EXPECT_EQ(mem[99], 0);
  EXPECT_EQ(mem[100], 0xe5);
  EXPECT_EQ(mem[3099], 0xe5);
  EXPECT_EQ(mem[3100], 0);
  for (int i = 0; i < 2000; ++i) mem[0x8000 + i] = static_cast<uint8_t>(i * 13);
  ASSERT_TRUE(StartCopy(dev.get(), 0x40000 + 0x8000, 0x40000 + 0xc001, 2000).ok());
  EXPECT_EQ(ReadReg(dev.get(), td::kRegStatus), td::kStatusDone);
  for (int i = 0; i < 2000; ++i) ASSERT_EQ(mem[0xc001 + i], static_cast<uint8_t>(i * 13)) << i;
  std::vector<uint64_t> bm(1, 0);
  ASSERT_TRUE(dev->ReportDmaDirty(0x40000, mem.size(), kPage, bm).ok());
  EXPECT_EQ(bm[0], 0b1'0000'0000'0001u);  // page 0 (fill) and page 12 (copy destination)
  // Past the end of the mapping: refused by the client, reported as a DMA error.
  ASSERT_TRUE(StartFill(dev.get(), 0x40000 + mem.size() - 4, 8, 1).ok());
  EXPECT_EQ(ReadReg(dev.get(), td::kRegStatus), td::kStatusError);
  EXPECT_FALSE(dev->broken());
}

uint64_t ReadEventfd(int fd) {
  uint64_t v = 0;
  if (::read(fd, &v, 8) != 8) return 0;
  return v;
}

TEST_F(ClientServerTest, MsixEventfdFiresAndRespectsMask) {
  MapRam(dev_.get());
  ScopedFd efd(::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC));
  int fds[1] = {efd.get()};
  ASSERT_TRUE(dev_->SetIrqs(vfio::kMsixIrqIndex, 0, fds).ok());
  // MSI-X disabled (config) -> pending, no signal.
  ASSERT_TRUE(StartFill(dev_.get(), kGuestIova, 8, 1).ok());
  EXPECT_EQ(ReadEventfd(efd.get()), 0u);
  uint64_t pba = 0;
  ASSERT_TRUE(dev_->RegionRead(2, td::kMsixPbaOffset, {reinterpret_cast<uint8_t*>(&pba), 8}).ok());
  EXPECT_EQ(pba, 1u);
  // Enable MSI-X; vector 0 is still masked in the table.
  uint16_t ctl = 0x8000;
  ASSERT_TRUE(dev_->RegionWrite(vfio::kConfigRegionIndex, td::kMsixCapOffset + 2, Bytes(ctl)).ok());
  EXPECT_EQ(ReadEventfd(efd.get()), 0u);
  // Unmask vector 0: the pending interrupt is delivered.
  uint32_t vctl = 0;
  ASSERT_TRUE(dev_->RegionWrite(2, 12, Bytes(vctl)).ok());
  EXPECT_EQ(ReadEventfd(efd.get()), 1u);
  ASSERT_TRUE(dev_->RegionRead(2, td::kMsixPbaOffset, {reinterpret_cast<uint8_t*>(&pba), 8}).ok());
  EXPECT_EQ(pba, 0u);
  // Next completion signals directly.
  ASSERT_TRUE(StartFill(dev_.get(), kGuestIova, 8, 2).ok());
  EXPECT_EQ(ReadEventfd(efd.get()), 1u);
  // Disconnect vector 0 (-1) -> no signal, pending instead.
  int none[1] = {-1};
  ASSERT_TRUE(dev_->SetIrqs(vfio::kMsixIrqIndex, 0, none).ok());
  ASSERT_TRUE(StartFill(dev_.get(), kGuestIova, 8, 3).ok());
  EXPECT_EQ(ReadEventfd(efd.get()), 0u);
  // Reconnect and disable the whole index.
  ASSERT_TRUE(dev_->SetIrqs(vfio::kMsixIrqIndex, 0, fds).ok());
  EXPECT_EQ(ReadEventfd(efd.get()), 0u);  // delivery happens on an unmask, not on assignment
  ASSERT_TRUE(dev_->SetIrqs(vfio::kMsixIrqIndex, 0, {}).ok());
  ASSERT_TRUE(StartFill(dev_.get(), kGuestIova, 8, 4).ok());
  EXPECT_EQ(ReadEventfd(efd.get()), 0u);
  // Out-of-range vectors and unsupported indices are errors.
  int four[4] = {efd.get(), efd.get(), efd.get(), efd.get()};
  EXPECT_FALSE(dev_->SetIrqs(vfio::kMsixIrqIndex, 1, four).ok());
  EXPECT_FALSE(dev_->SetIrqs(vfio::kMsiIrqIndex, 0, fds).ok());
  EXPECT_FALSE(dev_->SetIrqUnmaskFd(vfio::kIntxIrqIndex, efd.get()).ok());
  EXPECT_FALSE(dev_->broken());
}

TEST_F(ClientServerTest, ResetClearsDeviceState) {
  MapRam(dev_.get());
  ASSERT_TRUE(WriteReg(dev_.get(), td::kRegScratch, 42).ok());
  ASSERT_TRUE(StartFill(dev_.get(), kGuestIova, 8, 1).ok());
  EXPECT_EQ(ReadReg(dev_.get(), td::kRegCompleted), 1u);
  ASSERT_TRUE(dev_->Reset().ok());
  EXPECT_EQ(ReadReg(dev_.get(), td::kRegScratch), 0u);
  EXPECT_EQ(ReadReg(dev_.get(), td::kRegCompleted), 0u);
  // DMA mappings survive a device reset (they belong to the IOMMU, not the device).
  ASSERT_TRUE(StartFill(dev_.get(), kGuestIova, 8, 1).ok());
  EXPECT_EQ(ReadReg(dev_.get(), td::kRegStatus), td::kStatusDone);
}

std::vector<uint8_t> ReadAllMigData(vfio::VfioDevice* d) {
  std::vector<uint8_t> blob;
  uint8_t buf[1000];  // deliberately not a divisor of the blob size
  for (;;) {
    auto n = d->ReadMigData(buf);
    EXPECT_TRUE(n.ok()) << n.status();
    if (!n.ok() || *n == 0) break;
    blob.insert(blob.end(), buf, buf + *n);
  }
  return blob;
}

TEST_F(ClientServerTest, MigrationSaveRestoreIntoSecondServer) {
  MapRam(dev_.get());
  auto caps = dev_->GetMigrationCaps();
  ASSERT_TRUE(caps.ok()) << caps.status();
  EXPECT_TRUE(caps->supported);
  EXPECT_TRUE(caps->pre_copy);
  EXPECT_TRUE(caps->dma_logging);
  ASSERT_TRUE(StartFill(dev_.get(), kGuestIova, 64, 0x11).ok());
  ASSERT_TRUE(WriteReg(dev_.get(), td::kRegScratch, 0xfeedface).ok());
  std::vector<uint8_t> pattern(td::kScratchSize);
  for (size_t i = 0; i < pattern.size(); ++i) pattern[i] = static_cast<uint8_t>(i ^ 0x5a);
  ASSERT_TRUE(dev_->RegionWrite(vfio::kBar0RegionIndex, td::kScratchOffset, pattern).ok());
  uint16_t ctl = 0x8000;
  ASSERT_TRUE(dev_->RegionWrite(vfio::kConfigRegionIndex, td::kMsixCapOffset + 2, Bytes(ctl)).ok());

  // Source: RUNNING -> PRE_COPY -> STOP_COPY, read to EOF, -> STOP.
  ASSERT_TRUE(dev_->SetMigState(MigState::kPreCopy).ok());
  uint8_t tmp[64];
  auto pre = dev_->ReadMigData(tmp);
  ASSERT_TRUE(pre.ok());
  EXPECT_EQ(*pre, 0u);  // this device has nothing to pre-copy
  // Doorbell rung after the device stops must not run until it runs again (on the target).
  ASSERT_TRUE(dev_->SetMigState(MigState::kStopCopy).ok());
  ASSERT_TRUE(StartFill(dev_.get(), kGuestIova + 0x8000, 32, 0x22).ok());
  EXPECT_EQ(ram_.at(kGuestIova + 0x8000)[0], 0);
  EXPECT_EQ(ReadReg(dev_.get(), td::kRegStatus), td::kStatusPending);
  // That doorbell came after the blob was cut: re-enter STOP_COPY to include it.
  ASSERT_TRUE(dev_->SetMigState(MigState::kStop).ok());
  ASSERT_TRUE(dev_->SetMigState(MigState::kStopCopy).ok());
  std::vector<uint8_t> blob = ReadAllMigData(dev_.get());
  ASSERT_GT(blob.size(), td::kScratchSize);
  ASSERT_TRUE(dev_->SetMigState(MigState::kStop).ok());
  EXPECT_EQ(srv_.server()->mig_state(), MigState::kStop);

  // Target: a second server. RUNNING -> STOP -> RESUMING, write, -> STOP -> RUNNING.
  InProcessServer target;
  auto dst = target.Connect();
  ASSERT_NE(dst, nullptr);
  ASSERT_TRUE(dst->DmaMap(kGuestIova, kGuestSize, ram_.map.get(), ram_.fd.get(), 0, true).ok());
  ASSERT_TRUE(dst->SetMigState(MigState::kStop).ok());
  ASSERT_TRUE(dst->SetMigState(MigState::kResuming).ok());
  ASSERT_TRUE(dst->WriteMigData(blob).ok());
  ASSERT_TRUE(dst->SetMigState(MigState::kStop).ok());
  auto st = dst->GetMigState();
  ASSERT_TRUE(st.ok());
  EXPECT_EQ(*st, MigState::kStop);
  ASSERT_TRUE(dst->SetMigState(MigState::kRunning).ok());

  // Device state equal; the pending DMA ran on the target when it started running.
  EXPECT_EQ(ReadReg(dst.get(), td::kRegScratch), 0xfeedfaceu);
  EXPECT_EQ(ReadReg(dst.get(), td::kRegCompleted), 2u);
  EXPECT_EQ(ReadReg(dst.get(), td::kRegStatus), td::kStatusDone);
  EXPECT_EQ(ram_.at(kGuestIova + 0x8000)[31], 0x22);
  std::vector<uint8_t> scratch(td::kScratchSize);
  ASSERT_TRUE(dst->RegionRead(vfio::kBar0RegionIndex, td::kScratchOffset, scratch).ok());
  EXPECT_EQ(scratch, pattern);
  uint16_t got_ctl = 0;
  ASSERT_TRUE(dst->RegionRead(vfio::kConfigRegionIndex, td::kMsixCapOffset + 2,
                              {reinterpret_cast<uint8_t*>(&got_ctl), 2}).ok());
  EXPECT_EQ(got_ctl & 0x8000, 0x8000);
  // DMA continues on the target.
  ASSERT_TRUE(StartFill(dst.get(), kGuestIova + 0x9000, 8, 0x33).ok());
  EXPECT_EQ(ReadReg(dst.get(), td::kRegCompleted), 3u);
  EXPECT_EQ(ram_.at(kGuestIova + 0x9000)[7], 0x33);
  EXPECT_EQ(target.server()->completed_dmas(), 3u);
  dst.reset();
}

TEST_F(ClientServerTest, MigrationInvalidArcsAndBadBlobs) {
  EXPECT_TRUE(absl::IsInvalidArgument(dev_->SetMigState(MigState::kStopCopy)));  // not an arc
  EXPECT_FALSE(dev_->SetMigState(MigState::kResuming).ok());
  EXPECT_FALSE(dev_->SetMigState(MigState::kError).ok());
  EXPECT_FALSE(dev_->SetMigState(static_cast<MigState>(77)).ok());
  uint8_t buf[16];
  EXPECT_FALSE(dev_->ReadMigData(buf).ok());  // not saving
  EXPECT_FALSE(dev_->WriteMigData(buf).ok());  // not resuming
  ASSERT_TRUE(dev_->SetMigState(MigState::kStop).ok());
  ASSERT_TRUE(dev_->SetMigState(MigState::kStopCopy).ok());
  EXPECT_FALSE(dev_->SetMigState(MigState::kPreCopy).ok());  // explicitly forbidden by the spec
  std::vector<uint8_t> blob = ReadAllMigData(dev_.get());
  ASSERT_TRUE(dev_->SetMigState(MigState::kStop).ok());
  ASSERT_TRUE(dev_->SetMigState(MigState::kResuming).ok());
  // Truncated blob.
  ASSERT_TRUE(dev_->WriteMigData(std::span<const uint8_t>(blob).first(100)).ok());
  EXPECT_FALSE(dev_->SetMigState(MigState::kStop).ok());
  // Corrupted magic.
  std::vector<uint8_t> bad = blob;
  bad[0] ^= 0xff;
  ASSERT_TRUE(dev_->WriteMigData(bad).ok());
  EXPECT_FALSE(dev_->SetMigState(MigState::kStop).ok());
  // Too much data is refused while writing.
  std::vector<uint8_t> huge(blob.size() + 1);
  EXPECT_FALSE(dev_->WriteMigData(huge).ok());
  EXPECT_FALSE(dev_->broken());
  // An empty stream does not restore either (each failure discarded what was written).
  EXPECT_FALSE(dev_->SetMigState(MigState::kStop).ok());
  // A good blob still restores.
  ASSERT_TRUE(dev_->WriteMigData(blob).ok());
  EXPECT_TRUE(dev_->SetMigState(MigState::kStop).ok());
  EXPECT_TRUE(dev_->SetMigState(MigState::kRunning).ok());
}

TEST(ClientServerNoMigration, CapsSayUnsupported) {
  td::ServerOptions o;
  o.migration = false;
  o.dma_logging = false;
  InProcessServer srv(o);
  auto dev = srv.Connect();
  ASSERT_NE(dev, nullptr);
  auto caps = dev->GetMigrationCaps();
  ASSERT_TRUE(caps.ok()) << caps.status();
  EXPECT_FALSE(caps->supported);
  EXPECT_FALSE(caps->dma_logging);
  EXPECT_FALSE(dev->SetMigState(MigState::kStop).ok());
  EXPECT_TRUE(absl::IsUnimplemented(dev->StartDmaLogging({}, 4096))) << dev->StartDmaLogging({}, 4096);
  EXPECT_FALSE(dev->broken());
}

TEST_F(ClientServerTest, DmaLoggingReportsExactlyWrittenPages) {
  MapRam(dev_.get());
  vfio::DmaRange range{kGuestIova, kGuestSize};
  ASSERT_TRUE(dev_->StartDmaLogging({&range, 1}, kPage).ok());
  // Pages 2..4 (fill spanning three pages, unaligned ends) and page 200.
  ASSERT_TRUE(StartFill(dev_.get(), kGuestIova + 2 * kPage + 100, 2 * kPage + 10, 1).ok());
  for (int i = 0; i < 16; ++i) ram_.at(kGuestIova)[i] = 9;  // a copy source: reads are not logged
  ASSERT_TRUE(StartCopy(dev_.get(), kGuestIova, kGuestIova + 200 * kPage + 8, 16).ok());
  const uint64_t pages = kGuestSize / kPage;
  std::vector<uint64_t> bm(pages / 64, 0);
  ASSERT_TRUE(dev_->ReportDmaDirty(kGuestIova, kGuestSize, kPage, bm).ok());
  std::vector<uint64_t> want(pages / 64, 0);
  for (uint64_t p : {2, 3, 4, 200}) want[p / 64] |= uint64_t{1} << (p % 64);
  EXPECT_EQ(bm, want);
  // Reporting cleared the record.
  std::vector<uint64_t> again(pages / 64, 0);
  ASSERT_TRUE(dev_->ReportDmaDirty(kGuestIova, kGuestSize, kPage, again).ok());
  EXPECT_EQ(again, std::vector<uint64_t>(pages / 64, 0));
  // Coarser report page (16 KiB): page 5's write lands in bit 1.
  ASSERT_TRUE(StartFill(dev_.get(), kGuestIova + 5 * kPage, 8, 1).ok());
  std::vector<uint64_t> coarse(1, 0);
  ASSERT_TRUE(dev_->ReportDmaDirty(kGuestIova, 64 * 4 * kPage, 4 * kPage, coarse).ok());
  EXPECT_EQ(coarse[0], 0b10u);
  // Sub-range report only covers its pages.
  ASSERT_TRUE(StartFill(dev_.get(), kGuestIova + 70 * kPage, 8, 1).ok());
  std::vector<uint64_t> sub(1, 0);
  ASSERT_TRUE(dev_->ReportDmaDirty(kGuestIova + 64 * kPage, 10 * kPage, kPage, sub).ok());
  EXPECT_EQ(sub[0], uint64_t{1} << 6);
  ASSERT_TRUE(dev_->StopDmaLogging().ok());
  EXPECT_FALSE(dev_->ReportDmaDirty(kGuestIova, kGuestSize, kPage, bm).ok());
  EXPECT_FALSE(dev_->broken());
}

TEST(ClientServerVersion, MismatchIsClearError) {
  td::ServerOptions o;
  o.reply_major = 1;
  InProcessServer srv(o);
  auto d = VfioUserDevice::FromSocket(srv.Start(), "vfio-user:test");
  ASSERT_FALSE(d.ok());
  EXPECT_TRUE(absl::IsFailedPrecondition(d.status())) << d.status();
  EXPECT_NE(d.status().message().find("version mismatch"), absl::string_view::npos) << d.status();
}

TEST(ClientServerTimeout, StuckServerIsDeadlineExceededThenBroken) {
  InProcessServer srv;
  ClientOptions o;
  o.reply_timeout_ms = 100;
  auto dev = srv.Connect(o);
  ASSERT_NE(dev, nullptr);
  ASSERT_TRUE(WriteReg(dev.get(), td::kRegReplyDelayMs, 800).ok());
  absl::Status s = WriteReg(dev.get(), td::kRegDoorbell, 1);
  EXPECT_TRUE(absl::IsDeadlineExceeded(s)) << s;
  EXPECT_NE(s.message().find("REGION_WRITE"), absl::string_view::npos) << s;
  EXPECT_TRUE(dev->broken());
  // The late reply must not be mistaken for a later request's answer: the connection is dead.
  EXPECT_TRUE(absl::IsUnavailable(dev->GetInfo().status()));
}

}  // namespace
}  // namespace microvmm::vfio_user::testing
