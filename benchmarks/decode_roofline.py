"""How close the native engine runs to the roofline, on the GPU it runs on.

Measures, in the same run, the device-to-device copy bandwidth (bytes read + written per
second of a large copy) and the bf16 GEMM rate (8192^3), then for each model of config.yaml,
batch size and prompt length times with CUDA events:
- a decode step (greedy, CUDA graph, per-layer torch.compile unless the variant says
  otherwise), against the floor = (weights + cache or state bytes of that step, from
  ModelSpec.decode_step_cost, averaged over the timed steps) / copy bandwidth;
- the whole prefill, against the floor = max(FLOPs / GEMM rate, bytes / copy bandwidth)
  from ModelSpec.prefill_cost.
decode_bw_frac = floor / measured is the share of the copy bandwidth the step achieves.

Variants: eager (no graph, no compile), graph (CUDA graph only), compile (graph of the
per-layer compiled step, the engine's default), compile-max (compile_mode
max-autotune-no-cudagraphs), compile-nopdl (compile with the decode kernels'
programmatic dependent launch off: pdl false), and the GEMV ablations compile-nogemv, -unfused,
-fused; a suffix +sdpa or +matmul picks the decode attention (gqa, mla), and suffixes
@option=value set native engine options (values read as YAML), e.g.
compile@pdl=false or compile+matmul@gemv_max_rows=0@compile_mode=max-autotune-no-cudagraphs.
--variants run at every configuration, --compare only at --compare-batches x
--compare-prompts (a +sdpa/+matmul variant only where it is not the model's default on the
device). Configurations run in --batches order (all models at the first batch, then the
compare variants, then the next batch); once --budget-s is spent the rest are listed as
skipped. Prefill is timed up to --prefill-max-tokens tokens (the engine's setup still runs
one). Results are rewritten after every configuration, so a run cut short still leaves its
tables; the table is printed at the end.

Inductor settings are process-wide and compiled layers are reused by later engines of the
same architecture, so variants that differ only in inductor settings (compile-max) are best
compared in separate runs.

GPU (about 5-6 minutes for all five models; never changes power limits or clocks):
    OUT=/some/dir PYTHONPATH=src python3 benchmarks/decode_roofline.py
CPU smoke check (tiny models, a few seconds):
    PYTHONPATH=src python3 benchmarks/decode_roofline.py --smoke --out /tmp/roofline

Writes decode_roofline.md and decode_roofline.csv into --out (default $OUT).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import yaml

from phasewatt.config import exit_on_error, select_model_specs
from phasewatt.engines.native import DEFAULT_OPTIONS, NativeEngine, resolve_options
from phasewatt.errors import ConfigError
from phasewatt.io import write_text
from phasewatt.models.decoder import ALL_DECODE_ATTENTION
from phasewatt.models.registry import MODEL_CLASSES, model_class
from phasewatt.models.spec import ModelSpec

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = {
    "eager": {"cuda_graph": False, "compile": False},
    "graph": {"cuda_graph": True, "compile": False},
    "compile": {"cuda_graph": True, "compile": "auto"},
    "compile-nogemv": {"cuda_graph": True, "compile": "auto", "gemv_max_rows": 0},
    "compile-unfused": {"cuda_graph": True, "compile": "auto", "gemv_fuse": False},
    "compile-fused": {"cuda_graph": True, "compile": "auto", "gemv_fuse": True},
    "compile-max": {"cuda_graph": True, "compile": "auto", "compile_mode": "max-autotune-no-cudagraphs"},
    "compile-nopdl": {"cuda_graph": True, "compile": "auto", "pdl": False},
}

# Tiny shapes for --smoke (CPU): every architecture, a few layers.
SMOKE_MODELS = {
    "gqa": dict(arch="gqa", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=96, vocab_size=128, qk_norm=True, tied_embeddings=True),
    "mla": dict(arch="mla", n_layers=2, d_model=64, n_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12, d_ff=96, vocab_size=128),
    "gdn": dict(arch="gdn", n_layers=2, d_model=64, n_heads=2, head_dim=16, expand_v=2, conv_size=4, d_ff=96, vocab_size=128),
    "mamba2": dict(arch="mamba2", n_layers=2, d_model=64, d_state=16, head_dim=16, expand=2, n_groups=1, conv_size=4, chunk_size=8, vocab_size=128, tied_embeddings=True),
}

COLUMNS = [
    "model", "arch", "variant", "batch", "prompt", "status",
    "decode_ms", "decode_floor_ms", "decode_bw_frac", "decode_tb_s",
    "prefill_ms", "prefill_floor_ms", "prefill_vs_floor", "prefill_bound",
    "build_s", "prefill_first_s", "compile_s", "capture_s", "prefill_capture_s", "compile", "prefill_graph", "decode_attention", "gemv_max_rows", "pdl", "cache_len",
    "device", "torch", "copy_tb_s", "gemm_tflop_s",
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "config.yaml"))
    p.add_argument("--models", default=None, help="comma-separated model names (default: all of config.yaml)")
    p.add_argument("--batches", default="1,8,32,128")
    p.add_argument("--prompts", default="512,2048")
    p.add_argument("--variants", default="compile", help="run at every configuration")
    p.add_argument("--compare", default="compile+sdpa", help="run only at the compare points")
    p.add_argument("--compare-batches", default="1")
    p.add_argument("--compare-prompts", default="512,2048")
    p.add_argument("--decode-tokens", type=int, default=None, help="cache room for decode (default: config.yaml decode_tokens)")
    p.add_argument("--decode-steps", type=int, default=32, help="steps per timed decode window (eager: 8)")
    p.add_argument("--prefill-max-tokens", type=int, default=65536, help="time prefill only up to batch x prompt of this many tokens")
    p.add_argument("--budget-s", type=float, default=300.0, help="start no configuration after this many seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny models on CPU, to check the script")
    return parse_with_out(p, argv)


def parse_with_out(p: argparse.ArgumentParser, argv=None, writes: str = "tables"):
    """p's arguments plus --out (default $OUT), which must be given one way or the other: the
    folder a benchmark script writes its `writes` to (the device call's $OUT comes back)."""
    p.add_argument("--out", default=os.environ.get("OUT"))
    args = p.parse_args(argv)
    if not args.out:
        p.error(f"--out or $OUT: the directory to write the {writes} to")
    return args


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def variant_options(variant: str) -> dict:
    """Engine options of a variant name such as compile+matmul or compile+fused@pdl=false@gemv_max_rows=0."""
    name, *overrides = variant.split("@")
    base, _, attention = name.partition("+")
    if base not in VARIANTS or attention not in ("",) + ALL_DECODE_ATTENTION:
        raise SystemExit(f"variant {variant!r}: allowed {', '.join(VARIANTS)}, optionally +" + ", +".join(ALL_DECODE_ATTENTION)
                         + " and @option=value suffixes")
    options = dict(VARIANTS[base])
    if attention:
        options["decode_attention"] = attention
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or key not in DEFAULT_OPTIONS:
            raise SystemExit(f"variant {variant!r}: {item!r} is not option=value of a native engine option ({', '.join(DEFAULT_OPTIONS)})")
        options[key] = yaml.safe_load(value)
    try:
        resolve_options(options)
    except ConfigError as exc:
        raise SystemExit(f"variant {variant!r}: {exc}") from None
    return options


# ----- timing -------------------------------------------------------------------------------
class Timer:
    """Seconds of a callable: CUDA events on a GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t

    def median(self, fn, reps: int) -> float:
        return statistics.median(self(fn) for _ in range(reps))


def graph_replay_seconds(run, reps: int):
    """(median seconds of one replay of a CUDA graph of run(), run()'s outputs in that graph):
    run() is warmed up (compiled) on a side stream first, as capture needs, and each replay
    is timed on its own with CUDA events. The sweep and the PDL and MLA benchmarks time this
    way."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = run()
    graph.replay()
    seconds = Timer(torch.device("cuda")).median(graph.replay, reps)
    return seconds, outs


def copy_bandwidth(device: torch.device, timer: Timer, nbytes: int) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = timer.median(lambda: [dst.copy_(src) for _ in range(10)], 5) / 10
    del src, dst
    return 2 * nbytes / seconds


def gemm_rate(device: torch.device, timer: Timer, n: int) -> float:
    """bf16 (float32 on CPU) matrix-product FLOP/s of n x n x n."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    seconds = timer.median(lambda: [a @ b for _ in range(10)], 5) / 10
    return 2.0 * n**3 / seconds


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": "cpu"}
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        try:
            import pynvml

            pynvml.nvmlInit()
            env["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception as exc:  # the driver version is informative only
            env["driver"] = f"unknown ({type(exc).__name__})"
    for module in ("triton", "fla"):
        try:
            env[module] = __import__(module).__version__
        except Exception:
            env[module] = None
    return env


# ----- one configuration --------------------------------------------------------------------
def decode_floor_s(spec: ModelSpec, batch: int, prompt: int, steps: int, bandwidth: float) -> float:
    total = sum(spec.decode_step_cost(batch, prompt + i + 1).hbm_bytes for i in range(steps))
    return total / steps / bandwidth


def prefill_floor_s(spec: ModelSpec, batch: int, prompt: int, bandwidth: float, flops_rate: float) -> tuple[float, str]:
    cost = spec.prefill_cost(batch, prompt)
    compute, memory = cost.flops / flops_rate, cost.hbm_bytes / bandwidth
    return (compute, "compute") if compute >= memory else (memory, "memory")


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def measure_one(spec, variant, batch, prompt, args, device, timer, roof, with_prefill) -> dict:
    """Build the engine for one configuration and variant, time decode (and prefill)."""
    row = {"model": spec.name, "arch": spec.arch, "variant": variant, "batch": batch, "prompt": prompt}
    if device.type == "cuda":
        need = spec.memory_bytes(batch, prompt + args.decode_tokens)
        have = torch.cuda.get_device_properties(device).total_memory
        if need > 0.95 * have:
            return {**row, "status": f"infeasible: needs {need / 1e9:.0f} GB of {have / 1e9:.0f} GB"}
    engine = NativeEngine(
        spec=spec, gpu=None, batch=batch, prompt_len=prompt, decode_tokens=args.decode_tokens,
        seed=args.seed, device=device, options=variant_options(variant),
    )
    try:
        setup = engine.setup()
        info = engine.describe()
        row.update(
            build_s=setup["build_s"], prefill_first_s=setup.get("prefill_first_s"), compile_s=setup["compile_s"],
            capture_s=setup["capture_s"], prefill_capture_s=setup.get("prefill_capture_s"), compile=info["compile"],
            prefill_graph=info.get("prefill_graph"), decode_attention=info["decode_attention"], gemv_max_rows=info["gemv_max_rows"], pdl=info.get("pdl"), cache_len=info["cache_len"],
        )
        steps = min(args.decode_steps, args.decode_tokens)
        if variant.startswith("eager"):
            steps = min(steps, 8)
        engine.decode(steps)  # warm: first replay, caches touched
        step_s = timer.median(lambda: engine.decode(steps), 3) / steps
        floor_s = decode_floor_s(spec, batch, prompt, steps, roof["copy_bytes_per_s"])
        bytes_per_step = floor_s * roof["copy_bytes_per_s"]
        row.update(
            decode_ms=step_s * 1e3, decode_floor_ms=floor_s * 1e3, decode_bw_frac=floor_s / step_s,
            decode_tb_s=bytes_per_step / step_s / 1e12,
        )
        if with_prefill and batch * prompt <= args.prefill_max_tokens:
            engine.prefill()  # warm (setup's prefills ran before or after the decode compile)
            first = timer(engine.prefill)
            reps = min(5, int(2.0 / max(first, 1e-6)))
            prefill_s = timer.median(engine.prefill, reps) if reps >= 1 else first
            floor, bound = prefill_floor_s(spec, batch, prompt, roof["copy_bytes_per_s"], roof["gemm_flop_per_s"])
            row.update(prefill_ms=prefill_s * 1e3, prefill_floor_ms=floor * 1e3, prefill_vs_floor=prefill_s / floor, prefill_bound=bound)
        row["status"] = "ok"
    except Exception as exc:
        if not is_oom(exc):
            traceback.print_exc(file=sys.stderr)
        first_line = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        row["status"] = "oom" if is_oom(exc) else f"error: {type(exc).__name__}: {first_line}"
    finally:
        engine.close()
    return row


# ----- output -------------------------------------------------------------------------------
def fmt(value, digits=3) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def render(rows: list[dict], env: dict, roof: dict, args, elapsed_s: float) -> tuple[str, str]:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    run_info = {"device": env["device"], "torch": env["torch"], "copy_tb_s": roof["copy_bytes_per_s"] / 1e12, "gemm_tflop_s": roof["gemm_flop_per_s"] / 1e12}
    for row in rows:
        writer.writerow({k: row.get(k, run_info.get(k, "")) for k in COLUMNS})
    lines = [
        "# Native engine against the roofline",
        "",
        f"- device: {env['device']} (driver {env.get('driver', '-')}), torch {env['torch']}, CUDA {env.get('cuda', '-')}, "
        f"triton {env.get('triton')}, fla {env.get('fla')}",
        f"- measured copy bandwidth (read + write): {roof['copy_bytes_per_s'] / 1e12:.3f} TB/s; "
        f"{roof['gemm_dtype']} GEMM {roof['gemm_n']}^3: {roof['gemm_flop_per_s'] / 1e12:.1f} TFLOP/s",
        f"- decode floor = ModelSpec.decode_step_cost bytes / copy bandwidth, averaged over the {args.decode_steps} timed steps after the prompt (eager: 8); "
        "bw frac = floor / measured step time",
        "- prefill floor = max(ModelSpec.prefill_cost FLOPs / GEMM rate, bytes / copy bandwidth); vs floor = measured / floor",
        f"- wall time of this run: {elapsed_s:.0f} s",
        "",
        "| model | variant | batch | prompt | decode ms/step | floor ms | bw frac | TB/s | prefill ms | floor ms | vs floor | bound | pf graph | build s | 1st prefill s | compile s | capture s | attention | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cells = [r["model"], r["variant"], r["batch"], r["prompt"], fmt(r.get("decode_ms")), fmt(r.get("decode_floor_ms")),
                 fmt(r.get("decode_bw_frac"), 2), fmt(r.get("decode_tb_s")), fmt(r.get("prefill_ms")), fmt(r.get("prefill_floor_ms")),
                 fmt(r.get("prefill_vs_floor"), 2), r.get("prefill_bound", ""), fmt(r.get("prefill_graph")), fmt(r.get("build_s"), 2),
                 fmt(r.get("prefill_first_s"), 2), fmt(r.get("compile_s"), 2),
                 fmt(r.get("capture_s"), 2), r.get("decode_attention") or "", r["status"]]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n", buf.getvalue()


def load_specs(args) -> list[ModelSpec]:
    if args.smoke:
        entries, source = SMOKE_MODELS, "the smoke set"
    else:
        entries, source = yaml.safe_load(Path(args.config).read_text())["models"], args.config
    specs = exit_on_error(select_model_specs, entries, args.models, source)
    return [s for s in specs if _importable(s.arch)]


def _importable(arch: str) -> bool:
    import importlib.util

    if importlib.util.find_spec(MODEL_CLASSES[arch][0]) is None:
        print(f"skipping {arch}: no model module {MODEL_CLASSES[arch][0]}", file=sys.stderr)
        return False
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    if args.smoke:
        args.batches, args.prompts, args.compare_batches, args.compare_prompts = "1,2", "8", "1", "8"
        args.decode_steps = 4
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run on the GPU machine, or use --smoke on CPU")
        device = torch.device("cuda")
    if args.decode_tokens is None:
        args.decode_tokens = 8 if args.smoke else int(yaml.safe_load(Path(args.config).read_text()).get("decode_tokens", 128))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for v in names(args.variants) + names(args.compare):
        variant_options(v)
    specs = load_specs(args)
    timer = Timer(device)
    env = environment(device)
    gemm_n = 512 if args.smoke else 8192
    roof = {
        "copy_bytes_per_s": copy_bandwidth(device, timer, (64 << 20) if args.smoke else (4 << 30)),
        "gemm_flop_per_s": gemm_rate(device, timer, gemm_n),
        "gemm_n": gemm_n,
        "gemm_dtype": "bf16" if device.type == "cuda" else "float32",
    }
    print(f"{env['device']}: copy {roof['copy_bytes_per_s'] / 1e12:.3f} TB/s, GEMM {roof['gemm_flop_per_s'] / 1e12:.1f} TFLOP/s", flush=True)

    rows: list[dict] = []
    for spec, variant, batch, prompt, with_prefill in plan(specs, args):
        if time.perf_counter() - t0 > args.budget_s:
            row = {"model": spec.name, "arch": spec.arch, "variant": variant, "batch": batch, "prompt": prompt, "status": "skipped (time budget)"}
        else:
            row = measure_one(spec, variant, batch, prompt, args, device, timer, roof, with_prefill)
        rows.append(row)
        print(" ".join(f"{k}={fmt(row.get(k))}" for k in ("model", "variant", "batch", "prompt", "decode_ms", "decode_bw_frac", "prefill_ms", "prefill_vs_floor", "compile_s", "status")), flush=True)
        table, table_csv = render(rows, env, roof, args, time.perf_counter() - t0)
        write_text(out / "decode_roofline.md", table)
        write_text(out / "decode_roofline.csv", table_csv)
    print(render(rows, env, roof, args, time.perf_counter() - t0)[0])
    return 0


def plan(specs: list[ModelSpec], args) -> list[tuple]:
    """(spec, variant, batch, prompt, with_prefill) in the order they run: the main variants at
    the smallest batch (the targets), then the compare variants, then the larger batches.
    A +sdpa/+matmul variant runs only for models with that choice and not as their default."""
    main, compare = names(args.variants), [v for v in names(args.compare) if v not in names(args.variants)]
    batches, prompts = ints(args.batches), sorted(ints(args.prompts))
    first = [(s, v, batches[0], p, i == 0) for s in specs for p in prompts for i, v in enumerate(main)]
    points = [(b, p) for b in ints(args.compare_batches) for p in ints(args.compare_prompts)]
    extra = [(s, v, b, p, False) for b, p in points for s in specs for v in compare if _applies(v, s, on_cuda=not args.smoke)]
    rest = [(s, v, b, p, i == 0) for b in batches[1:] for s in specs for p in prompts for i, v in enumerate(main)]
    return first + extra + rest


def _applies(variant: str, spec: ModelSpec, on_cuda: bool) -> bool:
    """Whether a variant is worth a row for this model: a decode attention it names (+sdpa,
    +matmul, @decode_attention=...) only where the model has that choice and it is not what
    the engine picks on this device anyway."""
    attention = variant_options(variant).get("decode_attention")
    if not attention:
        return True
    cls = model_class(spec.arch)
    if not hasattr(cls, "set_decode_attention"):
        return False
    if on_cuda:
        default = cls.cuda_decode_attention_for(spec, getattr(torch, spec.dtype))
    else:
        default = cls.default_decode_attention
    return attention != default


if __name__ == "__main__":
    sys.exit(main())
