// KVM integration tests of the virtio device set as a whole, through the real `vmm` binary:
//  - every device given on the command line enumerates on the guest's PCI bus (the pciscan test
//    guest lists each function as "pci 00:D.F VVVV:DDDD class C"), once per instance;
//  - the vsock unix socket lives exactly as long as the VMM;
//  - every bad device configuration is refused before the guest runs: status 1, one
//    "vmm: error: ..." line naming the problem, no serial output.
// Tests that create taps need root and /dev/net/tun (target tagged "no-sandbox"); without them
// they skip loudly.
#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "gtest/gtest.h"
#include "tests/util/subprocess.h"

namespace microvmm::testing {
namespace {

constexpr char kHostBridge[] = "8086:0d57";
constexpr char kVirtioNet[] = "1af4:1041";
constexpr char kVirtioBlk[] = "1af4:1042";
constexpr char kVirtioRng[] = "1af4:1044";
constexpr char kVirtioBalloon[] = "1af4:1045";
constexpr char kVirtioVsock[] = "1af4:1053";

struct Result {
  std::optional<int> status;
  std::string serial;
  std::string stderr_text;
};

void WriteFile(const std::string& path, const std::string& data) {
  FILE* f = fopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr) << path;
  ASSERT_EQ(fwrite(data.data(), 1, data.size(), f), data.size());
  ASSERT_EQ(fclose(f), 0);
}

// Counts of "VVVV:DDDD" (zero-padded, lower case) over the pciscan lines of `serial`. pciscan
// prints the IDs with %x, i.e. without leading zeros ("8086:d57"). A malformed "pci " line is
// counted under "malformed: <line>" so it shows up in the comparison.
std::map<std::string, int> PciIds(const std::string& serial) {
  std::map<std::string, int> ids;
  for (absl::string_view line : absl::StrSplit(serial, '\n')) {
    if (!absl::StartsWith(line, "pci ")) continue;
    std::vector<absl::string_view> f = absl::StrSplit(line, ' ');
    std::vector<absl::string_view> vd =
        f.size() >= 3 ? absl::StrSplit(f[2], ':') : std::vector<absl::string_view>{};
    uint32_t v = 0, d = 0;
    if (vd.size() != 2 || !absl::SimpleHexAtoi(vd[0], &v) || !absl::SimpleHexAtoi(vd[1], &d)) {
      ++ids[absl::StrCat("malformed: ", line)];
      continue;
    }
    ++ids[absl::StrFormat("%04x:%04x", v, d)];
  }
  return ids;
}

std::string Describe(const std::map<std::string, int>& m) {
  std::string s;
  for (const auto& [k, v] : m) absl::StrAppend(&s, k, " x", v, "; ");
  return s;
}

bool IsSocket(const std::string& path) {
  struct stat st;
  return ::lstat(path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode);
}
bool Exists(const std::string& path) {
  struct stat st;
  return ::lstat(path.c_str(), &st) == 0;
}

// A listening unix socket at `path` (fd), or -1.
int ListenUnix(const std::string& path) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  snprintf(a.sun_path, sizeof(a.sun_path), "%s", path.c_str());
  if (::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 || ::listen(fd, 4) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

bool CanConnect(const std::string& path) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  sockaddr_un a{};
  a.sun_family = AF_UNIX;
  snprintf(a.sun_path, sizeof(a.sun_path), "%s", path.c_str());
  bool ok = ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0;
  ::close(fd);
  return ok;
}

class DevicesTest : public ::testing::Test {
 protected:
  Result RunVmm(const std::vector<std::string>& flags,
                absl::Duration timeout = absl::Seconds(60)) {
    std::remove(dir_.File("serial").c_str());
    std::remove(dir_.File("stderr").c_str());
    std::vector<std::string> argv = {Runfile("vmm/vmm"), "--serial", "file:" + dir_.File("serial"),
                                     "--memory", "64"};
    argv.insert(argv.end(), flags.begin(), flags.end());
    Subprocess p(argv, dir_.File("stdout"), dir_.File("stderr"));
    Result r;
    r.status = p.Wait(timeout);
    r.serial = ReadFileOrEmpty(dir_.File("serial"));
    r.stderr_text = ReadFileOrEmpty(dir_.File("stderr"));
    return r;
  }
  // A 1 MiB image (the content does not matter here).
  std::string Image(const std::string& name) {
    std::string path = dir_.File(name);
    WriteFile(path, std::string(1 << 20, '\0'));
    return path;
  }
  TempDir dir_;
};

// --- Every device enumerates -----------------------------------------------------------------

TEST_F(DevicesTest, EveryDeviceEnumeratesOncePerInstance) {
  REQUIRE_KVM();
  const std::string a = Image("a.img"), b = Image("b.img"), vsock = dir_.File("v.sock");
  // serial=: exactly 20 bytes, the longest allowed (the boundary of the "too long" case below).
  Result r = RunVmm({"--test-guest", "pciscan", "--rng", "--disk", "path=" + a + ",serial=" +
                     std::string(20, 's'), "--disk", b + ",ro", "--balloon", "target=8",
                     "--vsock", "cid=5,uds=" + vsock});
  ASSERT_TRUE(r.status.has_value()) << "vmm did not exit";
  ASSERT_EQ(*r.status, 0) << r.serial << r.stderr_text;
  const std::map<std::string, int> want = {{kHostBridge, 1},    {kVirtioRng, 1},
                                           {kVirtioBlk, 2},     {kVirtioBalloon, 1},
                                           {kVirtioVsock, 1}};
  const std::map<std::string, int> got = PciIds(r.serial);
  EXPECT_EQ(got, want) << "got: " << Describe(got) << "\nserial:\n" << r.serial;
  EXPECT_NE(r.serial.find("pciscan done 6\n"), std::string::npos) << r.serial;
  // Virtio devices are functions 0 of slots 1.. (the host bridge has slot 0): no multi-function.
  EXPECT_EQ(r.serial.find("pci 00:0.0 8086:d57 class 60000\n"), 0u) << r.serial;
  EXPECT_FALSE(Exists(vsock)) << "vsock socket " << vsock << " left behind after the VMM exited";
}

TEST_F(DevicesTest, NoDeviceFlagsOnlyTheHostBridge) {
  REQUIRE_KVM();
  Result r = RunVmm({"--test-guest", "pciscan"});
  ASSERT_TRUE(r.status.has_value());
  ASSERT_EQ(*r.status, 0) << r.serial << r.stderr_text;
  EXPECT_EQ(PciIds(r.serial), (std::map<std::string, int>{{kHostBridge, 1}})) << r.serial;
}

// Taps: root + /dev/net/tun. Names are unique per test process; every tap is deleted on every
// path (the VMM's taps are not persistent and vanish with it; `ip link del` is the safety net).
class ScopedTapNames {
 public:
  explicit ScopedTapNames(int n) {
    for (int i = 0; i < n; ++i) names_.push_back(absl::StrFormat("mvt%x_%d", getpid() & 0xfffff, i));
    DeleteAll();
  }
  ~ScopedTapNames() { DeleteAll(); }
  const std::string& operator[](int i) const { return names_[i]; }

 private:
  void DeleteAll() {
    for (const std::string& n : names_)
      (void)std::system(absl::StrCat("ip link del ", n, " >/dev/null 2>&1").c_str());
  }
  std::vector<std::string> names_;
};

// Empty if taps can be created here, else why not.
std::string TapUnavailableReason() {
  if (geteuid() != 0) return "not root";
  int fd = ::open("/dev/net/tun", O_RDWR | O_CLOEXEC);
  if (fd < 0) return absl::StrCat("/dev/net/tun: ", strerror(errno));
  ::close(fd);
  return "";
}

#define REQUIRE_TAP()                                                                      \
  do {                                                                                     \
    std::string why = TapUnavailableReason();                                              \
    if (!why.empty()) {                                                                    \
      fprintf(stderr, "\n*** TAP UNAVAILABLE (%s): this virtio-net test did NOT run ***\n", \
              why.c_str());                                                                \
      GTEST_SKIP() << "TAP UNAVAILABLE (" << why << "): this virtio-net test did NOT run";  \
    }                                                                                      \
  } while (0)

TEST_F(DevicesTest, EveryDeviceIncludingTwoNetsEnumerates) {
  REQUIRE_KVM();
  REQUIRE_TAP();
  ScopedTapNames taps(2);
  const std::string a = Image("a.img"), b = Image("b.img"), vsock = dir_.File("v.sock");
  Result r = RunVmm({"--test-guest", "pciscan", "--rng", "--disk", a, "--disk", b, "--net",
                     "tap=" + taps[0], "--net", "tap=" + taps[1] + ",mac=52:54:00:ab:cd:ef",
                     "--balloon", "target=8", "--vsock", "cid=5,uds=" + vsock});
  ASSERT_TRUE(r.status.has_value()) << "vmm did not exit";
  ASSERT_EQ(*r.status, 0) << r.serial << r.stderr_text;
  const std::map<std::string, int> want = {{kHostBridge, 1}, {kVirtioRng, 1},
                                           {kVirtioBlk, 2},  {kVirtioNet, 2},
                                           {kVirtioBalloon, 1}, {kVirtioVsock, 1}};
  const std::map<std::string, int> got = PciIds(r.serial);
  EXPECT_EQ(got, want) << "got: " << Describe(got) << "\nserial:\n" << r.serial;
  EXPECT_NE(r.serial.find("pciscan done 8\n"), std::string::npos) << r.serial;
  EXPECT_NE(r.stderr_text.find("52:54:00:ab:cd:ef"), std::string::npos)
      << "the given MAC is not the one used:\n" << r.stderr_text;
}

// The tap is really opened under the given name while the VM runs, and the vsock socket
// accepts connections for exactly as long as the VMM lives.
TEST_F(DevicesTest, VsockSocketAndTapLiveAsLongAsTheVmm) {
  REQUIRE_KVM();
  const std::string vsock = dir_.File("v.sock");
  // A stale socket file (bound, nobody listening: an earlier VMM killed with SIGKILL) must be
  // replaced, not refused.
  int stale = ListenUnix(vsock);
  ASSERT_GE(stale, 0);
  ::close(stale);
  ASSERT_TRUE(IsSocket(vsock));
  ASSERT_FALSE(CanConnect(vsock));

  const bool with_tap = TapUnavailableReason().empty();
  if (!with_tap)
    fprintf(stderr, "\n*** TAP UNAVAILABLE (%s): the tap part of this test did NOT run ***\n",
            TapUnavailableReason().c_str());
  ScopedTapNames taps(1);
  std::vector<std::string> argv = {Runfile("vmm/vmm"), "--serial", "file:" + dir_.File("serial"),
                                   "--memory", "64", "--test-guest", "idle", "--api-socket",
                                   dir_.File("api.sock"), "--vsock", "cid=5,uds=" + vsock,
                                   "--balloon", "on"};
  if (with_tap) argv.insert(argv.end(), {"--net", "tap=" + taps[0]});
  Subprocess p(argv, dir_.File("stdout"), dir_.File("stderr"));
  ASSERT_TRUE(WaitForFileContains(dir_.File("serial"), "idle\n", absl::Seconds(30)))
      << ReadFileOrEmpty(dir_.File("stderr"));
  EXPECT_TRUE(IsSocket(vsock)) << vsock;
  EXPECT_TRUE(CanConnect(vsock)) << "nobody listens on " << vsock;
  if (with_tap) {
    EXPECT_EQ(std::system(absl::StrCat("ip link show ", taps[0], " >/dev/null 2>&1").c_str()), 0)
        << "tap " << taps[0] << " does not exist while the VM runs";
  }

  p.Signal(SIGTERM);
  std::optional<int> status = p.Wait(absl::Seconds(20));
  ASSERT_TRUE(status.has_value()) << "vmm did not exit on SIGTERM";
  EXPECT_EQ(*status, 0) << ReadFileOrEmpty(dir_.File("stderr"));
  EXPECT_FALSE(Exists(vsock)) << "vsock socket left behind after the VMM exited";
}

// --- Bad configurations fail before boot ---------------------------------------------------

struct BadCase {
  std::string name;
  // Builds the flags in `dir` (may create files); `needles` must all be in the error line.
  std::function<std::vector<std::string>(const TempDir& dir)> flags;
  std::vector<std::string> needles;
};

class BadDeviceConfigTest : public DevicesTest, public ::testing::WithParamInterface<BadCase> {
 public:
  // A listening socket a case keeps open for the duration of its run.
  static void SetListener(int fd) { listener_ = fd; }

 protected:
  void TearDown() override {
    if (listener_ >= 0) ::close(listener_);
    listener_ = -1;
  }
  static inline int listener_ = -1;
};

TEST_P(BadDeviceConfigTest, ExitsOneWithOneErrorLineBeforeTheGuestRuns) {
  REQUIRE_KVM();  // several checks happen while the VM is built
  const BadCase& c = GetParam();
  std::vector<std::string> flags = {"--test-guest", "pciscan"};
  for (std::string& f : c.flags(dir_)) flags.push_back(std::move(f));
  Result r = RunVmm(flags, absl::Seconds(30));
  ASSERT_TRUE(r.status.has_value()) << "vmm did not exit";
  EXPECT_EQ(*r.status, 1) << r.stderr_text;
  EXPECT_EQ(r.stderr_text.rfind("vmm: error: ", 0), 0u) << r.stderr_text;
  EXPECT_EQ(CountOccurrences(r.stderr_text, "\n"), 1) << "not exactly one line:\n" << r.stderr_text;
  for (std::string n : c.needles) {  // "{dir}" stands for the test's directory
    if (size_t at = n.find("{dir}"); at != std::string::npos) n.replace(at, 5, dir_.path());
    EXPECT_NE(r.stderr_text.find(n), std::string::npos) << "no '" << n << "' in:\n"
                                                        << r.stderr_text;
  }
  EXPECT_EQ(r.serial, "") << "the guest ran despite the error";
  if (c.name == "vsock_in_use") {
    EXPECT_TRUE(CanConnect(dir_.File("v.sock"))) << "the other process's socket was taken over";
  } else if (c.name == "vsock_path_is_a_file") {
    EXPECT_FALSE(IsSocket(dir_.File("v.sock"))) << "the file was replaced by a socket";
  } else {
    EXPECT_FALSE(Exists(dir_.File("v.sock"))) << "socket created by a refused configuration";
  }
}

std::string MakeImage(const TempDir& d, const std::string& name, size_t bytes) {
  FILE* f = fopen(d.File(name).c_str(), "wb");
  if (f != nullptr) {
    std::string data(bytes, '\0');
    fwrite(data.data(), 1, data.size(), f);
    fclose(f);
  }
  return d.File(name);
}

const std::vector<BadCase>& BadCases() {
  static const auto* cases = new std::vector<BadCase>{
      // --disk
      {"disk_missing",
       [](const TempDir& d) { return std::vector<std::string>{"--disk", d.File("nope.img")}; },
       {"{dir}/nope.img", "does not exist"}},
      {"disk_is_a_directory",
       [](const TempDir& d) {
         ::mkdir(d.File("sub").c_str(), 0755);
         return std::vector<std::string>{"--disk", d.File("sub")};
       },
       {"{dir}/sub", "directory"}},
      {"disk_size_not_multiple_of_512",
       [](const TempDir& d) {
         return std::vector<std::string>{"--disk", MakeImage(d, "odd.img", (1 << 20) + 100)};
       },
       {"{dir}/odd.img", "multiple of 512"}},
      {"disk_empty_path", [](const TempDir&) { return std::vector<std::string>{"--disk", "ro"}; },
       {"--disk", "no path"}},
      {"disk_same_image_twice",
       [](const TempDir& d) {
         std::string a = MakeImage(d, "a.img", 1 << 20);
         return std::vector<std::string>{"--disk", a, "--disk", a + ",ro"};
       },
       {"disk 1", "already used"}},
      {"disk_same_image_through_a_symlink",
       [](const TempDir& d) {
         std::string a = MakeImage(d, "a.img", 1 << 20);
         (void)::symlink(a.c_str(), d.File("link.img").c_str());
         return std::vector<std::string>{"--disk", a, "--disk", d.File("link.img")};
       },
       {"disk 1", "already used"}},
      {"disk_serial_longer_than_20_bytes",
       [](const TempDir& d) {
         return std::vector<std::string>{
             "--disk", MakeImage(d, "a.img", 1 << 20) + ",serial=" + std::string(21, 's')};
       },
       {"serial", "longer than 20"}},
      {"disk_unknown_field",
       [](const TempDir& d) {
         return std::vector<std::string>{"--disk", MakeImage(d, "a.img", 1 << 20) + ",cache=none"};
       },
       {"--disk", "cache", "unknown"}},
      {"disk_bad_engine",
       [](const TempDir& d) {
         return std::vector<std::string>{"--disk", MakeImage(d, "a.img", 1 << 20) + ",engine=aio"};
       },
       {"engine"}},
      // --net: all refused before any tap is opened, so no root needed.
      {"net_tap_name_longer_than_15",
       [](const TempDir&) { return std::vector<std::string>{"--net", "tap=mvt456789abcdefg"}; },
       {"mvt456789abcdefg", "too long"}},
      {"net_duplicate_tap",
       [](const TempDir&) {
         return std::vector<std::string>{"--net", "tap=mvtdup0", "--net", "mvtdup0"};
       },
       {"mvtdup0", "already used"}},
      {"net_mac_not_hex",
       [](const TempDir&) {
         return std::vector<std::string>{"--net", "tap=mvtbad0,mac=zz:54:00:12:34:56"};
       },
       {"zz:54:00:12:34:56", "not two hex digits"}},
      {"net_mac_multicast",
       [](const TempDir&) {
         return std::vector<std::string>{"--net", "tap=mvtbad0,mac=01:00:5e:00:00:01"};
       },
       {"01:00:5e:00:00:01", "multicast"}},
      {"net_mac_broadcast",
       [](const TempDir&) {
         return std::vector<std::string>{"--net", "tap=mvtbad0,mac=ff:ff:ff:ff:ff:ff"};
       },
       {"ff:ff:ff:ff:ff:ff", "broadcast"}},
      {"net_mac_all_zeros",
       [](const TempDir&) {
         return std::vector<std::string>{"--net", "tap=mvtbad0,mac=00:00:00:00:00:00"};
       },
       {"00:00:00:00:00:00", "all zeros"}},
      {"net_mac_five_groups",
       [](const TempDir&) {
         return std::vector<std::string>{"--net", "tap=mvtbad0,mac=52:54:00:12:34"};
       },
       {"52:54:00:12:34", "5 groups"}},
      {"net_duplicate_mac",
       [](const TempDir&) {
         return std::vector<std::string>{"--net", "tap=mvtbad0,mac=52:54:00:12:34:56", "--net",
                                         "tap=mvtbad1,mac=52:54:00:12:34:56"};
       },
       {"52:54:00:12:34:56", "already used"}},
      {"net_unknown_field",
       [](const TempDir&) { return std::vector<std::string>{"--net", "tap=mvtbad0,queues=2"}; },
       {"--net", "queues", "unknown"}},
      // --balloon (guest memory is 64 MiB)
      {"balloon_target_equal_to_memory",
       [](const TempDir&) { return std::vector<std::string>{"--balloon", "target=64"}; },
       {"balloon target 64 MiB", "below guest memory"}},
      {"balloon_target_above_memory",
       [](const TempDir&) { return std::vector<std::string>{"--balloon", "target=1G"}; },
       {"balloon target 1024 MiB", "below guest memory"}},
      {"balloon_unknown_field",
       [](const TempDir&) { return std::vector<std::string>{"--balloon", "target=8,size=4"}; },
       {"--balloon", "size", "unknown"}},
      // --vsock
      {"vsock_cid_2_is_the_host",
       [](const TempDir& d) {
         return std::vector<std::string>{"--vsock", "cid=2,uds=" + d.File("v.sock")};
       },
       {"CID 2", "reserved"}},
      {"vsock_cid_not_a_number",
       [](const TempDir& d) {
         return std::vector<std::string>{"--vsock", "cid=five,uds=" + d.File("v.sock")};
       },
       {"--vsock", "cid"}},
      {"vsock_without_uds",
       [](const TempDir&) { return std::vector<std::string>{"--vsock", "cid=5"}; },
       {"--vsock", "uds=PATH"}},
      {"vsock_socket_in_missing_directory",
       [](const TempDir& d) {
         return std::vector<std::string>{"--vsock", "cid=5,uds=" + d.File("nodir/v.sock")};
       },
       {"{dir}/nodir", "does not exist"}},
      {"vsock_in_use",
       [](const TempDir& d) {
         // A live listener on the path: another process owns it; it must not be unlinked.
         BadDeviceConfigTest::SetListener(ListenUnix(d.File("v.sock")));
         return std::vector<std::string>{"--vsock", "cid=5,uds=" + d.File("v.sock")};
       },
       {"{dir}/v.sock", "in use"}},
      {"vsock_path_is_a_file",
       [](const TempDir& d) {
         MakeImage(d, "v.sock", 0);
         return std::vector<std::string>{"--vsock", "cid=5,uds=" + d.File("v.sock")};
       },
       {"{dir}/v.sock", "not a socket"}},
      {"vsock_path_too_long",
       [](const TempDir& d) {
         return std::vector<std::string>{"--vsock", "cid=5,uds=" + d.File(std::string(100, 'p'))};
       },
       {"too long"}},
      {"vsock_unknown_field",
       [](const TempDir& d) {
         return std::vector<std::string>{"--vsock", "cid=5,uds=" + d.File("v.sock") + ",port=1"};
       },
       {"--vsock", "port", "unknown"}},
  };
  return *cases;
}

INSTANTIATE_TEST_SUITE_P(Cases, BadDeviceConfigTest, ::testing::ValuesIn(BadCases()),
                         [](const ::testing::TestParamInfo<BadCase>& p) { return p.param.name; });

}  // namespace
}  // namespace microvmm::testing
