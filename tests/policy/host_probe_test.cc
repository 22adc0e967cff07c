#include "migration/policy/host_probe.h"

#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace microvmm::migration {
namespace {

using ::testing::HasSubstr;

std::string Stat(uint64_t user, uint64_t idle, uint64_t iowait) {
  // user nice system idle iowait irq softirq steal guest guest_nice; two CPUs.
  return "cpu  " + std::to_string(user) + " 0 100 " + std::to_string(idle) + " " +
         std::to_string(iowait) +
         " 0 0 0 50 0\ncpu0 1 2 3 4 5 6 7 8 9 10\ncpu1 1 2 3 4 5 6 7 8 9 10\n"
         "intr 12345\nctxt 999\n";
}

TEST(HostProbeTest, ParseProcStat) {
  absl::StatusOr<ProcStatCpu> s = ParseProcStat(Stat(1000, 500, 100));
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->cpus, 2);
  EXPECT_EQ(s->idle, 600u);
  EXPECT_EQ(s->total, 1700u);  // guest (50) is already inside user: not added
  EXPECT_FALSE(ParseProcStat("intr 1\n").ok());
  EXPECT_FALSE(ParseProcStat("cpu  1 x 3 4\ncpu0 1\n").ok());
  EXPECT_FALSE(ParseProcStat("cpu  1 2\ncpu0 1\n").ok());
}

TEST(HostProbeTest, IdleCoresFromDeltas) {
  std::vector<std::string> stats = {Stat(1000, 500, 100), Stat(1100, 800, 100),
                                    Stat(1100, 800, 100), Stat(1500, 800, 100)};
  size_t next = 0;
  HostProbe probe([&](const std::string& path) -> absl::StatusOr<std::string> {
    EXPECT_EQ(path, "/proc/stat");
    return stats[next++];
  });
  absl::StatusOr<double> idle = probe.IdleCores();  // since boot: 600/1700 of 2 CPUs
  ASSERT_TRUE(idle.ok());
  EXPECT_NEAR(*idle, 2.0 * 600 / 1700, 1e-9);
  idle = probe.IdleCores();  // +100 busy, +300 idle: 3/4 of 2 CPUs
  ASSERT_TRUE(idle.ok());
  EXPECT_NEAR(*idle, 1.5, 1e-9);
  idle = probe.IdleCores();  // no time passed: previous value
  ASSERT_TRUE(idle.ok());
  EXPECT_NEAR(*idle, 1.5, 1e-9);
  idle = probe.IdleCores();  // all busy
  ASSERT_TRUE(idle.ok());
  EXPECT_NEAR(*idle, 0.0, 1e-9);
}

TEST(HostProbeTest, CountersGoingBackwardsIsAnError) {
  std::vector<std::string> stats = {Stat(1000, 500, 100), Stat(900, 500, 100)};
  size_t next = 0;
  HostProbe probe([&](const std::string&) -> absl::StatusOr<std::string> {
    return stats[next++];
  });
  ASSERT_TRUE(probe.IdleCores().ok());
  EXPECT_FALSE(probe.IdleCores().ok());
}

TEST(HostProbeTest, FreeMemory) {
  HostProbe probe([](const std::string& path) -> absl::StatusOr<std::string> {
    EXPECT_EQ(path, "/proc/meminfo");
    return std::string("MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   "
                       "20000000 kB\nBuffers: 1 kB\n");
  });
  absl::StatusOr<uint64_t> free = probe.FreeMemoryBytes();
  ASSERT_TRUE(free.ok()) << free.status();
  EXPECT_EQ(*free, 20000000ull * 1024);

  EXPECT_FALSE(ParseMemAvailable("MemTotal: 1 kB\n").ok());
  EXPECT_FALSE(ParseMemAvailable("MemAvailable: 12\n").ok());
  EXPECT_FALSE(ParseMemAvailable("MemAvailable: abc kB\n").ok());
}

TEST(HostProbeTest, ReaderErrorsPropagate) {
  HostProbe probe([](const std::string&) -> absl::StatusOr<std::string> {
    return absl::UnavailableError("no proc");
  });
  EXPECT_EQ(probe.IdleCores().status().code(), absl::StatusCode::kUnavailable);
  EXPECT_EQ(probe.FreeMemoryBytes().status().code(), absl::StatusCode::kUnavailable);
  absl::StatusOr<std::string> missing = HostProbe::ReadProcFile("/nonexistent/stat");
  ASSERT_FALSE(missing.ok());
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("/nonexistent/stat"));
}

// The real files of this host parse and give plausible values.
TEST(HostProbeTest, RealProc) {
  HostProbe probe;
  absl::StatusOr<double> idle = probe.IdleCores();
  ASSERT_TRUE(idle.ok()) << idle.status();
  EXPECT_GE(*idle, 0.0);
  absl::StatusOr<ProcStatCpu> s = ParseProcStat(*HostProbe::ReadProcFile("/proc/stat"));
  ASSERT_TRUE(s.ok());
  EXPECT_LE(*idle, double(s->cpus) + 1e-9);
  absl::StatusOr<uint64_t> free = probe.FreeMemoryBytes();
  ASSERT_TRUE(free.ok()) << free.status();
  EXPECT_GT(*free, 0u);
}

}  // namespace
}  // namespace microvmm::migration
