"""Grouped-query attention decoder: Llama-style, or Qwen3-style with RMSNorm on each q and k
head (spec.qk_norm). Fused qkv and gate/up weights, a static [B, kv_heads, L, head_dim] cache.

Decode attention (models.decode_attention) reads each cached K/V head once for its whole query
group: fused Triton kernels on CUDA, or the group folded into the query-length axis of one
SDPA call or two matmuls around a softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from phasewatt.errors import ConfigError
from phasewatt.models import decode_attention
from phasewatt.models.decode_attention import attend_torch, norm_rope_qk, split_qkv
from phasewatt.models.decoder import DECODE_ATTENTION, DecoderModel
from phasewatt.models.gemv import Linear, norm_linear, norm_mlp_residual, residual_linear
from phasewatt.models.layers import RMSNorm, SwiGLU
from phasewatt.models.loader import HFTensors


class GQALayer(nn.Module):
    def __init__(self, spec, device, dtype):
        super().__init__()
        d, self.n_heads, self.n_kv_heads, self.head_dim = spec.d_model, spec.n_heads, spec.n_kv_heads, spec.head_dim
        self.group = self.n_heads // self.n_kv_heads
        self.decode_attention = GQAModel.default_decode_attention
        self.attn_norm = RMSNorm(d, spec.norm_eps, device=device, dtype=dtype)
        self.qkv = Linear(d, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=False, device=device, dtype=dtype)
        self.q_norm = RMSNorm(self.head_dim, spec.norm_eps, device=device, dtype=dtype) if spec.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, spec.norm_eps, device=device, dtype=dtype) if spec.qk_norm else None
        self.o = Linear(self.n_heads * self.head_dim, d, bias=False, device=device, dtype=dtype)
        self.mlp_norm = RMSNorm(d, spec.norm_eps, device=device, dtype=dtype)
        self.mlp = SwiGLU(d, spec.d_ff, device=device, dtype=dtype)

    def make_cache(self, batch: int, cache_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V caches [B, kv_heads, cache_len, head_dim]."""
        w = self.qkv.weight
        shape = (batch, self.n_kv_heads, cache_len, self.head_dim)
        return torch.zeros(shape, device=w.device, dtype=w.dtype), torch.zeros(shape, device=w.device, dtype=w.dtype)

    def _qk_norm_weights(self):
        return (self.q_norm.weight, self.k_norm.weight) if self.q_norm is not None else (None, None)

    def _qkv(self, qkv, cos, sin):
        """qkv [B, S, (H + 2 H_kv) D] -> q [B, S, H, D] and k, v [B, S, H_kv, D], q and k
        normed and rotated."""
        q, k, v = split_qkv(qkv, self.n_heads, self.n_kv_heads, self.head_dim)
        q, k = norm_rope_qk(q, k, cos, sin, *self._qk_norm_weights(), self.attn_norm.eps)
        return q, k, v

    def forward(self, h, delta, input_pos, cos, sin, mask, cache):
        """Decode step: h [B, d] and the previous layer's delta (or None); returns the new
        (h, delta). The residual adds and norms ride on the projections (gemv.norm_linear),
        everything between the qkv and o products on the attention (decode_attention; the
        fused kernels mask by input_pos themselves, the torch forms take `mask`)."""
        qkv, h = norm_linear(h, delta, self.attn_norm, self.qkv)
        args = (qkv, *cache, input_pos, cos, sin, *self._qk_norm_weights(), self.attn_norm.eps, self.n_heads, self.head_dim**-0.5)
        if self.decode_attention == "fused":
            out = torch.ops.phasewatt.gqa_decode_attention(*args)
        else:
            out = attend_torch(*args, kind=self.decode_attention, mask=mask)
        h = residual_linear(out, self.o, h)
        return norm_mlp_residual(h, self.mlp_norm, self.mlp)

    def norm_folds(self):
        """(norm, the products it feeds): what gemv.fold_norm_weights may fold."""
        return [(self.attn_norm, [self.qkv]), (self.mlp_norm, [self.mlp.gate_up])]

    def prefill(self, h, delta, cos, sin, cache):
        """Whole prompts h, delta [b, S, d] from position 0; cache: views of their rows."""
        h = h + delta
        b, s, _ = h.shape
        q, k, v = self._qkv(self.qkv(self.attn_norm(h)), cos, sin)
        cache[0][:, :, :s] = k.transpose(1, 2)
        cache[1][:, :, :s] = v.transpose(1, 2)
        # K/V repeated per query head: the flash kernel then takes the call on CUDA.
        k = k.repeat_interleave(self.group, dim=2) if self.group > 1 else k
        v = v.repeat_interleave(self.group, dim=2) if self.group > 1 else v
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        h = h + self.o(out.transpose(1, 2).reshape(b, s, self.n_heads * self.head_dim))
        return h, self.mlp(self.mlp_norm(h))


class GQAModel(DecoderModel):
    default_decode_attention = "sdpa"
    decode_attentions = DECODE_ATTENTION + ("fused",)
    # What the engine picks on CUDA: the fused kernels (norm, rope, cache write and a cache
    # split over the GPU in two kernels, where compiled matmuls took six per layer). Of the
    # other two, SDPA's kernel for a masked decode query gives one thread block per KV head at
    # batch 1 and slows down with the cache (H200: 3.62 ms matmul vs 3.86 sdpa at 512).

    @classmethod
    def fused_unsupported(cls, spec, dtype: torch.dtype, device_type: str) -> str | None:
        """Why the fused kernels cannot take this model (decode_attention.fused_unsupported), or None."""
        return decode_attention.fused_unsupported(spec.name, spec.head_dim, dtype, device_type)

    def __init__(self, spec, device="cpu", dtype=torch.float32):
        if spec.n_heads % spec.n_kv_heads:
            raise ConfigError(f"models.{spec.name}.n_kv_heads: must divide n_heads ({spec.n_heads})")
        super().__init__(spec, device, dtype, rope_dim=spec.head_dim)
        self.layers = nn.ModuleList(GQALayer(spec, device, dtype) for _ in range(spec.n_layers))

    def load_hf_state_dict(self, state_dict: dict) -> None:
        """Llama/Qwen3 names (model.layers.{i}.self_attn.q_proj.weight, ...) -> fused layout."""
        src = HFTensors(state_dict)
        src.copy_into(self.embed.weight, "model.embed_tokens.weight")
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            src.copy_into(layer.attn_norm.weight, p + "input_layernorm.weight")
            src.copy_into(layer.qkv.weight, *(p + f"self_attn.{n}_proj.weight" for n in "qkv"))
            if layer.q_norm is not None:
                src.copy_into(layer.q_norm.weight, p + "self_attn.q_norm.weight")
                src.copy_into(layer.k_norm.weight, p + "self_attn.k_norm.weight")
            src.copy_into(layer.o.weight, p + "self_attn.o_proj.weight")
            self.copy_hf_mlp(src, layer, p)
        self.copy_hf_head(src)
        src.finish()
