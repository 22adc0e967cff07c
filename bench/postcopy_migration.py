#!/usr/bin/env python3
"""Post-copy live migration and free-page hinting: microvmm's `vmm` vs QEMU 7.2, loopback TCP.

Run on demand (it is not a test):  python3 bench/postcopy_migration.py [--sizes 1] [--out PATH]

What it does, in one run, for every guest RAM size (`--sizes`, GiB; default 1), all over TCP
127.0.0.1 with the same optional `--bandwidth` cap for both VMMs:
  1. Post-copy, idle guest with prefilled RAM (the guest bench/migration.py compares): ours is
     `vmm --test-guest idle --prefill random`, QEMU's is SeaBIOS with no boot device and RAM in a
     /dev/shm file prefilled the same way (bench/migration.py's setup, reused). Two variants each:
       pure   ours `vmmctl migrate --postcopy`; QEMU `migrate` then `migrate-start-postcopy` at once
       switch pre-copy for --switch-after s, then ours `vmmctl migrate-postcopy`, QEMU
              `migrate-start-postcopy` (postcopy-ram capability on both QEMU sides)
     plus plain pre-copy of the same guest for both (the baseline). Total time, downtime, bytes
     on the wire; ratios ours/QEMU.
  2. Free-page hinting, pre-copy: a guest that touched all RAM above 16 MiB and then freed 7/8
     of it. Ours: the `balloonhint` test guest with `--balloon hinting` vs the same guest with
     `--balloon on` and its `nohint` argument (same fill, no device use). QEMU: a Linux guest
     (tools/guest kernel + busybox initramfs, TCG) that fills a tmpfs with non-zero data and
     deletes it, with `virtio-balloon-pci,free-page-hint=on` vs `free-page-hint=off`; if that
     cannot run here the JSON says why. QEMU's no-hint bytes for the same fill as ours come from
     the pre-copy baseline of 1. (an idle guest whose RAM above 16 MiB is all non-zero).
  3. Our per-vCPU demand faults: the `memwalk` guest (2 vCPUs, each rewriting its half of
     --demand-mib MiB continuously) migrated with pure post-copy, optionally with the push
     throttled (--demand-bandwidth) so that the guest outruns the push and faults; from
     MigrationProgress.postcopy_stats: pulled/pushed pages, per-lane faults, p50/p99, blocked ms.

Standard library only. Every child process and /dev/shm file is removed on exit, on error and on
Ctrl-C/SIGTERM (bench/migration.py's bookkeeping, imported). See bench/README.md for how to read
the numbers on this host (software KVM, 2 shared cores).
"""

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import migration as mig  # noqa: E402  (bench/migration.py: process bookkeeping, QEMU + QMP setup)

from migration import GIB, MIB, BenchError, CaseError, log  # noqa: E402

DEFAULT_OUT = os.path.join(mig.REPO, "bench", "results", "postcopy_migration.json")
GUEST_DIR = os.path.expanduser("~/.cache/microvmm/guest")
LINUX_CMDLINE = "console=ttyS0 tsc_early_khz=2000000 mode=shell"

# ----------------------------------------------------------------------------------------
# Our VMM: one migration, any guest, any vmmctl migrate flags.


def _spawn_split(cmd, out_path, err_path):
    """Like mig.spawn, stdout and stderr to separate files (vmmctl --json prints JSON on stdout)."""
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                             close_fds=True, start_new_session=True,
                             preexec_fn=mig._child_setup)
    mig._children[p.pid] = p
    return p


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def ours_migration(a, tmp, name, guest, ready, migrate_flags, switch_after=None,
                   after_check=None):
    """Source `vmm GUEST... --api-socket`, destination `vmm --incoming 127.0.0.1:PORT`; once the
    source serial has `ready`, `vmmctl migrate --to ... --json MIGRATE_FLAGS`; with switch_after,
    `vmmctl migrate-postcopy` that many seconds later. after_check(dst_serial_path) -> error or
    None runs while the destination is still up. Returns the case dict."""
    d = tempfile.mkdtemp(prefix=name + "-", dir=tmp)
    f = lambda n: os.path.join(d, n)  # noqa: E731
    to = f"127.0.0.1:{mig.free_tcp_port()}"
    case = {"vmm": "ours", "case": name, "guest": " ".join(guest), "ok": False,
            "migrate_flags": migrate_flags, "destination": to}
    src = dst = ctl = None
    try:
        dst = mig.spawn([a.vmm, "--incoming", to, "--serial", f"file:{f('dst.serial')}"],
                        f("dst.log"))
        mig.wait_for(lambda: mig.file_has(f("dst.log"), b"waiting for an incoming migration"),
                     30, "destination vmm listening", dst, [f("dst.log")])
        t0 = time.monotonic()
        src = mig.spawn([a.vmm] + guest + ["--api-socket", f("src.sock"),
                                           "--serial", f"file:{f('src.serial')}"], f("src.log"))
        mig.wait_for(lambda: mig.file_has(f("src.serial"), ready.encode()), a.guest_timeout,
                     f"source guest printing {ready!r}", src, [f("src.log"), f("src.serial")])
        case["guest_ready_s"] = round(time.monotonic() - t0, 2)
        time.sleep(a.settle)
        before = {n: mig.read_proc(p.pid) or {} for n, p in (("src", src), ("dst", dst))}
        t_mig0 = time.monotonic()
        ctl = _spawn_split([a.vmmctl, "--socket", f("src.sock"), "migrate", "--to", to, "--json"]
                           + migrate_flags, f("ctl.out"), f("ctl.err"))
        if switch_after is not None:
            time.sleep(switch_after)
            # The migration may still be in SETUP: retry briefly while vmmctl migrate runs.
            for _ in range(20):
                t_sw = time.monotonic()
                cp = subprocess.run([a.vmmctl, "--socket", f("src.sock"), "migrate-postcopy"],
                                    stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
                                    preexec_fn=mig._child_setup)
                case["switch"] = {"requested_at_s": round(t_sw - t_mig0, 3),
                                  "rc": cp.returncode,
                                  "output": (cp.stdout + cp.stderr).decode(errors="replace")[-300:]}
                if cp.returncode == 0 or ctl.poll() is not None:
                    break
                time.sleep(0.05)
        r = mig.reap(ctl, a.migrate_timeout)
        if r is None:
            raise CaseError(f"vmmctl migrate did not return within {a.migrate_timeout} s")
        case["harness_wall_ms"] = round((time.monotonic() - t_mig0) * 1000, 1)
        try:
            prog = json.loads(_read(f("ctl.out")))
        except ValueError:
            prog = None
        if r[0] != 0 or not prog:
            raise CaseError(f"vmmctl migrate exit {r[0]}: {_read(f('ctl.out'))[-1500:]}"
                            f"{_read(f('ctl.err'))[-1500:]}\n--- src log:\n"
                            f"{mig.tail(f('src.log'))}\n--- dst log:\n{mig.tail(f('dst.log'))}")
        case["progress"] = prog
        src_r = mig.reap(src, a.exit_timeout) or mig.stop(src)
        case["src_rc"] = src_r[0]
        time.sleep(0.3)
        case["dst_alive"] = dst.poll() is None
        case["dst_log_says_running"] = mig.file_has(f("dst.log"), b"migrated VM is running here")
        if after_check is not None and case["dst_alive"]:
            case["after_check_error"] = after_check(f("dst.serial"))
        dst_r = mig.stop(dst)
        mig.account(case, before, src_r[1], dst_r[1])
        pc = prog.get("postcopy_stats") or {}
        case.update({
            "phase": prog.get("phase"),
            "postcopy": bool(prog.get("postcopy")),
            "total_ms": int(prog.get("total_ms", 0)),
            "downtime_ms": int(prog.get("downtime_ms", 0)),
            "wire_bytes": int(prog.get("bytes_sent", 0)),
            "pages_sent": int(prog.get("pages_sent", 0)),
            "iterations": int(prog.get("iteration", 0)),
            "free_page_hint_bytes": int(prog.get("free_page_hint_bytes", 0)),
            "free_page_skipped_bytes": int(prog.get("free_page_skipped_bytes", 0)),
            "postcopy_pulled": int(pc.get("pulled", 0)),
            "postcopy_pushed": int(pc.get("pushed", 0)),
            "postcopy_duplicates": int(pc.get("duplicates", 0)),
            "lanes": [{"lane": l.get("lane", 0), "faults": int(l.get("faults", 0)),
                       "p50_us": l.get("p50_us", 0), "p99_us": l.get("p99_us", 0),
                       "blocked_ms": l.get("blocked_ms", 0)} for l in pc.get("lanes", [])],
        })
        if case["phase"] != "MIGRATION_COMPLETED":
            raise CaseError(f"migration did not complete: {case['phase']} {prog.get('error')}")
        if not case["dst_alive"] or not case["dst_log_says_running"]:
            raise CaseError("destination is not running the VM:\n" + mig.tail(f("dst.log")))
        if case["src_rc"] != 0:
            raise CaseError(f"source vmm exited {case['src_rc']}:\n" + mig.tail(f("src.log")))
        if case.get("after_check_error"):
            raise CaseError(case["after_check_error"])
        case["ok"] = True
    except CaseError as e:
        case["error"] = str(e)
    finally:
        for p in (ctl, src, dst):
            if p is not None:
                mig.stop(p)
        if not a.keep_logs:
            shutil.rmtree(d, ignore_errors=True)
    return case


def bw_flags(a, bw=None):
    bw = a.bandwidth if bw is None else bw
    return ["--bandwidth", str(bw)] if bw else []


# ----------------------------------------------------------------------------------------
# QEMU: bench/migration.py's qemu_case (SeaBIOS idle guest, prefilled /dev/shm RAM, QMP,
# STOP/RESUME timing) with a QMP client that also turns post-copy on.


class PostcopyQmp(mig.Qmp):
    """mig.Qmp that sets the postcopy-ram capability on connect (both sides: qemu_case connects
    the destination before the source starts) and, when `migrate` is issued, sleeps
    `switch_after` s and sends migrate-start-postcopy. Installed as mig.Qmp for one case."""
    switch_after = 0.0
    postcopy_bw = 0
    switch = None

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.cmd("migrate-set-capabilities",
                 capabilities=[{"capability": "postcopy-ram", "state": True}])

    def cmd(self, name, **args):
        r = super().cmd(name, **args)
        if name == "migrate-set-parameters" and self.postcopy_bw:
            super().cmd(name, **{"max-postcopy-bandwidth": self.postcopy_bw})
        if name == "migrate":
            t0 = time.monotonic()
            time.sleep(self.switch_after)
            PostcopyQmp.switch = {"requested_at_s": round(time.monotonic() - t0, 3)}
            try:
                super().cmd("migrate-start-postcopy")
                PostcopyQmp.switch["ok"] = True
            except CaseError as e:
                PostcopyQmp.switch.update(ok=False, error=str(e))
        return r


def qemu_migration(a, tmp, accel, size_gib, pool, postcopy_after=None):
    """One QEMU migration of the prefilled idle SeaBIOS guest (pre-copy, or post-copy after
    postcopy_after s). The source RAM file is written fresh for each run."""
    mem = f"/dev/shm/{mig.SHM_PREFIX}qemu-src"
    saved_qmp, saved_bw = mig.Qmp, mig.UNLIMITED_QEMU_BW
    try:
        t0 = time.monotonic()
        mig.prefill_shm_file(mem, size_gib * GIB, "random", pool)
        fill_s = time.monotonic() - t0
        if a.bandwidth:
            mig.UNLIMITED_QEMU_BW = a.bandwidth
        if postcopy_after is not None:
            PostcopyQmp.switch_after = postcopy_after
            PostcopyQmp.postcopy_bw = a.bandwidth
            PostcopyQmp.switch = None
            mig.Qmp = PostcopyQmp
        c = mig.qemu_case(a, tmp, accel, size_gib * 1024, "random", "tcp", 0, mem,
                          size_gib=size_gib)
    finally:
        mig.Qmp, mig.UNLIMITED_QEMU_BW = saved_qmp, saved_bw
        os.unlink(mem)
        mig._shm_files.discard(mem)
    c["prefill_s"] = round(fill_s, 2)
    if postcopy_after is not None:
        c["switch"] = PostcopyQmp.switch
        qm = c.get("query_migrate") or {}
        ram = qm.get("ram") or {}
        c["postcopy_requests"] = ram.get("postcopy-requests")
        c["precopy_bytes"], c["postcopy_bytes"] = ram.get("precopy-bytes"), ram.get("postcopy-bytes")
        if c["ok"] and not (PostcopyQmp.switch or {}).get("ok"):
            c["ok"] = False
            c["error"] = f"migrate-start-postcopy failed: {PostcopyQmp.switch}"
    return c


# ----------------------------------------------------------------------------------------
# QEMU free-page hinting: a Linux guest under TCG that fills and frees a tmpfs.


class Console:
    """The guest's serial port as a unix socket (QEMU chardev socket server)."""

    def __init__(self, path, proc, timeout=30):
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.s.connect(path)
                break
            except OSError:
                self.s.close()
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise CaseError(f"no serial socket at {path}")
                time.sleep(0.05)
        self.buf = b""

    def expect(self, pattern, timeout):
        rx = re.compile(pattern.encode())
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.buf)
            if m:
                out, self.buf = self.buf[:m.end()], self.buf[m.end():]
                return out.decode(errors="replace"), m
            left = deadline - time.monotonic()
            if left <= 0:
                raise CaseError(f"serial: no {pattern!r} within {timeout} s; last output:\n"
                                + self.buf[-600:].decode(errors="replace"))
            self.s.settimeout(min(left, 1.0))
            try:
                chunk = self.s.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                raise CaseError("serial: connection closed\n" + self.buf[-600:].decode(
                    errors="replace"))
            self.buf += chunk

    def run(self, command, timeout):
        """Runs a shell command; returns its output (up to the end marker)."""
        tag = f"END{time.monotonic_ns() % 100000000}"
        self.s.sendall(f"{command}; echo {tag[:3]}''{tag[3:]}\n".encode())
        out, _ = self.expect(tag + r"\r?\n", timeout)
        return out

    def close(self):
        self.s.close()


def qemu_linux_argv(a, size_mib, mem, qmp, serial, hint, incoming=None):
    argv = [a.qemu, "-accel", "tcg", "-M", "pc,memory-backend=m", "-nodefaults",
            "-no-user-config", "-display", "none", "-m", f"{size_mib}M",
            "-object", f"memory-backend-file,id=m,size={size_mib}M,mem-path={mem},share=on",
            "-kernel", os.path.join(a.guest_dir, "bzImage"),
            "-initrd", os.path.join(a.guest_dir, "initramfs.cpio.gz"),
            "-append", LINUX_CMDLINE,
            # QEMU 7.2's free-page hinting runs in an iothread (the property is required).
            "-object", "iothread,id=io0",
            "-device", f"virtio-balloon-pci,iothread=io0,free-page-hint={'on' if hint else 'off'}",
            "-qmp", f"unix:{qmp},server=on,wait=off"]
    if incoming:
        return argv + ["-serial", f"file:{serial}", "-incoming", incoming]
    return argv + ["-chardev", f"socket,id=con,path={serial},server=on,wait=off",
                   "-serial", "chardev:con"]


def qemu_hint_case(a, tmp, size_gib, hint):
    """Linux (TCG) fills 7/8 of RAM with non-zero tmpfs data, deletes it, then pre-copy to a
    second QEMU: bytes and time with or without free-page-hint."""
    size_mib = size_gib * 1024
    d = tempfile.mkdtemp(prefix=f"qh{int(hint)}-", dir=tmp)
    f = lambda n: os.path.join(d, n)  # noqa: E731
    src_mem, dst_mem = (f"/dev/shm/{mig.SHM_PREFIX}lin-{s}" for s in ("src", "dst"))
    port = mig.free_tcp_port()
    uri = f"tcp:127.0.0.1:{port}"
    case = {"vmm": "qemu", "accel": "tcg", "case": f"hint-{'on' if hint else 'off'}",
            "guest": f"Linux ({LINUX_CMDLINE}), busybox: fill a tmpfs, delete it",
            "ok": False}
    src = dst = qs = qd = con = None
    try:
        for m in (src_mem, dst_mem):
            fd = os.open(m, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            mig._shm_files.add(m)
            os.ftruncate(fd, size_mib * MIB)
            os.close(fd)
        dst = mig.spawn(qemu_linux_argv(a, size_mib, dst_mem, f("dst.qmp"), f("dst.serial"),
                                        hint, incoming=uri), f("dst.log"))
        qd = mig.Qmp(f("dst.qmp"), 30, dst, [f("dst.log")])
        t0 = time.monotonic()
        src = mig.spawn(qemu_linux_argv(a, size_mib, src_mem, f("src.qmp"), f("src.serial"),
                                        hint), f("src.log"))
        qs = mig.Qmp(f("src.qmp"), 30, src, [f("src.log")])
        con = Console(f("src.serial"), src)
        con.expect(r"init: starting shell", a.linux_timeout)
        con.run("stty -echo 2>/dev/null", 20)
        case["boot_s"] = round(time.monotonic() - t0, 2)
        avail = int(re.search(r"MemAvailable:\s+(\d+)", con.run(
            "grep MemAvailable /proc/meminfo", 20)).group(1)) // 1024
        # 7/8 of RAM, or what the guest can spare (kernel + initramfs need the rest).
        fill = min(size_mib * 7 // 8, avail - 48)
        case["guest_mem_available_mib"] = avail
        t1 = time.monotonic()
        out = con.run("mount -o remount,size=100% /tmp && dd if=/dev/urandom of=/tmp/r bs=1M "
                      f"count=1 2>/dev/null && n=0 && while [ $n -lt {fill} ]; do cat /tmp/r; "
                      "n=$((n+1)); done > /tmp/f; ls -l /tmp/f; rm -f /tmp/f /tmp/r; "
                      "grep -E 'MemFree|MemAvailable' /proc/meminfo", a.linux_timeout * 4)
        case["fill_s"] = round(time.monotonic() - t1, 2)
        case["filled_then_freed_mib"] = fill
        case["guest_output"] = out[-400:]
        if f"{fill * MIB}" not in out:
            raise CaseError(f"guest could not write {fill} MiB to tmpfs:\n{out[-800:]}")
        time.sleep(a.settle)
        params = {"max-bandwidth": a.bandwidth or mig.UNLIMITED_QEMU_BW}
        qs.cmd("migrate-set-parameters", **params)
        t_mig0, t_mig0_wall = time.monotonic(), time.time()
        qs.cmd("migrate", uri=uri)
        info, deadline = None, t_mig0 + a.migrate_timeout
        while time.monotonic() < deadline:
            info = qs.cmd("query-migrate")
            if info.get("status") == "completed" and info.get("total-time", 0) > 0:
                break
            if info.get("status") in ("failed", "cancelled"):
                raise CaseError(f"QEMU migration {info.get('status')}: {info.get('error-desc')}")
            time.sleep(0.02)
        else:
            raise CaseError(f"QEMU migration not completed after {a.migrate_timeout} s: {info}")
        case["harness_wall_ms"] = round((time.monotonic() - t_mig0) * 1000, 1)
        for _ in range(100):
            st = qd.cmd("query-status").get("status")
            if st == "running":
                break
            time.sleep(0.05)
        case["dst_status"] = st
        ram = info.get("ram", {})
        # Downtime as in section 1: destination RESUME event - source STOP event.
        ts = lambda e: e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6  # noqa
        stop_ev = [ts(e) for e in qs.events if e.get("event") == "STOP"]
        resume_ev = [ts(e) for e in qd.events if e.get("event") == "RESUME"]
        both = bool(stop_ev and resume_ev)
        # Total as in section 1: to the destination's RESUME if that is later than total-time.
        case.update({"total_ms": max(int(info.get("total-time", 0)),
                                     round((resume_ev[-1] - t_mig0_wall) * 1000) if resume_ev
                                     else 0),
                     "qemu_reported_total_ms": int(info.get("total-time", 0)),
                     "downtime_ms": (round((resume_ev[-1] - stop_ev[0]) * 1000) if both
                                     else int(info.get("downtime", 0))),
                     "downtime_source": ("destination RESUME event - source STOP event" if both
                                         else "QEMU-reported (source only)"),
                     "qemu_reported_downtime_ms": int(info.get("downtime", 0)),
                     "wire_bytes": int(ram.get("transferred", 0)),
                     "normal_pages": int(ram.get("normal", 0)),
                     "zero_pages": int(ram.get("duplicate", 0)),
                     "query_migrate": info})
        if st != "running":
            raise CaseError(f"QEMU destination status {st!r}\n" + mig.tail(f("dst.log")))
        case["ok"] = True
    except CaseError as e:
        case["error"] = str(e)
    finally:
        for x in (con, qs, qd):
            if x is not None:
                x.close()
        for p in (src, dst):
            if p is not None:
                mig.stop(p)
        for m in (src_mem, dst_mem):
            try:
                os.unlink(m)
            except FileNotFoundError:
                pass
            mig._shm_files.discard(m)
        if not a.keep_logs:
            shutil.rmtree(d, ignore_errors=True)
    return case


# ----------------------------------------------------------------------------------------
# The sections.


def run_size(a, tmp, size, accel, pool, cases):
    mib = size * 1024
    idle = ["--test-guest", "idle", "--memory", str(mib), "--prefill", "random"]

    def add(c, label):
        c["size_gib"], c["label"] = size, label
        cases.append(c)
        if c["ok"]:
            log(f"  ok: total {c.get('total_ms')} ms, downtime {c.get('downtime_ms')} ms, wire "
                f"{c.get('wire_bytes', 0) / MIB:.1f} MiB"
                + (f", hinted {c['free_page_hint_bytes'] / MIB:.0f} MiB, skipped "
                   f"{c['free_page_skipped_bytes'] / MIB:.0f} MiB"
                   if c.get("free_page_hint_bytes") else ""))
        else:
            log("  FAILED: " + (c.get("error") or "?")[:1500])

    # 1. Post-copy (and the pre-copy baseline) of the prefilled idle guest.
    if not a.no_ours:
        for label, flags, sw in (("precopy", [], None), ("postcopy-pure", ["--postcopy"], None),
                                 ("postcopy-switch", [], a.switch_after)):
            log(f"ours {size} GiB idle/random {label} ...")
            add(ours_migration(a, tmp, f"o-{label}", idle, "idle", flags + bw_flags(a), sw),
                label)
    if not a.no_qemu:
        for label, after in (("precopy", None), ("postcopy-pure", 0.0),
                             ("postcopy-switch", a.switch_after)):
            log(f"qemu {size} GiB idle/random {label} ({accel}) ...")
            add(qemu_migration(a, tmp, accel, size, pool, after), label)

    # 2. Free-page hints (pre-copy).
    region = mib - 16            # balloonhint's region starts at 16 MiB, like --prefill
    keep = region // 8
    if not a.no_ours:
        for label, balloon, extra in (("hint-off", "on", " nohint"), ("hint-on", "hinting", "")):
            log(f"ours {size} GiB balloonhint mib={region} keep={keep} {label} ...")
            guest = ["--test-guest", "balloonhint", "--memory", str(mib), "--balloon", balloon,
                     "--test-guest-args", f"mib={region} keep={keep}{extra}"]
            c = ours_migration(a, tmp, f"o-{label}", guest, "balloonhint gen=1 ok",
                               bw_flags(a, a.hint_bandwidth or None))
            c["touched_mib"], c["freed_mib"] = region, region - keep
            add(c, label)
    if not a.no_qemu and not a.no_qemu_linux:
        missing = [p for p in ("bzImage", "initramfs.cpio.gz")
                   if not os.path.isfile(os.path.join(a.guest_dir, p))]
        for hint in (False, True):
            label = f"hint-{'on' if hint else 'off'}"
            if missing:
                add({"vmm": "qemu", "case": label, "ok": False, "skipped": True,
                     "error": f"no Linux guest image ({', '.join(missing)} missing in "
                              f"{a.guest_dir}; build it with tools/guest/build.sh)"}, label)
                continue
            log(f"qemu {size} GiB Linux/tcg fill+free {label} ...")
            add(qemu_hint_case(a, tmp, size, hint), label)

    # 3. Demand faults: memwalk on 2 vCPUs, pure post-copy.
    if not a.no_ours:
        walk = ["--test-guest", "memwalk", "--memory", str(mib), "--vcpus", str(a.demand_vcpus),
                "--test-guest-args", f"mib={a.demand_mib}"]

        def walk_continues(serial):
            # The destination must go on verifying generations after the migration.
            deadline = time.monotonic() + 20
            base = len(re.findall(r"memwalk gen=\d+ ok", _read(serial)))
            while time.monotonic() < deadline:
                s = _read(serial)
                if "FAIL" in s:
                    return "memwalk FAIL on the destination:\n" + s[-600:]
                if len(re.findall(r"memwalk gen=\d+ ok", s)) > base:
                    return None
                time.sleep(0.1)
            return "destination memwalk printed no new generation within 20 s"

        for bw in ([0] + ([a.demand_bandwidth] if a.demand_bandwidth else [])):
            label = "demand" + (f"-push{bw}" if bw else "")
            log(f"ours {size} GiB memwalk mib={a.demand_mib} vcpus={a.demand_vcpus} pure "
                f"post-copy{' push capped at ' + str(bw) if bw else ''} ...")
            c = ours_migration(a, tmp, f"o-{label}", walk, "memwalk gen=2 ok",
                               ["--postcopy"] + bw_flags(a, bw or None),
                               after_check=walk_continues)
            c["push_bandwidth"] = bw or a.bandwidth or None
            add(c, label)


def _ratio(x, y):
    return round(x / y, 3) if x is not None and y else None


def summarize(cases):
    idx = {}
    for c in cases:
        if c.get("ok"):
            idx[(c["vmm"], c["size_gib"], c["label"])] = c
    g = lambda v, s, l, k: (idx.get((v, s, l)) or {}).get(k)  # noqa: E731
    out = []
    for s in sorted({c["size_gib"] for c in cases}):
        ent = {"size_gib": s, "postcopy": {}, "hints": {}, "demand": []}
        for l in ("precopy", "postcopy-pure", "postcopy-switch"):
            ent["postcopy"][l] = {
                k: {"ours": g("ours", s, l, k), "qemu": g("qemu", s, l, k),
                    "ours_over_qemu": _ratio(g("ours", s, l, k), g("qemu", s, l, k))}
                for k in ("total_ms", "downtime_ms", "wire_bytes")}
        for v in ("ours", "qemu"):
            off, on = idx.get((v, s, "hint-off")), idx.get((v, s, "hint-on"))
            ent["hints"][v] = {
                "wire_bytes_without": off and off["wire_bytes"],
                "wire_bytes_with": on and on["wire_bytes"],
                "total_ms_without": off and off["total_ms"],
                "total_ms_with": on and on["total_ms"],
                "wire_with_over_without": _ratio(on and on["wire_bytes"],
                                                 off and off["wire_bytes"]),
                "time_with_over_without": _ratio(on and on["total_ms"], off and off["total_ms"]),
            }
        q = idx.get(("qemu", s, "precopy"))
        ent["hints"]["qemu_no_hint_reference_same_fill"] = q and {
            "what": "QEMU pre-copy of the idle SeaBIOS guest whose RAM above 16 MiB is all "
                    "non-zero: the same touched region as ours (no guest driver, no hints)",
            "wire_bytes": q["wire_bytes"], "total_ms": q["total_ms"]}
        on = idx.get(("ours", s, "hint-on"))
        if on:
            ent["hints"]["ours"].update(hinted_bytes=on["free_page_hint_bytes"],
                                        skipped_bytes=on["free_page_skipped_bytes"])
        for c in cases:
            if c["size_gib"] == s and c["label"].startswith("demand") and c.get("ok"):
                ent["demand"].append({k: c.get(k) for k in (
                    "label", "push_bandwidth", "total_ms", "downtime_ms", "wire_bytes",
                    "postcopy_pulled", "postcopy_pushed", "postcopy_duplicates", "lanes")})
        out.append(ent)
    return out


def _f(x, fmt="{:.0f}"):
    return "-" if x is None else fmt.format(x)


def print_report(rep):
    h = rep["host"]
    print(f"\nhost: {h['nproc']} cores, load {h['loadavg_at_start'][0]:.1f} at start, KVM: "
          f"{h['kvm_kind'][:60]}")
    q = rep["config"].get("qemu") or {}
    if q:
        print(f"QEMU: {q.get('version')}, SeaBIOS cases on {q.get('accel')}")
    for e in rep["summary"]:
        s = e["size_gib"]
        print(f"\n== {s} GiB, idle guest, RAM above 16 MiB random, TCP"
              + (f", bandwidth cap {rep['config']['args']['bandwidth']} B/s"
                 if rep["config"]["args"]["bandwidth"] else ""))
        print(f"{'variant':<16} {'ours ms':>8} {'qemu ms':>8} {'o/q':>5}  {'ours dn':>7} "
              f"{'qemu dn':>7} {'o/q':>5}  {'ours MiB':>8} {'qemu MiB':>8} {'o/q':>5}")
        for l, r in e["postcopy"].items():
            t, dn, w = r["total_ms"], r["downtime_ms"], r["wire_bytes"]
            print(f"{l:<16} {_f(t['ours']):>8} {_f(t['qemu']):>8} "
                  f"{_f(t['ours_over_qemu'], '{:.2f}'):>5}  {_f(dn['ours']):>7} "
                  f"{_f(dn['qemu']):>7} {_f(dn['ours_over_qemu'], '{:.2f}'):>5}  "
                  f"{_f(w['ours'] and w['ours'] / MIB, '{:.1f}'):>8} "
                  f"{_f(w['qemu'] and w['qemu'] / MIB, '{:.1f}'):>8} "
                  f"{_f(w['ours_over_qemu'], '{:.2f}'):>5}")
        print(f"\nfree-page hints (pre-copy; guest touched RAM above 16 MiB, then freed 7/8)")
        print(f"{'vmm':<6} {'MiB w/o':>8} {'MiB with':>8} {'ratio':>6} {'ms w/o':>7} "
              f"{'ms with':>7} {'ratio':>6}")
        for v in ("ours", "qemu"):
            r = e["hints"][v]
            print(f"{v:<6} {_f(r['wire_bytes_without'] and r['wire_bytes_without'] / MIB):>8} "
                  f"{_f(r['wire_bytes_with'] and r['wire_bytes_with'] / MIB):>8} "
                  f"{_f(r['wire_with_over_without'], '{:.3f}'):>6} "
                  f"{_f(r['total_ms_without']):>7} {_f(r['total_ms_with']):>7} "
                  f"{_f(r['time_with_over_without'], '{:.2f}'):>6}")
        ref = e["hints"].get("qemu_no_hint_reference_same_fill")
        if ref:
            print(f"qemu no-hint reference, same fill (SeaBIOS, prefilled): "
                  f"{ref['wire_bytes'] / MIB:.0f} MiB, {ref['total_ms']} ms")
        for dm in e["demand"]:
            print(f"\ndemand faults: {dm['label']} (memwalk, pure post-copy): total "
                  f"{dm['total_ms']} ms, downtime {dm['downtime_ms']} ms, pulled "
                  f"{dm['postcopy_pulled']}, pushed {dm['postcopy_pushed']}, duplicates "
                  f"{dm['postcopy_duplicates']}")
            for ln in dm["lanes"]:
                print(f"  lane {ln['lane']:>2}: faults {ln['faults']:>6}  p50 "
                      f"{ln['p50_us']:>9.1f} us  p99 {ln['p99_us']:>9.1f} us  blocked "
                      f"{ln['blocked_ms']:>8.1f} ms")
    print()
    for c in rep["cases"]:
        if not c.get("ok"):
            print(f"! {c['vmm']} {c.get('size_gib')}G {c.get('label')}: "
                  + (c.get("error") or "?").splitlines()[0][:300])
    for n in rep["notes"]:
        print("note: " + n)


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Post-copy live migration and free-page hinting: our vmm vs QEMU 7.2 on "
                    "loopback TCP (total time, downtime, bytes; per-vCPU demand faults). "
                    "Writes JSON, prints a table. See bench/README.md.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sizes", default="1", help="guest RAM sizes in GiB, comma separated")
    p.add_argument("--bandwidth", type=int, default=0,
                   help="bytes/s cap for every migration of both VMMs (0: unlimited; ours "
                        "--bandwidth, QEMU max-bandwidth and max-postcopy-bandwidth)")
    p.add_argument("--switch-after", type=float, default=0.5,
                   help="seconds of pre-copy before the switch to post-copy (switch variant)")
    p.add_argument("--hint-bandwidth", type=int, default=0,
                   help="bytes/s cap for our two hinting migrations only (0: --bandwidth). "
                        "Hints arrive a few ms after the session starts; the integration test "
                        "caps bandwidth so that the first pass cannot outrun them")
    p.add_argument("--demand-mib", type=int, default=64, help="memwalk region (MiB)")
    p.add_argument("--demand-vcpus", type=int, default=2, help="memwalk vCPUs (lanes)")
    p.add_argument("--demand-bandwidth", type=int, default=16 * MIB,
                   help="extra demand run with the push capped at this many bytes/s, so that "
                        "the walking guest faults more (0: skip it)")
    p.add_argument("--vmm", default=mig.DEFAULT_VMM)
    p.add_argument("--vmmctl", default=mig.DEFAULT_VMMCTL)
    p.add_argument("--qemu", default="qemu-system-x86_64")
    p.add_argument("--qemu-accel", choices=("auto", "kvm", "tcg"), default="auto",
                   help="accelerator of the SeaBIOS cases; auto: probe kvm once (as "
                        "bench/migration.py), else tcg. The Linux hint cases always use tcg")
    p.add_argument("--qemu-kvm-probe-timeout", type=float, default=90.0)
    p.add_argument("--guest-dir", default=GUEST_DIR,
                   help="bzImage + initramfs.cpio.gz of tools/guest/build.sh (QEMU hint cases)")
    p.add_argument("--linux-timeout", type=float, default=60.0,
                   help="seconds for the QEMU Linux guest to reach its shell")
    p.add_argument("--no-qemu", action="store_true", help="skip every QEMU case")
    p.add_argument("--no-qemu-linux", action="store_true",
                   help="skip QEMU's Linux free-page-hint cases")
    p.add_argument("--no-ours", action="store_true", help="skip our vmm's cases")
    p.add_argument("--settle", type=float, default=0.5,
                   help="seconds between the guest being ready and the migration")
    p.add_argument("--guest-timeout", type=float, default=120.0,
                   help="seconds for our source guest to become ready")
    p.add_argument("--migrate-timeout", type=float, default=300.0)
    p.add_argument("--exit-timeout", type=float, default=30.0)
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON output path")
    p.add_argument("--keep-logs", action="store_true", help="keep per-case logs in the temp dir")
    a = p.parse_args(argv)
    try:
        a.sizes = [int(x) for x in a.sizes.split(",") if x.strip()]
    except ValueError:
        p.error("--sizes: comma-separated whole GiB")
    if not a.sizes or min(a.sizes) < 1:
        p.error("--sizes must be >= 1")
    # Attributes bench/migration.py's qemu_case / choose_qemu_accel read.
    a.downtime_ms, a.sample_period = 0, 0.1
    return a


def check_inputs(a):
    problems = []
    if not a.no_ours:
        for b, tgt in ((a.vmm, "//vmm:vmm"), (a.vmmctl, "//api:vmmctl")):
            if not (os.path.isfile(b) and os.access(b, os.X_OK)):
                problems.append(f"{b} not found: bazel build {tgt}")
        if not problems:
            h = subprocess.run([a.vmmctl, "migrate", "--help"], capture_output=True, timeout=20)
            if b"--postcopy" not in h.stdout + h.stderr:
                problems.append(f"{a.vmmctl} has no `migrate --postcopy`: rebuild //api:vmmctl")
    if not a.no_qemu:
        q = shutil.which(a.qemu)
        if not q:
            problems.append(f"QEMU not found: {a.qemu} (apt-get install qemu-system-x86; or "
                            "--no-qemu)")
        a.qemu = q or a.qemu
    if problems:
        raise BenchError("\n".join(problems))


def main(argv=None):
    a = parse_args(argv)
    check_inputs(a)
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, mig._on_signal)
    t_start = time.monotonic()
    tmp = tempfile.mkdtemp(prefix="pcbench-")
    if a.keep_logs:
        log(f"keeping per-case logs in {tmp}")
    else:
        mig._tmpdirs.append(tmp)
    host = mig.host_info()
    config = {"args": dict(vars(a)), "git": mig.git_info()}
    if not a.no_ours:
        # Private copies: others may rebuild bazel-bin/ during the run.
        os.makedirs(os.path.join(tmp, "bin"))
        for attr in ("vmm", "vmmctl"):
            dst = os.path.join(tmp, "bin", attr)
            shutil.copy2(getattr(a, attr), dst)
            config[f"{attr}_mtime"] = datetime.datetime.fromtimestamp(
                os.path.getmtime(getattr(a, attr))).isoformat(timespec="seconds")
            config[f"{attr}_sha256"] = mig.sha256(dst)
            setattr(a, attr, dst)
    accel, pool = None, None
    if not a.no_qemu:
        accel, probe = mig.choose_qemu_accel(a, tmp)
        config["qemu"] = {"binary": a.qemu, "version": mig.qemu_version(a.qemu),
                          "accel": accel, "kvm_probe": probe}
        pool = mig.random_pool(64 * MIB)
    cases = []
    for size in a.sizes:
        if mig.mem_available() < 2 * size * GIB + GIB:
            log(f"SKIP {size} GiB: not enough free memory for source + destination")
            continue
        run_size(a, tmp, size, accel, pool, cases)

    summary = summarize(cases)
    notes = [
        "Host: " + ("software-emulated KVM (kvm-pvm, no vmx/svm): guest code is emulated at "
                    "~3M instructions/s; the idle guests do not run during migration, so what "
                    "is timed is host work (read, send, receive, page faults, userfaultfd)."
                    if host["kvm_is_software_emulated"] else "hardware KVM.")
        + f" {host['nproc']} cores shared with other jobs: single runs vary by +-30%.",
        "Comparable guests (section 1): ours `idle --prefill random` and QEMU's SeaBIOS idle "
        "guest with the same /dev/shm prefill (bench/migration.py): both halt, RAM above 16 MiB "
        "is random, nothing is dirtied, so post-copy has almost no demand faults and measures "
        "the switchover + background push. memwalk is not used there because QEMU cannot run "
        "it; it is section 3 (ours only).",
        "Total time: ours = MigrationProgress.total_ms (start to the destination confirming "
        "every page present); QEMU = max(query-migrate total-time, migrate -> destination "
        "RESUME); QEMU's total-time ends when its source has sent everything. Downtime: "
        "destination resume - source pause for both (ours progress timestamps; QEMU RESUME "
        "and STOP QMP events). Wire bytes: ours bytes_sent, QEMU ram.transferred.",
        "Switch variant: pre-copy for --switch-after s then the switch command (ours: vmmctl "
        "migrate-postcopy, a separate process started at that time; QEMU: "
        "migrate-start-postcopy on the open QMP connection).",
        "Hints: ours pre-copy of the balloonhint guest (touches RAM from 16 MiB to the end, "
        "keeps 1/8, hints the rest when the source asks); without hints the same guest with "
        "`--balloon on` and `nohint`. QEMU: Linux under TCG (the only way a Linux guest runs "
        "here), tmpfs filled with non-zero data then deleted, free-page-hint on/off; its RAM "
        "contents differ from ours (kernel, page cache) and the guest keeps running during the "
        "migration.",
    ]
    rep = {"benchmark": "postcopy_migration", "host": host, "config": config,
           "summary": summary, "notes": notes, "cases": cases}
    host["loadavg_at_end"] = list(os.getloadavg())
    rep["duration_s"] = round(time.monotonic() - t_start, 1)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(rep, f, indent=1, default=str)
    print_report(rep)
    print(f"JSON: {a.out}   ({rep['duration_s']} s)")
    return 0 if all(c.get("ok") for c in cases if not c.get("skipped")) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"postcopy_migration.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("postcopy_migration.py: interrupted; cleaning up", file=sys.stderr)
        sys.exit(130)
    finally:
        mig.cleanup()
