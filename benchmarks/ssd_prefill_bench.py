"""Mamba2's prefill kernels (models/ssd_prefill.py) against fla's chunk_simple_gla path they
replaced, at mamba2-2.7B's layer shapes, on this GPU.

--layers blocks (random bf16 weights), each block's prefill compiled as the engine compiles it,
the whole batch x --tokens prefill captured in one CUDA graph and replayed (median of --reps);
per layer, in the same run:
- the block through each prefill backend: 'fla' (B and C copied out to the 80 heads, fla's
  chunk_simple_gla, the gated norm in inductor's kernels) and 'triton' (our four kernels);
- the block's two projections alone (in_proj and out_proj through cuBLAS): the part no SSD
  implementation can remove, and the floor's main term;
- the kernels alone at their default block sizes, then with some of
  ssd_prefill.DEFAULT_BLOCKS changed (SWEEP);
- the kernels of each backend's blocks (torch.profiler, launched without the graph).
rel err: the 'triton' block row's output against the 'fla' row's (last block), and each swept
kernels row's u against the default kernels row's; the other rows are not checked.

GPU (about a minute; never changes power limits or clocks):
    OUT=/some/dir PYTHONPATH=src python3 benchmarks/ssd_prefill_bench.py
Writes ssd_prefill_bench.md into --out (default $OUT).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from decode_roofline import environment, graph_replay_seconds  # sibling scripts
from profile_native import profiled, summarize
from phasewatt.io import write_text
from phasewatt.models import ssd_prefill
from phasewatt.models.registry import build_model
from phasewatt.models.spec import ModelSpec

MAMBA2_2_7B = dict(arch="mamba2", d_model=2560, d_state=128, head_dim=64, expand=2, n_groups=1, conv_size=4, chunk_size=256, vocab_size=256, tied_embeddings=True)
# Block sizes tried against the defaults (ssd_prefill.DEFAULT_BLOCKS), one kernel's at a time:
# the values the defaults replaced, and neighbours.
SWEEP = [
    {"conv_warps": 4}, {"conv_c": 128}, {"conv_t": 64},
    {"states_v": 64}, {"states_k": 32}, {"states_warps": 2}, {"states_stages": 2},
    {"output_k": 64}, {"output_stages": 3}, {"output_warps": 8},
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--no-sweep", action="store_true", help="skip the block-size rows")
    p.add_argument("--out", default=os.environ.get("OUT"))
    args = p.parse_args(argv)
    if not args.out:
        p.error("--out (or $OUT) is required")
    return args


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on the GPU machine (the kernels' CPU checks are tests/test_ssd_prefill_interpret.py)")
    t0 = time.perf_counter()
    device = torch.device("cuda")
    spec = ModelSpec.from_config("mamba2-2.7b-layers", {**MAMBA2_2_7B, "n_layers": args.layers})
    model = build_model(spec, device=device, dtype=torch.bfloat16, seed=0).eval().requires_grad_(False)
    blocks = list(model.layers)
    states = [block.make_state(args.batch) for block in blocks]
    h = torch.randn(args.batch, args.tokens, spec.d_model, device=device, dtype=torch.bfloat16)
    compiled: list = []
    per_layer = 1e6 / args.layers
    rows, reference = [], None

    def run_blocks():
        x = h
        for prefill, (conv, ssm) in zip(compiled, states):
            x = prefill(x, conv, ssm)
        return x

    profiles = []
    for backend in ("fla", "triton"):
        for block in blocks:
            block.mixer.backend = backend
        torch._dynamo.reset()
        compiled = [torch.compile(block.prefill) for block in blocks]
        seconds, out = graph_replay_seconds(run_blocks, args.reps)
        reference = out.clone() if reference is None else reference
        rows.append((f"block prefill, backend {backend}", seconds * per_layer, rel_err(out, reference)))
        records, wall_s = profiled(run_blocks, cuda=True)
        profiles.append(summarize(f"kernels of {args.layers} blocks' prefill, backend {backend} (compiled, launched from Python)", records, wall_s, 16))

    mixers = [block.mixer for block in blocks]
    normed = torch.randn_like(h)
    u_in = torch.randn(args.batch, args.tokens, mixers[0].d_inner, device=device, dtype=torch.bfloat16)

    def projections():
        return [(F.linear(normed, m.in_proj.weight), F.linear(u_in, m.out_proj.weight)) for m in mixers]

    seconds, _ = graph_replay_seconds(projections, args.reps)
    rows.append(("in_proj + out_proj alone (cuBLAS)", seconds * per_layer, None))

    projs = [F.linear(normed, m.in_proj.weight) for m in mixers]
    limit = mixers[0].time_step_limit

    def kernels(blocks_config):
        def run():
            return [
                ssd_prefill.mamba2_prefill_kernels(
                    proj, m.conv_weight, m.conv_bias, m.dt_bias, m.A_log, m.D, m.norm.weight, limit,
                    m.n_groups, m.d_state, m.head_dim, ssm, blocks_config,
                )[0]
                for proj, m, (_, ssm) in zip(projs, mixers, states)
            ]
        return run

    seconds, outs = graph_replay_seconds(kernels({}), args.reps)
    kernel_reference = outs[-1].clone()
    rows.append(("the kernels alone, default blocks", seconds * per_layer, None))
    if not args.no_sweep:
        for change in SWEEP:
            seconds, outs = graph_replay_seconds(kernels(change), args.reps)
            label = ", ".join(f"{key}={value}" for key, value in change.items())
            rows.append((f"the kernels alone, {label}", seconds * per_layer, rel_err(outs[-1], kernel_reference)))
        seconds, _ = graph_replay_seconds(kernels({}), args.reps)
        rows.append(("the kernels alone, default blocks again (drift over the sweep)", seconds * per_layer, None))

    env = environment(device)
    lines = [
        "# Mamba2 prefill: our SSD kernels against fla's chunk_simple_gla path",
        "",
        f"- device: {env['device']} (driver {env.get('driver', '-')}), torch {env['torch']}, CUDA {env.get('cuda', '-')}",
        f"- mamba2-2.7B layer shapes, {args.layers} layers per CUDA graph, batch {args.batch} x {args.tokens} tokens, bf16, median of {args.reps} replays",
        f"- default blocks: {ssd_prefill.DEFAULT_BLOCKS}; rel err: against the 'fla' row (blocks) or the kernels' default row",
        f"- elapsed {time.perf_counter() - t0:.0f} s",
        "",
        "| what | us per layer | rel err |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {us:.1f} | {'' if err is None else f'{err:.2g}'} |" for name, us, err in rows]
    lines += [""] + profiles
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "ssd_prefill_bench.md", "\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
