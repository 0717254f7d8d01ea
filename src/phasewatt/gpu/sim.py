"""SimGpu: a first-principles simulated GPU on a virtual clock.

Time of a workload is its roofline time at the current SM clock plus a per-kernel overhead
(part of which stretches at lower clocks);
power is a DVFS model (idle + HBM traffic + on-chip data movement + tensor cores, the on-chip
parts scaling with f*V(f)^2); firmware lowers the clock to honour a power cap (setting the
SW power cap reason); locks above the sustainable clock are held at it. Sensors behave like
NVML on Hopper: the energy counter (1 mJ) and the power readings update every 100 ms, the
instant reading covers only the last 25 ms before an update, the "usage" reading is a 1-s
average. Every parameter is in specs.yaml with its source. The simulator keeps the true
energy, so the error of the harness that reads its sensors can be measured.
"""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass

from phasewatt.gpu.base import GPU_IDLE, SW_POWER_CAP, SW_THERMAL_SLOWDOWN, Sample, read_sample
from phasewatt.gpu.specs import GpuSpec, gpu_spec


@dataclass(frozen=True)
class Workload:
    """Work handed to the simulated GPU by an engine: one prefill or one decode step."""

    flops: float
    hbm_bytes: float
    kernels: int
    bandwidth_efficiency: float = 1.0  # share of copy bandwidth the engine's kernels reach


@dataclass(frozen=True)
class OperatingPoint:
    sm_clock_mhz: int
    seconds: float
    power_w: float
    reasons: int


class SimGpu:
    """Implements the Gpu protocol on virtual time. Not thread-safe: the sampler is driven
    by the virtual clock itself (schedule_every), not by a thread."""

    virtual_time = True
    driver = "simulated"

    COUNTER_BASE_MJ = 1_234_567_890  # counters count since driver load, never from zero

    def __init__(self, spec: GpuSpec | str = "H200", index: int = 0, seed: int = 0, sensor_phase_s: float = 0.0371):
        self.spec = gpu_spec(spec) if isinstance(spec, str) else spec
        self.name = f"{self.spec.name} (simulated)"
        self.index = index
        self.serial = f"SIM-{self.spec.key}-{index:04d}"
        v = self.spec.values
        self._v = v
        self._clocks = self.spec.supported_sm_clocks()
        self._fmin, self._fmax = self._clocks[0], self._clocks[-1]
        self._sensor_period = v["sensor_update_s"]
        self._sensor_phase = sensor_phase_s % self._sensor_period
        # Power model constants, derived from the probe numbers in specs.yaml.
        self._p_hbm_full = v["hbm_pj_per_bit"] * 1e-12 * 8 * self.spec.copy_bandwidth_bytes_s
        self._p_stream_full = v["copy_power_w"] - v["idle_active_w"] - self._p_hbm_full
        gemm_f = v["gemm_clock_mhz"]
        gemm_act = self._gemm_probe_memory_activity()
        rest = v["gemm_power_w"] - self._idle_power(gemm_f) - gemm_act * self._p_hbm_full
        self._p_tensor_full = rest / self._g(gemm_f) - gemm_act * self._p_stream_full
        # Run-to-run variation: white jitter per workload plus a slow drift of power.
        self._rng = random.Random(seed)
        self._drift = 0.0
        # State.
        self._t = 0.0
        self._power_limit = float(v["power_limit_max_w"])
        self._locked: int | None = None
        self._temperature = v["ambient_c"] + 10.0
        self._seg_t: list[float] = [0.0]
        self._seg_p: list[float] = []
        self._seg_f: list[int] = []
        self._seg_r: list[int] = []
        self._cum_e: list[float] = [0.0]
        self._violation = {"power": 0.0, "thermal": 0.0}
        self._callbacks: list[list] = []  # [next_due, interval, fn]
        self._in_callback = False

    # ----- power model ------------------------------------------------------------------
    def _voltage(self, f: float) -> float:
        v = self._v
        frac = (f - self._fmin) / (self._fmax - self._fmin)
        return v["voltage_min_v"] + (v["voltage_max_v"] - v["voltage_min_v"]) * frac

    def _g(self, f: float) -> float:
        """Dynamic-power scale f*V(f)^2, 1 at the highest clock."""
        return f * self._voltage(f) ** 2 / (self._fmax * self._voltage(self._fmax) ** 2)

    def _idle_power(self, f: float) -> float:
        v = self._v
        g0 = self._g(self._fmin)
        return v["idle_floor_w"] + (v["idle_active_w"] - v["idle_floor_w"]) * (self._g(f) - g0) / (1 - g0)

    def _gemm_probe_memory_activity(self) -> float:
        n = 8192
        flops_s = self.spec.peak_flops_at(self._v["gemm_clock_mhz"]) * self._v["gemm_efficiency"]
        seconds = 2 * n**3 / flops_s
        return (3 * n * n * 2 / seconds) / self.spec.copy_bandwidth_bytes_s

    def _bandwidth(self, f: float) -> float:
        """HBM bandwidth reachable at SM clock f: the copy bandwidth, or what the SMs can
        issue at this clock, whichever is lower."""
        issue = self._v["n_sms"] * self._v["sm_stream_bytes_per_clock"] * f * 1e6
        return min(self.spec.copy_bandwidth_bytes_s, issue)

    def operating_point(self, work: Workload, f: float) -> tuple[float, float]:
        """(seconds, watts) of a workload at SM clock f."""
        bandwidth = self._bandwidth(f) * work.bandwidth_efficiency
        t_mem = work.hbm_bytes / bandwidth
        flops_rate = self.spec.peak_flops_at(f) * self._v["gemm_efficiency"]
        t_compute = work.flops / flops_rate
        scaled = self._v["kernel_overhead_clock_scaled"]
        per_kernel_s = self._v["kernel_overhead_us"] * 1e-6 * ((1 - scaled) + scaled * self._fmax / f)
        seconds = max(t_mem, t_compute) + work.kernels * per_kernel_s
        mem_activity = work.hbm_bytes / seconds / self.spec.copy_bandwidth_bytes_s
        tensor_activity = work.flops / seconds / flops_rate
        watts = (
            self._idle_power(f)
            + mem_activity * self._p_hbm_full
            + (mem_activity * self._p_stream_full + tensor_activity * self._p_tensor_full) * self._g(f)
        )
        return seconds, watts

    def _target_clock(self) -> int:
        if self._locked is None:
            return self._fmax
        return min(self._locked, int(self._v["lock_sustained_max_mhz"]))

    def choose_clock(self, work: Workload) -> OperatingPoint:
        """What the firmware runs the workload at: the target clock, lowered (in supported
        steps) until the power limit holds, and the thermal slowdown above its threshold."""
        f = self._target_clock()
        reasons = 0
        if self._temperature >= self._v["thermal_slowdown_c"]:
            f = min(f, int(0.8 * self._fmax))
            reasons |= SW_THERMAL_SLOWDOWN
        seconds, watts = self.operating_point(work, f)
        if watts > self._power_limit:
            reasons |= SW_POWER_CAP
            candidates = [c for c in self._clocks if c <= f]
            lo, hi = 0, len(candidates) - 1
            while lo < hi:  # highest supported clock that honours the cap
                mid = (lo + hi + 1) // 2
                if self.operating_point(work, candidates[mid])[1] <= self._power_limit:
                    lo = mid
                else:
                    hi = mid - 1
            f = candidates[lo]
            seconds, watts = self.operating_point(work, f)
        return OperatingPoint(int(f), seconds, watts, reasons)

    # ----- time -------------------------------------------------------------------------
    def now(self) -> float:
        return self._t

    def sleep(self, seconds: float) -> None:
        f = self._target_clock() if self._locked is not None else self._fmax
        self._advance(seconds, self._idle_power(f), f, GPU_IDLE)

    def execute(self, work: Workload) -> OperatingPoint:
        """Run one workload to completion (the device is synchronous in virtual time)."""
        point = self.choose_clock(work)
        v = self._v
        seconds = point.seconds * (1.0 + self._rng.gauss(0.0, v["jitter_time_rel"]))
        decay = math.exp(-seconds / v["drift_tau_s"])
        self._drift = self._drift * decay + v["drift_power_rel"] * math.sqrt(1 - decay * decay) * self._rng.gauss(0, 1)
        watts = point.power_w * (1.0 + self._drift + self._rng.gauss(0.0, v["jitter_power_rel"]))
        if point.reasons & SW_POWER_CAP:  # firmware holds the cap, noise or not
            watts = min(watts, self._power_limit)
        self._advance(seconds, watts, point.sm_clock_mhz, point.reasons)
        return OperatingPoint(point.sm_clock_mhz, seconds, watts, point.reasons)

    def schedule_every(self, interval_s: float, callback) -> object:
        """Call callback() every interval_s of virtual time (the sampler's tick)."""
        entry = [self._t, interval_s, callback]
        self._callbacks.append(entry)
        self._run_due_callbacks()
        return entry

    def cancel(self, handle) -> None:
        if handle in self._callbacks:
            self._callbacks.remove(handle)

    def _run_due_callbacks(self) -> None:
        if self._in_callback:
            return
        self._in_callback = True
        try:
            for entry in self._callbacks:
                while entry[0] <= self._t + 1e-12:
                    entry[2]()
                    entry[0] += entry[1]
        finally:
            self._in_callback = False

    def _advance(self, seconds: float, power_w: float, f: int, reasons: int) -> None:
        end = self._t + max(seconds, 0.0)
        while True:
            due = min((entry[0] for entry in self._callbacks), default=math.inf)
            stop = min(end, due) if not self._in_callback else end
            self._append_segment(stop, power_w, f, reasons)
            if stop >= end - 1e-15:
                self._t = end
                self._run_due_callbacks()
                return
            self._run_due_callbacks()

    def _append_segment(self, t_end: float, power_w: float, f: int, reasons: int) -> None:
        dt = t_end - self._t
        if dt <= 0:
            return
        if self._seg_p and self._seg_p[-1] == power_w and self._seg_f[-1] == f and self._seg_r[-1] == reasons:
            self._seg_t[-1] = t_end
            self._cum_e[-1] += power_w * dt
        else:
            self._seg_p.append(power_w)
            self._seg_f.append(f)
            self._seg_r.append(reasons)
            self._seg_t.append(t_end)
            self._cum_e.append(self._cum_e[-1] + power_w * dt)
        if reasons & SW_POWER_CAP:
            self._violation["power"] += dt
        if reasons & SW_THERMAL_SLOWDOWN:
            self._violation["thermal"] += dt
        v = self._v
        steady = v["ambient_c"] + v["thermal_resistance_c_per_w"] * power_w
        self._temperature = steady + (self._temperature - steady) * math.exp(-dt / v["thermal_tau_s"])
        self._t = t_end

    # ----- truth (for harness-error tests) ----------------------------------------------
    def true_energy_j(self, t0: float, t1: float) -> float:
        return self._energy_at(t1) - self._energy_at(t0)

    def _energy_at(self, t: float) -> float:
        if t <= 0 or not self._seg_p:
            return 0.0
        t = min(t, self._seg_t[-1])
        i = min(max(bisect.bisect_right(self._seg_t, t) - 1, 0), len(self._seg_p) - 1)
        return self._cum_e[i] + self._seg_p[i] * (t - self._seg_t[i])

    def _segment_at(self, t: float) -> int:
        return min(max(bisect.bisect_right(self._seg_t, t) - 1, 0), len(self._seg_p) - 1)

    def _last_update(self) -> float:
        k = math.floor((self._t - self._sensor_phase) / self._sensor_period)
        return max(self._sensor_phase + k * self._sensor_period, 0.0)

    def _mean_power(self, t0: float, t1: float) -> float:
        t0 = max(t0, 0.0)
        if t1 <= t0:
            return self._idle_power(self._fmax)
        return (self._energy_at(t1) - self._energy_at(t0)) / (t1 - t0)

    # ----- sensors (Gpu protocol) -------------------------------------------------------
    def energy_mj(self) -> int:
        return self.COUNTER_BASE_MJ + int(self._energy_at(self._last_update()) * 1000)

    def power_instant_w(self) -> float:
        tick = self._last_update()
        return round(self._mean_power(tick - self._v["instant_window_s"], tick), 3)

    def power_average_w(self) -> float:
        tick = self._last_update()
        return round(self._mean_power(tick - self._v["average_window_s"], tick), 3)

    def sm_clock_mhz(self) -> int:
        return self._seg_f[self._segment_at(self._t - 1e-9)] if self._seg_f else self._fmax

    def mem_clock_mhz(self) -> int:
        return int(self._v["mem_clock_mhz"])

    def temperature_c(self) -> float:
        return round(self._temperature, 1)

    def clocks_event_reasons(self) -> int:
        return self._seg_r[self._segment_at(self._t - 1e-9)] if self._seg_r else GPU_IDLE

    def violation_ns(self) -> dict[str, int]:
        return {k: int(v * 1e9) for k, v in self._violation.items()}

    def sample(self) -> Sample:
        return read_sample(self, self._t)

    # ----- facts ------------------------------------------------------------------------
    def memory_total_bytes(self) -> int:
        return self.spec.memory_bytes

    def power_limit_constraints_w(self) -> tuple[float, float]:
        return float(self._v["power_limit_min_w"]), float(self._v["power_limit_max_w"])

    def default_power_limit_w(self) -> float:
        return float(self._v["power_limit_max_w"])

    def supported_sm_clocks_mhz(self) -> list[int]:
        return list(self._clocks)

    # ----- DVFS -------------------------------------------------------------------------
    def power_limit_w(self) -> float:
        return self._power_limit

    def set_power_limit_w(self, watts: float) -> None:
        lo, hi = self.power_limit_constraints_w()
        if not lo <= watts <= hi:
            raise ValueError(f"power limit {watts} W outside {lo}-{hi} W")
        self._power_limit = float(watts)

    def lock_sm_clock_mhz(self, mhz: int) -> None:
        if mhz not in self._clocks:
            raise ValueError(f"unsupported SM clock {mhz} MHz")
        self._locked = int(mhz)

    def unlock_sm_clock(self) -> None:
        self._locked = None

    def locked_sm_clock_mhz(self) -> int | None:
        return self._locked

    def close(self) -> None:
        self._callbacks.clear()
