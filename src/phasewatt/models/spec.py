"""Shape specs of the four attention architectures and what one forward step costs.

The costs (FLOPs, HBM bytes, kernel launches, memory footprint) feed the simulated GPU,
the roofline figures and the feasibility check. They are analytic counts from the shapes,
not measurements; approximations are named where they are made.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

ARCHITECTURES = ("gqa", "mla", "gdn", "mamba2")

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}

# Recurrent states (Gated DeltaNet, Mamba2) are kept in float32, as fla's kernels accumulate them.
STATE_BYTES = 4

# Kernel launches per layer in one decode step of a straightforward fused implementation
# (norm, projections, rope/conv, attention or recurrence, output projection, MLP, residuals).
# Used only by the simulator's per-kernel overhead; an approximation by reading the models.
KERNELS_PER_LAYER = {"gqa": 10, "mla": 16, "gdn": 14, "mamba2": 8}
KERNELS_OUTSIDE_LAYERS = 4  # embedding, final norm, lm_head, sampling

# Fields each architecture needs beyond the common ones.
ARCH_FIELDS = {
    "gqa": ("n_heads", "n_kv_heads", "head_dim", "d_ff"),
    "mla": (
        "n_heads",
        "q_lora_rank",
        "kv_lora_rank",
        "qk_nope_head_dim",
        "qk_rope_head_dim",
        "v_head_dim",
        "d_ff",
    ),
    "gdn": ("n_heads", "head_dim", "expand_v", "conv_size", "d_ff"),
    "mamba2": ("d_state", "head_dim", "expand", "n_groups", "conv_size", "chunk_size"),
}


@dataclass(frozen=True)
class StepCost:
    """Work of one engine call (a whole prefill, or one decode step) for the whole batch."""

    flops: float
    hbm_bytes: float
    kernels: int
    tokens: int

    @property
    def arithmetic_intensity(self) -> float:
        return self.flops / self.hbm_bytes


@dataclass(frozen=True)
class ModelSpec:
    """Shapes of one model. Field names follow config.yaml."""

    name: str
    arch: str
    n_layers: int
    d_model: int
    vocab_size: int
    source: str = ""
    tied_embeddings: bool = False
    dtype: str = "bfloat16"
    d_ff: int = 0
    n_heads: int = 0
    n_kv_heads: int = 0
    head_dim: int = 0
    qk_norm: bool = False
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    expand_v: int = 1
    n_v_heads: int = 0  # Gated DeltaNet value heads; 0 = n_heads
    conv_size: int = 4
    d_state: int = 0
    expand: int = 2
    n_groups: int = 1
    chunk_size: int = 256
    extra: dict = field(default_factory=dict, compare=False)

    @classmethod
    def from_config(cls, name: str, entry: dict) -> "ModelSpec":
        known = {f.name for f in fields(cls)} - {"name", "extra"}
        values = {k: v for k, v in entry.items() if k in known}
        extra = {k: v for k, v in entry.items() if k not in known}
        spec = cls(name=name, extra=extra, **values)
        spec.check()
        return spec

    def check(self) -> None:
        from phasewatt.errors import ConfigError

        if self.arch not in ARCHITECTURES:
            raise ConfigError(
                f"models.{self.name}.arch: '{self.arch}' is not an architecture; allowed: "
                + ", ".join(ARCHITECTURES)
            )
        for key in ("n_layers", "d_model", "vocab_size") + ARCH_FIELDS[self.arch]:
            if int(getattr(self, key)) <= 0:
                raise ConfigError(
                    f"models.{self.name}.{key}: required for arch {self.arch}, a positive integer"
                )
        if self.dtype not in DTYPE_BYTES:
            raise ConfigError(
                f"models.{self.name}.dtype: '{self.dtype}'; allowed: " + ", ".join(DTYPE_BYTES)
            )
        if self.arch == "gdn" and self.gdn_v_heads % self.n_heads:
            raise ConfigError(
                f"models.{self.name}.n_v_heads: must be a multiple of n_heads = {self.n_heads}"
            )
        if self.arch == "mamba2" and (self.d_inner % self.head_dim):
            raise ConfigError(
                f"models.{self.name}.head_dim: must divide expand * d_model = {self.d_inner}"
            )

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out.update(self.extra)
        return out

    # ----- derived shapes -------------------------------------------------------------
    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def d_inner(self) -> int:
        """Mamba2's inner width (expand * d_model)."""
        return self.expand * self.d_model

    @property
    def mamba_heads(self) -> int:
        return self.d_inner // self.head_dim

    @property
    def gdn_key_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def gdn_v_heads(self) -> int:
        return self.n_v_heads or self.n_heads

    @property
    def gdn_value_dim(self) -> int:
        return self.gdn_v_heads * self.head_dim * self.expand_v

    def conv_channels(self) -> int:
        if self.arch == "gdn":
            return 2 * self.gdn_key_dim + self.gdn_value_dim
        if self.arch == "mamba2":
            return self.d_inner + 2 * self.n_groups * self.d_state
        return 0

    # ----- parameters -------------------------------------------------------------------
    def layer_linear_params(self) -> int:
        """Weights of one layer that take part in matrix products (norms and biases excluded)."""
        d = self.d_model
        mlp = 3 * d * self.d_ff
        if self.arch == "gqa":
            q = d * self.n_heads * self.head_dim
            kv = 2 * d * self.n_kv_heads * self.head_dim
            o = self.n_heads * self.head_dim * d
            return q + kv + o + mlp
        if self.arch == "mla":
            qk_head = self.qk_nope_head_dim + self.qk_rope_head_dim
            q = d * self.q_lora_rank + self.q_lora_rank * self.n_heads * qk_head
            kv_a = d * (self.kv_lora_rank + self.qk_rope_head_dim)
            kv_b = self.kv_lora_rank * self.n_heads * (self.qk_nope_head_dim + self.v_head_dim)
            o = self.n_heads * self.v_head_dim * d
            return q + kv_a + kv_b + o + mlp
        if self.arch == "gdn":
            qk = 2 * d * self.gdn_key_dim
            v_and_gate = 2 * d * self.gdn_value_dim
            beta_alpha = 2 * d * self.gdn_v_heads
            o = self.gdn_value_dim * d
            return qk + v_and_gate + beta_alpha + o + mlp
        in_proj = d * (2 * self.d_inner + 2 * self.n_groups * self.d_state + self.mamba_heads)
        out_proj = self.d_inner * d
        return in_proj + out_proj

    def layer_other_params(self) -> int:
        """Norm weights, conv filters and per-head scalars of one layer."""
        d = self.d_model
        if self.arch == "gqa":
            return 2 * d + (2 * self.head_dim if self.qk_norm else 0)
        if self.arch == "mla":
            return 2 * d + self.q_lora_rank + self.kv_lora_rank
        if self.arch == "gdn":
            return 2 * d + self.conv_channels() * self.conv_size + 2 * self.gdn_v_heads + self.head_dim * self.expand_v
        return d + self.conv_channels() * (self.conv_size + 1) + 3 * self.mamba_heads + self.d_inner

    def embedding_params(self) -> int:
        return self.vocab_size * self.d_model

    def param_count(self) -> int:
        layers = self.n_layers * (self.layer_linear_params() + self.layer_other_params())
        heads = 1 if self.tied_embeddings else 2
        return layers + heads * self.embedding_params() + self.d_model

    def weight_bytes(self) -> int:
        return self.param_count() * self.dtype_bytes

    def weight_bytes_read_per_step(self) -> int:
        """Weights streamed from HBM by one forward: everything but the embedding table,
        of which only the looked-up rows are read; a tied lm_head reads it whole."""
        read = self.n_layers * (self.layer_linear_params() + self.layer_other_params())
        read += self.embedding_params() + self.d_model  # lm_head (tied or not) + final norm
        return read * self.dtype_bytes

    # ----- caches and states -------------------------------------------------------------
    def cache_bytes_per_token(self) -> int:
        """Bytes one token adds to the cache of one sequence (0 for recurrent models)."""
        if self.arch == "gqa":
            return 2 * self.n_layers * self.n_kv_heads * self.head_dim * self.dtype_bytes
        if self.arch == "mla":
            return self.n_layers * (self.kv_lora_rank + self.qk_rope_head_dim) * self.dtype_bytes
        return 0

    def state_bytes_per_sequence(self) -> int:
        """Fixed-size recurrent and conv state of one sequence (0 for attention models)."""
        conv = self.conv_channels() * (self.conv_size - 1) * self.dtype_bytes
        if self.arch == "gdn":
            return self.n_layers * (self.gdn_v_heads * self.head_dim * self.head_dim * self.expand_v * STATE_BYTES + conv)
        if self.arch == "mamba2":
            return self.n_layers * (self.mamba_heads * self.head_dim * self.d_state * STATE_BYTES + conv)
        return 0

    def memory_bytes(self, batch: int, total_len: int) -> int:
        """Peak device memory of a run: weights, cache/state, and the prefill activations
        (hidden states and the widest intermediate of one layer, logits of the last token)."""
        cache = batch * (total_len * self.cache_bytes_per_token() + self.state_bytes_per_sequence())
        widest = max(2 * self.d_ff, 2 * self.d_inner + 2 * self.d_state, 4 * self.d_model)
        activations = batch * total_len * (4 * self.d_model + widest) * self.dtype_bytes
        logits = batch * self.vocab_size * 4
        return self.weight_bytes() + cache + activations + logits

    # ----- FLOPs ------------------------------------------------------------------------
    def _mixer_flops_per_token(self, context: int) -> float:
        """Attention or recurrence FLOPs of one layer for one new token that sees `context`
        tokens (itself included). Decode form: MLA absorbed, recurrences as state updates."""
        if self.arch == "gqa":
            return 4.0 * self.n_heads * self.head_dim * context
        if self.arch == "mla":
            return 2.0 * self.n_heads * (2 * self.kv_lora_rank + self.qk_rope_head_dim) * context
        if self.arch == "gdn":
            return 8.0 * self.gdn_v_heads * self.head_dim * self.head_dim * self.expand_v
        return 6.0 * self.mamba_heads * self.head_dim * self.d_state

    def _prefill_mixer_flops(self, prompt: int) -> float:
        """Mixer FLOPs of one layer over a whole causal prompt of one sequence."""
        pairs = prompt * (prompt + 1) / 2.0
        if self.arch == "gqa":
            return 4.0 * self.n_heads * self.head_dim * pairs
        if self.arch == "mla":
            qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            return 2.0 * self.n_heads * (qk + self.v_head_dim) * pairs
        if self.arch == "gdn":
            # Chunked delta rule (chunk 64): intra-chunk products plus one state pass per
            # token. Approximation of fla's chunk_gated_delta_rule work.
            chunk = 64
            dk, dv = self.head_dim, self.head_dim * self.expand_v
            return prompt * self.gdn_v_heads * (4.0 * chunk * (dk + dv) + 6.0 * dk * dv)
        # Mamba2 SSD (chunk_size): intra-chunk C^T B and its product with x, plus the
        # inter-chunk state pass. Approximation of the SSD algorithm's work.
        chunk = self.chunk_size
        per_head = 2.0 * chunk * self.head_dim + 6.0 * self.head_dim * self.d_state
        return prompt * (self.mamba_heads * per_head + self.n_groups * 2.0 * chunk * self.d_state)

    def linear_flops_per_token(self) -> float:
        return 2.0 * (self.n_layers * self.layer_linear_params() + self.embedding_params())

    # ----- step costs -------------------------------------------------------------------
    def decode_step_cost(self, batch: int, context: int) -> StepCost:
        """One decode step for `batch` sequences, each attending to `context` tokens."""
        flops = batch * (
            self.linear_flops_per_token() + self.n_layers * self._mixer_flops_per_token(context)
        )
        cache_read = batch * context * self.cache_bytes_per_token()
        cache_write = batch * self.cache_bytes_per_token()
        state_rw = 2 * batch * self.state_bytes_per_sequence()
        activations = 2 * batch * self.n_layers * 8 * self.d_model * self.dtype_bytes
        hbm = self.weight_bytes_read_per_step() + cache_read + cache_write + state_rw + activations
        kernels = self.n_layers * KERNELS_PER_LAYER[self.arch] + KERNELS_OUTSIDE_LAYERS
        return StepCost(flops=flops, hbm_bytes=float(hbm), kernels=kernels, tokens=batch)

    def prefill_cost(self, batch: int, prompt: int) -> StepCost:
        """The whole prefill of `batch` prompts of `prompt` tokens (logits of the last token)."""
        tokens = batch * prompt
        linear = 2.0 * tokens * self.n_layers * self.layer_linear_params()
        lm_head = 2.0 * batch * self.embedding_params()
        mixer = batch * self.n_layers * self._prefill_mixer_flops(prompt)
        widest = max(2 * self.d_ff, 2 * self.d_inner)
        # Each layer writes and re-reads its activations once (fused kernels assumed).
        activations = 2 * tokens * self.n_layers * (6 * self.d_model + widest) * self.dtype_bytes
        cache_write = tokens * self.cache_bytes_per_token() + batch * self.state_bytes_per_sequence()
        hbm = self.weight_bytes_read_per_step() + activations + cache_write
        kernels = self.n_layers * KERNELS_PER_LAYER[self.arch] + KERNELS_OUTSIDE_LAYERS
        return StepCost(flops=linear + lm_head + mixer, hbm_bytes=float(hbm), kernels=kernels, tokens=tokens)
