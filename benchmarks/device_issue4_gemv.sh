#!/usr/bin/env bash
# Issue 4 on a GPU machine, the GEMV round in one call: the kernels' GPU tests (GEMV, SSD step,
# fused attention, conv step), the GEMV sweep (writes the tuned table for this GPU model into
# src/phasewatt/models/gemv_configs/ of the copy and to $OUT: commit it), decode/prefill
# against the floors at batch 1 with that table, and a kernel profile of one model. Reads the
# GPU; never changes its power limit or clocks.
#   OUT=/some/dir bash benchmarks/device_issue4_gemv.sh        (about 9 minutes on an H200)
#   MODELS=gqa,mla PROFILE_MODEL=mla OUT=... bash benchmarks/device_issue4_gemv.sh
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the directory that comes back}"
source benchmarks/device_env.sh
models="${MODELS:-gqa,gqa-control,mla,gdn,mamba2}"
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/gpu.txt"
timeout "${TESTS_S:-200}" python3 -m pytest -q -p no:cacheprovider tests/test_gemv_gpu.py tests/test_decode_attention_gpu.py tests/test_conv_step_gpu.py 2>&1 \
    | tail -n 12 | tee "$OUT/test_gemv_gpu.txt"
timeout "${SWEEP_S:-240}" python3 benchmarks/gemv_sweep.py --models "$models" --out "$OUT" --budget-s "${SWEEP_BUDGET_S:-200}" >"$OUT/gemv_sweep.log" 2>&1
echo "gemv_sweep exit $?"; grep -A8 "Per decode step" "$OUT/gemv_sweep.md"
timeout "${ROOFLINE_S:-240}" python3 benchmarks/decode_roofline.py --models "$models" --batches 1 --prompts 512 --variants compile \
    --compare "" --budget-s 200 --out "$OUT" >"$OUT/roofline.log" 2>&1
echo "decode_roofline exit $?"; grep -E "^\| [a-z]" "$OUT/roofline.log" | tail -n 6
timeout "${PROFILE_S:-100}" python3 benchmarks/profile_native.py --models "${PROFILE_MODEL:-gqa}" --configs 1x512 --budget-s 30 \
    --out "$OUT" >"$OUT/profile.log" 2>&1
echo "profile exit $?"
