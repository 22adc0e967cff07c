#!/usr/bin/env python3
"""Adaptive pre-copy vs plain pre-copy vs QEMU 7.2 auto-converge, on a shaped link (issue 7).

Run on demand (it is not a test), as root:  python3 bench/adaptive_migration.py [--out PATH]

Two network namespaces joined by a veth pair; the source side's egress (the migration stream)
is shaped with `tc qdisc ... tbf` to --link-mbit (default 32 Mbit/s = 4 MiB/s), a rate the
workloads' dirty rates exceed. The link is measured first (a Python TCP stream, 3 s).

Ours (`vmm --incoming ADDR` in namespace 2, the source `vmm --test-guest memwalk` in 1):
  workloads  compressible: memwalk mib=32 (4 stamp words per page, the rest zero)
             random:       memwalk mib=16 fill=random (whole pages of pseudo-random bytes, a new
                           window every generation: neither LZ4 nor XBZRLE can shrink them)
  cases      plain:    `vmmctl migrate --json`, cancelled (`vmmctl migrate-cancel`) after
                       --plain-max-s if it has not finished; the remaining/dirty trend is kept
             adaptive: `vmmctl migrate --json --adaptive`, up to --adaptive-max-s
QEMU 7.2 (TCG: Linux does not run on this software KVM), tools/guest kernel + busybox initramfs
plus a static `dirtier` (C source below, built here with gcc -static and appended to the
initramfs as a second cpio archive). The dirtier rewrites a region of the same size as ours'
with the same page contents (stamp words, or a window of a random pool), calibrated for 4 s to
the dirty rate measured in our source guest and then CPU-bound at that pace (so that vCPU
throttling slows it down as it slows memwalk down). Cases: `auto-converge` capability
(cpu-throttle-* parameters at their defaults) and plain pre-copy as the control (cancelled after
--plain-max-s). Dirty rates: ours from memwalk's generations/s and the VMM's dirty_pages_per_s,
QEMU's from its own `calc-dirty-rate` (page sampling) and the dirtier's printout.

Recorded per case: finished?, total time, downtime, bytes on the wire, iterations, final phase,
throttle (final and maximum seen), compressed/delta pages, the policy decision log
(MigrationProgress.policy_decisions), and a once-a-second timeline (remaining, dirty rate,
bandwidth, throttle). Ratios ours-adaptive / QEMU-auto-converge where both finished.
JSON to bench/results/adaptive_migration.json, a table on stdout.

Standard library only (gcc for the dirtier). Every child process, the namespaces and temporary
files are removed on exit, on error and on Ctrl-C/SIGTERM (bench/migration.py's bookkeeping).
"""

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import migration as mig  # noqa: E402  (process bookkeeping, QMP client)
import postcopy_migration as pcm  # noqa: E402  (Console: serial over a unix socket)

from migration import MIB, BenchError, CaseError, log  # noqa: E402

DEFAULT_OUT = os.path.join(mig.REPO, "bench", "results", "adaptive_migration.json")
GUEST_DIR = os.path.expanduser("~/.cache/microvmm/guest")
LINUX_CMDLINE = "console=ttyS0 tsc_early_khz=2000000 mode=shell"
WORKLOADS = {  # name -> (memwalk args, region MiB, dirtier mode)
    "compressible": ("mib=32", 32, "stamp"),
    "random": ("mib=16 fill=random", 16, "random"),
}

# ----------------------------------------------------------------------------------------
# The QEMU guest's dirtier (static, runs as a process under the busybox shell).

DIRTIER_C = r"""
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
/* dirtier MIB stamp|random TARGET_MIB_S: rewrites MIB MiB page by page, forever. Each page gets
 * the memwalk stamp (words 0, 1, 256, 511; the rest stays zero: compressible) or, with random,
 * first a 4 KiB window of a 64 KiB LCG pool at an offset that changes every generation (as
 * memwalk fill=random). For the first 4 s a busy-loop per page is calibrated so the rate is
 * TARGET; then it is fixed: the dirtier stays CPU-bound, so throttling the vCPU slows it down. */
#define POOL_WORDS 8192
static uint64_t pool[POOL_WORDS + 512];
static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec / 1e9;
}
static uint64_t mix(uint64_t pfn, uint64_t gen) {
  uint64_t h = pfn * 0x9e3779b97f4a7c15ull ^ gen * 0xc2b2ae3d27d4eb4full;
  return h ^ (h >> 29);
}
int main(int argc, char** argv) {
  if (argc < 4) return 2;
  size_t mib = strtoul(argv[1], 0, 10), npages = mib << 8;
  int random = strcmp(argv[2], "random") == 0;
  double target = atof(argv[3]);
  uint64_t x = 0x2545f4914f6cdd1dull;
  for (int i = 0; i < POOL_WORDS + 512; i++) pool[i] = x = x * 6364136223846793005ull + 1442695040888963407ull;
  uint8_t* mem = mmap(0, mib << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  if (mem == MAP_FAILED) { perror("mmap"); return 1; }
  setvbuf(stdout, 0, _IOLBF, 0);
  printf("dirtier start mib=%zu mode=%s target=%.1f\n", mib, argv[2], target);
  double spin = 256, t0 = now(), tc = t0, tr = t0;
  uint64_t pc = 0, pr = 0;
  int calibrating = target > 0;
  for (uint64_t gen = 1;; gen++) {
    for (size_t p = 0; p < npages; p++) {
      volatile uint64_t* pg = (volatile uint64_t*)(mem + (p << 12));
      uint64_t h = mix(p, gen);
      if (random) memcpy((void*)pg, pool + h % POOL_WORDS, 4096);
      pg[0] = 0x4d454d57414c4b00ull ^ p; pg[1] = gen; pg[256] = h; pg[511] = ~h;
      for (volatile unsigned long k = 0, n = (unsigned long)spin; k < n; k++) {}
      pc++; pr++;
      if ((pc & 63) == 0) {
        double t = now();
        if (calibrating && t - tc >= 0.25) {
          double rate = pc * 4096.0 / 1048576.0 / (t - tc);
          spin = spin * rate / target;
          if (spin < 1) spin = 1;
          if (spin > 1e8) spin = 1e8;
          pc = 0; tc = t;
          if (t - t0 > 4) { calibrating = 0; printf("dirtier calibrated spin=%.0f\n", spin); }
        }
        if (t - tr >= 1.0) {
          printf("dirtier rate=%.2f MiB/s gen=%llu\n", pr * 4096.0 / 1048576.0 / (t - tr),
                 (unsigned long long)gen);
          pr = 0; tr = t;
        }
      }
    }
  }
}
"""


def _cpio_newc(files):
    """A newc cpio archive: files = [(name, mode, data)]."""
    out, ino = bytearray(), 1

    def entry(name, mode, data):
        nonlocal ino
        nb = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0))
        ino += 1
        out.extend(hdr.encode() + nb)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))

    for name, mode, data in files:
        entry(name, mode, data)
    entry("TRAILER!!!", 0, b"")
    return bytes(out)


def build_qemu_initrd(a, tmp):
    """initramfs.cpio.gz + (zero padding to 4 bytes) + a newc archive with /dirtier. The kernel
    unpacks concatenated archives in order (each may be compressed or not)."""
    src, exe = os.path.join(tmp, "dirtier.c"), os.path.join(tmp, "dirtier")
    with open(src, "w") as f:
        f.write(DIRTIER_C)
    cp = subprocess.run(["gcc", "-O2", "-static", "-o", exe, src], capture_output=True)
    if cp.returncode != 0:
        raise BenchError("gcc -static dirtier.c failed:\n" + cp.stderr.decode(errors="replace"))
    with open(os.path.join(a.guest_dir, "initramfs.cpio.gz"), "rb") as f:
        base = f.read()
    with open(exe, "rb") as f:
        exe_bytes = f.read()
    out = os.path.join(tmp, "initrd-dirtier.img")
    with open(out, "wb") as f:
        f.write(base + b"\0" * (-len(base) % 4) + _cpio_newc([("dirtier", 0o100755, exe_bytes)]))
    return out


# ----------------------------------------------------------------------------------------
# The shaped link.


class Netns:
    """NS1 (source) and NS2 (destination), veth0 10.78.S.1 <-> veth1 10.78.S.2; veth0's egress
    (the migration stream's direction) shaped with tbf. Deleted by close() (the veth pair dies
    with its namespaces), which main() calls in a finally and on signals."""

    def __init__(self, mbit, burst_kib, latency_ms):
        tag = f"{os.getpid() % 100000}"
        self.ns = (f"mbad{tag}a", f"mbad{tag}b")
        s = 10 + os.getpid() % 240
        self.addr = (f"10.78.{s}.1", f"10.78.{s}.2")
        self.created = []
        self.mbit, self.burst_kib, self.latency_ms = mbit, burst_kib, latency_ms
        self.qdisc = None

    def _ip(self, *args):
        cp = subprocess.run(["ip"] + list(args), capture_output=True, timeout=30)
        if cp.returncode != 0:
            raise BenchError(f"ip {' '.join(args)}: {cp.stderr.decode(errors='replace')}")
        return cp.stdout.decode(errors="replace")

    def create(self):
        for ns in self.ns:
            self._ip("netns", "add", ns)
            self.created.append(ns)
        n1, n2 = self.ns
        self._ip("link", "add", "veth0", "netns", n1, "type", "veth", "peer", "name", "veth1",
                 "netns", n2)
        for ns, dev, addr in ((n1, "veth0", self.addr[0]), (n2, "veth1", self.addr[1])):
            self._ip("-n", ns, "addr", "add", addr + "/24", "dev", dev)
            self._ip("-n", ns, "link", "set", dev, "up")
            self._ip("-n", ns, "link", "set", "lo", "up")
        # tbf: token bucket at the link rate; `burst` is the bucket (>= rate/HZ), `latency` bounds
        # the queue (packets waiting longer are dropped: TCP then paces itself to the rate).
        cmd = ["tc", "-n", n1, "qdisc", "add", "dev", "veth0", "root", "tbf", "rate",
               f"{self.mbit}mbit", "burst", f"{self.burst_kib}kb", "latency",
               f"{self.latency_ms}ms"]
        cp = subprocess.run(cmd, capture_output=True, timeout=30)
        if cp.returncode != 0:
            raise BenchError(f"{' '.join(cmd)}: {cp.stderr.decode(errors='replace')}")
        self.qdisc = " ".join(cmd[3:])
        return self

    def exec(self, which):
        return ["ip", "netns", "exec", self.ns[which - 1]]

    def qdisc_stats(self):
        cp = subprocess.run(["tc", "-n", self.ns[0], "-s", "qdisc", "show", "dev", "veth0"],
                            capture_output=True, timeout=30)
        return (cp.stdout + cp.stderr).decode(errors="replace").strip()

    def close(self):
        while self.created:
            ns = self.created.pop()
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=30)


LINK_RX = r"""
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(1); print("listening", flush=True)
c, _ = s.accept(); n = 0; t0 = None
while True:
    b = c.recv(1 << 20)
    if not b: break
    if t0 is None: t0 = time.monotonic(); first = len(b)
    else: n += len(b)
print(n, time.monotonic() - t0, flush=True)
"""
LINK_TX = r"""
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2]))); buf = b"\xa5" * 65536
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end: c.sendall(buf)
c.close()
"""


def measure_link(net, seconds):
    """Goodput of one TCP stream NS1 -> NS2 over `seconds` (receiver-side, first chunk excluded)."""
    port = mig.free_tcp_port()
    rx = subprocess.Popen(net.exec(2) + [sys.executable, "-c", LINK_RX, net.addr[1], str(port)],
                          stdout=subprocess.PIPE, preexec_fn=mig._child_setup)
    try:
        rx.stdout.readline()
        subprocess.run(net.exec(1) + [sys.executable, "-c", LINK_TX, net.addr[1], str(port),
                                      str(seconds)], timeout=seconds + 30, check=True)
        n, dt = rx.stdout.readline().split()
        return int(n) / float(dt)
    finally:
        rx.kill()
        rx.wait()


# ----------------------------------------------------------------------------------------
# Helpers.


def serial_gens(path):
    """[(time.monotonic() when seen, gen)] cannot be had after the fact; the rate is measured
    by sampling the count of `memwalk gen=N ok` lines twice."""
    txt = pcm._read(path)
    m = re.findall(r"memwalk gen=(\d+) ok", txt)
    return int(m[-1]) if m else 0


def measure_memwalk_rate(path, mib, seconds):
    g0, t0 = serial_gens(path), time.monotonic()
    time.sleep(seconds)
    g1, t1 = serial_gens(path), time.monotonic()
    gps = (g1 - g0) / (t1 - t0)
    return {"gens_per_s": round(gps, 3), "dirty_mib_per_s": round(gps * mib, 2),
            "window_s": round(t1 - t0, 2)}


def run_ctl(a, sock, *args, timeout=30):
    cp = subprocess.run([a.vmmctl, "--socket", sock] + list(args), stdin=subprocess.DEVNULL,
                        capture_output=True, timeout=timeout, preexec_fn=mig._child_setup)
    return cp.returncode, cp.stdout.decode(errors="replace"), cp.stderr.decode(errors="replace")


class Poller(threading.Thread):
    """Calls fn() every `period` s and keeps (t since start, result) until stopped."""

    def __init__(self, fn, period=1.0):
        super().__init__(daemon=True)
        self.fn, self.period, self.samples = fn, period, []
        self._stop_ev = threading.Event()
        self.t0 = time.monotonic()

    def run(self):
        while not self._stop_ev.is_set():
            try:
                r = self.fn()
            except Exception as e:  # noqa: BLE001  (a failed poll is recorded, not fatal)
                r = {"poll_error": str(e)[:200]}
            if r is not None:
                self.samples.append((round(time.monotonic() - self.t0, 2), r))
            self._stop_ev.wait(self.period)

    def stop(self):
        self._stop_ev.set()
        self.join(10)


def _i(d, k):
    try:
        return int(d.get(k, 0) or 0)
    except (TypeError, ValueError):
        return 0


def ours_timeline_row(t, p):
    return {"t_s": t, "phase": p.get("phase"), "iteration": _i(p, "iteration"),
            "remaining_mib": round(_i(p, "remaining_pages") * 4096 / MIB, 2),
            "dirty_mib_per_s": round(_i(p, "dirty_pages_per_s") * 4096 / MIB, 2),
            "bandwidth_mib_per_s": round(_i(p, "bandwidth_bytes_per_s") / MIB, 2),
            "sent_mib": round(_i(p, "bytes_sent") / MIB, 2),
            "expected_downtime_ms": _i(p, "expected_downtime_ms"),
            "throttle_percent": _i(p, "throttle_percent"),
            "tendency": p.get("policy_tendency")}


def per_iteration(rows):
    """The last timeline row of each iteration: the remaining/dirty trend."""
    last = {}
    for r in rows:
        if r.get("iteration") is not None and "phase" in r:
            last[r["iteration"]] = r
    return [last[k] for k in sorted(last)]


ITER_RE = re.compile(r"iteration (\d+) sent (\d+) pages \((\d+) KiB\) in (\d+) ms")


def source_iterations(log_text):
    """Our source's per-pass log lines: what each pre-copy pass sent (the dirty set left by the
    previous pass) and how long it took. migrate-status' remaining_pages is not usable for this:
    it reads 0 during pre-copy passes (seen 2026-11-22)."""
    return [{"iteration": int(m[0]), "pages": int(m[1]), "sent_mib": round(int(m[2]) / 1024, 2),
             "ms": int(m[3])} for m in ITER_RE.findall(log_text)]


def trend_words(iters, key="remaining_mib"):
    """'falling' / 'flat' / 'rising': the floor of `key` over the first and the second half of
    the passes after the first."""
    xs = [r[key] for r in iters if r["iteration"] >= 1]
    if len(xs) < 3:
        return "too few iterations"
    first, last = min(xs[:max(1, len(xs) // 2)]), min(xs[len(xs) // 2:])
    if last < 0.8 * first:
        return f"falling (floor {first:.1f} -> {last:.1f} MiB)"
    if last > 1.2 * first:
        return f"rising (floor {first:.1f} -> {last:.1f} MiB)"
    return f"flat (floor {first:.1f} -> {last:.1f} MiB)"


# ----------------------------------------------------------------------------------------
# Our VMM.


def end_case(a, case, d, procs):
    """A case's teardown: its processes, and its work dir unless --keep-logs."""
    for p in procs:
        if p is not None:
            mig.stop(p)
    if a.keep_logs:
        case["logs"] = d
    else:
        shutil.rmtree(d, ignore_errors=True)


def log_case(name, case):
    log(f"{name}: " + (f"finished={case['finished']} total={case.get('total_ms')} ms "
                       f"down={case.get('downtime_ms')} ms wire={case.get('wire_bytes', 0) / MIB:.1f}"
                       f" MiB iters={case.get('iterations')} throttle_max="
                       f"{case.get('throttle_percent_max')}" if case["ok"]
                       else f"ERROR {case.get('error', '')[:300]}"))


def ours_case(a, net, tmp, workload, adaptive, ladder=None):
    gargs, mib, _ = WORKLOADS[workload]
    name = f"ours-{'adaptive' if adaptive else 'plain'}-{workload}"
    if ladder:
        name = f"ours-adaptive[{ladder}]-{workload}"
    # Plain characters only: the API socket path becomes a gRPC target URI.
    d = tempfile.mkdtemp(prefix=re.sub(r"[^A-Za-z0-9_.-]", "_", name) + "-", dir=tmp)
    f = lambda n: os.path.join(d, n)  # noqa: E731
    to = f"{net.addr[1]}:{mig.free_tcp_port()}"
    flags = ["--downtime-ms", str(a.downtime_ms)] + (["--adaptive"] if adaptive else [])
    if ladder:
        flags += ["--ladder", ladder]
        if "postcopy" in ladder.split(","):
            flags += ["--allow-postcopy"]  # the ladder may only end in post-copy when allowed
    case = {"vmm": "ours", "case": name, "workload": workload, "adaptive": adaptive,
            "guest": f"memwalk {gargs} (--memory {a.memory_mib})", "migrate_flags": flags,
            "ok": False, "finished": False}
    src = dst = ctl = poller = None
    log(f"{name}: start")
    try:
        dst = mig.spawn(net.exec(2) + [a.vmm, "--incoming", to, "--serial",
                                       f"file:{f('dst.serial')}"], f("dst.log"))
        mig.wait_for(lambda: mig.file_has(f("dst.log"), b"waiting for an incoming migration"),
                     30, "destination vmm listening", dst, [f("dst.log")])
        src = mig.spawn(net.exec(1) + [a.vmm, "--test-guest", "memwalk", "--memory",
                                       str(a.memory_mib), "--test-guest-args", gargs,
                                       "--api-socket", f("src.sock"), "--serial",
                                       f"file:{f('src.serial')}"], f("src.log"))
        mig.wait_for(lambda: serial_gens(f("src.serial")) >= 2, 120, "memwalk gen=2", src,
                     [f("src.log"), f("src.serial")])
        case["dirty_rate_before"] = measure_memwalk_rate(f("src.serial"), mib, a.rate_window_s)
        log(f"{name}: guest dirties {case['dirty_rate_before']['dirty_mib_per_s']} MiB/s; "
            "migrating")
        gen_at_start = serial_gens(f("src.serial"))

        def poll():
            rc, out, _ = run_ctl(a, f("src.sock"), "migrate-status", "--json", timeout=10)
            if rc != 0:
                return None
            try:
                return ours_timeline_row(0, json.loads(out))
            except ValueError:
                return None

        t0 = time.monotonic()
        ctl = pcm._spawn_split([a.vmmctl, "--socket", f("src.sock"), "migrate", "--to", to,
                                "--json"] + flags, f("ctl.out"), f("ctl.err"))
        poller = Poller(poll, a.poll_s)
        poller.start()
        limit = a.adaptive_max_s if adaptive else a.plain_max_s
        r = mig.reap(ctl, limit)
        if r is None:
            case["cancelled_after_s"] = round(time.monotonic() - t0, 1)
            log(f"{name}: not finished after {limit} s: migrate-cancel")
            case["cancel"] = run_ctl(a, f("src.sock"), "migrate-cancel")[:2]
            r = mig.reap(ctl, 60)
            if r is None:
                raise CaseError("vmmctl migrate did not return 60 s after migrate-cancel")
        case["harness_wall_ms"] = round((time.monotonic() - t0) * 1000)
        poller.stop()
        case["vmmctl_rc"] = r[0]
        try:
            prog = json.loads(pcm._read(f("ctl.out")))
        except ValueError:
            raise CaseError(f"no JSON from vmmctl migrate (exit {r[0]}): "
                            f"{pcm._read(f('ctl.out'))[-800:]}{pcm._read(f('ctl.err'))[-800:]}")
        rows = [dict(row, t_s=t) for t, row in poller.samples]
        rows.append(dict(ours_timeline_row(case["harness_wall_ms"] / 1000, prog), final=True))
        iters = per_iteration(rows)
        case.update({
            "phase": prog.get("phase"),
            "finished": prog.get("phase") == "MIGRATION_COMPLETED",
            "error_text": prog.get("error"),
            "total_ms": _i(prog, "total_ms") or _i(prog, "elapsed_ms"),
            "downtime_ms": _i(prog, "downtime_ms") if prog.get("phase") == "MIGRATION_COMPLETED"
            else None,
            "wire_bytes": _i(prog, "bytes_sent"),
            "pages_sent": _i(prog, "pages_sent"),
            "compressed_pages": _i(prog, "compressed_pages"),
            "delta_pages": _i(prog, "delta_pages"),
            "iterations": _i(prog, "iteration"),
            "throttle_percent_final": _i(prog, "throttle_percent"),
            "throttle_percent_max": max([row["throttle_percent"] for row in rows] + [0]),
            "postcopy": bool(prog.get("postcopy")),
            # After a switch: pages pulled on demand vs pushed, vCPU faults and time blocked.
            "postcopy_stats": prog.get("postcopy_stats"),
            "policy_tendency": prog.get("policy_tendency"),
            "policy_settings": prog.get("policy_settings"),
            "policy_decisions": [{
                "iteration": x.get("iteration", 0), "step": x.get("step"),
                "action": x.get("action"), "tendency": x.get("tendency"),
                "reason": x.get("reason"), "settings": x.get("settings")}
                for x in prog.get("policy_decisions", [])],
            "dirty_tracking": prog.get("dirty_tracking"),
            "per_iteration": iters,
            "timeline": rows,
            "vmmctl_stderr_tail": pcm._read(f("ctl.err"))[-3000:],
        })
        if case["finished"]:
            src_r = mig.reap(src, 30) or mig.stop(src)
            case["src_rc"] = src_r[0]
            # The walk must go on over there: two more generations, no FAIL.
            dst_gen0 = serial_gens(f("dst.serial"))
            try:
                mig.wait_for(lambda: serial_gens(f("dst.serial")) >= max(dst_gen0, 1) + 2, 60,
                             "memwalk generations on the destination", dst,
                             [f("dst.log"), f("dst.serial")])
            except CaseError as e:
                case["dst_error"] = str(e)[:1500]
            case["dst_gens_after"] = serial_gens(f("dst.serial"))
            case["dst_fail"] = mig.file_has(f("dst.serial"), b"FAIL")
            if case.get("dst_error") or case["dst_fail"]:
                raise CaseError("destination guest did not continue cleanly:\n"
                                + mig.tail(f("dst.serial"), 600) + mig.tail(f("dst.log"), 600))
        else:
            case["src_alive_after_cancel"] = src.poll() is None
            case["gens_during_migration"] = serial_gens(f("src.serial")) - gen_at_start
            case["src_fail"] = mig.file_has(f("src.serial"), b"FAIL")
        case["source_passes"] = source_iterations(pcm._read(f("src.log")))
        case["trend"] = trend_words(case["source_passes"], "sent_mib")
        case["src_log_tail"] = mig.tail(f("src.log"), 2500)
        case["ok"] = True
    except CaseError as e:
        case["error"] = str(e)[:4000]
    finally:
        if poller is not None and poller.is_alive():
            poller.stop()
        end_case(a, case, d, (ctl, src, dst))
    log_case(name, case)
    return case


# ----------------------------------------------------------------------------------------
# QEMU.


def qemu_argv(a, initrd, qmp, serial, incoming=None):
    argv = [a.qemu, "-accel", "tcg", "-M", "pc", "-smp", "1", "-nodefaults", "-no-user-config",
            "-display", "none", "-m", f"{a.memory_mib}M", "-kernel",
            os.path.join(a.guest_dir, "bzImage"), "-initrd", initrd, "-append", LINUX_CMDLINE,
            "-qmp", f"unix:{qmp},server=on,wait=off"]
    if incoming:
        return argv + ["-serial", f"file:{serial}", "-incoming", incoming]
    return argv + ["-chardev", f"socket,id=con,path={serial},server=on,wait=off",
                   "-serial", "chardev:con"]


def qemu_timeline_row(info):
    ram = info.get("ram", {}) or {}
    return {"status": info.get("status"),
            "iteration": _i(ram, "dirty-sync-count"),
            "remaining_mib": round(_i(ram, "remaining") / MIB, 2),
            "dirty_mib_per_s": round(_i(ram, "dirty-pages-rate") * 4096 / MIB, 2),
            "bandwidth_mib_per_s": round(float(ram.get("mbps", 0) or 0) / 8 * 1e6 / MIB, 2),
            "sent_mib": round(_i(ram, "transferred") / MIB, 2),
            "expected_downtime_ms": _i(info, "expected-downtime"),
            "throttle_percent": _i(info, "cpu-throttle-percentage")}


def qemu_case(a, net, tmp, initrd, workload, auto_converge, target_mib_s):
    _, mib, mode = WORKLOADS[workload]
    name = f"qemu-{'autoconverge' if auto_converge else 'plain'}-{workload}"
    d = tempfile.mkdtemp(prefix=name + "-", dir=tmp)
    f = lambda n: os.path.join(d, n)  # noqa: E731
    uri = f"tcp:{net.addr[1]}:{mig.free_tcp_port()}"
    case = {"vmm": "qemu", "accel": "tcg", "case": name, "workload": workload,
            "auto_converge": auto_converge,
            "guest": f"Linux (TCG), /dirtier {mib} {mode} {target_mib_s:.2f}",
            "ok": False, "finished": False}
    src = dst = qs = qd = con = None
    log(f"{name}: start (dirtier target {target_mib_s:.2f} MiB/s)")
    try:
        dst = mig.spawn(net.exec(2) + qemu_argv(a, initrd, f("dst.qmp"), f("dst.serial"), uri),
                        f("dst.log"))
        qd = mig.Qmp(f("dst.qmp"), 30, dst, [f("dst.log")])
        t0 = time.monotonic()
        src = mig.spawn(net.exec(1) + qemu_argv(a, initrd, f("src.qmp"), f("src.serial")),
                        f("src.log"))
        qs = mig.Qmp(f("src.qmp"), 30, src, [f("src.log")])
        con = pcm.Console(f("src.serial"), src)
        con.expect(r"init: starting shell", a.linux_timeout)
        con.run("stty -echo 2>/dev/null", 20)
        case["boot_s"] = round(time.monotonic() - t0, 2)
        con.s.sendall(f"/dirtier {mib} {mode} {target_mib_s:.3f} &\n".encode())
        out, _ = con.expect(r"dirtier calibrated spin=\d+", 60)
        rates = []
        for _ in range(3):
            _, m = con.expect(r"dirtier rate=([\d.]+) MiB/s", 20)
            rates.append(float(m.group(1)))
        case["dirtier_rate_before_mib_s"] = rates
        # QEMU's own measurement (page sampling; the dirty-ring/bitmap modes need KVM).
        try:
            qs.cmd("calc-dirty-rate", **{"calc-time": 2})
            time.sleep(2.5)
            dr = None
            for _ in range(40):
                dr = qs.cmd("query-dirty-rate")
                if dr.get("status") == "measured":
                    break
                time.sleep(0.1)
            case["qemu_calc_dirty_rate_mib_s"] = dr.get("dirty-rate")
            case["qemu_calc_dirty_rate"] = dr
        except CaseError as e:
            case["qemu_calc_dirty_rate_error"] = str(e)[:300]
        caps = [{"capability": "auto-converge", "state": bool(auto_converge)}]
        qs.cmd("migrate-set-capabilities", capabilities=caps)
        qs.cmd("migrate-set-parameters", **{"max-bandwidth": mig.UNLIMITED_QEMU_BW,
                                            "downtime-limit": a.downtime_ms})
        case["migrate_parameters"] = qs.cmd("query-migrate-parameters")
        t_mig0, t_mig0_wall = time.monotonic(), time.time()
        qs.cmd("migrate", uri=uri)
        limit = a.adaptive_max_s if auto_converge else a.plain_max_s
        info, rows, t_row = None, [], -1.0
        while True:  # one thread on this QMP connection: the timeline is sampled here
            time.sleep(0.2)
            info = qs.cmd("query-migrate")
            t = time.monotonic() - t_mig0
            if t - t_row >= a.poll_s:
                rows.append(dict(qemu_timeline_row(info), t_s=round(t, 2)))
                t_row = t
            if info.get("status") in ("completed", "failed", "cancelled"):
                break
            if t > limit:
                case["cancelled_after_s"] = round(t, 1)
                log(f"{name}: not finished after {limit} s: migrate_cancel")
                qs.cmd("migrate_cancel")
                for _ in range(300):
                    info = qs.cmd("query-migrate")
                    if info.get("status") in ("cancelled", "failed", "completed"):
                        break
                    time.sleep(0.1)
                break
        case["harness_wall_ms"] = round((time.monotonic() - t_mig0) * 1000)
        rows.append(dict(qemu_timeline_row(info), t_s=case["harness_wall_ms"] / 1000,
                         final=True))
        ram = info.get("ram", {}) or {}
        finished = info.get("status") == "completed"
        case.update({"status": info.get("status"), "finished": finished,
                     # A cancelled migration's query-migrate has no ram counters: then the
                     # last sampled ones (up to --poll-s old).
                     "wire_bytes": _i(ram, "transferred") or round(
                         max([r.get("sent_mib", 0) for r in rows] + [0]) * MIB),
                     "iterations": _i(ram, "dirty-sync-count") or max(
                         [r.get("iteration", 0) for r in rows] + [0]),
                     "throttle_percent_final": _i(info, "cpu-throttle-percentage"),
                     "throttle_percent_max": max([r.get("throttle_percent", 0) for r in rows
                                                  if "throttle_percent" in r] + [0]),
                     "timeline": rows, "query_migrate": info})
        iters = per_iteration([dict(r, phase=r.get("status")) for r in rows
                               if "iteration" in r])
        case["per_iteration"] = iters
        case["trend"] = trend_words(iters)
        if finished:
            st = None
            for _ in range(100):
                st = qd.cmd("query-status").get("status")
                if st == "running":
                    break
                time.sleep(0.05)
            ts = lambda e: e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6  # noqa
            stop_ev = [ts(e) for e in qs.events if e.get("event") == "STOP"]
            resume_ev = [ts(e) for e in qd.events if e.get("event") == "RESUME"]
            both = bool(stop_ev and resume_ev)
            case.update({
                "dst_status": st,
                "total_ms": max(_i(info, "total-time"),
                                round((resume_ev[-1] - t_mig0_wall) * 1000) if resume_ev else 0),
                "qemu_reported_total_ms": _i(info, "total-time"),
                "downtime_ms": (round((resume_ev[-1] - stop_ev[-1]) * 1000) if both
                                else _i(info, "downtime")),
                "downtime_source": ("destination RESUME event - source STOP event" if both
                                    else "QEMU-reported (source only)"),
                "qemu_reported_downtime_ms": _i(info, "downtime")})
            # The dirtier must go on over there (its rate lines continue in the dst serial file).
            n0 = pcm._read(f("dst.serial")).count("dirtier rate=")
            try:
                mig.wait_for(lambda: pcm._read(f("dst.serial")).count("dirtier rate=") >= n0 + 2,
                             30, "dirtier output on the destination", dst, [f("dst.log")])
                case["dst_dirtier_rates_after"] = re.findall(r"dirtier rate=([\d.]+)",
                                                             pcm._read(f("dst.serial")))[-3:]
            except CaseError as e:
                case["dst_error"] = str(e)[:800]
            if st != "running":
                raise CaseError(f"QEMU destination status {st!r}\n" + mig.tail(f("dst.log")))
        else:
            case["total_ms"] = _i(info, "total-time") or case["harness_wall_ms"]
            case["downtime_ms"] = None
            case["error_text"] = info.get("error-desc")
            time.sleep(1.5)
            try:
                tailtxt = con.s.recv(65536).decode(errors="replace") if con else ""
            except OSError:
                tailtxt = ""
            case["src_rates_after_cancel"] = re.findall(r"dirtier rate=([\d.]+)", tailtxt)[-3:]
        case["ok"] = True
    except CaseError as e:
        case["error"] = str(e)[:4000]
    finally:
        for x in (con, qs, qd):
            if x is not None:
                x.close()
        end_case(a, case, d, (src, dst))
    log_case(name, case)
    return case


# ----------------------------------------------------------------------------------------
# Report.


def summarize(cases):
    """Ratios ours / QEMU auto-converge per workload, from the newest run: the last of our
    adaptive cases that finished (with --append, earlier runs come first in `cases`; within a
    run the full ladder precedes the --fallback-ladder ones) and the last QEMU case."""
    ratios = {}
    for w in WORKLOADS:
        o = next((c for c in reversed(cases) if c.get("vmm") == "ours" and c.get("adaptive")
                  and c.get("workload") == w and c.get("finished")), None)
        qs = [c for c in cases if c.get("case") == f"qemu-autoconverge-{w}"]
        q = next((c for c in reversed(qs) if c.get("finished")), qs[-1] if qs else None)
        r = {"both_finished": bool(o and q and q.get("finished")),
             "ours_case": o and o["case"], "qemu_case": q and q["case"]}
        if r["both_finished"]:
            for k in ("total_ms", "downtime_ms", "wire_bytes"):
                r[k.replace("_ms", "").replace("_bytes", "") + "_ours_over_qemu"] = (
                    round(o[k] / q[k], 3) if q.get(k) else None)
        else:
            r["why_null"] = "a side did not finish or did not run"
        ratios[w] = r
    return ratios


def _f(x, fmt="{:.0f}"):
    return "-" if x is None else fmt.format(x)


def print_report(rep):
    print(f"\nlink: tbf {rep['link']['mbit']} Mbit/s, measured "
          f"{_f(rep['link'].get('measured_mib_s'), '{:.2f}')} MiB/s; downtime limit "
          f"{rep['config']['downtime_ms']} ms")
    print(f"{'case':32} {'dirty MiB/s':>11} {'fin':>4} {'total ms':>9} {'down ms':>8} "
          f"{'wire MiB':>9} {'iters':>5} {'thr%':>5} {'trend / phase'}")
    for c in rep["cases"]:
        if not c.get("ok"):
            print(f"{c['case']:32} ERROR {c.get('error', '')[:80]}")
            continue
        dr = (c.get("dirty_rate_before") or {}).get("dirty_mib_per_s")
        if c["vmm"] == "qemu":
            dr = c.get("qemu_calc_dirty_rate_mib_s")
        print(f"{c['case']:32} {_f(dr, '{:.1f}'):>11} {'yes' if c['finished'] else 'NO':>4} "
              f"{_f(c.get('total_ms')):>9} {_f(c.get('downtime_ms')):>8} "
              f"{c.get('wire_bytes', 0) / MIB:9.1f} {c.get('iterations', 0):5d} "
              f"{c.get('throttle_percent_max', 0):5d} "
              f"{c.get('phase') or c.get('status')}; {c.get('trend')}")
        for x in c.get("policy_decisions", []):
            print(f"{'':6}iter {x['iteration']}: {x['action']} {x['step']}: {x['reason']}")
    print("ratios ours-adaptive / QEMU-auto-converge:", json.dumps(rep["ratios"]))


# ----------------------------------------------------------------------------------------


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vmm", default=mig.DEFAULT_VMM)
    p.add_argument("--vmmctl", default=mig.DEFAULT_VMMCTL)
    p.add_argument("--qemu", default="qemu-system-x86_64")
    p.add_argument("--guest-dir", default=GUEST_DIR)
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--link-mbit", type=float, default=32,
                   help="tbf rate of the source's egress in Mbit/s (default 32 = 4 MiB/s)")
    p.add_argument("--link-burst-kib", type=int, default=64)
    p.add_argument("--link-latency-ms", type=int, default=100)
    p.add_argument("--memory-mib", type=int, default=256, help="guest RAM, both VMMs")
    p.add_argument("--downtime-ms", type=int, default=300, help="both VMMs (their default)")
    p.add_argument("--workloads", default="compressible,random")
    p.add_argument("--plain-max-s", type=float, default=40,
                   help="plain pre-copy (ours and QEMU) is cancelled after this")
    p.add_argument("--adaptive-max-s", type=float, default=240,
                   help="adaptive / auto-converge cases are cancelled after this")
    p.add_argument("--fallback-ladder", default="compress,throttle;compress,throttle,postcopy",
                   help="when `--adaptive` (full ladder) does not finish, run it again with "
                        "`--ladder L` for each L of this ';'-list until one finishes ('' = "
                        "don't); a ladder with postcopy adds --allow-postcopy")
    p.add_argument("--no-full-ladder", action="store_true",
                   help="skip the default `--adaptive` case (only the fallback ladders)")
    p.add_argument("--append", action="store_true",
                   help="add this run's cases to the existing --out JSON (same link options "
                        "expected; each case records its own settings)")
    p.add_argument("--rate-window-s", type=float, default=4)
    p.add_argument("--poll-s", type=float, default=1.0)
    p.add_argument("--linux-timeout", type=float, default=60)
    p.add_argument("--no-ours", action="store_true")
    p.add_argument("--no-plain", action="store_true", help="skip plain pre-copy (both VMMs)")
    p.add_argument("--no-qemu", action="store_true")
    p.add_argument("--no-qemu-plain", action="store_true")
    p.add_argument("--qemu-target-mib-s", default="",
                   help="dirtier rate per workload, e.g. compressible=60,random=8 (default: "
                        "the rate measured in our guest of the same workload)")
    p.add_argument("--keep-logs", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    if os.geteuid() != 0:
        raise BenchError("needs root (network namespaces, tc)")
    workloads = [w for w in a.workloads.split(",") if w]
    for w in workloads:
        if w not in WORKLOADS:
            raise BenchError(f"unknown workload {w!r} (have {', '.join(WORKLOADS)})")
    if not a.no_ours:
        for b, how in ((a.vmm, "bazel build //vmm:vmm"), (a.vmmctl, "bazel build //api:vmmctl")):
            if not os.access(b, os.X_OK):
                raise BenchError(f"missing {b}: {how}")
        hlp = subprocess.run([a.vmmctl, "migrate", "--help"], capture_output=True).stdout
        if b"--adaptive" not in hlp:
            raise BenchError(f"{a.vmmctl} has no `migrate --adaptive`: rebuild //api:vmmctl")
    if not a.no_qemu:
        if shutil.which(a.qemu) is None:
            raise BenchError(f"no {a.qemu}: apt-get install qemu-system-x86 (or --no-qemu)")
        for n in ("bzImage", "initramfs.cpio.gz"):
            if not os.path.exists(os.path.join(a.guest_dir, n)):
                raise BenchError(f"missing {a.guest_dir}/{n}: tools/guest/build.sh (or --no-qemu)")
    signal.signal(signal.SIGTERM, mig._on_signal)
    tmp = tempfile.mkdtemp(prefix="mbench-adaptive-")
    mig._tmpdirs.append(tmp)
    net = Netns(a.link_mbit, a.link_burst_kib, a.link_latency_ms)
    t_start = time.monotonic()
    rep = {"benchmark": "adaptive_migration",
           "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "host": mig.host_info(), "git": mig.git_info(),
           "config": {k: v for k, v in vars(a).items()},
           "workloads": {w: {"memwalk_args": WORKLOADS[w][0], "region_mib": WORKLOADS[w][1],
                             "dirtier_mode": WORKLOADS[w][2]} for w in workloads},
           "cases": []}
    try:
        net.create()
        log(f"namespaces {net.ns[0]} / {net.ns[1]}, {net.qdisc}")
        bw = measure_link(net, 3.0)
        rep["link"] = {"mbit": a.link_mbit, "qdisc": net.qdisc,
                       "measured_mib_s": round(bw / MIB, 3),
                       "measured_how": "one Python TCP stream NS1 -> NS2, 3 s, receiver side"}
        log(f"link goodput {bw / MIB:.2f} MiB/s")
        if not a.no_ours:
            rep["vmm_sha256"] = mig.sha256(a.vmm)
        measured = {}
        for w in workloads:
            if a.no_ours:
                break
            if not a.no_plain:
                c = ours_case(a, net, tmp, w, adaptive=False)
                rep["cases"].append(c)
                measured.setdefault(w, (c.get("dirty_rate_before") or {}).get("dirty_mib_per_s"))
            c = {}
            if not a.no_full_ladder:
                c = ours_case(a, net, tmp, w, adaptive=True)
                rep["cases"].append(c)
                measured[w] = (c.get("dirty_rate_before") or {}).get("dirty_mib_per_s") or \
                    measured.get(w)
            for lad in [x for x in a.fallback_ladder.split(";") if x]:
                if c.get("finished"):
                    break
                # The full ladder did not get there: the same with another ladder, to see
                # whether the other steps would (e.g. without a step that fails here).
                c = ours_case(a, net, tmp, w, adaptive=True, ladder=lad)
                rep["cases"].append(c)
        if not a.no_qemu:
            initrd = build_qemu_initrd(a, tmp)
            rep["qemu_version"] = mig.qemu_version(a.qemu)
            targets = dict(kv.split("=") for kv in a.qemu_target_mib_s.split(",") if kv)
            for w in workloads:
                tgt = float(targets.get(w) or measured.get(w) or (60 if w == "compressible"
                                                                   else 8))
                rep["workloads"][w]["qemu_dirtier_target_mib_s"] = tgt
                rep["cases"].append(qemu_case(a, net, tmp, initrd, w, True, tgt))
                if not a.no_plain and not a.no_qemu_plain:
                    rep["cases"].append(qemu_case(a, net, tmp, initrd, w, False, tgt))
        rep["link"]["qdisc_stats_at_end"] = net.qdisc_stats()
    finally:
        net.close()
        rep["elapsed_s"] = round(time.monotonic() - t_start, 1)
        if a.append and os.path.exists(a.out):
            with open(a.out) as f:
                old = json.load(f)
            old.setdefault("appended_runs", []).append(
                {k: rep.get(k) for k in ("date_utc", "config", "link", "git", "vmm_sha256",
                                         "elapsed_s")}
                | {"cases": [c["case"] for c in rep["cases"]]})
            old["cases"] += rep["cases"]
            for w, v in rep["workloads"].items():
                old["workloads"].setdefault(w, v)
            rep = old
        rep["ratios"] = summarize(rep["cases"])
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(rep, f, indent=1)
        log(f"wrote {a.out}")
    print_report(rep)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: cleaning up", file=sys.stderr)
        sys.exit(130)
    finally:
        mig.cleanup()
