#!/usr/bin/env bash
# Two measurement jobs at once on a two-GPU machine, each on its own GPU (issue 7).
# Device nvml, microbench engine (benchmarks/microbench.yaml, 3 repetitions), DVFS default
# only: reads the GPUs, never changes a power limit or a clock. An NVML watcher samples both
# GPUs' energy counters and power throughout, as ground truth. Three phases:
#   together    two `phasewatt run-one` jobs, started together (both GPUs' locks are held
#               until both jobs wait for one, then freed at once);
#   alone_on_1  one job while GPU 0's lock is held: it must take GPU 1, and GPU 0 must idle;
#   alone_on_0  the same with GPU 1 held.
# Then benchmarks/two_gpu_check.py check: different serials, overlapping measurements, each
# job's counter readings fit its own GPU's counter, its windows' energy fits its GPU's counter
# gain, and in the alone phases the GPU the record names is the one that drew the power.
#
# Usage (repository root, $OUT = a directory that comes back):
#   OUT=/some/dir bash benchmarks/two_gpu_check.sh
# Needs python3 with torch (CUDA), nvidia-ml-py, pyyaml, pandas, pyarrow, jsonschema (wheels
# in .whl/, if present, are installed to /tmp/site first). Results: $OUT/two_gpu_check.json
# (the verdict), $OUT/two_gpu_check.log, $OUT/two_gpu_runs.tar.gz (records, traces, watch).
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the directory that comes back}"
source benchmarks/device_env.sh
work=$(mktemp -d)
log="$OUT/two_gpu_check.log"
# Whatever happens, no lock holder or watcher outlives the script.
trap 'kill $(jobs -p) 2>/dev/null' EXIT
export PHASEWATT_GPU_LOCK_DIR="$work/locks"
say() { echo "== $*" | tee -a "$log"; }
helper=(python3 benchmarks/two_gpu_check.py)

if ! python3 -c "import jsonschema, yaml, pynvml, torch" 2>>"$log"; then
    say "missing python packages (see above): carry wheels in .whl/ (bash /work/shared/device/wheels.sh fetches snakemake's, jsonschema's among them)"
    exit 2
fi
count=$(python3 -c "from phasewatt.gpu.locks import visible_nvidia_gpu_count as n; print(n())")
nvidia-smi -L | tee -a "$log"
if [ "$count" -lt 2 ]; then
    say "needs two NVIDIA GPUs; NVML sees $count"
    exit 2
fi

python3 - "$work/two_gpu.yaml" <<'PY'
import sys, yaml
config = yaml.safe_load(open("benchmarks/microbench.yaml"))
config.update(gpus_per_node=2, repetitions=3, dvfs_control=False)
config["grid"]["dvfs"] = ["default"]
yaml.safe_dump(config, open(sys.argv[1], "w"))
PY

run_one() {  # run_one PHASE MODEL: one measurement job, its stderr into $work/PHASE-MODEL.err
    python3 -m phasewatt.cli run-one --config "$work/two_gpu.yaml" --model "$2" --batch 1 --seqlen 512 \
        --dvfs default --out-dir "$work/runs/$1" --journal-dir "$work/journal" >>"$log" 2>"$work/$1-$2.err"
}
hold() {  # hold INDICES NAME: hold those GPUs' locks until $work/NAME.stop exists
    "${helper[@]}" hold --indices "$1" --lock-dir "$PHASEWATT_GPU_LOCK_DIR" \
        --ready-file "$work/$2.ready" --stop-file "$work/$2.stop" &
    for _ in $(seq 100); do [ -f "$work/$2.ready" ] && return 0; sleep 0.1; done
    say "could not take the locks of GPUs $1"
    return 1
}
waiting() {  # waiting FILE...: true once every file says its job waits for a GPU
    for f in "$@"; do grep -q "are all busy" "$f" 2>/dev/null || return 1; done
}

"${helper[@]}" watch --out "$work/watch.parquet" --stop-file "$work/watch.stop" &
watcher=$!
sleep 4  # the watcher's first seconds are the GPUs' idle baseline
status=0

say "together: two jobs, released at once"
hold 0,1 together || status=1
run_one together gemv-4b & a=$!
run_one together copy-4b & b=$!
for _ in $(seq 600); do waiting "$work/together-gemv-4b.err" "$work/together-copy-4b.err" && break; sleep 0.1; done
touch "$work/together.stop"
wait $a || status=1
wait $b || status=1
sleep 8  # both GPUs settle back to idle

for busy in 1 0; do
    say "alone_on_$busy: one job, GPU $(( 1 - busy )) held"
    hold $(( 1 - busy )) "alone_on_$busy" || status=1
    run_one "alone_on_$busy" gemv-4b || status=1
    touch "$work/alone_on_$busy.stop"
    sleep 8
done

touch "$work/watch.stop"
wait $watcher || status=1
cat "$work"/*.err >>"$log"
say "check"
"${helper[@]}" check --watch "$work/watch.parquet" --runs "$work/runs" --out "$OUT/two_gpu_check.json" \
    2>&1 | tee -a "$log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
tar czf "$OUT/two_gpu_runs.tar.gz" -C "$work" runs watch.parquet two_gpu.yaml
say "done (status $status)"
exit $status
