"""The decode GEMV's dispatch, CPU numerics, tuned-config lookup and the native engine's
gemv_max_rows option, without a GPU (the kernel itself: test_gemv_gpu.py).

Dispatch is read from what torch.compile traces (a backend that records the FX graph's call
targets) and, eagerly, from a dispatch mode that records every op called."""

import json
import math
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from phasewatt.engines.native import NativeEngine
from phasewatt.errors import ConfigError
from phasewatt.models import gemv, pdl
from phasewatt.models.registry import build_model
from phasewatt.models.spec import ModelSpec

TINY = {
    "gqa": dict(arch="gqa", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=96, vocab_size=128, qk_norm=True, tied_embeddings=True),
    "mla": dict(arch="mla", n_layers=2, d_model=64, n_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12, d_ff=96, vocab_size=128),
    "gdn": dict(arch="gdn", n_layers=2, d_model=64, n_heads=2, head_dim=16, expand_v=2, conv_size=4, d_ff=96, vocab_size=128),
    "mamba2": dict(arch="mamba2", n_layers=2, d_model=64, d_state=16, head_dim=16, expand=2, n_groups=1, conv_size=4, chunk_size=8, vocab_size=128, tied_embeddings=True),
}
LAYERS = 2
# Matrix products of one decode step per layer: gqa qkv, o, gate_up, down; mla a_proj, q_b_proj,
# o, gate_up, down (kv_b_proj is absorbed); gdn in_proj, out_proj, gate_up, down; mamba2
# in_proj, out_proj. Plus one for the head.
DECODE_PRODUCTS_PER_LAYER = {"gqa": 4, "mla": 5, "gdn": 4, "mamba2": 2}
RECURRENT = ("gdn", "mamba2")
# Every product through the kernel is one of the two ops (plain, RMSNorm prologue).
GEMV_PACKETS = (torch.ops.phasewatt.gemv, torch.ops.phasewatt.gemv_rmsnorm)
GEMV_TARGETS = GEMV_PACKETS + tuple(p.default for p in GEMV_PACKETS)
GEMV_OP = torch.ops.phasewatt.gemv.default


def tiny_model(arch: str, tied: bool | None = None):
    entry = dict(TINY[arch])
    if tied is not None:
        entry["tied_embeddings"] = tied
    spec = ModelSpec.from_config(f"tiny-{arch}", entry)
    return build_model(spec, device="cpu", dtype=torch.float32, seed=5).eval().requires_grad_(False)


def decode_products(arch: str) -> int:
    return DECODE_PRODUCTS_PER_LAYER[arch] * LAYERS + 1


class OpCalls(TorchDispatchMode):
    """Records every op called eagerly inside the `with`."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, arg_types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))

    def count(self, op) -> int:
        """Calls of op; for GEMV_OP, of either of the kernel's two ops."""
        ops = GEMV_TARGETS if op is GEMV_OP else (op,)
        return sum(1 for f in self.ops if f in ops)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def traced_targets(fn, *args) -> list:
    """The call targets of the single FX graph torch.compile(fullgraph=True) traces for fn."""
    torch._dynamo.reset()
    targets = []

    def record(gm, example_inputs):
        targets.extend(node.target for node in gm.graph.nodes)
        return gm.forward

    with torch.no_grad():
        torch.compile(fn, backend=record, fullgraph=True)(*args)
    return targets


def traced_decode(model, batch: int) -> tuple[int, int]:
    """(GEMV op calls, F.linear calls) in the traced decode step at `batch`."""
    model.setup_caches(batch, 8)
    targets = traced_targets(model.decode, torch.zeros(batch, dtype=torch.long), torch.tensor([3]))
    return sum(t in GEMV_TARGETS for t in targets), sum(t is F.linear for t in targets)


# ----- dispatch in the traced decode step -------------------------------------------------------
@pytest.mark.parametrize("arch,tied", [("gqa", True), ("mla", False), ("gdn", False), ("gdn", True), ("mamba2", True), ("mamba2", False)])
def test_traced_decode_uses_the_op_only_within_max_rows(arch, tied, fresh_dynamo):
    model = tiny_model(arch, tied)
    products = decode_products(arch)
    gemv.use_gemv(model, 1)
    assert traced_decode(model, 1) == (products, 0)
    assert traced_decode(model, 2) == (0, products)  # 2 rows > max_rows: F.linear (cuBLAS)
    gemv.use_gemv(model, 0)
    assert traced_decode(model, 1) == (0, products)


@pytest.mark.parametrize("arch", RECURRENT)
def test_tied_recurrent_head_is_a_linear_sharing_the_embedding(arch, fresh_dynamo):
    """A tied head shares the embedding's storage (no second matrix) and, as every Linear,
    takes the final norm as the kernel's prologue at batch 1 (one op, no separate norm)."""
    model = tiny_model(arch, tied=True)
    assert model.lm_head.weight is model.embed.weight
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in tiny_model(arch, tied=False).parameters()) - model.embed.weight.numel()
    h = torch.randn(1, TINY[arch]["d_model"])
    gemv.use_gemv(model, 1)
    targets = traced_targets(model.logits, h)
    assert sum(t in (torch.ops.phasewatt.gemv_rmsnorm, torch.ops.phasewatt.gemv_rmsnorm.default) for t in targets) == 1
    assert gemv.fold_norm_weights(model) == FOLDS_PER_LAYER[arch] * LAYERS  # the final norm stays: the embedding reads the weight too
    gemv.use_gemv(model, 0)
    targets = traced_targets(model.logits, h)
    assert sum(t in GEMV_TARGETS for t in targets) == 0 and sum(t is F.linear for t in targets) == 1


# ----- numerics of the CPU path -----------------------------------------------------------------
def greedy_run(model, prompt: torch.Tensor, steps: int):
    """Prefill logits at every position and `steps` greedy decode steps' logits, and how many
    times the GEMV op ran."""
    with torch.no_grad(), OpCalls() as calls:
        model.setup_caches(prompt.shape[0], prompt.shape[1] + steps)
        prefill = model.prefill(prompt, all_logits=True)
        token = prefill[:, -1].argmax(-1)
        step_logits = []
        for i in range(steps):
            logits = model.decode(token, torch.tensor([prompt.shape[1] + i]))
            step_logits.append(logits)
            token = logits.argmax(-1)
    return prefill, torch.stack(step_logits, 1), calls.count(GEMV_OP)


@pytest.mark.parametrize("arch", sorted(TINY))
@pytest.mark.parametrize("batch,prompt_len", [(1, 5), (2, 9)])
def test_op_path_gives_the_same_logits(arch, batch, prompt_len):
    """(1, 5): the prefill's 5 rows go through the op too; (2, 9): only the decode steps do."""
    model = tiny_model(arch)
    prompt = torch.randint(0, TINY[arch]["vocab_size"], (batch, prompt_len), generator=torch.Generator().manual_seed(batch))
    gemv.use_gemv(model, 8)
    prefill_op, steps_op, op_calls = greedy_run(model, prompt, 4)
    gemv.use_gemv(model, 0)
    prefill_ref, steps_ref, ref_calls = greedy_run(model, prompt, 4)
    assert ref_calls == 0
    assert op_calls >= 4 * decode_products(arch)
    assert steps_ref.std() > 0.01, "logits too flat for the comparison to mean anything"
    torch.testing.assert_close(prefill_op, prefill_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(steps_op, steps_ref, rtol=0, atol=1e-6)


# ----- linear, Linear and the op ----------------------------------------------------------------
def test_linear_counts_rows_over_leading_dims_and_adds_bias():
    gen = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(*shape, generator=gen) for shape in ((2, 3, 16), (5, 16), (5,)))
    expected = F.linear(x, weight, bias)
    for max_rows, op_calls in ((6, 1), (8, 1), (5, 0), (0, 0)):  # [2, 3, K] is 6 rows
        with OpCalls() as calls:
            y = gemv.linear(x, weight, bias, gemv_max_rows=max_rows)
        assert calls.count(GEMV_OP) == op_calls, max_rows
        assert y.shape == (2, 3, 5)
        torch.testing.assert_close(y, expected, rtol=0, atol=1e-6)
    without_bias = gemv.linear(x, weight, None, gemv_max_rows=6)
    torch.testing.assert_close(without_bias, F.linear(x, weight), rtol=0, atol=1e-6)
    assert (y - without_bias - bias).abs().max() < 1e-6


def test_linear_module_with_bias_through_the_op():
    layer = gemv.Linear(16, 5, bias=True)
    assert layer.gemv_max_rows == 0
    assert gemv.use_gemv(layer, 2) == 1 and layer.gemv_max_rows == 2
    x = torch.randn(2, 16)
    with torch.no_grad(), OpCalls() as calls:
        y = layer(x)
    assert calls.count(GEMV_OP) == 1
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), rtol=0, atol=1e-6)


def test_op_schema_and_fake_shapes():
    x, weight = torch.randn(2, 3, 16), torch.randn(7, 16)
    results = torch.library.opcheck(GEMV_OP, (x, weight))
    assert set(results.values()) == {"SUCCESS"}
    with torch._subclasses.FakeTensorMode() as mode:
        y = GEMV_OP(mode.from_tensor(x), mode.from_tensor(weight))
    assert y.shape == (2, 3, 7) and y.dtype == torch.float32


# ----- use_gemv ---------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,tied,linears", [
    ("gqa", True, 4 * LAYERS + 1),  # a tied head is still a Linear (sharing the embedding)
    ("mla", False, 5 * LAYERS + 1),  # kv_b_proj is a plain nn.Linear
    ("gdn", False, 4 * LAYERS + 1),
    ("gdn", True, 4 * LAYERS + 1),
    ("mamba2", True, 2 * LAYERS + 1),
])
def test_use_gemv_sets_every_linear(arch, tied, linears):
    model = tiny_model(arch, tied)
    assert gemv.use_gemv(model, 3) == linears
    ours = [m for m in model.modules() if isinstance(m, gemv.Linear)]
    assert len(ours) == linears and all(m.gemv_max_rows == 3 for m in ours)
    plain = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and not isinstance(m, gemv.Linear)]
    assert all(not hasattr(m, "gemv_max_rows") for m in plain)
    assert gemv.use_gemv(model, gemv.MAX_ROWS) == linears
    assert gemv.use_gemv(model, 0) == linears
    assert all(m.gemv_max_rows == 0 for m in ours)


@pytest.mark.parametrize("max_rows", [-1, gemv.MAX_ROWS + 1, 100])
def test_use_gemv_rejects_rows_outside_range(max_rows):
    model = tiny_model("mamba2")
    gemv.use_gemv(model, 2)
    with pytest.raises(ValueError, match=f"0..{gemv.MAX_ROWS}"):
        gemv.use_gemv(model, max_rows)
    assert all(m.gemv_max_rows == 2 for m in model.modules() if isinstance(m, gemv.Linear))


# ----- tuned config table and the size rule -----------------------------------------------------
@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(gemv, "CONFIG_DIR", tmp_path)
    gemv.load_table.cache_clear()
    yield tmp_path
    gemv.load_table.cache_clear()


TUNED_1 = {"BLOCK_N": 8, "BLOCK_K": 256, "num_warps": 8, "num_stages": 3}
TUNED_8 = {"BLOCK_N": 2, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}


def write_table(path, configs: dict) -> None:
    path.write_text(json.dumps({"configs": configs}))


def test_table_path_names_the_gpu(config_dir):
    assert gemv.table_path("Fake GPU") == config_dir / "Fake_GPU.json"
    assert gemv.table_path("NVIDIA H100 80GB HBM3") == config_dir / "NVIDIA_H100_80GB_HBM3.json"
    assert gemv.table_path("a/b c").parent == config_dir


def test_tuned_config_is_read_per_rows_bucket(config_dir):
    write_table(gemv.table_path("Fake GPU"), {"1,4096,2560": {**TUNED_1, "us": 1.0}})
    assert gemv.config_for("Fake GPU", 1, 4096, 2560) == TUNED_1  # only CONFIG_KEYS, not the timing
    assert set(gemv.config_for("Fake GPU", 1, 4096, 2560)) == set(gemv.CONFIG_KEYS)
    assert gemv.config_key(1, 4096, 2560) != gemv.config_key(8, 4096, 2560)
    # Not tuned for 8 rows, nor for another shape, nor on another GPU: the size rule.
    assert gemv.config_for("Fake GPU", 8, 4096, 2560) == gemv.default_config(8, 4096, 2560)
    assert gemv.config_for("Fake GPU", 1, 4096, 2561) == gemv.default_config(1, 4096, 2561)
    assert gemv.config_for("Other GPU", 1, 4096, 2560) == gemv.default_config(1, 4096, 2560)
    assert gemv.default_config(1, 4096, 2560) != TUNED_1  # so the lookups above tell them apart
    assert gemv.load_table("Other GPU") == {}


def test_rows_share_the_entry_of_their_bucket(config_dir):
    write_table(gemv.table_path("Fake GPU"), {"1,4096,2560": TUNED_1, "8,4096,2560": TUNED_8})
    assert gemv.config_for("Fake GPU", 1, 4096, 2560) == TUNED_1
    for rows in range(5, 9):
        assert gemv.config_for("Fake GPU", rows, 4096, 2560) == TUNED_8
    for rows in (2, 3, 4):
        assert gemv.config_for("Fake GPU", rows, 4096, 2560) == gemv.default_config(rows, 4096, 2560)


def test_rows_bucket_is_the_next_power_of_two():
    assert [gemv.rows_bucket(r) for r in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    assert gemv.config_key(3, 10, 20) == gemv.config_key(4, 10, 20) == "4,10,20"


def is_power_of_two(v: int) -> bool:
    return v >= 1 and v & (v - 1) == 0


N_SIZES = [16, 17, 100, 1000, 1023, 1024, 2047, 2048, 2049, 4095, 4096, 5000, 16384, 32767, 32768, 65536, 151936, 200000]
K_SIZES = [1, 16, 63, 64, 65, 100, 128, 200, 511, 512, 513, 768, 2560, 9728, 20000]


def test_size_rule_tiles_k_by_at_most_512():
    for k in K_SIZES:
        block_k = gemv.default_config(1, 4096, k)["BLOCK_K"]
        assert is_power_of_two(block_k) and 64 <= block_k <= 512, k
        assert block_k <= max(64, 1 << (k - 1).bit_length()), k  # no wider than the row needs
        assert block_k >= min(k, 512), k  # a row of <= 512 is one tile


def test_size_rule_gives_enough_programs_and_bounded_rows_per_program():
    """BLOCK_N in 1..16, a power of two; at least min(N, 1024) programs; at 1 row of x, BLOCK_N
    is the largest that keeps 1024 programs (up to 16); BLOCK_N * BLOCK_M <= 16 unless BLOCK_N
    is 1; fewer rows of W per program as rows of x grow, more as N grows."""
    for rows in range(1, 9):
        bucket = gemv.rows_bucket(rows)
        for k in (64, 2560, 20000):
            previous_block_n = 1
            for n in N_SIZES:
                config = gemv.default_config(rows, n, k)
                assert set(config) == set(gemv.CONFIG_KEYS)
                block_n = config["BLOCK_N"]
                assert is_power_of_two(block_n) and block_n <= 16, (rows, n)
                assert math.ceil(n / block_n) >= min(n, 1024), (rows, n)
                assert block_n == 1 or block_n * bucket <= 16, (rows, n)
                assert block_n >= previous_block_n, (rows, n)
                assert block_n <= gemv.default_config(max(1, rows - 1), n, k)["BLOCK_N"], (rows, n)
                if rows == 1 and block_n < 16:
                    assert n // (2 * block_n) < 1024, n  # doubling would leave < 1024 programs
                assert config["num_warps"] >= 1 and config["num_stages"] >= 1
                previous_block_n = block_n


# ----- the native engine's option ---------------------------------------------------------------
def engine(batch: int = 1, **options) -> NativeEngine:
    spec = ModelSpec.from_config("tiny-gqa", TINY["gqa"])
    return NativeEngine(spec=spec, gpu=None, batch=batch, prompt_len=7, decode_tokens=5, seed=2, device="cpu", options=options)


@pytest.mark.parametrize("value", [-1, gemv.MAX_ROWS + 1, "yes", True, 1.5])
def test_engine_rejects_bad_gemv_max_rows(value):
    with pytest.raises(ConfigError, match=r"engine_options\.gemv_max_rows"):
        engine(gemv_max_rows=value)


@pytest.mark.parametrize("value", ["auto", 0, gemv.MAX_ROWS])
def test_engine_accepts_gemv_max_rows(value):
    assert engine(gemv_max_rows=value).options["gemv_max_rows"] == value


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_engine_rejects_bad_pdl(value):
    with pytest.raises(ConfigError, match=r"engine_options\.pdl: .*allowed: true, false, auto"):
        engine(pdl=value)


def test_engine_sets_the_pdl_switch_at_every_setup_and_records_it():
    """The switch is process-wide: each engine sets it before capture, so an engine with PDL off
    after one with it on (or the reverse) captures what it asked for; on CPU no launch uses it."""
    try:
        off = engine(gemv_max_rows=1, pdl=False)
        off.setup()
        assert pdl.pdl_enabled() is False
        assert off.describe()["pdl"] is False
        on = engine(gemv_max_rows=1, pdl="auto")
        on.setup()
        assert pdl.pdl_enabled() is True
        assert on.describe()["pdl"] is False  # a CPU device: no PDL launch
    finally:
        pdl.set_pdl(True)


def test_engine_auto_resolution(monkeypatch):
    """auto: 0 on CPU; on CUDA, AUTO_ROWS at batch <= AUTO_ROWS when triton imports, else 0."""
    assert engine()._gemv_max_rows() == 0
    assert engine(gemv_max_rows=3)._gemv_max_rows() == 3
    small, large = engine(batch=gemv.AUTO_ROWS), engine(batch=gemv.AUTO_ROWS + 1)
    small.on_cuda = large.on_cuda = True  # only the resolution is exercised: nothing runs on a GPU
    monkeypatch.setitem(sys.modules, "triton", types.ModuleType("triton"))
    assert small._gemv_max_rows() == gemv.AUTO_ROWS
    assert large._gemv_max_rows() == 0
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton raises ImportError
    assert small._gemv_max_rows() == 0


def run_engine(**options):
    """(describe()'s gemv_max_rows, the GEMV op calls in a 5-step decode, the last tokens)."""
    eng = engine(**options)
    eng.setup()
    with OpCalls() as calls:
        eng.decode(5)
    result = eng.describe()["gemv_max_rows"], calls.count(GEMV_OP), eng.generated_tokens(), eng.model
    eng.close()
    return result


def test_engine_option_routes_decode_through_the_op_with_the_same_tokens():
    default_rows, default_calls, default_tokens, _ = run_engine()
    assert default_rows == 0 and default_calls == 0  # CPU: auto is off
    rows, calls, tokens, model = run_engine(gemv_max_rows=1)
    assert rows == 1
    assert calls == 5 * decode_products("gqa")
    assert all(m.gemv_max_rows == 1 for m in model.modules() if isinstance(m, gemv.Linear))
    assert torch.equal(tokens, default_tokens)


@pytest.mark.parametrize("arch", ["gqa", "mla", "gdn", "mamba2"])
def test_fused_and_unfused_decode_route_through_different_ops(arch, fresh_dynamo):
    """fuse=True: norms (and SwiGLU, as the epilogue) ride on gemv_rmsnorm; fuse=False: every product
    is the plain op (the neighbours stay in the graph); same number of products either way."""
    model = tiny_model(arch)
    model.setup_caches(1, 8)
    args = (torch.zeros(1, dtype=torch.long), torch.tensor([3]))
    for fuse in (True, False):
        gemv.use_gemv(model, 1, fuse=fuse)
        targets = traced_targets(model.decode, *args)
        fused = sum(t in (torch.ops.phasewatt.gemv_rmsnorm, torch.ops.phasewatt.gemv_rmsnorm.default) for t in targets)
        assert sum(t in GEMV_TARGETS for t in targets) == decode_products(arch), fuse
        assert (fused > 0) == fuse, (fuse, fused)


def test_fused_ops_pass_opcheck_on_cpu():
    """Schemas, fake impls and CPU impls of the fused ops agree (shapes, dtypes, mutation)."""
    torch.manual_seed(0)
    x, delta, gate = torch.randn(1, 32), torch.randn(1, 32), torch.randn(1, 32)
    weight, residual = torch.randn(24, 32), torch.randn(1, 24)
    torch.library.opcheck(torch.ops.phasewatt.gemv_rmsnorm.default, (x, delta, None, torch.rand(32), 1e-6, 1.0, weight, None, 0.5))
    torch.library.opcheck(torch.ops.phasewatt.gemv_rmsnorm.default, (x, None, gate, torch.rand(32), 1e-6, 0.0, weight, residual, 1.0))
    torch.library.opcheck(torch.ops.phasewatt.gemv.default, (x, weight, residual, 2.0))
    state = torch.randn(2, 4, 8, 16)
    proj = torch.randn(2, 4 * 16 + 2 * 8 + 4)
    x_in, b, c, dt_raw = proj.split([64, 8, 8, 4], dim=-1)
    args = (state, x_in, b, c, dt_raw, torch.rand(4), torch.rand(4), torch.rand(4), 0.0, float("inf"), 4)
    torch.library.opcheck(torch.ops.phasewatt.mamba2_ssd_step.default, args)


def test_gated_norm_residual_cpu_op_matches_the_modules():
    from phasewatt.models.mamba2 import GroupedGatedRMSNorm

    torch.manual_seed(1)
    norm = GroupedGatedRMSNorm(32, 1, 1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    lin = gemv.Linear(32, 24, bias=False)
    y, z, h = torch.randn(1, 32), torch.randn(1, 32), torch.randn(1, 24)
    expected = h + lin(norm(y, z))
    gemv.use_gemv(lin, 1)
    with OpCalls() as calls:
        got = gemv.gated_norm_residual(y, z, norm, lin, h)
    assert calls.count(GEMV_OP) == 1
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_kernel_wrapper_rejects_mismatched_inputs_before_launching():
    w = torch.zeros(8, 16)
    with pytest.raises(ValueError, match="columns"):
        gemv.triton_gemv(torch.zeros(1, 15), w)
    with pytest.raises(ValueError, match="norm_weight"):
        gemv.triton_gemv(torch.zeros(1, 16), w, delta=torch.zeros(1, 16))
    with pytest.raises(ValueError, match="delta has 15"):
        gemv.triton_gemv(torch.zeros(1, 16), w, delta=torch.zeros(1, 15), norm_weight=torch.ones(16))
    with pytest.raises(ValueError, match="norm_weight has 8"):
        gemv.triton_gemv(torch.zeros(1, 16), w, norm_weight=torch.ones(8))


def test_config_schema_allows_the_rows_the_kernel_takes():
    from phasewatt.config import load_schema

    schema = load_schema()
    rows = schema["properties"]["engine_options"]["properties"]["gemv_max_rows"]["anyOf"][1]
    assert (rows["minimum"], rows["maximum"]) == (0, gemv.MAX_ROWS)


# ----- folded norm weights and the GLU epilogue ---------------------------------------------------
# Norms each layer folds (gqa: attn, mlp; mla: attn, q_a, mlp; gdn: input, post; mamba2: the
# block's norm and the gated norm), plus the final norm when the head is untied.
FOLDS_PER_LAYER = {"gqa": 2, "mla": 3, "gdn": 2, "mamba2": 2}


def randomize_norms(model) -> None:
    """Norm weights away from their init (ones, or zeros for zero-centred), so that a fold that
    dropped or doubled a scale changes the logits."""
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "weight_offset") and isinstance(getattr(module, "weight", None), torch.nn.Parameter):
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5 - module.weight_offset)


@pytest.mark.parametrize("arch,tied", [("gqa", True), ("gqa", False), ("mla", False), ("gdn", False), ("mamba2", True), ("mamba2", False)])
def test_folded_norm_weights_give_the_same_logits(arch, tied):
    """fold_norm_weights leaves the function unchanged: prefill through the modules (norm
    weights now 1) and decode through the ops (no norm weight, the scale in the matrices)."""
    import copy

    reference = tiny_model(arch, tied)
    randomize_norms(reference)
    folded = copy.deepcopy(reference)
    head = 0 if (tied if tied is not None else TINY[arch].get("tied_embeddings", False)) else 1
    assert gemv.fold_norm_weights(folded) == FOLDS_PER_LAYER[arch] * LAYERS + head
    assert gemv.fold_norm_weights(folded) == 0  # folding twice would square the scales
    for (_, before), (_, after) in zip(reference.layers[0].norm_folds(), folded.layers[0].norm_folds()):
        assert not torch.equal(before[0].weight, after[0].weight)  # the scales went into the products
    prompt = torch.randint(0, TINY[arch]["vocab_size"], (1, 6), generator=torch.Generator().manual_seed(3))
    gemv.use_gemv(reference, 1)
    gemv.use_gemv(folded, 1)
    prefill_ref, steps_ref, _ = greedy_run(reference, prompt, 4)
    prefill_folded, steps_folded, op_calls = greedy_run(folded, prompt, 4)
    assert op_calls >= 4 * decode_products(arch)
    assert steps_ref.std() > 0.01
    torch.testing.assert_close(prefill_folded, prefill_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(steps_folded, steps_ref, rtol=1e-4, atol=1e-5)


def test_mlp_takes_one_glu_product_and_one_plain_product(fresh_dynamo):
    """Through the kernel a SwiGLU MLP is two calls: gate_up with the norm prologue and the
    SiLU(gate) * up epilogue (glu=True), down with the residual add."""
    model = tiny_model("gqa")
    gemv.use_gemv(model, 1)
    model.setup_caches(1, 8)
    with torch.no_grad(), OpCalls() as calls:
        model.decode(torch.zeros(1, dtype=torch.long), torch.tensor([3]))
    norm_calls = [f for f in calls.ops if f is torch.ops.phasewatt.gemv_rmsnorm.default]
    assert len(norm_calls) == 2 * LAYERS + 1  # attn and mlp norms per layer, the head's
    assert calls.count(GEMV_OP) == decode_products("gqa")


def test_glu_op_on_cpu_matches_the_modules():
    from phasewatt.models.layers import RMSNorm, SwiGLU

    torch.manual_seed(2)
    norm, mlp = RMSNorm(32), SwiGLU(32, 48)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    h = torch.randn(1, 32)
    expected = h + 0.5 * mlp(norm(h))
    gemv.use_gemv(mlp, 1)
    with OpCalls() as calls:
        got, delta = gemv.norm_mlp_residual(h, norm, mlp, 0.5)
    assert delta is None and calls.count(GEMV_OP) == 2
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    gemv.use_gemv(mlp, 0)  # outside the kernel: (h, y), the add left to the caller
    unfused_h, y = gemv.norm_mlp_residual(h, norm, mlp, 0.5)
    torch.testing.assert_close(unfused_h + y, expected, rtol=1e-6, atol=1e-6)


def test_glu_and_folded_ops_pass_opcheck_on_cpu():
    torch.manual_seed(0)
    x, weight, residual = torch.randn(1, 32), torch.randn(48, 32), torch.randn(1, 24)
    torch.library.opcheck(torch.ops.phasewatt.gemv_rmsnorm.default, (x, None, None, torch.rand(32), 1e-6, 0.0, weight, None, 1.0, True))
    torch.library.opcheck(torch.ops.phasewatt.gemv_rmsnorm.default, (x, None, None, None, 1e-6, 0.0, weight, residual, 1.0, True))
    torch.library.opcheck(torch.ops.phasewatt.gemv_rmsnorm.default, (x, torch.randn(1, 32), None, None, 1e-6, 1.0, weight, None, 1.0))


def test_variant_names_and_the_glu_fallback_config(config_dir):
    assert gemv.variant_name(False, False, False) == "plain"
    assert gemv.variant_name(True, True, False) == "norm"
    assert gemv.variant_name(True, False, True) == "rms_glu"
    write_table(config_dir / "Fake_GPU.json", {
        "1,4096,512": {"BLOCK_N": 8, "BLOCK_K": 512, "num_warps": 4, "num_stages": 2},
        "rms_glu:1,2048,512": {"BLOCK_N": 4, "BLOCK_K": 256, "num_warps": 8, "num_stages": 1},
    })
    # tuned entry of the variant as it is; else the plain one with half the rows per program
    assert gemv.config_for("Fake GPU", 1, 2048, 512, "rms_glu")["BLOCK_N"] == 4
    assert gemv.config_for("Fake GPU", 1, 4096, 512, "rms_glu") == {"BLOCK_N": 4, "BLOCK_K": 512, "num_warps": 4, "num_stages": 2}
    assert gemv.config_for("Fake GPU", 1, 4096, 512, "rms") == {"BLOCK_N": 8, "BLOCK_K": 512, "num_warps": 4, "num_stages": 2}
    rule = gemv.default_config(1, 8192, 512)
    assert gemv.config_for("Fake GPU", 1, 8192, 512, "norm_glu")["BLOCK_N"] == max(1, rule["BLOCK_N"] // 2)


def test_glu_needs_an_even_weight():
    with pytest.raises(ValueError, match="even number of rows"):
        gemv.triton_gemv(torch.zeros(1, 16), torch.zeros(7, 16), glu=True)


def test_engine_folds_norms_only_where_the_kernel_runs():
    folded = engine(gemv_max_rows=1)
    folded.setup()
    assert folded.describe()["norms_folded"] == FOLDS_PER_LAYER["gqa"] * LAYERS  # tied head: not folded
    for options, batch in (({"gemv_max_rows": 1, "gemv_fuse": False}, 1), ({"gemv_max_rows": 1}, 2), ({}, 1)):
        other = engine(batch, **options)
        other.setup()
        assert other.describe()["norms_folded"] == 0, (options, batch)


def test_committed_tables_name_only_kernel_variants():
    """Every entry of the shipped tables is 'rows,N,K' or '<variant>:rows,N,K' of a variant the
    kernel runs, with all four block sizes (a stale variant would never be read)."""
    variants = {gemv.variant_name(norm, weight, glu) for norm in (False, True) for weight in (False, True) for glu in (False, True)}
    tables = sorted(gemv.CONFIG_DIR.glob("*.json"))
    assert tables
    for path in tables:
        for key, config in json.loads(path.read_text())["configs"].items():
            variant, _, shape = key.rpartition(":")
            assert (variant or "plain") in variants, (path.name, key)
            assert len(shape.split(",")) == 3 and set(gemv.CONFIG_KEYS) <= set(config), (path.name, key)


# ----- programmatic dependent launch -------------------------------------------------------------
def test_decode_roofline_variants_are_engine_options():
    """compile-nopdl is compile with pdl off; every variant's options are ones the engine takes."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import decode_roofline
    from phasewatt.engines.native import resolve_options

    assert decode_roofline.variant_options("compile-nopdl") == {**decode_roofline.variant_options("compile"), "pdl": False}
    for variant in decode_roofline.VARIANTS:
        resolve_options(decode_roofline.variant_options(variant))
    # @option=value suffixes: any engine option, values read as YAML, checked like the engine's
    assert decode_roofline.variant_options("compile@pdl=false") == decode_roofline.variant_options("compile-nopdl")
    assert decode_roofline.variant_options("compile+matmul@gemv_max_rows=0@compile_mode=max-autotune-no-cudagraphs") == {
        **decode_roofline.variant_options("compile"), "decode_attention": "matmul", "gemv_max_rows": 0,
        "compile_mode": "max-autotune-no-cudagraphs",
    }
    for bad in ("compile@pdl", "compile@fast=1", "compile@gemv_max_rows=99", "compile+flash@pdl=false"):
        with pytest.raises(SystemExit, match="variant"):
            decode_roofline.variant_options(bad)
    # a suffix does not hide the attention from the compare points' filter
    from phasewatt.models.spec import ModelSpec

    mla = ModelSpec.from_config("tiny-mla", decode_roofline.SMOKE_MODELS["mla"])
    for on_cuda in (True, False):
        for attention in ("matmul", "sdpa", "fused"):
            plain = decode_roofline._applies(f"compile+{attention}", mla, on_cuda)
            assert decode_roofline._applies(f"compile+{attention}@pdl=false", mla, on_cuda) == plain


def test_pdl_check_chain_reads_the_previous_output_where_wide_enough():
    """benchmarks/gemv_pdl_check.py's chain on CPU (the ops' torch path), on small shapes: the
    plan repeats the pattern over the weight copies, each product reads a prefix of the one
    before where that is wide enough, and the torch-between mode changes no value."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import gemv_pdl_check

    pattern = [("qkv", "rms", 96, 32), ("o", "residual", 32, 64), ("gate_up", "rms_glu", 160, 32), ("down", "residual", 32, 80)]
    pattern_bytes = sum(n * k * 2 for _, _, n, k in pattern)
    plan, copies = gemv_pdl_check.chain_plan(pattern, 20, 3.5 * pattern_bytes)
    assert copies == 3 and len(plan) == 20
    assert [p[-1] for p in plan[::4]] == [0, 1, 2, 0, 1] and [p[0] for p in plan[:4]] == ["qkv", "o", "gate_up", "down"]
    assert gemv_pdl_check.chain_plan(pattern, 20, 1)[1] == 2  # at least two copies
    assert gemv_pdl_check.product_bytes("rms_glu", 160, 32) == 2 * (160 * 32 + 32 + 80)
    assert gemv_pdl_check.product_bytes("residual", 32, 64) == 2 * (32 * 64 + 64 + 2 * 32)
    chain = gemv_pdl_check.Chain(pattern, 8, 1e9, device="cpu")
    direct = chain.run()
    assert [tuple(y.shape) for y in direct[:4]] == [(1, 96), (1, 32), (1, 80), (1, 32)]
    # o (K 64) reads qkv's output prefix; qkv of the next layer (K 32) reads down's output
    w_o = chain.weights[("o", 0)]
    expected_o = F.linear(direct[0][:, :64].float(), w_o.float()) + chain.residual[32].float()
    torch.testing.assert_close(direct[1].float(), expected_o, rtol=2e-2, atol=2e-2)
    chain.between = "torch"
    assert all(torch.equal(a, b) for a, b in zip(chain.run(), direct))
