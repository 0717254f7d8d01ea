"""Mamba2's prefill kernels (models/ssd_prefill.py) on the GPU, at mamba2-2.7B's layer shapes:
against the torch chunked form in float32, against fla's chunk_simple_gla path in bf16, and
compiled whole and replayed from a CUDA graph as the engine runs them (needs CUDA and Triton;
skipped in CI; the interpreter tests are test_ssd_prefill_interpret.py)."""

import pytest
import torch

from _cuda_models import cpu_and_cuda_logits
from phasewatt.models.registry import build_model
from phasewatt.models.spec import ModelSpec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# mamba2-2.7b's layer (80 heads of 64, d_state 128, one group), one layer of it.
LAYER = dict(arch="mamba2", n_layers=1, d_model=2560, d_state=128, head_dim=64, expand=2, n_groups=1, conv_size=4, chunk_size=256, vocab_size=256, tied_embeddings=True)


def mixer(dtype, groups: int = 1, seed: int = 1):
    spec = ModelSpec.from_config("mamba2-layer", {**LAYER, "n_groups": groups})
    model = build_model(spec, device="cuda", dtype=dtype, seed=seed).eval().requires_grad_(False)
    mix = model.layers[0].mixer
    with torch.no_grad():
        mix.norm.weight.uniform_(0.5, 1.5, generator=torch.Generator("cuda").manual_seed(seed))
    return mix


def prefill(mix, h, backend):
    mix.backend = backend
    conv, ssm = mix.make_state(h.shape[0])
    out = mix.prefill(h, conv, ssm)
    return out.float(), conv.float(), ssm


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("batch,length,groups", [(1, 2048, 1), (2, 300, 1), (1, 200, 8)])
def test_kernels_match_the_float32_torch_form(batch, length, groups):
    """bf16 kernels against the same weights in float32 through the torch chunked form: within
    bf16 rounding (x, v, B, C and the chunk states are stored in bf16)."""
    mix32 = mixer(torch.float32, groups)
    mix16 = mixer(torch.bfloat16, groups)
    mix16.load_state_dict(mix32.state_dict())
    h = torch.randn(batch, length, LAYER["d_model"], device="cuda", generator=torch.Generator("cuda").manual_seed(length))
    expected = prefill(mix32, h, "torch")
    got = prefill(mix16, h.bfloat16(), "triton")
    for name, a, b in zip(("output", "conv state", "ssm state"), got, expected):
        assert rel_err(a, b) < 1e-2, name


def test_kernels_match_fla_simple_gla_in_bf16():
    """The path the kernels replaced (B and C copied out to 80 heads for fla's
    chunk_simple_gla) gives the same layer output and states, within bf16 rounding."""
    pytest.importorskip("fla")
    mix = mixer(torch.bfloat16)
    h = torch.randn(1, 1000, LAYER["d_model"], device="cuda", generator=torch.Generator("cuda").manual_seed(7)).bfloat16()
    fla_out = prefill(mix, h, "fla")
    ours = prefill(mix, h, "triton")
    for name, a, b in zip(("output", "conv state", "ssm state"), ours, fla_out):
        assert rel_err(a, b) < 1e-2, name


def test_compiled_without_a_break_and_replayed_from_a_graph():
    """The engine's path: the block's prefill compiled whole (the kernels are one custom op:
    fullgraph holds), captured in a CUDA graph and replayed, gives the eager kernels' result."""
    mix = mixer(torch.bfloat16)
    h = torch.randn(1, 512, LAYER["d_model"], device="cuda", generator=torch.Generator("cuda").manual_seed(3)).bfloat16()
    eager = prefill(mix, h, "triton")
    conv, ssm = mix.make_state(1)
    compiled = torch.compile(mix.prefill, fullgraph=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            compiled(h, conv, ssm)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = compiled(h, conv, ssm)
    conv.zero_()
    ssm.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out, eager[0]) < 1e-2
    assert torch.equal(conv.float(), eager[1])
    assert torch.equal(ssm, eager[2])


def test_model_prefill_on_cuda_runs_the_kernels_and_matches_cpu():
    """A tiny float32 model: prefill on CUDA (auto: the kernels, tf32 products) gives the CPU
    torch form's logits, and decode from the states it left continues them."""
    spec = ModelSpec.from_config(
        "tiny-mamba2", dict(arch="mamba2", n_layers=2, d_model=64, d_state=16, head_dim=16, expand=2, n_groups=1, conv_size=4, chunk_size=8, vocab_size=128),
    )
    assert build_model(spec, device="cpu").prefill_backend == "auto"  # what the helper leaves in place
    tokens = torch.randint(0, 128, (2, 100), generator=torch.Generator().manual_seed(0))
    on_cpu, on_cuda = cpu_and_cuda_logits(spec, tokens)
    torch.testing.assert_close(on_cuda, on_cpu, rtol=1e-2, atol=1e-2)
