#include "devices/legacy/serial.h"

#include <errno.h>
#include <unistd.h>

namespace microvmm {
namespace {
// Register offsets.
constexpr uint8_t kData = 0, kIer = 1, kIir = 2, kLcr = 3, kMcr = 4, kLsr = 5, kMsr = 6, kScr = 7;
constexpr uint8_t kLcrDlab = 0x80;
constexpr uint8_t kIerRda = 0x01, kIerThre = 0x02;
constexpr uint8_t kIirNone = 0x01, kIirThre = 0x02, kIirRda = 0x04, kIirFifo = 0xc0;
constexpr uint8_t kLsrDr = 0x01, kLsrThre = 0x20, kLsrTemt = 0x40;
constexpr uint8_t kMcrLoop = 0x10;
constexpr size_t kRxMax = 64 * 1024;
}  // namespace

Serial::Serial(std::function<void()> irq, ScopedFd out) : irq_(std::move(irq)), out_(std::move(out)) {}

void Serial::SetTap(std::function<void(uint8_t)> tap) {
  std::lock_guard lock(mu_);
  tap_ = std::move(tap);
}

void Serial::QueueInput(std::span<const uint8_t> bytes) {
  bool raise = false;
  {
    std::lock_guard lock(mu_);
    for (uint8_t b : bytes)
      if (rx_.size() < kRxMax) rx_.push_back(b);
    raise = (ier_ & kIerRda) && !rx_.empty();
  }
  if (raise) irq_();
}

bool Serial::InterruptPending() const {
  return ((ier_ & kIerRda) && !rx_.empty()) || ((ier_ & kIerThre) && thri_pending_);
}

void Serial::Transmit(uint8_t byte) {
  if (tap_) tap_(byte);
  if (!out_.valid()) return;
  for (;;) {
    ssize_t n = ::write(out_.get(), &byte, 1);
    if (n == 1 || (n < 0 && errno != EINTR)) break;  // a broken sink drops output, never blocks the guest forever
  }
}

uint8_t Serial::ReadReg(uint8_t reg) {
  switch (reg) {
    case kData:
      if (lcr_ & kLcrDlab) return dll_;
      if (rx_.empty()) return 0;
      {
        uint8_t b = rx_.front();
        rx_.pop_front();
        return b;
      }
    case kIer:
      return (lcr_ & kLcrDlab) ? dlm_ : ier_;
    case kIir: {
      uint8_t fifo = (fcr_ & 1) ? kIirFifo : 0;
      if ((ier_ & kIerRda) && !rx_.empty()) return kIirRda | fifo;
      if ((ier_ & kIerThre) && thri_pending_) {
        thri_pending_ = false;  // reading IIR clears the THRE interrupt
        return kIirThre | fifo;
      }
      return kIirNone | fifo;
    }
    case kLcr:
      return lcr_;
    case kMcr:
      return mcr_;
    case kLsr:
      return kLsrThre | kLsrTemt | (rx_.empty() ? 0 : kLsrDr);
    case kMsr:
      if (mcr_ & kMcrLoop) {
        // Loopback: RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD.
        return static_cast<uint8_t>(((mcr_ & 0x02) << 3) | ((mcr_ & 0x01) << 5) |
                                    ((mcr_ & 0x04) << 4) | ((mcr_ & 0x08) << 4));
      }
      return msr_;
    case kScr:
      return scr_;
  }
  return 0xff;
}

bool Serial::WriteReg(uint8_t reg, uint8_t v) {
  switch (reg) {
    case kData:
      if (lcr_ & kLcrDlab) {
        dll_ = v;
        return false;
      }
      if (mcr_ & kMcrLoop) {
        if (rx_.size() < kRxMax) rx_.push_back(v);
      } else {
        Transmit(v);
      }
      thri_pending_ = true;  // transmission is instantaneous
      return InterruptPending();
    case kIer:
      if (lcr_ & kLcrDlab) {
        dlm_ = v;
        return false;
      } else {
        bool was_thre = ier_ & kIerThre;
        ier_ = v & 0x0f;
        if (!was_thre && (ier_ & kIerThre)) thri_pending_ = true;
        return InterruptPending();
      }
    case kIir:
      fcr_ = v;
      if (v & 0x02) rx_.clear();
      return false;
    case kLcr:
      lcr_ = v;
      return false;
    case kMcr:
      mcr_ = v & 0x1f;
      return false;
    case kScr:
      scr_ = v;
      return false;
    default:
      return false;  // LSR/MSR are read-only
  }
}

SerialState Serial::SaveState() {
  std::lock_guard lock(mu_);
  SerialState st;
  st.set_ier(ier_);
  st.set_lcr(lcr_);
  st.set_mcr(mcr_);
  st.set_scr(scr_);
  st.set_dll(dll_);
  st.set_dlm(dlm_);
  st.set_fcr(fcr_);
  st.set_msr(msr_);
  st.set_thri_pending(thri_pending_);
  st.set_rx(std::string(rx_.begin(), rx_.end()));
  return st;
}

void Serial::RestoreState(const SerialState& st) {
  std::lock_guard lock(mu_);
  ier_ = st.ier() & 0x0f;
  lcr_ = st.lcr() & 0xff;
  mcr_ = st.mcr() & 0x1f;
  scr_ = st.scr() & 0xff;
  dll_ = st.dll() & 0xff;
  dlm_ = st.dlm() & 0xff;
  fcr_ = st.fcr() & 0xff;
  msr_ = st.msr() & 0xff;
  thri_pending_ = st.thri_pending();
  rx_.assign(st.rx().begin(), st.rx().begin() + std::min(st.rx().size(), kRxMax));
}

void Serial::Read(uint64_t offset, std::span<uint8_t> data) {
  std::lock_guard lock(mu_);
  for (size_t i = 0; i < data.size(); ++i) data[i] = ReadReg((offset + i) & 7);
}

void Serial::Write(uint64_t offset, std::span<const uint8_t> data) {
  bool raise = false;
  {
    std::lock_guard lock(mu_);
    for (size_t i = 0; i < data.size(); ++i) raise |= WriteReg((offset + i) & 7, data[i]);
  }
  if (raise) irq_();
}

}  // namespace microvmm
