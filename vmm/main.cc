// vmm: one microVM per process. See `vmm --help`.
#include <signal.h>
#include <stdio.h>

#include <atomic>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "api/server.h"
#include "vmm/base/log.h"
#include "vmm/cli.h"
#include "vmm/vm.h"

namespace microvmm {
namespace {

int Fail(const absl::Status& s) {
  fprintf(stderr, "vmm: error: %s\n", std::string(s.message()).c_str());
  return kExitUsage;
}

int Run(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  auto opts = ParseVmmArgs(args);
  if (!opts.ok()) return Fail(opts.status());
  if (opts->help) {
    fputs(VmmUsage().c_str(), stdout);
    return 0;
  }
  SetLogLevel(opts->log_level == "debug"  ? LogLevel::kDebug
              : opts->log_level == "warn" ? LogLevel::kWarning
              : opts->log_level == "error" ? LogLevel::kError
                                           : LogLevel::kInfo);

  // SIGINT/SIGTERM are taken by a dedicated thread; block them everywhere else (threads inherit).
  sigset_t term;
  sigemptyset(&term);
  sigaddset(&term, SIGINT);
  sigaddset(&term, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &term, nullptr);
  signal(SIGPIPE, SIG_IGN);

  std::unique_ptr<Vm> vm;
  if (opts->has_vm) {
    auto created = Vm::Create(opts->config);
    if (!created.ok()) return Fail(created.status());
    vm = std::move(*created);
  }

  // Process exit: from the API's Shutdown, a signal, or (without API) the guest. Only this
  // thread tears the VM down; the signal thread just reports the signal.
  absl::Mutex mu;
  bool done = false;
  int exit_status = 0;
  int signal_received = 0;
  auto finish = [&](int status) {
    absl::MutexLock lock(&mu);
    if (!done) {
      done = true;
      exit_status = status;
    }
  };

  std::unique_ptr<ApiServer> api;
  std::unique_ptr<grpc::Server> server;
  Vm* vm_ptr = vm.get();
  if (!opts->api_socket.empty()) {
    api = vm ? std::make_unique<ApiServer>(std::move(vm), finish)
             : std::make_unique<ApiServer>(finish);
    auto s = StartApiServer(opts->api_socket, api.get());
    if (!s.ok()) return Fail(s.status());
    server = std::move(*s);
    LOG_INFO("API listening on %s", opts->api_socket);
  }
  if (vm_ptr != nullptr) {
    if (absl::Status s = vm_ptr->Boot(); !s.ok()) return Fail(s);
  }

  std::thread signals([&] {
    int sig = 0;
    sigwait(&term, &sig);
    absl::MutexLock lock(&mu);
    signal_received = sig;
  });
  signals.detach();

  for (;;) {
    {
      absl::MutexLock lock(&mu);
      auto woken = [&] { return done || signal_received != 0; };
      mu.AwaitWithTimeout(absl::Condition(&woken), absl::Milliseconds(50));
      if (done) break;
      if (signal_received != 0) {
        int sig = signal_received;
        mu.Unlock();
        LOG_INFO("received %s: shutting down", sig == SIGINT ? "SIGINT" : "SIGTERM");
        Vm* v = api ? api->vm() : vm_ptr;
        if (v != nullptr) (void)v->Shutdown();
        mu.Lock();
        if (!done) {
          done = true;
          exit_status = v != nullptr && v->exit_info() ? v->exit_info()->status : 0;
        }
        break;
      }
    }
    if (!api && vm_ptr->WaitForExitFor(absl::ZeroDuration()).has_value()) {
      finish(vm_ptr->exit_info()->status);
    }
  }
  int status = exit_status;
  if (server) server->Shutdown(absl::ToChronoTime(absl::Now() + absl::Seconds(1)));
  // The Vm (owned by `api` or `vm`) is destroyed here: vCPU threads are joined.
  api.reset();
  vm.reset();
  fflush(stdout);
  return status;
}

}  // namespace
}  // namespace microvmm

int main(int argc, char** argv) { return microvmm::Run(argc, argv); }
