#!/usr/bin/env bash
# Runs the whole test suite (bazel test //...) and prints "N passed, N failed, N skipped",
# counted per test case from the JUnit XML each test target writes.
# Extra arguments are passed to bazel test (e.g. a target pattern instead of //...).
set -uo pipefail
cd "$(dirname "$0")/.."

export MICROVMM_GUEST_DIR="${MICROVMM_GUEST_DIR:-$HOME/.cache/microvmm/guest}"
targets=("$@")
((${#targets[@]})) || targets=(//...)

bazel test --test_env=MICROVMM_GUEST_DIR="$MICROVMM_GUEST_DIR" "${targets[@]}"
bazel_status=$?

# Every test target the patterns cover, and where its results are.
# (manual-tagged tests are not run by `bazel test //...`, so they are not counted either)
q="tests(set(${targets[*]}))"
mapfile -t tests < <(bazel query "$q except attr(tags, 'manual', $q)" 2>/dev/null)
python3 tools/count_tests.py "$(bazel info bazel-testlogs 2>/dev/null)" "${tests[@]}"
count_status=$?

if ((bazel_status != 0 || count_status != 0)); then
  exit 1
fi
exit 0
