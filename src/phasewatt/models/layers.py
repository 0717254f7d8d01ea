"""Small pieces every architecture shares: RMSNorm, the SwiGLU MLP and rotary embeddings.

The numerics follow the Hugging Face references (norms computed in float32 and cast back,
rope tables computed in float32) so that our models match them logit for logit.
"""

from __future__ import annotations

import torch
from torch import nn

from phasewatt.models.gemv import Linear, silu_gate_up


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 like LlamaRMSNorm."""

    weight_offset = 0.0  # the scale is weight + weight_offset (what the fused GEMV prologue reads)

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight: the norm in float32, cast back before the weight product."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one [2*d_ff, d_model] weight,
    so a decode step reads them in one matrix-vector product."""

    def __init__(self, d_model: int, d_ff: int, device=None, dtype=None):
        super().__init__()
        self.d_ff = d_ff
        self.gate_up = Linear(d_model, 2 * d_ff, bias=False, device=device, dtype=dtype)
        self.down = Linear(d_ff, d_model, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(silu_gate_up(self.gate_up(x)))

    def load_hf(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        """Copy HF's separate gate_proj/up_proj/down_proj weights into the fused layout."""
        with torch.no_grad():
            self.gate_up.weight.copy_(torch.cat([gate, up], dim=0))
            self.down.weight.copy_(down)


def decode_mask(positions: torch.Tensor, input_pos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive attention mask of a decode step over cache positions [L]: 0 up to and
    including input_pos [1], -inf after (a device tensor, so a CUDA graph replays it)."""
    return torch.where(positions <= input_pos, 0.0, float("-inf")).to(dtype)


def precompute_rope(rot_dim: int, max_len: int, theta: float = 10000.0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [max_len, rot_dim] in float32, frequencies repeated as (f0..fn, f0..fn)
    (the rotate_half layout of Llama/Qwen3/DeepseekV2 in transformers)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, rot_dim, 2, device=device, dtype=torch.int64).float() / rot_dim))
    positions = torch.arange(max_len, device=device, dtype=torch.int64).float()
    freqs = torch.outer(positions, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotate x [B, S, H, D] by cos/sin [S, D] (or [B, S, D]); computed in float32, cast back.

    interleaved=True takes the pairs as adjacent channels (x0,x1),(x2,x3)... as checkpoints of
    DeepseekV2/MiniCPM3 store q_pe/k_pe; their HF code permutes them to the half layout first,
    which is what we do here.
    """
    dtype = x.dtype
    x32 = x.float()
    if interleaved:
        b, s, h, d = x32.shape
        x32 = x32.view(b, s, h, d // 2, 2).transpose(-1, -2).reshape(b, s, h, d)
    cos = cos.unsqueeze(-2)
    sin = sin.unsqueeze(-2)
    return (x32 * cos + _rotate_half(x32) * sin).to(dtype)
