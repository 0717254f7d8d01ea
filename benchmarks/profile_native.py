"""Where the native engine's GPU time goes, kernel by kernel.

For each model of config.yaml and each configuration (batch x prompt), builds the engine as
the pipeline does (NativeEngine with default options, setup(): compile, capture) and records
with torch.profiler (CUDA activity only, so the host-side profiling adds no gaps):
- prefill: one call as the engine runs it (a CUDA graph replay when captured) and, when it
  was captured, one call of the uncaptured (compiled) path as well;
- decode: --decode-steps steps as CUDA graph replays and the same steps run without the
  graph (the compiled step launched from Python).
For each it writes the top kernels by total time (count, total us, average us), the total
kernel time, the span from the first kernel's start to the last one's end, the idle time
inside that span (launch overhead, host syncs) and the wall time of the call.

GPU (about 3-4 minutes for the five models at the two default configurations):
    OUT=/some/dir PYTHONPATH=src python3 benchmarks/profile_native.py
CPU smoke check (tiny models, no kernels to show):
    PYTHONPATH=src python3 benchmarks/profile_native.py --smoke --out /tmp/profile

Writes profile_native.txt into --out (default $OUT), rewritten after every configuration.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
import traceback
from collections import defaultdict
from pathlib import Path

import torch
import yaml

from phasewatt.config import exit_on_error, select_model_specs
from phasewatt.engines.native import NativeEngine
from phasewatt.io import write_text
from phasewatt.models.spec import ModelSpec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_roofline import SMOKE_MODELS, parse_with_out  # noqa: E402  (the benchmark's tiny shapes, --out)

NAME_CHARS = 100


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "config.yaml"))
    p.add_argument("--models", default=None, help="comma-separated model names (default: all of config.yaml)")
    p.add_argument("--configs", default="1x512,32x2048", help="comma-separated BATCHxPROMPT")
    p.add_argument("--decode-steps", type=int, default=20)
    p.add_argument("--decode-tokens", type=int, default=None, help="cache room for decode (default: config.yaml decode_tokens)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--options", default="", help="engine options as key=value,... (yaml values), e.g. prefill_graph=false")
    p.add_argument("--budget-s", type=float, default=220.0, help="start no configuration after this many seconds")
    p.add_argument("--smoke", action="store_true", help="tiny models on CPU, to check the script")
    return parse_with_out(p, argv, writes="report")


def parse_configs(text: str) -> list[tuple[int, int]]:
    configs = []
    for item in text.split(","):
        batch, sep, prompt = item.strip().partition("x")
        if not sep or not batch.isdigit() or not prompt.isdigit():
            raise SystemExit(f"--configs: {item!r} is not BATCHxPROMPT, e.g. 1x512")
        configs.append((int(batch), int(prompt)))
    return configs


def parse_options(text: str) -> dict:
    options = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--options: {item!r} is not key=value")
        options[key.strip()] = yaml.safe_load(value)
    return options


# ----- one profiled call ----------------------------------------------------------------------
def profiled(fn, cuda: bool):
    """Run fn under the profiler; (kernel records [(name, start_us, end_us)], wall seconds)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        wall_s = time.perf_counter() - t
    wanted = DeviceType.CUDA if cuda else DeviceType.CPU
    records = [
        (e.name, float(e.time_range.start), float(e.time_range.end))
        for e in prof.events()
        if e.device_type == wanted and e.time_range.end > e.time_range.start
    ]
    return records, wall_s


def summarize(title: str, records: list, wall_s: float, top: int) -> str:
    """Top kernels by total time, then the totals: kernel time, span, idle gaps, wall."""
    lines = [f"### {title}", ""]
    if not records:
        lines += [f"no device kernels recorded (wall {wall_s * 1e3:.2f} ms)", ""]
        return "\n".join(lines)
    by_name: dict[str, list[float]] = defaultdict(list)
    for name, start, end in records:
        by_name[name].append(end - start)
    kernel_us = sum(sum(v) for v in by_name.values())
    records = sorted(records, key=lambda r: r[1])
    busy_us, cur_start, cur_end = 0.0, records[0][1], records[0][2]
    for _, start, end in records[1:]:
        if start > cur_end:
            busy_us += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    busy_us += cur_end - cur_start
    span_us = max(r[2] for r in records) - records[0][1]
    lines.append(
        f"kernels: {len(records)} launches, {len(by_name)} distinct; kernel time {kernel_us / 1e3:.3f} ms; "
        f"busy {busy_us / 1e3:.3f} ms; span {span_us / 1e3:.3f} ms; idle gaps {(span_us - busy_us) / 1e3:.3f} ms "
        f"({(span_us - busy_us) / max(span_us, 1e-9):.0%} of span); wall {wall_s * 1e3:.3f} ms"
    )
    lines += ["", f"| {'total us':>10} | {'share':>5} | {'count':>6} | {'avg us':>9} | kernel", "|---:|---:|---:|---:|---|"]
    ranked = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))
    for name, durations in ranked[:top]:
        total = sum(durations)
        short = name if len(name) <= NAME_CHARS else name[: NAME_CHARS - 3] + "..."
        short = short.replace("|", "/")
        lines.append(f"| {total:10.1f} | {total / kernel_us:5.1%} | {len(durations):6d} | {total / len(durations):9.2f} | {short}")
    rest = ranked[top:]
    if rest:
        total = sum(sum(d) for _, d in rest)
        lines.append(f"| {total:10.1f} | {total / kernel_us:5.1%} | {sum(len(d) for _, d in rest):6d} | {'':>9} | ({len(rest)} other kernels)")
    lines.append("")
    return "\n".join(lines)


# ----- one configuration ----------------------------------------------------------------------
def profile_one(spec: ModelSpec, batch: int, prompt: int, args, device, options: dict) -> str:
    """The report section of one model and configuration."""
    cuda = device.type == "cuda"
    head = f"## {spec.name} ({spec.arch}), batch {batch}, prompt {prompt}"
    engine = NativeEngine(
        spec=spec, gpu=None, batch=batch, prompt_len=prompt, decode_tokens=args.decode_tokens, seed=0, device=device, options=options,
    )
    parts = [head, ""]
    try:
        t = time.perf_counter()
        setup = engine.setup()
        info = engine.describe()
        setup_text = ", ".join(f"{k} {v:.2f}" for k, v in setup.items() if isinstance(v, float))
        parts.append(f"setup {time.perf_counter() - t:.1f} s ({setup_text})")
        parts.append("engine: " + ", ".join(f"{k}={info.get(k)}" for k in (
            "compile", "compile_prefill", "prefill_graph", "prefill_graph_error", "cuda_graph", "decode_attention",
            "coordinate_descent_tuning", "cache_len", "dtype")))
        parts.append("")
        steps = min(args.decode_steps, args.decode_tokens)

        engine.prefill()  # warm (a replay, or the compiled path once more)
        records, wall = profiled(engine.prefill, cuda)
        parts.append(summarize(f"prefill ({'CUDA graph replay' if engine.prefill_graph is not None else 'compiled, launched from Python' if engine.compile_prefill else 'eager'})", records, wall, args.top))
        if engine.prefill_graph is not None:
            graph, engine.prefill_graph = engine.prefill_graph, None
            try:
                records, wall = profiled(engine.prefill, cuda)
                parts.append(summarize("prefill without the graph (compiled, launched from Python)", records, wall, args.top))
            finally:
                engine.prefill_graph = graph

        engine.decode(steps)  # warm
        records, wall = profiled(lambda: engine.decode(steps), cuda)
        parts.append(summarize(f"decode, {steps} steps ({'CUDA graph replays' if engine.graph is not None else 'no graph'})", records, wall, args.top))
        if engine.graph is not None:
            graph, engine.graph = engine.graph, None
            try:
                engine.decode(2)  # warm the uncaptured path
                records, wall = profiled(lambda: engine.decode(steps), cuda)
                parts.append(summarize(f"decode, {steps} steps without the graph ({engine.compile_how} compile, launched from Python)", records, wall, args.top))
            finally:
                engine.graph = graph
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        parts.append(f"ERROR {type(exc).__name__}: {first}")
        parts.append("")
    finally:
        engine.close()
    return "\n".join(parts) + "\n"


def load_specs(args) -> list[ModelSpec]:
    if args.smoke:
        return exit_on_error(select_model_specs, SMOKE_MODELS, args.models, "the smoke set")
    return exit_on_error(select_model_specs, yaml.safe_load(Path(args.config).read_text())["models"], args.models, args.config)


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    if args.smoke:
        device = torch.device("cpu")
        args.configs = "1x8,2x16"
        args.decode_steps = min(args.decode_steps, 4)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run on the GPU machine, or use --smoke on CPU")
        device = torch.device("cuda")
    if args.decode_tokens is None:
        args.decode_tokens = 8 if args.smoke else int(yaml.safe_load(Path(args.config).read_text()).get("decode_tokens", 128))
    configs = parse_configs(args.configs)
    options = parse_options(args.options)
    specs = load_specs(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        # CUPTI initialised before any CUDA graph is captured: starting it only after a
        # capture can miss, or crash on, the kernels of graph replays.
        profiled(lambda: torch.ones(1, device=device).add_(1), cuda=True)

    header = io.StringIO()
    header.write("# Native engine kernel profile\n\n")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    header.write(f"- device: {name}, torch {torch.__version__}, CUDA {torch.version.cuda}\n")
    header.write(f"- engine options: {options or 'defaults'}; decode steps profiled: {args.decode_steps}\n")
    header.write("- times from torch.profiler's CUDA activity records; idle gaps = span - busy (union of kernel intervals)\n\n")
    sections: list[str] = []
    for batch, prompt in configs:
        for spec in specs:
            if time.perf_counter() - t0 > args.budget_s:
                sections.append(f"## {spec.name}, batch {batch}, prompt {prompt}\n\nskipped (time budget)\n")
            else:
                t = time.perf_counter()
                sections.append(profile_one(spec, batch, prompt, args, device, options))
                print(f"profiled {spec.name} batch {batch} prompt {prompt} in {time.perf_counter() - t:.1f} s", flush=True)
            write_text(out / "profile_native.txt", header.getvalue() + "\n".join(sections) + f"\nwall time so far: {time.perf_counter() - t0:.0f} s\n")
    print(f"profile_native: {time.perf_counter() - t0:.0f} s, written to {out / 'profile_native.txt'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
