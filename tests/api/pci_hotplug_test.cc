// PCI hotplug pieces without KVM: the hotplug register block / interrupt (vmm/pci/hotplug.h),
// the AML it emits (parsed back here by a small AML reader for exactly the opcodes ACPI
// hotplug uses, so a wrong PkgLength or a misplaced object fails), the DSDT carrying it, and
// the AttachDevice RPC's refusals that need no VM.
#include "vmm/pci/hotplug.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "api/server.h"
#include "gtest/gtest.h"
#include "tests/api/api_harness.h"
#include "vmm/boot/acpi.h"

namespace microvmm::testing {
namespace {

using pci::PciHotplugController;

uint32_t ReadReg(PciHotplugController& c, uint32_t reg) {
  uint8_t b[4];
  c.Read(reg, b);
  uint32_t v;
  std::memcpy(&v, b, 4);
  return v;
}

void WriteReg(PciHotplugController& c, uint32_t reg, uint32_t v) {
  uint8_t b[4];
  std::memcpy(b, &v, 4);
  c.Write(reg, b);
}

TEST(PciHotplugControllerTest, StatusBitSetOnAttachAndWriteOneToClear) {
  std::vector<bool> irq;
  PciHotplugController c([&](bool level) { irq.push_back(level); });
  EXPECT_EQ(ReadReg(c, pci::kPciHotplugRegUp), 0u);
  EXPECT_FALSE(c.irq_level());

  c.SlotAdded(5);
  EXPECT_EQ(ReadReg(c, pci::kPciHotplugRegUp), 1u << 5);
  ASSERT_EQ(irq, std::vector<bool>({true}));

  c.SlotAdded(7);  // line already high: no second edge
  EXPECT_EQ(ReadReg(c, pci::kPciHotplugRegUp), (1u << 5) | (1u << 7));
  EXPECT_EQ(irq.size(), 1u);

  WriteReg(c, pci::kPciHotplugRegUp, 0);  // writing 0 clears nothing
  WriteReg(c, pci::kPciHotplugRegUp, 1u << 9);  // a bit that is not set
  EXPECT_EQ(ReadReg(c, pci::kPciHotplugRegUp), (1u << 5) | (1u << 7));
  EXPECT_TRUE(c.irq_level());

  WriteReg(c, pci::kPciHotplugRegUp, 1u << 5);  // ack one: the other keeps the line up
  EXPECT_EQ(ReadReg(c, pci::kPciHotplugRegUp), 1u << 7);
  EXPECT_TRUE(c.irq_level());
  EXPECT_EQ(irq.size(), 1u);

  WriteReg(c, pci::kPciHotplugRegUp, 1u << 7);
  EXPECT_EQ(ReadReg(c, pci::kPciHotplugRegUp), 0u);
  EXPECT_FALSE(c.irq_level());
  EXPECT_EQ(irq, std::vector<bool>({true, false}));
}

// Saved state: an event the guest has not acknowledged survives a migration (the destination's
// controller raises the line again), and is acknowledged there as usual.
TEST(PciHotplugControllerTest, PendingEventSurvivesSaveRestore) {
  PciHotplugController src([](bool) {});
  src.SlotAdded(3);
  std::vector<bool> irq;
  PciHotplugController dst([&](bool level) { irq.push_back(level); });
  dst.RestorePending(src.pending_up() | 1u);  // slot 0 is never hotplugged: dropped
  EXPECT_EQ(ReadReg(dst, pci::kPciHotplugRegUp), 1u << 3);
  EXPECT_TRUE(dst.irq_level());
  EXPECT_EQ(irq, std::vector<bool>({true}));
  WriteReg(dst, pci::kPciHotplugRegUp, 1u << 3);
  EXPECT_FALSE(dst.irq_level());
  PciHotplugController idle([&](bool level) { irq.push_back(level); });
  idle.RestorePending(0);
  EXPECT_FALSE(idle.irq_level());
  EXPECT_EQ(irq, std::vector<bool>({true, false})) << "nothing pending: the line stays low";
}

TEST(PciHotplugControllerTest, EjectIsRefusedAndOddAccessesAreHarmless) {
  std::vector<bool> irq;
  PciHotplugController c([&](bool level) { irq.push_back(level); });
  c.SlotAdded(3);
  WriteReg(c, pci::kPciHotplugRegEject, 1u << 3);
  EXPECT_EQ(c.eject_requests(), 1u);
  EXPECT_EQ(ReadReg(c, pci::kPciHotplugRegUp), 1u << 3);  // the device stays
  EXPECT_EQ(ReadReg(c, pci::kPciHotplugRegDown), 0u);     // no hot-unplug
  EXPECT_EQ(ReadReg(c, pci::kPciHotplugRegEject), 0u);

  // Byte/word accesses and unaligned dwords: reads all-ones, writes ignored.
  uint8_t one = 0xff;
  c.Write(pci::kPciHotplugRegUp, std::span<uint8_t>(&one, 1));
  uint8_t two[2] = {0xff, 0xff};
  c.Write(pci::kPciHotplugRegUp, two);
  uint8_t four[4] = {0xff, 0xff, 0xff, 0xff};
  c.Write(1, four);
  EXPECT_EQ(ReadReg(c, pci::kPciHotplugRegUp), 1u << 3);
  uint8_t r[2] = {0, 0};
  c.Read(0, r);
  EXPECT_EQ(r[0], 0xff);
  EXPECT_EQ(r[1], 0xff);
  EXPECT_EQ(irq, std::vector<bool>({true}));
}

// ---- A reader for the AML subset hotplug emits --------------------------------------------------

struct AmlObject {
  std::string kind;  // "Scope", "Device", "Method", "Name", "OpRegion", "Field"
  std::vector<uint8_t> data;  // Name: the encoded value; Method: the body; OpRegion: the args
  int method_args = 0;
};

class AmlReader {
 public:
  explicit AmlReader(std::vector<uint8_t> aml) : b_(std::move(aml)) {}

  // Parses the whole buffer as a TermList in `scope` (hotplug AML goes inside \_SB); false
  // (with error()) on anything unexpected or a length that does not add up.
  bool Parse(const std::string& scope = "\\_SB_") { return TermList(0, b_.size(), scope); }
  const std::string& error() const { return error_; }
  const std::map<std::string, AmlObject>& objects() const { return objects_; }
  bool Has(const std::string& path) const { return objects_.count(path) > 0; }
  const AmlObject& Get(const std::string& path) const { return objects_.at(path); }

 private:
  bool Fail(const std::string& why, size_t at) {
    if (error_.empty()) error_ = why + " at offset " + std::to_string(at);
    return false;
  }
  // PkgLength: returns the end offset of the package that starts at `*p` (before the PkgLength).
  bool PkgEnd(size_t* p, size_t limit, size_t* end) {
    size_t start = *p;
    if (*p >= limit) return Fail("truncated PkgLength", *p);
    uint8_t lead = b_[(*p)++];
    int extra = lead >> 6;
    size_t len = extra == 0 ? (lead & 0x3F) : (lead & 0x0F);
    for (int i = 0; i < extra; ++i) {
      if (*p >= limit) return Fail("truncated PkgLength", *p);
      len |= size_t{b_[(*p)++]} << (4 + 8 * i);
    }
    *end = start + len;
    if (*end > limit) return Fail("PkgLength past its parent", start);
    return true;
  }
  // NameString -> absolute dotted path ("\\_SB_.PCI0.S03_").
  bool NameString(size_t* p, size_t limit, const std::string& scope, std::string* out) {
    bool root = *p < limit && b_[*p] == '\\';
    if (root) ++*p;
    int segs = 1;
    if (*p < limit && b_[*p] == 0x2E) {
      segs = 2;
      ++*p;
    } else if (*p + 1 < limit && b_[*p] == 0x2F) {
      segs = b_[*p + 1];
      *p += 2;
    }
    std::string path = root || scope == "\\" ? "\\" : scope + ".";
    for (int i = 0; i < segs; ++i) {
      if (*p + 4 > limit) return Fail("truncated NameSeg", *p);
      for (int k = 0; k < 4; ++k) {
        char c = static_cast<char>(b_[*p + k]);
        bool ok = (c >= 'A' && c <= 'Z') || c == '_' || (k > 0 && c >= '0' && c <= '9');
        if (!ok) return Fail("bad NameSeg", *p);
      }
      if (i > 0) path += ".";
      path.append(reinterpret_cast<const char*>(&b_[*p]), 4);
      *p += 4;
    }
    *out = path;
    return true;
  }
  // A DataRefObject after NameOp: integer, string or buffer; returns its encoding.
  bool Data(size_t* p, size_t limit, std::vector<uint8_t>* out) {
    size_t start = *p;
    if (*p >= limit) return Fail("truncated data", *p);
    uint8_t op = b_[(*p)++];
    switch (op) {
      case 0x00: case 0x01: case 0xFF: break;
      case 0x0A: *p += 1; break;
      case 0x0B: *p += 2; break;
      case 0x0C: *p += 4; break;
      case 0x0E: *p += 8; break;
      case 0x0D:
        while (*p < limit && b_[*p] != 0) ++*p;
        ++*p;
        break;
      case 0x11: {
        size_t end;
        if (!PkgEnd(p, limit, &end)) return false;
        *p = end;
        break;
      }
      default:
        return Fail("unexpected data opcode", start);
    }
    if (*p > limit) return Fail("data past its parent", start);
    out->assign(b_.begin() + start, b_.begin() + *p);
    return true;
  }
  bool Add(const std::string& path, AmlObject o, size_t at) {
    if (!objects_.emplace(path, std::move(o)).second && path.size() > 0 &&
        objects_.at(path).kind != "Scope")
      return Fail("duplicate object " + path, at);
    return true;
  }
  bool TermList(size_t p, size_t end, const std::string& scope) {
    while (p < end) {
      size_t at = p;
      uint8_t op = b_[p++];
      std::string name;
      if (op == 0x10 || op == 0x14) {  // Scope / Method
        size_t pend;
        if (!PkgEnd(&p, end, &pend) || !NameString(&p, pend, scope, &name)) return false;
        if (op == 0x10) {
          if (!Add(name, {"Scope", {}, 0}, at) || !TermList(p, pend, name)) return false;
        } else {
          int args = b_[p++] & 7;
          AmlObject m{"Method", std::vector<uint8_t>(b_.begin() + p, b_.begin() + pend), args};
          if (!Add(name, std::move(m), at)) return false;
        }
        p = pend;
      } else if (op == 0x08) {  // Name
        AmlObject o{"Name", {}, 0};
        if (!NameString(&p, end, scope, &name) || !Data(&p, end, &o.data)) return false;
        if (!Add(name, std::move(o), at)) return false;
      } else if (op == 0x5B && p < end) {
        uint8_t ext = b_[p++];
        if (ext == 0x82) {  // Device
          size_t pend;
          if (!PkgEnd(&p, end, &pend) || !NameString(&p, pend, scope, &name)) return false;
          if (!Add(name, {"Device", {}, 0}, at) || !TermList(p, pend, name)) return false;
          p = pend;
        } else if (ext == 0x80) {  // OperationRegion: name, space, offset, length
          AmlObject o{"OpRegion", {}, 0};
          if (!NameString(&p, end, scope, &name)) return false;
          size_t s = p++;
          std::vector<uint8_t> a, l;
          if (!Data(&p, end, &a) || !Data(&p, end, &l)) return false;
          o.data.assign(b_.begin() + s, b_.begin() + p);
          if (!Add(name, std::move(o), at)) return false;
        } else if (ext == 0x81) {  // Field: region, flags, NamedFields
          size_t pend;
          if (!PkgEnd(&p, end, &pend) || !NameString(&p, pend, scope, &name)) return false;
          uint8_t flags = b_[p++];
          size_t bit = 0;
          while (p < pend) {
            std::string f;
            if (!NameString(&p, pend, scope, &f)) return false;
            AmlObject o{"Field", {flags, static_cast<uint8_t>(bit / 8)}, 0};
            bit += b_[p++];  // widths < 64 bits: one byte
            if (!Add(f, std::move(o), p)) return false;
          }
          p = pend;
        } else {
          return Fail("unexpected extended opcode", at);
        }
      } else {
        return Fail("unexpected opcode", at);
      }
    }
    if (p != end) return Fail("term list overran its package", p);
    return true;
  }

  std::vector<uint8_t> b_;
  std::map<std::string, AmlObject> objects_;
  std::string error_;
};

uint64_t IntValue(const std::vector<uint8_t>& d) {
  switch (d.at(0)) {
    case 0x00: return 0;
    case 0x01: return 1;
    case 0x0A: return d.at(1);
    case 0x0B: return d.at(1) | d.at(2) << 8;
    case 0x0C: return d.at(1) | d.at(2) << 8 | d.at(3) << 16 | uint64_t{d.at(4)} << 24;
  }
  ADD_FAILURE() << "not an integer: opcode " << int(d.at(0));
  return ~0ull;
}

bool Contains(const std::vector<uint8_t>& hay, const std::vector<uint8_t>& needle) {
  return std::search(hay.begin(), hay.end(), needle.begin(), needle.end()) != hay.end();
}

std::vector<uint8_t> Bytes(const std::string& s) { return {s.begin(), s.end()}; }

TEST(PciHotplugAmlTest, SlotObjectsRegistersAndGed) {
  // Slots 0 (host bridge: never), 3, 4 and 31; a large mask as well to force multi-byte
  // PkgLengths in PCNT.
  const uint32_t mask = 1u | (1u << 3) | (1u << 4) | (1u << 31);
  AmlReader r(pci::BuildPciHotplugAml(mask, 0xAE00, 5));
  ASSERT_TRUE(r.Parse()) << r.error();
  EXPECT_FALSE(r.Has("\\_SB_.PCI0.S00_"));
  EXPECT_FALSE(r.Has("\\_SB_.PCI0.S05_"));
  for (int slot : {3, 4, 31}) {
    char seg[8];
    snprintf(seg, sizeof(seg), "S%02X_", slot);
    const std::string dev = std::string("\\_SB_.PCI0.") + seg;
    ASSERT_TRUE(r.Has(dev)) << dev;
    EXPECT_EQ(r.Get(dev).kind, "Device");
    EXPECT_EQ(IntValue(r.Get(dev + "._ADR").data), uint64_t(slot) << 16);
    EXPECT_EQ(IntValue(r.Get(dev + "._SUN").data), uint64_t(slot));
    const AmlObject& ej0 = r.Get(dev + "._EJ0");
    EXPECT_EQ(ej0.kind, "Method");
    EXPECT_EQ(ej0.method_args, 1);
    // Store (1 << slot, PCEJ)
    EXPECT_EQ(ej0.data.front(), 0x70);
    EXPECT_TRUE(Contains(ej0.data, Bytes("PCEJ")));
    // PCNT notifies the slot with Device Check: Notify (Sxx_, One)
    std::vector<uint8_t> notify = {0x86};
    for (char c : std::string(seg)) notify.push_back(c);
    notify.push_back(0x01);
    EXPECT_TRUE(Contains(r.Get("\\_SB_.PCI0.PCNT").data, notify)) << seg;
  }
  // The register block: SystemIO at 0xAE00, 16 bytes; PCIU/PCID/PCEJ dwords at 0/4/8 with
  // DWordAcc + WriteAsZeros (W1C registers).
  const AmlObject& region = r.Get("\\_SB_.PCI0.PHPR");
  EXPECT_EQ(region.kind, "OpRegion");
  EXPECT_EQ(region.data, std::vector<uint8_t>({0x01, 0x0B, 0x00, 0xAE, 0x0A, 0x10}));
  int offset = 0;
  for (const char* f : {"PCIU", "PCID", "PCEJ"}) {
    const AmlObject& o = r.Get(std::string("\\_SB_.PCI0.") + f);
    EXPECT_EQ(o.kind, "Field");
    EXPECT_EQ(o.data[0], 0x43) << f;
    EXPECT_EQ(o.data[1], offset) << f;
    offset += 4;
  }
  // PCNT starts by acknowledging exactly what it read: Store (PCIU, Local0); Store (Local0, PCIU)
  const AmlObject& pcnt = r.Get("\\_SB_.PCI0.PCNT");
  EXPECT_EQ(pcnt.method_args, 0);
  std::vector<uint8_t> ack = {0x70, 'P', 'C', 'I', 'U', 0x60, 0x70, 0x60, 'P', 'C', 'I', 'U'};
  ASSERT_GE(pcnt.data.size(), ack.size());
  EXPECT_TRUE(std::equal(ack.begin(), ack.end(), pcnt.data.begin()));

  // The Generic Event Device: _HID "ACPI0013", _CRS = one level/high exclusive interrupt on
  // GSI 5, _EVT calling \_SB.PCI0.PCNT.
  ASSERT_TRUE(r.Has("\\_SB_.PHPE"));
  std::vector<uint8_t> hid = {0x0D};
  for (char c : std::string("ACPI0013")) hid.push_back(c);
  hid.push_back(0);
  EXPECT_EQ(r.Get("\\_SB_.PHPE._HID").data, hid);
  const std::vector<uint8_t>& crs = r.Get("\\_SB_.PHPE._CRS").data;
  std::vector<uint8_t> irq = {0x89, 0x06, 0x00, 0x01, 0x01, 0x05, 0x00, 0x00, 0x00, 0x79, 0x00};
  ASSERT_GE(crs.size(), irq.size());
  EXPECT_TRUE(std::equal(irq.begin(), irq.end(), crs.end() - irq.size()));
  const AmlObject& evt = r.Get("\\_SB_.PHPE._EVT");
  EXPECT_EQ(evt.method_args, 1);
  std::vector<uint8_t> call = {'\\', 0x2F, 3};
  for (char c : std::string("_SB_PCI0PCNT")) call.push_back(c);
  EXPECT_EQ(evt.data, call);
}

TEST(PciHotplugAmlTest, AllSlotsFitAndParse) {
  AmlReader r(pci::BuildPciHotplugAml(0xFFFFFFFEu));
  ASSERT_TRUE(r.Parse()) << r.error();
  int devices = 0;
  for (const auto& [path, o] : r.objects())
    if (o.kind == "Device" && path.rfind("\\_SB_.PCI0.S", 0) == 0) ++devices;
  EXPECT_EQ(devices, 31);
}

// The DSDT carries the hotplug AML inside \_SB (after PCI0, which its Scope refers to).
TEST(PciHotplugAmlTest, DsdtCarriesIt) {
  AcpiConfig cfg;
  cfg.sb_aml = pci::BuildPciHotplugAml(1u << 6);
  auto tables = BuildAcpiTables(cfg, 0xE0000);
  ASSERT_TRUE(tables.ok()) << tables.status();
  const std::vector<uint8_t>& t = *tables;
  auto at = std::search(t.begin(), t.end(), cfg.sb_aml.begin(), cfg.sb_aml.end());
  ASSERT_NE(at, t.end());
  auto dsdt = std::search(t.begin(), t.end(), std::begin("DSDT"), std::end("DSDT") - 1);
  ASSERT_NE(dsdt, t.end());
  uint32_t len;
  std::memcpy(&len, &*(dsdt + 4), 4);
  EXPECT_LE(at + cfg.sb_aml.size(), dsdt + len);  // inside the DSDT
  auto pci0 = std::search(t.begin(), t.end(), std::begin("PCI0"), std::end("PCI0") - 1);
  EXPECT_LT(pci0, at);
  uint8_t sum = 0;
  for (uint32_t i = 0; i < len; ++i) sum += *(dsdt + i);
  EXPECT_EQ(sum, 0);
}

// ---- AttachDevice refusals that need no VM ------------------------------------------------

grpc::Status Attach(ApiHarness& h, const AttachDeviceRequest& req, AttachDeviceResponse* resp) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  return h.stub().AttachDevice(&ctx, req, resp);
}

TEST(AttachDeviceApiTest, RefusalsWithoutAVm) {
  ApiHarness h;
  AttachDeviceRequest req;
  AttachDeviceResponse resp;
  grpc::Status s = Attach(h, req, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_NE(s.error_message().find("no device"), std::string::npos) << s.error_message();

  req.mutable_vfio_user()->set_socket("");
  s = Attach(h, req, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();

  req.mutable_vfio_user()->set_socket("/tmp/some.sock");
  req.set_vm_id("vm7");
  s = Attach(h, req, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << s.error_message();
  EXPECT_NE(s.error_message().find("vm7"), std::string::npos) << s.error_message();

  req.clear_vm_id();
  s = Attach(h, req, &resp);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << s.error_message();
  EXPECT_NE(s.error_message().find("NOT_CREATED"), std::string::npos) << s.error_message();
}

}  // namespace
}  // namespace microvmm::testing
