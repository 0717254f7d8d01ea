"""Several GPUs on one node without Slurm: `snakemake --resources gpu=2` runs two measurement
jobs at once, each on its own (simulated) GPU, chosen through the GPU locks."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from phasewatt.gpu.locks import LOCK_DIR_ENV, acquire_gpu

REPO = Path(__file__).resolve().parents[1]
DVFS = ["default", "pl300", "pl400", "pl500"]


def _tiny_config() -> dict:
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config.update(
        device="sim",
        engine="sim",
        gpus_per_node=2,
        decode_tokens=64,
        repetitions=20,
        warmups=1,
        min_window_s=0.2,
        idle_s=0.2,
        grid={"models": ["gqa"], "batch_sizes": [1], "prompt_lengths": [64], "dvfs": DVFS},
    )
    return config


def _wait_until_jobs_wait(workdir: Path, count: int, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    """Until `count` measure jobs have said (in their logs) that every GPU is busy."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        logs = (workdir / "logs" / "measure").rglob("*.log")
        if sum("are all busy" in log.read_text() for log in logs) >= count:
            return
        assert proc.poll() is None, f"snakemake ended early (exit {proc.returncode})"
        time.sleep(0.1)
    raise AssertionError(f"{count} measure jobs did not wait for a GPU within {timeout_s} s")


@pytest.mark.slow
def test_two_gpus_measure_two_jobs_at_once_each_on_its_own_gpu(tmp_path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(_tiny_config()))
    targets = [f"results/runs/gqa/bs1_seq64/{dvfs}.json" for dvfs in DVFS]
    lock_dir = tmp_path / "gpu-locks"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    env[LOCK_DIR_ENV] = str(lock_dir)
    cmd = [sys.executable, "-m", "snakemake", *targets, "--snakefile", str(REPO / "Snakefile"),
           "--directory", str(tmp_path), "--cores", "4", "--resources", "gpu=2"]
    # Hold both GPUs until two jobs wait for one, then free both at once: the two start
    # measuring together, whatever the machine's load did to their start-up times.
    proc = None
    try:
        with contextlib.ExitStack() as held:
            for _ in range(2):
                held.enter_context(acquire_gpu(lock_dir, 2, env={}))
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
            _wait_until_jobs_wait(tmp_path, 2, proc)
            freed_unix_s = time.time()
        _, stderr = proc.communicate(timeout=300)
    finally:
        # Snakemake and its jobs share a session: on failure they go together, after the locks.
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, stderr[-4000:]

    records = [json.loads((tmp_path / target).read_text()) for target in targets]
    # No job measured on a GPU that another process held.
    assert all(r["wall_start_unix_s"] >= freed_unix_s for r in records)
    assert {r["gpu_index"] for r in records} == {0, 1}
    assert {r["gpu_assigned_by"] for r in records} == {"lock"}
    # Each index is one GPU: its serial, and only its serial.
    assert len({(r["gpu_index"], r["gpu_serial"]) for r in records}) == 2
    assert len({r["gpu_serial"] for r in records}) == 2
    # Jobs that measured at the same time did so on different GPUs, and some did.
    overlapping = [
        (a, b) for a, b in itertools.combinations(records, 2)
        if a["wall_start_unix_s"] < b["wall_end_unix_s"] and b["wall_start_unix_s"] < a["wall_end_unix_s"]
    ]
    assert overlapping
    assert all(a["gpu_index"] != b["gpu_index"] for a, b in overlapping)


@pytest.mark.slow
def test_local_profile_runs_one_measurement_at_a_time(tmp_path):
    """profiles/local's gpu: 1 keeps a second job from starting while the first one holds
    the node's only measurement slot, even with two GPUs configured."""
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(_tiny_config()))
    targets = [f"results/runs/gqa/bs1_seq64/{dvfs}.json" for dvfs in DVFS[:2]]
    lock_dir = tmp_path / "gpu-locks"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    env[LOCK_DIR_ENV] = str(lock_dir)
    cmd = [sys.executable, "-m", "snakemake", *targets, "--snakefile", str(REPO / "Snakefile"),
           "--directory", str(tmp_path), "--workflow-profile", str(REPO / "profiles" / "local")]
    proc = None
    try:
        with contextlib.ExitStack() as held:
            for _ in range(2):
                held.enter_context(acquire_gpu(lock_dir, 2, env={}))
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
            _wait_until_jobs_wait(tmp_path, 1, proc)
            time.sleep(3)  # a second job, if let through, would have started by now
            started = sorted(log.name for log in (tmp_path / "logs" / "measure").rglob("*.log"))
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 0, stderr[-4000:]
    assert len(started) == 1, started
    records = sorted((json.loads((tmp_path / target).read_text()) for target in targets), key=lambda r: r["wall_start_unix_s"])
    assert records[0]["wall_end_unix_s"] <= records[1]["wall_start_unix_s"]
