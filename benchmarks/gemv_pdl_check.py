"""The decode GEMV with programmatic dependent launch (PDL) on and off, on this GPU.

A chain of about 200 products of real decode shapes, captured in one CUDA graph with PDL on
and again with it off (phasewatt.models.pdl.set_pdl before the warm-up and the capture),
each graph replayed and timed with CUDA events: time per product, the bytes the chain moves
(weights, x, residual, y) per second, and that rate's share of the device-to-device copy
bandwidth measured in the same run (decode_roofline's probe). Each product reads a prefix of
the previous product's output where it is wide enough (a dependent chain, as in a decode
step), else a fixed input. Weights are distinct copies, cycled, together several GB (many
times the L2 cache), so no product reads its weight from L2.

Two ways between products: "direct" (product after product: the next one launches during
the tail of ours) and "torch" (a small in-place torch kernel on the next product's input in
between, as the attention or conv-step kernels sit between some products: the next product
then overlaps only that kernel's end). The outputs of the two graphs are compared bit for bit.

    OUT=/some/dir PYTHONPATH=src python3 benchmarks/gemv_pdl_check.py    # GPU, about a minute

Writes gemv_pdl_check.md and gemv_pdl_check.csv into --out (default $OUT). Needs CUDA; PDL
itself needs compute capability >= 9.0 (elsewhere both rows run without it). It never changes
power limits or clocks.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

import torch

from decode_roofline import Timer, copy_bandwidth, environment, graph_replay_seconds, parse_with_out  # a sibling script: the same bandwidth probe
from phasewatt.io import write_text
from phasewatt.models import gemv, pdl as pdl_switch

# (name, kernel variant, weight rows N (twice the output for rms_glu), K); rms: the norm's
# weight folded into W as the engine runs batch 1; residual: a plain product with the
# residual add as its epilogue.
QWEN3_4B_LAYER = [
    ("qkv", "rms", 6144, 2560),
    ("o", "residual", 2560, 4096),
    ("gate_up", "rms_glu", 2 * 9728, 2560),
    ("down", "residual", 2560, 9728),
]
MINICPM3_LORA = [
    ("a_proj", "rms", 1056, 2560),
    ("q_b", "rms", 3840, 768),
]
CHAINS = {
    "qwen3-4b-layer": QWEN3_4B_LAYER,
    "minicpm3-a_proj+q_b": MINICPM3_LORA,
    **{f"{model}-{shape[0]}": [shape] for model, shapes in (("qwen3-4b", QWEN3_4B_LAYER), ("minicpm3", MINICPM3_LORA))
       for shape in shapes},
}
BETWEEN = ("direct", "torch")
COLUMNS = ["chain", "between", "products", "pdl", "us_per_product", "chain_us", "chain_mb", "tb_s", "copy_share", "speedup_vs_off", "same_outputs"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--products", type=int, default=200, help="products per chain (whole repeats of its pattern)")
    p.add_argument("--weight-gb", type=float, default=6.0, help="distinct weight bytes per chain, cycled (>> L2)")
    p.add_argument("--reps", type=int, default=20, help="timed graph replays (median)")
    p.add_argument("--chains", default=",".join(CHAINS), help="comma-separated chain names")
    args = parse_with_out(p, argv)
    unknown = [c for c in args.chains.split(",") if c not in CHAINS]
    if unknown:
        p.error(f"--chains: {', '.join(unknown)}; allowed: {', '.join(CHAINS)}")
    return args


def chain_plan(pattern: list[tuple], products: int, weight_bytes: float) -> tuple[list[tuple], int]:
    """(the products in order: pattern repeated to about `products`, each with its weight copy
    index, distinct copies: as many repeats as fit in weight_bytes, at least 2)."""
    repeats = max(1, round(products / len(pattern)))
    pattern_bytes = sum(n * k * 2 for _, _, n, k in pattern)
    copies = max(2, min(repeats, int(weight_bytes // pattern_bytes)))
    return [(*shape, r % copies) for r in range(repeats) for shape in pattern], copies


def product_bytes(variant: str, n: int, k: int) -> int:
    """Bytes one bf16 product moves: weight, x, y, and the residual it reads."""
    out = n // 2 if variant == "rms_glu" else n
    return 2 * (n * k + k + out + (out if variant == "residual" else 0))


class Chain:
    """The products of a chain with their weights and fixed inputs, and how to run it."""

    def __init__(self, pattern, products: int, weight_bytes: float, seed: int = 0, device: str = "cuda"):
        self.plan, copies = chain_plan(pattern, products, weight_bytes)
        gen = torch.Generator(device).manual_seed(seed)
        kw = dict(device=device, generator=gen)
        self.weights = {
            (name, c): (torch.randn(n, k, **kw) / k**0.5).to(torch.bfloat16) for name, _, n, k in pattern for c in range(copies)
        }
        self.x = {k: torch.randn(1, k, **kw).to(torch.bfloat16) for _, _, _, k in pattern}
        self.residual = {n: torch.randn(1, n, **kw).to(torch.bfloat16) for _, v, n, _ in pattern if v == "residual"}
        self.between = "direct"
        self.bytes = sum(product_bytes(v, n, k) for _, v, n, k, _ in self.plan)

    def run(self) -> list[torch.Tensor]:
        outs, previous = [], None
        for name, variant, n, k, copy in self.plan:
            x = previous[:, :k] if previous is not None and previous.shape[-1] >= k else self.x[k]
            if self.between == "torch":
                x = x.mul_(1.0)  # exact: the values stay, a kernel not ours writes x
            w = self.weights[(name, copy)]
            if variant == "residual":
                y = torch.ops.phasewatt.gemv(x, w, self.residual[n], 1.0)
            else:
                y = torch.ops.phasewatt.gemv_rmsnorm(x, None, None, None, 1e-6, 0.0, w, None, 1.0, variant == "rms_glu")[0]
            outs.append(y)
            previous = y
        return outs


def time_chain(chain: Chain, pdl: bool, reps: int) -> tuple[float, list[torch.Tensor]]:
    """(seconds per replay of the chain's graph, its outputs), PDL as given."""
    pdl_switch.set_pdl(pdl)
    seconds, outs = graph_replay_seconds(chain.run, reps)  # warm-up compiles (PDL and not are different binaries)
    # the chain's inputs are its fixed buffers: a last replay gives the outputs every replay gives
    return seconds, [o.clone() for o in outs]


def measure(chain: Chain, name: str, between: str, args, copy_bytes_per_s: float) -> list[dict]:
    """Rows for PDL off and on of one chain, products joined as `between` says."""
    chain.between = between
    rows, outputs = [], {}
    for pdl in (False, True):
        seconds, outputs[pdl] = time_chain(chain, pdl, args.reps)
        rows.append({
            "chain": name, "between": between, "products": len(chain.plan), "pdl": pdl,
            "us_per_product": seconds / len(chain.plan) * 1e6, "chain_us": seconds * 1e6, "chain_mb": chain.bytes / 1e6,
            "tb_s": chain.bytes / seconds / 1e12, "copy_share": chain.bytes / seconds / copy_bytes_per_s,
        })
    same = all(torch.equal(a, b) for a, b in zip(outputs[False], outputs[True]))
    for row in rows:
        row["speedup_vs_off"] = rows[0]["chain_us"] / row["chain_us"]
        row["same_outputs"] = same
    return rows


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def render(rows: list[dict], env: dict, copy_bytes_per_s: float, args) -> tuple[str, str]:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    capability = torch.cuda.get_device_capability()
    lines = [
        "# Decode GEMV with programmatic dependent launch on and off",
        "",
        f"- device: {env['device']} (compute capability {capability[0]}.{capability[1]}; PDL "
        f"{'available' if capability[0] >= gemv.PDL_MIN_CAPABILITY else 'not available: both rows run without it'}), "
        f"driver {env.get('driver', '-')}, torch {env['torch']}, CUDA {env.get('cuda', '-')}, triton {env.get('triton')}",
        f"- measured copy bandwidth (read + write): {copy_bytes_per_s / 1e12:.3f} TB/s; copy share = chain bytes / time / that",
        f"- one CUDA graph per row, median of {args.reps} replays; distinct weights up to {args.weight_gb:g} GB per chain, cycled",
        "- between: direct = product after product; torch = an in-place torch kernel on each product's input first",
        "",
        "| chain | between | products | PDL | us/product | chain us | chain MB | TB/s | copy share | speedup vs off | same outputs |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r[c]) for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n", buf.getvalue()


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on the GPU machine")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    env = environment(device)
    copy_bytes_per_s = copy_bandwidth(device, Timer(device), 4 << 30)
    print(f"{env['device']}: copy {copy_bytes_per_s / 1e12:.3f} TB/s", flush=True)
    switch = pdl_switch.pdl_enabled()
    rows: list[dict] = []
    try:
        for name in args.chains.split(","):
            chain = Chain(CHAINS[name], args.products, args.weight_gb * 1e9)
            for between in BETWEEN:
                rows.extend(measure(chain, name, between, args, copy_bytes_per_s))
                for r in rows[-2:]:
                    print(" ".join(f"{c}={fmt(r[c])}" for c in COLUMNS), flush=True)
                table, table_csv = render(rows, env, copy_bytes_per_s, args)
                write_text(out / "gemv_pdl_check.md", table)
                write_text(out / "gemv_pdl_check.csv", table_csv)
            del chain
            torch.cuda.empty_cache()
    finally:
        pdl_switch.set_pdl(switch)
    print(render(rows, env, copy_bytes_per_s, args)[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
