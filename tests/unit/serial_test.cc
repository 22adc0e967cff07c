// Unit tests of devices/legacy/serial.h against 16550A semantics (register map, DLAB, IIR
// priorities and clearing, LSR, loopback per the datasheet's MCR bit 4 description, FIFO bits).
// Transmitted bytes go to a pipe that the test reads back.
#include "devices/legacy/serial.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstdint>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "vmm/base/fd.h"

namespace microvmm {
namespace {

// Register offsets (16550 datasheet, table of registers).
constexpr uint64_t kRbrThr = 0, kIer = 1, kIirFcr = 2, kLcr = 3, kMcr = 4, kLsr = 5, kMsr = 6,
                   kScr = 7;
constexpr uint8_t kLsrDr = 0x01, kLsrThre = 0x20, kLsrTemt = 0x40;
constexpr uint8_t kIirNoInt = 0x01, kIirThre = 0x02, kIirRda = 0x04;

class SerialTest : public testing::Test {
 protected:
  void SetUp() override {
    int fds[2];
    ASSERT_EQ(::pipe2(fds, O_CLOEXEC | O_NONBLOCK), 0);
    read_end_.reset(fds[0]);
    serial_ = std::make_unique<Serial>([this] { ++irqs_; }, ScopedFd(fds[1]));
  }

  uint8_t In(uint64_t reg) {
    uint8_t b = 0xAB;
    serial_->Read(reg, std::span<uint8_t>(&b, 1));
    return b;
  }
  void Out(uint64_t reg, uint8_t v) { serial_->Write(reg, std::span<const uint8_t>(&v, 1)); }
  void Queue(const std::string& s) {
    serial_->QueueInput(
        std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(s.data()), s.size()));
  }
  // Everything transmitted so far.
  std::string Transmitted() {
    std::string out;
    char buf[4096];
    for (;;) {
      ssize_t n = ::read(read_end_.get(), buf, sizeof(buf));
      if (n <= 0) break;
      out.append(buf, n);
    }
    return out;
  }

  ScopedFd read_end_;
  std::unique_ptr<Serial> serial_;
  int irqs_ = 0;
};

TEST_F(SerialTest, ThrWriteTransmits) {
  for (char c : std::string("Hi\n")) Out(kRbrThr, c);
  EXPECT_EQ(Transmitted(), "Hi\n");
  EXPECT_EQ(irqs_, 0) << "no interrupt with IER = 0";
}

TEST_F(SerialTest, MultiByteWriteCoversConsecutiveRegisters) {
  // A 2-byte OUT at THR writes THR then IER (0x3f8, 0x3f9).
  const uint8_t two[2] = {'Z', 0x00};
  serial_->Write(kRbrThr, two);
  EXPECT_EQ(Transmitted(), "Z");
  EXPECT_EQ(In(kIer), 0);
}

TEST_F(SerialTest, TapSeesTransmittedBytes) {
  std::string tapped;
  serial_->SetTap([&](uint8_t b) { tapped.push_back(static_cast<char>(b)); });
  Out(kRbrThr, 'o');
  Out(kRbrThr, 'k');
  EXPECT_EQ(tapped, "ok");
  EXPECT_EQ(Transmitted(), "ok");
}

TEST_F(SerialTest, LsrTransmitterAlwaysEmpty) {
  uint8_t lsr = In(kLsr);
  EXPECT_EQ(lsr & (kLsrThre | kLsrTemt), kLsrThre | kLsrTemt);
  EXPECT_EQ(lsr & kLsrDr, 0) << "no data ready without input";
  Out(kRbrThr, 'x');
  EXPECT_EQ(In(kLsr) & (kLsrThre | kLsrTemt), kLsrThre | kLsrTemt);
}

TEST_F(SerialTest, ThreInterruptOnEnableReportedOnce) {
  EXPECT_EQ(In(kIirFcr), kIirNoInt);
  Out(kIer, 0x02);  // ETBEI with THR empty -> THRE interrupt right away
  EXPECT_EQ(irqs_, 1);
  EXPECT_EQ(In(kIer), 0x02);
  EXPECT_EQ(In(kIirFcr), kIirThre);
  // Reading IIR while THRE is the source clears it.
  EXPECT_EQ(In(kIirFcr), kIirNoInt);
  // Writing THR re-arms THRE (the byte "leaves" immediately).
  Out(kRbrThr, 'a');
  EXPECT_EQ(irqs_, 2);
  EXPECT_EQ(In(kIirFcr), kIirThre);
  EXPECT_EQ(In(kIirFcr), kIirNoInt);
  EXPECT_EQ(Transmitted(), "a");
}

TEST_F(SerialTest, ThreNotReportedWhenDisabled) {
  Out(kRbrThr, 'a');
  EXPECT_EQ(In(kIirFcr), kIirNoInt);
  EXPECT_EQ(irqs_, 0);
}

TEST_F(SerialTest, ReceivedDataInterruptAndOrder) {
  Out(kIer, 0x01);  // ERBFI
  EXPECT_EQ(irqs_, 0) << "nothing received yet";
  Queue("abc");
  EXPECT_EQ(irqs_, 1);
  EXPECT_EQ(In(kIirFcr), kIirRda);
  EXPECT_TRUE(In(kLsr) & kLsrDr);
  EXPECT_EQ(In(kRbrThr), 'a');
  EXPECT_EQ(In(kRbrThr), 'b');
  EXPECT_EQ(In(kIirFcr), kIirRda) << "still data";
  EXPECT_EQ(In(kRbrThr), 'c');
  EXPECT_FALSE(In(kLsr) & kLsrDr);
  EXPECT_EQ(In(kIirFcr), kIirNoInt);
  EXPECT_EQ(Transmitted(), "") << "received bytes are not echoed";
}

TEST_F(SerialTest, InputWithoutErbfiSetsDrButNoInterrupt) {
  Queue("q");
  EXPECT_EQ(irqs_, 0);
  EXPECT_TRUE(In(kLsr) & kLsrDr);
  EXPECT_EQ(In(kIirFcr), kIirNoInt);
  // Enabling ERBFI with data waiting raises the interrupt.
  Out(kIer, 0x01);
  EXPECT_EQ(irqs_, 1);
  EXPECT_EQ(In(kIirFcr), kIirRda);
  EXPECT_EQ(In(kRbrThr), 'q');
}

TEST_F(SerialTest, RdaHasPriorityOverThre) {
  Out(kIer, 0x03);
  Queue("z");
  EXPECT_EQ(In(kIirFcr), kIirRda);  // priority 2 before priority 3
  EXPECT_EQ(In(kRbrThr), 'z');
  EXPECT_EQ(In(kIirFcr), kIirThre);
  EXPECT_EQ(In(kIirFcr), kIirNoInt);
}

TEST_F(SerialTest, DlabSwitchesToDivisorLatch) {
  Out(kIer, 0x05);
  Out(kLcr, 0x83);  // DLAB + 8N1
  EXPECT_EQ(In(kLcr), 0x83);
  Out(kRbrThr, 0x01);  // DLL: 115200 baud
  Out(kIer, 0x00);     // DLM
  EXPECT_EQ(In(kRbrThr), 0x01);
  EXPECT_EQ(In(kIer), 0x00);
  Out(kRbrThr, 0x0c);
  Out(kIer, 0x34);
  EXPECT_EQ(In(kRbrThr), 0x0c);
  EXPECT_EQ(In(kIer), 0x34);
  EXPECT_EQ(Transmitted(), "") << "DLL writes are not data";
  Out(kLcr, 0x03);
  EXPECT_EQ(In(kIer), 0x05) << "IER untouched by DLM writes";
  Out(kRbrThr, 'T');
  EXPECT_EQ(Transmitted(), "T");
  // Divisor latch retained across DLAB toggles.
  Out(kLcr, 0x83);
  EXPECT_EQ(In(kRbrThr), 0x0c);
  EXPECT_EQ(In(kIer), 0x34);
}

TEST_F(SerialTest, DlabReadDoesNotConsumeInput) {
  Queue("r");
  Out(kLcr, 0x80);
  (void)In(kRbrThr);  // DLL
  Out(kLcr, 0x00);
  EXPECT_TRUE(In(kLsr) & kLsrDr);
  EXPECT_EQ(In(kRbrThr), 'r');
}

TEST_F(SerialTest, LoopbackReturnsDataWithoutTransmitting) {
  Out(kMcr, 0x10);  // LOOP
  Out(kRbrThr, 0x5a);
  Out(kRbrThr, 0xa5);
  EXPECT_EQ(Transmitted(), "") << "loopback must not reach the line";
  EXPECT_TRUE(In(kLsr) & kLsrDr);
  EXPECT_EQ(In(kRbrThr), 0x5a);
  EXPECT_EQ(In(kRbrThr), 0xa5);
  EXPECT_FALSE(In(kLsr) & kLsrDr);
  Out(kMcr, 0x00);
  Out(kRbrThr, 'x');
  EXPECT_EQ(Transmitted(), "x");
}

TEST_F(SerialTest, LoopbackMsrMirrorsMcr) {
  // 16550 loopback: CTS<-RTS(MCR1), DSR<-DTR(MCR0), RI<-OUT1(MCR2), DCD<-OUT2(MCR3).
  struct {
    uint8_t mcr, msr_hi;
  } cases[] = {{0x10, 0x00}, {0x11, 0x20}, {0x12, 0x10}, {0x14, 0x40},
               {0x18, 0x80}, {0x1f, 0xf0}, {0x1a, 0x90}};
  for (auto c : cases) {
    Out(kMcr, c.mcr);
    EXPECT_EQ(In(kMcr) & 0x1f, c.mcr);
    EXPECT_EQ(In(kMsr) & 0xf0, c.msr_hi) << "MCR=0x" << std::hex << int(c.mcr);
  }
}

TEST_F(SerialTest, FifoEnabledSetsIirTopBits) {
  EXPECT_EQ(In(kIirFcr) & 0xc0, 0);
  Out(kIirFcr, 0x01);  // FIFO enable
  EXPECT_EQ(In(kIirFcr), 0xc0 | kIirNoInt);
  Out(kIer, 0x02);
  EXPECT_EQ(In(kIirFcr), 0xc0 | kIirThre);
  Out(kIirFcr, 0x00);
  EXPECT_EQ(In(kIirFcr) & 0xc0, 0);
}

TEST_F(SerialTest, FcrReceiverResetClearsInput) {
  Queue("junk");
  Out(kIirFcr, 0x03);  // FIFO enable + RCVR FIFO reset
  EXPECT_FALSE(In(kLsr) & kLsrDr);
  Queue("k");
  EXPECT_EQ(In(kRbrThr), 'k');
}

TEST_F(SerialTest, ScratchRegister) {
  Out(kScr, 0x5c);
  EXPECT_EQ(In(kScr), 0x5c);
  Out(kScr, 0xa3);
  EXPECT_EQ(In(kScr), 0xa3);
}

TEST_F(SerialTest, ReceiveQueueIsBounded) {
  std::string big(200 * 1024, 'x');
  Queue(big);
  Queue(big);
  size_t n = 0;
  while ((In(kLsr) & kLsrDr) && n < 1000000) {
    (void)In(kRbrThr);
    ++n;
  }
  EXPECT_GT(n, 0u);
  EXPECT_LE(n, 64u * 1024) << "host input can grow the receive buffer without bound";
}

TEST_F(SerialTest, LoopbackSpamIsBounded) {
  Out(kMcr, 0x10);
  for (int i = 0; i < 100 * 1024; ++i) Out(kRbrThr, 'y');
  size_t n = 0;
  while ((In(kLsr) & kLsrDr) && n < 1000000) {
    (void)In(kRbrThr);
    ++n;
  }
  EXPECT_LE(n, 64u * 1024) << "a guest looping back data can grow VMM memory without bound";
}

TEST(SerialNoSinkTest, InvalidFdDiscards) {
  int irqs = 0;
  Serial s([&] { ++irqs; }, ScopedFd());
  uint8_t b = 'q';
  s.Write(0, std::span<const uint8_t>(&b, 1));  // must not crash or block
  uint8_t lsr = 0;
  s.Read(5, std::span<uint8_t>(&lsr, 1));
  EXPECT_EQ(lsr & kLsrThre, kLsrThre);
}

TEST(SerialBrokenSinkTest, ClosedPipeDoesNotBlock) {
  int fds[2];
  ASSERT_EQ(::pipe2(fds, O_CLOEXEC), 0);
  ::close(fds[0]);  // reader gone: writes fail with EPIPE (SIGPIPE ignored below)
  signal(SIGPIPE, SIG_IGN);
  Serial s([] {}, ScopedFd(fds[1]));
  uint8_t b = 'q';
  for (int i = 0; i < 10; ++i) s.Write(0, std::span<const uint8_t>(&b, 1));
  SUCCEED();
}

}  // namespace
}  // namespace microvmm
