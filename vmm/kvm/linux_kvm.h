// Include this instead of <linux/kvm.h>.
//
// The 6.1 uAPI headers declare flexible arrays with __DECLARE_FLEX_ARRAY, which wraps them in an
// anonymous struct holding an empty struct. In C that empty struct has size 0; in C++ it has
// size 1, which shifts `entries` of kvm_cpuid2 / kvm_msrs / ... and changes the size encoded in
// their ioctl numbers (KVM then answers EINVAL). Redefine the macro as a plain flexible array
// before <linux/kvm.h> is seen.
#ifndef MICROVMM_VMM_KVM_LINUX_KVM_H_
#define MICROVMM_VMM_KVM_LINUX_KVM_H_

#include <linux/stddef.h>
#include <stddef.h>

#undef __DECLARE_FLEX_ARRAY
#define __DECLARE_FLEX_ARRAY(TYPE, NAME) TYPE NAME[0]

#include <linux/kvm.h>

static_assert(sizeof(struct kvm_cpuid2) == 8, "kvm_cpuid2 layout differs from the C ABI");
static_assert(sizeof(struct kvm_msrs) == 8, "kvm_msrs layout differs from the C ABI");
static_assert(sizeof(struct kvm_msr_list) == 4, "kvm_msr_list layout differs from the C ABI");
static_assert(sizeof(struct kvm_irq_routing) == 8, "kvm_irq_routing layout differs from the C ABI");

// ---- Constants and structs newer than the 6.1 uAPI headers. ----
// Values from upstream include/uapi/linux/kvm.h (6.8+), guarded so newer headers win.
#ifndef KVM_EXIT_MEMORY_FAULT
#define KVM_EXIT_MEMORY_FAULT 39
#endif
#ifndef KVM_MEMORY_EXIT_FLAG_PRIVATE
#define KVM_MEMORY_EXIT_FLAG_PRIVATE (1ULL << 3)
#endif
#ifndef KVM_CAP_USER_MEMORY2
#define KVM_CAP_USER_MEMORY2 231
#endif
#ifndef KVM_CAP_MEMORY_FAULT_INFO
#define KVM_CAP_MEMORY_FAULT_INFO 232
#endif
#ifndef KVM_MEM_GUEST_MEMFD
#define KVM_MEM_GUEST_MEMFD (1UL << 2)
#endif

// "KVM Userfault" (James Houghton's series, not merged): a memslot flag, a bitmap pointer in one
// of the reserved u64s of kvm_userspace_memory_region2 (one bit per page, bit i = gpa +
// i * 4 KiB, in an array of unsigned long; set = vCPU access exits), and a memory-fault exit flag.
// The flag/bit values were the same in v1 and v2; the capability number was not, so the project
// probes by behaviour (ProbeKvmUserfault) and never by cap number.
#ifndef KVM_MEM_USERFAULT
#define KVM_MEM_USERFAULT (1UL << 3)
#endif
#ifndef KVM_MEMORY_EXIT_FLAG_USERFAULT
#define KVM_MEMORY_EXIT_FLAG_USERFAULT (1ULL << 4)
#endif

// struct kvm_userspace_memory_region2 as the userfault patches lay it out (upstream has pad2[14]
// in place of userfault_bitmap + pad2[13]; same size, so the same ioctl number).
struct kvm_userspace_memory_region2_uf {
  __u32 slot;
  __u32 flags;
  __u64 guest_phys_addr;
  __u64 memory_size;
  __u64 userspace_addr;
  __u64 guest_memfd_offset;
  __u32 guest_memfd;
  __u32 pad1;
  __u64 userfault_bitmap;
  __u64 pad2[13];
};
static_assert(sizeof(struct kvm_userspace_memory_region2_uf) == 160,
              "kvm_userspace_memory_region2 is 160 bytes in the uAPI");
#define MICROVMM_KVM_SET_USER_MEMORY_REGION2 \
  _IOW(KVMIO, 0x49, struct kvm_userspace_memory_region2_uf)

// kvm_run.memory_fault (KVM_EXIT_MEMORY_FAULT): the first bytes of kvm_run's exit union, which
// the 6.1 headers do not name. KVM reports this exit with KVM_RUN returning -1/EFAULT (or
// EHWPOISON), not 0; exit_reason is stale for every other errno.
struct kvm_memory_fault_exit {
  __u64 flags;
  __u64 gpa;
  __u64 size;
};
static_assert(offsetof(struct kvm_run, padding) == offsetof(struct kvm_run, mmio),
              "kvm_run exit union layout");
inline struct kvm_memory_fault_exit* KvmRunMemoryFault(struct kvm_run* run) {
  return reinterpret_cast<struct kvm_memory_fault_exit*>(run->padding);
}

#endif  // MICROVMM_VMM_KVM_LINUX_KVM_H_
