"""The recurrences of the linear-attention models (Gated DeltaNet, Mamba2's SSD) and their
short causal convolutions, in three forms:

- chunked, pure torch: the prefill path on CPU and the reference the GPU path is checked
  against. Within a chunk everything is matrix products; only the state is carried from one
  chunk to the next, so the Python loop runs T / chunk_size times.
- one step, pure torch, updating a fixed-shape state buffer in place: the decode path, free of
  host syncs and data-dependent shapes so that a CUDA graph can capture it. On CUDA, Mamba2's
  SSD step and the conv step + SiLU run as Triton kernels of this module instead, each wrapped
  in a custom op so that torch.compile and CUDA graphs take it whole.
- fla-core's Triton kernels: Gated DeltaNet's prefill path on CUDA, and Mamba2's with its
  prefill backend 'fla' (its default on CUDA is models/ssd_prefill.py, which shares B and C
  across a group's heads). fla is imported only when the tensors are on a CUDA device, so the
  CPU path never touches triton.

Layouts follow fla: q, k [B, T, H, K], v [B, T, H, V], per-head gates g, beta [B, T, H];
the state of one sequence and head is a [K, V] matrix kept in float32, and a token reads it as
o = scale * q^T S. Mamba2's SSD is the special case without the delta correction
(fla's simple GLA): q = C, k = B, v = x * dt, g = dt * A, scale 1.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from phasewatt.models import pdl

GDN_CHUNK_SIZE = 64
L2_NORM_EPS = 1e-6
BACKENDS = ("auto", "torch", "fla")


def l2_normalize(x: torch.Tensor, eps: float = L2_NORM_EPS) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim, in float32 (what fla's in-kernel
    q/k normalisation computes)."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def repeat_heads(x: torch.Tensor, times: int) -> torch.Tensor:
    """[..., G, D] -> [..., G * times, D], each of the G heads serving `times` consecutive
    heads (grouped heads). An expand and a copy: no host sync, capturable in a CUDA graph."""
    if times == 1:
        return x
    return x.unsqueeze(-2).expand(*x.shape[:-1], times, x.shape[-1]).flatten(-3, -2)


# ----- short causal convolution ---------------------------------------------------------------
def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """Depthwise causal convolution over a whole prompt.

    x [B, T, C], weight [C, W]. Returns the output [B, T, C] (no activation, x's dtype) and the
    conv state [B, C, W-1]: the last W-1 inputs, zero where the prompt is shorter than that.
    A sum of W shifted products in float32 in x's own layout, rounded once as a conv kernel
    would: compiled, it is one elementwise kernel with what follows it, where the depthwise
    conv1d took cuDNN's generic kernel and transposes around it (~1/6 of Mamba2's prefill).
    """
    length, width = x.shape[1], weight.shape[-1]
    padded = F.pad(x, (0, 0, width - 1, 0))
    weight32 = weight.float()
    out = padded[:, :length].float() * weight32[:, 0]
    for tap in range(1, width):
        out = out + padded[:, tap : tap + length].float() * weight32[:, tap]
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype), conv_window(x, width)


def conv_window(x: torch.Tensor, width: int) -> torch.Tensor:
    """The conv state a prompt x [B, T, C] leaves: its last W-1 inputs [B, C, W-1], zero where
    the prompt is shorter than that."""
    tail = x[:, max(0, x.shape[1] - (width - 1)) :]
    return F.pad(tail, (0, 0, width - 1 - tail.shape[1], 0)).transpose(1, 2)


def causal_conv1d_step(
    x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """One token of the causal convolution: x [B, C]; conv_state [B, C, W-1] is shifted in place."""
    window = torch.cat([conv_state, x.unsqueeze(-1)], dim=-1)
    out = (window * weight).sum(-1)
    if bias is not None:
        out = out + bias
    conv_state.copy_(window[:, :, 1:])
    return out


CONV_STEP_BLOCK_C = 128  # channels per program: at B = 1, C = 5376 still 42 programs to spread over the SMs


def causal_conv1d_step_silu(
    x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """SiLU(one token of the causal convolution): x [B, C] (rows may be strided, e.g. a column
    slice of the input projection); conv_state [B, C, W-1] is shifted in place; weight [C, W];
    bias [C] or None. Returns a fresh [B, C] in x's dtype. On CUDA one Triton kernel (inductor
    made about five kernels of the torch form: cat, sum, two copies for the shift, the SiLU);
    elsewhere the torch form."""
    return torch.ops.phasewatt.causal_conv1d_step_silu(x, conv_state, weight, bias)


def _check_conv_step_shapes(x, conv_state, weight, bias) -> None:
    """One line naming every tensor's shape when they do not fit together."""
    fits = x.dim() == 2 and conv_state.dim() == 3 and weight.dim() == 2
    if fits:
        batch, channels = x.shape
        fits = (
            tuple(conv_state.shape) == (batch, channels, weight.shape[1] - 1)
            and weight.shape[0] == channels
            and (bias is None or tuple(bias.shape) == (channels,))
        )
    if not fits:
        got = f"x {tuple(x.shape)}, conv_state {tuple(conv_state.shape)}, weight {tuple(weight.shape)}, bias " + (
            "None" if bias is None else str(tuple(bias.shape))
        )
        raise ValueError(
            f"causal_conv1d_step_silu: {got} do not fit; needed x [B, C], conv_state [B, C, W-1], weight [C, W], bias [C] or None"
        )


@torch.library.custom_op("phasewatt::causal_conv1d_step_silu", mutates_args=("conv_state",))
def _causal_conv1d_step_silu_op(
    x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    if x.is_cuda:
        return triton_conv_step_silu(x, conv_state, weight, bias)
    _check_conv_step_shapes(x, conv_state, weight, bias)
    return F.silu(causal_conv1d_step(x, conv_state, weight, bias)).to(x.dtype)


@_causal_conv1d_step_silu_op.register_fake
def _(x, conv_state, weight, bias):
    _check_conv_step_shapes(x, conv_state, weight, bias)
    return x.new_empty(x.shape)


def triton_conv_step_silu(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """causal_conv1d_step_silu through the Triton kernel, on any device Triton runs on (CUDA;
    CPU tensors under TRITON_INTERPRET=1). conv_state's rows must be contiguous [C, W-1]: the
    kernel addresses a channel's window as W-1 consecutive elements."""
    _check_conv_step_shapes(x, conv_state, weight, bias)
    batch, channels = x.shape
    width = weight.shape[1]
    if (width > 2 and conv_state.stride(2) != 1) or (width > 1 and channels > 1 and conv_state.stride(1) != width - 1):
        raise ValueError(
            f"causal_conv1d_step_silu: conv_state strides {tuple(conv_state.stride())}; needed rows of contiguous "
            f"[C, W-1] = [{channels}, {width - 1}] (strides (any, {width - 1}, 1))"
        )
    out = torch.empty(batch, channels, device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out
    _conv_step_kernel()[(batch, -(-channels // CONV_STEP_BLOCK_C))](
        x, conv_state, weight, weight if bias is None else bias, out,
        channels, x.stride(0), x.stride(1), conv_state.stride(0), weight.stride(0), weight.stride(1), out.stride(0),
        WIDTH=width, W_PAD=1 << (width - 1).bit_length(), BLOCK_C=CONV_STEP_BLOCK_C, HAS_BIAS=bias is not None,
        num_warps=4, **pdl.launch_args(x.device),
    )
    return out


@functools.lru_cache(maxsize=1)
def _conv_step_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def conv_step_kernel(
        x_ptr, state_ptr, weight_ptr, bias_ptr, out_ptr,
        channels, stride_x, stride_x_c, stride_state, stride_w, stride_w_tap, stride_out,
        WIDTH: tl.constexpr, W_PAD: tl.constexpr, BLOCK_C: tl.constexpr, HAS_BIAS: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        if USE_PDL:  # launched with PDL (models/pdl.py): wait for the previous kernel first
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        # Window column j < WIDTH-1 is state column j, column WIDTH-1 is x; the new state
        # column j is window column j+1, so the window is stored one column to the left.
        seq = tl.program_id(0)
        rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        rw = tl.arange(0, W_PAD)
        in_c = rc[:, None] < channels
        s_ptrs = state_ptr + seq * stride_state + rc[:, None] * (WIDTH - 1) + rw[None, :]
        old = tl.load(s_ptrs, mask=in_c & (rw[None, :] < WIDTH - 1), other=0.0).to(tl.float32)
        x = tl.load(x_ptr + seq * stride_x + rc * stride_x_c, mask=rc < channels, other=0.0).to(tl.float32)
        w_ptrs = weight_ptr + rc[:, None] * stride_w + rw[None, :] * stride_w_tap
        w = tl.load(w_ptrs, mask=in_c & (rw[None, :] < WIDTH), other=0.0)
        window = tl.where(rw[None, :] == WIDTH - 1, x[:, None], old)
        conv = tl.sum(window * w.to(tl.float32), axis=1)
        if HAS_BIAS:
            conv += tl.load(bias_ptr + rc, mask=rc < channels, other=0.0).to(tl.float32)
        # Threads store state elements other threads of this program loaded: all loads first.
        tl.debug_barrier()
        shift_mask = in_c & (rw[None, :] >= 1) & (rw[None, :] < WIDTH)
        tl.store(s_ptrs - 1, window.to(state_ptr.dtype.element_ty), mask=shift_mask)
        out = conv * tl.sigmoid(conv)
        tl.store(out_ptr + seq * stride_out + rc, out.to(out_ptr.dtype.element_ty), mask=rc < channels)

    return conv_step_kernel


# ----- helpers of the chunked forms ---------------------------------------------------------
def _to_chunks(x: torch.Tensor, pad: int, chunk_size: int) -> torch.Tensor:
    """[B, T, H, ...] -> float32 [B, H, N, chunk_size, ...], zero-padded at the end of T."""
    x = x.float().movedim(1, 2)
    if pad:
        x = F.pad(x, (0, 0) * (x.dim() - 3) + (0, pad))
    return x.reshape(x.shape[0], x.shape[1], -1, chunk_size, *x.shape[3:])


def _chunk_decays(g: torch.Tensor):
    """From per-token log decays g [B, H, N, C]: the cumulative decay inside each chunk G,
    the causal pair decays exp(G_i - G_j) for j <= i (0 above the diagonal),
    exp(G_i) (state at chunk start -> position i), exp(G_last - G_j) (position j -> chunk end)
    and exp(G_last) (whole chunk)."""
    cum = g.cumsum(-1)
    size = g.shape[-1]
    causal = torch.ones(size, size, dtype=torch.bool, device=g.device).tril()
    pair = (cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill(~causal, float("-inf")).exp()
    last = cum[..., -1:]
    return pair, cum.exp(), (last - cum).exp(), last.exp()


def _from_chunks(o: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, H, N, C, V] -> [B, T, H, V] without the padding."""
    o = o.reshape(o.shape[0], o.shape[1], -1, o.shape[-1])[:, :, :length]
    return o.movedim(1, 2).to(dtype)


def _initial_state(initial_state, shape, device) -> torch.Tensor:
    if initial_state is None:
        return torch.zeros(shape, dtype=torch.float32, device=device)
    return initial_state.float().clone()


# ----- gated delta rule -------------------------------------------------------------------------
def chunk_gated_delta_rule_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = GDN_CHUNK_SIZE,
):
    """Gated delta rule over a sequence, chunk by chunk (the WY/UT form).

    Per token: S <- exp(g) S; S <- S + k (beta (v - S^T k))^T; o = scale * S^T q.
    Inside a chunk, the corrections u_i = beta_i (v_i - (decayed S before i)^T k_i) solve a unit
    lower-triangular system (I + A) u = beta v - beta exp(G) k S0 with
    A_ij = beta_i exp(G_i - G_j) k_i.k_j (j < i); the state is carried across chunks only.
    q and k are used as given (normalise them first). Returns o [B, T, H, V] in v's dtype and
    the final state [B, H, K, V] in float32. Padded tail positions have g = beta = 0 and so
    leave the state untouched.
    """
    batch, length, heads, kdim = k.shape
    vdim = v.shape[-1]
    pad = (-length) % chunk_size
    qc, kc, vc = (_to_chunks(t, pad, chunk_size) for t in (q, k, v))
    gc, bc = (_to_chunks(t, pad, chunk_size) for t in (g, beta))
    pair, decay_in, decay_to_end, decay_chunk = _chunk_decays(gc)

    k_beta = kc * bc.unsqueeze(-1)
    a_strict = ((k_beta @ kc.transpose(-1, -2)) * pair).tril(-1)
    # (I + A) [u0 | w] = [beta v | beta exp(G) k]; the unit diagonal is implied.
    rhs = torch.cat([vc * bc.unsqueeze(-1), k_beta * decay_in.unsqueeze(-1)], dim=-1)
    solved = torch.linalg.solve_triangular(a_strict, rhs, upper=False, unitriangular=True)
    u0, w = solved.split([vdim, kdim], dim=-1)
    scores = ((qc * scale) @ kc.transpose(-1, -2)) * pair
    q_from_start = qc * (scale * decay_in.unsqueeze(-1))
    k_to_end = (kc * decay_to_end.unsqueeze(-1)).transpose(-1, -2)

    state = _initial_state(initial_state, (batch, heads, kdim, vdim), q.device)
    out = torch.empty_like(u0)
    for n in range(qc.shape[2]):
        u = u0[:, :, n] - w[:, :, n] @ state
        out[:, :, n] = q_from_start[:, :, n] @ state + scores[:, :, n] @ u
        state = state * decay_chunk[:, :, n].unsqueeze(-1) + k_to_end[:, :, n] @ u
    return _from_chunks(out, length, v.dtype), state


def gated_delta_step(
    state: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One token of the gated delta rule; state [B, H, K, V] (float32) is updated in place.

    q, k [B, H, K], v [B, H, V], g, beta [B, H]. Returns o [B, H, V] in float32. Both reads of
    the old state (k for the prediction, q for the output) are one batched product and the
    output is rebuilt from it; the update is two pointwise in-place ops (no outer product is
    materialised). Eager that reads the state 3 times and writes it twice; under torch.compile
    the two pointwise ops fuse into one read and one write.
    """
    qs, kf = q.float() * scale, k.float()
    read = torch.stack([qs, kf], dim=2) @ state  # [B, H, 2, V]
    decay = g.float().exp().unsqueeze(-1)
    delta = beta.float().unsqueeze(-1) * (v.float() - decay * read[:, :, 1])
    out = decay * read[:, :, 0] + (qs * kf).sum(-1, keepdim=True) * delta
    state.mul_(decay.unsqueeze(-1)).addcmul_(kf.unsqueeze(-1), delta.unsqueeze(-2))
    return out


def recurrent_gated_delta_rule_torch(q, k, v, g, beta, scale: float, initial_state=None):
    """Token-by-token gated delta rule (the naive form the chunked one is tested against)."""
    batch, length, heads, kdim = k.shape
    state = _initial_state(initial_state, (batch, heads, kdim, v.shape[-1]), q.device)
    outs = [
        gated_delta_step(state, q[:, t], k[:, t], v[:, t], g[:, t], beta[:, t], scale)
        for t in range(length)
    ]
    return torch.stack(outs, dim=1).to(v.dtype), state


# ----- simple GLA (Mamba2's SSD) -----------------------------------------------------------
def chunk_simple_gla_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    scale: float,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
):
    """Linear attention with a scalar per-head decay, chunk by chunk.

    Per token: S <- exp(g) S + k v^T; o = scale * S^T q. Intra-chunk outputs are one masked
    product for all chunks at once; the loop only carries the state to each chunk's start.
    Returns o [B, T, H, V] in v's dtype and the final state [B, H, K, V] in float32.
    """
    batch, length, heads, kdim = k.shape
    pad = (-length) % chunk_size
    qc, kc, vc = (_to_chunks(t, pad, chunk_size) for t in (q, k, v))
    pair, decay_in, decay_to_end, decay_chunk = _chunk_decays(_to_chunks(g, pad, chunk_size))
    out = (((qc * scale) @ kc.transpose(-1, -2)) * pair) @ vc
    chunk_states = (kc * decay_to_end.unsqueeze(-1)).transpose(-1, -2) @ vc  # [B, H, N, K, V]

    state = _initial_state(initial_state, (batch, heads, kdim, vc.shape[-1]), q.device)
    starts = []
    for n in range(qc.shape[2]):
        starts.append(state)
        state = state * decay_chunk[:, :, n].unsqueeze(-1) + chunk_states[:, :, n]
    out = out + (qc * (scale * decay_in.unsqueeze(-1))) @ torch.stack(starts, dim=2)
    return _from_chunks(out, length, v.dtype), state


def simple_gla_step(
    state: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float
) -> torch.Tensor:
    """One token of the scalar-decay recurrence; state [B, H, K, V] (float32) updated in place.
    q, k [B, H, K], v [B, H, V], g [B, H]. Returns o [B, H, V] in float32."""
    qs, kf, vf = q.float() * scale, k.float(), v.float()
    decay = g.float().exp().unsqueeze(-1)
    read = (qs.unsqueeze(2) @ state).squeeze(2)
    out = decay * read + (qs * kf).sum(-1, keepdim=True) * vf
    state.mul_(decay.unsqueeze(-1)).addcmul_(kf.unsqueeze(-1), vf.unsqueeze(-2))
    return out


def mamba2_ssd_step(
    state, x, b, c, dt_raw, dt_bias, a_log, d_skip, time_step_limit, heads_per_group: int, gate=None
) -> torch.Tensor:
    """One Mamba2 SSD token from the conv output: state [B, H, N, P] float32 (updated in
    place); x [B, H*P]; b, c [B, G*N]; dt_raw [B, H] (before softplus); dt_bias, a_log,
    d_skip [H]; gate z [B, H*P] or None. Returns y = C^T S_new + D x, times SiLU(z) when the
    gate is given, [B, H*P] in float32: gating here spares the output product's prologue
    a second input stream per weight tile. On CUDA one Triton kernel reads and writes the
    state once (through inductor the torch form reads it twice, plus small kernels for dt and
    the skip); elsewhere, or for head or state sizes that are not powers of two, the torch form."""
    n, p = state.shape[-2:]
    low, high = (float(v) for v in time_step_limit)
    if state.is_cuda and not (n & (n - 1) or p & (p - 1)):
        return torch.ops.phasewatt.mamba2_ssd_step(state, x, b, c, dt_raw, dt_bias, a_log, d_skip, low, high, heads_per_group, gate)
    return _mamba2_ssd_step_torch(state, x, b, c, dt_raw, dt_bias, a_log, d_skip, (low, high), heads_per_group, gate)


@torch.library.custom_op("phasewatt::mamba2_ssd_step", mutates_args=("state",))
def _mamba2_ssd_step_op(
    state: torch.Tensor, x: torch.Tensor, b: torch.Tensor, c: torch.Tensor, dt_raw: torch.Tensor, dt_bias: torch.Tensor,
    a_log: torch.Tensor, d_skip: torch.Tensor, dt_min: float, dt_max: float, heads_per_group: int,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    if not state.is_cuda:
        return _mamba2_ssd_step_torch(state, x, b, c, dt_raw, dt_bias, a_log, d_skip, (dt_min, dt_max), heads_per_group, gate)
    batch, heads, n, p = state.shape
    y = torch.empty(batch, heads * p, device=x.device, dtype=torch.float32)
    block_p = min(p, 32)
    _ssd_step_kernel()[(batch, heads, p // block_p)](
        x, b, c, dt_raw, dt_bias, a_log, d_skip, state, y, x if gate is None else gate,
        x.stride(0), b.stride(0), c.stride(0), dt_raw.stride(0), state.stride(0), y.stride(0),
        x.stride(0) if gate is None else gate.stride(0),
        heads_per_group, dt_min, dt_max, N=n, P=p, BLOCK_P=block_p, GATE=gate is not None, num_warps=4,
        **pdl.launch_args(x.device),
    )
    return y


@_mamba2_ssd_step_op.register_fake
def _(state, x, b, c, dt_raw, dt_bias, a_log, d_skip, dt_min, dt_max, heads_per_group, gate=None):
    return x.new_empty((state.shape[0], state.shape[1] * state.shape[3]), dtype=torch.float32)


def _mamba2_ssd_step_torch(state, x, b, c, dt_raw, dt_bias, a_log, d_skip, time_step_limit, heads_per_group: int, gate=None):
    batch, heads, n, p = state.shape
    dt = F.softplus(dt_raw.float() + dt_bias.float()).clamp(*time_step_limit)
    xh = x.float().unflatten(-1, (heads, p))
    bh = repeat_heads(b.unflatten(-1, (-1, n)), heads_per_group)
    ch = repeat_heads(c.unflatten(-1, (-1, n)), heads_per_group)
    y = simple_gla_step(state, ch, bh, xh * dt.unsqueeze(-1), dt * -a_log.float().exp(), 1.0)
    y = (y + xh * d_skip.float().unsqueeze(-1)).flatten(-2)
    return y * F.silu(gate.float()) if gate is not None else y


@functools.lru_cache(maxsize=1)
def _ssd_step_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def ssd_step_kernel(
        x_ptr, b_ptr, c_ptr, dt_ptr, dt_bias_ptr, a_log_ptr, d_ptr, state_ptr, y_ptr, z_ptr,
        stride_x, stride_b, stride_c, stride_dt, stride_state, stride_y, stride_z, heads_per_group, dt_min, dt_max,
        N: tl.constexpr, P: tl.constexpr, BLOCK_P: tl.constexpr, GATE: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        if USE_PDL:  # launched with PDL (models/pdl.py): wait for the previous kernel first
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        seq = tl.program_id(0)
        head = tl.program_id(1)
        rp = tl.program_id(2) * BLOCK_P + tl.arange(0, BLOCK_P)
        rn = tl.arange(0, N)
        group = head // heads_per_group
        x = tl.load(x_ptr + seq * stride_x + head * P + rp).to(tl.float32)
        b = tl.load(b_ptr + seq * stride_b + group * N + rn).to(tl.float32)
        c = tl.load(c_ptr + seq * stride_c + group * N + rn).to(tl.float32)
        dt = tl.load(dt_ptr + seq * stride_dt + head).to(tl.float32) + tl.load(dt_bias_ptr + head).to(tl.float32)
        dt = tl.where(dt > 20.0, dt, tl.log(1.0 + tl.exp(dt)))  # softplus, threshold 20 as torch's
        dt = tl.minimum(tl.maximum(dt, dt_min), dt_max)
        decay = tl.exp(-dt * tl.exp(tl.load(a_log_ptr + head).to(tl.float32)))
        s_ptrs = state_ptr + seq * stride_state + head * N * P + rn[:, None] * P + rp[None, :]
        s = tl.load(s_ptrs) * decay + b[:, None] * (x * dt)[None, :]
        tl.store(s_ptrs, s)
        y = tl.sum(c[:, None] * s, axis=0) + tl.load(d_ptr + head).to(tl.float32) * x
        if GATE:  # y * SiLU(z): the gated norm's gate, applied here instead of in out_proj's prologue
            z = tl.load(z_ptr + seq * stride_z + head * P + rp).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(y_ptr + seq * stride_y + head * P + rp, y)

    return ssd_step_kernel


def recurrent_simple_gla_torch(q, k, v, g, scale: float, initial_state=None):
    """Token-by-token scalar-decay recurrence (the naive form the chunked one is tested against)."""
    batch, length, heads, kdim = k.shape
    state = _initial_state(initial_state, (batch, heads, kdim, v.shape[-1]), q.device)
    outs = [simple_gla_step(state, q[:, t], k[:, t], v[:, t], g[:, t], scale) for t in range(length)]
    return torch.stack(outs, dim=1).to(v.dtype), state


# ----- prefill dispatch: fla on CUDA, torch elsewhere -------------------------------------------
def _use_fla(x: torch.Tensor, backend: str) -> bool:
    if backend not in BACKENDS:
        raise ValueError(f"linear-attention backend '{backend}'; allowed: " + ", ".join(BACKENDS))
    if backend == "fla" and not x.is_cuda:
        raise ValueError("linear-attention backend 'fla' needs CUDA tensors")
    return backend == "fla" or (backend == "auto" and x.is_cuda)


def gated_delta_rule_prefill(q, k, v, g, beta, scale: float, backend: str = "auto"):
    """Whole-prompt gated delta rule from a zero state, q and k L2-normalised here (in the
    kernel on fla). Returns o [B, T, H, V] and the final state [B, H, K, V] (float32)."""
    if _use_fla(q, backend):
        # Packed here, inside the compiled prefill, so that inductor writes them packed in the
        # kernels that make them: fla would copy the strided views in eager kernels.
        return _fla_gated_delta_rule(q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), beta.contiguous(), scale)
    return chunk_gated_delta_rule_torch(l2_normalize(q), l2_normalize(k), v, g, beta, scale)


@torch.compiler.disable
def _fla_gated_delta_rule(q, k, v, g, beta, scale: float):
    """fla's chunked kernels, kept out of torch.compile (a compiled prefill breaks its graph
    here and calls them as they are)."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    out, state = chunk_gated_delta_rule(
        q, k, v, g=g, beta=beta, scale=scale, initial_state=None, output_final_state=True, use_qk_l2norm_in_kernel=True,
    )
    return out, state.float()


def simple_gla_prefill(q, k, v, g, scale: float, chunk_size: int, backend: str = "auto"):
    """Whole-prompt scalar-decay recurrence from a zero state. Returns o [B, T, H, V] and the
    final state [B, H, K, V] (float32). fla picks its own chunk size; the result is the same.
    On fla, v is cast to q's dtype (the kernel takes q, k, v of one dtype)."""
    if _use_fla(q, backend):
        # Packed inside the compiled prefill, as in gated_delta_rule_prefill: q and k are the
        # group's B and C broadcast over its heads (stride-0 views until here).
        return _fla_simple_gla(q.contiguous(), k.contiguous(), v.to(q.dtype).contiguous(), g.contiguous(), scale)
    return chunk_simple_gla_torch(q, k, v, g, scale, chunk_size=chunk_size)


@torch.compiler.disable
def _fla_simple_gla(q, k, v, g, scale: float):
    """fla's chunked kernels, kept out of torch.compile like _fla_gated_delta_rule."""
    from fla.ops.simple_gla import chunk_simple_gla

    out, state = chunk_simple_gla(q, k, v, g=g, scale=scale, initial_state=None, output_final_state=True)
    return out, state.float()
