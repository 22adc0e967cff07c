// Command-line specs of devices, shared by `vmm` and `vmmctl create`:
//   --disk  path=FILE[,ro][,direct][,serial=STR][,engine=io_uring|sync]   (repeatable)
//   --net   tap=NAME[,mac=52:54:00:12:34:56]                              (repeatable)
//   --balloon [target=SIZE][,deflate-on-oom][,reporting][,hinting][,stats=SECONDS]  ("on": defaults)
//   --vsock cid=N,uds=PATH
//   --vfio-user [socket=]PATH                                              (repeatable)
//   --vfio [path=]/sys/bus/pci/devices/DDDD:BB:DD.F                       (repeatable)
// SIZE as for --memory (MiB, or M/G suffix). The first field may omit its key (FILE / NAME).
// Only syntax is checked here; Vm creation validates the rest (files, taps, CIDs) before boot.
#ifndef MICROVMM_VMM_DEVICE_SPEC_H_
#define MICROVMM_VMM_DEVICE_SPEC_H_

#include <string>

#include "absl/status/statusor.h"
#include "proto/vm_config.pb.h"

namespace microvmm {

absl::StatusOr<DiskConfig> ParseDiskSpec(const std::string& spec);
absl::StatusOr<NetConfig> ParseNetSpec(const std::string& spec);
absl::StatusOr<BalloonConfig> ParseBalloonSpec(const std::string& spec);
absl::StatusOr<VsockConfig> ParseVsockSpec(const std::string& spec);
absl::StatusOr<VfioUserConfig> ParseVfioUserSpec(const std::string& spec);
absl::StatusOr<VfioConfig> ParseVfioSpec(const std::string& spec);

// Parses a memory size: "512" (MiB), "512M", "2G" into MiB. `flag` names it in errors.
absl::StatusOr<uint64_t> ParseSizeMib(const std::string& spec, const std::string& flag);

// Help text for the device flags (one block, aligned like the rest of --help).
const char* DeviceFlagsHelp();

}  // namespace microvmm

#endif  // MICROVMM_VMM_DEVICE_SPEC_H_
