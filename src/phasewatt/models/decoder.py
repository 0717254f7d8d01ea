"""The skeleton the attention models (gqa, mla) share: embedding, a stack of layers, the
final norm and lm_head, static caches, batch-chunked prefill and a shape-static decode step.

Residuals are passed between layers as (h, delta) and added at the start of the next layer,
so that when each layer is compiled the add fuses with that layer's first norm. Where a
layer's products go through the GEMV kernel (models.gemv) the add is the kernel's epilogue
instead and delta is None.
"""

from __future__ import annotations

import torch
from torch import nn

from phasewatt.errors import ConfigError
from phasewatt.models.gemv import Linear, norm_linear
from phasewatt.models.layers import RMSNorm, decode_mask, precompute_rope

# Cache lengths are rounded up to this, so every row of the attention mask is aligned for the
# fused attention kernels (masked tail positions cost a little extra reading, nothing else).
CACHE_LEN_MULTIPLE = 64

# How a decode step attends over the cache: one fused SDPA call, or two batched matrix
# products around a float32 softmax (more thread blocks at batch 1, the cache read twice).
# A model may offer more (decode_attentions; GQA's "fused" kernels); ALL_DECODE_ATTENTION is
# every name some model takes.
DECODE_ATTENTION = ("sdpa", "matmul")
ALL_DECODE_ATTENTION = DECODE_ATTENTION + ("fused",)

# A prefill processes at most this many tokens at a time (whole sequences, at least one), which
# bounds its activations; weights are re-read per chunk, which is negligible at this size.
PREFILL_CHUNK_TOKENS = 32768


def lm_head_linear(d_model: int, vocab_size: int, tied_weight: nn.Parameter | None, device, dtype) -> Linear:
    """The output projection: a matrix of its own, or a Linear sharing the embedding's weight
    (built on the meta device, so the tied case allocates no second matrix); either way its
    decode products go through the GEMV kernel like every other Linear's."""
    if tied_weight is None:
        return Linear(d_model, vocab_size, bias=False, device=device, dtype=dtype)
    lm_head = Linear(d_model, vocab_size, bias=False, device="meta", dtype=dtype)
    lm_head.weight = tied_weight
    return lm_head


class LMHead(nn.Module):
    """Final norm and output projection; `weight` is shared with the embedding when tied."""

    def __init__(self, d_model: int, vocab_size: int, eps: float, weight: nn.Parameter | None, logit_divisor: float, device, dtype):
        super().__init__()
        self.norm = RMSNorm(d_model, eps, device=device, dtype=dtype)
        self.tied = weight is not None
        self.lm_head = lm_head_linear(d_model, vocab_size, weight, device, dtype)
        self.logit_divisor = logit_divisor

    def norm_folds(self):
        """The final norm folds into an untied lm_head (a tied one is the embedding too)."""
        return [] if self.tied else [(self.norm, [self.lm_head])]

    def forward(self, h: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
        """Decode-step logits (the call compile_decode compiles)."""
        return self.logits(h, delta)

    def logits(self, h: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
        return norm_linear(h, delta, self.norm, self.lm_head, out_scale=1.0 / self.logit_divisor)[0]


class DecoderModel(nn.Module):
    """Subclasses build `self.layers`; each layer implements make_cache(batch, cache_len)
    (a tuple of zeroed tensors), forward(h, delta, input_pos, cos, sin, mask, cache) (decode)
    and prefill(h, delta, cos, sin, cache) (cache: views of the rows being prefilled). Caches
    are arguments, not buffers, so that a compiled layer is shape-generic in batch and cache
    length."""

    # Decode only writes cache positions after the prompt, so restarting a decode window needs
    # no new prefill (the engine re-prefills models without this, e.g. recurrent ones).
    decode_restarts_at_prompt_end = True

    def __init__(self, spec, device="cpu", dtype=torch.float32, *, rope_dim: int, embed_scale: float = 1.0, logit_divisor: float = 1.0):
        super().__init__()
        self.spec = spec
        self.rope_dim = rope_dim
        self.embed_scale = embed_scale
        self.embed = nn.Embedding(spec.vocab_size, spec.d_model, device=device, dtype=dtype)
        tied = self.embed.weight if spec.tied_embeddings else None
        self.head = LMHead(spec.d_model, spec.vocab_size, spec.norm_eps, tied, logit_divisor, device, dtype)
        self.cache_batch = self.cache_len = self.max_len = 0
        self.caches: list[tuple[torch.Tensor, ...]] = []
        self.register_buffer("rope_cos", torch.empty(0, device=device), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0, device=device), persistent=False)
        self.register_buffer("positions", torch.empty(0, device=device, dtype=torch.long), persistent=False)

    def copy_hf_mlp(self, src, layer: nn.Module, prefix: str) -> None:
        """The post-attention norm and SwiGLU MLP of one layer, named as in Llama-style
        checkpoints (model.layers.{i}.post_attention_layernorm, mlp.{gate,up,down}_proj);
        `src` is a loader.HFTensors."""
        src.copy_into(layer.mlp_norm.weight, prefix + "post_attention_layernorm.weight")
        src.copy_into(layer.mlp.gate_up.weight, prefix + "mlp.gate_proj.weight", prefix + "mlp.up_proj.weight")
        src.copy_into(layer.mlp.down.weight, prefix + "mlp.down_proj.weight")

    def copy_hf_head(self, src) -> None:
        """The final norm and, unless tied to the embedding, lm_head."""
        src.copy_into(self.head.norm.weight, "model.norm.weight")
        if not self.spec.tied_embeddings:
            src.copy_into(self.head.lm_head.weight, "lm_head.weight")
        elif src.has("lm_head.weight"):
            src.take("lm_head.weight")  # a tied checkpoint may store the shared matrix twice

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def setup_caches(self, batch: int, max_len: int) -> None:
        """Allocate zeroed caches for `batch` sequences of up to `max_len` tokens."""
        cache_len = -(-max_len // CACHE_LEN_MULTIPLE) * CACHE_LEN_MULTIPLE
        self.caches = []  # the old caches are freed before the new ones are allocated
        self.caches = [layer.make_cache(batch, cache_len) for layer in self.layers]
        cos, sin = precompute_rope(self.rope_dim, cache_len, self.spec.rope_theta, device=self.device)
        self.rope_cos, self.rope_sin = cos, sin
        self.positions = torch.arange(cache_len, device=self.device)
        self.cache_batch, self.cache_len, self.max_len = batch, cache_len, max_len

    def _embed(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        return h * self.embed_scale if self.embed_scale != 1.0 else h

    def _check_batch(self, batch: int, needed_len: int) -> None:
        if not self.cache_batch:
            raise RuntimeError("setup_caches(batch, max_len) must be called before prefill/decode")
        if batch != self.cache_batch or needed_len > self.max_len:
            raise ValueError(
                f"caches hold batch {self.cache_batch} x {self.max_len} tokens; asked for batch {batch} x {needed_len}"
            )

    def prefill(self, tokens: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Run whole prompts [B, S] from position 0, filling the caches; logits of the last
        position [B, V], or of every position [B, S, V]."""
        batch, seq = tokens.shape
        self._check_batch(batch, seq)
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        rows_per_chunk = max(1, PREFILL_CHUNK_TOKENS // seq)
        logits = []
        for start in range(0, batch, rows_per_chunk):
            rows = slice(start, min(batch, start + rows_per_chunk))
            h = self._embed(tokens[rows])
            delta = torch.zeros_like(h)
            for layer, cache in zip(self.layers, self.caches):
                h, delta = layer.prefill(h, delta, cos, sin, tuple(c[rows] for c in cache))
            if not all_logits:
                h, delta = h[:, -1], delta[:, -1]
            logits.append(self.head(h, delta))
        return logits[0] if len(logits) == 1 else torch.cat(logits)

    def decode(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """One step for tokens [B] at position input_pos [1] (a device tensor, so the step has
        fixed shapes and can be captured in a CUDA graph); logits [B, V]."""
        h = self._embed(tokens)
        delta = None
        # The fused kernels mask by input_pos themselves: no mask kernels in their step.
        mask = decode_mask(self.positions, input_pos, h.dtype) if self.decode_attention != "fused" else None
        for layer, cache in zip(self.layers, self.caches):
            h, delta = layer(h, delta, input_pos, self.rope_cos, self.rope_sin, mask, cache)
        return self.head(h, delta)

    decode_attentions = DECODE_ATTENTION

    @classmethod
    def fused_unsupported(cls, spec, dtype: torch.dtype, device_type: str) -> str | None:
        """Why the model's fused decode attention kernels cannot take this model (the start of
        a one-line error), or None; a model with such kernels lists "fused" in decode_attentions
        and says here where they fit."""
        if "fused" not in cls.decode_attentions:
            return f"no fused decode attention for the {spec.arch} model"
        return None

    @classmethod
    def cuda_decode_attention_for(cls, spec, dtype: torch.dtype) -> str:
        """What the engine picks on CUDA: the fused kernels where the model has them and they
        take it (far fewer kernels per layer than compiled matmuls), else matmul."""
        return "matmul" if cls.fused_unsupported(spec, dtype, "cuda") else "fused"

    @property
    def cuda_decode_attention(self) -> str:
        return self.cuda_decode_attention_for(self.spec, self.dtype)

    def set_decode_attention(self, kind: str) -> None:
        if kind not in self.decode_attentions:
            raise ConfigError(f"decode_attention: {kind!r}; allowed for {self.spec.arch}: " + ", ".join(self.decode_attentions))
        why = self.fused_unsupported(self.spec, self.dtype, self.device.type) if kind == "fused" else None
        if why:
            raise ConfigError(f"decode_attention: {why}; allowed: " + ", ".join(k for k in self.decode_attentions if k != "fused"))
        for layer in self.layers:
            layer.decode_attention = kind

    @property
    def decode_attention(self) -> str:
        return self.layers[0].decode_attention

    def compile_decode(self, mode: str = "default", dynamic: bool | None = None, backend: str = "inductor") -> None:
        """torch.compile each layer and the head on their own (regional compilation): one
        compile serves every layer, and elementwise work (norms, rope, residuals, SiLU) fuses
        into a few kernels per layer. The layers' prefill stays eager (layer.prefill); the
        compiled head serves prefill's last positions too, and a scaled embedding (MiniCPM3's)
        is compiled as well.
        dynamic=None: the first shapes are compiled static, a later change of batch or cache
        length recompiles shape-generic (torch's automatic dynamic shapes). Another backend
        (eager, aot_eager) checks that every layer traces as one graph without a GPU."""
        how = {"mode": mode} if backend == "inductor" else {"backend": backend}
        for module in list(self.layers) + [self.head]:
            module.compile(dynamic=dynamic, fullgraph=True, **how)
        if self.embed_scale != 1.0:  # the lookup and its scale in one kernel
            self._embed = torch.compile(self._embed, dynamic=dynamic, fullgraph=True, **how)

    def compile_prefill(self, mode: str = "default", dynamic: bool | None = None, backend: str = "inductor") -> None:
        """torch.compile each layer's prefill on its own: eager, a prefill launches ~70 small
        kernels per layer (float32 norms, rope, residuals, SwiGLU each several passes over the
        activations), which makes a short prompt launch-bound and a long one pay ~2x the
        GEMM time in elementwise traffic. Compiled, those fuse around the GEMMs and SDPA.
        Another backend (eager, aot_eager) checks the tracing without a GPU."""
        how = {"mode": mode} if backend == "inductor" else {"backend": backend}
        for layer in self.layers:
            layer.prefill = torch.compile(layer.prefill, dynamic=dynamic, fullgraph=True, **how)


def spec_extra(spec, key: str, default, kind=float):
    """An optional model key from the config (kept in spec.extra), checked for type."""
    value = spec.extra.get(key, default)
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"models.{spec.name}.{key}: {value!r}; allowed: true, false")
        return value
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"models.{spec.name}.{key}: {value!r} is not a {kind.__name__}") from None
