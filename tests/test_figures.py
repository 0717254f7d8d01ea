"""Every figure from a small simulated study (real records through run_job and aggregate):
a PDF and a PNG written, no text overlapping other text or cut by the figure's edge, the
SIMULATED stamp exactly when the data are simulated; and what each figure marks."""

import copy
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
import yaml
from matplotlib.collections import PolyCollection

from phasewatt.analysis import figures, style
from phasewatt.analysis.aggregate import aggregate
from phasewatt.analysis.summary import summarise
from phasewatt.config import jobs, validate
from phasewatt.errors import ConfigError
from phasewatt.measure.run import run_job

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["gqa", "gdn"]


@pytest.fixture(autouse=True)
def fast_png():
    """The PNG twins only need to exist here: a low resolution keeps the tests fast."""
    with matplotlib.rc_context({"savefig.dpi": 80}):
        yield


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """(measurements, record path of a power-capped run) of a 2 x 2 x 2 x 4 simulated grid."""
    base = tmp_path_factory.mktemp("study")
    config = copy.deepcopy(yaml.safe_load((ROOT / "config.yaml").read_text()))
    config["grid"] = {"models": MODELS, "batch_sizes": [1, 8], "prompt_lengths": [512, 2048],
                      "dvfs": ["default", "pl300", "sm780", "sm1980"]}
    config.update(device="sim", engine="sim", repetitions=3, warmups=1, idle_s=0.3, min_window_s=0.2,
                  sample_interval_s=0.02)
    config = validate(config)
    paths = []
    for job in jobs(config):
        record = base / "runs" / f"{job.run_id}.json"
        run_job(config, job, record, record.with_suffix(".trace.parquet"), base / "journal")
        paths.append(record)
    measurements, _ = aggregate(paths)
    return measurements, base / "runs" / "gqa" / "bs1_seq512" / "pl300.json"


def _texts(fig):
    return [t.get_text() for t in fig.texts]


def _check_outputs(fig, pdf):
    assert pdf.read_bytes().startswith(b"%PDF") and pdf.stat().st_size > 1000
    png = pdf.with_suffix(".png")
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 1000
    assert not [p for p in pdf.parent.iterdir() if p.name.endswith(".tmp")]
    assert style.text_problems(fig) == ([], [])


@pytest.mark.parametrize(
    "name", ["pareto", "roofline_decode", "roofline_prefill", "power_vs_cap", "energy_vs_seqlen", "request_energy",
             "clock_sustained", "timeline"],
)
def test_every_figure_is_written_readable_and_stamped(study, tmp_path, name):
    measurements, record = study
    pdf = tmp_path / f"{name}.pdf"
    fig = figures.make_figure(name, pdf, measurements=measurements, record=record, model="gdn", models=MODELS)
    _check_outputs(fig, pdf)
    texts = " ".join(_texts(fig))
    assert "SIMULATED" in texts and "NVIDIA H200" in texts


def test_measured_data_get_no_simulated_stamp(study, tmp_path):
    measurements = study[0].copy()
    measurements["simulated"] = False
    measurements["gpu_name"] = "NVIDIA H200"
    fig = figures.make_figure("energy_vs_seqlen", tmp_path / "e.pdf", measurements=measurements)
    assert "SIMULATED" not in " ".join(_texts(fig))
    assert any(t.startswith("NVIDIA H200") for t in _texts(fig))


def test_measurements_load_from_parquet_path(study, tmp_path):
    path = tmp_path / "m.parquet"
    study[0].to_parquet(path)
    fig = figures.make_figure("clock_sustained", tmp_path / "c.pdf", measurements=path, gpu="H200")
    assert len(fig.axes) == 2  # one panel per model


def test_pareto_labels_every_setting_and_draws_the_fronts(study, tmp_path):
    measurements, _ = study
    fig = figures.plot_pareto(measurements, "gqa", tmp_path / "p.pdf")
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert len(panels) == 4  # 2 batch sizes x 2 prompt lengths
    for ax in panels:
        labelled = " ".join(t.get_text() for t in ax.texts)
        for token in ("default", "pl", "sm780", "sm1980"):
            assert token in labelled
        # the clock-lock family has sm780 faster-or-cheaper trade-offs: its front is a line
        assert any(line.get_linestyle() == "--" for line in ax.get_lines())


def test_energy_band_is_one_sd_wide(study, tmp_path):
    measurements = study[0].copy()
    rng = np.random.default_rng(0)
    measurements["energy_mj_per_token"] *= 1 + 0.05 * rng.standard_normal(len(measurements))
    summary = summarise(measurements)
    fig = figures.plot_energy_vs_seqlen(measurements, tmp_path / "e.pdf", models=MODELS)
    ax = next(a for a in fig.axes if a.get_title() == "decode, batch 8")
    band = [c for c in ax.collections if isinstance(c, PolyCollection)][0]  # first model: gqa
    ys = band.get_paths()[0].vertices[:, 1]
    row = summary[(summary["model"] == "gqa") & (summary["batch"] == 8) & (summary["phase"] == "decode")
                  & (summary["dvfs"] == "default")].sort_values("seqlen")
    assert row["energy_mj_per_token_sd"].min() > 0
    assert ys.max() == pytest.approx((row["energy_mj_per_token_median"] + row["energy_mj_per_token_sd"]).max())
    assert ys.min() == pytest.approx((row["energy_mj_per_token_median"] - row["energy_mj_per_token_sd"]).min())


def test_power_vs_cap_fills_exactly_the_bound_points(study, tmp_path):
    measurements = study[0].copy()
    decode_cap = (measurements["phase"] == "decode") & (measurements["dvfs"] == "pl300")
    measurements.loc[decode_cap, "sw_power_cap"] = measurements.loc[decode_cap, "batch"] == 8
    measurements.loc[decode_cap, "throttle_reasons"] = np.where(measurements.loc[decode_cap, "batch"] == 8, "sw_power_cap", "")
    fig = figures.plot_power_vs_cap(measurements, tmp_path / "p.pdf", models=MODELS)
    for ax in [a for a in fig.axes if a.get_title() in MODELS]:
        fills = [tuple(c.get_facecolors()[0]) for c in ax.collections if len(c.get_offsets())]
        hollow = sum(1 for f in fills if f[:3] == (1.0, 1.0, 1.0))
        assert (len(fills), hollow) == (4, 2)  # 2 batch sizes x 2 prompt lengths, batch 1 never bound


def test_timeline_shades_every_window_and_lists_the_reasons(study, tmp_path):
    _, record = study
    fig = figures.plot_timeline(record, tmp_path / "t.pdf")
    power_ax, clock_ax, reason_ax = fig.axes[:3]
    assert len(power_ax.patches) == 2 * 3  # prefill and decode windows of 3 repetitions
    trace = pd.read_parquet(record.with_suffix(".trace.parquet"))
    assert trace["clocks_event_reasons"].astype(int).map(lambda m: bool(m & 0x4)).any()
    assert "sw_power_cap" in [t.get_text() for t in reason_ax.get_yticklabels()]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "power limit 300 W" in labels


def test_request_energy_marks_crossovers_inside_the_range(tmp_path):
    rows = []
    for model, prefill, decode in (("gqa", 10.0, 1.0), ("lin", 30.0, 0.5)):  # cross at n = 40
        for n in (1, 10, 100, 1000):
            rows.append({"model": model, "batch": 1, "seqlen": 512, "output_tokens": n,
                         "request_energy_j": prefill + decode * n, "crossover_tokens": 40.0 if model == "lin" else np.nan})
    fig = figures.plot_request_energy(pd.DataFrame(rows), tmp_path / "r.pdf", simulated=False, gpu_name="NVIDIA H200")
    ax = next(a for a in fig.axes if a.get_title())
    marks = [c.get_offsets()[0] for c in ax.collections if len(c.get_offsets())]
    assert len(marks) == 1
    assert marks[0][0] == pytest.approx(40.0)
    assert marks[0][1] == pytest.approx(np.interp(40.0, [1, 10, 100, 1000], [30.5, 35.0, 80.0, 530.0]))
    _check_outputs(fig, tmp_path / "r.pdf")


def test_bad_requests_are_one_line_errors(study, tmp_path):
    with pytest.raises(ConfigError, match="figure: 'pie'"):
        figures.make_figure("pie", tmp_path / "x.pdf", measurements=study[0])
    with pytest.raises(figures.FigureError, match="missing columns"):
        figures.plot_request_energy(pd.DataFrame({"model": []}), tmp_path / "x.pdf", simulated=True)
    with pytest.raises(figures.FigureError, match="model"):
        figures.make_figure("pareto", tmp_path / "x.pdf", measurements=study[0], model="nope")


def test_same_figure_gives_the_same_pdf(tmp_path):
    pdfs = []
    for name in ("a", "b"):
        fig, axes = style.new_figure(2.0, 1.5)
        axes[0][0].plot([1, 2], [3, 4], label="line")
        style.stamp(fig, True, "NVIDIA H200", "t", legend_handles=axes[0][0].get_lines())
        style.save_figure(fig, tmp_path / f"{name}.pdf")
        pdfs.append((tmp_path / f"{name}.pdf").read_bytes())
    assert pdfs[0] == pdfs[1]
    assert b"CreationDate" not in pdfs[0]


def test_point_labels_never_overlap_and_merge_coincident_points():
    fig, axes = style.new_figure(3.0, 2.5)
    ax = axes[0][0]
    xs = np.array([1.0, 1.0, 1.0, 1.3, 1.6, 2.0, 2.0])
    ys = np.array([1.0, 1.0, 1.1, 1.0, 1.0, 2.0, 2.001])
    ax.scatter(xs, ys)
    ax.margins(0.3)
    style.freeze_layout(fig)
    skipped = style.place_point_labels(ax, xs, ys, ["a", "b", "c", "d", "e", "f", "g"])
    texts = [t.get_text() for t in ax.texts]
    assert "a, b" in texts  # identical points share one label
    assert len(texts) + skipped == 5  # 7 points in 5 groups (f and g coincide on screen)
    assert style.text_problems(fig)[0] == []


def test_text_problems_sees_overlaps_and_cut_texts():
    fig, _ = style.new_figure(3.0, 2.0)
    fig.text(0.5, 0.5, "first label")
    fig.text(0.52, 0.5, "second label")
    fig.text(0.98, 0.1, "runs off the edge")
    overlaps, outside = style.text_problems(fig)
    assert ("first label", "second label") in overlaps
    assert outside == ["runs off the edge"]
