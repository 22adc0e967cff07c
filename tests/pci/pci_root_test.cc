// PciRootBus: configuration mechanism #1 decoding, ECAM decoding, host bridge, empty slots,
// multi-function devices, BAR windows (dispatch, decode enable, guest re-programming), wiring on
// the VMM's PIO/MMIO buses.
#include "vmm/pci/pci_root.h"

#include <memory>
#include <vector>

#include "gtest/gtest.h"
#include "vmm/bus.h"

namespace microvmm::pci {
namespace {

uint64_t ReadLe(BusDevice& d, uint64_t off, size_t size) {
  uint8_t buf[8] = {};
  d.Read(off, std::span<uint8_t>(buf, size));
  uint64_t v = 0;
  for (size_t i = 0; i < size; ++i) v |= uint64_t{buf[i]} << (8 * i);
  return v;
}

void WriteLe(BusDevice& d, uint64_t off, size_t size, uint64_t v) {
  uint8_t buf[8];
  for (size_t i = 0; i < size; ++i) buf[i] = static_cast<uint8_t>(v >> (8 * i));
  d.Write(off, std::span<const uint8_t>(buf, size));
}

uint64_t BusReadLe(const Bus& b, uint64_t addr, size_t size) {
  uint8_t buf[8] = {};
  b.Read(addr, std::span<uint8_t>(buf, size));
  uint64_t v = 0;
  for (size_t i = 0; i < size; ++i) v |= uint64_t{buf[i]} << (8 * i);
  return v;
}

void BusWriteLe(const Bus& b, uint64_t addr, size_t size, uint64_t v) {
  uint8_t buf[8];
  for (size_t i = 0; i < size; ++i) buf[i] = static_cast<uint8_t>(v >> (8 * i));
  b.Write(addr, std::span<const uint8_t>(buf, size));
}

// A function with up to three BARs; BAR reads return (bar << 24 | offset), writes are recorded.
class FakeDevice : public PciDevice {
 public:
  explicit FakeDevice(uint16_t device_id, bool bars = false)
      : cfg_(PciHeader{.vendor_id = 0x1af4,
                       .device_id = device_id,
                       .class_code = 0xff0000,
                       .subsystem_vendor_id = 0x1af4,
                       .subsystem_id = 0x1234,
                       .interrupt_pin = 1}) {
    if (bars) {
      EXPECT_TRUE(cfg_.AddBar(0, BarType::kMem32, 0x1000).ok());
      EXPECT_TRUE(cfg_.AddBar(1, BarType::kIo, 0x20).ok());
      EXPECT_TRUE(cfg_.AddBar(2, BarType::kMem64, 0x4000, true).ok());
    }
  }
  PciConfigSpace& config() override { return cfg_; }
  std::string name() const override { return "fake"; }
  void ReadBar(int bar, uint64_t offset, std::span<uint8_t> data) override {
    uint64_t v = (uint64_t{static_cast<uint32_t>(bar)} << 24) | offset;
    for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<uint8_t>(v >> (8 * i));
  }
  void WriteBar(int bar, uint64_t offset, std::span<const uint8_t> data) override {
    uint64_t v = 0;
    for (size_t i = 0; i < data.size(); ++i) v |= uint64_t{data[i]} << (8 * i);
    writes.push_back({bar, offset, v});
  }
  void BarMoved(const BarMove& m) override { moves.push_back(m); }

  struct Write {
    int bar;
    uint64_t offset;
    uint64_t value;
  };
  std::vector<Write> writes;
  std::vector<BarMove> moves;

 private:
  PciConfigSpace cfg_;
};

PciWindows TestWindows() {
  auto w = PciWindows::Default(2ULL << 30, 40);
  EXPECT_TRUE(w.ok());
  return *w;
}

// conf1 helpers on the 0xCF8 BusDevice (offset 0 = 0xCF8).
uint32_t Conf1Read(PciRootBus& root, uint8_t dev, uint8_t fn, uint8_t reg, size_t size,
                   uint8_t bus = 0) {
  WriteLe(*root.config_io(), 0, 4, EncodeConf1(bus, dev, fn, reg & 0xfc));
  return static_cast<uint32_t>(ReadLe(*root.config_io(), 4 + (reg & 3), size));
}

void Conf1Write(PciRootBus& root, uint8_t dev, uint8_t fn, uint8_t reg, size_t size, uint32_t v) {
  WriteLe(*root.config_io(), 0, 4, EncodeConf1(0, dev, fn, reg & 0xfc));
  WriteLe(*root.config_io(), 4 + (reg & 3), size, v);
}

TEST(PciRootTest, Conf1AddressFields) {
  Conf1Address a = DecodeConf1(0x80ab1a0c | 0x3);
  EXPECT_TRUE(a.enabled);
  EXPECT_EQ(a.bus, 0xab);
  EXPECT_EQ(a.device, 3);
  EXPECT_EQ(a.function, 2);
  EXPECT_EQ(a.reg, 0x0c);  // bits 1:0 are not part of the register number
  EXPECT_FALSE(DecodeConf1(0x00001a0c).enabled);
  EXPECT_EQ(EncodeConf1(0xab, 3, 2, 0x0c), 0x80ab1a0cu);
  EXPECT_EQ(DecodeConf1(EncodeConf1(0, 31, 7, 0xfc)).device, 31);
  EXPECT_EQ(DecodeConf1(EncodeConf1(0, 31, 7, 0xfc)).function, 7);
}

TEST(PciRootTest, EcamAddressFields) {
  EcamAddress a = DecodeEcam(0x0001d104);
  EXPECT_EQ(a.bus, 0);
  EXPECT_EQ(a.device, 3);
  EXPECT_EQ(a.function, 5);
  EXPECT_EQ(a.reg, 0x104);
  EXPECT_EQ(EncodeEcam(0, 3, 5, 0x104), 0x0001d104u);
  EXPECT_EQ(DecodeEcam(EncodeEcam(0, 31, 7, 0xffc)).reg, 0xffc);
  EXPECT_EQ(EncodeEcam(0, 31, 7, 0xffc) + 4, kEcamSize);  // last dword of the 1 MiB window
}

TEST(PciRootTest, HostBridgeAndAddressRegister) {
  PciRootBus root(TestWindows());
  // Linux's pci_check_type1: write 0x80000000 to 0xCF8, read it back.
  WriteLe(*root.config_io(), 0, 4, 0x80000000);
  EXPECT_EQ(ReadLe(*root.config_io(), 0, 4), 0x80000000u);
  EXPECT_EQ(ReadLe(*root.config_io(), 4, 4), 0x0d578086u);
  EXPECT_EQ(Conf1Read(root, 0, 0, kRegRevisionId, 4), 0x06000000u);  // class: host bridge
  EXPECT_EQ(Conf1Read(root, 0, 0, kRegClassCode + 1, 2), 0x0600u);
  EXPECT_EQ(Conf1Read(root, 0, 0, kRegHeaderType, 1), 0u);
  // Bits 1:0 of CONFIG_ADDRESS read back as 0.
  WriteLe(*root.config_io(), 0, 4, 0x80000003);
  EXPECT_EQ(ReadLe(*root.config_io(), 0, 4), 0x80000000u);
  // Byte/word accesses to 0xCF8-0xCFB do not touch CONFIG_ADDRESS (type-2 probing).
  WriteLe(*root.config_io(), 3, 1, 0x01);
  WriteLe(*root.config_io(), 0, 1, 0x00);
  WriteLe(*root.config_io(), 2, 2, 0x0000);
  EXPECT_EQ(ReadLe(*root.config_io(), 0, 4), 0x80000000u);
  EXPECT_EQ(ReadLe(*root.config_io(), 0, 1), 0xffu);
  EXPECT_EQ(ReadLe(*root.config_io(), 2, 1), 0xffu);
}

TEST(PciRootTest, Conf1EnableBit) {
  PciRootBus root(TestWindows());
  WriteLe(*root.config_io(), 0, 4, EncodeConf1(0, 0, 0, 0) & ~kConf1Enable);
  EXPECT_EQ(ReadLe(*root.config_io(), 4, 4), 0xffffffffu);
  WriteLe(*root.config_io(), 0, 4, EncodeConf1(0, 0, 0, kRegCommand) & ~kConf1Enable);
  WriteLe(*root.config_io(), 4, 2, kCommandMemory);
  EXPECT_EQ(root.device(0, 0)->config().command(), 0);
  EXPECT_EQ(Conf1Read(root, 0, 0, kRegVendorId, 4), 0x0d578086u);
}

TEST(PciRootTest, Conf1ByteAndWordAccessesAtDataPortOffsets) {
  PciRootBus root(TestWindows());
  WriteLe(*root.config_io(), 0, 4, EncodeConf1(0, 0, 0, 0));
  EXPECT_EQ(ReadLe(*root.config_io(), 4, 1), 0x86u);    // 0xCFC
  EXPECT_EQ(ReadLe(*root.config_io(), 5, 1), 0x80u);    // 0xCFD
  EXPECT_EQ(ReadLe(*root.config_io(), 6, 1), 0x57u);    // 0xCFE
  EXPECT_EQ(ReadLe(*root.config_io(), 7, 1), 0x0du);    // 0xCFF
  EXPECT_EQ(ReadLe(*root.config_io(), 4, 2), 0x8086u);  // 0xCFC word
  EXPECT_EQ(ReadLe(*root.config_io(), 6, 2), 0x0d57u);  // 0xCFE word
  EXPECT_EQ(ReadLe(*root.config_io(), 5, 2), 0xffffu);  // misaligned word
  EXPECT_EQ(ReadLe(*root.config_io(), 6, 4), 0xffffffffu);
  // Writes: the upper command byte through 0xCFD, the interrupt line through 0xCFC.
  auto dev = std::make_shared<FakeDevice>(0x1000);
  ASSERT_TRUE(root.AddDevice(2, 0, dev).ok());
  WriteLe(*root.config_io(), 0, 4, EncodeConf1(0, 2, 0, kRegCommand));
  WriteLe(*root.config_io(), 5, 1, 0x04);
  EXPECT_EQ(dev->config().command(), kCommandIntxDisable);
  WriteLe(*root.config_io(), 4, 1, kCommandMemory);
  EXPECT_EQ(dev->config().command(), kCommandIntxDisable | kCommandMemory);
  WriteLe(*root.config_io(), 0, 4, EncodeConf1(0, 2, 0, kRegInterruptLine));
  WriteLe(*root.config_io(), 4, 1, 9);
  EXPECT_EQ(dev->config().interrupt_line(), 9);
  EXPECT_EQ(ReadLe(*root.config_io(), 5, 1), 1u);  // interrupt pin at 0x3d via 0xCFD
}

TEST(PciRootTest, DeviceFunctionBusAndRegisterFields) {
  PciRootBus root(TestWindows());
  auto a = std::make_shared<FakeDevice>(0x1001);
  auto b = std::make_shared<FakeDevice>(0x1002);
  ASSERT_TRUE(root.AddDevice(3, 0, a).ok());
  ASSERT_TRUE(root.AddDevice(3, 5, b).ok());
  EXPECT_EQ(Conf1Read(root, 3, 0, 0, 4), 0x10011af4u);
  EXPECT_EQ(Conf1Read(root, 3, 5, 0, 4), 0x10021af4u);
  EXPECT_EQ(Conf1Read(root, 3, 5, kRegSubsystemVendorId, 4), 0x12341af4u);
  // Function 0 now advertises more functions.
  EXPECT_EQ(Conf1Read(root, 3, 0, kRegHeaderType, 1), kHeaderTypeMultiFunction);
  // Empty function, empty device, other buses: vendor 0xffff.
  EXPECT_EQ(Conf1Read(root, 3, 1, 0, 4), 0xffffffffu);
  EXPECT_EQ(Conf1Read(root, 3, 1, 0, 2), 0xffffu);
  EXPECT_EQ(Conf1Read(root, 31, 0, 0, 2), 0xffffu);
  EXPECT_EQ(Conf1Read(root, 3, 0, 0, 4, /*bus=*/1), 0xffffffffu);
  EXPECT_EQ(Conf1Read(root, 0, 0, 0, 4, /*bus=*/1), 0xffffffffu);
}

TEST(PciRootTest, SlotRules) {
  PciRootBus root(TestWindows());
  EXPECT_FALSE(root.AddDevice(0, 0, std::make_shared<FakeDevice>(1)).ok());  // host bridge
  EXPECT_FALSE(root.AddDevice(4, 1, std::make_shared<FakeDevice>(1)).ok());  // no function 0
  EXPECT_FALSE(root.AddDevice(32, 0, std::make_shared<FakeDevice>(1)).ok());
  EXPECT_FALSE(root.AddDevice(1, 8, std::make_shared<FakeDevice>(1)).ok());
  auto n = root.AddDevice(std::make_shared<FakeDevice>(1));
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 1);
  n = root.AddDevice(std::make_shared<FakeDevice>(2));
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 2);
  EXPECT_EQ(root.AddDevice(2, 0, std::make_shared<FakeDevice>(3)).code(),
            absl::StatusCode::kAlreadyExists);
}

TEST(PciRootTest, EcamDecoding) {
  PciRootBus root(TestWindows());
  auto a = std::make_shared<FakeDevice>(0x1001);
  auto b = std::make_shared<FakeDevice>(0x1002);
  ASSERT_TRUE(root.AddDevice(3, 0, a).ok());
  ASSERT_TRUE(root.AddDevice(3, 5, b).ok());
  BusDevice& ecam = *root.ecam();
  EXPECT_EQ(ReadLe(ecam, EncodeEcam(0, 0, 0, 0), 4), 0x0d578086u);
  EXPECT_EQ(ReadLe(ecam, EncodeEcam(0, 3, 5, 0), 4), 0x10021af4u);
  EXPECT_EQ(ReadLe(ecam, EncodeEcam(0, 3, 5, 2), 2), 0x1002u);
  EXPECT_EQ(ReadLe(ecam, EncodeEcam(0, 3, 5, 1), 1), 0x1au);
  EXPECT_EQ(ReadLe(ecam, EncodeEcam(0, 3, 5, 0), 8), 0x0000000010021af4ull);  // + command/status
  EXPECT_EQ(ReadLe(ecam, EncodeEcam(0, 3, 5, 8), 8), 0x00000000ff000000ull);  // class, header
  EXPECT_EQ(ReadLe(ecam, EncodeEcam(0, 3, 5, 0x100), 4), 0u);  // extended space
  EXPECT_EQ(ReadLe(ecam, EncodeEcam(0, 3, 5, 0xffc), 4), 0u);
  EXPECT_EQ(ReadLe(ecam, EncodeEcam(0, 3, 1, 0), 4), 0xffffffffu);
  EXPECT_EQ(ReadLe(ecam, EncodeEcam(0, 7, 0, 0), 2), 0xffffu);
  EXPECT_EQ(ReadLe(ecam, EncodeEcam(0, 3, 5, 1), 2), 0xffffu);  // misaligned
  // A write through ECAM is visible through conf1.
  WriteLe(ecam, EncodeEcam(0, 3, 5, kRegCommand), 2, kCommandBusMaster);
  EXPECT_EQ(Conf1Read(root, 3, 5, kRegCommand, 2), kCommandBusMaster);
  WriteLe(ecam, EncodeEcam(0, 3, 0, kRegInterruptLine), 8, 0x6);  // misaligned qword: dropped
  EXPECT_EQ(a->config().interrupt_line(), 0);
  WriteLe(ecam, EncodeEcam(0, 3, 0, 0x38), 8, 0x00000007ffffffffull);  // reserved + line
  EXPECT_EQ(a->config().interrupt_line(), 7);
}

TEST(PciRootTest, BarsAreAssignedAndDispatched) {
  PciWindows w = TestWindows();
  PciRootBus root(w);
  auto dev = std::make_shared<FakeDevice>(0x1003, /*bars=*/true);
  ASSERT_TRUE(root.AddDevice(1, 0, dev).ok());
  PciConfigSpace& c = dev->config();
  EXPECT_EQ(c.bar_address(0), w.mmio32_start);
  EXPECT_EQ(c.bar_address(1), w.io_start);
  EXPECT_EQ(c.bar_address(2), w.mmio64_start);
  EXPECT_EQ(c.command() & (kCommandIo | kCommandMemory), kCommandIo | kCommandMemory);
  // The guest sees the same through conf1.
  EXPECT_EQ(Conf1Read(root, 1, 0, kRegBar0, 4), static_cast<uint32_t>(w.mmio32_start));
  EXPECT_EQ(Conf1Read(root, 1, 0, kRegBar0 + 4, 4), static_cast<uint32_t>(w.io_start) | 1u);

  BusDevice& m32 = *root.mmio32_window();
  BusDevice& m64 = *root.mmio64_window();
  BusDevice& io = *root.io_window();
  EXPECT_EQ(ReadLe(m32, 0x10, 4), 0x00000010u);
  EXPECT_EQ(ReadLe(m32, 0xffc, 4), 0x00000ffcu);
  EXPECT_EQ(ReadLe(m32, 0x1000, 4), 0xffffffffu);  // past the BAR
  EXPECT_EQ(ReadLe(m32, 0xffe, 4), 0xffffffffu);   // straddles the end
  EXPECT_EQ(ReadLe(io, 0x4, 2), 0x0004u);  // bar 1: (1 << 24) | 4, low word
  EXPECT_EQ(ReadLe(io, 0x4, 4), 0x01000004u);
  EXPECT_EQ(ReadLe(m64, 0x3ff8, 8), 0x0000000002003ff8ull);
  WriteLe(m64, 0x8, 8, 0x1122334455667788ull);
  ASSERT_EQ(dev->writes.size(), 1u);
  EXPECT_EQ(dev->writes[0].bar, 2);
  EXPECT_EQ(dev->writes[0].offset, 8u);
  EXPECT_EQ(dev->writes[0].value, 0x1122334455667788ull);

  // Memory decode off: MMIO BARs stop answering, I/O still does.
  Conf1Write(root, 1, 0, kRegCommand, 2, kCommandIo);
  EXPECT_EQ(ReadLe(m32, 0x10, 4), 0xffffffffu);
  EXPECT_EQ(ReadLe(m64, 0x10, 4), 0xffffffffu);
  EXPECT_EQ(ReadLe(io, 0x4, 4), 0x01000004u);
  WriteLe(m32, 0, 4, 1);
  EXPECT_EQ(dev->writes.size(), 1u);
  Conf1Write(root, 1, 0, kRegCommand, 2, kCommandIo | kCommandMemory);
  EXPECT_EQ(ReadLe(m32, 0x10, 4), 0x00000010u);
}

TEST(PciRootTest, GuestMovesBars) {
  PciWindows w = TestWindows();
  PciRootBus root(w);
  auto dev = std::make_shared<FakeDevice>(0x1003, /*bars=*/true);
  ASSERT_TRUE(root.AddDevice(1, 0, dev).ok());
  BusDevice& m32 = *root.mmio32_window();
  BusDevice& m64 = *root.mmio64_window();

  // Linux-style sizing of every BAR leaves the mappings alone.
  for (uint8_t reg = kRegBar0; reg < kRegBar0 + 24; reg += 4) {
    uint32_t orig = Conf1Read(root, 1, 0, reg, 4);
    Conf1Write(root, 1, 0, reg, 4, 0xffffffff);
    Conf1Write(root, 1, 0, reg, 4, orig);
  }
  EXPECT_TRUE(dev->moves.empty());
  EXPECT_EQ(ReadLe(m32, 0x10, 4), 0x00000010u);

  // 32-bit BAR to a new address inside the window.
  uint64_t to = w.mmio32_start + 0x100000;
  Conf1Write(root, 1, 0, kRegBar0, 4, static_cast<uint32_t>(to));
  ASSERT_EQ(dev->moves.size(), 1u);
  EXPECT_EQ(dev->moves[0].old_addr, w.mmio32_start);
  EXPECT_EQ(dev->moves[0].new_addr, to);
  EXPECT_EQ(ReadLe(m32, 0x10, 4), 0xffffffffu);
  EXPECT_EQ(ReadLe(m32, to - w.mmio32_start + 0x10, 4), 0x00000010u);

  // 64-bit BAR moved into the 32-bit window (low half, then high half).
  uint64_t to64 = w.mmio32_start + 0x200000;
  Conf1Write(root, 1, 0, kRegBar0 + 8, 4, static_cast<uint32_t>(to64) | 0xc);
  Conf1Write(root, 1, 0, kRegBar0 + 12, 4, 0);
  ASSERT_EQ(dev->moves.size(), 2u);
  EXPECT_EQ(dev->moves[1].index, 2);
  EXPECT_EQ(dev->moves[1].new_addr, to64);
  EXPECT_EQ(ReadLe(m64, 0x10, 4), 0xffffffffu);
  EXPECT_EQ(ReadLe(m32, to64 - w.mmio32_start + 0x10, 4), 0x02000010u);

  // Moving onto another BAR's range fails: left unmapped, the device is told anyway.
  Conf1Write(root, 1, 0, kRegBar0, 4, static_cast<uint32_t>(to64));
  ASSERT_EQ(dev->moves.size(), 3u);
  EXPECT_EQ(ReadLe(m32, to - w.mmio32_start + 0x10, 4), 0xffffffffu);
  EXPECT_EQ(ReadLe(m32, to64 - w.mmio32_start + 0x10, 4), 0x02000010u);

  // Outside every window: unmapped.
  Conf1Write(root, 1, 0, kRegBar0, 4, 0xd0000000);
  EXPECT_EQ(dev->moves.size(), 4u);
  // Back inside: mapped again.
  Conf1Write(root, 1, 0, kRegBar0, 4, static_cast<uint32_t>(w.mmio32_start));
  EXPECT_EQ(ReadLe(m32, 0x10, 4), 0x00000010u);

  // RemapAll restores exactly the mapped addresses.
  ASSERT_TRUE(root.RemapAll().ok());
  EXPECT_EQ(ReadLe(m32, 0x10, 4), 0x00000010u);
  EXPECT_EQ(ReadLe(m32, to64 - w.mmio32_start + 0x10, 4), 0x02000010u);
}

TEST(PciRootTest, AttachedToVmmBuses) {
  PciWindows w = TestWindows();
  PciRootBus root(w);
  auto dev = std::make_shared<FakeDevice>(0x1003, /*bars=*/true);
  ASSERT_TRUE(root.AddDevice(1, 0, dev).ok());
  Bus pio("pio"), mmio("mmio");
  ASSERT_TRUE(root.Attach(pio, mmio).ok());
  BusWriteLe(pio, 0xcf8, 4, EncodeConf1(0, 1, 0, 0));
  EXPECT_EQ(BusReadLe(pio, 0xcfc, 4), 0x10031af4u);
  EXPECT_EQ(BusReadLe(pio, 0xcfe, 2), 0x1003u);
  EXPECT_EQ(BusReadLe(mmio, kEcamBase + EncodeEcam(0, 1, 0, 0), 4), 0x10031af4u);
  EXPECT_EQ(BusReadLe(mmio, kEcamBase + EncodeEcam(0, 2, 0, 0), 4), 0xffffffffu);
  EXPECT_EQ(BusReadLe(mmio, dev->config().bar_address(0) + 0x20, 4), 0x00000020u);
  EXPECT_EQ(BusReadLe(mmio, dev->config().bar_address(2) + 0x20, 4), 0x02000020u);
  EXPECT_EQ(BusReadLe(pio, dev->config().bar_address(1) + 2, 2), 0x0002u);
  // Nothing else can be inserted over the windows.
  EXPECT_EQ(mmio.Insert(root.ecam(), w.mmio32_start + 0x1000, 4).code(),
            absl::StatusCode::kAlreadyExists);
}

TEST(PciRootTest, ResetControlRegister) {
  PciRootBus root(TestWindows());
  int resets = 0;
  root.set_reset_callback([&] { ++resets; });
  Bus pio("pio"), mmio("mmio");
  ASSERT_TRUE(root.Attach(pio, mmio).ok());
  BusWriteLe(pio, 0xcf9, 1, 0x02);
  EXPECT_EQ(resets, 0);
  EXPECT_EQ(BusReadLe(pio, 0xcf9, 1), 0x02u);
  BusWriteLe(pio, 0xcf9, 1, 0x06);
  EXPECT_EQ(resets, 1);
  EXPECT_EQ(BusReadLe(pio, 0xcf9, 1), 0x02u);
}

}  // namespace
}  // namespace microvmm::pci
