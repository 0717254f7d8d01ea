"""The native engine's protocol on CPU (eager, float32) for every architecture whose model
module exists, tiny shapes; and the decode-roofline benchmark's smoke run."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from phasewatt.engines.base import Engine, make_engine
from phasewatt.engines.native import NativeEngine, resolve_options
from phasewatt.errors import ConfigError
from phasewatt.models.loader import CheckpointError
from phasewatt.models.registry import MODEL_CLASSES, build_model
from phasewatt.models.spec import ModelSpec

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "gqa": dict(arch="gqa", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=96, vocab_size=128, qk_norm=True, tied_embeddings=True),
    "mla": dict(arch="mla", n_layers=2, d_model=64, n_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12, d_ff=96, vocab_size=128),
    "gdn": dict(arch="gdn", n_layers=2, d_model=64, n_heads=2, head_dim=16, expand_v=2, conv_size=4, d_ff=96, vocab_size=128),
    "mamba2": dict(arch="mamba2", n_layers=2, d_model=64, d_state=16, head_dim=16, expand=2, n_groups=1, conv_size=4, chunk_size=8, vocab_size=128, tied_embeddings=True),
}
ATTENTION = ("gqa", "mla")
BATCH, PROMPT, DECODE = 2, 11, 6


def arch_available(arch: str) -> bool:
    return importlib.util.find_spec(MODEL_CLASSES[arch][0]) is not None


ARCHS = [pytest.param(a, marks=pytest.mark.skipif(not arch_available(a), reason=f"no {a} model yet")) for a in TINY]


def engine_for(arch: str, **kw) -> NativeEngine:
    spec = ModelSpec.from_config(f"tiny-{arch}", TINY[arch])
    return NativeEngine(spec=spec, gpu=None, batch=BATCH, prompt_len=PROMPT, decode_tokens=DECODE, seed=3, device="cpu", **kw)


def greedy_tokens(arch: str, prompt: torch.Tensor, steps: int) -> torch.Tensor:
    """The model's own greedy continuation, built from the same seed as the engine's."""
    model = build_model(ModelSpec.from_config(f"tiny-{arch}", TINY[arch]), device="cpu", dtype=torch.float32, seed=3).eval()
    with torch.no_grad():
        model.setup_caches(BATCH, PROMPT + DECODE)
        tokens = model.prefill(prompt).argmax(-1)
        for step in range(steps):
            tokens = model.decode(tokens, torch.tensor([PROMPT + step])).argmax(-1)
    return tokens


@pytest.mark.parametrize("arch", ARCHS)
def test_protocol_counts_and_greedy_tokens(arch):
    engine = engine_for(arch)
    assert isinstance(engine, Engine)
    setup = engine.setup()
    assert {"build_s", "compile_s", "warmup_s", "capture_s"} <= set(setup)
    assert setup["compile_s"] == setup["capture_s"] == 0.0  # CPU: eager
    assert engine.decode(DECODE) == BATCH * DECODE
    assert torch.equal(engine.generated_tokens(), greedy_tokens(arch, engine.prompt, DECODE))
    assert engine.prefill() == BATCH * PROMPT
    engine.synchronize()
    info = engine.describe()
    assert info["engine"] == "native" and info["device"] == "cpu" and info["dtype"] == "float32"
    assert info["cuda_graph"] is False and info["compile"] == "none"
    engine.close()


@pytest.mark.parametrize("arch", [a for a in ATTENTION if arch_available(a)])
def test_repeated_decode_windows_redo_the_same_steps(arch):
    engine = engine_for(arch)
    engine.setup()
    engine.decode(DECODE)
    first = engine.generated_tokens()
    engine.decode(DECODE)
    assert torch.equal(engine.generated_tokens(), first)
    engine.decode(2)
    assert torch.equal(engine.generated_tokens(), greedy_tokens(arch, engine.prompt, 2))


def test_decode_beyond_the_cache_is_refused():
    engine = engine_for("gqa")
    engine.setup()
    with pytest.raises(ValueError, match="1 to 6"):
        engine.decode(DECODE + 1)


def test_options_are_checked():
    assert resolve_options(None)["compile"] == "auto"
    with pytest.raises(ConfigError, match="engine_options.fast"):
        resolve_options({"fast": True})
    with pytest.raises(ConfigError, match="engine_options.compile"):
        resolve_options({"compile": "yes"})
    with pytest.raises(ConfigError, match="engine_options.cuda_graph"):
        resolve_options({"cuda_graph": 1})
    with pytest.raises(ConfigError, match="engine_options.warmup_steps"):
        resolve_options({"warmup_steps": 0})
    with pytest.raises(ConfigError, match="engine_options.decode_attention"):
        resolve_options({"decode_attention": "flash"})


def test_decode_attention_option_reaches_the_model():
    engine = engine_for("mla", options={"decode_attention": "sdpa"})
    engine.setup()
    assert engine.describe()["decode_attention"] == "sdpa"
    engine.decode(DECODE)
    assert torch.equal(engine.generated_tokens(), greedy_tokens("mla", engine.prompt, DECODE))


def test_compile_true_on_cpu_uses_the_regional_hook(monkeypatch):
    engine = engine_for("gqa", options={"compile": True})
    assert engine.compile_how == "regional"
    calls = []
    monkeypatch.setattr("phasewatt.models.decoder.DecoderModel.compile_decode", lambda self, mode: calls.append(mode))
    setup = engine.setup()
    assert calls == ["default"] and setup["compile_s"] > 0.0


def test_missing_checkpoint_is_a_one_line_error(tmp_path):
    engine = engine_for("gqa", checkpoint=str(tmp_path / "nope"))
    with pytest.raises(CheckpointError, match="not a directory"):
        engine.setup()


def test_make_engine_builds_the_native_engine():
    spec = ModelSpec.from_config("tiny-gqa", TINY["gqa"])
    engine = make_engine("native", spec=spec, gpu=None, batch=1, prompt_len=4, decode_tokens=2)
    assert isinstance(engine, NativeEngine) and engine.batch == 1


def test_engine_module_does_not_import_measure():
    source = (ROOT / "src/phasewatt/engines/native.py").read_text()
    assert "phasewatt.measure" not in source


def test_benchmark_smoke_run_writes_tables(tmp_path):
    """benchmarks/decode_roofline.py --smoke on CPU: tiny models, the variants, both tables."""
    cmd = [sys.executable, str(ROOT / "benchmarks/decode_roofline.py"), "--smoke", "--models", "gqa,mla", "--compare", "eager,compile+sdpa", "--out", str(tmp_path)]
    out = subprocess.run(
        cmd,
        capture_output=True, text=True, timeout=240, env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    table = (tmp_path / "decode_roofline.md").read_text()
    csv = (tmp_path / "decode_roofline.csv").read_text().splitlines()
    assert "| model |" in table and "copy bandwidth" in table
    header = csv[0].split(",")
    assert {"model", "variant", "batch", "prompt", "decode_ms", "decode_floor_ms", "decode_bw_frac", "prefill_ms", "prefill_floor_ms"} <= set(header)
    rows = [dict(zip(header, line.split(","))) for line in csv[1:]]
    assert {r["status"] for r in rows} == {"ok"}
    # compile+sdpa is an alternative for mla only (gqa's default); larger batches run the main variant
    assert sorted((r["model"], r["variant"], r["batch"]) for r in rows) == sorted(
        [(m, "compile", b) for m in ("gqa", "mla") for b in ("1", "2")]
        + [(m, "eager", "1") for m in ("gqa", "mla")]
        + [("mla", "compile+sdpa", "1")]
    )
    assert all(float(r["decode_floor_ms"]) > 0 and float(r["decode_ms"]) > 0 for r in rows)


def test_close_frees_a_compiled_model_and_its_caches(monkeypatch):
    """A sweep builds engine after engine: close() must free the last one's memory."""
    import weakref

    from phasewatt.models.decoder import DecoderModel

    compile_decode = DecoderModel.compile_decode
    monkeypatch.setattr(DecoderModel, "compile_decode", lambda self, mode: compile_decode(self, backend="eager"))
    engine = engine_for("gqa", options={"compile": True})
    engine.setup()
    engine.decode(DECODE)
    model, cache = weakref.ref(engine.model), weakref.ref(engine.model.caches[0][0])
    engine.close()
    assert model() is None and cache() is None


@pytest.mark.parametrize("arch", ARCHS)
def test_setup_ends_with_a_prefill_after_the_decode_compile(arch, monkeypatch):
    """The last thing set-up runs is a prefill (after compile, warm-up and capture): a
    recompile that compiling decode triggers for prefill happens there, not inside the first
    measured prefill window; and a recurrent state advanced by warm-up starts again."""
    engine = engine_for(arch)
    calls = []
    original_prefill, original_warm_up = engine.prefill, engine._warm_up
    monkeypatch.setattr(engine, "prefill", lambda: calls.append("prefill") or original_prefill())
    monkeypatch.setattr(engine, "_warm_up", lambda: calls.append("warm_up") or original_warm_up())
    setup = engine.setup()
    assert calls[-1] == "prefill" and "warm_up" in calls[:-1]
    assert setup["prefill_again_s"] >= 0.0
    assert engine.decode(DECODE) == BATCH * DECODE
    assert torch.equal(engine.generated_tokens(), greedy_tokens(arch, engine.prompt, DECODE))
    engine.close()
