"""The whole default grid on the simulated GPU through Snakemake: wall time and per-job overhead.

Target (issue 2): `snakemake --cores 2 all` finishes in under 10 minutes on a 2-core machine.
Per measurement job it reports the time Snakemake's benchmark saw (process start, imports,
the job, writing) against the time run_job itself took (record `wall_s`): the difference is
the per-job overhead of launching a job.

    python3 benchmarks/sim_grid.py [--cores 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--keep", help="work in this directory and keep it")
    args = parser.parse_args()
    workdir = Path(args.keep or tempfile.mkdtemp(prefix="phasewatt-grid-"))
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "config.yaml", workdir / "config.yaml")
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "all", "-s", str(ROOT / "Snakefile"), "-d", str(workdir),
         "--cores", str(args.cores), "-q"],
        capture_output=True, text=True,
    )
    wall_s = time.perf_counter() - start
    if result.returncode != 0:
        print(result.stderr[-3000:], file=sys.stderr)
        return 1
    job_s, run_s = [], []
    for record_path in (workdir / "results" / "runs").glob("*/*/*.json"):
        record = json.loads(record_path.read_text())
        rel = record_path.relative_to(workdir / "results" / "runs").with_suffix(".tsv")
        bench = pd.read_csv(workdir / "results" / "benchmarks" / "measure" / rel, sep="\t")
        job_s.append(float(bench["s"].iloc[0]))
        run_s.append(float(record["wall_s"]))
    overhead = [j - r for j, r in zip(job_s, run_s)]
    print(f"machine: {os.cpu_count()} CPUs; snakemake --cores {args.cores} all on the default grid (simulated GPU)")
    print(f"measure jobs: {len(job_s)}; whole workflow wall time: {wall_s:.0f} s (target < 600 s)")
    print(f"per measure job: {statistics.median(job_s):.2f} s median as Snakemake timed it, of which "
          f"run_job {statistics.median(run_s):.2f} s and overhead {statistics.median(overhead):.2f} s "
          f"(process start, imports, Snakemake's script preamble)")
    if not args.keep:
        shutil.rmtree(workdir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
