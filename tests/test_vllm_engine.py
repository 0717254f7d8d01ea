"""The vLLM engine.

Everywhere: the one-line install hint when vLLM is missing (before any measurement), the
generated Hugging Face configs have the spec's shapes, options and shapes are checked.
In the vLLM environment of .ci/vllm.sh (PHASEWATT_VLLM_TESTS=1): a tiny grid of every
family runs through run_job on device none, and the records show the measured split.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

from phasewatt.config import jobs, validate
from phasewatt.engines import vllm as vllm_engine
from phasewatt.engines.vllm import (
    ARCHITECTURES,
    VllmEngine,
    check_checkpoint,
    check_cpu_shapes,
    check_vllm_available,
    hf_config,
    resolve_options,
    vllm_architecture,
)
from phasewatt.errors import ConfigError, PhasewattError
from phasewatt.measure.run import run_job
from phasewatt.models.spec import ModelSpec

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
RUN_VLLM = HAVE_VLLM and os.environ.get("PHASEWATT_VLLM_TESTS") == "1"

BATCH, PROMPT, DECODE = 2, 16, 4
# Shapes vLLM's CPU backends run: MLA latent + rope = 512 + 64, GDN heads of 128 with
# value heads as wide as key heads. Eager mode: no 30-s torch.compile per engine in CI.
EAGER = {"vllm_engine_args": {"enforce_eager": True}}
TINY_MODELS = {
    "gqa": dict(arch="gqa", n_layers=2, d_model=128, n_heads=4, n_kv_heads=2, head_dim=32, d_ff=256, vocab_size=512, qk_norm=True, **EAGER),
    "gqa-llama": dict(arch="gqa", n_layers=2, d_model=128, n_heads=4, n_kv_heads=2, head_dim=32, d_ff=256, vocab_size=512, **EAGER),
    "mla": dict(
        arch="mla", n_layers=2, d_model=128, n_heads=4, q_lora_rank=64, kv_lora_rank=512, qk_nope_head_dim=32,
        qk_rope_head_dim=64, v_head_dim=32, d_ff=256, vocab_size=512, **EAGER,
    ),
    "gdn": dict(arch="gdn", n_layers=2, d_model=128, n_heads=2, n_v_heads=4, head_dim=128, expand_v=1, conv_size=4, d_ff=256, vocab_size=512, **EAGER),
    "mamba2": dict(
        arch="mamba2", n_layers=2, d_model=128, d_state=64, head_dim=32, expand=2, n_groups=1, conv_size=4, chunk_size=64,
        vocab_size=512, tied_embeddings=True, **EAGER,
    ),
}
TINY_MODELS["mla-minicpm3"] = dict(TINY_MODELS["mla"], vllm_architecture="MiniCPM3ForCausalLM")
# The attention-like layer each model's vLLM build must contain (its backend is recorded).
EXPECTED_LAYER = {
    "gqa": "Attention",
    "gqa-llama": "Attention",
    "mla": "MLAAttention",
    "mla-minicpm3": "Attention",
    "gdn": "QwenGatedDeltaNetAttention",
    "mamba2": "MambaMixer2",
}


def tiny_config(models: list[str], **overrides) -> dict:
    config = {
        "gpu": "H200",
        "device": "none",
        "engine": "vllm",
        "grid": {"models": models, "batch_sizes": [BATCH], "prompt_lengths": [PROMPT], "dvfs": ["default"]},
        "decode_tokens": DECODE,
        "repetitions": 2,
        "warmups": 1,
        "min_window_s": 0.05,
        "idle_s": 0.2,
        "models": {name: TINY_MODELS[name] for name in models},
    }
    config.update(overrides)
    return validate(config)


def spec_of(name: str, **changes) -> ModelSpec:
    return ModelSpec.from_config(name, {**TINY_MODELS[name], **changes})


# ----- without vLLM -----------------------------------------------------------------------------


def test_missing_vllm_is_one_line_with_the_install_hint(monkeypatch):
    monkeypatch.setattr(vllm_engine, "_find_vllm", lambda: None)
    with pytest.raises(PhasewattError) as error:
        check_vllm_available()
    message = str(error.value)
    assert "\n" not in message
    assert 'pip install -e ".[vllm]"' in message and message.startswith("engine: vllm")


@pytest.mark.skipif(HAVE_VLLM, reason="vLLM is installed in this environment")
def test_this_environment_without_vllm_is_refused():
    with pytest.raises(PhasewattError, match="pip install"):
        check_vllm_available()


def test_workflow_preflight_refuses_engine_vllm_without_vllm(monkeypatch):
    """The Snakefile's pre-flight, before the DAG and any job."""
    from phasewatt.workflow import preflight

    monkeypatch.setattr(vllm_engine, "_find_vllm", lambda: None)
    with pytest.raises(PhasewattError, match=r'pip install -e "\.\[vllm\]"'):
        preflight(tiny_config(["gqa"]))
    assert preflight(tiny_config(["gqa"], engine="auto")) == "none"


def test_engine_vllm_without_vllm_stops_before_measuring(monkeypatch, tmp_path):
    monkeypatch.setattr(vllm_engine, "_find_vllm", lambda: None)
    config = tiny_config(["gqa"])
    record, trace = tmp_path / "run.json", tmp_path / "trace.parquet"
    with pytest.raises(PhasewattError, match=r"pip install -e"):
        run_job(config, jobs(config)[0], record, trace, tmp_path / "journal")
    assert not record.exists() and not trace.exists()


def test_refuses_the_simulated_gpu(monkeypatch):
    from phasewatt.gpu.sim import SimGpu

    monkeypatch.setattr(vllm_engine, "_find_vllm", lambda: object())
    with pytest.raises(ConfigError, match="device: none"):
        VllmEngine(spec=spec_of("gqa"), gpu=SimGpu("H200"), batch=1, prompt_len=8, decode_tokens=2)


# ----- configs and options ----------------------------------------------------------------------


def _hf_param_count(config: dict) -> int:
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    fields = {k: v for k, v in config.items() if k not in ("architectures", "model_type", "torch_dtype")}
    hf = transformers.AutoConfig.for_model(config["model_type"], **fields)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf)
    assert type(model).__name__ == config["architectures"][0]
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name, architecture, extra_params",
    [
        ("gqa", "Qwen3ForCausalLM", 0),
        ("gqa-llama", "LlamaForCausalLM", 0),
        ("mla", "DeepseekV2ForCausalLM", 0),
        ("mla", "MiniCPM3ForCausalLM", 0),
        # One MoE block: the routed expert's router and the shared expert's gate.
        ("gdn", "Qwen3NextForCausalLM", 2 * 128),
        ("gdn", "Qwen3_5ForCausalLM", 0),
        ("mamba2", "Mamba2ForCausalLM", 0),
    ],
)
def test_generated_config_has_the_spec_shapes(name, architecture, extra_params):
    """The config vLLM builds from holds exactly the spec's weights (transformers' model of
    the same config, counted on the meta device), so vLLM runs the shapes we model."""
    spec = spec_of(name, vllm_architecture=architecture)
    assert vllm_architecture(spec) == architecture
    config = hf_config(spec, architecture, max_position_embeddings=64)
    assert config["architectures"] == [architecture] and config["max_position_embeddings"] == 64
    assert _hf_param_count(config) == spec.param_count() + extra_params


def test_architecture_choices_are_checked():
    assert vllm_architecture(spec_of("gqa")) == "Qwen3ForCausalLM"
    assert vllm_architecture(spec_of("gqa-llama")) == "LlamaForCausalLM"
    assert [vllm_architecture(spec_of(n)) for n in ("mla", "gdn", "mamba2")] == [ARCHITECTURES[a][0] for a in ("mla", "gdn", "mamba2")]
    with pytest.raises(ConfigError, match=r"models\.gqa\.vllm_architecture: 'LlamaForCausalLM' for arch gqa; allowed: Qwen3ForCausalLM"):
        vllm_architecture(spec_of("gqa", vllm_architecture="LlamaForCausalLM"))
    with pytest.raises(ConfigError, match="allowed: DeepseekV2ForCausalLM, MiniCPM3ForCausalLM"):
        vllm_architecture(spec_of("mla", vllm_architecture="Qwen3ForCausalLM"))


def test_options_merge_and_keep_the_phase_boundary_fixed():
    spec = spec_of("gqa")
    resolved = resolve_options({"engine_args": {"enforce_eager": False, "gpu_memory_utilization": 0.8}}, spec)
    # The model entry's vllm_engine_args win over engine_options.engine_args.
    assert resolved["engine_args"] == {"enforce_eager": True, "gpu_memory_utilization": 0.8}
    assert resolved["decode_calls_per_prefill"] == 64
    with pytest.raises(ConfigError, match=r"engine_options\.engine_args\.enable_chunked_prefill: set by phasewatt"):
        resolve_options({"engine_args": {"enable_chunked_prefill": True}}, spec)
    with pytest.raises(ConfigError, match=r"models\.gqa\.vllm_engine_args\.max_num_seqs: set by phasewatt"):
        resolve_options(None, spec_of("gqa", vllm_engine_args={"max_num_seqs": 4}))
    with pytest.raises(ConfigError, match=r"engine_options\.cuda_graph: not an option of the vllm engine"):
        resolve_options({"cuda_graph": True}, spec)
    with pytest.raises(ConfigError, match=r"decode_calls_per_prefill: 0; allowed: an integer >= 1"):
        resolve_options({"decode_calls_per_prefill": 0}, spec)


def test_shapes_vllm_cpu_cannot_run_are_named():
    with pytest.raises(ConfigError, match=r"models\.mla\.kv_lora_rank: .* = 576 \(here 256 \+ 32\)"):
        check_cpu_shapes(spec_of("mla", kv_lora_rank=256, qk_rope_head_dim=32), "DeepseekV2ForCausalLM")
    check_cpu_shapes(spec_of("mla", kv_lora_rank=256, qk_rope_head_dim=32), "MiniCPM3ForCausalLM")
    with pytest.raises(ConfigError, match=r"models\.gdn\.expand_v: .*here 2"):
        check_cpu_shapes(spec_of("gdn", expand_v=2), "Qwen3NextForCausalLM")
    check_cpu_shapes(spec_of("gdn"), "Qwen3NextForCausalLM")


def test_checkpoint_shapes_must_match_the_spec(tmp_path):
    import json

    spec = spec_of("gqa")
    with pytest.raises(ConfigError, match=r"checkpoints\.gqa: .*config\.json does not exist"):
        check_checkpoint(spec, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(hf_config(spec, "Qwen3ForCausalLM", 64), hidden_size=256)))
    with pytest.raises(ConfigError, match=r"hidden_size is 256 .* models\.gqa\.d_model is 128"):
        check_checkpoint(spec, tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hf_config(spec, "Qwen3ForCausalLM", 64)))
    assert check_checkpoint(spec, tmp_path)["architectures"] == ["Qwen3ForCausalLM"]


# ----- through vLLM (the venv of .ci/vllm.sh) ---------------------------------------------------


@pytest.mark.skipif(not RUN_VLLM, reason="needs vLLM and PHASEWATT_VLLM_TESTS=1 (.ci/vllm.sh)")
@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_tiny_grid_through_vllm_splits_prefill_and_decode(name, tmp_path):
    import vllm

    config = tiny_config([name])
    (job,) = jobs(config)
    record = run_job(config, job, tmp_path / "run.json", tmp_path / "trace.parquet", tmp_path / "journal")
    assert record["status"] == "ok"
    assert record["device"] == "none" and record["simulated"] is False and record["engine"] == "vllm"
    assert record["gpu_name"] == "null (no power readings)"
    info = record["engine_info"]
    assert info["vllm_version"] == vllm.__version__
    assert info["vllm_architecture"] == vllm_architecture(spec_of(name))
    assert info["attention_backends"].get(EXPECTED_LAYER[name]), info["attention_backends"]
    assert info["engine_args"]["enable_chunked_prefill"] is False and info["engine_args"]["enable_prefix_caching"] is False
    assert len(record["repetitions"]) == 2
    previous_end = 0.0
    for rep in record["repetitions"]:
        prefill, decode = rep["prefill"], rep["decode"]
        assert prefill["tokens"] == BATCH * PROMPT  # measured: every prompt finished in one step
        assert decode["tokens"] == BATCH * DECODE  # measured: one new token per sequence per step
        assert previous_end <= prefill["t_begin_s"] < prefill["t_end_s"] <= decode["t_begin_s"] < decode["t_end_s"]
        assert not prefill["counter_stale"] and not decode["counter_stale"]
        previous_end = decode["t_end_s"]
    split = info["measured_split"]
    assert split["prefill_tokens_per_step"] == [BATCH * PROMPT]
    assert split["first_tokens_per_prefill_step"] == [BATCH]
    assert split["decode_tokens_per_step"] == [BATCH]
    # One warm-up call, then the windows' repeats (plus any window measured again).
    for phase, per_call in (("prefill", 1), ("decode", DECODE)):
        kept = per_call * (1 + sum(rep[phase]["repeats"] for rep in record["repetitions"]))
        steps = split[f"{phase}_steps"]
        assert steps == kept if record["short_windows_remeasured"][phase] == 0 else steps > kept
    assert 1 <= split["max_decode_calls_after_a_prefill"] <= 64
    assert (tmp_path / "trace.parquet").exists()


@pytest.mark.skipif(not RUN_VLLM, reason="needs vLLM and PHASEWATT_VLLM_TESTS=1 (.ci/vllm.sh)")
def test_a_prefill_that_is_not_one_step_is_refused():
    """The split is measured, not assumed: a scheduler that caps each prompt's tokens per
    step (so a prompt cannot finish in the first step) makes prefill() fail."""
    engine = VllmEngine(
        spec=spec_of("gqa"), batch=BATCH, prompt_len=PROMPT, decode_tokens=DECODE,
        options={"engine_args": {"long_prefill_token_threshold": PROMPT // 2}},
    )
    try:
        engine.setup()
        with pytest.raises(vllm_engine.VllmEngineError, match=f"the first step finished 0 of {BATCH} prompts"):
            engine.prefill()
        assert engine.describe()["measured_split"]["prefill_steps"] == 0
    finally:
        engine.close()
