"""Reading a Hugging Face state dict by name, for the models' load_hf_state_dict: every tensor
is checked for presence and shape, and tensors the model never asked for are reported, so a
checkpoint of another layout fails with one line instead of loading half its weights."""

from __future__ import annotations

import torch

from phasewatt.errors import ConfigError


class HFStateReader:
    def __init__(self, state_dict: dict[str, torch.Tensor], model_name: str, arch: str):
        self.state_dict = state_dict
        self.model_name = model_name
        self.arch = arch
        self.used: set[str] = set()

    def __call__(self, name: str, shape: tuple) -> torch.Tensor:
        """The tensor `name`, which must have `shape`."""
        if name not in self.state_dict:
            raise ConfigError(f"checkpoints.{self.model_name}: tensor '{name}' missing from the checkpoint")
        tensor = self.state_dict[name]
        if tuple(tensor.shape) != tuple(shape):
            raise ConfigError(
                f"checkpoints.{self.model_name}: tensor '{name}' has shape {tuple(tensor.shape)}; "
                f"the spec needs {tuple(shape)}"
            )
        self.used.add(name)
        return tensor

    def first_present(self, names: tuple[str, ...]) -> str:
        """The first of several accepted spellings that the checkpoint has (else the first)."""
        return next((n for n in names if n in self.state_dict), names[0])

    def skip(self, name: str) -> None:
        """Mark an optional tensor as accounted for (e.g. lm_head.weight of a tied model)."""
        self.used.add(name)

    def finish(self, ignored_prefixes: tuple[str, ...] = ()) -> None:
        """Fail if the checkpoint holds tensors the model has no place for."""
        extra = sorted(k for k in self.state_dict if k not in self.used and not k.startswith(ignored_prefixes))
        if extra:
            shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
            raise ConfigError(
                f"checkpoints.{self.model_name}: tensors an arch '{self.arch}' model has no place for: {shown}"
            )
