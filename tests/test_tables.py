"""Table builders on hand-made measurements with known answers, the CSV / Markdown / LaTeX
writer, the workflow entry point, the captions and the summary helpers."""

import math
from pathlib import Path

import pandas as pd
import pytest
from _analysis_frames import config, frame, windows

from phasewatt.analysis import captions, tables
from phasewatt.analysis.captions import CaptionError, caption, caption_text
from phasewatt.analysis.savings import SavingsError, savings
from phasewatt.analysis.summary import repetition_table, repetitions_of, summarise
from phasewatt.analysis.tables import (
    TableError,
    build_table,
    cap_binding_table,
    decode_power_table,
    latex_escape,
    savings_table,
    write_table,
    write_table_files,
)

REPS = 5


def grid(simulated=True, gpu_name="NVIDIA H200 (simulated)"):
    """gqa at batch 1, prompt 512: default 100 mJ/token at 1000 tokens/s; sm1200 saves 30% at
    0.5% throughput loss; sm780 saves 50% but loses 20%; pl300 saves 10%, pl400 5%."""
    kw = {"simulated": simulated, "gpu_name": gpu_name, "reps": REPS}
    return frame(
        config("gqa", 1, 512, "default", 10.0, 100.0, 1000.0, 300.0, **kw),
        config("gqa", 1, 512, "sm1200", 9.0, 70.0, 995.0, 210.0, **kw),
        config("gqa", 1, 512, "sm780", 8.0, 50.0, 800.0, 150.0, **kw),
        config("gqa", 1, 512, "sm1590", 9.5, 85.0, 1000.0, 255.0, **kw),
        config("gqa", 1, 512, "pl300", 10.0, 90.0, 1000.0, 290.0, throttle_reasons="sw_power_cap",
               power_violation_s=0.25, **kw),
        config("gqa", 1, 512, "pl400", 10.0, 95.0, 1000.0, 310.0, **kw),
        config("gdn", 1, 512, "default", 30.0, 60.0, 1100.0, 280.0, **kw),
    )


def test_decode_power_min_median_max_against_tdp():
    table = decode_power_table(summarise(grid()), tdp_w=700.0, models=["gqa", "gdn"]).set_index("model")
    row = table.loc["gqa"]
    assert row["configurations"] == 6
    assert row["min_power_w"] == 150.0 and row["min_at"] == "sm780, prompt 512"
    assert row["max_power_w"] == 310.0 and row["max_at"] == "pl400, prompt 512"
    assert row["median_power_w"] == pytest.approx((255.0 + 290.0) / 2)
    assert row["max_share_of_tdp_pct"] == pytest.approx(100 * 310 / 700)
    assert list(table.index) == ["gqa", "gdn"]  # the config's order, not A-Z
    assert list(build_table("decode_power", grid(), "H200")["model"]) == ["gqa", "gdn"]


def test_cap_binding_shares_of_decode_time():
    measurements = frame(
        windows("m", 1, 512, "pl300", "decode", [1.0] * 4, window_s=[1.0, 1.0, 2.0, 2.0],
                throttle_reasons=["sw_power_cap", "sw_power_cap", "", ""], power_violation_s=[0.5, 0.0, 0.0, 0.0]),
        windows("m", 1, 512, "pl700", "decode", [1.0] * 4),
        windows("m", 1, 512, "pl700", "prefill", [1.0] * 4, throttle_reasons="sw_power_cap"),
        windows("m", 1, 512, "default", "decode", [1.0] * 4, throttle_reasons="sw_power_cap"),
    )
    table = cap_binding_table(measurements).set_index("cap_w")
    assert list(table.index) == [300.0, 700.0]
    assert table.loc[300.0, "flagged_windows"] == 2
    assert table.loc[300.0, "flagged_time_pct"] == pytest.approx(100 * 2 / 6)
    assert table.loc[300.0, "violation_time_pct"] == pytest.approx(100 * 0.5 / 6)
    assert table.loc[300.0, "bound"] == "yes"
    assert table.loc[700.0, "bound"] == "no" and table.loc[700.0, "flagged_time_pct"] == 0.0


def test_savings_best_settings_within_the_throughput_budget():
    table = savings_table(grid()).set_index("model")
    row = table.loc["gqa"]
    assert row["best_lock"] == "sm1200" and row["best_cap"] == "pl300"
    assert row["lock_saving_pct"] == pytest.approx(30.0)
    assert row["lock_saving_pct_ci_low"] == pytest.approx(30.0) and row["lock_saving_pct_ci_high"] == pytest.approx(30.0)
    assert row["lock_throughput_loss_pct"] == pytest.approx(0.5)
    assert row["cap_saving_pct"] == pytest.approx(10.0)
    assert row["lock_vs_cap_mj_per_token"] == pytest.approx(-20.0)
    assert row["lock_vs_cap_p"] == pytest.approx(2.0**-REPS)  # constant difference: the exact floor
    assert "zero spread" in row["lock_vs_cap_note"]
    # gdn has only a default run: no lock, no cap, no test
    assert table.loc["gdn", "best_lock"] == "" and math.isnan(table.loc["gdn", "lock_saving_pct"])
    assert math.isnan(table.loc["gdn", "lock_vs_cap_p"])


def test_a_wider_budget_lets_the_slow_lock_win():
    row = savings_table(grid(), throughput_loss_budget=0.25).set_index("model").loc["gqa"]
    assert row["best_lock"] == "sm780"
    assert row["lock_saving_pct"] == pytest.approx(50.0)
    assert row["lock_throughput_loss_pct"] == pytest.approx(20.0)


def test_savings_interval_brackets_a_noisy_saving_and_holm_adjusts():
    energy_default = [100.0, 102.0, 98.0, 101.0, 99.0]
    energy_lock = [70.0, 71.5, 68.5, 70.5, 69.0]
    measurements = frame(
        config("a", 1, 512, "default", 1.0, energy_default), config("a", 1, 512, "sm1200", 1.0, energy_lock),
        config("a", 1, 512, "pl300", 1.0, [90.0, 91.0, 89.0, 92.0, 88.0]),
        config("a", 8, 512, "default", 1.0, energy_default), config("a", 8, 512, "sm1200", 1.0, energy_lock),
        config("a", 8, 512, "pl300", 1.0, [90.0, 91.0, 89.0, 92.0, 88.0]),
    )
    frame_ = savings(measurements)
    assert frame_.loc[0, "lock_saving_ci_low"] < frame_.loc[0, "lock_saving"] == pytest.approx(0.3)
    assert frame_.loc[0, "lock_saving"] < frame_.loc[0, "lock_saving_ci_high"]
    assert frame_["lock_vs_cap_p_holm"].tolist() == pytest.approx([2 * 2.0**-5] * 2)


def test_excluded_windows_do_not_move_the_medians():
    measurements = grid()
    hot = (measurements["dvfs"] == "default") & (measurements["phase"] == "decode") & (measurements["repetition"] == 0)
    measurements.loc[hot & (measurements["model"] == "gqa"), ["energy_mj_per_token", "throttle_reasons"]] = [
        500.0, "hw_thermal_slowdown"]
    summary = summarise(measurements)
    default = summary[(summary["model"] == "gqa") & (summary["dvfs"] == "default") & (summary["phase"] == "decode")]
    assert default["excluded_windows"].item() == 1 and default["repetitions"].item() == REPS - 1
    assert savings_table(measurements).set_index("model").loc["gqa", "lock_saving_pct"] == pytest.approx(30.0)


def test_savings_need_a_default_run():
    measurements = grid()
    with pytest.raises(SavingsError, match="default"):
        savings_table(measurements[measurements["dvfs"] != "default"])


def test_dvfs_classes_table_has_a_class_and_its_meaning():
    table = build_table("dvfs_classes", grid(), "H200").set_index("model")
    # gqa locks: 780 / 1200 / 1590; throughput 800 / 995 / 1000; energy falling with the clock
    assert table.loc["gqa", "dvfs_class"] == "clock_insensitive"
    assert "knee" in table.loc["gqa", "meaning"]
    assert table.loc["gqa", "knee_clock_mhz"] == 1200
    assert "gdn" not in table.index  # no clock locks, no curve


def test_request_energy_table_ratio_and_crossover():
    table = build_table("request_energy", grid(), "H200", output_tokens=100).set_index("model")
    # per request: gqa 10 mJ x 512 + 100 mJ x 100 = 15.12 J; gdn 30 x 512 + 60 x 100 = 21.36 J
    assert table.loc["gqa", "request_energy_j"] == pytest.approx(15.12)
    assert table.loc["gdn", "request_energy_j"] == pytest.approx(21.36)
    assert table.loc["gdn", "ratio_vs_reference"] == pytest.approx(21.36 / 15.12)
    assert table.loc["gdn", "crossover_output_tokens"] == pytest.approx((15.36 - 5.12) / (0.1 - 0.06))
    assert table.loc["gdn", "crossover_kind"] == "cheaper_beyond"
    assert table.loc["gqa", "crossover_kind"] == "reference"
    # without output_tokens: the measured decode window length
    assert build_table("request_energy", grid(), "H200")["output_tokens"].iloc[0] == 128


def test_writer_renders_csv_markdown_and_booktabs(tmp_path):
    frame_ = savings_table(grid())
    paths = write_table_files(frame_, tmp_path, "savings", "SIMULATED: 50% of H200_x & more")
    assert [p.name for p in paths] == ["savings.csv", "savings.md", "savings.tex"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["savings.csv", "savings.md", "savings.tex"]
    csv = pd.read_csv(paths[0])
    assert csv.loc[csv["model"] == "gqa", "lock_saving_pct"].item() == pytest.approx(30.0)
    md = paths[1].read_text()
    assert md.startswith("Table: SIMULATED: 50% of H200_x & more")
    assert "| lock saving (%) [95% CI] |" in md
    assert "| 30.0 [30.0, 30.0] |" in md
    assert "lock_vs_cap_note" not in md and "zero spread" not in md
    tex = paths[2].read_text()
    for token in ("\\toprule", "\\midrule", "\\bottomrule", "\\label{tab:savings}",
                  "\\caption{SIMULATED: 50\\% of H200\\_x \\& more}", "lock saving (\\%) [95\\% CI]"):
        assert token in tex
    body = tex.split("\\midrule")[1].split("\\bottomrule")[0].strip().splitlines()
    assert len(body) == 2 and all(line.count(" & ") == body[0].count(" & ") for line in body)


def test_empty_table_still_renders(tmp_path):
    empty = cap_binding_table(grid()[grid()["dvfs_kind"] != "power_cap"])
    paths = write_table_files(empty, tmp_path, "cap_binding", "nothing")
    assert "no rows" in paths[1].read_text()
    assert "\\toprule" in paths[2].read_text()


def test_latex_escape_every_special_character():
    assert latex_escape("a_b & 5% $x #1 {y} ~ ^ \\ <>") == (
        "a\\_b \\& 5\\% \\$x \\#1 \\{y\\} \\textasciitilde{} \\textasciicircum{} \\textbackslash{} "
        "\\textless{}\\textgreater{}"
    )


@pytest.mark.parametrize("name", tables.TABLE_NAMES)
def test_write_table_entry_point_says_simulated_and_names_the_gpu(tmp_path, name):
    path = tmp_path / "measurements.parquet"
    grid().to_parquet(path)
    paths = write_table(name, path, tmp_path / "tables", "H200")
    for written in paths[1:]:
        text = written.read_text()
        assert "SIMULATED" in text and "simulator of the NVIDIA H200 " in text
    assert [p.suffix for p in paths] == [".csv", ".md", ".tex"]


def test_real_measurements_are_not_called_simulated(tmp_path):
    path = tmp_path / "measurements.parquet"
    grid(simulated=False, gpu_name="NVIDIA H200").to_parquet(path)
    md = write_table("decode_power", path, tmp_path, "H200")[1].read_text()
    assert "SIMULATED" not in md and "Measured on NVIDIA H200." in md


def test_unknown_table_or_empty_measurements_is_one_line_error():
    with pytest.raises(TableError, match="table: 'power' is not known; allowed: decode_power"):
        build_table("power", grid(), "H200")
    with pytest.raises(TableError, match="empty"):
        build_table("savings", pd.DataFrame(), "H200")


def test_captions_for_every_table_and_figure():
    figures = ["roofline_decode", "roofline_prefill", "power_vs_cap", "energy_vs_seqlen", "request_energy",
               "clock_sustained", "pareto_gqa", "timeline_mamba2"]
    for kind, names in (("table", tables.TABLE_NAMES), ("figure", figures)):
        for name in names:
            simulated = caption(name, kind, simulated=True, gpu_name="NVIDIA H200 (simulated)")
            assert simulated.startswith("**SIMULATED**:") and "simulator of the NVIDIA H200 " in simulated
            real = caption(name, kind, simulated=False, gpu_name="NVIDIA H200")
            assert "SIMULATED" not in real and "Measured on NVIDIA H200." in real
    assert "mamba2" in captions.figure_caption("timeline", simulated=False, model="mamba2")
    assert "pareto" not in caption_text("pareto_mla", "figure", simulated=False).lower().split(" of ")[0]
    assert "\\_" in captions.table_caption("dvfs_classes", simulated=False)  # rst-escaped class names


def test_caption_errors_name_what_is_allowed():
    with pytest.raises(CaptionError, match="allowed: cap_binding"):
        caption("nope", "table", simulated=True)
    with pytest.raises(CaptionError, match="needs the model"):
        captions.figure_caption("pareto", simulated=True)
    with pytest.raises(CaptionError, match="kind"):
        caption("savings", "plot", simulated=True)


def test_repetition_table_marks_excluded_windows_nan():
    measurements = grid()
    measurements.loc[0, "throttle_reasons"] = "hw_slowdown"
    table = repetition_table(measurements, "energy_mj_per_token")
    reps = repetitions_of(table, "gqa", 1, 512, "default")
    assert list(reps.columns) == ["decode", "prefill"] and len(reps) == REPS
    assert math.isnan(reps.loc[0, "prefill"]) and reps.loc[0, "decode"] == 100.0
    assert repetitions_of(table, "gqa", 1, 999, "default").empty


def test_every_table_from_simulated_runs(tmp_path):
    """End to end from the simulator's run records through aggregate: the tables build on
    the real measurement schema, and say SIMULATED."""
    from phasewatt.analysis.aggregate import aggregate
    from phasewatt.analysis.dvfs_classes import CLASSES
    from phasewatt.config import Job, load_config
    from phasewatt.measure.run import run_job

    cfg = load_config(Path(__file__).resolve().parents[1] / "config.yaml")
    cfg.update(repetitions=3, warmups=1, idle_s=0.2, min_window_s=0.2, device="sim", engine="sim")
    records = []
    for model in ("gqa", "gdn"):
        for dvfs in ("default", "pl300", "pl700", "sm780", "sm1200", "sm1590", "sm1980"):
            job = Job(model, 8, 512, dvfs)
            record = tmp_path / "runs" / f"{job.run_id}.json"
            run_job(cfg, job, record, record.with_suffix(".trace.parquet"), tmp_path / "journal")
            records.append(record)
    measurements, status = aggregate(records)
    assert (status["status"] == "ok").all()
    path = tmp_path / "measurements.parquet"
    measurements.to_parquet(path)
    for name in tables.TABLE_NAMES:
        csv, md, tex = write_table(name, path, tmp_path / "tables", "H200")
        assert "SIMULATED" in md.read_text() and "SIMULATED" in tex.read_text()
        assert len(pd.read_csv(csv)) > 0
    power = pd.read_csv(tmp_path / "tables" / "decode_power.csv")
    assert (power["max_power_w"] < power["tdp_w"]).all()
    assert set(pd.read_csv(tmp_path / "tables" / "dvfs_classes.csv")["dvfs_class"]) <= set(CLASSES)
    saving = pd.read_csv(tmp_path / "tables" / "savings.csv")
    assert (saving["lock_saving_pct_ci_low"] <= saving["lock_saving_pct"]).all()
    assert (saving["lock_saving_pct"] <= saving["lock_saving_pct_ci_high"]).all()


@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # docutils' writer_name, kept for older docutils
def test_report_captions_are_valid_restructuredtext():
    docutils_core = pytest.importorskip("docutils.core")
    import io

    names = [("table", n) for n in captions.TABLE_TEXT]
    names += [("figure", n if n not in captions.PER_MODEL_FIGURES else f"{n}_gqa") for n in captions.FIGURE_TEXT]
    for kind, name in names:
        for simulated in (True, False):
            warnings = io.StringIO()
            html = docutils_core.publish_string(
                caption(name, kind, simulated=simulated, gpu_name="NVIDIA H200"), writer_name="html",
                settings_overrides={"warning_stream": warnings, "report_level": 1},
            ).decode()
            assert warnings.getvalue() == "", (name, warnings.getvalue())
            assert ("<strong>SIMULATED</strong>" in html) == simulated
