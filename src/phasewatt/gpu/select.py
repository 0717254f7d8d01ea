"""Choosing and opening the GPU a job measures on."""

from __future__ import annotations

import os
import sys

from phasewatt.errors import ConfigError
from phasewatt.gpu.locks import GpuAssignmentError, visible_gpu_indices


def nvidia_gpu_visible() -> bool:
    """True when NVML loads and reports at least one device."""
    try:
        import pynvml
    except ImportError:
        return False
    try:
        pynvml.nvmlInit()
    except Exception:
        return False
    try:
        return pynvml.nvmlDeviceGetCount() > 0
    except Exception:
        return False
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def resolve_device(device: str, quiet: bool = False) -> str:
    """auto -> nvml when an NVIDIA GPU is visible, else sim (said on stderr)."""
    if device in ("nvml", "sim", "none"):
        return device
    if device != "auto":
        raise ConfigError(f"device: {device!r} is not allowed; allowed: auto, nvml, sim, none")
    if nvidia_gpu_visible():
        return "nvml"
    if not quiet:
        print("phasewatt: no NVIDIA GPU visible: measuring on the SIMULATED GPU (device: sim)", file=sys.stderr)
    return "sim"


def resolve_engine(engine: str, device: str) -> str:
    if engine == "auto":
        return "sim" if device == "sim" else "native"
    if engine == "sim" and device != "sim":
        raise ConfigError("engine: 'sim' runs only on the simulated GPU; allowed with device nvml: native, vllm, microbench")
    if engine in ("native", "microbench") and device == "sim":
        raise ConfigError(f"engine: {engine!r} needs a real GPU (device: nvml); allowed with device sim: sim")
    if engine == "vllm" and device == "sim":
        raise ConfigError(
            "engine: 'vllm' runs on wall time, not on the simulator's clock; allowed with device sim: sim "
            "(vLLM without power readings: device none)"
        )
    return engine


def gpu_index_from_env() -> int:
    """The physical GPU index this process was given: the first of CUDA_VISIBLE_DEVICES, 0
    when it is unset. GPU indices only (what gpu.locks sets); a UUID is refused with one line
    rather than read as GPU 0, which could measure another GPU than the one computing."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    if not value:
        return 0
    indices = visible_gpu_indices(value)
    if not indices:
        raise GpuAssignmentError(f"CUDA_VISIBLE_DEVICES: {value!r} leaves no GPU; allowed: comma-separated GPU indices such as 0,1")
    return indices[0]


def open_gpu(device: str, gpu_key: str, index: int | None = None, seed: int = 0):
    """Open the GPU of this process; `seed` drives the simulator's run-to-run variation."""
    index = gpu_index_from_env() if index is None else index
    if device == "sim":
        from phasewatt.gpu.sim import SimGpu

        return SimGpu(gpu_key, index=index, seed=seed)
    if device == "nvml":
        from phasewatt.gpu.nvml import NvmlGpu

        return NvmlGpu(index)
    if device == "none":
        from phasewatt.gpu.null import NullGpu

        return NullGpu(gpu_key, index=index)
    raise ConfigError(f"device: {device!r} is not allowed; allowed: nvml, sim, none")
