// vmmctl: command-line client of the VMM control API. See `vmmctl --help`.
#include <unistd.h>

#include <iostream>
#include <string>
#include <vector>

#include "api/vmmctl_lib.h"

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  return microvmm::vmmctl::Run(args, std::cout, std::cerr, isatty(STDOUT_FILENO) == 1);
}
