"""One product's time at output widths that differ only in 16-byte alignment, on this GPU.

Why: Gated DeltaNet's fused input projection had 13842 output rows, so each token's output row
was 4-byte aligned only and cuBLAS took an Ampere align2 GEMM at 1 x 2048 (RESULTS.md, round 8);
padded to 13848 its prefill at 1 x 512 went 13.1 -> 9.7 ms, yet at 32 x 512 (one product of
16384 tokens) the pipeline's prefill time did not move. This times y = x W^T (bf16,
torch.nn.functional.linear) for each --n (output widths) at each --tokens (rows of x) and K =
--k, in one run, eager and under torch.compile (as the engine's compiled prefill runs it:
inductor may pad a product's shape itself): the median of --reps CUDA-event timings after a
warm-up, the TFLOP/s, the GPU kernels torch.profiler saw (longest first), and each width's
time over the last width's (the aligned one) at the same token count and mode.

GPU (a few seconds; never changes power limits or clocks):
    OUT=/some/dir PYTHONPATH=src python3 benchmarks/gemm_alignment.py
CPU smoke check of the script (tiny shapes, float32, times that mean nothing):
    PYTHONPATH=src python3 benchmarks/gemm_alignment.py --smoke --out /tmp/gemm_alignment

Writes gemm_alignment.md and gemm_alignment.csv into --out (default $OUT).
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from decode_roofline import Timer, environment, parse_with_out  # a sibling script: the same timer, environment line and --out
from phasewatt.io import write_text

COLUMNS = ["mode", "tokens", "n", "k", "ms", "tflop_s", "vs_last_n", "kernels"]
MODES = ("eager", "compiled")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", default="13842,13848", help="comma-separated output widths; the last is the reference")
    p.add_argument("--k", type=int, default=3072, help="input width (the gdn model's d_model)")
    p.add_argument("--tokens", default="512,2048,16384", help="comma-separated rows of x (prefill tokens per product)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU, to check the script")
    args = parse_with_out(p, argv)
    try:
        args.n_list = [int(v) for v in args.n.split(",")]
        args.token_list = [int(v) for v in args.tokens.split(",")]
    except ValueError:
        p.error("--n, --tokens: comma-separated integers")
    if min(args.n_list + args.token_list + [args.k, args.reps]) < 1:
        p.error("--n, --tokens, --k, --reps: positive integers")
    return args


def kernel_names(fn, device: torch.device) -> str:
    """The GPU kernels of one fn() call, longest first, as torch.profiler names them ('-' on CPU)."""
    if device.type != "cuda":
        return "-"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.key_averages() if e.device_time_total > 0), key=lambda e: -e.device_time_total)
    return "; ".join(e.key[:70] for e in kernels) or "-"


def measure(args, device: torch.device, dtype: torch.dtype) -> list[dict]:
    rows = []
    timer = Timer(device)
    gen = torch.Generator(device).manual_seed(0)
    # One compiled graph per shape: room for all of them, none falling back to eager.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 2 * len(args.token_list) * len(args.n_list))
    compiled_linear = torch.compile(F.linear, dynamic=False)
    for mode in MODES:
        linear = F.linear if mode == "eager" else compiled_linear
        for tokens in args.token_list:
            x = torch.randn(tokens, args.k, device=device, dtype=dtype, generator=gen)
            for n in args.n_list:
                w = torch.randn(n, args.k, device=device, dtype=dtype, generator=gen) * args.k**-0.5
                linear(x, w)  # warm: cuBLAS picks and loads its kernel, inductor compiles
                seconds = timer.median(lambda: linear(x, w), args.reps)
                rows.append({"mode": mode, "tokens": tokens, "n": n, "k": args.k, "ms": seconds * 1e3,
                             "tflop_s": 2 * tokens * n * args.k / seconds / 1e12,
                             "kernels": kernel_names(lambda: linear(x, w), device)})
            reference = rows[-1]["ms"]
            for row in rows[-len(args.n_list):]:
                row["vs_last_n"] = row["ms"] / reference
    return rows


def render(rows: list[dict], env: dict, args) -> tuple[str, str]:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    lines = [
        "# One product at output widths of different alignment",
        "",
        f"- device: {env['device']}, driver {env.get('driver', '-')}, torch {env['torch']}, CUDA {env.get('cuda', '-')}"
        + (" (smoke: CPU, float32; times mean nothing)" if args.smoke else ""),
        f"- y = x W^T, x [tokens, {args.k}], W [n, {args.k}], {'float32' if args.smoke else 'bf16'}; median of {args.reps} "
        "timings (CUDA events) after a warm-up; vs_last_n = ms / ms of the last n at the same tokens",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n", buf.getvalue()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        args.n_list, args.token_list, args.k, args.reps = [30, 32], [4, 16], 64, 2
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run on the GPU machine, or use --smoke on CPU")
        device, dtype = torch.device("cuda"), torch.bfloat16
    rows = measure(args, device, dtype)
    table, table_csv = render(rows, environment(device), args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "gemm_alignment.md", table)
    write_text(out / "gemm_alignment.csv", table_csv)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
