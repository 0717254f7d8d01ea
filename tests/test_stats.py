"""Bootstrap intervals, the paired sign-flip test and Holm's adjustment, on data with known answers."""

import math

import numpy as np
import pytest

from phasewatt.analysis import stats
from phasewatt.analysis.stats import (
    Interval,
    StatisticsError,
    bootstrap_ci,
    bootstrap_groups,
    holm_adjust,
    paired_permutation_test,
    ratio_ci,
    saving_ci,
)


def test_zero_spread_collapses_interval_to_the_point():
    interval = saving_ci([70.0] * 10, [100.0] * 10)
    assert interval.point == pytest.approx(0.3)
    assert interval.low == pytest.approx(0.3) and interval.high == pytest.approx(0.3)


def test_saving_is_one_minus_ratio_of_medians_and_bounds_swap():
    setting, baseline = [60.0, 70.0, 80.0], [90.0, 100.0, 110.0]
    ratio = ratio_ci(setting, baseline)
    saving = saving_ci(setting, baseline)
    assert ratio.point == pytest.approx(0.7)
    assert saving.point == pytest.approx(0.3)
    assert saving.low == pytest.approx(1 - ratio.high) and saving.high == pytest.approx(1 - ratio.low)
    # the most extreme resamples are all-60 over all-110 and all-80 over all-90
    assert 60 / 110 - 1e-12 <= ratio.low <= ratio.point <= ratio.high <= 80 / 90 + 1e-12


def test_bootstrap_is_seeded_and_reproducible():
    values = np.random.default_rng(1).normal(100, 5, size=12)
    assert bootstrap_ci(values) == bootstrap_ci(values)
    # the mean, not the median: medians of 12 values are few, so two seeds can agree on them
    assert bootstrap_ci(values, np.mean, seed=1) != bootstrap_ci(values, np.mean, seed=2)


def test_interval_covers_the_true_saving_with_many_repetitions():
    rng = np.random.default_rng(7)
    lock, default = rng.normal(70, 1, 60), rng.normal(100, 1, 60)
    interval = saving_ci(lock, default)
    assert interval.low < 0.3 < interval.high
    assert interval.high - interval.low < 0.02


def test_bootstrap_ci_of_a_custom_statistic():
    interval = bootstrap_ci([1.0, 2.0, 3.0, 4.0], statistic=np.max)
    assert interval.point == 4.0 and interval.high == 4.0 and 1.0 <= interval.low <= 4.0


def test_groups_resample_rows_together_and_drop_incomplete_rows():
    # second row has a NaN: dropped; remaining rows are identical, so no spread at all
    group = [[1.0, 10.0], [np.nan, 99.0], [1.0, 10.0]]
    interval = bootstrap_groups([group], lambda m: m[0][0] + m[0][1])
    assert interval == Interval(11.0, 11.0, 11.0)


def test_empty_sample_gives_nan_not_an_exception():
    interval = saving_ci([], [1.0, 2.0])
    assert math.isnan(interval.point) and math.isnan(interval.low)


def test_zero_denominator_gives_nan_ratio():
    assert math.isnan(ratio_ci([1.0, 1.0], [0.0, 0.0]).point)


@pytest.mark.parametrize("level", [0.0, 1.0, 1.5])
def test_bad_level_is_one_line_error(level):
    with pytest.raises(StatisticsError, match="level"):
        saving_ci([1.0], [2.0], level=level)


def test_sign_flip_test_by_hand():
    # the 8 sign patterns of (-3, -1, 2) sum to 6, 2, 4, 0, 0, -4, -2, -6; observed -2
    x, y = np.array([-3.0, -1.0, 2.0]), np.zeros(3)
    assert paired_permutation_test(x, y, "less").p_value == pytest.approx(3 / 8)
    assert paired_permutation_test(x, y, "greater").p_value == pytest.approx(6 / 8)
    assert paired_permutation_test(x, y, "two-sided").p_value == pytest.approx(6 / 8)
    result = paired_permutation_test(x, y, "less")
    assert result.n_pairs == 3 and result.mean_difference == pytest.approx(-2 / 3)
    assert result.method == "exact sign-flip"


def test_constant_difference_gets_the_exact_floor_and_says_so():
    result = paired_permutation_test([70.0] * 10, [90.0] * 10, "less")
    assert result.p_value == pytest.approx(2.0**-10)
    assert result.min_attainable_p == pytest.approx(2.0**-10)
    assert "zero spread" in result.note


def test_identical_samples_say_no_difference():
    result = paired_permutation_test([5.0] * 6, [5.0] * 6)
    assert result.p_value == 1.0
    assert "zero" in result.note


def test_wrong_direction_is_not_significant():
    result = paired_permutation_test([100.0, 101.0, 102.0, 103.0], [90.0, 90.5, 91.0, 92.0], "less")
    assert result.p_value == pytest.approx(1.0)


def test_nan_pairs_are_dropped_and_shapes_checked():
    result = paired_permutation_test([1.0, np.nan, 1.0], [2.0, 2.0, 2.0])
    assert result.n_pairs == 2
    with pytest.raises(StatisticsError, match="shapes"):
        paired_permutation_test([1.0, 2.0], [1.0])
    with pytest.raises(StatisticsError, match="alternative"):
        paired_permutation_test([1.0], [2.0], "smaller")
    assert math.isnan(paired_permutation_test([], []).p_value)


def test_sampled_null_above_the_exact_limit(monkeypatch):
    monkeypatch.setattr(stats, "PERMUTATION_RESAMPLES", 2000)
    n = stats.EXACT_MAX_PAIRS + 5
    result = paired_permutation_test(np.full(n, 1.0), np.full(n, 2.0), "less")
    assert result.method.startswith("sign-flip, 2000")
    assert result.p_value == pytest.approx(1 / 2001)


def test_agrees_with_scipy_exact_permutation_test():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    x, y = rng.normal(0, 1, 9), rng.normal(0.4, 1, 9)
    ours = paired_permutation_test(x, y, "less").p_value
    theirs = scipy_stats.permutation_test(
        (x, y), lambda a, b, axis: np.mean(a - b, axis=axis), permutation_type="samples",
        alternative="less", n_resamples=np.inf,
    ).pvalue
    assert ours == pytest.approx(theirs)


def test_holm_by_hand_and_nan_kept_out_of_the_family():
    adjusted = holm_adjust([0.01, 0.04, np.nan, 0.03])
    assert adjusted[0] == pytest.approx(0.03)
    assert adjusted[1] == pytest.approx(0.06) and adjusted[3] == pytest.approx(0.06)
    assert math.isnan(adjusted[2])
    assert holm_adjust([0.6, 0.9]).tolist() == [1.0, 1.0]
