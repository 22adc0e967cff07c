// VM-wide owner of KVM's GSI routing table.
//
// KVM_SET_GSI_ROUTING replaces the whole table, including the defaults KVM installs with
// KVM_CREATE_IRQCHIP (arch/x86/kvm irq_comm.c `default_routing`: GSI 0-15 routed to both the
// IOAPIC pin n and the PIC (master for n < 8, slave pin n-8 otherwise), GSI 16-23 to IOAPIC pin n
// only). So exactly one object may push the table: this one. It re-creates those defaults, owns
// the allocation of GSIs >= 24 for MSI routes, and pushes the full table whenever a route changes.
// It also attaches/detaches irqfds (KVM_IRQFD) so KVM ioctls stay in one place per VM.
#ifndef MICROVMM_VMM_PCI_GSI_ROUTER_H_
#define MICROVMM_VMM_PCI_GSI_ROUTER_H_

#include "vmm/kvm/linux_kvm.h"

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "vmm/kvm/kvm.h"

namespace microvmm::pci {

inline constexpr uint32_t kIoapicPins = 24;   // KVM's in-kernel IOAPIC
inline constexpr uint32_t kFirstMsiGsi = kIoapicPins;

// The kernel side of routing: KvmVm in production, a recording fake in unit tests.
class IrqRoutingBackend {
 public:
  virtual ~IrqRoutingBackend() = default;
  virtual absl::Status SetGsiRouting(const std::vector<kvm_irq_routing_entry>& entries) = 0;
  virtual absl::Status AssignIrqfd(int fd, uint32_t gsi) = 0;
  virtual absl::Status DeassignIrqfd(int fd, uint32_t gsi) = 0;
};

class KvmIrqRoutingBackend : public IrqRoutingBackend {
 public:
  explicit KvmIrqRoutingBackend(KvmVm& vm) : vm_(vm) {}
  absl::Status SetGsiRouting(const std::vector<kvm_irq_routing_entry>& entries) override {
    return vm_.SetGsiRouting(entries);
  }
  absl::Status AssignIrqfd(int fd, uint32_t gsi) override { return vm_.AssignIrqfd(fd, gsi); }
  absl::Status DeassignIrqfd(int fd, uint32_t gsi) override { return vm_.DeassignIrqfd(fd, gsi); }

 private:
  KvmVm& vm_;
};

// KVM's default table for an in-kernel PIC + IOAPIC (48 entries: 16 x 2 + 8).
std::vector<kvm_irq_routing_entry> DefaultIrqchipRoutes();

struct MsiRoute {
  uint32_t gsi = 0;
  uint64_t address = 0;
  uint32_t data = 0;
};

// Thread-safe.
class GsiRouter {
 public:
  // For a VM with KVM_CREATE_IRQCHIP done: checks KVM_CAP_IRQ_ROUTING and KVM_CAP_IRQFD and
  // pushes the default table (so a failure shows at build time). `vm` must outlive the router.
  static absl::StatusOr<std::unique_ptr<GsiRouter>> Create(KvmVm& vm);

  // `max_routes`: KVM_CHECK_EXTENSION(KVM_CAP_IRQ_ROUTING) (KVM_MAX_IRQ_ROUTES, 4096 on x86);
  // GSIs are < max_routes. Does not push anything; call Init().
  GsiRouter(IrqRoutingBackend& backend, uint32_t max_routes);
  absl::Status Init();

  // Lowest free GSI >= 24. RESOURCE_EXHAUSTED when all are used.
  absl::StatusOr<uint32_t> AllocateGsi();
  // Drops the GSI's route (pushing the table if it had one) and makes it free.
  absl::Status FreeGsi(uint32_t gsi);
  // Same for several GSIs with at most one push.
  absl::Status FreeGsis(const std::vector<uint32_t>& gsis);

  // Sets (adds or replaces) MSI routes for allocated GSIs and pushes the full table once if
  // anything changed. On failure the previous routes are kept.
  absl::Status SetMsiRoutes(const std::vector<MsiRoute>& routes);
  absl::Status SetMsiRoute(uint32_t gsi, uint64_t address, uint32_t data) {
    return SetMsiRoutes({MsiRoute{gsi, address, data}});
  }
  absl::Status RemoveRoute(uint32_t gsi);

  absl::Status AssignIrqfd(int fd, uint32_t gsi);
  absl::Status DeassignIrqfd(int fd, uint32_t gsi);

  // The full table as pushed (defaults first, then MSI routes by GSI).
  std::vector<kvm_irq_routing_entry> Table() const;
  uint64_t push_count() const;

 private:
  std::vector<kvm_irq_routing_entry> BuildLocked() const;
  absl::Status PushLocked();

  IrqRoutingBackend& backend_;
  std::unique_ptr<IrqRoutingBackend> owned_backend_;
  const uint32_t max_routes_;
  mutable std::mutex mu_;
  std::set<uint32_t> allocated_;             // allocated GSIs (all >= 24)
  std::map<uint32_t, MsiRoute> msi_routes_;  // gsi -> route
  uint64_t pushes_ = 0;
};

}  // namespace microvmm::pci

#endif  // MICROVMM_VMM_PCI_GSI_ROUTER_H_
