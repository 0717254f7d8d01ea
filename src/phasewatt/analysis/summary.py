"""Per-configuration summaries over repetitions: the numbers every figure and table uses.

Which windows are excluded: those slowed by something nobody asked for (thermal slowdown,
HW slowdown, HW power brake) and those whose energy counter did not move. The SW power cap
reason is kept and counted, never excluded: under a power cap it is the setting at work,
and at the default 700 W limit a compute-bound prefill honestly runs into it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

EXCLUDED_REASONS = ("sw_thermal_slowdown", "hw_thermal_slowdown", "hw_slowdown", "hw_power_brake_slowdown")
CONFIG_KEYS = ["model", "arch", "batch", "seqlen", "dvfs", "dvfs_kind", "dvfs_value", "phase"]
METRICS = [
    "energy_mj_per_token", "tokens_per_s", "time_s", "energy_j", "mean_power_w", "max_power_w",
    "sustained_sm_clock_mhz", "power_violation_s", "window_s",
]


def excluded_mask(measurements: pd.DataFrame) -> pd.Series:
    reasons = measurements["throttle_reasons"].fillna("")
    bad = np.zeros(len(measurements), dtype=bool)
    for name in EXCLUDED_REASONS:
        bad |= reasons.str.contains(name, regex=False).to_numpy()
    if "counter_stale" in measurements:
        bad |= measurements["counter_stale"].fillna(False).astype(bool).to_numpy()
    return pd.Series(bad, index=measurements.index)


def summarise(measurements: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration and phase: median, standard deviation and relative spread
    (sd/median) of each metric over the kept repetitions, and how many were excluded."""
    frame = measurements.copy()
    frame["excluded"] = excluded_mask(frame)
    frame["sw_power_cap"] = frame["sw_power_cap"].astype(bool)
    keys = [k for k in CONFIG_KEYS if k in frame]
    kept = frame[~frame["excluded"]]
    grouped = kept.groupby(keys, dropna=False)
    out = grouped[METRICS].median()
    out.columns = [f"{c}_median" for c in out.columns]
    sd = grouped[METRICS].std(ddof=1).fillna(0.0)
    for metric in METRICS:
        out[f"{metric}_sd"] = sd[metric]
        median = out[f"{metric}_median"].replace(0, np.nan)
        out[f"{metric}_rel_sd"] = sd[metric] / median
    out["repetitions"] = grouped.size()
    out["sw_power_cap_windows"] = grouped["sw_power_cap"].sum()
    counts = frame.groupby(keys, dropna=False).agg(
        windows=("excluded", "size"), excluded_windows=("excluded", "sum")
    )
    out = counts.join(out, how="left").reset_index()
    for col in ("idle_power_w", "gpu_name", "simulated", "decode_tokens"):
        if col in frame:
            first = frame.groupby(keys, dropna=False)[col].first().reset_index(drop=True)
            out[col] = first.to_numpy()
    return out


REPETITION_KEYS = ["model", "batch", "seqlen", "dvfs"]


def repetition_table(measurements: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per-repetition values of `metric`: one row per (model, batch, seqlen, dvfs,
    repetition), one column per phase. Excluded windows are NaN, so a repetition that lost
    one phase's window keeps the other; statistics drop incomplete rows where they need both."""
    if metric not in measurements:
        raise KeyError(f"measurements have no column {metric!r}")
    values = measurements[metric].astype(float).where(~excluded_mask(measurements))
    frame = measurements[REPETITION_KEYS + ["repetition", "phase"]].assign(value=values)
    table = frame.set_index(REPETITION_KEYS + ["repetition", "phase"])["value"].unstack("phase")
    table.columns.name = None
    return table.sort_index()


def repetitions_of(table: pd.DataFrame, model, batch, seqlen, dvfs) -> pd.DataFrame:
    """The rows of repetition_table for one configuration (empty if it was not measured)."""
    key = (model, batch, seqlen, dvfs)
    try:
        return table.loc[key]
    except KeyError:
        return table.iloc[0:0].droplevel(REPETITION_KEYS)
