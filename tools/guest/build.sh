#!/usr/bin/env bash
# Builds the microvmm test guest: a minimal Linux kernel (bzImage + stripped
# vmlinux with the PVH ELF note) and a busybox initramfs, from Debian packages
# only (no downloads beyond apt). Run `tools/guest/build.sh --help`.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
FRAGMENT="$SCRIPT_DIR/kernel.config"
INIT_SCRIPT="$SCRIPT_DIR/init.sh"
SELF="$SCRIPT_DIR/$(basename "${BASH_SOURCE[0]}")"

LINUX_SOURCE_PKG="linux-source-6.1"
PACKAGES=(
	"$LINUX_SOURCE_PKG" bc bison flex libelf-dev libssl-dev build-essential
	cpio busybox-static xz-utils lz4
)
OUTPUTS=(bzImage vmlinux initramfs.cpio.gz config)

CACHE_DIR="${MICROVMM_GUEST_DIR:-${HOME:-/root}/.cache/microvmm/guest}"

usage() {
	cat <<EOF
Usage: tools/guest/build.sh [--force] [--verbose] [--help]

Builds the Linux guest used by microvmm's guest tests, from Debian packages only:
  * a minimal kernel from the $LINUX_SOURCE_PKG package: make tinyconfig +
    kvm_guest.config + tools/guest/kernel.config (everything built in), then
    make olddefconfig; every option of the fragment is checked to have survived;
  * an initramfs with busybox-static and tools/guest/init.sh as /init.

Missing build packages are installed with apt-get (needs root):
  ${PACKAGES[*]}

Outputs, in \$MICROVMM_GUEST_DIR (default ~/.cache/microvmm/guest), now:
  $CACHE_DIR
    bzImage            compressed kernel (Linux boot protocol)
    vmlinux            stripped ELF kernel, has the PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)
    initramfs.cpio.gz  busybox initramfs, /init = tools/guest/init.sh
    config             the kernel's final .config
    stamp              hash of kernel.config, build.sh, init.sh and the package versions
    build.log          log of the last build

If the stamp matches, nothing is rebuilt and the script exits at once. The build
(~5 min on 2 cores) runs in a temporary directory under the cache directory; the
unpacked kernel source is removed afterwards.

Guest kernel command line: console=ttyS0 [mode=poweroff|shell]. /init prints
MICROVMM-INIT-OK, lists /sys/bus/virtio/devices, then powers off (mode=poweroff),
starts a shell (mode=shell) or, by default, does reboot -f (i8042 reset).
Under QEMU TCG microvm also pass tsc_early_khz=2000000.

Options:
  -f, --force     rebuild even if the cached images are up to date
  -v, --verbose   show the kernel build output (otherwise only in build.log)
  -h, --help      show this help
EOF
}

FORCE=0
VERBOSE=0
while [[ $# -gt 0 ]]; do
	case "$1" in
	-h | --help) usage; exit 0 ;;
	-f | --force) FORCE=1 ;;
	-v | --verbose) VERBOSE=1 ;;
	*) echo "build.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
	esac
	shift
done

log() { echo "[guest] $*"; }
die() { echo "[guest] ERROR: $*" >&2; exit 1; }

pkg_installed() {
	[[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null || true)" == installed ]]
}

pkg_version() {
	dpkg-query -W -f='${Version}' "$1" 2>/dev/null || echo "not-installed"
}

stamp_hash() {
	{
		echo "== kernel.config"; cat "$FRAGMENT"
		echo "== build.sh"; cat "$SELF"
		echo "== init.sh"; cat "$INIT_SCRIPT"
		echo "== $LINUX_SOURCE_PKG $(pkg_version "$LINUX_SOURCE_PKG")"
		echo "== busybox-static $(pkg_version busybox-static)"
	} | sha256sum | cut -d' ' -f1
}

cache_valid() {
	local f
	[[ -f "$CACHE_DIR/stamp" ]] || return 1
	[[ "$(head -n1 "$CACHE_DIR/stamp")" == "$(stamp_hash)" ]] || return 1
	for f in "${OUTPUTS[@]}"; do
		[[ -s "$CACHE_DIR/$f" ]] || return 1
	done
}

report_ready() {
	local f
	for f in "${OUTPUTS[@]}"; do
		printf '[guest]   %-18s %s bytes\n' "$f" "$(stat -c %s "$CACHE_DIR/$f")"
	done
	echo "guest images ready in $CACHE_DIR"
}

[[ -f "$FRAGMENT" ]] || die "missing $FRAGMENT"
[[ -f "$INIT_SCRIPT" ]] || die "missing $INIT_SCRIPT"

# Fast path: up to date (no lock, no package work).
if [[ $FORCE -eq 0 ]] && cache_valid; then
	log "cached images are up to date (stamp $(head -c 12 "$CACHE_DIR/stamp"))"
	report_ready
	exit 0
fi

[[ "$(uname -m)" == x86_64 ]] || die "only x86_64 hosts are supported (no cross-compiling)"

mkdir -p "$CACHE_DIR"
# One build at a time per cache directory.
exec 9>"$CACHE_DIR/.lock"
if ! flock -n 9; then
	log "another build holds $CACHE_DIR/.lock, waiting"
	flock 9
fi
if [[ $FORCE -eq 0 ]] && cache_valid; then
	log "cached images were built by a concurrent run"
	report_ready
	exit 0
fi

# --- packages -------------------------------------------------------------------
missing=()
for p in "${PACKAGES[@]}"; do
	pkg_installed "$p" || missing+=("$p")
done
if [[ ${#missing[@]} -gt 0 ]]; then
	[[ "$(id -u)" -eq 0 ]] || die "missing packages (install them as root): ${missing[*]}"
	log "installing missing packages: ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	if ! apt-get install -y --no-install-recommends "${missing[@]}"; then
		apt-get update
		apt-get install -y --no-install-recommends "${missing[@]}"
	fi
fi

TARBALL="$(dpkg-query -L "$LINUX_SOURCE_PKG" | grep -E '^/usr/src/linux-source-[^/]*\.tar\.(xz|bz2|gz)$' | head -n1 || true)"
[[ -n "$TARBALL" && -f "$TARBALL" ]] || die "no kernel source tarball found in package $LINUX_SOURCE_PKG"
BUSYBOX=/bin/busybox
[[ -x "$BUSYBOX" ]] || die "$BUSYBOX missing (package busybox-static)"
if readelf -l "$BUSYBOX" | grep -q 'program interpreter'; then
	die "$BUSYBOX is dynamically linked: install busybox-static"
fi

HASH="$(stamp_hash)"
LOG="$CACHE_DIR/build.log"
: >"$LOG"

# Runs a command with its output going to the build log (and the terminal with --verbose).
run() {
	echo "+ $*" >>"$LOG"
	local rc=0
	if [[ $VERBOSE -eq 1 ]]; then
		"$@" 2>&1 | tee -a "$LOG" || rc=$?
	else
		"$@" >>"$LOG" 2>&1 || rc=$?
	fi
	if [[ $rc -ne 0 ]]; then
		echo "[guest] ERROR: command failed (exit $rc): $*" >&2
		echo "[guest] last lines of $LOG:" >&2
		tail -n 40 "$LOG" >&2
		exit 1
	fi
}

# --- work directory ---------------------------------------------------------------
# Leftovers of runs that were killed (we hold the lock, so none is active).
rm -rf "$CACHE_DIR"/build.*
WORK="$(mktemp -d "$CACHE_DIR/build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
OUT="$WORK/out"
mkdir -p "$OUT"
START=$SECONDS

# --- kernel ----------------------------------------------------------------------
log "unpacking $TARBALL ($LINUX_SOURCE_PKG $(pkg_version "$LINUX_SOURCE_PKG"))"
mkdir -p "$WORK/src"
tar -xf "$TARBALL" -C "$WORK/src"
SRC="$(find "$WORK/src" -mindepth 1 -maxdepth 1 -type d | head -n1)"
[[ -f "$SRC/Makefile" ]] || die "unexpected layout of $TARBALL"

unset KCONFIG_CONFIG KBUILD_OUTPUT O CROSS_COMPILE
MAKE=(make -C "$SRC" ARCH=x86 KBUILD_BUILD_USER=microvmm KBUILD_BUILD_HOST=microvmm)

log "configuring: tinyconfig + kvm_guest.config + $(basename "$FRAGMENT")"
KVM_GUEST_CONFIG=""
for c in kernel/configs/kvm_guest.config arch/x86/configs/kvm_guest.config; do
	if [[ -f "$SRC/$c" ]]; then KVM_GUEST_CONFIG="$SRC/$c"; break; fi
done
[[ -n "$KVM_GUEST_CONFIG" ]] || die "kvm_guest.config not found in the kernel source"
run "${MAKE[@]}" tinyconfig
(cd "$SRC" && run env ARCH=x86 scripts/kconfig/merge_config.sh -m .config "$KVM_GUEST_CONFIG" "$FRAGMENT")
run "${MAKE[@]}" olddefconfig

# Kconfig silently drops options whose dependencies are not met: check that every
# option of the fragment ended up in .config with the value asked for.
dropped=()
while IFS= read -r line; do
	if [[ "$line" =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
		sym="${BASH_REMATCH[1]}"
		want="${BASH_REMATCH[2]}"
		grep -qxF "$line" "$SRC/.config" && continue
	elif [[ "$line" =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
		sym="${BASH_REMATCH[1]}"
		want="not set"
		grep -q "^$sym=" "$SRC/.config" || continue
	else
		continue
	fi
	got="$(grep -E "^$sym=" "$SRC/.config" | head -n1 | cut -d= -f2- || true)"
	if [[ -z "$got" ]]; then
		if grep -qxF "# $sym is not set" "$SRC/.config"; then
			got="not set"
		else
			got="absent (dependencies not met, or no such option)"
		fi
	fi
	dropped+=("$sym: wanted $want, got $got")
done <"$FRAGMENT"
if [[ ${#dropped[@]} -gt 0 ]]; then
	cp "$SRC/.config" "$CACHE_DIR/config.rejected"
	{
		echo "[guest] ERROR: ${#dropped[@]} option(s) of $FRAGMENT did not survive make olddefconfig:"
		printf '[guest]   %s\n' "${dropped[@]}"
		echo "[guest] add the missing dependencies to the fragment; resulting config: $CACHE_DIR/config.rejected"
	} >&2
	exit 1
fi
rm -f "$CACHE_DIR/config.rejected"
log "config check passed: all $(grep -cE '^(CONFIG_|# CONFIG_.* is not set$)' "$FRAGMENT") fragment options are in .config"

log "building bzImage + vmlinux with make -j$(nproc) (log: $LOG)"
KSTART=$SECONDS
run "${MAKE[@]}" -j"$(nproc)" bzImage vmlinux
log "kernel built in $((SECONDS - KSTART)) s"

cp "$SRC/arch/x86/boot/bzImage" "$OUT/bzImage"
strip --strip-all -o "$OUT/vmlinux" "$SRC/vmlinux"
cp "$SRC/.config" "$OUT/config"
# PVH entry point: ELF note owner "Xen", type 0x12 (XEN_ELFNOTE_PHYS32_ENTRY).
if ! readelf -n "$OUT/vmlinux" | grep -E '^\s*Xen\s' | grep -qE '0x0*12\b|PHYS32_ENTRY|\(0x00000012\)'; then
	readelf -n "$OUT/vmlinux" >&2 || true
	die "stripped vmlinux has no PVH entry note (Xen, type 0x12)"
fi

# The unpacked source and objects are ~2 GB: drop them before packing the initramfs.
rm -rf "$WORK/src"
log "kernel images checked (PVH note present), source tree removed"

# --- initramfs --------------------------------------------------------------------
log "building initramfs (busybox-static $(pkg_version busybox-static))"
ROOT="$WORK/initramfs"
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,tmp,run,root,etc}
install -m 0755 "$BUSYBOX" "$ROOT/bin/busybox"
if "$BUSYBOX" --list-full >/dev/null 2>&1; then
	applets="$("$BUSYBOX" --list-full)"
else
	applets="$("$BUSYBOX" --list | sed 's|^|bin/|')"
fi
while IFS= read -r applet; do
	[[ -n "$applet" && "$applet" != bin/busybox ]] || continue
	mkdir -p "$ROOT/$(dirname "$applet")"
	ln -sfn /bin/busybox "$ROOT/$applet"
done <<<"$applets"
[[ -L "$ROOT/bin/sh" ]] || die "busybox has no sh applet"
install -m 0755 "$INIT_SCRIPT" "$ROOT/init"
# The kernel opens /dev/console of the initramfs before /init runs.
if ! { mknod -m 0600 "$ROOT/dev/console" c 5 1 && mknod -m 0666 "$ROOT/dev/null" c 1 3; }; then
	log "warning: cannot create device nodes (not root?): no console until /init mounts devtmpfs"
fi
find "$ROOT" -exec touch -h -d @0 {} +
(cd "$ROOT" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
	cpio --null --quiet -o -H newc --owner=0:0 --reproducible) | gzip -9 -n >"$OUT/initramfs.cpio.gz"

# --- install into the cache ---------------------------------------------------------
# Each file is renamed into place (same filesystem: atomic); the stamp goes first
# and comes back last, so a valid stamp always means a complete, matching set.
rm -f "$CACHE_DIR/stamp"
for f in "${OUTPUTS[@]}"; do
	mv -f "$OUT/$f" "$CACHE_DIR/$f"
done
{
	echo "$HASH"
	echo "$LINUX_SOURCE_PKG $(pkg_version "$LINUX_SOURCE_PKG")"
	echo "busybox-static $(pkg_version busybox-static)"
	echo "kernel $(grep -m1 -oE 'Linux/x86 [^ ]+' "$CACHE_DIR/config" | cut -d' ' -f2 || true)"
	echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) in $((SECONDS - START)) s"
} >"$WORK/stamp"
mv -f "$WORK/stamp" "$CACHE_DIR/stamp"
rm -rf "$WORK"
trap - EXIT

log "done in $((SECONDS - START)) s"
report_ready
