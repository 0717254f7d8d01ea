"""The Triton GEMV kernel against a float32 product (needs CUDA and Triton; skipped in CI)."""

import pytest
import torch
import torch.nn.functional as F

from phasewatt.models import gemv, pdl as pdl_switch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel_err(y, ref):
    return float((y.float() - ref).norm() / ref.norm())


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("n,k", [(2560, 9728), (1056, 2560), (13842, 3072), (37, 200), (3840, 768)])
def test_kernel_matches_float32_product(rows, n, k):
    torch.manual_seed(rows * 7 + n)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    ref = F.linear(x.float(), w.float())
    y, _ = gemv.triton_gemv(x, w)
    assert y.shape == (rows, n) and y.dtype == torch.bfloat16
    assert rel_err(y, ref) < 1e-2


@pytest.mark.parametrize("config", [
    {"BLOCK_N": 1, "BLOCK_K": 1024, "num_warps": 4, "num_stages": 1},
    {"BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 8, "num_stages": 3},
    {"BLOCK_N": 4, "BLOCK_K": 512, "num_warps": 4, "num_stages": 2},
])
def test_every_output_written_for_uneven_shapes(config):
    """N not a multiple of BLOCK_N, K not a multiple of BLOCK_K: no row or tail skipped."""
    x = torch.randn(1, 1000, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(77, 1000, device="cuda", dtype=torch.bfloat16)
    y, _ = gemv.triton_gemv(x, w, config)
    assert rel_err(y, F.linear(x.float(), w.float())) < 1e-2


def test_op_in_a_compiled_function_and_a_graph():
    layer = gemv.Linear(512, 1024, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    gemv.use_gemv(layer, 1)
    x = torch.randn(1, 512, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(lambda t: torch.relu(layer(t)), fullgraph=True)
    expected = torch.relu(F.linear(x.float(), layer.weight.float()))
    assert rel_err(compiled(x), expected) < 1e-2
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = compiled(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert rel_err(out, torch.relu(F.linear(x.float(), layer.weight.float()))) < 1e-2


def _rms(x, weight, eps, offset):
    x32 = x.float()
    return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * (weight.float() + offset)


@pytest.mark.parametrize("with_delta", [False, True])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rmsnorm_prologue(with_delta, offset):
    """RMSNorm(x + delta) * (w + offset) @ W.T * scale, and the sum x + delta written out."""
    k, n = 2560, 6144
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    delta = torch.randn_like(x) if with_delta else None
    g = torch.rand(k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    y, total = torch.ops.phasewatt.gemv_rmsnorm(x, delta, None, g, 1e-6, offset, w, None, 0.5)
    s = x.float() + (delta.float() if with_delta else 0.0)
    assert rel_err(y, 0.5 * F.linear(_rms(s, g, 1e-6, offset), w.float())) < 1e-2
    if with_delta:
        assert rel_err(total, s) < 1e-2
    else:
        assert total.numel() == 0


def test_residual_epilogue():
    k, n = 9728, 2560
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn(1, n, device="cuda", dtype=torch.bfloat16) * 50
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    assert rel_err(torch.ops.phasewatt.gemv(x, w, residual, 2.0), residual.float() + 2.0 * F.linear(x.float(), w.float())) < 1e-2


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("arch", ["gqa", "mla", "gdn", "mamba2"])
def test_model_decode_through_the_kernel_matches_cublas(arch, fold):
    """A small bf16 model: 8 decode steps with every product through the kernel (fused
    prologues and epilogues; fold: norm weights folded into the products, as the engine does)
    against the same steps through F.linear: close logits."""
    from phasewatt.models.registry import build_model
    from phasewatt.models.spec import ModelSpec

    entries = {
        "gqa": dict(arch="gqa", n_layers=2, d_model=512, n_heads=8, n_kv_heads=2, head_dim=64, d_ff=1024, vocab_size=1000, qk_norm=True),
        "mla": dict(arch="mla", n_layers=2, d_model=512, n_heads=8, q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, d_ff=1024, vocab_size=1000, scale_depth=1.4, dim_model_base=256),
        "gdn": dict(arch="gdn", n_layers=2, d_model=512, n_heads=2, head_dim=64, expand_v=2, conv_size=4, d_ff=1024, vocab_size=1000),
        "mamba2": dict(arch="mamba2", n_layers=2, d_model=512, d_state=32, head_dim=32, expand=2, n_groups=1, conv_size=4, chunk_size=64, vocab_size=1000, tied_embeddings=True),
    }
    spec = ModelSpec.from_config(f"small-{arch}", entries[arch])
    logits = {}
    for rows in (0, 1):
        model = build_model(spec, device="cuda", dtype=torch.bfloat16, seed=3).eval().requires_grad_(False)
        gemv.use_gemv(model, rows)
        if rows and fold:
            assert gemv.fold_norm_weights(model) > 0
        model.setup_caches(1, 40)
        tokens = torch.randint(0, 1000, (1, 24), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
        with torch.no_grad():
            model.prefill(tokens)
            out, token = [], tokens[:, -1]
            for step in range(8):
                step_logits = model.decode(token, torch.tensor([24 + step], device="cuda"))
                out.append(step_logits.float())
                token = tokens[:, step]  # the same inputs for both runs, whatever is argmax
        logits[rows] = torch.stack(out)
    assert rel_err(logits[1], logits[0]) < 3e-2


def test_gated_norm_prologue_with_float32_input():
    """Mamba2's out_proj: RMSNorm(y * SiLU(z)) * w @ W.T + residual, y in float32."""
    k, n = 5120, 2560
    y = torch.randn(1, k, device="cuda", dtype=torch.float32)
    z = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    g = torch.rand(k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn(1, n, device="cuda", dtype=torch.bfloat16)
    out, _ = torch.ops.phasewatt.gemv_rmsnorm(y, None, z, g, 1e-5, 0.0, w, residual, 1.0)
    gated = y * F.silu(z.float())
    assert out.dtype == torch.bfloat16
    assert rel_err(out, residual.float() + F.linear(_rms(gated, g, 1e-5, 0.0), w.float())) < 1e-2


@pytest.mark.parametrize("groups,gated", [(1, False), (2, False), (1, True)])
def test_mamba2_ssd_step_kernel_matches_torch(groups, gated):
    from phasewatt.models import linear_ops

    batch, heads, n, p = 3, 8, 128, 64
    gen = torch.Generator("cuda").manual_seed(groups)
    state = torch.randn(batch, heads, n, p, device="cuda", generator=gen)
    proj = torch.randn(batch, 2 * heads * p + 2 * groups * n + heads, device="cuda", generator=gen).to(torch.bfloat16)
    z, x, b, c, dt_raw = proj.split([heads * p, heads * p, groups * n, groups * n, heads], dim=-1)
    gate = z if gated else None  # a strided column slice, as the in_proj output gives it
    dt_bias, a_log, d_skip = (torch.rand(heads, device="cuda", generator=gen) for _ in range(3))
    limit = (0.0, float("inf")) if groups == 1 else (0.01, 0.5)
    expected_state = state.clone()
    expected = linear_ops._mamba2_ssd_step_torch(expected_state, x, b, c, dt_raw, dt_bias, a_log, d_skip, limit, heads // groups, gate)
    y = linear_ops.mamba2_ssd_step(state, x, b, c, dt_raw, dt_bias, a_log, d_skip, limit, heads // groups, gate=gate)
    assert rel_err(y, expected) < 1e-5
    assert rel_err(state, expected_state) < 1e-5


def test_norm_prologue_with_strided_rows_and_delta():
    """Rows that are not packed (the last position of each prompt in prefill): delta and the
    written sum still line up with x."""
    k, n, rows = 2560, 1024, 3
    big_x = torch.randn(rows, 5, k, device="cuda", dtype=torch.bfloat16)
    big_d = torch.randn(rows, 5, k, device="cuda", dtype=torch.bfloat16)
    x, delta = big_x[:, -1], big_d[:, -1]
    g = torch.rand(k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    y, total = torch.ops.phasewatt.gemv_rmsnorm(x, delta, None, g, 1e-6, 0.0, w, None, 1.0)
    s = x.float() + delta.float()
    assert rel_err(total, s) < 1e-2
    assert rel_err(y, F.linear(_rms(s, g, 1e-6, 0.0), w.float())) < 1e-2


@pytest.mark.parametrize("variant", ["rms", "norm_glu", "rms_glu"])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("config", [None, {"BLOCK_N": 1, "BLOCK_K": 512, "num_warps": 4, "num_stages": 2},
                                    {"BLOCK_N": 8, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3}])
def test_folded_norm_and_glu_epilogue(variant, rows, config):
    """rms: RMSNorm without a weight (folded into W); *_glu: W = [gate; up] and the output
    SiLU(x W_gate^T) * (x W_up^T), N = 1000 not a multiple of BLOCK_N, K = 2500 of BLOCK_K."""
    k, n = 2500, 1000
    glu = variant.endswith("_glu")
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    g = torch.rand(k, device="cuda", dtype=torch.bfloat16) + 0.5 if variant.startswith("norm") else None
    w = torch.randn(2 * n if glu else n, k, device="cuda", dtype=torch.bfloat16) / 10
    residual = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
    y, _ = gemv.triton_gemv(x, w, config, norm_weight=g, rms=True, eps=1e-6, glu=glu, residual=residual)
    product = F.linear(_rms(x.float(), g if g is not None else torch.ones_like(x[0]), 1e-6, 0.0), w.float())
    expected = F.silu(product[:, :n]) * product[:, n:] if glu else product
    assert y.shape == (rows, n)
    assert rel_err(y, residual.float() + expected) < 1e-2


# ----- programmatic dependent launch ---------------------------------------------------------------
from _pdl_gpu import HOPPER  # noqa: E402


@pytest.fixture
def pdl_launches(monkeypatch):
    """Records the PDL arguments of every kernel launch; leaves the switch as it found it."""
    before = pdl_switch.pdl_enabled()
    seen = []
    launch_args = gemv._launch_args

    def recording(device):
        args = launch_args(device)
        seen.append(args["launch_pdl"])
        return args

    monkeypatch.setattr(gemv, "_launch_args", recording)
    yield seen
    pdl_switch.set_pdl(before)


def with_pdl(enabled: bool, fn, launches: list):
    """fn() with the switch set; checks that its launches used PDL exactly when the GPU has it."""
    pdl_switch.set_pdl(enabled)
    assert pdl_switch.pdl_active(torch.device("cuda")) == (enabled and HOPPER)
    launches.clear()
    out = fn()
    torch.cuda.synchronize()
    assert launches and set(launches) == {enabled and HOPPER}, launches
    return out


# name: (norm_weight, rms, delta, gate (x float32 as Mamba2's), glu, residual, out_scale)
PDL_VARIANTS = {
    "plain": (False, False, False, False, False, False, 1.0),
    "plain_residual": (False, False, False, False, False, True, 0.5),
    "norm": (True, False, False, False, False, False, 1.0),
    "norm_delta": (True, False, True, False, False, False, 1.0),
    "norm_gate_residual": (True, False, False, True, False, True, 1.0),
    "rms": (False, True, False, False, False, False, 1.0),
    "rms_delta_residual": (False, True, True, False, False, True, 2.0),
    "norm_glu": (True, False, False, False, True, False, 1.0),
    "rms_glu": (False, True, False, False, True, False, 1.0),
    "rms_glu_delta_residual": (False, True, True, False, True, True, 1.0),
}


@pytest.mark.parametrize("variant", sorted(PDL_VARIANTS))
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("k,config", [
    (2560, None),  # the tuned table or the size rule, as the engine runs it
    (2500, {"BLOCK_N": 4, "BLOCK_K": 512, "num_warps": 4, "num_stages": 3}),  # K not a multiple of BLOCK_K
    (300, {"BLOCK_N": 8, "BLOCK_K": 512, "num_warps": 4, "num_stages": 2}),  # K within the peeled tile
])
def test_pdl_launch_gives_the_same_bits(variant, rows, k, config, pdl_launches):
    """Every variant with PDL on (first weight tile before the wait) and off: the same float32
    operations in the same order, so the same output and written sum, bit for bit."""
    norm_weight, rms, with_delta, with_gate, glu, with_residual, out_scale = PDL_VARIANTS[variant]
    n = 1000
    gen = torch.Generator("cuda").manual_seed(rows * 31 + k)
    kw = dict(device="cuda", generator=gen)
    x = torch.randn(rows, k, dtype=torch.float32 if with_gate else torch.bfloat16, **kw)
    w = (torch.randn(2 * n if glu else n, k, **kw) / k**0.5).to(torch.bfloat16)
    kwargs = dict(
        delta=torch.randn(rows, k, **kw).to(x.dtype) if with_delta else None,
        gate=torch.randn(rows, k, **kw).to(torch.bfloat16) if with_gate else None,
        norm_weight=(torch.rand(k, **kw) + 0.5).to(torch.bfloat16) if norm_weight else None,
        rms=rms, eps=1e-6, glu=glu, out_scale=out_scale,
        residual=torch.randn(rows, n, **kw).to(torch.bfloat16) if with_residual else None,
    )
    y_off, total_off = with_pdl(False, lambda: gemv.triton_gemv(x, w, config, **kwargs), pdl_launches)
    y_on, total_on = with_pdl(True, lambda: gemv.triton_gemv(x, w, config, **kwargs), pdl_launches)
    assert torch.equal(y_on, y_off)
    assert (total_on is None) == (total_off is None) == (not with_delta)
    if with_delta:
        assert torch.equal(total_on, total_off)
    # and both are the product (a sanity check that the comparison compares something)
    h = x.float() + (kwargs["delta"].float() if with_delta else 0.0)
    if norm_weight or rms:
        h = h * F.silu(kwargs["gate"].float()) if with_gate else h
        h = _rms(h, kwargs["norm_weight"] if norm_weight else torch.ones(k, device="cuda"), 1e-6, 0.0)
    ref = out_scale * F.linear(h, w.float())
    ref = F.silu(ref[:, :n]) * ref[:, n:] if glu else ref
    ref = ref + kwargs["residual"].float() if with_residual else ref
    assert rel_err(y_on, ref) < 1e-2


def decode_like_chain(x, delta, weights, norm_weight, layers: int):
    """`layers` rounds of norm(+delta) product, an in-place torch op on its output (a kernel
    that is not ours writing the next product's input), a product with a residual, a norm +
    SiLU*up product, a down product with a residual: each product reads what the kernel just
    before it wrote."""
    w_in, w_out, w_gate_up, w_down = weights
    h = x
    for _ in range(layers):
        a, total = torch.ops.phasewatt.gemv_rmsnorm(h, delta, None, norm_weight, 1e-6, 0.0, w_in, None, 1.0)
        a.mul_(0.5).add_(h)  # torch kernels write a in place
        b = torch.ops.phasewatt.gemv(a, w_out, total, 1.0)
        c = torch.ops.phasewatt.gemv_rmsnorm(b, None, None, None, 1e-6, 0.0, w_gate_up, None, 1.0, True)[0]
        h = torch.ops.phasewatt.gemv(c, w_down, b, 0.5)
        delta = b
    return h


@pytest.mark.parametrize("pdl", [False, True])
def test_pdl_orders_reads_in_a_replayed_graph(pdl, pdl_launches):
    """A decode-like chain of dependent products with torch kernels between them, captured in a
    CUDA graph (PDL launches become programmatic edges) and replayed with new inputs: each
    replay gives what the chain gives eagerly without PDL. A product that read its input
    before the kernel before it finished would read the last replay's (or a stale) value."""
    d, d_ff, layers = 2048, 5632, 4
    gen = torch.Generator("cuda").manual_seed(7)
    kw = dict(device="cuda", dtype=torch.bfloat16)
    weights = tuple((torch.randn(rows, cols, device="cuda", generator=gen) / cols**0.5).to(torch.bfloat16)
                    for rows, cols in ((d, d), (d, d), (2 * d_ff, d), (d, d_ff)))
    norm_weight = (torch.rand(d, device="cuda", generator=gen) + 0.5).to(torch.bfloat16)
    x, delta = torch.zeros(1, d, **kw), torch.zeros(1, d, **kw)
    chain = lambda: decode_like_chain(x, delta, weights, norm_weight, layers)  # noqa: E731

    pdl_switch.set_pdl(pdl)
    chain()  # compile the kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    pdl_launches.clear()
    with torch.cuda.graph(graph):
        out = chain()
    assert pdl_launches and set(pdl_launches) == {pdl and HOPPER}
    for replay in range(5):
        x.copy_(torch.randn(1, d, device="cuda", generator=gen))
        delta.copy_(torch.randn(1, d, device="cuda", generator=gen))
        graph.replay()
        got = out.clone()
        expected = with_pdl(False, chain, pdl_launches)
        assert torch.equal(got, expected), replay
        assert expected.float().std() > 0.1
