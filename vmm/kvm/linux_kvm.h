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

#undef __DECLARE_FLEX_ARRAY
#define __DECLARE_FLEX_ARRAY(TYPE, NAME) TYPE NAME[0]

#include <linux/kvm.h>

static_assert(sizeof(struct kvm_cpuid2) == 8, "kvm_cpuid2 layout differs from the C ABI");
static_assert(sizeof(struct kvm_msrs) == 8, "kvm_msrs layout differs from the C ABI");
static_assert(sizeof(struct kvm_msr_list) == 4, "kvm_msr_list layout differs from the C ABI");
static_assert(sizeof(struct kvm_irq_routing) == 8, "kvm_irq_routing layout differs from the C ABI");

#endif  // MICROVMM_VMM_KVM_LINUX_KVM_H_
