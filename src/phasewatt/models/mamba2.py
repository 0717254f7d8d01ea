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
from phasewatt.models import linear_ops
from phasewatt.models.hf_state import HFStateReader
from phasewatt.models.layers import RMSNorm
from phasewatt.models.spec import ModelSpec


class GroupedGatedRMSNorm(nn.Module):
    """x * SiLU(gate), then RMSNorm over each of n_groups equal slices (gate before norm)."""

    def __init__(self, dim: int, n_groups: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.n_groups = n_groups
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        x32 = x.float() * F.silu(gate.float())
        grouped = x32.unflatten(-1, (self.n_groups, -1))
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * grouped.flatten(-2)).to(gate.dtype)


class Mamba2Mixer(nn.Module):
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
        self.in_proj = nn.Linear(spec.d_model, self.d_inner + self.conv_dim + self.n_heads, bias=False, **factory)
        self.conv_weight = nn.Parameter(torch.empty(self.conv_dim, spec.conv_size, **factory))
        self.conv_bias = nn.Parameter(torch.empty(self.conv_dim, **factory))
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads, **factory))
        self.A_log = nn.Parameter(torch.empty(self.n_heads, **factory))
        self.D = nn.Parameter(torch.empty(self.n_heads, **factory))
        self.norm = GroupedGatedRMSNorm(self.d_inner, self.n_groups, spec.norm_eps, **factory)
        self.out_proj = nn.Linear(self.d_inner, spec.d_model, bias=False, **factory)
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

    def _output(self, y: torch.Tensor, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        y = y.float() + x.float() * self.D.float().unsqueeze(-1)
        return self.out_proj(self.norm(y.flatten(-2), z))

    def prefill(self, h: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> torch.Tensor:
        z, xbc, dt = self._split(self.in_proj(h))
        xbc, window = linear_ops.causal_conv1d(xbc, self.conv_weight, self.conv_bias)
        conv_state.copy_(window)
        x, q, k, v, g = self._ssm_inputs(F.silu(xbc), dt)
        y, final = linear_ops.simple_gla_prefill(q, k, v, g, 1.0, self.chunk_size, backend=self.backend)
        ssm_state.copy_(final)
        return self._output(y, x, z)

    def decode(self, h: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> torch.Tensor:
        z, xbc, dt = self._split(self.in_proj(h))
        xbc = F.silu(linear_ops.causal_conv1d_step(xbc, conv_state, self.conv_weight, self.conv_bias))
        x, q, k, v, g = self._ssm_inputs(xbc, dt)
        y = linear_ops.simple_gla_step(ssm_state, q, k, v, g, 1.0)
        return self._output(y, x, z)

    def load_hf(self, take, prefix: str) -> None:
        d = self.in_proj.in_features
        width = self.conv_weight.shape[-1]
        with torch.no_grad():
            self.in_proj.weight.copy_(take(prefix + "in_proj.weight", (self.in_proj.out_features, d)))
            self.conv_weight.copy_(take(prefix + "conv1d.weight", (self.conv_dim, 1, width))[:, 0])
            self.conv_bias.copy_(take(prefix + "conv1d.bias", (self.conv_dim,)))
            for name in ("dt_bias", "A_log", "D"):
                getattr(self, name).copy_(take(prefix + name, (self.n_heads,)))
            self.norm.weight.copy_(take(prefix + "norm.weight", (self.d_inner,)))
            self.out_proj.weight.copy_(take(prefix + "out_proj.weight", (d, self.d_inner)))


class Mamba2Block(nn.Module):
    def __init__(self, spec: ModelSpec, time_step_limit, device=None, dtype=None):
        super().__init__()
        self.norm = RMSNorm(spec.d_model, spec.norm_eps, device=device, dtype=dtype)
        self.mixer = Mamba2Mixer(spec, time_step_limit, device=device, dtype=dtype)
        self.register_buffer("conv_state", None, persistent=False)
        self.register_buffer("ssm_state", None, persistent=False)

    def forward(self, h: torch.Tensor, decode: bool) -> torch.Tensor:
        mix = self.mixer.decode if decode else self.mixer.prefill
        return h + mix(self.norm(h), self.conv_state, self.ssm_state)


class Mamba2Model(nn.Module):
    """Mamba2 LM with fixed-shape states; see the module docstring for the layout."""

    def __init__(self, spec: ModelSpec, device="cpu", dtype=torch.float32):
        super().__init__()
        self.spec = spec
        limit = spec.extra.get("time_step_limit", (0.0, float("inf")))
        if len(limit) != 2 or not 0 <= float(limit[0]) < float(limit[1]):
            raise ConfigError(f"models.{spec.name}.time_step_limit: {limit}; a pair [min, max] with 0 <= min < max")
        if spec.mamba_heads % spec.n_groups:
            raise ConfigError(
                f"models.{spec.name}.n_groups: {spec.n_groups} must divide the {spec.mamba_heads} heads"
            )
        limit = (float(limit[0]), float(limit[1]))
        factory = {"device": device, "dtype": dtype}
        self.embed = nn.Embedding(spec.vocab_size, spec.d_model, **factory)
        self.layers = nn.ModuleList(Mamba2Block(spec, limit, **factory) for _ in range(spec.n_layers))
        self.norm_f = RMSNorm(spec.d_model, spec.norm_eps, **factory)
        self.lm_head = None if spec.tied_embeddings else nn.Linear(spec.d_model, spec.vocab_size, bias=False, **factory)
        self.cache_batch = 0

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

    def setup_caches(self, batch: int, max_len: int) -> None:
        """Allocate zeroed conv and SSD states for `batch` sequences. Their size does not depend
        on the sequence length, so max_len only documents the caller's intent."""
        weight = self.embed.weight
        for layer in self.layers:
            mixer = layer.mixer
            layer.conv_state = torch.zeros(
                batch, mixer.conv_dim, mixer.conv_weight.shape[-1] - 1, device=weight.device, dtype=weight.dtype
            )
            layer.ssm_state = torch.zeros(
                batch, mixer.n_heads, mixer.d_state, mixer.head_dim, device=weight.device, dtype=torch.float32
            )
        self.cache_batch = batch

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        h = self.norm_f(h)
        return F.linear(h, self.embed.weight) if self.lm_head is None else self.lm_head(h)

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Run the prompts tokens [B, S] from empty states (which it overwrites); logits of the
        last position [B, V], or of every position [B, S, V]."""
        if tokens.shape[0] != self.cache_batch:
            raise ValueError(f"batch {tokens.shape[0]} but setup_caches was called for batch {self.cache_batch}")
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

    def load_hf_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Copy a Mamba2ForCausalLM state dict (or a mamba_ssm one: 'backbone.embedding.weight')."""
        take = HFStateReader(state_dict, self.spec.name, "mamba2")
        d = self.spec.d_model
        with torch.no_grad():
            embed = take.first_present(("backbone.embeddings.weight", "backbone.embedding.weight"))
            self.embed.weight.copy_(take(embed, (self.spec.vocab_size, d)))
            for i, layer in enumerate(self.layers):
                layer.norm.weight.copy_(take(f"backbone.layers.{i}.norm.weight", (d,)))
                layer.mixer.load_hf(take, f"backbone.layers.{i}.mixer.")
            self.norm_f.weight.copy_(take("backbone.norm_f.weight", (d,)))
            if self.lm_head is None:
                take.skip("lm_head.weight")
            else:
                self.lm_head.weight.copy_(take("lm_head.weight", (self.spec.vocab_size, d)))
        take.finish()
