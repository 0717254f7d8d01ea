"""The fused GQA decode attention op on CPU: its torch form, its registration as a mutating
custom op, and how it splits the cache over the GPU (the Triton kernels themselves:
test_decode_attention_gpu.py)."""

import pytest
import torch

from phasewatt.engines.native import NativeEngine
from phasewatt.errors import ConfigError
from phasewatt.models import decode_attention as da
from phasewatt.models.layers import precompute_rope
from phasewatt.models.spec import ModelSpec

BATCH, HEADS, KV_HEADS, HEAD_DIM, CACHE = 2, 8, 2, 16, 128


def inputs(pos: int, qk_norm: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(BATCH, (HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=g)
    k_cache = torch.randn(BATCH, KV_HEADS, CACHE, HEAD_DIM, generator=g)
    v_cache = torch.randn(BATCH, KV_HEADS, CACHE, HEAD_DIM, generator=g)
    cos, sin = precompute_rope(HEAD_DIM, CACHE, 10000.0)
    norms = (torch.rand(HEAD_DIM, generator=g) + 0.5, torch.rand(HEAD_DIM, generator=g) + 0.5) if qk_norm else (None, None)
    return qkv, k_cache, v_cache, torch.tensor([pos]), cos, sin, *norms, 1e-6, HEADS, HEAD_DIM**-0.5


def naive(qkv, k_cache, v_cache, input_pos, cos, sin, q_norm_weight, k_norm_weight, eps, n_heads, scale):
    """Each query head on its own, over positions 0..pos, after writing the new k and v."""
    pos = int(input_pos)
    group = n_heads // KV_HEADS
    q, k, v = da.split_qkv(qkv.unsqueeze(1), n_heads, KV_HEADS, HEAD_DIM)
    q, k = da.norm_rope_qk(q, k, cos[input_pos], sin[input_pos], q_norm_weight, k_norm_weight, eps)
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    k_cache[:, :, pos], v_cache[:, :, pos] = k[:, 0], v[:, 0]
    out = torch.empty(BATCH, n_heads, HEAD_DIM)
    for b in range(BATCH):
        for h in range(n_heads):
            keys, values = k_cache[b, h // group, : pos + 1], v_cache[b, h // group, : pos + 1]
            out[b, h] = torch.softmax(keys @ q[b, 0, h] * scale, dim=0) @ values
    return out.flatten(1), k_cache, v_cache


@pytest.mark.parametrize("pos", [0, 37, CACHE - 1])
@pytest.mark.parametrize("qk_norm", [True, False])
def test_op_on_cpu_is_attention_over_the_written_cache(pos, qk_norm):
    args = inputs(pos, qk_norm)
    expected, k_expected, v_expected = naive(*args)
    out = torch.ops.phasewatt.gqa_decode_attention(*args)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(args[1], k_expected)  # the op wrote the caches in place
    torch.testing.assert_close(args[2], v_expected)


def test_sdpa_and_matmul_forms_agree():
    a, b = inputs(50), inputs(50)
    torch.testing.assert_close(da.attend_torch(*a, kind="sdpa"), da.attend_torch(*b, kind="matmul"), atol=1e-5, rtol=1e-5)


def test_opcheck():
    torch.library.opcheck(torch.ops.phasewatt.gqa_decode_attention.default, inputs(21))
    torch.library.opcheck(torch.ops.phasewatt.gqa_decode_attention.default, inputs(21, qk_norm=False))


@pytest.mark.parametrize("batch,kv_heads,cache_len", [(1, 8, 640), (1, 8, 2176), (1, 8, 64), (32, 8, 640), (128, 8, 2176), (1, 1, 100000), (3, 2, 65)])
def test_cache_slices_cover_the_cache_and_fill_the_gpu(batch, kv_heads, cache_len):
    sm_count = 132
    slices, slice_len = da.cache_slices(batch, kv_heads, cache_len, sm_count)
    assert slice_len % da.BLOCK_POSITIONS == 0
    assert (slices - 1) * slice_len < cache_len <= slices * slice_len  # no empty slice at the end
    blocks = -(-cache_len // da.BLOCK_POSITIONS)
    programs = batch * kv_heads * slices
    # enough programs for the GPU, or one slice per 64 positions; never more than needed
    assert programs >= da.PROGRAMS_PER_SM * sm_count or slices == blocks
    assert slices == 1 or batch * kv_heads * (slices - 1) < 2 * da.PROGRAMS_PER_SM * sm_count


def test_triton_path_refuses_inputs_it_cannot_read():
    """Checked before any launch (so on CPU too): layouts, shapes, head_dim and dtype."""
    qkv, k_cache, v_cache, pos, cos, sin, q_norm, k_norm, *rest = inputs(3)
    half = [qkv.bfloat16(), k_cache.bfloat16(), v_cache.bfloat16(), pos, cos, sin, q_norm.bfloat16(), k_norm.bfloat16(), *rest]
    args = list(half)
    args[1] = args[1].transpose(2, 3).contiguous().transpose(2, 3)  # head_dim not the inner axis
    with pytest.raises(ValueError, match="one layout"):
        da.triton_attend(*args, sm_count=1)
    with pytest.raises(ValueError, match="does not fit"):
        da.triton_attend(half[0][:, :-1], *half[1:], sm_count=1)
    with pytest.raises(ValueError, match="head_dim 16 in torch.float32"):
        da.triton_attend(*inputs(3), sm_count=1)


def test_fused_is_refused_for_models_without_it_before_any_work():
    spec = ModelSpec.from_config("tiny-mamba2", dict(
        arch="mamba2", n_layers=1, d_model=64, d_state=16, head_dim=16, expand=2, n_groups=1, conv_size=4, chunk_size=8,
        vocab_size=128, tied_embeddings=True,
    ))
    with pytest.raises(ConfigError, match=r"engine_options.decode_attention: 'fused' for the mamba2 model; allowed: auto$"):
        NativeEngine(spec=spec, batch=1, prompt_len=4, decode_tokens=2, device="cpu", options={"decode_attention": "fused"})


@pytest.mark.parametrize("head_dim,dtype,device_type,ok", [
    (128, torch.bfloat16, "cuda", True), (64, torch.float16, "cuda", True), (16, torch.bfloat16, "cuda", True),
    (96, torch.bfloat16, "cuda", False), (8, torch.bfloat16, "cuda", False), (128, torch.float32, "cuda", False),
    (96, torch.float32, "cpu", True),  # on CPU the op is the torch form
])
def test_fused_supported(head_dim, dtype, device_type, ok):
    assert da.fused_supported(head_dim, dtype, device_type) is ok


def test_the_engine_refuses_fused_where_the_kernels_do_not_fit(monkeypatch):
    """On CUDA a float32 model or a head_dim the kernels cannot take: one line at engine
    construction (no GPU is touched: the check needs only the spec and the dtype); auto then
    means matmul for such a model."""
    from phasewatt.models.gqa import GQAModel

    spec = ModelSpec.from_config("tiny-gqa", dict(arch="gqa", n_layers=1, d_model=96, n_heads=2, n_kv_heads=1, head_dim=48,
                                                  d_ff=64, vocab_size=64, dtype="float32"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match=r"'fused' needs a power-of-two head_dim >= 16 .*head_dim 48"):
        NativeEngine(spec=spec, batch=1, prompt_len=4, decode_tokens=2, options={"decode_attention": "fused"})
    model = GQAModel(spec)
    assert model.cuda_decode_attention == "matmul"  # what the engine would pick on CUDA, wherever the model is
    monkeypatch.setattr(GQAModel, "device", property(lambda self: torch.device("cuda")))
    with pytest.raises(ConfigError, match="allowed: sdpa, matmul"):
        model.set_decode_attention("fused")


def test_the_cuda_choice_and_the_roofline_variants_follow_where_fused_fits():
    """bf16 with a power-of-two head_dim: the engine picks fused on CUDA, so decode_roofline's
    +matmul variant is worth a row and +fused is not; a head_dim the kernels cannot take: matmul."""
    import sys
    from pathlib import Path

    from phasewatt.models.gqa import GQAModel

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import decode_roofline

    shape = dict(arch="gqa", n_layers=1, d_model=64, n_heads=2, n_kv_heads=1, d_ff=64, vocab_size=64, dtype="bfloat16")
    fits = ModelSpec.from_config("fits", dict(shape, head_dim=32))
    odd = ModelSpec.from_config("odd", dict(shape, head_dim=48))
    assert GQAModel.cuda_decode_attention_for(fits, torch.bfloat16) == "fused"
    assert GQAModel.cuda_decode_attention_for(odd, torch.bfloat16) == "matmul"
    assert decode_roofline._applies("compile+matmul", fits, True) and not decode_roofline._applies("compile+fused", fits, True)
    assert not decode_roofline._applies("compile+matmul", odd, True)
