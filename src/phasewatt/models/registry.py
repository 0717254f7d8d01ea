"""Which module implements which architecture (imported lazily: torch only when needed)."""

from __future__ import annotations

import importlib

MODEL_CLASSES = {
    "gqa": ("phasewatt.models.gqa", "GQAModel"),
    "mla": ("phasewatt.models.mla", "MLAModel"),
    "gdn": ("phasewatt.models.gdn", "GatedDeltaNetModel"),
    "mamba2": ("phasewatt.models.mamba2", "Mamba2Model"),
}


def model_class(arch: str):
    module, name = MODEL_CLASSES[arch]
    return getattr(importlib.import_module(module), name)


def build_model(spec, *, device="cpu", dtype=None, seed: int = 0):
    """A model of `spec`'s shapes with random weights drawn from `seed`."""
    import torch

    dtype = dtype or getattr(torch, spec.dtype)
    torch.manual_seed(seed)
    return model_class(spec.arch)(spec, device=device, dtype=dtype)
