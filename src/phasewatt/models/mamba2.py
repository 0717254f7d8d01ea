"""Mamba2 language model in the layout of transformers' Mamba2ForCausalLM (and the
state-spaces/mamba2-* checkpoints).

A layer: RMSNorm -> Mamba2 mixer -> residual (no MLP). The mixer projects to the gate z, the
conv input x|B|C and one time step per head; a causal conv (SiLU) runs over x|B|C;
dt = softplus(dt + dt_bias) clamped to time_step_limit; the SSD recurrence per head is
S <- exp(dt*A) S + B (dt*x)^T, y = S^T C + D*x, i.e. fla's simple GLA with q = C, k = B,
v = x*dt, g = dt*A, scale 1 (groups of heads share B and C); then y * SiLU(z) goes through a
grouped RMSNorm and the output projection.

State per layer and sequence: the conv window [d_inner + 2*n_groups*d_state, W-1] in the model
dtype and the SSD state [heads, d_state, head_dim] in float32. The residual stream stays in the
model dtype (transformers keeps it in float32: the same in float32, a rounding apart in bf16).
Optional spec.extra key: time_step_limit [min, max] (default no limit, as transformers).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from phasewatt.errors import ConfigError
from phasewatt.models import linear_ops, pdl, ssd_prefill
from phasewatt.models.gemv import Linear, gated_norm_residual, norm_linear
from phasewatt.models.layers import RMSNorm
from phasewatt.models.loader import HFTensors
from phasewatt.models.recurrent import RecurrentModel
from phasewatt.models.spec import ModelSpec


class GroupedGatedRMSNorm(nn.Module):
    """x * SiLU(gate), then RMSNorm over each of n_groups equal slices (gate before norm;
    gate None: x is gated already, as the decode step's SSD kernel returns it)."""

    weight_offset = 0.0  # the scale is the weight itself (what gemv.fold_norm_weights reads)

    def __init__(self, dim: int, n_groups: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.n_groups = n_groups
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        x32 = x.float() * F.silu(gate.float()) if gate is not None else x.float()
        grouped = x32.unflatten(-1, (self.n_groups, -1))
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * grouped.flatten(-2)).to(self.weight.dtype)


class Mamba2Mixer(nn.Module):
    # auto: 'triton' on CUDA (models/ssd_prefill.py), 'torch' elsewhere; 'fla': fla's
    # chunk_simple_gla with B and C copied out to every head (the path 'triton' replaced).
    prefill_backends = linear_ops.BACKENDS + ("triton",)

    def __init__(self, spec: ModelSpec, time_step_limit: tuple[float, float], device=None, dtype=None):
        super().__init__()
        self.d_inner = spec.d_inner
        self.n_heads = spec.mamba_heads
        self.head_dim = spec.head_dim
        self.n_groups = spec.n_groups
        self.d_state = spec.d_state
        self.chunk_size = spec.chunk_size
        self.conv_dim = spec.conv_channels()
        self.time_step_limit = time_step_limit
        factory = {"device": device, "dtype": dtype}
        # Rows: z | x | B | C | dt.
        self.in_proj = Linear(spec.d_model, self.d_inner + self.conv_dim + self.n_heads, bias=False, **factory)
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, spec.conv_size, **factory))
        self.conv_bias = nn.Parameter(torch.empty(self.conv_dim, **factory))
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads, **factory))
        self.A_log = nn.Parameter(torch.empty(self.n_heads, **factory))
        self.D = nn.Parameter(torch.empty(self.n_heads, **factory))
        self.norm = GroupedGatedRMSNorm(self.d_inner, self.n_groups, spec.norm_eps, **factory)
        self.out_proj = Linear(self.d_inner, spec.d_model, bias=False, **factory)
        self.backend = "auto"
        self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Random weights as Mamba2 initialises them: A = 1..heads, D = 1, time steps
        softplus(dt_bias) log-uniform in [1e-3, 1e-1], conv like nn.Conv1d's default."""
        nn.init.kaiming_uniform_(self.conv_weight.unsqueeze(1), a=math.sqrt(5))
        bound = 1.0 / math.sqrt(self.conv_weight.shape[-1])
        self.conv_bias.uniform_(-bound, bound)
        self.A_log.copy_(torch.arange(1, self.n_heads + 1, dtype=torch.float32).log())
        self.D.fill_(1.0)
        dt = torch.exp(torch.empty(self.n_heads).uniform_(math.log(1e-3), math.log(1e-1))).clamp(min=1e-4)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def _split(self, proj: torch.Tensor):
        z, xbc, dt = proj.split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)
        dt = F.softplus(dt.float() + self.dt_bias.float()).clamp(*self.time_step_limit)
        return z, xbc, dt

    def _ssm_inputs(self, xbc: torch.Tensor, dt: torch.Tensor):
        """From the conv output [..., conv_dim] and dt [..., H]: x [..., H, P], and q = C,
        k = B [..., H, N] (each group's B, C repeated for its heads), v = x*dt, g = dt*A."""
        x, b, c = xbc.split([self.d_inner, self.n_groups * self.d_state, self.n_groups * self.d_state], dim=-1)
        x = x.unflatten(-1, (self.n_heads, self.head_dim))
        per_group = self.n_heads // self.n_groups
        b = linear_ops.repeat_heads(b.unflatten(-1, (self.n_groups, self.d_state)), per_group)
        c = linear_ops.repeat_heads(c.unflatten(-1, (self.n_groups, self.d_state)), per_group)
        v = x.float() * dt.unsqueeze(-1)
        g = dt * -self.A_log.float().exp()
        return x, c, b, v, g

    def _gated(self, y: torch.Tensor, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """y + D x, gated by SiLU(z) and normed, flattened for out_proj."""
        y = y.float() + x.float() * self.D.float().unsqueeze(-1)
        return self.norm(y.flatten(-2), z)

    def prefill(self, h: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> torch.Tensor:
        if self.backend == "triton" and not h.is_cuda and not pdl.interpreted():
            raise ValueError("prefill backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 with triton installed)")
        proj = self.in_proj(h)
        if self.backend == "triton" or (self.backend == "auto" and proj.is_cuda):
            return self._prefill_kernels(proj, conv_state, ssm_state)
        z, xbc, dt = self._split(proj)
        xbc, window = linear_ops.causal_conv1d(xbc, self.conv_weight, self.conv_bias)
        conv_state.copy_(window)
        x, q, k, v, g = self._ssm_inputs(F.silu(xbc), dt)
        y, final = linear_ops.simple_gla_prefill(q, k, v, g, 1.0, self.chunk_size, backend=self.backend)
        ssm_state.copy_(final)
        return self.out_proj(self._gated(y, x, z))

    def _prefill_kernels(self, proj: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> torch.Tensor:
        """The prefill through models/ssd_prefill.py's kernels (B and C shared by each group's
        heads; conv, SSD, D skip and gate in four kernels). The norm's RMS of a row is a
        factor of that row's output projection, applied after it (one group), or to u before
        it (several)."""
        xbc = proj[..., self.d_inner : self.d_inner + self.conv_dim]
        conv_state.copy_(linear_ops.conv_window(xbc, self.conv_weight.shape[-1]))
        u, squares = ssd_prefill.mamba2_prefill_ssd(
            proj, self.conv_weight, self.conv_bias, self.dt_bias, self.A_log, self.D, self.norm.weight,
            *self.time_step_limit, self.n_groups, self.d_state, self.head_dim, ssm_state,
        )
        group_channels = self.d_inner // self.n_groups
        inv_rms = torch.rsqrt(squares.unflatten(-1, (self.n_groups, -1)).sum(-1) / group_channels + self.norm.eps)
        if self.n_groups == 1 and u.dtype == proj.dtype:
            return (self.out_proj(u).float() * inv_rms).to(proj.dtype)
        # Several groups, or float16 (u came back in float32: normed before the product).
        return self.out_proj((u.unflatten(-1, (self.n_groups, -1)).float() * inv_rms.unsqueeze(-1)).flatten(-2).to(proj.dtype))

    def decode(self, proj: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor):
        """One token from its input projection proj [B, in_proj rows]; returns the SSM output
        (y + D x) * SiLU(z) [B, d_inner] (float32), for the gated norm (its gate applied) and out_proj."""
        z, xbc, dt_raw = proj.split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)
        xbc = linear_ops.causal_conv1d_step_silu(xbc, conv_state, self.conv_weight, self.conv_bias)
        x, b, c = xbc.split([self.d_inner, self.n_groups * self.d_state, self.n_groups * self.d_state], dim=-1)
        y = linear_ops.mamba2_ssd_step(
            ssm_state, x, b, c, dt_raw, self.dt_bias, self.A_log, self.D, self.time_step_limit, self.n_heads // self.n_groups,
            gate=z,
        )
        return y

    def make_state(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        weight = self.in_proj.weight
        conv = torch.zeros(batch, self.conv_dim, self.conv_weight.shape[-1] - 1, device=weight.device, dtype=weight.dtype)
        ssm = torch.zeros(batch, self.n_heads, self.d_state, self.head_dim, device=weight.device, dtype=torch.float32)
        return conv, ssm

    def load_hf(self, tensors: HFTensors, prefix: str) -> None:
        tensors.copy_into(self.in_proj.weight, prefix + "in_proj.weight")
        tensors.copy_into(self.conv_weight.unsqueeze(1), prefix + "conv1d.weight")
        tensors.copy_into(self.conv_bias, prefix + "conv1d.bias")
        for name in ("dt_bias", "A_log", "D"):
            tensors.copy_into(getattr(self, name), prefix + name)
        tensors.copy_into(self.norm.weight, prefix + "norm.weight")
        tensors.copy_into(self.out_proj.weight, prefix + "out_proj.weight")


class Mamba2Block(nn.Module):
    def __init__(self, spec: ModelSpec, time_step_limit, device=None, dtype=None):
        super().__init__()
        self.norm = RMSNorm(spec.d_model, spec.norm_eps, device=device, dtype=dtype)
        self.mixer = Mamba2Mixer(spec, time_step_limit, device=device, dtype=dtype)

    def make_state(self, batch: int):
        return self.mixer.make_state(batch)

    def prefill(self, h: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> torch.Tensor:
        return h + self.mixer.prefill(self.norm(h), conv_state, ssm_state)

    def forward(self, h: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> torch.Tensor:
        """One decode step; the norm and the residual add ride on the projections (gemv)."""
        proj, _ = norm_linear(h, None, self.norm, self.mixer.in_proj)
        y = self.mixer.decode(proj, conv_state, ssm_state)
        return gated_norm_residual(y, None, self.mixer.norm, self.mixer.out_proj, h)

    def norm_folds(self):
        """(norm, the products it feeds): what gemv.fold_norm_weights may fold; the gated norm
        scales each channel after normalising, so its weight folds into out_proj too."""
        return [(self.norm, [self.mixer.in_proj]), (self.mixer.norm, [self.mixer.out_proj])]


class Mamba2Model(RecurrentModel):
    """Mamba2 LM with fixed-shape states; see the module docstring for the layout."""

    def __init__(self, spec: ModelSpec, device="cpu", dtype=torch.float32):
        limit = spec.extra.get("time_step_limit", (0.0, float("inf")))
        try:
            low, high = (float(x) for x in limit)
        except (TypeError, ValueError):
            low, high = 1.0, 0.0
        if not 0.0 <= low < high:
            raise ConfigError(f"models.{spec.name}.time_step_limit: {limit!r}; allowed: [min, max] with 0 <= min < max")
        if spec.mamba_heads % spec.n_groups:
            raise ConfigError(f"models.{spec.name}.n_groups: {spec.n_groups}; must divide the {spec.mamba_heads} heads")
        factory = {"device": device, "dtype": dtype}
        blocks = [Mamba2Block(spec, (low, high), **factory) for _ in range(spec.n_layers)]
        super().__init__(spec, blocks, RMSNorm(spec.d_model, spec.norm_eps, **factory), device, dtype)

    def load_hf_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Copy a Mamba2ForCausalLM state dict (or a mamba_ssm one: 'backbone.embedding.weight')."""
        tensors = HFTensors(state_dict)
        embed = "backbone.embedding.weight" if tensors.has("backbone.embedding.weight") else "backbone.embeddings.weight"
        tensors.copy_into(self.embed.weight, embed)
        for i, layer in enumerate(self.layers):
            tensors.copy_into(layer.norm.weight, f"backbone.layers.{i}.norm.weight")
            layer.mixer.load_hf(tensors, f"backbone.layers.{i}.mixer.")
        tensors.copy_into(self.final_norm.weight, "backbone.norm_f.weight")
        if not self.spec.tied_embeddings:
            tensors.copy_into(self.lm_head.weight, "lm_head.weight")
        elif tensors.has("lm_head.weight"):
            tensors.take("lm_head.weight")
        tensors.finish()
