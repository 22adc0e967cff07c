"""Macros for the freestanding test guests."""

GUEST_LIB_SRCS = [
    "lib/start.S",
    "lib/entry.c",
    "lib/guest.c",
]

def test_guest(name, src):
    """Builds NAME.elf and NAME.bin (flat, linked at 0x100000) from src + the guest library."""
    srcs = GUEST_LIB_SRCS + [src]
    native.genrule(
        name = name,
        srcs = srcs + ["lib/guest.h", "lib/link.ld"],
        outs = [name + ".elf", name + ".bin"],
        tools = ["build_guest.sh"],
        cmd = ("bash $(location build_guest.sh) $(location {n}.elf) $(location {n}.bin) " +
               "$(location lib/link.ld) {srcs}").format(
                  n = name,
                  srcs = " ".join(["$(location %s)" % s for s in srcs]),
              ),
    )

def hosted_guest(name, src):
    """The same guest compiled for the host against hosted/shim.c (logic tests only)."""
    native.cc_binary(
        name = name + "_hosted",
        srcs = [src, "lib/guest.c", "lib/guest.h", "hosted/shim.c"],
        copts = ["-DHOSTED", "-std=gnu11"],
        linkopts = ["-lpthread"],
        testonly = True,
    )
