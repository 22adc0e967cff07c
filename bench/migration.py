#!/usr/bin/env python3
"""Live-migration benchmark: microvmm's `vmm` vs QEMU 7.2, idle guests, loopback.

Run on demand (it is not a test):  python3 bench/migration.py [--sizes 1,4] [--out PATH]

What it does, in one run:
  1. Reference: raw loopback throughput of a Python socket sender -> receiver (~1 GiB, best
     of 3) over TCP 127.0.0.1 (the reference every migration throughput is a ratio of) and
     over a unix socket; and the cost of first-touching fresh shmem pages (the destination of
     a migration has to fault in every non-zero page it receives; slow on this nested host).
  2. Our VMM: for every size (GiB) and fill (random | zero | half), an idle guest
     (`vmm --test-guest idle --prefill FILL`) is live-migrated to `vmm --incoming` over a unix
     socket and over TCP 127.0.0.1 (`vmmctl migrate --json`): total time, downtime, bytes on
     the wire, RAM throughput (guest RAM size / total time) and its ratio to raw TCP.
  3. QEMU 7.2 side by side: same RAM size, RAM in a /dev/shm file prefilled by this script the
     same way (random pages above 16 MiB; `half` = every other page random, the others holes;
     `zero` = a sparse file), SeaBIOS with no boot device as the idle guest, max-bandwidth
     100 GiB/s (unlimited, like ours), migrated over TCP with QMP; accelerator probed (kvm,
     else tcg) and recorded.
  4. A time series of one of our migrations (polling `vmmctl migrate-status --json` every
     100 ms plus the destination's RssShmem), plotted to bench/results/migration_timeline.png
     (matplotlib) or .svg (written by hand when matplotlib is not importable).
  5. JSON with everything to bench/results/migration.json and a table on stdout.

Standard library only (matplotlib optional). Every child process and /dev/shm file is removed
on exit, on error and on Ctrl-C/SIGTERM. See bench/README.md for how to read the numbers on this
host, whose KVM is a software module (kvm-pvm: guest code emulated; migration is host work).
"""

import argparse
import ctypes
import datetime
import hashlib
import json
import mmap
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_VMM = os.path.join(REPO, "bazel-bin", "vmm", "vmm")
DEFAULT_VMMCTL = os.path.join(REPO, "bazel-bin", "api", "vmmctl")
DEFAULT_OUT = os.path.join(REPO, "bench", "results", "migration.json")
DEFAULT_PLOT_BASE = os.path.join(REPO, "bench", "results", "migration_timeline")
PAGE = 4096
MIB = 1 << 20
GIB = 1 << 30
PREFILL_START = 16 * MIB          # the VMM's --prefill leaves the first 16 MiB alone; so do we
UNLIMITED_QEMU_BW = 100 * GIB     # bytes/s: "unlimited" for QEMU's max-bandwidth
FILLS = ("random", "zero", "half")
SHM_PREFIX = f"mbench-{os.getpid()}-"

# ----------------------------------------------------------------------------------------
# Bookkeeping: every child process and /dev/shm file is registered and removed on any exit.

_children = {}      # pid -> Popen
_shm_files = set()
_tmpdirs = []
_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


class BenchError(Exception):
    """A user-facing error (missing binary, ...): printed without a traceback."""


class CaseError(Exception):
    """One case failed; the run goes on and the case is recorded with its error."""


def _child_setup():
    # If this harness dies without cleaning up (SIGKILL), the kernel sends SIGTERM to the child.
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def spawn(cmd, log_path):
    """Starts a child with stdout+stderr appended to log_path; registered for cleanup."""
    with open(log_path, "ab") as out:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                             close_fds=True, start_new_session=True, preexec_fn=_child_setup)
    _children[p.pid] = p
    return p


def reap(p, timeout=None):
    """Waits (up to timeout s) for a child to exit, with its resource usage (wait4).
    Returns (exit code, rusage) or None if it is still running."""
    if p.returncode is not None:
        return p.returncode, getattr(p, "rusage", None)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        try:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        except ChildProcessError:  # already reaped by Popen.poll()
            p.poll()
            _children.pop(p.pid, None)
            return p.returncode, None
        if pid == p.pid:
            p.returncode = os.waitstatus_to_exitcode(status)
            p.rusage = ru
            _children.pop(p.pid, None)
            return p.returncode, ru
        if deadline is not None and time.monotonic() >= deadline:
            return None
        time.sleep(0.01)


def stop(p, sig=signal.SIGTERM, grace=10.0):
    """Stops one child by its pid: sig, then SIGKILL after grace. Returns (rc, rusage)."""
    if p.returncode is None:
        try:
            os.kill(p.pid, sig)
        except ProcessLookupError:
            pass
        r = reap(p, grace)
        if r is None:
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            r = reap(p, 10.0)
        return r
    return p.returncode, getattr(p, "rusage", None)


def cleanup():
    for p in list(_children.values()):
        try:
            stop(p, signal.SIGTERM, grace=5.0)
        except ChildProcessError:
            _children.pop(p.pid, None)
    for f in list(_shm_files):
        try:
            os.unlink(f)
        except FileNotFoundError:
            pass
        _shm_files.discard(f)
    while _tmpdirs:
        shutil.rmtree(_tmpdirs.pop(), ignore_errors=True)


def _on_signal(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def tail(path, n=2000):
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - n))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def wait_for(pred, timeout, what, proc=None, logs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise CaseError(f"{what}: process exited with status {proc.returncode} first\n"
                            + "".join(f"--- {l}:\n{tail(l)}" for l in logs))
        time.sleep(0.02)
    raise CaseError(f"{what}: timed out after {timeout:.0f} s\n"
                    + "".join(f"--- {l}:\n{tail(l)}" for l in logs))


def file_has(path, needle):
    try:
        with open(path, "rb") as f:
            return needle in f.read()
    except OSError:
        return False


def free_tcp_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mem_available():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


# ----------------------------------------------------------------------------------------
# /proc sampling of the processes of one migration.

def read_proc(pid):
    r = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmRSS", "RssShmem", "RssAnon"):
                    r[k] = int(v.split()[0])
        with open(f"/proc/{pid}/stat") as f:
            st = f.read().rsplit(")", 1)[1].split()
        r["cpu_s"] = (int(st[11]) + int(st[12])) / os.sysconf("SC_CLK_TCK")
        r["minflt"] = int(st[7])
    except (OSError, IndexError, ValueError):
        return None
    return r


class Sampler(threading.Thread):
    """Every `period` s: RssShmem/VmRSS/CPU of the named processes (and, when `status_cmd`
    is given, the output of that command: the VMM's migrate-status)."""

    def __init__(self, pids, period=0.1, status_cmd=None):
        super().__init__(daemon=True)
        self.pids = dict(pids)
        self.period = period
        self.status_cmd = status_cmd
        self.samples = []
        self.status = []
        self.t0 = time.monotonic()
        self.t0_wall = time.time()
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            t = time.monotonic() - self.t0
            s = {"t": round(t, 4)}
            for name, pid in self.pids.items():
                s[name] = read_proc(pid)
            self.samples.append(s)
            if self.status_cmd:
                t1 = time.monotonic()
                try:
                    cp = subprocess.run(self.status_cmd, stdin=subprocess.DEVNULL,
                                        capture_output=True, timeout=5)
                    t2 = time.monotonic()
                    if cp.returncode == 0:
                        try:
                            d = json.loads(cp.stdout)
                            self.status.append({"t": round((t1 + t2) / 2 - self.t0, 4),
                                                "call_ms": round((t2 - t1) * 1000, 1),
                                                "progress": d})
                        except ValueError:
                            pass
                except subprocess.TimeoutExpired:
                    pass
            self._halt.wait(max(0.0, self.period - (time.monotonic() - self.t0 - t)))

    def stop(self):
        self._halt.set()
        self.join(timeout=10)

    def peak(self, name, key):
        vals = [s[name][key] for s in self.samples if s.get(name) and key in s[name]]
        return max(vals) if vals else None


# ----------------------------------------------------------------------------------------
# References: raw loopback socket throughput; first touch of shmem pages.

_RECEIVER = r"""
import socket, sys, os
fam, addr, n, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if fam == "tcp":
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    where = str(s.getsockname()[1])
else:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(addr)
    where = addr
s.listen(1)
print(where, flush=True)
buf = memoryview(bytearray(4 << 20))
for _ in range(rounds):
    c, _ = s.accept()
    got = 0
    while got < n:
        k = c.recv_into(buf)
        if not k:
            break
        got += k
    c.sendall(b"k" if got >= n else b"x")
    c.close()
"""


def raw_socket_throughput(fam, nbytes, rounds, tmpdir):
    """Python sender -> receiver process over loopback; returns per-round bytes/s."""
    addr = os.path.join(tmpdir, "raw.sock")
    cmd = [sys.executable, "-c", _RECEIVER, fam, addr, str(nbytes), str(rounds)]
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         close_fds=True, start_new_session=True, preexec_fn=_child_setup)
    _children[p.pid] = p
    try:
        where = p.stdout.readline().decode().strip()
        if not where:
            raise BenchError(f"raw {fam} receiver did not start")
        chunk = b"\xa5" * (4 << 20)
        rates = []
        for _ in range(rounds):
            if fam == "tcp":
                c = socket.create_connection(("127.0.0.1", int(where)))
            else:
                c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                c.connect(where)
            with c:
                t0 = time.perf_counter()
                sent = 0
                while sent < nbytes:
                    c.sendall(chunk)
                    sent += len(chunk)
                ack = c.recv(1)
                dt = time.perf_counter() - t0
            if ack != b"k":
                raise BenchError(f"raw {fam} receiver got less than {nbytes} bytes")
            rates.append(sent / dt)
        return rates
    finally:
        stop(p, signal.SIGKILL)
        if p.stdout:
            p.stdout.close()
        try:
            os.unlink(addr)
        except FileNotFoundError:
            pass


def shmem_first_touch(nbytes, rounds):
    """µs per 4 KiB page to first-touch a fresh memfd (what a destination pays per page)."""
    res = []
    for _ in range(rounds):
        fd = os.memfd_create("mbench-touch")
        try:
            os.ftruncate(fd, nbytes)
            m = mmap.mmap(fd, nbytes)
            t0 = time.perf_counter()
            for off in range(0, nbytes, PAGE):
                m[off] = 1
            t1 = time.perf_counter()
            for off in range(0, nbytes, PAGE):   # same loop again: the Python loop's own cost
                m[off] = 2
            t2 = time.perf_counter()
            m.close()
        finally:
            os.close(fd)
        pages = nbytes // PAGE
        res.append(max(0.0, (t1 - t0) - (t2 - t1)) / pages * 1e6)
    return res


# ----------------------------------------------------------------------------------------
# Our VMM.

def ours_case(a, tmp, size_gib, fill, transport, run, timeline=False):
    d = tempfile.mkdtemp(prefix=f"o{size_gib}{fill[0]}{transport[0]}{run}-", dir=tmp)
    src_sock = os.path.join(d, "src.sock")
    src_log, dst_log = os.path.join(d, "src.log"), os.path.join(d, "dst.log")
    src_ser, dst_ser = os.path.join(d, "src.serial"), os.path.join(d, "dst.serial")
    to = os.path.join(d, "dst.sock") if transport == "unix" else f"127.0.0.1:{free_tcp_port()}"
    mib = size_gib * 1024
    case = {"vmm": "ours", "size_gib": size_gib, "fill": fill, "transport": transport,
            "run": run, "timeline_run": timeline, "ok": False, "destination": to}
    dst = src = None
    sampler = None
    try:
        dst = spawn([a.vmm, "--incoming", to, "--serial", f"file:{dst_ser}"], dst_log)
        wait_for(lambda: file_has(dst_log, b"waiting for an incoming migration"), 30,
                 "destination vmm listening", dst, [dst_log])
        t0 = time.monotonic()
        src = spawn([a.vmm, "--test-guest", "idle", "--memory", str(mib), "--prefill", fill,
                     "--api-socket", src_sock, "--serial", f"file:{src_ser}"], src_log)
        wait_for(lambda: file_has(src_ser, b"idle"), 60 + 90 * size_gib,
                 "source guest printing 'idle' (after --prefill)", src, [src_log, src_ser])
        case["prefill_boot_s"] = round(time.monotonic() - t0, 3)
        time.sleep(a.settle)
        cmd = [a.vmmctl, "--socket", src_sock, "migrate", "--to", to, "--json"]
        if a.streams:
            cmd += ["--streams", str(a.streams)]
        if a.downtime_ms:
            cmd += ["--downtime-ms", str(a.downtime_ms)]
        status_cmd = ([a.vmmctl, "--socket", src_sock, "--timeout", "2", "migrate-status",
                       "--json"] if timeline else None)
        before = {n: read_proc(p.pid) or {} for n, p in (("src", src), ("dst", dst))}
        sampler = Sampler({"src": src.pid, "dst": dst.pid}, period=a.sample_period,
                          status_cmd=status_cmd)
        sampler.start()
        t_mig0 = time.monotonic()
        t_mig0_wall = time.time()
        cp = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                            timeout=a.migrate_timeout, preexec_fn=_child_setup)
        t_mig1 = time.monotonic()
        case["harness_wall_ms"] = round((t_mig1 - t_mig0) * 1000, 1)
        case["vmmctl_rc"] = cp.returncode
        out = cp.stdout.decode(errors="replace")
        try:
            prog = json.loads(out)
        except ValueError:
            prog = None
        if cp.returncode != 0 or not prog:
            raise CaseError(f"vmmctl migrate exit {cp.returncode}: {out[-1500:]}"
                            f"{cp.stderr.decode(errors='replace')[-1500:]}\n--- src log:\n"
                            f"{tail(src_log)}\n--- dst log:\n{tail(dst_log)}")
        case["progress"] = prog
        # The source VMM exits 0 after a successful migration: how long after?
        r = reap(src, a.exit_timeout)
        if r is None:
            case["src_exit_s"] = None
            case["src_exit_note"] = f"source vmm still running {a.exit_timeout} s after migrate"
            src_rc, src_ru = stop(src)
        else:
            src_rc, src_ru = r
            case["src_exit_s"] = round(time.monotonic() - t_mig1, 3)
        case["src_rc"] = src_rc
        # The destination must be up and running the VM.
        time.sleep(0.3)
        case["dst_alive"] = dst.poll() is None
        case["dst_log_says_running"] = file_has(dst_log, b"migrated VM is running here")
        sampler.stop()
        dst_rc, dst_ru = stop(dst)
        case["dst_rc_after_sigterm"] = dst_rc
        account(case, before, src_ru, dst_ru)
        case["src_peak_rss_shmem_mib"] = _kib_to_mib(sampler.peak("src", "RssShmem"))
        case["dst_peak_rss_shmem_mib"] = _kib_to_mib(sampler.peak("dst", "RssShmem"))
        ph = prog.get("phase", "")
        total_ms = int(prog.get("total_ms", 0))
        ram = int(prog.get("ram_bytes", 0)) or size_gib * GIB
        case.update({
            "phase": ph,
            "total_ms": total_ms,
            "downtime_ms": int(prog.get("downtime_ms", 0)),
            "wire_bytes": int(prog.get("bytes_sent", 0)),
            "pages_sent": int(prog.get("pages_sent", 0)),
            "zero_pages": int(prog.get("zero_pages", 0)),
            "iterations": int(prog.get("iteration", 0)),
            "ram_bytes": ram,
            "dirty_tracking": prog.get("dirty_tracking"),
            "pause_to_resume_ms": (int(prog.get("destination_resume_unix_ns", 0))
                                   - int(prog.get("source_pause_unix_ns", 0))) / 1e6,
        })
        if ph != "MIGRATION_COMPLETED" or total_ms <= 0:
            raise CaseError(f"migration did not complete: {ph} {prog.get('error', '')}")
        if not case["dst_alive"] or not case["dst_log_says_running"]:
            raise CaseError("destination is not running the VM after the migration:\n"
                            + tail(dst_log))
        if src_rc != 0:
            raise CaseError(f"source vmm exited {src_rc} after a successful migration:\n"
                            + tail(src_log))
        case["ok"] = True
        if timeline:
            case["timeline"] = {
                "t0_unix": t_mig0_wall,
                "migrate_returned_s": round(t_mig1 - t_mig0, 4),
                "source_pause_s": (int(prog.get("source_pause_unix_ns", 0)) / 1e9 - t_mig0_wall)
                if prog.get("source_pause_unix_ns") else None,
                "destination_resume_s": (int(prog.get("destination_resume_unix_ns", 0)) / 1e9
                                         - t_mig0_wall)
                if prog.get("destination_resume_unix_ns") else None,
                "proc_samples": [{"t": round(s["t"] - (t_mig0 - sampler.t0), 4),
                                  "src_rss_shmem_kib": (s["src"] or {}).get("RssShmem"),
                                  "dst_rss_shmem_kib": (s["dst"] or {}).get("RssShmem"),
                                  "src_cpu_s": (s["src"] or {}).get("cpu_s"),
                                  "dst_cpu_s": (s["dst"] or {}).get("cpu_s")}
                                 for s in sampler.samples],
                "status_samples": [{"t": round(s["t"] - (t_mig0 - sampler.t0), 4),
                                    "call_ms": s["call_ms"],
                                    "phase": s["progress"].get("phase"),
                                    "iteration": int(s["progress"].get("iteration", 0)),
                                    "bytes_sent": int(s["progress"].get("bytes_sent", 0)),
                                    "pages_sent": int(s["progress"].get("pages_sent", 0)),
                                    "remaining_pages": int(s["progress"].get("remaining_pages", 0)),
                                    "elapsed_ms": int(s["progress"].get("elapsed_ms", 0))}
                                   for s in sampler.status],
            }
    except CaseError as e:
        case["error"] = str(e)
    except subprocess.TimeoutExpired:
        case["error"] = f"vmmctl migrate did not return within {a.migrate_timeout} s"
    finally:
        if sampler is not None and sampler.is_alive():
            sampler.stop()
        for p in (src, dst):
            if p is not None:
                stop(p)
        if not a.keep_logs:
            shutil.rmtree(d, ignore_errors=True)
    return case


def account(case, before, src_ru, dst_ru):
    """CPU time and minor page faults from just before the migration to the end of each
    process (rusage when it is reaped: includes its teardown)."""
    for name, ru in (("src", src_ru), ("dst", dst_ru)):
        b = before.get(name) or {}
        if ru is None or "cpu_s" not in b:
            case[f"{name}_cpu_s"] = case[f"{name}_minor_faults"] = None
            continue
        case[f"{name}_cpu_s"] = round(ru.ru_utime + ru.ru_stime - b["cpu_s"], 3)
        case[f"{name}_minor_faults"] = ru.ru_minflt - b["minflt"]


def _kib_to_mib(k):
    return None if k is None else round(k / 1024, 1)


# ----------------------------------------------------------------------------------------
# QEMU.

class Qmp:
    """A tiny QMP client over a unix socket."""

    def __init__(self, path, timeout=30.0, proc=None, logs=()):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.s.connect(path)
                break
            except OSError:
                self.s.close()
                if proc is not None and proc.poll() is not None:
                    raise CaseError(f"QEMU exited with status {proc.returncode} before QMP was "
                                    "up\n" + "".join(f"--- {l}:\n{tail(l)}" for l in logs))
                if time.monotonic() > deadline:
                    raise CaseError(f"no QMP socket at {path} after {timeout:.0f} s")
                time.sleep(0.02)
        self.s.settimeout(60)
        self.f = self.s.makefile("rwb")
        self.events = []
        greeting = self._read()
        self.version = greeting.get("QMP", {}).get("version", {})
        self.cmd("qmp_capabilities")

    def _read(self):
        line = self.f.readline()
        if not line:
            raise CaseError("QMP connection closed")
        return json.loads(line)

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.f.write(json.dumps(msg).encode() + b"\n")
        self.f.flush()
        while True:
            r = self._read()
            if "event" in r:
                self.events.append(r)
                continue
            if "error" in r:
                raise CaseError(f"QMP {name}: {r['error']}")
            return r.get("return")

    def close(self):
        try:
            self.f.close()
            self.s.close()
        except OSError:
            pass


def qemu_version(qemu):
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, timeout=10).stdout
        return out.decode(errors="replace").splitlines()[0].strip()
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return None


def random_pool(nbytes, seed=0x5EED):
    rnd = random.Random(seed)
    pool = b"".join(rnd.randbytes(MIB) for _ in range(nbytes // MIB))
    return pool + pool[:MIB]   # so that any 1 MiB window starting in the pool is contiguous


def prefill_shm_file(path, size, fill, pool):
    """The same layout as `vmm --prefill`: nothing below 16 MiB; `random`: every page above it
    random; `half`: even pages random, odd pages left as holes; `zero`: a sparse file."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    _shm_files.add(path)
    try:
        os.ftruncate(fd, size)
        if fill == "zero":
            return
        plen = len(pool) - MIB
        k = 0
        if fill == "random":
            for off in range(PREFILL_START, size, MIB):
                start = (k * 7919 * PAGE) % plen
                os.pwrite(fd, pool[start:start + MIB], off)
                k += 1
        else:  # half: even page numbers random, odd ones holes
            mv = memoryview(pool)
            for off in range(PREFILL_START, size, 2 * PAGE):
                start = (k * PAGE) % plen
                os.pwrite(fd, mv[start:start + PAGE], off)
                k += 1
    finally:
        os.close(fd)


def qemu_argv(a, accel, size_mib, mem_path, qmp_path, dbg_path, incoming=None):
    argv = [a.qemu, "-accel", accel, "-M", "pc,memory-backend=m", "-nodefaults",
            "-no-user-config", "-display", "none", "-m", f"{size_mib}M",
            "-object", f"memory-backend-file,id=m,size={size_mib}M,mem-path={mem_path},share=on",
            "-boot", "reboot-timeout=-1",
            "-chardev", f"file,id=dbg,path={dbg_path}",
            "-device", "isa-debugcon,iobase=0x402,chardev=dbg",
            "-qmp", f"unix:{qmp_path},server=on,wait=off"]
    if incoming:
        argv += ["-incoming", incoming]
    return argv


QEMU_IDLE_MARK = b"No bootable device"


def qemu_case(a, tmp, accel, size_mib, fill, transport, run, src_mem, size_gib=None,
              idle_timeout=None):
    d = tempfile.mkdtemp(prefix=f"q{size_mib}{fill[0]}{transport[0]}{run}-", dir=tmp)
    dst_mem = f"/dev/shm/{SHM_PREFIX}qemu-dst"
    src_log, dst_log = os.path.join(d, "src.log"), os.path.join(d, "dst.log")
    src_dbg, dst_dbg = os.path.join(d, "src.dbg"), os.path.join(d, "dst.dbg")
    src_qmp, dst_qmp = os.path.join(d, "src.qmp"), os.path.join(d, "dst.qmp")
    if transport == "tcp":
        port = free_tcp_port()
        incoming, uri = f"tcp:127.0.0.1:{port}", f"tcp:127.0.0.1:{port}"
    else:
        path = os.path.join(d, "mig.sock")
        incoming, uri = f"unix:{path}", f"unix:{path}"
    case = {"vmm": "qemu", "accel": accel, "size_gib": size_gib, "fill": fill,
            "transport": transport, "run": run, "ok": False, "destination": uri}
    src = dst = qs = qd = None
    sampler = None
    try:
        fd = os.open(dst_mem, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        _shm_files.add(dst_mem)
        os.ftruncate(fd, size_mib * MIB)
        os.close(fd)
        dst = spawn(qemu_argv(a, accel, size_mib, dst_mem, dst_qmp, dst_dbg, incoming), dst_log)
        qd = Qmp(dst_qmp, 30, dst, [dst_log])
        t0 = time.monotonic()
        src = spawn(qemu_argv(a, accel, size_mib, src_mem, src_qmp, src_dbg), src_log)
        qs = Qmp(src_qmp, 30, src, [src_log])
        case["qemu_version_qmp"] = qs.version
        # Idle guest: SeaBIOS has finished POST and found nothing to boot (it then halts in a
        # loop waiting for interrupts; -boot reboot-timeout=-1: it never retries).
        wait_for(lambda: file_has(src_dbg, QEMU_IDLE_MARK),
                 idle_timeout or (120 if accel == "kvm" else 60),
                 "QEMU source: SeaBIOS reaching 'No bootable device'", src, [src_log, src_dbg])
        case["boot_to_idle_s"] = round(time.monotonic() - t0, 3)
        st = qs.cmd("query-status")
        if st.get("status") != "running":
            raise CaseError(f"QEMU source guest not running: {st}")
        time.sleep(a.settle)
        params = {"max-bandwidth": UNLIMITED_QEMU_BW}
        if a.downtime_ms:
            params["downtime-limit"] = a.downtime_ms
        qs.cmd("migrate-set-parameters", **params)
        case["qemu_parameters"] = qs.cmd("query-migrate-parameters")
        before = {n: read_proc(p.pid) or {} for n, p in (("src", src), ("dst", dst))}
        sampler = Sampler({"src": src.pid, "dst": dst.pid}, period=a.sample_period)
        sampler.start()
        t_mig0 = time.monotonic()
        t_mig0_wall = time.time()
        qs.cmd("migrate", uri=uri)
        info = None
        completed_seen = None
        deadline = t_mig0 + a.migrate_timeout
        while time.monotonic() < deadline:
            info = qs.cmd("query-migrate")
            stt = info.get("status")
            if stt == "completed":
                if completed_seen is None:
                    completed_seen = time.monotonic()
                # QEMU 7.2 can report `completed` with zero times for ~100 ms: query again.
                if info.get("total-time", 0) > 0 or time.monotonic() - completed_seen > 5:
                    break
            elif stt in ("failed", "cancelled"):
                raise CaseError(f"QEMU migration {stt}: {info.get('error-desc', '')}\n"
                                f"--- src:\n{tail(src_log)}\n--- dst:\n{tail(dst_log)}")
            time.sleep(0.02)
        else:
            raise CaseError(f"QEMU migration not completed after {a.migrate_timeout} s: {info}")
        case["harness_wall_ms"] = round((completed_seen - t_mig0) * 1000, 1)
        # The destination must be running the guest.
        dl = time.monotonic() + 15
        dst_status = None
        while time.monotonic() < dl:
            dst_status = qd.cmd("query-status").get("status")
            if dst_status == "running":
                break
            time.sleep(0.05)
        case["dst_status"] = dst_status
        # Comparable downtime: the destination's RESUME event minus the source's STOP event
        # (QMP event timestamps, same host clock). QEMU's own `downtime` is measured on the
        # source only (stop -> completion there) and does not include the destination's work.
        stop_ev = [e for e in qs.events if e.get("event") == "STOP"]
        dl = time.monotonic() + 5
        while not [e for e in qd.events if e.get("event") == "RESUME"] and time.monotonic() < dl:
            qd.cmd("query-status")
            time.sleep(0.05)
        resume_ev = [e for e in qd.events if e.get("event") == "RESUME"]
        ts = lambda e: e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6
        if stop_ev and resume_ev:
            case["pause_to_resume_ms"] = round((ts(resume_ev[-1]) - ts(stop_ev[0])) * 1000, 3)
        if resume_ev:
            case["start_to_resume_ms"] = round((ts(resume_ev[-1]) - t_mig0_wall) * 1000, 1)
        sampler.stop()
        qs.close()
        qd.close()
        qs = qd = None
        src_rc, src_ru = stop(src)
        dst_rc, dst_ru = stop(dst)
        account(case, before, src_ru, dst_ru)
        case["src_peak_rss_shmem_mib"] = _kib_to_mib(sampler.peak("src", "RssShmem"))
        case["dst_peak_rss_shmem_mib"] = _kib_to_mib(sampler.peak("dst", "RssShmem"))
        ram = info.get("ram", {})
        case.update({
            "phase": info.get("status"),
            # Comparable with ours (StartMigration -> destination resumed): from the migrate
            # command to the destination's RESUME event; QEMU's total-time ends on the source.
            "total_ms": (max(int(info.get("total-time", 0)), round(case["start_to_resume_ms"]))
                         if "start_to_resume_ms" in case else int(info.get("total-time", 0))),
            "qemu_reported_total_ms": int(info.get("total-time", 0)),
            "downtime_ms": (round(case["pause_to_resume_ms"]) if "pause_to_resume_ms" in case
                            else int(info.get("downtime", 0))),
            "downtime_source": ("destination RESUME event - source STOP event"
                                if "pause_to_resume_ms" in case else "QEMU-reported (source only)"),
            "qemu_reported_downtime_ms": int(info.get("downtime", 0)),
            "setup_ms": int(info.get("setup-time", 0)),
            "wire_bytes": int(ram.get("transferred", 0)),
            "pages_sent": int(ram.get("normal", 0)) + int(ram.get("duplicate", 0)),
            "zero_pages": int(ram.get("duplicate", 0)),
            "normal_pages": int(ram.get("normal", 0)),
            "iterations": int(ram.get("dirty-sync-count", 0)),
            "ram_bytes": int(ram.get("total", 0)) or size_mib * MIB,
            "qemu_mbps": ram.get("mbps"),
            "query_migrate": info,
        })
        for lp in (src_log, dst_log):
            t = tail(lp, 4000)
            if "KVM internal error" in t or "error" in t.lower():
                case.setdefault("qemu_log_warnings", []).append(t.strip()[-800:])
        if case["qemu_reported_total_ms"] <= 0:
            raise CaseError(f"QEMU reported total-time 0: {info}")
        if dst_status != "running":
            raise CaseError(f"QEMU destination status {dst_status!r} after the migration\n"
                            + tail(dst_log))
        case["ok"] = True
    except CaseError as e:
        case["error"] = str(e)
    finally:
        if sampler is not None and sampler.is_alive():
            sampler.stop()
        for q in (qs, qd):
            if q is not None:
                q.close()
        for p in (src, dst):
            if p is not None:
                stop(p)
        try:
            os.unlink(dst_mem)
        except FileNotFoundError:
            pass
        _shm_files.discard(dst_mem)
        if not a.keep_logs:
            shutil.rmtree(d, ignore_errors=True)
    return case


def choose_qemu_accel(a, tmp):
    """auto: kvm if an idle SeaBIOS guest reaches its idle loop and a small migration
    completes with the destination running; otherwise tcg."""
    if a.qemu_accel != "auto":
        return a.qemu_accel, {"forced": a.qemu_accel}
    log("QEMU: probing -accel kvm (128 MiB idle guest, one migration) ...")
    mem = f"/dev/shm/{SHM_PREFIX}probe-src"
    prefill_shm_file(mem, 128 * MIB, "zero", None)
    try:
        c = qemu_case(a, tmp, "kvm", 128, "zero", "tcp", 0, mem,
                      idle_timeout=a.qemu_kvm_probe_timeout)
    finally:
        os.unlink(mem)
        _shm_files.discard(mem)
    probe = {k: c.get(k) for k in ("ok", "error", "boot_to_idle_s", "total_ms", "downtime_ms",
                                   "dst_status", "qemu_log_warnings")}
    if c["ok"]:
        log(f"QEMU: kvm works for an idle guest here (SeaBIOS idle after "
            f"{c.get('boot_to_idle_s')} s, 128 MiB migration {c.get('total_ms')} ms): using kvm")
        return "kvm", probe
    log("QEMU: kvm probe failed (" + (c.get("error") or "?").splitlines()[0] + "): using tcg")
    return "tcg", probe


# ----------------------------------------------------------------------------------------
# Summaries, ratios, report.

def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def summarize(cases, raw_tcp):
    groups = {}
    for c in cases:
        if c.get("timeline_run"):
            continue
        key = (c["vmm"], c["size_gib"], c["fill"], c["transport"])
        groups.setdefault(key, []).append(c)
    rows = []
    for (vmm, size, fill, tr), cs in groups.items():
        ok = [c for c in cs if c["ok"]]
        total = med([c["total_ms"] for c in ok])
        ram = size * GIB
        row = {"vmm": vmm, "accel": cs[0].get("accel"), "size_gib": size, "fill": fill,
               "transport": tr, "ok": len(ok), "n": len(cs),
               "total_ms": total,
               "downtime_ms": med([c["downtime_ms"] for c in ok]),
               "wire_bytes": med([c["wire_bytes"] for c in ok]),
               "zero_pages": med([c["zero_pages"] for c in ok]),
               "iterations": med([c["iterations"] for c in ok]),
               "src_cpu_s": med([c.get("src_cpu_s") for c in ok]),
               "dst_cpu_s": med([c.get("dst_cpu_s") for c in ok]),
               "src_exit_s": med([c.get("src_exit_s") for c in ok]),
               "src_minor_faults": med([c.get("src_minor_faults") for c in ok]),
               "dst_minor_faults": med([c.get("dst_minor_faults") for c in ok]),
               "dst_peak_rss_shmem_mib": med([c.get("dst_peak_rss_shmem_mib") for c in ok]),
               "src_peak_rss_shmem_mib": med([c.get("src_peak_rss_shmem_mib") for c in ok]),
               "errors": [c["error"].splitlines()[0] for c in cs if c.get("error")]}
        row["ram_throughput_Bps"] = ram / (total / 1000) if total else None
        row["dst_minor_faults_per_ram_page"] = (row["dst_minor_faults"] / (ram // PAGE)
                                                if row["dst_minor_faults"] is not None else None)
        row["src_minor_faults_per_ram_page"] = (row["src_minor_faults"] / (ram // PAGE)
                                                if row["src_minor_faults"] is not None else None)
        row["wire_throughput_Bps"] = (row["wire_bytes"] / (total / 1000)
                                      if total and row["wire_bytes"] else None)
        row["ram_throughput_over_raw_tcp"] = (row["ram_throughput_Bps"] / raw_tcp
                                              if row["ram_throughput_Bps"] and raw_tcp else None)
        row["wire_throughput_over_raw_tcp"] = (row["wire_throughput_Bps"] / raw_tcp
                                               if row["wire_throughput_Bps"] and raw_tcp else None)
        rows.append(row)
    order = {"ours": 0, "qemu": 1}
    rows.sort(key=lambda r: (r["size_gib"], FILLS.index(r["fill"]), order[r["vmm"]],
                             r["transport"] != "unix"))
    return rows


def ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def compute_ratios(rows):
    idx = {(r["vmm"], r["size_gib"], r["fill"], r["transport"]): r for r in rows}
    out = []
    for size, fill in sorted({(r["size_gib"], r["fill"]) for r in rows},
                             key=lambda k: (k[0], FILLS.index(k[1]))):
        ou, ot = idx.get(("ours", size, fill, "unix")), idx.get(("ours", size, fill, "tcp"))
        qt, qu = idx.get(("qemu", size, fill, "tcp")), idx.get(("qemu", size, fill, "unix"))
        g = lambda r, k: r.get(k) if r else None
        out.append({
            "size_gib": size, "fill": fill,
            "total_time_ours_tcp_over_qemu_tcp": ratio(g(ot, "total_ms"), g(qt, "total_ms")),
            "total_time_ours_unix_over_qemu_tcp": ratio(g(ou, "total_ms"), g(qt, "total_ms")),
            "total_time_ours_unix_over_qemu_unix": ratio(g(ou, "total_ms"), g(qu, "total_ms")),
            "downtime_ours_tcp_over_qemu_tcp": ratio(g(ot, "downtime_ms"), g(qt, "downtime_ms")),
            "wire_bytes_ours_tcp_over_qemu_tcp": ratio(g(ot, "wire_bytes"), g(qt, "wire_bytes")),
            "ram_throughput_ours_unix_over_raw_tcp": g(ou, "ram_throughput_over_raw_tcp"),
            "ram_throughput_ours_tcp_over_raw_tcp": g(ot, "ram_throughput_over_raw_tcp"),
            "ram_throughput_qemu_tcp_over_raw_tcp": g(qt, "ram_throughput_over_raw_tcp"),
            "ram_throughput_qemu_unix_over_raw_tcp": g(qu, "ram_throughput_over_raw_tcp"),
            "cpu_ours_tcp_over_qemu_tcp": ratio(
                (g(ot, "src_cpu_s") or 0) + (g(ot, "dst_cpu_s") or 0) if ot else None,
                (g(qt, "src_cpu_s") or 0) + (g(qt, "dst_cpu_s") or 0) if qt else None),
        })
    return out


def _f(x, fmt="{:.0f}", none="-"):
    return none if x is None else fmt.format(x)


def print_report(rep):
    h, ref = rep["host"], rep["reference"]
    print()
    print(f"host: {h['cpu_model']}, {h['nproc']} cores, kernel {h['kernel']}, load "
          f"{h['loadavg_at_start'][0]:.1f} at start / {h['loadavg_at_end'][0]:.1f} at end")
    print(f"KVM:  {h['kvm_kind']}")
    q = rep["config"].get("qemu") or {}
    if q:
        print(f"QEMU: {q.get('version')}, accel {q.get('accel')}")
    print(f"raw loopback (python sender -> receiver, {ref['raw_bytes'] / GIB:.2f} GiB, best of "
          f"{ref['raw_rounds']}): TCP {_f(ref['raw_tcp_Bps'] / MIB)} MiB/s, unix "
          f"{_f(ref['raw_unix_Bps'] / MIB)} MiB/s;  shmem first touch "
          f"{_f(ref['shmem_first_touch_us_per_page'], '{:.1f}')} us/page "
          f"(= {_f(ref['shmem_first_touch_s_per_gib'], '{:.2f}')} s per GiB of pages)")
    print()
    hdr = (f"{'vmm':<10} {'size':>4} {'fill':<6} {'via':<4} {'ok':>4} {'total ms':>9} "
           f"{'down ms':>8} {'wire MiB':>9} {'zero pg':>8} {'RAM MiB/s':>9} {'x rawTCP':>8} "
           f"{'src+dst CPU s':>13} {'flt/pg s+d':>10} {'src exit s':>10}")
    print(hdr)
    print("-" * len(hdr))
    for r in rep["summary"]:
        name = "ours" if r["vmm"] == "ours" else f"qemu/{r['accel']}"
        cpu = (f"{r['src_cpu_s']:.1f}+{r['dst_cpu_s']:.1f}"
               if r["src_cpu_s"] is not None and r["dst_cpu_s"] is not None else "-")
        flt = (f"{r['src_minor_faults_per_ram_page']:.2f}+{r['dst_minor_faults_per_ram_page']:.2f}"
               if r["src_minor_faults_per_ram_page"] is not None
               and r["dst_minor_faults_per_ram_page"] is not None else "-")
        print(f"{name:<10} {str(r['size_gib']) + 'G':>4} {r['fill']:<6} {r['transport']:<4} "
              f"{str(r['ok']) + '/' + str(r['n']):>4} {_f(r['total_ms']):>9} "
              f"{_f(r['downtime_ms']):>8} {_f(r['wire_bytes'] and r['wire_bytes'] / MIB, '{:.1f}'):>9} "
              f"{_f(r['zero_pages']):>8} "
              f"{_f(r['ram_throughput_Bps'] and r['ram_throughput_Bps'] / MIB):>9} "
              f"{_f(r['ram_throughput_over_raw_tcp'], '{:.2f}'):>8} {cpu:>13} {flt:>10} "
              f"{_f(r['src_exit_s'], '{:.2f}'):>10}")
        for e in r["errors"]:
            print(f"{'':<10} ! {e}")
    print()
    hdr2 = (f"{'size':>4} {'fill':<6} {'total ours-tcp/qemu':>19} {'ours-unix/qemu':>14} "
            f"{'downtime o/q':>12} {'wire o/q':>8} {'ours-unix/raw':>13} {'ours-tcp/raw':>12} "
            f"{'qemu/raw':>8}")
    print("ratios (medians; qemu = QEMU over TCP; raw = raw loopback TCP throughput)")
    print(hdr2)
    print("-" * len(hdr2))
    for r in rep["ratios"]:
        print(f"{str(r['size_gib']) + 'G':>4} {r['fill']:<6} "
              f"{_f(r['total_time_ours_tcp_over_qemu_tcp'], '{:.2f}'):>19} "
              f"{_f(r['total_time_ours_unix_over_qemu_tcp'], '{:.2f}'):>14} "
              f"{_f(r['downtime_ours_tcp_over_qemu_tcp'], '{:.2f}'):>12} "
              f"{_f(r['wire_bytes_ours_tcp_over_qemu_tcp'], '{:.2f}'):>8} "
              f"{_f(r['ram_throughput_ours_unix_over_raw_tcp'], '{:.3f}'):>13} "
              f"{_f(r['ram_throughput_ours_tcp_over_raw_tcp'], '{:.3f}'):>12} "
              f"{_f(r['ram_throughput_qemu_tcp_over_raw_tcp'], '{:.3f}'):>8}")
    print()
    for n in rep["notes"]:
        print("note: " + n)
    tl = rep.get("timeline")
    if tl:
        print(f"timeline plot: {tl.get('plot')}")


# ----------------------------------------------------------------------------------------
# Timeline plot: matplotlib if importable, else a hand-written SVG.

def timeline_series(case):
    tl = case["timeline"]
    st, ps = tl["status_samples"], tl["proc_samples"]
    ram = case["ram_bytes"]
    return {
        "reported_sent_mib": ([s["t"] for s in st], [s["bytes_sent"] / MIB for s in st]),
        "reported_remaining_mib": ([s["t"] for s in st],
                                   [s["remaining_pages"] * PAGE / MIB for s in st]),
        "dst_rss_mib": ([s["t"] for s in ps if s["dst_rss_shmem_kib"] is not None],
                        [s["dst_rss_shmem_kib"] / 1024 for s in ps
                         if s["dst_rss_shmem_kib"] is not None]),
        "ram_mib": ram / MIB,
        "pause": tl.get("source_pause_s"), "resume": tl.get("destination_resume_s"),
        "end": tl.get("migrate_returned_s"),
    }


def plot_timeline(case, base, fmt):
    s = timeline_series(case)
    title = (f"our VMM: {case['size_gib']} GiB idle guest, fill {case['fill']}, via "
             f"{case['transport']} — total {case['total_ms']} ms, downtime "
             f"{case['downtime_ms']} ms")
    use_mpl = False
    if fmt in ("auto", "png"):
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            use_mpl = True
        except ImportError:
            if fmt == "png":
                raise BenchError("--plot-format png needs matplotlib (apt-get install "
                                 "python3-matplotlib; run with /usr/bin/python3)")
    if use_mpl:
        path = base + ".png"
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
        ax1.step(*s["reported_sent_mib"], where="post", label="bytes sent (VMM-reported, "
                 "migrate-status)", color="tab:blue", lw=2)
        ax1.plot(*s["dst_rss_mib"], label="destination guest RAM resident (RssShmem; "
                 "zero pages count: it writes them)", color="tab:green", lw=1.5)
        ax1.axhline(s["ram_mib"], color="gray", ls=":", lw=1, label="guest RAM size")
        ax1.set_ylabel("MiB")
        ax1.legend(loc="upper left", fontsize=8)
        ax1.set_title(title, fontsize=10)
        ax2.step(*s["reported_remaining_mib"], where="post", color="tab:red", lw=2,
                 label="remaining dirty pages (VMM-reported) x 4 KiB")
        ax2.set_ylabel("MiB")
        ax2.set_xlabel("seconds since `vmmctl migrate` was started")
        ax2.legend(loc="center left", fontsize=8)
        for ax in (ax1, ax2):
            for x, lab, col in ((s["pause"], "source paused", "black"),
                                (s["resume"], "destination resumed", "purple")):
                if x is not None:
                    ax.axvline(x, color=col, ls="--", lw=1)
            ax.grid(alpha=0.3)
        if s["pause"] is not None:
            ax2.text(s["pause"], ax2.get_ylim()[1] * 0.5, " pause/resume", fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path
    path = base + ".svg"
    svg_plot(path, title, [
        {"ylabel": "MiB", "series": [
            {"label": "bytes sent (VMM-reported, migrate-status)", "xy": s["reported_sent_mib"],
             "color": "#1f77b4", "step": True, "width": 2},
            {"label": "destination guest RAM resident (RssShmem)", "xy": s["dst_rss_mib"],
             "color": "#2ca02c", "step": False, "width": 1.5},
        ], "hline": (s["ram_mib"], "guest RAM size")},
        {"ylabel": "MiB", "series": [
            {"label": "remaining dirty pages (VMM-reported) x 4 KiB",
             "xy": s["reported_remaining_mib"], "color": "#d62728", "step": True, "width": 2},
        ]},
    ], "seconds since `vmmctl migrate` was started",
        [(s["pause"], "source paused"), (s["resume"], "destination resumed")])
    return path


def _nice_ticks(lo, hi, n=5):
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / n
    mag = 10 ** int(f"{raw:e}".split("e")[1])
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
    t = (lo // step) * step
    out = []
    while t <= hi + 1e-9:
        if t >= lo - 1e-9:
            out.append(round(t, 10))
        t += step
    return out


def svg_plot(path, title, panels, xlabel, vlines):
    W, H, L, R, T, B, GAP = 900, 620, 70, 20, 40, 50, 40
    ph = (H - T - B - GAP * (len(panels) - 1)) / len(panels)
    xs_all = [x for p in panels for s in p["series"] for x in s["xy"][0]]
    xs_all += [v for v, _ in vlines if v is not None]
    x0, x1 = 0.0, max(xs_all) if xs_all else 1.0
    x1 = x1 * 1.03 if x1 > 0 else 1.0
    esc = lambda t: t.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    o = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
         f'font-family="sans-serif" font-size="11">',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         f'<text x="{W / 2}" y="22" text-anchor="middle" font-size="13">{esc(title)}</text>']
    for i, p in enumerate(panels):
        top = T + i * (ph + GAP)
        ys = [y for s in p["series"] for y in s["xy"][1]]
        if p.get("hline"):
            ys.append(p["hline"][0])
        y1 = max(ys) * 1.08 if ys and max(ys) > 0 else 1.0
        sx = lambda x: L + (x - x0) / (x1 - x0) * (W - L - R)
        sy = lambda y, top=top: top + ph - y / y1 * ph
        o.append(f'<rect x="{L}" y="{top}" width="{W - L - R}" height="{ph}" fill="none" '
                 f'stroke="#333"/>')
        for t in _nice_ticks(0, y1):
            o.append(f'<line x1="{L}" x2="{W - R}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" '
                     f'stroke="#ddd"/><text x="{L - 5}" y="{sy(t) + 4:.1f}" '
                     f'text-anchor="end">{t:g}</text>')
        for t in _nice_ticks(x0, x1):
            o.append(f'<line x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{top}" y2="{top + ph}" '
                     f'stroke="#eee"/>')
            if i == len(panels) - 1:
                o.append(f'<text x="{sx(t):.1f}" y="{top + ph + 15}" '
                         f'text-anchor="middle">{t:g}</text>')
        o.append(f'<text x="18" y="{top + ph / 2}" transform="rotate(-90 18 {top + ph / 2})" '
                 f'text-anchor="middle">{esc(p["ylabel"])}</text>')
        if p.get("hline"):
            v, lab = p["hline"]
            o.append(f'<line x1="{L}" x2="{W - R}" y1="{sy(v):.1f}" y2="{sy(v):.1f}" '
                     f'stroke="gray" stroke-dasharray="2,3"/>')
        for v, lab in vlines:
            if v is not None:
                o.append(f'<line x1="{sx(v):.1f}" x2="{sx(v):.1f}" y1="{top}" y2="{top + ph}" '
                         f'stroke="purple" stroke-dasharray="5,4"/>')
        ly = top + 16
        for s in p["series"]:
            xs, ys_ = s["xy"]
            if not xs:
                continue
            pts = []
            for k, (x, y) in enumerate(zip(xs, ys_)):
                if s["step"] and k > 0:
                    pts.append(f"{sx(x):.1f},{sy(ys_[k - 1]):.1f}")
                pts.append(f"{sx(x):.1f},{sy(y):.1f}")
            o.append(f'<polyline fill="none" stroke="{s["color"]}" stroke-width="{s["width"]}" '
                     f'points="{" ".join(pts)}"/>')
            o.append(f'<line x1="{L + 10}" x2="{L + 30}" y1="{ly - 4}" y2="{ly - 4}" '
                     f'stroke="{s["color"]}" stroke-width="2"/><text x="{L + 35}" '
                     f'y="{ly}">{esc(s["label"])}</text>')
            ly += 15
        if i == 0:
            o.append(f'<text x="{L + 35}" y="{ly}" fill="purple">dashed: '
                     f'{esc(", ".join(l for v, l in vlines if v is not None))}</text>')
    o.append(f'<text x="{L + (W - L - R) / 2}" y="{H - 12}" '
             f'text-anchor="middle">{esc(xlabel)}</text></svg>')
    with open(path, "w") as f:
        f.write("\n".join(o))


# ----------------------------------------------------------------------------------------
# Host info, arguments, main.

def host_info():
    cpu_model, flags = None, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if cpu_model is None and line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                if line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    hw_virt = bool(flags & {"vmx", "svm"})
    try:
        kvm_modules = sorted(m for m in os.listdir("/sys/module") if m.startswith("kvm"))
    except OSError:
        kvm_modules = []
    if not os.path.exists("/dev/kvm"):
        kvm_kind = "none (/dev/kvm missing)"
    elif hw_virt:
        kvm_kind = "hardware (vmx/svm present)"
    else:
        kvm_kind = ("SOFTWARE-EMULATED: /dev/kvm exists but /proc/cpuinfo has no vmx/svm "
                    f"(modules: {', '.join(kvm_modules) or '?'}); guest code runs emulated. "
                    "Migration itself is host-side work (reading/sending/receiving RAM, "
                    "dirty tracking) and is measured for real")
    with open("/proc/meminfo") as f:
        memtotal = int(f.readline().split()[1]) * 1024
    return {
        "hostname": socket.gethostname(),
        "kernel": platform.release(),
        "cpu_model": cpu_model,
        "nproc": os.cpu_count(),
        "mem_total_gib": round(memtotal / GIB, 1),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpuinfo_has_vmx_or_svm": hw_virt,
        "cpuinfo_has_hypervisor_flag": "hypervisor" in flags,
        "kvm_modules": kvm_modules,
        "kvm_is_software_emulated": os.path.exists("/dev/kvm") and not hw_virt,
        "kvm_kind": kvm_kind,
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "loadavg_at_start": list(os.getloadavg()),
    }


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def git_info():
    try:
        rev = subprocess.run(["git", "-C", REPO, "rev-parse", "HEAD"], capture_output=True,
                             timeout=10).stdout.decode().strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, timeout=10).stdout.decode().strip()
        return {"commit": rev or None, "worktree_modified": bool(dirty)}
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None}


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Live-migration benchmark: our vmm (unix socket and TCP) vs QEMU 7.2 "
                    "(TCP), idle guests with RAM prefilled random / zero / half, on loopback. "
                    "Writes JSON and a timeline plot, prints a table. See bench/README.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", default="1,4",
                   help="guest RAM sizes in GiB, comma separated (4 GiB takes several minutes "
                        "here: --sizes 1 skips it)")
    p.add_argument("--fills", default="random,zero,half",
                   help="RAM contents: random (every page above 16 MiB random), zero (untouched),"
                        " half (every other page random)")
    p.add_argument("--transports", default="unix,tcp", help="for our vmm: unix, tcp")
    p.add_argument("--qemu-transports", default="tcp",
                   help="for QEMU: tcp (and/or unix)")
    p.add_argument("--runs", type=int, default=1,
                   help="migrations per case (the table shows medians; JSON has every run)")
    p.add_argument("--vmm", default=DEFAULT_VMM, help="our vmm binary")
    p.add_argument("--vmmctl", default=DEFAULT_VMMCTL, help="vmmctl binary (needs `migrate`)")
    p.add_argument("--qemu", default="qemu-system-x86_64", help="QEMU binary")
    p.add_argument("--qemu-accel", choices=("auto", "kvm", "tcg"), default="auto",
                   help="auto: probe kvm once with a small migration, else tcg")
    p.add_argument("--qemu-kvm-probe-timeout", type=float, default=90.0,
                   help="seconds for SeaBIOS under -accel kvm to reach its idle loop in the "
                        "probe (it is emulated on a software KVM)")
    p.add_argument("--no-qemu", action="store_true", help="skip the QEMU cases")
    p.add_argument("--no-ours", action="store_true", help="skip our vmm's cases")
    p.add_argument("--streams", type=int, default=0,
                   help="vmmctl migrate --streams (0: the VMM's default)")
    p.add_argument("--downtime-ms", type=int, default=0,
                   help="downtime limit for both (0: each VMM's default, 300 ms for both)")
    p.add_argument("--raw-gib", type=float, default=1.0,
                   help="GiB per raw loopback throughput round")
    p.add_argument("--raw-rounds", type=int, default=3, help="raw throughput rounds (best of)")
    p.add_argument("--no-timeline", action="store_true", help="skip the timeline run and plot")
    p.add_argument("--timeline-size", type=int, default=1, help="GiB of the timeline run")
    p.add_argument("--timeline-fill", default="random", choices=FILLS)
    p.add_argument("--timeline-transport", default="unix", choices=("unix", "tcp"))
    p.add_argument("--plot", default=DEFAULT_PLOT_BASE,
                   help="timeline plot path without extension (.png with matplotlib, else .svg)")
    p.add_argument("--plot-format", choices=("auto", "png", "svg"), default="auto")
    p.add_argument("--sample-period", type=float, default=0.1,
                   help="seconds between /proc (and, in the timeline run, migrate-status) samples")
    p.add_argument("--settle", type=float, default=0.5,
                   help="seconds to wait after the guest is idle before migrating")
    p.add_argument("--migrate-timeout", type=float, default=600.0,
                   help="seconds one migration may take before it counts as failed")
    p.add_argument("--exit-timeout", type=float, default=60.0,
                   help="seconds to wait for our source vmm to exit after a migration")
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON output path")
    p.add_argument("--keep-logs", action="store_true",
                   help="keep the per-case directories (logs, sockets) in the temp dir")
    a = p.parse_args(argv)
    try:
        a.sizes = [int(x) for x in a.sizes.split(",") if x.strip()]
    except ValueError:
        p.error("--sizes: comma-separated whole GiB, e.g. 1,4")
    a.fills = [x.strip() for x in a.fills.split(",") if x.strip()]
    a.transports = [x.strip() for x in a.transports.split(",") if x.strip()]
    a.qemu_transports = [x.strip() for x in a.qemu_transports.split(",") if x.strip()]
    for f in a.fills:
        if f not in FILLS:
            p.error(f"--fills: unknown fill {f!r} (random, zero, half)")
    for t in a.transports + a.qemu_transports:
        if t not in ("unix", "tcp"):
            p.error(f"unknown transport {t!r} (unix, tcp)")
    if a.runs < 1 or not a.sizes or any(s < 1 for s in a.sizes):
        p.error("--runs and --sizes must be >= 1")
    return a


def check_inputs(a):
    problems = []
    if not a.no_ours or not a.no_timeline:
        if not (os.path.isfile(a.vmm) and os.access(a.vmm, os.X_OK)):
            problems.append(f"vmm binary not found: {a.vmm}\n"
                            "  build it:  bazel build //vmm:vmm   (in the repository root)")
        if not (os.path.isfile(a.vmmctl) and os.access(a.vmmctl, os.X_OK)):
            problems.append(f"vmmctl binary not found: {a.vmmctl}\n"
                            "  build it:  bazel build //api:vmmctl")
        else:
            h = subprocess.run([a.vmmctl, "--help"], capture_output=True, timeout=20)
            if b"migrate" not in h.stdout + h.stderr:
                problems.append(f"{a.vmmctl} has no `migrate` command: rebuild it "
                                "(bazel build //api:vmmctl)")
        if not os.path.exists("/dev/kvm"):
            problems.append("/dev/kvm is missing: the vmm cannot run a guest on this host")
    if not a.no_qemu:
        q = shutil.which(a.qemu) if os.sep not in a.qemu else a.qemu
        if not q or not os.access(q, os.X_OK):
            problems.append(f"QEMU not found: {a.qemu}\n  install it:  apt-get install "
                            "qemu-system-x86 (7.2); or skip it with --no-qemu")
        else:
            a.qemu = q
    if problems:
        raise BenchError("\n".join(problems))


def main(argv=None):
    a = parse_args(argv)
    check_inputs(a)
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _on_signal)
    t_start = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="mbench-")
    if a.keep_logs:
        log(f"keeping per-case logs in {tmp}")
    else:
        _tmpdirs.append(tmp)
    host = host_info()
    if host["kvm_is_software_emulated"]:
        log("NOTE: " + host["kvm_kind"])
    config = {"args": {k: v for k, v in vars(a).items()}, "git": git_info()}
    if not a.no_ours or not a.no_timeline:
        # Run private copies: others may rebuild bazel-bin/ while this runs (bazel replaces or
        # briefly removes the outputs). The binaries link only system libraries dynamically.
        bindir = os.path.join(tmp, "bin")
        os.makedirs(bindir)
        for attr in ("vmm", "vmmctl"):
            src = getattr(a, attr)
            config[f"{attr}_path"] = src
            config[f"{attr}_mtime"] = datetime.datetime.fromtimestamp(
                os.path.getmtime(src)).isoformat(timespec="seconds")
            dst = os.path.join(bindir, attr)
            shutil.copy2(src, dst)
            setattr(a, attr, dst)
            config[f"{attr}_sha256"] = sha256(dst)

    # 1. References.
    raw_bytes = int(a.raw_gib * GIB) // (4 << 20) * (4 << 20)
    log(f"raw loopback throughput: {raw_bytes / GIB:.2f} GiB x {a.raw_rounds} over TCP and unix")
    tcp_rates = raw_socket_throughput("tcp", raw_bytes, a.raw_rounds, tmp)
    unix_rates = raw_socket_throughput("unix", raw_bytes, a.raw_rounds, tmp)
    log("shmem first-touch cost (256 MiB memfd x 3)")
    touch = shmem_first_touch(256 * MIB, 3)
    reference = {
        "raw_bytes": raw_bytes, "raw_rounds": a.raw_rounds,
        "raw_tcp_Bps_samples": tcp_rates, "raw_tcp_Bps": max(tcp_rates),
        "raw_unix_Bps_samples": unix_rates, "raw_unix_Bps": max(unix_rates),
        "shmem_first_touch_us_per_page_samples": touch,
        "shmem_first_touch_us_per_page": min(touch),
        "shmem_first_touch_s_per_gib": min(touch) * (GIB // PAGE) / 1e6,
        "method": "raw: one Python process sends N bytes in 4 MiB sendall() calls on one "
                  "connection to a receiver process (recv_into a 4 MiB buffer, 1-byte ack at "
                  "the end), time from first send to ack; best of the rounds. first touch: "
                  "write one byte per 4 KiB page of a fresh memfd mapping, minus the same loop "
                  "over already-present pages; best of 3.",
    }
    log(f"  TCP {max(tcp_rates) / MIB:.0f} MiB/s, unix {max(unix_rates) / MIB:.0f} MiB/s, "
        f"first touch {min(touch):.1f} us/page")

    # QEMU accelerator.
    qemu = None
    if not a.no_qemu:
        accel, probe = choose_qemu_accel(a, tmp)
        qemu = {"binary": a.qemu, "version": qemu_version(a.qemu), "accel": accel,
                "kvm_probe": probe,
                "machine": "pc (i440fx), -nodefaults, SeaBIOS with no boot device (idle: "
                           "halts waiting for interrupts after 'No bootable device'), RAM = "
                           "memory-backend-file in /dev/shm share=on (source prefilled by this "
                           "script, destination a fresh empty file)",
                "max_bandwidth_Bps": UNLIMITED_QEMU_BW}
        config["qemu"] = qemu

    # 2./3. The cases.
    cases = []
    pool = None
    for size in a.sizes:
        need = 2 * size * GIB + GIB
        if mem_available() < need:
            log(f"SKIP {size} GiB: MemAvailable {mem_available() / GIB:.1f} GiB < "
                f"{need / GIB:.0f} GiB needed for source + destination")
            cases.append({"vmm": "-", "size_gib": size, "ok": False, "skipped": True,
                          "error": "not enough free memory"})
            continue
        for fill in a.fills:
            if not a.no_ours:
                for run in range(a.runs):
                    for tr in a.transports:
                        log(f"ours  {size} GiB {fill:<6} via {tr:<4} run {run + 1}/{a.runs} ...")
                        c = ours_case(a, tmp, size, fill, tr, run)
                        cases.append(c)
                        _log_case(c)
            if not a.no_qemu:
                if pool is None and fill != "zero":
                    log("generating a 64 MiB random pool for the QEMU RAM files")
                    pool = random_pool(64 * MIB)
                mem = f"/dev/shm/{SHM_PREFIX}qemu-src-{size}G-{fill}"
                for run in range(a.runs):
                    for tr in a.qemu_transports:
                        # A fresh file every time: a migration reads (and so allocates) the
                        # holes of the file, which would make a second run start differently.
                        t0 = time.monotonic()
                        prefill_shm_file(mem, size * GIB, fill, pool)
                        fill_s = time.monotonic() - t0
                        log(f"qemu  {size} GiB {fill:<6} via {tr:<4} run {run + 1}/{a.runs} "
                            f"({qemu['accel']}; RAM file filled in {fill_s:.1f} s) ...")
                        try:
                            c = qemu_case(a, tmp, qemu["accel"], size * 1024, fill, tr, run, mem,
                                          size_gib=size)
                        finally:
                            os.unlink(mem)
                            _shm_files.discard(mem)
                        c["prefill_s"] = round(fill_s, 3)
                        cases.append(c)
                        _log_case(c)

    # 4. Timeline.
    timeline = None
    if not a.no_timeline:
        log(f"timeline run: ours {a.timeline_size} GiB {a.timeline_fill} via "
            f"{a.timeline_transport}, polling migrate-status every {a.sample_period * 1000:.0f} ms")
        c = ours_case(a, tmp, a.timeline_size, a.timeline_fill, a.timeline_transport, 0,
                      timeline=True)
        cases.append(c)
        _log_case(c)
        if c["ok"]:
            os.makedirs(os.path.dirname(os.path.abspath(a.plot)), exist_ok=True)
            path = plot_timeline(c, a.plot, a.plot_format)
            st = c["timeline"]["status_samples"]
            distinct = sorted({s["bytes_sent"] for s in st})
            pre = [s for s in st if s["phase"] == "MIGRATION_PRECOPY"]
            distinct_rem = sorted({s["remaining_pages"] for s in pre})
            distinct_pre_bytes = sorted({s["bytes_sent"] for s in pre})
            timeline = {"plot": path, "case": {k: c[k] for k in (
                "size_gib", "fill", "transport", "total_ms", "downtime_ms", "wire_bytes")},
                "status_samples": len(st), "precopy_status_samples": len(pre),
                "distinct_bytes_sent_values_during_precopy": len(distinct_pre_bytes),
                "distinct_remaining_pages_values_during_precopy": len(distinct_rem),
                "median_status_call_ms": med([s["call_ms"] for s in st])}
            timeline["reported_counters"] = (
                f"Timeline (migrate-status every {a.sample_period * 1000:.0f} ms, "
                f"{len(pre)} samples during pre-copy): bytes_sent took "
                f"{len(distinct_pre_bytes)} distinct values and remaining_pages "
                f"{len(distinct_rem)} during pre-copy"
                + (" (bytes_sent moves live; remaining_pages changes only at dirty syncs)."
                   if len(distinct_pre_bytes) > 2 and len(distinct_rem) <= 2 else
                   " (the VMM-reported counters move only at iteration boundaries; the "
                   "destination's RssShmem shows the pages arriving)."
                   if len(distinct_pre_bytes) <= 2 else "."))
            log(f"timeline plot: {path}")
        else:
            timeline = {"error": c.get("error")}

    raw_tcp = reference["raw_tcp_Bps"]
    summary = summarize([c for c in cases if not c.get("skipped")], raw_tcp)
    ratios = compute_ratios(summary)
    notes = [
        "The host KVM is software (kvm-pvm in a nested cloud VM; no vmx/svm): guest code is "
        "emulated, but the guests here are idle (ours halts after printing 'idle'; QEMU's "
        "SeaBIOS halts after 'No bootable device') and migration is host-side work: reading "
        "guest RAM, zero-page detection, sending, receiving, faulting in destination pages, "
        "dirty tracking. Those are measured for real, on a noisy 2-core host: compare ratios "
        "from the same run, not absolute numbers across runs."
        if host["kvm_is_software_emulated"] else
        "Hardware KVM: guest execution is native; the guests are idle anyway.",
        "Page faults are slow on this nested host (shmem first touch "
        f"{reference['shmem_first_touch_us_per_page']:.1f} us per 4 KiB page = "
        f"{reference['shmem_first_touch_s_per_gib']:.2f} s per GiB): a destination that "
        "receives N non-zero pages pays about that per page, whichever VMM it is, so migration "
        "throughput here is bounded well below raw loopback TCP.",
        "Raw TCP reference: one Python stream, no page faults on the receiver (it reuses one "
        "buffer). Our VMM uses gRPC over HTTP/2 with "
        f"{a.streams or 'its default number of (2)'} page streams; QEMU 7.2 one TCP stream "
        "(no multifd).",
        "RAM throughput = guest RAM size / total migration time (zero pages count as moved). "
        "wire bytes: ours = MigrationProgress.bytes_sent (page payloads + record headers), "
        "QEMU = query-migrate ram.transferred; both exclude device state.",
        "Total time, both: start to the guest running on the destination. Ours = "
        "MigrationProgress.total_ms (StartMigration to the destination's confirmed resume); "
        "QEMU = the QMP migrate command to the destination's RESUME event (its own total-time, "
        "which ends on the source, is in the JSON as qemu_reported_total_ms). Downtime, both: destination resume - source pause, two timestamps on the "
        "same host clock (ours: MigrationProgress source_pause_unix_ns / "
        "destination_resume_unix_ns; QEMU: the destination's RESUME and the source's STOP QMP "
        "events). QEMU's own `downtime` (source stop to completion on the source, not "
        "including the destination) is in the JSON as qemu_reported_downtime_ms.",
        "QEMU: pc machine with SeaBIOS, RAM in a /dev/shm file prefilled the same way as "
        "`vmm --prefill` (16 MiB left untouched, then random pages / every other page / "
        "nothing); max-bandwidth 100 GiB/s so both are unlimited; downtime limits "
        + (f"{a.downtime_ms} ms for both." if a.downtime_ms else "at their defaults (300 ms both).")
        + (f" QEMU accelerator: {qemu['accel']}." if qemu else ""),
        "CPU s: CPU time of each process from just before the migration to its end "
        "(teardown included). flt/pg: minor page faults per guest RAM page, source + "
        "destination, over the same span (1.0 = one fault per page).",
    ]
    if timeline and timeline.get("reported_counters"):
        notes.append(timeline["reported_counters"])
    rep = {
        "benchmark": "migration",
        "host": host, "config": config, "reference": reference,
        "summary": summary, "ratios": ratios, "timeline": timeline, "notes": notes,
        "cases": cases,
        "duration_s": None,
    }
    host["loadavg_at_end"] = list(os.getloadavg())
    rep["duration_s"] = round(time.monotonic() - t_start, 1)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(rep, f, indent=1, default=str)
    print_report(rep)
    print(f"JSON: {a.out}   ({rep['duration_s']} s)")
    return 0 if all(c["ok"] for c in cases if not c.get("skipped")) else 1


def _log_case(c):
    if c["ok"]:
        log(f"  ok: total {c['total_ms']} ms, downtime {c['downtime_ms']} ms, wire "
            f"{c['wire_bytes'] / MIB:.1f} MiB, zero pages {c['zero_pages']}"
            + (f", src exit +{c['src_exit_s']} s" if c.get("src_exit_s") is not None else ""))
    else:
        log("  FAILED: " + (c.get("error") or "?")[:2000])


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"migration.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("migration.py: interrupted; cleaning up", file=sys.stderr)
        sys.exit(130)
    finally:
        cleanup()
