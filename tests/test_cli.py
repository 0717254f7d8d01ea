"""The `phasewatt` command: probe, restore, run-one (the real pipeline on the fake NVML GPU
with the microbench engine on CPU), and one-line errors."""

import json

import pandas as pd
import pytest
import yaml

import fake_nvml
from phasewatt.cli import main
from phasewatt.gpu.dvfs import OPT_IN_HINT

TINY = {
    "arch": "gqa",
    "n_layers": 2,
    "d_model": 64,
    "n_heads": 4,
    "n_kv_heads": 2,
    "head_dim": 16,
    "d_ff": 128,
    "vocab_size": 256,
    "dtype": "float32",
    "microbench": {"device": "cpu", "decode_kernel": "gemv"},
}


@pytest.fixture
def fake(monkeypatch):
    return fake_nvml.install(monkeypatch)


def write_config(tmp_path, **overrides):
    config = {
        "gpu": "H200",
        "device": "nvml",
        "engine": "microbench",
        "dvfs_control": False,
        "grid": {"models": ["tiny"], "batch_sizes": [2], "prompt_lengths": [8], "dvfs": ["default"]},
        "decode_tokens": 4,
        "repetitions": 2,
        "warmups": 2,
        "min_window_s": 0.3,
        "idle_s": 0.2,
        "models": {"tiny": TINY},
    }
    config.update(overrides)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("phasewatt: error: ")
    return lines[0]


def test_probe_prints_the_facts_and_the_update_rate(fake, capsys, monkeypatch):
    monkeypatch.setattr("phasewatt.gpu.probe.dvfs_permission", lambda: (False, "not root and no CAP_SYS_ADMIN"))
    assert main(["probe", "--seconds", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "GPU 0: NVIDIA H200 (serial 1652240000000, 150.8 GB)" in out
    assert "driver: 580.159.04" in out
    assert "power limit: 700 W (default 700 W, allowed 200 W to 700 W)" in out
    assert "SM clocks: 110 supported, 345-1980 MHz in 15 MHz steps" in out
    assert "dvfs control: not permitted (not root and no CAP_SYS_ADMIN)" in out
    assert fake.state()["calls"] == []  # changes nothing
    assert main(["probe", "--seconds", "0.5", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert 7 <= facts["sensor_update"]["energy_updates_per_s"] <= 11  # the fake posts every 100 ms
    assert facts["sensor_update"]["energy_update_period_s"] == pytest.approx(0.1, abs=0.02)
    assert facts["sm_clock_count"] == 110 and facts["dvfs_permitted"] is False


def test_probe_names_what_the_gpu_does_not_report(fake, capsys):
    fake.update_device(unsupported=["default_limit", "violation_power", "violation_thermal"])
    assert main(["probe", "--seconds", "0.2"]) == 0
    out = capsys.readouterr().out
    assert "power limit: 700 W (default n/a, allowed 200 W to 700 W)" in out
    assert "unavailable: default_power_limit (device nvml: reading the default power limit of GPU 0 failed (Not Supported))" in out


def test_probe_of_the_simulated_gpu():
    assert main(["probe", "--device", "sim", "--seconds", "1"]) == 0


def test_probe_without_a_driver_is_one_line(fake, capsys):
    fake.update(driver_loaded=False)
    assert main(["probe"]) == 1
    assert one_line_error(capsys) == (
        "phasewatt: error: device nvml: NVML could not be initialised (Driver Not Loaded); is the NVIDIA driver loaded?"
    )


def test_restore_with_nothing_to_restore(fake, tmp_path, capsys):
    assert main(["restore", "--journal-dir", str(tmp_path / "none")]) == 0
    assert "nothing to restore" in capsys.readouterr().out


def test_run_one_measures_through_nvml_with_the_microbench_engine(fake, tmp_path, capsys):
    config = write_config(tmp_path)
    out_dir = tmp_path / "out"
    argv = ["run-one", "--config", str(config), "--model", "tiny", "--batch", "2", "--seqlen", "8", "--out-dir", str(out_dir)]
    assert main(argv + ["--journal-dir", str(tmp_path / "journal")]) == 0
    assert "tiny/bs2_seq8/default: ok: prefill " in capsys.readouterr().out
    record = json.loads((out_dir / "tiny/bs2_seq8/default.json").read_text())
    assert record["status"] == "ok" and record["device"] == "nvml" and record["simulated"] is False
    assert record["gpu_name"] == "NVIDIA H200" and record["driver"] == "580.159.04"
    assert record["dvfs_effective"]["power_limit_is_default"] is True
    info = record["engine_info"]
    assert info["engine"] == "microbench" and info["decode_kernel"] == "gemv" and info["decode_step_bytes"] > 0
    windows = [rep[phase] for rep in record["repetitions"] for phase in ("prefill", "decode")]
    assert len(windows) == 4 and not any(w["counter_stale"] for w in windows)
    # Windows are sized from the warm-up, and on a busy CPU a tiny prefill can come out far
    # shorter than its warm-up: judge the windows long enough to hold readings.
    long = [w for w in windows if w["samples"] >= 10]
    assert len(long) >= 2
    assert all(120 < w["mean_power_w"] < 135 for w in long)
    assert all(abs(w["counter_vs_integral_rel"]) < 0.05 for w in long)  # counter and instant power agree
    trace = pd.read_parquet(out_dir / "tiny/bs2_seq8" / record["trace_file"])
    assert len(trace) > 50 and trace["energy_mj"].is_monotonic_increasing
    assert fake.state()["calls"] == []  # default: the GPU was not touched


def test_run_one_with_a_cap_but_no_opt_in_stops_before_touching_the_gpu(fake, tmp_path, capsys):
    config = write_config(tmp_path)
    argv = ["run-one", "--config", str(config), "--model", "tiny", "--batch", "2", "--seqlen", "8", "--dvfs", "pl300"]
    assert main(argv + ["--out-dir", str(tmp_path / "out")]) == 1
    line = one_line_error(capsys)
    assert line.startswith("phasewatt: error: grid.dvfs: pl300 would change the real GPU") and line.endswith(OPT_IN_HINT)
    assert fake.state()["calls"] == [] and not (tmp_path / "out").exists()


def test_run_one_without_root_is_one_line_and_leaves_no_journal(fake, tmp_path, capsys):
    fake.update(root=False)
    config = write_config(tmp_path, dvfs_control=True)
    argv = ["run-one", "--config", str(config), "--model", "tiny", "--batch", "2", "--seqlen", "8", "--dvfs", "sm1590"]
    assert main(argv + ["--out-dir", str(tmp_path / "out"), "--journal-dir", str(tmp_path / "journal")]) == 1
    assert one_line_error(capsys) == (
        "phasewatt: error: dvfs: NVML refused to lock the SM clock at 1590 MHz on GPU 0 (Insufficient Permissions): "
        "power caps and clock locks need root (or CAP_SYS_ADMIN)"
    )
    assert not list((tmp_path / "journal").glob("*.json"))


def test_run_one_errors_name_the_field(fake, tmp_path, capsys):
    config = write_config(tmp_path, dvfs_control=True)
    base = ["run-one", "--config", str(config), "--batch", "2", "--seqlen", "8", "--out-dir", str(tmp_path)]
    assert main(base + ["--model", "gqa"]) == 1
    assert one_line_error(capsys) == f"phasewatt: error: --model: 'gqa' is not a model of {config}; allowed: tiny"
    assert main(base + ["--model", "tiny", "--dvfs", "sm1234"]) == 1
    assert "'sm1234' is not a supported SM clock; nearest supported: sm1230 or sm1245" in one_line_error(capsys)
    assert main(["run-one", "--config", str(tmp_path / "missing.yaml"), "--model", "tiny", "--batch", "1", "--seqlen", "8", "--out-dir", "x"]) == 1
    assert "does not exist" in one_line_error(capsys)
