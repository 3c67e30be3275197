"""Matmul paths at the shapes that matter for MoE decode and prefill: torch (MKL) vs moeflow's
native kernel, fp32 and bf16 weights, 1 and 4 activation rows.

    python bench/bench_kernels.py [--threads 2] [--reps 15]

Prints weight-read GB/s (median of --reps) next to a memory-bandwidth probe from the same run,
for one large matrix (no call overhead) and for 128 expert-sized [1024, 1024] matrices; then,
for bf16 weights at 16-128 rows (a batched decode step), moeflow's `linear` (native passes of 15
rows) against upcasting the weight to fp32 for MKL, the path it replaced."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moeflow.kernels import native, native_linear  # noqa: E402
from moeflow.layers.linear import linear  # noqa: E402

from membw import probe_samples  # noqa: E402


def median_s(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def row(label: str, nbytes: int, reps: int, torch_fn, native_fn) -> str:
    t_torch, t_native = median_s(torch_fn, reps), median_s(native_fn, reps)
    return (
        f"| {label} | {nbytes / t_torch / 1e9:.1f} | {nbytes / t_native / 1e9:.1f} | "
        f"{t_torch / t_native:.2f}x |"
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if native() is None:
        raise SystemExit("native kernel unavailable on this machine")
    bw = statistics.median(probe_samples())
    print(f"memory bandwidth probe: {bw:.1f} GB/s\n")
    print("| case | torch GB/s | native GB/s | native speed-up |")
    print("|---|---|---|---|")
    for dt in (torch.float32, torch.bfloat16):
        name = "fp32" if dt == torch.float32 else "bf16"
        big = torch.randn(65536, 1024).to(dt)
        small = [torch.randn(1024, 1024).to(dt) for _ in range(128)]
        for m in (1, 4):
            x = torch.randn(m, 1024).to(dt)
            print(
                row(
                    f"{name} M={m}, one 65536x1024",
                    big.numel() * big.element_size(),
                    a.reps,
                    lambda x=x, big=big: F.linear(x, big),
                    lambda x=x, big=big: native_linear(x, big),
                )
            )
            nbytes = sum(w.numel() * w.element_size() for w in small)
            print(
                row(
                    f"{name} M={m}, 128 x 1024x1024",
                    nbytes,
                    a.reps,
                    lambda x=x, s=small: [F.linear(x, w) for w in s],
                    lambda x=x, s=small: [native_linear(x, w) for w in s],
                )
            )
    print("\n| bf16 [32000, 2048] (an lm_head) | upcast + MKL ms | moeflow linear ms | speed-up |")
    print("|---|---|---|---|")
    w = torch.randn(32000, 2048).to(torch.bfloat16)
    for m in (16, 32, 64, 128):
        x = torch.randn(m, 2048).to(torch.bfloat16)
        t_up = median_s(lambda x=x: F.linear(x.float(), w.float()).to(x.dtype), a.reps)
        t_ours = median_s(lambda x=x: linear(x, w), a.reps)
        print(f"| {m} rows | {t_up * 1e3:.1f} | {t_ours * 1e3:.1f} | {t_up / t_ours:.2f}x |")
    print(f"\nmemory bandwidth probe after: {statistics.median(probe_samples()):.1f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
