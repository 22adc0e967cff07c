#include "vmm/event_loop.h"

#include <pthread.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <future>

#include "absl/strings/str_cat.h"
#include "vmm/base/log.h"
#include "vmm/base/status.h"

namespace microvmm {

absl::StatusOr<std::unique_ptr<EventLoop>> EventLoop::Create(const std::string& name) {
  std::unique_ptr<EventLoop> loop(new EventLoop());
  loop->epoll_.reset(::epoll_create1(EPOLL_CLOEXEC));
  if (!loop->epoll_.valid()) return ErrnoStatus(errno, "epoll_create1");
  loop->wake_.reset(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!loop->wake_.valid()) return ErrnoStatus(errno, "eventfd");
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = 0;  // the wake fd; registrations use ids >= 1
  if (::epoll_ctl(loop->epoll_.get(), EPOLL_CTL_ADD, loop->wake_.get(), &ev) != 0)
    return ErrnoStatus(errno, "epoll_ctl(wake)");
  EventLoop* l = loop.get();
  std::promise<void> started;
  std::future<void> f = started.get_future();
  std::string thread_name = name.substr(0, 15);
  loop->thread_ = std::thread([l, thread_name, &started] {
    ::pthread_setname_np(::pthread_self(), thread_name.c_str());
    l->thread_id_ = std::this_thread::get_id();
    started.set_value();
    l->Run();
  });
  f.wait();
  return loop;
}

EventLoop::~EventLoop() {
  {
    std::lock_guard l(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  Wake();
  if (thread_.joinable()) thread_.join();
}

void EventLoop::Wake() {
  uint64_t one = 1;
  ssize_t n = ::write(wake_.get(), &one, sizeof(one));
  (void)n;  // EAGAIN: the counter is already non-zero, the loop will wake anyway
}

absl::Status EventLoop::Add(int fd, uint32_t events, Handler handler) {
  std::lock_guard l(mu_);
  if (fds_.count(fd)) return absl::AlreadyExistsError(absl::StrCat("fd ", fd, " already watched"));
  uint64_t id = next_id_++;
  epoll_event ev{};
  ev.events = events;
  ev.data.u64 = id;
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_ADD, fd, &ev) != 0)
    return ErrnoStatus(errno, absl::StrCat("epoll_ctl(ADD, fd ", fd, ")"));
  fds_[fd] = Entry{id, std::make_shared<Handler>(std::move(handler))};
  ids_[id] = fd;
  return absl::OkStatus();
}

absl::Status EventLoop::Modify(int fd, uint32_t events) {
  std::lock_guard l(mu_);
  auto it = fds_.find(fd);
  if (it == fds_.end()) return absl::NotFoundError(absl::StrCat("fd ", fd, " not watched"));
  epoll_event ev{};
  ev.events = events;
  ev.data.u64 = it->second.id;
  if (::epoll_ctl(epoll_.get(), EPOLL_CTL_MOD, fd, &ev) != 0)
    return ErrnoStatus(errno, absl::StrCat("epoll_ctl(MOD, fd ", fd, ")"));
  return absl::OkStatus();
}

void EventLoop::Remove(int fd) {
  {
    std::lock_guard l(mu_);
    auto it = fds_.find(fd);
    if (it == fds_.end()) return;
    ids_.erase(it->second.id);
    fds_.erase(it);
    ::epoll_ctl(epoll_.get(), EPOLL_CTL_DEL, fd, nullptr);
  }
  if (!InLoopThread()) std::lock_guard wait(dispatch_mu_);  // a running handler finishes
}

void EventLoop::Post(std::function<void()> fn) {
  {
    std::lock_guard l(mu_);
    if (stop_) return;
    posted_.push_back(std::move(fn));
  }
  cv_.notify_all();
  Wake();
}

void EventLoop::RunSync(const std::function<void()>& fn) {
  if (InLoopThread()) {
    fn();
    return;
  }
  auto done = std::make_shared<std::promise<void>>();
  std::future<void> f = done->get_future();
  {
    std::lock_guard l(mu_);
    if (stop_) return;
    posted_.push_back([&fn, done] {
      fn();
      done->set_value();
    });
  }
  cv_.notify_all();
  Wake();
  f.wait();
}

void EventLoop::Pause() {
  std::unique_lock l(mu_);
  paused_ = true;
  if (InLoopThread() || stop_) return;  // the loop parks after the current handler
  l.unlock();
  Wake();
  l.lock();
  cv_.wait(l, [this] { return loop_parked_ || stop_ || !paused_; });
}

void EventLoop::Resume() {
  {
    std::lock_guard l(mu_);
    paused_ = false;
  }
  cv_.notify_all();
}

bool EventLoop::paused() const {
  std::lock_guard l(mu_);
  return paused_;
}

void EventLoop::DrainPosted() {
  std::vector<std::function<void()>> todo;
  {
    std::lock_guard l(mu_);
    todo.swap(posted_);
  }
  for (auto& fn : todo) fn();
}

void EventLoop::Run() {
  constexpr int kMaxEvents = 64;
  epoll_event events[kMaxEvents];
  for (;;) {
    {
      std::unique_lock l(mu_);
      while (paused_ && !stop_) {
        loop_parked_ = true;
        cv_.notify_all();
        cv_.wait(l, [this] { return !paused_ || stop_ || !posted_.empty(); });
        if (!posted_.empty()) {
          l.unlock();
          DrainPosted();
          l.lock();
        }
      }
      loop_parked_ = false;
      if (stop_) {
        // Wake RunSync callers: their functions still run (they may hold references).
        l.unlock();
        DrainPosted();
        return;
      }
    }
    int n = ::epoll_wait(epoll_.get(), events, kMaxEvents, -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      LOG_ERROR("event loop: epoll_wait: %s", strerror(errno));
      return;
    }
    for (int i = 0; i < n; ++i) {
      uint64_t id = events[i].data.u64;
      if (id == 0) {
        uint64_t v;
        ssize_t r = ::read(wake_.get(), &v, sizeof(v));
        (void)r;
        continue;
      }
      std::lock_guard dispatch(dispatch_mu_);
      std::shared_ptr<Handler> h;
      {
        std::lock_guard l(mu_);
        if (paused_ || stop_) break;  // level-triggered: seen again after Resume()
        auto it = ids_.find(id);
        if (it == ids_.end()) continue;  // removed meanwhile
        h = fds_[it->second].handler;
      }
      (*h)(events[i].events);
    }
    std::lock_guard dispatch(dispatch_mu_);
    DrainPosted();
  }
}

}  // namespace microvmm
