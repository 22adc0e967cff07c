#!/bin/sh
# /init of the microvmm test guest's initramfs (busybox ash).
# Built into the initramfs by tools/guest/build.sh.
#
# Prints the marker line MICROVMM-INIT-OK on the console, lists the virtio
# devices the kernel found, then acts on `mode=` from the kernel command line
# (unknown key=value parameters land in init's environment):
#   mode=poweroff  poweroff -f
#   mode=shell     interactive shell on the console (reboot -f when it exits)
#   (default)      reboot -f   (the microvmm VMM exits 0 on an i8042 reset)

export PATH=/bin:/sbin:/usr/bin:/usr/sbin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
# CONFIG_DEVTMPFS_MOUNT does not apply to an initramfs root: mount it here.
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /tmp /run
mount -t tmpfs tmpfs /tmp 2>/dev/null

# The kernel opened /dev/console from the initramfs; make sure we use it.
if [ -c /dev/console ]; then
	exec </dev/console >/dev/console 2>&1
fi

# Fall back to /proc/cmdline if `mode` did not come through the environment.
if [ -z "${mode:-}" ]; then
	for arg in $(cat /proc/cmdline); do
		case "$arg" in
		mode=*) mode="${arg#mode=}" ;;
		esac
	done
fi
mode="${mode:-reboot}"

echo "MICROVMM-INIT-OK"
echo "init: kernel $(uname -r), uptime $(cut -d' ' -f1 /proc/uptime) s, cpus online $(cat /sys/devices/system/cpu/online), mode=$mode"

virtio_name() {
	case "$(($1))" in
	1) echo net ;; 2) echo block ;; 3) echo console ;; 4) echo rng ;;
	5) echo balloon ;; 9) echo 9p ;; 16) echo gpu ;; 18) echo input ;;
	19) echo vsock ;; *) echo unknown ;;
	esac
}

n=0
for dev in /sys/bus/virtio/devices/*; do
	[ -e "$dev" ] || continue
	id="$(cat "$dev/device")"
	vendor="$(cat "$dev/vendor")"
	driver=none
	if [ -L "$dev/driver" ]; then
		driver="$(basename "$(readlink "$dev/driver")")"
	fi
	transport="$(basename "$(readlink -f "$dev/..")")"
	echo "virtio: ${dev##*/} device=$id ($(virtio_name "$id")) vendor=$vendor driver=$driver bus=$transport"
	n=$((n + 1))
done
echo "virtio: $n device(s)"

case "$mode" in
poweroff)
	echo "init: poweroff"
	poweroff -f
	;;
shell)
	echo "init: starting shell (exit to reboot)"
	setsid cttyhack sh -l
	echo "init: shell exited, reboot"
	reboot -f
	;;
reboot)
	echo "init: reboot"
	reboot -f
	;;
*)
	echo "init: unknown mode '$mode', reboot"
	reboot -f
	;;
esac

# Only reached if the power-off/reset request failed: never let init exit
# (that panics the kernel).
echo "init: $mode failed, halting"
while :; do sleep 3600; done
