"""The greedy next token of a decode step, and the position advance, in two small kernels.

torch's argmax over one row of MiniCPM3's 73448 logits ran as a single 23 us reduction on an
H100 (RESULTS.md, round 7), followed by a copy into the token buffer and the position's add:
~26 us a step of ~3.7 ms, run by one block while the rest of the GPU waits. Here a first kernel
splits each row into CHUNK-wide slices, one program each, and writes every slice's max and the
first index reaching it; a second, one program per row, picks the first slice holding the
row's max, writes the token in place and (its first program) advances the position. The result
is torch.argmax's: the first index of the maximum. NaN logits aside: torch takes the first NaN
as the maximum; here NaN counts as -inf, so a row with some NaN gives the maximum of the rest
and a row of NaN only index 0 (as torch).

Elsewhere (CPU tensors, logits not in float16/bfloat16/float32, a CUDA torch without Triton)
it is torch.argmax, copy and add.
"""

from __future__ import annotations

import functools

import torch

from phasewatt.models import pdl

CHUNK = 1024
WARPS = 4
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # compared in float32 without loss


def next_tokens_(logits: torch.Tensor, tokens: torch.Tensor, position: torch.Tensor | None = None) -> None:
    """tokens[b] = argmax(logits[b]) for logits [B, V] (the first index of the maximum), and
    position [1] += 1 when given; both in place (static buffers of a captured step)."""
    if logits.dim() != 2 or tokens.shape != (logits.shape[0],):
        raise ValueError(f"next_tokens_: logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)}; need [B, V] and [B]")
    if position is not None and position.shape != (1,):
        raise ValueError(f"next_tokens_: position {tuple(position.shape)}; need [1]")
    if not (logits.is_cuda and logits.dtype in KERNEL_DTYPES and pdl.triton_importable()):
        tokens.copy_(logits.argmax(dim=-1))
        if position is not None:
            position.add_(1)
        return
    triton_next_tokens_(logits, tokens, position)


def triton_next_tokens_(logits: torch.Tensor, tokens: torch.Tensor, position: torch.Tensor | None = None,
                        chunk: int = CHUNK) -> None:
    """next_tokens_ through the two kernels (any device Triton runs on); chunk: logits per
    program of the first kernel, a power of two."""
    if chunk < 1 or chunk & (chunk - 1):
        raise ValueError(f"next_tokens_: chunk {chunk!r}; allowed: a power of two")
    batch, vocab = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    chunks = -(-vocab // chunk)
    slice_max = torch.empty(batch, chunks, device=logits.device, dtype=torch.float32)
    slice_index = torch.empty(batch, chunks, device=logits.device, dtype=torch.int32)
    launch = pdl.launch_args(logits.device)
    slices, pick = _kernels()
    slices[(batch, chunks)](logits, slice_max, slice_index, vocab, logits.stride(0), chunks, CHUNK=chunk, num_warps=WARPS, **launch)
    pick[(batch,)](
        slice_max, slice_index, tokens, position if position is not None else tokens, chunks,
        ALL_CHUNKS=max(2, 1 << (chunks - 1).bit_length()), ADVANCE=position is not None, num_warps=WARPS, **launch,
    )


@functools.lru_cache(maxsize=1)
def _kernels():
    """The two Triton kernels, compiled on first use (triton imported only here)."""
    import triton
    import triton.language as tl

    @triton.jit
    def slice_kernel(logits_ptr, max_ptr, index_ptr, vocab, stride_row, chunks, CHUNK: tl.constexpr, USE_PDL: tl.constexpr):
        if USE_PDL:  # launched with PDL (models/pdl.py): the head product writes the logits
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        row = tl.program_id(0)
        part = tl.program_id(1)
        cols = part * CHUNK + tl.arange(0, CHUNK)
        x = tl.load(logits_ptr + row.to(tl.int64) * stride_row + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        x = tl.where(x == x, x, float("-inf"))  # NaN counts as -inf
        top = tl.max(x, axis=0)
        first = tl.min(tl.where(x == top, cols, vocab), axis=0)  # the first column reaching the max
        tl.store(max_ptr + row * chunks + part, top)
        tl.store(index_ptr + row * chunks + part, first)

    @triton.jit
    def pick_kernel(max_ptr, index_ptr, tokens_ptr, position_ptr, chunks, ALL_CHUNKS: tl.constexpr,
                    ADVANCE: tl.constexpr, USE_PDL: tl.constexpr):
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        row = tl.program_id(0)
        parts = tl.arange(0, ALL_CHUNKS)
        ok = parts < chunks
        tops = tl.load(max_ptr + row * chunks + parts, mask=ok, other=float("-inf"))
        top = tl.max(tops, axis=0)
        best = tl.min(tl.where(ok & (tops == top), parts, ALL_CHUNKS), axis=0)  # the first slice holding it
        tl.store(tokens_ptr + row, tl.load(index_ptr + row * chunks + best).to(tokens_ptr.dtype.element_ty))
        if ADVANCE:
            if row == 0:
                tl.store(position_ptr, tl.load(position_ptr) + 1)

    return slice_kernel, pick_kernel
