// DMA models for post-copy with a passthrough device (devices/vfio/pci/dma_footprint.h): the
// test DMA engine's model (register tracking, doorbell ranges, hostile programming, state).
#include "devices/vfio/pci/dma_footprint.h"

#include <cstring>

#include "gtest/gtest.h"

namespace microvmm::vfio {
namespace {

using M = TestDmaEngineFootprint;

void Write64(DmaFootprint& f, uint64_t off, uint64_t v, int bar = 0) {
  uint8_t b[8];
  std::memcpy(b, &v, 8);
  EXPECT_TRUE(f.OnBarWrite(bar, off, b).empty()) << "a register write is not a DMA";
}
std::vector<DmaRange> Doorbell(DmaFootprint& f) {
  uint8_t b[8] = {1};
  return f.OnBarWrite(0, M::kDoorbell, b);
}
bool Has(const std::vector<DmaRange>& r, uint64_t iova, uint64_t size) {
  for (const DmaRange& x : r)
    if (x.iova == iova && x.size == size) return true;
  return false;
}

TEST(DmaFootprint, ModelsAreKnownOnlyForTheirClass) {
  EXPECT_NE(FootprintFor(0x1234, 0x11f0), nullptr);
  EXPECT_EQ(FootprintFor(0x1234, 0x11f1), nullptr);
  EXPECT_EQ(FootprintFor(0x8086, 0x11f0), nullptr);
  EXPECT_EQ(FootprintFor(0x1af4, 0x1041), nullptr);  // virtio-net: not modelled
}

TEST(DmaFootprint, CopyTouchesSourceAndDestinationFillOnlyDestination) {
  M f;
  Write64(f, M::kSrc, 0x100123);
  Write64(f, M::kDst, 0x2000a5);
  Write64(f, M::kLen, 9000);
  Write64(f, M::kOp, 0);  // copy
  std::vector<DmaRange> r = Doorbell(f);
  EXPECT_EQ(r.size(), 2u);
  EXPECT_TRUE(Has(r, 0x100123, 9000));
  EXPECT_TRUE(Has(r, 0x2000a5, 9000));
  Write64(f, M::kOp, 1);  // fill
  r = Doorbell(f);
  ASSERT_EQ(r.size(), 1u);
  EXPECT_TRUE(Has(r, 0x2000a5, 9000));
}

TEST(DmaFootprint, HalfRegisterWritesCompose) {
  M f;
  uint32_t lo = 0x3000, hi = 0x1;
  uint8_t b[4];
  std::memcpy(b, &lo, 4);
  EXPECT_TRUE(f.OnBarWrite(0, M::kDst, b).empty());
  std::memcpy(b, &hi, 4);
  EXPECT_TRUE(f.OnBarWrite(0, M::kDst + 4, b).empty());
  Write64(f, M::kLen, 4096);
  Write64(f, M::kOp, 1);
  std::vector<DmaRange> r = Doorbell(f);
  ASSERT_EQ(r.size(), 1u);
  EXPECT_TRUE(Has(r, 0x100003000ull, 4096));
}

TEST(DmaFootprint, DmasTheDeviceRefusesTouchNothing) {
  M f;
  Write64(f, M::kDst, 0x1000);
  Write64(f, M::kOp, 1);
  Write64(f, M::kLen, 0);
  EXPECT_TRUE(Doorbell(f).empty());
  Write64(f, M::kLen, M::kMaxLen + 1);
  EXPECT_TRUE(Doorbell(f).empty());
  // A range that wraps around the address space.
  Write64(f, M::kDst, ~0ull - 10);
  Write64(f, M::kLen, 4096);
  EXPECT_TRUE(Doorbell(f).empty());
  // Other BARs and offsets past the registers are not the engine's.
  Write64(f, M::kDst, 0x1000);
  uint8_t b[8] = {1};
  EXPECT_TRUE(f.OnBarWrite(2, M::kDoorbell, b).empty());
  Write64(f, 0x1000, 0xffff);  // the scratch page
  EXPECT_EQ(Doorbell(f).size(), 1u);
}

TEST(DmaFootprint, StateTravelsAndAtRunNamesTheProgrammedDma) {
  M src;
  Write64(src, M::kSrc, 0x5000);
  Write64(src, M::kDst, 0x9000);
  Write64(src, M::kLen, 100);
  Write64(src, M::kOp, 0);
  M dst;
  EXPECT_TRUE(dst.AtRun().empty()) << "a fresh model names nothing";
  ASSERT_TRUE(dst.RestoreState(src.SaveState()).ok());
  std::vector<DmaRange> r = dst.AtRun();
  EXPECT_EQ(r.size(), 2u);
  EXPECT_TRUE(Has(r, 0x5000, 100));
  EXPECT_TRUE(Has(r, 0x9000, 100));
  absl::Status s = dst.RestoreState("short");
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_EQ(dst.AtRun().size(), 2u) << "a refused state changes nothing";
}

}  // namespace
}  // namespace microvmm::vfio
