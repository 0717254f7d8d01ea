"""Tune the decode GEMV kernel (phasewatt.models.gemv) on this GPU and time it against cuBLAS
(F.linear) and inductor's generated reduction, for every weight shape a decode step of the
config.yaml models multiplies by.

For each (rows of x, N, K): enough distinct copies of the weight that together they are many
times the L2 cache, one product per copy captured in a CUDA graph, the graph replayed; time
per product against the floor (the weight's bytes over the copy bandwidth measured in the same
run). Every kernel configuration is checked against a float32 product first (relative error
<= 1e-2) and dropped if it fails. The best configuration of each shape is written as the tuned
table the kernel reads (src/phasewatt/models/gemv_configs/<GPU name>.json) and to --out, with
gemv_sweep.md (tables) and gemv_sweep.csv (every timing).

    PYTHONPATH=src python3 benchmarks/gemv_sweep.py --out $OUT            # GPU, a few minutes
    PYTHONPATH=src python3 benchmarks/gemv_sweep.py --smoke --out /tmp/g  # CPU: shapes, no kernel

It never touches power limits or clocks.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch._dynamo.config as dynamo_config
import torch._inductor.config as inductor_config
import torch.nn.functional as F
import yaml
from torch.utils._python_dispatch import TorchDispatchMode

from decode_roofline import Timer, copy_bandwidth, graph_replay_seconds, parse_with_out  # a sibling script: the same bandwidth probe
from phasewatt.config import exit_on_error, select_model_specs
from phasewatt.io import write_json, write_text
from phasewatt.models import gemv
from phasewatt.models.registry import build_model
from phasewatt.models.spec import ModelSpec

ROOT = Path(__file__).resolve().parents[1]
COPY_BYTES_TARGET = 1 << 30  # weights cycled through per graph replay: >> the L2 cache
MAX_COPIES = 512
REL_ERR_LIMIT = 1e-2


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "config.yaml"))
    p.add_argument("--models", default=None, help="comma-separated model names (default: all of config.yaml)")
    p.add_argument("--rows", default="1", help="rows of x (decode batch sizes) to tune; the engine uses the kernel at batch 1")
    p.add_argument("--inductor-models", default="", help="models whose plain shapes are also timed through inductor (slow to compile)")
    p.add_argument("--budget-s", type=float, default=360.0, help="stop tuning new shapes after this many seconds")
    p.add_argument("--only-missing", action="store_true", help="tune only the shapes the package's table for this GPU lacks")
    p.add_argument("--write-table", default="auto", help="tuned table path; auto = the package's gemv_configs/<GPU>.json; none = do not write")
    p.add_argument("--smoke", action="store_true", help="CPU: list the shapes and time F.linear only")
    return parse_with_out(p, argv, writes="results")


class _Products(TorchDispatchMode):
    """Records (variant, N, K) of every GEMV op a traced call makes."""

    def __init__(self):
        super().__init__()
        self.seen: dict[tuple[str, int, int], int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name().removeprefix("phasewatt::").split(".")[0] if func.namespace == "phasewatt" else None
        if name == "gemv_rmsnorm":
            glu = bool(args[9]) if len(args) > 9 else bool((kwargs or {}).get("glu", False))
            variant, weight = gemv.variant_name(True, args[3] is not None, glu), args[6]
        elif name == "gemv":
            variant, weight = "plain", args[1]
        else:
            return func(*args, **(kwargs or {}))
        key = (variant, weight.shape[0], weight.shape[1])
        self.seen[key] = self.seen.get(key, 0) + 1
        return func(*args, **(kwargs or {}))


def decode_products(specs: list[ModelSpec]) -> dict[tuple[str, int, int], dict[str, int]]:
    """(variant, N, K) of every product a batch-1 decode step makes through the kernel ->
    {model: products per step}, from one step of each model on the meta device."""
    products: dict[tuple[str, int, int], dict[str, int]] = {}
    for spec in specs:
        model = build_model(spec, device="meta", dtype=torch.bfloat16).eval().requires_grad_(False)
        gemv.use_gemv(model, 1)
        gemv.fold_norm_weights(model)  # as the engine does: rms variants where a norm folds
        model.setup_caches(1, 64)
        with torch.no_grad(), _Products() as seen:
            model.decode(torch.zeros(1, dtype=torch.long, device="meta"), torch.tensor([3], device="meta"))
        for key, count in seen.seen.items():
            products.setdefault(key, {})[spec.name] = count
    return products


def candidate_configs(rows: int, k: int) -> list[dict]:
    """Block shapes worth trying: 16-byte loads for every thread, a bounded register tile."""
    bucket = gemv.rows_bucket(rows)
    k_cap = 1 << (k - 1).bit_length()
    configs = []
    ns = (1, 2, 4, 8, 16, 32) if bucket == 1 else (1, 2, 4, 8)
    ks = (256, 512, 1024) if bucket == 1 else (128, 256, 512)
    for block_n, block_k, warps, stages in itertools.product(ns, ks, (4, 8), (1, 2, 3)):
        tile = block_n * block_k
        if block_k > max(k_cap, 128) or tile < warps * 32 * 8 or tile * bucket > 16384 or tile < 512:
            continue
        if bucket > 1 and stages == 3:
            continue
        configs.append({"BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": warps, "num_stages": stages})
    if bucket == 1 and 1024 < k <= 4096:
        # A whole row per tile: under PDL a program then loads all its weights before its wait
        # (the first tile is loaded early), which pays for small products. One K step: stages 1.
        for block_n, warps in itertools.product((1, 2, 4), (4, 8)):
            if block_n * k_cap <= 16384:
                configs.append({"BLOCK_N": block_n, "BLOCK_K": k_cap, "num_warps": warps, "num_stages": 1})
    return configs


class GraphTimer:
    """Seconds per call of fn(x, w) over the weight copies, from CUDA graph replays."""

    def __init__(self, reps: int = 5):
        self.reps = reps

    def __call__(self, fn, x, weights) -> float:
        seconds, _ = graph_replay_seconds(lambda: [fn(x, w) for w in weights], self.reps)
        return seconds / len(weights)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm().clamp_min(1e-30))


def variant_call(variant: str, rows: int, n: int, k: int):
    """(inputs, kernel(x, w, config), float32 reference(w)) of one fused variant, as the models
    use it: plain with a residual epilogue, norm/rms (folded weight) with a delta (the sum
    written), *_glu without (the MLP's gate_up)."""
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
    delta = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    norm_weight = torch.rand(k, device="cuda", dtype=torch.bfloat16)
    if variant in ("norm", "rms", "norm_glu", "rms_glu"):
        glu = variant.endswith("_glu")
        weight = norm_weight if variant.startswith("norm") else None
        with_delta = None if glu else delta

        def kernel(a, w, config):
            return gemv.triton_gemv(a, w, config, delta=with_delta, norm_weight=weight, rms=True, eps=1e-6, glu=glu)[0]

        s = x.float() + (with_delta.float() if with_delta is not None else 0.0)
        normed = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6) * (weight.float() if weight is not None else 1.0)
        if glu:
            return x, kernel, lambda w: (lambda y: F.silu(y[:, : n // 2]) * y[:, n // 2 :])(F.linear(normed, w.float()))
        return x, kernel, lambda w: F.linear(normed, w.float())
    def kernel(a, w, config):
        return gemv.triton_gemv(a, w, config, residual=residual)[0]

    return x, kernel, lambda w: residual.float() + F.linear(x.float(), w.float())


def tune_shape(variant, rows, n, k, timer, with_inductor) -> list[dict]:
    """Every timing of one (variant, rows, N, K): cublas's plain product (the baseline),
    inductor's (optional), each kernel config of the variant."""
    nbytes = n * k * 2
    copies = max(2, min(MAX_COPIES, math.ceil(COPY_BYTES_TARGET / nbytes)))
    weights_all = torch.randn(copies, n, k, device="cuda", dtype=torch.bfloat16)
    weights = list(weights_all.unbind(0))
    x, kernel, reference = variant_call(variant, rows, n, k)
    ref = reference(weights[0])
    plain_x = x[:, :k].contiguous()
    out = [{"variant": "cublas", "seconds": timer(F.linear, plain_x, weights)}]
    if with_inductor:
        compiled = torch.compile(lambda a, b: F.linear(a, b), dynamic=False, fullgraph=True)
        t = time.perf_counter()
        compiled(plain_x, weights[0])
        out.append({"variant": "inductor", "seconds": timer(compiled, plain_x, weights), "compile_s": time.perf_counter() - t})
    rule = gemv.default_config(rows, n, k)
    for config in candidate_configs(rows, k):
        row = {"variant": f"triton-{variant}", **config, "rule": config == rule}
        try:
            err = rel_err(kernel(x, weights[0], config), ref)
            if not math.isfinite(err) or err > REL_ERR_LIMIT:
                out.append({**row, "status": f"wrong: rel err {err:.2e}"})
                continue
            row["rel_err"] = err
            row["seconds"] = timer(lambda a, b, c=config: kernel(a, b, c), x, weights)
            out.append(row)
        except Exception as exc:  # a config the compiler rejects (registers, shared memory)
            out.append({**row, "status": f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"})
    del weights_all, weights
    torch.cuda.empty_cache()
    return out


def load_specs(args) -> list[ModelSpec]:
    return exit_on_error(select_model_specs, yaml.safe_load(Path(args.config).read_text())["models"], args.models, args.config)


def main(argv=None) -> int:
    args = parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    specs = load_specs(args)
    products = decode_products(specs)
    rows_list = [int(r) for r in args.rows.split(",")]
    inductor_models = set(args.inductor_models.split(",")) if args.inductor_models else set()
    if args.smoke or not torch.cuda.is_available():
        lines = [
            f"{variant} {n} x {k}: " + ", ".join(f"{m} x{c}" for m, c in users.items())
            for (variant, n, k), users in sorted(products.items())
        ]
        write_text(out_dir / "gemv_shapes.txt", "\n".join(lines) + "\n")
        print("\n".join(lines))
        return 0

    inductor_config.coordinate_descent_tuning = True
    dynamo_config.cache_size_limit = 1024
    device_name = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth(torch.device("cuda"), Timer(torch.device("cuda")), 2 << 30)
    print(f"{device_name}: copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    timer = GraphTimer()
    started = time.perf_counter()
    results, table = [], {}
    order = sorted(products.items(), key=lambda item: -item[0][1] * item[0][2])
    if args.only_missing:
        known = gemv.load_table(device_name)
        order = [item for item in order if not all(gemv.config_key(rows, item[0][1], item[0][2], item[0][0]) in known for rows in rows_list)]
        print(f"--only-missing: {len(order)} shapes to tune", flush=True)
    for rows in rows_list:
        for (variant, n, k), users in order:
            if time.perf_counter() - started > args.budget_s:
                print(f"budget reached: rows {rows} {variant} {n}x{k} and later not tuned", flush=True)
                break
            with_inductor = rows == 1 and variant == "plain" and bool(inductor_models & set(users))
            timings = tune_shape(variant, rows, n, k, timer, with_inductor)
            floor_s = n * k * 2 / bandwidth
            for t in timings:
                results.append({"kind": variant, "rows": rows, "N": n, "K": k, "floor_s": floor_s, **t})
            ok = [t for t in timings if t["variant"].startswith("triton") and "seconds" in t]
            if ok:
                best = min(ok, key=lambda t: t["seconds"])
                table[gemv.config_key(rows, n, k, variant)] = {key: best[key] for key in gemv.CONFIG_KEYS} | {
                    "us": round(best["seconds"] * 1e6, 2), "share_of_copy_bandwidth": round(floor_s / best["seconds"], 3),
                }
            cublas = next(t for t in timings if t["variant"] == "cublas")["seconds"]
            best_s = min((t["seconds"] for t in ok), default=float("nan"))
            print(
                f"rows {rows} {variant:>6} {n:>6} x {k:>5}: floor {floor_s * 1e6:7.1f} us  cublas (plain) {floor_s / cublas:5.0%}"
                f"  best triton {floor_s / best_s:5.0%}", flush=True,
            )
            # Written after every shape: a run cut by a time limit keeps what it tuned.
            _write_tables(args, out_dir, device_name, bandwidth, table)
            _write_reports(out_dir, results, products, device_name, bandwidth)
    if results:
        print((out_dir / "gemv_sweep.md").read_text())
    return 0


def _write_tables(args, out_dir: Path, device_name: str, bandwidth: float, table: dict) -> None:
    payload = {
        "device": device_name, "torch": torch.__version__, "triton": _triton_version(),
        "copy_tb_s": round(bandwidth / 1e12, 3), "made_by": "benchmarks/gemv_sweep.py", "configs": table,
    }
    write_json(out_dir / gemv.table_path(device_name).name, table_to_write(args.write_table, out_dir, device_name, payload))
    if args.write_table != "none":
        path = gemv.table_path(device_name) if args.write_table == "auto" else Path(args.write_table)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, table_to_write(args.write_table, out_dir, device_name, payload))


def table_to_write(write_table: str, out_dir: Path, device_name: str, payload: dict) -> dict:
    """The table both copies get: payload merged into the table the engine reads (the
    package's, or --write-table's), else into a previous copy in out_dir. The copy in out_dir
    is what comes back from a GPU machine to be committed, so it must hold the whole table,
    not only this run's shapes."""
    if write_table == "none":
        base = out_dir / gemv.table_path(device_name).name
    else:
        base = gemv.table_path(device_name) if write_table == "auto" else Path(write_table)
    return merged_table(base, payload)


def merged_table(path: Path, payload: dict) -> dict:
    """payload with the configs an existing table at path holds for shapes this run did not
    tune (a sweep cut by its budget, or of some models only, keeps the others' entries)."""
    if not path.is_file():
        return payload
    return {**payload, "configs": {**json.loads(path.read_text()).get("configs", {}), **payload["configs"]}}


def _triton_version() -> str:
    import triton

    return triton.__version__


def _write_reports(out_dir: Path, results: list[dict], products, device_name: str, bandwidth: float) -> None:
    import pandas as pd

    frame = pd.DataFrame(results)
    frame.to_csv(out_dir / "gemv_sweep.csv", index=False)
    timed = frame[frame["seconds"].notna()] if "seconds" in frame else frame.iloc[0:0]
    lines = [f"# GEMV sweep on {device_name}", "", f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; share = floor (weight bytes / copy bandwidth) / time", ""]
    lines += [
        "| kind | rows | N | K | floor us | cublas plain | inductor plain | triton rule | triton best | best config |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    per_model: dict[tuple[str, int], dict[str, float]] = {}
    for (kind, rows, n, k), group in timed.groupby(["kind", "rows", "N", "K"]):
        floor_s = group["floor_s"].iloc[0]

        def share(mask):
            sub = group[mask]
            return f"{floor_s / sub['seconds'].min():.0%}" if len(sub) else ""

        triton = group[group["variant"].str.startswith("triton")]
        best = triton.loc[triton["seconds"].idxmin()] if len(triton) else None
        best_cfg = "" if best is None else f"{int(best.BLOCK_N)}x{int(best.BLOCK_K)} w{int(best.num_warps)} s{int(best.num_stages)}"
        rule = triton["rule"].astype(bool) if len(triton) else triton["variant"].isna()
        lines.append(
            f"| {kind} | {rows} | {n} | {k} | {floor_s * 1e6:.1f} | {share(group['variant'] == 'cublas')} | {share(group['variant'] == 'inductor')} "
            f"| {f'{floor_s / triton[rule].seconds.min():.0%}' if rule.any() else ''} | {share(group['variant'].str.startswith('triton'))} | {best_cfg} |"
        )
        for model, count in products[(kind, n, k)].items():
            acc = per_model.setdefault((model, rows), {"floor": 0.0, "cublas": 0.0, "best": 0.0})
            acc["floor"] += count * floor_s
            acc["cublas"] += count * group[group["variant"] == "cublas"]["seconds"].min()
            acc["best"] += count * (triton["seconds"].min() if len(triton) else float("nan"))
    lines += ["", "Per decode step, all products of a model (sum over its layers; cublas: the plain products alone):", ""]
    lines += ["| model | rows | floor ms | cublas ms | triton best ms | cublas share | triton share |", "|---|---|---|---|---|---|---|"]
    for (model, rows), acc in sorted(per_model.items()):
        lines.append(
            f"| {model} | {rows} | {acc['floor'] * 1e3:.3f} | {acc['cublas'] * 1e3:.3f} | {acc['best'] * 1e3:.3f} "
            f"| {acc['floor'] / acc['cublas']:.0%} | {acc['floor'] / acc['best']:.0%} |"
        )
    failed = frame[frame["status"].notna()] if "status" in frame else frame.iloc[0:0]
    lines += ["", f"configs rejected (compile error or wrong result): {len(failed)}"]
    lines += [f"- {r.kind} {r.rows} {r.N}x{r.K} {r.BLOCK_N}x{r.BLOCK_K} w{r.num_warps} s{r.num_stages}: {r.status}" for r in failed.head(20).itertuples()]
    text = "\n".join(lines) + "\n"
    write_text(out_dir / "gemv_sweep.md", text)


if __name__ == "__main__":
    sys.exit(main())
