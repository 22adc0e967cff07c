#include "vmm/memory/guest_memory.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <sys/mman.h>
#include <unistd.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "vmm/kvm/kvm.h"

namespace microvmm {

std::vector<RamRange> RamLayout(uint64_t ram_bytes) {
  std::vector<RamRange> out;
  uint64_t low = std::min(ram_bytes, kMmioGapStart);
  if (low > 0) out.push_back({0, low});
  if (ram_bytes > low) out.push_back({kMmioGapEnd, ram_bytes - low});
  return out;
}

absl::StatusOr<std::unique_ptr<GuestMemory>> GuestMemory::Create(uint64_t ram_bytes) {
  constexpr uint64_t k2M = 2ULL << 20;
  if (ram_bytes == 0 || ram_bytes % k2M != 0)
    return absl::InvalidArgumentError(
        absl::StrCat("guest RAM size ", ram_bytes, " is not a non-zero multiple of 2 MiB"));
  std::unique_ptr<GuestMemory> mem(new GuestMemory());
  mem->ram_bytes_ = ram_bytes;
  int index = 0;
  for (const RamRange& r : RamLayout(ram_bytes)) {
    Region region;
    region.gpa = r.gpa;
    region.size = r.size;
    std::string name = absl::StrCat("guest-ram-", index++);
    region.memfd.reset(::memfd_create(name.c_str(), MFD_CLOEXEC));
    if (!region.memfd.valid()) return ErrnoStatus(errno, "memfd_create");
    if (::ftruncate(region.memfd.get(), r.size) < 0)
      return ErrnoStatus(errno, absl::StrCat("ftruncate guest RAM to ", r.size));
    void* p = ::mmap(nullptr, r.size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE,
                     region.memfd.get(), 0);
    if (p == MAP_FAILED) return ErrnoStatus(errno, "mmap guest RAM");
    region.mapping = ScopedMmap(p, r.size);
    region.host = static_cast<uint8_t*>(p);
    ::madvise(p, r.size, MADV_DONTDUMP);
    uint64_t words = (r.size / kPageSize + 63) / 64;
    region.dirty.reset(new std::atomic<uint64_t>[words]);
    for (uint64_t i = 0; i < words; ++i) region.dirty[i].store(0, std::memory_order_relaxed);
    mem->regions_.push_back(std::move(region));
  }
  return mem;
}

const GuestMemory::Region* GuestMemory::FindRegion(uint64_t gpa, uint64_t len) const {
  for (const Region& r : regions_) {
    if (gpa >= r.gpa && gpa < r.end() && len <= r.end() - gpa) return &r;
  }
  return nullptr;
}

bool GuestMemory::Contains(uint64_t gpa, uint64_t len) const {
  return FindRegion(gpa, len) != nullptr;
}

absl::StatusOr<uint8_t*> GuestMemory::HostPtr(uint64_t gpa, uint64_t len) const {
  const Region* r = FindRegion(gpa, len);
  if (r == nullptr)
    return absl::OutOfRangeError(
        absl::StrFormat("guest range [0x%x, +0x%x) is not inside guest RAM", gpa, len));
  return r->host + (gpa - r->gpa);
}

absl::Status GuestMemory::Read(uint64_t gpa, void* dst, uint64_t len) const {
  auto p = HostPtr(gpa, len);
  if (!p.ok()) return p.status();
  std::memcpy(dst, *p, len);
  return absl::OkStatus();
}

absl::Status GuestMemory::Write(uint64_t gpa, const void* src, uint64_t len) {
  auto p = HostPtr(gpa, len);
  if (!p.ok()) return p.status();
  std::memcpy(*p, src, len);
  MarkDirty(gpa, len);
  return absl::OkStatus();
}

absl::Status GuestMemory::Discard(uint64_t gpa, uint64_t len) {
  if (gpa % kPageSize != 0 || len % kPageSize != 0 || len == 0)
    return absl::InvalidArgumentError(
        absl::StrFormat("discard [0x%x, +0x%x): not page-aligned", gpa, len));
  const Region* r = FindRegion(gpa, len);
  if (r == nullptr)
    return absl::OutOfRangeError(
        absl::StrFormat("discard [0x%x, +0x%x): not inside one RAM region", gpa, len));
  if (::fallocate(r->memfd.get(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                  static_cast<off_t>(gpa - r->gpa), static_cast<off_t>(len)) != 0)
    return ErrnoStatus(errno, "fallocate(PUNCH_HOLE) on guest memory");
  MarkDirty(gpa, len);
  return absl::OkStatus();
}

void GuestMemory::MarkDirty(uint64_t gpa, uint64_t len) {
  if (len == 0) return;
  for (Region& r : regions_) {
    if (gpa + len <= r.gpa || gpa >= r.end()) continue;
    uint64_t start = std::max(gpa, r.gpa) - r.gpa;
    uint64_t end = std::min(gpa + len, r.end()) - r.gpa;
    for (uint64_t pg = start / kPageSize; pg <= (end - 1) / kPageSize; ++pg)
      r.dirty[pg / 64].fetch_or(1ULL << (pg % 64), std::memory_order_relaxed);
  }
}

bool GuestMemory::TestDirty(uint64_t gpa) const {
  const Region* r = FindRegion(gpa, 1);
  if (r == nullptr) return false;
  uint64_t pg = (gpa - r->gpa) / kPageSize;
  return (r->dirty[pg / 64].load(std::memory_order_relaxed) >> (pg % 64)) & 1;
}

std::vector<uint64_t> GuestMemory::TakeDirty(size_t index) {
  Region& r = regions_.at(index);
  uint64_t words = (r.size / kPageSize + 63) / 64;
  std::vector<uint64_t> out(words);
  for (uint64_t i = 0; i < words; ++i) out[i] = r.dirty[i].exchange(0, std::memory_order_relaxed);
  return out;
}

}  // namespace microvmm
