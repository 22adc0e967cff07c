#include "devices/legacy/i8042.h"

#include <algorithm>
#include <string>

namespace microvmm {
namespace {
constexpr uint8_t kStatusOutputFull = 0x01;
constexpr uint8_t kStatusSystemFlag = 0x04;
constexpr uint8_t kStatusCommand = 0x08;
}  // namespace

void I8042::Read(uint64_t offset, std::span<uint8_t> data) {
  std::lock_guard lock(mu_);
  uint8_t v = 0;
  if (offset == 0) {
    if (!out_.empty()) {
      v = out_.front();
      out_.pop_front();
    }
  } else if (offset == 4) {
    v = kStatusSystemFlag | kStatusCommand | (out_.empty() ? 0 : kStatusOutputFull);
  } else {
    v = 0xff;  // 0x61..0x63 are not ours
  }
  for (auto& b : data) b = v;
}

void I8042::Write(uint64_t offset, std::span<const uint8_t> data) {
  if (data.empty()) return;
  uint8_t v = data[0];
  bool reset = false;
  {
    std::lock_guard lock(mu_);
    if (offset == 4) {
      pending_cmd_ = 0;
      switch (v) {
        case 0x20: out_.push_back(ctr_); break;           // read configuration byte
        case 0x60: case 0xd1: case 0xd2: case 0xd3: case 0xd4:
          pending_cmd_ = v;                                // data byte follows on port 0x60
          break;
        case 0xaa: out_.push_back(0x55); break;            // controller self test: passed
        case 0xa9: case 0xab: out_.push_back(0x00); break; // port tests: passed
        case 0xfe: reset = true; break;                    // pulse reset line
        default: break;                                    // enable/disable ports etc.
      }
    } else if (offset == 0) {
      if (pending_cmd_ == 0x60) {
        ctr_ = v;
      } else if (pending_cmd_ == 0xd2 || pending_cmd_ == 0xd3) {
        out_.push_back(v);                                 // write keyboard/AUX output buffer: echo
      } else if (pending_cmd_ == 0xd1) {
        if (!(v & 1)) reset = true;                        // output port bit 0 low = reset
      } else if (pending_cmd_ == 0) {
        out_.push_back(0xfa);                              // keyboard command: ACK
      }
      pending_cmd_ = 0;
    }
  }
  if (reset) reset_();
}

}  // namespace microvmm

namespace microvmm {

I8042State I8042::SaveState() {
  std::lock_guard lock(mu_);
  I8042State st;
  st.set_out(std::string(out_.begin(), out_.end()));
  st.set_ctr(ctr_);
  st.set_pending_cmd(pending_cmd_);
  return st;
}

void I8042::RestoreState(const I8042State& st) {
  std::lock_guard lock(mu_);
  out_.assign(st.out().begin(), st.out().begin() + std::min<size_t>(st.out().size(), 16));
  ctr_ = st.ctr() & 0xff;
  pending_cmd_ = st.pending_cmd() & 0xff;
}

}  // namespace microvmm
