// virtio-net on a real tap: the device opens the tap (VirtioNet::Create with NetOptions), the
// test moves it into a fresh network namespace with an address, and exchanges real frames
// between the "guest" (a driver in GuestMemory, via the device and a real EventLoop) and the
// namespace's kernel: an ARP request answered by the kernel (reply checked byte for byte), a UDP
// datagram to a socket in the namespace, and one back. Run without and with GUEST_CSUM (the tap
// offload must follow the negotiated features: partial checksums only with GUEST_CSUM).
//
// Needs root, /dev/net/tun and iproute2; tagged "no-sandbox" (`ip netns add` writes /run/netns).
// Without them the test is skipped with a loud "*** TAP/NETNS UNAVAILABLE ***" line.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sched.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "devices/virtio/net/net.h"
#include "gtest/gtest.h"
#include "tests/virtio/virtq_driver.h"
#include "vmm/event_loop.h"
#include "vmm/memory/guest_memory.h"

namespace microvmm::virtio {
namespace {

using testing::TestDriver;

constexpr uint64_t F(int b) { return uint64_t{1} << b; }
constexpr size_t kHdr = VirtioNet::kHdrBytes;
constexpr uint32_t kRing = 64;
constexpr uint32_t kRxBuf = 2048;
constexpr uint64_t kRxBase = 0x200000, kTxBase = 0x400000;
constexpr MacAddress kGuestMac = {0x52, 0x54, 0x00, 0x12, 0x34, 0x56};

std::string IpBinary() {
  for (const char* p : {"/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"})
    if (access(p, X_OK) == 0) return p;
  return "";
}

// Runs a shell command, appending it and its output to `log`; returns the exit status.
int Sh(const std::string& cmd, std::string* log, std::string* out = nullptr) {
  FILE* f = popen((cmd + " 2>&1").c_str(), "r");
  if (f == nullptr) return -1;
  char buf[512];
  std::string o;
  while (fgets(buf, sizeof(buf), f) != nullptr) o += buf;
  int st = pclose(f);
  *log += absl::StrCat("$ ", cmd, "\n", o);
  if (out != nullptr) *out = o;
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

// A network namespace, deleted on destruction (also when the test fails half-way).
class Netns {
 public:
  Netns() {
    static std::atomic<int> counter{0};
    int n = counter++;
    name_ = absl::StrCat("mvnet", getpid() % 100000, "x", n);
    subnet_ = 10 + (getpid() + n) % 240;
  }
  ~Netns() {
    if (created_) Sh(absl::StrCat(ip_, " netns delete ", name_), &log_);
  }
  bool Create() {
    ip_ = IpBinary();
    if (ip_.empty()) {
      log_ += "no ip binary\n";
      return false;
    }
    if (Sh(absl::StrCat(ip_, " netns add ", name_), &log_) != 0) return false;
    created_ = true;
    return true;
  }
  // Moves `dev` in, gives it Addr()/24, brings it up (IPv6 off: no stray RS/MLD traffic).
  bool AdoptTap(const std::string& dev) {
    const std::string in = absl::StrCat(ip_, " -n ", name_);
    // Best effort (IPv6 may be absent): the filters in Receive() cope with stray packets.
    Sh(absl::StrCat(ip_, " netns exec ", name_,
                    " sh -c 'echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6'"),
       &log_);
    for (const std::string& c : {
             absl::StrCat(ip_, " link set ", dev, " netns ", name_),
             absl::StrCat(in, " addr add ", Addr(), "/24 dev ", dev),
             absl::StrCat(in, " link set lo up"),
             absl::StrCat(in, " link set ", dev, " up"),
         })
      if (Sh(c, &log_) != 0) return false;
    return true;
  }
  std::string Run(const std::string& cmd) {
    std::string out;
    Sh(absl::StrCat(ip_, " netns exec ", name_, " ", cmd), &log_, &out);
    return out;
  }
  int Ip(const std::string& args) { return Sh(absl::StrCat(ip_, " -n ", name_, " ", args), &log_); }
  std::string Addr() const { return absl::StrCat("10.79.", subnet_, ".1"); }
  std::string GuestAddr() const { return absl::StrCat("10.79.", subnet_, ".2"); }
  const std::string& name() const { return name_; }
  const std::string& log() const { return log_; }

 private:
  std::string ip_, name_, log_;
  int subnet_ = 0;
  bool created_ = false;
};

// A UDP socket created inside the namespace (setns on a helper thread; the socket stays in the
// namespace it was created in).
int UdpSocketIn(const std::string& ns, const std::string& addr, uint16_t port) {
  int result = -1;
  std::thread t([&] {
    int nsfd = open(absl::StrCat("/var/run/netns/", ns).c_str(), O_RDONLY | O_CLOEXEC);
    if (nsfd < 0) return;
    if (setns(nsfd, CLONE_NEWNET) != 0) {
      close(nsfd);
      return;
    }
    close(nsfd);
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    sa.sin_port = htons(port);
    inet_pton(AF_INET, addr.c_str(), &sa.sin_addr);
    timeval tv{5, 0};
    setsockopt(s, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    if (bind(s, reinterpret_cast<sockaddr*>(&sa), sizeof(sa)) != 0) {
      close(s);
      return;
    }
    result = s;
  });
  t.join();  // the thread (and its namespace) ends; the socket keeps its namespace
  return result;
}

uint32_t Ip4(const std::string& s) {
  in_addr a{};
  inet_pton(AF_INET, s.c_str(), &a);
  return a.s_addr;  // network order
}

void Put(std::vector<uint8_t>& v, const void* p, size_t n) {
  const uint8_t* b = static_cast<const uint8_t*>(p);
  v.insert(v.end(), b, b + n);
}
void Put16(std::vector<uint8_t>& v, uint16_t host) {
  uint16_t n = htons(host);
  Put(v, &n, 2);
}

uint16_t Checksum(const uint8_t* p, size_t n, uint32_t sum = 0) {
  for (size_t i = 0; i + 1 < n; i += 2) sum += (p[i] << 8) | p[i + 1];
  if (n & 1) sum += p[n - 1] << 8;
  while (sum >> 16) sum = (sum & 0xffff) + (sum >> 16);
  return static_cast<uint16_t>(~sum);
}

std::vector<uint8_t> ArpRequest(const MacAddress& sha, uint32_t spa, uint32_t tpa) {
  std::vector<uint8_t> f(6, 0xff);
  Put(f, sha.data(), 6);
  Put16(f, 0x0806);
  Put16(f, 1);       // htype Ethernet
  Put16(f, 0x0800);  // ptype IPv4
  f.push_back(6);
  f.push_back(4);
  Put16(f, 1);  // request
  Put(f, sha.data(), 6);
  Put(f, &spa, 4);
  f.insert(f.end(), 6, 0);
  Put(f, &tpa, 4);
  return f;
}

std::vector<uint8_t> ArpReply(const MacAddress& sha, uint32_t spa, const MacAddress& tha,
                              uint32_t tpa) {
  std::vector<uint8_t> f;
  Put(f, tha.data(), 6);
  Put(f, sha.data(), 6);
  Put16(f, 0x0806);
  Put16(f, 1);
  Put16(f, 0x0800);
  f.push_back(6);
  f.push_back(4);
  Put16(f, 2);  // reply
  Put(f, sha.data(), 6);
  Put(f, &spa, 4);
  Put(f, tha.data(), 6);
  Put(f, &tpa, 4);
  return f;
}

std::vector<uint8_t> UdpFrame(const MacAddress& dst, const MacAddress& src, uint32_t saddr,
                              uint32_t daddr, uint16_t sport, uint16_t dport,
                              const std::vector<uint8_t>& payload) {
  std::vector<uint8_t> f;
  Put(f, dst.data(), 6);
  Put(f, src.data(), 6);
  Put16(f, 0x0800);
  size_t ip = f.size();
  f.push_back(0x45);
  f.push_back(0);
  Put16(f, static_cast<uint16_t>(20 + 8 + payload.size()));
  Put16(f, 0x1234);  // id
  Put16(f, 0x4000);  // DF
  f.push_back(64);
  f.push_back(17);
  Put16(f, 0);  // checksum, below
  Put(f, &saddr, 4);
  Put(f, &daddr, 4);
  uint16_t c = Checksum(f.data() + ip, 20);
  f[ip + 10] = static_cast<uint8_t>(c >> 8);
  f[ip + 11] = static_cast<uint8_t>(c);
  Put16(f, sport);
  Put16(f, dport);
  Put16(f, static_cast<uint16_t>(8 + payload.size()));
  Put16(f, 0);  // no UDP checksum (allowed over IPv4)
  f.insert(f.end(), payload.begin(), payload.end());
  return f;
}

uint16_t Be16(const std::vector<uint8_t>& f, size_t off) { return f[off] << 8 | f[off + 1]; }

// The guest side: RAM, rings, the device on a real EventLoop.
struct Guest {
  std::unique_ptr<GuestMemory> mem;
  std::unique_ptr<EventLoop> loop;
  std::unique_ptr<Virtqueue> rxq, txq;
  std::unique_ptr<TestDriver> rx, tx;
  std::unique_ptr<VirtioNet> dev;
  uint64_t tx_buf = 0x600000;

  absl::Status Start(const std::string& tap, uint64_t features) {
    auto m = GuestMemory::Create(16ULL << 20);
    if (!m.ok()) return m.status();
    mem = std::move(*m);
    auto l = EventLoop::Create("net-tap-test");
    if (!l.ok()) return l.status();
    loop = std::move(*l);
    auto d = VirtioNet::Create(NetOptions{tap, kGuestMac}, mem.get(), loop.get());
    if (!d.ok()) return d.status();
    dev = std::move(*d);
    rxq = std::make_unique<Virtqueue>(mem.get(), 0, VirtioNet::kQueueSize);
    txq = std::make_unique<Virtqueue>(mem.get(), 1, VirtioNet::kQueueSize);
    rx = std::make_unique<TestDriver>(mem.get(), kRing, kRxBase);
    tx = std::make_unique<TestDriver>(mem.get(), kRing, kTxBase);
    for (absl::Status s : {rx->Configure(*rxq, features), tx->Configure(*txq, features)})
      if (!s.ok()) return s;
    Virtqueue* qs[2] = {rxq.get(), txq.get()};
    if (absl::Status s = dev->Activate(features, qs, [](uint16_t) {}); !s.ok()) return s;
    for (uint32_t i = 0; i < kRing / 2; ++i) PostRx(0x800000 + uint64_t{i} * kRxBuf);
    dev->ProcessQueue(0);
    return absl::OkStatus();
  }
  ~Guest() {
    dev.reset();  // closes the tap before the loop goes
    loop.reset();
  }
  void PostRx(uint64_t gpa) { rx->AddChain({{gpa, kRxBuf, true}}); }

  void Send(const std::vector<uint8_t>& frame) {
    std::vector<uint8_t> pkt(kHdr, 0);  // no offloads requested
    pkt.insert(pkt.end(), frame.begin(), frame.end());
    ASSERT_TRUE(mem->Write(tx_buf, pkt.data(), pkt.size()).ok());
    tx->AddChain({{tx_buf, static_cast<uint32_t>(pkt.size()), false}});
    tx_buf += 0x10000;
    dev->ProcessQueue(1);
  }

  // Next received packet (header + frame) for which `want` holds; others are skipped. Empty on
  // timeout (5 s). Each buffer is big enough for a whole frame, so num_buffers must be 1.
  std::vector<uint8_t> Receive(const std::function<bool(const std::vector<uint8_t>&)>& want) {
    for (int i = 0; i < 500; ++i) {
      while (auto u = rx->GetUsed()) {
        uint64_t gpa = 0;
        EXPECT_TRUE(mem->Read(rx->desc_addr + 16ULL * u->id, &gpa, 8).ok());
        std::vector<uint8_t> p(u->len);
        EXPECT_TRUE(mem->Read(gpa, p.data(), p.size()).ok());
        PostRx(gpa);
        dev->ProcessQueue(0);
        if (p.size() < kHdr + 14) continue;
        EXPECT_EQ(p[10] | p[11] << 8, 1) << "num_buffers";
        std::vector<uint8_t> frame(p.begin() + kHdr, p.end());
        if (want(frame)) return p;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
    return {};
  }
};

class TapNetnsTest : public ::testing::TestWithParam<bool> {};

TEST_P(TapNetnsTest, ExchangesRealFramesWithANamespace) {
  const bool guest_csum = GetParam();
  if (geteuid() != 0 || access("/dev/net/tun", R_OK | W_OK) != 0) {
    fprintf(stderr, "\n*** TAP/NETNS UNAVAILABLE: needs root and /dev/net/tun; this test did "
                    "NOT run ***\n");
    GTEST_SKIP() << "TAP/NETNS UNAVAILABLE (needs root and /dev/net/tun); did NOT run";
  }
  Netns ns;  // declared first: deleted after the device (and its tap) are gone
  if (!ns.Create()) {
    fprintf(stderr, "\n*** TAP/NETNS UNAVAILABLE: cannot create a network namespace; this test "
                    "did NOT run ***\n%s\n", ns.log().c_str());
    GTEST_SKIP() << "TAP/NETNS UNAVAILABLE; did NOT run:\n" << ns.log();
  }
  const std::string tap = absl::StrCat("mvtap", getpid() % 100000, guest_csum ? "c" : "p");
  uint64_t features = F(kFeatureVersion1) | F(15) /*MRG_RXBUF*/ | F(kFeatureEventIdx);
  if (guest_csum) features |= F(0) | F(1);  // CSUM, GUEST_CSUM
  Guest g;
  ASSERT_TRUE(g.Start(tap, features).ok());
  ASSERT_TRUE(ns.AdoptTap(tap)) << ns.log();
  auto tap_mac = ParseMac(absl::StripAsciiWhitespace(ns.Run("cat /sys/class/net/" + tap + "/address")));
  ASSERT_TRUE(tap_mac.ok()) << tap_mac.status() << "\n" << ns.log();
  const uint32_t host_ip = Ip4(ns.Addr()), guest_ip = Ip4(ns.GuestAddr());

  // 1. ARP: the namespace's kernel answers the guest's request; the reply is fully determined.
  g.Send(ArpRequest(kGuestMac, guest_ip, host_ip));
  std::vector<uint8_t> reply = g.Receive([](const std::vector<uint8_t>& f) {
    return f.size() >= 42 && Be16(f, 12) == 0x0806 && Be16(f, 20) == 2;
  });
  ASSERT_FALSE(reply.empty()) << "no ARP reply\n" << ns.log() << ns.Run("ip -s link");
  std::vector<uint8_t> expect = ArpReply(*tap_mac, host_ip, kGuestMac, guest_ip);
  EXPECT_EQ(std::vector<uint8_t>(reply.begin() + kHdr, reply.begin() + kHdr + 42), expect);
  EXPECT_EQ(reply[0], 0) << "no offload flags on an ARP reply";

  // 2. UDP guest -> socket in the namespace.
  int sock = UdpSocketIn(ns.name(), ns.Addr(), 5555);
  ASSERT_GE(sock, 0) << "cannot create a socket in " << ns.name();
  std::vector<uint8_t> payload(700);
  for (size_t i = 0; i < payload.size(); ++i) payload[i] = static_cast<uint8_t>(i * 31 + 7);
  g.Send(UdpFrame(*tap_mac, kGuestMac, guest_ip, host_ip, 4444, 5555, payload));
  std::vector<uint8_t> got(2048);
  sockaddr_in from{};
  socklen_t fl = sizeof(from);
  ssize_t n = recvfrom(sock, got.data(), got.size(), 0, reinterpret_cast<sockaddr*>(&from), &fl);
  ASSERT_EQ(n, static_cast<ssize_t>(payload.size())) << "errno " << errno << "\n" << ns.log();
  got.resize(static_cast<size_t>(n));
  EXPECT_EQ(got, payload);
  EXPECT_EQ(from.sin_addr.s_addr, guest_ip);
  EXPECT_EQ(ntohs(from.sin_port), 4444);

  // 3. UDP socket -> guest (static neighbour: no ARP round trip needed).
  ASSERT_EQ(ns.Ip(absl::StrCat("neigh replace ", ns.GuestAddr(), " lladdr ", FormatMac(kGuestMac),
                               " dev ", tap, " nud permanent")),
            0)
      << ns.log();
  std::vector<uint8_t> back(900);
  for (size_t i = 0; i < back.size(); ++i) back[i] = static_cast<uint8_t>(i * 17 + 3);
  sockaddr_in to{};
  to.sin_family = AF_INET;
  to.sin_port = htons(4444);
  to.sin_addr.s_addr = guest_ip;
  ASSERT_EQ(sendto(sock, back.data(), back.size(), 0, reinterpret_cast<sockaddr*>(&to), sizeof(to)),
            static_cast<ssize_t>(back.size()));
  close(sock);
  std::vector<uint8_t> p = g.Receive([](const std::vector<uint8_t>& f) {
    return f.size() >= 42 && Be16(f, 12) == 0x0800 && f[23] == 17 && Be16(f, 36) == 4444;
  });
  ASSERT_FALSE(p.empty()) << "no UDP packet\n" << ns.log();
  std::vector<uint8_t> f(p.begin() + kHdr, p.end());
  ASSERT_EQ(f.size(), 14u + 20 + 8 + back.size());
  EXPECT_EQ(std::vector<uint8_t>(f.begin(), f.begin() + 6), std::vector<uint8_t>(kGuestMac.begin(), kGuestMac.end()));
  EXPECT_EQ(std::vector<uint8_t>(f.begin() + 6, f.begin() + 12),
            std::vector<uint8_t>(tap_mac->begin(), tap_mac->end()));
  uint32_t saddr, daddr;
  std::memcpy(&saddr, &f[26], 4);
  std::memcpy(&daddr, &f[30], 4);
  EXPECT_EQ(saddr, host_ip);
  EXPECT_EQ(daddr, guest_ip);
  EXPECT_EQ(Be16(f, 34), 5555);
  EXPECT_EQ(std::vector<uint8_t>(f.begin() + 42, f.end()), back);
  EXPECT_EQ(Checksum(&f[14], 20), 0) << "IPv4 header checksum";
  if (guest_csum) {
    // TUN_F_CSUM is on: the checksum is left to the guest (virtio_net_hdr NEEDS_CSUM,
    // csum_start = UDP header, csum_offset = its checksum field).
    EXPECT_EQ(p[0], 1) << "VIRTIO_NET_HDR_F_NEEDS_CSUM";
    EXPECT_EQ(p[6] | p[7] << 8, 34) << "csum_start";
    EXPECT_EQ(p[8] | p[9] << 8, 6) << "csum_offset";
  } else {
    // Offloads off: a complete UDP checksum (pseudo-header + UDP header + payload).
    EXPECT_EQ(p[0], 0);
    std::vector<uint8_t> ph(f.begin() + 26, f.begin() + 34);
    ph.push_back(0);
    ph.push_back(17);
    Put16(ph, static_cast<uint16_t>(8 + back.size()));
    ph.insert(ph.end(), f.begin() + 34, f.end());
    EXPECT_EQ(Checksum(ph.data(), ph.size()), 0) << "UDP checksum";
  }
  NetStats s = g.dev->stats();
  EXPECT_GE(s.tx_packets, 2u);
  EXPECT_GE(s.rx_packets, 2u);
  EXPECT_EQ(s.tx_errors + s.rx_errors + s.rx_dropped, 0u);
}

INSTANTIATE_TEST_SUITE_P(Offload, TapNetnsTest, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& i) {
                           return i.param ? std::string("GuestCsum") : std::string("NoOffload");
                         });

TEST(TapTest, CreateErrorsNameTheTap) {
  auto d = VirtioNet::Create(NetOptions{"x234567890123456", std::nullopt}, nullptr, nullptr);
  ASSERT_FALSE(d.ok());
  EXPECT_NE(d.status().message().find("'x234567890123456'"), std::string::npos) << d.status();
}

}  // namespace
}  // namespace microvmm::virtio
