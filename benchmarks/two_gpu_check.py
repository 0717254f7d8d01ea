"""Two measurement jobs at once on a two-GPU machine: helpers for benchmarks/two_gpu_check.sh.

  watch  samples every GPU's energy counter and power through NVML (by NVML index, which
         CUDA_VISIBLE_DEVICES does not touch) until a stop file appears: the ground truth
         of which GPU drew the energy when;
  hold   holds the GPU locks of given indices until a stop file appears, so that jobs wait
         or go to the other GPU;
  check  judges the jobs' records and traces against the watcher's samples and writes a
         JSON verdict.

Reads GPUs only; never changes a power limit or a clock.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import pandas as pd

# A GPU counts as idle while a job runs on the other when its mean power stays within this
# factor (plus margin) of its own idle baseline; the working GPU must draw this much more.
IDLE_FACTOR = 1.25
IDLE_MARGIN_W = 20.0
BUSY_OVER_IDLE = 1.5
# Counter readings of a job are matched to the watcher's readings of the same GPU within the
# job's lifetime, widened by this much (the watcher samples every 20 ms, counters move every 100).
MATCH_SLACK_S = 1.0


def cmd_watch(args) -> int:
    from phasewatt.gpu.nvml import NvmlGpu
    from phasewatt.gpu.locks import visible_nvidia_gpu_count

    gpus = [NvmlGpu(index) for index in range(visible_nvidia_gpu_count())]
    rows = []
    stop = Path(args.stop_file)
    try:
        while not stop.exists():
            for gpu in gpus:
                rows.append(
                    {
                        "t_unix_s": time.time(),
                        "index": gpu.index,
                        "serial": gpu.serial,
                        "energy_mj": gpu.energy_mj(),
                        "power_average_w": gpu.power_average_w(),
                    }
                )
            time.sleep(args.interval_s)
    finally:
        for gpu in gpus:
            gpu.close()
    pd.DataFrame(rows).to_parquet(args.out, index=False)
    return 0


def cmd_hold(args) -> int:
    from phasewatt.gpu.locks import acquire_gpu

    with contextlib.ExitStack() as held:
        for index in args.indices.split(","):
            held.enter_context(acquire_gpu(args.lock_dir, 1, env={"CUDA_VISIBLE_DEVICES": index}))
        Path(args.ready_file).touch()
        while not Path(args.stop_file).exists():
            time.sleep(0.05)
    return 0


def _load_runs(folder: Path) -> list[dict]:
    runs = []
    for path in sorted(folder.rglob("*.json")):
        record = json.loads(path.read_text())
        trace_path = path.with_name(record.get("trace_file") or path.stem + ".trace.parquet")
        record["_trace"] = pd.read_parquet(trace_path) if trace_path.exists() else pd.DataFrame()
        record["_path"] = str(path)
        runs.append(record)
    return runs


def _span(watch: pd.DataFrame, index: int, t0: float, t1: float) -> pd.DataFrame:
    rows = watch[(watch["index"] == index) & (watch["t_unix_s"] >= t0) & (watch["t_unix_s"] <= t1)]
    return rows.sort_values("t_unix_s")


def _fingerprint(record: dict, watch: pd.DataFrame) -> dict:
    """Which GPUs' counters could have produced the job's counter readings: the readings in its
    trace must lie within a GPU's counter range over the job's lifetime."""
    trace = record["_trace"]
    lo, hi = int(trace["energy_mj"].min()), int(trace["energy_mj"].max())
    t0, t1 = record["wall_start_unix_s"] - MATCH_SLACK_S, record["wall_end_unix_s"] + MATCH_SLACK_S
    fits = []
    for index in sorted(watch["index"].unique()):
        span = _span(watch, int(index), t0, t1)
        if len(span) and span["energy_mj"].min() <= lo and hi <= span["energy_mj"].max():
            fits.append(int(index))
    # Counters of two GPUs could by chance span overlapping values: then the reading fits
    # both and only the power split of the jobs run alone tells them apart.
    return {"trace_counter_mj": [lo, hi], "fits_gpus": fits, "unambiguous": len(fits) == 1, "ok": record["gpu_index"] in fits}


def _power_split(record: dict, watch: pd.DataFrame, baseline_w: dict) -> dict:
    """Mean power of each GPU while the job ran, and the energy each counter gained."""
    out = {}
    for index in sorted(watch["index"].unique()):
        span = _span(watch, int(index), record["wall_start_unix_s"], record["wall_end_unix_s"])
        out[int(index)] = {
            "mean_power_w": float(span["power_average_w"].mean()),
            "counter_gain_j": float(span["energy_mj"].iloc[-1] - span["energy_mj"].iloc[0]) / 1000.0,
            "idle_baseline_w": baseline_w[int(index)],
        }
    return out


def _window_energy_j(record: dict) -> float:
    return sum(rep[phase]["counter_energy_j"] for rep in record["repetitions"] for phase in ("prefill", "decode"))


def cmd_check(args) -> int:
    watch = pd.read_parquet(args.watch)
    first = watch["t_unix_s"].min()
    baseline = watch[watch["t_unix_s"] <= first + args.baseline_s]
    baseline_w = {int(i): float(g["power_average_w"].mean()) for i, g in baseline.groupby("index")}
    serial_of = {int(i): str(g["serial"].iloc[0]) for i, g in watch.groupby("index")}
    verdict = {"idle_baseline_w": baseline_w, "serials": serial_of, "checks": []}

    def check(name: str, ok: bool, **facts) -> None:
        verdict["checks"].append({"check": name, "ok": bool(ok), **facts})
        print(f"{'PASS' if ok else 'FAIL'} {name}: {json.dumps(facts, default=str)}")

    together = _load_runs(Path(args.runs) / "together")
    check("two jobs at once: two records, both ok", len(together) == 2 and all(r["status"] == "ok" for r in together),
          records=[r["_path"] for r in together])
    if len(together) == 2:
        a, b = together
        check("two jobs at once: different GPU indices and serials",
              a["gpu_index"] != b["gpu_index"] and a["gpu_serial"] != b["gpu_serial"],
              gpus=[(r["gpu_index"], r["gpu_serial"], r.get("gpu_assigned_by")) for r in together])
        overlap_s = min(a["wall_end_unix_s"], b["wall_end_unix_s"]) - max(a["wall_start_unix_s"], b["wall_start_unix_s"])
        check("two jobs at once: their measurements overlapped in time", overlap_s > 0, overlap_s=round(overlap_s, 2))

    runs = together + [r for phase in ("alone_on_0", "alone_on_1") for r in _load_runs(Path(args.runs) / phase)]
    for record in runs:
        name = Path(record["_path"]).relative_to(args.runs).parts[0] + "/" + record["model"]
        check(f"{name}: record's serial is that of NVML index {record['gpu_index']}",
              serial_of.get(record["gpu_index"]) == record["gpu_serial"], record_serial=record["gpu_serial"])
        fingerprint = _fingerprint(record, watch)
        check(f"{name}: its counter readings fit GPU {record['gpu_index']}'s counter", fingerprint.pop("ok"), **fingerprint)
        split = _power_split(record, watch, baseline_w)
        own = split[record["gpu_index"]]
        check(f"{name}: its windows' energy fits in its own GPU's counter gain",
              _window_energy_j(record) <= own["counter_gain_j"] * 1.02 + 0.5,
              window_energy_j=round(_window_energy_j(record), 1), own_counter_gain_j=round(own["counter_gain_j"], 1))

    for phase, busy in (("alone_on_0", 0), ("alone_on_1", 1)):
        alone = _load_runs(Path(args.runs) / phase)
        check(f"{phase}: one record, ok, on GPU {busy}",
              len(alone) == 1 and alone[0]["status"] == "ok" and alone[0]["gpu_index"] == busy,
              gpus=[r["gpu_index"] for r in alone])
        if len(alone) != 1:
            continue
        split = _power_split(alone[0], watch, baseline_w)
        idle = 1 - busy
        check(f"{phase}: GPU {busy} worked while GPU {idle} stayed idle (the kernels ran where the counter was read)",
              split[idle]["mean_power_w"] <= IDLE_FACTOR * split[idle]["idle_baseline_w"] + IDLE_MARGIN_W
              and split[busy]["mean_power_w"] >= BUSY_OVER_IDLE * split[idle]["mean_power_w"],
              power=split)

    verdict["ok"] = all(c["ok"] for c in verdict["checks"])
    Path(args.out).write_text(json.dumps(verdict, indent=1, default=str) + "\n")
    print("ALL PASS" if verdict["ok"] else "SOME CHECKS FAILED")
    return 0 if verdict["ok"] else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    watch = sub.add_parser("watch")
    watch.add_argument("--out", required=True)
    watch.add_argument("--stop-file", required=True)
    watch.add_argument("--interval-s", type=float, default=0.02)
    watch.set_defaults(func=cmd_watch)
    hold = sub.add_parser("hold")
    hold.add_argument("--indices", required=True, help="comma-separated NVML indices, e.g. 0,1")
    hold.add_argument("--lock-dir", required=True)
    hold.add_argument("--ready-file", required=True)
    hold.add_argument("--stop-file", required=True)
    hold.set_defaults(func=cmd_hold)
    check = sub.add_parser("check")
    check.add_argument("--watch", required=True)
    check.add_argument("--runs", required=True, help="folder with together/, alone_on_0/, alone_on_1/")
    check.add_argument("--baseline-s", type=float, default=3.0, help="first seconds of the watch, all GPUs idle")
    check.add_argument("--out", required=True)
    check.set_defaults(func=cmd_check)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
