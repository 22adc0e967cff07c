// Freestanding test guests (tests/guest/*.c) embedded as flat binaries.
// Each image is loaded at kLoadAddress and entered at its first byte; see tests/guest/README.md
// for the full VMM <-> guest contract.
#ifndef TESTS_GUEST_EMBEDDED_H_
#define TESTS_GUEST_EMBEDDED_H_

#include <string>
#include <string_view>
#include <vector>

namespace microvmm::testguest {

// Guest-physical load address (and entry point) of every image.
inline constexpr unsigned long kLoadAddress = 0x100000;

struct Image {
  const char* name;
  const unsigned char* data;  // flat binary, loaded at kLoadAddress
  unsigned long size;         // bytes in data
  unsigned long mem_end;      // __bss_end: address just past the image incl. bss (page aligned)
};

// The image called name ("hello", "smp", "memwalk", "fault"), or nullptr if unknown.
const Image* Find(std::string_view name);

// All image names, sorted.
std::vector<std::string> Names();

}  // namespace microvmm::testguest

#endif  // TESTS_GUEST_EMBEDDED_H_
