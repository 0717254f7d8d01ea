#!/usr/bin/env bash
# Issue 4 on a GPU machine: the real pipeline (device nvml, engine native, dvfs default only)
# for all five models at batch 1 and 32 (benchmarks/native_reference.yaml). Reads the GPU;
# never changes its power limit or clocks. Records, traces, logs and the tidy table land in
# $OUT/issue4_pipeline[_<models>].tar.gz.
#   OUT=/some/dir bash benchmarks/device_issue4_pipeline.sh
#   MODELS=gqa,gqa-control BUDGET_S=500 OUT=/some/dir bash benchmarks/device_issue4_pipeline.sh
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the directory that comes back}"
source benchmarks/device_env.sh
work=$(mktemp -d)
nvidia-smi --query-gpu=name,driver_version,power.limit --format=csv | tee "$work/gpu.txt"
# The config names the card the run is on (H100 or H200), and MODELS (comma-separated) may
# take a subset of the five, so that the grid can be split over device calls.
python3 - "$work/config.yaml" "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1)" "${MODELS:-}" <<'PY'
import sys
import yaml
path, card, models = sys.argv[1:]
config = yaml.safe_load(open("benchmarks/native_reference.yaml"))
config["gpu"] = "H100" if "H100" in card else "H200"
if models:
    config["grid"]["models"] = models.split(",")
open(path, "w").write(yaml.safe_dump(config, sort_keys=False))
PY
timeout "${BUDGET_S:-500}" python3 -m snakemake results/measurements.parquet -s "$PWD/Snakefile" -d "$work" \
    --cores 1 --keep-going 2>&1 | grep -vE "^\s*$" | tail -n 40
status=$?
# Whatever finished, aggregate it (a job cut by the budget leaves no record).
python3 - "$work" <<'PY'
import sys
from pathlib import Path
from phasewatt.analysis.aggregate import aggregate
from phasewatt.io import write_csv
work = Path(sys.argv[1])
records = sorted((work / "results" / "runs").glob("*/*/*.json"))
measurements, status = aggregate(records)
write_csv(work / "measurements.csv", measurements)
write_csv(work / "run_status.csv", status)
cols = ["model", "batch", "phase", "time_s", "energy_mj_per_token", "tokens_per_s", "mean_power_w", "sustained_sm_clock_mhz", "counter_vs_integral_rel"]
print(measurements.groupby(["model", "batch", "phase"])[cols[3:]].median().round(3).to_string())
PY
tar czf "$OUT/issue4_pipeline${MODELS:+_${MODELS//,/_}}.tar.gz" -C "$work" results logs measurements.csv run_status.csv gpu.txt config.yaml 2>/dev/null
exit $status
