"""Mamba2's prefill kernels (models/ssd_prefill.py) through Triton's interpreter on CPU: a
mixer's prefill through them gives the torch chunked form's output, conv state and SSD state,
for one and two groups, prompts shorter than the conv window, within one chunk and across
chunks, time steps clamped or not and over softplus' whole range. Runs only where triton is
importable and TRITON_INTERPRET=1 (skipped in CI; the GPU tests are test_ssd_prefill_gpu.py):
  TRITON_INTERPRET=1 PYTHONPATH=src python -m pytest tests/test_ssd_prefill_interpret.py
"""

import math
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("runs the kernels in Triton's interpreter: needs TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")

from phasewatt.models.registry import build_model  # noqa: E402
from phasewatt.models.spec import ModelSpec  # noqa: E402


def tiny_mixer(groups: int, time_step_limit=None, seed: int = 5):
    entry = dict(
        arch="mamba2", n_layers=1, d_model=64, d_state=16, head_dim=16, expand=2, n_groups=groups, conv_size=4,
        chunk_size=8, vocab_size=128, tied_embeddings=True,
    )
    if time_step_limit is not None:
        entry["time_step_limit"] = list(time_step_limit)
    model = build_model(ModelSpec.from_config("tiny-mamba2", entry), device="cpu", dtype=torch.float32, seed=seed)
    mixer = model.layers[0].mixer.requires_grad_(False)
    with torch.no_grad():  # a norm weight and D that are not all ones, so their channels count
        mixer.norm.weight.uniform_(0.5, 1.5)
        mixer.D.uniform_(0.5, 1.5)
    return mixer


def prefill(mixer, h, backend):
    mixer.backend = backend
    conv, ssm = mixer.make_state(h.shape[0])
    with torch.no_grad():
        out = mixer.prefill(h, conv, ssm)
    return out.float(), conv.float(), ssm


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("length", [2, 64, 150])
def test_kernels_match_the_torch_prefill(groups, length):
    """2 tokens: shorter than the conv window; 64: one whole chunk; 150: three chunks, the last
    part-filled. Float32: equal up to summation order."""
    mixer = tiny_mixer(groups)
    h = torch.randn(2, length, 64, generator=torch.Generator().manual_seed(length))
    expected = prefill(mixer, h, "torch")
    got = prefill(mixer, h, "triton")
    for name, a, b in zip(("output", "conv state", "ssm state"), got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("dt_bias", [-25.0, -12.0, -5.0, 0.0, 5.0, 25.0])
def test_time_step_follows_softplus_over_its_range(dt_bias):
    """The final state is proportional to dt (no norm in between), so its relative error is
    dt's: e^x by the series far below 0 (float32 1 + e^x would lose e^x there: 1% at -12),
    log(1 + e^x) near 0, x itself above 20."""
    mixer = tiny_mixer(1)
    with torch.no_grad():
        mixer.dt_bias.fill_(dt_bias)
        mixer.A_log.fill_(math.log(1e-3))  # decay slow enough that every token's dt counts
    h = torch.randn(1, 70, 64, generator=torch.Generator().manual_seed(3))
    expected = prefill(mixer, h, "torch")[2]
    torch.testing.assert_close(prefill(mixer, h, "triton")[2], expected, rtol=1e-4, atol=expected.abs().max().item() * 1e-6)


def test_kernels_clamp_the_time_step():
    mixer = tiny_mixer(1, (0.05, 3.0))
    with torch.no_grad():
        mixer.dt_bias.copy_(torch.linspace(-8.0, 8.0, mixer.dt_bias.numel()))
    h = torch.randn(1, 90, 64, generator=torch.Generator().manual_seed(4))
    for a, b in zip(prefill(mixer, h, "triton"), prefill(mixer, h, "torch")):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_kernels_in_half_precision_stay_within_rounding():
    """fp16 (bf16's dot is missing from the interpreter): the kernels round x, B, C, v, the
    decayed scores and the chunk states to the model dtype, as fla does; the float32 torch form
    is the reference."""
    mixer = tiny_mixer(1)
    h = torch.randn(2, 130, 64, generator=torch.Generator().manual_seed(9))
    expected = prefill(mixer, h, "torch")
    got = prefill(mixer.half(), h.half(), "triton")
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=1e-2)


def test_kernels_take_a_projection_with_padded_rows():
    """Inductor may pad a matrix product's row stride (flexible_layout lets it hand that over):
    a projection inside wider rows gives the packed one's results, and so does one whose
    channels are not unit-stride (packed by the launcher first)."""
    from phasewatt.models import ssd_prefill

    mixer = tiny_mixer(2)
    width = mixer.in_proj.weight.shape[0]
    wide = torch.randn(2, 75, width + 24, generator=torch.Generator().manual_seed(2))
    args = (mixer.conv_weight, mixer.conv_bias, mixer.dt_bias, mixer.A_log, mixer.D, mixer.norm.weight, (0.0, float("inf")), 2, mixer.d_state, mixer.head_dim)
    results = []
    packed = wide[..., :width].contiguous()
    for proj in (wide[..., :width], packed, packed.mT.contiguous().mT):  # padded rows; packed; channels not unit-stride
        ssm = mixer.make_state(2)[1]
        results.append((*ssd_prefill.mamba2_prefill_kernels(proj, *args, ssm), ssm))
    for other in results[1:]:
        for a, b in zip(other, results[0]):
            assert torch.equal(a, b)


@pytest.mark.parametrize("blocks", [
    {"states_k": 16, "states_v": 16, "output_k": 16, "output_v": 16},  # several state blocks and channel blocks per head
    {"conv_t": 64, "conv_c": 128, "output_k": 128},  # tiles larger than the dims they cover
])
def test_block_sizes_change_only_the_summation_order(blocks):
    """Wider d_state and head_dim (64, 32) than the tiny mixer's, so that each block size
    splits them: same u up to rounding, and the sums of squares per channel block add up to
    the default's per head."""
    from phasewatt.models import ssd_prefill

    entry = dict(arch="mamba2", n_layers=1, d_model=64, d_state=64, head_dim=32, expand=2, n_groups=2, conv_size=4, chunk_size=8, vocab_size=64)
    mixer = build_model(ModelSpec.from_config("mamba2-blocks", entry), device="cpu", dtype=torch.float32, seed=1).layers[0].mixer
    proj = torch.randn(1, 100, mixer.in_proj.weight.shape[0], generator=torch.Generator().manual_seed(1))
    args = (mixer.conv_weight, mixer.conv_bias, mixer.dt_bias, mixer.A_log, mixer.D, mixer.norm.weight, (0.0, float("inf")), 2, 64, 32)
    ssm_default, ssm_blocks = mixer.make_state(1)[1], mixer.make_state(1)[1]
    u_default, squares_default = ssd_prefill.mamba2_prefill_kernels(proj, *args, ssm_default)
    u_blocks, squares_blocks = ssd_prefill.mamba2_prefill_kernels(proj, *args, ssm_blocks, blocks)
    torch.testing.assert_close(u_blocks, u_default, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ssm_blocks, ssm_default, rtol=1e-5, atol=1e-6)
    per_head = lambda squares: squares.unflatten(-1, (mixer.n_heads, -1)).sum(-1)  # noqa: E731
    torch.testing.assert_close(per_head(squares_blocks), per_head(squares_default), rtol=1e-5, atol=1e-5)


def test_twenty_heads_span_two_time_step_programs():
    """More heads than a time-step program covers (STEPS_BLOCK_HEADS), and head_dim 8 under
    tl.dot's 16 (masked tiles)."""
    from phasewatt.models import ssd_prefill

    assert 20 > ssd_prefill.STEPS_BLOCK_HEADS
    entry = dict(arch="mamba2", n_layers=1, d_model=80, d_state=16, head_dim=8, expand=2, n_groups=1, conv_size=4, chunk_size=8, vocab_size=64)
    mixer = build_model(ModelSpec.from_config("mamba2-heads", entry), device="cpu", dtype=torch.float32, seed=3).layers[0].mixer
    with torch.no_grad():
        mixer.dt_bias.copy_(torch.linspace(-6.0, 2.0, 20))  # every head its own time step
    h = torch.randn(2, 80, 80, generator=torch.Generator().manual_seed(5))
    for a, b in zip(prefill(mixer, h, "triton"), prefill(mixer, h, "torch")):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_conv_without_bias_is_the_conv_with_a_zero_bias():
    from phasewatt.models import ssd_prefill

    mixer = tiny_mixer(1)
    proj = torch.randn(1, 40, mixer.in_proj.weight.shape[0], generator=torch.Generator().manual_seed(6))
    rest = (mixer.dt_bias, mixer.A_log, mixer.D, mixer.norm.weight, (0.0, float("inf")), 1, mixer.d_state, mixer.head_dim)
    without = ssd_prefill.mamba2_prefill_kernels(proj, mixer.conv_weight, None, *rest, mixer.make_state(1)[1])
    zero = ssd_prefill.mamba2_prefill_kernels(proj, mixer.conv_weight, torch.zeros_like(mixer.conv_bias), *rest, mixer.make_state(1)[1])
    with_bias = ssd_prefill.mamba2_prefill_kernels(proj, mixer.conv_weight, mixer.conv_bias, *rest, mixer.make_state(1)[1])
    assert torch.equal(without[0], zero[0]) and not torch.equal(without[0], with_bias[0])


def test_float16_stays_finite_where_u_exceeds_its_range():
    """u is not normed yet when it leaves the kernel: in float16 it comes back in float32 and
    is normed before the output projection (large projections put it past 65504)."""
    mixer = tiny_mixer(1)
    with torch.no_grad():
        mixer.in_proj.weight.mul_(30.0)
    h = torch.randn(1, 70, 64, generator=torch.Generator().manual_seed(8))
    expected = prefill(mixer, h, "torch")[0]
    got = prefill(mixer.half(), h.half(), "triton")[0]
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_op_passes_opcheck(dtype):
    """The op's schema (ssm_state mutated), its fake (shapes and dtypes) and its dispatch."""
    from phasewatt.models import ssd_prefill

    mixer = tiny_mixer(2).to(dtype)
    proj = torch.randn(2, 30, mixer.in_proj.weight.shape[0] + 8, generator=torch.Generator().manual_seed(4)).to(dtype)[..., :-8]
    args = (proj, mixer.conv_weight, mixer.conv_bias, mixer.dt_bias, mixer.A_log, mixer.D, mixer.norm.weight, 0.0, float("inf"), 2, mixer.d_state, mixer.head_dim, mixer.make_state(2)[1])
    torch.library.opcheck(ssd_prefill.mamba2_prefill_ssd, args)
