// GsiRouter and MsixTable against a recording fake of the KVM routing ioctls (the only fake: the
// eventfds are real). Covers the default IOAPIC/PIC routes, GSI allocation, table and PBA
// accesses, capability/message control, per-vector and function masking, pending bits.
#include "vmm/pci/msix.h"

#include <unistd.h>

#include <map>
#include <set>
#include <utility>
#include <vector>

#include "gtest/gtest.h"
#include "vmm/pci/gsi_router.h"
#include "vmm/pci/pci_config.h"

namespace microvmm::pci {
namespace {

// Records what KVM would be told. Attached irqfds are consumed by Deliver() like KVM's irqfd
// wakeup would.
class FakeBackend : public IrqRoutingBackend {
 public:
  absl::Status SetGsiRouting(const std::vector<kvm_irq_routing_entry>& entries) override {
    if (fail_routing) return absl::InvalidArgumentError("fake KVM_SET_GSI_ROUTING failure");
    table = entries;
    ++pushes;
    return absl::OkStatus();
  }
  absl::Status AssignIrqfd(int fd, uint32_t gsi) override {
    if (!irqfds.insert({fd, gsi}).second) return absl::FailedPreconditionError("EBUSY");
    return absl::OkStatus();
  }
  absl::Status DeassignIrqfd(int fd, uint32_t gsi) override {
    if (!irqfds.erase({fd, gsi})) return absl::InvalidArgumentError("not assigned");
    return absl::OkStatus();
  }
  // Drains every attached eventfd; returns gsi -> number of interrupts KVM would inject.
  std::map<uint32_t, uint64_t> Deliver() {
    std::map<uint32_t, uint64_t> out;
    for (auto [fd, gsi] : irqfds) {
      uint64_t v = 0;
      if (::read(fd, &v, sizeof(v)) == sizeof(v) && v > 0) out[gsi] += 1;
    }
    return out;
  }
  const kvm_irq_routing_entry* Route(uint32_t gsi) const {
    for (const auto& e : table)
      if (e.gsi == gsi && e.type == KVM_IRQ_ROUTING_MSI) return &e;
    return nullptr;
  }
  bool Attached(int fd, uint32_t gsi) const { return irqfds.count({fd, gsi}) > 0; }

  std::vector<kvm_irq_routing_entry> table;
  std::set<std::pair<int, uint32_t>> irqfds;
  int pushes = 0;
  bool fail_routing = false;
};

TEST(GsiRouterTest, DefaultRoutesMatchKvm) {
  std::vector<kvm_irq_routing_entry> t = DefaultIrqchipRoutes();
  ASSERT_EQ(t.size(), 16u * 2 + 8);
  std::map<uint32_t, std::vector<std::pair<uint32_t, uint32_t>>> by_gsi;
  for (const auto& e : t) {
    EXPECT_EQ(e.type, static_cast<uint32_t>(KVM_IRQ_ROUTING_IRQCHIP));
    by_gsi[e.gsi].push_back({e.u.irqchip.irqchip, e.u.irqchip.pin});
  }
  for (uint32_t gsi = 0; gsi < 24; ++gsi) {
    std::vector<std::pair<uint32_t, uint32_t>> want = {{KVM_IRQCHIP_IOAPIC, gsi}};
    if (gsi < 8) want.push_back({KVM_IRQCHIP_PIC_MASTER, gsi});
    else if (gsi < 16) want.push_back({KVM_IRQCHIP_PIC_SLAVE, gsi - 8});
    EXPECT_EQ(by_gsi[gsi], want) << "gsi " << gsi;
  }
}

TEST(GsiRouterTest, AllocatesAboveIoapicAndPushesWholeTable) {
  FakeBackend kvm;
  GsiRouter r(kvm, 28);
  ASSERT_TRUE(r.Init().ok());
  EXPECT_EQ(kvm.pushes, 1);
  EXPECT_EQ(kvm.table.size(), 40u);
  std::vector<uint32_t> gsis;
  for (int i = 0; i < 4; ++i) {
    auto g = r.AllocateGsi();
    ASSERT_TRUE(g.ok());
    gsis.push_back(*g);
  }
  EXPECT_EQ(gsis, (std::vector<uint32_t>{24, 25, 26, 27}));
  EXPECT_EQ(r.AllocateGsi().status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(kvm.pushes, 1);  // allocation alone pushes nothing

  ASSERT_TRUE(r.SetMsiRoute(25, 0xfee01000, 0x4041).ok());
  EXPECT_EQ(kvm.pushes, 2);
  ASSERT_EQ(kvm.table.size(), 41u);
  const kvm_irq_routing_entry* e = kvm.Route(25);
  ASSERT_NE(e, nullptr);
  EXPECT_EQ(e->u.msi.address_lo, 0xfee01000u);
  EXPECT_EQ(e->u.msi.address_hi, 0u);
  EXPECT_EQ(e->u.msi.data, 0x4041u);
  // The defaults are still there after the push.
  EXPECT_EQ(kvm.table.front().gsi, 0u);
  // Same route again: no push. Batch of two changes: one push.
  ASSERT_TRUE(r.SetMsiRoute(25, 0xfee01000, 0x4041).ok());
  EXPECT_EQ(kvm.pushes, 2);
  ASSERT_TRUE(r.SetMsiRoutes({{24, 0xfee00000, 0x30}, {26, 0x1fee00000ULL, 0x31}}).ok());
  EXPECT_EQ(kvm.pushes, 3);
  EXPECT_EQ(kvm.Route(26)->u.msi.address_hi, 1u);
  // Unallocated GSI.
  EXPECT_FALSE(r.SetMsiRoute(100, 0xfee00000, 0x30).ok());
  EXPECT_FALSE(r.SetMsiRoute(5, 0xfee00000, 0x30).ok());

  // A failing push keeps the previous routes.
  kvm.fail_routing = true;
  EXPECT_FALSE(r.SetMsiRoute(25, 0xfee00000, 0x99).ok());
  kvm.fail_routing = false;
  bool found = false;
  for (const auto& x : r.Table())
    if (x.gsi == 25) {
      found = true;
      EXPECT_EQ(x.u.msi.data, 0x4041u);
    }
  EXPECT_TRUE(found);

  // Freeing drops the route and makes the GSI allocatable again.
  ASSERT_TRUE(r.FreeGsi(25).ok());
  EXPECT_EQ(kvm.Route(25), nullptr);
  EXPECT_FALSE(r.FreeGsi(25).ok());
  auto g = r.AllocateGsi();
  ASSERT_TRUE(g.ok());
  EXPECT_EQ(*g, 25u);
}

// A function with BAR 0 (16 KiB, 64-bit) holding the table at 0 and the PBA at 0x2000.
class MsixTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(router_.Init().ok());
    PciHeader h;
    h.vendor_id = 0x1af4;
    h.device_id = 0x1041;
    cfg_ = std::make_unique<PciConfigSpace>(h);
    ASSERT_TRUE(cfg_->AddBar(0, BarType::kMem64, 0x4000).ok());
    auto t = MsixTable::Create(router_, kVectors);
    ASSERT_TRUE(t.ok()) << t.status();
    msix_ = std::move(*t);
    auto cap = msix_->AddCapability(*cfg_, 0, 0, 0, 0x2000);
    ASSERT_TRUE(cap.ok()) << cap.status();
    cap_ = *cap;
  }

  void WriteEntry(uint16_t v, uint64_t addr, uint32_t data, bool masked) {
    uint8_t b[16];
    for (int i = 0; i < 8; ++i) b[i] = static_cast<uint8_t>(addr >> (8 * i));
    for (int i = 0; i < 4; ++i) b[8 + i] = static_cast<uint8_t>(data >> (8 * i));
    uint32_t ctl = masked ? 1 : 0;
    for (int i = 0; i < 4; ++i) b[12 + i] = static_cast<uint8_t>(ctl >> (8 * i));
    // Address as one qword, data and control as dwords (what Linux does: dword writes).
    msix_->WriteBar(0, v * 16, std::span<const uint8_t>(b, 8));
    msix_->WriteBar(0, v * 16 + 8, std::span<const uint8_t>(b + 8, 4));
    msix_->WriteBar(0, v * 16 + 12, std::span<const uint8_t>(b + 12, 4));
  }
  void SetVectorMask(uint16_t v, bool masked) {
    uint8_t b[4] = {static_cast<uint8_t>(masked ? 1 : 0), 0, 0, 0};
    msix_->WriteBar(0, v * 16 + 12, b);
  }
  uint32_t Read32(uint64_t off) {
    uint8_t b[4];
    EXPECT_TRUE(msix_->ReadBar(0, off, b));
    return b[0] | b[1] << 8 | b[2] << 16 | uint32_t{b[3]} << 24;
  }
  uint64_t Pba() {
    uint8_t b[8];
    EXPECT_TRUE(msix_->ReadBar(0, 0x2000, b));
    uint64_t v = 0;
    for (int i = 0; i < 8; ++i) v |= uint64_t{b[i]} << (8 * i);
    return v;
  }
  void SetControl(uint16_t bits) { cfg_->Write(cap_ + 2, 2, bits); }

  static constexpr uint16_t kVectors = 4;
  FakeBackend kvm_;
  GsiRouter router_{kvm_, 1024};
  std::unique_ptr<PciConfigSpace> cfg_;
  std::unique_ptr<MsixTable> msix_;
  uint32_t cap_ = 0;
};

TEST_F(MsixTest, Capability) {
  EXPECT_EQ(cfg_->FindCapability(kCapIdMsix), std::optional<uint32_t>(cap_));
  EXPECT_EQ(cfg_->Read(cap_, 1), kCapIdMsix);
  EXPECT_EQ(cfg_->Read(cap_ + 2, 2), kVectors - 1u);  // table size N-1, disabled, unmasked
  EXPECT_EQ(cfg_->Read(cap_ + 4, 4), 0x0u);           // table at BAR 0 offset 0
  EXPECT_EQ(cfg_->Read(cap_ + 8, 4), 0x2000u);        // PBA at BAR 0 offset 0x2000
  // Table size, table and PBA locations are read-only.
  cfg_->Write(cap_ + 2, 2, 0x07ff);
  cfg_->Write(cap_ + 4, 4, 0xffffffff);
  EXPECT_EQ(cfg_->Read(cap_ + 2, 2), kVectors - 1u);
  EXPECT_EQ(cfg_->Read(cap_ + 4, 4), 0x0u);
  // Enable and function mask reach the table through the config write.
  SetControl(kMsixControlEnable | kMsixControlFunctionMask);
  EXPECT_EQ(cfg_->Read(cap_ + 2, 2), 0xc000u | (kVectors - 1));
  EXPECT_TRUE(msix_->enabled());
  EXPECT_TRUE(msix_->function_masked());
  cfg_->Write(cap_, 4, 0x80000000u | cfg_->Read(cap_, 2));  // dword write with the header
  EXPECT_TRUE(msix_->enabled());
  EXPECT_FALSE(msix_->function_masked());
  EXPECT_EQ(msix_->message_control(), 0x8000u | (kVectors - 1));
}

TEST_F(MsixTest, CapabilityValidation) {
  PciHeader h;
  PciConfigSpace c(h);
  ASSERT_TRUE(c.AddBar(0, BarType::kMem32, 0x1000).ok());
  ASSERT_TRUE(c.AddBar(1, BarType::kIo, 0x10).ok());
  EXPECT_FALSE(msix_->AddCapability(c, 1, 0, 0, 0x800).ok());      // I/O BAR
  EXPECT_FALSE(msix_->AddCapability(c, 2, 0, 0, 0x800).ok());      // no BAR 2
  EXPECT_FALSE(msix_->AddCapability(c, 0, 4, 0, 0x800).ok());      // misaligned
  EXPECT_FALSE(msix_->AddCapability(c, 0, 0xff8, 0, 0x800).ok());  // past the BAR
  EXPECT_FALSE(msix_->AddCapability(c, 0, 0, 0, 0x20).ok());       // PBA inside the table
}

TEST_F(MsixTest, TableReadsAndWrites) {
  EXPECT_EQ(msix_->table_bytes(), 64u);
  EXPECT_EQ(msix_->pba_bytes(), 8u);
  // Reset state: zero message, masked.
  for (uint16_t v = 0; v < kVectors; ++v) {
    EXPECT_EQ(Read32(v * 16), 0u);
    EXPECT_EQ(Read32(v * 16 + 12), 1u);
  }
  WriteEntry(2, 0x00000001fee0200fULL, 0x4031, true);
  EXPECT_EQ(Read32(2 * 16), 0xfee0200cu);  // address bits 1:0 are read-only 0
  EXPECT_EQ(Read32(2 * 16 + 4), 0x1u);
  EXPECT_EQ(Read32(2 * 16 + 8), 0x4031u);
  EXPECT_EQ(Read32(2 * 16 + 12), 1u);
  // Vector control: only the mask bit is writable.
  uint8_t ff[4] = {0xfe, 0xff, 0xff, 0xff};
  msix_->WriteBar(0, 2 * 16 + 12, ff);
  EXPECT_EQ(Read32(2 * 16 + 12), 0u);
  // Qword read of address, byte read of data.
  uint8_t q[8];
  ASSERT_TRUE(msix_->ReadBar(0, 2 * 16, q));
  EXPECT_EQ(q[0], 0x0c);
  EXPECT_EQ(q[4], 0x01);
  uint8_t b;
  ASSERT_TRUE(msix_->ReadBar(0, 2 * 16 + 9, std::span<uint8_t>(&b, 1)));
  EXPECT_EQ(b, 0x40);
  EXPECT_EQ(msix_->entry(2).address(), 0x1fee0200cULL);
  // Outside the table and PBA the BAR belongs to the device.
  EXPECT_FALSE(msix_->ReadBar(0, 0x1000, q));
  EXPECT_FALSE(msix_->ReadBar(1, 0, q));
  EXPECT_FALSE(msix_->WriteBar(0, 0x3000, q));
  // PBA writes are ignored (but claimed).
  EXPECT_TRUE(msix_->WriteBar(0, 0x2000, q));
  EXPECT_EQ(Pba(), 0u);
}

TEST_F(MsixTest, DeliveryMaskingAndPending) {
  SetControl(kMsixControlEnable);
  WriteEntry(0, 0xfee00000, 0x41, /*masked=*/false);
  WriteEntry(1, 0xfee00000, 0x42, /*masked=*/true);
  // Vector 0 is deliverable: routed and attached.
  uint32_t g0 = msix_->gsi(0), g1 = msix_->gsi(1);
  EXPECT_GE(g0, kFirstMsiGsi);
  ASSERT_NE(kvm_.Route(g0), nullptr);
  EXPECT_EQ(kvm_.Route(g0)->u.msi.data, 0x41u);
  EXPECT_EQ(kvm_.Route(g1), nullptr);  // masked vectors get no route yet
  EXPECT_TRUE(kvm_.Attached(msix_->eventfd(0), g0));
  EXPECT_FALSE(kvm_.Attached(msix_->eventfd(1), g1));
  EXPECT_FALSE(msix_->masked(0));
  EXPECT_TRUE(msix_->masked(1));

  msix_->Trigger(0);
  msix_->Trigger(1);
  EXPECT_FALSE(msix_->pending(0));
  EXPECT_TRUE(msix_->pending(1));
  EXPECT_EQ(Pba(), 0x2u);
  auto d = kvm_.Deliver();
  EXPECT_EQ(d[g0], 1u);
  EXPECT_EQ(d.count(g1), 0u);

  // Unmasking vector 1 routes it, attaches it and delivers the pending event.
  SetVectorMask(1, false);
  ASSERT_NE(kvm_.Route(g1), nullptr);
  EXPECT_EQ(kvm_.Route(g1)->u.msi.data, 0x42u);
  EXPECT_TRUE(kvm_.Attached(msix_->eventfd(1), g1));
  EXPECT_EQ(Pba(), 0u);
  d = kvm_.Deliver();
  EXPECT_EQ(d[g1], 1u);
  EXPECT_EQ(kvm_.Deliver().count(g1), 0u);  // exactly once

  // Masking detaches: nothing delivered, pending set; several triggers are one pending bit.
  SetVectorMask(0, true);
  EXPECT_FALSE(kvm_.Attached(msix_->eventfd(0), g0));
  msix_->Trigger(0);
  msix_->Trigger(0);
  EXPECT_EQ(kvm_.Deliver().count(g0), 0u);
  EXPECT_EQ(Pba(), 0x1u);
  SetVectorMask(0, false);
  EXPECT_EQ(Pba(), 0u);
  EXPECT_EQ(kvm_.Deliver()[g0], 1u);

  // Out-of-range vector: ignored.
  msix_->Trigger(kVectors);
}

TEST_F(MsixTest, FunctionMaskAndEnable) {
  WriteEntry(0, 0xfee00000, 0x41, false);
  WriteEntry(3, 0xfee00000, 0x44, false);
  // Not enabled yet: vectors are unmasked in the table but nothing is attached.
  EXPECT_TRUE(msix_->masked(0));
  EXPECT_TRUE(kvm_.irqfds.empty());
  msix_->Trigger(3);
  EXPECT_EQ(Pba(), 0x8u);
  // Linux enables with the function masked first.
  int pushes = kvm_.pushes;
  SetControl(kMsixControlEnable | kMsixControlFunctionMask);
  EXPECT_TRUE(kvm_.irqfds.empty());
  EXPECT_EQ(kvm_.pushes, pushes);
  SetControl(kMsixControlEnable);
  EXPECT_EQ(kvm_.pushes, pushes + 1);  // both vectors' routes in one push
  EXPECT_EQ(kvm_.irqfds.size(), 2u);
  EXPECT_EQ(Pba(), 0u);
  EXPECT_EQ(kvm_.Deliver()[msix_->gsi(3)], 1u);
  // Function mask: everything detaches, per-vector masks unchanged.
  SetControl(kMsixControlEnable | kMsixControlFunctionMask);
  EXPECT_TRUE(kvm_.irqfds.empty());
  EXPECT_EQ(Read32(12), 0u);
  msix_->Trigger(0);
  EXPECT_EQ(Pba(), 0x1u);
  SetControl(kMsixControlEnable);
  EXPECT_EQ(kvm_.Deliver()[msix_->gsi(0)], 1u);
  // Disable.
  SetControl(0);
  EXPECT_TRUE(kvm_.irqfds.empty());
}

TEST_F(MsixTest, MessageChangesReprogramRoutes) {
  SetControl(kMsixControlEnable);
  WriteEntry(0, 0xfee00000, 0x41, false);
  uint32_t g = msix_->gsi(0);
  int pushes = kvm_.pushes;
  // Changing data while deliverable re-pushes at once.
  uint8_t data[4] = {0x51, 0, 0, 0};
  msix_->WriteBar(0, 8, data);
  EXPECT_EQ(kvm_.pushes, pushes + 1);
  EXPECT_EQ(kvm_.Route(g)->u.msi.data, 0x51u);
  // While masked (the spec's way) nothing is pushed until the unmask.
  SetVectorMask(0, true);
  uint8_t addr[4] = {0x00, 0x10, 0xe0, 0xfe};
  msix_->WriteBar(0, 0, addr);
  data[0] = 0x61;
  msix_->WriteBar(0, 8, data);
  EXPECT_EQ(kvm_.pushes, pushes + 1);
  SetVectorMask(0, false);
  EXPECT_EQ(kvm_.pushes, pushes + 2);
  EXPECT_EQ(kvm_.Route(g)->u.msi.address_lo, 0xfee01000u);
  EXPECT_EQ(kvm_.Route(g)->u.msi.data, 0x61u);
  // Mask/unmask without a message change: no push.
  SetVectorMask(0, true);
  SetVectorMask(0, false);
  EXPECT_EQ(kvm_.pushes, pushes + 2);
}

TEST_F(MsixTest, RoutingFailureIsReported) {
  SetControl(kMsixControlEnable);
  kvm_.fail_routing = true;
  WriteEntry(0, 0xfee00000, 0x41, false);
  EXPECT_FALSE(msix_->status().ok());
  EXPECT_FALSE(kvm_.Attached(msix_->eventfd(0), msix_->gsi(0)));  // no irqfd on a stale route
  kvm_.fail_routing = false;
  SetVectorMask(0, true);
  SetVectorMask(0, false);
  EXPECT_TRUE(kvm_.Attached(msix_->eventfd(0), msix_->gsi(0)));
}

TEST_F(MsixTest, ResetSaveRestore) {
  SetControl(kMsixControlEnable);
  WriteEntry(0, 0xfee00000, 0x41, false);
  WriteEntry(1, 0xfee01000, 0x42, true);
  msix_->Trigger(1);
  MsixState st = msix_->SaveState();
  EXPECT_EQ(st.vectors_size(), kVectors);
  EXPECT_TRUE(st.vectors(1).pending());
  EXPECT_FALSE(st.vectors(0).pending());
  EXPECT_EQ(st.message_control(), kMsixControlEnable);

  msix_->Reset();
  EXPECT_FALSE(msix_->enabled());
  EXPECT_TRUE(kvm_.irqfds.empty());
  EXPECT_EQ(Pba(), 0u);
  EXPECT_EQ(Read32(0), 0u);
  EXPECT_EQ(Read32(12), 1u);

  ASSERT_TRUE(msix_->RestoreState(st).ok());
  EXPECT_TRUE(msix_->enabled());
  EXPECT_EQ(Read32(16), 0xfee01000u);
  EXPECT_TRUE(kvm_.Attached(msix_->eventfd(0), msix_->gsi(0)));
  EXPECT_EQ(Pba(), 0x2u);
  SetVectorMask(1, false);
  EXPECT_EQ(kvm_.Deliver()[msix_->gsi(1)], 1u);

  MsixState bad;
  bad.add_vectors();
  EXPECT_FALSE(msix_->RestoreState(bad).ok());
}

TEST_F(MsixTest, DestructionReleasesGsisAndIrqfds) {
  SetControl(kMsixControlEnable);
  WriteEntry(0, 0xfee00000, 0x41, false);
  uint32_t g = msix_->gsi(0);
  msix_.reset();
  EXPECT_TRUE(kvm_.irqfds.empty());
  EXPECT_EQ(kvm_.Route(g), nullptr);
  auto again = router_.AllocateGsi();
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, kFirstMsiGsi);
}

TEST(MsixCreateTest, VectorCountLimits) {
  FakeBackend kvm;
  GsiRouter r(kvm, 4096);
  EXPECT_FALSE(MsixTable::Create(r, 0).ok());
  EXPECT_FALSE(MsixTable::Create(r, 2049).ok());
  auto t = MsixTable::Create(r, 65);
  ASSERT_TRUE(t.ok());
  EXPECT_EQ((*t)->pba_bytes(), 16u);
  GsiRouter tiny(kvm, 26);
  EXPECT_EQ(MsixTable::Create(tiny, 3).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(MsixTable::Create(tiny, 2).ok());  // the failed attempt released its GSIs
}

}  // namespace
}  // namespace microvmm::pci
