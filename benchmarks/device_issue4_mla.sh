#!/usr/bin/env bash
# Issue 4 on a GPU machine, the fused MLA decode attention: its GPU tests, decode/prefill
# against the floors for MiniCPM3-4B (mla) with the fused kernels (its default on CUDA) at
# batch 1, 8, 32 and the compiled matmuls they replace, then a kernel profile at 1x512.
# Reads the GPU; never changes its power limit or clocks.
#   OUT=/some/dir bash benchmarks/device_issue4_mla.sh        (about 6 minutes)
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the directory that comes back}"
source benchmarks/device_env.sh
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/gpu.txt"
timeout "${TESTS_S:-200}" python3 -m pytest -q -p no:cacheprovider tests/test_mla_attention_gpu.py 2>&1 \
    | tail -n 15 | tee "$OUT/test_gpu.txt"
timeout "${ROOFLINE_S:-240}" python3 benchmarks/decode_roofline.py --models "${MODELS:-mla}" --batches "${BATCHES:-1,8,32}" \
    --prompts 512,2048 --variants compile --compare compile+matmul --compare-batches 1,32 --budget-s "${ROOFLINE_BUDGET_S:-200}" \
    --out "$OUT" >"$OUT/roofline.log" 2>&1
echo "decode_roofline exit $?"; grep -E "^\| [a-z]" "$OUT/roofline.log" | tail -n 20
timeout "${PROFILE_S:-80}" python3 benchmarks/profile_native.py --models "${PROFILE_MODEL:-mla}" --configs 1x512 --budget-s 30 \
    --out "$OUT" >"$OUT/profile.log" 2>&1
echo "profile exit $?"
