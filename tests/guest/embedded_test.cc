// Checks the generated embedded image table (no gtest needed).
#include "tests/guest/embedded.h"

#include <cstdio>
#include <cstring>

namespace tg = microvmm::testguest;

#define CHECK(cond)                                                  \
  do {                                                               \
    if (!(cond)) {                                                   \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      return 1;                                                      \
    }                                                                \
  } while (0)

int main() {
  const auto names = tg::Names();
  CHECK(names.size() == 11);
  CHECK(names[0] == "balloonhint" && names[1] == "fault" && names[2] == "hello" &&
        names[3] == "idle" && names[4] == "memwalk" && names[5] == "pciscan" && names[6] == "smp" &&
        names[7] == "vfiodma" && names[8] == "vfiomig" && names[9] == "virtioblk" &&
        names[10] == "virtiorng");
  for (const auto& n : names) {
    const tg::Image* img = tg::Find(n);
    CHECK(img != nullptr);
    CHECK(n == img->name);
    CHECK(img->size > 16 && img->size < 64 * 1024);
    CHECK(img->mem_end % 4096 == 0);
    CHECK(img->mem_end >= tg::kLoadAddress + img->size);
    CHECK(img->mem_end <= 0x800000);
    // start.S begins with cli (0xfa), cld (0xfc).
    CHECK(img->data[0] == 0xfa && img->data[1] == 0xfc);
    std::printf("%-11s size=%lu mem_end=0x%lx\n", img->name, img->size, img->mem_end);
  }
  CHECK(tg::Find("nope") == nullptr);
  CHECK(tg::Find("") == nullptr);
  CHECK(tg::Find("hell") == nullptr);
  std::printf("embedded_test ok\n");
  return 0;
}
