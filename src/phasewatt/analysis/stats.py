"""Uncertainty of the paper's claims: bootstrap confidence intervals over repetitions and an
exact paired test for "the best clock lock beats the best power cap".

Bootstrap: percentile intervals (Efron) of a statistic of per-configuration medians. Each
configuration's repetitions are resampled independently of every other configuration's,
because repetitions of different jobs share nothing but their index. A repetition is the
unit: when a statistic needs several quantities of one configuration (prefill and decode
energy), they are resampled together, row by row. The RNG is seeded, so every number in a
table is reproducible. With zero spread every resample equals the data and the interval
collapses to the point, which is the honest answer.

Paired test: an exact sign-flip permutation test of the mean paired difference. Under H0
(no difference between the two settings) the sign of each paired difference is equally
likely to be + or -; enumerating all 2^n sign patterns gives the exact null distribution.
Chosen over the Wilcoxon signed-rank test because it (1) tests the difference in mJ/token,
the unit of the claim, not ranks; (2) stays exact with ties and zero differences, where
Wilcoxon implementations fall back to a normal approximation; (3) needs no scipy; (4) says
something meaningful when the data have zero spread (a constant non-zero difference gets
the smallest p-value n pairs can give, 2^-n; all-zero differences get p = 1).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

from phasewatt.errors import PhasewattError

CONFIDENCE_LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 4000
BOOTSTRAP_SEED = 20260501
# Exact enumeration of sign patterns up to this many pairs (2^20 patterns, done in chunks);
# above it the null distribution is sampled with PERMUTATION_RESAMPLES seeded draws.
EXACT_MAX_PAIRS = 20
PERMUTATION_RESAMPLES = 100_000
_CHUNK_PATTERNS = 1 << 14
ALTERNATIVES = ("less", "greater", "two-sided")


class StatisticsError(PhasewattError):
    """A statistic was asked for with arguments it cannot take."""


@dataclass(frozen=True)
class Interval:
    """A point estimate and its bootstrap confidence interval."""

    point: float
    low: float
    high: float
    level: float = CONFIDENCE_LEVEL

    def scaled(self, factor: float) -> "Interval":
        return Interval(self.point * factor, self.low * factor, self.high * factor, self.level)

    def complement(self) -> "Interval":
        """1 - x: turns a ratio's interval into a saving's (the bounds swap)."""
        return Interval(1.0 - self.point, 1.0 - self.high, 1.0 - self.low, self.level)


def _clean(values) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim == 1:
        array = array[:, None]
    return array[~np.isnan(array).any(axis=1)]


def bootstrap_groups(
    groups: Sequence,
    statistic: Callable[[list[np.ndarray]], float],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    level: float = CONFIDENCE_LEVEL,
    seed: int = BOOTSTRAP_SEED,
) -> Interval:
    """Percentile bootstrap of statistic(medians) where medians[i] is the vector of column
    medians of groups[i] (rows = repetitions, columns = quantities of one configuration).
    Each group's rows are resampled with replacement, independently of the others."""
    if not 0 < level < 1:
        raise StatisticsError(f"level: {level!r} is out of range; it must be between 0 and 1")
    if resamples < 1:
        raise StatisticsError(f"resamples: {resamples!r} is out of range; it must be >= 1")
    arrays = [_clean(g) for g in groups]
    if any(len(a) == 0 for a in arrays):
        return Interval(math.nan, math.nan, math.nan, level)
    point = float(statistic([np.median(a, axis=0) for a in arrays]))
    rng = np.random.default_rng(seed)
    resampled = []
    for array in arrays:
        index = rng.integers(0, len(array), size=(resamples, len(array)))
        resampled.append(np.median(array[index], axis=1))  # (resamples, columns)
    values = np.array([float(statistic([r[b] for r in resampled])) for b in range(resamples)])
    return _percentile_interval(point, values, level)


def bootstrap_ci(
    values,
    statistic: Callable[[np.ndarray], float] = np.median,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    level: float = CONFIDENCE_LEVEL,
    seed: int = BOOTSTRAP_SEED,
) -> Interval:
    """Percentile bootstrap interval of a statistic of one sample (default: the median)."""
    if not 0 < level < 1:
        raise StatisticsError(f"level: {level!r} is out of range; it must be between 0 and 1")
    array = _clean(values)[:, 0]
    if len(array) == 0:
        return Interval(math.nan, math.nan, math.nan, level)
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(array), size=(resamples, len(array)))
    replicates = np.array([statistic(array[i]) for i in index], dtype=float)
    return _percentile_interval(float(statistic(array)), replicates, level)


def _percentile_interval(point: float, replicates: np.ndarray, level: float) -> Interval:
    replicates = replicates[np.isfinite(replicates)]
    if len(replicates) == 0 or not math.isfinite(point):
        return Interval(point, math.nan, math.nan, level)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(replicates, [tail, 1.0 - tail])
    # A percentile interval can miss the point when the statistic is discrete (medians of few
    # repetitions); widen it to contain the point rather than report one that excludes it.
    return Interval(point, float(min(low, point)), float(max(high, point)), level)


def ratio_ci(numerator, denominator, **options) -> Interval:
    """median(numerator) / median(denominator), each sample resampled independently."""
    return bootstrap_groups([numerator, denominator], _ratio_of_medians, **options)


def saving_ci(setting, baseline, **options) -> Interval:
    """Saving = 1 - median(setting) / median(baseline), e.g. 1 - E_lock / E_default."""
    return ratio_ci(setting, baseline, **options).complement()


def _ratio_of_medians(medians: list[np.ndarray]) -> float:
    denominator = medians[1][0]
    return medians[0][0] / denominator if denominator != 0 else math.nan


@dataclass(frozen=True)
class PairedTest:
    """Result of a paired test of x against y (difference d = x - y)."""

    n_pairs: int
    mean_difference: float
    median_difference: float
    p_value: float
    alternative: str
    method: str
    min_attainable_p: float
    note: str

    def as_dict(self) -> dict:
        return asdict(self)


def _sign_flip_sums(differences: np.ndarray) -> np.ndarray:
    """Sum of s_i * d_i over every sign pattern s (exact null distribution of n * mean)."""
    n = len(differences)
    total = 1 << n
    sums = np.empty(total, dtype=float)
    bits = np.arange(n, dtype=np.int64)
    for start in range(0, total, _CHUNK_PATTERNS):
        patterns = np.arange(start, min(start + _CHUNK_PATTERNS, total), dtype=np.int64)
        signs = 1.0 - 2.0 * ((patterns[:, None] >> bits) & 1)
        sums[start : start + len(patterns)] = signs @ differences
    return sums


def paired_permutation_test(x, y, alternative: str = "less", *, seed: int = BOOTSTRAP_SEED) -> PairedTest:
    """Sign-flip permutation test of mean(x - y). alternative='less': H1 says x < y."""
    if alternative not in ALTERNATIVES:
        raise StatisticsError(f"alternative: {alternative!r} is not allowed; allowed: {', '.join(ALTERNATIVES)}")
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise StatisticsError(f"paired samples: shapes {x.shape} and {y.shape} differ; they must be equal 1-D")
    keep = ~(np.isnan(x) | np.isnan(y))
    d = x[keep] - y[keep]
    n = len(d)
    if n == 0:
        return PairedTest(0, math.nan, math.nan, math.nan, alternative, "none", math.nan, "no complete pairs")
    mean_d, median_d = float(d.mean()), float(np.median(d))
    scale = float(np.abs(d).max())
    if scale == 0.0:
        return PairedTest(
            n, 0.0, 0.0, 1.0, alternative, "exact sign-flip", 2.0**-n,
            "all paired differences are zero: no difference to detect",
        )
    observed = float(d.sum())
    tolerance = 1e-9 * scale * n
    if n <= EXACT_MAX_PAIRS:
        sums = _sign_flip_sums(d)
        method = "exact sign-flip"
        floor = 2.0**-n
    else:
        rng = np.random.default_rng(seed)
        signs = rng.choice(np.array([-1.0, 1.0]), size=(PERMUTATION_RESAMPLES, n))
        sums = np.concatenate([[observed], signs @ d])  # the observed pattern counts once
        method = f"sign-flip, {PERMUTATION_RESAMPLES} seeded random patterns"
        floor = 1.0 / len(sums)
    if alternative == "less":
        p = float(np.mean(sums <= observed + tolerance))
    elif alternative == "greater":
        p = float(np.mean(sums >= observed - tolerance))
    else:
        p = float(np.mean(np.abs(sums) >= abs(observed) - tolerance))
    if n <= EXACT_MAX_PAIRS and alternative == "two-sided":
        floor = 2.0 ** (1 - n)
    note = ""
    if float(d.std()) == 0.0:
        note = f"the differences have zero spread: p is the smallest {n} pairs allow"
    elif math.isclose(p, floor):
        note = f"p is the smallest {n} pairs allow"
    return PairedTest(n, mean_d, median_d, p, alternative, method, floor, note)


def holm_adjust(p_values) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (family-wise error control over many configurations).
    NaN stays NaN and does not count in the family."""
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, math.nan)
    valid = np.flatnonzero(~np.isnan(p))
    m = len(valid)
    if m == 0:
        return out
    order = valid[np.argsort(p[valid], kind="stable")]
    running = 0.0
    for rank, idx in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[idx]))
        out[idx] = running
    return out
