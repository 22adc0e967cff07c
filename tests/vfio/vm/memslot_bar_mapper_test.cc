// MemslotBarMapper (vmm/vfio/kvm_glue.h) against a fake of KVM_SET_USER_MEMORY_REGION that
// enforces KVM's rules (slot ids, no overlapping slots, size 0 deletes an existing slot), alone
// and under a VfioPciDevice over the fake VFIO kernel: BAR areas become memslots when memory
// decode is on, follow a BAR move (delete + add), disappear on decode off and Detach.
#include <sys/mman.h>

#include <cstring>
#include <map>
#include <memory>
#include <tuple>

#include "devices/vfio/kernel/kernel_vfio_device.h"
#include "devices/vfio/kernel/vfio_uapi.h"
#include "devices/vfio/pci/vfio_pci_device.h"
#include "gtest/gtest.h"
#include "tests/vfio/kernel/fake_vfio_kernel.h"
#include "vmm/pci/pci_config.h"
#include "vmm/vfio/kvm_glue.h"

namespace microvmm {
namespace {

// KVM's memslot table as KVM_SET_USER_MEMORY_REGION keeps it.
struct FakeKvmSlots {
  absl::Status Set(uint32_t slot, uint64_t gpa, uint64_t size, void* host) {
    ++calls;
    if (fail_next) {
      fail_next = false;
      return absl::InternalError("KVM_SET_USER_MEMORY_REGION: Invalid argument");
    }
    if (size == 0) {
      if (!slots.erase(slot)) return absl::InvalidArgumentError("delete of an absent slot");
      return absl::OkStatus();
    }
    if (slots.count(slot)) return absl::InvalidArgumentError("slot id in use");
    for (const auto& [id, s] : slots) {
      const auto& [g, n, h] = s;
      if (gpa < g + n && g < gpa + size) return absl::AlreadyExistsError("overlapping memslot");
    }
    slots[slot] = {gpa, size, host};
    return absl::OkStatus();
  }
  MemslotBarMapper::SetSlotFn Fn() {
    return [this](uint32_t s, uint64_t g, uint64_t n, void* h) { return Set(s, g, n, h); };
  }
  std::map<uint32_t, std::tuple<uint64_t, uint64_t, void*>> slots;  // id -> (gpa, size, host)
  int calls = 0;
  bool fail_next = false;
};

void* Page(uintptr_t n) { return reinterpret_cast<void*>(n * 4096); }

TEST(MemslotBarMapper, AddRemoveAndReuseSlotIds) {
  FakeKvmSlots kvm;
  MemslotBarMapper m(kvm.Fn(), 100, 103);
  ASSERT_TRUE(m.Map(0xe0000000, Page(1), 0x1000).ok());
  ASSERT_TRUE(m.Map(0xe0002000, Page(2), 0x2000).ok());
  ASSERT_EQ(kvm.slots.size(), 2u);
  EXPECT_EQ(kvm.slots.at(100), std::make_tuple(uint64_t{0xe0000000}, uint64_t{0x1000}, Page(1)));
  EXPECT_EQ(kvm.slots.at(101), std::make_tuple(uint64_t{0xe0002000}, uint64_t{0x2000}, Page(2)));
  // Remove the first; its id is the lowest free one again.
  ASSERT_TRUE(m.Unmap(0xe0000000, 0x1000).ok());
  EXPECT_FALSE(kvm.slots.count(100));
  ASSERT_TRUE(m.Map(0xf0000000, Page(3), 0x1000).ok());
  EXPECT_EQ(std::get<0>(kvm.slots.at(100)), 0xf0000000u);
  ASSERT_TRUE(m.Map(0xf0001000, Page(4), 0x1000).ok());  // id 102, the last one
  EXPECT_TRUE(kvm.slots.count(102));
  absl::Status full = m.Map(0xf0002000, Page(5), 0x1000);
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted) << full;
  EXPECT_EQ(m.slots().size(), 3u);
}

TEST(MemslotBarMapper, MoveIsUnmapThenMap) {
  FakeKvmSlots kvm;
  MemslotBarMapper m(kvm.Fn(), 256, 1024);
  ASSERT_TRUE(m.Map(0xe0000000, Page(7), 0x4000).ok());
  // A move to an overlapping address works because the old slot goes first.
  ASSERT_TRUE(m.Unmap(0xe0000000, 0x4000).ok());
  ASSERT_TRUE(m.Map(0xe0002000, Page(7), 0x4000).ok());
  ASSERT_EQ(kvm.slots.size(), 1u);
  EXPECT_EQ(kvm.slots.begin()->second,
            std::make_tuple(uint64_t{0xe0002000}, uint64_t{0x4000}, Page(7)));
}

TEST(MemslotBarMapper, RefusesBadRangesWithoutTouchingKvm) {
  FakeKvmSlots kvm;
  MemslotBarMapper m(kvm.Fn(), 256, 1024);
  EXPECT_FALSE(m.Map(0xe0000800, Page(1), 0x1000).ok());  // unaligned gpa
  EXPECT_FALSE(m.Map(0xe0000000, reinterpret_cast<void*>(0x1234), 0x1000).ok());  // host
  EXPECT_FALSE(m.Map(0xe0000000, Page(1), 0x800).ok());  // size
  EXPECT_FALSE(m.Map(0xe0000000, Page(1), 0).ok());
  EXPECT_FALSE(m.Map(~uint64_t{0xfff}, Page(1), 0x2000).ok());  // wraps
  EXPECT_EQ(kvm.calls, 0);
  ASSERT_TRUE(m.Map(0xe0001000, Page(1), 0x2000).ok());
  // Overlaps from below, above, inside, around.
  EXPECT_EQ(m.Map(0xe0000000, Page(2), 0x2000).code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(m.Map(0xe0002000, Page(2), 0x2000).code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(m.Map(0xe0001000, Page(2), 0x1000).code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(m.Map(0xe0000000, Page(2), 0x8000).code(), absl::StatusCode::kAlreadyExists);
  EXPECT_TRUE(m.Map(0xe0003000, Page(2), 0x1000).ok());  // adjacent is fine
  // Unmap must name exactly a mapped range.
  EXPECT_EQ(m.Unmap(0xe0001000, 0x1000).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(m.Unmap(0xe0005000, 0x1000).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(kvm.calls, 2);
}

TEST(MemslotBarMapper, KvmFailureLeavesNoRecord) {
  FakeKvmSlots kvm;
  MemslotBarMapper m(kvm.Fn(), 256, 1024);
  kvm.fail_next = true;
  EXPECT_FALSE(m.Map(0xe0000000, Page(1), 0x1000).ok());
  EXPECT_TRUE(m.slots().empty());
  ASSERT_TRUE(m.Map(0xe0000000, Page(1), 0x1000).ok());
  EXPECT_EQ(kvm.slots.begin()->first, 256u) << "the failed attempt's id was not leaked";
  kvm.fail_next = true;
  EXPECT_FALSE(m.Unmap(0xe0000000, 0x1000).ok());
  EXPECT_EQ(m.slots().size(), 1u) << "still mapped in KVM, so still recorded";
  EXPECT_TRUE(m.Unmap(0xe0000000, 0x1000).ok());
  EXPECT_TRUE(kvm.slots.empty());
}

// ---- Under the PCI model ----

void Put(std::vector<uint8_t>& b, uint32_t off, unsigned size, uint32_t v) {
  for (unsigned i = 0; i < size; ++i) b[off + i] = static_cast<uint8_t>(v >> (8 * i));
}

TEST(MemslotBarMapper, FollowsVfioPciDeviceBars) {
  // The fake's default device: BAR0 16 KiB with sparse mmap areas [0, 4K) and [8K, 16K), BAR2
  // 4 KiB mappable (64-bit here), BAR4 I/O. No capabilities: no MSI-X, nothing else trapped.
  vfio::testing::FakeVfioKernel k;
  k.AddPciDevice("0000:01:00.0", "vfio-pci", "12", "vfio0");
  k.SetIommufdPresent(true);
  std::vector<uint8_t>& c = k.regions[VFIO_PCI_CONFIG_REGION_INDEX].data;
  Put(c, 0x00, 4, 0x11f01234);
  Put(c, 0x08, 4, 0x00ff0000);
  Put(c, 0x10, 4, 0x0);  // BAR0 mem32
  Put(c, 0x18, 4, 0x4);  // BAR2 mem64
  Put(c, 0x20, 4, 0x1);  // BAR4 I/O
  auto dev = vfio::OpenKernelVfioDevice("/sys/bus/pci/devices/0000:01:00.0", k);
  ASSERT_TRUE(dev.ok()) << dev.status();
  FakeKvmSlots kvm;
  MemslotBarMapper mapper(kvm.Fn(), 256, 1024);
  vfio::VfioPciOptions o;
  o.bar_mapper = &mapper;
  auto pci = vfio::VfioPciDevice::Create(std::move(*dev), o);
  ASSERT_TRUE(pci.ok()) << pci.status();
  vfio::VfioPciDevice& d = **pci;
  ASSERT_EQ(d.direct_maps().size(), 3u);
  ASSERT_TRUE(d.config().SetBarAddress(0, 0xe0000000).ok());
  ASSERT_TRUE(d.config().SetBarAddress(2, 0x100000000).ok());
  EXPECT_TRUE(kvm.slots.empty()) << "memory decode is off";

  d.WriteConfig(0x04, 2, pci::kCommandMemory);
  ASSERT_EQ(kvm.slots.size(), 3u);
  std::map<uint64_t, uint64_t> by_gpa;
  for (const auto& [id, s] : kvm.slots) by_gpa[std::get<0>(s)] = std::get<1>(s);
  EXPECT_EQ(by_gpa, (std::map<uint64_t, uint64_t>{
                        {0xe0000000, 0x1000}, {0xe0002000, 0x2000}, {0x100000000, 0x1000}}));
  // The memslot's host memory is the device mapping (what the guest then touches directly).
  for (const auto& dm : d.direct_maps()) {
    auto s = mapper.slots();
    ASSERT_TRUE(s.count(dm.gpa)) << dm.gpa;
    EXPECT_EQ(s.at(dm.gpa).host, dm.mapping.get());
  }

  // The guest moves BAR0: the old slots go, new ones come at the new address; BAR2 untouched.
  const auto bar2_slot = mapper.slots().at(0x100000000).id;
  d.WriteConfig(0x10, 4, 0xe0100000);
  d.BarMoved({0, pci::BarType::kMem32, 0x4000, 0xe0000000, 0xe0100000});
  by_gpa.clear();
  for (const auto& [id, s] : kvm.slots) by_gpa[std::get<0>(s)] = std::get<1>(s);
  EXPECT_EQ(by_gpa, (std::map<uint64_t, uint64_t>{
                        {0xe0100000, 0x1000}, {0xe0102000, 0x2000}, {0x100000000, 0x1000}}));
  EXPECT_EQ(mapper.slots().at(0x100000000).id, bar2_slot);

  d.WriteConfig(0x04, 2, 0);  // decode off: every slot deleted
  EXPECT_TRUE(kvm.slots.empty());
  d.WriteConfig(0x04, 2, pci::kCommandMemory);
  EXPECT_EQ(kvm.slots.size(), 3u);
  ASSERT_TRUE(d.Detach().ok());
  EXPECT_TRUE(kvm.slots.empty());
  EXPECT_TRUE(mapper.slots().empty());
}

}  // namespace
}  // namespace microvmm
