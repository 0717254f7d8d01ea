"""The fused MLA decode attention kernels against the torch form (needs CUDA and Triton;
skipped in CI).

PHASEWATT_KERNEL_DEVICE=cpu with TRITON_INTERPRET=1 runs the kernel comparisons through
Triton's interpreter instead, on small shapes in float16 (the interpreter's bf16 tl.dot is
broken): a check of the kernels' indexing on a machine without a GPU, e.g.
  TRITON_INTERPRET=1 PHASEWATT_KERNEL_DEVICE=cpu PYTHONPATH=src python -m pytest tests/test_mla_attention_gpu.py
"""

import pytest
import torch

from _kernel_device import DEVICE, INTERPRETED, require_kernel_device
from _pdl_gpu import HOPPER, assert_fused_follows_matmul_in_a_graph, pdl_chain_matches_eager
from phasewatt.models import mla_attention as ma
from phasewatt.models.layers import precompute_rope
from phasewatt.models.mla import MLAModel
from phasewatt.models.spec import ModelSpec

require_kernel_device()
DTYPE = torch.float16 if INTERPRETED else torch.bfloat16

# heads, kv_lora, rope, nope, v
MINICPM3 = (40, 256, 32, 64, 64)
SMALL = (20, 128, 16, 16, 32)  # two head blocks, the second part-filled; two absorb channel blocks; v > nope


def inputs(batch, dims, cache_len, pos, interleaved, seed=0):
    heads, kv_lora, rope, nope, v_dim = dims
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    kw = dict(device=DEVICE, dtype=DTYPE, generator=g)
    q = torch.randn(batch, heads * (nope + rope), **kw)
    # kv_a as the layer has it: a column slice of a_proj's output (row stride > width)
    kv_a = torch.randn(batch, 24 + kv_lora + rope, **kw)[:, 24:]
    latent = torch.randn(batch, cache_len, kv_lora + rope, **kw)
    cos, sin = precompute_rope(rope, cache_len, 1e4, device=DEVICE)
    norm = torch.rand(kv_lora, **kw) + 0.5
    kv_b = torch.randn(heads * (nope + v_dim), kv_lora, **kw) * kv_lora**-0.5
    pos = torch.tensor([pos], device=DEVICE)
    return q, kv_a, latent, pos, cos, sin, norm, kv_b, 1e-6, heads, nope, v_dim, (nope + rope) ** -0.5, interleaved


def assert_kernels_match_the_torch_form(batch, dims, cache_len, pos, interleaved, sm_count=None, **blocks):
    """sm_count: what the cache split is made for (None: the GPU's; small: few, long slices);
    blocks: triton_attend's block-size keywords."""
    ref_args = inputs(batch, dims, cache_len, pos, interleaved)
    args = inputs(batch, dims, cache_len, pos, interleaved)
    expected = ma.attend_torch(*ref_args)
    out = ma.triton_attend(*args, sm_count=sm_count or (132 if INTERPRETED else None), **blocks)
    assert out.shape == expected.shape and out.dtype == DTYPE
    assert float((out.float() - expected.float()).norm() / expected.float().norm()) < 1e-2
    latent, ref_latent = args[2], ref_args[2]
    written = latent[:, pos].float()
    assert float((written - ref_latent[:, pos].float()).abs().max()) <= 0.02 * float(written.abs().max())
    others = torch.ones(cache_len, dtype=torch.bool, device=DEVICE)
    others[pos] = False
    assert torch.equal(latent[:, others], ref_latent[:, others])  # nothing else touched


CASES = [
    (1, MINICPM3, 640, 512, None),    # MiniCPM3-4B at 512
    (1, MINICPM3, 640, 639, None),    # the last position
    (1, MINICPM3, 2176, 2100, None),  # at 2048
    (1, MINICPM3, 640, 0, None),      # the first position: one key
    (1, MINICPM3, 640, 64, None),     # the first position of a slice
    (8, MINICPM3, 640, 600, None),
    (32, MINICPM3, 640, 512, None),
    (32, MINICPM3, 2176, 2100, None),  # slices of several blocks
    (17, MINICPM3, 192, 130, None),   # two blocks of sequences, the second part-filled
    (1, MINICPM3, 2176, 1000, 1),     # one slice of many blocks
]
INTERPRETER_CASES = [
    (1, SMALL, 192, 130, None),
    (1, SMALL, 128, 0, None),
    (3, SMALL, 128, 127, 1),    # one slice of two blocks
    (2, SMALL, 320, 300, 4),    # slices of two blocks and one
    (17, SMALL, 64, 40, None),
]


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("batch,dims,cache_len,pos,sm_count", INTERPRETER_CASES if INTERPRETED else CASES)
def test_kernels_match_the_torch_form(batch, dims, cache_len, pos, sm_count, interleaved):
    assert_kernels_match_the_torch_form(batch, dims, cache_len, pos, interleaved, sm_count)


# Each block-size keyword at values that change the kernels' code or tiling, away from the
# defaults the cases above take (batch <= SMALL_BATCH: one-sequence merge of the whole v_dim
# (MERGE_V_BLOCK caps at it), 16 heads per partial program; above: 16-sequence merge, 32
# heads; 64 positions per step at every batch).
BLOCK_CASES = [
    (3, dict(merge_seqs=16)),                      # the batched merge at a small batch (rows past the batch)
    (17, dict(merge_seqs=1)),                      # the one-sequence merge at a large batch
    (17, dict(merge_seqs=16, merge_v_block=16)),   # the batched merge split over v
    (1, dict(merge_v_block=16)),                   # the one-sequence merge split over v
    (17, dict(partial_heads=16)),                  # the small-batch head blocks at a large batch
    (1, dict(partial_positions=16)),               # 40 slices of 16: two merge chunks
    (2, dict(partial_positions=128)),              # one step longer than some slices' valid rows
    (1, dict(partial_heads=32)),                   # fewer, part-filled head blocks
    (1, dict(absorb_channels=16)),                 # many channel blocks
    (1, dict(absorb_channels=512)),                # capped at kv_lora: one channel block
    (1, dict(partial_warps=8, partial_stages=1, merge_warps=8)),
    (1, dict(partial_warps=2, partial_stages=4, merge_warps=2)),
    (1, dict(partial_max_slices=3)),               # slices of several steps, the last part-filled
    (2, dict(partial_max_slices=1)),               # one slice: the merge of a single partial
]


@pytest.mark.parametrize("batch,blocks", BLOCK_CASES, ids=[f"b{b}-" + "-".join(f"{k}{v}" for k, v in kw.items()) for b, kw in BLOCK_CASES])
def test_block_size_keywords_keep_the_output(batch, blocks):
    """At a position past most of a cache long enough for > MERGE_SLICE_CHUNK slices of 16
    positions at batch 1 (so the one-sequence merge takes two chunks, the second part-filled)."""
    dims = SMALL if INTERPRETED else MINICPM3
    assert_kernels_match_the_torch_form(batch, dims, 640, 600, False, sm_count=132, **blocks)


def mla_spec(**over):
    shapes = dict(arch="mla", n_layers=2, d_model=256, n_heads=20, q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32,
                  qk_rope_head_dim=16, v_head_dim=32, d_ff=512, vocab_size=512, tied_embeddings=True, dtype="bfloat16",
                  scale_emb=12, scale_depth=1.4, dim_model_base=64)
    return ModelSpec.from_config("tiny-mla", {**shapes, **over})


@pytest.mark.skipif(INTERPRETED, reason="a compiled CUDA graph")
@pytest.mark.parametrize("interleaved", [False, True])
def test_fused_decode_in_a_compiled_graph_follows_the_position(interleaved):
    """A tiny bf16 MiniCPM3-style model, compiled and captured once, replayed at advancing
    positions, fed the same tokens: fused and matmul attention give close logits."""
    spec = mla_spec(rope_interleaved=interleaved)
    assert_fused_follows_matmul_in_a_graph(MLAModel, spec)


@pytest.mark.skipif(INTERPRETED, reason="MiniCPM3-4B's layer on CUDA")
@pytest.mark.parametrize("batch", [1, 32])
def test_minicpm3_layer_decode_fused_matches_matmul(batch):
    """One MiniCPM3-4B-shaped layer (eager, bf16) at position 600 of a 640 cache: the op
    against the matmul path on the same weights and cache."""
    spec = mla_spec(n_layers=1, d_model=2560, n_heads=40, q_lora_rank=768, kv_lora_rank=256, qk_nope_head_dim=64,
                    qk_rope_head_dim=32, v_head_dim=64, d_ff=6400, vocab_size=1024, dim_model_base=256)
    torch.manual_seed(0)
    model = MLAModel(spec, device="cuda", dtype=torch.bfloat16).eval().requires_grad_(False)
    model.setup_caches(batch, 640)
    for cache in model.caches:
        cache[0].normal_()
    tokens = torch.randint(0, 1024, (batch,), device="cuda", generator=torch.Generator(device="cuda").manual_seed(3))
    logits, caches = {}, {}
    start = [c[0].clone() for c in model.caches]
    for kind in ("matmul", "fused"):
        for cache, saved in zip(model.caches, start):
            cache[0].copy_(saved)
        model.set_decode_attention(kind)
        logits[kind] = model.decode(tokens, torch.tensor([600], device="cuda")).float()
        caches[kind] = model.caches[0][0].clone()
    diff = (logits["fused"] - logits["matmul"]).norm(dim=-1) / logits["matmul"].norm(dim=-1)
    assert float(diff.max()) < 2e-2
    assert torch.equal(caches["fused"][:, :600], caches["matmul"][:, :600])


@pytest.mark.skipif(INTERPRETED or not HOPPER, reason="PDL needs compute capability >= 9.0")
@pytest.mark.parametrize("blocks", [{}, {"merge_seqs": 16}], ids=["one-sequence-merge", "batched-merge"])
def test_pdl_launches_wait_for_the_q_product(blocks):
    """The three kernels launched with PDL right after the q_b GEMV (which lets them launch
    early), each loading its weights before its wait: absorb reads the q the GEMV writes,
    partial the query and cache entry absorb writes, merge the partials; replays give the bits
    of eager runs without PDL, cache included."""
    heads, _, rope, nope, _ = MINICPM3
    fixed = inputs(1, MINICPM3, 640, 512, False, seed=5)

    def make_state():
        return {"latent": fixed[2].clone()}

    def run(q, state):
        return ma.triton_attend(q, fixed[1], state["latent"], *fixed[3:], **blocks)

    pdl_chain_matches_eager(make_state, run, k=768, n=heads * (nope + rope))
