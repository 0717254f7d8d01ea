"""One run's record and power trace, read back for the timeline figure: the trace, the
measured windows (relative to the trace's t = 0), the power limit in force, and which
clock-event reasons the trace saw."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from phasewatt.errors import PhasewattError
from phasewatt.gpu.base import CLOCK_EVENT_REASONS, THROTTLE_REASONS, decode_reasons

REASON_BITS = {name: bit for bit, name in CLOCK_EVENT_REASONS.items()}
# Throttling reasons in warm colours, the rest (idle, settings) in cool greys/blues.
REASON_COLORS = {
    "sw_power_cap": "#D55E00",
    "hw_slowdown": "#B00020",
    "sw_thermal_slowdown": "#E69F00",
    "hw_thermal_slowdown": "#8B4513",
    "hw_power_brake_slowdown": "#CC79A7",
    "gpu_idle": "#999999",
    "applications_clocks_setting": "#0072B2",
    "sync_boost": "#56B4E9",
    "display_clock_setting": "#009E73",
}


class TraceError(PhasewattError):
    """A run record or its trace cannot be read for a timeline."""


@dataclass
class Run:
    record: dict
    trace: pd.DataFrame
    windows: pd.DataFrame  # phase, repetition, t_begin_s, t_end_s
    reasons: list[str]  # reasons seen anywhere in the trace, throttling ones first
    power_limit_w: float | None
    idle_power_w: float | None
    requested_sm_clock_mhz: float | None


def reason_bit(name: str) -> int:
    return REASON_BITS[name]


def reason_color(name: str) -> str:
    return REASON_COLORS.get(name, "#000000")


def load_run(record_path) -> Run:
    """The record at record_path and the trace file it names (beside it)."""
    record_path = Path(record_path)
    record = json.loads(record_path.read_text())
    if record.get("status") != "ok":
        raise TraceError(f"record {record_path}: status is {record.get('status')!r}, a timeline needs a run with status 'ok'")
    trace_path = record_path.parent / record["trace_file"]
    if not trace_path.exists():
        raise TraceError(f"record {record_path}: its trace file {trace_path.name} is missing")
    trace = pd.read_parquet(trace_path).sort_values("t_s").reset_index(drop=True)
    rows = []
    for rep in record.get("repetitions", []):
        for phase in ("prefill", "decode"):
            window = rep[phase]
            rows.append({"phase": phase, "repetition": rep["repetition"],
                         "t_begin_s": window["t_begin_s"], "t_end_s": window["t_end_s"]})
    windows = pd.DataFrame(rows, columns=["phase", "repetition", "t_begin_s", "t_end_s"])
    mask = 0
    for value in trace["clocks_event_reasons"].dropna().astype(int).unique():
        mask |= int(value)
    seen = [name for name in decode_reasons(mask) if name in REASON_BITS]
    seen.sort(key=lambda name: (name not in THROTTLE_REASONS, list(REASON_BITS).index(name)))
    effective = record.get("dvfs_effective") or {}
    requested = None
    dvfs = str(record.get("dvfs", ""))
    if dvfs.startswith("sm") and dvfs[2:].isdigit():
        requested = float(dvfs[2:])
    return Run(
        record=record,
        trace=trace,
        windows=windows,
        reasons=seen,
        power_limit_w=effective.get("effective_power_limit_w"),
        idle_power_w=(record.get("idle") or {}).get("idle_power_w"),
        requested_sm_clock_mhz=requested,
    )
