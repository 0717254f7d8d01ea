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
in one product; its rows are padded with zero rows to a multiple of IN_PROJ_ROW_MULTIPLE, so
that each token's row of its output starts 16-byte aligned (2*9*256 + 2*9*512 + 2*9 = 13842
rows left cuBLAS only its Ampere "align2" GEMM for the prefill, 2.9x slower than the Hopper
kernels on an H100: RESULTS.md, round 8). State per layer and sequence: the conv window
[2*key_dim + value_dim, W-1] in the model dtype and the recurrent state [n_v_heads, head_dim,
value_head_dim] in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from phasewatt.errors import ConfigError
from phasewatt.models import linear_ops
from phasewatt.models.gemv import Linear, norm_linear, norm_mlp_residual, residual_linear
from phasewatt.models.layers import SwiGLU
from phasewatt.models.loader import CheckpointError, HFTensors
from phasewatt.models.recurrent import RecurrentModel
from phasewatt.models.spec import ModelSpec


IN_PROJ_ROW_MULTIPLE = 8  # 16 bytes of bf16/fp16


class ZeroCentredRMSNorm(nn.Module):
    """x / rms(x) * (1 + weight) in float32 (Qwen3-Next's norm: the weight is stored as an
    offset from 1, so it initialises to zeros)."""

    weight_offset = 1.0

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
    prefill_backends = linear_ops.BACKENDS  # auto: fla's kernels on CUDA, torch elsewhere

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
        # Rows: q | k | v | z | b | a (each head-major) | zero rows up to IN_PROJ_ROW_MULTIPLE.
        self.in_proj_rows = self.conv_dim + self.value_dim + 2 * n_v_heads
        self.in_proj_pad = -self.in_proj_rows % IN_PROJ_ROW_MULTIPLE
        self.in_proj = Linear(spec.d_model, self.in_proj_rows + self.in_proj_pad, bias=False, **factory)
        with torch.no_grad():
            self.in_proj.weight[self.in_proj_rows :].zero_()
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, spec.conv_size, **factory))
        self.A_log = nn.Parameter(torch.empty(n_v_heads, **factory))
        self.dt_bias = nn.Parameter(torch.empty(n_v_heads, **factory))
        self.norm = GatedRMSNorm(self.head_v_dim, spec.norm_eps, **factory)
        self.out_proj = Linear(self.value_dim, spec.d_model, bias=False, **factory)
        self.backend = "auto"
        self.reset_recurrent_parameters()

    @torch.no_grad()
    def reset_recurrent_parameters(self) -> None:
        """Random weights as fla's GatedDeltaNet initialises them: decay rates A in [1, 16],
        time steps softplus(dt_bias) log-uniform in [1e-3, 1e-1], conv like nn.Conv1d's default."""
        nn.init.kaiming_uniform_(self.conv_weight.unsqueeze(1), a=math.sqrt(5))
        self.A_log.copy_(torch.empty_like(self.A_log, dtype=torch.float32).uniform_(1, 16).log())
        dt = torch.exp(torch.empty_like(self.dt_bias, dtype=torch.float32).uniform_(math.log(1e-3), math.log(1e-1)))
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def _split(self, proj: torch.Tensor):
        qkv, z, b, a, _ = proj.split([self.conv_dim, self.value_dim, self.n_v_heads, self.n_v_heads, self.in_proj_pad], dim=-1)
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

    def _gated(self, core: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The core output normed per head and gated by SiLU(z), flattened for out_proj."""
        z = z.reshape(*z.shape[:-1], self.n_v_heads, self.head_v_dim)
        return self.norm(core.to(z.dtype), z).flatten(-2)

    def prefill(self, x: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> torch.Tensor:
        qkv, z, beta, g = self._split(self.in_proj(x))
        qkv, window = linear_ops.causal_conv1d(qkv, self.conv_weight)
        conv_state.copy_(window)
        q, k, v = self._heads(F.silu(qkv))
        core, final = linear_ops.gated_delta_rule_prefill(q, k, v, g, beta, self.scale, backend=self.backend)
        ssm_state.copy_(final)
        return self.out_proj(self._gated(core, z))

    def decode(self, proj: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> torch.Tensor:
        """One token from its input projection proj [B, in_proj rows, pad included]; returns the
        core output gated and normed per head [B, value_dim], before out_proj."""
        qkv, z, beta, g = self._split(proj)
        qkv = linear_ops.causal_conv1d_step_silu(qkv, conv_state, self.conv_weight)
        q, k, v = self._heads(qkv)
        core = linear_ops.gated_delta_step(
            ssm_state, linear_ops.l2_normalize(q), linear_ops.l2_normalize(k), v, g, beta, self.scale
        )
        return self._gated(core, z)

    def make_state(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self.in_proj.weight
        conv = torch.zeros(batch, self.conv_dim, self.conv_weight.shape[-1] - 1, device=weight.device, dtype=weight.dtype)
        ssm = torch.zeros(batch, self.n_v_heads, self.head_k_dim, self.head_v_dim, device=weight.device, dtype=torch.float32)
        return conv, ssm

    def load_hf(self, tensors: HFTensors, prefix: str) -> None:
        """Qwen3-Next stores in_proj_qkvz grouped by key head ([q, k, v-group, z-group] per key
        head) and in_proj_ba likewise ([b-group, a-group]); regroup them into our q|k|v|z|b|a."""
        d = self.in_proj.in_features
        group = self.n_v_heads // self.n_k_heads
        gv = group * self.head_v_dim
        qkvz = _take_shaped(tensors, prefix + "in_proj_qkvz.weight", (2 * self.key_dim + 2 * self.value_dim, d))
        ba = _take_shaped(tensors, prefix + "in_proj_ba.weight", (2 * self.n_v_heads, d))
        q, k, v, z = qkvz.reshape(self.n_k_heads, -1, d).split([self.head_k_dim, self.head_k_dim, gv, gv], dim=1)
        b, a = ba.reshape(self.n_k_heads, 2 * group, d).split([group, group], dim=1)
        conv = _take_shaped(tensors, prefix + "conv1d.weight", (self.conv_dim, 1, self.conv_weight.shape[-1]))
        with torch.no_grad():
            self.in_proj.weight[: self.in_proj_rows].copy_(torch.cat([t.reshape(-1, d) for t in (q, k, v, z, b, a)]))
            self.in_proj.weight[self.in_proj_rows :].zero_()
            self.conv_weight.copy_(conv[:, 0])
        tensors.copy_into(self.A_log, prefix + "A_log")
        tensors.copy_into(self.dt_bias, prefix + "dt_bias")
        tensors.copy_into(self.norm.weight, prefix + "norm.weight")
        tensors.copy_into(self.out_proj.weight, prefix + "out_proj.weight")


def _take_shaped(tensors: HFTensors, name: str, shape: tuple) -> torch.Tensor:
    value = tensors.take(name)
    if tuple(value.shape) != tuple(shape):
        raise CheckpointError(f"checkpoint: {name} has shape {tuple(value.shape)}, the model spec needs {tuple(shape)}")
    return value


class GatedDeltaNetBlock(nn.Module):
    def __init__(self, spec: ModelSpec, n_v_heads: int, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.input_norm = ZeroCentredRMSNorm(spec.d_model, spec.norm_eps, **factory)
        self.mixer = GatedDeltaNetMixer(spec, n_v_heads, **factory)
        self.post_norm = ZeroCentredRMSNorm(spec.d_model, spec.norm_eps, **factory)
        self.mlp = SwiGLU(spec.d_model, spec.d_ff, **factory)

    def make_state(self, batch: int):
        return self.mixer.make_state(batch)

    def prefill(self, h: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> torch.Tensor:
        h = h + self.mixer.prefill(self.input_norm(h), conv_state, ssm_state)
        return h + self.mlp(self.post_norm(h))

    def forward(self, h: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> torch.Tensor:
        """One decode step; the norms and residual adds ride on the projections (gemv)."""
        proj, _ = norm_linear(h, None, self.input_norm, self.mixer.in_proj)
        h = residual_linear(self.mixer.decode(proj, conv_state, ssm_state), self.mixer.out_proj, h)
        h, delta = norm_mlp_residual(h, self.post_norm, self.mlp)
        return h if delta is None else h + delta

    def norm_folds(self):
        """(norm, the products it feeds): what gemv.fold_norm_weights may fold."""
        return [(self.input_norm, [self.mixer.in_proj]), (self.post_norm, [self.mlp.gate_up])]

    def load_hf(self, tensors: HFTensors, prefix: str) -> None:
        tensors.copy_into(self.input_norm.weight, prefix + "input_layernorm.weight")
        tensors.copy_into(self.post_norm.weight, prefix + "post_attention_layernorm.weight")
        self.mixer.load_hf(tensors, prefix + "linear_attn.")
        tensors.copy_into(self.mlp.gate_up.weight, prefix + "mlp.gate_proj.weight", prefix + "mlp.up_proj.weight")
        tensors.copy_into(self.mlp.down.weight, prefix + "mlp.down_proj.weight")


class GatedDeltaNetModel(RecurrentModel):
    """Gated DeltaNet LM with fixed-shape states; see the module docstring for the layout."""

    def __init__(self, spec: ModelSpec, device="cpu", dtype=torch.float32):
        # Read as a spec field if ModelSpec has one, else from the config's extra keys.
        n_v_heads = getattr(spec, "n_v_heads", 0) or spec.extra.get("n_v_heads", spec.n_heads)
        if not isinstance(n_v_heads, int) or n_v_heads <= 0 or n_v_heads % spec.n_heads:
            raise ConfigError(
                f"models.{spec.name}.n_v_heads: {n_v_heads!r}; allowed: a positive multiple of n_heads={spec.n_heads}"
            )
        factory = {"device": device, "dtype": dtype}
        blocks = [GatedDeltaNetBlock(spec, n_v_heads, **factory) for _ in range(spec.n_layers)]
        super().__init__(spec, blocks, ZeroCentredRMSNorm(spec.d_model, spec.norm_eps, **factory), device, dtype)
        self.n_v_heads = n_v_heads

    def load_hf_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Copy a Qwen3NextForCausalLM state dict (all layers linear attention, dense MLPs);
        its multi-token-prediction head (mtp.*) is not part of the model and is skipped."""
        tensors = HFTensors({k: v for k, v in state_dict.items() if not k.startswith("mtp.")})
        tensors.copy_into(self.embed.weight, "model.embed_tokens.weight")
        for i, layer in enumerate(self.layers):
            layer.load_hf(tensors, f"model.layers.{i}.")
        tensors.copy_into(self.final_norm.weight, "model.norm.weight")
        if not self.spec.tied_embeddings:
            tensors.copy_into(self.lm_head.weight, "lm_head.weight")
        elif tensors.has("lm_head.weight"):
            tensors.take("lm_head.weight")
        tensors.finish()
