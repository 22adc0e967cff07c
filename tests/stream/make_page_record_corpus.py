#!/usr/bin/python3
"""Writes the named seed inputs of //migration/stream:page_record_fuzz to tests/stream/fuzz_corpus.

Input layout: [codec % 8][flags][arg] + record data (see page_record_fuzz.cc). Needs python3-lz4
and the zstd CLI (Debian packages; run with /usr/bin/python3). Re-run after changing the input layout.
The lf_* files next to them were found by libFuzzer (merged with -merge=1) and are kept as is.
"""
import os
import random
import struct
import subprocess
import sys

import lz4.block

PAGE = 4096
RAW, ZERO, LZ4, ZSTD, XBZRLE = 1, 2, 3, 4, 5
out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "fuzz_corpus")
os.makedirs(out, exist_ok=True)
rng = random.Random(7)

def text_page():
    words = [b"guest ", b"memory ", b"page\n", b"dirty ", b"0xffff ", b"\t"]
    s = b""
    while len(s) < PAGE:
        s += rng.choice(words)
    return s[:PAGE]

def zstd(data, *args):
    # From stdin the CLI writes no content size unless told the size (--stream-size).
    if "--no-content-size" not in args:
        args = ("--stream-size=%d" % len(data),) + args
    return subprocess.run(["zstd", "-q", "-c", *args], input=data, check=True,
                          stdout=subprocess.PIPE).stdout

def lz4b(data):
    return lz4.block.compress(data, store_size=False)

def write(name, codec, flags, arg, data):
    with open(os.path.join(out, name), "wb") as f:
        f.write(bytes([codec, flags, arg]) + data)

text = text_page()
rnd = bytes(rng.getrandbits(8) for _ in range(PAGE))
z = zstd(text)
write("raw", RAW, 0, 0, text)
write("raw_short", RAW, 0, 0, text[:100])
write("zero", ZERO, 0, 0, b"")
write("zero_received", ZERO, 8, 0, b"")
write("zero_with_data", ZERO, 0, 0, b"x")
write("lz4", LZ4, 0, 0, lz4b(text))
write("lz4_received", LZ4, 8, 0, lz4b(text))
write("lz4_truncated", LZ4, 0, 0, lz4b(text)[:-3])
write("lz4_trailing", LZ4, 0, 0, lz4b(text) + b"\0")
write("lz4_half_page", LZ4, 0, 0, lz4b(text[:PAGE // 2]))
write("lz4_bomb", LZ4, 0, 0, lz4b(bytes(1 << 20)))
write("lz4_random", LZ4, 0, 0, lz4b(rnd))
write("zstd", ZSTD, 0, 0, z)
write("zstd_fast", ZSTD, 0, 0, zstd(text, "--fast=5"))
write("zstd_checksum", ZSTD, 0, 0, zstd(text, "--check"))
write("zstd_no_size", ZSTD, 0, 0, zstd(text, "--no-content-size"))
write("zstd_two_frames", ZSTD, 0, 0, zstd(text[:PAGE // 2]) + zstd(text[PAGE // 2:]))
write("zstd_trailing", ZSTD, 0, 0, z + b"\x01")
write("zstd_bomb", ZSTD, 0, 0, zstd(bytes(1 << 20)))
write("zstd_truncated", ZSTD, 0, 0, z[:len(z) // 2])
write("zstd_skippable", ZSTD, 0, 0, struct.pack("<II", 0x184D2A50, 4) + b"abcd" + z)
two = zstd(text + rnd)  # header patched to declare one page
if two[4] >> 6 == 1 and two[4] & 0x20:
    write("zstd_lying_size", ZSTD, 0, 0, two[:5] + struct.pack("<H", PAGE - 256) + two[7:])
else:  # the zstd CLI's header layout differs (covered by page_decode_test instead)
    print("skipping zstd_lying_size: frame header descriptor 0x%02x" % two[4])
write("xbzrle", XBZRLE, 0, 0, b"\x01\x02abc")
write("unknown_codec", 6, 0, 0, text)
write("unspecified", 0, 0, 0, b"")
write("unaligned", LZ4, 2, 5, lz4b(text))
write("last_page", ZSTD, 4, 0, z)
write("out_of_ram", RAW, 6, 0, text)
write("encode_lz4_text", 1, 1, 0, text)
write("encode_zstd_text", 0, 1, 4, text)
write("encode_lz4_random", 1, 1, 3, rnd)
write("encode_zstd_random", 0, 1, 0, rnd)
write("encode_zero", 1, 1, 0, b"")
write("encode_short", 0, 1, 7, b"abc" * 50)
print("wrote", len(os.listdir(out)), "inputs to", out)
