#include "vmm/bus.h"

#include <cstring>
#include <mutex>

#include "absl/strings/str_format.h"

namespace microvmm {

absl::Status Bus::Insert(std::shared_ptr<BusDevice> dev, uint64_t base, uint64_t len) {
  if (len == 0 || base + len < base)
    return absl::InvalidArgumentError(absl::StrFormat("%s bus: bad range 0x%x+0x%x", name_, base, len));
  std::unique_lock lock(mu_);
  auto next = ranges_.lower_bound(base);
  if (next != ranges_.end() && next->first < base + len)
    return absl::AlreadyExistsError(
        absl::StrFormat("%s bus: range 0x%x+0x%x overlaps 0x%x", name_, base, len, next->first));
  if (next != ranges_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second.len > base)
      return absl::AlreadyExistsError(absl::StrFormat(
          "%s bus: range 0x%x+0x%x overlaps 0x%x", name_, base, len, prev->first));
  }
  ranges_.emplace(base, Range{len, std::move(dev)});
  return absl::OkStatus();
}

const std::pair<const uint64_t, Bus::Range>* Bus::Find(uint64_t addr) const {
  auto it = ranges_.upper_bound(addr);
  if (it == ranges_.begin()) return nullptr;
  --it;
  if (addr - it->first >= it->second.len) return nullptr;
  return &*it;
}

bool Bus::Read(uint64_t addr, std::span<uint8_t> data) const {
  std::shared_ptr<BusDevice> dev;
  uint64_t offset = 0;
  {
    std::shared_lock lock(mu_);
    const auto* r = Find(addr);
    if (r != nullptr) {
      dev = r->second.dev;
      offset = addr - r->first;
    }
  }
  if (!dev) {
    std::memset(data.data(), 0xff, data.size());
    return false;
  }
  dev->Read(offset, data);
  return true;
}

bool Bus::Write(uint64_t addr, std::span<const uint8_t> data) const {
  std::shared_ptr<BusDevice> dev;
  uint64_t offset = 0;
  {
    std::shared_lock lock(mu_);
    const auto* r = Find(addr);
    if (r != nullptr) {
      dev = r->second.dev;
      offset = addr - r->first;
    }
  }
  if (!dev) return false;
  dev->Write(offset, data);
  return true;
}

}  // namespace microvmm
