// VfioPciDevice plugged into a real PciRootBus: firmware-style BAR assignment, guest config
// cycles through the root bus, MMIO through the BAR windows to the device's regions, a guest
// BAR move re-mapping both the window and the direct-mapped areas.
#include <cstring>
#include <memory>

#include "gtest/gtest.h"
#include "tests/vfio/pci/test_util.h"
#include "vmm/bus.h"
#include "vmm/pci/bar_allocator.h"
#include "vmm/pci/pci_root.h"

namespace microvmm::vfio {
namespace {

uint32_t BusRead32(const Bus& b, uint64_t addr) {
  uint8_t buf[4] = {};
  b.Read(addr, buf);
  uint32_t v;
  std::memcpy(&v, buf, 4);
  return v;
}

void BusWrite32(const Bus& b, uint64_t addr, uint32_t v) {
  uint8_t buf[4];
  std::memcpy(buf, &v, 4);
  b.Write(addr, buf);
}

TEST(VfioPciOnRootBus, GuestProgramsAndUsesTheDevice) {
  testing::PciFakeKernel k;
  testing::SetUpKernel(k);
  testing::FakeRouting kvm;
  pci::GsiRouter router(kvm, 4096);
  ASSERT_TRUE(router.Init().ok());
  testing::FakeBarMapper mapper;
  VfioPciOptions opts;
  opts.gsi_router = &router;
  opts.bar_mapper = &mapper;
  auto dev = VfioPciDevice::Create(testing::OpenDevice(k), opts);
  ASSERT_TRUE(dev.ok()) << dev.status();

  auto windows = pci::PciWindows::Default(2ULL << 30, 40);
  ASSERT_TRUE(windows.ok());
  pci::PciRootBus root(*windows);
  auto slot = root.AddDevice(*dev);
  ASSERT_TRUE(slot.ok()) << slot.status();
  Bus pio("pio"), mmio("mmio");
  ASSERT_TRUE(root.Attach(pio, mmio).ok());

  EXPECT_EQ(testing::Get(k.regions[VFIO_PCI_CONFIG_REGION_INDEX].data, 4, 2) &
                pci::kCommandMemory, 0u);  // not yet: no guest access so far
  EXPECT_TRUE(mapper.maps.empty());
  EXPECT_EQ(root.ConfigRead(0, *slot, 0, 0, 2), testing::kVendor);
  uint64_t bar0 = (*dev)->config().bar_address(0);
  uint64_t bar2 = (*dev)->config().bar_address(2);
  ASSERT_NE(bar0, 0u);
  ASSERT_NE(bar2, 0u);
  // AddDevice assigned the BARs and turned decoding on, firmware-style, with a raw write: the
  // guest's first config access brings the device and the direct maps in line.
  std::memcpy(k.regions[0].data.data() + 0x10, "\x78\x56\x34\x12", 4);
  EXPECT_EQ(root.ConfigRead(0, *slot, 0, pci::kRegCommand, 2) & pci::kCommandMemory,
            pci::kCommandMemory);
  EXPECT_EQ(testing::Get(k.regions[VFIO_PCI_CONFIG_REGION_INDEX].data, 4, 2) &
                pci::kCommandMemory, pci::kCommandMemory);
  EXPECT_TRUE(mapper.maps.count(bar0));
  EXPECT_TRUE(mapper.maps.count(bar0 + 0x2000));
  EXPECT_TRUE(mapper.maps.count(bar2));
  EXPECT_EQ(BusRead32(mmio, bar0 + 0x10), 0x12345678u);  // trapped path (no real KVM slot here)
  BusWrite32(mmio, bar2 + 4, 0xabcdef01);
  EXPECT_EQ(testing::Get(k.regions[2].data, 4, 4), 0xabcdef01u);

  // Decode off: the window no longer reaches the device, nothing is direct-mapped.
  root.ConfigWrite(0, *slot, 0, pci::kRegCommand, 2, 0);
  EXPECT_EQ(BusRead32(mmio, bar0 + 0x10), 0xffffffffu);
  EXPECT_TRUE(mapper.maps.empty());
  root.ConfigWrite(0, *slot, 0, pci::kRegCommand, 2, pci::kCommandMemory);
  EXPECT_EQ(mapper.maps.size(), 3u);

  // MSI-X table through the window.
  BusWrite32(mmio, bar0 + testing::kMsixTableOff, 0xfee00000);
  EXPECT_EQ((*dev)->msix()->entry(0).address_lo, 0xfee00000u);

  // The guest moves BAR0 (32-bit) inside the window.
  uint64_t moved = bar0 + 0x100000;
  root.ConfigWrite(0, *slot, 0, pci::kRegBar0, 4, static_cast<uint32_t>(moved));
  EXPECT_EQ(BusRead32(mmio, moved + 0x10), 0x12345678u);
  EXPECT_EQ(BusRead32(mmio, bar0 + 0x10), 0xffffffffu);
  EXPECT_FALSE(mapper.maps.count(bar0));
  EXPECT_TRUE(mapper.maps.count(moved));
  EXPECT_TRUE(mapper.maps.count(moved + 0x2000));
}

}  // namespace
}  // namespace microvmm::vfio
