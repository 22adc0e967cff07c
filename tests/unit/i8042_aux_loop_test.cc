// Regression test (fixed): devices/legacy/i8042.cc accepts command 0xD3
// ("write auxiliary device output buffer") and 0xD2 ("write keyboard output buffer") but drops the
// data byte that follows. On an i8042 that byte is placed in the output buffer (OBF set) as if the
// device had sent it. Linux's i8042_check_aux() probes the AUX port with 0xD3 + 0x5A and waits for
// the echo, polling OBF (I8042_CTL_TIMEOUT, about 0.5 s) when it doesn't come. Expected: the byte
// comes back on the data port.
#include <cstdint>

#include "devices/legacy/i8042.h"
#include "gtest/gtest.h"

namespace microvmm {
namespace {

uint8_t In(I8042& d, uint64_t off) {
  uint8_t b = 0;
  d.Read(off, std::span<uint8_t>(&b, 1));
  return b;
}
void Out(I8042& d, uint64_t off, uint8_t v) { d.Write(off, std::span<const uint8_t>(&v, 1)); }

TEST(I8042SpecTest, AuxLoopEchoesByte) {
  I8042 d([] {});
  Out(d, 4, 0xD3);
  Out(d, 0, 0x5A);
  EXPECT_TRUE(In(d, 4) & 0x01) << "OBF after AUX loopback write";
  EXPECT_EQ(In(d, 0), 0x5A);
}

TEST(I8042SpecTest, KeyboardLoopEchoesByte) {
  I8042 d([] {});
  Out(d, 4, 0xD2);
  Out(d, 0, 0x1C);
  EXPECT_TRUE(In(d, 4) & 0x01) << "OBF after keyboard loopback write";
  EXPECT_EQ(In(d, 0), 0x1C);
}

}  // namespace
}  // namespace microvmm
