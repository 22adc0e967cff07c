// i8042 keyboard controller, only as much as Linux needs to probe it and to reset the machine
// through it (command 0xFE on port 0x64 -> reset callback; the VMM exits with status 0).
#ifndef MICROVMM_DEVICES_LEGACY_I8042_H_
#define MICROVMM_DEVICES_LEGACY_I8042_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>

#include "devices/legacy/legacy_state.pb.h"
#include "vmm/bus.h"

namespace microvmm {

// Insert at port 0x60 with length 5 (0x60..0x64): offset 0 = data, offset 4 = status/command.
class I8042 : public BusDevice {
 public:
  explicit I8042(std::function<void()> reset) : reset_(std::move(reset)) {}
  void Read(uint64_t offset, std::span<uint8_t> data) override;
  void Write(uint64_t offset, std::span<const uint8_t> data) override;

  I8042State SaveState();
  void RestoreState(const I8042State& state);

 private:
  std::function<void()> reset_;
  std::mutex mu_;
  std::deque<uint8_t> out_;
  uint8_t ctr_ = 0x47;        // controller configuration byte
  uint8_t pending_cmd_ = 0;   // command waiting for its data byte (0x60, 0xD1, 0xD4...)
};

}  // namespace microvmm

#endif  // MICROVMM_DEVICES_LEGACY_I8042_H_
