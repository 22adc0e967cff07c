// vmm: one microVM per process. See `vmm --help`.
#include <signal.h>
#include <stdio.h>

#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "api/server.h"
#include "api/tls.h"
#include "migration/precopy/incoming.h"
#include "vmm/base/log.h"
#include "vmm/cli.h"
#include "vmm/vm.h"

namespace microvmm {
namespace {

int Fail(const absl::Status& s, int status = kExitUsage) {
  fprintf(stderr, "vmm: error: %s\n", std::string(s.message()).c_str());
  return status;
}

// Everything the main thread waits for, set from gRPC / signal threads.
struct Events {
  absl::Mutex mu;
  bool exit_requested ABSL_GUARDED_BY(mu) = false;  // API Shutdown (or a migration completed)
  int exit_status ABSL_GUARDED_BY(mu) = 0;
  int signal ABSL_GUARDED_BY(mu) = 0;
  bool incoming_done ABSL_GUARDED_BY(mu) = false;
  absl::StatusOr<std::unique_ptr<Vm>> incoming ABSL_GUARDED_BY(mu) = absl::UnknownError("");
};

int Run(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  auto opts = ParseVmmArgs(args);
  if (!opts.ok()) return Fail(opts.status());
  if (opts->help) {
    fputs(VmmUsage().c_str(), stdout);
    return 0;
  }
  SetLogLevel(opts->log_level == "debug"   ? LogLevel::kDebug
              : opts->log_level == "warn"  ? LogLevel::kWarning
              : opts->log_level == "error" ? LogLevel::kError
                                           : LogLevel::kInfo);

  // SIGINT/SIGTERM are taken by a dedicated thread; block them everywhere else (threads inherit).
  sigset_t term;
  sigemptyset(&term);
  sigaddset(&term, SIGINT);
  sigaddset(&term, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &term, nullptr);
  signal(SIGPIPE, SIG_IGN);
  // Keep gRPC initialised for the whole process (after the signal mask: its threads inherit it).
  // Otherwise destroying the last server runs grpc_shutdown(), which in gRPC 1.51 can block
  // ~10 s joining its TCP backup-poller thread and delays the exit after a completed migration.
  grpc_init();

  auto tls = LoadTlsCredentials({opts->tls_cert, opts->tls_key, opts->tls_ca});
  if (!tls.ok()) return Fail(tls.status());

  std::unique_ptr<Vm> vm;
  if (opts->has_vm) {
    auto created = Vm::Create(opts->config);
    if (!created.ok()) return Fail(created.status());
    vm = std::move(*created);
  }

  Events ev;
  auto request_exit = [&ev](int status) {
    absl::MutexLock lock(&ev.mu);
    if (!ev.exit_requested) {
      ev.exit_requested = true;
      ev.exit_status = status;
    }
  };

  std::unique_ptr<ApiServer> api;
  std::unique_ptr<grpc::Server> server;
  Vm* vm_ptr = vm.get();  // the VM this process runs (owned by `vm` or by `api`)
  if (!opts->api_socket.empty()) {
    api = vm ? std::make_unique<ApiServer>(std::move(vm), request_exit)
             : std::make_unique<ApiServer>(request_exit);
    api->SetTls(*tls);
    // mTLS protects TCP API listeners; a unix socket is protected by file permissions.
    bool tcp = opts->api_socket.find('/') == std::string::npos &&
               opts->api_socket.rfind("unix", 0) != 0;
    auto s = StartApiServer(opts->api_socket, api.get(), nullptr, tcp ? tls->server : nullptr);
    if (!s.ok()) return Fail(s.status());
    server = std::move(*s);
    LOG_INFO("API listening on %s", opts->api_socket);
  }

  std::unique_ptr<migration::IncomingMigration> incoming;
  if (!opts->incoming.empty()) {
    auto in = migration::IncomingMigration::Listen(
        opts->incoming, opts->config, [&ev](absl::StatusOr<std::unique_ptr<Vm>> r) {
          absl::MutexLock lock(&ev.mu);
          ev.incoming = std::move(r);
          ev.incoming_done = true;
        },
        tls->server);
    if (!in.ok()) return Fail(in.status());
    incoming = std::move(*in);
    LOG_INFO("waiting for an incoming migration on %s", opts->incoming);
  }

  if (vm_ptr != nullptr) {
    if (absl::Status s = vm_ptr->Boot(); !s.ok()) return Fail(s);
  }

  std::thread signals([&ev, &term] {
    int sig = 0;
    sigwait(&term, &sig);
    absl::MutexLock lock(&ev.mu);
    ev.signal = sig;
  });
  signals.detach();

  // Only this thread tears the VM down.
  int status = 0;
  for (;;) {
    ev.mu.Lock();
    auto woken = [&ev]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(ev.mu) {
      return ev.exit_requested || ev.signal != 0 || ev.incoming_done;
    };
    ev.mu.AwaitWithTimeout(absl::Condition(&woken), absl::Milliseconds(50));
    if (ev.exit_requested) {
      status = ev.exit_status;
      ev.mu.Unlock();
      break;
    }
    if (ev.signal != 0) {
      int sig = ev.signal;
      ev.mu.Unlock();
      LOG_INFO("received %s: shutting down", sig == SIGINT ? "SIGINT" : "SIGTERM");
      Vm* v = api ? api->vm() : vm_ptr;
      if (v != nullptr) (void)v->Shutdown();
      status = v != nullptr && v->exit_info() ? v->exit_info()->status : 0;
      break;
    }
    if (ev.incoming_done) {
      ev.incoming_done = false;
      absl::StatusOr<std::unique_ptr<Vm>> r = std::move(ev.incoming);
      ev.mu.Unlock();
      if (!r.ok()) {
        incoming.reset();
        return Fail(absl::Status(r.status().code(),
                                 absl::StrCat("incoming migration failed: ", r.status().message())),
                    kExitIncomingFailed);
      }
      LOG_INFO("migrated VM is running here");
      vm_ptr = r->get();
      if (api) {
        if (absl::Status s = api->AdoptVm(std::move(*r)); !s.ok()) return Fail(s, kExitVmmError);
      } else {
        vm = std::move(*r);
      }
      continue;
    }
    ev.mu.Unlock();
    // Without an API the process ends with its VM.
    if (!api && vm_ptr != nullptr && vm_ptr->WaitForExitFor(absl::ZeroDuration()).has_value()) {
      status = vm_ptr->exit_info()->status;
      break;
    }
  }
  if (server) server->Shutdown(absl::ToChronoTime(absl::Now() + absl::Seconds(1)));
  incoming.reset();
  // The Vm (owned by `api` or `vm`) is destroyed here: vCPU threads are joined.
  api.reset();
  vm.reset();
  fflush(stdout);
  return status;
}

}  // namespace
}  // namespace microvmm

int main(int argc, char** argv) { return microvmm::Run(argc, argv); }
