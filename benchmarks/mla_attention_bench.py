"""The fused MLA decode attention op against the compiled matmuls it replaces, on this GPU.

MiniCPM3-4B's attention shapes (40 heads, kv_lora 256, rope 32, nope 64, v 64) at each batch of
--batches and each cache:position of --caches. Each row times --layers back-to-back calls, each
on its own layer's kv_b weight and latent cache (together many times the L2 cache, as in a
decode step), captured in one CUDA graph and replayed (median of --reps), and reports:
- us per call per layer;
- the bytes a call must read (W_UK + W_UV: the layer's kv_b; the cache rows 0..pos) and that
  rate's share of the device-to-device copy bandwidth measured in the same run
  (decode_roofline's probe);
- the relative error of layer 0's output against the torch form.

Rows: the torch form (attend_torch kind "matmul" under torch.compile, what the layer ran
before the op), the op at its default block sizes, then (second pass) the op with one
block-size keyword of triton_attend changed at a time, then (third pass) each configuration's
best value of every keyword that beat the default, combined. Passes run configuration by
configuration in --batches order; once --budget-s is spent the rest are listed as skipped.
The table is rewritten after every row, so a run cut short keeps what it measured.

GPU (about 100 s; never changes power limits or clocks):
    OUT=/some/dir PYTHONPATH=src python3 benchmarks/mla_attention_bench.py --budget-s 100
CPU smoke check of the script (tiny shapes through Triton's interpreter, the torch form
uncompiled, perf_counter times that mean nothing; float16):
    TRITON_INTERPRET=1 PYTHONPATH=src <python with triton> benchmarks/mla_attention_bench.py --smoke --out /tmp/mla

Writes mla_attention_bench.md and mla_attention_bench.csv into --out (default $OUT).
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import os
import sys
import time
from pathlib import Path

import torch

from decode_roofline import Timer, copy_bandwidth, environment, graph_replay_seconds, parse_with_out  # a sibling script: the same bandwidth probe
from phasewatt.io import write_text
from phasewatt.models import mla_attention as ma, pdl
from phasewatt.models.layers import precompute_rope

# heads, kv_lora, rope, nope, v
MINICPM3 = (40, 256, 32, 64, 64)
SMOKE = (20, 128, 16, 16, 32)
SMOKE_SM_COUNT = 132  # what the smoke check's cache split is made for (an H100's)
# One keyword changed at a time from the defaults (a value equal to the default for the batch is
# left out), and the block sizes the kernels ran with before they took keywords.
SWEEP = [
    {"partial_positions": 16}, {"partial_positions": 32}, {"partial_positions": 64}, {"partial_positions": 128},
    {"partial_heads": 32}, {"partial_heads": 64},
    {"partial_warps": 2}, {"partial_warps": 8}, {"partial_stages": 1}, {"partial_stages": 2},
    {"partial_max_slices": 16}, {"partial_max_slices": 64},
    {"merge_seqs": 1}, {"merge_seqs": 16},
    {"merge_v_block": 16}, {"merge_v_block": 32}, {"merge_v_block": 64},
    {"merge_warps": 2}, {"merge_warps": 8},
    {"absorb_channels": 32}, {"absorb_channels": 128},
]
PREVIOUS = {"absorb_channels": 64, "partial_heads": 16, "partial_positions": 64, "partial_warps": 4, "partial_stages": 3,
            "partial_max_slices": 1 << 20, "merge_seqs": 16, "merge_v_block": 64, "merge_warps": 4}  # slices then uncapped
TORCH = "torch matmul (compiled)"
NO_PDL = "fused, PDL off"  # the defaults launched without programmatic dependent launch
COLUMNS = ["batch", "cache", "pos", "impl", "blocks", "status", "us_per_layer", "vs_torch", "vs_default", "read_kb", "tb_s",
           "copy_share", "rel_err", "resolved"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--caches", default="640:512,2176:2100", help="comma-separated cache_len:position")
    p.add_argument("--layers", type=int, default=62, help="calls per graph, each on its own layer's weight and cache")
    p.add_argument("--reps", type=int, default=20, help="timed graph replays (median)")
    p.add_argument("--budget-s", type=float, default=100.0, help="start no row after this many seconds")
    p.add_argument("--no-sweep", action="store_true", help="only the torch form and the defaults")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU through Triton's interpreter")
    args = parse_with_out(p, argv)
    try:
        args.batch_list = [int(b) for b in args.batches.split(",")]
        args.cache_list = [tuple(int(x) for x in c.split(":")) for c in args.caches.split(",")]
    except ValueError:
        p.error("--batches: comma-separated integers; --caches: comma-separated cache_len:position")
    if any(len(c) != 2 or not 0 <= c[1] < c[0] for c in args.cache_list):
        p.error("--caches: each cache_len:position with 0 <= position < cache_len")
    return args


def call_bytes(batch: int, pos: int, dims: tuple, itemsize: int = 2) -> int:
    """Bytes one call must read: the layer's kv_b (W_UK and W_UV) and each sequence's cache rows
    0..pos (q, kv_a and the output are a few KB and left out)."""
    heads, kv_lora, rope, nope, v_dim = dims
    return itemsize * (heads * (nope + v_dim) * kv_lora + batch * (pos + 1) * (kv_lora + rope))


def sweep_variants(batch: int, dims: tuple) -> list[tuple[str, dict]]:
    """(label, keywords) of the second pass for a batch: SWEEP's entries and PREVIOUS, each kept
    only where it changes the block sizes the kernels get from the defaults or an earlier entry."""
    _, kv_lora, _, _, v_dim = dims
    seen = [ma.block_sizes(batch, kv_lora, v_dim)]
    variants = []
    for label, keywords in [(label_of(kw), kw) for kw in SWEEP] + [("previous blocks", PREVIOUS)]:
        sizes = ma.block_sizes(batch, kv_lora, v_dim, **keywords)
        if sizes not in seen:
            seen.append(sizes)
            variants.append((label, keywords))
    return variants


def label_of(keywords: dict) -> str:
    if keywords == PREVIOUS:
        return "previous blocks"
    return " ".join(f"{k}={v}" for k, v in keywords.items()) or "default"


def combined_best(rows: list[dict], batch: int, cache: int) -> dict:
    """The keywords of the one-keyword rows of a configuration that beat its default row, each
    at its fastest value (empty when none did)."""
    mine = [r for r in rows if r["batch"] == batch and r["cache"] == cache and r["status"] == "ok" and r["impl"] == "fused"]
    default = next((r for r in mine if r["blocks"] == "default"), None)
    if default is None:
        return {}
    best: dict[str, tuple[float, int]] = {}
    for r in mine:
        keywords = r.get("keywords") or {}
        if len(keywords) == 1 and r["us_per_layer"] < default["us_per_layer"]:
            (name, value), = keywords.items()
            if name not in best or r["us_per_layer"] < best[name][0]:
                best[name] = (r["us_per_layer"], value)
    return {name: value for name, (_, value) in sorted(best.items())}


class Layers:
    """Per-layer kv_b weights and latent caches of one configuration, and shared step inputs."""

    def __init__(self, batch: int, cache_len: int, pos: int, dims: tuple, layers: int, device, dtype, seed: int = 0):
        heads, kv_lora, rope, nope, v_dim = dims
        gen = torch.Generator(device).manual_seed(seed)
        kw = dict(device=device, dtype=dtype, generator=gen)
        self.dims = dims
        self.q = torch.randn(batch, heads * (nope + rope), **kw)
        self.kv_a = torch.randn(batch, kv_lora + rope, **kw)
        self.norm = torch.rand(kv_lora, **kw) + 0.5
        self.cos, self.sin = precompute_rope(rope, cache_len, 1e4, device=device)
        self.pos = torch.tensor([pos], device=device)
        self.kv_b = [torch.randn(heads * (nope + v_dim), kv_lora, **kw) * kv_lora**-0.5 for _ in range(layers)]
        self.latent = [torch.randn(batch, cache_len, kv_lora + rope, **kw) for _ in range(layers)]

    def args(self, layer: int) -> tuple:
        heads, _, rope, nope, v_dim = self.dims
        return (self.q, self.kv_a, self.latent[layer], self.pos, self.cos, self.sin, self.norm, self.kv_b[layer], 1e-6, heads,
                nope, v_dim, (nope + rope) ** -0.5, False)


def fused_call(blocks: dict, sm_count: int | None):
    return functools.partial(ma.triton_attend, sm_count=sm_count, **blocks)


def torch_call(compiled: bool):
    """The torch form as the layer ran it before the op: compiled for the shapes at hand."""
    fn = functools.partial(ma.attend_torch, kind="matmul")
    return torch.compile(fn, dynamic=False) if compiled else fn


def seconds_per_layer(call, layers: Layers, reps: int) -> float:
    """Median seconds of one call per layer: a CUDA graph of every layer's call, replayed."""
    count = len(layers.kv_b)

    def run():
        for i in range(count):
            call(*layers.args(i))

    seconds, _ = graph_replay_seconds(run, reps)
    return seconds / count


def relative_error(call, layers: Layers) -> float:
    """Layer 0's output against the eager torch form, each on its own copy of the cache."""
    args = list(layers.args(0))
    ref_args = list(args)
    args[2], ref_args[2] = args[2].clone(), args[2].clone()
    out, expected = call(*args).float(), ma.attend_torch(*ref_args, kind="matmul").float()
    return float((out - expected).norm() / expected.norm())


def measure(layers: Layers, batch: int, cache: int, pos: int, impl: str, keywords: dict, args, copy_bytes_per_s: float) -> dict:
    _, kv_lora, _, _, v_dim = layers.dims
    row = {"batch": batch, "cache": cache, "pos": pos, "impl": impl, "keywords": keywords,
           "blocks": "-" if impl == TORCH else label_of(keywords), "read_kb": call_bytes(batch, pos, layers.dims) / 1e3}
    call = torch_call(compiled=not args.smoke) if impl == TORCH else fused_call(keywords, SMOKE_SM_COUNT if args.smoke else None)
    if impl != TORCH:
        sizes = ma.block_sizes(batch, kv_lora, v_dim, **keywords)
        row["resolved"] = " ".join(f"{k}={v}" for k, v in sizes.items())
    pdl_before = pdl.pdl_enabled()
    try:
        pdl.set_pdl(pdl_before and impl != NO_PDL)  # read at each launch, so also by the graph's capture
        if args.smoke:  # one call, timed with the torch form's (the smoke times mean nothing)
            start = time.perf_counter()
            row["rel_err"] = relative_error(call, layers)
            seconds = time.perf_counter() - start
        else:
            seconds = seconds_per_layer(call, layers, args.reps)
            row["rel_err"] = relative_error(call, layers)
    except Exception as exc:  # a variant that fails to compile or launch is a row, not the end of the run
        row["status"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:160]
        return row
    finally:
        pdl.set_pdl(pdl_before)
    bytes_per_s = row["read_kb"] * 1e3 / seconds
    row.update(status="ok", us_per_layer=seconds * 1e6, tb_s=bytes_per_s / 1e12, copy_share=bytes_per_s / copy_bytes_per_s)
    return row


def add_ratios(rows: list[dict]) -> None:
    """vs_torch, vs_default: how many times faster than the torch form / the op's defaults of
    the same configuration (> 1: faster)."""
    for row in rows:
        if row.get("status") != "ok":
            continue
        for column, match in (("vs_torch", lambda r: r["impl"] == TORCH), ("vs_default", lambda r: r["impl"] == "fused" and r["blocks"] == "default")):
            base = next((r for r in rows if r["batch"] == row["batch"] and r["cache"] == row["cache"] and r.get("status") == "ok" and match(r)), None)
            row[column] = base["us_per_layer"] / row["us_per_layer"] if base else None


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def render(rows: list[dict], env: dict, copy_bytes_per_s: float, args, elapsed_s: float) -> tuple[str, str]:
    add_ratios(rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    shown = COLUMNS[:-1]
    lines = [
        "# Fused MLA decode attention (MiniCPM3-4B shapes) against the compiled torch form",
        "",
        f"- device: {env['device']}, driver {env.get('driver', '-')}, torch {env['torch']}, CUDA {env.get('cuda', '-')}, "
        f"triton {env.get('triton')}" + (" (smoke: Triton interpreter on CPU; times mean nothing)" if args.smoke else ""),
        f"- the op's kernels launched with PDL (models/pdl.py): {pdl.pdl_active(torch.device('cuda')) if not args.smoke else False} "
        f"(rows '{NO_PDL}': without)\n"
        f"- measured copy bandwidth (read + write): {copy_bytes_per_s / 1e12:.3f} TB/s; copy share = read bytes / time / that",
        f"- {args.layers} layers' calls (own kv_b and cache each) per CUDA graph, median of {args.reps} replays; "
        f"us per call per layer; read = kv_b (W_UK + W_UV) + cache rows 0..pos",
        f"- defaults at batch <= {ma.SMALL_BATCH}: {' '.join(f'{k}={v}' for k, v in ma.block_sizes(1, 256, 64).items())}; "
        f"above: {' '.join(f'{k}={v}' for k, v in ma.block_sizes(ma.SMALL_BATCH + 1, 256, 64).items())}",
        "- vs_torch / vs_default: times faster than the torch form / the op's defaults at the same batch and cache",
        f"- elapsed {elapsed_s:.0f} s of budget {args.budget_s:g} s",
        "",
        "| " + " | ".join(shown) + " |",
        "|" + "---|" * len(shown),
    ]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in shown) + " |")
    return "\n".join(lines) + "\n", buf.getvalue()


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--smoke runs the kernels through Triton's interpreter: set TRITON_INTERPRET=1")
        device, dtype, dims = torch.device("cpu"), torch.float16, SMOKE
        args.batches, args.batch_list, args.caches, args.cache_list, args.layers, args.reps = "1,9", [1, 9], "64:40", [(64, 40)], 1, 1
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run on the GPU machine, or use --smoke under TRITON_INTERPRET=1")
        device, dtype, dims = torch.device("cuda"), torch.bfloat16, MINICPM3
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * len(args.batch_list) * len(args.cache_list))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    copy_bytes_per_s = copy_bandwidth(device, Timer(device), (64 << 20) if args.smoke else (4 << 30))
    print(f"{env['device']}: copy {copy_bytes_per_s / 1e12:.3f} TB/s", flush=True)
    configs = [(b, c, p) for b in args.batch_list for c, p in args.cache_list]
    rows: list[dict] = []

    def record(row: dict) -> None:
        rows.append(row)
        print(" ".join(f"{c}={fmt(row.get(c))}" for c in COLUMNS[:-1]), flush=True)
        table, table_csv = render(rows, env, copy_bytes_per_s, args, time.perf_counter() - t0)
        write_text(out / "mla_attention_bench.md", table)
        write_text(out / "mla_attention_bench.csv", table_csv)

    # Pass 0: the torch form and the defaults; 1: one keyword at a time; 2: the best combined.
    for number in range(1 if args.no_sweep else 3):
        for batch, cache, pos in configs:
            if number == 0:
                plan = [(TORCH, {}), ("fused", {}), (NO_PDL, {})]
            elif number == 1:
                plan = [("fused", kw) for _, kw in sweep_variants(batch, dims)]
            else:
                best = combined_best(rows, batch, cache)
                plan = [("fused", best)] if len(best) > 1 else []
            if not plan:
                continue
            if time.perf_counter() - t0 > args.budget_s:
                for impl, keywords in plan:
                    record({"batch": batch, "cache": cache, "pos": pos, "impl": impl, "keywords": keywords,
                            "blocks": "-" if impl == TORCH else label_of(keywords), "status": "skipped (time budget)"})
                continue
            layers = Layers(batch, cache, pos, dims, args.layers, device, dtype)
            for impl, keywords in plan:
                if time.perf_counter() - t0 > args.budget_s:
                    record({"batch": batch, "cache": cache, "pos": pos, "impl": impl, "keywords": keywords,
                            "blocks": "-" if impl == TORCH else label_of(keywords), "status": "skipped (time budget)"})
                    continue
                record(measure(layers, batch, cache, pos, impl, keywords, args, copy_bytes_per_s))
            del layers
            if device.type == "cuda":
                torch.cuda.empty_cache()
    print(render(rows, env, copy_bytes_per_s, args, time.perf_counter() - t0)[0])
    failed = [r for r in rows if r["status"].startswith("failed")]
    if failed:
        print(f"{len(failed)} rows failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
