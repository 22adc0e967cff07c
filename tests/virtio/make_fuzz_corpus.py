#!/usr/bin/env python3
"""Writes the seed/regression corpus of devices/virtio/queue_fuzz.cc into fuzz_corpus/.

Input layout (see queue_fuzz.cc): 16-byte header, program bytes, guest RAM image at GPA 0.
Standard ring layout for queue size N: desc at 0, avail at 16N, used at align4(16N + 6 + 2N).
"""
import os
import struct
import sys

NEXT, WRITE, INDIRECT = 1, 2, 4
POP, DONE_OLD, DONE_NEW, NOTIFY, DISABLE, ENABLE, SAVE, POKE, REREAD, PENDING = range(10)


def layout(n):
    avail = 16 * n
    used = (avail + 6 + 2 * n + 3) & ~3
    return 0, avail, used


def image(n, descs, heads, avail_idx=None, extra=(), used_event=0, avail_flags=0):
    d, a, u = layout(n)
    img = bytearray(0x20000)
    for i, (addr, ln, fl, nx) in descs.items():
        struct.pack_into("<QIHH", img, d + 16 * i, addr, ln, fl, nx)
    struct.pack_into("<HH", img, a, avail_flags, len(heads) if avail_idx is None else avail_idx)
    for k, h in enumerate(heads):
        struct.pack_into("<H", img, a + 4 + 2 * (k % n), h)
    struct.pack_into("<H", img, a + 4 + 2 * n, used_event)
    for gpa, blob in extra:
        img[gpa:gpa + len(blob)] = blob
    # Trim trailing zeros (RAM starts zeroed).
    return bytes(img).rstrip(b"\0")


def seed(log2n, feats, prog, img, addrs=None):
    flags = feats | (4 if addrs else 0)
    a = addrs or (0, 0, 0)
    hdr = struct.pack("<BBBBIII", log2n, flags, len(prog), 0, *a)
    return hdr + bytes(prog) + img


def ind_table(entries):
    return b"".join(struct.pack("<QIHH", *e) for e in entries)


def main(out):
    os.makedirs(out, exist_ok=True)
    seeds = {}
    # Single readable + writable chain.
    seeds["simple"] = seed(3, 3, [POP, NOTIFY, DONE_OLD, NOTIFY],
                           image(8, {0: (0x10000, 64, NEXT, 1), 1: (0x11000, 64, WRITE, 0)}, [0]))
    # Indirect chain after one direct descriptor.
    t = ind_table([(0x12000, 32, NEXT, 1), (0x13000, 100, WRITE, 0)])
    seeds["indirect"] = seed(3, 1, [POP, REREAD, 0, DONE_OLD],
                             image(8, {0: (0x10000, 8, NEXT, 1), 1: (0x800, len(t), INDIRECT, 0)},
                                   [0], extra=[(0x800, t)]))
    # Several in flight, completed out of order, with save/restore in the middle.
    descs = {i: (0x10000 + 0x100 * i, 16, WRITE, 0) for i in range(8)}
    seeds["inflight"] = seed(3, 2, [POP, POP, POP, DONE_NEW, SAVE, POP, DONE_OLD, NOTIFY,
                                    DISABLE, POP, ENABLE, DONE_NEW, NOTIFY, PENDING],
                             image(8, descs, [3, 1, 4, 0, 7]))
    # Descriptor loop.
    seeds["loop"] = seed(2, 0, [POP], image(4, {0: (0x10000, 4, NEXT, 1), 1: (0x10000, 4, NEXT, 0)},
                                            [0]))
    # Readable after writable.
    seeds["order"] = seed(2, 0, [POP], image(4, {0: (0x10000, 4, WRITE | NEXT, 1),
                                                 1: (0x10000, 4, 0, 0)}, [0]))
    # Nested indirect.
    t = ind_table([(0x900, 16, INDIRECT, 0)])
    seeds["nested"] = seed(2, 1, [POP], image(4, {0: (0x800, 16, INDIRECT, 0)}, [0],
                                              extra=[(0x800, t), (0x900, t)]))
    # avail idx jumps; head out of range; buffer outside RAM.
    seeds["jump"] = seed(2, 0, [PENDING, POP], image(4, {0: (0x10000, 4, 0, 0)}, [0], avail_idx=9))
    seeds["head"] = seed(2, 0, [POP], image(4, {}, [7]))
    seeds["oob"] = seed(2, 0, [POP], image(4, {0: (0x1FFFFC, 8, 0, 0)}, [0]))
    # Guest rewrites the avail ring between pops.
    seeds["poke"] = seed(3, 3, [POP, POKE, 0, 32, 5, POP, DONE_OLD, DONE_OLD],
                         image(8, descs, [0, 1]))
    # Misaligned / out-of-RAM ring addresses (activation fails).
    seeds["misaligned"] = seed(3, 0, [POP], b"", addrs=(0x1008, 0x2000, 0x3000))
    seeds["rings_oob"] = seed(3, 0, [POP], b"", addrs=(0x1000, 0x2000, 0x1FFFF0))
    for name, blob in seeds.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(blob)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "fuzz_corpus"))
