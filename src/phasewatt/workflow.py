"""What the Snakemake workflow needs from the library: pre-flight checks run before the DAG
is built, the choice of the run each timeline figure shows, and log redirection for the
thin scripts."""

from __future__ import annotations

import contextlib
from pathlib import Path

from phasewatt.config import Job
from phasewatt.gpu.dvfs import check_dvfs_opt_in
from phasewatt.gpu.select import resolve_device, resolve_engine


def preflight(config: dict) -> str:
    """Checks that must fail before any job starts. Returns the resolved device."""
    device = resolve_device(config["device"])
    engine = resolve_engine(config["engine"], device)
    if engine == "vllm":
        from phasewatt.engines.vllm import check_vllm_available

        check_vllm_available()
    check_dvfs_opt_in(config, device)
    return device


def timeline_run(config: dict, model: str) -> Job:
    """The run a timeline figure shows: the first batch size and prompt length of the grid,
    under the first power cap if the grid has one (the cap line and its throttling are what
    the figure is for), else the first setting."""
    grid = config["grid"]
    caps = [token for token in grid["dvfs"] if token.startswith("pl")]
    dvfs = caps[0] if caps else grid["dvfs"][0]
    return Job(model, int(grid["batch_sizes"][0]), int(grid["prompt_lengths"][0]), dvfs)


@contextlib.contextmanager
def log_to(path):
    """Send this script's stdout and stderr to its Snakemake log file."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
        yield handle
