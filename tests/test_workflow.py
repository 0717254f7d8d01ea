"""End to end: a real snakemake run of a tiny simulated grid into a temporary directory."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from phasewatt.config import validate_record

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = yaml.safe_load((ROOT / "config.yaml").read_text())
TINY_GRID = {"models": ["gqa", "mamba2"], "batch_sizes": [1, 32], "prompt_lengths": [512], "dvfs": ["default", "pl300", "sm1200"]}


def tiny_config(**grid):
    config = copy.deepcopy(DEFAULT)
    config.update(device="sim", decode_tokens=16, repetitions=3, warmups=1, min_window_s=0.5, idle_s=0.5)
    config["grid"] = dict(TINY_GRID, **grid)
    return config


def snakemake(workdir: Path, *targets, cores=2):
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", *targets, "-s", str(ROOT / "Snakefile"), "-d", str(workdir), "--cores", str(cores), "-q"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("study")
    (workdir / "config.yaml").write_text(yaml.safe_dump(tiny_config()))
    result = snakemake(workdir, "all")
    return workdir, result


def test_all_builds_every_figure_and_table(finished_run):
    workdir, _ = finished_run
    for name in ["roofline_decode", "roofline_prefill", "power_vs_cap", "energy_vs_seqlen", "request_energy",
                 "clock_sustained", "pareto_gqa", "pareto_mamba2", "timeline_gqa", "timeline_mamba2"]:
        for suffix in (".pdf", ".png"):
            path = workdir / "figures" / f"{name}{suffix}"
            assert path.stat().st_size > 5000, path
    for table in ["decode_power", "cap_binding", "savings", "dvfs_classes", "request_energy"]:
        for fmt in ("csv", "md", "tex"):
            assert (workdir / "results" / "tables" / f"{table}.{fmt}").stat().st_size > 0
        assert "SIMULATED" in (workdir / "results" / "tables" / f"{table}.md").read_text()


def test_records_are_valid_and_the_table_is_tidy(finished_run):
    workdir, _ = finished_run
    records = sorted((workdir / "results" / "runs").glob("*/*/*.json"))
    assert len(records) == 2 * 2 * 1 * 3
    for path in records:
        record = json.loads(path.read_text())
        validate_record(record)
        assert (path.parent / record["trace_file"]).exists()
        assert not list(path.parent.glob(".*.tmp"))
    measurements = pd.read_parquet(workdir / "results" / "measurements.parquet")
    assert len(measurements) == len(records) * 3 * 2  # runs x repetitions x phases
    assert set(measurements["phase"]) == {"prefill", "decode"}
    assert measurements["simulated"].all()
    csv = pd.read_csv(workdir / "results" / "measurements.csv")
    assert len(csv) == len(measurements)
    for path in (workdir / "logs" / "measure").rglob("*.log"):
        assert "Traceback" not in path.read_text()
    assert list((workdir / "results" / "benchmarks" / "measure").rglob("*.tsv"))


def test_one_figure_builds_only_what_it_needs(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(tiny_config()))
    snakemake(tmp_path, "figures/pareto_mamba2.pdf")
    assert (tmp_path / "figures" / "pareto_mamba2.pdf").exists()
    runs = {p.relative_to(tmp_path / "results" / "runs").parts[0] for p in (tmp_path / "results" / "runs").glob("*/*/*.json")}
    assert runs == {"mamba2"}
    assert not (tmp_path / "results" / "measurements.parquet").exists()


def test_infeasible_runs_are_results_and_skipped_downstream(tmp_path):
    config = tiny_config(models=["gqa"], batch_sizes=[1, 4096], prompt_lengths=[16384], dvfs=["default"])
    config["gpu"] = "H100"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    snakemake(tmp_path, "results/measurements.parquet")
    status = pd.read_csv(tmp_path / "results" / "run_status.csv")
    assert sorted(status["status"]) == ["infeasible", "ok"]
    measurements = pd.read_parquet(tmp_path / "results" / "measurements.parquet")
    assert set(measurements["batch"]) == {1}


def test_report_holds_every_figure_and_table_with_simulated_captions(finished_run):
    workdir, _ = finished_run
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "-d", str(workdir), "--report", "report.html"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    html = (workdir / "report.html").read_text(errors="replace")
    assert "computed by phasewatt's GPU simulator" in html  # the SIMULATED sentence of every caption
    for name in ["pareto_gqa.png", "timeline_mamba2.png", "roofline_decode.png", "savings.md", "dvfs_classes.md"]:
        assert name in html, name
