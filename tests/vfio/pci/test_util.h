// Shared set-up for the VfioPciDevice / VfioMigrationDriver tests: the fake kernel of
// tests/vfio/kernel with a realistic config space (capability list with PM, MSI, MSI-X,
// vendor-specific and PCIe capabilities, 32/64-bit and I/O BARs), a recording fake of the KVM
// routing ioctls, a recording BarMapper and IntxRouter, and a VfioDevice decorator that records
// the migration arcs. Fakes sit only at the kernel boundary; the eventfds are real.
#ifndef MICROVMM_TESTS_VFIO_PCI_TEST_UTIL_H_
#define MICROVMM_TESTS_VFIO_PCI_TEST_UTIL_H_

#include <unistd.h>

#include <cstring>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "devices/vfio/kernel/kernel_vfio_device.h"
#include "devices/vfio/kernel/vfio_uapi.h"
#include "devices/vfio/pci/vfio_pci_device.h"
#include "gtest/gtest.h"
#include "tests/vfio/kernel/fake_vfio_kernel.h"
#include "vmm/pci/gsi_router.h"

namespace microvmm::vfio::testing {

inline constexpr char kBdf[] = "0000:01:00.0";
inline constexpr char kSysfs[] = "/sys/bus/pci/devices/0000:01:00.0";
inline constexpr uint16_t kVendor = 0x8086;
inline constexpr uint16_t kDevice = 0x1234;
// Capability offsets in the fake device's config space.
inline constexpr uint32_t kCapPm = 0x40, kCapMsi = 0x48, kCapMsix = 0x60, kCapVendor = 0x70,
                          kCapExp = 0x80;
inline constexpr uint32_t kMsixTableOff = 0x1000, kMsixPbaOff = 0x1800;  // in BAR 0
inline constexpr uint16_t kMsixVectors = 16;

inline void Put(std::vector<uint8_t>& b, uint32_t off, unsigned size, uint32_t v) {
  for (unsigned i = 0; i < size; ++i) b[off + i] = static_cast<uint8_t>(v >> (8 * i));
}
inline uint32_t Get(const std::vector<uint8_t>& b, uint32_t off, unsigned size) {
  uint32_t v = 0;
  for (unsigned i = 0; i < size; ++i) v |= uint32_t{b[off + i]} << (8 * i);
  return v;
}

// The fake's default regions (BAR0 16 KiB sparse-mmap around the MSI-X page, BAR2 4 KiB
// mappable, BAR4 256-byte I/O) with a config space to match.
inline void SetUpKernel(FakeVfioKernel& k) {
  k.AddPciDevice(kBdf, "vfio-pci", "12", "vfio0");
  k.SetIommufdPresent(true);
  std::vector<uint8_t>& c = k.regions[VFIO_PCI_CONFIG_REGION_INDEX].data;
  Put(c, 0x00, 2, kVendor);
  Put(c, 0x02, 2, kDevice);
  Put(c, 0x04, 2, 0x0040);  // the host left PARITY on: not the guest's business
  Put(c, 0x06, 2, 0x0010);  // capability list
  Put(c, 0x08, 4, 0x01080201);  // revision 1, class 01:08:02 (NVMe)
  c[0x0e] = 0x80;            // multi-function bit set on the host
  Put(c, 0x10, 4, 0x0);      // BAR0 mem32
  Put(c, 0x18, 4, 0xc);      // BAR2 mem64, prefetchable (BAR3 = upper half)
  Put(c, 0x20, 4, 0x1);      // BAR4 I/O
  Put(c, 0x2c, 4, 0x56788086);
  Put(c, 0x30, 4, 0xfffe0001);  // a ROM BAR the guest must not see
  c[0x34] = kCapPm;
  c[0x3d] = 1;  // INTA#
  // PM
  Put(c, kCapPm, 4, 0x00030000 | kCapMsi << 8 | 0x01);
  Put(c, kCapPm + 4, 4, 0x0008);
  // MSI, 64-bit (14 bytes)
  Put(c, kCapMsi, 4, 0x00800000 | kCapMsix << 8 | 0x05);
  // MSI-X: 16 vectors, table BAR0 +0x1000, PBA BAR0 +0x1800
  Put(c, kCapMsix, 4, (kMsixVectors - 1) << 16 | kCapVendor << 8 | 0x11);
  Put(c, kCapMsix + 4, 4, kMsixTableOff | 0);
  Put(c, kCapMsix + 8, 4, kMsixPbaOff | 0);
  // Vendor-specific, 8 bytes
  Put(c, kCapVendor, 4, 0x00080000 | kCapExp << 8 | 0x09);
  Put(c, kCapVendor + 4, 4, 0xdeadbeef);
  // PCI Express v2 endpoint
  Put(c, kCapExp, 4, 0x00020000 | 0x00 << 8 | 0x10);
  Put(c, kCapExp + 8, 2, 0x2810);  // device control
  // Device-specific registers
  Put(c, 0xc0, 4, 0x11223344);
}

// The fake kernel plus two vfio-pci rules the PCI model depends on:
//   - one interrupt type at a time: setting triggers of INTx, MSI or MSI-X while another of them
//     is set up is EINVAL (vfio_pci_set_irqs_ioctl / vfio_pci_set_msi_trigger), and so is
//     growing the MSI vector count while MSI is enabled;
//   - the PRE_COPY -> STOP_COPY arc of devices without P2P (the base fake only models the
//     PRE_COPY_P2P -> STOP_COPY one; the data stream continues the same way).
class PciFakeKernel : public FakeVfioKernel {
 public:
  int Ioctl(int fd, unsigned long request, void* arg) override {
    if (request == VFIO_DEVICE_SET_IRQS) {
      vfio_irq_set set;
      std::memcpy(&set, arg, sizeof(set));
      const bool trigger_fds = (set.flags & VFIO_IRQ_SET_ACTION_TRIGGER) &&
                               (set.flags & VFIO_IRQ_SET_DATA_EVENTFD) && set.count > 0;
      auto any = [&](uint32_t index) {
        for (int t : irqs[index].triggers)
          if (t != -1) return true;
        return false;
      };
      for (uint32_t other :
           {VFIO_PCI_INTX_IRQ_INDEX, VFIO_PCI_MSI_IRQ_INDEX, VFIO_PCI_MSIX_IRQ_INDEX}) {
        if (trigger_fds && set.index <= VFIO_PCI_MSIX_IRQ_INDEX && set.index != other &&
            any(other)) {
          ++irq_type_conflicts;
          errno = EINVAL;
          return -1;
        }
      }
      // vfio_msi_set_block: with MSI enabled, vectors beyond the count enabled are EINVAL
      // (a new count needs disable + enable).
      if (trigger_fds && set.index == VFIO_PCI_MSI_IRQ_INDEX) {
        uint32_t enabled = 0;
        for (int t : irqs[VFIO_PCI_MSI_IRQ_INDEX].triggers) enabled += t != -1;
        if (enabled != 0 && set.start + set.count > enabled) {
          ++irq_type_conflicts;
          errno = EINVAL;
          return -1;
        }
      }
    }
    if (request == VFIO_DEVICE_FEATURE && !(mig_flags & VFIO_MIGRATION_P2P)) {
      vfio_device_feature f;
      std::memcpy(&f, arg, sizeof(f));
      vfio_device_feature_mig_state st;
      if ((f.flags & VFIO_DEVICE_FEATURE_MASK) == VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE &&
          (f.flags & VFIO_DEVICE_FEATURE_SET) && f.argsz >= sizeof(f) + sizeof(st)) {
        std::memcpy(&st, static_cast<uint8_t*>(arg) + sizeof(f), sizeof(st));
        if (st.device_state == VFIO_DEVICE_STATE_STOP_COPY && mig_state == 6 /*PRE_COPY*/) {
          std::vector<uint8_t> copy(f.argsz);
          std::memcpy(copy.data(), arg, f.argsz);
          st.device_state = 7;  // PRE_COPY_P2P
          std::memcpy(copy.data() + sizeof(f), &st, sizeof(st));
          if (FakeVfioKernel::Ioctl(fd, request, copy.data()) != 0) return -1;
        }
      }
    }
    return FakeVfioKernel::Ioctl(fd, request, arg);
  }
  int irq_type_conflicts = 0;
};

inline std::unique_ptr<KernelVfioDevice> OpenDevice(FakeVfioKernel& k) {
  auto dev = OpenKernelVfioDevice(kSysfs, k);
  EXPECT_TRUE(dev.ok()) << dev.status();
  return dev.ok() ? std::move(*dev) : nullptr;
}

// Records what KVM would be told; attached irqfds are drained by Deliver() like KVM's wakeup.
class FakeRouting : public pci::IrqRoutingBackend {
 public:
  absl::Status SetGsiRouting(const std::vector<kvm_irq_routing_entry>& entries) override {
    table = entries;
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
  std::map<uint32_t, uint64_t> Deliver() {
    std::map<uint32_t, uint64_t> out;
    for (auto [fd, gsi] : irqfds) {
      uint64_t v = 0;
      if (::read(fd, &v, sizeof(v)) == sizeof(v) && v > 0) out[gsi] += v;
    }
    return out;
  }
  const kvm_irq_routing_entry* Route(uint32_t gsi) const {
    for (const auto& e : table)
      if (e.gsi == gsi && e.type == KVM_IRQ_ROUTING_MSI) return &e;
    return nullptr;
  }
  std::vector<kvm_irq_routing_entry> table;
  std::set<std::pair<int, uint32_t>> irqfds;
};

class FakeBarMapper : public BarMapper {
 public:
  absl::Status Map(uint64_t gpa, void* host, uint64_t size) override {
    maps[gpa] = {host, size};
    return absl::OkStatus();
  }
  absl::Status Unmap(uint64_t gpa, uint64_t size) override {
    auto it = maps.find(gpa);
    if (it == maps.end() || it->second.second != size) return absl::NotFoundError("not mapped");
    maps.erase(it);
    return absl::OkStatus();
  }
  std::map<uint64_t, std::pair<void*, uint64_t>> maps;  // gpa -> (host, size)
};

class FakeIntxRouter : public IntxRouter {
 public:
  absl::Status AssignResampleIrqfd(int trigger_fd, int resample_fd, uint32_t gsi) override {
    trigger = trigger_fd;
    resample = resample_fd;
    this->gsi = gsi;
    return absl::OkStatus();
  }
  absl::Status DeassignResampleIrqfd(int trigger_fd, uint32_t g) override {
    if (trigger_fd != trigger || g != gsi) return absl::NotFoundError("not assigned");
    trigger = resample = -1;
    return absl::OkStatus();
  }
  int trigger = -1, resample = -1;
  uint32_t gsi = 0;
};

// Forwards to a VfioDevice and records every migration arc requested (successful or not).
class ArcRecorder : public VfioDevice {
 public:
  explicit ArcRecorder(std::unique_ptr<VfioDevice> d) : d_(std::move(d)) {}
  std::string name() const override { return d_->name(); }
  absl::StatusOr<DeviceInfo> GetInfo() override { return d_->GetInfo(); }
  absl::StatusOr<RegionInfo> GetRegionInfo(uint32_t i) override { return d_->GetRegionInfo(i); }
  absl::StatusOr<IrqInfo> GetIrqInfo(uint32_t i) override { return d_->GetIrqInfo(i); }
  absl::Status RegionRead(uint32_t i, uint64_t o, std::span<uint8_t> b) override {
    return d_->RegionRead(i, o, b);
  }
  absl::Status RegionWrite(uint32_t i, uint64_t o, std::span<const uint8_t> b) override {
    return d_->RegionWrite(i, o, b);
  }
  absl::StatusOr<ScopedMmap> MapRegion(uint32_t i, uint64_t o, uint64_t s) override {
    return d_->MapRegion(i, o, s);
  }
  absl::Status SetIrqs(uint32_t i, uint32_t s, std::span<const int> f) override {
    return d_->SetIrqs(i, s, f);
  }
  absl::Status SetIrqUnmaskFd(uint32_t i, int fd) override { return d_->SetIrqUnmaskFd(i, fd); }
  absl::Status Reset() override {
    ++resets;
    return d_->Reset();
  }
  absl::Status DmaMap(uint64_t iova, uint64_t size, void* va, int fd, uint64_t off,
                      bool w) override {
    return d_->DmaMap(iova, size, va, fd, off, w);
  }
  absl::Status DmaUnmap(uint64_t iova, uint64_t size) override { return d_->DmaUnmap(iova, size); }
  absl::StatusOr<MigrationCaps> GetMigrationCaps() override { return d_->GetMigrationCaps(); }
  absl::StatusOr<MigState> GetMigState() override { return d_->GetMigState(); }
  absl::Status SetMigState(MigState s) override {
    arcs.push_back(s);
    return d_->SetMigState(s);
  }
  absl::StatusOr<size_t> ReadMigData(std::span<uint8_t> b) override { return d_->ReadMigData(b); }
  absl::Status WriteMigData(std::span<const uint8_t> b) override { return d_->WriteMigData(b); }
  absl::Status StartDmaLogging(std::span<const DmaRange> r, uint64_t p) override {
    return d_->StartDmaLogging(r, p);
  }
  absl::Status ReportDmaDirty(uint64_t iova, uint64_t size, uint64_t p,
                              std::span<uint64_t> bm) override {
    return d_->ReportDmaDirty(iova, size, p, bm);
  }
  absl::Status StopDmaLogging() override { return d_->StopDmaLogging(); }
  absl::Status StartIommuDirtyTracking() override { return d_->StartIommuDirtyTracking(); }
  absl::Status ReportIommuDirty(uint64_t iova, uint64_t size, uint64_t p,
                                std::span<uint64_t> bm) override {
    return d_->ReportIommuDirty(iova, size, p, bm);
  }
  absl::Status StopIommuDirtyTracking() override { return d_->StopIommuDirtyTracking(); }

  std::vector<MigState> arcs;
  int resets = 0;

 private:
  std::unique_ptr<VfioDevice> d_;
};

}  // namespace microvmm::vfio::testing

#endif  // MICROVMM_TESTS_VFIO_PCI_TEST_UTIL_H_
