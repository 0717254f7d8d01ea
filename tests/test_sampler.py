"""The sampler thread on a real-GPU backend (fake NVML): period, trace, failures, stop."""

import statistics
import time

import pytest

import fake_nvml
from phasewatt.gpu.sampler import TRACE_COLUMNS, Sampler


@pytest.fixture
def gpu(monkeypatch):
    fake_nvml.install(monkeypatch)
    from phasewatt.gpu.nvml import NvmlGpu

    gpu = NvmlGpu(0)
    yield gpu
    gpu.close()


def test_thread_samples_every_10_ms_into_a_trace(gpu):
    sampler = Sampler(gpu, 0.01)
    with sampler:
        time.sleep(0.4)
    samples = sampler.snapshot()
    assert 20 <= len(samples) <= 45
    gaps = [b.t_s - a.t_s for a, b in zip(samples, samples[1:])]
    assert 0.008 < statistics.median(gaps) < 0.02
    energies = [s.energy_mj for s in samples]
    assert energies == sorted(energies) and len(set(energies)) >= 3  # the counter ticks every 100 ms
    frame = sampler.frame(t_origin=samples[0].t_s)
    assert list(frame.columns) == TRACE_COLUMNS and len(frame) == len(samples) and frame["t_s"].iloc[0] == 0
    stats = sampler.stats()
    assert stats["samples"] == len(samples) and stats["errors"] == 0 and stats["mean_read_ms"] > 0
    assert stats["max_gap_s"] >= stats["median_gap_s"]


def test_stop_ends_the_thread(gpu):
    sampler = Sampler(gpu, 0.01).start()
    time.sleep(0.05)
    sampler.stop()
    count = len(sampler.snapshot())
    time.sleep(0.05)
    assert len(sampler.snapshot()) == count and sampler._thread is None


class _Flaky:
    """A GPU whose every third reading fails, as a transient NVML error would."""

    virtual_time = False

    def __init__(self, gpu):
        self.gpu, self.calls = gpu, 0

    def sample(self):
        self.calls += 1
        if self.calls % 3 == 0:
            raise RuntimeError("NVML: Timeout")
        return self.gpu.sample()


def test_a_failed_reading_is_counted_and_the_trace_goes_on(gpu):
    flaky = _Flaky(gpu)
    sampler = Sampler(flaky, 0.01)
    with sampler:
        time.sleep(0.2)
    stats = sampler.stats()
    assert stats["errors"] >= 4 and stats["last_error"] == "RuntimeError: NVML: Timeout"
    assert stats["samples"] >= 2 * stats["errors"] - 2  # two good readings per failed one
