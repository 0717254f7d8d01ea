"""Gated DeltaNet language model, laid out as Qwen3-Next's linear-attention layers so that
Qwen3NextForCausalLM checkpoints whose layers are all "linear_attention" with dense MLPs
load as they are.

A layer: zero-centred RMSNorm -> Gated DeltaNet mixer -> residual -> zero-centred RMSNorm ->
SwiGLU -> residual. The mixer projects to q, k, v, the output gate z and the per-head b, a;
a short causal conv (SiLU) runs over q|k|v; q, k are L2-normalised; decay
g = -exp(A_log) * softplus(a + dt_bias), beta = sigmoid(b); the gated delta rule's output goes
through an RMSNorm gated by SiLU(z) and the output projection.

Heads: n_heads key heads of head_dim, and n_v_heads value heads (spec.extra, default n_heads)
of head_dim * expand_v; each key head serves n_v_heads / n_heads consecutive value heads.
Every projection of one token (q, k, v, z, b, a) is a single matrix, so a decode step reads it
in one product. State per layer and sequence: the conv window [2*key_dim + value_dim, W-1]
in the model dtype and the recurrent state [n_v_heads, head_dim, value_head_dim] in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from phasewatt.errors import ConfigError
from phasewatt.models import linear_ops
from phasewatt.models.hf_state import HFStateReader
from phasewatt.models.layers import SwiGLU
from phasewatt.models.spec import ModelSpec


class ZeroCentredRMSNorm(nn.Module):
    """x / rms(x) * (1 + weight) in float32 (Qwen3-Next's norm: the weight is stored as an
    offset from 1, so it initialises to zeros)."""

    def __init__(self, dim: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * (1.0 + self.weight.float())).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """RMSNorm of each head's output, then times SiLU(gate) (norm before gate)."""

    def __init__(self, dim: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x32.to(dtype) * F.silu(gate.float())).to(dtype)


class GatedDeltaNetMixer(nn.Module):
    def __init__(self, spec: ModelSpec, n_v_heads: int, device=None, dtype=None):
        super().__init__()
        self.n_k_heads, self.n_v_heads = spec.n_heads, n_v_heads
        self.head_k_dim = spec.head_dim
        self.head_v_dim = spec.head_dim * spec.expand_v
        self.key_dim = self.n_k_heads * self.head_k_dim
        self.value_dim = self.n_v_heads * self.head_v_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.scale = self.head_k_dim**-0.5
        factory = {"device": device, "dtype": dtype}
        # Rows: q | k | v | z | b | a (each head-major).
        self.in_proj = nn.Linear(spec.d_model, self.conv_dim + self.value_dim + 2 * n_v_heads, bias=False, **factory)
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, spec.conv_size, **factory))
        self.A_log = nn.Parameter(torch.empty(n_v_heads, **factory))
        self.dt_bias = nn.Parameter(torch.empty(n_v_heads, **factory))
        self.norm = GatedRMSNorm(self.head_v_dim, spec.norm_eps, **factory)
        self.out_proj = nn.Linear(self.value_dim, spec.d_model, bias=False, **factory)
        self.backend = "auto"
        self.reset_recurrent_parameters()

    @torch.no_grad()
    def reset_recurrent_parameters(self) -> None:
        """Random weights in the ranges trained models use: decay rates A in [1, 16], time
        steps softplus(dt_bias) in [1e-3, 1e-1], conv filters like nn.Conv1d's default."""
        nn.init.kaiming_uniform_(self.conv_weight.unsqueeze(1), a=math.sqrt(5))
        self.A_log.copy_(torch.empty_like(self.A_log, dtype=torch.float32).uniform_(1, 16).log())
        dt = torch.exp(torch.empty_like(self.dt_bias, dtype=torch.float32).uniform_(math.log(1e-3), math.log(1e-1)))
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def _split(self, proj: torch.Tensor):
        qkv, z, b, a = proj.split([self.conv_dim, self.value_dim, self.n_v_heads, self.n_v_heads], dim=-1)
        beta = b.sigmoid()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
        return qkv, z, beta, g

    def _heads(self, qkv: torch.Tensor):
        """Split the conv output [..., conv_dim] into q, k [..., n_v_heads, K] (key heads repeated
        for their value heads) and v [..., n_v_heads, V]."""
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], dim=-1)
        lead = qkv.shape[:-1]
        q = q.reshape(*lead, self.n_k_heads, self.head_k_dim)
        k = k.reshape(*lead, self.n_k_heads, self.head_k_dim)
        v = v.reshape(*lead, self.n_v_heads, self.head_v_dim)
        group = self.n_v_heads // self.n_k_heads
        return linear_ops.repeat_heads(q, group), linear_ops.repeat_heads(k, group), v

    def _output(self, core: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        z = z.reshape(*z.shape[:-1], self.n_v_heads, self.head_v_dim)
        out = self.norm(core.to(z.dtype), z)
        return self.out_proj(out.flatten(-2))

    def prefill(self, x: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> torch.Tensor:
        qkv, z, beta, g = self._split(self.in_proj(x))
        qkv, window = linear_ops.causal_conv1d(qkv, self.conv_weight)
        conv_state.copy_(window)
        q, k, v = self._heads(F.silu(qkv))
        core, final = linear_ops.gated_delta_rule_prefill(q, k, v, g, beta, self.scale, backend=self.backend)
        ssm_state.copy_(final)
        return self._output(core, z)

    def decode(self, x: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> torch.Tensor:
        qkv, z, beta, g = self._split(self.in_proj(x))
        qkv = F.silu(linear_ops.causal_conv1d_step(qkv, conv_state, self.conv_weight))
        q, k, v = self._heads(qkv)
        core = linear_ops.gated_delta_step(
            ssm_state, linear_ops.l2_normalize(q), linear_ops.l2_normalize(k), v, g, beta, self.scale
        )
        return self._output(core, z)

    def load_hf(self, take, prefix: str) -> None:
        """Qwen3-Next stores in_proj_qkvz grouped by key head ([q, k, v-group, z-group] per key
        head) and in_proj_ba likewise ([b-group, a-group]); regroup them into our q|k|v|z|b|a."""
        d = self.in_proj.in_features
        group = self.n_v_heads // self.n_k_heads
        gv = group * self.head_v_dim
        qkvz = take(prefix + "in_proj_qkvz.weight", (2 * self.key_dim + 2 * self.value_dim, d))
        q, k, v, z = qkvz.reshape(self.n_k_heads, -1, d).split([self.head_k_dim, self.head_k_dim, gv, gv], dim=1)
        ba = take(prefix + "in_proj_ba.weight", (2 * self.n_v_heads, d))
        b, a = ba.reshape(self.n_k_heads, 2 * group, d).split([group, group], dim=1)
        rows = [t.reshape(-1, d) for t in (q, k, v, z, b, a)]
        with torch.no_grad():
            self.in_proj.weight.copy_(torch.cat(rows, dim=0))
            self.conv_weight.copy_(take(prefix + "conv1d.weight", (self.conv_dim, 1, self.conv_weight.shape[-1]))[:, 0])
            self.A_log.copy_(take(prefix + "A_log", (self.n_v_heads,)))
            self.dt_bias.copy_(take(prefix + "dt_bias", (self.n_v_heads,)))
            self.norm.weight.copy_(take(prefix + "norm.weight", (self.head_v_dim,)))
            self.out_proj.weight.copy_(take(prefix + "out_proj.weight", (self.out_proj.out_features, self.value_dim)))


class GatedDeltaNetBlock(nn.Module):
    def __init__(self, spec: ModelSpec, n_v_heads: int, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.input_norm = ZeroCentredRMSNorm(spec.d_model, spec.norm_eps, **factory)
        self.mixer = GatedDeltaNetMixer(spec, n_v_heads, **factory)
        self.post_norm = ZeroCentredRMSNorm(spec.d_model, spec.norm_eps, **factory)
        self.mlp = SwiGLU(spec.d_model, spec.d_ff, **factory)
        self.register_buffer("conv_state", None, persistent=False)
        self.register_buffer("ssm_state", None, persistent=False)

    def forward(self, h: torch.Tensor, decode: bool) -> torch.Tensor:
        mix = self.mixer.decode if decode else self.mixer.prefill
        h = h + mix(self.input_norm(h), self.conv_state, self.ssm_state)
        return h + self.mlp(self.post_norm(h))


class GatedDeltaNetModel(nn.Module):
    """Gated DeltaNet LM with fixed-shape states; see the module docstring for the layout."""

    def __init__(self, spec: ModelSpec, device="cpu", dtype=torch.float32):
        super().__init__()
        self.spec = spec
        self.n_v_heads = int(spec.extra.get("n_v_heads", spec.n_heads))
        if self.n_v_heads <= 0 or self.n_v_heads % spec.n_heads:
            raise ConfigError(
                f"models.{spec.name}.n_v_heads: {self.n_v_heads}; must be a positive multiple of n_heads={spec.n_heads}"
            )
        factory = {"device": device, "dtype": dtype}
        self.embed = nn.Embedding(spec.vocab_size, spec.d_model, **factory)
        self.layers = nn.ModuleList(
            GatedDeltaNetBlock(spec, self.n_v_heads, **factory) for _ in range(spec.n_layers)
        )
        self.norm = ZeroCentredRMSNorm(spec.d_model, spec.norm_eps, **factory)
        self.lm_head = None if spec.tied_embeddings else nn.Linear(spec.d_model, spec.vocab_size, bias=False, **factory)
        self.cache_batch = 0

    # ----- prefill backend -------------------------------------------------------------------
    @property
    def prefill_backend(self) -> str:
        """'auto' (fla on CUDA, torch chunked elsewhere), 'torch' or 'fla'."""
        return self.layers[0].mixer.backend

    @prefill_backend.setter
    def prefill_backend(self, backend: str) -> None:
        if backend not in linear_ops.BACKENDS:
            raise ValueError(f"prefill_backend '{backend}'; allowed: " + ", ".join(linear_ops.BACKENDS))
        for layer in self.layers:
            layer.mixer.backend = backend

    # ----- states --------------------------------------------------------------------------
    def setup_caches(self, batch: int, max_len: int) -> None:
        """Allocate zeroed conv and recurrent states for `batch` sequences. Their size does not
        depend on the sequence length, so max_len only documents the caller's intent."""
        weight = self.embed.weight
        for layer in self.layers:
            mixer = layer.mixer
            layer.conv_state = torch.zeros(
                batch, mixer.conv_dim, mixer.conv_weight.shape[-1] - 1, device=weight.device, dtype=weight.dtype
            )
            layer.ssm_state = torch.zeros(
                batch, mixer.n_v_heads, mixer.head_k_dim, mixer.head_v_dim, device=weight.device, dtype=torch.float32
            )
        self.cache_batch = batch

    def _check_batch(self, batch: int) -> None:
        if batch != self.cache_batch:
            raise ValueError(f"batch {batch} but setup_caches was called for batch {self.cache_batch}")

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        h = self.norm(h)
        return F.linear(h, self.embed.weight) if self.lm_head is None else self.lm_head(h)

    # ----- forward ---------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Run the prompts tokens [B, S] from empty states (which it overwrites); logits of the
        last position [B, V], or of every position [B, S, V]."""
        self._check_batch(tokens.shape[0])
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h, decode=False)
        return self._logits(h if all_logits else h[:, -1])

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """One token per sequence, tokens [B]; logits [B, V]. input_pos is unused: a recurrent
        state carries no positions."""
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h, decode=True)
        return self._logits(h)

    # ----- weights ---------------------------------------------------------------------------
    def load_hf_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Copy a Qwen3NextForCausalLM state dict (all layers linear attention, dense MLPs)."""
        take = HFStateReader(state_dict, self.spec.name, "gdn")
        d = self.spec.d_model
        with torch.no_grad():
            self.embed.weight.copy_(take("model.embed_tokens.weight", (self.spec.vocab_size, d)))
            for i, layer in enumerate(self.layers):
                p = f"model.layers.{i}."
                layer.input_norm.weight.copy_(take(p + "input_layernorm.weight", (d,)))
                layer.post_norm.weight.copy_(take(p + "post_attention_layernorm.weight", (d,)))
                layer.mixer.load_hf(take, p + "linear_attn.")
                layer.mlp.load_hf(
                    take(p + "mlp.gate_proj.weight", (self.spec.d_ff, d)),
                    take(p + "mlp.up_proj.weight", (self.spec.d_ff, d)),
                    take(p + "mlp.down_proj.weight", (d, self.spec.d_ff)),
                )
            self.norm.weight.copy_(take("model.norm.weight", (d,)))
            if self.lm_head is None:
                take.skip("lm_head.weight")
            else:
                self.lm_head.weight.copy_(take("lm_head.weight", (self.spec.vocab_size, d)))
        take.finish(ignored_prefixes=("mtp.",))

