"""The decode step's causal convolution + SiLU as one Triton kernel, against the torch form in
float32, and with the SSD step both launched with PDL (needs CUDA and Triton; skipped in CI).
The CPU side of the op: test_linear_ops.py."""

import pytest
import torch
import torch.nn.functional as F

from _cuda_models import cpu_and_cuda_logits
from _pdl_gpu import HOPPER, pdl_chain_matches_eager

from phasewatt.models import linear_ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

WIDTH = 4
STEPS = 4


def conv_inputs(batch: int, channels: int, bias: bool, seed: int):
    """bf16 state, weight, bias as the models keep them; x is taken from a wider projection."""
    gen = torch.Generator("cuda").manual_seed(seed)
    state = torch.randn(batch, channels, WIDTH - 1, device="cuda", generator=gen).to(torch.bfloat16)
    weight = (torch.randn(channels, WIDTH, device="cuda", generator=gen) / 2).to(torch.bfloat16)
    b = torch.randn(channels, device="cuda", generator=gen).to(torch.bfloat16) if bias else None
    return state, weight, b, gen


def new_x(batch: int, channels: int, gen) -> torch.Tensor:
    """A column slice of a [B, 2560 + C + 64] projection, as Mamba2's z | xBC | dt split gives."""
    proj = torch.randn(batch, 2560 + channels + 64, device="cuda", generator=gen).to(torch.bfloat16)
    return proj[:, 2560 : 2560 + channels]


def reference_step(x, state32, weight, bias) -> torch.Tensor:
    """The torch form in float32 on the bf16 values (state32 shifted in place)."""
    return F.silu(linear_ops.causal_conv1d_step(x.float(), state32, weight.float(), None if bias is None else bias.float()))


def assert_close_bf16(out, expected):
    """Within bf16 rounding of the float32 result (the kernel accumulates in float32)."""
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=8e-3, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("batch,channels", [(1, 5376), (32, 5376), (3, 100), (2, 640), (5, 4352)])
def test_kernel_matches_torch_over_successive_steps(batch, channels, bias):
    """Mamba2-4B-like C = 5376 (x | B | C) at B = 1 and 32, C not a multiple of the block,
    GDN-like C = 4352; several steps so each one reads what the previous shift wrote."""
    state, weight, b, gen = conv_inputs(batch, channels, bias, seed=batch + channels)
    state32 = state.float()
    address = state.data_ptr()
    for _ in range(STEPS):
        x = new_x(batch, channels, gen)
        assert x.stride(0) != channels
        expected = reference_step(x, state32, weight, b)
        out = linear_ops.causal_conv1d_step_silu(x, state, weight, b)
        assert out.shape == (batch, channels) and out.is_contiguous()
        assert_close_bf16(out, expected)
        assert state.data_ptr() == address
        assert torch.equal(state.float(), state32)  # the shift is a copy of bf16 values: exact


def test_launcher_matches_the_op_dispatch():
    """The public wrapper, the op and the launcher are one computation on CUDA."""
    state, weight, b, gen = conv_inputs(4, 1000, True, seed=1)
    x = new_x(4, 1000, gen)
    other = state.clone()
    launched = linear_ops.triton_conv_step_silu(x, state, weight, b)
    assert torch.equal(launched, torch.ops.phasewatt.causal_conv1d_step_silu(x, other, weight, b))
    assert torch.equal(state, other)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_op_in_a_compiled_function_and_a_graph(bias):
    """Compiled with its neighbours (the split before it, a product after it) and captured in
    a CUDA graph; each replay advances the state by one step."""
    torch._dynamo.reset()
    batch, channels = 8, 5376
    state, weight, b, gen = conv_inputs(batch, channels, bias, seed=7)
    proj = torch.randn(batch, 2560 + channels + 64, device="cuda", generator=gen).to(torch.bfloat16)

    def step(p):
        _, xbc, _ = p.split([2560, channels, 64], dim=-1)
        out = linear_ops.causal_conv1d_step_silu(xbc, state, weight, b)
        return out * 2.0

    compiled = torch.compile(step, fullgraph=True)
    state32 = state.float()
    assert_close_bf16(compiled(proj), 2.0 * reference_step(proj[:, 2560 : 2560 + channels], state32, weight, b))
    assert torch.equal(state.float(), state32)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = compiled(proj)
    for _ in range(2):
        proj.copy_(torch.randn(proj.shape, device="cuda", generator=gen))
        expected = 2.0 * reference_step(proj[:, 2560 : 2560 + channels], state32, weight, b)
        graph.replay()
        assert_close_bf16(out, expected)
        assert torch.equal(state.float(), state32)


@pytest.mark.parametrize("arch", ["mamba2", "gdn"])
def test_model_decode_on_cuda_matches_cpu(arch):
    """The wiring in the models: decode steps on CUDA (conv op through the kernel) give the
    logits of the same float32 model on CPU (torch form). Prefill runs the torch chunked form
    on both, so fla is not needed."""
    from phasewatt.models.spec import ModelSpec

    shapes = dict(n_layers=2, d_model=64, head_dim=16, conv_size=WIDTH, vocab_size=128, d_ff=96)
    shapes.update(dict(d_state=16, expand=2, n_groups=1, chunk_size=8) if arch == "mamba2" else dict(n_heads=2, expand_v=2))
    spec = ModelSpec.from_config(f"tiny-{arch}", dict(arch=arch, **shapes))
    tokens = torch.tensor([[3, 17, 9, 40, 2], [8, 1, 77, 5, 60]])
    on_cpu, on_cuda = cpu_and_cuda_logits(spec, tokens, prefill_backend="torch")
    torch.testing.assert_close(on_cuda, on_cpu, rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(not HOPPER, reason="PDL needs compute capability >= 9.0")
def test_pdl_launches_wait_for_the_input_product():
    """The conv step and then the SSD step (Mamba2's decode, gated), each launched with PDL
    right after the kernel that writes its input, read what that kernel wrote: replays give
    the bits of eager runs without PDL, states included."""
    heads, p, n = 80, 64, 128
    d_inner, conv_dim = heads * p, heads * p + 2 * n
    state, weight, b, gen = conv_inputs(1, conv_dim, True, seed=3)
    ssm = torch.randn(1, heads, n, p, device="cuda", generator=gen)
    dt_bias, a_log, d_skip = (torch.rand(heads, device="cuda", generator=gen) for _ in range(3))

    def make_state():
        return {"conv": state.clone(), "ssm": ssm.clone()}

    def run(proj, st):
        z, xbc, dt_raw = proj.split([d_inner, conv_dim, heads], dim=-1)
        xbc = linear_ops.causal_conv1d_step_silu(xbc, st["conv"], weight, b)
        x, bb, cc = xbc.split([d_inner, n, n], dim=-1)
        return linear_ops.mamba2_ssd_step(st["ssm"], x, bb, cc, dt_raw, dt_bias, a_log, d_skip, (0.0, float("inf")), heads, gate=z)

    pdl_chain_matches_eager(make_state, run, k=2560, n=d_inner + conv_dim + heads)
