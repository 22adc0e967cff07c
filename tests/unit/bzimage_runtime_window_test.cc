// Regression test (bug fixed): vmm/boot/linux_loader.cc LoadBzImage computes the memory the
// kernel needs as [0x100000, 0x100000 + init_size) ("kernel_end = load + max(init_size,
// payload)"), both for the "guest RAM too small" check and as the lower bound for the initrd
// (PlaceInitrd(..., kernel_end)). Documentation/arch/x86/boot.rst (field init_size) defines the
// window as [runtime_start, runtime_start + init_size) with
//   if (relocatable_kernel) { if (load_address < pref_address) load_address = pref_address;
//                             runtime_start = align_up(load_address, kernel_alignment); }
//   else runtime_start = pref_address;
// x86_64 kernels have pref_address = LOAD_PHYSICAL_ADDR (16 MiB by default), and the
// decompressor copies itself to the top of that window before it has looked at the memory map.
// With the loader at 1 MiB the real window starts at 16 MiB, so the loader
//  * accepts guests up to ~15 MiB too small for the kernel, and
//  * can place the initrd inside the window, where decompression overwrites it.
#include "vmm/kvm/linux_kvm.h"  // before any linux header

#include <asm/bootparam.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "gtest/gtest.h"
#include "vmm/boot/linux_loader.h"
#include "vmm/memory/guest_memory.h"

namespace microvmm {
namespace {

constexpr uint64_t kMiB = 1ULL << 20;

std::vector<uint8_t> MakeBzImage(uint32_t init_size, uint64_t pref_address, bool relocatable) {
  constexpr size_t kSetup = 5 * 512, kPayload = 8192;
  std::vector<uint8_t> f(kSetup + kPayload, 0x90);
  setup_header h;
  std::memset(&h, 0, sizeof(h));
  h.setup_sects = 4;
  h.boot_flag = 0xAA55;
  h.jump = static_cast<uint16_t>(
      0xEB | ((offsetof(boot_params, hdr) + sizeof(setup_header) - 0x202) << 8));
  h.header = 0x53726448;
  h.version = 0x020f;
  h.loadflags = LOADED_HIGH;
  h.xloadflags = XLF_KERNEL_64;
  h.syssize = kPayload / 16;
  h.init_size = init_size;
  h.cmdline_size = 2047;
  h.initrd_addr_max = 0x7fffffff;
  h.kernel_alignment = 0x200000;
  h.relocatable_kernel = relocatable;
  h.pref_address = pref_address;
  std::memcpy(f.data() + offsetof(boot_params, hdr), &h, sizeof(h));
  return f;
}

TEST(BzImageRuntimeWindowTest, InitrdNotInsideKernelWindow) {
  auto mem = GuestMemory::Create(64 * kMiB);
  ASSERT_TRUE(mem.ok());
  // Relocatable, pref_address 16 MiB: window [16 MiB, 56 MiB). 10 MiB of initrd cannot go above
  // 56 MiB in a 64 MiB guest, so the load must fail (or at least not overlap the window).
  std::vector<uint8_t> kernel = MakeBzImage(40 * kMiB, 16 * kMiB, true);
  std::vector<uint8_t> initrd(10 * kMiB, 0x42);
  auto e = LoadLinux(**mem, LinuxBootSpec{kernel, initrd, ""});
  if (e.ok()) {
    auto bp = (*mem)->ReadObj<boot_params>(0x7000);
    ASSERT_TRUE(bp.ok());
    EXPECT_GE(uint64_t{bp->hdr.ramdisk_image}, 56 * kMiB)
        << "initrd at 0x" << std::hex << bp->hdr.ramdisk_image
        << " overlaps the kernel's init_size window [0x1000000, 0x3800000)";
  }
}

TEST(BzImageRuntimeWindowTest, RamTooSmallForWindowRejected) {
  auto mem = GuestMemory::Create(64 * kMiB);
  ASSERT_TRUE(mem.ok());
  // Relocatable: needs [16 MiB, 76 MiB) but the guest has 64 MiB.
  std::vector<uint8_t> kernel = MakeBzImage(60 * kMiB, 16 * kMiB, true);
  auto e = LoadLinux(**mem, LinuxBootSpec{kernel, {}, ""});
  EXPECT_EQ(e.status().code(), absl::StatusCode::kInvalidArgument) << "accepted";
  // Non-relocatable, pref_address 32 MiB: needs [32 MiB, 72 MiB).
  kernel = MakeBzImage(40 * kMiB, 32 * kMiB, false);
  e = LoadLinux(**mem, LinuxBootSpec{kernel, {}, ""});
  EXPECT_EQ(e.status().code(), absl::StatusCode::kInvalidArgument) << "accepted";
}

}  // namespace
}  // namespace microvmm
