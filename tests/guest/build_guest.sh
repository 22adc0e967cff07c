#!/bin/bash
# Builds one freestanding test guest with the host gcc and checks the result.
# Usage: build_guest.sh OUT.elf OUT.bin LINK.ld SRC...
set -euo pipefail
elf="$1"; bin="$2"; ld_script="$3"; shift 3

gcc -std=gnu11 -O2 -g -Wall -Wextra -Werror \
  -ffreestanding -fno-builtin -nostdlib -nostartfiles -static -fno-pic -fno-pie -no-pie \
  -mcmodel=small -mno-red-zone -mgeneral-regs-only -mno-sse -mno-mmx -mno-avx -mno-3dnow \
  -fno-stack-protector -fno-asynchronous-unwind-tables -fno-unwind-tables -fcf-protection=none \
  -fno-tree-loop-distribute-patterns \
  -Wl,-T,"$ld_script" -Wl,--build-id=none -Wl,-z,max-page-size=4096 -Wl,-z,noexecstack \
  -Wl,--no-warn-rwx-segments \
  -o "$elf" "$@"
objcopy -O binary "$elf" "$bin"

fail() { echo "build_guest.sh: $elf: $*" >&2; exit 1; }
start=$(nm -P "$elf" | awk '$1 == "_start" { print $3 }')
[[ -n "$start" && $((16#$start)) -eq $((0x100000)) ]] || fail "_start is at 0x$start, not 0x100000"
end=$(nm -P "$elf" | awk '$1 == "__bss_end" { print $3 }')
[[ -n "$end" && $((16#$end)) -le $((0x800000)) ]] || fail "__bss_end 0x$end missing or above 8 MiB"
size=$(stat -c %s "$bin")
[[ $size -gt 0 && $((0x100000 + size)) -le $((16#$end)) ]] || fail "flat binary size $size"
# No SSE/MMX/AVX register may be touched (the guest has no FP state set up).
if objdump -d "$elf" | grep -E '%(x|y|z)mm[0-9]|%mm[0-7]' >&2; then
  fail "uses SSE/MMX/AVX registers"
fi
