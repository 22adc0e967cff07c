// The lowest layer of the kernel VFIO backend: every system call it makes goes through VfioSys,
// so unit tests can inject a fake kernel (no /dev/vfio is needed to test the backend).
//
// Calling convention is POSIX: -1 (or MAP_FAILED) with errno set on failure. Implementations
// must not retry EINTR themselves; the callers (kernel_vfio_device.cc) do.
#ifndef MICROVMM_DEVICES_VFIO_KERNEL_VFIO_SYS_H_
#define MICROVMM_DEVICES_VFIO_KERNEL_VFIO_SYS_H_

#include <sys/types.h>

#include <cstddef>
#include <string>
#include <utility>
#include <vector>

namespace microvmm::vfio {

class VfioSys {
 public:
  virtual ~VfioSys() = default;

  virtual int Open(const std::string& path, int flags) = 0;
  virtual int Close(int fd) = 0;
  // `arg` is the ioctl's third argument: a pointer to the uAPI struct, or, for the ioctls that
  // take an integer by value (VFIO_CHECK_EXTENSION, VFIO_SET_IOMMU), that integer cast to void*.
  virtual int Ioctl(int fd, unsigned long request, void* arg) = 0;
  virtual ssize_t Pread(int fd, void* buf, size_t count, off_t offset) = 0;
  virtual ssize_t Pwrite(int fd, const void* buf, size_t count, off_t offset) = 0;
  virtual ssize_t Read(int fd, void* buf, size_t count) = 0;
  virtual ssize_t Write(int fd, const void* buf, size_t count) = 0;
  virtual void* Mmap(void* addr, size_t length, int prot, int flags, int fd, off_t offset) = 0;
  // Target of the symlink at `path` (not resolved further). -1/errno on failure.
  virtual int Readlink(const std::string& path, std::string* target) = 0;
  // Entry names of directory `path`, without "." and "..". -1/errno on failure.
  virtual int ReadDir(const std::string& path, std::vector<std::string>* names) = 0;

  // The real kernel (process-wide singleton).
  static VfioSys& Real();
};

// Owns an fd obtained through a VfioSys and closes it through the same VfioSys.
// (ScopedFd would call ::close on a fake's fd numbers.)
class SysFd {
 public:
  SysFd() = default;
  SysFd(VfioSys* sys, int fd) : sys_(sys), fd_(fd) {}
  SysFd(SysFd&& o) noexcept : sys_(o.sys_), fd_(std::exchange(o.fd_, -1)) {}
  SysFd& operator=(SysFd&& o) noexcept {
    if (this != &o) {
      reset();
      sys_ = o.sys_;
      fd_ = std::exchange(o.fd_, -1);
    }
    return *this;
  }
  SysFd(const SysFd&) = delete;
  SysFd& operator=(const SysFd&) = delete;
  ~SysFd() { reset(); }

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  void reset() {
    if (fd_ >= 0 && sys_ != nullptr) sys_->Close(fd_);
    fd_ = -1;
  }

 private:
  VfioSys* sys_ = nullptr;
  int fd_ = -1;
};

}  // namespace microvmm::vfio

#endif  // MICROVMM_DEVICES_VFIO_KERNEL_VFIO_SYS_H_
