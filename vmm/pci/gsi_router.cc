#include "vmm/pci/gsi_router.h"

#include "absl/strings/str_cat.h"

namespace microvmm::pci {

namespace {

kvm_irq_routing_entry IrqchipEntry(uint32_t gsi, uint32_t chip, uint32_t pin) {
  kvm_irq_routing_entry e{};
  e.gsi = gsi;
  e.type = KVM_IRQ_ROUTING_IRQCHIP;
  e.u.irqchip.irqchip = chip;
  e.u.irqchip.pin = pin;
  return e;
}

}  // namespace

std::vector<kvm_irq_routing_entry> DefaultIrqchipRoutes() {
  std::vector<kvm_irq_routing_entry> t;
  for (uint32_t gsi = 0; gsi < kIoapicPins; ++gsi) {
    t.push_back(IrqchipEntry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    if (gsi < 16)
      t.push_back(IrqchipEntry(gsi, gsi < 8 ? KVM_IRQCHIP_PIC_MASTER : KVM_IRQCHIP_PIC_SLAVE,
                               gsi % 8));
  }
  return t;
}

absl::StatusOr<std::unique_ptr<GsiRouter>> GsiRouter::Create(KvmVm& vm) {
  int routes = vm.CheckExtension(KVM_CAP_IRQ_ROUTING);
  if (routes <= 0) return absl::FailedPreconditionError("KVM lacks KVM_CAP_IRQ_ROUTING");
  if (vm.CheckExtension(KVM_CAP_IRQFD) <= 0)
    return absl::FailedPreconditionError("KVM lacks KVM_CAP_IRQFD");
  auto backend = std::make_unique<KvmIrqRoutingBackend>(vm);
  std::unique_ptr<GsiRouter> r(new GsiRouter(*backend, static_cast<uint32_t>(routes)));
  r->owned_backend_ = std::move(backend);
  if (absl::Status s = r->Init(); !s.ok()) return s;
  return r;
}

GsiRouter::GsiRouter(IrqRoutingBackend& backend, uint32_t max_routes)
    : backend_(backend), max_routes_(max_routes) {}

absl::Status GsiRouter::Init() {
  std::lock_guard lock(mu_);
  return PushLocked();
}

absl::StatusOr<uint32_t> GsiRouter::AllocateGsi() {
  std::lock_guard lock(mu_);
  for (uint32_t gsi = kFirstMsiGsi; gsi < max_routes_; ++gsi) {
    if (allocated_.count(gsi)) continue;
    allocated_.insert(gsi);
    return gsi;
  }
  return absl::ResourceExhaustedError(
      absl::StrCat("all ", max_routes_ - kFirstMsiGsi, " MSI GSIs are in use"));
}

absl::Status GsiRouter::FreeGsi(uint32_t gsi) { return FreeGsis({gsi}); }

absl::Status GsiRouter::FreeGsis(const std::vector<uint32_t>& gsis) {
  std::lock_guard lock(mu_);
  for (uint32_t gsi : gsis)
    if (!allocated_.count(gsi))
      return absl::NotFoundError(absl::StrCat("GSI ", gsi, " not allocated"));
  bool had_route = false;
  for (uint32_t gsi : gsis) {
    allocated_.erase(gsi);
    had_route |= msi_routes_.erase(gsi) > 0;
  }
  return had_route ? PushLocked() : absl::OkStatus();
}

absl::Status GsiRouter::SetMsiRoutes(const std::vector<MsiRoute>& routes) {
  std::lock_guard lock(mu_);
  std::map<uint32_t, MsiRoute> old = msi_routes_;
  bool changed = false;
  for (const MsiRoute& r : routes) {
    if (!allocated_.count(r.gsi))
      return absl::FailedPreconditionError(absl::StrCat("GSI ", r.gsi, " was not allocated"));
    auto it = msi_routes_.find(r.gsi);
    if (it != msi_routes_.end() && it->second.address == r.address && it->second.data == r.data)
      continue;
    msi_routes_[r.gsi] = r;
    changed = true;
  }
  if (!changed) return absl::OkStatus();
  absl::Status s = PushLocked();
  if (!s.ok()) msi_routes_ = std::move(old);
  return s;
}

absl::Status GsiRouter::RemoveRoute(uint32_t gsi) {
  std::lock_guard lock(mu_);
  auto it = msi_routes_.find(gsi);
  if (it == msi_routes_.end()) return absl::OkStatus();
  MsiRoute old = it->second;
  msi_routes_.erase(it);
  absl::Status s = PushLocked();
  if (!s.ok()) msi_routes_[gsi] = old;
  return s;
}

absl::Status GsiRouter::AssignIrqfd(int fd, uint32_t gsi) { return backend_.AssignIrqfd(fd, gsi); }

absl::Status GsiRouter::DeassignIrqfd(int fd, uint32_t gsi) {
  return backend_.DeassignIrqfd(fd, gsi);
}

std::vector<kvm_irq_routing_entry> GsiRouter::BuildLocked() const {
  std::vector<kvm_irq_routing_entry> t = DefaultIrqchipRoutes();
  for (const auto& [gsi, r] : msi_routes_) {
    kvm_irq_routing_entry e{};
    e.gsi = gsi;
    e.type = KVM_IRQ_ROUTING_MSI;
    e.u.msi.address_lo = static_cast<uint32_t>(r.address);
    e.u.msi.address_hi = static_cast<uint32_t>(r.address >> 32);
    e.u.msi.data = r.data;
    t.push_back(e);
  }
  return t;
}

absl::Status GsiRouter::PushLocked() {
  absl::Status s = backend_.SetGsiRouting(BuildLocked());
  if (s.ok()) ++pushes_;
  return s;
}

std::vector<kvm_irq_routing_entry> GsiRouter::Table() const {
  std::lock_guard lock(mu_);
  return BuildLocked();
}

uint64_t GsiRouter::push_count() const {
  std::lock_guard lock(mu_);
  return pushes_;
}

}  // namespace microvmm::pci
