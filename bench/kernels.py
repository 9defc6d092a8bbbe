"""Binary GEMM and binary conv kernels against torch float32, 1 thread and all threads.

    .venv/bin/python bench/kernels.py [--repeats 7]

GEMM: M=256, N=K=4096 (C = A B^T over +-1 values); conv: 256 -> 256
channels, 3x3, 14x14, padding 1, batch 1 (XNOR-Net's example layer). Each
figure is the best of ``--repeats`` timed runs after a warm-up; the machine
may be shared, so the best run is the one least disturbed. Bit-MACs per
cycle use the nominal clock from /proc/cpuinfo (``--ghz`` overrides).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
import torch.nn.functional as F

from lowbit.runtime import BinaryConv2d, available_kernels, binary_gemm, pack_signs
from timing import best  # bench/timing.py

PEAK_BIT_MACS_PER_CYCLE = 340


def clock_ghz() -> float:
    try:
        with open("/proc/cpuinfo") as f:
            mhz = [float(line.split(":")[1]) for line in f if line.startswith("cpu MHz")]
        return mhz[0] / 1000 if mhz else 0.0
    except OSError:
        return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--ghz", type=float, default=clock_ghz())
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    rng = np.random.default_rng(0)
    m, n, k = 256, 4096, 4096
    a32, b32 = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((n, k)).astype(np.float32)
    a, b = pack_signs(a32), pack_signs(b32)
    ta, tb = torch.from_numpy(a32), torch.from_numpy(b32).T.contiguous()
    x = rng.standard_normal((1, 256, 14, 14)).astype(np.float32)
    w = rng.standard_normal((256, 256, 3, 3)).astype(np.float32)
    conv = BinaryConv2d(w, 1, 1)
    tx, tw = torch.from_numpy(x), torch.from_numpy(w)
    kernels = [k_ for k_ in available_kernels() if k_ != "numpy"]
    print(f"kernels: {kernels}; cores: {cores}; clock {args.ghz:.2f} GHz; torch {torch.__version__}")
    for threads in (1, cores):
        torch.set_num_threads(threads)
        t_mm = best(lambda: ta @ tb, args.repeats)
        t_conv = best(lambda: F.conv2d(tx, tw, padding=1), args.repeats)
        print(f"\n{threads} thread(s): torch float32 matmul {t_mm * 1e3:.2f} ms, conv2d {t_conv * 1e3:.3f} ms")
        for kernel in kernels:
            t_g = best(lambda: binary_gemm(a, b, k, kernel=kernel, threads=threads), args.repeats)
            t_c = best(lambda: conv(x, kernel=kernel, threads=threads), args.repeats)
            rate = m * n * k / t_g
            per_cycle = rate / (args.ghz * 1e9 * threads) if args.ghz else float("nan")
            print(f"  {kernel:7s} gemm {t_g * 1e3:7.2f} ms  {t_mm / t_g:5.1f}x  {rate / 1e9:6.0f} Gbit-MAC/s  "
                  f"{per_cycle:5.0f} bit-MAC/cycle/core ({100 * per_cycle / PEAK_BIT_MACS_PER_CYCLE:.0f}% of "
                  f"{PEAK_BIT_MACS_PER_CYCLE})   conv {t_c * 1e3:6.3f} ms  {t_conv / t_c:5.1f}x")


if __name__ == "__main__":
    main()
