// PCI window layout and BAR assignment: alignment, first fit, exhaustion, rollback.
#include "vmm/pci/bar_allocator.h"

#include "gtest/gtest.h"

namespace microvmm::pci {
namespace {

TEST(AddressAllocatorTest, AlignsAndFillsGaps) {
  AddressAllocator a(0x1000, 0x10000);
  auto x = a.Allocate(0x100, 0x100);
  ASSERT_TRUE(x.ok());
  EXPECT_EQ(*x, 0x1000u);
  auto y = a.Allocate(0x4000, 0x4000);
  ASSERT_TRUE(y.ok());
  EXPECT_EQ(*y, 0x4000u);  // aligned up past the first allocation
  auto z = a.Allocate(0x100, 0x100);
  ASSERT_TRUE(z.ok());
  EXPECT_EQ(*z, 0x1100u);  // first fit: the gap before 0x4000
  auto big = a.Allocate(0x8000, 0x8000);
  ASSERT_TRUE(big.ok());
  EXPECT_EQ(*big, 0x8000u);
  auto none = a.Allocate(0x8000, 0x8000);
  EXPECT_EQ(none.status().code(), absl::StatusCode::kResourceExhausted);
  ASSERT_TRUE(a.Free(0x8000).ok());
  EXPECT_FALSE(a.Free(0x8000).ok());
  auto again = a.Allocate(0x8000, 0x8000);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, 0x8000u);
  EXPECT_FALSE(a.Allocate(0x100, 0x300).ok());  // alignment not a power of two
  EXPECT_FALSE(a.Allocate(0, 1).ok());
}

TEST(AddressAllocatorTest, StartNotAlignedAndEndExact) {
  AddressAllocator a(0xe0100000, 0xfec00000);
  // The largest naturally aligned block of the 32-bit window is 128 MiB: a 256 MiB BAR would
  // need 0xf0000000..0xffffffff, which runs into the IOAPIC.
  EXPECT_EQ(a.Allocate(0x10000000, 0x10000000).status().code(),
            absl::StatusCode::kResourceExhausted);
  auto x = a.Allocate(0x8000000, 0x8000000);  // 128 MiB
  ASSERT_TRUE(x.ok());
  EXPECT_EQ(*x, 0xe8000000u);
  auto y = a.Allocate(0x1000, 0x1000);
  ASSERT_TRUE(y.ok());
  EXPECT_EQ(*y, 0xe0100000u);
  // Exactly up to the end works, one byte more does not.
  AddressAllocator b(0, 0x2000);
  EXPECT_TRUE(b.Allocate(0x2000, 0x2000).ok());
  AddressAllocator c(0, 0x1fff);
  EXPECT_FALSE(c.Allocate(0x2000, 0x2000).ok());
}

TEST(AddressAllocatorTest, Reserve) {
  AddressAllocator a(0x1000, 0x10000);
  ASSERT_TRUE(a.Reserve(0x2000, 0x1000).ok());
  EXPECT_EQ(a.Reserve(0x2800, 0x1000).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(a.Reserve(0x1800, 0x1000).code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_FALSE(a.Reserve(0x0, 0x1000).ok());
  auto x = a.Allocate(0x2000, 0x2000);
  ASSERT_TRUE(x.ok());
  EXPECT_EQ(*x, 0x4000u);
}

TEST(PciWindowsTest, DefaultLayout) {
  auto small = PciWindows::Default(2ULL << 30, 40);
  ASSERT_TRUE(small.ok());
  EXPECT_EQ(small->mmio32_start, 0xe0100000u);
  EXPECT_EQ(small->mmio32_end, 0xfec00000u);
  EXPECT_EQ(small->io_start, 0xc000u);
  EXPECT_EQ(small->io_end, 0x10000u);
  EXPECT_EQ(small->mmio64_start, 4ULL << 30);  // RAM ends below 4 GiB
  EXPECT_EQ(small->mmio64_end, (4ULL + 64) << 30);
  // 3.5 GiB: 3 GiB low + 0.5 GiB from 4 GiB -> window at 5 GiB.
  auto mid = PciWindows::Default(3584ULL << 20, 40);
  ASSERT_TRUE(mid.ok());
  EXPECT_EQ(mid->mmio64_start, 5ULL << 30);
  // 8 GiB: RAM up to 9 GiB.
  auto big = PciWindows::Default(8ULL << 30, 40);
  ASSERT_TRUE(big.ok());
  EXPECT_EQ(big->mmio64_start, 9ULL << 30);
  // Clamped to the physical address width (36 bits = 64 GiB).
  auto clamped = PciWindows::Default(8ULL << 30, 36);
  ASSERT_TRUE(clamped.ok());
  EXPECT_EQ(clamped->mmio64_end, 64ULL << 30);
  // No room at all.
  EXPECT_FALSE(PciWindows::Default(8ULL << 30, 33).ok());
}

TEST(PciWindowsTest, PhysAddressBits) {
  CpuidTable t;
  EXPECT_EQ(PhysAddressBits(t), 36);
  kvm_cpuid_entry2 e{};
  e.function = 0x80000008;
  e.eax = 0x3028;  // 40 physical, 48 virtual
  t.entries().push_back(e);
  EXPECT_EQ(PhysAddressBits(t), 40);
}

PciHeader Header() {
  PciHeader h;
  h.vendor_id = 0x1af4;
  h.device_id = 0x1000;
  return h;
}

TEST(PciBarAllocatorTest, AssignsEveryBarAlignedToItsSize) {
  auto w = PciWindows::Default(1ULL << 30, 40);
  ASSERT_TRUE(w.ok());
  PciBarAllocator alloc(*w);
  PciConfigSpace a(Header());
  ASSERT_TRUE(a.AddBar(0, BarType::kMem32, 0x1000).ok());
  ASSERT_TRUE(a.AddBar(1, BarType::kMem32, 0x100000).ok());
  ASSERT_TRUE(a.AddBar(2, BarType::kIo, 0x40).ok());
  ASSERT_TRUE(a.AddBar(4, BarType::kMem64, 0x4000, true).ok());
  ASSERT_TRUE(alloc.AssignBars(a).ok());
  EXPECT_EQ(a.bar_address(0), 0xe0100000u);
  EXPECT_EQ(a.bar_address(1), 0xe0200000u);  // aligned to 1 MiB
  EXPECT_EQ(a.bar_address(2), 0xc000u);
  EXPECT_EQ(a.bar_address(4), w->mmio64_start);
  EXPECT_EQ(a.bar_mapped_address(4), w->mmio64_start);
  EXPECT_EQ(a.command(), kCommandIo | kCommandMemory);
  for (int i : {0, 1, 2, 4}) EXPECT_EQ(a.bar_address(i) % a.bar_size(i), 0u) << i;

  PciConfigSpace b(Header());
  ASSERT_TRUE(b.AddBar(0, BarType::kMem32, 0x1000).ok());
  ASSERT_TRUE(b.AddBar(1, BarType::kIo, 0x40).ok());
  ASSERT_TRUE(alloc.AssignBars(b).ok());
  EXPECT_EQ(b.bar_address(0), 0xe0101000u);
  EXPECT_EQ(b.bar_address(1), 0xc040u);
}

TEST(PciBarAllocatorTest, MemoryOnlyDeviceGetsOnlyMemoryDecode) {
  auto w = PciWindows::Default(1ULL << 30, 40);
  PciBarAllocator alloc(*w);
  PciConfigSpace a(Header());
  ASSERT_TRUE(a.AddBar(0, BarType::kMem32, 0x1000).ok());
  ASSERT_TRUE(alloc.AssignBars(a).ok());
  EXPECT_EQ(a.command(), kCommandMemory);
  PciConfigSpace none(Header());
  ASSERT_TRUE(alloc.AssignBars(none).ok());
  EXPECT_EQ(none.command(), 0);
}

TEST(PciBarAllocatorTest, ExhaustionFailsAndRollsBack) {
  PciWindows w;
  w.io_start = 0xc000;
  w.io_end = 0xc040;
  w.mmio32_start = 0xe0000000;
  w.mmio32_end = 0xe0004000;
  PciBarAllocator alloc(w);  // empty 64-bit window: 64-bit BARs use the 32-bit window
  PciConfigSpace a(Header());
  ASSERT_TRUE(a.AddBar(0, BarType::kMem32, 0x2000).ok());
  ASSERT_TRUE(a.AddBar(1, BarType::kIo, 0x40).ok());
  ASSERT_TRUE(a.AddBar(2, BarType::kMem64, 0x1000).ok());
  ASSERT_TRUE(alloc.AssignBars(a).ok());
  EXPECT_EQ(a.bar_address(2), 0xe0002000u);

  PciConfigSpace b(Header());
  ASSERT_TRUE(b.AddBar(0, BarType::kMem32, 0x1000).ok());
  ASSERT_TRUE(b.AddBar(1, BarType::kIo, 0x4).ok());  // the I/O window is full
  absl::Status s = alloc.AssignBars(b);
  EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
  EXPECT_EQ(b.bar_address(0), 0u);  // rolled back
  EXPECT_EQ(b.command(), 0);
  // The rolled-back 4 KiB is still free.
  auto x = alloc.AllocateMmio32(0x1000);
  ASSERT_TRUE(x.ok());
  EXPECT_EQ(*x, 0xe0003000u);
  EXPECT_FALSE(alloc.AllocateMmio32(0x1000).ok());
}

TEST(PciBarAllocatorTest, PreplacedBarsAreKeptAndReserved) {
  auto w = PciWindows::Default(1ULL << 30, 40);
  PciBarAllocator alloc(*w);
  PciConfigSpace a(Header());
  ASSERT_TRUE(a.AddBar(0, BarType::kMem32, 0x1000).ok());
  ASSERT_TRUE(a.SetBarAddress(0, 0xe0100000).ok());
  ASSERT_TRUE(alloc.AssignBars(a).ok());
  EXPECT_EQ(a.bar_address(0), 0xe0100000u);
  auto x = alloc.AllocateMmio32(0x1000);
  ASSERT_TRUE(x.ok());
  EXPECT_EQ(*x, 0xe0101000u);
}

}  // namespace
}  // namespace microvmm::pci
