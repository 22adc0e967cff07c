#!/usr/bin/env python3
"""Start-up latency and memory-overhead benchmark: microvmm's `vmm` vs QEMU 7.2 microvm.

Run on demand (it is not a test):  python3 bench/startup.py [--runs N] [--out PATH]

Start-up latency = from just before the process is spawned to the first byte of guest
serial output arriving on the process's stdout pipe (read unbuffered, os.read + select).
Cases:
  vmm-hello   vmm --test-guest hello          (also: time until the process has exited)
  vmm-linux   vmm --kernel bzImage --initrd   (also: time until the `Linux version` line)
  qemu-linux  qemu-system-x86_64 -M microvm with the same kernel and initramfs
              (-accel kvm is probed once; if it fails or prints nothing, -accel tcg is used;
              the accelerator actually used is recorded)
Memory overhead = VmRSS - RssShmem from /proc/PID/status while the guest runs: guest RAM is
a memfd (shmem) in vmm, and QEMU is given `-object memory-backend-memfd` so its guest RAM is
shmem too and the two figures compare like for like.

Standard library only. See bench/README.md for how to read the numbers on this host, whose
KVM is a software module (kvm-pvm: no vmx/svm in /proc/cpuinfo, guest code emulated).
"""

import argparse
import datetime
import json
import os
import platform
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_VMM = os.path.join(REPO, "bazel-bin", "vmm", "vmm")
DEFAULT_GUEST_DIR = os.environ.get(
    "MICROVMM_GUEST_DIR", os.path.join(os.path.expanduser("~"), ".cache", "microvmm", "guest"))
DEFAULT_OUT = os.path.join(REPO, "bench", "results", "startup.json")
# Same kernel command line for vmm and QEMU. tsc_early_khz avoids the TSC-unstable hang of
# microvm under TCG (see shared docs); mode=poweroff makes /init power off if it gets there.
DEFAULT_CMDLINE = "console=ttyS0 tsc_early_khz=2000000 reboot=k panic=1 mode=poweroff"
MEM_MIB = 256
LINUX_BANNER = b"Linux version"

# ----------------------------------------------------------------------------------------
# Child-process bookkeeping: everything we spawn is registered and killed on any exit path.

_children = {}  # pid -> Popen


class BenchError(Exception):
    """A user-facing error (missing binary/image, ...): printed without a traceback."""


def _spawn(cmd, stdin=subprocess.DEVNULL, stderr=None):
    p = subprocess.Popen(cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=stderr,
                         close_fds=True, start_new_session=True)
    _children[p.pid] = p
    return p


def _reap(p, sig=signal.SIGKILL, grace=2.0):
    """Stops one child (by its pid) and waits for it; returns its exit status."""
    if p.poll() is None:
        try:
            os.kill(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            p.wait()
    for f in (p.stdin, p.stdout):
        if f:
            try:
                f.close()
            except OSError:
                pass
    _children.pop(p.pid, None)
    return p.returncode


def _kill_all_children():
    for p in list(_children.values()):
        _reap(p, signal.SIGKILL)


def _on_signal(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


# ----------------------------------------------------------------------------------------
# One timed run.

def timed_run(cmd, *, timeout, line_marker=None, wait_exit=False, stdin=subprocess.DEVNULL,
              on_line=None, keep_output=65536):
    """Spawns cmd and watches its stdout.

    Returns a dict with seconds since just before the spawn:
      first_byte_s  first byte of stdout (None if none before the deadline)
      line_s        end of the first line containing line_marker (if line_marker)
      exit_s        process exit (if wait_exit and it exited before the deadline)
    and returncode, timed_out, output (first keep_output bytes), stderr tail.
    The process is killed once what was asked for has been seen (or at the deadline).
    on_line(proc, line_bytes, elapsed) may return True to stop early (used for sampling).
    """
    errf = tempfile.TemporaryFile()
    t0 = time.perf_counter()
    p = _spawn(cmd, stdin=stdin, stderr=errf)
    fd = p.stdout.fileno()
    deadline = t0 + timeout
    res = {"first_byte_s": None, "line_s": None, "exit_s": None, "returncode": None,
           "timed_out": False}
    out = bytearray()
    pending = b""  # partial line
    eof = False
    try:
        while True:
            now = time.perf_counter()
            if now >= deadline:
                res["timed_out"] = True
                break
            r, _, _ = select.select([fd], [], [], min(deadline - now, 0.5))
            if r:
                chunk = os.read(fd, 65536)
                t = time.perf_counter()
                if not chunk:
                    eof = True
                else:
                    if res["first_byte_s"] is None:
                        res["first_byte_s"] = t - t0
                    if len(out) < keep_output:
                        out += chunk[:keep_output - len(out)]
                    pending += chunk
                    stop = False
                    while b"\n" in pending:
                        line, pending = pending.split(b"\n", 1)
                        if (line_marker is not None and res["line_s"] is None
                                and line_marker in line):
                            res["line_s"] = t - t0
                        if on_line and on_line(p, line, t - t0):
                            stop = True
                    if len(pending) > 65536:
                        pending = pending[-4096:]
                    if stop:
                        break
            if eof:
                if wait_exit:
                    try:
                        p.wait(timeout=max(0.0, deadline - time.perf_counter()))
                        res["exit_s"] = time.perf_counter() - t0
                    except subprocess.TimeoutExpired:
                        res["timed_out"] = True
                break
            if res["first_byte_s"] is not None and not wait_exit and on_line is None:
                if line_marker is None or res["line_s"] is not None:
                    break
            if not r and p.poll() is not None and wait_exit:
                # exited but stdout not yet at EOF (should not happen); keep reading
                continue
    finally:
        rc = _reap(p)
        res["returncode"] = rc
        res["output"] = bytes(out).decode("utf-8", "replace")
        errf.seek(0)
        err = errf.read()
        errf.close()
        res["stderr_tail"] = err[-4000:].decode("utf-8", "replace")
    return res


# ----------------------------------------------------------------------------------------
# Statistics and host facts.

def percentile(values, q):
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    v = sorted(values)
    if not v:
        return None
    if len(v) == 1:
        return v[0]
    pos = (len(v) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarize(values):
    vals = [x for x in values if x is not None]
    if not vals:
        return None
    return {"n": len(vals), "median_ms": statistics.median(vals) * 1e3,
            "p10_ms": percentile(vals, 10) * 1e3, "p90_ms": percentile(vals, 90) * 1e3,
            "min_ms": min(vals) * 1e3, "max_ms": max(vals) * 1e3,
            "mean_ms": statistics.fmean(vals) * 1e3}


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
    kvm_modules = []
    try:
        kvm_modules = sorted(m for m in os.listdir("/sys/module") if m.startswith("kvm"))
    except OSError:
        pass
    if not os.path.exists("/dev/kvm"):
        kvm_kind = "none (/dev/kvm missing)"
    elif hw_virt:
        kvm_kind = "hardware (vmx/svm present)"
    else:
        kvm_kind = ("SOFTWARE-EMULATED: /dev/kvm exists but /proc/cpuinfo has no vmx/svm "
                    f"(modules: {', '.join(kvm_modules) or '?'}); guest code runs emulated "
                    "(~3M instr/s here), so guest-side times are not representative of a "
                    "real KVM host")
    return {
        "hostname": socket.gethostname(),
        "kernel": platform.release(),
        "kernel_version": platform.version(),
        "cpu_model": cpu_model,
        "nproc": os.cpu_count(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpuinfo_has_vmx_or_svm": hw_virt,
        "cpuinfo_has_hypervisor_flag": "hypervisor" in flags,
        "kvm_modules": kvm_modules,
        "kvm_is_software_emulated": os.path.exists("/dev/kvm") and not hw_virt,
        "kvm_kind": kvm_kind,
        "python": platform.python_version(),
        "loadavg_at_start": list(os.getloadavg()),
    }


def _sha256(path):
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_proc_mem(pid):
    """VmRSS/RssAnon/RssFile/RssShmem/VmHWM/Threads from /proc/PID/status (KiB) and
    Pss*/Private* from /proc/PID/smaps_rollup when readable."""
    m = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM", "VmSize"):
                m[k + "_kib"] = int(v.split()[0])
            elif k == "Threads":
                m["Threads"] = int(v)
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("Pss", "Pss_Anon", "Pss_File", "Pss_Shmem", "Private_Clean",
                         "Private_Dirty"):
                    m[k + "_kib"] = int(v.split()[0])
    except OSError:
        pass
    m["overhead_kib"] = m["VmRSS_kib"] - m["RssShmem_kib"]
    if "Pss_kib" in m and "Pss_Shmem_kib" in m:
        m["pss_overhead_kib"] = m["Pss_kib"] - m["Pss_Shmem_kib"]
    return m


# ----------------------------------------------------------------------------------------
# Benchmark cases.

def vmm_cmd(args, *extra):
    return [args.vmm, "--serial", "stdout", "--log-level", "warn", *extra]


def qemu_cmd(args, accel, *, memfd=False, append=None, kernel=None):
    cmd = [args.qemu, "-M", "microvm" + (",memory-backend=m" if memfd else ""),
           "-accel", accel, "-nodefaults", "-no-user-config", "-nographic",
           "-serial", "stdio", "-m", str(MEM_MIB),
           "-kernel", kernel or args.kernel, "-initrd", args.initrd,
           "-append", append or args.cmdline]
    if memfd:
        cmd += ["-object", f"memory-backend-memfd,id=m,size={MEM_MIB}M"]
    return cmd


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def bench_vmm_hello(args):
    cmd = vmm_cmd(args, "--test-guest", "hello")
    samples = []
    for i in range(args.runs):
        r = timed_run(cmd, timeout=args.hello_timeout, wait_exit=True)
        ok = (r["first_byte_s"] is not None and r["returncode"] == 0
              and "hello from guest" in r["output"])
        samples.append({"first_byte_s": r["first_byte_s"], "exit_s": r["exit_s"],
                        "returncode": r["returncode"], "ok": ok})
        if not ok:
            log(f"  vmm-hello run {i}: FAILED rc={r['returncode']} timed_out={r['timed_out']} "
                f"output={r['output'][:200]!r} stderr={r['stderr_tail'][-500:]!r}")
    good = [s for s in samples if s["ok"]]
    return {"cmd": cmd, "samples": samples, "ok_runs": len(good),
            "first_byte": summarize([s["first_byte_s"] for s in good]),
            "exit": summarize([s["exit_s"] for s in good])}


def bench_reference(args):
    """Floors for reading the numbers: the harness's own spawn->first-byte cost (/bin/echo)
    and the vmm binary's process start-up without a VM (`vmm --help`: exec + dynamic linking
    of its ~60 shared libraries + writing the help text)."""
    out = {}
    echo = shutil.which("echo") or "/bin/echo"
    for name, cmd in (("echo", [echo, "x"]), ("vmm --help", [args.vmm, "--help"])):
        vals = []
        for _ in range(args.runs):
            r = timed_run(cmd, timeout=10, wait_exit=True)
            if r["first_byte_s"] is not None:
                vals.append(r["first_byte_s"])
        out[name] = {"cmd": cmd, "first_byte": summarize(vals), "ok_runs": len(vals),
                     "runs": args.runs}
    return out


def _linux_case(args, cmd, runs, label, sample_mem_on_banner=False):
    samples, mem = [], None
    for i in range(runs):
        box = {}

        def on_line(p, line, _t, box=box):
            if LINUX_BANNER in line:
                if sample_mem_on_banner and i == runs - 1:
                    try:
                        box["mem"] = read_proc_mem(p.pid)
                    except OSError:
                        pass
                return True
            return False

        r = timed_run(cmd, timeout=args.linux_timeout, line_marker=LINUX_BANNER,
                      on_line=on_line)
        first_line = r["output"].split("\n", 1)[0][:160]
        s = {"first_byte_s": r["first_byte_s"], "linux_version_line_s": r["line_s"],
             "timed_out": r["timed_out"] and r["line_s"] is None,
             "returncode": r["returncode"], "first_output_line": first_line}
        if r["first_byte_s"] is None:
            s["stderr_tail"] = r["stderr_tail"][-1500:]
        samples.append(s)
        if "mem" in box:
            mem = box["mem"]
        fb = r["first_byte_s"]
        log(f"  {label} run {i}: first byte "
            + (f"{fb * 1e3:.1f} ms" if fb is not None else f"none in {args.linux_timeout:g} s")
            + (f", 'Linux version' line {r['line_s'] * 1e3:.1f} ms" if r["line_s"] else ""))
        if fb is None and i == 0 and runs > 1 and not args.keep_going:
            log(f"  {label}: no output within --linux-timeout on the first run; "
                "skipping the remaining runs (use --keep-going to repeat anyway)")
            break
    return samples, mem


def bench_vmm_linux(args, kernel=None, runs=None, label="vmm-linux"):
    cmd = vmm_cmd(args, "--kernel", kernel or args.kernel, "--initrd", args.initrd,
                  "--memory", str(MEM_MIB), "--cmdline", args.cmdline)
    samples, mem = _linux_case(args, cmd, runs or args.runs, label,
                               sample_mem_on_banner=True)
    return {"cmd": cmd, "runs_requested": runs or args.runs, "samples": samples,
            "ok_runs": sum(1 for s in samples if s["first_byte_s"] is not None),
            "first_byte": summarize([s["first_byte_s"] for s in samples]),
            "linux_version_line": summarize([s["linux_version_line_s"] for s in samples]),
            "memory_at_banner": mem}


def probe_qemu_kvm(args):
    """One run with -accel kvm. KVM counts as usable only if the kernel banner arrives and
    QEMU reports no KVM error."""
    cmd = qemu_cmd(args, "kvm")
    r = timed_run(cmd, timeout=args.linux_timeout, line_marker=LINUX_BANNER,
                  on_line=lambda p, line, t: LINUX_BANNER in line)
    err = r["stderr_tail"]
    kvm_error = any(s in err for s in ("KVM internal error", "failed to initialize kvm",
                                       "Could not access KVM", "kvm_init", "KVM_"))
    usable = r["first_byte_s"] is not None and r["line_s"] is not None and not kvm_error
    if usable:
        reason = "usable"
    elif kvm_error:
        lines = [l for l in err.strip().splitlines() if "KVM" in l or "kvm" in l]
        reason = "KVM error: " + (lines[0] if lines else err.strip().splitlines()[0])[:200]
    elif r["first_byte_s"] is None:
        reason = f"no serial output within {args.linux_timeout:g} s (rc={r['returncode']})"
    else:
        reason = "no 'Linux version' line"
    return {"cmd": cmd, "usable": usable, "reason": reason,
            "first_byte_s": r["first_byte_s"], "linux_version_line_s": r["line_s"],
            "returncode": r["returncode"], "stderr_tail": err[-1500:]}


def qemu_version(qemu):
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=10)
        return out.stdout.splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def bench_qemu_linux(args, accel=None, kernel=None, runs=None, label="qemu-linux"):
    probe = None
    if accel is not None:
        pass
    elif args.qemu_accel == "auto":
        log("  qemu: probing -accel kvm (one run)...")
        probe = probe_qemu_kvm(args)
        accel = "kvm" if probe["usable"] else "tcg"
        log(f"  qemu: -accel kvm {probe['reason']}; using -accel {accel}")
    else:
        accel = args.qemu_accel
    cmd = qemu_cmd(args, accel, kernel=kernel)
    samples, _ = _linux_case(args, cmd, runs or args.runs, f"{label}({accel})")
    return {"cmd": cmd, "accel": accel, "kvm_probe": probe,
            "runs_requested": runs or args.runs, "samples": samples,
            "ok_runs": sum(1 for s in samples if s["first_byte_s"] is not None),
            "first_byte": summarize([s["first_byte_s"] for s in samples]),
            "linux_version_line": summarize([s["linux_version_line_s"] for s in samples])}


def _mem_sample(cmd, marker, timeout, settle, stdin=subprocess.DEVNULL):
    """Runs cmd until a stdout line contains marker, waits `settle` seconds, reads memory."""
    box = {}

    def on_line(p, line, t):
        if marker in line:
            box["t"] = t
            time.sleep(settle)
            if p.poll() is None:
                box["mem"] = read_proc_mem(p.pid)
            return True
        return False

    r = timed_run(cmd, timeout=timeout, on_line=on_line, stdin=stdin)
    if "mem" not in box:
        return {"cmd": cmd, "ok": False,
                "error": f"'{marker.decode()}' not seen within {timeout:g} s "
                         f"(rc={r['returncode']})",
                "output_tail": r["output"][-800:], "stderr_tail": r["stderr_tail"][-800:]}
    return {"cmd": cmd, "ok": True, "marker": marker.decode(), "marker_s": box["t"],
            **box["mem"]}


def _mem_sample_settled(cmd, timeout=15.0, period=0.25, stable=4):
    """For a process that prints nothing (QEMU -S): polls /proc/PID/status until VmRSS has
    not changed for `stable` consecutive polls, then reports that sample."""
    errf = tempfile.TemporaryFile()
    t0 = time.perf_counter()
    p = _spawn(cmd, stderr=errf)
    last, same, m = None, 0, None
    try:
        while time.perf_counter() - t0 < timeout and p.poll() is None:
            time.sleep(period)
            try:
                m = read_proc_mem(p.pid)
            except OSError:
                break
            same = same + 1 if last == m["VmRSS_kib"] else 0
            last = m["VmRSS_kib"]
            if same >= stable:
                break
    finally:
        rc = _reap(p)
        errf.seek(0)
        err = errf.read().decode("utf-8", "replace")
        errf.close()
    if m is None or same < stable:
        return {"cmd": cmd, "ok": False, "error": f"did not settle (rc={rc})",
                "stderr_tail": err[-800:]}
    return {"cmd": cmd, "ok": True, "settled_s": time.perf_counter() - t0, **m}


def bench_memory(args, qemu_accel):
    res = {}
    log("  memory: vmm memwalk...")
    res["vmm-memwalk"] = _mem_sample(
        vmm_cmd(args, "--test-guest", "memwalk", "--memory", str(MEM_MIB),
                "--test-guest-args", "mib=8"),
        b"memwalk gen=3 ok", timeout=60, settle=0.0)
    # An idle VMM: hello has exited, the process stays up because of --api-socket (which
    # also runs the gRPC server threads), until we kill it.
    log("  memory: vmm idle after hello (--api-socket keeps it up)...")
    with tempfile.TemporaryDirectory(prefix="startup-bench-") as d:
        res["vmm-hello-idle"] = _mem_sample(
            vmm_cmd(args, "--test-guest", "hello", "--memory", str(MEM_MIB),
                    "--api-socket", os.path.join(d, "api.sock")),
            b"hello from guest", timeout=30, settle=0.5)
    if qemu_accel and not args.no_qemu:
        log(f"  memory: qemu ({qemu_accel}, memfd guest RAM) booting Linux to its shell...")
        append = args.cmdline.replace("mode=poweroff", "") + " mode=shell"
        # stdin is a pipe kept open so the guest shell waits instead of seeing EOF.
        res["qemu-linux"] = _mem_sample(
            qemu_cmd(args, qemu_accel, memfd=True, append=" ".join(append.split())),
            b"starting shell", timeout=max(60, args.linux_timeout), settle=1.0,
            stdin=subprocess.PIPE)
        res["qemu-linux"]["accel"] = qemu_accel
        if os.path.exists("/dev/kvm"):
            # QEMU's own footprint with KVM and without TCG's code buffer: -S stops the vCPU
            # before its first instruction (kernel and initrd already loaded into guest RAM).
            log("  memory: qemu -accel kvm -S (paused before the first guest instruction)...")
            cmd = qemu_cmd(args, "kvm", memfd=True) + ["-S"]
            res["qemu-kvm-paused"] = _mem_sample_settled(cmd)
            res["qemu-kvm-paused"]["accel"] = "kvm"
    return res


# ----------------------------------------------------------------------------------------
# Output.

def fmt_ms(x):
    return "-" if x is None else (f"{x:.1f}" if x < 1000 else f"{x:.0f}")


def ratio(a, b):
    if not a or not b:
        return None
    return a["median_ms"] / b["median_ms"]


def print_report(rep):
    h = rep["host"]
    print()
    print(f"Host: {h['kernel']}, {h['cpu_model']}, {h['nproc']} CPUs, {h['date']}")
    print(f"KVM:  {h['kvm_kind']}")
    if h["kvm_is_software_emulated"]:
        print("      => guest-side time in the vmm cases is the software KVM's, not the VMM's"
              + (f"; QEMU ran with -accel {rep['qemu']['accel']}" if rep.get("qemu") else "")
              + ".")
    if rep.get("qemu"):
        print(f"QEMU: {rep['qemu']['version']}, accelerator used: {rep['qemu']['accel']}"
              + (f" (kvm probe: {rep['qemu']['kvm_probe']['reason']})"
                 if rep["qemu"].get("kvm_probe") else ""))
    print()
    rows = []
    c = rep["cases"]
    for name, ref in rep.get("reference", {}).items():
        rows.append((f"(reference) {name}: first byte", ref["first_byte"], ref["ok_runs"],
                     ref["runs"]))
    if "vmm-hello" in c:
        rows.append(("vmm-hello: first serial byte", c["vmm-hello"]["first_byte"],
                     c["vmm-hello"]["ok_runs"], len(c["vmm-hello"]["samples"])))
        rows.append(("vmm-hello: process exit", c["vmm-hello"]["exit"],
                     c["vmm-hello"]["ok_runs"], len(c["vmm-hello"]["samples"])))
    for case in ("vmm-linux", "qemu-linux", "vmm-linux-pvh", "qemu-linux-pvh"):
        if case not in c:
            continue
        v = c[case]
        tag = f" ({v['accel']})" if "accel" in v else ""
        n = len(v["samples"])
        missing = sum(1 for x in v["samples"] if x["first_byte_s"] is None)
        note = ""
        if missing:
            note = f"{missing} run(s): no serial byte within {rep['config']['linux_timeout_s']:g} s"
            if n < v["runs_requested"]:
                note += f"; other {v['runs_requested'] - n} run(s) skipped"
        rows.append((f"{case}{tag}: first serial byte", v["first_byte"], v["ok_runs"], n, note))
        rows.append((f"{case}{tag}: 'Linux version' line", v["linux_version_line"],
                     sum(1 for x in v["samples"] if x["linux_version_line_s"] is not None), n))
    w = max([len(r[0]) for r in rows] + [10])
    print(f"{'start-up latency (ms)':<{w}}  {'ok/n':>6}  {'median':>8}  {'p10':>8}  "
          f"{'p90':>8}  {'min':>8}")
    for name, s, ok, n, *note in rows:
        s = s or {}
        print(f"{name:<{w}}  {f'{ok}/{n}':>6}  {fmt_ms(s.get('median_ms')):>8}  "
              f"{fmt_ms(s.get('p10_ms')):>8}  {fmt_ms(s.get('p90_ms')):>8}  "
              f"{fmt_ms(s.get('min_ms')):>8}" + (f"  {note[0]}" if note and note[0] else ""))
    if rep["ratios"]:
        print()
        print("Ratios of medians (first serial byte):")
        for k, v in rep["ratios"].items():
            print(f"  {k:<44} {'- (no samples on one side)' if v is None else f'{v:.4g}'}")
    mem = rep.get("memory")
    if mem:
        print()
        print(f"{'memory (KiB)':<26} {'VmRSS':>8} {'RssAnon':>8} {'RssFile':>8} "
              f"{'RssShmem':>8} {'overhead':>9} {'PSS-shm':>8}  (overhead = VmRSS - RssShmem)")
        for name, m in mem.items():
            if name == "note":
                continue
            if not m.get("ok"):
                print(f"{name:<26} FAILED: {m.get('error')}")
                continue
            print(f"{name:<26} {m['VmRSS_kib']:>8} {m['RssAnon_kib']:>8} "
                  f"{m['RssFile_kib']:>8} {m['RssShmem_kib']:>8} {m['overhead_kib']:>9} "
                  f"{m.get('pss_overhead_kib', '-'):>8}")
    print()


def compute_ratios(cases):
    r = {}
    h = cases.get("vmm-hello", {}).get("first_byte")
    vl = cases.get("vmm-linux", {}).get("first_byte")
    ql = cases.get("qemu-linux", {}).get("first_byte")
    if "vmm-linux" in cases and "qemu-linux" in cases:
        r["vmm_linux_over_qemu_linux"] = ratio(vl, ql)
        r["vmm_linux_over_qemu_linux_banner_line"] = ratio(
            cases["vmm-linux"]["linux_version_line"], cases["qemu-linux"]["linux_version_line"])
    if "vmm-hello" in cases and "vmm-linux" in cases:
        r["vmm_hello_over_vmm_linux"] = ratio(h, vl)
    if "vmm-linux-pvh" in cases and "qemu-linux-pvh" in cases:
        r["vmm_linux_pvh_over_qemu_linux_pvh"] = ratio(
            cases["vmm-linux-pvh"]["first_byte"], cases["qemu-linux-pvh"]["first_byte"])
    if "vmm-hello" in cases and "vmm-linux-pvh" in cases:
        r["vmm_hello_over_vmm_linux_pvh"] = ratio(h, cases["vmm-linux-pvh"]["first_byte"])
    if "vmm-hello" in cases and "qemu-linux" in cases:
        r["vmm_hello_over_qemu_linux"] = ratio(h, ql)
        r["vmm_hello_exit_over_qemu_linux_first_byte"] = ratio(
            cases["vmm-hello"]["exit"], ql)
    return r


# ----------------------------------------------------------------------------------------

def parse_args(argv):
    ap = argparse.ArgumentParser(
        prog="bench/startup.py",
        description="Start-up latency (spawn -> first guest serial byte on stdout) and memory "
                    "overhead (VmRSS - RssShmem) of microvmm's vmm, compared with QEMU 7.2 "
                    "microvm booting the same Linux kernel. Not a test: run on demand.",
        epilog="Needs: `bazel build //vmm:vmm` and the guest images from tools/guest/build.sh "
               "(tools/setup.sh installs everything and builds them). On a host whose KVM "
               "is software-emulated (no vmx/svm) the JSON and printout say so.")
    ap.add_argument("--runs", type=int, default=10, help="runs per latency case (default 10)")
    ap.add_argument("--out", default=DEFAULT_OUT,
                    help="JSON output path (default bench/results/startup.json)")
    ap.add_argument("--vmm", default=DEFAULT_VMM, help="vmm binary (default bazel-bin/vmm/vmm)")
    ap.add_argument("--qemu", default="qemu-system-x86_64", help="QEMU binary")
    ap.add_argument("--guest-dir", default=DEFAULT_GUEST_DIR,
                    help="directory with bzImage and initramfs.cpio.gz "
                         "(default $MICROVMM_GUEST_DIR or ~/.cache/microvmm/guest)")
    ap.add_argument("--kernel", help="kernel bzImage (default GUEST_DIR/bzImage)")
    ap.add_argument("--initrd", help="initramfs (default GUEST_DIR/initramfs.cpio.gz)")
    ap.add_argument("--cmdline", default=DEFAULT_CMDLINE,
                    help=f"kernel command line for both VMMs (default: {DEFAULT_CMDLINE!r})")
    ap.add_argument("--linux-timeout", type=float, default=20.0,
                    help="per-run limit for the Linux cases, seconds (default 20); the VMM is "
                         "killed once the 'Linux version' line arrived or at this limit")
    ap.add_argument("--hello-timeout", type=float, default=10.0,
                    help="per-run limit for vmm-hello, seconds (default 10)")
    ap.add_argument("--qemu-accel", choices=("auto", "kvm", "tcg"), default="auto",
                    help="auto (default): probe kvm once, fall back to tcg")
    ap.add_argument("--keep-going", action="store_true",
                    help="repeat a Linux case even if its first run printed nothing "
                         "before --linux-timeout (default: stop that case after one run)")
    ap.add_argument("--vmlinux", help="uncompressed PVH ELF kernel for the *-linux-pvh cases "
                                      "(default GUEST_DIR/vmlinux)")
    ap.add_argument("--pvh-runs", type=int, default=3,
                    help="runs of the extra vmm-linux-pvh / qemu-linux-pvh cases (default 3: "
                         "each vmm run takes ~10 s on a software-emulated KVM)")
    ap.add_argument("--no-pvh", action="store_true",
                    help="skip the extra cases that boot the uncompressed vmlinux (PVH entry)")
    ap.add_argument("--no-linux", action="store_true",
                    help="skip the vmm Linux cases (vmm-linux, vmm-linux-pvh)")
    ap.add_argument("--no-qemu", action="store_true", help="skip QEMU (latency and memory)")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    a = ap.parse_args(argv)
    if a.runs < 1:
        ap.error("--runs must be >= 1")
    a.kernel = a.kernel or os.path.join(a.guest_dir, "bzImage")
    a.initrd = a.initrd or os.path.join(a.guest_dir, "initramfs.cpio.gz")
    a.vmlinux = a.vmlinux or os.path.join(a.guest_dir, "vmlinux")
    if a.pvh_runs < 1:
        ap.error("--pvh-runs must be >= 1")
    return a


def check_inputs(a):
    problems = []
    if not (os.path.isfile(a.vmm) and os.access(a.vmm, os.X_OK)):
        problems.append(f"vmm binary not found: {a.vmm}\n"
                        "  build it:  bazel build //vmm:vmm   (in the repository root)")
    if not os.path.exists("/dev/kvm"):
        problems.append("/dev/kvm is missing: the vmm cannot run a guest on this host")
    need_images = not a.no_linux or not a.no_qemu
    if need_images:
        images = [("kernel", a.kernel), ("initramfs", a.initrd)]
        if not a.no_pvh:
            images.append(("vmlinux (for the PVH cases; skip them with --no-pvh)", a.vmlinux))
        for what, path in images:
            if not os.path.isfile(path):
                problems.append(f"{what} not found: {path}\n"
                                "  build the guest images:  tools/guest/build.sh  "
                                "(or tools/setup.sh, which also installs the packages); "
                                "or skip with --no-linux --no-qemu")
    if not a.no_qemu:
        q = shutil.which(a.qemu) if os.sep not in a.qemu else a.qemu
        if not q or not os.access(q, os.X_OK):
            problems.append(f"QEMU not found: {a.qemu}\n"
                            "  install it:  tools/setup.sh  (apt-get install qemu-system-x86); "
                            "or skip with --no-qemu")
        else:
            a.qemu = q
    if problems:
        raise BenchError("\n".join(problems))


def main(argv=None):
    a = parse_args(argv)
    check_inputs(a)
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _on_signal)
    t_start = time.perf_counter()
    host = host_info()
    if host["kvm_is_software_emulated"]:
        log("NOTE: " + host["kvm_kind"])
    rep = {"benchmark": "startup", "host": host, "runs": a.runs,
           "config": {"vmm": a.vmm, "kernel": a.kernel, "initrd": a.initrd,
                      "vmlinux": None if a.no_pvh else a.vmlinux,
                      "vmm_sha256": _sha256(a.vmm),
                      "image_sha256": {k: _sha256(v) for k, v in (
                          ("kernel", a.kernel), ("initrd", a.initrd), ("vmlinux", a.vmlinux))
                          if os.path.isfile(v)},
                      "cmdline": a.cmdline, "linux_timeout_s": a.linux_timeout,
                      "memory_mib": MEM_MIB},
           "vmm_accel": "kvm" + (" (software-emulated: " + ", ".join(host["kvm_modules"])
                                 + "; no vmx/svm)" if host["kvm_is_software_emulated"]
                                 else ""),
           "warning": host["kvm_kind"] if host["kvm_is_software_emulated"] else None,
           "definitions": {
               "first_byte": "seconds from just before spawning the process to the first byte "
                             "of guest serial output read from its stdout pipe",
               "exit": "vmm-hello: seconds from spawn until the process has exited",
               "linux_version_line": "seconds from spawn until the end of the serial line "
                                     "containing 'Linux version'",
               "overhead_kib": "VmRSS - RssShmem from /proc/PID/status: resident memory "
                               "other than the (shmem/memfd) guest RAM",
           },
           "cases": {}}
    if not a.no_qemu:
        rep["qemu"] = {"binary": a.qemu, "version": qemu_version(a.qemu), "accel": None}
    try:
        log("reference: spawn floor (/bin/echo) and `vmm --help`...")
        rep["reference"] = bench_reference(a)
        log(f"vmm-hello: {a.runs} runs...")
        rep["cases"]["vmm-hello"] = bench_vmm_hello(a)
        if not a.no_linux:
            log(f"vmm-linux: {a.runs} runs (limit {a.linux_timeout:g} s each)...")
            rep["cases"]["vmm-linux"] = bench_vmm_linux(a)
        if not a.no_qemu:
            log(f"qemu-linux: {a.runs} runs...")
            q = bench_qemu_linux(a)
            rep["cases"]["qemu-linux"] = q
            rep["qemu"]["accel"] = q["accel"]
            rep["qemu"]["kvm_probe"] = q.pop("kvm_probe")
        if not a.no_pvh:
            if not a.no_linux:
                log(f"vmm-linux-pvh: {a.pvh_runs} runs (limit {a.linux_timeout:g} s each)...")
                rep["cases"]["vmm-linux-pvh"] = bench_vmm_linux(
                    a, kernel=a.vmlinux, runs=a.pvh_runs, label="vmm-linux-pvh")
            if not a.no_qemu:
                log(f"qemu-linux-pvh: {a.pvh_runs} runs...")
                q = bench_qemu_linux(a, accel=rep["qemu"]["accel"], kernel=a.vmlinux,
                                     runs=a.pvh_runs, label="qemu-linux-pvh")
                q.pop("kvm_probe")
                rep["cases"]["qemu-linux-pvh"] = q
        if not a.no_memory:
            log("memory...")
            mem = bench_memory(a, None if a.no_qemu else rep["qemu"]["accel"])
            for case in ("vmm-linux", "vmm-linux-pvh"):
                vl = rep["cases"].get(case, {}).get("memory_at_banner")
                if vl:
                    mem[case + "-at-banner"] = {"ok": True, **vl}
            mem["note"] = (
                "overhead = VmRSS - RssShmem. vmm guest RAM is a memfd (RssShmem); QEMU is "
                "given -object memory-backend-memfd so its guest RAM is shmem too. RssFile is "
                "mostly the mapped binary and shared libraries (shared with other processes; "
                "PSS-shm = Pss - Pss_Shmem apportions it). QEMU under TCG also holds its "
                "translated-code buffer in RssAnon, which a KVM-accelerated QEMU would not; "
                "qemu-kvm-paused (-accel kvm -S, never runs guest code) is QEMU's footprint "
                "without it. "
                "vmm-hello-idle runs with --api-socket (gRPC server threads included).")
            rep["memory"] = mem
    finally:
        _kill_all_children()
    rep["ratios"] = compute_ratios(rep["cases"])
    rep["ratios_null_because"] = {
        k: "no first-byte samples on one side (see the cases' samples: timed out)"
        for k, v in rep["ratios"].items() if v is None}
    rep["ratio_notes"] = (
        "Ratios of medians of first-serial-byte latency. On this host vmm-linux runs on a "
        "software-emulated KVM while QEMU runs on " + str(rep.get("qemu", {}).get("accel"))
        + "; the vmm-linux/qemu-linux ratio then reflects the environment, not the VMMs."
        if host["kvm_is_software_emulated"] else
        "Ratios of medians of first-serial-byte latency.")
    rep["elapsed_s"] = time.perf_counter() - t_start
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(rep, f, indent=2)
        f.write("\n")
    print_report(rep)
    print(f"JSON: {a.out}  (total {rep['elapsed_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"startup.py: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        _kill_all_children()
        print("startup.py: interrupted; child processes killed", file=sys.stderr)
        sys.exit(130)
    finally:
        _kill_all_children()
