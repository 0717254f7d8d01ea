"""Mamba2's prefill on the GPU: the short conv, the chunked SSD and the gated norm in four
Triton kernels, with the heads of a group sharing B and C.

fla's chunk_simple_gla takes q and k per head, so Mamba2-2.7B (80 heads, one group) had to
copy C and B out to 80 heads each ([T, 80, 128] twice, read three more times by fla's
kernels), and the conv, SiLU, time step, D skip and gated norm ran as five inductor kernels
around it: on an H100, ~175 us per layer of elementwise work against ~120 us of SSD and
~220 us of projections at 2048 tokens (RESULTS.md, round 5). Here, per layer:

1. steps: dt = softplus(dt + dt_bias) (clamped) and its within-chunk sums g = dt * A (log2
   units: the kernels decay with exp2), per head along the prompt ([B, heads, T]: a chunk of
   a head is 64 contiguous values for the two kernels that read it).
2. conv: SiLU(causal conv) over x|B|C of the input projection, packed [B, T, conv channels]:
   B and C once per group.
3. states: per head, the state at each chunk's start (the recurrence carried chunk to chunk
   from the group's B), and the final state straight into the model's state buffer.
4. output: per chunk and head, y = C S_start decayed + the causal within-chunk part, then
   (y + D x) * SiLU(z) times the norm's weight, and each row's sum of squares per head: the
   RMS of a row factors out of the output projection (one group), so the caller applies it
   to the projection's output together with the residual add.
v = x * dt is formed in registers where it is used, never written out.

The algorithm is the SSD's chunked form (Mamba2 paper, section 6; fla's chunked simple GLA
computes the same with per-head B and C). The inputs of the products (x, B, C, v, the decayed
scores and the chunk states) are rounded to the model dtype, as fla's are; every product and
sum accumulates in float32.
The maths in torch (the CPU path and the reference) is Mamba2Mixer's own prefill.
"""

from __future__ import annotations

import functools
import math

import torch

CHUNK = 64  # tokens per chunk: the g cumsum, the state kernel and the output kernel share it
# Block sizes: for each kernel, its best single change in an H200 sweep of one change at a
# time (benchmarks/ssd_prefill_bench.py, RESULTS.md round 6); the kernels are independent,
# but the combination was timed afterwards only, not swept.
DEFAULT_BLOCKS = {
    "conv_t": 32, "conv_c": 64, "conv_warps": 2,  # tokens and channels per conv program
    "states_k": 64, "states_v": 32, "states_warps": 4, "states_stages": 3,
    "output_k": 128, "output_v": 64, "output_warps": 4, "output_stages": 2,
}
STEPS_BLOCK_HEADS = 16  # heads per program of the time-step kernel
RCP_LN2 = 1.0 / math.log(2.0)


def _dot_block(dim: int, cap: int) -> int:
    """A tile edge for dim: a power of two >= 16 (tl.dot's minimum), at most cap."""
    return max(16, min(cap, 1 << max(0, dim - 1).bit_length()))


def output_v_blocks(head_dim: int) -> int:
    """How many programs share a head's channels in the output kernel (default blocks): the
    sums of squares come back per head and per such block."""
    return -(-head_dim // _dot_block(head_dim, DEFAULT_BLOCKS["output_v"]))


def u_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype u comes back in: the model's, but float32 for float16, whose range (65504)
    u, not yet normed, and its un-normed output projection can exceed."""
    return torch.float32 if dtype == torch.float16 else dtype


def mamba2_prefill_kernels(
    proj: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor | None, dt_bias: torch.Tensor,
    a_log: torch.Tensor, d_skip: torch.Tensor, norm_weight: torch.Tensor, time_step_limit: tuple[float, float],
    n_groups: int, d_state: int, head_dim: int, ssm_state: torch.Tensor, blocks: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """From the input projection proj [B, T, z | x B C | dt] of a prompt: the gated, weighted
    SSD output u * norm_weight [B, T, d_inner] in proj's dtype, float32 for float16 (u_dtype;
    u = (y + D x) * SiLU(z), not yet normed) and the float32 sums of squares of u [B, T, heads * v_blocks] over blocks of each
    head's channels (output_v_blocks; a group's heads are consecutive); the final SSD state is
    written to ssm_state [B, heads, d_state, head_dim] (float32). proj's rows may be padded
    (any row stride). On any device Triton runs on (CUDA; CPU tensors under TRITON_INTERPRET=1)."""
    batch, length, width_proj = proj.shape
    heads = a_log.shape[0]
    d_inner = heads * head_dim
    group_dim = n_groups * d_state
    conv_dim = d_inner + 2 * group_dim
    if width_proj != d_inner + conv_dim + heads or conv_weight.shape[0] != conv_dim:
        raise ValueError(
            f"mamba2_prefill_kernels: proj [{batch}, {length}, {width_proj}] and conv_weight {tuple(conv_weight.shape)} do not fit "
            f"{heads} heads of {head_dim}, {n_groups} groups of d_state {d_state}"
        )
    state_fits = tuple(ssm_state.shape) == (batch, heads, d_state, head_dim) and ssm_state.dtype == torch.float32
    if heads % n_groups or not state_fits or not ssm_state.is_contiguous():
        raise ValueError(
            f"mamba2_prefill_kernels: ssm_state {tuple(ssm_state.shape)} {ssm_state.dtype}; needed contiguous float32 "
            f"[{batch}, {heads}, {d_state}, {head_dim}] with {n_groups} groups dividing {heads} heads"
        )
    if proj.stride(-1) != 1:
        proj = proj.contiguous()
    # The per-channel and per-head vectors are indexed as packed.
    conv_bias, dt_bias, a_log, d_skip, norm_weight = (
        None if t is None else t.contiguous() for t in (conv_bias, dt_bias, a_log, d_skip, norm_weight)
    )
    blocks = {**DEFAULT_BLOCKS, **(blocks or {})}
    n_chunks = -(-length // CHUNK)
    steps = (float(time_step_limit[0]), float(time_step_limit[1]), RCP_LN2)
    shapes = {"HEADS": heads, "GROUPS": n_groups, "N": d_state, "P": head_dim, "D_INNER": d_inner, "CONV_DIM": conv_dim}
    kernels = _kernels()
    xbc = torch.empty(batch, length, conv_dim, device=proj.device, dtype=proj.dtype)
    kernels["conv"][(-(-length // blocks["conv_t"]), -(-conv_dim // blocks["conv_c"]), batch)](
        proj, conv_weight, conv_weight if conv_bias is None else conv_bias, xbc,
        length, proj.stride(0), proj.stride(1), conv_weight.stride(0), conv_weight.stride(1),
        D_INNER=d_inner, CONV_DIM=conv_dim, WIDTH=conv_weight.shape[-1], HAS_BIAS=conv_bias is not None,
        BLOCK_T=blocks["conv_t"], BLOCK_C=blocks["conv_c"], num_warps=blocks["conv_warps"],
    )
    # dt and g per head along the prompt ([B, heads, chunks * CHUNK], contiguous per chunk).
    dt = torch.empty(batch, heads, n_chunks * CHUNK, device=proj.device, dtype=torch.float32)
    g = torch.empty_like(dt)
    kernels["steps"][(n_chunks, -(-heads // STEPS_BLOCK_HEADS), batch)](
        proj, dt_bias, a_log, dt, g, length, proj.stride(0), proj.stride(1), *steps,
        HEADS=heads, COLUMN=d_inner + conv_dim, BT=CHUNK, BH=STEPS_BLOCK_HEADS, num_warps=4,
    )
    states = torch.empty(batch, n_chunks, heads, d_state, head_dim, device=proj.device, dtype=proj.dtype)
    block_k, block_v = _dot_block(d_state, blocks["states_k"]), _dot_block(head_dim, blocks["states_v"])
    # Sequences x heads on grid axis 0 (up to 2^31 - 1; axes 1 and 2 stop at 65535).
    kernels["states"][(batch * heads, -(-d_state // block_k) * -(-head_dim // block_v))](
        xbc, dt, g, states, ssm_state, length, n_chunks,
        **shapes, BT=CHUNK, BK=block_k, BV=block_v, num_warps=blocks["states_warps"], num_stages=blocks["states_stages"],
    )
    block_k, block_v = _dot_block(d_state, blocks["output_k"]), _dot_block(head_dim, blocks["output_v"])
    v_blocks = -(-head_dim // block_v)
    u = torch.empty(batch, length, d_inner, device=proj.device, dtype=u_dtype(proj.dtype))
    squares = torch.empty(batch, length, heads, v_blocks, device=proj.device, dtype=torch.float32)
    kernels["output"][(batch * heads, n_chunks * v_blocks)](
        xbc, proj, dt, g, states, d_skip, norm_weight, u, squares, length, n_chunks, proj.stride(0), proj.stride(1),
        **shapes, BT=CHUNK, BK=block_k, BV=block_v, V_BLOCKS=v_blocks,
        num_warps=blocks["output_warps"], num_stages=blocks["output_stages"],
    )
    return u, squares.flatten(-2)


@functools.lru_cache(maxsize=1)
def _kernels() -> dict:
    """The four kernels, compiled on first use (triton imported only here). The helpers are
    module globals: the interpreter (TRITON_INTERPRET=1) resolves a kernel's names there only."""
    global softplus
    import triton
    import triton.language as tl

    @triton.jit
    def softplus(x):
        """torch's softplus (threshold 20), with log(1 + e^x) by its series where e^x is
        small: float32 1 + e^x would round most of e^x away there."""
        e = tl.exp(tl.minimum(x, 20.0))
        series = e * (1.0 - e * (0.5 - e / 3.0))
        return tl.where(x > 20.0, x, tl.where(e < 1e-3, series, tl.log(1.0 + e)))

    @triton.jit
    def ssd_steps_kernel(
        proj_ptr, dt_bias_ptr, a_log_ptr, dt_ptr, g_ptr, T, stride_pb, stride_pt, dt_min, dt_max, rcp_ln2,
        HEADS: tl.constexpr, COLUMN: tl.constexpr, BT: tl.constexpr, BH: tl.constexpr,
    ):
        # A chunk of BH heads' time steps from the projection's dt columns (from COLUMN on):
        # dt (0 past the prompt's end) and g = dt * A summed along the chunk in log2 units
        # (non-increasing: its minimum is the chunk's total), stored [B, heads, T_padded].
        t0 = tl.program_id(0) * BT
        i_b = tl.program_id(2).to(tl.int64)
        lt = tl.arange(0, BT)
        rh = tl.program_id(1) * BH + tl.arange(0, BH)
        h_ok = rh < HEADS
        t_ok = t0 + lt < T
        ok = t_ok[:, None] & h_ok[None, :]
        chunk_proj = proj_ptr + i_b * stride_pb + t0.to(tl.int64) * stride_pt + COLUMN
        raw = tl.load(chunk_proj + lt[:, None] * stride_pt + rh[None, :], mask=ok, other=0.0).to(tl.float32)
        bias = tl.load(dt_bias_ptr + rh, mask=h_ok, other=0.0).to(tl.float32)
        neg_a = -tl.exp(tl.load(a_log_ptr + rh, mask=h_ok, other=0.0).to(tl.float32))
        dt = tl.where(ok, tl.minimum(tl.maximum(softplus(raw + bias[None, :]), dt_min), dt_max), 0.0)
        g = tl.cumsum(dt * neg_a[None, :], axis=0) * rcp_ln2
        n_padded = tl.num_programs(0) * BT
        offsets = (i_b * HEADS + rh)[None, :] * n_padded + (t0 + lt)[:, None]
        tl.store(dt_ptr + offsets, dt, mask=h_ok[None, :])
        tl.store(g_ptr + offsets, g, mask=h_ok[None, :])

    @triton.jit
    def ssd_conv_kernel(
        proj_ptr, conv_w_ptr, conv_b_ptr, xbc_ptr, T, stride_pb, stride_pt, stride_w, stride_w_tap,
        D_INNER: tl.constexpr, CONV_DIM: tl.constexpr, WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        # SiLU(causal conv) of BLOCK_T tokens by BLOCK_C of the x|B|C channels, packed [B, T, C].
        # Pointers to the block's first token are int64 scalars, offsets within it int32 (a
        # tile of int64 offsets costs two registers an element).
        t0 = tl.program_id(0) * BLOCK_T
        i_b = tl.program_id(2).to(tl.int64)
        lt = tl.arange(0, BLOCK_T)
        rc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = rc < CONV_DIM
        block_proj = proj_ptr + i_b * stride_pb + t0.to(tl.int64) * stride_pt + D_INNER
        acc = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
        for tap in tl.static_range(WIDTH):
            shift = tap - (WIDTH - 1)
            ok = (t0 + lt + shift >= 0) & (t0 + lt + shift < T)
            xbc = tl.load(block_proj + (lt + shift)[:, None] * stride_pt + rc[None, :], mask=ok[:, None] & c_ok[None, :], other=0.0)
            w = tl.load(conv_w_ptr + rc * stride_w + tap * stride_w_tap, mask=c_ok, other=0.0)
            acc += xbc.to(tl.float32) * w.to(tl.float32)[None, :]
        if HAS_BIAS:
            acc += tl.load(conv_b_ptr + rc, mask=c_ok, other=0.0).to(tl.float32)[None, :]
        out = acc * tl.sigmoid(acc)
        block_out = xbc_ptr + (i_b * T + t0) * CONV_DIM
        mask = (t0 + lt < T)[:, None] & c_ok[None, :]
        tl.store(block_out + lt[:, None] * CONV_DIM + rc[None, :], out.to(xbc_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def ssd_states_kernel(
        xbc_ptr, dt_ptr, g_ptr, states_ptr, final_ptr, T, NT,
        HEADS: tl.constexpr, GROUPS: tl.constexpr, N: tl.constexpr, P: tl.constexpr, D_INNER: tl.constexpr,
        CONV_DIM: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    ):
        # One head of one sequence, a [BK, BV] block of its state, carried chunk to chunk:
        # S <- exp2(g_last) S + B^T (x dt exp2(g_last - g)), the state before each chunk stored.
        i_kv = tl.program_id(1)
        i_b = tl.program_id(0) // HEADS
        i_h = tl.program_id(0) % HEADS
        i_g = i_h // (HEADS // GROUPS)
        n_v: tl.constexpr = (P + BV - 1) // BV
        rk = (i_kv // n_v) * BK + tl.arange(0, BK)
        rv = (i_kv % n_v) * BV + tl.arange(0, BV)
        lt = tl.arange(0, BT)
        kv_mask = (rk < N)[:, None] & (rv < P)[None, :]
        kv_offsets = rk[:, None] * P + rv[None, :]
        # Pointers to the first chunk, advanced by a chunk each iteration.
        chunk_xbc = xbc_ptr + i_b.to(tl.int64) * T * CONV_DIM
        chunk_steps = tl.program_id(0).to(tl.int64) * NT * BT  # dt and g of this sequence and head
        chunk_state = states_ptr + (i_b.to(tl.int64) * NT * HEADS + i_h) * (N * P)
        state = tl.zeros((BK, BV), dtype=tl.float32)
        for i_t in range(NT):
            t_ok = i_t * BT + lt < T
            tl.store(chunk_state + kv_offsets, state.to(states_ptr.dtype.element_ty), mask=kv_mask)
            dt = tl.load(dt_ptr + chunk_steps + lt)
            g = tl.load(g_ptr + chunk_steps + lt)
            g_last = tl.min(g, axis=0)
            b_t = tl.load(chunk_xbc + lt[None, :] * CONV_DIM + (D_INNER + i_g * N + rk)[:, None], mask=(rk < N)[:, None] & t_ok[None, :], other=0.0)
            x = tl.load(chunk_xbc + lt[:, None] * CONV_DIM + (i_h * P + rv)[None, :], mask=t_ok[:, None] & (rv < P)[None, :], other=0.0)
            v = (x.to(tl.float32) * (dt * tl.exp2(g_last - g))[:, None]).to(xbc_ptr.dtype.element_ty)
            state = state * tl.exp2(g_last) + tl.dot(b_t, v)
            chunk_xbc += BT * CONV_DIM
            chunk_steps += BT
            chunk_state += HEADS * N * P
        tl.store(final_ptr + (i_b.to(tl.int64) * HEADS + i_h) * (N * P) + kv_offsets, state, mask=kv_mask)

    @triton.jit
    def ssd_output_kernel(
        xbc_ptr, proj_ptr, dt_ptr, g_ptr, states_ptr, d_ptr, w_ptr, u_ptr, squares_ptr, T, NT, stride_pb, stride_pt,
        HEADS: tl.constexpr, GROUPS: tl.constexpr, N: tl.constexpr, P: tl.constexpr, D_INNER: tl.constexpr,
        CONV_DIM: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, V_BLOCKS: tl.constexpr,
    ):
        # One chunk of one head, BV of its channels: y = (C S_start) exp2(g) + (C B^T * decay,
        # causal) x dt, then u = (y + D x) * SiLU(z); stores u * norm weight and sum(u^2).
        i_t = tl.program_id(1) // V_BLOCKS
        i_vb = tl.program_id(1) % V_BLOCKS
        i_b = tl.program_id(0) // HEADS
        i_h = tl.program_id(0) % HEADS
        i_g = i_h // (HEADS // GROUPS)
        t0 = i_t * BT
        lt = tl.arange(0, BT)
        t_ok = t0 + lt < T
        rv = i_vb * BV + tl.arange(0, BV)
        v_ok = rv < P
        mask = t_ok[:, None] & v_ok[None, :]
        tok0 = i_b.to(tl.int64) * T + t0
        chunk_xbc = xbc_ptr + tok0 * CONV_DIM
        chunk_proj = proj_ptr + i_b.to(tl.int64) * stride_pb + t0.to(tl.int64) * stride_pt
        chunk_state = states_ptr + ((i_b.to(tl.int64) * NT + i_t) * HEADS + i_h) * (N * P)
        y = tl.zeros((BT, BV), dtype=tl.float32)
        scores = tl.zeros((BT, BT), dtype=tl.float32)
        for k0 in range(0, N, BK):
            rk = k0 + tl.arange(0, BK)
            k_ok = rk < N
            c = tl.load(chunk_xbc + lt[:, None] * CONV_DIM + (D_INNER + (GROUPS + i_g) * N + rk)[None, :], mask=t_ok[:, None] & k_ok[None, :], other=0.0)
            b_t = tl.load(chunk_xbc + lt[None, :] * CONV_DIM + (D_INNER + i_g * N + rk)[:, None], mask=k_ok[:, None] & t_ok[None, :], other=0.0)
            s = tl.load(chunk_state + rk[:, None] * P + rv[None, :], mask=k_ok[:, None] & v_ok[None, :], other=0.0)
            y = tl.dot(c, s, y)
            scores = tl.dot(c, b_t, scores)
        chunk_steps = tl.program_id(0).to(tl.int64) * NT * BT + t0
        dt = tl.load(dt_ptr + chunk_steps + lt)
        g = tl.load(g_ptr + chunk_steps + lt)
        causal = lt[:, None] >= lt[None, :]
        scores = tl.where(causal, scores * tl.exp2(tl.where(causal, g[:, None] - g[None, :], 0.0)), 0.0)
        x = tl.load(chunk_xbc + lt[:, None] * CONV_DIM + (i_h * P + rv)[None, :], mask=mask, other=0.0).to(tl.float32)
        v = (x * dt[:, None]).to(xbc_ptr.dtype.element_ty)
        y = y * tl.exp2(g)[:, None] + tl.dot(scores.to(xbc_ptr.dtype.element_ty), v)
        z = tl.load(chunk_proj + lt[:, None] * stride_pt + (i_h * P + rv)[None, :], mask=mask, other=0.0).to(tl.float32)
        u = (y + tl.load(d_ptr + i_h).to(tl.float32) * x) * (z * tl.sigmoid(z))
        u = tl.where(mask, u, 0.0)
        weight = tl.load(w_ptr + i_h * P + rv, mask=v_ok, other=0.0).to(tl.float32)
        chunk_u = u_ptr + tok0 * (HEADS * P) + i_h * P
        tl.store(chunk_u + lt[:, None] * (HEADS * P) + rv[None, :], (u * weight[None, :]).to(u_ptr.dtype.element_ty), mask=mask)
        chunk_squares = squares_ptr + (tok0 * HEADS + i_h) * V_BLOCKS + i_vb
        tl.store(chunk_squares + lt * (HEADS * V_BLOCKS), tl.sum(u * u, axis=1), mask=t_ok)

    return {"steps": ssd_steps_kernel, "conv": ssd_conv_kernel, "states": ssd_states_kernel, "output": ssd_output_kernel}


# flexible_layout: inductor may hand over its (row-padded) projection output as it is; the
# kernels take any row stride (else it copies the whole projection to a packed one first).
@torch.library.custom_op("phasewatt::mamba2_prefill_ssd", mutates_args=("ssm_state",), tags=(torch.Tag.flexible_layout,))
def mamba2_prefill_ssd(
    proj: torch.Tensor, conv_weight: torch.Tensor, conv_bias: torch.Tensor | None, dt_bias: torch.Tensor,
    a_log: torch.Tensor, d_skip: torch.Tensor, norm_weight: torch.Tensor, dt_min: float, dt_max: float,
    n_groups: int, d_state: int, head_dim: int, ssm_state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """mamba2_prefill_kernels as one op, so that a compiled prefill keeps it whole between the
    input projection and the output projection."""
    return mamba2_prefill_kernels(
        proj, conv_weight, conv_bias, dt_bias, a_log, d_skip, norm_weight, (dt_min, dt_max), n_groups, d_state, head_dim, ssm_state,
    )


@mamba2_prefill_ssd.register_fake
def _(proj, conv_weight, conv_bias, dt_bias, a_log, d_skip, norm_weight, dt_min, dt_max, n_groups, d_state, head_dim, ssm_state):
    heads = a_log.shape[0]
    return (
        proj.new_empty(*proj.shape[:-1], heads * head_dim, dtype=u_dtype(proj.dtype)),
        proj.new_empty(*proj.shape[:-1], heads * output_v_blocks(head_dim), dtype=torch.float32),
    )
