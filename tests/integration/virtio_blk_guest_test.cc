// KVM integration tests of virtio-blk: the real `vmm` binary with `--disk` runs the virtioblk test
// guest (tests/guest/virtioblk.c: its own minimal virtio-pci driver), and the host checks the
// image file afterwards. Guest exit statuses 30..48 name the failing step (see virtioblk.c).
#include <algorithm>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/util/subprocess.h"

namespace microvmm::testing {
namespace {

constexpr int kSector = 512;
constexpr int kReadSector = 3;
constexpr uint8_t kReadByte = 0xa5;
constexpr int kWriteSector = 5;
constexpr uint8_t kWriteByte = 0x5a;

struct Result {
  std::optional<int> status;
  std::string serial;
  std::string stderr_text;
};

// Every sector a different byte (so a write to the wrong sector or a shifted offset shows),
// except kReadSector, which holds kReadByte.
std::string ImageContents(size_t bytes) {
  std::string img(bytes, '\0');
  for (size_t i = 0; i < bytes; ++i) img[i] = static_cast<char>((i / kSector) * 7 + 1);
  if (bytes >= (kReadSector + 1) * kSector)
    std::fill_n(img.begin() + kReadSector * kSector, kSector, static_cast<char>(kReadByte));
  return img;
}

void WriteFile(const std::string& path, const std::string& data) {
  FILE* f = fopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr) << path;
  ASSERT_EQ(fwrite(data.data(), 1, data.size(), f), data.size());
  ASSERT_EQ(fclose(f), 0);
}

// Index of the first differing sector, -1 if equal (sizes must match too).
long FirstDiffSector(const std::string& a, const std::string& b) {
  if (a.size() != b.size()) return -2;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i] != b[i]) return static_cast<long>(i / kSector);
  return -1;
}

class VirtioBlkGuestTest : public ::testing::Test {
 protected:
  Result RunVmm(std::vector<std::string> flags, absl::Duration timeout = absl::Seconds(60)) {
    std::remove(dir_.File("serial").c_str());
    std::vector<std::string> argv = {Runfile("vmm/vmm"), "--serial", "file:" + dir_.File("serial"),
                                     "--memory", "64"};
    argv.insert(argv.end(), flags.begin(), flags.end());
    Subprocess p(argv, dir_.File("stdout"), dir_.File("stderr"));
    Result r;
    r.status = p.Wait(timeout);
    r.serial = ReadFileOrEmpty(dir_.File("serial"));
    r.stderr_text = ReadFileOrEmpty(dir_.File("stderr"));
    std::remove(dir_.File("stderr").c_str());
    return r;
  }
  std::string GuestArgs(const std::string& extra = "") {
    return absl::StrCat("read=", kReadSector, ":", absl::Hex(kReadByte), " write=", kWriteSector,
                        ":", absl::Hex(kWriteByte), extra);
  }
  TempDir dir_;
};

// Read, write + FLUSH + read-back, GET_ID and an out-of-range read, for each backend option the
// flag offers; then the host sees exactly the one written sector changed.
class DiskOptionsTest : public VirtioBlkGuestTest,
                        public ::testing::WithParamInterface<std::string> {};

TEST_P(DiskOptionsTest, GuestReadsWritesFlushesAndHostSeesOnlyTheWrittenSector) {
  REQUIRE_KVM();
  const std::string img = dir_.File("disk.img");
  const std::string before = ImageContents(1 << 20);
  WriteFile(img, before);
  Result r = RunVmm({"--test-guest", "virtioblk", "--test-guest-args", GuestArgs(" oob"), "--disk",
                     absl::StrCat("path=", img, ",serial=testdisk-01", GetParam())});
  ASSERT_TRUE(r.status.has_value()) << "vmm did not exit";
  EXPECT_EQ(*r.status, 0) << "guest step failed (status 30..48, see virtioblk.c)\n"
                          << r.serial << r.stderr_text;
  EXPECT_NE(r.serial.find("capacity=2048\n"), std::string::npos) << r.serial;
  EXPECT_NE(r.serial.find("read ok sector=3\n"), std::string::npos) << r.serial;
  EXPECT_NE(r.serial.find("write ok sector=5\n"), std::string::npos) << r.serial;
  EXPECT_NE(r.serial.find("serial=testdisk-01\n"), std::string::npos) << r.serial;
  EXPECT_NE(r.serial.find("oob refused\n"), std::string::npos) << r.serial;
  EXPECT_NE(r.serial.find("virtio-blk ok\n"), std::string::npos) << r.serial;

  std::string want = before;
  std::fill_n(want.begin() + kWriteSector * kSector, kSector, static_cast<char>(kWriteByte));
  const std::string after = ReadFileOrEmpty(img);
  EXPECT_EQ(FirstDiffSector(after, want), -1)
      << "image differs from the expected one (-2: size " << after.size() << ")";
}

INSTANTIATE_TEST_SUITE_P(Backends, DiskOptionsTest,
                         ::testing::Values("", ",engine=sync", ",engine=io_uring",
                                           ",direct,engine=sync", ",direct,engine=io_uring"),
                         [](const ::testing::TestParamInfo<std::string>& p) {
                           std::string n = p.param.empty() ? "default" : p.param.substr(1);
                           for (char& c : n)
                             if (c == ',' || c == '=') c = '_';
                           return n;
                         });

TEST_F(VirtioBlkGuestTest, ReadOnlyDiskRefusesTheWriteAndTheFileIsUnchanged) {
  REQUIRE_KVM();
  const std::string img = dir_.File("ro.img");
  const std::string before = ImageContents(1 << 20);
  WriteFile(img, before);
  // "ro": the guest requires VIRTIO_BLK_F_RO, an IOERR for the write and the old data on read-back.
  Result r = RunVmm({"--test-guest", "virtioblk", "--test-guest-args", GuestArgs(" ro"), "--disk",
                     absl::StrCat("path=", img, ",ro")});
  ASSERT_TRUE(r.status.has_value());
  EXPECT_EQ(*r.status, 0) << r.serial << r.stderr_text;
  EXPECT_NE(r.serial.find("write refused sector=5\n"), std::string::npos) << r.serial;
  EXPECT_EQ(FirstDiffSector(ReadFileOrEmpty(img), before), -1);
}

TEST_F(VirtioBlkGuestTest, WritableDiskDoesNotOfferReadOnly) {
  REQUIRE_KVM();
  const std::string img = dir_.File("rw.img");
  WriteFile(img, ImageContents(1 << 20));
  // The guest is told "ro" but the disk is writable: the guest sees no F_RO and says so (40).
  Result r = RunVmm({"--test-guest", "virtioblk", "--test-guest-args", "ro", "--disk",
                     "path=" + img});
  ASSERT_TRUE(r.status.has_value());
  EXPECT_EQ(*r.status, 40) << r.serial << r.stderr_text;
}

TEST_F(VirtioBlkGuestTest, GuestDetectsDataThatDoesNotMatch) {
  REQUIRE_KVM();
  // Sector 3 holds 0xa5, the guest expects 0x00: the read's data check must fail (status 43),
  // which shows the data really travels from the file into the guest's buffer.
  const std::string img = dir_.File("disk.img");
  WriteFile(img, ImageContents(1 << 20));
  Result r = RunVmm({"--test-guest", "virtioblk", "--test-guest-args", "read=3:00", "--disk",
                     "path=" + img});
  ASSERT_TRUE(r.status.has_value());
  EXPECT_EQ(*r.status, 43) << r.serial << r.stderr_text;
  EXPECT_NE(r.serial.find("virtio-blk FAIL read sector=3 byte=0 got=0xa5"), std::string::npos)
      << r.serial;
}

TEST_F(VirtioBlkGuestTest, SecondDiskIsTheSecondFunction) {
  REQUIRE_KVM();
  const std::string a = dir_.File("a.img"), b = dir_.File("b.img");
  WriteFile(a, ImageContents(1 << 20));
  std::string bimg(2 << 20, '\x3c');
  WriteFile(b, bimg);
  Result r = RunVmm({"--test-guest", "virtioblk", "--test-guest-args", "disk=1 read=7:3c write=9:c3",
                     "--disk", "path=" + a, "--disk", "path=" + b + ",serial=second"});
  ASSERT_TRUE(r.status.has_value());
  EXPECT_EQ(*r.status, 0) << r.serial << r.stderr_text;
  EXPECT_NE(r.serial.find("capacity=4096\n"), std::string::npos) << r.serial;
  EXPECT_NE(r.serial.find("serial=second\n"), std::string::npos) << r.serial;
  std::fill_n(bimg.begin() + 9 * kSector, kSector, '\xc3');
  EXPECT_EQ(FirstDiffSector(ReadFileOrEmpty(b), bimg), -1);
  EXPECT_EQ(FirstDiffSector(ReadFileOrEmpty(a), ImageContents(1 << 20)), -1) << "wrong disk written";
}

TEST_F(VirtioBlkGuestTest, NoDiskNoDevice) {
  REQUIRE_KVM();
  Result r = RunVmm({"--test-guest", "virtioblk"});
  ASSERT_TRUE(r.status.has_value());
  EXPECT_EQ(*r.status, 31) << r.serial << r.stderr_text;
}

// Bad --disk input: one clear error line, status 1, the guest never runs.
class DiskBadInputTest : public VirtioBlkGuestTest {
 protected:
  void ExpectRejected(const std::string& disk_spec, const std::vector<std::string>& needles) {
    Result r = RunVmm({"--test-guest", "virtioblk", "--disk", disk_spec}, absl::Seconds(20));
    ASSERT_TRUE(r.status.has_value());
    EXPECT_EQ(*r.status, 1) << r.stderr_text;
    EXPECT_NE(r.stderr_text.find("vmm: error: "), std::string::npos) << r.stderr_text;
    for (const std::string& n : needles)
      EXPECT_NE(r.stderr_text.find(n), std::string::npos) << "no '" << n << "' in:\n"
                                                          << r.stderr_text;
    EXPECT_EQ(CountOccurrences(r.stderr_text, "\n"), 1) << "not one line:\n" << r.stderr_text;
    EXPECT_EQ(r.serial, "") << "guest output despite the error";
  }
};

TEST_F(DiskBadInputTest, MissingImage) {
  REQUIRE_KVM();  // the image may only be opened once the VM is being built
  // The message must name the file; its wording ("No such file", "does not exist") is free.
  ExpectRejected("path=" + dir_.File("nope.img"), {dir_.File("nope.img")});
}

TEST_F(DiskBadInputTest, SizeNotAMultipleOf512) {
  REQUIRE_KVM();
  WriteFile(dir_.File("odd.img"), std::string(1000, 'x'));
  ExpectRejected("path=" + dir_.File("odd.img"), {dir_.File("odd.img"), "512"});
}

}  // namespace
}  // namespace microvmm::testing
