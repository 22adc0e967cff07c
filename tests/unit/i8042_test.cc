// Unit tests of devices/legacy/i8042.h: the i8042 commands Linux uses to probe the controller and
// to reset the machine. Offsets are relative to port 0x60 (0 = data, 4 = status/command).
#include "devices/legacy/i8042.h"

#include <cstdint>

#include "gtest/gtest.h"

namespace microvmm {
namespace {

constexpr uint64_t kData = 0, kCmd = 4;
constexpr uint8_t kObf = 0x01;  // status bit 0: output buffer full

class I8042Test : public testing::Test {
 protected:
  uint8_t In(uint64_t off) {
    uint8_t b = 0xAB;
    dev_.Read(off, std::span<uint8_t>(&b, 1));
    return b;
  }
  void Out(uint64_t off, uint8_t v) { dev_.Write(off, std::span<const uint8_t>(&v, 1)); }

  int resets_ = 0;
  I8042 dev_{[this] { ++resets_; }};
};

TEST_F(I8042Test, PulseResetCommand) {
  Out(kCmd, 0xFE);
  EXPECT_EQ(resets_, 1);
}

TEST_F(I8042Test, OtherCommandsDoNotReset) {
  for (uint8_t c : {0x20, 0xAA, 0xAD, 0xAE, 0xA7, 0xA8, 0xA9, 0xAB, 0xFF, 0xF0}) Out(kCmd, c);
  EXPECT_EQ(resets_, 0);
}

TEST_F(I8042Test, WriteOutputPortWithResetLineLow) {
  // 0xD1: next data byte is written to the output port; bit 0 is the (active low) reset line.
  Out(kCmd, 0xD1);
  EXPECT_EQ(resets_, 0);
  Out(kData, 0xFE);
  EXPECT_EQ(resets_, 1);
}

TEST_F(I8042Test, WriteOutputPortWithResetLineHigh) {
  Out(kCmd, 0xD1);
  Out(kData, 0xDF);  // bit 0 set: no reset (A20 etc.)
  EXPECT_EQ(resets_, 0);
}

TEST_F(I8042Test, NewCommandCancelsPendingOutputPortWrite) {
  Out(kCmd, 0xD1);
  Out(kCmd, 0xAD);   // a new command replaces the one waiting for data
  Out(kData, 0x00);  // now a keyboard byte, not an output-port value
  EXPECT_EQ(resets_, 0);
}

TEST_F(I8042Test, DataByteWithoutCommandDoesNotReset) {
  Out(kData, 0x00);
  EXPECT_EQ(resets_, 0);
}

TEST_F(I8042Test, SelfTest) {
  EXPECT_EQ(In(kCmd) & kObf, 0) << "output buffer empty at start";
  Out(kCmd, 0xAA);
  EXPECT_TRUE(In(kCmd) & kObf);
  EXPECT_EQ(In(kData), 0x55) << "self test passed";
  EXPECT_EQ(In(kCmd) & kObf, 0) << "reading data empties the buffer";
}

TEST_F(I8042Test, PortTests) {
  Out(kCmd, 0xAB);  // keyboard interface test
  EXPECT_TRUE(In(kCmd) & kObf);
  EXPECT_EQ(In(kData), 0x00);
  EXPECT_EQ(In(kCmd) & kObf, 0);
}

TEST_F(I8042Test, ConfigurationByteReadWrite) {
  Out(kCmd, 0x20);
  ASSERT_TRUE(In(kCmd) & kObf);
  uint8_t initial = In(kData);
  EXPECT_EQ(In(kCmd) & kObf, 0);

  const uint8_t next = initial ^ 0x43;  // flip interrupt enables and translation
  Out(kCmd, 0x60);
  Out(kData, next);
  EXPECT_EQ(In(kCmd) & kObf, 0) << "writing the CTR produces no response byte";
  Out(kCmd, 0x20);
  EXPECT_EQ(In(kData), next);

  Out(kCmd, 0x60);
  Out(kData, 0x00);
  Out(kCmd, 0x20);
  EXPECT_EQ(In(kData), 0x00);
  EXPECT_EQ(resets_, 0);
}

TEST_F(I8042Test, ResponsesQueueInOrder) {
  Out(kCmd, 0xAA);
  Out(kCmd, 0x20);
  EXPECT_EQ(In(kData), 0x55);
  EXPECT_TRUE(In(kCmd) & kObf);
  (void)In(kData);
  EXPECT_EQ(In(kCmd) & kObf, 0);
}

TEST_F(I8042Test, OtherOffsetsReadAllOnes) {
  for (uint64_t off : {1, 2, 3}) EXPECT_EQ(In(off), 0xff) << off;
}

}  // namespace
}  // namespace microvmm
