"""The fused GQA decode attention kernels against the torch form (needs CUDA and Triton;
skipped in CI)."""

import pytest
import torch

from _pdl_gpu import HOPPER, assert_fused_follows_matmul_in_a_graph, pdl_chain_matches_eager

from phasewatt.models import decode_attention as da
from phasewatt.models.gqa import GQAModel
from phasewatt.models.layers import precompute_rope
from phasewatt.models.spec import ModelSpec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def inputs(batch, heads, kv_heads, head_dim, cache_len, pos, qk_norm, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    kw = dict(device="cuda", dtype=torch.bfloat16, generator=g)
    qkv = torch.randn(batch, (heads + 2 * kv_heads) * head_dim, **kw)
    k_cache = torch.randn(batch, kv_heads, cache_len, head_dim, **kw)
    v_cache = torch.randn(batch, kv_heads, cache_len, head_dim, **kw)
    cos, sin = precompute_rope(head_dim, cache_len, 1e6, device="cuda")
    norms = (torch.rand(head_dim, **kw) + 0.5, torch.rand(head_dim, **kw) + 0.5) if qk_norm else (None, None)
    pos = torch.tensor([pos], device="cuda")
    return qkv, k_cache, v_cache, pos, cos, sin, *norms, 1e-6, heads, head_dim**-0.5


@pytest.mark.parametrize("batch,heads,kv_heads,head_dim,cache_len,pos,qk_norm", [
    (1, 32, 8, 128, 640, 512, True),     # Qwen3-4B at 512
    (1, 32, 8, 128, 640, 639, True),     # the last position
    (1, 32, 8, 128, 2176, 2100, False),  # Minitron-4B at 2048
    (1, 32, 8, 128, 640, 0, False),      # the first position: one key
    (1, 32, 8, 128, 640, 64, True),      # the first position of a slice
    (3, 16, 16, 64, 192, 130, True),     # group 1
    (32, 32, 8, 128, 640, 600, True),
    (2, 24, 2, 128, 256, 200, False),    # group 12
])
def test_kernels_match_the_torch_form(batch, heads, kv_heads, head_dim, cache_len, pos, qk_norm):
    ref_args = inputs(batch, heads, kv_heads, head_dim, cache_len, pos, qk_norm)
    args = inputs(batch, heads, kv_heads, head_dim, cache_len, pos, qk_norm)
    expected = da.attend_torch(*ref_args)
    out = da.triton_attend(*args)
    assert out.shape == expected.shape and out.dtype == torch.bfloat16
    assert float((out.float() - expected.float()).norm() / expected.float().norm()) < 1e-2
    for cache, ref_cache in ((args[1], ref_args[1]), (args[2], ref_args[2])):
        written = cache[:, :, pos].float()
        assert float((written - ref_cache[:, :, pos].float()).abs().max()) <= 0.02 * float(written.abs().max())
        others = torch.ones(cache_len, dtype=torch.bool, device="cuda")
        others[pos] = False
        assert torch.equal(cache[:, :, others], ref_cache[:, :, others])  # nothing else touched


def test_fused_decode_in_a_compiled_graph_follows_the_position():
    """A tiny bf16 Qwen3-style model, compiled and captured once, replayed at advancing
    positions, fed the same tokens: fused and matmul attention give close logits."""
    spec = ModelSpec.from_config("tiny", dict(arch="gqa", n_layers=2, d_model=256, n_heads=8, n_kv_heads=2, head_dim=64,
                                              d_ff=512, vocab_size=512, qk_norm=True, tied_embeddings=True, dtype="bfloat16"))
    assert_fused_follows_matmul_in_a_graph(GQAModel, spec)


@pytest.mark.skipif(not HOPPER, reason="PDL needs compute capability >= 9.0")
def test_pdl_launches_wait_for_the_qkv_product():
    """Both kernels launched with PDL after the qkv GEMV (which lets them launch early) read
    the qkv it writes, and the merge the partials: replays give the bits of eager runs without
    PDL, caches included."""
    heads, kv_heads, head_dim, cache_len, pos = 32, 8, 128, 640, 300
    fixed = inputs(1, heads, kv_heads, head_dim, cache_len, pos, True, seed=5)

    def make_state():
        return {"k_cache": fixed[1].clone(), "v_cache": fixed[2].clone()}

    def run(qkv, state):
        return da.gqa_decode_attention(qkv, state["k_cache"], state["v_cache"], *fixed[3:])

    pdl_chain_matches_eager(make_state, run, k=2560, n=(heads + 2 * kv_heads) * head_dim)
