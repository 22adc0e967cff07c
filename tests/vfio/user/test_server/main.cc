// vfio_user_test_server --socket PATH (also --socket-path=PATH, the vfio-user convention):
// serves the test DMA device (test_device.h) to one client at a time until SIGTERM/SIGINT.
// Prints "READY" on stdout once the socket listens.
#include <signal.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>

#include "tests/vfio/user/test_server/test_device.h"

namespace {
microvmm::vfio_user::testdev::TestDeviceServer* g_server = nullptr;
void OnReady() {
  std::printf("READY\n");
  std::fflush(stdout);
}
}  // namespace

int main(int argc, char** argv) {
  std::string path;
  microvmm::vfio_user::testdev::ServerOptions opts;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--socket" && i + 1 < argc) {
      path = argv[++i];
    } else if (a.rfind("--socket=", 0) == 0) {
      path = a.substr(9);
    } else if (a.rfind("--socket-path=", 0) == 0) {
      path = a.substr(14);
    } else if (a == "--no-migration") {
      opts.migration = false;
    } else if (a == "--precopy-bytes" && i + 1 < argc) {
      opts.precopy_bytes = std::strtoull(argv[++i], nullptr, 10);
    } else if (a == "--device-id" && i + 1 < argc) {
      opts.device_id = static_cast<uint16_t>(std::strtoul(argv[++i], nullptr, 16));
    } else {
      std::fprintf(stderr, "usage: %s --socket PATH [--no-migration] [--device-id HEX] [--precopy-bytes N]\n", argv[0]);
      return 2;
    }
  }
  if (path.empty()) {
    std::fprintf(stderr, "usage: %s --socket PATH [--no-migration] [--device-id HEX] [--precopy-bytes N]\n", argv[0]);
    return 2;
  }
  auto server = microvmm::vfio_user::testdev::TestDeviceServer::Create(opts);
  if (!server.ok()) {
    std::fprintf(stderr, "%s\n", server.status().ToString().c_str());
    return 1;
  }
  g_server = server->get();
  // SIGTERM/SIGINT: a watcher thread asks the accept loop to stop (Stop() is async-safe enough:
  // an atomic store; the handler itself only writes to a pipe).
  static int pipefd[2];
  if (::pipe(pipefd) != 0) return 1;
  struct sigaction sa {};
  sa.sa_handler = [](int) {
    char c = 1;
    (void)!::write(pipefd[1], &c, 1);
  };
  sigaction(SIGTERM, &sa, nullptr);
  sigaction(SIGINT, &sa, nullptr);
  std::thread watcher([] {
    char c;
    while (::read(pipefd[0], &c, 1) < 0 && errno == EINTR) {
    }
    g_server->Stop();
    // A client session blocks in Serve(); the spec wants SIGTERM honoured: exit now.
    _exit(0);
  });
  watcher.detach();
  absl::Status s = (*server)->ListenAndServe(path, &OnReady);
  if (!s.ok()) {
    std::fprintf(stderr, "%s\n", s.ToString().c_str());
    return 1;
  }
  return 0;
}
