#!/usr/bin/env bash
# Issue 4 on a GPU machine, round 6 (Mamba2's prefill through our SSD kernels): GPU tests, the
# SSD prefill benchmark against fla's path in the same run, then the native engine against the
# roofline: decode at batch 1 for the five models and prefill at 1 x 2048 where asked. Reads the
# GPU; never changes its power limit or clocks.
#   OUT=/some/dir bash benchmarks/device_issue4_round6.sh          (about 8 minutes on an H200)
#   MODELS=mamba2 PROMPTS=2048 PREFILL_MAX_TOKENS=2048 SSD_BENCH_ARGS=--no-sweep TESTS="tests/test_ssd_prefill_gpu.py" OUT=... bash benchmarks/device_issue4_round6.sh
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the directory that comes back}"
source benchmarks/device_env.sh
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/gpu.txt"
tests="${TESTS:-tests/test_ssd_prefill_gpu.py tests/test_conv_step_gpu.py}"
# shellcheck disable=SC2086
timeout "${TESTS_S:-200}" python3 -m pytest -q -p no:cacheprovider $tests 2>&1 | tail -n 15 | tee "$OUT/test_gpu.txt"
if [ "${SSD_BENCH_S:-150}" -gt 0 ]; then
    timeout "${SSD_BENCH_S:-150}" python3 benchmarks/ssd_prefill_bench.py ${SSD_BENCH_ARGS:-} --out "$OUT" >"$OUT/ssd_prefill_bench.log" 2>&1
    echo "ssd_prefill_bench exit $?"; grep -E "^\|" "$OUT/ssd_prefill_bench.log"
fi
timeout "${ROOFLINE_S:-300}" python3 benchmarks/decode_roofline.py --models "${MODELS:-gqa,gqa-control,mla,gdn,mamba2}" --batches 1 \
    --prompts "${PROMPTS:-512}" --variants "${VARIANTS:-compile}" --compare "" --prefill-max-tokens "${PREFILL_MAX_TOKENS:-1}" \
    --budget-s "${ROOFLINE_BUDGET_S:-260}" --out "$OUT" >"$OUT/roofline.log" 2>&1
echo "decode_roofline exit $?"; grep -E "^\| [a-z]" "$OUT/roofline.log" | cut -c1-180
