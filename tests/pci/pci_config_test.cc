// PciConfigSpace: header fields, write masks, command register, BAR sizing (32-bit, 64-bit, I/O),
// BAR-moved reporting, capability list, extended space, type 1 header, saved state.
#include "vmm/pci/pci_config.h"

#include <vector>

#include "gtest/gtest.h"

namespace microvmm::pci {
namespace {

PciHeader TestHeader() {
  PciHeader h;
  h.vendor_id = 0x1af4;
  h.device_id = 0x1042;
  h.revision_id = 0x01;
  h.class_code = 0x010000;  // mass storage, SCSI
  h.subsystem_vendor_id = 0x1af4;
  h.subsystem_id = 0x0002;
  h.interrupt_pin = 1;
  return h;
}

TEST(PciConfigTest, HeaderFieldsAreReadOnly) {
  PciConfigSpace c(TestHeader());
  EXPECT_EQ(c.Read(kRegVendorId, 4), 0x10421af4u);
  EXPECT_EQ(c.Read(kRegRevisionId, 4), 0x01000001u);  // class 0x010000, revision 1
  EXPECT_EQ(c.Read(kRegHeaderType, 1), 0u);
  EXPECT_EQ(c.Read(kRegSubsystemVendorId, 4), 0x00021af4u);
  EXPECT_EQ(c.Read(kRegInterruptPin, 1), 1u);
  c.Write(kRegVendorId, 4, 0xdeadbeef);
  c.Write(kRegRevisionId, 4, 0xffffffff);
  c.Write(kRegSubsystemVendorId, 4, 0);
  c.Write(kRegInterruptPin, 1, 3);
  c.Write(kRegHeaderType, 1, 0x81);
  c.Write(kRegBist, 1, 0x40);
  EXPECT_EQ(c.Read(kRegVendorId, 4), 0x10421af4u);
  EXPECT_EQ(c.Read(kRegRevisionId, 4), 0x01000001u);
  EXPECT_EQ(c.Read(kRegSubsystemVendorId, 4), 0x00021af4u);
  EXPECT_EQ(c.Read(kRegInterruptPin, 1), 1u);
  EXPECT_EQ(c.Read(kRegHeaderType, 1), 0u);
  EXPECT_EQ(c.Read(kRegBist, 1), 0u);
  // Byte and word reads of the same registers.
  EXPECT_EQ(c.Read(kRegVendorId + 1, 1), 0x1au);
  EXPECT_EQ(c.Read(kRegDeviceId, 2), 0x1042u);
}

TEST(PciConfigTest, InterruptLineIsWritable) {
  PciConfigSpace c(TestHeader());
  c.Write(kRegInterruptLine, 1, 11);
  EXPECT_EQ(c.interrupt_line(), 11);
  EXPECT_EQ(c.Read(kRegInterruptLine, 2), 0x010bu);  // line 11, pin INTA#
  // A dword write covering line, pin, min_gnt, max_lat changes only the line.
  c.Write(kRegInterruptLine, 4, 0xffffff05);
  EXPECT_EQ(c.Read(kRegInterruptLine, 4), 0x00000105u);
}

TEST(PciConfigTest, CommandRegisterKeepsOnlyImplementedBits) {
  PciConfigSpace c(TestHeader());
  EXPECT_EQ(c.command(), 0);
  c.Write(kRegCommand, 2, 0xffff);
  EXPECT_EQ(c.Read(kRegCommand, 2), kCommandWritable);
  EXPECT_TRUE(c.io_enabled());
  EXPECT_TRUE(c.memory_enabled());
  EXPECT_TRUE(c.bus_master_enabled());
  EXPECT_TRUE(c.intx_disabled());
  // A dword write at 0x04 also hits the status register, which stays read-only.
  c.Write(kRegCommand, 4, 0xffff0002);
  EXPECT_EQ(c.Read(kRegCommand, 4), 0x00000002u);
  EXPECT_FALSE(c.io_enabled());
  EXPECT_TRUE(c.memory_enabled());
  // Byte write of the upper command byte.
  c.Write(kRegCommand + 1, 1, 0x04);
  EXPECT_EQ(c.command(), kCommandMemory | kCommandIntxDisable);
}

TEST(PciConfigTest, Mem32BarSizing) {
  PciConfigSpace c(TestHeader());
  ASSERT_TRUE(c.AddBar(0, BarType::kMem32, 0x1000).ok());
  ASSERT_TRUE(c.AddBar(1, BarType::kMem32, 0x100000, /*prefetchable=*/true).ok());
  EXPECT_EQ(c.Read(kRegBar0, 4), 0u);
  EXPECT_EQ(c.Read(kRegBar0 + 4, 4), kBarPrefetchable);
  c.Write(kRegBar0, 4, 0xffffffff);
  EXPECT_EQ(c.Read(kRegBar0, 4), 0xfffff000u);
  c.Write(kRegBar0 + 4, 4, 0xffffffff);
  EXPECT_EQ(c.Read(kRegBar0 + 4, 4), 0xfff00008u);
  // Size from the read-back mask: ~(mask & ~0xf) + 1.
  EXPECT_EQ(~(c.Read(kRegBar0 + 4, 4) & ~0xfu) + 1, 0x100000u);
  c.Write(kRegBar0, 4, 0xe0123456);
  EXPECT_EQ(c.Read(kRegBar0, 4), 0xe0123000u);  // low bits below the size are read-only
  EXPECT_EQ(c.bar_address(0), 0xe0123000u);
  // Type bits cannot be changed.
  c.Write(kRegBar0 + 4, 4, 0xe0200001);
  EXPECT_EQ(c.Read(kRegBar0 + 4, 4), 0xe0200008u);
}

TEST(PciConfigTest, Mem64BarSizing) {
  PciConfigSpace c(TestHeader());
  ASSERT_TRUE(c.AddBar(0, BarType::kMem64, 0x4000).ok());
  ASSERT_TRUE(c.AddBar(2, BarType::kMem64, 8ULL << 30, /*prefetchable=*/true).ok());
  EXPECT_EQ(c.Read(kRegBar0, 4), kBarMem64);
  EXPECT_EQ(c.Read(kRegBar0 + 8, 4), kBarMem64 | kBarPrefetchable);
  // Small 64-bit BAR: the upper half is all address bits.
  c.Write(kRegBar0, 4, 0xffffffff);
  c.Write(kRegBar0 + 4, 4, 0xffffffff);
  EXPECT_EQ(c.Read(kRegBar0, 4), 0xffffc004u);
  EXPECT_EQ(c.Read(kRegBar0 + 4, 4), 0xffffffffu);
  // 8 GiB BAR: low dword has no address bits, the high dword has bit 0 read-only.
  c.Write(kRegBar0 + 8, 4, 0xffffffff);
  c.Write(kRegBar0 + 12, 4, 0xffffffff);
  EXPECT_EQ(c.Read(kRegBar0 + 8, 4), 0x0000000cu);
  EXPECT_EQ(c.Read(kRegBar0 + 12, 4), 0xfffffffeu);
  uint64_t mask = (uint64_t{c.Read(kRegBar0 + 12, 4)} << 32) | (c.Read(kRegBar0 + 8, 4) & ~0xfu);
  EXPECT_EQ(~mask + 1, 8ULL << 30);
  c.Write(kRegBar0 + 8, 4, 0);
  c.Write(kRegBar0 + 12, 4, 0x12);
  EXPECT_EQ(c.bar_address(2), 0x1200000000ULL);
  // The upper-half register is not a BAR of its own.
  EXPECT_EQ(c.bar_type(3), BarType::kNone);
  EXPECT_FALSE(c.AddBar(3, BarType::kMem32, 0x1000).ok());
}

TEST(PciConfigTest, IoBarSizing) {
  PciConfigSpace c(TestHeader());
  ASSERT_TRUE(c.AddBar(4, BarType::kIo, 0x20).ok());
  EXPECT_EQ(c.Read(kRegBar0 + 16, 4), kBarIoSpace);
  c.Write(kRegBar0 + 16, 4, 0xffffffff);
  EXPECT_EQ(c.Read(kRegBar0 + 16, 4), 0x0000ffe1u);  // 16-bit port space, bit 0 = I/O
  c.Write(kRegBar0 + 16, 4, 0xc040);
  EXPECT_EQ(c.bar_address(4), 0xc040u);
  EXPECT_EQ(c.Read(kRegBar0 + 16, 4), 0xc041u);
}

TEST(PciConfigTest, UnusedBarsAndRomReadZero) {
  PciConfigSpace c(TestHeader());
  ASSERT_TRUE(c.AddBar(0, BarType::kMem32, 0x1000).ok());
  for (uint32_t reg = kRegBar0 + 4; reg < kRegBar0 + 24; reg += 4) {
    c.Write(reg, 4, 0xffffffff);
    EXPECT_EQ(c.Read(reg, 4), 0u) << reg;
  }
  c.Write(kRegExpansionRom, 4, 0xffffffff);
  EXPECT_EQ(c.Read(kRegExpansionRom, 4), 0u);
}

TEST(PciConfigTest, AddBarValidates) {
  PciConfigSpace c(TestHeader());
  EXPECT_FALSE(c.AddBar(6, BarType::kMem32, 0x1000).ok());
  EXPECT_FALSE(c.AddBar(5, BarType::kMem64, 0x1000).ok());  // no room for the upper half
  EXPECT_FALSE(c.AddBar(0, BarType::kMem32, 0x1800).ok());  // not a power of two
  EXPECT_FALSE(c.AddBar(0, BarType::kMem32, 8).ok());       // below 16 bytes
  EXPECT_FALSE(c.AddBar(0, BarType::kIo, 0x200).ok());      // I/O BARs are at most 256 bytes
  EXPECT_FALSE(c.AddBar(0, BarType::kMem32, 4ULL << 30).ok());
  ASSERT_TRUE(c.AddBar(0, BarType::kMem64, 0x1000).ok());
  EXPECT_FALSE(c.AddBar(0, BarType::kMem32, 0x1000).ok());
  EXPECT_FALSE(c.AddBar(1, BarType::kMem32, 0x1000).ok());
  EXPECT_FALSE(c.SetBarAddress(0, 0x1800).ok());  // misaligned
  EXPECT_TRUE(c.SetBarAddress(0, 0x2000).ok());
}

TEST(PciConfigTest, BarMovedCallback) {
  PciConfigSpace c(TestHeader());
  ASSERT_TRUE(c.AddBar(0, BarType::kMem32, 0x1000).ok());
  ASSERT_TRUE(c.AddBar(2, BarType::kMem64, 0x4000).ok());
  ASSERT_TRUE(c.SetBarAddress(0, 0xe0100000).ok());
  ASSERT_TRUE(c.SetBarAddress(2, 0x140000000ULL).ok());
  std::vector<BarMove> moves;
  c.set_bar_moved_callback([&](const BarMove& m) { moves.push_back(m); });

  // Sizing probe and restore (what Linux does): nothing moved.
  uint32_t orig = c.Read(kRegBar0, 4);
  c.Write(kRegBar0, 4, 0xffffffff);
  c.Write(kRegBar0, 4, orig);
  uint32_t lo = c.Read(kRegBar0 + 8, 4), hi = c.Read(kRegBar0 + 12, 4);
  c.Write(kRegBar0 + 8, 4, 0xffffffff);
  c.Write(kRegBar0 + 8, 4, lo);
  c.Write(kRegBar0 + 12, 4, 0xffffffff);
  c.Write(kRegBar0 + 12, 4, hi);
  EXPECT_TRUE(moves.empty());

  // 32-bit BAR reprogrammed.
  c.Write(kRegBar0, 4, 0xe0200000);
  ASSERT_EQ(moves.size(), 1u);
  EXPECT_EQ(moves[0].index, 0);
  EXPECT_EQ(moves[0].old_addr, 0xe0100000u);
  EXPECT_EQ(moves[0].new_addr, 0xe0200000u);
  EXPECT_EQ(moves[0].size, 0x1000u);
  EXPECT_EQ(c.bar_mapped_address(0), 0xe0200000u);
  // Writing the same address again reports nothing.
  c.Write(kRegBar0, 4, 0xe0200000);
  EXPECT_EQ(moves.size(), 1u);

  // 64-bit BAR: reported once the upper half is written.
  c.Write(kRegBar0 + 8, 4, 0x00010000);
  EXPECT_EQ(moves.size(), 1u);
  c.Write(kRegBar0 + 12, 4, 0x2);
  ASSERT_EQ(moves.size(), 2u);
  EXPECT_EQ(moves[1].index, 2);
  EXPECT_EQ(moves[1].type, BarType::kMem64);
  EXPECT_EQ(moves[1].old_addr, 0x140000000ULL);
  EXPECT_EQ(moves[1].new_addr, 0x200010000ULL);

  // Word write to the upper half of a 32-bit BAR counts as a move too.
  c.Write(kRegBar0 + 2, 2, 0xe030);
  ASSERT_EQ(moves.size(), 3u);
  EXPECT_EQ(moves[2].new_addr, 0xe0300000u);
}

TEST(PciConfigTest, CapabilityListWalk) {
  PciConfigSpace c(TestHeader());
  EXPECT_EQ(c.Read(kRegStatus, 2) & kStatusCapabilities, 0u);
  EXPECT_FALSE(c.FindCapability(kCapIdVendor).has_value());
  std::vector<uint8_t> vendor = {kCapIdVendor, 0, 6, 0xaa, 0xbb, 0xcc};
  std::vector<uint8_t> vendor_mask = {0, 0, 0, 0xff, 0x0f, 0};
  auto a = c.AddCapability(vendor, vendor_mask);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(*a, 0x40u);
  std::vector<uint8_t> pm = {kCapIdPowerManagement, 0, 0x03, 0x00, 0, 0, 0, 0};
  auto b = c.AddCapability(pm);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(*b, 0x48u);  // 0x40 + 6, dword aligned

  EXPECT_NE(c.Read(kRegStatus, 2) & kStatusCapabilities, 0u);
  // Walk the list the way a guest does.
  std::vector<std::pair<uint32_t, uint8_t>> seen;
  for (uint32_t p = c.Read(kRegCapabilitiesPointer, 1); p != 0; p = c.Read(p + 1, 1))
    seen.push_back({p, static_cast<uint8_t>(c.Read(p, 1))});
  ASSERT_EQ(seen.size(), 2u);
  EXPECT_EQ(seen[0], (std::pair<uint32_t, uint8_t>{0x40, kCapIdVendor}));
  EXPECT_EQ(seen[1], (std::pair<uint32_t, uint8_t>{0x48, kCapIdPowerManagement}));
  EXPECT_EQ(c.FindCapability(kCapIdPowerManagement), std::optional<uint32_t>(0x48));
  EXPECT_FALSE(c.FindCapability(kCapIdMsix).has_value());

  // ID and next pointer are read-only; body bytes follow their masks.
  c.Write(0x40, 4, 0xffffffff);
  EXPECT_EQ(c.Read(0x40, 4), 0xff064809u);  // id 9, next 0x48, len 6; byte 3 writable
  c.Write(0x43, 1, 0x12);
  c.Write(0x44, 2, 0xffff);
  EXPECT_EQ(c.Read(0x43, 1), 0x12u);
  EXPECT_EQ(c.Read(0x44, 2), 0xccbfu);
  // The capabilities pointer is read-only.
  c.Write(kRegCapabilitiesPointer, 1, 0x80);
  EXPECT_EQ(c.Read(kRegCapabilitiesPointer, 1), 0x40u);
}

TEST(PciConfigTest, CapabilitySpaceExhausted) {
  PciConfigSpace c(TestHeader());
  std::vector<uint8_t> big(0xb0, 0);
  big[0] = kCapIdVendor;
  ASSERT_TRUE(c.AddCapability(big).ok());  // 0x40..0xef
  std::vector<uint8_t> more(0x20, 0);
  more[0] = kCapIdVendor;
  auto r = c.AddCapability(more);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted);
}

TEST(PciConfigTest, ExtendedSpaceReadsZeroAndBadAccessesAreRejected) {
  PciConfigSpace c(TestHeader());
  EXPECT_EQ(c.Read(0x100, 4), 0u);
  EXPECT_EQ(c.Read(0xffc, 4), 0u);
  c.Write(0x100, 4, 0x12345678);
  EXPECT_EQ(c.Read(0x100, 4), 0u);
  EXPECT_EQ(c.Read(0x1000, 4), 0xffffffffu);  // beyond 4 KiB
  EXPECT_EQ(c.Read(0x01, 2), 0xffffu);        // misaligned word
  EXPECT_EQ(c.Read(0x02, 4), 0xffffffffu);    // misaligned dword
  EXPECT_EQ(c.Read(0x00, 3), 0xffffffu);      // bad size
  c.Write(0x05, 2, 0xffff);                   // misaligned: dropped
  EXPECT_EQ(c.command(), 0);
}

TEST(PciConfigTest, WriteObservers) {
  PciConfigSpace c(TestHeader());
  int hits = 0;
  c.AddWriteObserver(0x3c, 1, [&] { ++hits; });
  c.Write(0x3c, 1, 5);
  c.Write(0x3c, 4, 5);
  c.Write(0x3d, 1, 0);
  c.Write(0x38, 4, 0);
  EXPECT_EQ(hits, 2);
}

TEST(PciConfigTest, BridgeHeader) {
  PciHeader h;
  h.vendor_id = 0x1b36;
  h.device_id = 0x0001;
  h.class_code = 0x060400;
  h.header_type = kHeaderTypeBridge;
  PciConfigSpace c(h);
  EXPECT_EQ(c.num_bars(), 2);
  EXPECT_EQ(c.Read(kRegHeaderType, 1), 1u);
  EXPECT_FALSE(c.AddBar(2, BarType::kMem32, 0x1000).ok());
  ASSERT_TRUE(c.AddBar(0, BarType::kMem32, 0x1000).ok());
  // Bus numbers and windows are writable; the prefetchable window says 64-bit.
  c.Write(kRegPrimaryBus, 4, 0x00020100);
  EXPECT_EQ(c.Read(kRegSecondaryBus, 1), 1u);
  EXPECT_EQ(c.Read(kRegSubordinateBus, 1), 2u);
  c.Write(kRegMemoryBase, 4, 0xffffffff);
  EXPECT_EQ(c.Read(kRegMemoryBase, 4), 0xfff0fff0u);
  c.Write(kRegPrefetchBase, 4, 0);
  EXPECT_EQ(c.Read(kRegPrefetchBase, 4), 0x00010001u);
  // Type 0 subsystem registers are bridge windows here, not identity.
  c.Write(kRegIoBase, 2, 0xffff);
  EXPECT_EQ(c.Read(kRegIoBase, 2), 0xf0f0u);
}

TEST(PciConfigTest, SaveRestoreRoundTrip) {
  PciConfigSpace a(TestHeader());
  ASSERT_TRUE(a.AddBar(0, BarType::kMem32, 0x1000).ok());
  ASSERT_TRUE(a.SetBarAddress(0, 0xe0100000).ok());
  a.Write(kRegCommand, 2, kCommandMemory | kCommandBusMaster);
  a.Write(kRegBar0, 4, 0xe0400000);
  a.Write(kRegInterruptLine, 1, 10);
  PciConfigState st = a.SaveState();

  PciConfigSpace b(TestHeader());
  ASSERT_TRUE(b.AddBar(0, BarType::kMem32, 0x1000).ok());
  ASSERT_TRUE(b.RestoreState(st).ok());
  for (uint32_t off = 0; off < 256; off += 4) EXPECT_EQ(a.Read(off, 4), b.Read(off, 4)) << off;
  EXPECT_EQ(b.command(), kCommandMemory | kCommandBusMaster);
  EXPECT_EQ(b.bar_mapped_address(0), 0xe0400000u);

  PciHeader other = TestHeader();
  other.device_id = 0x1041;
  PciConfigSpace c(other);
  EXPECT_FALSE(c.RestoreState(st).ok());
}

}  // namespace
}  // namespace microvmm::pci
