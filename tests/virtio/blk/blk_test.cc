// Tests of devices/virtio/blk (virtio-blk) driven through a real Virtqueue laid out by the test
// driver in GuestMemory, with a real EventLoop, for both engines (io_uring and sync). Data is
// checked against the disk image on the host. No KVM.
#include "devices/virtio/blk/blk.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "tests/virtio/virtq_driver.h"
#include "vmm/event_loop.h"
#include "vmm/memory/guest_memory.h"

namespace microvmm::virtio {
namespace {

using testing::Seg;
using testing::TestDriver;
using testing::UsedElem;
using Engine = BlockOptions::Engine;

constexpr uint64_t kMiB = 1ULL << 20;
constexpr uint64_t kDiskBytes = 1 * kMiB;
constexpr uint64_t kDiskSectors = kDiskBytes / 512;
constexpr uint8_t kUnset = 0xee;  // status byte before the device writes it

uint8_t DiskPattern(uint64_t off) { return static_cast<uint8_t>((off * 13) ^ (off >> 9)); }
std::vector<uint8_t> Pattern(size_t n, uint8_t seed) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = static_cast<uint8_t>(seed + i * 7 + (i >> 8));
  return v;
}

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/blktest.XXXXXX";
    path_ = ::mkdtemp(tmpl);
  }
  ~TempDir() { std::system(("rm -rf " + path_).c_str()); }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

void WriteFile(const std::string& path, uint64_t size, bool pattern = true) {
  int fd = ::open(path.c_str(), O_RDWR | O_CREAT | O_TRUNC, 0644);
  ASSERT_GE(fd, 0);
  std::vector<uint8_t> buf(size);
  for (uint64_t i = 0; i < size; ++i) buf[i] = pattern ? DiskPattern(i) : 0;
  ASSERT_EQ(::pwrite(fd, buf.data(), size, 0), static_cast<ssize_t>(size));
  ::close(fd);
}

std::vector<uint8_t> ReadFile(const std::string& path, uint64_t off, size_t n) {
  std::vector<uint8_t> v(n);
  int fd = ::open(path.c_str(), O_RDONLY);
  EXPECT_GE(fd, 0);
  EXPECT_EQ(::pread(fd, v.data(), n, static_cast<off_t>(off)), static_cast<ssize_t>(n));
  ::close(fd);
  return v;
}

std::vector<uint8_t> DiskAt(uint64_t off, size_t n) {
  std::vector<uint8_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = DiskPattern(off + i);
  return v;
}

// One virtio-blk request as a driver lays it out: header, data segments, status byte.
struct Req {
  uint16_t head = 0;
  uint64_t status_gpa = 0;
  std::vector<Seg> data;
};

// RAM + loop + disk + device + queue + driver.
class Rig {
 public:
  explicit Rig(Engine engine, BlockOptions opts = {}, uint64_t disk_bytes = kDiskBytes) {
    auto m = GuestMemory::Create(16 * kMiB);
    EXPECT_TRUE(m.ok()) << m.status();
    mem = std::move(*m);
    auto l = EventLoop::Create("blk-test");
    EXPECT_TRUE(l.ok()) << l.status();
    loop = std::move(*l);
    if (opts.path.empty()) {
      opts.path = dir.path() + "/disk.img";
      WriteFile(opts.path, disk_bytes);
    }
    opts.engine = engine;
    path = opts.path;
    auto d = VirtioBlock::Create(opts, mem.get(), loop.get());
    create_status = d.status();
    if (d.ok()) dev = std::move(*d);
    NewQueue();
  }
  ~Rig() {
    dev.reset();  // before the loop and memory
  }

  void NewQueue() {
    q = std::make_unique<Virtqueue>(mem.get(), 0, VirtioBlock::kQueueSize);
    drv = std::make_unique<TestDriver>(mem.get(), VirtioBlock::kQueueSize);
  }
  // Driver setup + device activation.
  void Activate(uint64_t features = 0) {
    ASSERT_NE(dev, nullptr) << create_status;
    if (features == 0) features = dev->device_features();
    ASSERT_TRUE(drv->Configure(*q, features).ok());
    Virtqueue* qs[] = {q.get()};
    ASSERT_TRUE(dev->Activate(features, qs, [this](uint16_t) { ++signals; }).ok());
  }

  uint64_t Alloc(uint64_t n, uint64_t align = 512) {
    next_ = (next_ + align - 1) & ~(align - 1);
    uint64_t g = next_;
    next_ += n;
    EXPECT_LE(next_, mem->ram_bytes());
    return g;
  }

  // Publishes a request. `data` are the data segments (write flag as given).
  Req Add(uint32_t type, uint64_t sector, std::vector<Seg> data, bool with_status = true) {
    Req r;
    uint64_t hdr = Alloc(16, 16);
    uint8_t h[16] = {};
    std::memcpy(h, &type, 4);
    std::memcpy(h + 8, &sector, 8);
    EXPECT_TRUE(mem->Write(hdr, h, 16).ok());
    std::vector<Seg> segs = {{hdr, 16, false}};
    for (const Seg& s : data) segs.push_back(s);
    if (with_status) {
      r.status_gpa = Alloc(1, 1);
      EXPECT_TRUE(mem->Write(r.status_gpa, &kUnset, 1).ok());
      segs.push_back({r.status_gpa, 1, true});
    }
    r.data = data;
    r.head = drv->AddChain(segs);
    return r;
  }
  // A read of `n` bytes split into `pieces` buffers.
  Req Read(uint64_t sector, uint64_t n, int pieces = 1) {
    std::vector<Seg> segs;
    for (int i = 0; i < pieces; ++i) {
      uint64_t len = n / pieces + (i == pieces - 1 ? n % pieces : 0);
      segs.push_back({Alloc(len), static_cast<uint32_t>(len), true});
    }
    return Add(VIRTIO_BLK_T_IN, sector, segs);
  }
  Req Write(uint64_t sector, const std::vector<uint8_t>& bytes, int pieces = 1) {
    std::vector<Seg> segs;
    size_t off = 0;
    for (int i = 0; i < pieces; ++i) {
      size_t len = bytes.size() / pieces + (i == pieces - 1 ? bytes.size() % pieces : 0);
      uint64_t g = Alloc(len);
      EXPECT_TRUE(mem->Write(g, bytes.data() + off, len).ok());
      off += len;
      segs.push_back({g, static_cast<uint32_t>(len), false});
    }
    return Add(VIRTIO_BLK_T_OUT, sector, segs);
  }
  // Discard / write-zeroes with one segment.
  Req Range(uint32_t type, uint64_t sector, uint32_t num, uint32_t flags, int nsegs = 1) {
    uint64_t g = Alloc(16 * nsegs, 16);
    for (int i = 0; i < nsegs; ++i) {
      uint8_t s[16];
      std::memcpy(s, &sector, 8);
      std::memcpy(s + 8, &num, 4);
      std::memcpy(s + 12, &flags, 4);
      EXPECT_TRUE(mem->Write(g + 16 * i, s, 16).ok());
    }
    return Add(type, 0, {{g, static_cast<uint32_t>(16 * nsegs), false}});
  }

  void Kick() { dev->ProcessQueue(0); }
  // Waits (up to 10 s) for the next used element.
  std::optional<UsedElem> WaitUsed() {
    for (int i = 0; i < 10000; ++i) {
      if (auto e = drv->GetUsed()) return e;
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    return std::nullopt;
  }
  // Kicks and waits for `n` completions; returns them in completion order.
  std::vector<UsedElem> Complete(size_t n) {
    Kick();
    std::vector<UsedElem> v;
    for (size_t i = 0; i < n; ++i) {
      auto e = WaitUsed();
      if (!e) {
        ADD_FAILURE() << "request not completed";
        break;
      }
      v.push_back(*e);
    }
    return v;
  }
  UsedElem RunOne() {
    auto v = Complete(1);
    return v.empty() ? UsedElem{0xffff, 0} : v[0];
  }
  uint8_t Status(const Req& r) {
    uint8_t s = 0;
    EXPECT_TRUE(mem->Read(r.status_gpa, &s, 1).ok());
    return s;
  }
  std::vector<uint8_t> Data(const Req& r) {
    std::vector<uint8_t> out;
    for (const Seg& s : r.data) {
      std::vector<uint8_t> b(s.len);
      EXPECT_TRUE(mem->Read(s.gpa, b.data(), s.len).ok());
      out.insert(out.end(), b.begin(), b.end());
    }
    return out;
  }

  TempDir dir;
  std::string path;
  std::unique_ptr<GuestMemory> mem;
  std::unique_ptr<EventLoop> loop;
  absl::Status create_status;
  std::unique_ptr<VirtioBlock> dev;
  std::unique_ptr<Virtqueue> q;
  std::unique_ptr<TestDriver> drv;
  std::atomic<int> signals{0};

 private:
  uint64_t next_ = 0x100000;
};

class BlkTest : public ::testing::TestWithParam<Engine> {};

std::string EngineName(const ::testing::TestParamInfo<Engine>& i) {
  return i.param == Engine::kIoUring ? "IoUring" : "Sync";
}

TEST_P(BlkTest, FeaturesAndConfig) {
  Rig rig(GetParam());
  ASSERT_NE(rig.dev, nullptr) << rig.create_status;
  uint64_t f = rig.dev->device_features();
  for (int bit : {kFeatureVersion1, kFeatureIndirectDesc, kFeatureEventIdx, VIRTIO_BLK_F_SEG_MAX,
                  VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_DISCARD,
                  VIRTIO_BLK_F_WRITE_ZEROES})
    EXPECT_TRUE(f >> bit & 1) << bit;
  EXPECT_FALSE(f >> VIRTIO_BLK_F_RO & 1);
  EXPECT_FALSE(f >> VIRTIO_BLK_F_MQ & 1);
  EXPECT_EQ(rig.dev->device_type(), kDeviceIdBlock);
  EXPECT_EQ(rig.dev->queue_max_sizes(), std::vector<uint32_t>{256});
  ASSERT_EQ(rig.dev->config_size(), sizeof(virtio_blk_config));

  virtio_blk_config c;
  rig.dev->ReadConfig(0, std::span<uint8_t>(reinterpret_cast<uint8_t*>(&c), sizeof(c)));
  EXPECT_EQ(c.capacity, kDiskSectors);
  EXPECT_EQ(c.blk_size, 512u);
  EXPECT_EQ(c.seg_max, VirtioBlock::kSegMax);
  EXPECT_EQ(c.max_discard_seg, 1u);
  EXPECT_EQ(c.discard_sector_alignment, 1u);
  EXPECT_EQ(c.max_write_zeroes_seg, 1u);
  EXPECT_GT(c.max_discard_sectors, 0u);
  // Piecewise reads (as a driver does) and reads past the end.
  uint8_t cap[8];
  rig.dev->ReadConfig(0, std::span<uint8_t>(cap, 4));
  rig.dev->ReadConfig(4, std::span<uint8_t>(cap + 4, 4));
  uint64_t capacity;
  std::memcpy(&capacity, cap, 8);
  EXPECT_EQ(capacity, kDiskSectors);
  uint8_t past[4] = {1, 1, 1, 1};
  rig.dev->ReadConfig(sizeof(c) - 2, std::span<uint8_t>(past, 4));
  EXPECT_EQ(past[2], 0);
  rig.dev->ReadConfig(1 << 20, std::span<uint8_t>(past, 4));
  EXPECT_EQ(past[0], 0);
}

TEST_P(BlkTest, ReadReturnsFileData) {
  Rig rig(GetParam());
  rig.Activate();
  Req r = rig.Read(7, 3 * 4096, 3);
  UsedElem e = rig.RunOne();
  EXPECT_EQ(e.id, r.head);
  EXPECT_EQ(e.len, 3 * 4096 + 1u);
  EXPECT_EQ(rig.Status(r), VIRTIO_BLK_S_OK);
  EXPECT_EQ(rig.Data(r), DiskAt(7 * 512, 3 * 4096));
  BlockStats s = rig.dev->stats();
  EXPECT_EQ(s.reads, 1u);
  EXPECT_EQ(s.bytes_read, 3 * 4096u);
  EXPECT_EQ(s.errors, 0u);
  EXPECT_GE(rig.signals.load(), 1);
}

TEST_P(BlkTest, ReadMarksGuestPagesDirty) {
  Rig rig(GetParam());
  rig.Activate();
  uint64_t buf = rig.Alloc(8192, 4096);
  for (size_t i = 0; i < rig.mem->regions().size(); ++i) rig.mem->TakeDirty(i);
  ASSERT_FALSE(rig.mem->TestDirty(buf));
  ASSERT_FALSE(rig.mem->TestDirty(buf + 4096));
  rig.Add(VIRTIO_BLK_T_IN, 0, {{buf, 8192, true}});
  // Clear what the driver's own writes dirtied, then let the device work.
  for (size_t i = 0; i < rig.mem->regions().size(); ++i) rig.mem->TakeDirty(i);
  rig.RunOne();
  EXPECT_TRUE(rig.mem->TestDirty(buf));
  EXPECT_TRUE(rig.mem->TestDirty(buf + 4096));
}

TEST_P(BlkTest, WriteReachesFileAndReadsBack) {
  Rig rig(GetParam());
  rig.Activate();
  std::vector<uint8_t> data = Pattern(5 * 1024, 42);  // 10 sectors in 3 uneven pieces
  Req w = rig.Write(100, data, 3);
  UsedElem e = rig.RunOne();
  EXPECT_EQ(e.id, w.head);
  EXPECT_EQ(e.len, 1u);  // only the status byte is written
  EXPECT_EQ(rig.Status(w), VIRTIO_BLK_S_OK);
  EXPECT_EQ(ReadFile(rig.path, 100 * 512, data.size()), data);
  // Neighbours untouched.
  EXPECT_EQ(ReadFile(rig.path, 99 * 512, 512), DiskAt(99 * 512, 512));
  EXPECT_EQ(ReadFile(rig.path, 110 * 512, 512), DiskAt(110 * 512, 512));
  Req r = rig.Read(100, data.size(), 2);
  rig.RunOne();
  EXPECT_EQ(rig.Data(r), data);
  BlockStats s = rig.dev->stats();
  EXPECT_EQ(s.writes, 1u);
  EXPECT_EQ(s.bytes_written, data.size());
  EXPECT_EQ(s.requests, 2u);
}

TEST_P(BlkTest, LastSectorIsReachable) {
  Rig rig(GetParam());
  rig.Activate();
  Req r = rig.Read(kDiskSectors - 1, 512);
  rig.RunOne();
  EXPECT_EQ(rig.Status(r), VIRTIO_BLK_S_OK);
  EXPECT_EQ(rig.Data(r), DiskAt(kDiskBytes - 512, 512));
}

TEST_P(BlkTest, IndirectChain) {
  Rig rig(GetParam());
  rig.Activate();
  uint64_t hdr = rig.Alloc(16, 16), data = rig.Alloc(2048), st = rig.Alloc(1, 1);
  uint32_t type = VIRTIO_BLK_T_IN;
  uint64_t sector = 3;
  ASSERT_TRUE(rig.mem->Write(hdr, &type, 4).ok());
  ASSERT_TRUE(rig.mem->Write(hdr + 8, &sector, 8).ok());
  rig.drv->AddIndirectChain({{hdr, 16, false}, {data, 1024, true}, {data + 1024, 1024, true},
                             {st, 1, true}},
                            rig.Alloc(64, 16));
  rig.RunOne();
  std::vector<uint8_t> got(2048);
  ASSERT_TRUE(rig.mem->Read(data, got.data(), got.size()).ok());
  EXPECT_EQ(got, DiskAt(3 * 512, 2048));
}

TEST_P(BlkTest, HeaderDataAndStatusSharingBuffers) {
  // Any layout is allowed: one readable buffer with header + data, one writable buffer with
  // data + status.
  Rig rig(GetParam());
  rig.Activate();
  std::vector<uint8_t> data = Pattern(1024, 9);
  uint64_t out = rig.Alloc(16 + 1024, 16);
  uint32_t type = VIRTIO_BLK_T_OUT;
  uint64_t sector = 20;
  ASSERT_TRUE(rig.mem->Write(out, &type, 4).ok());
  ASSERT_TRUE(rig.mem->Write(out + 8, &sector, 8).ok());
  ASSERT_TRUE(rig.mem->Write(out + 16, data.data(), data.size()).ok());
  uint64_t st = rig.Alloc(1, 1);
  rig.drv->AddChain({{out, 16 + 1024, false}, {st, 1, true}});
  rig.RunOne();
  EXPECT_EQ(ReadFile(rig.path, 20 * 512, 1024), data);

  uint64_t hdr = rig.Alloc(16, 16);
  type = VIRTIO_BLK_T_IN;
  ASSERT_TRUE(rig.mem->Write(hdr, &type, 4).ok());
  ASSERT_TRUE(rig.mem->Write(hdr + 8, &sector, 8).ok());
  uint64_t in = rig.Alloc(1025);
  rig.drv->AddChain({{hdr, 16, false}, {in, 1025, true}});
  UsedElem e = rig.RunOne();
  EXPECT_EQ(e.len, 1025u);
  std::vector<uint8_t> got(1025);
  ASSERT_TRUE(rig.mem->Read(in, got.data(), got.size()).ok());
  EXPECT_EQ(got[1024], VIRTIO_BLK_S_OK);
  got.resize(1024);
  EXPECT_EQ(got, data);
}

TEST_P(BlkTest, Flush) {
  Rig rig(GetParam());
  rig.Activate();
  rig.Write(0, Pattern(512, 1));
  Req f = rig.Add(VIRTIO_BLK_T_FLUSH, 0, {});
  rig.Complete(2);
  EXPECT_EQ(rig.Status(f), VIRTIO_BLK_S_OK);
  EXPECT_EQ(rig.dev->stats().flushes, 1u);
}

TEST_P(BlkTest, GetIdDefaultSerialIsTruncatedBasename) {
  TempDir d;
  BlockOptions o;
  o.path = d.path() + "/a-rather-long-disk-image-name.img";
  WriteFile(o.path, 4096);
  Rig rig(GetParam(), o);
  rig.Activate();
  EXPECT_EQ(rig.dev->serial(), "a-rather-long-disk-i");
  uint64_t buf = rig.Alloc(20);
  Req r = rig.Add(VIRTIO_BLK_T_GET_ID, 0, {{buf, 20, true}});
  UsedElem e = rig.RunOne();
  EXPECT_EQ(e.len, 21u);
  EXPECT_EQ(rig.Status(r), VIRTIO_BLK_S_OK);
  std::vector<uint8_t> id = rig.Data(r);
  EXPECT_EQ(std::string(id.begin(), id.end()), "a-rather-long-disk-i");
}

TEST_P(BlkTest, GetIdShortSerialIsNulPadded) {
  TempDir d;
  BlockOptions o;
  o.path = d.path() + "/x.img";
  o.serial = "SN-1";
  WriteFile(o.path, 4096);
  Rig rig(GetParam(), o);
  rig.Activate();
  uint64_t buf = rig.Alloc(20);
  std::vector<uint8_t> junk(20, 0x55);
  ASSERT_TRUE(rig.mem->Write(buf, junk.data(), 20).ok());
  Req r = rig.Add(VIRTIO_BLK_T_GET_ID, 0, {{buf, 20, true}});
  rig.RunOne();
  std::vector<uint8_t> id = rig.Data(r);
  std::vector<uint8_t> want(20, 0);
  std::memcpy(want.data(), "SN-1", 4);
  EXPECT_EQ(id, want);
}

TEST_P(BlkTest, DiscardPunchesHole) {
  Rig rig(GetParam());
  rig.Activate();
  Req r = rig.Range(VIRTIO_BLK_T_DISCARD, 16, 16, 0);
  rig.RunOne();
  EXPECT_EQ(rig.Status(r), VIRTIO_BLK_S_OK);
  EXPECT_EQ(rig.dev->stats().discards, 1u);
  // ext4/tmpfs punch the hole: the range reads zeros, the rest is intact, size unchanged.
  EXPECT_EQ(ReadFile(rig.path, 16 * 512, 16 * 512), std::vector<uint8_t>(16 * 512, 0));
  EXPECT_EQ(ReadFile(rig.path, 15 * 512, 512), DiskAt(15 * 512, 512));
  EXPECT_EQ(ReadFile(rig.path, 32 * 512, 512), DiskAt(32 * 512, 512));
  struct stat st;
  ASSERT_EQ(::stat(rig.path.c_str(), &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), kDiskBytes);
}

TEST_P(BlkTest, WriteZeroesWithAndWithoutUnmap) {
  Rig rig(GetParam());
  rig.Activate();
  Req a = rig.Range(VIRTIO_BLK_T_WRITE_ZEROES, 40, 3, 0);
  Req b = rig.Range(VIRTIO_BLK_T_WRITE_ZEROES, 60, 9, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
  rig.Complete(2);
  EXPECT_EQ(rig.Status(a), VIRTIO_BLK_S_OK);
  EXPECT_EQ(rig.Status(b), VIRTIO_BLK_S_OK);
  EXPECT_EQ(ReadFile(rig.path, 40 * 512, 3 * 512), std::vector<uint8_t>(3 * 512, 0));
  EXPECT_EQ(ReadFile(rig.path, 60 * 512, 9 * 512), std::vector<uint8_t>(9 * 512, 0));
  EXPECT_EQ(ReadFile(rig.path, 43 * 512, 512), DiskAt(43 * 512, 512));
  EXPECT_EQ(ReadFile(rig.path, 69 * 512, 512), DiskAt(69 * 512, 512));
  // And through the device.
  Req r = rig.Read(40, 3 * 512);
  rig.RunOne();
  EXPECT_EQ(rig.Data(r), std::vector<uint8_t>(3 * 512, 0));
  EXPECT_EQ(rig.dev->stats().write_zeroes, 2u);
  struct stat st;
  ASSERT_EQ(::stat(rig.path.c_str(), &st), 0);
  EXPECT_EQ(static_cast<uint64_t>(st.st_size), kDiskBytes);
}

TEST_P(BlkTest, DiscardAndWriteZeroesValidation) {
  Rig rig(GetParam());
  rig.Activate();
  struct Case {
    const char* name;
    uint32_t type;
    uint64_t sector;
    uint32_t num, flags;
    int nsegs;
    uint8_t want;
  } cases[] = {
      {"discard with UNMAP", VIRTIO_BLK_T_DISCARD, 0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP, 1,
       VIRTIO_BLK_S_UNSUPP},
      {"write-zeroes unknown flag", VIRTIO_BLK_T_WRITE_ZEROES, 0, 8, 2, 1, VIRTIO_BLK_S_UNSUPP},
      {"two segments", VIRTIO_BLK_T_DISCARD, 0, 8, 0, 2, VIRTIO_BLK_S_IOERR},
      {"past the end", VIRTIO_BLK_T_DISCARD, kDiskSectors - 4, 8, 0, 1, VIRTIO_BLK_S_IOERR},
      {"sector overflow", VIRTIO_BLK_T_WRITE_ZEROES, ~uint64_t{0} - 2, 8, 0, 1,
       VIRTIO_BLK_S_IOERR},
      {"too many sectors", VIRTIO_BLK_T_WRITE_ZEROES, 0, VirtioBlock::kMaxWriteZeroesSectors + 1,
       0, 1, VIRTIO_BLK_S_IOERR},
      {"zero sectors", VIRTIO_BLK_T_DISCARD, 5, 0, 0, 1, VIRTIO_BLK_S_OK},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    Req r = rig.Range(c.type, c.sector, c.num, c.flags, c.nsegs);
    rig.RunOne();
    EXPECT_EQ(rig.Status(r), c.want);
  }
  // Nothing was changed on the disk.
  EXPECT_EQ(ReadFile(rig.path, 0, kDiskBytes), DiskAt(0, kDiskBytes));
  // A segment list missing altogether.
  Req r = rig.Add(VIRTIO_BLK_T_DISCARD, 0, {});
  rig.RunOne();
  EXPECT_EQ(rig.Status(r), VIRTIO_BLK_S_IOERR);
}

TEST_P(BlkTest, SeveralRequestsInFlight) {
  Rig rig(GetParam());
  rig.Activate();
  // All 64 are popped in one ProcessQueue() and go to io_uring as one batch. With the loop
  // paused, only the ones that completed inline during the submission are used right away; the
  // rest wait for the loop (the completion eventfd).
  rig.loop->Pause();
  std::vector<Req> reads, writes;
  for (int i = 0; i < 32; ++i) reads.push_back(rig.Read(static_cast<uint64_t>(i) * 16, 4096, 2));
  for (int i = 0; i < 32; ++i)
    writes.push_back(rig.Write(1024 + static_cast<uint64_t>(i) * 8, Pattern(4096, i)));
  rig.Kick();
  if (GetParam() == Engine::kIoUring) {
    EXPECT_EQ(rig.dev->stats().peak_in_flight, 64u);
    EXPECT_EQ(rig.dev->in_flight() + rig.drv->UsedIdx(), 64u);
  } else {
    EXPECT_EQ(rig.dev->stats().peak_in_flight, 0u);
    EXPECT_EQ(rig.dev->in_flight(), 0u);
    EXPECT_EQ(rig.drv->UsedIdx(), 64);
  }
  rig.loop->Resume();
  std::vector<bool> seen(256);
  for (int i = 0; i < 64; ++i) {
    auto e = rig.WaitUsed();
    ASSERT_TRUE(e.has_value());
    ASSERT_LT(e->id, 256u);
    EXPECT_FALSE(seen[e->id]);
    seen[e->id] = true;
  }
  for (int i = 0; i < 32; ++i) {
    EXPECT_EQ(rig.Status(reads[i]), VIRTIO_BLK_S_OK);
    EXPECT_EQ(rig.Data(reads[i]), DiskAt(i * 16 * 512, 4096)) << i;
    EXPECT_EQ(rig.Status(writes[i]), VIRTIO_BLK_S_OK);
    EXPECT_EQ(ReadFile(rig.path, (1024 + i * 8) * 512, 4096), Pattern(4096, i)) << i;
  }
  EXPECT_EQ(rig.dev->in_flight(), 0u);
  EXPECT_EQ(rig.dev->stats().requests, 64u);
}

TEST_P(BlkTest, ConcurrentProcessQueue) {
  Rig rig(GetParam());
  rig.Activate();
  std::vector<Req> reads;
  for (int i = 0; i < 80; ++i) reads.push_back(rig.Read(static_cast<uint64_t>(i) * 8, 1024));
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&] {
      for (int k = 0; k < 50; ++k) rig.dev->ProcessQueue(0);
    });
  for (auto& t : threads) t.join();
  std::vector<bool> seen(256);
  for (int i = 0; i < 80; ++i) {
    auto e = rig.WaitUsed();
    ASSERT_TRUE(e.has_value()) << i;
    EXPECT_FALSE(seen[e->id]);
    seen[e->id] = true;
  }
  for (int i = 0; i < 80; ++i) EXPECT_EQ(rig.Data(reads[i]), DiskAt(i * 8 * 512, 1024)) << i;
  EXPECT_EQ(rig.dev->stats().requests, 80u);
  EXPECT_EQ(rig.dev->stats().errors, 0u);
}

TEST_P(BlkTest, QuiesceCompletesEverythingWithTheLoopPaused) {
  Rig rig(GetParam());
  rig.Activate();
  rig.loop->Pause();
  std::vector<Req> reads;
  for (int i = 0; i < 16; ++i) reads.push_back(rig.Read(static_cast<uint64_t>(i), 4096));
  rig.Kick();
  rig.dev->Quiesce();
  EXPECT_EQ(rig.dev->in_flight(), 0u);
  EXPECT_EQ(rig.drv->UsedIdx(), 16);  // completed into the used ring without the loop
  for (int i = 0; i < 16; ++i) EXPECT_EQ(rig.Data(reads[i]), DiskAt(i * 512, 4096));
  EXPECT_TRUE(rig.q->InFlightHeads().empty());
  rig.loop->Resume();
}

// ---- Hostile requests -------------------------------------------------------------------------

TEST_P(BlkTest, ShortHeaderIsIoErr) {
  Rig rig(GetParam());
  rig.Activate();
  uint64_t hdr = rig.Alloc(8), st = rig.Alloc(1, 1);
  rig.drv->AddChain({{hdr, 8, false}, {st, 1, true}});
  rig.RunOne();
  uint8_t s = 0;
  ASSERT_TRUE(rig.mem->Read(st, &s, 1).ok());
  EXPECT_EQ(s, VIRTIO_BLK_S_IOERR);
  // Status only, no header at all.
  rig.drv->AddChain({{st, 1, true}});
  rig.RunOne();
  ASSERT_TRUE(rig.mem->Read(st, &s, 1).ok());
  EXPECT_EQ(s, VIRTIO_BLK_S_IOERR);
  EXPECT_EQ(rig.dev->stats().errors, 2u);
  EXPECT_FALSE(rig.q->in_error());
}

TEST_P(BlkTest, NoStatusByteIsReturnedEmpty) {
  Rig rig(GetParam());
  rig.Activate();
  Req r = rig.Add(VIRTIO_BLK_T_IN, 0, {}, /*with_status=*/false);
  UsedElem e = rig.RunOne();
  EXPECT_EQ(e.id, r.head);
  EXPECT_EQ(e.len, 0u);
  EXPECT_EQ(rig.dev->stats().errors, 1u);
  // A read whose only writable buffer would be the data: the last byte becomes the status, the
  // data length (511) is not whole sectors -> IOERR, nothing read.
  uint64_t buf = rig.Alloc(512);
  std::vector<uint8_t> junk(512, 0x77);
  ASSERT_TRUE(rig.mem->Write(buf, junk.data(), 512).ok());
  rig.Add(VIRTIO_BLK_T_IN, 0, {{buf, 512, true}}, /*with_status=*/false);
  rig.RunOne();
  std::vector<uint8_t> got(512);
  ASSERT_TRUE(rig.mem->Read(buf, got.data(), 512).ok());
  EXPECT_EQ(got[511], VIRTIO_BLK_S_IOERR);
  EXPECT_EQ(got[0], 0x77);
  // The device keeps working.
  Req ok = rig.Read(0, 512);
  rig.RunOne();
  EXPECT_EQ(rig.Status(ok), VIRTIO_BLK_S_OK);
}

TEST_P(BlkTest, OutOfRangeAndHugeRequestsAreIoErr) {
  Rig rig(GetParam());
  rig.Activate();
  struct Case {
    const char* name;
    uint32_t type;
    uint64_t sector, len;
  } cases[] = {
      {"read at capacity", VIRTIO_BLK_T_IN, kDiskSectors, 512},
      {"read across the end", VIRTIO_BLK_T_IN, kDiskSectors - 1, 1024},
      {"write across the end", VIRTIO_BLK_T_OUT, kDiskSectors - 1, 1024},
      {"sector 2^64-1", VIRTIO_BLK_T_IN, ~uint64_t{0}, 512},
      {"sector*512 overflows", VIRTIO_BLK_T_OUT, (~uint64_t{0} >> 9) + 2, 512},
      {"larger than the disk", VIRTIO_BLK_T_IN, 0, 4 * kMiB},
      {"huge write", VIRTIO_BLK_T_OUT, 0, 8 * kMiB},
      {"not whole sectors (read)", VIRTIO_BLK_T_IN, 0, 700},
      {"not whole sectors (write)", VIRTIO_BLK_T_OUT, 0, 100},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    uint64_t buf = rig.Alloc(c.len);
    Req r = rig.Add(c.type, c.sector,
                    {{buf, static_cast<uint32_t>(c.len), c.type == VIRTIO_BLK_T_IN}});
    rig.RunOne();
    EXPECT_EQ(rig.Status(r), VIRTIO_BLK_S_IOERR);
  }
  EXPECT_EQ(rig.dev->stats().errors, std::size(cases));
  EXPECT_EQ(ReadFile(rig.path, 0, kDiskBytes), DiskAt(0, kDiskBytes));
  EXPECT_FALSE(rig.q->in_error());
}

TEST_P(BlkTest, WriteToReadOnlyDiskIsIoErr) {
  TempDir d;
  BlockOptions o;
  o.path = d.path() + "/ro.img";
  o.read_only = true;
  WriteFile(o.path, kDiskBytes);
  Rig rig(GetParam(), o);
  ASSERT_NE(rig.dev, nullptr) << rig.create_status;
  uint64_t f = rig.dev->device_features();
  EXPECT_TRUE(f >> VIRTIO_BLK_F_RO & 1);
  EXPECT_FALSE(f >> VIRTIO_BLK_F_DISCARD & 1);
  EXPECT_FALSE(f >> VIRTIO_BLK_F_WRITE_ZEROES & 1);
  rig.Activate();
  Req w = rig.Write(0, Pattern(4096, 3));
  Req dz = rig.Range(VIRTIO_BLK_T_DISCARD, 0, 8, 0);
  Req wz = rig.Range(VIRTIO_BLK_T_WRITE_ZEROES, 0, 8, 0);
  Req r = rig.Read(0, 4096);
  Req f2 = rig.Add(VIRTIO_BLK_T_FLUSH, 0, {});
  rig.Complete(5);
  EXPECT_EQ(rig.Status(w), VIRTIO_BLK_S_IOERR);
  EXPECT_EQ(rig.Status(dz), VIRTIO_BLK_S_IOERR);
  EXPECT_EQ(rig.Status(wz), VIRTIO_BLK_S_IOERR);
  EXPECT_EQ(rig.Status(r), VIRTIO_BLK_S_OK);
  EXPECT_EQ(rig.Status(f2), VIRTIO_BLK_S_OK);
  EXPECT_EQ(ReadFile(rig.path, 0, kDiskBytes), DiskAt(0, kDiskBytes));
  EXPECT_EQ(rig.dev->stats().errors, 3u);
}

TEST_P(BlkTest, UnknownTypeIsUnsupp) {
  Rig rig(GetParam());
  rig.Activate();
  Req a = rig.Add(99, 0, {});
  Req b = rig.Add(VIRTIO_BLK_T_SCSI_CMD, 0, {{rig.Alloc(512), 512, true}});
  Req c = rig.Add(VIRTIO_BLK_T_SECURE_ERASE, 0, {});
  rig.Complete(3);
  EXPECT_EQ(rig.Status(a), VIRTIO_BLK_S_UNSUPP);
  EXPECT_EQ(rig.Status(b), VIRTIO_BLK_S_UNSUPP);
  EXPECT_EQ(rig.Status(c), VIRTIO_BLK_S_UNSUPP);
  EXPECT_EQ(rig.dev->stats().unsupported, 3u);
}

TEST_P(BlkTest, WritableBeforeReadablePutsQueueInError) {
  Rig rig(GetParam());
  rig.Activate();
  uint64_t st = rig.Alloc(1, 1), hdr = rig.Alloc(16, 16);
  rig.drv->AddChain({{st, 1, true}, {hdr, 16, false}});
  rig.Kick();
  EXPECT_TRUE(rig.q->in_error());
  EXPECT_EQ(rig.drv->UsedIdx(), 0);
  // Further kicks are harmless.
  rig.Read(0, 512);
  rig.Kick();
  EXPECT_EQ(rig.drv->UsedIdx(), 0);
  EXPECT_EQ(rig.dev->stats().requests, 0u);
}

TEST_P(BlkTest, ResetWaitsForInFlightAndForgetsThem) {
  Rig rig(GetParam());
  rig.Activate();
  rig.loop->Pause();
  for (int i = 0; i < 8; ++i) rig.Read(static_cast<uint64_t>(i), 4096);
  rig.Kick();
  rig.dev->Reset();
  EXPECT_EQ(rig.dev->in_flight(), 0u);
  const uint16_t used_at_reset = rig.drv->UsedIdx();
  const std::vector<uint8_t> ring = rig.drv->UsedRingBytesNow();
  rig.loop->Resume();
  // Nothing more is written to the used ring after the reset, and kicks are ignored.
  rig.Kick();
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  EXPECT_EQ(rig.drv->UsedIdx(), used_at_reset);
  EXPECT_EQ(rig.drv->UsedRingBytesNow(), ring);
  if (GetParam() == Engine::kSync) EXPECT_EQ(used_at_reset, 8);
}

// ---- Save / restore ---------------------------------------------------------------------------

TEST_P(BlkTest, SaveRestoreRedoesInFlightRequests) {
  Rig rig(GetParam());
  rig.Activate();
  Req done = rig.Write(0, Pattern(1024, 1));
  rig.RunOne();
  // Three requests the device has popped (in flight at save time: e.g. the source died before
  // they reached the disk), then two the driver added afterwards.
  Req w = rig.Write(200, Pattern(8192, 2), 2);
  Req r = rig.Read(0, 1024);
  Req f = rig.Add(VIRTIO_BLK_T_FLUSH, 0, {});
  for (int i = 0; i < 3; ++i) {
    auto c = rig.q->PopChain();
    ASSERT_TRUE(c.ok() && c->has_value());
  }
  Req later_w = rig.Write(300, Pattern(512, 3));
  // (Not overlapping the in-flight write: requests in flight together are unordered.)
  Req later_r = rig.Read(1, 512);
  ASSERT_EQ(rig.q->InFlightHeads().size(), 3u);

  VirtqueueState qs = rig.q->SaveState();
  std::string ds = rig.dev->SaveState();

  // Destination: fresh device on the same disk and memory, fresh queue.
  BlockOptions o;
  o.path = rig.path;
  o.engine = GetParam();
  auto d2 = VirtioBlock::Create(o, rig.mem.get(), rig.loop.get());
  ASSERT_TRUE(d2.ok()) << d2.status();
  rig.dev = std::move(*d2);
  rig.q = std::make_unique<Virtqueue>(rig.mem.get(), 0, VirtioBlock::kQueueSize);
  ASSERT_TRUE(rig.q->RestoreState(qs).ok());
  ASSERT_TRUE(rig.dev->RestoreState(ds).ok());
  EXPECT_EQ(rig.dev->stats().writes, 1u);  // counters survive
  Virtqueue* qp[] = {rig.q.get()};
  ASSERT_TRUE(rig.dev->Activate(qs.features(), qp, [&](uint16_t) { ++rig.signals; }).ok());
  std::vector<UsedElem> used = rig.Complete(5);
  ASSERT_EQ(used.size(), 5u);
  for (const Req* x : {&w, &r, &f, &later_w, &later_r}) EXPECT_EQ(rig.Status(*x), 0);
  EXPECT_EQ(ReadFile(rig.path, 200 * 512, 8192), Pattern(8192, 2));
  EXPECT_EQ(ReadFile(rig.path, 300 * 512, 512), Pattern(512, 3));
  EXPECT_EQ(rig.Data(r), Pattern(1024, 1));
  const std::vector<uint8_t> first = Pattern(1024, 1);
  EXPECT_EQ(rig.Data(later_r), std::vector<uint8_t>(first.begin() + 512, first.end()));
  EXPECT_TRUE(rig.q->InFlightHeads().empty());
  EXPECT_EQ(rig.dev->stats().writes, 3u);
  (void)done;
}

TEST_P(BlkTest, SaveAfterQuiesceThenRestoreAndContinue) {
  Rig rig(GetParam());
  rig.Activate();
  rig.loop->Pause();  // VM pause: the loop stops, then the device is quiesced
  std::vector<Req> ws;
  for (int i = 0; i < 8; ++i) ws.push_back(rig.Write(static_cast<uint64_t>(i) * 8, Pattern(4096, i)));
  rig.Kick();
  rig.dev->Quiesce();
  VirtqueueState qs = rig.q->SaveState();
  std::string ds = rig.dev->SaveState();
  EXPECT_EQ(qs.in_flight_size(), 0);
  rig.loop->Resume();

  BlockOptions o;
  o.path = rig.path;
  o.engine = GetParam();
  auto d2 = VirtioBlock::Create(o, rig.mem.get(), rig.loop.get());
  ASSERT_TRUE(d2.ok());
  rig.dev = std::move(*d2);
  rig.q = std::make_unique<Virtqueue>(rig.mem.get(), 0, VirtioBlock::kQueueSize);
  ASSERT_TRUE(rig.q->RestoreState(qs).ok());
  ASSERT_TRUE(rig.dev->RestoreState(ds).ok());
  Virtqueue* qp[] = {rig.q.get()};
  ASSERT_TRUE(rig.dev->Activate(qs.features(), qp, [&](uint16_t) { ++rig.signals; }).ok());
  for (int i = 0; i < 8; ++i) ASSERT_TRUE(rig.drv->GetUsed().has_value());
  std::vector<Req> rs;
  for (int i = 0; i < 8; ++i) rs.push_back(rig.Read(static_cast<uint64_t>(i) * 8, 4096));
  rig.Complete(8);
  for (int i = 0; i < 8; ++i) EXPECT_EQ(rig.Data(rs[i]), Pattern(4096, i));
  EXPECT_EQ(rig.dev->stats().writes, 8u);
  EXPECT_EQ(rig.dev->stats().reads, 8u);
}

TEST_P(BlkTest, RestoreRejectsBadState) {
  Rig rig(GetParam());
  ASSERT_NE(rig.dev, nullptr);
  EXPECT_EQ(rig.dev->RestoreState("\xff\xff\xff garbage").code(),
            absl::StatusCode::kInvalidArgument);
  // A state saved for a disk of another size.
  TempDir d;
  BlockOptions o;
  o.path = d.path() + "/small.img";
  o.engine = GetParam();
  WriteFile(o.path, 64 * 1024);
  auto other = VirtioBlock::Create(o, rig.mem.get(), rig.loop.get());
  ASSERT_TRUE(other.ok());
  absl::Status s = rig.dev->RestoreState((*other)->SaveState());
  EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
  EXPECT_TRUE(rig.dev->RestoreState(rig.dev->SaveState()).ok());
}

// ---- O_DIRECT ---------------------------------------------------------------------------------

TEST_P(BlkTest, DirectIoAlignedAndMisalignedBuffers) {
  TempDir d;
  BlockOptions o;
  o.path = d.path() + "/direct.img";
  o.direct = true;
  WriteFile(o.path, kDiskBytes);
  Rig rig(GetParam(), o);
  if (rig.dev == nullptr) GTEST_SKIP() << "O_DIRECT unavailable here: " << rig.create_status;
  rig.Activate();
  std::vector<uint8_t> data = Pattern(8192, 5);
  Req w = rig.Write(64, data);  // 512-aligned guest buffer
  rig.RunOne();
  EXPECT_EQ(rig.Status(w), VIRTIO_BLK_S_OK);
  EXPECT_EQ(ReadFile(rig.path, 64 * 512, 8192), data);
  // Misaligned guest buffers (odd addresses, odd piece lengths) go through a bounce buffer.
  uint64_t base = rig.Alloc(8192 + 64) + 3;
  rig.Add(VIRTIO_BLK_T_IN, 64, {{base, 1000, true}, {base + 1000, 8192 - 1000, true}});
  rig.RunOne();
  std::vector<uint8_t> got(8192);
  ASSERT_TRUE(rig.mem->Read(base, got.data(), got.size()).ok());
  EXPECT_EQ(got, data);
  std::vector<uint8_t> data2 = Pattern(4096, 77);
  ASSERT_TRUE(rig.mem->Write(base, data2.data(), data2.size()).ok());
  rig.Add(VIRTIO_BLK_T_OUT, 128, {{base, 4096, false}});
  rig.RunOne();
  EXPECT_EQ(ReadFile(rig.path, 128 * 512, 4096), data2);
  EXPECT_EQ(rig.dev->stats().errors, 0u);
}

INSTANTIATE_TEST_SUITE_P(Engines, BlkTest, ::testing::Values(Engine::kIoUring, Engine::kSync),
                         EngineName);

// ---- Configuration errors ---------------------------------------------------------------------

class BlkCreateTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto m = GuestMemory::Create(2 * kMiB);
    ASSERT_TRUE(m.ok());
    mem = std::move(*m);
    auto l = EventLoop::Create("blk-create");
    ASSERT_TRUE(l.ok());
    loop = std::move(*l);
  }
  absl::Status Try(BlockOptions o) { return VirtioBlock::Create(o, mem.get(), loop.get()).status(); }
  TempDir dir;
  std::unique_ptr<GuestMemory> mem;
  std::unique_ptr<EventLoop> loop;
};

TEST_F(BlkCreateTest, BadConfigurations) {
  BlockOptions o;
  absl::Status s = Try(o);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);

  o.path = dir.path() + "/missing.img";
  s = Try(o);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("does not exist"), absl::string_view::npos) << s;

  o.path = dir.path();
  s = Try(o);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("directory"), absl::string_view::npos) << s;

  o.path = dir.path() + "/odd.img";
  WriteFile(o.path, 1000);
  s = Try(o);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("multiple of 512"), absl::string_view::npos) << s;

  o.path = dir.path() + "/fifo";
  ASSERT_EQ(::mkfifo(o.path.c_str(), 0600), 0);
  s = Try(o);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;

  o.path = dir.path() + "/ok.img";
  WriteFile(o.path, 4096);
  o.serial = std::string(21, 'x');
  s = Try(o);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  o.serial = std::string(20, 'x');
  EXPECT_TRUE(Try(o).ok());

  // Unopenable: sysfs refuses a read-write open of a read-only attribute even to root.
  o.path = "/sys/kernel/notes";
  o.serial.clear();
  if (::access(o.path.c_str(), F_OK) == 0) {
    s = Try(o);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
    EXPECT_NE(s.message().find("cannot open"), absl::string_view::npos) << s;
  }
}

TEST_F(BlkCreateTest, ODirectOnTmpfsOrItsAbsence) {
  // /dev/shm is tmpfs: depending on the kernel it supports O_DIRECT (6.6+) or refuses it.
  // Either Create() works and I/O works, or it fails with a clear INVALID_ARGUMENT.
  BlockOptions o;
  o.path = "/dev/shm/blktest-direct-" + std::to_string(::getpid()) + ".img";
  WriteFile(o.path, 8192);
  o.direct = true;
  absl::Status s = Try(o);
  ::unlink(o.path.c_str());
  if (!s.ok()) {
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(s.message().find("O_DIRECT"), absl::string_view::npos) << s;
  }
}

}  // namespace
}  // namespace microvmm::virtio
