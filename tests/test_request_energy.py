"""Request energy = prefill share + n x decode energy per token, and crossovers vs GQA."""

import math

import pytest
from _analysis_frames import config, frame

from phasewatt.analysis import request_energy as req
from phasewatt.analysis.request_energy import (
    RequestEnergyError,
    crossover,
    crossovers,
    request_energy_curves,
    request_energy_ratio_ci,
)
from phasewatt.analysis.summary import summarise


@pytest.fixture
def measurements():
    # prompt 100 tokens. gqa: 10 mJ/token prefill (1 J per request), 200 mJ per output token.
    # gdn: 30 mJ/token prefill (3 J), 100 mJ per output token -> equal at 20 output tokens.
    return frame(
        config("gqa", 1, 100, "default", 10.0, 200.0),
        config("gdn", 1, 100, "default", 30.0, 100.0),
        config("gqa", 8, 100, "default", 10.0, 50.0),
        config("gdn", 8, 100, "default", 5.0, 40.0),
        config("gqa", 1, 100, "sm1200", 8.0, 150.0),
    )


def test_curves_by_hand(measurements):
    curves = request_energy_curves(summarise(measurements), [0, 20, 40], batch=1)
    assert list(curves.columns[:5]) == ["model", "batch", "seqlen", "output_tokens", "request_energy_j"]
    energy = curves.set_index(["model", "output_tokens"])["request_energy_j"]
    assert energy[("gqa", 0)] == pytest.approx(1.0)
    assert energy[("gqa", 40)] == pytest.approx(1.0 + 8.0)
    assert energy[("gdn", 20)] == pytest.approx(energy[("gqa", 20)]) == pytest.approx(5.0)
    assert energy[("gdn", 40)] == pytest.approx(7.0)
    assert set(curves["batch"]) == {1}
    crossing = curves.groupby("model")["crossover_tokens"].first()
    assert crossing["gdn"] == pytest.approx(20.0) and math.isnan(crossing["gqa"])


def test_default_output_lengths_span_a_log_axis(measurements):
    curves = request_energy_curves(summarise(measurements))
    lengths = sorted(curves["output_tokens"].unique())
    assert lengths[0] == 1 and lengths[-1] == 8192 and len(lengths) > 20
    # without the reference model there is nothing to cross
    without = request_energy_curves(summarise(measurements), [1], reference="mla")
    assert without["crossover_tokens"].isna().all()


def test_curves_at_another_setting_and_every_batch(measurements):
    curves = request_energy_curves(summarise(measurements), [10], dvfs="sm1200")
    assert curves["request_energy_j"].tolist() == [pytest.approx(0.8 + 1.5)]
    assert len(request_energy_curves(summarise(measurements), [10])) == 4


def test_unmeasured_batch_setting_or_negative_length_is_an_error(measurements):
    summary = summarise(measurements)
    with pytest.raises(RequestEnergyError, match="batch: 4 .* measured: 1, 8"):
        request_energy_curves(summary, [10], batch=4)
    with pytest.raises(RequestEnergyError, match="dvfs: 'pl300'"):
        request_energy_curves(summary, [10], dvfs="pl300")
    with pytest.raises(RequestEnergyError, match="output_lengths"):
        request_energy_curves(summary, [-1])


@pytest.mark.parametrize(
    "args, expected",
    [
        ((3.0, 0.1, 1.0, 0.2), (20.0, req.CHEAPER_BEYOND)),  # dearer prefill, cheaper decode
        ((1.0, 0.2, 3.0, 0.1), (20.0, req.CHEAPER_BELOW)),  # cheaper prefill, dearer decode
        ((1.0, 0.1, 3.0, 0.2), (math.nan, req.ALWAYS_CHEAPER)),
        ((3.0, 0.2, 1.0, 0.1), (math.nan, req.NEVER_CHEAPER)),
        ((1.0, 0.1, 3.0, 0.1), (math.nan, req.ALWAYS_CHEAPER)),  # parallel lines
        ((1.0, 0.1, 1.0, 0.1), (math.nan, req.EQUAL)),
    ],
)
def test_crossover_cases(args, expected):
    n_star, kind = crossover(*args)
    assert kind == expected[1]
    assert (math.isnan(n_star) and math.isnan(expected[0])) or n_star == pytest.approx(expected[0])


def test_crossovers_against_gqa(measurements):
    table = crossovers(summarise(measurements)).set_index(["model", "batch"])
    assert list(table.index) == [("gdn", 1), ("gdn", 8)]
    assert table.loc[("gdn", 1), "crossover_output_tokens"] == pytest.approx(20.0)
    assert table.loc[("gdn", 1), "crossover_kind"] == req.CHEAPER_BEYOND
    assert table.loc[("gdn", 8), "crossover_kind"] == req.ALWAYS_CHEAPER
    assert table.loc[("gdn", 1), "prefill_energy_j"] == pytest.approx(3.0)


def test_missing_reference_model_names_what_was_measured(measurements):
    with pytest.raises(RequestEnergyError, match="reference: 'mla' .* measured: gdn, gqa"):
        crossovers(summarise(measurements), reference="mla")


def test_ratio_interval_collapses_without_spread(measurements):
    interval = request_energy_ratio_ci(measurements, "gdn", 1, 100, 40)
    assert interval.point == pytest.approx(7.0 / 9.0)
    assert interval.low == pytest.approx(interval.point) and interval.high == pytest.approx(interval.point)


def test_ratio_interval_with_spread_brackets_the_point():
    measurements = frame(
        config("gqa", 1, 100, "default", [9.0, 10.0, 11.0, 10.0, 10.5], [190.0, 200.0, 210.0, 205.0, 195.0]),
        config("gdn", 1, 100, "default", [29.0, 30.0, 31.0, 30.5, 29.5], [95.0, 100.0, 105.0, 99.0, 101.0]),
    )
    interval = request_energy_ratio_ci(measurements, "gdn", 1, 100, 40)
    assert interval.point == pytest.approx((3.0 + 4.0) / (1.0 + 8.0))
    assert interval.low < interval.point < interval.high
