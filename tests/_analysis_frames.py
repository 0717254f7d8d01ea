"""Hand-made measurement tables (the shape analysis.aggregate produces) with known answers,
shared by the analysis tests."""

from __future__ import annotations

import pandas as pd


def dvfs_parts(dvfs: str) -> tuple[str, float]:
    if dvfs.startswith("pl"):
        return "power_cap", float(dvfs[2:])
    if dvfs.startswith("sm"):
        return "clock_lock", float(dvfs[2:])
    return "default", float("nan")


def windows(
    model: str,
    batch: int,
    seqlen: int,
    dvfs: str,
    phase: str,
    energy_mj_per_token,
    tokens_per_s=1000.0,
    mean_power_w=300.0,
    *,
    sustained_sm_clock_mhz=None,
    window_s=1.0,
    throttle_reasons="",
    power_violation_s=0.0,
    simulated=True,
    gpu_name="NVIDIA H200 (simulated)",
    decode_tokens=128,
) -> list[dict]:
    """One row per repetition; scalar arguments repeat, lists give one value per repetition."""
    n = len(energy_mj_per_token)

    def at(value, i):
        return value[i] if isinstance(value, (list, tuple)) else value

    kind, value = dvfs_parts(dvfs)
    clock = sustained_sm_clock_mhz if sustained_sm_clock_mhz is not None else (value if kind == "clock_lock" else 1980.0)
    rows = []
    for i in range(n):
        reasons = at(throttle_reasons, i)
        rows.append(
            {
                "run_id": f"{model}/bs{batch}_seq{seqlen}/{dvfs}", "model": model, "arch": model, "batch": batch,
                "seqlen": seqlen, "decode_tokens": decode_tokens, "dvfs": dvfs, "dvfs_kind": kind,
                "dvfs_value": value, "simulated": simulated, "gpu_name": gpu_name, "idle_power_w": 80.0,
                "phase": phase, "repetition": i, "energy_mj_per_token": float(at(energy_mj_per_token, i)),
                "tokens_per_s": float(at(tokens_per_s, i)), "time_s": float(at(window_s, i)),
                "energy_j": 1.0, "mean_power_w": float(at(mean_power_w, i)),
                "max_power_w": float(at(mean_power_w, i)) * 1.05,
                "sustained_sm_clock_mhz": float(at(clock, i)), "window_s": float(at(window_s, i)),
                "throttle_reasons": reasons, "sw_power_cap": "sw_power_cap" in reasons,
                "power_violation_s": float(at(power_violation_s, i)), "counter_stale": False,
            }
        )
    return rows


def frame(*row_lists) -> pd.DataFrame:
    rows = []
    for chunk in row_lists:
        rows.extend(chunk)
    return pd.DataFrame(rows)


def config(model, batch, seqlen, dvfs, prefill_mj, decode_mj, decode_tps=1000.0, decode_power_w=300.0, reps=5, **kw):
    """Prefill and decode windows of one configuration, constant over `reps` repetitions
    unless lists are given."""
    prefill = prefill_mj if isinstance(prefill_mj, list) else [prefill_mj] * reps
    decode = decode_mj if isinstance(decode_mj, list) else [decode_mj] * reps
    return windows(model, batch, seqlen, dvfs, "prefill", prefill, 20000.0, 650.0, **kw) + windows(
        model, batch, seqlen, dvfs, "decode", decode, decode_tps, decode_power_w, **kw
    )
