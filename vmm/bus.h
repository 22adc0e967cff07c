// Address-range dispatch for port I/O and MMIO exits.
#ifndef MICROVMM_VMM_BUS_H_
#define MICROVMM_VMM_BUS_H_

#include <cstdint>
#include <map>
#include <memory>
#include <shared_mutex>
#include <span>

#include "absl/status/status.h"

namespace microvmm {

class BusDevice {
 public:
  virtual ~BusDevice() = default;
  // `offset` is relative to the base the device was inserted at. `data.size()` is 1, 2, 4 or 8.
  virtual void Read(uint64_t offset, std::span<uint8_t> data) = 0;
  virtual void Write(uint64_t offset, std::span<const uint8_t> data) = 0;
};

class Bus {
 public:
  explicit Bus(const char* name) : name_(name) {}
  // Fails if [base, base+len) overlaps an existing range.
  absl::Status Insert(std::shared_ptr<BusDevice> dev, uint64_t base, uint64_t len);
  // False if no device claims `addr` (reads are then filled with 0xff).
  bool Read(uint64_t addr, std::span<uint8_t> data) const;
  bool Write(uint64_t addr, std::span<const uint8_t> data) const;

 private:
  struct Range {
    uint64_t len;
    std::shared_ptr<BusDevice> dev;
  };
  const std::pair<const uint64_t, Range>* Find(uint64_t addr) const;

  const char* name_;
  mutable std::shared_mutex mu_;
  std::map<uint64_t, Range> ranges_;  // base -> range
};

}  // namespace microvmm

#endif  // MICROVMM_VMM_BUS_H_
