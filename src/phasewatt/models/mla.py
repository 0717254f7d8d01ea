"""Multi-head latent attention decoder (MiniCPM3 / DeepSeek-V2 dense layers).

The cache holds, per token, only the normed KV latent (kv_lora_rank) and the rotated shared
key (qk_rope_head_dim), in one [B, L, kv_lora_rank + qk_rope_head_dim] tensor per layer.

Decode absorbs the up-projections: with kv_b split per head into W_UK [nope, kv_lora] and
W_UV [v, kv_lora], a score is q_nope . (W_UK c) + q_pe . k_pe = (W_UK^T q_nope) . c + q_pe . k_pe,
so the query is mapped into the latent space once and attends to the cache as one shared
[kv_lora + rope] key; the attention output stays in the latent space and W_UV maps it back.
A step reads the latent cache once and never expands it (models.mla_attention: three fused
Triton kernels on CUDA, or the torch form as one SDPA call or two matmuls around a softmax).
Prefill expands K and V per head (cheaper there: every latent is used by many queries) and
uses SDPA.

Optional config keys (spec.extra): scale_emb, scale_depth, dim_model_base (MiniCPM3's
embedding, residual and logit scalings; omitted means none) and rope_interleaved (true for
DeepSeek-V2 checkpoints, whose rotary pairs are adjacent channels; MiniCPM3 uses halves).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from phasewatt.models import mla_attention
from phasewatt.models.decoder import DECODE_ATTENTION, DecoderModel, spec_extra
from phasewatt.models.gemv import Linear, norm_linear, norm_mlp_residual, residual_linear
from phasewatt.models.layers import RMSNorm, SwiGLU, apply_rope
from phasewatt.models.loader import CheckpointError, HFTensors
from phasewatt.models.mla_attention import attend_torch, cache_entry, split_query


class MLALayer(nn.Module):
    def __init__(self, spec, device, dtype, residual_scale: float, rope_interleaved: bool):
        super().__init__()
        d = spec.d_model
        self.n_heads = spec.n_heads
        self.q_lora, self.kv_lora = spec.q_lora_rank, spec.kv_lora_rank
        self.nope, self.rope, self.v_dim = spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.v_head_dim
        self.scale = (self.nope + self.rope) ** -0.5
        self.residual_scale = residual_scale
        self.rope_interleaved = rope_interleaved
        self.decode_attention = MLAModel.default_decode_attention
        self.attn_norm = RMSNorm(d, spec.norm_eps, device=device, dtype=dtype)
        # q_a_proj and kv_a_proj_with_mqa fused: both read the same normed input.
        self.a_proj = Linear(d, self.q_lora + self.kv_lora + self.rope, bias=False, device=device, dtype=dtype)
        self.q_a_norm = RMSNorm(self.q_lora, spec.norm_eps, device=device, dtype=dtype)
        self.q_b_proj = Linear(self.q_lora, self.n_heads * (self.nope + self.rope), bias=False, device=device, dtype=dtype)
        self.kv_a_norm = RMSNorm(self.kv_lora, spec.norm_eps, device=device, dtype=dtype)
        # Only prefill multiplies by kv_b_proj (decode absorbs it), so it stays a plain nn.Linear.
        self.kv_b_proj = nn.Linear(self.kv_lora, self.n_heads * (self.nope + self.v_dim), bias=False, device=device, dtype=dtype)
        self.o = Linear(self.n_heads * self.v_dim, d, bias=False, device=device, dtype=dtype)
        self.mlp_norm = RMSNorm(d, spec.norm_eps, device=device, dtype=dtype)
        self.mlp = SwiGLU(d, spec.d_ff, device=device, dtype=dtype)

    def make_cache(self, batch: int, cache_len: int) -> tuple[torch.Tensor]:
        """The latent cache [B, cache_len, kv_lora_rank + qk_rope_head_dim]."""
        w = self.a_proj.weight
        return (torch.zeros(batch, cache_len, self.kv_lora + self.rope, device=w.device, dtype=w.dtype),)

    def _project(self, h, delta):
        """h (+ delta) [..., d] -> q_b_proj's output [..., H (nope + rope)], kv_a_proj's
        [..., kv_lora + rope] (a view) and h + delta."""
        a, h = norm_linear(h, delta, self.attn_norm, self.a_proj)
        q_a, kv_a = a.split([self.q_lora, self.kv_lora + self.rope], dim=-1)
        return norm_linear(q_a, None, self.q_a_norm, self.q_b_proj)[0], kv_a, h

    def forward(self, h, delta, input_pos, cos, sin, mask, cache):
        """Decode step, absorbed: h [B, d] and the previous layer's delta (or None); returns
        the new (h, delta). Everything between the q_b and o products is the attention
        (mla_attention; the fused kernels mask by input_pos themselves, the torch forms take
        `mask`)."""
        q, kv_a, h = self._project(h, delta)
        args = (q, kv_a, *cache, input_pos, cos, sin, self.kv_a_norm.weight, self.kv_b_proj.weight, self.kv_a_norm.eps,
                self.n_heads, self.nope, self.v_dim, self.scale, self.rope_interleaved)
        if self.decode_attention == "fused":
            out = torch.ops.phasewatt.mla_decode_attention(*args)
        else:
            out = attend_torch(*args, kind=self.decode_attention, mask=mask)
        h = residual_linear(out, self.o, h, self.residual_scale)
        return norm_mlp_residual(h, self.mlp_norm, self.mlp, self.residual_scale)

    def norm_folds(self):
        """(norm, the products it feeds): what gemv.fold_norm_weights may fold (kv_a_norm's
        output is the cached latent, read by the absorbed products: not folded)."""
        return [(self.attn_norm, [self.a_proj]), (self.q_a_norm, [self.q_b_proj]), (self.mlp_norm, [self.mlp.gate_up])]

    def prefill(self, h, delta, cos, sin, cache):
        """Whole prompts h, delta [b, S, d] (cache: views of their rows), K/V expanded per head."""
        b, s, _ = h.shape
        q, kv_a, h = self._project(h, delta)
        q_nope, q_pe = split_query(q, self.n_heads, self.nope, self.rope)
        q_pe = apply_rope(q_pe, cos, sin, self.rope_interleaved)
        entry = cache_entry(kv_a, self.kv_a_norm.weight, self.kv_a_norm.eps, cos, sin, self.rope_interleaved)
        cache[0][:, :s] = entry
        kv = self.kv_b_proj(entry[..., : self.kv_lora]).view(b, s, self.n_heads, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k_pe = entry[..., self.kv_lora :].unsqueeze(2).expand(b, s, self.n_heads, self.rope)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)
        k = torch.cat([k_nope, k_pe], dim=-1).transpose(1, 2)
        v = v.transpose(1, 2)
        if self.v_dim != self.nope + self.rope:
            # Equal head dims let the flash kernel take the call on CUDA; the pad adds zeros only.
            v = F.pad(v, (0, self.nope + self.rope - self.v_dim))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)[..., : self.v_dim]
        h = h + self.o(out.transpose(1, 2).reshape(b, s, self.n_heads * self.v_dim)) * self.residual_scale
        return h, self.mlp(self.mlp_norm(h)) * self.residual_scale


class MLAModel(DecoderModel):
    default_decode_attention = "matmul"
    decode_attentions = DECODE_ATTENTION + ("fused",)
    # What the engine picks on CUDA: the fused kernels (norm, rope, cache write, absorption,
    # a cache split over the GPU and W_UV in three kernels, where compiled matmuls took ~10 per
    # layer and held MiniCPM3-4B at batch 1 to ~47% of copy bandwidth on an H200).

    @classmethod
    def fused_unsupported(cls, spec, dtype: torch.dtype, device_type: str) -> str | None:
        """Why the fused kernels cannot take this model (mla_attention.fused_unsupported), or None."""
        dims = (spec.kv_lora_rank, spec.qk_rope_head_dim, spec.qk_nope_head_dim, spec.v_head_dim)
        return mla_attention.fused_unsupported(spec.name, *dims, dtype, device_type)

    def __init__(self, spec, device="cpu", dtype=torch.float32):
        scale_depth = spec.extra.get("scale_depth")
        residual_scale = spec_extra(spec, "scale_depth", 1.0) / math.sqrt(spec.n_layers) if scale_depth is not None else 1.0
        super().__init__(
            spec,
            device,
            dtype,
            rope_dim=spec.qk_rope_head_dim,
            embed_scale=spec_extra(spec, "scale_emb", 1.0),
            logit_divisor=spec.d_model / spec_extra(spec, "dim_model_base", spec.d_model),
        )
        interleaved = spec_extra(spec, "rope_interleaved", False, kind=bool)
        self.layers = nn.ModuleList(MLALayer(spec, device, dtype, residual_scale, interleaved) for _ in range(spec.n_layers))

    def load_hf_state_dict(self, state_dict: dict) -> None:
        """MiniCPM3/DeepseekV2 names -> ours (q_a_proj and kv_a_proj_with_mqa fused)."""
        src = HFTensors(state_dict)
        src.copy_into(self.embed.weight, "model.embed_tokens.weight")
        if src.has("model.embed_tokens.embed_scale"):
            stored = float(src.take("model.embed_tokens.embed_scale"))
            if not math.isclose(stored, self.embed_scale, rel_tol=1e-6):
                raise CheckpointError(f"checkpoint: embed_scale is {stored}, the model spec's scale_emb gives {self.embed_scale}")
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            src.copy_into(layer.attn_norm.weight, p + "input_layernorm.weight")
            src.copy_into(layer.a_proj.weight, a + "q_a_proj.weight", a + "kv_a_proj_with_mqa.weight")
            src.copy_into(layer.q_a_norm.weight, a + "q_a_layernorm.weight")
            src.copy_into(layer.q_b_proj.weight, a + "q_b_proj.weight")
            src.copy_into(layer.kv_a_norm.weight, a + "kv_a_layernorm.weight")
            src.copy_into(layer.kv_b_proj.weight, a + "kv_b_proj.weight")
            src.copy_into(layer.o.weight, a + "o_proj.weight")
            self.copy_hf_mlp(src, layer, p)
        self.copy_hf_head(src)
        src.finish()
