"""The GEMV kernel compiled for sm_90 without a GPU (Triton's compiler and its bundled ptxas):
with PDL, nothing is read before the grid-dependency wait but the first weight tile and
nothing is written before it; without, no grid-dependency instruction at all. Runs wherever
triton is importable (skipped in CI), e.g. from a venv with triton:
  PYTHONPATH=src python -m pytest tests/test_gemv_compile.py"""

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from phasewatt.models import gemv, pdl  # noqa: E402

if pdl.interpreted():
    pytest.skip("TRITON_INTERPRET=1: the kernel is not compiled", allow_module_level=True)

ARGS = ["x_ptr", "w_ptr", "y_ptr", "d_ptr", "s_ptr", "z_ptr", "g_ptr", "r_ptr", "M", "N", "K", "stride_xm", "stride_zm",
        "stride_wn", "stride_ym", "eps", "g_offset", "out_scale"]
TYPES = ["*bf16"] * 8 + ["i32"] * 7 + ["fp32"] * 3
# As the launcher specializes them: pointers, N, K and row strides divisible by 16.
ALIGNED = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(ARGS) if name.endswith("_ptr") or name.startswith("stride") or name in ("N", "K")}
FEATURES = ("NORM", "NORM_WEIGHT", "HAS_DELTA", "GATE", "GLU", "HAS_RESIDUAL")


def ptx_lines(even_k: bool, early_w: bool, use_pdl: bool, features: set) -> list[str]:
    kernel = gemv._kernel()
    constants = dict(BLOCK_M=1, BLOCK_N=4, BLOCK_K=256, EVEN_K=even_k, EARLY_W=early_w, USE_PDL=use_pdl,
                     **{name: name in features for name in FEATURES})
    signature = dict(zip(ARGS, TYPES), **{name: "constexpr" for name in constants})
    source = ASTSource(kernel, signature, constexprs={(kernel.arg_names.index(k),): v for k, v in constants.items()}, attrs=ALIGNED)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 2, "launch_pdl": use_pdl})
    return [line.strip() for line in compiled.asm["ptx"].splitlines()]


def before_wait(lines: list[str]) -> list[str]:
    waits = [i for i, line in enumerate(lines) if line.startswith("griddepcontrol.wait")]
    assert len(waits) == 1, waits
    return lines[: waits[0]]


ALL = {"NORM", "NORM_WEIGHT", "HAS_DELTA", "GATE", "HAS_RESIDUAL"}  # every input and the written sum


@pytest.mark.parametrize("even_k", [True, False])
@pytest.mark.parametrize("glu", [False, True])
def test_only_weight_loads_come_before_the_wait(even_k, glu):
    features = ALL | ({"GLU"} if glu else set())
    lines = ptx_lines(even_k, True, True, features)
    assert sum(line.startswith("griddepcontrol.launch_dependents") for line in lines) == 1
    early = before_wait(lines)
    assert not any("st.global" in line for line in early)
    loads = sum("ld.global" in line for line in early)
    assert loads > 0  # the first weight tile
    # the same kernel without the peeled tile reads nothing before the wait: the early loads
    # are that tile's, twice as many with GLU's up rows
    assert not any("ld.global" in line or "st.global" in line for line in before_wait(ptx_lines(even_k, False, True, features)))
    if glu:
        assert loads == 2 * sum("ld.global" in line for line in before_wait(ptx_lines(even_k, True, True, ALL)))


def test_without_pdl_no_grid_dependency_instruction():
    lines = ptx_lines(True, False, False, ALL | {"GLU"})
    assert not any("griddepcontrol" in line for line in lines)
