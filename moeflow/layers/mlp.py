import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import mlp_usable, native_mlp_token
from .linear import Linear


class MLP(nn.Module):
    """SwiGLU feed-forward: dense layers and shared experts. A single token on the CPU (decode)
    takes one native call instead of three linears and two elementwise ops."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=bias)
        self.up_proj = Linear(hidden, intermediate, bias=bias)
        self.down_proj = Linear(intermediate, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u, d = self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight
        if self.gate_proj.bias is None and mlp_usable(x, g, u, d):
            return native_mlp_token(x, g, u, d).to(x.dtype)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
