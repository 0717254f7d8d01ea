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


def _timed(gpu, engine, action) -> tuple[float, int]:
    t0 = gpu.now()
    tokens = action()
    engine.synchronize()
    return gpu.now() - t0, tokens


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
            seconds, _ = _timed(gpu, engine, engine.prefill)
            prefill_s.append(seconds)
            seconds, _ = _timed(gpu, engine, lambda: engine.decode(n))
            decode_s.append(seconds)
        if not prefill_s:  # no warm-up asked: time one unmeasured iteration to size windows
            prefill_s.append(_timed(gpu, engine, engine.prefill)[0])
            decode_s.append(_timed(gpu, engine, lambda: engine.decode(n))[0])
        idle = meter.measure_idle(settings.idle_s)
        prefill_repeats = repeats_for(min(prefill_s), settings.min_window_s)
        decode_repeats = repeats_for(min(decode_s), settings.min_window_s)
        repetitions = []
        for rep in range(settings.repetitions):
            meter.begin_window("prefill")
            tokens = 0
            for _ in range(prefill_repeats):
                tokens = engine.prefill()
            engine.synchronize()
            prefill = meter.end_window("prefill", repeats=prefill_repeats, tokens=tokens)
            # The decode window continues from the cache of the last prefill.
            meter.begin_window("decode")
            for _ in range(decode_repeats):
                tokens = engine.decode(n)
            engine.synchronize()
            decode = meter.end_window("decode", repeats=decode_repeats, tokens=tokens)
            repetitions.append(
                {"repetition": rep, "prefill": prefill.as_record(t_origin), "decode": decode.as_record(t_origin)}
            )
        t_stop = gpu.now()
    return {
        "idle": idle,
        "warmup": {"prefill_s": prefill_s, "decode_s": decode_s},
        "prefill_repeats": prefill_repeats,
        "decode_repeats": decode_repeats,
        "repetitions": repetitions,
        "duration_s": t_stop - t_origin,
        "sampler": {
            "interval_s": settings.sample_interval_s,
            "samples": len(sampler.samples),
            "read_seconds": sampler.read_seconds,
        },
        "trace": sampler.frame(t_origin),
    }
