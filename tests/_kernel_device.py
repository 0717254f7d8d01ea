"""Where the Triton kernel tests run: on a CUDA GPU, or, with PHASEWATT_KERNEL_DEVICE=cpu and
TRITON_INTERPRET=1, through Triton's interpreter on CPU (a check of a kernel's indexing on a
machine without a GPU); a test module that cannot run either way is skipped."""

import os

import pytest
import torch

DEVICE = os.environ.get("PHASEWATT_KERNEL_DEVICE", "cuda")
INTERPRETED = DEVICE == "cpu"


def require_kernel_device() -> None:
    """Skip the calling test module unless its kernels can run here (call at import)."""
    if INTERPRETED and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("PHASEWATT_KERNEL_DEVICE=cpu needs TRITON_INTERPRET=1", allow_module_level=True)
    if not INTERPRETED and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU", allow_module_level=True)
