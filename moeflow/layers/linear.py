"""The one matmul every weight goes through, choosing the fastest path for the shape at hand.

For fp32 weights MKL is used from two rows on: end to end its multi-row GEMM beat the native
kernel on a 32-token prefill (127 vs 152 ms, BENCHMARKS.md) although the native one wins isolated
4-row calls. A single row (decode) takes the native kernel: on an Intel host MKL's GEMV streamed
as fast (27.5 vs 28.1 GB/s), on an AMD Zen 4 host it reached 11-14 GB/s against ~30 (BENCHMARKS.md).
For 16-bit weights the native kernel is 1.2-2x faster below 16 rows (bf16 prefill 147 vs
174-217 ms), and in passes of 15 rows it stays faster up to ~100 rows; beyond, fp32 GEMM on
weights upcast per block is the better path."""

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import native_linear, usable

NATIVE_MAX_ROWS = 15  # rows of one native call
UPCAST_MIN_ROWS = 16  # bf16 GEMM at many rows is several times slower than fp32 on these CPUs
# 16-bit weights up to this many rows: native passes of 15 rows each beat upcasting the weight to
# fp32 for MKL, whose conversion alone costs several weight reads (bf16 [32000, 2048] at 16 rows:
# 28 vs 147 ms; 64 rows: 99 vs 157 ms; even at 128; bench/bench_kernels.py) — a 16-sequence
# decode step's case
NATIVE_CHUNKED_MAX_ROWS = 96


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ w [N, K]^T (+ b) in x's dtype."""
    M = x.shape[0] if x.dim() == 2 else -1
    if x.device.type == "cpu" and M > 0:
        if (w.dtype != torch.float32 or M == 1) and usable(x, w, NATIVE_MAX_ROWS):
            y = native_linear(x, w)
            return (y if b is None else y + b.float()).to(x.dtype)
        if (
            w.dtype != torch.float32
            and M <= NATIVE_CHUNKED_MAX_ROWS
            and usable(x[:NATIVE_MAX_ROWS], w, NATIVE_MAX_ROWS)
        ):
            y = torch.cat(
                [native_linear(x[i : i + NATIVE_MAX_ROWS], w) for i in range(0, M, NATIVE_MAX_ROWS)]
            )
            return (y if b is None else y + b.float()).to(x.dtype)
        if w.dtype != torch.float32 and M >= UPCAST_MIN_ROWS:
            y = F.linear(x.float(), w.float(), None if b is None else b.float())
            return y.to(x.dtype)
    return F.linear(x, w, b)


class Linear(nn.Linear):
    """nn.Linear whose forward takes the fastest path for the shape (see `linear`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
