"""The fused MLA decode kernels compiled for sm_90 without a GPU (Triton's compiler and its
bundled ptxas), at every block size the benchmark sweeps: they compile; with PDL, absorb and
merge read nothing before the grid-dependency wait but their weights (W_UK, W_UV), partial
reads nothing before it, and none writes before it; without PDL, no grid-dependency
instruction at all. Runs wherever triton is importable (skipped in CI), e.g. from a venv with
triton:
  PYTHONPATH=src python -m pytest tests/test_mla_attention_compile.py"""

import pytest

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from phasewatt.models import mla_attention as ma, pdl  # noqa: E402

if pdl.interpreted():
    pytest.skip("TRITON_INTERPRET=1: the kernels are not compiled", allow_module_level=True)

# MiniCPM3-4B: heads, kv_lora, rope, nope, v
HEADS, KV_LORA, ROPE, NOPE, V_DIM = 40, 256, 32, 64, 64
POINTERS = {"cos_ptr": "*fp32", "sin_ptr": "*fp32", "pos_ptr": "*i64", "max_ptr": "*fp32", "sum_ptr": "*fp32", "out_ptr": "*fp32"}
FLOATS = ("eps", "scale")


def ptx_lines(kernel, constants: dict, use_pdl: bool, num_warps: int = 4, num_stages: int = 3) -> list[str]:
    """The kernel's PTX: runtime arguments typed by name (pointers bf16 unless POINTERS says,
    FLOATS fp32, the rest i32), pointers and strides marked 16-aligned as the launcher does."""
    constants = dict(constants, USE_PDL=use_pdl)
    runtime = [name for name in kernel.arg_names if name not in constants]
    types = {name: POINTERS.get(name, "*bf16") if name.endswith("_ptr") else "fp32" if name in FLOATS else "i32" for name in runtime}
    aligned = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in runtime if n.endswith("_ptr") or n.startswith("stride")}
    signature = {name: types.get(name, "constexpr") for name in kernel.arg_names}
    source = ASTSource(kernel, signature, constexprs={(kernel.arg_names.index(k),): v for k, v in constants.items()}, attrs=aligned)
    options = {"num_warps": num_warps, "num_stages": num_stages, "launch_pdl": use_pdl}
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
    return [line.strip() for line in compiled.asm["ptx"].splitlines()]


def before_wait(lines: list[str]) -> list[str]:
    waits = [i for i, line in enumerate(lines) if line.startswith("griddepcontrol.wait")]
    assert len(waits) == 1, waits
    return lines[: waits[0]]


def global_loads(lines):
    return sum("ld.global" in line for line in lines)


def check(lines_pdl, lines_plain, weight_loads: bool) -> None:
    assert not any(line.startswith("griddepcontrol") for line in lines_plain)
    assert sum(line.startswith("griddepcontrol.launch_dependents") for line in lines_pdl) == 1
    early = before_wait(lines_pdl)
    assert not any("st.global" in line for line in early)
    assert (global_loads(early) > 0) is weight_loads


@pytest.mark.parametrize("channels", [16, 64, 256])
def test_absorb_reads_only_w_uk_before_the_wait(channels):
    absorb = ma._kernels()[0]
    constants = dict(N_HEADS=HEADS, NOPE=NOPE, ROPE=ROPE, V_DIM=V_DIM, KV_LORA=KV_LORA, BLOCK_B=ma.BLOCK_SEQS, BLOCK_C=channels,
                     INTERLEAVED=False)
    check(ptx_lines(absorb, constants, True), ptx_lines(absorb, constants, False), weight_loads=True)


@pytest.mark.parametrize("heads,positions,warps,stages", [(16, 16, 4, 3), (16, 32, 4, 3), (16, 64, 8, 1), (32, 128, 2, 2), (64, 64, 4, 3)])
def test_partial_reads_nothing_before_the_wait(heads, positions, warps, stages):
    partial = ma._kernels()[1]
    constants = dict(N_HEADS=HEADS, HEAD_BLOCKS=-(-HEADS // heads), BLOCK_H=heads, KV_LORA=KV_LORA, ROPE=ROPE, BLOCK_L=positions)
    check(ptx_lines(partial, constants, True, warps, stages), ptx_lines(partial, constants, False, warps, stages), weight_loads=False)


@pytest.mark.parametrize("seqs,v_block,slices,warps", [(1, 16, 10, 4), (1, 32, 68, 2), (1, 64, 2, 8), (16, 64, 4, 4), (16, 16, 12, 8)])
def test_merge_reads_only_w_uv_before_the_wait(seqs, v_block, slices, warps):
    merge = ma._kernels()[2]
    all_slices = max(2, 1 << (slices - 1).bit_length())
    constants = dict(N_HEADS=HEADS, NOPE=NOPE, V_DIM=V_DIM, KV_LORA=KV_LORA, BLOCK_B=seqs, BLOCK_S=all_slices,
                     CHUNK_S=min(all_slices, ma.MERGE_SLICE_CHUNK), BLOCK_V=v_block)
    check(ptx_lines(merge, constants, True, warps), ptx_lines(merge, constants, False, warps), weight_loads=True)
