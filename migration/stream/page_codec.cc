#include "migration/stream/page_codec.h"

#include <cstring>

#include "absl/strings/str_format.h"

namespace microvmm::migration {

bool IsZeroPage(const uint8_t* page) {
  const uint64_t* w = reinterpret_cast<const uint64_t*>(page);
  for (size_t i = 0; i < kPageSize / 8; i += 8) {
    if ((w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7]) != 0)
      return false;
  }
  return true;
}

uint64_t EncodeZeroPage(uint64_t gpa, PageRecord* rec) {
  rec->set_gpa(gpa);
  rec->set_codec(ZERO);
  return 12;
}

uint64_t EncodePage(uint64_t gpa, const uint8_t* page, PageRecord* rec) {
  if (IsZeroPage(page)) return EncodeZeroPage(gpa, rec);
  rec->set_gpa(gpa);
  rec->set_codec(RAW);
  rec->set_data(page, kPageSize);
  return 12 + kPageSize;
}

ReceivedPages::ReceivedPages(const GuestMemory& mem) {
  for (const auto& r : mem.regions()) {
    uint64_t words = (r.size / kPageSize + 63) / 64;
    Region reg{r.gpa, r.size, std::unique_ptr<std::atomic<uint64_t>[]>(new std::atomic<uint64_t>[words])};
    for (uint64_t i = 0; i < words; ++i) reg.bits[i].store(0, std::memory_order_relaxed);
    regions_.push_back(std::move(reg));
  }
}

bool ReceivedPages::Test(uint64_t gpa) const {
  for (const auto& r : regions_)
    if (gpa >= r.gpa && gpa - r.gpa < r.size) {
      uint64_t pg = (gpa - r.gpa) / kPageSize;
      return (r.bits[pg / 64].load(std::memory_order_relaxed) >> (pg % 64)) & 1;
    }
  return true;  // unknown: assume written (forces the store)
}

void ReceivedPages::Set(uint64_t gpa) {
  for (auto& r : regions_)
    if (gpa >= r.gpa && gpa - r.gpa < r.size) {
      uint64_t pg = (gpa - r.gpa) / kPageSize;
      r.bits[pg / 64].fetch_or(1ULL << (pg % 64), std::memory_order_relaxed);
      return;
    }
}

absl::Status DecodePageInto(const PageRecord& rec, GuestMemory& mem, ReceivedPages* received) {
  if (rec.gpa() % kPageSize != 0)
    return absl::InvalidArgumentError(absl::StrFormat("page record gpa 0x%x is not page aligned", rec.gpa()));
  auto p = mem.HostPtr(rec.gpa(), kPageSize);
  if (!p.ok())
    return absl::InvalidArgumentError(
        absl::StrFormat("page record gpa 0x%x is outside guest RAM", rec.gpa()));
  switch (rec.codec()) {
    case RAW:
      if (rec.data().size() != kPageSize)
        return absl::InvalidArgumentError(absl::StrFormat(
            "raw page 0x%x has %d bytes, expected %d", rec.gpa(), rec.data().size(), kPageSize));
      std::memcpy(*p, rec.data().data(), kPageSize);
      if (received != nullptr) received->Set(rec.gpa());
      return absl::OkStatus();
    case ZERO:
      if (!rec.data().empty())
        return absl::InvalidArgumentError(
            absl::StrFormat("zero page 0x%x carries %d bytes of data", rec.gpa(), rec.data().size()));
      if (received == nullptr || received->Test(rec.gpa())) std::memset(*p, 0, kPageSize);
      return absl::OkStatus();
    default:
      return absl::InvalidArgumentError(
          absl::StrFormat("page 0x%x has unknown codec %d", rec.gpa(), static_cast<int>(rec.codec())));
  }
}

}  // namespace microvmm::migration
