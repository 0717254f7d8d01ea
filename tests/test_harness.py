"""The harness measured against the simulator's true energy."""

import copy
from pathlib import Path

import pandas as pd
import pytest
import yaml

from phasewatt.config import Job, validate, validate_record
from phasewatt.gpu.sim import SimGpu, Workload
from phasewatt.measure.harness import MeasureSettings, measure, repeats_for
from phasewatt.measure.run import run_job

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = yaml.safe_load((ROOT / "config.yaml").read_text())


class FixedEngine:
    """An engine whose prefill and decode step are fixed workloads on the simulated GPU."""

    name = "fixed"

    def __init__(self, gpu, prefill: Workload, decode_step: Workload, batch=1, prompt_len=100):
        self.gpu, self.prefill_work, self.decode_work = gpu, prefill, decode_step
        self.batch, self.prompt_len = batch, prompt_len

    def prefill(self):
        self.gpu.execute(self.prefill_work)
        return self.batch * self.prompt_len

    def decode(self, n_steps):
        for _ in range(n_steps):
            self.gpu.execute(self.decode_work)
        return self.batch * n_steps

    def synchronize(self):
        pass


def seconds_of(gpu, work):
    return gpu.choose_clock(work).seconds


def tiny_config(**overrides):
    config = copy.deepcopy(DEFAULT)
    config.update(device="sim", repetitions=3, warmups=1, decode_tokens=32, idle_s=0.5)
    config.update(overrides)
    return validate(config)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_counter_energy_within_1pct_of_truth_for_windows_over_1s(seed):
    gpu = SimGpu("H200", seed=seed)
    copy_1s = Workload(0.0, 4.27e12 * 1.3, 10, 0.9)
    engine = FixedEngine(gpu, copy_1s, Workload(0.0, 4.0e10, 300, 0.55))
    body = measure(engine, gpu, MeasureSettings(repetitions=5, warmups=1, decode_tokens=128, idle_s=1.0))
    for rep in body["repetitions"]:
        for phase in ("prefill", "decode"):
            window = rep[phase]
            assert window["window_s"] >= 1.0
            assert window["energy_j"] == pytest.approx(window["sim_true_joules"], rel=0.01)


def test_a_20ms_prefill_is_measured_by_repetition_within_2pct():
    gpu = SimGpu("H200", seed=7)
    prefill = Workload(0.0, 4.27e12 * 0.02 * 0.9, 50, 0.9)
    assert seconds_of(gpu, prefill) == pytest.approx(0.02, rel=0.05)
    engine = FixedEngine(gpu, prefill, Workload(0.0, 2.0e10, 300, 0.55))
    body = measure(engine, gpu, MeasureSettings(repetitions=5, warmups=2, decode_tokens=64, idle_s=1.0))
    assert body["prefill_repeats"] >= 50
    for rep in body["repetitions"]:
        window = rep["prefill"]
        assert window["time_s"] == pytest.approx(0.02, rel=0.05)
        assert window["energy_j"] == pytest.approx(window["sim_true_joules"], rel=0.02)


def test_a_single_20ms_window_is_far_off_which_is_why_we_repeat():
    gpu = SimGpu("H200", seed=3)
    prefill = Workload(0.0, 4.27e12 * 0.02 * 0.9, 50, 0.9)
    engine = FixedEngine(gpu, prefill, Workload(0.0, 2.0e10, 300, 0.55))
    body = measure(engine, gpu, MeasureSettings(repetitions=5, warmups=1, decode_tokens=8, min_window_s=0.001, idle_s=1.0))
    assert body["prefill_repeats"] == 1
    # The 1-s average reading times latency (the estimate the harness refuses to make).
    errors = [abs(r["prefill"]["mean_power_w"] * r["prefill"]["time_s"] / r["prefill"]["sim_true_joules"] - 1) for r in body["repetitions"]]
    assert max(errors) > 0.05


def test_repeats_for():
    assert repeats_for(0.02, 1.0) == 50
    assert repeats_for(2.5, 1.0) == 1
    assert repeats_for(0.0, 1.0) == 1


def test_power_cap_windows_carry_the_reason_and_sustained_clock(tmp_path):
    config = tiny_config()
    record = run_job(config, Job("gqa", 32, 512, "pl300"), tmp_path / "r.json", tmp_path / "r.parquet", tmp_path / "j")
    decode = record["repetitions"][0]["decode"]
    assert "sw_power_cap" in decode["throttle_reasons"] and decode["throttled"]
    assert decode["mean_power_w"] <= 300 * 1.03
    assert decode["sustained_sm_clock_mhz"] < 1980
    assert record["dvfs_effective"]["effective_power_limit_w"] == 300


def test_clock_lock_record_has_requested_and_sustained(tmp_path):
    config = tiny_config()
    record = run_job(config, Job("mamba2", 1, 512, "sm1980"), tmp_path / "r.json", tmp_path / "r.parquet", tmp_path / "j")
    decode = record["repetitions"][0]["decode"]
    assert decode["requested_sm_clock_mhz"] == 1980
    assert decode["sustained_sm_clock_mhz"] == 1830


def test_record_and_trace_are_written_and_valid(tmp_path):
    config = tiny_config()
    record = run_job(config, Job("mla", 8, 512, "default"), tmp_path / "r.json", tmp_path / "r.parquet", tmp_path / "j")
    validate_record(record)
    assert record["status"] == "ok" and record["simulated"] is True
    assert record["driver"] == "simulated"
    assert len(record["repetitions"]) == 3
    trace = pd.read_parquet(tmp_path / "r.parquet")
    assert {"t_s", "power_instant_w", "energy_mj", "sm_clock_mhz", "clocks_event_reasons"} <= set(trace.columns)
    assert trace["t_s"].diff().dropna().median() == pytest.approx(0.01, rel=0.01)
    for rep in record["repetitions"]:
        assert rep["prefill"]["t_end_s"] <= rep["decode"]["t_begin_s"]
        assert rep["decode"]["tokens"] == 8 * 32
        assert rep["prefill"]["tokens"] == 8 * 512
    assert not list(tmp_path.glob(".*tmp"))


def test_infeasible_when_the_cache_cannot_fit(tmp_path):
    config = tiny_config(gpu="H100")
    record = run_job(config, Job("gqa", 4096, 16384, "default"), tmp_path / "r.json", tmp_path / "r.parquet", tmp_path / "j")
    validate_record(record)
    assert record["status"] == "infeasible"
    assert "GB" in record["reason"] and "H100" in record["reason"]
    assert (tmp_path / "r.parquet").exists()


def test_idle_power_is_reported_not_subtracted(tmp_path):
    config = tiny_config()
    record = run_job(config, Job("gdn", 1, 512, "sm780"), tmp_path / "r.json", tmp_path / "r.parquet", tmp_path / "j")
    assert 80 < record["idle"]["idle_power_w"] < 127
    decode = record["repetitions"][0]["decode"]
    # energy = counter delta minus only the tail after the work, never minus idle x window
    assert decode["energy_j"] * decode["repeats"] == pytest.approx(decode["counter_energy_j"] - decode["tail_correction_j"])
    assert decode["tail_correction_j"] <= 0.1 * record["idle"]["idle_power_w"] + 1e-9
