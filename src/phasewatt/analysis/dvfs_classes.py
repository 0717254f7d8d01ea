"""DVFS response classes: how decode throughput and energy per token respond to a locked SM
clock, defined by the shape of the two curves.

For one (model, batch, prompt length) the decode curve is measured at each locked SM clock
f (the `sm<MHz>` settings). With T(f) the median throughput and E(f) the median energy per
token, and f_max the highest lock:

- clock_insensitive: throughput is flat from f_max down to a knee (it stays within
  KNEE_THROUGHPUT_LOSS of its best) and energy per token falls monotonically (within
  ENERGY_TOLERANCE per step) as the clock drops, so the lowest clock is the cheapest.
  Decode is bound by memory bandwidth; a lower clock only removes wasted core power.
- interior_optimum: throughput does not track the clock, and energy per token has a
  minimum at an interior clock, at least ENERGY_TOLERANCE below the energy at both the
  highest and the lowest clock: below the optimum the run stretches and the static power
  paid over the longer time outweighs the dynamic power saved.
- clock_bound: throughput tracks the clock near the top of the range: the elasticity
  d ln T / d ln f between f_max and the next lock at most UPPER_SEGMENT_RATIO x f_max is at
  least TRACKING_ELASTICITY. Decode is bound by the SMs (compute or instruction issue), so a
  lower clock costs throughput directly.
- unclassified: none of these shapes (e.g. energy rising as the clock drops while
  throughput stays flat); too_few_clocks: fewer than MIN_CLOCKS locks were measured.

The rules are applied in the order clock_bound, clock_insensitive, interior_optimum, so a
curve whose throughput tracks the clock is clock_bound whatever its energy does.
The x axis is the sustained SM clock where it was recorded (a 1980 MHz lock sustains about
1830 MHz on an H200), the requested lock otherwise; knee and optimum are reported as the
requested lock, the value a user would set.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pandas as pd

CLOCK_INSENSITIVE = "clock_insensitive"
INTERIOR_OPTIMUM = "interior_optimum"
CLOCK_BOUND = "clock_bound"
UNCLASSIFIED = "unclassified"
TOO_FEW_CLOCKS = "too_few_clocks"
# Fewest locked clocks that can show a knee or an interior minimum.
MIN_CLOCKS = 3
CLASSES = (CLOCK_INSENSITIVE, INTERIOR_OPTIMUM, CLOCK_BOUND, UNCLASSIFIED, TOO_FEW_CLOCKS)
CLASS_DESCRIPTIONS = {
    CLOCK_INSENSITIVE: "throughput flat down to a knee; energy per token falls monotonically as the clock drops",
    INTERIOR_OPTIMUM: "energy per token has an interior minimum; throughput does not track the clock",
    CLOCK_BOUND: "throughput tracks the SM clock",
    UNCLASSIFIED: "none of the three shapes",
    TOO_FEW_CLOCKS: f"fewer than {MIN_CLOCKS} locked clocks measured",
}
# Throughput within this fraction of the curve's best counts as flat (the knee is the lowest
# clock down to which every lock stays within it). 2%: twice the paper's "<1% loss", so
# run-to-run noise of ~1% does not move the knee.
KNEE_THROUGHPUT_LOSS = 0.02
# Energy steps smaller than this fraction are noise, not a change of direction.
ENERGY_TOLERANCE = 0.01
# Elasticity d ln T / d ln f at or above which throughput "tracks" the clock: 1 is perfect
# tracking (compute bound), 0 is flat (memory bound); 0.5 splits the two.
TRACKING_ELASTICITY = 0.5
# The upper segment for the elasticity runs from f_max to the highest lock at most this
# fraction of f_max, so a closely spaced sweep (15 MHz steps) still spans >= 10% of clock.
UPPER_SEGMENT_RATIO = 0.9

FEATURE_COLUMNS = [
    "n_clocks", "max_clock_mhz", "min_clock_mhz", "knee_clock_mhz", "throughput_drop_at_min_clock",
    "upper_elasticity", "full_range_elasticity", "energy_min_clock_mhz", "energy_saving_at_min",
    "energy_rise_below_min", "energy_monotone",
]


def _elasticity(t_high: float, t_low: float, f_high: float, f_low: float) -> float:
    if min(t_high, t_low, f_high, f_low) <= 0 or f_high == f_low:
        return math.nan
    return math.log(t_high / t_low) / math.log(f_high / f_low)


def curve_features(lock_mhz, throughput, energy, sustained_mhz=None) -> dict:
    """Shape features of one decode curve. lock_mhz: requested locks; throughput: tokens/s;
    energy: mJ/token; sustained_mhz: the clock actually held (optional, same order)."""
    lock = np.asarray(lock_mhz, dtype=float)
    t = np.asarray(throughput, dtype=float)
    e = np.asarray(energy, dtype=float)
    x = lock.copy() if sustained_mhz is None else np.asarray(sustained_mhz, dtype=float)
    x = np.where(np.isfinite(x) & (x > 0), x, lock)
    keep = np.isfinite(lock) & np.isfinite(t) & np.isfinite(e)
    order = np.argsort(-lock[keep], kind="stable")  # highest clock first
    lock, t, e, x = (a[keep][order] for a in (lock, t, e, x))
    n = len(lock)
    features = dict.fromkeys(FEATURE_COLUMNS, math.nan)
    features["n_clocks"] = n
    features["energy_monotone"] = False
    if n == 0:
        return features
    features["max_clock_mhz"], features["min_clock_mhz"] = float(lock[0]), float(lock[-1])
    best_t = float(t.max())
    flat = t >= (1.0 - KNEE_THROUGHPUT_LOSS) * best_t
    knee = 0
    while knee + 1 < n and flat[knee + 1]:
        knee += 1
    features["knee_clock_mhz"] = float(lock[knee]) if flat[0] else math.nan
    features["throughput_drop_at_min_clock"] = float(1.0 - t[-1] / t[0]) if t[0] > 0 else math.nan
    if n >= 2:
        below = np.flatnonzero(x[1:] <= UPPER_SEGMENT_RATIO * x[0])
        j = int(below[0]) + 1 if len(below) else 1
        features["upper_elasticity"] = _elasticity(t[0], t[j], x[0], x[j])
        features["full_range_elasticity"] = _elasticity(t[0], t[-1], x[0], x[-1])
    i_min = int(np.argmin(e))
    features["energy_min_clock_mhz"] = float(lock[i_min])
    features["energy_saving_at_min"] = float(1.0 - e[i_min] / e[0]) if e[0] > 0 else math.nan
    features["energy_rise_below_min"] = float(e[-1] / e[i_min] - 1.0) if e[i_min] > 0 else math.nan
    features["energy_monotone"] = bool(np.all(e[1:] <= e[:-1] * (1.0 + ENERGY_TOLERANCE)))
    return features


def classify_features(features: dict) -> str:
    """The class of one curve from its features (rules in the module docstring)."""
    if features["n_clocks"] < MIN_CLOCKS:
        return TOO_FEW_CLOCKS
    elasticity = features["upper_elasticity"]
    if math.isfinite(elasticity) and elasticity >= TRACKING_ELASTICITY:
        return CLOCK_BOUND
    if features["energy_monotone"]:
        return CLOCK_INSENSITIVE
    interior = features["min_clock_mhz"] < features["energy_min_clock_mhz"] < features["max_clock_mhz"]
    # E(f_max) >= (1 + tol) E_min  <=>  saving 1 - E_min / E(f_max) >= tol / (1 + tol)
    saves = features["energy_saving_at_min"] >= ENERGY_TOLERANCE / (1.0 + ENERGY_TOLERANCE)
    rises = features["energy_rise_below_min"] >= ENERGY_TOLERANCE
    if interior and saves and rises:
        return INTERIOR_OPTIMUM
    return UNCLASSIFIED


def classify_curve(lock_mhz, throughput, energy, sustained_mhz=None) -> tuple[str, dict]:
    features = curve_features(lock_mhz, throughput, energy, sustained_mhz)
    return classify_features(features), features


CURVE_KEYS = ["model", "batch", "seqlen"]


def classify_curves(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, batch, seqlen) decode curve over the clock locks: its features
    and its class. `summary` is analysis.summary.summarise(measurements)."""
    locks = summary[(summary["phase"] == "decode") & (summary["dvfs_kind"] == "clock_lock")]
    rows = []
    for key, curve in locks.groupby(CURVE_KEYS, sort=True):
        sustained = curve["sustained_sm_clock_mhz_median"] if "sustained_sm_clock_mhz_median" in curve else None
        label, features = classify_curve(
            curve["dvfs_value"], curve["tokens_per_s_median"], curve["energy_mj_per_token_median"], sustained
        )
        rows.append(dict(zip(CURVE_KEYS, key), dvfs_class=label, **features))
    return pd.DataFrame(rows, columns=CURVE_KEYS + ["dvfs_class"] + FEATURE_COLUMNS)


def model_classes(curves: pd.DataFrame) -> pd.DataFrame:
    """One row per model: its class (the most common over its curves; ties go to the class
    seen at the smallest batch) with the evidence: agreement, the class at each batch size,
    and the medians of the shape features over its curves."""
    rows = []
    for model, group in curves.groupby("model", sort=False):
        group = group.sort_values(["batch", "seqlen"])
        counts = Counter(group["dvfs_class"])
        top = max(counts.values())
        label = next(c for c in group["dvfs_class"] if counts[c] == top)
        by_batch = []
        for batch, sub in group.groupby("batch", sort=True):
            seen = sorted(set(sub["dvfs_class"]), key=list(sub["dvfs_class"]).index)
            by_batch.append(f"{batch}: {'/'.join(seen)}")
        rows.append(
            {
                "model": model,
                "dvfs_class": label,
                "curves_in_class": int(top),
                "curves": int(len(group)),
                "class_by_batch": "; ".join(by_batch),
                "knee_clock_mhz": float(group["knee_clock_mhz"].median()),
                "throughput_drop_at_min_clock": float(group["throughput_drop_at_min_clock"].median()),
                "upper_elasticity": float(group["upper_elasticity"].median()),
                "energy_min_clock_mhz": float(group["energy_min_clock_mhz"].median()),
                "energy_saving_at_min": float(group["energy_saving_at_min"].median()),
                "energy_monotone_share": float(group["energy_monotone"].astype(float).mean()),
            }
        )
    return pd.DataFrame(rows)
