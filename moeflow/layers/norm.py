import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import DTYPES, native_decode, native_rmsnorm

# rows up to this many elements take the native kernel: torch's rms_norm is ~8 ops, ~24 µs for
# one 576-wide row between a decode's kernels, the native one a single call of a few µs; larger
# inputs (prefill) keep torch, which spreads them over threads
NATIVE_MAX_NUMEL = 1 << 16


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (
            x.numel() <= NATIVE_MAX_NUMEL
            and x.dtype == w.dtype
            and x.device.type == "cpu"
            and x.dtype in DTYPES
            and not x.requires_grad
            and x.is_contiguous()
            and native_decode() is not None
        ):
            return native_rmsnorm(x, w, self.eps)
        # statistics in fp32 whatever the compute dtype, as the reference does
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)
