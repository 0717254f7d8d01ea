"""Our own PyTorch models behind the Engine protocol, built to run decode near the memory
roofline: static caches sized to prompt + decode length, the decode step (model, greedy
argmax, position advance) captured once as a CUDA graph, and each layer compiled on its own
with torch.compile so that the small elementwise ops fuse into a few kernels.

Prefill is compiled per layer too (eager, it is launch-bound at short prompts and pays
several passes over the activations per norm/rope/SwiGLU at long ones), and a short prefill
is captured as a CUDA graph as well (fla's kernels have a heavy Python launch path).
Inductor's coordinate-descent tuning is on: with it, a batch-1 matrix-vector product is
lowered to a Triton reduction that fuses with its neighbours and reaches the bandwidth a
cuBLAS GEMV does not at these sizes (the gpt-fast recipe).

On CPU (tests, CI) it runs eagerly in float32: no graph, no compile.
"""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext

from phasewatt.errors import ConfigError
from phasewatt.models.decoder import ALL_DECODE_ATTENTION
from phasewatt.models.gemv import AUTO_ROWS as GEMV_AUTO_ROWS, MAX_ROWS as GEMV_MAX_ROWS, fold_norm_weights, use_gemv
from phasewatt.models.loader import load_checkpoint
from phasewatt.models import greedy, pdl
from phasewatt.models.registry import build_model, model_class

DEFAULT_OPTIONS = {
    "cuda_graph": True,  # capture the decode step (CUDA only)
    "compile": "auto",  # true | false | auto (= on CUDA, when the model can be compiled per layer)
    "compile_mode": "default",  # torch.compile mode, e.g. max-autotune-no-cudagraphs
    "warmup_steps": 3,  # eager decode steps before capture (the first one compiles)
    "decode_attention": "auto",  # auto (the model's default on this device) | sdpa | matmul (gqa and mla) | fused (gqa, mla)
    "compile_prefill": "auto",  # true | false | auto (= whenever the decode step is compiled)
    "prefill_graph": "auto",  # true | false | auto (= on CUDA with cuda_graph, prompts of <= PREFILL_GRAPH_MAX_TOKENS)
    "coordinate_descent_tuning": True,  # inductor's tuning that turns batch-1 GEMVs into fused reductions
    "gemv_fuse": True,  # norms, SiLU*up and residual adds fused into the GEMV kernel, norm weights folded
    "gemv_max_rows": "auto",  # products of at most this many rows through the Triton GEMV (0: off; auto: see models.gemv)
    "pdl": "auto",  # the decode step's Triton kernels launched with programmatic dependent launch: auto/true = where the GPU has it (sm_90+), false = never
}
COMPILE_CHOICES = (True, False, "auto")

# A prefill of more tokens than this keeps the GPU busy on its own; capturing it as a graph
# would only hold its activations in the graph's memory pool for nothing.
PREFILL_GRAPH_MAX_TOKENS = 16384


def resolve_options(options: dict | None) -> dict:
    """Defaults overlaid with the user's engine options, each checked."""
    resolved = dict(DEFAULT_OPTIONS)
    for key, value in (options or {}).items():
        if key not in DEFAULT_OPTIONS:
            raise ConfigError(f"engine_options.{key}: not an option of the native engine; allowed: " + ", ".join(DEFAULT_OPTIONS))
        resolved[key] = value
    if not isinstance(resolved["cuda_graph"], bool):
        raise ConfigError(f"engine_options.cuda_graph: {resolved['cuda_graph']!r}; allowed: true, false")
    if resolved["compile"] not in COMPILE_CHOICES or not isinstance(resolved["compile"], (bool, str)):
        raise ConfigError(f"engine_options.compile: {resolved['compile']!r}; allowed: true, false, auto")
    if not isinstance(resolved["compile_mode"], str):
        raise ConfigError(f"engine_options.compile_mode: {resolved['compile_mode']!r} is not a torch.compile mode name")
    if not isinstance(resolved["warmup_steps"], int) or isinstance(resolved["warmup_steps"], bool) or resolved["warmup_steps"] < 1:
        raise ConfigError(f"engine_options.warmup_steps: {resolved['warmup_steps']!r}; allowed: an integer >= 1")
    for key in ("compile_prefill", "prefill_graph"):
        if resolved[key] not in COMPILE_CHOICES or not isinstance(resolved[key], (bool, str)):
            raise ConfigError(f"engine_options.{key}: {resolved[key]!r}; allowed: true, false, auto")
    if not isinstance(resolved["coordinate_descent_tuning"], bool):
        raise ConfigError(f"engine_options.coordinate_descent_tuning: {resolved['coordinate_descent_tuning']!r}; allowed: true, false")
    if not isinstance(resolved["gemv_fuse"], bool):
        raise ConfigError(f"engine_options.gemv_fuse: {resolved['gemv_fuse']!r}; allowed: true, false")
    if resolved["pdl"] not in COMPILE_CHOICES or not isinstance(resolved["pdl"], (bool, str)):
        raise ConfigError(f"engine_options.pdl: {resolved['pdl']!r}; allowed: true, false, auto")
    rows = resolved["gemv_max_rows"]
    if rows != "auto" and (not isinstance(rows, int) or isinstance(rows, bool) or not 0 <= rows <= GEMV_MAX_ROWS):
        raise ConfigError(f"engine_options.gemv_max_rows: {rows!r}; allowed: auto or an integer 0..{GEMV_MAX_ROWS}")
    if resolved["decode_attention"] not in ("auto",) + ALL_DECODE_ATTENTION:
        raise ConfigError(
            f"engine_options.decode_attention: {resolved['decode_attention']!r}; allowed: auto, " + ", ".join(ALL_DECODE_ATTENTION)
        )
    return resolved


class NativeEngine:
    name = "native"

    def __init__(self, *, spec, gpu=None, batch: int, prompt_len: int, decode_tokens: int, seed: int = 0, checkpoint=None, device=None, options=None):
        import torch

        self.spec, self.gpu = spec, gpu
        self.batch, self.prompt_len, self.decode_tokens = int(batch), int(prompt_len), int(decode_tokens)
        if min(self.batch, self.prompt_len, self.decode_tokens) < 1:
            raise ConfigError("native engine: batch, prompt length and decode tokens must each be >= 1")
        self.seed, self.checkpoint = int(seed), checkpoint
        self.options = resolve_options(options)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.on_cuda = self.device.type == "cuda"
        self.dtype = getattr(torch, spec.dtype) if self.on_cuda else torch.float32
        self._check_decode_attention()
        self.use_graph = self.on_cuda and self.options["cuda_graph"]
        self.compile_how = self._compile_how()
        self.compile_prefill = self.on_cuda and (
            self.options["compile_prefill"] is True or (self.options["compile_prefill"] == "auto" and self.compile_how != "none")
        )
        graph_prefill = self.options["prefill_graph"]
        self.want_prefill_graph = self.on_cuda and (
            graph_prefill is True
            or (graph_prefill == "auto" and self.use_graph and self.batch * self.prompt_len <= PREFILL_GRAPH_MAX_TOKENS)
        )
        self.model = self.graph = self.prefill_graph = None
        self.prefill_graph_error = None
        self.gemv_max_rows = 0
        self.norms_folded = 0
        self.pdl = False

    def _compile_how(self) -> str:
        """none | regional (the model's compile_decode) | whole (torch.compile of decode)."""
        choice = self.options["compile"]
        if choice is False or (choice == "auto" and not self.on_cuda):
            return "none"
        if hasattr(model_class(self.spec.arch), "compile_decode"):
            return "regional"
        return "whole" if choice is True else "none"

    # ----- set-up ---------------------------------------------------------------------------
    def _check_decode_attention(self) -> None:
        """A decode_attention the model offers, and "fused" only where the model's kernels take
        its dims and dtype (the model class says why not), before any GPU work."""
        kind = self.options["decode_attention"]
        if kind == "auto":
            return
        cls = model_class(self.spec.arch)
        offered = tuple(getattr(cls, "decode_attentions", ()))
        allowed = ", ".join(("auto",) + offered)
        if kind not in offered:
            raise ConfigError(f"engine_options.decode_attention: {kind!r} for the {self.spec.arch} model; allowed: {allowed}")
        why = cls.fused_unsupported(self.spec, self.dtype, self.device.type) if kind == "fused" else None
        if why:
            raise ConfigError(f"engine_options.decode_attention: {why}; allowed: auto, sdpa, matmul")

    def setup(self) -> dict:
        """Build, fill the caches once, compile and capture; seconds spent in each."""
        import torch

        times = {}
        t0 = time.perf_counter()
        model = build_model(self.spec, device=self.device, dtype=self.dtype, seed=self.seed)
        if self.checkpoint:
            load_checkpoint(model, self.checkpoint)
        self.model = model.eval().requires_grad_(False)
        if self.options["decode_attention"] != "auto":
            model.set_decode_attention(self.options["decode_attention"])
        elif self.on_cuda and getattr(model, "cuda_decode_attention", None):
            model.set_decode_attention(model.cuda_decode_attention)
        self.gemv_max_rows = self._gemv_max_rows()
        use_gemv(self.model, self.gemv_max_rows, fuse=self.options["gemv_fuse"])
        self._apply_pdl()
        pdl.reset_launched()
        if self.options["gemv_fuse"] and self.batch <= self.gemv_max_rows:
            self.norms_folded = fold_norm_weights(self.model)
        if self.compile_how != "none" or self.compile_prefill:
            self._configure_inductor()
        if self.compile_prefill and hasattr(self.model, "compile_prefill"):
            self.model.compile_prefill(mode=self.options["compile_mode"])
        gen = torch.Generator().manual_seed(self.seed)
        self.prompt = torch.randint(0, self.spec.vocab_size, (self.batch, self.prompt_len), generator=gen).to(self.device)
        with torch.no_grad():
            self.model.setup_caches(self.batch, self.prompt_len + self.decode_tokens)
            self.tokens = torch.zeros(self.batch, dtype=torch.long, device=self.device)
            self.first_tokens = torch.zeros_like(self.tokens)
            self.position = torch.full((1,), self.prompt_len, dtype=torch.long, device=self.device)
            times["build_s"] = time.perf_counter() - t0
            t = time.perf_counter()
            self.prefill()  # compiles the prefill when compile_prefill
            self.synchronize()
            times["prefill_first_s"] = time.perf_counter() - t

            self._decode_fn = self.model.decode
            if self.compile_how != "none":
                if self.compile_how == "regional":
                    self.model.compile_decode(mode=self.options["compile_mode"])
                else:
                    self._decode_fn = torch.compile(self.model.decode, mode=self.options["compile_mode"])
            times["compile_s"], times["warmup_s"] = self._warm_up()
            times["capture_s"] = self._capture() if self.use_graph else 0.0
            times["prefill_capture_s"] = self._capture_prefill() if self.want_prefill_graph else 0.0
            # Once more: compiling the decode step compiled the head for decode's inputs, so an
            # uncaptured prefill would compile it again on its next call (seconds, inside the
            # first measured window otherwise); and warm-up advanced a recurrent state (gdn,
            # mamba2), which must start again after the prompt.
            t = time.perf_counter()
            self.prefill()
            self.synchronize()
            times["prefill_again_s"] = time.perf_counter() - t
        self.pdl = pdl.launched()
        return times

    def _apply_pdl(self) -> None:
        """The PDL switch is process-wide and read at launch: set by every engine before it
        warms up and captures, and before every uncaptured prefill or decode, so one engine's
        choice never leaks into another's graphs or eager steps."""
        pdl.set_pdl(self.options["pdl"] is not False)

    def _gemv_max_rows(self) -> int:
        """The option, or for auto: the tuned kernel for batches of up to GEMV_AUTO_ROWS on
        CUDA where Triton is importable (it ships with CUDA torch); F.linear elsewhere."""
        rows = self.options["gemv_max_rows"]
        if rows != "auto":
            return rows
        if not self.on_cuda or self.batch > GEMV_AUTO_ROWS or not pdl.triton_importable():
            return 0
        return GEMV_AUTO_ROWS

    def _configure_inductor(self) -> None:
        """Process-wide inductor settings for the compiled layers: coordinate-descent tuning
        (fused Triton GEMVs at batch 1), and no inductor CUDA graphs (the engine captures its
        own graphs around whole steps)."""
        import torch._dynamo
        import torch._inductor.config as inductor_config

        # One compiled graph serves every layer; the headroom covers recompiles per shape.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 128)
        torch._dynamo.config.accumulated_cache_size_limit = max(torch._dynamo.config.accumulated_cache_size_limit, 1024)
        inductor_config.coordinate_descent_tuning = self.options["coordinate_descent_tuning"]
        inductor_config.triton.cudagraphs = False

    def _prefill_once(self) -> None:
        import torch

        with torch.no_grad():
            logits = self.model.prefill(self.prompt)
            greedy.next_tokens_(logits, self.first_tokens)

    def _capture_prefill(self) -> float:
        """Capture the whole prefill (prompt -> caches/states and first tokens) as a CUDA
        graph, after one run on a side stream. A prefill that cannot be captured (an op that
        syncs with the host) runs eagerly instead; the reason is kept for describe()."""
        import torch

        t = time.perf_counter()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(stream):
                self._prefill_once()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._prefill_once()
            self.synchronize()
            self.prefill_graph = graph
        except RuntimeError as exc:
            self.prefill_graph = None
            self.prefill_graph_error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
            print(f"native engine: prefill not captured as a CUDA graph, it runs eagerly ({self.prefill_graph_error})", file=sys.stderr)
            self.synchronize()
        return time.perf_counter() - t

    def _step(self) -> None:
        """One greedy decode step on the static buffers: next token and position in place."""
        logits = self._decode_fn(self.tokens, self.position)
        greedy.next_tokens_(logits, self.tokens, self.position)

    def _warm_up(self) -> tuple[float, float]:
        """Run the decode step eagerly (on a side stream on CUDA, as capture requires); the
        first call compiles. Returns (seconds of the first call if compiling, the rest)."""
        import torch

        stream = torch.cuda.Stream() if self.on_cuda else None
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream())
        seconds = []
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            self._reset_decode()
            for _ in range(self.options["warmup_steps"]):
                t = time.perf_counter()
                self._step()
                self.synchronize()
                seconds.append(time.perf_counter() - t)
        if stream is not None:
            torch.cuda.current_stream().wait_stream(stream)
        compile_s = seconds[0] if self.compile_how != "none" else 0.0
        return compile_s, sum(seconds) - compile_s

    def _capture(self) -> float:
        import torch

        t = time.perf_counter()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()
        self.synchronize()
        return time.perf_counter() - t

    def _reset_decode(self) -> None:
        self.tokens.copy_(self.first_tokens)
        self.position.fill_(self.prompt_len)

    # ----- the protocol ---------------------------------------------------------------------
    def prefill(self) -> int:
        """All prompts from an empty cache; keeps the greedy first tokens for decode."""
        if self.prefill_graph is not None:
            self.prefill_graph.replay()
        else:
            self._apply_pdl()
            self._prefill_once()
        return self.batch * self.prompt_len

    def decode(self, n_steps: int) -> int:
        """n_steps greedy tokens per sequence from the prompt's end: same positions and first
        token every call. A recurrent state (gdn, mamba2) carries on from the previous call
        instead of being restored; its step does the same work whatever the state holds."""
        import torch

        if not 1 <= n_steps <= self.decode_tokens:
            raise ValueError(f"decode({n_steps}): the caches hold 1 to {self.decode_tokens} decode steps")
        with torch.no_grad():
            self._reset_decode()
            if self.graph is None:
                self._apply_pdl()
            for _ in range(n_steps):
                if self.graph is not None:
                    self.graph.replay()
                else:
                    self._step()
        return self.batch * n_steps

    def generated_tokens(self):
        """The last token written by decode, per sequence (for checks)."""
        return self.tokens.clone()

    def synchronize(self) -> None:
        import torch

        if self.on_cuda:
            torch.cuda.synchronize(self.device)

    def describe(self) -> dict:
        import torch

        return {
            "engine": "native",
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name(self.device) if self.on_cuda else "cpu",
            "cuda": torch.version.cuda if self.on_cuda else None,
            "dtype": str(self.dtype).removeprefix("torch."),
            "cuda_graph": self.use_graph,
            "compile": self.compile_how,
            "compile_mode": self.options["compile_mode"] if self.compile_how != "none" else None,
            "decode_attention": getattr(self.model, "decode_attention", None),
            "compile_prefill": self.compile_prefill,
            "prefill_graph": self.prefill_graph is not None,
            "prefill_graph_error": self.prefill_graph_error,
            "gemv_max_rows": self.gemv_max_rows,
            "gemv_fuse": self.options["gemv_fuse"] if self.gemv_max_rows else None,
            "norms_folded": self.norms_folded,
            "pdl": self.pdl,
            "coordinate_descent_tuning": self.options["coordinate_descent_tuning"] if self.compile_how != "none" or self.compile_prefill else None,
            "cache_len": getattr(self.model, "cache_len", None),
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
        }

    def close(self) -> None:
        """Free the model, its caches and the graph (a compiled module refers to itself, so
        only a collection frees it) before the next engine of a sweep allocates its own."""
        import gc

        import torch

        self.graph = self.prefill_graph = self.model = self._decode_fn = None
        gc.collect()
        if self.on_cuda:
            torch.cuda.empty_cache()

