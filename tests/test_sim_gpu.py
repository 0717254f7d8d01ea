"""The simulated GPU behaves like the H200 measurements it is built from."""

import pytest

from phasewatt.gpu.base import SW_POWER_CAP
from phasewatt.gpu.sim import SimGpu, Workload
from phasewatt.gpu.specs import gpu_spec

COPY = Workload(flops=0.0, hbm_bytes=4.27e12 * 0.5, kernels=1)  # 0.5 s at the copy bandwidth
GEMM = Workload(flops=2 * 8192**3, hbm_bytes=3 * 8192 * 8192 * 2, kernels=1)


def quiet_gpu(spec="H200"):
    """A SimGpu without run-to-run variation, for exact comparisons with the probe."""
    gpu = SimGpu(spec)
    for key in ("jitter_time_rel", "jitter_power_rel", "drift_power_rel"):
        gpu._v[key] = 0.0
    return gpu


def test_every_parameter_has_a_source():
    for key in ("H200", "H100"):
        spec = gpu_spec(key)
        assert set(spec.values) == set(spec.sources)
        assert all(source.strip() for source in spec.sources.values())


def test_copy_reproduces_the_probe():
    point = quiet_gpu().choose_clock(COPY)
    assert point.sm_clock_mhz == 1980 and not point.reasons & SW_POWER_CAP
    assert point.power_w == pytest.approx(627, rel=0.01)
    assert COPY.hbm_bytes / point.seconds == pytest.approx(4.27e12, rel=0.01)


def test_gemm_is_held_at_the_700w_cap_by_lowering_the_clock():
    point = quiet_gpu().choose_clock(GEMM)
    assert point.reasons & SW_POWER_CAP
    assert point.power_w <= 700
    assert 1400 <= point.sm_clock_mhz <= 1530  # probe: median 1455 MHz
    assert GEMM.flops / point.seconds == pytest.approx(641e12, rel=0.05)


def test_power_cap_lowers_the_clock_and_sets_the_reason():
    gpu = quiet_gpu()
    gpu.set_power_limit_w(300)
    point = gpu.execute(COPY)
    assert point.power_w <= 300 and point.reasons & SW_POWER_CAP
    assert point.sm_clock_mhz < 1980
    assert gpu.violation_ns()["power"] == pytest.approx(point.seconds * 1e9, rel=1e-6)


def test_clock_locks_sustain_as_measured():
    gpu = quiet_gpu()
    gpu.lock_sm_clock_mhz(1980)
    assert gpu.execute(COPY).sm_clock_mhz == 1830
    gpu.lock_sm_clock_mhz(1590)
    assert gpu.execute(COPY).sm_clock_mhz == 1590


def test_low_clock_saves_power_on_memory_bound_work():
    gpu = quiet_gpu()
    default = gpu.choose_clock(COPY)
    gpu.lock_sm_clock_mhz(1200)
    locked = gpu.choose_clock(COPY)
    assert locked.seconds == pytest.approx(default.seconds, rel=0.01)
    assert locked.power_w < 0.8 * default.power_w


def test_idle_floor_at_the_lowest_clock():
    gpu = quiet_gpu()
    gpu.lock_sm_clock_mhz(345)
    gpu.sleep(3.0)
    assert gpu.power_average_w() == pytest.approx(80, abs=1)


def test_sensors_update_every_100ms_and_the_counter_has_1mj_steps():
    gpu = quiet_gpu()
    values = set()
    for _ in range(1000):  # 1 s in 1 ms steps
        gpu.execute(Workload(0.0, 4.27e9, 0))
        values.add(gpu.energy_mj())
    assert 9 <= len(values) - 1 <= 11
    assert all(isinstance(v, int) for v in values)


def test_average_power_lags_a_step_while_instant_follows():
    gpu = quiet_gpu()
    gpu.sleep(2.0)
    idle = gpu.power_average_w()
    gpu.execute(Workload(0.0, 4.27e12 * 0.3, 0))  # 300 ms of copy
    assert gpu.power_instant_w() > 600
    assert gpu.power_average_w() < 0.5 * (idle + 627)


def test_true_energy_matches_the_counter_over_long_spans():
    gpu = quiet_gpu()
    gpu.sleep(0.05)
    t0, e0 = gpu.now(), gpu.energy_mj()
    gpu.execute(Workload(0.0, 4.27e12 * 2, 0))
    gpu.sleep(0.2)
    counter_j = (gpu.energy_mj() - e0) / 1000
    assert counter_j == pytest.approx(gpu.true_energy_j(t0, gpu.now()), rel=0.05)
