"""Programmatic dependent launch (PDL, compute capability 9.0 and later) for the Triton kernels
of a decode step.

A decode step at batch 1 is a chain of short kernels (about six per layer), each waiting for
the previous one to finish before it launches, so every boundary leaves the GPU part idle
while one grid drains and the next ramps up. Launched with PDL, a kernel may start while its
predecessor finishes: it calls griddepcontrol.wait (tl.extra.cuda.gdc_wait) before it reads
anything another kernel writes, and griddepcontrol.launch_dependents right after it, so the
next PDL kernel can launch into the slots ours leave as they finish. The GEMV and MLA's absorb
and merge kernels also load their first weight tile before the wait: this needs that no
kernel launched right before a PDL kernel writes that kernel's weights (none in a decode step;
weights are loaded and folded at set-up, many kernels earlier). On an H200 PDL took the decode
step at batch 1 from 71% to 74% of the copy bandwidth for Qwen3-4B, 54% to 60% for MiniCPM3
(benchmarks/RESULTS.md, round 5).

Every kernel launched with PDL must wait on every path before its first dependent read and
its first store; a kernel launched without it is ordered as usual. One process-wide switch,
set by the native engine from its `pdl` option before it warms up, captures or runs a step
(a captured graph keeps the launches it recorded, whatever the switch says later).
"""

from __future__ import annotations

import functools
import os

import torch

MIN_CAPABILITY = 9
_switch = {"enabled": True, "launched": False}


def set_pdl(enabled: bool) -> None:
    """Launch the decode kernels with PDL where the GPU supports it (True) or never (False)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"set_pdl: enabled must be a bool, got {enabled!r}")
    _switch["enabled"] = enabled


def pdl_enabled() -> bool:
    """The switch set_pdl sets (whether a launch uses PDL also depends on the GPU)."""
    return _switch["enabled"]


def pdl_launch_args(capability: tuple[int, int] | None, enabled: bool, interpreted: bool) -> dict:
    """A kernel's PDL arguments: USE_PDL (the wait and trigger in the kernel) and launch_pdl
    (Triton's launch attribute), both on only when the switch is on, the GPU's compute
    capability is >= 9.0 and the kernel is compiled (the interpreter has no inline assembly).
    capability None: not a CUDA device."""
    use = enabled and not interpreted and capability is not None and capability[0] >= MIN_CAPABILITY
    return {"USE_PDL": use, "launch_pdl": use}


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def triton_importable() -> bool:
    """Whether Triton imports here (it ships with CUDA torch; CI's CPU machines have none): what
    decides whether the decode step's Triton kernels can be used at all. Not cached: once
    imported, asking again is a lookup in sys.modules."""
    import importlib

    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def interpreted() -> bool:
    """Whether Triton runs kernels in its interpreter (read by triton when a kernel is built)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _decide(device: torch.device) -> dict:
    """pdl_launch_args for a launch on `device` now."""
    in_interpreter = interpreted()
    capability = None
    if device.type == "cuda" and not in_interpreter:
        capability = _capability(device.index if device.index is not None else torch.cuda.current_device())
    return pdl_launch_args(capability, pdl_enabled(), in_interpreter)


def launch_args(device: torch.device) -> dict:
    """A kernel launcher's PDL arguments for a launch on `device` (noted for launched())."""
    args = _decide(device)
    if args["launch_pdl"]:
        _switch["launched"] = True
    return args


def reset_launched() -> None:
    """Forget earlier launches (launched() then says whether one came after this call)."""
    _switch["launched"] = False


def launched() -> bool:
    """Whether a kernel was launched with PDL since reset_launched (what the engine records).
    Since the greedy kernels (models/greedy.py) end every step, on a GPU that has PDL this
    is True whenever the switch is on, whatever the model's other kernels are."""
    return _switch["launched"]


def pdl_active(device: torch.device) -> bool:
    """Whether the decode kernels' launches on `device` would use PDL now."""
    return device.type == "cuda" and _decide(device)["launch_pdl"]
