"""The `phasewatt` command: probe a GPU, restore DVFS settings after a crash, run one
measurement outside Snakemake. Every user error is one line, `phasewatt: error: ...`."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from phasewatt.errors import PhasewattError

DEFAULT_JOURNAL_DIR = "results/dvfs_journal"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return value


def _open(device: str, gpu_key: str, index: int | None):
    from phasewatt.gpu.select import open_gpu

    return open_gpu(device, gpu_key, index=index)


# ----- probe -------------------------------------------------------------------------------


def _unit(value, unit: str, spec: str = "g") -> str:
    return "n/a" if value is None else f"{value:{spec}} {unit}"


def _format_probe(facts: dict, rate: dict, permitted: bool, why: str) -> list[str]:
    clocks = facts["sm_clocks_mhz"]
    steps = "/".join(str(s) for s in facts["sm_clock_steps_mhz"]) or "-"
    reasons = facts["clocks_event_reasons"]
    lines = [
        f"GPU {facts['index']}: {facts['name']} (serial {facts['serial']}, {facts['memory_gb']:.1f} GB)",
        f"driver: {facts['driver']}",
        f"power limit: {_unit(facts['power_limit_w'], 'W')} (default {_unit(facts['default_power_limit_w'], 'W')}, "
        f"allowed {_unit(facts['power_limit_min_w'], 'W')} to {_unit(facts['power_limit_max_w'], 'W')})",
        f"SM clocks: {facts['sm_clock_count']} supported, {clocks[0]}-{clocks[-1]} MHz in {steps} MHz steps"
        if clocks
        else "SM clocks: none listed",
    ]
    if facts.get("mem_clocks_mhz"):
        lines.append(f"memory clocks: {', '.join(str(c) for c in facts['mem_clocks_mhz'])} MHz")
    lines += [
        f"now: {_unit(facts['power_instant_w'], 'W', '.1f')} instant, {_unit(facts['power_average_w'], 'W', '.1f')} 1-s average, "
        f"SM {_unit(facts['sm_clock_mhz'], 'MHz')}, memory {_unit(facts['mem_clock_mhz'], 'MHz')}, "
        f"{_unit(facts['temperature_c'], 'C')}, clocks-event reasons: "
        + ("n/a" if reasons is None else ", ".join(reasons) or "none"),
        f"sensors over {rate['seconds']:.1f} s: energy counter {rate['energy_updates_per_s']:.1f} updates/s, "
        f"instant power {rate['power_updates_per_s']:.1f} updates/s",
        f"dvfs control: {'permitted' if permitted else 'not permitted'} ({why}); "
        "phasewatt changes settings only with dvfs_control: true",
    ]
    for key in ("instant_power_source", "reasons_source", "temperature_source"):
        if key in facts:
            lines.append(f"{key.replace('_', ' ')}: {facts[key]}")
    lines += [f"unavailable: {item}" for item in facts["unavailable"]]
    return lines


def cmd_probe(args) -> int:
    from phasewatt.gpu.probe import dvfs_permission, gpu_facts, sensor_update_rate

    gpu = _open(args.device, args.gpu, args.index)
    try:
        facts = gpu_facts(gpu)
        rate = sensor_update_rate(gpu, args.seconds)
    finally:
        gpu.close()
    permitted, why = dvfs_permission()
    if args.json:
        print(json.dumps({**facts, "sensor_update": rate, "dvfs_permitted": permitted, "dvfs_permission": why}, indent=1))
    else:
        print("\n".join(_format_probe(facts, rate, permitted, why)))
    return 0


# ----- restore -----------------------------------------------------------------------------


def cmd_restore(args) -> int:
    from phasewatt.gpu.dvfs import replay_journals

    replay_journals(args.journal_dir, lambda index: _open("nvml", "H200", index), echo=print)
    return 0


# ----- run-one -----------------------------------------------------------------------------


def _median(repetitions: list[dict], phase: str, key: str):
    values = [r[phase][key] for r in repetitions if r[phase].get(key) is not None]
    return statistics.median(values) if values else None


def cmd_run_one(args) -> int:
    from phasewatt.config import Job, load_config
    from phasewatt.errors import ConfigError
    from phasewatt.gpu.dvfs import check_dvfs_opt_in
    from phasewatt.gpu.select import resolve_device
    from phasewatt.measure.run import run_job

    config = load_config(args.config)
    if args.model not in config["models"]:
        raise ConfigError(f"--model: {args.model!r} is not a model of {args.config}; allowed: {', '.join(sorted(config['models']))}")
    device = resolve_device(config["device"])
    check_dvfs_opt_in({**config, "grid": {**config["grid"], "dvfs": [args.dvfs]}}, device)
    job = Job(args.model, args.batch, args.seqlen, args.dvfs)
    record_path = Path(args.out_dir) / f"{job.run_id}.json"
    trace_path = Path(args.out_dir) / f"{job.run_id}.trace.parquet"
    record = run_job(config, job, record_path, trace_path, args.journal_dir)
    if record.get("status") != "ok":
        print(f"{job.run_id}: {record.get('status')}: {record.get('reason', '')} -> {record_path}")
        return 0
    reps = record["repetitions"]
    parts = []
    for phase in ("prefill", "decode"):
        mj = _median(reps, phase, "energy_mj_per_token")
        seconds = _median(reps, phase, "time_s")
        parts.append(f"{phase} {mj:.3f} mJ/token in {1000 * seconds:.2f} ms" if mj is not None else f"{phase} -")
    print(f"{job.run_id}: ok: {', '.join(parts)} (medians of {len(reps)}) -> {record_path}")
    return 0


# ----- entry point -------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="phasewatt", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    probe = sub.add_parser("probe", help="print a GPU's facts and sensor update rate; changes nothing")
    probe.add_argument("--index", type=int, default=None, help="NVML index (default: first of CUDA_VISIBLE_DEVICES, else 0)")
    probe.add_argument("--seconds", type=float, default=2.0, help="how long to watch the sensors (default 2)")
    probe.add_argument("--device", choices=["nvml", "sim"], default="nvml")
    probe.add_argument("--gpu", default="H200", help="GPU spec for --device sim (H200, H100)")
    probe.add_argument("--json", action="store_true", help="print JSON instead of text")
    probe.set_defaults(func=cmd_probe)

    restore = sub.add_parser("restore", help="undo DVFS settings left by a killed run (replays its journal)")
    restore.add_argument("--journal-dir", default=DEFAULT_JOURNAL_DIR, help=f"default {DEFAULT_JOURNAL_DIR}")
    restore.set_defaults(func=cmd_restore)

    run = sub.add_parser("run-one", help="measure one (model, batch, seqlen, dvfs) configuration")
    run.add_argument("--config", required=True)
    run.add_argument("--model", required=True)
    run.add_argument("--batch", type=_positive_int, required=True)
    run.add_argument("--seqlen", type=_positive_int, required=True)
    run.add_argument("--dvfs", default="default", help="default, pl<watts> or sm<MHz>")
    run.add_argument("--out-dir", required=True, help="the record goes to OUT_DIR/<model>/bs<b>_seq<s>/<dvfs>.json")
    run.add_argument("--journal-dir", default=DEFAULT_JOURNAL_DIR, help=f"DVFS journal directory (default {DEFAULT_JOURNAL_DIR})")
    run.set_defaults(func=cmd_run_one)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except PhasewattError as err:
        message = " ".join(str(err).split())  # one line, whatever the message holds
        print(f"phasewatt: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
