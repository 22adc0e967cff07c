#include "vmm/cli.h"

#include <charconv>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "vmm/device_spec.h"

namespace microvmm {

std::string VmmUsage() {
  std::string u = R"(usage: vmm [FLAGS]

Runs one microVM on KVM. Give a guest (--kernel or --test-guest) to build and boot it at once,
and/or --api-socket to control the VMM over gRPC (service microvmm.Vmm; see vmmctl --help).

Guest:
  --kernel PATH          Linux bzImage (64-bit boot protocol) or PVH ELF vmlinux
  --initrd PATH          initramfs for the kernel
  --cmdline STRING       kernel command line (default: "console=ttyS0 reboot=k panic=1")
  --test-guest NAME      built-in freestanding test guest (hello, smp, memwalk, fault, idle) or a
                         path to a flat binary linked at 0x100000
  --test-guest-args STR  argument string for the test guest, e.g. "mib=8 gens=10"

Machine:
  --vcpus N              number of vCPUs (default 1, max 254; test guests max 64)
  --memory SIZE          guest RAM: MiB, or with suffix M/G (default 128; even number of MiB)
  --serial SPEC          where the 8250 console goes: stdout (default), file:PATH, none
  --prefill PATTERN      benchmarking aid: fill guest RAM above 16 MiB before boot with
                         random | half (every other page random) | zero
  --dirty-tracking MODE  how live migration finds written pages: auto (default: KVM dirty ring
                         if available, else bitmap), ring, bitmap

%DEVICES%
Migration:
  --incoming ADDR        instead of booting a guest, wait for a live migration on ADDR (unix
                         socket path, unix:PATH or HOST:PORT); the arriving VM then runs here.
                         --serial sets where its console goes; --disk/--net/--vsock, if given,
                         are this host's backends for the VM's disks/nets/vsock (same count and
                         order; the guest-visible settings come from the source). A VM with
                         passthrough devices needs one --vfio-user SOCKET (its own device
                         server here) / --vfio PATH per device, in the source's order. Exit 75
                         if the migration fails.
                         (The source side is the API call StartMigration: vmmctl migrate.)

Control:
  --api-socket PATH      serve the gRPC control API on this unix socket (also unix:PATH,
                         unix-abstract:NAME, HOST:PORT). With an API socket the process stays up
                         after the guest exits (GetInfo reports why) until a Shutdown call,
                         SIGINT or SIGTERM; without one it exits with the guest.
  --tls-cert PEM --tls-key PEM --tls-ca PEM
                         mutual TLS (all three together): migration listeners and a TCP API
                         listener require client certificates signed by the CA; outgoing
                         migrations present this certificate and verify the destination. A unix
                         API socket stays plain (protected by file permissions).
  --log-level LEVEL      debug, info (default), warn, error
  -h, --help             this text

Exit status: 0 guest shutdown/reset, shutdown requested, or VM migrated away; 1 bad command line or configuration;
the test guest's status (1..63) for a test-exit; 70 VMM run-time error; 71 guest crash (triple
fault); 72 KVM internal error or failed entry (register dump in the log); 73 guest panic (pvpanic);
75 incoming migration failed (nothing ran here).
)";
  size_t at = u.find("%DEVICES%\n");
  u.replace(at, 10, DeviceFlagsHelp());
  return u;
}

absl::StatusOr<SerialConfig> ParseSerialSpec(const std::string& spec) {
  SerialConfig s;
  if (spec == "stdout") {
    s.set_mode(SerialConfig::STDOUT);
  } else if (spec == "none") {
    s.set_mode(SerialConfig::NONE);
  } else if (absl::StartsWith(spec, "file:") && spec.size() > 5) {
    s.set_mode(SerialConfig::FILE);
    s.set_path(spec.substr(5));
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("bad --serial '", spec, "': expected stdout, none or file:PATH"));
  }
  return s;
}

absl::StatusOr<uint64_t> ParseMemoryMib(const std::string& spec) {
  return ParseSizeMib(spec, "--memory");
}

absl::StatusOr<VmmOptions> ParseVmmArgs(const std::vector<std::string>& args) {
  VmmOptions o;
  o.config.set_vcpus(1);
  o.config.set_memory_mib(128);
  o.config.mutable_serial()->set_mode(SerialConfig::STDOUT);
  for (size_t i = 0; i < args.size(); ++i) {
    std::string flag = args[i];
    std::string value;
    bool inline_value = false;
    if (flag == "-h" || flag == "--help") {
      o.help = true;
      continue;
    }
    if (flag == "--rng") {
      o.config.set_rng(true);
      continue;
    }
    if (!absl::StartsWith(flag, "--"))
      return absl::InvalidArgumentError(absl::StrCat("unexpected argument '", flag, "'"));
    if (size_t eq = flag.find('='); eq != std::string::npos) {
      value = flag.substr(eq + 1);
      flag = flag.substr(0, eq);
      inline_value = true;
    }
    auto need = [&]() -> absl::Status {
      if (inline_value) return absl::OkStatus();
      if (i + 1 >= args.size())
        return absl::InvalidArgumentError(absl::StrCat(flag, " needs a value"));
      value = args[++i];
      return absl::OkStatus();
    };
    static const char* kKnown[] = {"--kernel", "--initrd", "--cmdline", "--test-guest",
                                   "--test-guest-args", "--vcpus", "--memory", "--serial",
                                   "--api-socket", "--log-level", "--incoming",
                                   "--dirty-tracking", "--prefill", "--tls-cert", "--tls-key", "--tls-ca",
                                   "--disk", "--net", "--balloon", "--vsock", "--vfio-user",
                                   "--vfio"};
    bool known = false;
    for (const char* k : kKnown) known |= flag == k;
    if (!known)
      return absl::InvalidArgumentError(absl::StrCat("unknown flag '", flag, "' (see --help)"));
    if (absl::Status s = need(); !s.ok()) return s;
    if (flag == "--kernel") {
      o.config.set_kernel(value);
    } else if (flag == "--initrd") {
      o.config.set_initrd(value);
    } else if (flag == "--cmdline") {
      o.config.set_cmdline(value);
    } else if (flag == "--test-guest") {
      o.config.set_test_guest(value);
    } else if (flag == "--test-guest-args") {
      o.config.set_test_guest_args(value);
    } else if (flag == "--vcpus") {
      uint32_t n = 0;
      if (!absl::SimpleAtoi(value, &n) || value[0] == '-')
        return absl::InvalidArgumentError(absl::StrCat("bad --vcpus '", value, "'"));
      o.config.set_vcpus(n);
    } else if (flag == "--memory") {
      auto m = ParseMemoryMib(value);
      if (!m.ok()) return m.status();
      o.config.set_memory_mib(*m);
    } else if (flag == "--serial") {
      auto s = ParseSerialSpec(value);
      if (!s.ok()) return s.status();
      *o.config.mutable_serial() = *s;
    } else if (flag == "--api-socket") {
      if (value.empty()) return absl::InvalidArgumentError("--api-socket needs a path");
      o.api_socket = value;
    } else if (flag == "--dirty-tracking") {
      if (value == "auto") {
        o.config.set_dirty_tracking(VmConfig::DIRTY_TRACKING_AUTO);
      } else if (value == "ring") {
        o.config.set_dirty_tracking(VmConfig::DIRTY_RING);
      } else if (value == "bitmap") {
        o.config.set_dirty_tracking(VmConfig::DIRTY_BITMAP);
      } else {
        return absl::InvalidArgumentError(
            absl::StrCat("bad --dirty-tracking '", value, "': expected auto, ring or bitmap"));
      }
    } else if (flag == "--disk") {
      auto d = ParseDiskSpec(value);
      if (!d.ok()) return d.status();
      *o.config.add_disks() = *d;
    } else if (flag == "--net") {
      auto n = ParseNetSpec(value);
      if (!n.ok()) return n.status();
      *o.config.add_nets() = *n;
    } else if (flag == "--balloon") {
      if (o.config.has_balloon()) return absl::InvalidArgumentError("--balloon given twice");
      auto b = ParseBalloonSpec(value);
      if (!b.ok()) return b.status();
      *o.config.mutable_balloon() = *b;
    } else if (flag == "--vsock") {
      if (o.config.has_vsock()) return absl::InvalidArgumentError("--vsock given twice");
      auto v = ParseVsockSpec(value);
      if (!v.ok()) return v.status();
      *o.config.mutable_vsock() = *v;
    } else if (flag == "--vfio-user") {
      auto v = ParseVfioUserSpec(value);
      if (!v.ok()) return v.status();
      *o.config.add_vfio_user() = *v;
    } else if (flag == "--vfio") {
      auto v = ParseVfioSpec(value);
      if (!v.ok()) return v.status();
      *o.config.add_vfio() = *v;
    } else if (flag == "--prefill") {
      o.config.set_prefill(value);
    } else if (flag == "--tls-cert") {
      o.tls_cert = value;
    } else if (flag == "--tls-key") {
      o.tls_key = value;
    } else if (flag == "--tls-ca") {
      o.tls_ca = value;
    } else if (flag == "--incoming") {
      if (value.empty()) return absl::InvalidArgumentError("--incoming needs an address");
      o.incoming = value;
    } else if (flag == "--log-level") {
      if (value != "debug" && value != "info" && value != "warn" && value != "error")
        return absl::InvalidArgumentError(absl::StrCat("bad --log-level '", value, "'"));
      o.log_level = value;
    }
  }
  if (o.help) return o;
  o.has_vm = !o.config.kernel().empty() || !o.config.test_guest().empty();
  if (!o.incoming.empty()) {
    if (o.has_vm)
      return absl::InvalidArgumentError(
          "--incoming receives the guest from a migration: do not give --kernel/--test-guest");
    if (o.config.rng() || o.config.has_balloon())
      return absl::InvalidArgumentError(
          "--incoming: --rng/--balloon come from the migrating VM's configuration; give only "
          "--disk/--net/--vsock/--vfio-user/--vfio backends here");
    return o;
  }
  if (!o.has_vm && o.api_socket.empty())
    return absl::InvalidArgumentError(
        "nothing to do: give --kernel or --test-guest, and/or --api-socket (see --help)");
  if (!o.has_vm && (!o.config.initrd().empty() || !o.config.cmdline().empty()))
    return absl::InvalidArgumentError("--initrd/--cmdline need --kernel");
  return o;
}

}  // namespace microvmm
