// Userfaultfd wrapper and PageStateMap against the real kernel (root; no KVM).
#include "migration/postcopy/uffd.h"

#include <linux/userfaultfd.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "migration/postcopy/page_state.h"
#include "vmm/memory/guest_memory.h"

namespace microvmm::migration {
namespace {

constexpr uint64_t kPage = 4096;

struct ShmArea {
  ScopedFd fd;
  ScopedMmap map;
  uint8_t* p = nullptr;
  explicit ShmArea(uint64_t size) {
    fd.reset(memfd_create("uffd-test", MFD_CLOEXEC));
    EXPECT_EQ(ftruncate(fd.get(), size), 0);
    void* m = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd.get(), 0);
    EXPECT_NE(m, MAP_FAILED);
    map = ScopedMmap(m, size);
    p = static_cast<uint8_t*>(m);
  }
};

TEST(UserfaultfdTest, ReportsMissingFeaturesByName) {
  auto avail = Userfaultfd::AvailableFeatures();
  ASSERT_TRUE(avail.ok()) << avail.status();
  EXPECT_TRUE(*avail & UFFD_FEATURE_THREAD_ID);
  auto u = Userfaultfd::Open(UFFD_FEATURE_THREAD_ID | (1ULL << 62));
  ASSERT_FALSE(u.ok());
  EXPECT_EQ(u.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(u.status().message().find("bit62"), absl::string_view::npos) << u.status();
  EXPECT_EQ(Userfaultfd::FeatureNames(UFFD_FEATURE_THREAD_ID | UFFD_FEATURE_MINOR_SHMEM),
            "THREAD_ID|MINOR_SHMEM");
}

TEST(UserfaultfdTest, CopyThenEexistIsNotAnError) {
  auto u = Userfaultfd::Open(UFFD_FEATURE_THREAD_ID);
  ASSERT_TRUE(u.ok()) << u.status();
  ShmArea a(4 * kPage);
  auto ioctls = u->Register(a.p, 4 * kPage, Userfaultfd::kMissing);
  ASSERT_TRUE(ioctls.ok()) << ioctls.status();
  EXPECT_TRUE(*ioctls & (1ULL << _UFFDIO_COPY));
  std::vector<uint8_t> src(kPage, 0x5a);
  auto r = u->Copy(a.p, src.data(), kPage);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(*r);
  std::vector<uint8_t> other(kPage, 0x11);
  r = u->Copy(a.p, other.data(), kPage);  // already there: EEXIST -> false, content unchanged
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_FALSE(*r);
  EXPECT_EQ(a.p[100], 0x5a);
  // Multi-page copy over a range whose first page exists: the rest still gets populated.
  std::vector<uint8_t> two(3 * kPage, 0x77);
  r = u->Copy(a.p, two.data(), 3 * kPage);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_FALSE(*r);
  EXPECT_EQ(a.p[0], 0x5a);
  EXPECT_EQ(a.p[kPage + 1], 0x77);
  EXPECT_EQ(a.p[2 * kPage + 1], 0x77);
  r = u->ZeroPage(a.p + 3 * kPage, kPage);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(*r);
  EXPECT_EQ(a.p[3 * kPage + 5], 0);
  Userfaultfd::Event ev[4];
  auto n = u->ReadEvents(ev);
  ASSERT_TRUE(n.ok());
  EXPECT_EQ(*n, 0u);  // nothing faulted: non-blocking read returns no event
  EXPECT_TRUE(u->Unregister(a.p, 4 * kPage).ok());
}

TEST(UserfaultfdTest, FaultEventCarriesThreadIdAndWriteFlag) {
  auto u = Userfaultfd::Open(UFFD_FEATURE_THREAD_ID);
  ASSERT_TRUE(u.ok()) << u.status();
  ShmArea a(2 * kPage);
  ASSERT_TRUE(u->Register(a.p, 2 * kPage, Userfaultfd::kMissing).ok());
  std::atomic<pid_t> tid{0};
  std::atomic<bool> done{false};
  std::thread t([&] {
    tid = gettid();
    a.p[kPage + 8] = 0x42;  // write fault on page 1, blocks until resolved
    done = true;
  });
  Userfaultfd::Event ev[4];
  size_t n = 0;
  while (n == 0) {
    auto r = u->ReadEvents(ev);
    ASSERT_TRUE(r.ok());
    n = *r;
    if (n == 0) usleep(1000);
  }
  ASSERT_EQ(n, 1u);
  EXPECT_EQ(ev[0].address, reinterpret_cast<uint64_t>(a.p + kPage));
  EXPECT_TRUE(ev[0].write());
  EXPECT_FALSE(ev[0].minor());
  EXPECT_EQ(ev[0].tid, tid.load());
  EXPECT_FALSE(done.load());
  std::vector<uint8_t> src(kPage, 0x01);
  ASSERT_TRUE(u->Copy(a.p + kPage, src.data(), kPage).ok());
  t.join();
  EXPECT_EQ(a.p[kPage + 8], 0x42);
  EXPECT_EQ(a.p[kPage + 9], 0x01);
}

TEST(UserfaultfdTest, MinorFaultAndContinue) {
  auto u = Userfaultfd::Open(UFFD_FEATURE_THREAD_ID | UFFD_FEATURE_MINOR_SHMEM);
  ASSERT_TRUE(u.ok()) << u.status();
  ShmArea a(kPage);
  memset(a.p, 0x33, kPage);  // page in the page cache
  ASSERT_EQ(madvise(a.p, kPage, MADV_DONTNEED), 0);  // drop the PTE only
  ASSERT_TRUE(u->Register(a.p, kPage, Userfaultfd::kMinor).ok());
  std::atomic<int> seen{-1};
  std::thread t([&] { seen = a.p[7]; });
  Userfaultfd::Event ev[1];
  size_t n = 0;
  while (n == 0) {
    auto r = u->ReadEvents(ev);
    ASSERT_TRUE(r.ok());
    if ((n = *r) == 0) usleep(1000);
  }
  EXPECT_TRUE(ev[0].minor());
  auto r = u->Continue(a.p, kPage);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(*r);
  t.join();
  EXPECT_EQ(seen.load(), 0x33);
  r = u->Continue(a.p, kPage);  // PTE already there: EEXIST -> false
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_FALSE(*r);
}

TEST(PageStateMapTest, ClaimAndInstallExactlyOnceAcrossThreads) {
  auto mem = GuestMemory::Create(4 << 20);
  ASSERT_TRUE(mem.ok());
  PageStateMap m(**mem);
  ASSERT_EQ(m.pages(), 1024u);
  m.Set(5, PageState::kZero);
  m.Set(6, PageState::kPresent);
  EXPECT_EQ(m.not_present(), 1023u);
  std::atomic<int> claims{0}, installs{0};
  std::vector<std::thread> ts;
  for (int t = 0; t < 4; ++t)
    ts.emplace_back([&] {
      for (uint64_t i = 0; i < m.pages(); ++i) {
        if (m.TryClaim(i)) claims++;
        if (m.BeginInstall(i)) {
          installs++;
          m.MarkPresent(i);
        }
      }
    });
  for (auto& t : ts) t.join();
  EXPECT_EQ(claims.load(), 1023);
  EXPECT_EQ(installs.load(), 1023);
  EXPECT_EQ(m.not_present(), 0u);
  EXPECT_EQ(m.Count(PageState::kPresent), 1024u);
  EXPECT_FALSE(m.TryClaim(6));
  EXPECT_EQ(m.IndexOf(5 * kPage + 17), 5u);
  EXPECT_EQ(m.GpaOf(5), 5 * kPage);
  EXPECT_FALSE(m.IndexOf(4 << 20).has_value());
}

}  // namespace
}  // namespace microvmm::migration
