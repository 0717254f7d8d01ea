"""profiles/slurm against a real Slurm: `bash .ci/slurm.sh` starts a one-node cluster (with
accounting, and two generic-resource GPUs) and sets PHASEWATT_SLURM_CLUSTER=up; without it
these tests are skipped."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        os.environ.get("PHASEWATT_SLURM_CLUSTER") != "up",
        reason="needs the one-node Slurm cluster that .ci/slurm.sh starts",
    ),
]

NODE_GPUS = 2  # generic-resource GPUs .ci/slurm.sh declares on its node
SACCT_FIELDS = ["JobIDRaw", "State", "Comment", "AllocCPUS", "AllocTRES"]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    return env


def _sacct(*args: str) -> list[dict]:
    out = subprocess.run(
        ["sacct", "-X", "-P", "-n", f"--format={','.join(SACCT_FIELDS)}", *args],
        check=True, capture_output=True, text=True,
    ).stdout
    return [dict(zip(SACCT_FIELDS, line.split("|"))) for line in out.splitlines() if line.strip()]


def _finished_rows(*args: str, expect: int, timeout_s: float = 30) -> list[dict]:
    """sacct rows, once `expect` of them have a final state (accounting lags the jobs a little)."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = _sacct(*args)
        done = [row for row in rows if row["State"] not in ("PENDING", "RUNNING", "COMPLETING")]
        if len(done) >= expect or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def _node_cpus() -> int:
    return int(subprocess.run(["sinfo", "-h", "-o", "%c"], check=True, capture_output=True, text=True).stdout.split()[0])


def test_gpu_job_gets_a_gpu_from_slurm_and_is_accounted(tmp_path):
    out = tmp_path / "job.out"
    jobid = subprocess.run(
        ["sbatch", "--parsable", "--wait", "--gpus=1", "-o", str(out), "--wrap", 'echo "$CUDA_VISIBLE_DEVICES"'],
        check=True, capture_output=True, text=True,
    ).stdout.strip().split(";")[0]
    assert out.read_text().strip() in {"0", "1"}
    rows = _finished_rows("-j", jobid, expect=1)
    assert [row["State"] for row in rows] == ["COMPLETED"]
    assert "gres/gpu=1" in rows[0]["AllocTRES"].split(","), rows


def _tiny_config() -> dict:
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config.update(
        device="sim",
        engine="sim",
        decode_tokens=8,
        repetitions=2,
        warmups=1,
        min_window_s=0.2,
        idle_s=0.2,
        resources={"measure_runtime_min": 10, "measure_mem_mb": 500},
        grid={"models": ["gqa"], "batch_sizes": [1], "prompt_lengths": [64], "dvfs": ["default", "pl300"]},
    )
    return config


def _edited_profile(folder: Path) -> Path:
    """profiles/slurm with the keys a user edits filled in, as a user would."""
    profile = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    profile["default-resources"]["slurm_account"] = os.environ["PHASEWATT_SLURM_ACCOUNT"]
    profile["default-resources"]["slurm_partition"] = os.environ["PHASEWATT_SLURM_PARTITION"]
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump(profile))
    return folder


def _snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir), *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)


def _slurm_job_logs(workdir: Path) -> str:
    """The ends of the Slurm jobs' own logs (kept only for failed jobs), for a failure message."""
    logs = sorted((workdir / ".snakemake" / "slurm_logs").rglob("*.log"))
    return "".join(f"\n--- {log}\n" + "\n".join(log.read_text().splitlines()[-15:]) for log in logs)


def test_measure_jobs_run_as_slurm_jobs_and_figures_are_made(tmp_path):
    config = _tiny_config()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    profile = _edited_profile(tmp_path / "profile")
    since = (datetime.datetime.now() - datetime.timedelta(seconds=2)).strftime("%Y-%m-%dT%H:%M:%S")

    run = _snakemake(tmp_path, "--workflow-profile", str(profile), "--slurm-init-seconds-before-status-checks", "1", "all")
    assert run.returncode == 0, run.stderr[-4000:] + _slurm_job_logs(tmp_path)

    grid = config["grid"]
    expected = sorted(
        f"rule_measure_wildcards_{model}_{batch}_{seqlen}_{dvfs}"
        for model in grid["models"] for batch in grid["batch_sizes"]
        for seqlen in grid["prompt_lengths"] for dvfs in grid["dvfs"]
    )
    records = sorted((tmp_path / "results" / "runs").rglob("*.json"))
    assert len(records) == len(expected)

    rows = [row for row in _finished_rows("--starttime", since, expect=len(expected)) if row["Comment"].startswith("rule_")]
    # Every measurement was a Slurm job, and nothing else was: the other rules ran locally.
    assert sorted(row["Comment"] for row in rows) == expected, rows
    assert {row["State"] for row in rows} == {"COMPLETED"}, rows
    # --exclusive from the profile's slurm_extra: each job held the whole node, every CPU and
    # GPU of it (the job measures on the first GPU Slurm lists).
    assert {row["AllocCPUS"] for row in rows} == {str(_node_cpus())}, rows
    assert all(f"gres/gpu={NODE_GPUS}" in row["AllocTRES"].split(",") for row in rows), rows

    # Each record names the Slurm job that measured it, and the GPU came from Slurm's allocation.
    measured = [json.loads(record.read_text()) for record in records]
    assert sorted(r["slurm_job_id"] for r in measured) == sorted(row["JobIDRaw"] for row in rows)
    assert {(r["gpu_assigned_by"], r["gpu_index"]) for r in measured} == {("slurm", 0)}

    assert list((tmp_path / "figures").glob("*.pdf"))
    dry = _snakemake(tmp_path, "--cores", "1", "--dry-run", "all")
    assert dry.returncode == 0 and "Nothing to be done" in dry.stdout + dry.stderr, dry.stdout[-3000:]
