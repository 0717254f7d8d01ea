#!/usr/bin/env bash
# Issue 4 on a GPU machine, round 7 (the H100's GEMV table completed; the MLA attention
# benchmark): GPU tests, GEMV sweeps of the shapes this GPU's table lacks (MLA's first, then the
# others), optionally the MLA attention benchmark, then the native engine against the roofline
# at batch 1 x 512. Reads the GPU; never changes its power limit or clocks.
#   OUT=/some/dir bash benchmarks/device_issue4_round7.sh              (about 9 minutes)
#   TESTS_S=0 SWEEP_S=0 MLA_BENCH_S=100 MODELS=mla OUT=... bash benchmarks/device_issue4_round7.sh
#   TESTS_S=0 SWEEP_ARGS= SWEEP_MODELS= OUT=... bash benchmarks/device_issue4_round7.sh   (re-tune MLA's shapes)
#   TESTS_S=0 SWEEP_S=0 MODELS=mla BATCHES=1,8 VARIANTS=compile@l2_prefetch_mb=0,compile OUT=... bash ...   (round 8: L2 prefetch)
#   TESTS=tests/test_mla_attention_gpu.py SWEEP_S=0 MLA_BENCH_S=150 MLA_BENCH_ARGS="--reps 20" MLA_BENCH_BATCHES=1 MODELS=mla
#     PROMPTS=512,2048 OUT=... bash ...   (round 9; an empty MLA_BENCH_ARGS means the default --no-sweep)
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the directory that comes back}"
source benchmarks/device_env.sh
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/gpu.txt"
tests="${TESTS:-tests/test_ssd_prefill_gpu.py tests/test_conv_step_gpu.py}"
if [ "${TESTS_S:-120}" -gt 0 ]; then
    # shellcheck disable=SC2086
    timeout "${TESTS_S:-120}" python3 -m pytest -q -p no:cacheprovider $tests 2>&1 | tail -n 15 | tee "$OUT/test_gpu.txt"
fi
if [ "${SWEEP_S:-240}" -gt 0 ]; then
    # MLA's shapes first (the model short of its target), then the rest of the five models';
    # SWEEP_ARGS="" re-tunes shapes the table has (SWEEP_MODELS="" skips the second sweep).
    for models in ${SWEEP_FIRST-mla} ${SWEEP_MODELS-gqa,gqa-control,gdn,mamba2}; do
        # shellcheck disable=SC2086
        timeout "$((${SWEEP_S:-240} + 60))" python3 benchmarks/gemv_sweep.py --models "$models" ${SWEEP_ARGS---only-missing} \
            --budget-s "${SWEEP_S:-240}" --out "$OUT" >>"$OUT/gemv_sweep.log" 2>&1
        echo "gemv_sweep $models exit $?"
    done
    grep -E "^rows|budget|only-missing" "$OUT/gemv_sweep.log"
fi
if [ "${MLA_BENCH_S:-0}" -gt 0 ]; then
    # shellcheck disable=SC2086
    timeout "$((${MLA_BENCH_S} + 60))" python3 benchmarks/mla_attention_bench.py --batches "${MLA_BENCH_BATCHES:-1}" --caches 640:512,2176:2100 \
        --budget-s "${MLA_BENCH_S}" ${MLA_BENCH_ARGS:---no-sweep} --out "$OUT" >"$OUT/mla_attention_bench.log" 2>&1
    echo "mla_attention_bench exit $?"; grep -E "^\| [0-9]+ " "$OUT/mla_attention_bench.md" | cut -c1-160
fi
if [ "${ROOFLINE_S:-240}" -gt 0 ]; then
    timeout "${ROOFLINE_S:-240}" python3 benchmarks/decode_roofline.py --models "${MODELS:-gqa,gqa-control,mla,gdn,mamba2}" --batches "${BATCHES:-1}" \
        --prompts "${PROMPTS:-512}" --variants "${VARIANTS:-compile}" --compare "" --prefill-max-tokens "${PREFILL_MAX_TOKENS:-1}" \
        --budget-s "$((${ROOFLINE_S:-240} - 30))" --out "$OUT" >"$OUT/roofline.log" 2>&1
    echo "decode_roofline exit $?"; grep -E "^\| [a-z]" "$OUT/roofline.log" | cut -c1-180
fi
rm -f "$OUT/gemv_sweep.csv"  # the tables (.md, .json) are what comes back: at most 8 files
