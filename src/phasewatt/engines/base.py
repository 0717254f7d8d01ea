"""The Engine protocol and the factory the measure job uses."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from phasewatt.errors import ConfigError

ENGINES = ("native", "vllm", "sim", "microbench")


@runtime_checkable
class Engine(Protocol):
    """One model loaded for one (batch, prompt length, decode length).

    prefill() runs the whole batch of prompts from an empty cache and returns the tokens it
    processed; decode(n) generates n tokens per sequence continuing right after the prompt
    (so repeated decode calls do identical work) and returns the tokens generated.
    synchronize() returns once the device is idle: windows are closed only after it.
    """

    name: str

    def setup(self) -> dict: ...
    def prefill(self) -> int: ...
    def decode(self, n_steps: int) -> int: ...
    def synchronize(self) -> None: ...
    def describe(self) -> dict: ...
    def close(self) -> None: ...


def make_engine(name: str, *, spec, gpu, batch: int, prompt_len: int, decode_tokens: int, seed: int = 0, checkpoint=None, options=None):
    """Build the named engine lazily (native/vllm import torch/vllm only when chosen)."""
    if name == "sim":
        from phasewatt.engines.sim import SimEngine

        return SimEngine(spec=spec, gpu=gpu, batch=batch, prompt_len=prompt_len, decode_tokens=decode_tokens)
    if name == "native":
        from phasewatt.engines.native import NativeEngine

        return NativeEngine(spec=spec, gpu=gpu, batch=batch, prompt_len=prompt_len, decode_tokens=decode_tokens, seed=seed, checkpoint=checkpoint, options=options)
    if name == "vllm":
        from phasewatt.engines.vllm import VllmEngine

        return VllmEngine(spec=spec, gpu=gpu, batch=batch, prompt_len=prompt_len, decode_tokens=decode_tokens, seed=seed, checkpoint=checkpoint, options=options)
    if name == "microbench":
        from phasewatt.engines.microbench import MicrobenchEngine

        return MicrobenchEngine(spec=spec, gpu=gpu, batch=batch, prompt_len=prompt_len, decode_tokens=decode_tokens, options=options or {})
    raise ConfigError(f"engine: {name!r} is not an engine; allowed: {', '.join(ENGINES)}")
