"""Multi-head latent attention for one decode step, absorbed and fused.

In a compiled MLA layer the work between the q_b and o products (the latent's RMSNorm, rope of
q and of the shared key, the cache write, the per-head absorption W_UK^T q_nope, two batched
products around a softmax and W_UV) ran as ~10 small kernels per layer, which held MiniCPM3-4B
at batch 1 to ~47% of copy bandwidth on an H200. Here it is three Triton kernels:

1. absorb, one program per (block of sequences, head, block of latent channels): q_lat =
   q_nope W_UK[h] into a query buffer [B, H, kv_lora + rope]; one more program per (block of
   sequences, head) writes the rotated q_pe there and, for head 0, the sequences' new cache
   entry (the normed latent and the rotated shared key) at the position.
2. partial, one program per (sequence, block of heads, slice of the cache), split over the
   cache length as in flash-decoding so that batch 1 still fills the GPU: the block's heads
   share each cached row (one [kv_lora + rope] key, its first kv_lora channels the value),
   attend over the slice with an online softmax and write their partial (max, sum, output)
   in float32.
3. merge, one program per (block of sequences, head, block of v channels): the slices'
   partials -> the latent output, rounded, times those channels of W_UV[h]. At small batch a
   program takes one sequence, loads a chunk of up to MERGE_SLICE_CHUNK slices' partials at
   once and reduces them without a tensor-core product (a loop over the slices would wait on
   one load after another).

At batch 1 the three are latency-bound (MiniCPM3-4B on an H200: ~13 us per layer where their
~2.6 MB would take ~0.6 us), so the defaults split the work finer at small batch (block_sizes);
triton_attend takes every block size as a keyword, for benchmarks/mla_attention_bench.py.

phasewatt::mla_decode_attention wraps them as one call that mutates the latent cache; on CPU
tensors it is the torch maths (attend_torch), which the layer's sdpa/matmul paths also run and
the kernels are tested against.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from phasewatt.models import pdl
from phasewatt.models.decode_attention import cache_slices, multiprocessors
from phasewatt.models.layers import apply_rope, decode_mask, rms_norm

# Block sizes: triton_attend's keywords default to these, chosen from a sweep of
# benchmarks/mla_attention_bench.py on an H200 (RESULTS.md, round 5). At most SMALL_BATCH
# sequences the kernels are latency-bound (too few programs to keep enough loads in flight).
SMALL_BATCH = 8
# Latent channels per absorb program: at batch 1 the heads alone would give too few programs
# to read W_UK fast.
ABSORB_CHANNELS = 64
# Heads that share each cached row in the partial kernel (a tensor-core product needs >= 16
# rows), at most / above SMALL_BATCH: 32 above read each row once for more heads (1.2x at batch
# 32); at small batch 16 gives more programs.
BLOCK_HEADS = 16
BLOCK_HEADS_LARGE = 32
# Cache positions per partial step (and the unit of its slices): 32 gave more programs at batch
# 1 but no faster step at 512 and a slower one at 2048 (1.14x for 64).
PARTIAL_POSITIONS = 64
PARTIAL_WARPS = 4
PARTIAL_STAGES = 3
# Sequences per program of the absorb kernel, and of the merge kernel above SMALL_BATCH (their
# per-head products, ditto); at most SMALL_BATCH the merge takes one sequence per program and
# reduces without a tensor-core product, loading all of a chunk's slices at once.
BLOCK_SEQS = 16
# v channels per merge program: a head split over v_dim / MERGE_V_BLOCK programs where smaller;
# 64 (MiniCPM3's whole v_dim: no split) measured as fast as 16 at batch 1 and 1.2x faster at
# batch 8, the slices' partials then read once per head.
MERGE_V_BLOCK = 64
MERGE_WARPS = 4
# Slices a one-sequence merge program loads per step (a [chunk, kv_lora] float32 tile).
MERGE_SLICE_CHUNK = 32
# At most this many cache slices by default (longer slices instead): each chunk of slices is
# one more round of loads in the merge, the chain's last kernel. At 1 x 2176 on an H100, 17
# slices of 128 positions where 34 of 64 were: 10.6 -> 10.2 us a layer (RESULTS.md, round 9).
PARTIAL_MAX_SLICES = MERGE_SLICE_CHUNK


def _power_of_two(n) -> bool:
    return isinstance(n, int) and n > 0 and not n & (n - 1)


def block_sizes(batch: int, kv_lora: int, v_dim: int, absorb_channels: int | None = None, partial_heads: int | None = None,
                partial_positions: int | None = None, partial_warps: int | None = None, partial_stages: int | None = None,
                partial_max_slices: int | None = None, merge_seqs: int | None = None, merge_v_block: int | None = None,
                merge_warps: int | None = None) -> dict:
    """The kernels' block sizes for a batch: each keyword given as a power of two (merge_seqs 1
    or >= 16; block sizes that feed a tensor-core product >= 16), None for the default above;
    absorb_channels and merge_v_block are capped at kv_lora and v_dim (powers of two, so the
    blocks tile them exactly)."""
    small = batch <= SMALL_BATCH
    sizes = {
        "absorb_channels": ABSORB_CHANNELS if absorb_channels is None else absorb_channels,
        "partial_heads": (BLOCK_HEADS if small else BLOCK_HEADS_LARGE) if partial_heads is None else partial_heads,
        "partial_positions": PARTIAL_POSITIONS if partial_positions is None else partial_positions,
        "partial_warps": PARTIAL_WARPS if partial_warps is None else partial_warps,
        "partial_stages": PARTIAL_STAGES if partial_stages is None else partial_stages,
        "partial_max_slices": PARTIAL_MAX_SLICES if partial_max_slices is None else partial_max_slices,
        "merge_seqs": (1 if small else BLOCK_SEQS) if merge_seqs is None else merge_seqs,
        "merge_warps": MERGE_WARPS if merge_warps is None else merge_warps,
    }
    if merge_v_block is None:
        merge_v_block = MERGE_V_BLOCK if sizes["merge_seqs"] == 1 else v_dim
    sizes["merge_v_block"] = merge_v_block
    for name in ("absorb_channels", "partial_heads", "partial_positions", "merge_v_block"):
        if not _power_of_two(sizes[name]) or sizes[name] < 16:
            raise ValueError(f"mla_decode_attention: {name} {sizes[name]!r}; allowed: powers of two >= 16")
    for name in ("partial_warps", "merge_warps"):
        if sizes[name] not in (1, 2, 4, 8, 16):
            raise ValueError(f"mla_decode_attention: {name} {sizes[name]!r}; allowed: 1, 2, 4, 8, 16")
    for name in ("partial_stages", "partial_max_slices"):
        if not isinstance(sizes[name], int) or isinstance(sizes[name], bool) or sizes[name] < 1:
            raise ValueError(f"mla_decode_attention: {name} {sizes[name]!r}; allowed: integers >= 1")
    if sizes["merge_seqs"] != 1 and not (_power_of_two(sizes["merge_seqs"]) and sizes["merge_seqs"] >= 16):
        raise ValueError(f"mla_decode_attention: merge_seqs {sizes['merge_seqs']!r}; allowed: 1 or powers of two >= 16")
    sizes["absorb_channels"] = min(sizes["absorb_channels"], kv_lora)
    sizes["merge_v_block"] = min(sizes["merge_v_block"], v_dim)
    return sizes


def fused_supported(kv_lora: int, rope: int, nope: int, v_dim: int, dtype: torch.dtype, device_type: str = "cuda") -> bool:
    """Whether the op takes this model: on CUDA its kernels' tensor-core products need each of
    kv_lora_rank, qk_rope_head_dim, qk_nope_head_dim, v_head_dim a power of two of at least 16
    and half-precision inputs (float32 ones would run as TF32, less exact than the torch form);
    elsewhere it is the torch form, which takes any."""
    if device_type != "cuda":
        return True
    return all(_power_of_two(n) and n >= 16 for n in (kv_lora, rope, nope, v_dim)) and dtype in (torch.bfloat16, torch.float16)


def fused_unsupported(name: str, kv_lora: int, rope: int, nope: int, v_dim: int, dtype: torch.dtype, device_type: str) -> str | None:
    """Why the op cannot take this model (the start of a one-line error), or None."""
    if fused_supported(kv_lora, rope, nope, v_dim, dtype, device_type):
        return None
    return (
        "'fused' needs power-of-two kv_lora_rank, qk_rope_head_dim, qk_nope_head_dim and v_head_dim, each >= 16, "
        f"in bfloat16/float16 on CUDA (models.{name}: {kv_lora}, {rope}, {nope}, {v_dim}, {dtype})"
    )


def split_query(q: torch.Tensor, n_heads: int, nope: int, rope: int):
    """q_b_proj's output [..., H (nope + rope)] -> q_nope [..., H, nope], q_pe [..., H, rope] (views)."""
    return q.unflatten(-1, (n_heads, nope + rope)).split([nope, rope], dim=-1)


def cache_entry(kv_a: torch.Tensor, kv_a_norm_weight: torch.Tensor, eps: float, cos, sin, rope_interleaved: bool) -> torch.Tensor:
    """kv_a_proj's output [B, S, kv_lora + rope] -> what the cache holds per token: the normed
    latent and the rotated shared key (cos, sin [S, rope] or [B, S, rope])."""
    b, s, width = kv_a.shape
    rope = cos.shape[-1]
    kv_lat, k_pe = kv_a.split([width - rope, rope], dim=-1)
    k_pe = apply_rope(k_pe.reshape(b, s, 1, rope), cos, sin, rope_interleaved).view(b, s, rope)
    return torch.cat([rms_norm(kv_lat, kv_a_norm_weight, eps), k_pe], dim=-1)


def up_weights(kv_b_weight: torch.Tensor, n_heads: int, nope: int, v_dim: int):
    """W_UK [H, nope, kv_lora] and W_UV [H, v, kv_lora]: views of kv_b_proj's weight."""
    w = kv_b_weight.view(n_heads, nope + v_dim, kv_b_weight.shape[-1])
    return w[:, :nope], w[:, nope:]


def attend_torch(q, kv_a, latent, input_pos, cos, sin, kv_a_norm_weight, kv_b_weight, eps: float, n_heads: int, nope: int,
                 v_dim: int, scale: float, rope_interleaved: bool, kind: str = "matmul", mask: torch.Tensor | None = None) -> torch.Tensor:
    """One absorbed decode step in torch: q [B, H (nope + rope)] (q_b_proj's output), kv_a
    [B, kv_lora + rope] (kv_a_proj's), latent [B, L, kv_lora + rope] (written at input_pos [1]),
    cos, sin [L, rope], kv_b_weight [H (nope + v), kv_lora]. Returns [B, H v]. The query is
    mapped into the latent space (q_lat rounded to the dtype), so the H heads attend to the
    cache as one shared key (kind "sdpa": one SDPA call; "matmul": two batched products around
    a float32 softmax) and the latent output (rounded) goes through W_UV. mask: the step's
    layers.decode_mask, when the caller has it; else made here."""
    b, cache_len, width = latent.shape
    rope = cos.shape[-1]
    kv_lora = width - rope
    cos, sin = cos[input_pos], sin[input_pos]
    q_nope, q_pe = split_query(q, n_heads, nope, rope)
    q_pe = apply_rope(q_pe.unsqueeze(1), cos, sin, rope_interleaved).squeeze(1)
    latent[:, input_pos] = cache_entry(kv_a.unsqueeze(1), kv_a_norm_weight, eps, cos, sin, rope_interleaved)
    w_uk, w_uv = up_weights(kv_b_weight, n_heads, nope, v_dim)
    q_lat = torch.einsum("bhn,hnc->bhc", q_nope, w_uk)
    query = torch.cat([q_lat, q_pe], dim=-1)  # [B, H, kv_lora + rope]
    if mask is None:
        mask = decode_mask(torch.arange(cache_len, device=q.device), input_pos, q.dtype)
    if kind == "sdpa":
        # One shared key head; the H query heads take the query-length axis.
        out_lat = F.scaled_dot_product_attention(
            query.unsqueeze(1), latent.unsqueeze(1), latent[:, :, :kv_lora].unsqueeze(1), attn_mask=mask.view(1, 1, 1, -1), scale=scale,
        ).squeeze(1)
    else:
        scores = torch.bmm(query, latent.transpose(1, 2)).float() * scale + mask
        probs = torch.softmax(scores, dim=-1).to(q.dtype)  # [B, H, L]
        out_lat = torch.bmm(probs, latent[:, :, :kv_lora])  # [B, H, kv_lora]
    return torch.einsum("bhc,hvc->bhv", out_lat, w_uv).reshape(b, n_heads * v_dim)


@torch.library.custom_op("phasewatt::mla_decode_attention", mutates_args=("latent",))
def mla_decode_attention(
    q: torch.Tensor, kv_a: torch.Tensor, latent: torch.Tensor, input_pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
    kv_a_norm_weight: torch.Tensor, kv_b_weight: torch.Tensor, eps: float, n_heads: int, nope: int, v_dim: int, scale: float,
    rope_interleaved: bool,
) -> torch.Tensor:
    """attend_torch as one call: the three Triton kernels on CUDA, the torch maths elsewhere."""
    args = (q, kv_a, latent, input_pos, cos, sin, kv_a_norm_weight, kv_b_weight, eps, n_heads, nope, v_dim, scale, rope_interleaved)
    if q.is_cuda:
        return triton_attend(*args)
    return attend_torch(*args)


@mla_decode_attention.register_fake
def _(q, kv_a, latent, input_pos, cos, sin, kv_a_norm_weight, kv_b_weight, eps, n_heads, nope, v_dim, scale, rope_interleaved):
    return q.new_empty((q.shape[0], n_heads * v_dim))


def triton_attend(q, kv_a, latent, input_pos, cos, sin, kv_a_norm_weight, kv_b_weight, eps, n_heads, nope, v_dim, scale,
                  rope_interleaved, sm_count: int | None = None, **blocks) -> torch.Tensor:
    """attend_torch through the three kernels (any device Triton runs on; sm_count defaults to
    the CUDA device's). blocks: block_sizes' keywords (absorb_channels, partial_heads,
    partial_positions, partial_warps, partial_stages, partial_max_slices, merge_seqs,
    merge_v_block, merge_warps); those left out take the defaults for this batch."""
    batch, cache_len, width = latent.shape
    rope = cos.shape[-1]
    kv_lora = width - rope
    name = "mla_decode_attention"
    if q.shape != (batch, n_heads * (nope + rope)) or kv_a.shape != (batch, width) or kv_b_weight.shape != (n_heads * (nope + v_dim), kv_lora):
        raise ValueError(
            f"{name}: q {tuple(q.shape)}, kv_a {tuple(kv_a.shape)}, kv_b {tuple(kv_b_weight.shape)} do not fit latent "
            f"{tuple(latent.shape)}, rope {rope} and {n_heads} heads of nope {nope}, v {v_dim}"
        )
    if not fused_supported(kv_lora, rope, nope, v_dim, q.dtype):
        raise ValueError(f"{name}: kv_lora {kv_lora}, rope {rope}, nope {nope}, v {v_dim} in {q.dtype}; the kernels need powers of two >= 16 in bf16/fp16")
    if latent.stride(-1) != 1 or kv_a.stride(-1) != 1 or kv_b_weight.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride() != cos.stride():
        raise ValueError(f"{name}: needs unit-stride rows of latent, kv_a and kv_b and cos/sin tables of one layout")
    if kv_a.dtype != q.dtype or latent.dtype != q.dtype or kv_b_weight.dtype != q.dtype:
        raise ValueError(f"{name}: q {q.dtype}, kv_a {kv_a.dtype}, latent {latent.dtype}, kv_b {kv_b_weight.dtype}: needs one dtype")
    sizes = block_sizes(batch, kv_lora, v_dim, **blocks)
    if sm_count is None:
        sm_count = multiprocessors(q.device.index if q.device.index is not None else torch.cuda.current_device())
    head_blocks = -(-n_heads // sizes["partial_heads"])
    slices, slice_len = cache_slices(batch, head_blocks, cache_len, sm_count, sizes["partial_positions"], sizes["partial_max_slices"])
    q = q.contiguous()
    absorb, partial, merge = _kernels()
    launch = pdl.launch_args(q.device)
    query = torch.empty(batch, n_heads, width, device=q.device, dtype=q.dtype)
    channels = sizes["absorb_channels"]
    # The first program of each (block of sequences, head) rotates q_pe (and, for head 0, writes
    # the cache entry: the longest program, started first); the others each take a block of
    # latent channels, so no program waits on two rounds of loads.
    absorb[(-(-batch // BLOCK_SEQS), n_heads, kv_lora // channels + 1)](
        q, kv_a, kv_a_norm_weight, kv_b_weight, cos, sin, input_pos, latent, query,
        batch, kv_a.stride(0), kv_b_weight.stride(0), cos.stride(0), latent.stride(0), latent.stride(1), float(eps),
        N_HEADS=n_heads, NOPE=nope, ROPE=rope, V_DIM=v_dim, KV_LORA=kv_lora, BLOCK_B=BLOCK_SEQS,
        BLOCK_C=channels, INTERLEAVED=bool(rope_interleaved), num_warps=4, **launch,
    )
    partial_max = torch.empty(batch, n_heads, slices, device=q.device, dtype=torch.float32)
    partial_sum = torch.empty_like(partial_max)
    partial_out = torch.empty(batch, n_heads, slices, kv_lora, device=q.device, dtype=torch.float32)
    partial[(batch * head_blocks, slices)](
        query, latent, input_pos, partial_max, partial_sum, partial_out,
        latent.stride(0), latent.stride(1), float(scale), slice_len, slices,
        N_HEADS=n_heads, HEAD_BLOCKS=head_blocks, BLOCK_H=sizes["partial_heads"], KV_LORA=kv_lora, ROPE=rope,
        BLOCK_L=sizes["partial_positions"], num_warps=sizes["partial_warps"], num_stages=sizes["partial_stages"], **launch,
    )
    out = torch.empty(batch, n_heads * v_dim, device=q.device, dtype=q.dtype)
    seqs = sizes["merge_seqs"]
    all_slices = max(2, 1 << (slices - 1).bit_length())
    merge[(-(-batch // seqs), n_heads, v_dim // sizes["merge_v_block"])](
        partial_max, partial_sum, partial_out, kv_b_weight, out,
        batch, slices, kv_b_weight.stride(0),
        N_HEADS=n_heads, NOPE=nope, V_DIM=v_dim, KV_LORA=kv_lora, BLOCK_B=seqs, BLOCK_S=all_slices,
        CHUNK_S=min(all_slices, MERGE_SLICE_CHUNK), BLOCK_V=sizes["merge_v_block"], num_warps=sizes["merge_warps"], **launch,
    )
    return out


@functools.lru_cache(maxsize=1)
def _kernels():
    """The three Triton kernels, compiled on first use (triton imported only here)."""
    import triton
    import triton.language as tl

    @triton.jit
    def absorb_kernel(
        q_ptr, kv_a_ptr, norm_ptr, kv_b_ptr, cos_ptr, sin_ptr, pos_ptr, latent_ptr, query_ptr,
        batch, stride_kv_a, stride_kv_b, stride_cos, stride_latent_b, stride_latent_l, eps,
        N_HEADS: tl.constexpr, NOPE: tl.constexpr, ROPE: tl.constexpr, V_DIM: tl.constexpr, KV_LORA: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr, INTERLEAVED: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        head = tl.program_id(1)
        rb = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
        b_ok = (rb < batch)[:, None]
        rn = tl.arange(0, NOPE)
        rc = (tl.program_id(2) - 1) * BLOCK_C + tl.arange(0, BLOCK_C)
        rr = tl.arange(0, ROPE)
        dtype = q_ptr.dtype.element_ty
        q_row = q_ptr + rb[:, None] * (N_HEADS * (NOPE + ROPE)) + head * (NOPE + ROPE)
        query_row = query_ptr + (rb * N_HEADS + head)[:, None] * (KV_LORA + ROPE)
        # This program's block of W_UK[h] (none for the rope program): a weight, written by no
        # kernel of the step, so read before the wait, overlapping the previous kernel's tail.
        w_uk = tl.load(kv_b_ptr + (head * (NOPE + V_DIM) + rn)[:, None] * stride_kv_b + rc[None, :], mask=tl.program_id(2) > 0, other=0.0)
        if USE_PDL:  # launched with PDL (models/pdl.py): wait for the previous kernel before reading q, kv_a
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        pos = tl.load(pos_ptr)
        if tl.program_id(2) > 0:
            # q_lat = q_nope W_UK[h], this program's channels (float32 accumulation, rounded
            # like the torch einsum).
            q_nope = tl.load(q_row + rn[None, :], mask=b_ok, other=0.0)
            tl.store(query_row + rc[None, :], tl.dot(q_nope, w_uk).to(dtype), mask=b_ok)
        else:  # the rotated q_pe, and the cache entry once per block of sequences
            # Rotate-half rope (layers.apply_rope): output channel j pairs with j +- ROPE/2. With
            # interleaved pairs the input is read in the half layout: channel j is 2j (first
            # half) or 2(j - ROPE/2) + 1 (second half).
            half = ROPE // 2
            partner = (rr + half) % ROPE
            src = rr
            src_partner = partner
            if INTERLEAVED:
                src = (rr % half) * 2 + rr // half
                src_partner = (partner % half) * 2 + partner // half
            cos = tl.load(cos_ptr + pos * stride_cos + rr)[None, :]
            sin = tl.load(sin_ptr + pos * stride_cos + rr)[None, :]
            sign = tl.where(rr < half, -1.0, 1.0)[None, :]
            x = tl.load(q_row + NOPE + src[None, :], mask=b_ok, other=0.0).to(tl.float32)
            x_partner = tl.load(q_row + NOPE + src_partner[None, :], mask=b_ok, other=0.0).to(tl.float32)
            tl.store(query_row + KV_LORA + rr[None, :], (x * cos + sign * x_partner * sin).to(dtype), mask=b_ok)
            if head == 0:
                # The new cache entry: RMSNorm of the latent (rounded as layers.rms_norm) and the
                # rotated shared key.
                all_channels = tl.arange(0, KV_LORA)
                kv_row = kv_a_ptr + rb[:, None] * stride_kv_a
                entry = latent_ptr + rb.to(tl.int64)[:, None] * stride_latent_b + pos * stride_latent_l
                c = tl.load(kv_row + all_channels[None, :], mask=b_ok, other=0.0).to(tl.float32)
                inv_rms = tl.rsqrt(tl.sum(c * c, axis=1) / KV_LORA + eps)[:, None]
                normed = (c * inv_rms).to(dtype).to(tl.float32) * tl.load(norm_ptr + all_channels)[None, :].to(tl.float32)
                tl.store(entry + all_channels[None, :], normed.to(dtype), mask=b_ok)
                k = tl.load(kv_row + KV_LORA + src[None, :], mask=b_ok, other=0.0).to(tl.float32)
                k_partner = tl.load(kv_row + KV_LORA + src_partner[None, :], mask=b_ok, other=0.0).to(tl.float32)
                tl.store(entry + KV_LORA + rr[None, :], (k * cos + sign * k_partner * sin).to(dtype), mask=b_ok)

    @triton.jit
    def partial_kernel(
        query_ptr, latent_ptr, pos_ptr, max_ptr, sum_ptr, out_ptr,
        stride_latent_b, stride_latent_l, scale, slice_len, slices,
        N_HEADS: tl.constexpr, HEAD_BLOCKS: tl.constexpr, BLOCK_H: tl.constexpr, KV_LORA: tl.constexpr, ROPE: tl.constexpr,
        BLOCK_L: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        if USE_PDL:  # launched with PDL (models/pdl.py): wait for the query and cache entry first
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        seq = tl.program_id(0) // HEAD_BLOCKS
        rh = (tl.program_id(0) % HEAD_BLOCKS) * BLOCK_H + tl.arange(0, BLOCK_H)
        h_ok = rh < N_HEADS
        part = tl.program_id(1)
        pos = tl.load(pos_ptr)
        rc = tl.arange(0, KV_LORA)
        rr = tl.arange(0, ROPE)
        dtype = query_ptr.dtype.element_ty
        query_row = query_ptr + (seq * N_HEADS + rh)[:, None] * (KV_LORA + ROPE)
        q_lat = tl.load(query_row + rc[None, :], mask=h_ok[:, None], other=0.0)
        q_pe = tl.load(query_row + KV_LORA + rr[None, :], mask=h_ok[:, None], other=0.0)
        rows = latent_ptr + seq.to(tl.int64) * stride_latent_b
        running_max = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
        running_sum = tl.zeros((BLOCK_H,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_H, KV_LORA), dtype=tl.float32)
        start = part * slice_len
        end = tl.minimum(start + slice_len, pos + 1)
        for l0 in range(start, end, BLOCK_L):
            rl = l0 + tl.arange(0, BLOCK_L)
            valid = rl <= pos
            row = rows + rl[:, None] * stride_latent_l
            c = tl.load(row + rc[None, :], mask=valid[:, None], other=0.0)  # [BLOCK_L, KV_LORA]: keys and values
            k_pe = tl.load(row + KV_LORA + rr[None, :], mask=valid[:, None], other=0.0)
            scores = (tl.dot(q_lat, tl.trans(c)) + tl.dot(q_pe, tl.trans(k_pe))) * scale
            scores = tl.where(valid[None, :], scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, axis=1))
            alpha = tl.exp(running_max - new_max)
            p = tl.exp(scores - new_max[:, None])
            running_sum = running_sum * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(dtype), c)
            running_max = new_max
        heads = seq * N_HEADS + rh
        tl.store(max_ptr + heads * slices + part, running_max, mask=h_ok)
        tl.store(sum_ptr + heads * slices + part, running_sum, mask=h_ok)
        tl.store(out_ptr + (heads.to(tl.int64) * slices + part)[:, None] * KV_LORA + rc[None, :], acc, mask=h_ok[:, None])

    @triton.jit
    def merge_kernel(
        max_ptr, sum_ptr, out_ptr, kv_b_ptr, y_ptr, batch, slices, stride_kv_b,
        N_HEADS: tl.constexpr, NOPE: tl.constexpr, V_DIM: tl.constexpr, KV_LORA: tl.constexpr, BLOCK_B: tl.constexpr,
        BLOCK_S: tl.constexpr, CHUNK_S: tl.constexpr, BLOCK_V: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        head = tl.program_id(1)
        rs = tl.arange(0, BLOCK_S)
        rc = tl.arange(0, KV_LORA)
        rv = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
        dtype = y_ptr.dtype.element_ty
        # This program's v channels of W_UV[h], read as [KV_LORA, BLOCK_V]: kv_b rows
        # head * (NOPE + V_DIM) + NOPE + v. A weight: read before the wait, as in absorb.
        w_uv = tl.load(kv_b_ptr + (head * (NOPE + V_DIM) + NOPE + rv)[None, :] * stride_kv_b + rc[:, None])
        if USE_PDL:  # launched with PDL (models/pdl.py): wait for the partials first
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        # Every program recomputes its rows' merge weights from all slices' max and sum (a few
        # hundred bytes), so the v split changes nothing in the merged output. Slices past the
        # position hold max -inf, sum 0 and no output: weight 0.
        if BLOCK_B == 1:
            seq = tl.program_id(0)
            row = seq * N_HEADS + head
            slice_max = tl.load(max_ptr + row * slices + rs, mask=rs < slices, other=float("-inf"))
            top = tl.max(slice_max, axis=0)
            total = tl.sum(tl.exp(slice_max - top) * tl.load(sum_ptr + row * slices + rs, mask=rs < slices, other=0.0), axis=0)
            acc = tl.zeros((KV_LORA,), dtype=tl.float32)
            for s0 in range(0, slices, CHUNK_S):
                rk = s0 + tl.arange(0, CHUNK_S)
                k_ok = rk < slices
                weight = tl.exp(tl.load(max_ptr + row * slices + rk, mask=k_ok, other=float("-inf")) - top)
                part = tl.load(out_ptr + (row.to(tl.int64) * slices + rk)[:, None] * KV_LORA + rc[None, :], mask=k_ok[:, None], other=0.0)
                acc += tl.sum(weight[:, None] * part, axis=0)
            out_lat = (acc / total).to(dtype).to(tl.float32)  # rounded like the torch form's latent output
            y = tl.sum(out_lat[:, None] * w_uv.to(tl.float32), axis=0)
            tl.store(y_ptr + seq * (N_HEADS * V_DIM) + head * V_DIM + rv, y.to(dtype))
        else:
            rb = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
            b_ok = rb < batch
            heads = rb * N_HEADS + head  # [B, H] rows of the partials
            slice_max = tl.load(max_ptr + heads[:, None] * slices + rs[None, :], mask=b_ok[:, None] & (rs < slices)[None, :], other=float("-inf"))
            top = tl.max(slice_max, axis=1)
            top = tl.where(b_ok, top, 0.0)  # rows past the batch: no slice, no NaN
            total = tl.zeros((BLOCK_B,), dtype=tl.float32)
            acc = tl.zeros((BLOCK_B, KV_LORA), dtype=tl.float32)
            for s in range(slices):
                weight = tl.exp(tl.load(max_ptr + heads * slices + s, mask=b_ok, other=float("-inf")) - top)
                total += weight * tl.load(sum_ptr + heads * slices + s, mask=b_ok, other=0.0)
                part = tl.load(out_ptr + (heads.to(tl.int64) * slices + s)[:, None] * KV_LORA + rc[None, :], mask=b_ok[:, None], other=0.0)
                acc += weight[:, None] * part
            out_lat = (acc / tl.where(b_ok, total, 1.0)[:, None]).to(dtype)  # rounded like the torch form's latent output
            y = tl.dot(out_lat, w_uv)
            tl.store(y_ptr + rb[:, None] * (N_HEADS * V_DIM) + head * V_DIM + rv[None, :], y.to(dtype), mask=b_ok[:, None])

    return absorb_kernel, partial_kernel, merge_kernel
