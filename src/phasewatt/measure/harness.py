"""The phase-aware harness: idle, warm-up, then R repetitions of a prefill window and a
decode window, each repeated back to back until it lasts at least min_window_s."""

from __future__ import annotations

import math
from dataclasses import dataclass

from phasewatt.gpu.sampler import Sampler
from phasewatt.measure.windows import EnergyMeter


@dataclass(frozen=True)
class MeasureSettings:
    repetitions: int = 10
    warmups: int = 3
    decode_tokens: int = 128
    min_window_s: float = 1.0
    sample_interval_s: float = 0.01
    idle_s: float = 2.0

    @classmethod
    def from_config(cls, config: dict) -> "MeasureSettings":
        return cls(
            repetitions=int(config["repetitions"]),
            warmups=int(config["warmups"]),
            decode_tokens=int(config["decode_tokens"]),
            min_window_s=float(config.get("min_window_s", 1.0)),
            sample_interval_s=float(config.get("sample_interval_s", 0.01)),
            idle_s=float(config.get("idle_s", 2.0)),
        )


def repeats_for(seconds_per_run: float, min_window_s: float) -> int:
    """How many back-to-back runs make a window of at least min_window_s."""
    if seconds_per_run <= 0:
        return 1
    return max(1, math.ceil(min_window_s / seconds_per_run))


def _timed(gpu, engine, action) -> float:
    """Seconds of one synchronised run of `action` (warm-up timing sizes the windows)."""
    t0 = gpu.now()
    action()
    engine.synchronize()
    return gpu.now() - t0


def measure(engine, gpu, settings: MeasureSettings, requested_sm_clock_mhz: int | None = None) -> dict:
    """Run the windows of one job. Returns the record body and the sampler's trace."""
    sampler = Sampler(gpu, settings.sample_interval_s)
    meter = EnergyMeter(gpu, sampler, requested_sm_clock_mhz=requested_sm_clock_mhz)
    n = settings.decode_tokens
    with sampler:
        t_origin = gpu.now()
        # Warm up first (clocks ramp, graphs and allocator settle), then idle at this setting.
        prefill_s, decode_s = [], []
        for _ in range(settings.warmups):
            seconds = _timed(gpu, engine, engine.prefill)
            prefill_s.append(seconds)
            seconds = _timed(gpu, engine, lambda: engine.decode(n))
            decode_s.append(seconds)
        if not prefill_s:  # no warm-up asked: time one unmeasured iteration to size windows
            prefill_s.append(_timed(gpu, engine, engine.prefill))
            decode_s.append(_timed(gpu, engine, lambda: engine.decode(n)))
        idle = meter.measure_idle(settings.idle_s)
        prefill_repeats = repeats_for(min(prefill_s), settings.min_window_s)
        decode_repeats = repeats_for(min(decode_s), settings.min_window_s)
        repetitions = []
        short_windows = {"prefill": 0, "decode": 0}
        repeats = {"prefill": prefill_repeats, "decode": decode_repeats}
        actions = {"prefill": engine.prefill, "decode": lambda: engine.decode(n)}

        def window(phase):
            """One window of `phase`, repeated until it lasts min_window_s: the warm-up
            timing only sizes it; a window that still comes out short is measured again
            with more repeats (and counted), never kept."""
            while True:
                meter.begin_window(phase)
                tokens = 0
                for _ in range(repeats[phase]):
                    tokens = actions[phase]()
                engine.synchronize()
                result = meter.end_window(phase, repeats=repeats[phase], tokens=tokens)
                if result.window_s >= settings.min_window_s:
                    return result
                short_windows[phase] += 1
                grow = settings.min_window_s / max(result.window_s, 1e-9)
                repeats[phase] = max(repeats[phase] + 1, math.ceil(repeats[phase] * grow * 1.1))

        for rep in range(settings.repetitions):
            prefill = window("prefill")
            # The decode window continues from the cache of the last prefill.
            decode = window("decode")
            repetitions.append(
                {"repetition": rep, "prefill": prefill.as_record(t_origin), "decode": decode.as_record(t_origin)}
            )
        t_stop = gpu.now()
    return {
        "idle": idle,
        "warmup": {"prefill_s": prefill_s, "decode_s": decode_s},
        "prefill_repeats": repeats["prefill"],
        "decode_repeats": repeats["decode"],
        "short_windows_remeasured": short_windows,
        "repetitions": repetitions,
        "duration_s": t_stop - t_origin,
        "sampler": sampler.stats(),
        "trace": sampler.frame(t_origin),
    }
