// EventLoop: one epoll thread that runs device work off the vCPU threads — queue-notify
// ioeventfds, io_uring completion eventfds, tap and socket readiness, timers via timerfd.
//
// Handlers run on the loop thread, one at a time. Add/Modify/Remove/Post are thread-safe.
// Remove() called from another thread returns only once the handler is not running and will
// never run again; from the loop thread (inside a handler) it takes effect at once.
// Do not call Remove() or Pause() while holding a lock that a handler takes (deadlock).
//
// Pause() stops dispatching (returns once no handler runs) so a paused VM's devices do not
// touch guest memory; Resume() restarts it. Events that arrive meanwhile stay pending in their
// fds (level-triggered) and are handled after Resume().
#ifndef MICROVMM_VMM_EVENT_LOOP_H_
#define MICROVMM_VMM_EVENT_LOOP_H_

#include <sys/epoll.h>

#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "vmm/base/fd.h"

namespace microvmm {

class EventLoop {
 public:
  // `events`: the EPOLL* bits that fired (EPOLLIN, EPOLLOUT, EPOLLHUP, EPOLLERR...).
  using Handler = std::function<void(uint32_t events)>;

  // Creates the loop and starts its thread (named `name`, at most 15 characters).
  static absl::StatusOr<std::unique_ptr<EventLoop>> Create(const std::string& name);
  // Stops the thread. Handlers still registered are dropped without being called.
  ~EventLoop();
  EventLoop(const EventLoop&) = delete;
  EventLoop& operator=(const EventLoop&) = delete;

  // Watches `fd` (not owned; keep it open until Remove()) for `events` (EPOLLIN etc.,
  // level-triggered). One registration per fd.
  absl::Status Add(int fd, uint32_t events, Handler handler);
  absl::Status Modify(int fd, uint32_t events);
  // Unknown fds are ignored.
  void Remove(int fd);
  // Runs `fn` once on the loop thread (after the current handler). Dropped if the loop stops.
  void Post(std::function<void()> fn);
  // Runs `fn` on the loop thread and waits for it (runs inline when called on the loop thread).
  // While paused, runs on the caller's thread under the dispatch lock instead.
  void RunSync(const std::function<void()>& fn);

  void Pause();
  void Resume();
  bool paused() const;

  bool InLoopThread() const { return std::this_thread::get_id() == thread_id_; }

 private:
  EventLoop() = default;
  void Run();
  void Wake();
  void DrainPosted();

  ScopedFd epoll_;
  ScopedFd wake_;  // eventfd
  std::thread thread_;
  std::thread::id thread_id_;

  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  bool paused_ = false;
  bool loop_parked_ = false;  // the loop thread has seen paused_ and is waiting
  uint64_t next_id_ = 1;
  struct Entry {
    uint64_t id;
    std::shared_ptr<Handler> handler;
  };
  std::map<int, Entry> fds_;                 // fd -> registration
  std::map<uint64_t, int> ids_;              // registration id -> fd
  std::vector<std::function<void()>> posted_;
  // Held by the loop thread while a handler runs; Remove() from other threads takes it to wait.
  std::mutex dispatch_mu_;
};

}  // namespace microvmm

#endif  // MICROVMM_VMM_EVENT_LOOP_H_
