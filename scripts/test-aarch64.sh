#!/usr/bin/env bash
# Cross-compile the native kernels for aarch64 (NEON) and run their self-test under qemu-user.
# Needs Debian's cross compiler and qemu:  apt-get install -y g++-aarch64-linux-gnu qemu-user
# Not part of CI; record the result in docs/benchmarks.md ("Native runtime").
set -euo pipefail
cd "$(dirname "$0")/.."
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
src=src/lowbit/_native
aarch64-linux-gnu-g++ -std=c++17 -O2 -fopenmp -ffp-contract=off -static -I"$src" "$src/kernels.cpp" "$src/selftest.cpp" -o "$out/selftest"
qemu-aarch64 "$out/selftest"
# the same driver natively, as a control
g++ -std=c++17 -O2 -fopenmp -ffp-contract=off -I"$src" "$src/kernels.cpp" "$src/selftest.cpp" -o "$out/selftest-host"
"$out/selftest-host"
