// Vm: one KVM virtual machine with its memory, vCPUs and devices. The single object the
// command line and the gRPC API drive.
#ifndef MICROVMM_VMM_VM_H_
#define MICROVMM_VMM_VM_H_

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "proto/vm_config.pb.h"
#include "proto/vm_state.pb.h"
#include "proto/vm_status.pb.h"
#include "vmm/exit_status.h"

namespace microvmm {

class GuestMemory;
namespace migration {
class DirtyTracker;
class DirtySet;
}
namespace virtio {
class FreePageHintSink;
}
namespace vfio {
class VfioSys;
}

enum class RunState { kCreated, kRunning, kPaused, kExited };
const char* RunStateName(RunState s);

struct VmExit {
  int status = 0;       // what the VMM process should exit with
  std::string reason;   // one line, human readable
};

// All methods are thread-safe (the API server and the VMM main call them concurrently).
class Vm {
 public:
  // Validates `config` and builds the VM: memory, irqchip, vCPUs, devices, guest loaded.
  // Nothing runs until Boot(). Errors are INVALID_ARGUMENT (bad config) or INTERNAL.
  static absl::StatusOr<std::unique_ptr<Vm>> Create(const VmConfig& config);
  // Builds a VM whose contents will come from an incoming migration or a snapshot: memory,
  // vCPUs and devices exist, nothing is loaded. Fill memory(), RestoreState(), then Boot().
  static absl::StatusOr<std::unique_ptr<Vm>> CreateIncoming(const VmConfig& config);
  virtual ~Vm();

  // CREATED -> RUNNING.
  virtual absl::Status Boot() = 0;
  // RUNNING -> PAUSED. Returns once every vCPU is out of KVM_RUN.
  virtual absl::Status Pause() = 0;
  // PAUSED -> RUNNING.
  virtual absl::Status Resume() = 0;
  // Any state -> EXITED (reason "shutdown requested", status 0). Idempotent.
  virtual absl::Status Shutdown() = 0;

  virtual RunState state() const = 0;
  virtual std::optional<VmExit> exit_info() const = 0;
  virtual absl::Duration uptime() const = 0;  // since Boot(), zero before
  // A copy: the configuration grows when a device is hot-attached (AttachVfioUser/AttachVfio).
  virtual VmConfig config() const = 0;

  // Complete vCPU / irqchip / PIT / clock / device state. Needs PAUSED (or CREATED).
  virtual absl::StatusOr<VmState> SaveState() = 0;
  // Needs CREATED (not booted). Checks the state matches this VM (vCPU count, sizes).
  virtual absl::Status RestoreState(const VmState& state) = 0;
  virtual GuestMemory& memory() = 0;
  virtual migration::DirtyTracker& dirty_tracker() = 0;
  // The VM now runs elsewhere: EXITED with status 0 and `reason`; vCPUs stopped.
  virtual void MarkMigrated(const std::string& reason) = 0;

  // Linux thread ids of the vCPU threads, by vCPU index (0 for a vCPU whose thread has not
  // started). Post-copy attributes memory faults to vCPUs with them.
  virtual std::vector<pid_t> VcpuThreadIds() const = 0;
  // Exit-driven post-copy (KVM Userfault; see migration/postcopy/kvm_userfault.h).
  // Does this host's KVM offer it? Probed once per process by behaviour (a scratch VM).
  virtual bool KvmUserfaultAvailable() = 0;
  // `fn` serves KVM_EXIT_MEMORY_FAULT with the userfault flag on each vCPU's own thread
  // (see Vcpu::MemoryFaultFn). Before Boot() only.
  virtual absl::Status SetMemoryFaultHandler(
      std::function<absl::Status(int vcpu, uint64_t gpa, uint64_t size, uint64_t flags)> fn) = 0;
  // Re-registers the memslot of RAM region i with KVM_MEM_USERFAULT and bitmaps[i]; an empty
  // vector re-registers every RAM memslot without the flag (post-copy over).
  virtual absl::Status SetRamUserfault(const std::vector<const void*>& bitmaps) = 0;
  // Post-copy: `waiting(i)` says vCPU i waits for a missing page (see PostcopyMemory::
  // LaneWaiting); Pause() then counts it as stopped instead of signalling it again. Empty: none.
  virtual void SetVcpuWaitingProbe(std::function<bool(int vcpu)> waiting) = 0;
  // Throttles every vCPU to about `percent` % of wall time outside KVM_RUN without making it deaf
  // to interrupts (vmm/throttle.h). 0 releases at once; capped at 90. Returns the percent set.
  virtual absl::StatusOr<int> SetThrottle(int percent) = 0;
  virtual int throttle_percent() const = 0;
  // RAM region i is memslot RamSlot(i).
  static uint32_t RamSlot(size_t region) { return static_cast<uint32_t>(region); }
  // A line about the VM's migration state for the API (e.g. why an incoming post-copy stopped).
  virtual void SetMigrationNote(const std::string& note) = 0;
  virtual std::string migration_note() const = 0;

  // Devices on the PCI bus: virtio ones in configuration order, then vfio-user functions
  // (kind "vfio-user", no virtio status/kicks) in configuration order, then kernel VFIO
  // functions (kind "vfio") in configuration order.
  virtual std::vector<DeviceStatus> DeviceStatuses() const = 0;
  // virtio-balloon. FailedPrecondition if the VM has none; InvalidArgument for a target not
  // below guest RAM.
  virtual absl::Status SetBalloonTarget(uint64_t target_mib) = 0;
  virtual absl::StatusOr<BalloonStatus> GetBalloonStatus() = 0;
  // Free-page hinting through the virtio-balloon (live migration). Start: FailedPrecondition
  // unless the VM has a balloon with hinting; returns the command id. Stop (the guest should
  // stop sending) and Finish (the guest may reuse the hinted pages) are no-ops without one.
  virtual absl::StatusOr<uint32_t> StartFreePageHints(virtio::FreePageHintSink* sink) = 0;
  virtual void StopFreePageHints() = 0;
  virtual void FinishFreePageHints() = 0;

  // PCI hotplug: connects to the vfio-user server at config.socket and adds the function to a
  // free hotpluggable slot of bus 0 while the VM is CREATED, RUNNING or PAUSED (vCPUs keep
  // running: config cycles and BAR windows are locked by PciRootBus), with DMA over all guest
  // RAM and MSI-X through the GSI router; then raises the ACPI hotplug event (vmm/pci/hotplug.h)
  // and appends it to config().vfio_user. Returns the PCI device number (BDF 00:NN.0).
  // Errors: FAILED_PRECONDITION (VM exited), ALREADY_EXISTS (socket already attached),
  // RESOURCE_EXHAUSTED (no free slot), the connection's error (socket missing, refused, not a
  // vfio-user server). On error nothing stays attached. Refusing during a migration is the
  // caller's job (the API server knows about migrations).
  virtual absl::StatusOr<uint8_t> AttachVfioUser(const VfioUserConfig& config) = 0;
  // The same for a host PCI function through kernel VFIO (config.sysfs_path, opened as for
  // VmConfig.vfio: BARs as memslots, INTx on its DSDT/MP-table GSI, DMA over all guest RAM);
  // appends it to config().vfio with pci_slot set. Errors: FAILED_PRECONDITION (VM exited, or
  // the VM has a virtio-balloon: the IOMMU pins guest RAM), ALREADY_EXISTS (that PCI address is
  // attached), RESOURCE_EXHAUSTED (no free slot), the kernel layer's error (no such device,
  // not bound to vfio-pci, busy, group not viable). On error nothing stays attached (memslots,
  // irqfds, DMA maps undone with the device).
  virtual absl::StatusOr<uint8_t> AttachVfio(const VfioConfig& config) = 0;

  // ---- Live migration of passthrough PCI functions (kernel VFIO and vfio-user) ----
  // Source side, in this order; all from the migration thread.
  // Start: every passthrough function must support migration (FAILED_PRECONDITION naming the
  // first that cannot; nothing is changed then). Enters PRE_COPY where offered and starts
  // device DMA dirty logging over its DMA-mapped RAM (all-dirty fallback, logged). Returns how
  // many functions take part (0: none, the other calls are no-ops).
  virtual absl::StatusOr<int> StartPassthroughMigration() = 0;
  // Once per pass: reads the pre-copy data the devices have and ORs every page a device wrote
  // by DMA since the last call into `dirty`. Returns the pre-copy bytes read by this call.
  virtual absl::StatusOr<uint64_t> SyncPassthroughMigration(migration::DirtySet& dirty) = 0;
  // PAUSED: stops every function, reads its state to EOF (kept for SaveState) and ORs the
  // final DMA dirty pages into `dirty` (after the stop: no DMA can follow). SaveState of a VM
  // with passthrough functions needs this first.
  virtual absl::Status StopPassthroughDevices(migration::DirtySet& dirty) = 0;
  // Pre-copy data the functions produced since the last call (read by SyncPassthroughMigration),
  // for sending ahead of the switchover in chunks of at most `max_chunk` bytes; SaveState then
  // carries only the rest of each device's stream (VfioDeviceState.blob_offset). Call only when
  // the chunks will reach the destination.
  struct PassthroughData {
    uint32_t slot = 0;    // PCI device number
    uint64_t offset = 0;  // in the device's migration stream
    std::string data;
  };
  virtual std::vector<PassthroughData> TakePassthroughPrecopyData(size_t max_chunk) = 0;
  // The migration ended without the destination taking over: devices back to RUNNING, DMA
  // logging off, saved device state dropped. Idempotent.
  virtual void CancelPassthroughMigration() = 0;
  // Destination side: restored passthrough functions are left stopped by RestoreState and run
  // at Boot(). Their DMA targets (guest RAM) must be present before then (post-copy).
  virtual int passthrough_devices() const = 0;
  // Post-copy with passthrough functions (devices/vfio/pci/dma_footprint.h): each needs a DMA
  // model of its class, else FAILED_PRECONDITION naming it (it could DMA into pages that have
  // not arrived). Both ends check.
  virtual absl::Status CheckPassthroughPostcopy() const = 0;
  // Destination, after RestoreState and before Boot(): `ensure(gpa, len)` makes guest RAM
  // present (blocking; UNAVAILABLE/DEADLINE_EXCEEDED are retried). Until called again with
  // nullptr, every guest write to a passthrough BAR first makes present what the write will
  // make the device DMA (the vCPU waits, as on a missing page), and Boot() makes present what
  // the restored device state will DMA before the device runs.
  using EnsurePresentFn = std::function<absl::Status(uint64_t gpa, uint64_t len)>;
  virtual absl::Status SetPassthroughPostcopy(EnsurePresentFn ensure) = 0;

  // Blocks until the VM has exited (guest reset, crash, Shutdown()).
  virtual VmExit WaitForExit() = 0;
  // Like WaitForExit with a timeout; nullopt if still not exited.
  virtual std::optional<VmExit> WaitForExitFor(absl::Duration timeout) = 0;
};

// Destination side of a migration: `from_source` is the source VM's configuration; `local` holds
// this host's settings. The serial console is always local. Device backends given locally
// replace the source's: disks (path, direct, engine — same count; read-only and serial are
// guest-visible and stay the source's), nets (tap — same count; the MAC stays), vsock (socket
// path; the CID stays). Backends not given locally keep the source's values (shared storage,
// same tap names on both hosts). Passthrough functions (vfio-user sockets, VFIO sysfs paths)
// must always be given locally, as many as the source has, in its order. InvalidArgument when
// counts or presence differ.
absl::Status ApplyLocalSettings(VmConfig& from_source, const VmConfig& local);

// Checks a configuration without building anything (also used by the API before CreateVm).
// Fills defaults into `config` (serial mode, cmdline).
absl::Status ValidateAndDefaultConfig(VmConfig& config);

// Test hook: kernel VFIO devices (VmConfig.vfio) are opened through `sys` (a fake kernel)
// instead of the real system calls; nullptr restores them. Set before Vm::Create; `sys` must
// outlive the VMs created meanwhile.
void SetVfioSysForTesting(vfio::VfioSys* sys);

}  // namespace microvmm

#endif  // MICROVMM_VMM_VM_H_
