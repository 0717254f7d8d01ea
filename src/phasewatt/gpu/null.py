"""NullGpu: wall-clock timing with no power readings.

For running an engine where no GPU sensors can be read (vLLM on CPU in CI, or a machine
without NVML): the harness, windows and records work unchanged, times are real wall time,
and every energy and power number is a placeholder that cannot be mistaken for a reading.

The EnergyMeter aligns each window to a change of the energy counter, so the counter must
tick like NVML's: it advances by exactly 1 mJ every 100 ms of wall time. A window's energy
is therefore 0.01 J per second (0.01 W), power readings are 0 W, clocks 0 MHz, temperature
NaN; records from it say device "none" and simulated false.
"""

from __future__ import annotations

import math
import time

from phasewatt.gpu.base import Sample, read_sample
from phasewatt.gpu.dvfs import DvfsError
from phasewatt.gpu.specs import GpuSpec, gpu_spec

TICK_S = 0.1  # counter update period, as NVML's on Hopper
MJ_PER_TICK = 1  # the smallest counter step: energies of ~0.01 W, clearly not a reading


class NullGpu:
    """Implements the Gpu protocol on wall time without sensors. Stateless reads, so the
    sampler thread may read it while the harness does."""

    virtual_time = False
    name = "null (no power readings)"
    driver = "none"

    COUNTER_BASE_MJ = 1_000_000_000  # real counters never start from zero: neither does this

    def __init__(self, gpu_key: GpuSpec | str = "H200", index: int = 0):
        # The named GPU's spec supplies the facts (memory, clock table, power range) so that
        # the feasibility check and DVFS parsing agree with the grid planned for that GPU.
        self.spec = gpu_spec(gpu_key) if isinstance(gpu_key, str) else gpu_key
        self.index = index
        self.serial = f"NULL-{index:04d}"
        self._t0 = time.perf_counter()

    # ----- time -------------------------------------------------------------------------
    def now(self) -> float:
        return time.perf_counter()

    def sleep(self, seconds: float) -> None:
        time.sleep(max(seconds, 0.0))

    # ----- sensors ----------------------------------------------------------------------
    def energy_mj(self) -> int:
        ticks = math.floor((time.perf_counter() - self._t0) / TICK_S)
        return self.COUNTER_BASE_MJ + MJ_PER_TICK * ticks

    def power_instant_w(self) -> float:
        return 0.0

    def power_average_w(self) -> float:
        return 0.0

    def sm_clock_mhz(self) -> int:
        return 0

    def mem_clock_mhz(self) -> int:
        return 0

    def temperature_c(self) -> float:
        return math.nan

    def clocks_event_reasons(self) -> int:
        return 0

    def violation_ns(self) -> dict[str, int]:
        return {"power": 0, "thermal": 0}

    def sample(self) -> Sample:
        return read_sample(self, time.perf_counter())

    # ----- facts (of the named GPU spec) ------------------------------------------------
    def memory_total_bytes(self) -> int:
        return self.spec.memory_bytes

    def power_limit_constraints_w(self) -> tuple[float, float]:
        return float(self.spec.values["power_limit_min_w"]), float(self.spec.values["power_limit_max_w"])

    def default_power_limit_w(self) -> float:
        return float(self.spec.values["power_limit_max_w"])

    def supported_sm_clocks_mhz(self) -> list[int]:
        return self.spec.supported_sm_clocks()

    # ----- DVFS: there is nothing to set ------------------------------------------------
    def power_limit_w(self) -> float:
        return self.default_power_limit_w()

    def set_power_limit_w(self, watts: float) -> None:
        # Setting the limit it already reads is a no-op (a restore does exactly that).
        if abs(float(watts) - self.power_limit_w()) > 1.0:
            raise DvfsError(f"device none has no power limit to set ({watts} W asked); use grid.dvfs: [default]")

    def lock_sm_clock_mhz(self, mhz: int) -> None:
        raise DvfsError(f"device none has no SM clock to lock ({mhz} MHz asked); use grid.dvfs: [default]")

    def unlock_sm_clock(self) -> None:
        return None

    def locked_sm_clock_mhz(self) -> int | None:
        return None

    def close(self) -> None:
        return None
