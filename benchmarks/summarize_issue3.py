"""Tables for benchmarks/RESULTS.md from what benchmarks/device_issue3.sh brought back.

    python3 benchmarks/summarize_issue3.py DIR      # DIR: the unpacked issue3/ folder

Reads DIR/probe.json, DIR/sampler_overhead.json and the run records DIR/runs/*/*/*.json;
prints Markdown. Achieved FLOP/s and bandwidth are the engine's FLOPs and operand bytes
(engine_info) over the measured per-run times; power is counter energy over time.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

MIN_AGREEMENT_WINDOW_S = 1.0
AGREEMENT_LIMIT = 0.02
KERNEL_NAMES = {"gemv": "GEMV over the weights", "copy": "device copy of the weights"}


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def probe_section(probe: dict) -> list[str]:
    rate = probe["sensor_update"]
    return [
        "| GPU | driver | power limit (default; range) | SM clocks | memory clocks | energy counter / instant power updates |",
        "|---|---|---|---|---|---|",
        f"| {probe['name']} | {probe['driver']} | {probe['power_limit_w']:g} W ({probe['default_power_limit_w']:g}; "
        f"{probe['power_limit_min_w']:g}-{probe['power_limit_max_w']:g} W) | {probe['sm_clock_count']} values, "
        f"{probe['sm_clocks_mhz'][0]}-{probe['sm_clocks_mhz'][-1]} MHz | "
        f"{', '.join(str(c) for c in probe.get('mem_clocks_mhz', []))} MHz | "
        f"{rate['energy_updates_per_s']:.1f}/s / {rate['power_updates_per_s']:.1f}/s |",
        "",
        f"DVFS control would be {'permitted' if probe['dvfs_permitted'] else 'refused'} ({probe['dvfs_permission']}); "
        "nothing was changed.",
    ]


def overhead_section(result: dict) -> list[str]:
    lines = [
        f"Decode-like loop: GEMVs over the `{result['model']}` weights at batch {result['batch']}, "
        f"{result['steps_per_block']} steps per block, {result['pairs']} ABBA pairs, sampler every "
        f"{1000 * result['interval_s']:g} ms.",
        "",
        "| loop | ms/step without | ms/step with | overhead (medians) | paired median (range) | sampler gap median / max | ms per reading |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, v in result["variants"].items():
        low, high = v["paired_overhead_pct_range"]
        lines.append(
            f"| {name} | {v['median_ms_off']:.3f} | {v['median_ms_on']:.3f} | {v['overhead_pct']:+.2f}% | "
            f"{v['paired_overhead_pct_median']:+.2f}% ({low:+.2f}..{high:+.2f}%) | "
            f"{v['sampler']['median_gap_ms']:.1f} / {v['sampler']['max_gap_ms']:.1f} ms | {v['sampler']['mean_read_ms']:.3f} |"
        )
    return lines


def run_rows(record: dict) -> tuple[str, str]:
    info, reps, n = record["engine_info"], record["repetitions"], record["decode_tokens"]
    pre = [r["prefill"] for r in reps]
    dec = [r["decode"] for r in reps]
    pre_s, dec_s = median(w["time_s"] for w in pre), median(w["time_s"] for w in dec)
    pre_w = median(w["energy_j"] / w["time_s"] for w in pre)
    dec_w = median(w["energy_j"] / w["time_s"] for w in dec)
    throttled = sum(w["throttled"] for w in pre + dec)
    reasons = sorted({name for w in pre + dec for name in w["throttle_reasons"]})
    perf = (
        f"| {record['model']} | {record['batch']} | {1000 * pre_s:.2f} | {info['prefill_flops'] / pre_s / 1e12:.0f} | "
        f"{pre_w:.0f} | {median(w['sustained_sm_clock_mhz'] for w in pre):.0f} | {1000 * dec_s / n:.3f} | "
        f"{info['decode_step_bytes'] * n / dec_s / 1e12:.2f} | {dec_w:.0f} | "
        f"{median(w['sustained_sm_clock_mhz'] for w in dec):.0f} | {record['idle']['idle_power_w']:.0f} | "
        f"{throttled}/{len(pre + dec)} {', '.join(reasons)} |"
    )
    windows = [w for w in pre + dec if w.get("counter_vs_integral_rel") is not None]
    rel = [w["counter_vs_integral_rel"] for w in windows]
    long = [w["counter_vs_integral_rel"] for w in windows if w["window_s"] >= MIN_AGREEMENT_WINDOW_S]
    seconds = [w["window_s"] for w in windows]
    agreement = (
        f"| {record['model']} | {record['batch']} | {len(windows)} | {min(seconds):.2f}-{max(seconds):.2f} | "
        f"{100 * median(rel):+.2f}% | {100 * max(abs(r) for r in rel):.2f}% | "
        f"{sum(abs(r) <= AGREEMENT_LIMIT for r in rel)}/{len(rel)} | "
        f"{sum(abs(r) <= AGREEMENT_LIMIT for r in long)}/{len(long)} |"
    )
    return perf, agreement


def runs_section(records: list[dict]) -> list[str]:
    kernels = {r["model"]: KERNEL_NAMES.get(r["engine_info"]["decode_kernel"], r["engine_info"]["decode_kernel"]) for r in records}
    lines = [
        "Prefill = bf16 GEMMs over the model's linear weights for every prompt token; decode step = "
        + "; ".join(f"`{m}`: {k}" for m, k in sorted(kernels.items()))
        + ". Medians over the repetitions; power = counter energy / time.",
        "",
        "| workload | batch | prefill ms | TFLOP/s | prefill W | SM MHz | decode ms/step | TB/s | decode W | SM MHz | idle W | throttled windows |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [run_rows(r) for r in records]
    lines += [perf for perf, _ in rows]
    lines += [
        "",
        "Counter energy vs integrated instant power per window ((integral - counter) / counter):",
        "",
        "| workload | batch | windows | window s | median | max abs | within 2% | within 2%, windows >= 1 s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [agreement for _, agreement in rows]
    samplers = [r["sampler"] for r in records if "sampler" in r]
    if samplers:
        lines += [
            "",
            f"Sampler inside the jobs: {sum(s['samples'] for s in samplers)} samples, "
            f"{sum(s['read_seconds'] for s in samplers) / max(sum(s['samples'] for s in samplers), 1) * 1000:.3f} ms per reading.",
        ]
    return lines


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    root = Path(argv[0])
    lines = []
    if (root / "probe.json").exists():
        lines += ["### Probe", ""] + probe_section(json.loads((root / "probe.json").read_text())) + [""]
    if (root / "sampler_overhead.json").exists():
        lines += ["### Sampler overhead", ""] + overhead_section(json.loads((root / "sampler_overhead.json").read_text())) + [""]
    records = [json.loads(p.read_text()) for p in sorted(root.glob("runs/*/*/*.json"))]
    records = [r for r in records if r.get("status") == "ok"]
    if records:
        lines += ["### Microbench through the pipeline (device nvml, dvfs default)", ""] + runs_section(records)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
