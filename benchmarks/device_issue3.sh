#!/usr/bin/env bash
# Issue 3 on a GPU machine: `phasewatt probe`, the sampler-overhead benchmark, and the real
# measurement pipeline (device nvml, microbench engine, dvfs default only) over
# benchmarks/microbench.yaml. Reads the GPU; never changes its power limit or clocks.
#
# Usage (repository root, $OUT = a directory that comes back):
#   OUT=/some/dir bash benchmarks/device_issue3.sh
# Needs python3 with torch (CUDA), nvidia-ml-py, pyyaml, pandas, pyarrow, jsonschema. Wheels
# in .whl/ (if present) are installed to /tmp/site first. With snakemake importable the grid
# runs through the workflow; otherwise each job runs through `phasewatt run-one`, which
# calls the same phasewatt.measure.run.run_job as the workflow's measure rule (RUNNER=run-one
# forces that).
# Everything lands in $OUT/issue3.tar.gz (plus probe.txt and summary.log beside it).
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the directory that comes back}"
source benchmarks/device_env.sh
export CUDA_DEVICE_ORDER=PCI_BUS_ID

work=$(mktemp -d)
res="$work/issue3"
mkdir -p "$res/runs"
status=0
step() { echo "== $*" | tee -a "$res/summary.log"; }

step "probe"
nvidia-smi -q -d POWER,CLOCK,PERFORMANCE >"$res/nvidia-smi.txt" 2>&1
python3 -m phasewatt.cli probe --seconds 2 2>&1 | tee "$res/probe.txt" || status=1
python3 -m phasewatt.cli probe --seconds 2 --json >"$res/probe.json" 2>>"$res/summary.log" || status=1

step "sampler overhead"
python3 benchmarks/sampler_overhead.py --out "$res/sampler_overhead.json" 2>&1 | tee -a "$res/summary.log" || status=1

step "pipeline: benchmarks/microbench.yaml (device nvml, engine microbench, dvfs default)"
if ! python3 -c "import jsonschema" 2>/dev/null; then
    echo "jsonschema is missing: carry the wheels of jsonschema, jsonschema-specifications, referencing and rpds-py in .whl/" | tee -a "$res/summary.log"
    status=1
else
    if [ "${RUNNER:-auto}" != run-one ] && python3 -c "import snakemake" 2>/dev/null && [ -f Snakefile ]; then
        echo "runner: snakemake" | tee -a "$res/summary.log"
        targets=$(python3 -c "
from phasewatt.config import load_config, jobs
print(' '.join(f'results/runs/{j.run_id}.json' for j in jobs(load_config('benchmarks/microbench.yaml'))))")
        python3 -m snakemake $targets --cores 4 --resources gpu=1 --configfile benchmarks/microbench.yaml \
            2>&1 | tee "$res/snakemake.log" || status=1
        for model in gemv-4b copy-4b; do
            [ -d "results/runs/$model" ] && cp -r "results/runs/$model" "$res/runs/"
            [ -d "logs/measure/$model" ] && mkdir -p "$res/logs" && cp -r "logs/measure/$model" "$res/logs/"
        done
    fi
    # Any job the workflow did not produce (or all of them, without snakemake) runs here.
    for model in gemv-4b copy-4b; do
        for batch in 1 32; do
            [ -f "$res/runs/$model/bs${batch}_seq512/default.json" ] && continue
            echo "runner: phasewatt run-one $model batch $batch" | tee -a "$res/summary.log"
            python3 -m phasewatt.cli run-one --config benchmarks/microbench.yaml --model "$model" --batch "$batch" \
                --seqlen 512 --dvfs default --out-dir "$res/runs" --journal-dir "$res/dvfs_journal" \
                2>&1 | tee -a "$res/summary.log" || status=1
        done
    done
fi

step "done (status $status)"
cp "$res/probe.txt" "$res/summary.log" "$OUT/" 2>/dev/null
tar czf "$OUT/issue3.tar.gz" -C "$work" issue3
exit $status
