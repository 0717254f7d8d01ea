"""Does the sampler thread slow decode? Run on a GPU machine; writes JSON (default $OUT).

The loop is decode-like: the microbench engine's decode step, one CUDA graph of GEMVs over
the bf16 weights of config.yaml's `gqa` model (Qwen3-4B shapes, ~8 GB), at batch 1. It is
timed in blocks of --steps steps with the sampler thread (NvmlGpu, every 10 ms) off and
on, in ABBA order (off,on / on,off / ...) so that drift in clocks and temperature falls on
both. Overhead = median(on) / median(off) - 1, and the median of the per-pair ratios. The
same loop without CUDA graphs (one launch per GEMV from Python) is measured too: there,
contention for the interpreter would show first.

Reads the GPU only; never changes its settings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import yaml

from phasewatt.engines.microbench import MicrobenchEngine
from phasewatt.gpu.nvml import NvmlGpu
from phasewatt.gpu.sampler import Sampler
from phasewatt.gpu.select import gpu_index_from_env
from phasewatt.models.spec import ModelSpec

LIMIT_PCT = 1.0
SETTLE_S = 0.05  # the same pause before every block, sampler or not


def seconds_per_step(engine, steps: int) -> float:
    engine.synchronize()
    t0 = time.perf_counter()
    engine.decode(steps)
    engine.synchronize()
    return (time.perf_counter() - t0) / steps


def measure_variant(gpu, spec, graphs: bool, args) -> dict:
    engine = MicrobenchEngine(
        spec=spec,
        gpu=gpu,
        batch=args.batch,
        prompt_len=1,
        decode_tokens=args.steps,
        options={"decode_kernel": "gemv", "cuda_graphs": graphs, "device": args.device},
    )
    engine.setup()
    try:
        for _ in range(args.warmup_blocks):
            seconds_per_step(engine, args.steps)
        off, on, stats = [], [], []

        def block(with_sampler: bool) -> None:
            sampler = Sampler(gpu, args.interval).start() if with_sampler else None
            time.sleep(SETTLE_S)
            try:
                (on if with_sampler else off).append(seconds_per_step(engine, args.steps))
            finally:
                if sampler is not None:
                    sampler.stop()
                    stats.append(sampler.stats())

        for i in range(args.pairs):
            order = (False, True) if i % 2 == 0 else (True, False)
            for with_sampler in order:
                block(with_sampler)
        info = engine.describe()
    finally:
        engine.close()
    paired = [b / a - 1 for a, b in zip(off, on)]
    median_off, median_on = statistics.median(off), statistics.median(on)
    overhead_pct = 100 * (median_on / median_off - 1)
    return {
        "cuda_graphs": info["cuda_graphs"],
        "ms_per_step_off": [1000 * s for s in off],
        "ms_per_step_on": [1000 * s for s in on],
        "median_ms_off": 1000 * median_off,
        "median_ms_on": 1000 * median_on,
        "overhead_pct": overhead_pct,
        "paired_overhead_pct_median": 100 * statistics.median(paired),
        "paired_overhead_pct_range": [100 * min(paired), 100 * max(paired)],
        "within_limit": overhead_pct < LIMIT_PCT,
        "achieved_bandwidth_tbs_off": info["decode_step_bytes"] / median_off / 1e12,
        "decode_step_bytes": info["decode_step_bytes"],
        "kernels_per_step": info["decode_kernels_per_step"],
        "sampler": {
            "samples": sum(s["samples"] for s in stats),
            "errors": sum(s["errors"] for s in stats),
            "mean_read_ms": statistics.mean(s["mean_read_ms"] for s in stats if s["mean_read_ms"] is not None),
            "median_gap_ms": 1000 * statistics.median(s["median_gap_s"] for s in stats if s["median_gap_s"] is not None),
            "max_gap_ms": 1000 * max(s["max_gap_s"] for s in stats if s["max_gap_s"] is not None),
        },
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config.yaml", help="where the model shapes come from")
    parser.add_argument("--model", default="gqa")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=250, help="decode steps per timed block")
    parser.add_argument("--pairs", type=int, default=12, help="(off, on) block pairs per variant")
    parser.add_argument("--warmup-blocks", type=int, default=3)
    parser.add_argument("--interval", type=float, default=0.01, help="sampler period (s)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a smoke test of this script")
    parser.add_argument("--out", default=None, help="JSON output (default $OUT/sampler_overhead.json)")
    args = parser.parse_args(argv)
    out = Path(args.out or Path(os.environ["OUT"]) / "sampler_overhead.json")

    entry = yaml.safe_load(Path(args.config).read_text())["models"][args.model]
    spec = ModelSpec.from_config(args.model, entry)
    gpu = NvmlGpu(gpu_index_from_env())
    try:
        result = {
            "gpu_name": gpu.name,
            "gpu_serial": gpu.serial,
            "driver": gpu.driver,
            "model": args.model,
            "batch": args.batch,
            "steps_per_block": args.steps,
            "pairs": args.pairs,
            "interval_s": args.interval,
            "limit_pct": LIMIT_PCT,
            "variants": {
                "cuda_graph": measure_variant(gpu, spec, True, args),
                "eager": measure_variant(gpu, spec, False, args),
            },
        }
    finally:
        gpu.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    for name, v in result["variants"].items():
        print(
            f"{name}: {v['median_ms_off']:.3f} ms/step without the sampler, {v['median_ms_on']:.3f} with it: "
            f"overhead {v['overhead_pct']:+.2f}% (paired median {v['paired_overhead_pct_median']:+.2f}%, "
            f"range {v['paired_overhead_pct_range'][0]:+.2f}..{v['paired_overhead_pct_range'][1]:+.2f}%), "
            f"{'within' if v['within_limit'] else 'OVER'} {LIMIT_PCT:g}%; {v['achieved_bandwidth_tbs_off']:.2f} TB/s; "
            f"sampler gap median {v['sampler']['median_gap_ms']:.1f} ms, max {v['sampler']['max_gap_ms']:.1f} ms, "
            f"{v['sampler']['mean_read_ms']:.3f} ms per reading, {v['sampler']['errors']} errors"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
