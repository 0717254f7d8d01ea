#!/usr/bin/env bash
# Issue 4 on a GPU machine, round 5 (every decode kernel launched with PDL, fused MLA attention):
# the decode kernels' GPU tests, the MLA attention micro-benchmark, then decode at batch 1 with
# PDL on and off in the same run for the five models, and optionally a kernel profile. Reads
# the GPU; never changes its power limit or clocks.
#   OUT=/some/dir bash benchmarks/device_issue4_round5.sh              (about 9 minutes on an H200)
#   MODELS=gqa,mla PROFILE_MODEL=mla TESTS="tests/test_pdl.py" OUT=... bash benchmarks/device_issue4_round5.sh
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the directory that comes back}"
source benchmarks/device_env.sh
models="${MODELS:-gqa,gqa-control,mla,gdn,mamba2}"
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/gpu.txt"
tests="${TESTS:-tests/test_pdl.py tests/test_decode_attention_gpu.py tests/test_conv_step_gpu.py tests/test_mla_attention_gpu.py}"
# shellcheck disable=SC2086
timeout "${TESTS_S:-200}" python3 -m pytest -q -p no:cacheprovider $tests 2>&1 | tail -n 12 | tee "$OUT/test_gpu.txt"
if [ "${MLA_BENCH_S:-120}" -gt 0 ]; then
    timeout "${MLA_BENCH_S:-120}" python3 benchmarks/mla_attention_bench.py --budget-s "$(( ${MLA_BENCH_S:-120} - 30 ))" --out "$OUT" \
        >"$OUT/mla_attention_bench.log" 2>&1
    echo "mla_attention_bench exit $?"
fi
timeout "${ROOFLINE_S:-260}" python3 benchmarks/decode_roofline.py --models "$models" --batches 1 --prompts "${PROMPTS:-512}" \
    --variants "${VARIANTS:-compile,compile-nopdl}" --compare "" --prefill-max-tokens "${PREFILL_MAX_TOKENS:-1}" \
    --budget-s "${ROOFLINE_BUDGET_S:-220}" --out "$OUT" >"$OUT/roofline.log" 2>&1
echo "decode_roofline exit $?"; grep -E "^\| [a-z]" "$OUT/roofline.log" | cut -c1-160
if [ -n "${PROFILE_MODEL:-}" ]; then
    timeout "${PROFILE_S:-80}" python3 benchmarks/profile_native.py --models "$PROFILE_MODEL" --configs "${PROFILE_CONFIG:-1x512}" \
        --budget-s 30 --out "$OUT" >"$OUT/profile.log" 2>&1
    echo "profile exit $?"
fi
