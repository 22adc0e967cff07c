"""Macros for the freestanding test guests."""

GUEST_LIB_SRCS = [
    "lib/start.S",
    "lib/entry.c",
    "lib/guest.c",
]

def test_guest(name, src, extra_srcs = []):
    """Builds NAME.elf and NAME.bin (flat, linked at 0x100000) from src + the guest library.

    extra_srcs: more .c/.S/.h files of the guest (e.g. lib/virtio.{c,h}); the .c/.S ones are
    compiled and linked between the guest library and src, the headers are inputs only.
    """
    hdrs = [s for s in extra_srcs if s.endswith(".h")]
    srcs = GUEST_LIB_SRCS + [s for s in extra_srcs if s not in hdrs] + [src]
    native.genrule(
        name = name,
        srcs = srcs + hdrs + ["lib/guest.h", "lib/link.ld"],
        outs = [name + ".elf", name + ".bin"],
        tools = ["build_guest.sh"],
        cmd = ("bash $(location build_guest.sh) $(location {n}.elf) $(location {n}.bin) " +
               "$(location lib/link.ld) {srcs}").format(
                  n = name,
                  srcs = " ".join(["$(location %s)" % s for s in srcs]),
              ),
    )

def hosted_guest(name, src, extra_srcs = []):
    """The same guest compiled for the host against hosted/shim.c (logic tests only).

    extra_srcs: as for test_guest (compiled with -DHOSTED too).
    """
    native.cc_binary(
        name = name + "_hosted",
        srcs = [src, "lib/guest.c", "lib/guest.h", "hosted/shim.c"] + extra_srcs,
        copts = ["-DHOSTED", "-std=gnu11"],
        linkopts = ["-lpthread"],
        testonly = True,
    )
