"""Pareto fronts of decode settings: minimise energy per token, maximise throughput.

A setting is on the front when no other setting of the same family is at least as good on
both axes and strictly better on one. Each DVFS family (power caps, clock locks) gets its
own front, and the default setting belongs to both: leaving the GPU alone is an option
whichever knob a user has.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

FAMILIES = ("power_cap", "clock_lock")
POINT_KEYS = ["model", "batch", "seqlen"]


def pareto_mask(energy, throughput) -> np.ndarray:
    """True where a point is not dominated (lower energy and higher throughput are better).
    Identical points do not dominate each other: both stay on the front. NaN points are
    never on it."""
    energy = np.asarray(energy, dtype=float)
    throughput = np.asarray(throughput, dtype=float)
    valid = np.isfinite(energy) & np.isfinite(throughput)
    on_front = valid.copy()
    for i in np.flatnonzero(valid):
        no_worse = valid & (energy <= energy[i]) & (throughput >= throughput[i])
        better = (energy < energy[i]) | (throughput > throughput[i])
        if np.any(no_worse & better):
            on_front[i] = False
    return on_front


def decode_points(summary: pd.DataFrame, model: str | None = None) -> pd.DataFrame:
    """Decode medians (energy per token, throughput) of every setting, one row per
    (model, batch, seqlen, dvfs), with a front flag per family: front_power_cap and
    front_clock_lock."""
    frame = summary[summary["phase"] == "decode"]
    if model is not None:
        frame = frame[frame["model"] == model]
    columns = POINT_KEYS + ["dvfs", "dvfs_kind", "dvfs_value", "energy_mj_per_token_median", "tokens_per_s_median"]
    points = frame[columns].rename(
        columns={"energy_mj_per_token_median": "energy_mj_per_token", "tokens_per_s_median": "tokens_per_s"}
    )
    points = points.reset_index(drop=True)
    for family in FAMILIES:
        points[f"front_{family}"] = False
    for _, group in points.groupby(POINT_KEYS, sort=True):
        for family in FAMILIES:
            members = group[group["dvfs_kind"].isin([family, "default"])]
            if (members["dvfs_kind"] == family).any():
                mask = pareto_mask(members["energy_mj_per_token"], members["tokens_per_s"])
                points.loc[members.index[mask], f"front_{family}"] = True
    return points


def front_line(points: pd.DataFrame, family: str) -> pd.DataFrame:
    """The front of one family as a line: its points ordered by throughput."""
    return points[points[f"front_{family}"]].sort_values(["tokens_per_s", "energy_mj_per_token"])
