"""Rotary position embeddings: default, linear and YaRN frequencies; half-split or interleaved pairs."""

import math

import torch

from ..kernels import DTYPES, native_decode, native_rope
from ..models.args import RopeArgs, yarn_mscale

# up to this many elements the native kernel (one call, the same bits) replaces ~8 torch ops
# (~20 µs between a decode's kernels); larger inputs (prefill) keep torch's vectorised ops
NATIVE_MAX_NUMEL = 1 << 15


def inv_frequencies(r: RopeArgs) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq [dim/2], factor applied to cos/sin)."""
    exps = torch.arange(0, r.dim, 2, dtype=torch.float32) / r.dim
    base = r.theta**exps
    if r.kind == "default":
        return 1.0 / base, 1.0
    if r.kind == "linear":
        return 1.0 / (base * r.factor), 1.0
    return _yarn(r, base)


def _yarn(r: RopeArgs, base: torch.Tensor) -> tuple[torch.Tensor, float]:
    # YaRN: low frequencies are interpolated by `factor`, high ones kept, with a linear ramp between
    if r.attention_factor is not None:
        att = float(r.attention_factor)
    elif r.mscale and r.mscale_all_dim:
        att = yarn_mscale(r.factor, r.mscale) / yarn_mscale(r.factor, r.mscale_all_dim)
    else:
        att = yarn_mscale(r.factor)

    def correction_dim(rotations: float) -> float:
        return r.dim * math.log(r.original_max_position / (rotations * 2 * math.pi)) / (2 * math.log(r.theta))

    low, high = correction_dim(r.beta_fast), correction_dim(r.beta_slow)
    if r.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, r.dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(r.dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # share of the original (extrapolated) frequency
    inv = (1.0 / (r.factor * base)) * (1 - keep) + (1.0 / base) * keep
    return inv, att


class Rotary:
    """Precomputes cos/sin for positions on demand; applies them to [T, heads, dim] tensors."""

    def __init__(self, r: RopeArgs, device: torch.device | str = "cpu"):
        inv, self.scale = inv_frequencies(r)
        self.inv_freq = inv.to(device)
        self.interleaved = r.interleaved

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, dim/2]
        return (freqs.cos() * self.scale).to(dtype), (freqs.sin() * self.scale).to(dtype)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, dim]. Interleaved pairs come out de-interleaved: q and k get the same
        permutation, so their dot products are unchanged."""
        if (
            x.numel() <= NATIVE_MAX_NUMEL
            and x.dim() == 3
            and x.device.type == "cpu"
            and x.dtype == cos.dtype
            and x.dtype in DTYPES
            and 2 * cos.shape[-1] == x.shape[-1]
            and not x.requires_grad
            and x.is_contiguous()
            and cos.is_contiguous()
            and sin.is_contiguous()
            and native_decode() is not None
        ):
            return native_rope(x, cos, sin, self.interleaved)
        if self.interleaved:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            x1, x2 = x.chunk(2, dim=-1)
        c, s = cos[:, None, :], sin[:, None, :]
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
