"""Weight-streaming matrix products for the decode step at batch 1.

A decode step at batch 1 is a chain of matrix-vector products: each reads a weight matrix
once and does two FLOPs per weight, so its time is the matrix's bytes over the memory
bandwidth, or should be. On an H200, cuBLAS read our models' layer weights at 45-92% of the
copy bandwidth (8% for MLA's smallest) and inductor's reductions at 58-90% (RESULTS.md). This
is a Triton kernel for y = x W^T with few rows of x: each program streams BLOCK_N whole rows
of W in BLOCK_K-wide tiles and keeps the products in float32 registers until the end. What
surrounds a product in a layer rides on it: an RMSNorm of x before it (+ delta, the residual
add, whose sum it writes once; optionally gated by SiLU(z); the norm's weight folded into W
where the engine sends the decode products here, fold_norm_weights, so no weight is loaded
per tile), and after it a scale, a
residual add, or SiLU(gate) * up of a [gate; up] weight's two products (the MLP's gate_up,
whose down product is then a plain one). Block sizes per (variant, rows, N, K) come from a
table measured on each GPU model by benchmarks/gemv_sweep.py (gemv_configs/<GPU name>.json),
else a size rule.

On Hopper and later the kernel is launched with programmatic dependent launch (models/pdl.py): it
starts while the kernel before it finishes, loads its first weight tile, then waits for that
kernel before reading x or writing anything, so its ramp-up overlaps the other's tail.

The custom ops phasewatt::gemv and gemv_rmsnorm wrap it, so a compiled layer keeps each as
one call and fuses its other elementwise work around them. On CPU tensors the ops are the
modules' maths in torch: triton is never imported there.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from phasewatt.models import pdl

CONFIG_DIR = Path(__file__).with_name("gemv_configs")
CONFIG_KEYS = ("BLOCK_N", "BLOCK_K", "num_warps", "num_stages")
# The kernel takes products of at most MAX_ROWS rows; the engine's gemv_max_rows "auto" sends
# those of at most AUTO_ROWS rows to it (decode at batch <= AUTO_ROWS), the rest to cuBLAS.
MAX_ROWS = 8
AUTO_ROWS = 1


def rows_bucket(rows: int) -> int:
    """The power of two >= rows that a kernel is compiled and tuned for (BLOCK_M)."""
    return 1 << max(0, rows - 1).bit_length()


def default_config(rows: int, n: int, k: int) -> dict:
    """A size rule for shapes the table lacks: K tiles of 512 (fewer for short rows), and rows
    per program so that the grid has about 1000 programs (a few per multiprocessor, enough
    loads in flight on each), at most 16 rows, fewer when several x rows share a program."""
    block_k = min(512, max(64, 1 << (k - 1).bit_length()))
    block_n = 1
    while block_n < 16 and n // (2 * block_n) >= 1024:
        block_n *= 2
    block_n = max(1, block_n // rows_bucket(rows))
    return {"BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": 4, "num_stages": 2}


def variant_name(norm: bool, norm_weight: bool, glu: bool) -> str:
    """The kernel variant a call runs: plain, norm (RMSNorm prologue with its weight) or rms
    (the weight folded into the matrix: fold_norm_weights), each with _glu when the epilogue
    takes SiLU(gate) * up of the products (gate_up weights)."""
    base = ("norm" if norm_weight else "rms") if norm else "plain"
    return base + "_glu" if glu else base


def config_key(rows: int, n: int, k: int, variant: str = "plain") -> str:
    """'rows,N,K' for the plain product, 'variant:rows,N,K' for a fused one (variant_name):
    each is tuned on its own, since a prologue adds loads and arithmetic per weight tile.
    N is the weight's rows (twice the output for _glu)."""
    shape = f"{rows_bucket(rows)},{n},{k}"
    return shape if variant == "plain" else f"{variant}:{shape}"


def table_path(device_name: str) -> Path:
    return CONFIG_DIR / (device_name.replace(" ", "_").replace("/", "_") + ".json")


@functools.lru_cache(maxsize=None)
def load_table(device_name: str) -> dict:
    """The tuned configs for this GPU model: {"rows,N,K": {BLOCK_N, BLOCK_K, num_warps,
    num_stages}}; empty when none were measured."""
    path = table_path(device_name)
    if not path.is_file():
        return {}
    return json.loads(path.read_text())["configs"]


def config_for(device_name: str, rows: int, n: int, k: int, variant: str = "plain") -> dict:
    """The tuned config of this variant and weight shape [n, k], else the plain product's, else
    the size rule. A _glu program reads BLOCK_N gate and BLOCK_N up rows, so the plain and rule
    configs give it half their BLOCK_N (the same weight bytes per program)."""
    table = load_table(device_name)
    tuned = table.get(config_key(rows, n, k, variant))
    if tuned:
        return {key: tuned[key] for key in CONFIG_KEYS}
    plain = table.get(config_key(rows, n, k))
    config = {key: plain[key] for key in CONFIG_KEYS} if plain else default_config(rows, n, k)
    if variant.endswith("_glu"):
        config["BLOCK_N"] = max(1, config["BLOCK_N"] // 2)
    return config


@functools.lru_cache(maxsize=1)
def _kernel():
    """The Triton kernel, compiled on first use (triton imported only here). Its helpers are
    module globals: the interpreter (TRITON_INTERPRET=1) resolves a kernel's names there only."""
    global load_weight_tile, accumulate_tile
    import triton
    import triton.language as tl

    @triton.jit
    def load_weight_tile(w_ptrs, up_ptrs, k_ok, EVEN_K: tl.constexpr, GLU: tl.constexpr):
        """One BLOCK_K-wide tile of the program's weight rows (and of their up rows for GLU;
        else the gate tile again, unused)."""
        if EVEN_K:
            w = tl.load(w_ptrs)
        else:
            w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
        w_up = w
        if GLU:
            if EVEN_K:
                w_up = tl.load(up_ptrs)
            else:
                w_up = tl.load(up_ptrs, mask=k_ok[None, :], other=0.0)
        return w, w_up

    @triton.jit
    def accumulate_tile(
        acc, acc_up, squares, w, w_up, x_ptr, d_ptr, s_ptr, z_ptr, g_ptr, x_offsets, z_offsets, k0, k_ok, x_mask, rk, pid,
        g_offset, BLOCK_M: tl.constexpr, NORM: tl.constexpr, NORM_WEIGHT: tl.constexpr, HAS_DELTA: tl.constexpr,
        GATE: tl.constexpr, GLU: tl.constexpr,
    ):
        """The products of one K tile: x's tile (through the norm prologue) times the loaded
        weight tile, added to the float32 accumulators. k_ok: the tile's columns inside K;
        x_mask: and the rows inside M."""
        x = tl.load(x_ptr + x_offsets, mask=x_mask, other=0.0).to(tl.float32)
        if NORM:
            if HAS_DELTA:  # the residual sum x + delta, written once (by program 0)
                x += tl.load(d_ptr + x_offsets, mask=x_mask, other=0.0).to(tl.float32)
                tl.store(s_ptr + x_offsets, x.to(s_ptr.dtype.element_ty), mask=x_mask & (pid == 0))
            if GATE:  # x * SiLU(z) before the norm (Mamba2's gated norm)
                z = tl.load(z_ptr + z_offsets, mask=x_mask, other=0.0).to(tl.float32)
                x = x * z * tl.sigmoid(z)
            squares += x * x
            if NORM_WEIGHT:  # else folded into the weight (fold_norm_weights)
                g = tl.load(g_ptr + k0 + rk, mask=k_ok, other=0.0).to(tl.float32) + g_offset
                x = x * g[None, :]
        if BLOCK_M == 1:
            acc += w.to(tl.float32) * x
            if GLU:
                acc_up += w_up.to(tl.float32) * x
        else:
            acc += tl.sum(w.to(tl.float32)[None, :, :] * x[:, None, :], axis=2)
            if GLU:
                acc_up += tl.sum(w_up.to(tl.float32)[None, :, :] * x[:, None, :], axis=2)
        return acc, acc_up, squares

    @triton.jit
    def gemv_kernel(
        x_ptr, w_ptr, y_ptr, d_ptr, s_ptr, z_ptr, g_ptr, r_ptr, M, N, K, stride_xm, stride_zm, stride_wn, stride_ym,
        eps, g_offset, out_scale,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
        NORM: tl.constexpr, NORM_WEIGHT: tl.constexpr, HAS_DELTA: tl.constexpr, GATE: tl.constexpr,
        GLU: tl.constexpr, HAS_RESIDUAL: tl.constexpr, EARLY_W: tl.constexpr, USE_PDL: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M)
        rk = tl.arange(0, BLOCK_K)
        n_ok = rn < N
        m_ok = rm < M
        # Rows past N read row 0 instead of masking: the weight stream stays unmasked.
        rows = tl.where(n_ok, rn, 0).to(tl.int64)
        w_ptrs = w_ptr + rows[:, None] * stride_wn + rk[None, :]
        up_ptrs = w_ptrs + N * stride_wn  # GLU: the up row N below each gate row
        x_offsets = rm[:, None] * stride_xm + rk[None, :]
        z_offsets = rm[:, None] * stride_zm + rk[None, :]
        if BLOCK_M == 1:
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros_like(acc)
        squares = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        if EARLY_W:
            # The first weight tile is loaded before anything another kernel writes: no
            # kernel of a decode step writes a weight, so under PDL these loads overlap the
            # previous kernel's tail.
            # (Names of their own: a name assigned before the loop and in it would be carried
            # through the loop.)
            k_ok_first = rk < K
            w_first, w_up_first = load_weight_tile(w_ptrs, up_ptrs, k_ok_first, EVEN_K, GLU)
        if USE_PDL:
            # Every read of x, delta, z, residual and every store comes after this wait for
            # the previous grid's completion and the visibility of its writes.
            tl.extra.cuda.gdc_wait()
            # The next PDL kernel may launch once every program of this grid has passed here:
            # all of them are resident then (the next grid takes no slot one of ours waits
            # for) and their predecessor is done (no third grid piles up), so the next grid's
            # programs start in the slots ours leave as they finish and issue their first
            # weight tile during our tail. Later, after the K loop, it would launch only once
            # the slowest program's loads are done, leaving the freed slots idle through the
            # tail. Its own gdc_wait orders its reads after our end either way.
            tl.extra.cuda.gdc_launch_dependents()
        if EARLY_W:  # the peeled first tile, then the loop from the second
            acc, acc_up, squares = accumulate_tile(
                acc, acc_up, squares, w_first, w_up_first, x_ptr, d_ptr, s_ptr, z_ptr, g_ptr, x_offsets, z_offsets, 0, k_ok_first,
                m_ok[:, None] & k_ok_first[None, :], rk, pid, g_offset, BLOCK_M, NORM, NORM_WEIGHT, HAS_DELTA, GATE, GLU,
            )
            w_ptrs += BLOCK_K
            up_ptrs += BLOCK_K
            x_offsets += BLOCK_K
            z_offsets += BLOCK_K
        for k0 in range(BLOCK_K if EARLY_W else 0, K, BLOCK_K):
            k_ok = (k0 + rk) < K
            x_mask = m_ok[:, None] & k_ok[None, :]
            w, w_up = load_weight_tile(w_ptrs, up_ptrs, k_ok, EVEN_K, GLU)
            acc, acc_up, squares = accumulate_tile(
                acc, acc_up, squares, w, w_up, x_ptr, d_ptr, s_ptr, z_ptr, g_ptr, x_offsets, z_offsets, k0, k_ok, x_mask, rk,
                pid, g_offset, BLOCK_M, NORM, NORM_WEIGHT, HAS_DELTA, GATE, GLU,
            )
            w_ptrs += BLOCK_K
            up_ptrs += BLOCK_K
            x_offsets += BLOCK_K
            z_offsets += BLOCK_K
        if BLOCK_M == 1:
            y = tl.sum(acc, axis=1)[None, :]
            y_up = tl.sum(acc_up, axis=1)[None, :]
        else:
            y = acc
            y_up = acc_up
        scale = out_scale
        if NORM:  # the RMS factor of each row of x factors out of its dot products
            scale = tl.rsqrt(tl.sum(squares, axis=1) / K + eps)[:, None] * out_scale
        y = y * scale
        if GLU:  # SiLU(gate) * up, from the gate and up products of the same x
            y = y * tl.sigmoid(y) * (y_up * scale)
        y_offsets = rm[:, None] * stride_ym + rn[None, :]
        y_mask = m_ok[:, None] & n_ok[None, :]
        if HAS_RESIDUAL:
            y += tl.load(r_ptr + y_offsets, mask=y_mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + y_offsets, y.to(y_ptr.dtype.element_ty), mask=y_mask)

    return gemv_kernel


def _launch_args(device: torch.device) -> dict:
    """PDL's launch arguments (models/pdl.py), plus EARLY_W: the first weight tile loaded
    before the wait, whenever the kernel waits at all."""
    args = pdl.launch_args(device)
    return {**args, "EARLY_W": args["USE_PDL"]}


def triton_gemv(
    x: torch.Tensor, weight: torch.Tensor, config: dict | None = None, *, delta=None, gate=None, norm_weight=None,
    rms: bool = False, eps: float = 0.0, norm_offset: float = 0.0, glu: bool = False, residual=None,
    out_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y = out_scale * f(x) @ weight.T (+ residual) on CUDA through the kernel, for x [..., K]
    of at most MAX_ROWS rows. f: identity, or
    RMSNorm((x + delta) * SiLU(gate)) * (norm_weight + norm_offset) (norm_weight given, or
    rms=True for a norm whose weight is folded into `weight`; delta and gate optional), in
    which case the sum x + delta is returned too. glu: weight is [gate; up] (2N rows) and y
    the N-wide SiLU(x W_gate^T) * (x W_up^T). config: block sizes (CONFIG_KEYS), else the tuned
    table or the size rule. Returns (y, sum or None)."""
    n_weight, k = weight.shape
    norm = norm_weight is not None or rms
    if glu and n_weight % 2:
        raise ValueError(f"gemv: glu needs a [gate; up] weight of an even number of rows, got {n_weight}")
    n = n_weight // 2 if glu else n_weight
    if x.shape[-1] != k:
        raise ValueError(f"gemv: x has {x.shape[-1]} columns; the weight [{n_weight}, {k}] needs {k}")
    if (delta is not None or gate is not None) and not norm:
        raise ValueError("gemv: delta and gate are inputs of the norm prologue; give norm_weight or rms=True")
    for name, t in (("delta", delta), ("gate", gate)):
        if t is not None and t.shape[-1] != k:
            raise ValueError(f"gemv: {name} has {t.shape[-1]} columns, x has {k}")
    if norm_weight is not None and norm_weight.numel() != k:
        raise ValueError(f"gemv: norm_weight has {norm_weight.numel()} elements, x has {k} columns")
    x2 = x.reshape(-1, x.shape[-1])
    # delta and the written sum share x's offsets in the kernel: all three packed rows.
    if x2.stride(-1) != 1 or (delta is not None and x2.stride(0) != k):
        x2 = x2.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    rows = x2.shape[0]
    if config is None:
        variant = variant_name(norm, norm_weight is not None, glu)
        config = config_for(torch.cuda.get_device_name(x.device), rows, n_weight, k, variant)
    y = torch.empty((rows, n), device=x.device, dtype=weight.dtype)
    d2 = delta.reshape(rows, k).contiguous() if delta is not None else x2
    total = torch.empty_like(x2) if delta is not None else None
    r2 = residual.reshape(rows, n).contiguous() if residual is not None else y
    z2 = gate.reshape(rows, k) if gate is not None else x2
    if z2.stride(-1) != 1:
        z2 = z2.contiguous()
    grid = ((n + config["BLOCK_N"] - 1) // config["BLOCK_N"],)
    _kernel()[grid](
        x2, weight, y, d2, total if total is not None else x2, z2, norm_weight if norm_weight is not None else weight, r2,
        rows, n, k, x2.stride(0), z2.stride(0), weight.stride(0), y.stride(0), float(eps), float(norm_offset), float(out_scale),
        BLOCK_M=rows_bucket(rows), BLOCK_N=config["BLOCK_N"], BLOCK_K=config["BLOCK_K"], EVEN_K=k % config["BLOCK_K"] == 0,
        NORM=norm, NORM_WEIGHT=norm_weight is not None, HAS_DELTA=delta is not None, GATE=gate is not None,
        GLU=glu, HAS_RESIDUAL=residual is not None,
        num_warps=config["num_warps"], num_stages=config["num_stages"], **_launch_args(x.device),
    )
    return y.view(*x.shape[:-1], n), (total.view(x.shape) if total is not None else None)


# ----- the custom ops: one call each inside a compiled graph; plain torch on CPU ----------------
def _rms_normed(x: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: float) -> torch.Tensor:
    """x / rms(x) * (weight + offset) computed in float32, cast back once (layers.RMSNorm casts
    before the weight product: equal in float32, up to one bf16 rounding apart in bfloat16);
    weight None: folded into the next product, x / rms(x) alone."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * (weight.float() + offset) if weight is not None else x32).to(x.dtype)


def silu_gate_up(y: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up of y = [gate | up] (the SwiGLU activation; the kernel's GLU epilogue)."""
    gate, up = y.chunk(2, dim=-1)
    return F.silu(gate) * up


@torch.library.custom_op("phasewatt::gemv", mutates_args=())
def gemv(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None, out_scale: float = 1.0) -> torch.Tensor:
    """out_scale * x @ weight.T (+ residual): the Triton kernel on CUDA, F.linear elsewhere."""
    if x.is_cuda:
        return triton_gemv(x, weight, residual=residual, out_scale=out_scale)[0]
    return _epilogue(F.linear(x, weight), residual, out_scale)


def _epilogue(y: torch.Tensor, residual: torch.Tensor | None, out_scale: float) -> torch.Tensor:
    """residual + out_scale * y: the kernel's epilogue, in torch (CPU ops, unfused paths)."""
    y = y * out_scale if out_scale != 1.0 else y
    return residual + y if residual is not None else y


def _product_like(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The fake (meta) output of a product of x with weight."""
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=weight.dtype)


gemv.register_fake(lambda x, weight, residual=None, out_scale=1.0: _product_like(x, weight))


@torch.library.custom_op("phasewatt::gemv_rmsnorm", mutates_args=())
def gemv_rmsnorm(
    x: torch.Tensor, delta: torch.Tensor | None, gate: torch.Tensor | None, norm_weight: torch.Tensor | None, eps: float,
    norm_offset: float, weight: torch.Tensor, residual: torch.Tensor | None = None, out_scale: float = 1.0, glu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out_scale * RMSNorm((x + delta) * SiLU(gate)) @ weight.T (+ residual), x + delta);
    delta and gate optional; without delta the second output is empty (the sum is x itself).
    norm_weight None: the norm's weight is folded into `weight`. glu: weight is [gate; up] and
    the product's SiLU(gate) * up is returned (before the residual add)."""
    if x.is_cuda:
        y, total = triton_gemv(
            x, weight, delta=delta, gate=gate, norm_weight=norm_weight, rms=True, eps=eps, norm_offset=norm_offset,
            glu=glu, residual=residual, out_scale=out_scale,
        )
        return y, (total if total is not None else x.new_empty(0))
    total = x + delta if delta is not None else x
    gated = total.float() * F.silu(gate.float()) if gate is not None else total
    normed = _rms_normed(gated, norm_weight, eps, norm_offset).to(weight.dtype)
    normed = normed * out_scale if out_scale != 1.0 else normed
    y = F.linear(normed, weight)
    return _epilogue(silu_gate_up(y) if glu else y, residual, 1.0), (total if delta is not None else x.new_empty(0))


@gemv_rmsnorm.register_fake
def _(x, delta, gate, norm_weight, eps, norm_offset, weight, residual=None, out_scale=1.0, glu=False):
    y = x.new_empty((*x.shape[:-1], weight.shape[0] // 2 if glu else weight.shape[0]), dtype=weight.dtype)
    return y, (torch.empty_like(x) if delta is not None else x.new_empty(0))


# ----- what the models call ---------------------------------------------------------------------
def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gemv_max_rows: int = 0) -> torch.Tensor:
    """F.linear, through the GEMV kernel when x has 1..gemv_max_rows rows (decode steps)."""
    if _takes(x, gemv_max_rows):
        y = torch.ops.phasewatt.gemv(x, weight)
        return y + bias if bias is not None else y
    return F.linear(x, weight, bias)


def _takes(x: torch.Tensor, gemv_max_rows: int) -> bool:
    return bool(gemv_max_rows) and x.numel() // x.shape[-1] <= gemv_max_rows


def _fuses(x: torch.Tensor, lin: "Linear") -> bool:
    """Whether lin's product of x goes through the kernel with its neighbours fused in."""
    return lin.gemv_fuse and lin.bias is None and _takes(x, lin.gemv_max_rows)


def norm_linear(x, delta, norm: nn.Module, lin: "Linear", out_scale: float = 1.0):
    """(lin(norm(x + delta) * out_scale), x + delta), delta optional. Through the kernel the
    residual add and the norm are its prologue (one kernel instead of three); otherwise the
    modules run as they are. `norm` needs weight, eps and weight_offset (0 for x * w, 1 for
    the zero-centred x * (1 + w))."""
    if _fuses(x, lin):
        y, total = torch.ops.phasewatt.gemv_rmsnorm(x, delta, None, _norm_weight(norm), norm.eps, norm.weight_offset, lin.weight, None, out_scale)
        return y, (total if delta is not None else x)
    total = x + delta if delta is not None else x
    normed = norm(total)
    return lin(normed * out_scale if out_scale != 1.0 else normed), total


def residual_linear(x, lin: "Linear", residual, out_scale: float = 1.0):
    """residual + lin(x) * out_scale; through the kernel the add is its epilogue."""
    if _fuses(x, lin):
        return torch.ops.phasewatt.gemv(x, lin.weight, residual, out_scale)
    return _epilogue(lin(x), residual, out_scale)


def gated_norm_residual(x, gate, norm: nn.Module, lin: "Linear", residual):
    """residual + lin(norm(x, gate)) for a norm of x * SiLU(gate) over the whole row (Mamba2's
    gated RMSNorm with one group, x possibly float32); through the kernel the gate and norm
    are its prologue and the add its epilogue. Mamba2's decode passes gate None: its SSD step
    kernel applies the gate, which spares this prologue a second input stream per tile."""
    if _fuses(x, lin) and norm.n_groups == 1:
        return torch.ops.phasewatt.gemv_rmsnorm(x, None, gate, _norm_weight(norm), norm.eps, 0.0, lin.weight, residual, 1.0)[0]
    return residual + lin(norm(x, gate))


def _norm_weight(norm: nn.Module) -> torch.Tensor | None:
    """What the kernel's prologue multiplies by: the norm's weight, or None once folded."""
    return None if getattr(norm, "folded", False) else norm.weight


def norm_mlp_residual(h, norm: nn.Module, mlp: nn.Module, out_scale: float = 1.0):
    """h + out_scale * mlp(norm(h)) for a SwiGLU mlp (gate_up, down), as (h, delta). Through
    the kernel: the norm is the gate_up product's prologue and SiLU(gate) * up its epilogue,
    the add the down product's epilogue ((h + y, None)); otherwise (h, y), the add left to the
    caller's next norm."""
    if _fuses(h, mlp.gate_up) and _fuses(h, mlp.down):
        act = torch.ops.phasewatt.gemv_rmsnorm(h, None, None, _norm_weight(norm), norm.eps, norm.weight_offset, mlp.gate_up.weight, None, 1.0, True)[0]
        return torch.ops.phasewatt.gemv(act, mlp.down.weight, h, out_scale), None
    gate_up, h = norm_linear(h, None, norm, mlp.gate_up)
    return h, _epilogue(mlp.down(silu_gate_up(gate_up)), None, out_scale)


@torch.no_grad()
def fold_norm_weights(model: nn.Module) -> int:
    """Multiply each norm's scale (weight + weight_offset) into the input columns of the
    products it feeds (the pairs the model's layers list in norm_folds()), leaving the norm a
    plain x / rms(x): the model computes the same function (one more bf16 rounding of those
    weights), and the decode kernel no longer loads and multiplies a norm weight per tile.
    Returns how many norms it folded; a second call folds nothing."""
    folded = 0
    for module in model.modules():
        for norm, linears in getattr(module, "norm_folds", lambda: ())():
            if getattr(norm, "folded", False):
                continue
            scale = norm.weight.float() + norm.weight_offset
            for lin in linears:
                lin.weight.copy_((lin.weight.float() * scale).to(lin.weight.dtype))
            norm.weight.fill_(1.0 - norm.weight_offset)
            norm.folded = True
            folded += 1
    return folded


class Linear(nn.Linear):
    """nn.Linear whose small-batch products can go through the GEMV kernel (gemv_max_rows > 0,
    set by use_gemv)."""

    gemv_max_rows = 0
    gemv_fuse = True  # norm_linear & co. may fuse its neighbours into the kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.gemv_max_rows)


def use_gemv(model: nn.Module, max_rows: int, fuse: bool = True) -> int:
    """Route the products of every Linear of `model` (tied output projections are Linears
    sharing the embedding's weight) with at most max_rows rows through the kernel; 0 turns
    it off. fuse: the norms, SiLU*up and residual adds around them as the kernel's prologue
    and epilogue (else inductor fuses them into kernels of their own). Returns how many
    Linears it set."""
    if not 0 <= max_rows <= MAX_ROWS:
        raise ValueError(f"gemv max_rows {max_rows}; allowed: 0..{MAX_ROWS}")
    count = 0
    for module in model.modules():
        if isinstance(module, Linear):
            module.gemv_max_rows = max_rows
            module.gemv_fuse = fuse
            count += 1
    return count
