"""The GEMV kernel through Triton's interpreter on CPU: its indexing and, with the first weight
tile peeled off the K loop (EARLY_W, what PDL launches run), the same results as the plain
loop, without a GPU. Runs only where triton is importable and TRITON_INTERPRET=1 (skipped in
CI and on the GPU machine, whose kernel tests are test_gemv_gpu.py), e.g. from a venv with
triton:
  TRITON_INTERPRET=1 PYTHONPATH=src python -m pytest tests/test_gemv_interpret.py
The grid-dependency instructions themselves (USE_PDL) are inline assembly, which the
interpreter lacks: the GPU tests check them."""

import os

import pytest
import torch
import torch.nn.functional as F

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("runs the kernel in Triton's interpreter: needs TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")

from phasewatt.models import gemv  # noqa: E402

EPS = 1e-6
# (K, config): K a multiple of BLOCK_K (EVEN_K, 3 tiles), not (2 tiles, the second part-filled),
# K within one tile (the loop after the peeled tile runs no iteration), K exactly one tile.
SHAPES = [
    (192, {"BLOCK_N": 4, "BLOCK_K": 64, "num_warps": 1, "num_stages": 1}),
    (100, {"BLOCK_N": 8, "BLOCK_K": 64, "num_warps": 1, "num_stages": 1}),
    (40, {"BLOCK_N": 2, "BLOCK_K": 64, "num_warps": 1, "num_stages": 1}),
    (64, {"BLOCK_N": 16, "BLOCK_K": 64, "num_warps": 1, "num_stages": 1}),
]
N = 19  # not a multiple of any BLOCK_N: the last program's rows past N


def reference(x, weight, *, delta=None, gate=None, norm_weight=None, rms=False, offset=0.0, glu=False, residual=None, out_scale=1.0):
    """The kernel's function in float64: (y, x + delta or None)."""
    x64, w64 = x.double(), weight.double()
    total = x64 + delta.double() if delta is not None else x64
    h = total
    if norm_weight is not None or rms:
        h = h * F.silu(gate.double()) if gate is not None else h
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
        h = h * (norm_weight.double() + offset) if norm_weight is not None else h
    y = F.linear(h, w64) * out_scale
    if glu:
        y = gemv.silu_gate_up(y)
    if residual is not None:
        y = y + residual.double()
    return y, (total if delta is not None else None)


VARIANTS = {
    "plain": {},
    "plain_residual_scaled": {"residual": True, "out_scale": 0.5},
    "norm_delta": {"norm_weight": True, "delta": True, "offset": 1.0},
    "norm_gate_residual": {"norm_weight": True, "gate": True, "residual": True},
    "rms": {"rms": True},
    "norm_glu": {"norm_weight": True, "glu": True},
    "rms_glu_delta_residual": {"rms": True, "glu": True, "delta": True, "residual": True},
}


def inputs(variant: str, rows: int, k: int, seed: int) -> tuple:
    spec = VARIANTS[variant]
    gen = torch.Generator().manual_seed(seed)
    n_weight = 2 * N if spec.get("glu") else N
    x = torch.randn(rows, k, generator=gen)
    weight = torch.randn(n_weight, k, generator=gen) / k**0.5
    kwargs = {
        "delta": torch.randn(rows, k, generator=gen) if spec.get("delta") else None,
        "gate": torch.randn(rows, k, generator=gen) if spec.get("gate") else None,
        "norm_weight": torch.rand(k, generator=gen) + 0.5 if spec.get("norm_weight") else None,
        "rms": bool(spec.get("rms")),
        "offset": spec.get("offset", 0.0),
        "glu": bool(spec.get("glu")),
        "residual": torch.randn(rows, N, generator=gen) if spec.get("residual") else None,
        "out_scale": spec.get("out_scale", 1.0),
    }
    return x, weight, kwargs


def run_kernel(x, weight, config, kwargs, early_w: bool, monkeypatch):
    """triton_gemv with the first weight tile peeled off the loop (early_w) or not."""
    monkeypatch.setattr(gemv, "_launch_args", lambda device: {"EARLY_W": early_w, "USE_PDL": False, "launch_pdl": False})
    kw = dict(kwargs)
    offset = kw.pop("offset")
    return gemv.triton_gemv(x, weight, config, eps=EPS, norm_offset=offset, **kw)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("k,config", SHAPES, ids=[f"k{k}" for k, _ in SHAPES])
def test_peeled_first_tile_matches_the_loop_and_torch(variant, rows, k, config, monkeypatch):
    x, weight, kwargs = inputs(variant, rows, k, seed=rows * 1000 + k)
    y_loop, total_loop = run_kernel(x, weight, config, kwargs, False, monkeypatch)
    y_peeled, total_peeled = run_kernel(x, weight, config, kwargs, True, monkeypatch)
    expected, expected_total = reference(x, weight, **kwargs)
    assert y_loop.shape == expected.shape == (rows, N)
    torch.testing.assert_close(y_loop.double(), expected, rtol=1e-4, atol=1e-4)
    # the same float32 operations on the same tiles in the same order: the same bits
    assert torch.equal(y_peeled, y_loop)
    if expected_total is None:
        assert total_loop is None and total_peeled is None
    else:
        torch.testing.assert_close(total_loop.double(), expected_total, rtol=0, atol=1e-6)
        assert torch.equal(total_peeled, total_loop)
