#include "devices/vfio/kernel/vfio_sys.h"

#include <dirent.h>
#include <fcntl.h>
#include <limits.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

namespace microvmm::vfio {
namespace {

class RealVfioSys final : public VfioSys {
 public:
  int Open(const std::string& path, int flags) override {
    return ::open(path.c_str(), flags | O_CLOEXEC);
  }
  int Close(int fd) override { return ::close(fd); }
  int Ioctl(int fd, unsigned long request, void* arg) override { return ::ioctl(fd, request, arg); }
  ssize_t Pread(int fd, void* buf, size_t count, off_t offset) override {
    return ::pread(fd, buf, count, offset);
  }
  ssize_t Pwrite(int fd, const void* buf, size_t count, off_t offset) override {
    return ::pwrite(fd, buf, count, offset);
  }
  ssize_t Read(int fd, void* buf, size_t count) override { return ::read(fd, buf, count); }
  ssize_t Write(int fd, const void* buf, size_t count) override { return ::write(fd, buf, count); }
  void* Mmap(void* addr, size_t length, int prot, int flags, int fd, off_t offset) override {
    return ::mmap(addr, length, prot, flags, fd, offset);
  }
  int Readlink(const std::string& path, std::string* target) override {
    char buf[PATH_MAX];
    ssize_t n = ::readlink(path.c_str(), buf, sizeof(buf));
    if (n < 0) return -1;
    if (static_cast<size_t>(n) >= sizeof(buf)) {
      errno = ENAMETOOLONG;
      return -1;
    }
    target->assign(buf, n);
    return 0;
  }
  int ReadDir(const std::string& path, std::vector<std::string>* names) override {
    DIR* dir = ::opendir(path.c_str());
    if (dir == nullptr) return -1;
    names->clear();
    errno = 0;
    while (struct dirent* e = ::readdir(dir)) {
      if (std::strcmp(e->d_name, ".") == 0 || std::strcmp(e->d_name, "..") == 0) continue;
      names->emplace_back(e->d_name);
    }
    int err = errno;
    ::closedir(dir);
    if (err != 0) {
      errno = err;
      return -1;
    }
    return 0;
  }
};

}  // namespace

VfioSys& VfioSys::Real() {
  static RealVfioSys* real = new RealVfioSys();
  return *real;
}

}  // namespace microvmm::vfio
