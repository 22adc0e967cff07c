#include "vmm/device_spec.h"

#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace microvmm {
namespace {

struct Field {
  std::string key;
  std::string value;
  bool has_value = false;
};

// Splits "a=1,b,c=x" into fields; the first field may be a bare value for `first_key`.
absl::StatusOr<std::vector<Field>> SplitSpec(const std::string& spec, const std::string& flag,
                                             const std::string& first_key,
                                             const std::vector<std::string>& bare_flags) {
  if (spec.empty()) return absl::InvalidArgumentError(absl::StrCat(flag, " needs a value"));
  std::vector<Field> out;
  bool first = true;
  for (absl::string_view part : absl::StrSplit(spec, ',')) {
    std::string p(part);
    if (p.empty())
      return absl::InvalidArgumentError(absl::StrCat("bad ", flag, " '", spec, "': empty field"));
    Field f;
    size_t eq = p.find('=');
    if (eq == std::string::npos) {
      bool is_flag = false;
      for (const auto& b : bare_flags) is_flag |= p == b;
      if (!is_flag && first && !first_key.empty()) {
        f.key = first_key;
        f.value = p;
        f.has_value = true;
      } else {
        f.key = p;
      }
    } else {
      f.key = p.substr(0, eq);
      f.value = p.substr(eq + 1);
      f.has_value = true;
    }
    for (const Field& o : out)
      if (o.key == f.key)
        return absl::InvalidArgumentError(
            absl::StrCat("bad ", flag, " '", spec, "': '", f.key, "' given twice"));
    out.push_back(std::move(f));
    first = false;
  }
  return out;
}

absl::Status BadField(const std::string& flag, const std::string& spec, const Field& f,
                      const std::string& expected) {
  return absl::InvalidArgumentError(absl::StrCat("bad ", flag, " '", spec, "': field '", f.key,
                                                 f.has_value ? "=" + f.value : "", "': ",
                                                 expected));
}

absl::Status NeedValue(const std::string& flag, const std::string& spec, const Field& f) {
  if (f.has_value && !f.value.empty()) return absl::OkStatus();
  return BadField(flag, spec, f, "needs a value");
}

absl::Status NoValue(const std::string& flag, const std::string& spec, const Field& f) {
  if (!f.has_value) return absl::OkStatus();
  return BadField(flag, spec, f, "takes no value");
}

}  // namespace

absl::StatusOr<uint64_t> ParseSizeMib(const std::string& spec, const std::string& flag) {
  std::string num = spec;
  uint64_t mult = 1;
  if (!num.empty() && (num.back() == 'M' || num.back() == 'm')) {
    num.pop_back();
  } else if (!num.empty() && (num.back() == 'G' || num.back() == 'g')) {
    num.pop_back();
    mult = 1024;
  }
  uint64_t v = 0;
  if (num.empty() || num[0] == '-' || !absl::SimpleAtoi(num, &v) || v > (1ULL << 40) / mult)
    return absl::InvalidArgumentError(
        absl::StrCat("bad ", flag, " '", spec, "': expected MiB or a size like 512M / 2G"));
  return v * mult;
}

absl::StatusOr<DiskConfig> ParseDiskSpec(const std::string& spec) {
  const std::string flag = "--disk";
  auto fields = SplitSpec(spec, flag, "path", {"ro", "direct"});
  if (!fields.ok()) return fields.status();
  DiskConfig d;
  for (const Field& f : *fields) {
    absl::Status s;
    if (f.key == "path") {
      if (s = NeedValue(flag, spec, f); s.ok()) d.set_path(f.value);
    } else if (f.key == "ro") {
      if (s = NoValue(flag, spec, f); s.ok()) d.set_read_only(true);
    } else if (f.key == "direct") {
      if (s = NoValue(flag, spec, f); s.ok()) d.set_direct(true);
    } else if (f.key == "serial") {
      if (s = NeedValue(flag, spec, f); s.ok()) d.set_serial(f.value);
    } else if (f.key == "engine") {
      if (f.value == "io_uring") {
        d.set_engine(DiskConfig::IO_URING);
      } else if (f.value == "sync") {
        d.set_engine(DiskConfig::SYNC);
      } else {
        s = BadField(flag, spec, f, "expected engine=io_uring or engine=sync");
      }
    } else {
      s = BadField(flag, spec, f, "unknown (path, ro, direct, serial, engine)");
    }
    if (!s.ok()) return s;
  }
  if (d.path().empty())
    return absl::InvalidArgumentError(absl::StrCat("bad --disk '", spec, "': no path"));
  return d;
}

absl::StatusOr<NetConfig> ParseNetSpec(const std::string& spec) {
  const std::string flag = "--net";
  auto fields = SplitSpec(spec, flag, "tap", {});
  if (!fields.ok()) return fields.status();
  NetConfig n;
  for (const Field& f : *fields) {
    absl::Status s;
    if (f.key == "tap") {
      if (s = NeedValue(flag, spec, f); s.ok()) n.set_tap(f.value);
    } else if (f.key == "mac") {
      if (s = NeedValue(flag, spec, f); s.ok()) n.set_mac(f.value);
    } else {
      s = BadField(flag, spec, f, "unknown (tap, mac)");
    }
    if (!s.ok()) return s;
  }
  if (n.tap().empty())
    return absl::InvalidArgumentError(absl::StrCat("bad --net '", spec, "': no tap name"));
  return n;
}

absl::StatusOr<BalloonConfig> ParseBalloonSpec(const std::string& spec) {
  const std::string flag = "--balloon";
  BalloonConfig b;
  if (spec == "on") return b;
  auto fields = SplitSpec(spec, flag, "", {});
  if (!fields.ok()) return fields.status();
  for (const Field& f : *fields) {
    absl::Status s;
    if (f.key == "target") {
      if (s = NeedValue(flag, spec, f); s.ok()) {
        auto mib = ParseSizeMib(f.value, "--balloon target");
        if (!mib.ok()) return mib.status();
        b.set_target_mib(*mib);
      }
    } else if (f.key == "deflate-on-oom") {
      if (s = NoValue(flag, spec, f); s.ok()) b.set_deflate_on_oom(true);
    } else if (f.key == "reporting") {
      if (s = NoValue(flag, spec, f); s.ok()) b.set_free_page_reporting(true);
    } else if (f.key == "hinting") {
      if (s = NoValue(flag, spec, f); s.ok()) b.set_free_page_hinting(true);
    } else if (f.key == "stats") {
      uint32_t secs = 0;
      if (!f.has_value || !absl::SimpleAtoi(f.value, &secs) || f.value[0] == '-')
        s = BadField(flag, spec, f, "expected stats=SECONDS");
      else
        b.set_stats_interval_s(secs);
    } else {
      s = BadField(flag, spec, f,
                   "unknown (target, deflate-on-oom, reporting, hinting, stats; or 'on')");
    }
    if (!s.ok()) return s;
  }
  return b;
}

absl::StatusOr<VsockConfig> ParseVsockSpec(const std::string& spec) {
  const std::string flag = "--vsock";
  auto fields = SplitSpec(spec, flag, "", {});
  if (!fields.ok()) return fields.status();
  VsockConfig v;
  bool has_cid = false;
  for (const Field& f : *fields) {
    absl::Status s;
    if (f.key == "cid") {
      uint32_t cid = 0;
      if (!f.has_value || f.value.empty() || f.value[0] == '-' || !absl::SimpleAtoi(f.value, &cid))
        s = BadField(flag, spec, f, "expected cid=NUMBER (>= 3)");
      v.set_guest_cid(cid);
      has_cid = true;
    } else if (f.key == "uds") {
      if (s = NeedValue(flag, spec, f); s.ok()) v.set_uds_path(f.value);
    } else {
      s = BadField(flag, spec, f, "unknown (cid, uds)");
    }
    if (!s.ok()) return s;
  }
  if (!has_cid || v.uds_path().empty())
    return absl::InvalidArgumentError(
        absl::StrCat("bad --vsock '", spec, "': needs cid=N and uds=PATH"));
  return v;
}

absl::StatusOr<VfioUserConfig> ParseVfioUserSpec(const std::string& spec) {
  // A socket path may contain ',' or '=': a value without "socket=" is taken whole.
  VfioUserConfig v;
  v.set_socket(spec.rfind("socket=", 0) == 0 ? spec.substr(7) : spec);
  if (v.socket().empty())
    return absl::InvalidArgumentError("bad --vfio-user '" + spec + "': needs a socket path");
  return v;
}

absl::StatusOr<VfioConfig> ParseVfioSpec(const std::string& spec) {
  // Like --vfio-user: the value is taken whole unless it starts with "path=".
  VfioConfig v;
  v.set_sysfs_path(spec.rfind("path=", 0) == 0 ? spec.substr(5) : spec);
  if (v.sysfs_path().empty())
    return absl::InvalidArgumentError("bad --vfio '" + spec +
                                      "': needs a PCI device (/sys/bus/pci/devices/DDDD:BB:DD.F)");
  return v;
}

const char* DeviceFlagsHelp() {
  return R"(Devices (virtio over PCI with MSI-X; each problem is reported before the guest boots):
  --rng                  virtio-rng (entropy from getrandom)
  --disk SPEC            virtio-blk on a raw image, repeatable:
                         path=FILE[,ro][,direct][,serial=STR][,engine=io_uring|sync]
                         ro: read-only; direct: O_DIRECT; serial: GET_ID string (<= 20 bytes);
                         engine: io_uring (default) or sync (pread/pwrite)
  --net SPEC             virtio-net on a tap device, repeatable: tap=NAME[,mac=52:54:00:xx:xx:xx]
  --balloon SPEC         virtio-balloon: on | [target=SIZE][,deflate-on-oom][,reporting]
                         [,hinting][,stats=SECONDS]  (reporting: free-page reporting, pages
                         given back to the host; hinting: free-page hints for live migration)
  --vsock SPEC           virtio-vsock: cid=N,uds=PATH (host side: connect to PATH and send
                         "CONNECT <port>\n"; guest connections to port P reach PATH_P)
  --vfio-user SOCKET     a PCI function served by a vfio-user device server listening on the
                         unix socket SOCKET (BARs trapped, MSI-X via KVM, DMA to guest RAM);
                         repeatable. Live migration needs the device to support VFIO
                         migration (its state and DMA dirty log travel); post-copy also needs a
                         DMA model of its class (devices/vfio/pci/dma_footprint.h)
  --vfio PATH            a host PCI function bound to vfio-pci, passed through with kernel
                         VFIO: PATH = /sys/bus/pci/devices/DDDD:BB:DD.F (mappable BARs mapped
                         into the guest, MSI-X and INTx via KVM, all guest RAM DMA-mapped);
                         repeatable. Live migration as for --vfio-user

)";
}

}  // namespace microvmm
