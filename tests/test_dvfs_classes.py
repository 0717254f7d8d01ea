"""The DVFS classifier on synthetic curves of each shape."""

import numpy as np
import pandas as pd
import pytest

from phasewatt.analysis import dvfs_classes as dc
from phasewatt.analysis.dvfs_classes import classify_curve, classify_curves, curve_features, model_classes

LOCKS = [780, 1200, 1590, 1980]
SUSTAINED = [780, 1200, 1590, 1830]  # a 1980 MHz lock holds ~1830 MHz on an H200

# throughput flat down to 1200 MHz, energy falling all the way down
INSENSITIVE = ([200.0, 241.0, 241.0, 241.0], [850.0, 950.0, 1170.0, 1340.0])
# throughput collapses at the lowest clock, energy lowest at 1200 MHz
INTERIOR = ([110.0, 238.0, 241.0, 241.0], [1100.0, 900.0, 1000.0, 1100.0])
# throughput proportional to the clock actually held
BOUND = ([0.13 * f for f in SUSTAINED], [700.0, 800.0, 900.0, 1000.0])
# flat throughput, energy rising as the clock drops: none of the three
ODD = ([241.0] * 4, [1300.0, 1200.0, 1100.0, 1000.0])


@pytest.mark.parametrize(
    "curve, expected",
    [(INSENSITIVE, dc.CLOCK_INSENSITIVE), (INTERIOR, dc.INTERIOR_OPTIMUM), (BOUND, dc.CLOCK_BOUND), (ODD, dc.UNCLASSIFIED)],
)
def test_each_shape_gets_its_class(curve, expected):
    throughput, energy = curve
    label, _ = classify_curve(LOCKS, throughput, energy, SUSTAINED)
    assert label == expected


def test_evidence_of_a_knee_curve():
    features = curve_features(LOCKS, *INSENSITIVE, SUSTAINED)
    assert features["knee_clock_mhz"] == 1200
    assert features["energy_min_clock_mhz"] == 780
    assert features["energy_monotone"] is True
    assert features["throughput_drop_at_min_clock"] == pytest.approx(1 - 200 / 241)
    assert features["energy_saving_at_min"] == pytest.approx(1 - 850 / 1340)
    assert features["upper_elasticity"] == pytest.approx(0.0)


def test_evidence_of_an_interior_minimum():
    features = curve_features(LOCKS, *INTERIOR, SUSTAINED)
    assert features["energy_min_clock_mhz"] == 1200
    assert features["energy_rise_below_min"] == pytest.approx(1100 / 900 - 1)
    assert features["energy_monotone"] is False


def test_elasticity_uses_the_sustained_clock():
    features = curve_features(LOCKS, *BOUND, SUSTAINED)
    assert features["upper_elasticity"] == pytest.approx(1.0)
    # against the requested 1980 the same curve would look only partly clock bound
    requested = curve_features(LOCKS, *BOUND)
    assert requested["upper_elasticity"] < 0.7


def test_input_order_does_not_matter():
    order = [2, 0, 3, 1]
    shuffled = [np.array(a)[order] for a in (LOCKS, INSENSITIVE[0], INSENSITIVE[1], SUSTAINED)]
    assert classify_curve(*shuffled)[0] == dc.CLOCK_INSENSITIVE
    assert curve_features(*shuffled)["knee_clock_mhz"] == 1200


def test_noise_within_tolerances_does_not_change_the_class():
    rng = np.random.default_rng(0)
    for _ in range(20):
        t = np.array(INSENSITIVE[0]) * (1 + rng.uniform(-0.004, 0.004, 4))
        e = np.array(INSENSITIVE[1]) * (1 + rng.uniform(-0.004, 0.004, 4))
        assert classify_curve(LOCKS, t, e, SUSTAINED)[0] == dc.CLOCK_INSENSITIVE


def test_dense_sweep_measures_elasticity_over_at_least_ten_percent_of_clock():
    locks = np.arange(345, 1981, 15, dtype=float)
    label, features = classify_curve(locks, 0.1 * locks, 1000 - 0.1 * locks)
    assert label == dc.CLOCK_BOUND
    assert features["upper_elasticity"] == pytest.approx(1.0)


def test_too_few_clocks():
    assert classify_curve([780, 1980], [200, 241], [850, 1340])[0] == dc.TOO_FEW_CLOCKS
    assert classify_curve([], [], [])[0] == dc.TOO_FEW_CLOCKS


def test_nan_points_are_ignored():
    t = INSENSITIVE[0] + [np.nan]
    e = INSENSITIVE[1] + [1500.0]
    assert classify_curve(LOCKS + [1500], t, e)[0] == dc.CLOCK_INSENSITIVE


def _summary(model, batch, curve, seqlen=512):
    throughput, energy = curve
    rows = [
        {"model": model, "batch": batch, "seqlen": seqlen, "phase": "decode", "dvfs": f"sm{f}",
         "dvfs_kind": "clock_lock", "dvfs_value": float(f), "tokens_per_s_median": t,
         "energy_mj_per_token_median": e, "sustained_sm_clock_mhz_median": float(s)}
        for f, s, t, e in zip(LOCKS, SUSTAINED, throughput, energy)
    ]
    # rows the classifier must ignore: another phase and a non-lock setting
    rows.append({**rows[0], "phase": "prefill", "energy_mj_per_token_median": 1.0})
    rows.append({**rows[0], "dvfs": "pl300", "dvfs_kind": "power_cap", "energy_mj_per_token_median": 1.0})
    return rows


def test_classify_curves_and_model_classes_from_a_summary():
    summary = pd.DataFrame(
        _summary("lin", 1, INSENSITIVE) + _summary("lin", 8, INSENSITIVE) + _summary("lin", 32, BOUND)
        + _summary("att", 1, INTERIOR) + _summary("att", 8, BOUND)
    )
    curves = classify_curves(summary)
    assert len(curves) == 5
    assert curves.set_index(["model", "batch"]).loc[("lin", 32), "dvfs_class"] == dc.CLOCK_BOUND
    models = model_classes(curves).set_index("model")
    assert models.loc["lin", "dvfs_class"] == dc.CLOCK_INSENSITIVE
    assert models.loc["lin", "curves_in_class"] == 2 and models.loc["lin", "curves"] == 3
    assert models.loc["lin", "class_by_batch"] == "1: clock_insensitive; 8: clock_insensitive; 32: clock_bound"
    # a 1-1 tie goes to the class seen at the smallest batch
    assert models.loc["att", "dvfs_class"] == dc.INTERIOR_OPTIMUM
    assert models.loc["lin", "knee_clock_mhz"] == 1200
