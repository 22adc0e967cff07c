// VfioPciDevice over KernelVfioDevice + the fake kernel: config shadow (identity, BAR sizing,
// hidden capabilities, masked and passed-through writes, command bits), BAR MMIO pass-through,
// MSI-X programming -> SetIrqs with the irqfd eventfds (masking, PBA, disable), MSI (vectors,
// routes, per-vector masking, MME clamp, exclusivity with MSI-X, save/restore), INTx with
// resample, reset, DMA mapping of guest RAM, direct BAR mapping, detach, save/restore.
#include "devices/vfio/pci/vfio_pci_device.h"

#include <unistd.h>

#include <random>
#include <string>
#include <vector>

#include "devices/vfio/pci/vfio_pci_state.pb.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/vfio/pci/test_util.h"
#include "vmm/memory/guest_memory.h"
#include "vmm/pci/msix.h"

namespace microvmm::vfio {
namespace {

using ::testing::Each;
using ::testing::HasSubstr;
using testing::FakeVfioKernel;
using testing::Get;
using testing::kCapExp;
using testing::kCapMsi;
using testing::kCapMsix;
using testing::kCapPm;
using testing::kCapVendor;
using testing::kMsixPbaOff;
using testing::kMsixTableOff;
using testing::kMsixVectors;

constexpr uint32_t kIntxGsi = 10;

struct Rig {
  explicit Rig(bool intx = true, bool mapper = false, bool open = true) {
    testing::SetUpKernel(k);
    EXPECT_TRUE(router.Init().ok());
    opts.gsi_router = &router;
    if (intx) {
      opts.intx_router = &intx_router;
      opts.intx_gsi = kIntxGsi;
    }
    if (mapper) opts.bar_mapper = &bar_mapper;
    if (open) Open();
  }
  void Open() {
    auto d = VfioPciDevice::Create(testing::OpenDevice(k), opts);
    ASSERT_TRUE(d.ok()) << d.status();
    dev = *d;
  }
  std::vector<uint8_t>& Cfg() { return k.regions[VFIO_PCI_CONFIG_REGION_INDEX].data; }
  std::vector<int>& MsixTriggers() { return k.irqs[VFIO_PCI_MSIX_IRQ_INDEX].triggers; }
  uint32_t Rd(uint32_t off, unsigned size) { return dev->ReadConfig(off, size); }
  void Wr(uint32_t off, unsigned size, uint32_t v) { dev->WriteConfig(off, size, v); }
  void WriteBar32(int bar, uint64_t off, uint32_t v) {
    uint8_t b[4];
    std::memcpy(b, &v, 4);
    dev->WriteBar(bar, off, b);
  }
  uint32_t ReadBar32(int bar, uint64_t off) {
    uint8_t b[4];
    dev->ReadBar(bar, off, b);
    uint32_t v;
    std::memcpy(&v, b, 4);
    return v;
  }
  // Programs MSI-X table entry `v` and unmasks it.
  void ProgramVector(uint16_t v, uint32_t addr, uint32_t data) {
    uint64_t e = kMsixTableOff + 16 * v;
    WriteBar32(0, e + pci::kMsixEntryAddressLo, addr);
    WriteBar32(0, e + pci::kMsixEntryAddressHi, 0);
    WriteBar32(0, e + pci::kMsixEntryData, data);
    WriteBar32(0, e + pci::kMsixEntryControl, 0);
  }
  void SetMsixControl(uint16_t ctl) { Wr(kCapMsix + 2, 2, ctl); }
  // Before Open(): the device's MSI capability gets message control `flags` (64-bit, maskable,
  // MMC bits) and the kernel `irqs` MSI vectors (vfio-pci reports 2^MMC).
  void SetMsi(uint16_t flags, uint32_t irqs) {
    testing::Put(Cfg(), kCapMsi + 2, 2, flags);
    k.irqs[VFIO_PCI_MSI_IRQ_INDEX].count = irqs;
    k.irqs[VFIO_PCI_MSI_IRQ_INDEX].triggers.assign(irqs, -1);
  }
  std::vector<int>& MsiTriggers() { return k.irqs[VFIO_PCI_MSI_IRQ_INDEX].triggers; }

  testing::PciFakeKernel k;
  testing::FakeRouting kvm;
  pci::GsiRouter router{kvm, 4096};
  testing::FakeIntxRouter intx_router;
  testing::FakeBarMapper bar_mapper;
  VfioPciOptions opts;
  std::shared_ptr<VfioPciDevice> dev;
};

// ---- Config shadow ----

TEST(VfioPciConfig, IdentityAndVirtualisedHeader) {
  Rig r;
  EXPECT_EQ(r.Rd(0x00, 2), testing::kVendor);
  EXPECT_EQ(r.Rd(0x02, 2), testing::kDevice);
  EXPECT_EQ(r.Rd(0x08, 4), 0x01080201u);
  EXPECT_EQ(r.Rd(0x2c, 4), 0x56788086u);
  EXPECT_EQ(r.Rd(0x0e, 1), 0u);          // single-function endpoint (host had the MF bit)
  EXPECT_EQ(r.Rd(0x30, 4), 0u);          // expansion ROM hidden
  EXPECT_EQ(r.Rd(0x04, 2), 0u);          // command starts cleared
  EXPECT_EQ(r.Rd(0x3d, 1), 1u);          // INTA# wired
  EXPECT_EQ(r.Rd(0x3c, 1), kIntxGsi);
  EXPECT_TRUE(r.Rd(0x06, 2) & pci::kStatusCapabilities);
  EXPECT_EQ(r.Rd(0x100, 4), 0u);         // no extended capabilities
  EXPECT_EQ(r.Rd(0xffc, 4), 0u);
}

TEST(VfioPciConfig, CapabilityListFiltered) {
  Rig r;
  // Guest's walk: PM -> MSI -> MSI-X -> PCIe; the vendor capability is unlinked. (MSI used to
  // be hidden too: this test asserted that until MSI was emulated.)
  std::vector<std::pair<uint32_t, uint32_t>> seen;
  for (uint32_t p = r.Rd(0x34, 1); p != 0 && seen.size() < 10; p = r.Rd(p + 1, 1))
    seen.push_back({p, r.Rd(p, 1)});
  EXPECT_EQ(seen, (std::vector<std::pair<uint32_t, uint32_t>>{
                      {kCapPm, 0x01}, {kCapMsi, 0x05}, {kCapMsix, 0x11}, {kCapExp, 0x10}}));
  // MSI: 64-bit, one vector, disabled, registers at their reset value.
  EXPECT_EQ(r.Rd(kCapMsi + 2, 2), 0x0080u);
  for (uint32_t off = kCapMsi + 4; off < kCapMsi + 14; off += 2) EXPECT_EQ(r.Rd(off, 2), 0u) << off;
  // Hidden capabilities read as zero, not as the device's bytes.
  EXPECT_EQ(r.Rd(kCapVendor + 4, 4), 0u);
  // Kept capabilities are the device's.
  EXPECT_EQ(r.Rd(kCapPm + 4, 4), 0x0008u);
  EXPECT_EQ(r.Rd(kCapExp + 8, 2), 0x2810u);
  EXPECT_EQ(r.Rd(kCapMsix + 2, 2), kMsixVectors - 1u);
  EXPECT_EQ(r.Rd(kCapMsix + 4, 4), kMsixTableOff);
  EXPECT_EQ(r.Rd(kCapMsix + 8, 4), kMsixPbaOff);
  // Which bytes reach the device: device-specific space only.
  EXPECT_TRUE(r.dev->passthrough_byte(0xc0));
  EXPECT_TRUE(r.dev->passthrough_byte(0xff));
  EXPECT_FALSE(r.dev->passthrough_byte(kCapMsi + 4));
  EXPECT_FALSE(r.dev->passthrough_byte(kCapVendor + 7));
  EXPECT_FALSE(r.dev->passthrough_byte(kCapExp + 0x3b));
  EXPECT_FALSE(r.dev->passthrough_byte(0x3c));
}

TEST(VfioPciConfig, BarSizingFromRegions) {
  Rig r;
  r.Wr(0x10, 4, 0xffffffff);
  EXPECT_EQ(r.Rd(0x10, 4), 0xffffc000u);  // 16 KiB mem32
  r.Wr(0x18, 4, 0xffffffff);
  r.Wr(0x1c, 4, 0xffffffff);
  EXPECT_EQ(r.Rd(0x18, 4), 0xfffff00cu);  // 4 KiB mem64 prefetchable
  EXPECT_EQ(r.Rd(0x1c, 4), 0xffffffffu);
  r.Wr(0x20, 4, 0xffffffff);
  EXPECT_EQ(r.Rd(0x20, 4), 0xff01u);      // 256-byte I/O
  r.Wr(0x14, 4, 0xffffffff);              // absent BAR1
  EXPECT_EQ(r.Rd(0x14, 4), 0u);
  r.Wr(0x24, 4, 0xffffffff);              // absent BAR5
  EXPECT_EQ(r.Rd(0x24, 4), 0u);
  EXPECT_EQ(r.dev->config().bar_type(2), pci::BarType::kMem64);
  EXPECT_TRUE(r.dev->config().bar_prefetchable(2));
  // The device's own BAR registers were never written.
  EXPECT_EQ(Get(r.Cfg(), 0x10, 4), 0u);
  EXPECT_EQ(Get(r.Cfg(), 0x18, 4), 0xcu);
}

TEST(VfioPciConfig, HostileWritesAreMasked) {
  Rig r;
  std::vector<uint8_t> before = r.Cfg();
  r.Wr(0x00, 4, 0);                     // identity
  r.Wr(0x08, 4, 0);
  r.Wr(0x30, 4, 0xffffffff);            // ROM BAR
  r.Wr(0x34, 1, 0x48);                  // capability pointer (read-only)
  r.Wr(kCapPm + 4, 2, 0x0003);          // D3hot
  r.Wr(kCapExp + 8, 2, 0x8000);         // PCIe FLR bit
  r.Wr(kCapMsi + 2, 2, 0xfffe);         // MSI: read-only bits, MME 7 (> MMC 0), no enable
  r.Wr(kCapVendor + 4, 4, 0x12345678);  // hidden vendor capability
  r.Wr(kCapMsix + 2, 2, 0x07ff);        // MSI-X table size (read-only)
  r.Wr(kCapMsix + 4, 4, 0x3);           // MSI-X BIR/offset
  r.Wr(0x3d, 1, 4);                     // interrupt pin
  r.Wr(0x1ff, 1, 0xff);                 // misaligned/extended: dropped
  r.Wr(0xfe, 4, 0xffffffff);            // misaligned
  EXPECT_EQ(r.Rd(0x00, 4), uint32_t{testing::kDevice} << 16 | testing::kVendor);
  EXPECT_EQ(r.Rd(0x30, 4), 0u);
  EXPECT_EQ(r.Rd(0x34, 1), kCapPm);
  EXPECT_EQ(r.Rd(kCapPm + 4, 2), 0x0008u);
  EXPECT_EQ(r.Rd(kCapExp + 8, 2), 0x2810u);
  EXPECT_EQ(r.Rd(kCapMsi + 2, 2), 0x0080u);  // (was: 0, MSI hidden) MME clamped to MMC 0
  EXPECT_EQ(r.Rd(kCapMsix + 2, 2), kMsixVectors - 1u);
  EXPECT_EQ(r.Rd(kCapMsix + 4, 4), kMsixTableOff);
  EXPECT_EQ(r.Rd(0x3d, 1), 1u);
  EXPECT_EQ(r.Cfg(), before);  // nothing reached the device
}

TEST(VfioPciConfig, DeviceSpecificRegistersPassThrough) {
  Rig r;
  EXPECT_EQ(r.Rd(0xc0, 4), 0x11223344u);
  testing::Put(r.Cfg(), 0xc0, 4, 0xa5a5a5a5);  // the device changes it: reads are live
  EXPECT_EQ(r.Rd(0xc0, 2), 0xa5a5u);
  r.Wr(0xc2, 2, 0xbeef);
  EXPECT_EQ(Get(r.Cfg(), 0xc0, 4), 0xbeefa5a5u);
  // A dword straddling the end of the vendor capability (0x70..0x77) and device space.
  testing::Put(r.Cfg(), 0x78, 4, 0x01020304);
  EXPECT_EQ(r.Rd(0x78, 4), 0x01020304u);
  r.Wr(0x76, 2, 0xffff);  // hidden bytes: dropped
  EXPECT_EQ(Get(r.Cfg(), 0x76, 2), 0xdeadu);  // unchanged (upper half of 0xdeadbeef)
}

TEST(VfioPciConfig, CommandBitsPassedSelectively) {
  Rig r;
  EXPECT_EQ(Get(r.Cfg(), 0x04, 2), 0x0040u);  // host's PARITY kept
  r.Wr(0x04, 2, 0xffff);
  EXPECT_EQ(r.Rd(0x04, 2), pci::kCommandWritable);
  // IO | MEM | BUS_MASTER | INTX_DISABLE reach the device; SERR and the rest do not.
  EXPECT_EQ(Get(r.Cfg(), 0x04, 2), 0x0040u | 0x0407u);
  r.Wr(0x04, 2, 0);
  EXPECT_EQ(r.Rd(0x04, 2), 0u);
  EXPECT_EQ(Get(r.Cfg(), 0x04, 2), 0x0040u);
}

TEST(VfioPciConfig, RefusesBridgesAndNonPci) {
  {
    Rig r(true, false, /*open=*/false);
    r.Cfg()[0x0e] = 0x01;
    auto d = VfioPciDevice::Create(testing::OpenDevice(r.k), r.opts);
    ASSERT_FALSE(d.ok());
    EXPECT_THAT(std::string(d.status().message()), HasSubstr("endpoint"));
  }
  {
    Rig r(true, false, /*open=*/false);
    testing::Put(r.Cfg(), kCapMsix + 4, 4, 0x3ff8);  // table beyond BAR0's 16 KiB
    auto d = VfioPciDevice::Create(testing::OpenDevice(r.k), r.opts);
    ASSERT_FALSE(d.ok());
    EXPECT_THAT(std::string(d.status().message()), HasSubstr("MSI-X"));
  }
  {
    Rig r(true, false, /*open=*/false);
    r.Cfg()[kCapExp + 1] = kCapPm;  // a loop in the capability list
    auto d = VfioPciDevice::Create(testing::OpenDevice(r.k), r.opts);
    ASSERT_TRUE(d.ok()) << d.status();
    int n = 0;
    for (uint32_t p = (*d)->ReadConfig(0x34, 1); p != 0 && n < 100; p = (*d)->ReadConfig(p + 1, 1))
      ++n;
    EXPECT_EQ(n, 4);  // terminated, not looping (PM, MSI, MSI-X, PCIe; was 3 with MSI hidden)
  }
}

// A hostile device (a vfio-user server may send anything): random config spaces either attach
// with a sane guest view (acyclic capability list inside 0x40..0xFF) or are refused; guest
// accesses afterwards never crash.
TEST(VfioPciConfig, RandomConfigSpacesAreHandled) {
  std::mt19937 rng(12345);
  int attached = 0;
  for (int iter = 0; iter < 300; ++iter) {
    Rig r(true, iter % 2 == 0, /*open=*/false);
    std::vector<uint8_t>& c = r.Cfg();
    for (uint32_t i = 0x04; i < 0x100; ++i)
      if (rng() % 3 == 0) c[i] = static_cast<uint8_t>(rng());
    if (iter % 4 != 3) c[0x0e] &= 0x80;  // mostly endpoints
    c[0x06] |= 0x10;
    auto d = VfioPciDevice::Create(testing::OpenDevice(r.k), r.opts);
    if (!d.ok()) continue;
    ++attached;
    VfioPciDevice& dev = **d;
    int n = 0;
    for (uint32_t p = dev.ReadConfig(0x34, 1); p != 0; p = dev.ReadConfig(p + 1, 1)) {
      ASSERT_GE(p, 0x40u) << iter;
      ASSERT_LT(p, 0x100u) << iter;
      ASSERT_LT(++n, 48) << "capability loop, iteration " << iter;
    }
    for (int k = 0; k < 200; ++k) {
      uint32_t off = rng() % 0x1000;
      unsigned size = 1u << (rng() % 3);
      if (rng() % 2) dev.WriteConfig(off, size, rng());
      (void)dev.ReadConfig(off, size);
      uint8_t b[8];
      int bar = static_cast<int>(rng() % 7) - 1;
      uint64_t boff = rng() % 0x5000;
      dev.ReadBar(bar, boff, std::span<uint8_t>(b, 1u << (rng() % 4)));
      dev.WriteBar(bar, boff, std::span<const uint8_t>(b, 1u << (rng() % 4)));
    }
    EXPECT_TRUE(dev.Detach().ok()) << iter;
  }
  EXPECT_GT(attached, 50);  // the test exercised attached devices, not only refusals
}

// ---- BARs ----

TEST(VfioPciBar, MmioGoesToTheDevice) {
  Rig r;
  r.WriteBar32(0, 0x10, 0xcafef00d);
  EXPECT_EQ(Get(r.k.regions[0].data, 0x10, 4), 0xcafef00du);
  testing::Put(r.k.regions[2].data, 0x8, 4, 0x5a5a1234);
  EXPECT_EQ(r.ReadBar32(2, 0x8), 0x5a5a1234u);
  uint8_t q[8] = {1, 2, 3, 4, 5, 6, 7, 8};
  r.dev->WriteBar(4, 0xf8, q);  // I/O BAR, last 8 bytes
  EXPECT_EQ(r.k.regions[4].data[0xff], 8);
  // Outside the region / bad BAR: all-ones, nothing written.
  EXPECT_EQ(r.ReadBar32(4, 0x100), 0xffffffffu);
  EXPECT_EQ(r.ReadBar32(1, 0), 0xffffffffu);
  EXPECT_EQ(r.ReadBar32(7, 0), 0xffffffffu);
  r.WriteBar32(-1, 0, 1);
  // Non-table registers on the MSI-X page still reach the device.
  r.WriteBar32(0, kMsixTableOff + 16 * kMsixVectors, 0x77);
  EXPECT_EQ(Get(r.k.regions[0].data, kMsixTableOff + 16 * kMsixVectors, 4), 0x77u);
}

// Post-copy gate: a device of a class with a DMA model (here the fake re-labelled 1234:11f0)
// reports what a doorbell makes it access, before the write reaches the device; the model's
// registers travel in the saved state.
TEST(VfioPciBar, GateSeesDoorbellTargetsBeforeTheDevice) {
  Rig r(/*intx=*/true, /*mapper=*/true, /*open=*/false);
  testing::Put(r.Cfg(), 0x00, 2, 0x1234);
  testing::Put(r.Cfg(), 0x02, 2, 0x11f0);
  r.Open();
  ASSERT_NE(r.dev->dma_model(), nullptr);
  std::vector<std::vector<DmaRange>> seen;
  uint32_t doorbell_at_gate = 0xffffffff;
  r.dev->SetBarWriteGate([&](const std::vector<DmaRange>& t) {
    seen.push_back(t);
    doorbell_at_gate = Get(r.k.regions[0].data, 0x28, 4);
  });
  r.WriteBar32(0, 0x08, 0x4000);  // DST
  r.WriteBar32(0, 0x10, 512);     // LEN
  r.WriteBar32(0, 0x18, 1);       // OP fill
  EXPECT_TRUE(seen.empty()) << "plain register writes are not DMA";
  r.WriteBar32(0, 0x28, 7);       // doorbell
  ASSERT_EQ(seen.size(), 1u);
  ASSERT_EQ(seen[0].size(), 1u);
  EXPECT_EQ(seen[0][0].iova, 0x4000u);
  EXPECT_EQ(seen[0][0].size, 512u);
  EXPECT_EQ(doorbell_at_gate, 0u) << "the doorbell reached the device before the gate";
  EXPECT_EQ(Get(r.k.regions[0].data, 0x28, 4), 7u) << "the doorbell never reached the device";
  // The model's registers travel with the saved state.
  const std::string saved = r.dev->SaveState({});
  VfioPciState st;
  ASSERT_TRUE(st.ParseFromString(saved));
  EXPECT_EQ(st.dma_model().size(), 32u);
  r.dev->SetBarWriteGate(nullptr);
  r.WriteBar32(0, 0x28, 8);
  EXPECT_EQ(seen.size(), 1u) << "the gate was removed";
}

TEST(VfioPciBar, GateTrapsDirectMappedBars) {
  Rig r(/*intx=*/true, /*mapper=*/true);
  ASSERT_TRUE(r.dev->config().SetBarAddress(0, 0xe0000000).ok());
  ASSERT_TRUE(r.dev->config().SetBarAddress(2, 0x100000000).ok());
  r.Wr(0x04, 2, pci::kCommandMemory);
  const size_t mapped = r.bar_mapper.maps.size();
  ASSERT_EQ(mapped, 3u) << "the fake's mappable BAR ranges should be direct-mapped";
  r.dev->SetBarWriteGate([](const std::vector<DmaRange>&) {});
  EXPECT_TRUE(r.bar_mapper.maps.empty()) << "a gate must see every BAR write: nothing mapped";
  r.dev->SetBarWriteGate(nullptr);
  EXPECT_EQ(r.bar_mapper.maps.size(), mapped) << "direct maps come back";
}

TEST(VfioPciBar, AccessStraddlingMsixTableIsDropped) {
  Rig r;
  uint8_t q[8];
  std::memset(q, 0x5a, 8);
  r.dev->WriteBar(0, kMsixTableOff - 4, q);
  EXPECT_EQ(Get(r.k.regions[0].data, kMsixTableOff - 4, 4), 0u);
  EXPECT_EQ(r.dev->msix()->entry(0).address_lo, 0u);
  r.dev->ReadBar(0, kMsixTableOff - 4, q);
  EXPECT_EQ(q[0], 0xff);
  EXPECT_EQ(q[7], 0xff);
}

TEST(VfioPciBar, MsixTableIsEmulatedNotForwarded) {
  Rig r;
  r.ProgramVector(3, 0xfee01000, 0x4033);
  EXPECT_EQ(r.ReadBar32(0, kMsixTableOff + 48), 0xfee01000u);
  EXPECT_EQ(r.ReadBar32(0, kMsixTableOff + 48 + 8), 0x4033u);
  EXPECT_EQ(r.ReadBar32(0, kMsixTableOff + 48 + 12), 0u);  // unmasked
  for (uint32_t i = 0; i < 16 * kMsixVectors; ++i)
    ASSERT_EQ(r.k.regions[0].data[kMsixTableOff + i], 0) << i;
  r.WriteBar32(0, kMsixPbaOff, 0xffffffff);  // PBA read-only
  EXPECT_EQ(r.ReadBar32(0, kMsixPbaOff), 0u);
}

// ---- MSI-X ----

TEST(VfioPciMsix, EnableConnectsDeviceVectorsToIrqfds) {
  Rig r;
  pci::MsixTable* t = r.dev->msix();
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->num_vectors(), kMsixVectors);
  EXPECT_THAT(r.MsixTriggers(), Each(-1));
  r.ProgramVector(0, 0xfee00000, 0x41);
  r.ProgramVector(5, 0xfee02000, 0x45);
  r.SetMsixControl(pci::kMsixControlEnable);
  EXPECT_TRUE(r.dev->msix_connected());
  ASSERT_EQ(r.MsixTriggers().size(), kMsixVectors);
  for (uint16_t v = 0; v < kMsixVectors; ++v) EXPECT_EQ(r.MsixTriggers()[v], t->eventfd(v)) << v;
  const kvm_irq_routing_entry* e = r.kvm.Route(t->gsi(5));
  ASSERT_NE(e, nullptr);
  EXPECT_EQ(e->u.msi.address_lo, 0xfee02000u);
  EXPECT_EQ(e->u.msi.data, 0x45u);
  EXPECT_TRUE(r.kvm.irqfds.count({t->eventfd(5), t->gsi(5)}));
  // The device raising vector 5 = a write to the eventfd it was given: KVM delivers it.
  uint64_t one = 1;
  ASSERT_EQ(::write(r.MsixTriggers()[5], &one, 8), 8);
  auto delivered = r.kvm.Deliver();
  EXPECT_EQ(delivered[t->gsi(5)], 1u);
  // Disable: the device's MSI-X index is torn down.
  r.SetMsixControl(0);
  EXPECT_FALSE(r.dev->msix_connected());
  EXPECT_THAT(r.MsixTriggers(), Each(-1));
  EXPECT_TRUE(r.kvm.irqfds.empty());
}

TEST(VfioPciMsix, MaskedVectorKeepsEventfdAndShowsPending) {
  Rig r;
  pci::MsixTable* t = r.dev->msix();
  r.ProgramVector(2, 0xfee00000, 0x42);
  r.SetMsixControl(pci::kMsixControlEnable);
  // Guest masks vector 2: the irqfd is detached but the device keeps its eventfd.
  r.WriteBar32(0, kMsixTableOff + 32 + 12, pci::kMsixVectorMasked);
  EXPECT_EQ(r.MsixTriggers()[2], t->eventfd(2));
  EXPECT_FALSE(r.kvm.irqfds.count({t->eventfd(2), t->gsi(2)}));
  uint64_t one = 1;
  ASSERT_EQ(::write(r.MsixTriggers()[2], &one, 8), 8);
  EXPECT_TRUE(r.kvm.Deliver().empty());
  EXPECT_EQ(r.ReadBar32(0, kMsixPbaOff), 1u << 2);  // pending bit
  // Unmask: delivered then, pending cleared.
  r.WriteBar32(0, kMsixTableOff + 32 + 12, 0);
  EXPECT_EQ(r.kvm.Deliver()[t->gsi(2)], 1u);
  EXPECT_EQ(r.ReadBar32(0, kMsixPbaOff), 0u);
  // Function mask: same, for every vector; the device stays connected.
  r.SetMsixControl(pci::kMsixControlEnable | pci::kMsixControlFunctionMask);
  EXPECT_TRUE(r.dev->msix_connected());
  EXPECT_TRUE(r.kvm.irqfds.empty());
  EXPECT_EQ(r.Rd(kCapMsix + 2, 2),
            pci::kMsixControlEnable | pci::kMsixControlFunctionMask | (kMsixVectors - 1u));
}

TEST(VfioPciMsix, DeviceWithoutMsixIrqsHidesCapability) {
  Rig r(true, false, /*open=*/false);
  r.k.irqs[VFIO_PCI_MSIX_IRQ_INDEX].count = 0;
  r.Open();
  EXPECT_EQ(r.dev->msix(), nullptr);
  for (uint32_t p = r.Rd(0x34, 1); p != 0; p = r.Rd(p + 1, 1)) EXPECT_NE(r.Rd(p, 1), 0x11u);
  EXPECT_EQ(r.Rd(kCapMsix, 4), 0u);
}

TEST(VfioPciMsix, MsixWithoutRouterIsAnError) {
  Rig r(true, false, /*open=*/false);
  r.opts.gsi_router = nullptr;
  auto d = VfioPciDevice::Create(testing::OpenDevice(r.k), r.opts);
  ASSERT_FALSE(d.ok());
  EXPECT_THAT(std::string(d.status().message()), HasSubstr("gsi_router"));
}

// ---- MSI ----

// 64-bit, per-vector masking: control +2, address +4/+8, data +0xc, mask +0x10, pending +0x14.
constexpr uint16_t kMsi64Mask8 = 0x0180 | 3 << 1;  // 8 vectors (MMC 3)
constexpr uint32_t kMsiAddr = kCapMsi + 4, kMsiAddrHi = kCapMsi + 8, kMsiData = kCapMsi + 0xc,
                   kMsiMask = kCapMsi + 0x10, kMsiPending = kCapMsi + 0x14;
constexpr uint16_t kMsiEnable = 1;
uint16_t Mme(uint32_t log2) { return static_cast<uint16_t>(log2 << 4); }

struct MsiRig : Rig {
  explicit MsiRig(uint16_t flags = kMsi64Mask8, uint32_t irqs = 8) : Rig(true, false, false) {
    SetMsi(flags, irqs);
    Open();
  }
};

TEST(VfioPciMsi, CapabilityVisibleAndWritableWhereTheSpecAllows) {
  MsiRig r;
  ASSERT_EQ(r.dev->msi_cap_offset(), kCapMsi);
  ASSERT_NE(r.dev->msi(), nullptr);
  EXPECT_EQ(r.dev->msi()->num_vectors(), 8);
  EXPECT_EQ(r.Rd(kCapMsi, 1), 0x05u);
  EXPECT_EQ(r.Rd(kCapMsi + 2, 2), kMsi64Mask8);
  r.Wr(kMsiAddr, 4, 0xfee01003);  // bits 1:0 reserved
  EXPECT_EQ(r.Rd(kMsiAddr, 4), 0xfee01000u);
  r.Wr(kMsiAddrHi, 4, 0x1);
  EXPECT_EQ(r.Rd(kMsiAddrHi, 4), 0x1u);
  r.Wr(kMsiData, 4, 0x12344321);  // 16-bit data, reserved upper half
  EXPECT_EQ(r.Rd(kMsiData, 4), 0x4321u);
  r.Wr(kMsiMask, 4, 0xffffffff);  // only the 8 implemented vectors
  EXPECT_EQ(r.Rd(kMsiMask, 4), 0xffu);
  r.Wr(kMsiPending, 4, 0xffffffff);  // read-only
  EXPECT_EQ(r.Rd(kMsiPending, 4), 0u);
  r.Wr(kCapMsi + 2, 2, 0xfe8e);  // MMC/64-bit/maskable/reserved are read-only; MME 0
  EXPECT_EQ(r.Rd(kCapMsi + 2, 2), kMsi64Mask8);
  // Nothing of it reached the device's own capability.
  EXPECT_EQ(Get(r.Cfg(), kCapMsi + 2, 2), kMsi64Mask8);
  EXPECT_EQ(Get(r.Cfg(), kMsiAddr, 4), 0u);
  EXPECT_FALSE(r.dev->msi_connected());
}

TEST(VfioPciMsi, EnableConnectsVectorsAndRoutesWithVectorInData) {
  MsiRig r;
  pci::MsixTable* t = r.dev->msi();
  r.Wr(kMsiAddr, 4, 0xfee02000);
  r.Wr(kMsiData, 2, 0x4043);  // the low MME bits are the function's: replaced per vector
  EXPECT_EQ(r.k.ioctl_calls(VFIO_DEVICE_SET_IRQS), 2);  // INTx trigger + unmask at attach
  r.Wr(kCapMsi + 2, 2, Mme(2) | kMsiEnable);             // 4 vectors
  ASSERT_TRUE(r.dev->msi_connected());
  EXPECT_EQ(r.dev->msi_connected_vectors(), 4u);
  EXPECT_EQ(r.k.irq_type_conflicts, 0);
  for (uint16_t v = 0; v < 8; ++v) {
    if (v < 4) {
      EXPECT_EQ(r.MsiTriggers()[v], t->eventfd(v)) << v;
      const kvm_irq_routing_entry* e = r.kvm.Route(t->gsi(v));
      ASSERT_NE(e, nullptr) << v;
      EXPECT_EQ(e->u.msi.address_lo, 0xfee02000u);
      EXPECT_EQ(e->u.msi.address_hi, 0u);
      EXPECT_EQ(e->u.msi.data, 0x4040u | v);
      EXPECT_TRUE(r.kvm.irqfds.count({t->eventfd(v), t->gsi(v)})) << v;
    } else {
      EXPECT_EQ(r.MsiTriggers()[v], -1) << v;
      EXPECT_EQ(r.kvm.Route(t->gsi(v)), nullptr) << v;
    }
  }
  EXPECT_EQ(r.kvm.irqfds.size(), 4u);
  // INTx is off while MSI is on (vfio-pci: one type at a time).
  EXPECT_EQ(r.k.irqs[VFIO_PCI_INTX_IRQ_INDEX].triggers[0], -1);
  // The device raising vector 3 reaches KVM on vector 3's GSI.
  uint64_t one = 1;
  ASSERT_EQ(::write(r.MsiTriggers()[3], &one, 8), 8);
  EXPECT_EQ(r.kvm.Deliver(), (std::map<uint32_t, uint64_t>{{t->gsi(3), 1}}));
  // Linux retargets MSI by rewriting address/data while enabled: routes follow, no SetIrqs.
  int set_irqs = r.k.ioctl_calls(VFIO_DEVICE_SET_IRQS);
  r.Wr(kMsiAddr, 4, 0xfee05000);
  r.Wr(kMsiData, 2, 0x4050);
  EXPECT_EQ(r.k.ioctl_calls(VFIO_DEVICE_SET_IRQS), set_irqs);
  EXPECT_EQ(r.kvm.Route(t->gsi(2))->u.msi.address_lo, 0xfee05000u);
  EXPECT_EQ(r.kvm.Route(t->gsi(2))->u.msi.data, 0x4052u);
}

TEST(VfioPciMsi, SixtyFourBitAddressReachesTheRoute) {
  MsiRig r;
  r.Wr(kMsiAddr, 4, 0xfee00000);
  r.Wr(kMsiAddrHi, 4, 0x12);
  r.Wr(kCapMsi + 2, 2, kMsiEnable);
  const kvm_irq_routing_entry* e = r.kvm.Route(r.dev->msi()->gsi(0));
  ASSERT_NE(e, nullptr);
  EXPECT_EQ(e->u.msi.address_hi, 0x12u);
}

TEST(VfioPciMsi, MmeAboveMmcIsClamped) {
  {
    MsiRig r(0x0080 | 1 << 1, 2);  // 2 vectors
    r.Wr(kCapMsi + 2, 2, Mme(7) | kMsiEnable);
    EXPECT_EQ(r.Rd(kCapMsi + 2, 2), 0x0080u | 1 << 1 | Mme(1) | kMsiEnable);
    EXPECT_EQ(r.dev->msi_connected_vectors(), 2u);
    EXPECT_EQ(r.MsiTriggers()[1], r.dev->msi()->eventfd(1));
  }
  {
    // The device claims 8 (MMC 3) but the kernel offers 4 MSI irqs: the guest sees MMC 2.
    MsiRig r(kMsi64Mask8, 4);
    EXPECT_EQ(r.dev->msi()->num_vectors(), 4);
    EXPECT_EQ(r.Rd(kCapMsi + 2, 2), 0x0180u | 2 << 1);
    r.Wr(kCapMsi + 2, 2, Mme(3) | kMsiEnable);
    EXPECT_EQ(r.dev->msi_connected_vectors(), 4u);
    EXPECT_EQ(r.Rd(kMsiMask, 4), 0u);
    r.Wr(kMsiMask, 4, 0xff);
    EXPECT_EQ(r.Rd(kMsiMask, 4), 0xfu);
    EXPECT_EQ(r.k.irq_type_conflicts, 0);
  }
}

TEST(VfioPciMsi, MaskedVectorShowsPendingAndIsDeliveredOnUnmask) {
  MsiRig r;
  pci::MsixTable* t = r.dev->msi();
  r.Wr(kMsiAddr, 4, 0xfee00000);
  r.Wr(kMsiData, 2, 0x60);
  r.Wr(kCapMsi + 2, 2, Mme(1) | kMsiEnable);
  r.Wr(kMsiMask, 4, 0x2);  // mask vector 1
  // The device keeps its eventfd; the irqfd is detached.
  EXPECT_EQ(r.MsiTriggers()[1], t->eventfd(1));
  EXPECT_FALSE(r.kvm.irqfds.count({t->eventfd(1), t->gsi(1)}));
  EXPECT_TRUE(r.kvm.irqfds.count({t->eventfd(0), t->gsi(0)}));
  uint64_t one = 1;
  ASSERT_EQ(::write(r.MsiTriggers()[1], &one, 8), 8);
  EXPECT_TRUE(r.kvm.Deliver().empty());
  EXPECT_EQ(r.Rd(kMsiPending, 4), 0x2u);
  EXPECT_EQ(r.Rd(kMsiPending + 0, 1), 0x2u);  // byte access too
  EXPECT_EQ(r.Rd(kMsiMask, 4), 0x2u);
  r.Wr(kMsiMask, 4, 0);
  EXPECT_EQ(r.kvm.Deliver()[t->gsi(1)], 1u);
  EXPECT_EQ(r.Rd(kMsiPending, 4), 0u);
  EXPECT_EQ(r.kvm.Route(t->gsi(1))->u.msi.data, 0x61u);
}

TEST(VfioPciMsi, DisableTearsDownAndGivesIntxBack) {
  MsiRig r;
  const auto& intx = r.k.irqs[VFIO_PCI_INTX_IRQ_INDEX];
  r.Wr(kMsiAddr, 4, 0xfee00000);
  r.Wr(kCapMsi + 2, 2, Mme(3) | kMsiEnable);
  ASSERT_TRUE(r.dev->msi_connected());
  EXPECT_EQ(intx.triggers[0], -1);
  EXPECT_EQ(intx.unmask_fd, -1);
  r.Wr(kCapMsi + 2, 2, Mme(3));
  EXPECT_FALSE(r.dev->msi_connected());
  EXPECT_THAT(r.MsiTriggers(), Each(-1));
  EXPECT_TRUE(r.kvm.irqfds.empty());
  EXPECT_EQ(intx.triggers[0], r.dev->intx_trigger_fd());
  EXPECT_EQ(intx.unmask_fd, r.dev->intx_resample_fd());
  EXPECT_EQ(r.k.irq_type_conflicts, 0);
}

TEST(VfioPciMsi, MmeChangeWhileEnabledReEnablesWithTheNewCount) {
  MsiRig r;
  r.Wr(kCapMsi + 2, 2, kMsiEnable);
  EXPECT_EQ(r.dev->msi_connected_vectors(), 1u);
  r.Wr(kCapMsi + 2, 2, Mme(3) | kMsiEnable);
  EXPECT_EQ(r.dev->msi_connected_vectors(), 8u);
  EXPECT_EQ(r.MsiTriggers()[7], r.dev->msi()->eventfd(7));
  r.Wr(kCapMsi + 2, 2, Mme(1) | kMsiEnable);
  EXPECT_EQ(r.dev->msi_connected_vectors(), 2u);
  EXPECT_EQ(r.MsiTriggers()[2], -1);
  EXPECT_EQ(r.kvm.irqfds.size(), 2u);
  EXPECT_EQ(r.k.irq_type_conflicts, 0);  // the fake refuses growing MSI without a disable
  EXPECT_EQ(r.k.irqs[VFIO_PCI_INTX_IRQ_INDEX].triggers[0], -1);
}

TEST(VfioPciMsi, MsiAndMsixAreMutuallyExclusive) {
  Rig r;  // the default device has both (MSI: one vector)
  r.Wr(kCapMsi + 2, 2, kMsiEnable);
  ASSERT_TRUE(r.dev->msi_connected());
  // MSI-X enable while MSI is on: refused, MSI untouched.
  r.ProgramVector(0, 0xfee00000, 0x41);
  r.SetMsixControl(pci::kMsixControlEnable);
  EXPECT_FALSE(r.dev->msix_connected());
  EXPECT_FALSE(r.dev->msix()->enabled());
  EXPECT_EQ(r.Rd(kCapMsix + 2, 2) & pci::kMsixControlEnable, 0u);
  EXPECT_TRUE(r.dev->msi_connected());
  EXPECT_THAT(r.MsixTriggers(), Each(-1));
  // The other way round.
  r.Wr(kCapMsi + 2, 2, 0);
  r.SetMsixControl(pci::kMsixControlEnable);
  ASSERT_TRUE(r.dev->msix_connected());
  r.Wr(kCapMsi + 2, 2, kMsiEnable);
  EXPECT_FALSE(r.dev->msi_connected());
  EXPECT_EQ(r.Rd(kCapMsi + 2, 2) & kMsiEnable, 0u);
  EXPECT_EQ(r.MsiTriggers()[0], -1);
  EXPECT_TRUE(r.dev->msix_connected());
  EXPECT_EQ(r.k.irq_type_conflicts, 0);
  // Both off: INTx is back.
  r.SetMsixControl(0);
  EXPECT_EQ(r.k.irqs[VFIO_PCI_INTX_IRQ_INDEX].triggers[0], r.dev->intx_trigger_fd());
}

TEST(VfioPciMsi, MsiOnlyDevice) {
  // A simple device with MSI and no MSI-X: MSI is what it gets (it used to fall back to INTx).
  Rig r(true, false, /*open=*/false);
  r.Cfg()[kCapMsi + 1] = kCapVendor;  // unlink MSI-X
  r.Open();
  EXPECT_EQ(r.dev->msix(), nullptr);
  ASSERT_NE(r.dev->msi(), nullptr);
  r.Wr(kMsiAddr, 4, 0xfee00000);
  r.Wr(kMsiData, 2, 0x31);
  r.Wr(kCapMsi + 2, 2, kMsiEnable);
  EXPECT_TRUE(r.dev->msi_connected());
  EXPECT_EQ(r.kvm.Route(r.dev->msi()->gsi(0))->u.msi.data, 0x31u);
}

TEST(VfioPciMsi, HiddenWithoutMsiIrqsOrRouter) {
  {
    Rig r(true, false, /*open=*/false);
    r.SetMsi(0x0080, 0);
    r.Open();
    EXPECT_EQ(r.dev->msi(), nullptr);
    EXPECT_EQ(r.Rd(kCapPm + 1, 1), kCapMsix);  // unlinked
    EXPECT_EQ(r.Rd(kCapMsi + 2, 2), 0u);
  }
  {
    Rig r(true, false, /*open=*/false);
    r.Cfg()[kCapMsi + 1] = kCapVendor;  // MSI only: no router needed, INTx stays
    r.opts.gsi_router = nullptr;
    r.Open();
    EXPECT_EQ(r.dev->msi(), nullptr);
    EXPECT_EQ(r.Rd(kCapPm + 1, 1), kCapExp);
    r.Wr(kCapMsi + 2, 2, kMsiEnable);
    EXPECT_EQ(r.k.irqs[VFIO_PCI_INTX_IRQ_INDEX].triggers[0], r.dev->intx_trigger_fd());
  }
}

TEST(VfioPciMsi, ResetDisablesAndClears) {
  MsiRig r;
  r.Wr(kMsiAddr, 4, 0xfee00000);
  r.Wr(kMsiMask, 4, 0x3);
  r.Wr(kCapMsi + 2, 2, Mme(2) | kMsiEnable);
  ASSERT_TRUE(r.dev->Reset().ok());
  EXPECT_FALSE(r.dev->msi_connected());
  EXPECT_THAT(r.MsiTriggers(), Each(-1));
  EXPECT_EQ(r.Rd(kCapMsi + 2, 2), kMsi64Mask8);
  EXPECT_EQ(r.Rd(kMsiAddr, 4), 0u);
  EXPECT_EQ(r.Rd(kMsiMask, 4), 0u);
  EXPECT_TRUE(r.kvm.irqfds.empty());
  EXPECT_EQ(r.k.irqs[VFIO_PCI_INTX_IRQ_INDEX].triggers[0], r.dev->intx_trigger_fd());
}

TEST(VfioPciMsi, HostileAccessesAreHarmless) {
  MsiRig r;
  r.Wr(kCapMsi + 3, 2, 0xffff);      // misaligned: dropped
  r.Wr(kCapMsi + 1, 4, 0xffffffff);  // misaligned: dropped
  r.Wr(kMsiAddr + 2, 4, 0xffffffff);
  EXPECT_EQ(r.Rd(kCapMsi + 2, 2), kMsi64Mask8);
  EXPECT_EQ(r.Rd(kMsiAddr, 4), 0u);
  EXPECT_FALSE(r.dev->msi_connected());
  // Random writes over the capability (and MSI-X control): never both connected, never more
  // vectors than the device has, never a conflict at the kernel.
  std::mt19937 rng(7);
  for (int i = 0; i < 2000; ++i) {
    uint32_t off = kCapMsi + rng() % 28;
    unsigned size = 1u << (rng() % 3);
    if (rng() % 8 == 0) r.SetMsixControl(static_cast<uint16_t>(rng()));
    r.Wr((off & ~(size - 1)) | (rng() % 5 == 0 ? 1 : 0), size, rng());  // some misaligned
    (void)r.Rd(off & ~(size - 1), size);
    ASSERT_FALSE(r.dev->msi_connected() && r.dev->msix_connected()) << i;
    ASSERT_LE(r.dev->msi_connected_vectors(), 8u) << i;
    ASSERT_LE(r.Rd(kCapMsi + 2, 2) & 0x70, 3u << 4) << i;  // MME <= MMC
  }
  EXPECT_EQ(r.k.irq_type_conflicts, 0);
  ASSERT_TRUE(r.dev->Detach().ok());
  EXPECT_THAT(r.MsiTriggers(), Each(-1));
  EXPECT_TRUE(r.kvm.irqfds.empty());
}

TEST(VfioPciMsi, SaveRestoreAcrossDevicesReEnablesMsi) {
  MsiRig src;
  src.Wr(kMsiAddr, 4, 0xfee03000);
  src.Wr(kMsiData, 2, 0x70);
  src.Wr(kCapMsi + 2, 2, Mme(1) | kMsiEnable);
  src.Wr(kMsiMask, 4, 0x2);
  uint64_t one = 1;
  ASSERT_EQ(::write(src.MsiTriggers()[1], &one, 8), 8);  // fires while masked: pending
  ASSERT_EQ(src.Rd(kMsiPending, 4), 0x2u);
  auto mig = src.dev->migration();
  ASSERT_TRUE(mig.ok()) << mig.status();
  auto blob = (*mig)->StopAndCopy();
  ASSERT_TRUE(blob.ok()) << blob.status();
  std::string saved = src.dev->SaveState(
      std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(blob->data()), blob->size()));

  MsiRig dst;
  ASSERT_TRUE(dst.dev->RestoreState(saved).ok());
  pci::MsixTable* t = dst.dev->msi();
  EXPECT_TRUE(dst.dev->msi_connected());
  EXPECT_EQ(dst.dev->msi_connected_vectors(), 2u);
  EXPECT_EQ(dst.MsiTriggers()[0], t->eventfd(0));
  EXPECT_EQ(dst.MsiTriggers()[1], t->eventfd(1));
  EXPECT_EQ(dst.k.irqs[VFIO_PCI_INTX_IRQ_INDEX].triggers[0], -1);
  EXPECT_EQ(dst.k.irq_type_conflicts, 0);
  EXPECT_EQ(dst.Rd(kCapMsi + 2, 2), kMsi64Mask8 | Mme(1) | kMsiEnable);
  ASSERT_NE(dst.kvm.Route(t->gsi(0)), nullptr);
  EXPECT_EQ(dst.kvm.Route(t->gsi(0))->u.msi.address_lo, 0xfee03000u);
  EXPECT_EQ(dst.kvm.Route(t->gsi(0))->u.msi.data, 0x70u);
  EXPECT_EQ(dst.Rd(kMsiPending, 4), 0x2u);  // the pending vector came along
  EXPECT_TRUE(dst.kvm.Deliver().empty());
  dst.Wr(kMsiMask, 4, 0);
  EXPECT_EQ(dst.kvm.Deliver()[t->gsi(1)], 1u);
  EXPECT_EQ(dst.kvm.Route(t->gsi(1))->u.msi.data, 0x71u);
}

TEST(VfioPciMsi, SavedStateWithBothEnablesKeepsOne) {
  Rig src;
  src.Wr(kCapMsi + 2, 2, kMsiEnable);
  auto mig = src.dev->migration();
  ASSERT_TRUE(mig.ok()) << mig.status();
  auto blob = (*mig)->StopAndCopy();
  ASSERT_TRUE(blob.ok()) << blob.status();
  std::string good = src.dev->SaveState(
      std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(blob->data()), blob->size()));
  VfioPciState st;
  ASSERT_TRUE(st.ParseFromString(good));
  (*st.mutable_config()->mutable_regs())[kCapMsix + 3] = static_cast<char>(0x80);  // MSI-X on
  st.set_msi_pending(0xffffffff);  // absent vectors: ignored
  Rig dst;
  ASSERT_TRUE(dst.dev->RestoreState(st.SerializeAsString()).ok());
  EXPECT_FALSE(dst.dev->msi_connected() && dst.dev->msix_connected());
  EXPECT_TRUE(dst.dev->msi_connected() || dst.dev->msix_connected());
  EXPECT_NE(dst.Rd(kCapMsi + 2, 2) & kMsiEnable, 0u);
  EXPECT_EQ(dst.Rd(kCapMsix + 2, 2) & pci::kMsixControlEnable, 0u);
  EXPECT_EQ(dst.k.irq_type_conflicts, 0);
}

// ---- INTx ----

TEST(VfioPciIntx, TriggerAndResampleWired) {
  Rig r;
  const auto& q = r.k.irqs[VFIO_PCI_INTX_IRQ_INDEX];
  ASSERT_GE(r.dev->intx_trigger_fd(), 0);
  ASSERT_GE(r.dev->intx_resample_fd(), 0);
  EXPECT_EQ(q.triggers[0], r.dev->intx_trigger_fd());
  EXPECT_EQ(q.unmask_fd, r.dev->intx_resample_fd());
  EXPECT_EQ(r.intx_router.trigger, r.dev->intx_trigger_fd());
  EXPECT_EQ(r.intx_router.resample, r.dev->intx_resample_fd());
  EXPECT_EQ(r.intx_router.gsi, kIntxGsi);
  // INTx disable is the device's business (vfio-pci masks INTx with it).
  r.Wr(0x04, 2, pci::kCommandIntxDisable);
  EXPECT_TRUE(Get(r.Cfg(), 0x04, 2) & pci::kCommandIntxDisable);
  ASSERT_TRUE(r.dev->Detach().ok());
  EXPECT_EQ(q.triggers[0], -1);
  EXPECT_EQ(q.unmask_fd, -1);
  EXPECT_EQ(r.intx_router.trigger, -1);
}

TEST(VfioPciIntx, MsixEnableTakesOverFromIntxAndGivesItBack) {
  Rig r;
  const auto& q = r.k.irqs[VFIO_PCI_INTX_IRQ_INDEX];
  r.ProgramVector(0, 0xfee00000, 0x41);
  r.SetMsixControl(pci::kMsixControlEnable);
  EXPECT_TRUE(r.dev->msix_connected());
  EXPECT_EQ(r.k.irq_type_conflicts, 0);
  EXPECT_EQ(q.triggers[0], -1);
  EXPECT_EQ(q.unmask_fd, -1);
  r.SetMsixControl(0);
  EXPECT_EQ(r.k.irq_type_conflicts, 0);
  EXPECT_EQ(q.triggers[0], r.dev->intx_trigger_fd());
  EXPECT_EQ(q.unmask_fd, r.dev->intx_resample_fd());
  EXPECT_EQ(r.intx_router.trigger, r.dev->intx_trigger_fd());  // the KVM side stays assigned
}

TEST(VfioPciIntx, NotOfferedWithoutRouter) {
  Rig r(/*intx=*/false);
  EXPECT_EQ(r.Rd(0x3d, 1), 0u);
  EXPECT_EQ(r.dev->intx_trigger_fd(), -1);
  EXPECT_EQ(r.k.irqs[VFIO_PCI_INTX_IRQ_INDEX].triggers[0], -1);
}

// ---- Reset ----

TEST(VfioPciReset, ResetsDeviceAndModel) {
  Rig r;
  r.Wr(0x04, 2, pci::kCommandMemory | pci::kCommandBusMaster);
  r.ProgramVector(1, 0xfee00000, 0x51);
  r.SetMsixControl(pci::kMsixControlEnable);
  ASSERT_TRUE(r.dev->msix_connected());
  ASSERT_TRUE(r.dev->Reset().ok());
  EXPECT_EQ(r.k.reset_count, 1);
  EXPECT_THAT(r.MsixTriggers(), Each(-1));
  EXPECT_FALSE(r.dev->msix_connected());
  EXPECT_FALSE(r.dev->msix()->enabled());
  EXPECT_EQ(r.dev->msix()->entry(1).address(), 0u);
  EXPECT_EQ(r.Rd(kCapMsix + 2, 2), kMsixVectors - 1u);
  EXPECT_EQ(r.Rd(0x04, 2), 0u);
  EXPECT_EQ(Get(r.Cfg(), 0x04, 2), 0x0040u);
  EXPECT_TRUE(r.kvm.irqfds.empty());
}

TEST(VfioPciReset, DeviceWithoutResetReportsButResetsModel) {
  Rig r(true, false, /*open=*/false);
  r.k.device_flags &= ~VFIO_DEVICE_FLAGS_RESET;
  r.Open();
  r.Wr(0x04, 2, pci::kCommandMemory);
  EXPECT_FALSE(r.dev->Reset().ok());
  EXPECT_EQ(r.Rd(0x04, 2), 0u);
}

// ---- DMA ----

TEST(VfioPciDma, MapsEveryRamRegion) {
  Rig r;
  auto mem = GuestMemory::Create(4 << 20);
  ASSERT_TRUE(mem.ok());
  ASSERT_TRUE(r.dev->AttachDma(**mem).ok());
  ASSERT_EQ(r.k.dma.size(), (*mem)->regions().size());
  const GuestMemory::Region& reg = (*mem)->regions()[0];
  ASSERT_TRUE(r.k.dma.count(reg.gpa));
  EXPECT_EQ(r.k.dma[reg.gpa].size, reg.size);
  EXPECT_EQ(r.k.dma[reg.gpa].vaddr, reinterpret_cast<uint64_t>(reg.host));
  EXPECT_TRUE(r.k.dma[reg.gpa].writable);
  EXPECT_EQ(r.dev->dma_ranges().size(), 1u);
  EXPECT_FALSE(r.dev->AttachDma(**mem).ok());  // twice
  ASSERT_TRUE(r.dev->Detach().ok());
  EXPECT_TRUE(r.k.dma.empty());
}

TEST(VfioPciDma, FailedMapLeavesNothingMapped) {
  Rig r;
  auto mem = GuestMemory::Create(2 << 20);
  ASSERT_TRUE(mem.ok());
  r.k.FailIoctl(uapi::kIommuIoasMap, ENOMEM);
  EXPECT_FALSE(r.dev->AttachDma(**mem).ok());
  EXPECT_TRUE(r.k.dma.empty());
  EXPECT_TRUE(r.dev->dma_ranges().empty());
  EXPECT_TRUE(r.dev->AttachDma(**mem).ok());  // and a retry works
}

// ---- Direct BAR mapping ----

TEST(VfioPciDirectMap, MappableAreasMinusMsixPagesFollowTheBar) {
  Rig r(true, /*mapper=*/true);
  const auto& dm = r.dev->direct_maps();
  ASSERT_EQ(dm.size(), 3u);
  EXPECT_EQ(dm[0].bar, 0);
  EXPECT_EQ(dm[0].offset, 0u);
  EXPECT_EQ(dm[0].size, 0x1000u);
  EXPECT_EQ(dm[1].offset, 0x2000u);  // the MSI-X page 0x1000 stays trapped
  EXPECT_EQ(dm[1].size, 0x2000u);
  EXPECT_EQ(dm[2].bar, 2);
  EXPECT_EQ(dm[2].size, 0x1000u);
  ASSERT_TRUE(r.dev->config().SetBarAddress(0, 0xe0000000).ok());
  ASSERT_TRUE(r.dev->config().SetBarAddress(2, 0x100000000).ok());
  EXPECT_TRUE(r.bar_mapper.maps.empty());  // memory decode still off
  r.Wr(0x04, 2, pci::kCommandMemory);
  ASSERT_EQ(r.bar_mapper.maps.size(), 3u);
  EXPECT_EQ(r.bar_mapper.maps[0xe0000000].second, 0x1000u);
  EXPECT_EQ(r.bar_mapper.maps[0xe0002000].second, 0x2000u);
  EXPECT_EQ(r.bar_mapper.maps[0x100000000].first, dm[2].mapping.get());
  // The guest moves BAR0 (PciRootBus would call BarMoved after remapping its window).
  r.Wr(0x10, 4, 0xe0100000);
  r.dev->BarMoved({0, pci::BarType::kMem32, 0x4000, 0xe0000000, 0xe0100000});
  EXPECT_FALSE(r.bar_mapper.maps.count(0xe0000000));
  EXPECT_TRUE(r.bar_mapper.maps.count(0xe0100000));
  EXPECT_TRUE(r.bar_mapper.maps.count(0xe0102000));
  r.Wr(0x04, 2, 0);
  EXPECT_TRUE(r.bar_mapper.maps.empty());
  r.Wr(0x04, 2, pci::kCommandMemory);
  EXPECT_EQ(r.bar_mapper.maps.size(), 3u);
  ASSERT_TRUE(r.dev->Detach().ok());
  EXPECT_TRUE(r.bar_mapper.maps.empty());
  EXPECT_TRUE(r.dev->direct_maps().empty());
}

// ---- Save / restore ----

TEST(VfioPciState, SaveRestoreAcrossDevices) {
  Rig src;
  src.Wr(0x04, 2, pci::kCommandMemory | pci::kCommandBusMaster);
  ASSERT_TRUE(src.dev->config().SetBarAddress(0, 0xe0000000).ok());
  src.ProgramVector(4, 0xfee03000, 0x64);
  src.SetMsixControl(pci::kMsixControlEnable);
  src.Wr(0x3c, 1, 11);
  auto mig = src.dev->migration();
  ASSERT_TRUE(mig.ok()) << mig.status();
  auto blob = (*mig)->StopAndCopy();
  ASSERT_TRUE(blob.ok()) << blob.status();
  std::string saved = src.dev->SaveState(
      std::span<const uint8_t>(reinterpret_cast<const uint8_t*>(blob->data()), blob->size()));

  Rig dst;
  ASSERT_TRUE(dst.dev->RestoreState(saved).ok());
  EXPECT_EQ(std::string(dst.k.resumed_blob.begin(), dst.k.resumed_blob.end()), *blob);
  EXPECT_EQ(dst.k.mig_state, VFIO_DEVICE_STATE_RUNNING);
  EXPECT_EQ(dst.Rd(0x04, 2), pci::kCommandMemory | pci::kCommandBusMaster);
  EXPECT_EQ(Get(dst.Cfg(), 0x04, 2) & 0x6u, 0x6u);  // the device decodes and masters again
  EXPECT_EQ(dst.dev->config().bar_mapped_address(0), 0xe0000000u);
  EXPECT_EQ(dst.Rd(0x3c, 1), 11u);
  EXPECT_TRUE(dst.dev->msix()->enabled());
  EXPECT_EQ(dst.dev->msix()->entry(4).address(), 0xfee03000u);
  EXPECT_TRUE(dst.dev->msix_connected());
  pci::MsixTable* t = dst.dev->msix();
  EXPECT_EQ(dst.MsixTriggers()[4], t->eventfd(4));
  const kvm_irq_routing_entry* e = dst.kvm.Route(t->gsi(4));
  ASSERT_NE(e, nullptr);
  EXPECT_EQ(e->u.msi.data, 0x64u);
}

TEST(VfioPciState, MalformedStateIsRefusedWithoutSideEffects) {
  Rig src;
  std::string good = src.dev->SaveState({});
  Rig dst;
  auto expect_refused = [&](const std::string& data, const char* what) {
    absl::Status s = dst.dev->RestoreState(data);
    EXPECT_FALSE(s.ok()) << what;
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << what << ": " << s;
    EXPECT_EQ(dst.k.mig_state, VFIO_DEVICE_STATE_RUNNING) << what;
    EXPECT_TRUE(dst.k.resumed_blob.empty()) << what;
    EXPECT_EQ(dst.Rd(0x00, 2), testing::kVendor) << what;
  };
  expect_refused("\xff\xff\xff garbage", "garbage");
  VfioPciState st;
  ASSERT_TRUE(st.ParseFromString(good));
  {
    VfioPciState b = st;
    b.mutable_config()->mutable_regs()->resize(100);
    expect_refused(b.SerializeAsString(), "short config");
  }
  {
    VfioPciState b = st;
    (*b.mutable_config()->mutable_regs())[0] = 0x11;  // another vendor
    expect_refused(b.SerializeAsString(), "vendor");
  }
  {
    VfioPciState b = st;
    (*b.mutable_config()->mutable_regs())[0x10] = 0x01;  // BAR0 turned into an I/O BAR
    expect_refused(b.SerializeAsString(), "bar type");
  }
  {
    VfioPciState b = st;
    (*b.mutable_config()->mutable_regs())[kCapMsix + 2] = 0x03;  // 4-vector table
    expect_refused(b.SerializeAsString(), "msix size in config");
  }
  {
    VfioPciState b = st;
    (*b.mutable_config()->mutable_regs())[kCapMsi + 2] = 0x82;  // MSI with 2 vectors
    expect_refused(b.SerializeAsString(), "msi vector count");
  }
  {
    VfioPciState b = st;
    b.mutable_msix()->mutable_vectors()->RemoveLast();
    expect_refused(b.SerializeAsString(), "msix vectors");
  }
  {
    VfioPciState b = st;
    b.clear_msix();
    expect_refused(b.SerializeAsString(), "msix missing");
  }
  {
    VfioPciState b = st;
    b.mutable_config()->set_bar_mapped(0, 0xe0000100);  // misaligned for a 16 KiB BAR
    expect_refused(b.SerializeAsString(), "bar address");
  }
}

TEST(VfioPciState, DeviceWithoutMigrationCannotRestore) {
  Rig src;
  std::string saved = src.dev->SaveState({});
  Rig dst(true, false, /*open=*/false);
  dst.k.mig_supported = false;
  dst.Open();
  absl::Status s = dst.dev->RestoreState(saved);
  ASSERT_FALSE(s.ok());
  EXPECT_THAT(std::string(s.message()), HasSubstr(testing::kBdf));
  auto m = dst.dev->migration();
  EXPECT_FALSE(m.ok());
}

}  // namespace
}  // namespace microvmm::vfio
