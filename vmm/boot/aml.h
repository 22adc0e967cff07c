// AML encoding (ACPI 6.0 §19.6 / §20): the terms the VMM's tables are built from. Shared by the
// DSDT (vmm/boot/acpi.cc) and the PCI hotplug objects (vmm/pci/hotplug.cc).
#ifndef MICROVMM_VMM_BOOT_AML_H_
#define MICROVMM_VMM_BOOT_AML_H_

#include <cstdint>
#include <initializer_list>
#include <string_view>
#include <vector>

namespace microvmm::aml {

using Bytes = std::vector<uint8_t>;

inline constexpr uint8_t kZeroOp = 0x00, kOneOp = 0x01, kNameOp = 0x08, kBytePrefix = 0x0A,
                         kWordPrefix = 0x0B, kDWordPrefix = 0x0C, kStringPrefix = 0x0D,
                         kQWordPrefix = 0x0E, kScopeOp = 0x10, kBufferOp = 0x11,
                         kPackageOp = 0x12, kMethodOp = 0x14, kDualNamePrefix = 0x2E,
                         kMultiNamePrefix = 0x2F, kExtOpPrefix = 0x5B, kRootChar = 0x5C,
                         kLocal0 = 0x60, kStoreOp = 0x70, kAndOp = 0x7B, kNotifyOp = 0x86,
                         kIfOp = 0xA0;
// After kExtOpPrefix.
inline constexpr uint8_t kOpRegionOp = 0x80, kFieldOp = 0x81, kDeviceOp = 0x82;

void Append(Bytes& b, const Bytes& more);
// PkgLength (§20.2.4) for a package whose contents after the PkgLength are `body` bytes. The
// encoded length includes the PkgLength bytes themselves. 1 byte up to 63; otherwise the lead
// byte's bits 7:6 give the number of extra bytes, its bits 3:0 the low nibble.
Bytes PkgLength(size_t body);
// Op PkgLength <head> <terms>: the layout of Scope, Device, Method, If, Field, Buffer.
Bytes Pkg(std::initializer_list<uint8_t> op, const Bytes& head, const Bytes& terms);
// The shortest integer encoding (ZeroOp, OneOp, Byte/Word/DWord/QWordConst).
Bytes Integer(uint64_t v);
// NameOp NameSeg DataRefObject. `seg` is a 4-character NameSeg, or "\" + NameSeg.
Bytes Name(std::string_view seg, const Bytes& data);
Bytes String(std::string_view s);  // StringPrefix AsciiCharList NullChar
Bytes Scope(std::string_view name, const Bytes& terms);
Bytes Device(std::string_view seg, const Bytes& terms);
// MethodOp PkgLength NameSeg MethodFlags(arg count; not serialized, sync level 0) TermList.
Bytes Method(std::string_view seg, uint8_t args, const Bytes& terms);
Bytes Store(const Bytes& src, const Bytes& dst);
Bytes Buffer(const Bytes& data);
// PackageOp PkgLength NumElements PackageElementList (§19.6.101; at most 255 elements).
Bytes Package(const std::vector<Bytes>& elements);
// Resource descriptors (§6.4): Buffer(descriptors + End Tag).
Bytes ResourceTemplate(Bytes descriptors);

}  // namespace microvmm::aml

#endif  // MICROVMM_VMM_BOOT_AML_H_
