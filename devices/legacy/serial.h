// 16550A-compatible UART (what Linux's 8250 driver expects at 0x3f8/IRQ 4): transmit to a sink
// fd, receive from QueueInput(), THRE/RDA interrupts, FIFO bits, loopback for the driver's probe.
#ifndef MICROVMM_DEVICES_LEGACY_SERIAL_H_
#define MICROVMM_DEVICES_LEGACY_SERIAL_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <span>
#include <string>

#include "devices/legacy/legacy_state.pb.h"
#include "vmm/base/fd.h"
#include "vmm/bus.h"

namespace microvmm {

class Serial : public BusDevice {
 public:
  // `irq` raises an edge on the UART's interrupt line. `out` receives transmitted bytes
  // (invalid fd = discard). `tap`, if set, also sees every transmitted byte (tests, logging).
  Serial(std::function<void()> irq, ScopedFd out);

  void Read(uint64_t offset, std::span<uint8_t> data) override;
  void Write(uint64_t offset, std::span<const uint8_t> data) override;

  // Bytes for the guest to receive.
  void QueueInput(std::span<const uint8_t> bytes);
  void SetTap(std::function<void(uint8_t)> tap);

  SerialState SaveState();
  void RestoreState(const SerialState& state);

 private:
  uint8_t ReadReg(uint8_t reg);
  // Returns true if the interrupt line should be pulsed.
  bool WriteReg(uint8_t reg, uint8_t value);
  bool InterruptPending() const;
  void Transmit(uint8_t byte);

  std::function<void()> irq_;
  ScopedFd out_;
  std::function<void(uint8_t)> tap_;
  std::mutex mu_;
  std::deque<uint8_t> rx_;
  uint8_t ier_ = 0, lcr_ = 0, mcr_ = 0x08, scr_ = 0, dll_ = 0x0c, dlm_ = 0, fcr_ = 0;
  uint8_t msr_ = 0xb0;  // DCD | DSR | CTS
  bool thri_pending_ = false;
  std::string line_buf_;
};

}  // namespace microvmm

#endif  // MICROVMM_DEVICES_LEGACY_SERIAL_H_
