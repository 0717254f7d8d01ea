"""Roofline ceilings from the GPU spec, and measured points placed on it, with known answers."""

import pandas as pd
import pytest

from _analysis_frames import windows
from phasewatt.analysis.roofline import gpu_roofline, roofline_points
from phasewatt.errors import PhasewattError
from phasewatt.gpu.specs import gpu_spec


def test_ceilings_of_the_h200():
    spec = gpu_spec("H200")
    datasheet = gpu_roofline(spec, "datasheet")
    assert datasheet.peak_flops_s == pytest.approx(989.4e12)
    assert datasheet.bandwidth_bytes_s == pytest.approx(4.27e12)
    assert datasheet.ridge_flop_per_byte == pytest.approx(989.4 / 4.27)
    assert "datasheet" in datasheet.label
    at_max_clock = gpu_roofline(spec, "gemm_max_clock")
    assert at_max_clock.peak_flops_s == pytest.approx(989.4e12 * 1980 / 1830 * 0.815)
    # the probe's GEMM at the 700 W limit: 641 TFLOP/s at 1455 MHz
    limited = gpu_roofline(spec, "gemm_power_limited")
    assert limited.peak_flops_s == pytest.approx(641e12, rel=0.005)
    with pytest.raises(PhasewattError, match="ceiling"):
        gpu_roofline(spec, "marketing")


def test_attainable_is_the_lower_of_the_two_roofs():
    roof = gpu_roofline(gpu_spec("H200"), "datasheet")
    attainable = roof.attainable_flops_s([1.0, 10.0, roof.ridge_flop_per_byte, 1e4])
    assert attainable.tolist() == pytest.approx([4.27e12, 4.27e13, 989.4e12, 989.4e12])


def _phase_rows(model, batch, phase, times, flops, hbm_bytes, dvfs="default", reasons=""):
    rows = windows(model, batch, 512, dvfs, phase, [1.0] * len(times), window_s=list(times), throttle_reasons=reasons)
    for row in rows:
        row["flops"], row["hbm_bytes"] = flops, hbm_bytes
    return rows


def test_points_use_the_median_time_of_kept_windows():
    roof = gpu_roofline(gpu_spec("H200"), "datasheet")
    rows = []
    rows += _phase_rows("a", 1, "decode", [0.5, 1.0, 2.0], flops=1e12, hbm_bytes=1e12)  # I = 1, 1e12 FLOP/s
    rows += _phase_rows("a", 1, "decode", [100.0], flops=1e12, hbm_bytes=1e12, reasons="hw_thermal_slowdown")
    rows += _phase_rows("a", 8, "decode", [4.0, 4.0], flops=4e15, hbm_bytes=1e12)  # I = 4000: compute side
    rows += _phase_rows("a", 1, "decode", [1e-3], flops=1e12, hbm_bytes=1e12, dvfs="sm780")  # other setting
    rows += _phase_rows("a", 1, "prefill", [1e-3], flops=1e12, hbm_bytes=1e9)  # other phase
    points = roofline_points(pd.DataFrame(rows), "decode", roof).set_index("batch")
    assert list(points.index) == [1, 8]
    assert points.loc[1, "intensity_flop_per_byte"] == pytest.approx(1.0)
    assert points.loc[1, "achieved_flops_s"] == pytest.approx(1e12)  # the thermal-slowdown window is excluded
    assert points.loc[1, "attainable_flops_s"] == pytest.approx(4.27e12)
    assert points.loc[1, "fraction_of_roof"] == pytest.approx(1e12 / 4.27e12)
    assert points.loc[1, "bound"] == "memory"
    assert points.loc[8, "achieved_flops_s"] == pytest.approx(1e15)
    assert points.loc[8, "bound"] == "compute"
    assert points.loc[8, "fraction_of_roof"] == pytest.approx(1e15 / 989.4e12)


def test_no_windows_give_an_empty_table():
    roof = gpu_roofline(gpu_spec("H200"), "datasheet")
    rows = _phase_rows("a", 1, "decode", [1.0], flops=1e12, hbm_bytes=1e12)
    assert roofline_points(pd.DataFrame(rows), "prefill", roof).empty
