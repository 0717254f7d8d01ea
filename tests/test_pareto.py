"""Pareto fronts on hand-made points whose fronts are known."""

import math

import numpy as np
import pandas as pd

from phasewatt.analysis.pareto import decode_points, front_line, pareto_mask


def test_pareto_mask_keeps_exactly_the_non_dominated_points():
    # (energy, throughput): lower energy and higher throughput are better.
    energy = [10.0, 8.0, 12.0, 12.0, 8.0, 20.0, math.nan]
    throughput = [100.0, 100.0, 120.0, 110.0, 100.0, 130.0, 500.0]
    # 0 is beaten by 1 (same throughput, less energy); 3 by 2 (same energy, more throughput);
    # 1 and 4 are identical and both stay; 2 and 5 trade energy for throughput; NaN never.
    assert pareto_mask(energy, throughput).tolist() == [False, True, True, False, True, True, False]


def test_pareto_mask_single_and_empty():
    assert pareto_mask([5.0], [1.0]).tolist() == [True]
    assert pareto_mask([], []).tolist() == []


def _summary_row(model, batch, seqlen, dvfs, energy, throughput, phase="decode"):
    kind = "power_cap" if dvfs.startswith("pl") else "clock_lock" if dvfs.startswith("sm") else "default"
    value = float(dvfs[2:]) if kind != "default" else np.nan
    return {
        "model": model, "batch": batch, "seqlen": seqlen, "dvfs": dvfs, "dvfs_kind": kind, "dvfs_value": value,
        "phase": phase, "energy_mj_per_token_median": energy, "tokens_per_s_median": throughput,
    }


def test_decode_points_front_per_family_with_default_in_both():
    rows = [
        _summary_row("m", 1, 512, "default", 100.0, 1000.0),
        _summary_row("m", 1, 512, "pl300", 90.0, 900.0),  # trades throughput for energy: on the cap front
        _summary_row("m", 1, 512, "pl500", 100.0, 990.0),  # beaten by default: off
        _summary_row("m", 1, 512, "sm780", 60.0, 1000.0),  # beats default outright: default off the lock front
        _summary_row("m", 1, 512, "sm1980", 95.0, 1000.0),  # beaten by sm780
        _summary_row("m", 1, 512, "default", 1.0, 1e9, phase="prefill"),  # prefill rows never count
        _summary_row("m", 8, 512, "default", 10.0, 5000.0),  # another panel: its own front
        _summary_row("m", 8, 512, "pl300", 11.0, 4000.0),
        _summary_row("other", 1, 512, "sm780", 1.0, 1e6),  # another model: filtered out
    ]
    points = decode_points(pd.DataFrame(rows), model="m").set_index(["batch", "dvfs"])
    assert len(points) == 7
    cap = points["front_power_cap"]
    lock = points["front_clock_lock"]
    assert cap[(1, "default")] and cap[(1, "pl300")] and not cap[(1, "pl500")]
    assert not cap[(1, "sm780")] and not cap[(1, "sm1980")]  # locks are not in the cap family
    assert lock[(1, "sm780")] and not lock[(1, "sm1980")] and not lock[(1, "default")]
    assert not lock[(1, "pl300")]
    assert cap[(8, "default")] and not cap[(8, "pl300")]
    assert not lock[(8, "default")]  # no lock measured at batch 8: no lock front there
    line = front_line(points.reset_index(), "power_cap")
    assert line[line["batch"] == 1]["dvfs"].tolist() == ["pl300", "default"]  # ordered by throughput
