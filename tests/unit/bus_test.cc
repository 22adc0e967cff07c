// Unit tests of vmm/bus.h: range registration with overlap detection, dispatch with
// device-relative offsets, and unclaimed accesses.
#include "vmm/bus.h"

#include <cstdint>
#include <memory>
#include <vector>

#include "gtest/gtest.h"

namespace microvmm {
namespace {

// Records accesses; reads return (offset + i) ^ tag so the offset seen is observable.
class FakeDevice : public BusDevice {
 public:
  explicit FakeDevice(uint8_t tag) : tag_(tag) {}
  void Read(uint64_t offset, std::span<uint8_t> data) override {
    reads.push_back({offset, data.size(), {}});
    for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<uint8_t>((offset + i) ^ tag_);
  }
  void Write(uint64_t offset, std::span<const uint8_t> data) override {
    writes.push_back({offset, data.size(), std::vector<uint8_t>(data.begin(), data.end())});
  }
  struct Access {
    uint64_t offset;
    size_t size;
    std::vector<uint8_t> data;
  };
  std::vector<Access> reads, writes;

 private:
  uint8_t tag_;
};

TEST(BusTest, OverlapDetection) {
  Bus bus("test");
  auto a = std::make_shared<FakeDevice>(0);
  ASSERT_TRUE(bus.Insert(a, 0x100, 0x10).ok());  // [0x100, 0x110)

  struct Case {
    uint64_t base, len;
    const char* what;
  } overlapping[] = {
      {0x100, 0x10, "exact duplicate"},
      {0x0F8, 0x10, "overlaps the start"},
      {0x108, 0x10, "overlaps the end"},
      {0x0F0, 0x40, "contains it"},
      {0x104, 0x4, "inside it"},
      {0x10F, 0x1, "last byte"},
      {0x0FF, 0x2, "straddles the first byte"},
  };
  for (const Case& c : overlapping)
    EXPECT_FALSE(bus.Insert(std::make_shared<FakeDevice>(1), c.base, c.len).ok()) << c.what;

  // Adjacent ranges on either side are fine.
  EXPECT_TRUE(bus.Insert(std::make_shared<FakeDevice>(2), 0x0F0, 0x10).ok());  // [0xF0, 0x100)
  EXPECT_TRUE(bus.Insert(std::make_shared<FakeDevice>(3), 0x110, 0x10).ok());  // [0x110, 0x120)
  // ...and now a range spanning a gap-free neighbour is still rejected.
  EXPECT_FALSE(bus.Insert(std::make_shared<FakeDevice>(4), 0x11F, 0x10).ok());
  EXPECT_TRUE(bus.Insert(std::make_shared<FakeDevice>(5), 0x120, 0x1).ok());
}

TEST(BusTest, OverlapAcrossSeveralExistingRanges) {
  Bus bus("test");
  ASSERT_TRUE(bus.Insert(std::make_shared<FakeDevice>(0), 0x1000, 0x10).ok());
  ASSERT_TRUE(bus.Insert(std::make_shared<FakeDevice>(0), 0x2000, 0x10).ok());
  // Starts in the hole between them but ends inside the second.
  EXPECT_FALSE(bus.Insert(std::make_shared<FakeDevice>(0), 0x1800, 0x801).ok());
  EXPECT_TRUE(bus.Insert(std::make_shared<FakeDevice>(0), 0x1800, 0x800).ok());
  // Spans both entirely.
  EXPECT_FALSE(bus.Insert(std::make_shared<FakeDevice>(0), 0x0, 0x10000).ok());
}

TEST(BusTest, BadRangesRejected) {
  Bus bus("test");
  EXPECT_FALSE(bus.Insert(std::make_shared<FakeDevice>(0), 0x100, 0).ok()) << "empty range";
  EXPECT_FALSE(bus.Insert(std::make_shared<FakeDevice>(0), ~0ULL - 4, 0x10).ok()) << "wraps";
}

TEST(BusTest, DispatchWithOffsets) {
  Bus bus("pio");
  auto serial = std::make_shared<FakeDevice>(0x00);
  auto kbd = std::make_shared<FakeDevice>(0x80);
  ASSERT_TRUE(bus.Insert(serial, 0x3f8, 8).ok());
  ASSERT_TRUE(bus.Insert(kbd, 0x60, 5).ok());

  uint8_t one[1] = {0};
  EXPECT_TRUE(bus.Read(0x3fd, one));
  ASSERT_EQ(serial->reads.size(), 1u);
  EXPECT_EQ(serial->reads[0].offset, 5u);
  EXPECT_EQ(serial->reads[0].size, 1u);
  EXPECT_EQ(one[0], 5);

  uint8_t two[2] = {0, 0};
  EXPECT_TRUE(bus.Read(0x64, two));
  ASSERT_EQ(kbd->reads.size(), 1u);
  EXPECT_EQ(kbd->reads[0].offset, 4u);
  EXPECT_EQ(two[0], 4 ^ 0x80);
  EXPECT_EQ(two[1], 5 ^ 0x80);

  const uint8_t w[4] = {0xde, 0xad, 0xbe, 0xef};
  EXPECT_TRUE(bus.Write(0x3f8, w));
  EXPECT_TRUE(bus.Write(0x3ff, std::span<const uint8_t>(w, 1)));
  ASSERT_EQ(serial->writes.size(), 2u);
  EXPECT_EQ(serial->writes[0].offset, 0u);
  EXPECT_EQ(serial->writes[0].data, std::vector<uint8_t>(w, w + 4));
  EXPECT_EQ(serial->writes[1].offset, 7u);
  EXPECT_EQ(serial->writes[1].data, std::vector<uint8_t>{0xde});
  EXPECT_TRUE(kbd->writes.empty());
}

TEST(BusTest, UnclaimedAccesses) {
  Bus bus("mmio");
  auto dev = std::make_shared<FakeDevice>(0);
  ASSERT_TRUE(bus.Insert(dev, 0xd0000000, 0x1000).ok());

  for (uint64_t addr : {0x0ULL, 0xcfffffffULL, 0xd0001000ULL, 0xffffffffULL, ~0ULL}) {
    SCOPED_TRACE(addr);
    uint8_t buf[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    EXPECT_FALSE(bus.Read(addr, buf));
    for (uint8_t b : buf) EXPECT_EQ(b, 0xff);
    const uint8_t w[4] = {1, 2, 3, 4};
    EXPECT_FALSE(bus.Write(addr, w));
  }
  EXPECT_TRUE(dev->reads.empty());
  EXPECT_TRUE(dev->writes.empty());

  // Boundaries of the claimed range.
  uint8_t b[1];
  EXPECT_TRUE(bus.Read(0xd0000000, b));
  EXPECT_TRUE(bus.Read(0xd0000fff, b));
  ASSERT_EQ(dev->reads.size(), 2u);
  EXPECT_EQ(dev->reads[1].offset, 0xfffu);
}

TEST(BusTest, EmptyBusClaimsNothing) {
  Bus bus("empty");
  uint8_t b[4] = {0, 0, 0, 0};
  EXPECT_FALSE(bus.Read(0x3f8, b));
  EXPECT_EQ(b[0], 0xff);
  EXPECT_EQ(b[3], 0xff);
  EXPECT_FALSE(bus.Write(0x3f8, b));
}

}  // namespace
}  // namespace microvmm
