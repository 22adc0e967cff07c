#!/usr/bin/env bash
# Installs everything the project needs on Debian 12 (as root) and builds the guest images.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  # build: Bazel 4 + system libraries (see ../shared/docs/bazel-offline.md)
  bazel-bootstrap libabsl-dev libgrpc++-dev protobuf-compiler protobuf-compiler-grpc
  libprotobuf-dev liburing-dev libzstd-dev liblz4-dev libgtest-dev libgmock-dev pkg-config build-essential
  # guest kernel + initramfs (tools/guest/build.sh)
  linux-source-6.1 bc bison flex libelf-dev libssl-dev cpio busybox-static xz-utils lz4
  # tests and benchmarks
  python3 iproute2 qemu-system-x86 procps
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "setup: need root to install: ${missing[*]}" >&2
    exit 1
  fi
  echo "setup: installing ${#missing[@]} packages: ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "setup: all ${#PACKAGES[@]} packages present"
fi

if [[ ! -e /dev/kvm ]]; then
  echo "setup: WARNING: /dev/kvm is missing: KVM tests will be SKIPPED and the demo cannot boot a VM" >&2
fi

tools/guest/build.sh
echo "setup: done"
