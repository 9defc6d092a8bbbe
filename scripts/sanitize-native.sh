#!/usr/bin/env bash
# Run the native kernels under AddressSanitizer and UndefinedBehaviorSanitizer.
#
# Builds lowbit._native._kernels once with -fsanitize=address,undefined (through setup.py, into a temporary
# copy of the package, so the working tree's build is left alone), then runs the native self-test
# (src/lowbit/_native/selftest.cpp, built with the same flags) and tests/test_native.py against that build.
# Any sanitizer report aborts the run; exit status 0 when everything passes.
#
#   scripts/sanitize-native.sh                 # from anywhere; extra arguments go to pytest, e.g. -k geometry
#   PYTHON=/path/to/python scripts/sanitize-native.sh
#
# Needs g++ with libasan and libubsan (Debian: g++). Python itself is not built with ASan, so libasan is
# preloaded (LD_PRELOAD) and leak detection is off (it would report CPython's and torch's own allocations).
# Slow (about a minute, several times the plain tests): not part of the test suite, not run in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# -fno-wrapv: Python's own CFLAGS carry -fwrapv, which would turn the signed-overflow checks off
sanitize="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-wrapv -fno-omit-frame-pointer -g"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:detect_stack_use_after_return=0"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
src=src/lowbit/_native

echo "== native self-test (ASan + UBSan)"
g++ -std=c++17 -O1 -fopenmp -ffp-contract=off $sanitize -I"$src" "$src/kernels.cpp" "$src/selftest.cpp" \
    -o "$work/selftest"
"$work/selftest"

echo "== extension module (ASan + UBSan)"
mkdir -p "$work/lib"
cp -r src/lowbit "$work/lib/lowbit"
find "$work/lib/lowbit" \( -name '*.so' -o -name '__pycache__' \) -prune -exec rm -rf {} +
# setup.py marks the extension optional: a failed compile only warns, so the built file is checked below
# (C++ sources take CXXFLAGS with recent setuptools, CFLAGS with older ones)
CFLAGS="$sanitize" CXXFLAGS="$sanitize" LDFLAGS="-fsanitize=address,undefined" \
    "$python" setup.py -q build_ext --build-lib "$work/lib" --build-temp "$work/tmp" >"$work/build.log" 2>&1 ||
    { cat "$work/build.log"; exit 1; }
so="$(ls "$work"/lib/lowbit/_native/_kernels*.so 2>/dev/null || true)"
[ -z "$so" ] || nm -D "$so" >"$work/symbols"
if [ -z "$so" ] || ! grep -q __asan_report_load "$work/symbols" || ! grep -q __ubsan_handle "$work/symbols"; then
    cat "$work/build.log"
    echo "sanitize-native: the extension did not build with the sanitizers" >&2
    exit 1
fi

libasan="$(g++ -print-file-name=libasan.so)"
export LD_PRELOAD="$libasan${LD_PRELOAD:+:$LD_PRELOAD}"
export PYTHONPATH="$work/lib${PYTHONPATH:+:$PYTHONPATH}"
"$python" - "$work" <<'EOF'
import sys
from lowbit.runtime import kernels
assert kernels.native is not None and kernels.native.__file__.startswith(sys.argv[1]), kernels.native
print("sanitized module:", kernels.native.__file__, "kernels:", ", ".join(kernels.available_kernels()))
EOF

echo "== tests/test_native.py on the sanitized module"
# --capture=sys: a sanitizer's report (written to file descriptor 2) reaches the terminal before the abort
"$python" -m pytest -q -x -p no:cacheprovider --capture=sys tests/test_native.py "$@"
echo "sanitize-native: OK"
