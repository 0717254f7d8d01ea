"""Grouped-query attention decoder: Llama-style, or Qwen3-style with RMSNorm on each q and k
head (spec.qk_norm). Fused qkv and gate/up weights, a static [B, kv_heads, L, head_dim] cache.

Decode folds the query heads of each KV group into the query-length axis
([B, kv_heads, group, head_dim]), so attention (one SDPA call, or two matmuls around a
softmax: decode_attention) reads each cached K/V head once, never repeated per query head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from phasewatt.errors import ConfigError
from phasewatt.models.decoder import DecoderModel
from phasewatt.models.gemv import Linear, norm_linear, residual_linear, swiglu_residual
from phasewatt.models.layers import RMSNorm, SwiGLU, apply_rope
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

    def _qkv(self, qkv, cos, sin):
        """qkv [B, S, (H + 2 H_kv) D] -> q [B, S, H, D] and k, v [B, S, H_kv, D], q and k
        normed and rotated."""
        b, s, _ = qkv.shape
        q, k, v = qkv.split([self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=-1)
        q = q.view(b, s, self.n_heads, self.head_dim)
        k = k.view(b, s, self.n_kv_heads, self.head_dim)
        v = v.view(b, s, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, h, delta, input_pos, cos, sin, mask, cache):
        """Decode step: h [B, d] and the previous layer's delta (or None); returns the new
        (h, delta). The residual adds and norms ride on the projections (gemv.norm_linear)."""
        b = h.shape[0]
        qkv, h = norm_linear(h, delta, self.attn_norm, self.qkv)
        q, k, v = self._qkv(qkv.unsqueeze(1), cos[input_pos], sin[input_pos])
        k_cache, v_cache = cache
        k_cache[:, :, input_pos] = k.transpose(1, 2)
        v_cache[:, :, input_pos] = v.transpose(1, 2)
        q = q.view(b, self.n_kv_heads, self.group, self.head_dim)
        if self.decode_attention == "sdpa":
            out = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask.view(1, 1, 1, -1))
        else:
            scores = torch.matmul(q, k_cache.transpose(2, 3)).float() * self.head_dim**-0.5 + mask
            out = torch.matmul(torch.softmax(scores, dim=-1).to(q.dtype), v_cache)
        h = residual_linear(out.reshape(b, self.n_heads * self.head_dim), self.o, h)
        gate_up, h = norm_linear(h, None, self.mlp_norm, self.mlp.gate_up)
        return swiglu_residual(gate_up, self.mlp.down, h)

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
    # What the engine picks on CUDA: SDPA's kernel for a masked decode query gives one thread
    # block per KV head at batch 1 and slows down with the cache; the two matmuls did better
    # on an H200 (results/reference/issue4: 3.62 vs 3.86 ms at 512, 3.83 vs 4.96 at 2048).
    cuda_decode_attention = "matmul"

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
