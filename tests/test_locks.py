"""GPU locks: concurrent jobs get distinct GPUs, and a lock never outlives its holder."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
import types

import pytest

from phasewatt.gpu.locks import (
    HOST_LOCK_DIR,
    LOCK_DIR_ENV,
    WORKFLOW_LOCK_DIR,
    GpuAssignmentError,
    acquire_gpu,
    default_lock_dir,
    resolve_gpu_count,
)

FORK = multiprocessing.get_context("fork")


def _hold(lock_dir, n_gpus, env, results, release):
    """Child: take a GPU, report the index and CUDA_VISIBLE_DEVICES, hold until told."""
    with acquire_gpu(lock_dir, n_gpus, env=env) as gpu:
        results.put((os.getpid(), gpu.index, gpu.assigned_by, env["CUDA_VISIBLE_DEVICES"]))
        release.wait(30)


def _start_holders(count, lock_dir, n_gpus, env=None):
    results, release = FORK.Queue(), FORK.Event()
    procs = [FORK.Process(target=_hold, args=(lock_dir, n_gpus, dict(env or {}), results, release)) for _ in range(count)]
    for proc in procs:
        proc.start()
    got = [results.get(timeout=20) for _ in procs]
    return procs, release, got


def _stop(procs, release):
    release.set()
    for proc in procs:
        proc.join(10)
        assert proc.exitcode == 0


def test_contending_processes_get_distinct_gpus_and_an_extra_one_finds_none_free(tmp_path):
    procs, release, got = _start_holders(3, tmp_path, n_gpus=3)
    try:
        assert sorted(index for _, index, _, _ in got) == [0, 1, 2]
        assert all(by == "lock" and visible == str(index) for _, index, by, visible in got)
        with pytest.raises(GpuAssignmentError, match="gpus_per_node: all of GPUs"):
            with acquire_gpu(tmp_path, 3, env={}, wait_s=0.3, poll_s=0.05):
                pass
    finally:
        _stop(procs, release)
    with acquire_gpu(tmp_path, 3, env={}, wait_s=0) as gpu:
        assert gpu.index == 0


def test_lock_is_released_and_environment_restored_after_an_exception(tmp_path):
    env = {"CUDA_VISIBLE_DEVICES": "2,3"}
    with pytest.raises(RuntimeError):
        with acquire_gpu(tmp_path, 2, env=env) as gpu:
            assert (gpu.index, env["CUDA_VISIBLE_DEVICES"], env["CUDA_DEVICE_ORDER"]) == (2, "2", "PCI_BUS_ID")
            raise RuntimeError("measurement failed")
    assert env == {"CUDA_VISIBLE_DEVICES": "2,3"}
    procs, release, got = _start_holders(1, tmp_path, 2, env={"CUDA_VISIBLE_DEVICES": "2,3"})
    try:
        assert got[0][1] == 2
    finally:
        _stop(procs, release)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_lock_of_a_killed_holder_is_free_at_once(tmp_path, sig):
    procs, release, got = _start_holders(1, tmp_path, 1)
    with pytest.raises(GpuAssignmentError):
        with acquire_gpu(tmp_path, 1, env={}, wait_s=0):
            pass
    os.kill(procs[0].pid, sig)
    procs[0].join(10)
    assert procs[0].exitcode == -sig
    with acquire_gpu(tmp_path, 1, env={}, wait_s=0) as gpu:
        assert gpu.index == 0


def test_a_waiting_job_takes_the_gpu_when_its_holder_finishes(tmp_path):
    procs, release, _ = _start_holders(1, tmp_path, 1)
    said = []
    releaser = FORK.Process(target=lambda: (time.sleep(0.3), release.set()))
    releaser.start()
    t0 = time.monotonic()
    with acquire_gpu(tmp_path, 1, env={}, wait_s=20, poll_s=0.05, on_wait=said.append) as gpu:
        assert gpu.index == 0
    assert time.monotonic() - t0 >= 0.25
    assert len(said) == 1 and "busy" in said[0]
    for proc in procs + [releaser]:
        proc.join(10)


def test_user_visible_devices_are_the_candidates(tmp_path):
    procs, release, got = _start_holders(2, tmp_path, 2, env={"CUDA_VISIBLE_DEVICES": "5,7,9"})
    try:
        assert sorted((index, visible) for _, index, _, visible in got) == [(5, "5"), (7, "7")]
    finally:
        _stop(procs, release)


def test_slurm_assignment_is_respected_without_a_lock(tmp_path):
    procs, release, _ = _start_holders(1, tmp_path, 1)
    try:
        env = {"SLURM_JOB_ID": "42", "CUDA_VISIBLE_DEVICES": "1,0"}
        with acquire_gpu(tmp_path, 1, env=env, wait_s=0) as gpu:
            assert (gpu.index, gpu.assigned_by, gpu.lock_path) == (1, "slurm", None)
            assert env["CUDA_VISIBLE_DEVICES"] == "1"
        assert env == {"SLURM_JOB_ID": "42", "CUDA_VISIBLE_DEVICES": "1,0"}
    finally:
        _stop(procs, release)


def test_slurm_job_without_a_gpu_allocation_uses_the_locks(tmp_path):
    with acquire_gpu(tmp_path, 2, env={"SLURM_JOB_ID": "42"}) as gpu:
        assert gpu.assigned_by == "lock" and gpu.lock_path.endswith("gpu0.lock")


@pytest.mark.parametrize("visible", ["GPU-5c1f7a2e", "0,MIG-1"])
def test_non_index_visible_devices_are_refused_in_one_line(tmp_path, visible):
    with pytest.raises(GpuAssignmentError, match=r"^CUDA_VISIBLE_DEVICES: .* allowed: comma-separated GPU indices"):
        with acquire_gpu(tmp_path, 1, env={"CUDA_VISIBLE_DEVICES": visible}):
            pass


def test_refuses_once_cuda_is_initialised(tmp_path, monkeypatch):
    fake_torch = types.SimpleNamespace(cuda=types.SimpleNamespace(is_initialized=lambda: True))
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    with pytest.raises(GpuAssignmentError, match="already initialised"):
        with acquire_gpu(tmp_path, 1, env={}):
            pass
    assert not list(tmp_path.iterdir())


def test_gpu_count():
    assert resolve_gpu_count(None, "sim") == 1
    assert resolve_gpu_count(4, "sim") == 4
    assert resolve_gpu_count(None, "nvml", visible=2) == 2
    assert resolve_gpu_count(1, "nvml", visible=2) == 1
    with pytest.raises(GpuAssignmentError, match=r"^gpus_per_node: 3 is more than the 2 NVIDIA GPU\(s\) visible"):
        resolve_gpu_count(3, "nvml", visible=2)
    with pytest.raises(GpuAssignmentError, match="^gpus_per_node: no NVIDIA GPU"):
        resolve_gpu_count(None, "nvml", visible=0)
    with pytest.raises(GpuAssignmentError, match="^gpus_per_node: 0 is not allowed"):
        resolve_gpu_count(0, "sim")


def test_default_lock_dir(monkeypatch, tmp_path):
    monkeypatch.delenv(LOCK_DIR_ENV, raising=False)
    assert default_lock_dir("nvml") == HOST_LOCK_DIR
    assert default_lock_dir("sim") == WORKFLOW_LOCK_DIR
    monkeypatch.setenv(LOCK_DIR_ENV, str(tmp_path))
    assert default_lock_dir("nvml") == tmp_path


@pytest.mark.parametrize("value,expected", [("", 0), ("3", 3), ("2,0", 2), (" 1 , 0", 1)])
def test_gpu_index_from_env_reads_the_first_index(monkeypatch, value, expected):
    from phasewatt.gpu.select import gpu_index_from_env

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    assert gpu_index_from_env() == expected


@pytest.mark.parametrize("value", ["GPU-8e3f1c2a-0000-1111-2222-333344445555", "MIG-1c2a", ",", "-1"])
def test_gpu_index_from_env_refuses_what_is_not_an_index(monkeypatch, value):
    from phasewatt.gpu.select import gpu_index_from_env

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", value)
    with pytest.raises(GpuAssignmentError, match=r"^CUDA_VISIBLE_DEVICES: .* allowed: comma-separated GPU indices"):
        gpu_index_from_env()
