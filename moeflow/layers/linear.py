"""The one matmul every weight goes through, choosing the fastest path for the shape at hand.

Measured with bench/bench_kernels.py (BENCHMARKS.md): for fp32 GEMV MKL already streams at
memory bandwidth and the native kernel only matches it; with 2-15 rows the native kernel is
1.05-1.4x faster, and with 16-bit weights below 16 rows 1.2-2x faster. From 16 rows on, fp32
GEMM (16-bit weights upcast per block) is the better path."""

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import native_linear, usable

NATIVE_MAX_ROWS = 15  # at 16+ rows MKL's fp32 GEMM is faster
UPCAST_MIN_ROWS = 16  # bf16 GEMM at many rows is several times slower than fp32 on these CPUs


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] @ w [N, K]^T (+ b) in x's dtype."""
    M = x.shape[0] if x.dim() == 2 else -1
    if x.device.type == "cpu" and M > 0:
        if (w.dtype != torch.float32 or M > 1) and usable(x, w, NATIVE_MAX_ROWS):
            y = native_linear(x, w)
            return (y if b is None else y + b.float()).to(x.dtype)
        if w.dtype != torch.float32 and M >= UPCAST_MIN_ROWS:
            y = F.linear(x.float(), w.float(), None if b is None else b.float())
            return y.to(x.dtype)
    return F.linear(x, w, b)


class Linear(nn.Linear):
    """nn.Linear whose forward takes the fastest path for the shape (see `linear`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
