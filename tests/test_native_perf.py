"""The native engine's performance paths that CPU can check: the compiled prefill traces and
matches eager (row groups included), and the engine options that switch these paths."""

import sys
from pathlib import Path

import pytest
import torch

import phasewatt.models.decoder as decoder
import phasewatt.models.recurrent as recurrent
from phasewatt.engines.native import NativeEngine, resolve_options
from phasewatt.errors import ConfigError
from phasewatt.models.registry import build_model
from phasewatt.models.spec import ModelSpec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_native_engine import TINY  # noqa: E402


@pytest.mark.parametrize("arch", list(TINY))
def test_compiled_prefill_matches_eager_in_row_groups(arch, monkeypatch):
    """compile_prefill with a CPU backend: same logits and caches/states as eager, for the
    whole batch and for rows two at a time (cache views written through the compiled layer)."""
    spec = ModelSpec.from_config(f"tiny-{arch}", TINY[arch])
    eager, compiled = (build_model(spec, device="cpu", dtype=torch.float32, seed=3).eval() for _ in range(2))
    compiled.compile_prefill(backend="aot_eager")
    prompt = torch.randint(0, spec.vocab_size, (3, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for model in (eager, compiled):
            model.setup_caches(3, 20)
        for chunk_tokens in (10**6, 22):
            monkeypatch.setattr(decoder, "PREFILL_CHUNK_TOKENS", chunk_tokens)
            monkeypatch.setattr(recurrent, "PREFILL_CHUNK_TOKENS", chunk_tokens)
            for model in (eager, compiled):
                for tensors in getattr(model, "caches", None) or model.states:
                    for t in tensors:
                        t.zero_()
            expected, got = eager.prefill(prompt), compiled.prefill(prompt)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            mine = getattr(compiled, "caches", None) or compiled.states
            theirs = getattr(eager, "caches", None) or eager.states
            for a, b in zip(mine, theirs):
                for x, y in zip(a, b):
                    assert x.abs().sum() > 0
                    torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_performance_options_are_checked():
    assert resolve_options(None)["prefill_graph"] == "auto" and resolve_options(None)["coordinate_descent_tuning"] is True
    for key in ("compile_prefill", "prefill_graph"):
        with pytest.raises(ConfigError, match=f"engine_options.{key}"):
            resolve_options({key: "sometimes"})
    with pytest.raises(ConfigError, match="engine_options.coordinate_descent_tuning"):
        resolve_options({"coordinate_descent_tuning": "yes"})


def test_cpu_engine_neither_compiles_nor_captures_prefill():
    spec = ModelSpec.from_config("tiny-gqa", TINY["gqa"])
    engine = NativeEngine(spec=spec, gpu=None, batch=1, prompt_len=8, decode_tokens=2, device="cpu", options={"prefill_graph": True})
    setup = engine.setup()
    info = engine.describe()
    assert setup["prefill_capture_s"] == 0.0 and info["prefill_graph"] is False and info["compile_prefill"] is False
    assert info["decode_attention"] == "sdpa"  # the CUDA preference (matmul) applies on CUDA only
    engine.close()
