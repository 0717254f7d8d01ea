#!/usr/bin/env bash
# Issue 4 on a GPU machine, the fused GQA decode attention: its GPU tests (and the GEMV's),
# decode/prefill against the floors for the GQA models with the fused kernels (the default on
# CUDA) at batch 1, 32, 128 and the compiled matmuls they replace at batch 1, then a kernel
# profile. Reads the GPU; never changes its power limit or clocks.
#   OUT=/some/dir bash benchmarks/device_issue4_attention.sh        (about 8 minutes on an H200)
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the directory that comes back}"
source benchmarks/device_env.sh
models="${MODELS:-gqa,gqa-control}"
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/gpu.txt"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_decode_attention_gpu.py tests/test_gemv_gpu.py 2>&1 \
    | tail -n 15 | tee "$OUT/test_gpu.txt"
timeout "${ROOFLINE_S:-300}" python3 benchmarks/decode_roofline.py --models "$models" --batches "${BATCHES:-1,32,128}" \
    --prompts 512,2048 --variants compile --compare compile+matmul --budget-s "${ROOFLINE_BUDGET_S:-260}" --out "$OUT" \
    >"$OUT/roofline.log" 2>&1
echo "decode_roofline exit $?"; grep -E "^\| [a-z]" "$OUT/roofline.log" | tail -n 20
timeout "${PROFILE_S:-80}" python3 benchmarks/profile_native.py --models "${PROFILE_MODEL:-gqa}" --configs 1x512 --budget-s 30 \
    --out "$OUT" >"$OUT/profile.log" 2>&1
echo "profile exit $?"
