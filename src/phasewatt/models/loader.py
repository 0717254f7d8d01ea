"""Real weights from a local Hugging Face checkpoint directory (safetensors).

load_checkpoint reads the tensors; each model's load_hf_state_dict maps the HF names onto its
own (fused) parameters through HFTensors, which names the missing, unexpected or mis-shaped
tensor in a one-line error.
"""

from __future__ import annotations

import json
from pathlib import Path

from phasewatt.errors import PhasewattError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(PhasewattError):
    """A checkpoint directory is missing, incomplete, or does not fit the model spec."""


def read_safetensors_dir(path) -> dict:
    """All tensors of a HF checkpoint directory (one file, or shards listed by the index)."""
    from safetensors.torch import load_file

    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"checkpoint: {root} is not a directory")
    if (root / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((root / INDEX_FILE).read_text())["weight_map"]
        except (ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint: {root / INDEX_FILE} has no readable weight_map ({exc})") from None
        shards = sorted(set(weight_map.values()))
    elif (root / SINGLE_FILE).is_file():
        shards = [SINGLE_FILE]
    else:
        raise CheckpointError(f"checkpoint: {root} has neither {SINGLE_FILE} nor {INDEX_FILE}")
    tensors = {}
    for shard in shards:
        if not (root / shard).is_file():
            raise CheckpointError(f"checkpoint: shard {shard} listed in {INDEX_FILE} is missing from {root}")
        tensors.update(load_file(str(root / shard), device="cpu"))
    return tensors


def load_checkpoint(model, path) -> None:
    """Copy a HF checkpoint's weights into `model` (any model with load_hf_state_dict)."""
    model.load_hf_state_dict(read_safetensors_dir(path))


class HFTensors:
    """HF-named tensors handed out once each, so that unused ones can be reported."""

    # Buffers some checkpoints carry that our models recompute.
    IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

    def __init__(self, state_dict: dict):
        self._left = dict(state_dict)

    def has(self, name: str) -> bool:
        return name in self._left

    def take(self, name: str):
        if name not in self._left:
            raise CheckpointError(f"checkpoint: tensor {name} is missing")
        return self._left.pop(name)

    def copy_into(self, param, *names: str, dim: int = 0) -> None:
        """Copy the named tensors (concatenated along `dim` when several) into `param`."""
        import torch

        parts = [self.take(n) for n in names]
        value = parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)
        if tuple(value.shape) != tuple(param.shape):
            joined = "+".join(names)
            raise CheckpointError(
                f"checkpoint: {joined} has shape {tuple(value.shape)}, the model spec needs {tuple(param.shape)}"
            )
        with torch.no_grad():
            param.copy_(value)

    def finish(self) -> None:
        """Raise if the checkpoint holds tensors the model has no place for."""
        left = sorted(n for n in self._left if not n.endswith(self.IGNORED_SUFFIXES))
        if left:
            more = f" (and {len(left) - 3} more)" if len(left) > 3 else ""
            raise CheckpointError(
                "checkpoint: tensors the model spec has no place for: " + ", ".join(left[:3]) + more
            )
