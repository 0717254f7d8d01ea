"""MicrobenchEngine: kernels of known FLOPs and bytes, sized from a model spec, so that the
harness and the NVML backend can be checked on a real GPU without a model.

The model's linear weights are laid out as row blocks of width d_model (each layer's
layer_linear_params() as blocks of at most `max_rows` rows, plus the vocab x d_model
lm_head), in the model's dtype, so one pass over them moves what one decode step of the
model reads. Then:

- prefill(): GEMMs Y = X W^T over every layer block with X = (batch * prompt_len tokens,
  d_model), and the lm_head for the last token of each sequence: the model's linear prefill
  FLOPs (2 * tokens * layer weights + 2 * batch * vocab * d_model), compute-bound.
- decode(n): n steps; one step is, by `decode_kernel`:
  - gemv: y = x W^T over every block, x = (batch, d_model): memory-bound at small batch;
  - copy: every block copied to a scratch buffer (device-to-device copy).

Bytes are operand bytes: each kernel reads its inputs once and writes its output once, a
lower bound on HBM traffic (a copy counts its read and its write). describe() gives FLOPs
and bytes per prefill call and per decode step, so a record's window times turn into
achieved FLOP/s and bandwidth. On CUDA the prefill and the decode step are each one CUDA
graph. Options (engine options, or a model entry's `microbench:` mapping): decode_kernel
(gemv | copy), max_rows, cuda_graphs, device (cuda | cpu; cpu runs the same kernels
without graphs, for tests).
"""

from __future__ import annotations

import math
import re
import time

from phasewatt.errors import ConfigError, PhasewattError

DECODE_KERNELS = ("gemv", "copy")
OPTIONS = {"decode_kernel", "max_rows", "cuda_graphs", "device"}
DEFAULT_MAX_ROWS = 16384
BYTES_DEFINITION = "operand bytes: inputs read once, outputs written once (a lower bound on HBM traffic)"


def _uuid_hex(value) -> str:
    """The 32 hex digits of a GPU UUID, whatever its spelling ('GPU-...', torch's bare form)."""
    text = str(value or "").lower()
    text = text[4:] if text.startswith("gpu-") else text
    digits = re.sub(r"[^0-9a-f]", "", text)
    return digits if len(digits) == 32 else ""


def weight_blocks(spec, max_rows: int) -> list[int]:
    """Row counts of the layer blocks (each d_model wide); the lm_head is separate."""
    layer_rows = math.ceil(spec.layer_linear_params() / spec.d_model)
    blocks = []
    for _ in range(spec.n_layers):
        remaining = layer_rows
        while remaining > 0:
            blocks.append(min(remaining, max_rows))
            remaining -= blocks[-1]
    return blocks


class MicrobenchEngine:
    name = "microbench"

    def __init__(self, *, spec, gpu, batch: int, prompt_len: int, decode_tokens: int, options: dict | None = None):
        settings = {**(spec.extra.get("microbench") or {}), **(options or {})}
        unknown = sorted(set(settings) - OPTIONS)
        if unknown:
            raise ConfigError(f"models.{spec.name}.microbench.{unknown[0]}: unknown option; allowed: {', '.join(sorted(OPTIONS))}")
        self.decode_kernel = settings.get("decode_kernel", "gemv")
        if self.decode_kernel not in DECODE_KERNELS:
            raise ConfigError(
                f"models.{spec.name}.microbench.decode_kernel: {self.decode_kernel!r} is not allowed; allowed: {', '.join(DECODE_KERNELS)}"
            )
        self.max_rows = int(settings.get("max_rows", DEFAULT_MAX_ROWS))
        if self.max_rows < 1:
            raise ConfigError(f"models.{spec.name}.microbench.max_rows: {self.max_rows} must be >= 1")
        self.device_kind = settings.get("device", "cuda")
        if self.device_kind not in ("cuda", "cpu"):
            raise ConfigError(f"models.{spec.name}.microbench.device: {self.device_kind!r} is not allowed; allowed: cuda, cpu")
        self.use_graphs = bool(settings.get("cuda_graphs", True)) and self.device_kind == "cuda"
        self.spec, self.gpu = spec, gpu
        self.batch, self.prompt_len, self.decode_tokens = batch, prompt_len, decode_tokens
        self.tokens = batch * prompt_len
        self.blocks = weight_blocks(spec, self.max_rows)
        self._costs()
        self._weights: list = []
        self._graphs: dict = {}

    # ----- what the kernels do -------------------------------------------------------------
    def _costs(self) -> None:
        """FLOPs and operand bytes of one prefill and one decode step (see module docstring)."""
        k, e = self.spec.d_model, self.spec.dtype_bytes
        vocab, batch, tokens = self.spec.vocab_size, self.batch, self.tokens
        self.weight_bytes = (sum(self.blocks) + vocab) * k * e
        self.prefill_flops = 2.0 * k * (tokens * sum(self.blocks) + batch * vocab)
        self.prefill_bytes = self.weight_bytes + e * (
            len(self.blocks) * tokens * k + tokens * sum(self.blocks) + batch * k + batch * vocab
        )
        self.prefill_kernels = len(self.blocks) + 1
        if self.decode_kernel == "gemv":
            self.decode_step_flops = 2.0 * batch * k * (sum(self.blocks) + vocab)
            self.decode_step_bytes = self.weight_bytes + e * batch * ((len(self.blocks) + 1) * k + sum(self.blocks) + vocab)
        else:
            self.decode_step_flops = 0.0
            self.decode_step_bytes = 2 * self.weight_bytes
        self.decode_kernels_per_step = len(self.blocks) + 1

    def _prefill_kernels(self) -> None:
        torch, x, y = self._torch, self._x, self._y
        for w in self._weights[:-1]:
            torch.mm(x, w.t(), out=y[: self.tokens * w.shape[0]].view(self.tokens, w.shape[0]))
        head = self._weights[-1]
        torch.mm(x[: self.batch], head.t(), out=self._y_head)

    def _decode_step_kernels(self) -> None:
        torch = self._torch
        if self.decode_kernel == "gemv":
            x, y = self._x_step, self._y_step
            for w in self._weights:
                torch.mm(x, w.t(), out=y[: self.batch * w.shape[0]].view(self.batch, w.shape[0]))
        else:
            for w in self._weights:
                self._scratch[: w.numel()].copy_(w.view(-1))

    # ----- Engine protocol -------------------------------------------------------------------
    def setup(self) -> dict:
        try:
            import torch
        except ImportError:
            raise PhasewattError("engine microbench: PyTorch is not installed") from None
        self._torch = torch
        t0 = time.perf_counter()
        if self.device_kind == "cuda":
            if not torch.cuda.is_available():
                raise PhasewattError("engine microbench: no CUDA device visible to PyTorch (torch.cuda.is_available() is False)")
            self._device = torch.device("cuda", torch.cuda.current_device())
            self._check_same_gpu(torch)
        else:
            self._device = torch.device("cpu")
        dtype = getattr(torch, self.spec.dtype)
        generator = torch.Generator(device=self._device).manual_seed(0)
        k = self.spec.d_model

        def tensor(*shape):
            return torch.randn(*shape, generator=generator, device=self._device, dtype=dtype) * 0.02

        self._weights = [tensor(rows, k) for rows in self.blocks] + [tensor(self.spec.vocab_size, k)]
        self._x = tensor(self.tokens, k)
        self._y = torch.empty(self.tokens * max(self.blocks), device=self._device, dtype=dtype)
        self._y_head = torch.empty(self.batch, self.spec.vocab_size, device=self._device, dtype=dtype)
        self._x_step = tensor(self.batch, k)
        if self.decode_kernel == "gemv":
            self._y_step = torch.empty(self.batch * max(max(self.blocks), self.spec.vocab_size), device=self._device, dtype=dtype)
        else:
            self._scratch = torch.empty(max(w.numel() for w in self._weights), device=self._device, dtype=dtype)
        self.synchronize()
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        if self.use_graphs:
            self._graphs = {"prefill": self._capture(self._prefill_kernels), "decode": self._capture(self._decode_step_kernels)}
        return {"build_s": build_s, "capture_s": time.perf_counter() - t0, "weight_bytes": self.weight_bytes}

    def _check_same_gpu(self, torch) -> None:
        """NVML indexes GPUs by PCI order, CUDA by speed unless CUDA_DEVICE_ORDER=PCI_BUS_ID:
        measure the GPU the kernels run on, or stop."""
        nvml_uuid = _uuid_hex(getattr(self.gpu, "uuid", None))
        cuda_uuid = _uuid_hex(getattr(torch.cuda.get_device_properties(self._device), "uuid", None))
        self.uuid_checked = bool(nvml_uuid and cuda_uuid)
        if self.uuid_checked and nvml_uuid != cuda_uuid:
            raise PhasewattError(
                f"engine microbench: CUDA device {self._device} is not the GPU that NVML measures (index {self.gpu.index}); "
                "set CUDA_DEVICE_ORDER=PCI_BUS_ID so that CUDA and NVML number GPUs alike"
            )

    def _capture(self, kernels):
        torch = self._torch
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            kernels()  # warm-up outside the graph (cuBLAS picks its kernels and workspace)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            kernels()
        return graph

    def prefill(self) -> int:
        if self.use_graphs:
            self._graphs["prefill"].replay()
        else:
            self._prefill_kernels()
        return self.tokens

    def decode(self, n_steps: int) -> int:
        if self.use_graphs:
            graph = self._graphs["decode"]
            for _ in range(n_steps):
                graph.replay()
        else:
            for _ in range(n_steps):
                self._decode_step_kernels()
        return self.batch * n_steps

    def synchronize(self) -> None:
        if self.device_kind == "cuda":
            self._torch.cuda.synchronize(self._device)

    def describe(self) -> dict:
        info = {
            "engine": "microbench",
            "prefill_kernel": "gemm",
            "decode_kernel": self.decode_kernel,
            "dtype": self.spec.dtype,
            "device": self.device_kind,
            "cuda_graphs": self.use_graphs,
            "d_model": self.spec.d_model,
            "weight_blocks_rows": self.blocks + [self.spec.vocab_size],
            "weight_bytes": self.weight_bytes,
            "prefill_tokens": self.tokens,
            "prefill_flops": self.prefill_flops,
            "prefill_bytes": self.prefill_bytes,
            "prefill_kernels": self.prefill_kernels,
            "decode_step_flops": self.decode_step_flops,
            "decode_step_bytes": self.decode_step_bytes,
            "decode_kernels_per_step": self.decode_kernels_per_step,
            "bytes_definition": BYTES_DEFINITION,
        }
        if hasattr(self, "uuid_checked"):
            info["cuda_nvml_same_gpu_checked"] = self.uuid_checked
        return info

    def close(self) -> None:
        self._graphs = {}
        self._weights = []
        for name in ("_x", "_y", "_y_head", "_x_step", "_y_step", "_scratch"):
            if hasattr(self, name):
                delattr(self, name)
        if self.device_kind == "cuda" and hasattr(self, "_torch"):
            self._torch.cuda.empty_cache()
