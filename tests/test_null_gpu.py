"""NullGpu: wall-clock timing with no power readings, aligned windows, no DVFS."""

import math
import time

import pytest

from phasewatt.gpu.base import Gpu
from phasewatt.gpu.dvfs import DvfsError, dvfs_applied, parse_dvfs
from phasewatt.gpu.null import MJ_PER_TICK, TICK_S, NullGpu
from phasewatt.gpu.select import open_gpu
from phasewatt.measure.harness import MeasureSettings, measure


def test_implements_the_gpu_protocol_on_wall_time():
    gpu = open_gpu("none", "H100", index=3)
    assert isinstance(gpu, NullGpu) and isinstance(gpu, Gpu)
    assert gpu.virtual_time is False
    assert gpu.name == "null (no power readings)" and gpu.driver == "none" and gpu.index == 3
    assert gpu.memory_total_bytes() == 80 * 10**9  # the named spec's facts
    t0 = gpu.now()
    gpu.sleep(0.02)
    assert 0.015 < gpu.now() - t0 < 0.5


def test_counter_ticks_one_millijoule_per_period_and_readings_are_zero():
    gpu = NullGpu("H200")
    start = gpu.energy_mj()
    time.sleep(3.5 * TICK_S)
    ticks = gpu.energy_mj() - start
    assert ticks in (3 * MJ_PER_TICK, 4 * MJ_PER_TICK)
    sample = gpu.sample()
    assert sample.power_instant_w == 0.0 and sample.power_average_w == 0.0
    assert sample.sm_clock_mhz == 0 and math.isnan(sample.temperature_c)
    assert gpu.violation_ns() == {"power": 0, "thermal": 0}


def test_no_dvfs_control_but_default_and_restore_work(tmp_path):
    gpu = NullGpu("H200")
    with dvfs_applied(gpu, parse_dvfs("default"), journal_dir=tmp_path, allowed=False) as effective:
        assert effective["effective_power_limit_w"] == 700.0
    for token in ("pl300", "sm1200"):
        with pytest.raises(DvfsError, match="device none"):
            with dvfs_applied(gpu, parse_dvfs(token), journal_dir=tmp_path, allowed=True):
                pass
        assert not list(tmp_path.iterdir())  # restored and journal removed
    assert gpu.locked_sm_clock_mhz() is None and gpu.power_limit_w() == 700.0


class _SleepEngine:
    """Prefill and decode that just take wall time."""

    name = "sleep"

    def prefill(self):
        time.sleep(0.03)
        return 4

    def decode(self, n):
        time.sleep(0.01 * n)
        return 2 * n

    def synchronize(self):
        return None


def test_harness_windows_align_and_read_no_real_energy():
    gpu = NullGpu("H200")
    settings = MeasureSettings(repetitions=2, warmups=1, decode_tokens=3, min_window_s=0.15, sample_interval_s=0.02, idle_s=0.2)
    body = measure(_SleepEngine(), gpu, settings)
    assert body["prefill_repeats"] == 5
    for rep in body["repetitions"]:
        prefill, decode = rep["prefill"], rep["decode"]
        assert not prefill["counter_stale"] and not decode["counter_stale"]
        assert prefill["t_end_s"] <= decode["t_begin_s"]
        assert prefill["window_s"] >= 0.15
        # 1 mJ per 100 ms: a ~0.2 s window holds ~2 mJ, far below any real reading.
        assert 0 < prefill["counter_energy_j"] < 0.01
        assert prefill["mean_power_w"] == 0.0
        assert prefill["throttled"] is False
    assert body["idle"]["idle_power_w"] == pytest.approx(MJ_PER_TICK / 1000 / TICK_S, rel=0.3)
