#include "vmm/pci/ioeventfd.h"

#include "absl/strings/str_format.h"
#include "vmm/base/log.h"

namespace microvmm::pci {

absl::StatusOr<std::unique_ptr<IoEventFd>> IoEventFd::Create(KvmVm& vm, const Options& o) {
  if (o.len != 0 && o.len != 1 && o.len != 2 && o.len != 4 && o.len != 8)
    return absl::InvalidArgumentError(absl::StrFormat("ioeventfd length %d", o.len));
  if (o.len == 0 && (o.pio || o.datamatch.has_value()))
    return absl::InvalidArgumentError("ioeventfd length 0 is for MMIO without datamatch only");
  auto ev = EventFd::Create();
  if (!ev.ok()) return ev.status();
  if (absl::Status s = vm.AssignIoeventfd(ev->fd(), o.addr, o.len, o.pio, o.datamatch); !s.ok())
    return s;
  return std::unique_ptr<IoEventFd>(new IoEventFd(vm, std::move(*ev), o));
}

IoEventFd::~IoEventFd() {
  if (absl::Status s = vm_.DeassignIoeventfd(event_.fd(), options_.addr, options_.len,
                                             options_.pio, options_.datamatch);
      !s.ok())
    LOG_WARN("%s", s.message());
}

absl::Status IoEventFd::Move(uint64_t addr) {
  if (addr == options_.addr) return absl::OkStatus();
  const Options& o = options_;
  if (absl::Status s = vm_.DeassignIoeventfd(event_.fd(), o.addr, o.len, o.pio, o.datamatch);
      !s.ok())
    return s;
  if (absl::Status s = vm_.AssignIoeventfd(event_.fd(), addr, o.len, o.pio, o.datamatch); !s.ok()) {
    if (absl::Status r = vm_.AssignIoeventfd(event_.fd(), o.addr, o.len, o.pio, o.datamatch);
        !r.ok())
      LOG_ERROR("ioeventfd at 0x%x lost: %s", o.addr, r.message());
    return s;
  }
  options_.addr = addr;
  return absl::OkStatus();
}

}  // namespace microvmm::pci
