#!/usr/bin/env bash
# The main demo: set up, build, boot microVMs, live-migrate one between two VMM processes.
#   1. a test guest on 1 and 4 vCPUs,
#   2. a memwalk guest driven through the gRPC API (pause / resume / info / shutdown),
#   3. live migration: a memwalk guest that keeps rewriting and verifying its memory moves from
#      one VMM process to another; the figures (total time, downtime, bytes) are printed,
#   4. the Linux guest kernel, as far as this host's KVM lets it run (and why).
# Set MICROVMM_SKIP_SETUP=1 to skip tools/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

if [[ "${MICROVMM_SKIP_SETUP:-0}" != 1 ]]; then
  say "setup (tools/setup.sh)"
  tools/setup.sh
fi
GUEST_DIR="${MICROVMM_GUEST_DIR:-$HOME/.cache/microvmm/guest}"

say "build"
bazel build //vmm //api:vmmctl
VMM="$PWD/bazel-bin/vmm/vmm"
CTL="$PWD/bazel-bin/api/vmmctl"
WORK=$(mktemp -d /tmp/microvmm-demo.XXXXXX)
cleanup() {
  for p in ${VMM_PID:-} ${SRC_PID:-} ${DST_PID:-}; do kill "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

ms_since() { echo $(( ($(date +%s%N) - $1) / 1000000 )); }

say "boot the 'hello' test guest"
t0=$(date +%s%N)
"$VMM" --test-guest hello --log-level warn
echo "-> exit status $?, $(ms_since "$t0") ms from process start to exit"

say "boot the 'smp' test guest on 4 vCPUs"
"$VMM" --test-guest smp --vcpus 4 --test-guest-args iters=100000 --log-level warn

say "memwalk guest on 2 vCPUs, controlled over the gRPC API ($WORK/api.sock)"
"$VMM" --api-socket "$WORK/api.sock" --log-level warn &
VMM_PID=$!
for _ in $(seq 100); do [[ -S "$WORK/api.sock" ]] && break; sleep 0.05; done
"$CTL" --socket "$WORK/api.sock" create --test-guest memwalk --vcpus 2 --memory 64 \
  --test-guest-args "mib=8" --serial "file:$WORK/serial.log"
"$CTL" --socket "$WORK/api.sock" boot
sleep 1
"$CTL" --socket "$WORK/api.sock" pause
n1=$(grep -c "ok" "$WORK/serial.log" || true)
sleep 1
n2=$(grep -c "ok" "$WORK/serial.log" || true)
echo "paused: $n1 generations verified before, $n2 after 1 s of pause (must be equal)"
"$CTL" --socket "$WORK/api.sock" info
"$CTL" --socket "$WORK/api.sock" resume
sleep 1
n3=$(grep -c "ok" "$WORK/serial.log" || true)
echo "resumed: $n3 generations verified (guest kept going), last line: $(tail -1 "$WORK/serial.log")"
"$CTL" --socket "$WORK/api.sock" shutdown
wait "$VMM_PID" && echo "-> VMM exited with status 0"
VMM_PID=

say "live migration between two VMM processes"
"$VMM" --incoming "$WORK/dst.sock" --serial "file:$WORK/dst.log" --log-level warn &
DST_PID=$!
"$VMM" --test-guest memwalk --vcpus 2 --memory 256 --test-guest-args "mib=16" \
  --serial "file:$WORK/src.log" --api-socket "$WORK/src.sock" --log-level warn &
SRC_PID=$!
for _ in $(seq 300); do grep -q "gen=2 ok" "$WORK/src.log" 2>/dev/null && break; sleep 0.1; done
echo "source guest running: $(tail -1 "$WORK/src.log")  (memwalk rewrites + verifies 16 MiB per generation)"
"$CTL" --socket "$WORK/src.sock" migrate --to "$WORK/dst.sock"
wait "$SRC_PID" && echo "-> source VMM exited with status 0 (its VM now runs on the destination)"
SRC_PID=
last_src=$(grep -o "gen=[0-9]*" "$WORK/src.log" | tail -1)
sleep 2
echo "last generation verified on the source: ${last_src#gen=}; destination console since:"
head -3 "$WORK/dst.log" | sed 's/^/   /'
echo "   ... $(grep -c ok "$WORK/dst.log") generations verified on the destination so far"
if grep -q FAIL "$WORK/dst.log"; then echo "!! memory corruption detected"; exit 1; fi
kill "$DST_PID"; wait "$DST_PID" || true
DST_PID=

say "post-copy migration of a VM with devices (virtio-rng, virtio-blk, virtio-balloon)"
truncate -s 8M "$WORK/disk.img"
"$VMM" --incoming "$WORK/pdst.sock" --serial "file:$WORK/pdst.log" --log-level warn &
DST_PID=$!
"$VMM" --test-guest memwalk --vcpus 2 --memory 256 --test-guest-args "mib=16" --rng \
  --disk "path=$WORK/disk.img" --balloon "stats=5" \
  --serial "file:$WORK/psrc.log" --api-socket "$WORK/psrc.sock" --log-level warn &
SRC_PID=$!
for _ in $(seq 300); do grep -q "gen=2 ok" "$WORK/psrc.log" 2>/dev/null && break; sleep 0.1; done
"$CTL" --socket "$WORK/psrc.sock" info | grep -E "device:" || true
echo "switching at once (pure post-copy): the destination runs first and pulls pages per vCPU"
"$CTL" --socket "$WORK/psrc.sock" migrate --to "$WORK/pdst.sock" --postcopy
wait "$SRC_PID" && echo "-> source VMM exited with status 0"
SRC_PID=
sleep 2
echo "   $(grep -c ok "$WORK/pdst.log") generations verified on the destination so far"
if grep -q FAIL "$WORK/pdst.log"; then echo "!! memory corruption detected"; exit 1; fi
kill "$DST_PID"; wait "$DST_PID" || true
DST_PID=

say "Linux guest kernel ($GUEST_DIR)"
if grep -qwE 'vmx|svm' /proc/cpuinfo; then
  echo "host has hardware virtualization: booting to the initramfs marker"
  timeout 60 "$VMM" --kernel "$GUEST_DIR/bzImage" --initrd "$GUEST_DIR/initramfs.cpio.gz" \
    --vcpus 2 --memory 256 --cmdline "console=ttyS0 reboot=k panic=1 mode=reboot" \
    --log-level warn | tee "$WORK/linux.log"
  grep -q MICROVMM-INIT-OK "$WORK/linux.log" && echo "-> Linux reached /init"
else
  cat <<'MSG'
This host's /dev/kvm is a software (shadow-paging) KVM without VMX/SVM: it emulates guest code
at ~3 M instructions/s and a Linux guest cannot reach userspace under it (../shared/docs/machine.md).
Booting the kernel for 20 s to show how far it gets; on a real KVM host it boots to /init.
MSG
  timeout 20 "$VMM" --kernel "$GUEST_DIR/vmlinux" --initrd "$GUEST_DIR/initramfs.cpio.gz" \
    --vcpus 2 --memory 256 --log-level warn \
    --cmdline "console=ttyS0 reboot=k panic=1 noxsave nopku nopcid noinvpcid nofsgsbase mitigations=off clearcpuid=cx16,popcnt,rdrand,rdseed,smap,smep,avx,avx2,avx512f,rdpid" \
    > "$WORK/linux.log" 2>&1 || true
  echo "--- the PVH vmlinux on our VMM (first and last lines of the console):"
  head -4 "$WORK/linux.log"
  echo "   ..."
  grep -E "ACPI: (RSDP|MCFG)|Using ACPI \(MADT\)|smpboot: Allowing|console \[ttyS0\] enabled" "$WORK/linux.log" || true
  tail -4 "$WORK/linux.log"
  echo "--- ($(wc -l < "$WORK/linux.log") lines in 20 s; where it stops, the log says why)"
fi
say "done"
