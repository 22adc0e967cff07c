#include "vmm/device_spec.h"

#include "gtest/gtest.h"

namespace microvmm {
namespace {

TEST(DeviceSpecTest, DiskFullAndBare) {
  auto d = ParseDiskSpec("path=/img/a.raw,ro,direct,serial=disk0,engine=sync");
  ASSERT_TRUE(d.ok()) << d.status();
  EXPECT_EQ(d->path(), "/img/a.raw");
  EXPECT_TRUE(d->read_only());
  EXPECT_TRUE(d->direct());
  EXPECT_EQ(d->serial(), "disk0");
  EXPECT_EQ(d->engine(), DiskConfig::SYNC);
  auto bare = ParseDiskSpec("rel/b.img");
  ASSERT_TRUE(bare.ok()) << bare.status();
  EXPECT_EQ(bare->path(), "rel/b.img");
  EXPECT_FALSE(bare->read_only());
  EXPECT_EQ(bare->engine(), DiskConfig::IO_URING);
}

TEST(DeviceSpecTest, DiskErrorsNameTheProblem) {
  struct Case {
    const char* spec;
    const char* want;
  } cases[] = {
      {"", "needs a value"},
      {"ro", "no path"},
      {"path=a,path=b", "given twice"},
      {"path=a,,ro", "empty field"},
      {"path=a,engine=aio", "engine=io_uring or engine=sync"},
      {"path=a,ro=1", "takes no value"},
      {"path=a,cache=none", "unknown"},
      {"path=", "needs a value"},
  };
  for (const Case& c : cases) {
    auto d = ParseDiskSpec(c.spec);
    ASSERT_FALSE(d.ok()) << c.spec;
    EXPECT_NE(d.status().message().find(c.want), absl::string_view::npos)
        << c.spec << " -> " << d.status().message();
  }
}

TEST(DeviceSpecTest, Net) {
  auto n = ParseNetSpec("tap=tap0,mac=52:54:00:12:34:56");
  ASSERT_TRUE(n.ok()) << n.status();
  EXPECT_EQ(n->tap(), "tap0");
  EXPECT_EQ(n->mac(), "52:54:00:12:34:56");
  EXPECT_EQ(ParseNetSpec("tap1")->tap(), "tap1");
  EXPECT_FALSE(ParseNetSpec("mac=52:54:00:12:34:56").ok());
  EXPECT_FALSE(ParseNetSpec("tap=a,queues=2").ok());
}

TEST(DeviceSpecTest, Balloon) {
  auto on = ParseBalloonSpec("on");
  ASSERT_TRUE(on.ok());
  EXPECT_EQ(on->target_mib(), 0u);
  auto b = ParseBalloonSpec("target=1G,deflate-on-oom,reporting,hinting,stats=5");
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(b->target_mib(), 1024u);
  EXPECT_TRUE(b->deflate_on_oom());
  EXPECT_TRUE(b->free_page_reporting());
  EXPECT_TRUE(b->free_page_hinting());
  EXPECT_EQ(b->stats_interval_s(), 5u);
  EXPECT_FALSE(ParseBalloonSpec("target=lots").ok());
  EXPECT_FALSE(ParseBalloonSpec("stats=-1").ok());
  EXPECT_FALSE(ParseBalloonSpec("inflate").ok());
}

TEST(DeviceSpecTest, Vsock) {
  auto v = ParseVsockSpec("cid=3,uds=/tmp/v.sock");
  ASSERT_TRUE(v.ok()) << v.status();
  EXPECT_EQ(v->guest_cid(), 3u);
  EXPECT_EQ(v->uds_path(), "/tmp/v.sock");
  EXPECT_FALSE(ParseVsockSpec("cid=3").ok());
  EXPECT_FALSE(ParseVsockSpec("uds=/x").ok());
  EXPECT_FALSE(ParseVsockSpec("cid=x,uds=/x").ok());
}

TEST(DeviceSpecTest, VfioUser) {
  auto a = ParseVfioUserSpec("/run/dev.sock");
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->socket(), "/run/dev.sock");
  auto b = ParseVfioUserSpec("socket=/run/dev.sock");
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(b->socket(), "/run/dev.sock");
  EXPECT_FALSE(ParseVfioUserSpec("").ok());
  EXPECT_FALSE(ParseVfioUserSpec("socket=").ok());
}

TEST(DeviceSpecTest, SizeMib) {
  EXPECT_EQ(*ParseSizeMib("512", "--x"), 512u);
  EXPECT_EQ(*ParseSizeMib("2G", "--x"), 2048u);
  EXPECT_EQ(*ParseSizeMib("64m", "--x"), 64u);
  auto bad = ParseSizeMib("-1", "--memory");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("--memory"), absl::string_view::npos);
}

}  // namespace
}  // namespace microvmm
