"""Config validation: every bad input is one line naming the field and what is allowed."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from phasewatt.config import jobs, load_config, validate
from phasewatt.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = yaml.safe_load((ROOT / "config.yaml").read_text())


def bad(mutate):
    config = copy.deepcopy(DEFAULT)
    mutate(config)
    with pytest.raises(ConfigError) as info:
        validate(config)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_default_config_is_the_papers_grid():
    config = load_config(ROOT / "config.yaml")
    assert config["grid"]["batch_sizes"] == [1, 8, 32, 128]
    assert config["grid"]["prompt_lengths"] == [512, 2048]
    assert set(config["models"]) == {"gqa", "gqa-control", "mla", "gdn", "mamba2"}
    assert config["repetitions"] == 10 and config["warmups"] == 3
    assert len(jobs(config)) == 5 * 4 * 2 * 10
    assert config["dvfs_control"] is False


def test_unknown_model_names_the_known_ones():
    message = bad(lambda c: c["grid"]["models"].append("llama-70b"))
    assert message.startswith("grid.models[5]: unknown model 'llama-70b'")
    assert "gqa-control" in message and "mamba2" in message


def test_negative_batch():
    message = bad(lambda c: c["grid"]["batch_sizes"].__setitem__(0, -1))
    assert message == "grid.batch_sizes[0]: -1 is out of range; it must be >= 1"


def test_power_cap_outside_the_gpus_range():
    message = bad(lambda c: c["grid"]["dvfs"].append("pl9000"))
    assert message.startswith("grid.dvfs[10]: 'pl9000' is outside the GPU's power-limit range")
    assert "pl200 to pl700" in message


def test_malformed_dvfs_token():
    message = bad(lambda c: c["grid"]["dvfs"].append("sm-5"))
    assert message.startswith("grid.dvfs[10]: 'sm-5' is not allowed; allowed: default, pl<watts>")


def test_unsupported_clock_names_the_nearest_supported():
    message = bad(lambda c: c["grid"]["dvfs"].append("sm1234"))
    assert "nearest supported: sm1230 or sm1245" in message


def test_missing_key():
    message = bad(lambda c: c.pop("repetitions"))
    assert message == "repetitions: missing; it is required"


def test_unknown_key_lists_the_allowed_ones():
    message = bad(lambda c: c.__setitem__("repetitons", 10))
    assert message.startswith("repetitons: unknown key; allowed keys:")
    assert "repetitions" in message


def test_wrong_enum():
    message = bad(lambda c: c.__setitem__("device", "cuda"))
    assert message == "device: 'cuda' is not allowed; allowed: auto, nvml, sim, none"


def test_model_missing_a_field_of_its_architecture():
    message = bad(lambda c: c["models"]["mla"].pop("kv_lora_rank"))
    assert message.startswith("models.mla.kv_lora_rank:")


def test_snakemake_stops_with_one_line_and_no_traceback(tmp_path):
    config = copy.deepcopy(DEFAULT)
    config["grid"]["dvfs"] = ["default", "pl9000"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(tmp_path), "-n", "--cores", "1"],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("phasewatt: error:")]
    assert errors == ["phasewatt: error: grid.dvfs[1]: 'pl9000' is outside the GPU's power-limit range; allowed: pl200 to pl700"]
    assert not (tmp_path / "results").exists()


def test_gemv_engine_options_are_validated_before_any_gpu_work():
    config = copy.deepcopy(DEFAULT)
    config["engine_options"] = {"gemv_max_rows": "auto", "gemv_fuse": False}
    validate(config)
    config["engine_options"] = {"gemv_max_rows": 0}
    validate(config)
    message = bad(lambda c: c.__setitem__("engine_options", {"gemv_max_rows": 9}))
    assert message == "engine_options.gemv_max_rows: 9 is not allowed; allowed: auto or an integer 0..8"
    message = bad(lambda c: c.__setitem__("engine_options", {"gemv_fuse": "yes"}))
    assert message.startswith("engine_options.gemv_fuse:"), message


def test_select_model_specs_for_the_benchmarks():
    from phasewatt.config import select_model_specs

    entries = DEFAULT["models"]
    assert [s.name for s in select_model_specs(entries, None, "config.yaml")] == list(entries)
    assert [s.name for s in select_model_specs(entries, " mla, gqa ", "config.yaml")] == ["mla", "gqa"]
    with pytest.raises(ConfigError) as info:
        select_model_specs(entries, "gqa,nope", "config.yaml")
    assert str(info.value) == "--models: nope not in config.yaml; allowed: " + ", ".join(entries)


def test_every_product_of_the_paper_models_has_16_byte_aligned_rows():
    """Every weight of config.yaml's models has a multiple of 8 rows and columns, so each row of
    a bf16 product's input and output starts 16-byte aligned: cuBLAS otherwise falls back to
    its Ampere 'align2' GEMMs (Gated DeltaNet's 13842-row in_proj ran its prefill GEMM 2.9x
    slower on an H100 until padded: RESULTS.md, round 8)."""
    import torch
    import yaml

    from phasewatt.models.registry import build_model
    from phasewatt.models.spec import ModelSpec

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "config.yaml").read_text())
    for name in config["grid"]["models"]:
        spec = ModelSpec.from_config(name, config["models"][name])
        model = build_model(spec, device="meta")
        shapes = {(n, tuple(m.weight.shape)) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        assert shapes, name
        odd = sorted((n, s) for n, s in shapes if any(d % 8 for d in s))
        assert not odd, (name, odd[:3])
