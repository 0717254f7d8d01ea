#!/usr/bin/env bash
# Issue 4 on a GPU machine, GEMV round: the kernel's tests, the GEMV sweep (tuned table and
# tables against cuBLAS and inductor), and a kernel profile of the recurrent models' decode.
# Reads the GPU; never changes its power limit or clocks.
#   OUT=/some/dir bash benchmarks/device_issue4_gemv.sh
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the directory that comes back}"
source benchmarks/device_env.sh
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm,clocks.max.mem --format=csv | tee "$OUT/gpu.txt"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gemv_gpu.py 2>&1 | tail -n 15 | tee "$OUT/test_gemv_gpu.txt"
timeout "${SWEEP_S:-330}" python3 benchmarks/gemv_sweep.py --out "$OUT" --budget-s "${SWEEP_BUDGET_S:-270}" >"$OUT/gemv_sweep.log" 2>&1
echo "gemv_sweep exit $?"; grep -E "copy bandwidth|^rows|budget" "$OUT/gemv_sweep.log" | tail -n 60
timeout "${PROFILE_S:-150}" python3 benchmarks/profile_native.py --models "${PROFILE_MODELS:-mamba2,gdn}" --configs 1x512 --budget-s 100 \
    --out "$OUT" >"$OUT/profile.log" 2>&1
echo "profile exit $?"; tail -n 5 "$OUT/profile.log"
