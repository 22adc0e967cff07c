// Regression test (bug fixed): BuildVcpuCpuid (vmm/boot/x86_setup.cc, case 0xb) only
// rewrites leaf 0xB subleaves that are already in the `supported` table. KVM_GET_SUPPORTED_CPUID
// reports leaf 0xB with subleaf 0 only (KVM zeroes EAX/EBX/ECX of 0xB/0x1F, "no topology", and
// stops enumerating subleaves at the first zero level type) -- verified on the CI host's
// /dev/kvm. So in real VMs the "level 1 = core" subleaf the code means to provide never exists:
// the guest sees CPUID.(0xB,1) as an invalid level, i.e. N one-core packages, contradicting leaf 4
// EAX[31:26] (N cores per package) and leaf 1 EBX[23:16] (N logical CPUs per package).
// Expected: the vCPU table contains a core-level subleaf 1 (and an invalid-level subleaf 2)
// regardless of which 0xB subleaves the host reported.
#include <cstdint>
#include <vector>

#include "gtest/gtest.h"
#include "vmm/boot/x86_setup.h"
#include "vmm/kvm/kvm.h"

namespace microvmm {
namespace {

kvm_cpuid_entry2 Leaf(uint32_t fn, uint32_t idx, uint32_t flags, uint32_t a, uint32_t b,
                      uint32_t c, uint32_t d) {
  kvm_cpuid_entry2 e{};
  e.function = fn;
  e.index = idx;
  e.flags = flags;
  e.eax = a;
  e.ebx = b;
  e.ecx = c;
  e.edx = d;
  return e;
}

TEST(BuildVcpuCpuidKvmShapeTest, CoreLevelPresentWhenKvmReportsOnlySubleafZero) {
  constexpr uint32_t kSig = KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
  // Shape of KVM_GET_SUPPORTED_CPUID on an Intel host (values as KVM reports them).
  CpuidTable supported({
      Leaf(0x0, 0, 0, 0x20, 0x756e6547, 0x6c65746e, 0x49656e69),
      Leaf(0x1, 0, 0, 0xa0678, 0x01020800, 0x81202000, 0x0f8bfbff),
      Leaf(0x4, 0, kSig, 0x04000121, 0x02c0003f, 0x3f, 0),
      Leaf(0x4, 1, kSig, 0, 0, 0, 0),
      Leaf(0xb, 0, kSig, 0, 0, 0, 1),  // the only 0xB subleaf KVM returns
  });
  CpuidTable out = BuildVcpuCpuid(supported, 1, 4);
  const kvm_cpuid_entry2* core = out.Find(0xb, 1);
  ASSERT_NE(core, nullptr) << "no CPUID.(EAX=0xB,ECX=1) core level for a 4-vCPU guest";
  EXPECT_EQ((core->ecx >> 8) & 0xff, 2u) << "level type core";
  EXPECT_EQ(core->ebx & 0xffff, 4u);
  EXPECT_EQ(core->eax & 0x1f, 2u);
  EXPECT_EQ(core->edx, 1u);
}

}  // namespace
}  // namespace microvmm
