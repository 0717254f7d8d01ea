"""The chunked and one-step forms of the linear-attention recurrences against the literal
token-by-token definitions (written out here in float64), on random inputs."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from phasewatt.models import linear_ops as ops
from phasewatt.models.registry import build_model
from phasewatt.models.spec import ModelSpec


def random_inputs(seed: int, batch=2, length=150, heads=3, kdim=16, vdim=24):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, length, heads, kdim, generator=gen)
    k = ops.l2_normalize(torch.randn(batch, length, heads, kdim, generator=gen))
    v = torch.randn(batch, length, heads, vdim, generator=gen)
    g = -2.0 * torch.rand(batch, length, heads, generator=gen)
    beta = torch.rand(batch, length, heads, generator=gen)
    state = torch.randn(batch, heads, kdim, vdim, generator=gen)
    return q, k, v, g, beta, state


def literal_gated_delta(q, k, v, g, beta, scale, state):
    """S <- exp(g) S; S <- S + k (beta (v - S^T k))^T; o = scale S^T q, one token at a time."""
    q, k, v, g, beta, s = (t.double() for t in (q, k, v, g, beta, state))
    outs = []
    for t in range(q.shape[1]):
        s = s * g[:, t, :, None, None].exp()
        predicted = torch.einsum("bhk,bhkv->bhv", k[:, t], s)
        correction = beta[:, t, :, None] * (v[:, t] - predicted)
        s = s + torch.einsum("bhk,bhv->bhkv", k[:, t], correction)
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], s))
    return torch.stack(outs, 1), s


def literal_simple_gla(q, k, v, g, scale, state):
    """S <- exp(g) S + k v^T; o = scale S^T q, one token at a time."""
    q, k, v, g, s = (t.double() for t in (q, k, v, g, state))
    outs = []
    for t in range(q.shape[1]):
        s = s * g[:, t, :, None, None].exp() + torch.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], s))
    return torch.stack(outs, 1), s


def close(actual, expected, atol=2e-5):
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=1e-5)


@pytest.mark.parametrize("length", [150, 64, 5], ids=["partial-last-chunk", "one-chunk", "shorter-than-chunk"])
def test_chunked_gated_delta_rule_matches_definition(length):
    q, k, v, g, beta, state = random_inputs(0, length=length)
    expected_out, expected_state = literal_gated_delta(q, k, v, g, beta, 0.25, state)
    out, final = ops.chunk_gated_delta_rule_torch(q, k, v, g, beta, 0.25, initial_state=state, chunk_size=64)
    assert out.shape == v.shape and final.dtype == torch.float32
    close(out, expected_out)
    close(final, expected_state)


def test_recurrent_gated_delta_rule_matches_definition():
    q, k, v, g, beta, state = random_inputs(1, length=20)
    expected_out, expected_state = literal_gated_delta(q, k, v, g, beta, 0.25, state)
    out, final = ops.recurrent_gated_delta_rule_torch(q, k, v, g, beta, 0.25, initial_state=state)
    close(out, expected_out)
    close(final, expected_state)


def test_gated_delta_step_updates_state_in_place():
    q, k, v, g, beta, state = random_inputs(2, length=1)
    expected_out, expected_state = literal_gated_delta(q, k, v, g, beta, 0.25, state)
    buffer = state.clone()
    address = buffer.data_ptr()
    out = ops.gated_delta_step(buffer, q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], 0.25)
    assert buffer.data_ptr() == address
    close(out, expected_out[:, 0])
    close(buffer, expected_state)


@pytest.mark.parametrize("length,chunk", [(100, 32), (7, 32), (96, 32)], ids=["partial", "short", "exact"])
def test_chunked_simple_gla_matches_definition(length, chunk):
    q, k, v, g, _, state = random_inputs(3, length=length)
    expected_out, expected_state = literal_simple_gla(q, k, v, g, 0.5, state)
    out, final = ops.chunk_simple_gla_torch(q, k, v, g, 0.5, initial_state=state, chunk_size=chunk)
    close(out, expected_out, atol=1e-4)
    close(final, expected_state, atol=1e-4)
    out, final = ops.recurrent_simple_gla_torch(q, k, v, g, 0.5, initial_state=state)
    close(out, expected_out, atol=1e-4)
    close(final, expected_state, atol=1e-4)


def test_prefill_from_zero_state_normalises_q_and_k():
    """The dispatch's CPU path: q and k are L2-normalised here, as fla does in its kernel."""
    q, k, v, g, beta, _ = random_inputs(4, length=70)
    raw_q, raw_k = 3.0 * q, 5.0 * k
    expected_out, expected_state = literal_gated_delta(
        ops.l2_normalize(raw_q), ops.l2_normalize(raw_k), v, g, beta, 0.25, torch.zeros(2, 3, 16, 24)
    )
    out, final = ops.gated_delta_rule_prefill(raw_q, raw_k, v, g, beta, 0.25)
    close(out, expected_out)
    close(final, expected_state)


def test_causal_conv_prompt_then_steps_equals_whole_prompt():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 12, 7, generator=gen)
    weight, bias = torch.randn(7, 4, generator=gen), torch.randn(7, generator=gen)
    whole, _ = ops.causal_conv1d(x, weight, bias)
    expected = torch.stack(
        [(torch.nn.functional.pad(x, (0, 0, 3, 0))[:, t : t + 4].transpose(1, 2) * weight).sum(-1) + bias
         for t in range(12)], dim=1,
    )
    torch.testing.assert_close(whole, expected)

    head, state = ops.causal_conv1d(x[:, :2], weight, bias)  # shorter than the window
    assert torch.equal(state[:, :, 0], torch.zeros(2, 7)) and torch.equal(state[:, :, 1:], x[:, :2].transpose(1, 2))
    steps = [ops.causal_conv1d_step(x[:, t], state, weight, bias) for t in range(2, 12)]
    torch.testing.assert_close(torch.cat([head, torch.stack(steps, 1)], 1), whole)
    torch.testing.assert_close(state, x[:, -3:].transpose(1, 2))


def test_causal_conv_in_bf16_rounds_once_as_the_conv_kernel():
    """The shifted-product form sums in float32 and rounds once: it equals a float32 depthwise
    conv1d of the same bf16 inputs, rounded to bf16 (what cuDNN's kernel returns)."""
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 40, 24, generator=gen).to(torch.bfloat16)
    weight = torch.randn(24, 4, generator=gen).to(torch.bfloat16)
    bias = torch.randn(24, generator=gen).to(torch.bfloat16)
    out, state = ops.causal_conv1d(x, weight, bias)
    padded = torch.nn.functional.pad(x.float().transpose(1, 2), (3, 0))
    conv = torch.nn.functional.conv1d(padded, weight.float().unsqueeze(1), bias.float(), groups=24)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    torch.testing.assert_close(out, conv.transpose(1, 2).to(torch.bfloat16), rtol=0, atol=0)
    assert torch.equal(state, x[:, -3:].transpose(1, 2))


def test_mamba2_ssd_step_gate_multiplies_by_silu_of_z():
    """The decode step's gate (Mamba2's gated norm, moved into the SSD step): y * SiLU(z), state
    updated the same; also through the op's CPU form."""
    gen = torch.Generator().manual_seed(7)
    heads, n, p, groups = 4, 8, 16, 2
    state = torch.randn(2, heads, n, p, generator=gen)
    x, z = torch.randn(2, heads * p, generator=gen), torch.randn(2, heads * p, generator=gen)
    b, c = torch.randn(2, groups * n, generator=gen), torch.randn(2, groups * n, generator=gen)
    dt_raw = torch.randn(2, heads, generator=gen)
    dt_bias, a_log, d_skip = torch.rand(heads, generator=gen), torch.rand(heads, generator=gen), torch.rand(heads, generator=gen)
    args = (x, b, c, dt_raw, dt_bias, a_log, d_skip, (0.0, float("inf")), heads // groups)
    plain_state, gated_state = state.clone(), state.clone()
    plain = ops.mamba2_ssd_step(plain_state, *args)
    gated = ops.mamba2_ssd_step(gated_state, *args, gate=z)
    torch.testing.assert_close(gated, plain * torch.nn.functional.silu(z))
    assert torch.equal(gated_state, plain_state)
    op_state = state.clone()
    through_op = torch.ops.phasewatt.mamba2_ssd_step(op_state, x, b, c, dt_raw, dt_bias, a_log, d_skip, 0.0, float("inf"), heads // groups, z)
    torch.testing.assert_close(through_op, gated)
    torch.library.opcheck(
        torch.ops.phasewatt.mamba2_ssd_step.default,
        (state.clone(), x, b, c, dt_raw, dt_bias, a_log, d_skip, 0.0, float("inf"), heads // groups, z),
    )


def test_backend_choice_is_checked():
    q, k, v, g, beta, _ = random_inputs(6, length=4)
    with pytest.raises(ValueError, match="backend 'fla' needs CUDA tensors"):
        ops.gated_delta_rule_prefill(q, k, v, g, beta, 0.25, backend="fla")
    with pytest.raises(ValueError, match="backend 'triton'; allowed: auto, torch, fla"):
        ops.simple_gla_prefill(q, k, v, g, 1.0, 16, backend="triton")


def test_cpu_path_never_imports_fla_or_triton():
    code = (
        "import sys, torch\n"
        "from phasewatt.models import linear_ops as ops\n"
        "q = torch.randn(1, 9, 2, 4); g = -torch.rand(1, 9, 2)\n"
        "ops.gated_delta_rule_prefill(q, q, q, g, g.neg(), 0.5)\n"
        "ops.simple_gla_prefill(q, q, q, g, 1.0, 4)\n"
        "ops.causal_conv1d_step_silu(q[0, 0], torch.zeros(2, 4, 3), torch.ones(4, 4), None)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('fla', 'triton')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_repeat_heads_serves_consecutive_heads():
    x = torch.arange(12.0).reshape(1, 2, 3, 2)  # [B, T, G=3, D]
    repeated = ops.repeat_heads(x, 2)
    assert repeated.shape == (1, 2, 6, 2)
    assert torch.equal(repeated, x.repeat_interleave(2, dim=-2))


CONV_STEP_OP = torch.ops.phasewatt.causal_conv1d_step_silu.default


def conv_step_inputs(seed: int, batch=3, channels=10, width=4, bias=True):
    """x as a column slice of a wider projection (row stride != channels), as the models pass it."""
    gen = torch.Generator().manual_seed(seed)
    proj = torch.randn(batch, channels + 9, generator=gen)
    state = torch.randn(batch, channels, width - 1, generator=gen)
    weight = torch.randn(channels, width, generator=gen)
    return proj[:, 5 : 5 + channels], state, weight, torch.randn(channels, generator=gen) if bias else None


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_conv_step_silu_op_on_cpu_is_the_torch_form(bias):
    x, state, weight, b = conv_step_inputs(7, bias=bias)
    assert x.stride(0) != x.shape[1]
    expected_state = state.clone()
    expected = F.silu(ops.causal_conv1d_step(x, expected_state, weight, b))
    address = state.data_ptr()
    out = ops.causal_conv1d_step_silu(x, state, weight, b)
    assert out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
    assert torch.equal(out, expected)
    assert state.data_ptr() == address and torch.equal(state, expected_state)
    assert not torch.equal(state, conv_step_inputs(7, bias=bias)[1])  # it did shift


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_conv_step_silu_op_passes_opcheck(bias):
    """Schema (conv_state mutated), fake impl and CPU impl agree, also under dynamic shapes."""
    torch.library.opcheck(CONV_STEP_OP, conv_step_inputs(8, bias=bias))


@pytest.mark.parametrize("bad", ["state-channels", "state-batch", "width", "bias", "x-rank"])
def test_conv_step_silu_refuses_misfit_shapes(bad):
    x, state, weight, bias = conv_step_inputs(9)
    if bad == "state-channels":
        state = state[:, :-1]
    elif bad == "state-batch":
        state = state[:-1]
    elif bad == "width":
        weight = torch.randn(10, 5)
    elif bad == "bias":
        bias = bias[:-1]
    else:
        x = x.unsqueeze(1)
    before = state.clone()
    with pytest.raises(ValueError, match=r"^causal_conv1d_step_silu: x \(.*\), conv_state \(.*\), weight \(.*\), bias "):
        ops.causal_conv1d_step_silu(x, state, weight, bias)
    assert torch.equal(state, before)


def test_triton_launcher_refuses_a_state_whose_rows_are_not_contiguous():
    """Checked before triton is imported or anything is launched (so this runs without triton)."""
    x, state, weight, bias = conv_step_inputs(10)
    channel_major = state.transpose(1, 2).contiguous().transpose(1, 2)  # [B, C, W-1] with strides (.., 1, C)
    with pytest.raises(ValueError, match=r"conv_state strides \(30, 1, 10\); needed rows of contiguous"):
        ops.triton_conv_step_silu(x, channel_major, weight, bias)


class OpCounter(TorchDispatchMode):
    """Counts the calls of one op made eagerly inside the `with`."""

    def __init__(self, op):
        super().__init__()
        self.op, self.calls = op, 0

    def __torch_dispatch__(self, func, arg_types, args=(), kwargs=None):
        self.calls += func is self.op
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("arch", ["mamba2", "gdn"])
def test_recurrent_decode_runs_one_conv_step_op_per_layer(arch):
    """The models' decode goes through the fused op (the Triton kernel on CUDA), once a layer."""
    shapes = dict(n_layers=3, d_model=32, head_dim=8, conv_size=4, vocab_size=50, d_ff=48)
    if arch == "mamba2":
        shapes.update(d_state=8, expand=2, n_groups=1, chunk_size=8)
    else:
        shapes.update(n_heads=2, expand_v=2)
    spec = ModelSpec.from_config(f"tiny-{arch}", dict(arch=arch, **shapes))
    model = build_model(spec, device="cpu", dtype=torch.float32, seed=3)
    model.setup_caches(2, 8)
    model.prefill(torch.tensor([[1, 2, 3], [4, 5, 6]]))
    with OpCounter(CONV_STEP_OP) as counter:
        model.decode(torch.tensor([7, 8]), torch.tensor([3]))
    assert counter.calls == 3


def test_fla_gets_packed_tensors_from_strided_and_broadcast_views(monkeypatch):
    """The dispatch packs q/k/v/g (and beta) before calling fla, inside the compiled prefill:
    fla's wrappers would otherwise copy the column slices and head-broadcast views Mamba2 and
    GDN make, in slow eager kernels (a third of Mamba2's prefill). fla itself is replaced by a
    recorder: this runs on CPU without it."""
    seen = {}

    def recorder(name):
        def fake(*tensors_and_scale):
            seen[name] = [t for t in tensors_and_scale if isinstance(t, torch.Tensor)]
            q, v = seen[name][0], seen[name][2]
            return torch.zeros(*q.shape[:-1], v.shape[-1]), torch.zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[-1])
        return fake

    monkeypatch.setattr(ops, "_use_fla", lambda x, backend: True)
    monkeypatch.setattr(ops, "_fla_simple_gla", recorder("simple_gla"))
    monkeypatch.setattr(ops, "_fla_gated_delta_rule", recorder("gated_delta_rule"))
    proj = torch.randn(2, 9, 3 * 64 + 16 + 3)
    cols = proj[..., :64].unflatten(-1, (4, 16))                                    # a column slice
    shared = proj[..., 64:80].unflatten(-1, (1, 16)).expand(2, 9, 4, 16)            # B/C over 4 heads
    gate = proj[..., -3:-2].expand(2, 9, 4)
    ops.simple_gla_prefill(shared, shared, cols, gate, 1.0, 16)
    ops.gated_delta_rule_prefill(cols, cols, cols, gate, gate, 0.25)
    for name in ("simple_gla", "gated_delta_rule"):
        assert all(t.is_contiguous() for t in seen[name]), name
    assert not shared.is_contiguous() and not cols.is_contiguous() and not gate.is_contiguous()
