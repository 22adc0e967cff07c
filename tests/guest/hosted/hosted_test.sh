#!/bin/bash
# Logic tests of the guests compiled for the host (see hosted/shim.c). Not a substitute for
# running them under the VMM.
set -u
dir="${TEST_SRCDIR}/${TEST_WORKSPACE}/tests/guest"
pass=0
fail=0

# expect NAME NCPUS ARGS STATUS [REGEX...]: runs, checks exit status and that each REGEX matches
# a whole output line.
expect() {
  local name="$1" ncpus="$2" args="$3" want="$4"
  shift 4
  local out rc ok=1
  out=$("$dir/${name}_hosted" "$ncpus" "$args" 2>&1)
  rc=$?
  if [[ $rc -ne $want ]]; then
    echo "FAIL $name ncpus=$ncpus args='$args': exit $rc, want $want"
    ok=0
  fi
  for re in "$@"; do
    if ! grep -qxE -- "$re" <<<"$out"; then
      echo "FAIL $name ncpus=$ncpus args='$args': no line matching /$re/"
      ok=0
    fi
  done
  if [[ $ok -eq 1 ]]; then
    pass=$((pass + 1))
  else
    fail=$((fail + 1))
    echo "--- output:"
    echo "$out" | head -40
    echo "---"
  fi
}

# count NAME NCPUS ARGS REGEX N: exactly N lines match REGEX
count() {
  local name="$1" ncpus="$2" args="$3" re="$4" want="$5" got
  got=$("$dir/${name}_hosted" "$ncpus" "$args" 2>&1 | grep -cxE -- "$re")
  if [[ $got -eq $want ]]; then
    pass=$((pass + 1))
  else
    echo "FAIL $name ncpus=$ncpus args='$args': $got lines match /$re/, want $want"
    fail=$((fail + 1))
  fi
}

expect hello 1 "" 0 "hello from guest"
expect hello 4 "" 0 "hello from guest"
count hello 4 "" ".*" 1

expect smp 1 "" 0 "cpu 0 count 1000" "smp ok ncpus=1"
expect smp 64 "iters=500" 0 "cpu 63 count 500" "cpu 0 count 500" "smp ok ncpus=64"
count smp 7 "iters=3" "cpu [0-6] count 3" 7
expect smp 65 "" 63 "guest: unsupported vCPU configuration .*"

expect memwalk 1 "mib=1 gens=3" 0 "memwalk gen=1 ok" "memwalk gen=3 ok" "memwalk done gens=3"
expect memwalk 3 "mib=2 gens=5 base_mib=20" 0 "memwalk gen=5 ok" "memwalk done gens=5"
count memwalk 4 "mib=1 gens=4" "memwalk gen=[0-9]+ ok" 4
# More vCPUs than pages: some own nothing.
expect memwalk 8 "mib=1 gens=2 base_mib=63" 0 "memwalk done gens=2"
expect memwalk 2 "mib=64 gens=1" 4 "memwalk: region .* does not fit .*"
expect memwalk 2 "mib=1 base_mib=1 gens=1" 4 "memwalk: region .* does not fit .*"
HOSTED_FILL=1 expect memwalk 2 "mib=1 gens=2" 3 \
  "memwalk FAIL cpu=[01] pfn=0x10[0-9a-f]{2} gen=1 expected 0x0{16},0x0{16},0x0{16},0x0{16} got 0xa5a5a5a5a5a5a5a5,.*"
# Forever mode keeps going until the harness stops it (timeout exit 97 after 20 s is too slow:
# just check that it passes many generations quickly).
out=$(timeout 2 "$dir/memwalk_hosted" 2 "mib=1" 2>&1 | grep -c "^memwalk gen=[0-9]* ok$")
if [[ $out -ge 50 ]]; then pass=$((pass + 1)); else echo "FAIL memwalk forever: $out gens"; fail=$((fail + 1)); fi

expect fault 1 "mode=panic" 200 "guest panic: cpu=0 deliberate" "PVPANIC"
expect fault 2 "mode=triple" 201 "TRIPLE"
expect fault 2 "mode=exit status=17" 17
expect fault 1 "mode=exit" 0
expect fault 1 "" 5 "fault: unknown mode.*"
expect pciscan 1 "" 2 "pciscan done 0"
expect fault 1 "mode=panicky" 5
# The virtio guests find no PCI device hosted (empty bus): their argument parsing and the
# "no device" exits are what can be checked here; the drivers themselves run under KVM
# (//tests/integration).
expect virtiorng 1 "" 10
expect virtioblk 1 "" 31 "virtio-blk FAIL no virtio-blk device disk=0"
expect virtioblk 1 "disk=2" 31 "virtio-blk FAIL no virtio-blk device disk=2"
expect virtioblk 1 "read=5:zz" 30 "virtio-blk FAIL bad read=.*"
expect virtioblk 1 "write=7" 30 "virtio-blk FAIL bad write=.*"
# balloonhint: without a device only argument parsing, the "no device" exit and the nohint
# baseline (fill + keep-region generations, and the checker catching a flipped word) run here;
# the hinting protocol runs under KVM (//tests/integration:balloon_hint_test).
expect balloonhint 1 "" 51 "balloonhint start mib=48 keep=4 base_mib=16 chunk_kib=4096 reuse=0" \
  "balloonhint FAIL no virtio-balloon device"
expect balloonhint 2 "mib=8 keep=2 gens=3 nohint" 0 "balloonhint filled mib=8 free_mib=6" \
  "balloonhint gen=3 ok" "balloonhint finished gens=3"
count balloonhint 1 "mib=4 keep=4 gens=5 nohint" "balloonhint gen=[0-9]+ ok" 5
expect balloonhint 1 "nohint mib=8 keep=2 corrupt=2" 58 "balloonhint gen=2 ok" \
  "balloonhint FAIL pfn=0x1000 gen=3 expected 0x42414c48494e4400,0x0{15}2,.* got 0x42414c48494e4400,0x0{15}3,.*"
expect balloonhint 1 "keep=49" 50 "balloonhint FAIL bad args .*"
expect balloonhint 1 "mib=0" 50 "balloonhint FAIL bad args .*"
expect balloonhint 1 "chunk_kib=6" 50 "balloonhint FAIL bad args .*"
expect balloonhint 1 "chunk_kib=2097152" 50 "balloonhint FAIL bad args .*"
expect balloonhint 1 "base_mib=8 mib=4 nohint" 50 "balloonhint FAIL bad args .*"
expect balloonhint 1 "mib=49 nohint" 50 "balloonhint FAIL region \[0x1000000, 0x4100000\) not in RAM .*"

echo "$pass passed, $fail failed"
[[ $fail -eq 0 ]]
