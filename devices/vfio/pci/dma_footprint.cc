#include "devices/vfio/pci/dma_footprint.h"

#include <cstring>

#include "absl/strings/str_format.h"

namespace microvmm::vfio {

std::unique_ptr<DmaFootprint> FootprintFor(uint16_t vendor_id, uint16_t device_id) {
  if (vendor_id == 0x1234 && device_id == 0x11f0) return std::make_unique<TestDmaEngineFootprint>();
  return nullptr;
}

std::vector<DmaRange> TestDmaEngineFootprint::Ranges() const {
  const uint64_t src = regs_[0], dst = regs_[1], len = regs_[2], op = regs_[3];
  std::vector<DmaRange> out;
  // A DMA the device would refuse touches nothing; a wrapping range is refused the same way.
  if (len == 0 || len > kMaxLen) return out;
  if (dst + len >= dst) out.push_back({dst, len});
  if (op == kOpCopy && src + len >= src) out.push_back({src, len});
  return out;
}

std::vector<DmaRange> TestDmaEngineFootprint::AtRun() {
  std::lock_guard lock(mu_);
  return Ranges();
}

std::string TestDmaEngineFootprint::SaveState() const {
  std::lock_guard lock(mu_);
  return std::string(reinterpret_cast<const char*>(regs_), sizeof(regs_));
}

absl::Status TestDmaEngineFootprint::RestoreState(const std::string& data) {
  if (data.size() != sizeof(regs_))
    return absl::InvalidArgumentError(absl::StrFormat(
        "DMA model state of the 1234:11f0 DMA engine: %d bytes, expected %d", data.size(),
        sizeof(regs_)));
  std::lock_guard lock(mu_);
  std::memcpy(regs_, data.data(), sizeof(regs_));
  return absl::OkStatus();
}

std::vector<DmaRange> TestDmaEngineFootprint::OnBarWrite(int bar, uint64_t offset,
                                                         std::span<const uint8_t> data) {
  if (bar != 0) return {};
  std::lock_guard lock(mu_);
  if (offset == kDoorbell) return Ranges();
  // Registers are 64-bit; a 32-bit write updates its half.
  for (size_t i = 0; i < data.size(); ++i) {
    const uint64_t byte = offset + i;
    if (byte >= sizeof(regs_)) break;
    reinterpret_cast<uint8_t*>(regs_)[byte] = data[i];
  }
  return {};
}

}  // namespace microvmm::vfio
