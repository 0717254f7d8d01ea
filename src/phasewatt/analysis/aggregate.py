"""Run records -> one tidy table: one row per run x phase x repetition."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from phasewatt.models.spec import ModelSpec

RUN_COLUMNS = [
    "run_id", "model", "arch", "batch", "seqlen", "decode_tokens", "dvfs", "dvfs_kind", "dvfs_value",
    "device", "simulated", "engine", "gpu_name", "gpu_spec", "gpu_index", "gpu_serial", "driver",
    "idle_power_w", "power_limit_w",
]
WINDOW_COLUMNS = [
    "repeats", "tokens", "time_s", "window_s", "energy_j", "integrated_energy_j", "counter_energy_j",
    "tail_correction_j", "energy_mj_per_token", "tokens_per_s", "mean_power_w", "max_power_w",
    "requested_sm_clock_mhz", "sustained_sm_clock_mhz", "throttled", "counter_vs_integral_rel",
    "counter_updates", "counter_stale", "t_begin_s", "t_end_s",
]


# Columns that are readings of the GPU's sensors (NaN for device "none").
ENERGY_COLUMNS = [
    "energy_j", "integrated_energy_j", "counter_energy_j", "tail_correction_j", "energy_mj_per_token",
    "mean_power_w", "max_power_w", "idle_power_w", "counter_vs_integral_rel", "sustained_sm_clock_mhz",
]


def dvfs_kind(token: str) -> tuple[str, float]:
    if token.startswith("pl"):
        return "power_cap", float(token[2:])
    if token.startswith("sm"):
        return "clock_lock", float(token[2:])
    return "default", float("nan")


def phase_cost(record: dict, phase: str) -> tuple[float, float]:
    """(FLOPs, HBM bytes) of one run of the phase, from the model's shapes."""
    spec = ModelSpec.from_config(record["model"], record["config"]["model_spec"])
    batch, seqlen, n = record["batch"], record["seqlen"], record["decode_tokens"]
    if phase == "prefill":
        cost = spec.prefill_cost(batch, seqlen)
        return cost.flops, cost.hbm_bytes
    flops = hbm = 0.0
    for i in range(n):
        cost = spec.decode_step_cost(batch, seqlen + i + 1)
        flops += cost.flops
        hbm += cost.hbm_bytes
    return flops, hbm


def record_rows(record: dict) -> list[dict]:
    if record.get("status") != "ok":
        return []
    kind, value = dvfs_kind(record["dvfs"])
    base = {key: record.get(key) for key in RUN_COLUMNS if key in record}
    base.update(
        dvfs_kind=kind,
        dvfs_value=value,
        idle_power_w=record["idle"]["idle_power_w"],
        power_limit_w=record.get("dvfs_effective", {}).get("effective_power_limit_w"),
    )
    costs = {phase: phase_cost(record, phase) for phase in ("prefill", "decode")}
    rows = []
    for rep in record["repetitions"]:
        for phase in ("prefill", "decode"):
            window = rep[phase]
            row = dict(base, phase=phase, repetition=rep["repetition"])
            row.update({key: window.get(key) for key in WINDOW_COLUMNS})
            row["throttle_reasons"] = ";".join(window.get("throttle_reasons", []))
            row["sw_power_cap"] = "sw_power_cap" in window.get("throttle_reasons", [])
            row["power_violation_s"] = window.get("violation_ns", {}).get("power", 0) / 1e9
            row["thermal_violation_s"] = window.get("violation_ns", {}).get("thermal", 0) / 1e9
            row["sim_true_joules"] = window.get("sim_true_joules", float("nan"))
            row["flops"], row["hbm_bytes"] = costs[phase]
            if record.get("device") == "none":  # wall-clock only: no energy or power was read
                for key in ENERGY_COLUMNS:
                    row[key] = float("nan")
            rows.append(row)
    return rows


def status_row(record: dict) -> dict:
    return {
        "run_id": record["run_id"], "model": record["model"], "batch": record["batch"],
        "seqlen": record["seqlen"], "dvfs": record["dvfs"], "status": record["status"],
        "reason": record.get("reason", ""), "simulated": record.get("simulated"),
        "gpu_name": record.get("gpu_name"),
    }


def aggregate(record_paths) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(measurements, run status) from the record files."""
    rows, statuses = [], []
    for path in record_paths:
        record = json.loads(Path(path).read_text())
        rows.extend(record_rows(record))
        statuses.append(status_row(record))
    measurements = pd.DataFrame(rows)
    return measurements, pd.DataFrame(statuses)


def concatenate(measurement_paths, status_paths, *, parquet_out, csv_out, status_out) -> pd.DataFrame:
    """Join the per-model tables into the study's one table (parquet and CSV) and status."""
    from phasewatt.io import write_csv, write_parquet

    frames = [pd.read_parquet(path) for path in measurement_paths]
    measurements = pd.concat([f for f in frames if len(f)], ignore_index=True) if any(len(f) for f in frames) else pd.DataFrame()
    status = pd.concat([pd.read_csv(path) for path in status_paths], ignore_index=True)
    write_parquet(parquet_out, measurements)
    write_csv(csv_out, measurements)
    write_csv(status_out, status)
    return measurements
