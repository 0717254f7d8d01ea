"""Measurement windows named by the caller (begin_window / end_window), read from the
GPU's energy counter.

The counter (like the power readings) updates only every ~100 ms, so a window is aligned to
its updates: begin waits for the counter to change and starts right then; end, after the
device is synchronised, waits for the next change. The energy between the last piece of
work and that change (the tail, at most one update period of an idle GPU) is taken off
using the idle power measured in the same job at the same setting; the record keeps the
raw counter delta and this correction apart. The instant-power samples of the sampler are
integrated over the same window as an independent estimate.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

import numpy as np

from phasewatt.gpu.base import THROTTLE_REASONS, decode_reasons

POLL_S = 0.0005
COUNTER_TIMEOUT_S = 1.0


@dataclass
class Window:
    """One measured window: `repeats` back-to-back runs of a phase; per-run values are the
    window totals divided by repeats."""

    name: str
    repeats: int
    tokens: int  # tokens per run
    window_s: float
    counter_energy_j: float  # raw counter delta over the aligned span
    tail_s: float
    tail_correction_j: float
    energy_j_total: float  # counter delta minus the tail correction
    integrated_energy_j_total: float  # trapezoid of instant power over the window
    mean_power_w: float
    max_power_w: float
    sustained_sm_clock_mhz: float
    mem_clock_mhz: float
    requested_sm_clock_mhz: int | None
    throttle_reasons: list[str]
    throttled: bool
    violation_ns: dict
    counter_updates: int
    samples: int
    t_begin_s: float
    t_end_s: float
    counter_stale: bool = False
    sim_true_energy_j_total: float | None = None

    @property
    def time_s(self) -> float:
        return self.window_s / self.repeats

    @property
    def energy_j(self) -> float:
        return self.energy_j_total / self.repeats

    def as_record(self, t_origin: float) -> dict:
        out = asdict(self)
        out["t_begin_s"] = self.t_begin_s - t_origin
        out["t_end_s"] = self.t_end_s - t_origin
        out["time_s"] = self.time_s
        out["energy_j"] = self.energy_j
        out["integrated_energy_j"] = self.integrated_energy_j_total / self.repeats
        out["energy_mj_per_token"] = 1000.0 * self.energy_j / self.tokens if self.tokens else None
        out["tokens_per_s"] = self.tokens / self.time_s if self.time_s > 0 else None
        out["counter_vs_integral_rel"] = (
            (self.integrated_energy_j_total - self.energy_j_total) / self.energy_j_total
            if self.energy_j_total > 0
            else None
        )
        if self.sim_true_energy_j_total is not None:
            out["sim_true_joules"] = self.sim_true_energy_j_total / self.repeats
        else:
            out.pop("sim_true_energy_j_total")
        return out


class EnergyMeter:
    """Zeus-style windows over one GPU, its sampler, and the job's idle power."""

    def __init__(self, gpu, sampler, requested_sm_clock_mhz: int | None = None):
        self.gpu = gpu
        self.sampler = sampler
        self.idle_power_w: float | None = None
        self.requested_sm_clock_mhz = requested_sm_clock_mhz
        self._open: dict[str, dict] = {}

    def _wait_counter_change(self) -> tuple[float, int, bool]:
        """Poll until the energy counter changes; (time, value, stale) right after."""
        start_value = self.gpu.energy_mj()
        deadline = self.gpu.now() + COUNTER_TIMEOUT_S
        while True:
            value = self.gpu.energy_mj()
            if value != start_value:
                return self.gpu.now(), value, False
            if self.gpu.now() > deadline:
                return self.gpu.now(), value, True
            self.gpu.sleep(POLL_S)

    def begin_window(self, name: str) -> None:
        if name in self._open:
            raise RuntimeError(f"window {name!r} is already open")
        t, energy, stale = self._wait_counter_change()
        self._open[name] = {
            "t": t,
            "energy_mj": energy,
            "stale": stale,
            "violation": self.gpu.violation_ns(),
        }

    def end_window(self, name: str, *, repeats: int = 1, tokens: int = 0) -> Window:
        """Close a window. The caller has synchronised the device: the work is over."""
        begin = self._open.pop(name)
        t_end = self.gpu.now()
        reasons = 0  # from samples inside the window: the boundary reads see an idle GPU
        violation_end = self.gpu.violation_ns()
        t_tick, energy_tick, stale_end = self._wait_counter_change()
        counter_j = (energy_tick - begin["energy_mj"]) / 1000.0
        tail_s = t_tick - t_end
        idle_w = self.idle_power_w if self.idle_power_w is not None else 0.0
        tail_j = tail_s * idle_w
        samples = [s for s in self.sampler.between(begin["t"], t_end) if s.t_s > begin["t"]]
        for sample in samples:
            reasons |= sample.clocks_event_reasons
        integrated = _integrate_power(samples, begin["t"], t_end)
        powers = [s.power_instant_w for s in samples]
        counter_updates = len({s.energy_mj for s in samples})
        truth = None
        if hasattr(self.gpu, "true_energy_j"):
            truth = self.gpu.true_energy_j(begin["t"], t_end)
        names = decode_reasons(reasons)
        return Window(
            name=name,
            repeats=repeats,
            tokens=tokens,
            window_s=t_end - begin["t"],
            counter_energy_j=counter_j,
            tail_s=tail_s,
            tail_correction_j=tail_j,
            energy_j_total=counter_j - tail_j,
            integrated_energy_j_total=integrated,
            mean_power_w=float(np.mean(powers)) if powers else float("nan"),
            max_power_w=float(np.max(powers)) if powers else float("nan"),
            sustained_sm_clock_mhz=float(statistics.median(s.sm_clock_mhz for s in samples)) if samples else float("nan"),
            mem_clock_mhz=float(statistics.median(s.mem_clock_mhz for s in samples)) if samples else float("nan"),
            requested_sm_clock_mhz=self.requested_sm_clock_mhz,
            throttle_reasons=names,
            throttled=bool(THROTTLE_REASONS.intersection(names)),
            violation_ns={k: violation_end.get(k, 0) - begin["violation"].get(k, 0) for k in violation_end},
            counter_updates=counter_updates,
            samples=len(samples),
            t_begin_s=begin["t"],
            t_end_s=t_end,
            counter_stale=begin["stale"] or stale_end,
            sim_true_energy_j_total=truth,
        )

    def measure_idle(self, seconds: float) -> dict:
        """Idle power at the current setting over an aligned window of `seconds`."""
        self.begin_window("idle")
        self.gpu.sleep(seconds)
        window = self.end_window("idle", repeats=1)
        # No tail correction is known yet for idle itself: the tail is idle too.
        power = window.counter_energy_j / (window.window_s + window.tail_s)
        self.idle_power_w = power
        return {
            "idle_power_w": power,
            "idle_seconds": window.window_s + window.tail_s,
            "idle_sm_clock_mhz": window.sustained_sm_clock_mhz,
            "idle_integrated_power_w": window.integrated_energy_j_total / window.window_s if window.window_s else None,
        }


def _integrate_power(samples, t0: float, t1: float) -> float:
    """Integral of the instant-power readings over [t0, t1].

    A reading is posted when the sensor updates (every ~100 ms) and describes the time
    since the previous update, so each new value is applied backwards to the interval since
    the last change, not forwards from when it was read: that removes the one-update lag
    that otherwise shows the first 100 ms of a window at the power before it. The stretch
    after the last update is held at the last value.
    """
    if not samples:
        return float("nan")
    energy, t_prev, value = 0.0, t0, samples[0].power_instant_w
    changed = False
    for sample in samples[1:]:
        if sample.power_instant_w != value:
            energy += sample.power_instant_w * (sample.t_s - t_prev)
            t_prev, value, changed = sample.t_s, sample.power_instant_w, True
    if not changed:
        value = samples[-1].power_instant_w
    return float(energy + value * (t1 - t_prev))
