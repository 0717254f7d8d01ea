"""Grouped-query attention for one decode step, fused.

In a compiled GQA layer the work between the qkv and o products (q/k RMSNorm, rope, the cache
write, two batched matrix products around a softmax) ran as six small kernels, ~13 us per
layer on an H200 where the layer's weights take ~45 us to read (RESULTS.md, round 3). Here it
is two Triton kernels, split over the cache length as in flash-decoding so that batch 1 still
fills the GPU:

1. one program per (sequence, KV head, slice of the cache): it norms and rotates the new q of
   the KV head's query group and the new k, writes k and v to the cache (the program whose
   slice holds the position), and attends over its slice with an online softmax, reading each
   cached K/V row once for the whole group; it writes its partial (max, sum, output) in float32.
2. one program per (sequence, query head) merges the slices' partials.

phasewatt::gqa_decode_attention wraps them as one call that mutates the caches; on CPU
tensors it is the torch maths (attend_torch), the reference the kernels are tested against.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from phasewatt.models import pdl
from phasewatt.models.layers import apply_rope, decode_mask, rms_norm

# Cache positions per inner step of kernel 1 (cache lengths are multiples of 64: decoder.py).
BLOCK_POSITIONS = 64
# Slices per step are chosen so that about this many programs per multiprocessor run kernel 1.
PROGRAMS_PER_SM = 2


def fused_supported(head_dim: int, dtype: torch.dtype, device_type: str = "cuda") -> bool:
    """Whether the op takes this model: on CUDA its kernels' tensor-core products need a
    power-of-two head_dim of at least 16 and half-precision inputs (float32 ones would run as
    TF32, less exact than the torch form); elsewhere it is the torch form, which takes any."""
    if device_type != "cuda":
        return True
    return head_dim >= 16 and not head_dim & (head_dim - 1) and dtype in (torch.bfloat16, torch.float16)


def fused_unsupported(name: str, head_dim: int, dtype: torch.dtype, device_type: str) -> str | None:
    """Why the op cannot take this model (the start of a one-line error), or None."""
    if fused_supported(head_dim, dtype, device_type):
        return None
    return f"'fused' needs a power-of-two head_dim >= 16 in bfloat16/float16 on CUDA (models.{name}: head_dim {head_dim}, {dtype})"


def split_qkv(qkv: torch.Tensor, n_heads: int, n_kv_heads: int, head_dim: int):
    """qkv [..., (H + 2 H_kv) D] -> q [..., H, D], k and v [..., H_kv, D] (views)."""
    q, k, v = qkv.split([n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim], dim=-1)
    return q.unflatten(-1, (n_heads, head_dim)), k.unflatten(-1, (n_kv_heads, head_dim)), v.unflatten(-1, (n_kv_heads, head_dim))


def norm_rope_qk(q, k, cos, sin, q_norm_weight, k_norm_weight, eps: float):
    """Per-head RMSNorm of q and k (when their weights are given, Qwen3), then rope."""
    if q_norm_weight is not None:
        q, k = rms_norm(q, q_norm_weight, eps), rms_norm(k, k_norm_weight, eps)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def attend_torch(qkv, k_cache, v_cache, input_pos, cos, sin, q_norm_weight, k_norm_weight, eps: float, n_heads: int,
                 scale: float, kind: str = "matmul", mask: torch.Tensor | None = None) -> torch.Tensor:
    """One decode step in torch: qkv [B, (H + 2 H_kv) D]; caches [B, H_kv, L, D] (written at
    input_pos [1]); cos, sin [L, D]. Returns [B, H * D]. The query heads of a KV group are
    folded into the query-length axis, so each cached head is read once (kind "sdpa": one SDPA
    call; "matmul": two batched products around a float32 softmax). mask: the step's
    layers.decode_mask, when the caller has it; else made here."""
    b, n_kv_heads, cache_len, head_dim = k_cache.shape
    q, k, v = split_qkv(qkv.unsqueeze(1), n_heads, n_kv_heads, head_dim)
    q, k = norm_rope_qk(q, k, cos[input_pos], sin[input_pos], q_norm_weight, k_norm_weight, eps)
    k_cache[:, :, input_pos] = k.transpose(1, 2)
    v_cache[:, :, input_pos] = v.transpose(1, 2)
    q = q.view(b, n_kv_heads, n_heads // n_kv_heads, head_dim)
    if mask is None:
        mask = decode_mask(torch.arange(cache_len, device=qkv.device), input_pos, q.dtype)
    if kind == "sdpa":
        out = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask.view(1, 1, 1, -1), scale=scale)
    else:
        scores = torch.matmul(q, k_cache.transpose(2, 3)).float() * scale + mask
        out = torch.matmul(torch.softmax(scores, dim=-1).to(q.dtype), v_cache)
    return out.reshape(b, n_heads * head_dim)


@torch.library.custom_op("phasewatt::gqa_decode_attention", mutates_args=("k_cache", "v_cache"))
def gqa_decode_attention(
    qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, input_pos: torch.Tensor, cos: torch.Tensor,
    sin: torch.Tensor, q_norm_weight: torch.Tensor | None, k_norm_weight: torch.Tensor | None, eps: float, n_heads: int,
    scale: float,
) -> torch.Tensor:
    """attend_torch as one call: the two Triton kernels on CUDA, the torch maths elsewhere."""
    if qkv.is_cuda:
        return triton_attend(qkv, k_cache, v_cache, input_pos, cos, sin, q_norm_weight, k_norm_weight, eps, n_heads, scale)
    return attend_torch(qkv, k_cache, v_cache, input_pos, cos, sin, q_norm_weight, k_norm_weight, eps, n_heads, scale)


@gqa_decode_attention.register_fake
def _(qkv, k_cache, v_cache, input_pos, cos, sin, q_norm_weight, k_norm_weight, eps, n_heads, scale):
    return qkv.new_empty((qkv.shape[0], n_heads * k_cache.shape[-1]))


def cache_slices(batch: int, n_kv_heads: int, cache_len: int, sm_count: int, positions: int = BLOCK_POSITIONS,
                 max_slices: int | None = None) -> tuple[int, int]:
    """(slices, positions per slice): enough (sequence, KV head or head block, slice) programs
    for about PROGRAMS_PER_SM per multiprocessor, slices whole multiples of `positions` (the
    kernel's positions per inner step; MLA's partial kernel passes its own) and, given
    max_slices, at most that many (longer slices instead)."""
    blocks = -(-cache_len // positions)
    wanted = max(1, -(-PROGRAMS_PER_SM * sm_count // (batch * n_kv_heads)))
    blocks_per_slice = max(1, blocks // wanted)
    if max_slices is not None:
        blocks_per_slice = max(blocks_per_slice, -(-blocks // max_slices))
    return -(-blocks // blocks_per_slice), blocks_per_slice * positions


@functools.lru_cache(maxsize=None)
def multiprocessors(device_index: int) -> int:
    """The CUDA device's streaming multiprocessors (what the split kernels size their grids by)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def triton_attend(qkv, k_cache, v_cache, input_pos, cos, sin, q_norm_weight, k_norm_weight, eps, n_heads, scale,
                  sm_count: int | None = None) -> torch.Tensor:
    """attend_torch through the two kernels (any device Triton runs on; sm_count defaults to
    the CUDA device's)."""
    batch, n_kv_heads, cache_len, head_dim = k_cache.shape
    group = n_heads // n_kv_heads
    if qkv.shape != (batch, (n_heads + 2 * n_kv_heads) * head_dim):
        raise ValueError(f"gqa_decode_attention: qkv {tuple(qkv.shape)} does not fit caches {tuple(k_cache.shape)} and {n_heads} heads")
    if not fused_supported(head_dim, qkv.dtype):
        raise ValueError(f"gqa_decode_attention: head_dim {head_dim} in {qkv.dtype}; the kernels need a power of two >= 16 in bf16/fp16")
    if k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride() or cos.stride(-1) != 1 or sin.stride() != cos.stride():
        raise ValueError("gqa_decode_attention: needs K/V caches of one layout and cos/sin tables of one layout, unit-stride rows")
    if sm_count is None:
        sm_count = multiprocessors(qkv.device.index if qkv.device.index is not None else torch.cuda.current_device())
    slices, slice_len = cache_slices(batch, n_kv_heads, cache_len, sm_count)
    qkv = qkv.contiguous()
    partial_max = torch.empty(batch, n_heads, slices, device=qkv.device, dtype=torch.float32)
    partial_sum = torch.empty_like(partial_max)
    partial_out = torch.empty(batch, n_heads, slices, head_dim, device=qkv.device, dtype=torch.float32)
    qk_norm = q_norm_weight is not None
    partial, merge = _kernels()
    launch = pdl.launch_args(qkv.device)
    partial[(batch * n_kv_heads, slices)](
        qkv, k_cache, v_cache, input_pos, cos, sin,
        q_norm_weight if qk_norm else qkv, k_norm_weight if qk_norm else qkv,
        partial_max, partial_sum, partial_out,
        qkv.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), cos.stride(0),
        float(eps), float(scale), slice_len, slices,
        N_HEADS=n_heads, N_KV_HEADS=n_kv_heads, GROUP=group, BLOCK_G=max(16, 1 << group.bit_length()),
        HEAD_DIM=head_dim, BLOCK_L=BLOCK_POSITIONS, QK_NORM=qk_norm, num_warps=4, **launch,
    )
    out = torch.empty(batch, n_heads * head_dim, device=qkv.device, dtype=qkv.dtype)
    merge[(batch * n_heads,)](
        partial_max, partial_sum, partial_out, out, slices,
        HEAD_DIM=head_dim, BLOCK_S=max(2, 1 << (slices - 1).bit_length()), num_warps=4, **launch,
    )
    return out


@functools.lru_cache(maxsize=1)
def _kernels():
    """The two Triton kernels, compiled on first use (triton imported only here)."""
    import triton
    import triton.language as tl

    @triton.jit
    def partial_kernel(
        qkv_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, cos_ptr, sin_ptr, q_norm_ptr, k_norm_ptr,
        max_ptr, sum_ptr, out_ptr,
        stride_qkv, stride_cache_b, stride_cache_h, stride_cache_l, stride_cos,
        eps, scale, slice_len, slices,
        N_HEADS: tl.constexpr, N_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_L: tl.constexpr, QK_NORM: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        if USE_PDL:  # launched with PDL (models/pdl.py): wait for the previous kernel first
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        seq = tl.program_id(0) // N_KV_HEADS
        kv_head = tl.program_id(0) % N_KV_HEADS
        part = tl.program_id(1)
        pos = tl.load(pos_ptr)
        rd = tl.arange(0, HEAD_DIM)
        rg = tl.arange(0, BLOCK_G)
        g_ok = rg < GROUP
        # Rows 0..GROUP-1: the group's query heads; row GROUP: the KV head's new k. Normed
        # (RMSNorm rounded as layers.rms_norm) and rotated (rotate-half rope) in one pass.
        is_k = rg == GROUP
        rows_ok = (rg <= GROUP)[:, None]
        head_cols = tl.where(is_k, N_HEADS + kv_head, kv_head * GROUP + rg)[:, None] * HEAD_DIM
        partner = (rd + HEAD_DIM // 2) % HEAD_DIM
        row = qkv_ptr + seq * stride_qkv
        dtype = qkv_ptr.dtype.element_ty
        x = tl.load(row + head_cols + rd[None, :], mask=rows_ok, other=0.0)
        x_partner = tl.load(row + head_cols + partner[None, :], mask=rows_ok, other=0.0)
        if QK_NORM:
            x32 = x.to(tl.float32)
            inv_rms = tl.rsqrt(tl.sum(x32 * x32, axis=1) / HEAD_DIM + eps)[:, None]
            w = tl.where(is_k[:, None], tl.load(k_norm_ptr + rd)[None, :], tl.load(q_norm_ptr + rd)[None, :])
            w_partner = tl.where(is_k[:, None], tl.load(k_norm_ptr + partner)[None, :], tl.load(q_norm_ptr + partner)[None, :])
            x = ((x32 * inv_rms).to(dtype).to(tl.float32) * w.to(tl.float32)).to(dtype)
            x_partner = ((x_partner.to(tl.float32) * inv_rms).to(dtype).to(tl.float32) * w_partner.to(tl.float32)).to(dtype)
        cos = tl.load(cos_ptr + pos * stride_cos + rd)[None, :]
        sin = tl.load(sin_ptr + pos * stride_cos + rd)[None, :]
        sign = tl.where(rd < HEAD_DIM // 2, -1.0, 1.0)[None, :]
        rotated = (x.to(tl.float32) * cos + sign * x_partner.to(tl.float32) * sin).to(dtype)
        q = tl.where((rg < GROUP)[:, None], rotated, 0.0).to(dtype)
        k_new = tl.sum(tl.where(is_k[:, None], rotated.to(tl.float32), 0.0), axis=0).to(dtype)[None, :]
        v_new = tl.load(row + (N_HEADS + N_KV_HEADS + kv_head) * HEAD_DIM + rd)[None, :]
        cache_offset = seq.to(tl.int64) * stride_cache_b + kv_head * stride_cache_h
        start = part * slice_len
        if (start <= pos) & (pos < start + slice_len):  # this slice holds the new position
            tl.store(k_cache_ptr + cache_offset + pos * stride_cache_l + rd[None, :], k_new)
            tl.store(v_cache_ptr + cache_offset + pos * stride_cache_l + rd[None, :], v_new)
        running_max = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
        running_sum = tl.zeros((BLOCK_G,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_G, HEAD_DIM), dtype=tl.float32)
        end = tl.minimum(start + slice_len, pos + 1)
        for l0 in range(start, end, BLOCK_L):
            rl = l0 + tl.arange(0, BLOCK_L)
            cached = (rl < pos)[:, None]  # the new position is taken from k_new/v_new, not read back
            offsets = cache_offset + rl[:, None] * stride_cache_l + rd[None, :]
            k = tl.where(rl[:, None] == pos, k_new, tl.load(k_cache_ptr + offsets, mask=cached, other=0.0))
            v = tl.where(rl[:, None] == pos, v_new, tl.load(v_cache_ptr + offsets, mask=cached, other=0.0))
            scores = tl.dot(q, tl.trans(k)) * scale
            scores = tl.where((rl <= pos)[None, :], scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, axis=1))
            alpha = tl.exp(running_max - new_max)
            p = tl.exp(scores - new_max[:, None])
            running_sum = running_sum * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(dtype), v)
            running_max = new_max
        heads = seq * N_HEADS + kv_head * GROUP + rg
        tl.store(max_ptr + heads * slices + part, running_max, mask=g_ok)
        tl.store(sum_ptr + heads * slices + part, running_sum, mask=g_ok)
        tl.store(out_ptr + (heads * slices + part)[:, None] * HEAD_DIM + rd[None, :], acc, mask=g_ok[:, None])

    @triton.jit
    def merge_kernel(
        max_ptr, sum_ptr, out_ptr, y_ptr, slices, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        if USE_PDL:  # launched with PDL (models/pdl.py): wait for the previous kernel first
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        head = tl.program_id(0)  # sequence * N_HEADS + query head: y is [B, H * D]
        rs = tl.arange(0, BLOCK_S)
        rd = tl.arange(0, HEAD_DIM)
        s_ok = rs < slices
        # Slices past the position hold max -inf, sum 0 and no output: weight 0 below.
        slice_max = tl.load(max_ptr + head * slices + rs, mask=s_ok, other=float("-inf"))
        slice_sum = tl.load(sum_ptr + head * slices + rs, mask=s_ok, other=0.0)
        slice_out = tl.load(out_ptr + (head * slices + rs)[:, None] * HEAD_DIM + rd[None, :], mask=s_ok[:, None], other=0.0)
        weight = tl.exp(slice_max - tl.max(slice_max, axis=0))
        y = tl.sum(weight[:, None] * slice_out, axis=0) / tl.sum(weight * slice_sum, axis=0)
        tl.store(y_ptr + head * HEAD_DIM + rd, y.to(y_ptr.dtype.element_ty))

    return partial_kernel, merge_kernel
