"""One measurement job: open the GPU, check the run fits, apply the DVFS setting, build the
engine, run the harness, write the record and its trace atomically."""

from __future__ import annotations

import os
import platform
import zlib
import socket
import time

import pandas as pd

from phasewatt import __version__
from phasewatt.config import Job, model_spec
from phasewatt.engines import make_engine
from phasewatt.gpu.dvfs import dvfs_applied, parse_dvfs
from phasewatt.gpu.locks import acquire_gpu, default_lock_dir, resolve_gpu_count, slurm_assigned
from phasewatt.gpu.sampler import TRACE_COLUMNS
from phasewatt.gpu.select import open_gpu, resolve_device, resolve_engine
from phasewatt.io import write_json, write_parquet
from phasewatt.measure.harness import MeasureSettings, measure

RECORD_VERSION = 1


def _base_record(config: dict, job: Job, device: str, engine: str, gpu, spec) -> dict:
    return {
        "record_version": RECORD_VERSION,
        "phasewatt_version": __version__,
        "run_id": job.run_id,
        "model": job.model,
        "arch": spec.arch,
        "batch": job.batch,
        "seqlen": job.seqlen,
        "decode_tokens": int(config["decode_tokens"]),
        "dvfs": job.dvfs,
        "device": device,
        "simulated": device == "sim",
        "engine": engine,
        "gpu_spec": config["gpu"],
        "gpu_name": gpu.name,
        "gpu_index": gpu.index,
        "gpu_serial": gpu.serial,
        "driver": gpu.driver,
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "config": {
            "model_spec": spec.to_dict(),
            "repetitions": int(config["repetitions"]),
            "warmups": int(config["warmups"]),
            "min_window_s": float(config["min_window_s"]),
            "sample_interval_s": float(config["sample_interval_s"]),
            "idle_s": float(config["idle_s"]),
            "seed": int(config["seed"]),
            "checkpoint": config.get("checkpoints", {}).get(job.model),
        },
    }


def run_job(config: dict, job: Job, record_path, trace_path, journal_dir, gpu=None, lock_dir=None) -> dict:
    """Measure one job and write its record and trace. Returns the record.

    Without `gpu`, the job first takes one GPU of this node (Slurm's allocation, else the
    first free GPU lock, see phasewatt.gpu.locks) before anything initialises CUDA, and holds
    it until the record is written."""
    if gpu is not None:
        device = "sim" if gpu.virtual_time else resolve_device(config["device"])
        return _measure_on(config, job, record_path, trace_path, journal_dir, gpu, device, assignment=None)
    device = resolve_device(config["device"])
    seed = zlib.crc32(job.run_id.encode()) ^ int(config["seed"])
    if device != "nvml" and config.get("gpus_per_node") is None and not slurm_assigned(os.environ):
        # A simulated (or sensorless) GPU belongs to this process alone: nothing to share.
        gpu = open_gpu(device, config["gpu"], index=0, seed=seed)
        try:
            return _measure_on(config, job, record_path, trace_path, journal_dir, gpu, device, assignment=None, assigned_by="private")
        finally:
            gpu.close()
    n_gpus = resolve_gpu_count(config.get("gpus_per_node"), device)
    with acquire_gpu(default_lock_dir(device) if lock_dir is None else lock_dir, n_gpus) as assignment:
        gpu = open_gpu(device, config["gpu"], index=assignment.index, seed=seed)
        try:
            return _measure_on(config, job, record_path, trace_path, journal_dir, gpu, device, assignment)
        finally:
            gpu.close()


def _measure_on(config: dict, job: Job, record_path, trace_path, journal_dir, gpu, device: str, assignment, assigned_by: str = "caller") -> dict:
    """The measurement itself, on a GPU already chosen and opened."""
    engine_name = resolve_engine(config["engine"], device)
    started = time.perf_counter()
    started_unix_s = time.time()
    setting = parse_dvfs(
        job.dvfs,
        field="dvfs",
        supported_clocks=gpu.supported_sm_clocks_mhz(),
        power_range=gpu.power_limit_constraints_w(),
    )
    spec = model_spec(config, job.model)
    record = _base_record(config, job, device, engine_name, gpu, spec)
    need = spec.memory_bytes(job.batch, job.seqlen + int(config["decode_tokens"]))
    have = gpu.memory_total_bytes()
    trace = pd.DataFrame(columns=TRACE_COLUMNS)
    if need > 0.95 * have:
        record.update(
            status="infeasible",
            reason=f"needs {need / 1e9:.1f} GB (weights, cache, activations) of {have / 1e9:.1f} GB on {gpu.name}",
            memory_needed_bytes=need,
            repetitions=[],
        )
    else:
        record["memory_needed_bytes"] = need
        with dvfs_applied(gpu, setting, journal_dir=journal_dir, allowed=bool(config.get("dvfs_control"))) as effective:
            record["dvfs_effective"] = effective
            t0 = time.perf_counter()
            engine = make_engine(
                engine_name,
                spec=spec,
                gpu=gpu,
                batch=job.batch,
                prompt_len=job.seqlen,
                decode_tokens=int(config["decode_tokens"]),
                seed=int(config["seed"]),
                checkpoint=config.get("checkpoints", {}).get(job.model),
                options=config.get("engine_options") or {},
            )
            try:
                setup = engine.setup()
                setup["total_s"] = time.perf_counter() - t0
                record["setup"] = setup
                record["engine_info"] = engine.describe()
                body = measure(engine, gpu, MeasureSettings.from_config(config), setting.sm_clock_mhz)
            finally:
                engine.close()
        trace = body.pop("trace")
        record.update(status="ok", **body)
    record["trace_file"] = os.path.basename(str(trace_path))
    record["gpu_assigned_by"] = assignment.assigned_by if assignment else assigned_by
    record["slurm_job_id"] = os.environ.get("SLURM_JOB_ID")
    record["wall_s"] = time.perf_counter() - started
    record["wall_start_unix_s"] = started_unix_s
    record["wall_end_unix_s"] = time.time()
    write_parquet(trace_path, trace)
    write_json(record_path, record)
    return record
