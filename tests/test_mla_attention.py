"""The fused MLA decode attention op on CPU: its torch form against attention with K and V
expanded per head, its registration as a mutating custom op, the layer's and engine's choice of
it (the Triton kernels themselves: test_mla_attention_gpu.py)."""

import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from _reference import assert_decode_steps_agree
from phasewatt.engines.native import NativeEngine
from phasewatt.errors import ConfigError
from phasewatt.models import decode_attention as da, mla_attention as ma
from phasewatt.models.layers import precompute_rope
from phasewatt.models.mla import MLAModel
from phasewatt.models.spec import ModelSpec

BATCH, HEADS, KV_LORA, ROPE, NOPE, V_DIM, CACHE = 2, 4, 16, 8, 8, 12, 128
EPS = 1e-6


def inputs(pos: int, interleaved: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(BATCH, HEADS * (NOPE + ROPE), generator=g)
    kv_a = torch.randn(BATCH, 5 + KV_LORA + ROPE, generator=g)[:, 5:]  # a column slice, as a_proj's output gives it
    latent = torch.randn(BATCH, CACHE, KV_LORA + ROPE, generator=g)
    cos, sin = precompute_rope(ROPE, CACHE, 10000.0)
    norm = torch.rand(KV_LORA, generator=g) + 0.5
    kv_b = torch.randn(HEADS * (NOPE + V_DIM), KV_LORA, generator=g) * KV_LORA**-0.5
    return q, kv_a, latent, torch.tensor([pos]), cos, sin, norm, kv_b, EPS, HEADS, NOPE, V_DIM, (NOPE + ROPE) ** -0.5, interleaved


def rotate(x, pos, interleaved):
    """Rope by its pairs: (x[i], x[i + D/2]), or (x[2i], x[2i + 1]) when interleaved, turned by
    pos * theta_i; the result in the half layout (what the cache holds)."""
    half = ROPE // 2
    angle = pos * 10000.0 ** (-torch.arange(half, dtype=torch.float64) * 2 / ROPE)
    a, b = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., :half], x[..., half:])
    return torch.cat([a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()], dim=-1).float()


def naive(q, kv_a, latent, input_pos, cos, sin, norm, kv_b, eps, n_heads, nope, v_dim, scale, interleaved):
    """Each head on its own, with its keys and values expanded from the latent (no absorption),
    over positions 0..pos after writing the new cache entry."""
    pos = int(input_pos)
    latent = latent.clone()
    kv_lat, k_pe = kv_a[:, :KV_LORA], kv_a[:, KV_LORA:]
    latent[:, pos, :KV_LORA] = kv_lat / kv_lat.pow(2).mean(-1, keepdim=True).add(eps).sqrt() * norm
    latent[:, pos, KV_LORA:] = rotate(k_pe.double(), pos, interleaved)
    w = kv_b.view(n_heads, nope + v_dim, KV_LORA)
    out = torch.empty(BATCH, n_heads, v_dim)
    for b in range(BATCH):
        for h in range(n_heads):
            q_h = q[b].view(n_heads, nope + ROPE)[h]
            q_h = torch.cat([q_h[:nope], rotate(q_h[nope:].double(), pos, interleaved)])
            c = latent[b, : pos + 1, :KV_LORA]
            keys = torch.cat([c @ w[h, :nope].T, latent[b, : pos + 1, KV_LORA:]], dim=-1)
            values = c @ w[h, nope:].T
            out[b, h] = torch.softmax(keys @ q_h * scale, dim=0) @ values
    return out.flatten(1), latent


@pytest.mark.parametrize("pos", [0, 37, CACHE - 1])
@pytest.mark.parametrize("interleaved", [False, True])
def test_op_on_cpu_is_attention_over_the_written_cache(pos, interleaved):
    args = inputs(pos, interleaved)
    expected, latent_expected = naive(*args)
    out = torch.ops.phasewatt.mla_decode_attention(*args)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(args[2], latent_expected)  # the op wrote the cache in place


def test_sdpa_and_matmul_forms_agree():
    a, b = inputs(50, True), inputs(50, True)
    torch.testing.assert_close(ma.attend_torch(*a, kind="sdpa"), ma.attend_torch(*b, kind="matmul"), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a[2], b[2], atol=0, rtol=0)


def test_opcheck():
    torch.library.opcheck(torch.ops.phasewatt.mla_decode_attention.default, inputs(21))
    torch.library.opcheck(torch.ops.phasewatt.mla_decode_attention.default, inputs(21, interleaved=True))


def test_triton_path_refuses_inputs_it_cannot_read():
    """Checked before any launch (so on CPU too): shapes, dims and dtype, layouts."""
    q, kv_a, latent, pos, cos, sin, norm, kv_b, *rest = inputs(3)
    rest[2], rest[3] = 16, 16  # nope, v: powers of two, with the rest below
    half = dict(dtype=torch.float16)
    good = [torch.randn(BATCH, HEADS * 32, **half), torch.randn(BATCH, 32, **half), torch.randn(BATCH, CACHE, 32, **half), pos,
            *precompute_rope(16, CACHE), norm[:16].half(), torch.randn(HEADS * 32, 16, **half), *rest]
    args = list(good)
    args[2] = args[2].transpose(1, 2).contiguous().transpose(1, 2)  # channels not the inner axis
    with pytest.raises(ValueError, match="unit-stride rows"):
        ma.triton_attend(*args, sm_count=1)
    with pytest.raises(ValueError, match="do not fit latent"):
        ma.triton_attend(good[0][:, :-1], *good[1:], sm_count=1)
    with pytest.raises(ValueError, match="kv_lora 16, rope 8, nope 8, v 12 in torch.float32"):
        ma.triton_attend(*inputs(3), sm_count=1)
    args = list(good)
    args[1] = args[1].float()
    with pytest.raises(ValueError, match="needs one dtype"):
        ma.triton_attend(*args, sm_count=1)


@pytest.mark.parametrize("dims,dtype,device_type,ok", [
    ((256, 32, 64, 64), torch.bfloat16, "cuda", True),   # MiniCPM3-4B
    ((512, 64, 128, 128), torch.float16, "cuda", True),  # DeepSeek-V2-Lite
    ((256, 32, 64, 64), torch.float32, "cuda", False),
    ((256, 32, 64, 96), torch.bfloat16, "cuda", False),
    ((256, 8, 64, 64), torch.bfloat16, "cuda", False),
    ((192, 32, 64, 64), torch.bfloat16, "cuda", False),
    ((256, 32, 48, 64), torch.bfloat16, "cuda", False),
    ((16, 4, 8, 12), torch.float32, "cpu", True),  # on CPU the op is the torch form
])
def test_fused_supported(dims, dtype, device_type, ok):
    assert ma.fused_supported(*dims, dtype, device_type) is ok
    assert (ma.fused_unsupported("m", *dims, dtype, device_type) is None) is ok


SHAPES = dict(arch="mla", n_layers=2, d_model=64, n_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
              qk_rope_head_dim=4, v_head_dim=12, d_ff=96, vocab_size=128, tied_embeddings=True, norm_eps=1e-6)


def tiny_model(**extra) -> MLAModel:
    torch.manual_seed(0)
    model = MLAModel(ModelSpec.from_config("tiny-mla", {**SHAPES, **extra}))
    with torch.no_grad():
        for p in model.parameters():  # random norm weights too, so a skipped norm would show
            p.normal_(0, 0.3).add_(1.0 if p.ndim == 1 else 0.0)
    return model.eval()


class OpNames(TorchDispatchMode):
    """The names of the ops a call dispatches."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("interleaved", [False, True])
def test_fused_decode_on_cpu_runs_the_op_and_equals_matmul(interleaved):
    prompt = torch.randint(0, SHAPES["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(1))
    logits, ops = {}, {}
    for kind in ("matmul", "fused"):
        model = tiny_model(rope_interleaved=interleaved)
        model.set_decode_attention(kind)
        with torch.no_grad():
            model.setup_caches(2, 10)
            model.prefill(prompt)
            with OpNames() as seen:
                steps = [model.decode(prompt[:, i], torch.tensor([7 + i])) for i in range(3)]
        logits[kind], ops[kind] = torch.stack(steps), seen.names
    assert "phasewatt.mla_decode_attention.default" in ops["fused"]
    assert "phasewatt.mla_decode_attention.default" not in ops["matmul"]
    assert torch.equal(logits["fused"], logits["matmul"])


def test_fused_decode_traces_as_one_graph_per_layer():
    eager, compiled = tiny_model(), tiny_model()
    for model in (eager, compiled):
        model.set_decode_attention("fused")
    compiled.compile_decode(backend="aot_eager")
    prompt = torch.randint(0, SHAPES["vocab_size"], (2, 5), generator=torch.Generator().manual_seed(3))
    assert_decode_steps_agree(eager, compiled, prompt)


def test_the_engine_refuses_fused_where_the_kernels_do_not_fit(monkeypatch):
    """On CUDA a model with a dim the kernels cannot take: one line at engine construction
    naming the MLA dims (no GPU is touched: the check needs only the spec and the dtype); auto
    then means matmul for such a model, fused for one that fits."""
    spec = ModelSpec.from_config("tiny-mla", {**SHAPES, "dtype": "bfloat16"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match=r"^engine_options.decode_attention: 'fused' needs power-of-two kv_lora_rank.*"
                                          r"\(models.tiny-mla: 16, 4, 8, 12, torch.bfloat16\); allowed: auto, sdpa, matmul$"):
        NativeEngine(spec=spec, batch=1, prompt_len=4, decode_tokens=2, options={"decode_attention": "fused"})
    fits = {**SHAPES, "kv_lora_rank": 32, "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 32, "dtype": "bfloat16"}
    NativeEngine(spec=ModelSpec.from_config("mla-fits", fits), batch=1, prompt_len=4, decode_tokens=2, options={"decode_attention": "fused"})
    model = tiny_model()
    assert model.cuda_decode_attention == "matmul"  # what the engine would pick on CUDA, wherever the model is
    monkeypatch.setattr(MLAModel, "device", property(lambda self: torch.device("cuda")))
    with pytest.raises(ConfigError, match="allowed: sdpa, matmul"):
        model.set_decode_attention("fused")


def test_fused_is_one_of_the_mla_decode_attentions():
    assert MLAModel.decode_attentions == ("sdpa", "matmul", "fused")
    with pytest.raises(ConfigError, match="decode_attention: 'flash'; allowed for mla: sdpa, matmul, fused"):
        tiny_model().set_decode_attention("flash")


def test_block_sizes_by_batch_and_keyword():
    """Defaults split finer at small batch; keywords override them; blocks that tile kv_lora or
    v_dim are capped at it."""
    small, large = ma.block_sizes(1, 256, 64), ma.block_sizes(ma.SMALL_BATCH + 1, 256, 64)
    assert (small["merge_seqs"], small["merge_v_block"], small["partial_heads"]) == (1, min(64, ma.MERGE_V_BLOCK), ma.BLOCK_HEADS)
    assert (large["merge_seqs"], large["merge_v_block"], large["partial_heads"]) == (ma.BLOCK_SEQS, 64, ma.BLOCK_HEADS_LARGE)
    assert small["partial_positions"] == large["partial_positions"] == ma.PARTIAL_POSITIONS
    assert ma.block_sizes(1, 256, 128)["merge_v_block"] == ma.MERGE_V_BLOCK  # a wider v_dim is split
    assert ma.block_sizes(1, 256, 64, merge_seqs=16)["merge_v_block"] == 64
    assert ma.block_sizes(32, 256, 64, merge_seqs=1)["merge_v_block"] == ma.MERGE_V_BLOCK
    assert small["partial_max_slices"] == large["partial_max_slices"] == ma.MERGE_SLICE_CHUNK  # one chunk a merge
    given = ma.block_sizes(1, 128, 32, absorb_channels=512, partial_heads=32, partial_positions=16, partial_warps=8,
                           partial_stages=1, partial_max_slices=5, merge_seqs=32, merge_v_block=64, merge_warps=2)
    assert given == dict(absorb_channels=128, partial_heads=32, partial_positions=16, partial_warps=8, partial_stages=1,
                         partial_max_slices=5, merge_seqs=32, merge_v_block=32, merge_warps=2)


@pytest.mark.parametrize("keyword,value,allowed", [
    ("merge_v_block", 24, "powers of two >= 16"),   # would not tile v_dim
    ("merge_v_block", 8, "powers of two >= 16"),    # too narrow for the batched merge's product
    ("partial_positions", 48, "powers of two >= 16"),
    ("partial_heads", 8, "powers of two >= 16"),
    ("absorb_channels", 0, "powers of two >= 16"),
    ("merge_seqs", 8, "1 or powers of two >= 16"),
    ("partial_warps", 3, "1, 2, 4, 8, 16"),
    ("partial_stages", 0, "integers >= 1"),
    ("partial_max_slices", 0, "integers >= 1"),
])
def test_block_sizes_refuse_blocks_the_kernels_cannot_take(keyword, value, allowed):
    with pytest.raises(ValueError, match=f"{keyword} {value}; allowed: {allowed}"):
        ma.block_sizes(1, 256, 64, **{keyword: value})


@pytest.mark.parametrize("batch,head_blocks,cache_len,positions", [(1, 3, 640, 32), (1, 3, 2176, 16), (32, 3, 640, 64), (8, 1, 192, 128)])
def test_cache_slices_of_other_block_sizes_cover_the_cache_in_whole_blocks(batch, head_blocks, cache_len, positions):
    slices, slice_len = da.cache_slices(batch, head_blocks, cache_len, 132, positions)
    assert slice_len % positions == 0
    assert (slices - 1) * slice_len < cache_len <= slices * slice_len
    if slice_len > positions:  # longer slices only when the programs would otherwise exceed the target
        assert batch * head_blocks * slices * slice_len // positions >= 132 * da.PROGRAMS_PER_SM


@pytest.mark.parametrize("cache_len,positions,max_slices,expected", [
    (2176, 64, 32, (17, 128)),  # MiniCPM3 at 2048, batch 1: 34 slices of one step -> 17 of two
    (2176, 64, 34, (34, 64)),   # the cap reached, not passed: unchanged
    (640, 64, 32, (10, 64)),    # under the cap: unchanged
    (8192, 16, 32, (32, 256)),
    (640, 64, 1, (1, 640)),     # one slice: the whole cache
])
def test_cache_slices_at_most_max_slices(cache_len, positions, max_slices, expected):
    assert da.cache_slices(1, 3, cache_len, 132, positions, max_slices) == expected
    slices, slice_len = expected
    assert slices <= max_slices and (slices - 1) * slice_len < cache_len <= slices * slice_len


def test_bench_sweeps_distinct_block_sizes_and_combines_the_winners():
    """benchmarks/mla_attention_bench.py's plan on CPU: bytes per call, one-keyword variants that
    each change the kernels' block sizes, and the combined row from those that beat the default."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import mla_attention_bench as bench

    dims = bench.MINICPM3
    assert bench.call_bytes(1, 512, dims) == 2 * (40 * 128 * 256 + 513 * 288)
    for batch in (1, 32):
        variants = bench.sweep_variants(batch, dims)
        resolved = [ma.block_sizes(batch, 256, 64, **kw) for _, kw in variants]
        assert ma.block_sizes(batch, 256, 64) not in resolved and len(set(map(str, resolved))) == len(resolved)
        # the kernels' block sizes before they took keywords (other than the defaults at any
        # batch now) are timed, as their own row or as a one-keyword row that resolves the same
        assert ma.block_sizes(batch, 256, 64, **bench.PREVIOUS) in resolved
    assert {"merge_seqs": 16} in [kw for _, kw in bench.sweep_variants(1, dims)]
    assert {"merge_seqs": 1} not in [kw for _, kw in bench.sweep_variants(1, dims)]  # the default at batch 1

    def row(us, **keywords):
        return {"batch": 1, "cache": 640, "status": "ok", "impl": "fused", "keywords": keywords,
                "blocks": bench.label_of(keywords), "us_per_layer": us}

    rows = [row(10.0), row(9.0, partial_positions=16), row(8.0, partial_positions=64), row(11.0, merge_warps=8),
            row(9.5, merge_v_block=32), row(1.0, merge_v_block=32, partial_positions=64), dict(row(1.0, merge_warps=2), cache=2176)]
    assert bench.combined_best(rows, 1, 640) == {"merge_v_block": 32, "partial_positions": 64}
    assert bench.combined_best(rows[1:], 1, 640) == {}  # no default row: nothing to beat
