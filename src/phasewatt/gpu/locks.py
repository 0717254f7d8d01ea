"""One GPU per measurement job on a node with several: a lock file per GPU index.

Snakemake's `--resources gpu=K` bounds how many measurement jobs run at once, but it does not
say which GPU each job gets. A job takes the first free index by holding an exclusive
`flock` on `{lock_dir}/{host}/gpu{i}.lock`, then narrows CUDA_VISIBLE_DEVICES to that index
before anything initialises CUDA. A flock belongs to the open file, so the kernel drops it
when the process ends however it ends (return, exception, SIGTERM, SIGKILL): no stale lock
is ever left to clean up.

Under Slurm with a GPU allocation (SLURM_JOB_ID set and Slurm's gres plugin has set
CUDA_VISIBLE_DEVICES) the GPU is Slurm's to assign: the job takes what it was given and
takes no lock.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, MutableMapping

from phasewatt.errors import PhasewattError

LOCK_DIR_ENV = "PHASEWATT_GPU_LOCK_DIR"
# Real GPUs are shared by every workflow on the host, so their locks live in one place per
# host; node-local /tmp, never a shared filesystem.
HOST_LOCK_DIR = Path("/tmp/phasewatt-gpu-locks")
# Simulated GPUs exist only inside one workflow: their locks stay in its working directory.
WORKFLOW_LOCK_DIR = Path(".snakemake/phasewatt-gpu-locks")


class GpuAssignmentError(PhasewattError):
    """No GPU could be assigned to this job (bad CUDA_VISIBLE_DEVICES, CUDA already
    initialised, or no lock became free in time)."""


@dataclass(frozen=True)
class GpuAssignment:
    """The GPU a job measures on.

    index: physical index in NVML's numbering (CUDA's too, as CUDA_DEVICE_ORDER=PCI_BUS_ID
    is set); under Slurm with constrained devices, the index inside the job's cgroup.
    assigned_by: "lock" (this module chose it) or "slurm" (Slurm's gres allocation).
    lock_path: the lock file held for the job's lifetime, None under Slurm.
    """

    index: int
    assigned_by: str
    lock_path: str | None


def default_lock_dir(device: str) -> Path:
    """Where the locks of `device`'s GPUs live: $PHASEWATT_GPU_LOCK_DIR if set; else one
    folder per host for real GPUs, and the workflow's own folder for simulated ones."""
    override = os.environ.get(LOCK_DIR_ENV)
    if override:
        return Path(override)
    return HOST_LOCK_DIR if device == "nvml" else WORKFLOW_LOCK_DIR


def visible_nvidia_gpu_count() -> int:
    """Number of NVIDIA GPUs NVML reports (0 when NVML is missing or finds none)."""
    try:
        import pynvml
    except ImportError:
        return 0
    try:
        pynvml.nvmlInit()
    except Exception:
        return 0
    try:
        return int(pynvml.nvmlDeviceGetCount())
    except Exception:
        return 0
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def resolve_gpu_count(configured: int | None, device: str, visible: int | None = None) -> int:
    """How many GPUs of this node the workflow may use.

    Simulated and null devices: `configured` virtual GPUs (1 when unset). Real GPUs: every
    GPU NVML sees when unset, else `configured`, which must not exceed what is visible.
    """
    if configured is not None and (isinstance(configured, bool) or not isinstance(configured, int) or configured < 1):
        raise GpuAssignmentError(f"gpus_per_node: {configured!r} is not allowed; allowed: an integer >= 1")
    if device != "nvml":
        return configured or 1
    visible = visible_nvidia_gpu_count() if visible is None else visible
    if visible < 1:
        raise GpuAssignmentError("gpus_per_node: no NVIDIA GPU is visible to NVML on this host; allowed with device nvml: a host with one")
    if configured is None:
        return visible
    if configured > visible:
        raise GpuAssignmentError(
            f"gpus_per_node: {configured} is more than the {visible} NVIDIA GPU(s) visible on {socket.gethostname()}; allowed: 1 to {visible}"
        )
    return configured


def visible_gpu_indices(value: str) -> list[int]:
    """The GPU indices of a CUDA_VISIBLE_DEVICES value; anything else (GPU or MIG UUIDs) is
    refused with one line, since NVML and CUDA must agree on which GPU is measured."""
    tokens = [token.strip() for token in value.split(",") if token.strip()]
    if not all(token.isdigit() for token in tokens):
        raise GpuAssignmentError(
            f"CUDA_VISIBLE_DEVICES: {value!r} is not allowed; allowed: comma-separated GPU indices such as 0,1"
        )
    return [int(token) for token in tokens]


def _refuse_if_cuda_initialised() -> None:
    """CUDA reads CUDA_VISIBLE_DEVICES once, when it initialises: changing it later would
    leave the process on another GPU than the one locked and recorded."""
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    is_initialized = getattr(cuda, "is_initialized", None)
    if callable(is_initialized) and is_initialized():
        raise GpuAssignmentError(
            "CUDA_VISIBLE_DEVICES: CUDA is already initialised in this process, so the GPU can no longer be chosen; take the GPU lock before any CUDA call"
        )


def slurm_assigned(env: MutableMapping[str, str]) -> bool:
    return bool(env.get("SLURM_JOB_ID")) and bool(env.get("CUDA_VISIBLE_DEVICES", "").strip())


def _try_lock(path: Path) -> int | None:
    """Open `path` and take an exclusive flock without blocking; the fd, or None if held."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except PermissionError:
        # Another user's lock file: a read-only descriptor is enough for flock.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _say(text: str) -> None:
    """On stderr at once: a job's log must show that it waits while it waits."""
    print(text, file=sys.stderr, flush=True)


def _note_holder(fd: int) -> None:
    """Write who holds the lock into the file, for a person looking at a busy GPU."""
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} host {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n".encode())
    except OSError:
        pass


def _make_lock_dir(folder: Path, shared: bool) -> None:
    """Create the lock folder; a host-wide one is world-writable with the sticky bit, like
    /tmp, so every user's jobs can take the same GPUs' locks."""
    missing = [p for p in (folder.parent, folder) if not p.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    if shared:
        for path in missing:
            try:
                os.chmod(path, 0o1777)
            except OSError:
                pass


@contextmanager
def acquire_gpu(
    lock_dir: str | os.PathLike,
    n_gpus: int,
    *,
    env: MutableMapping[str, str] | None = None,
    wait_s: float | None = None,
    poll_s: float = 0.2,
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[GpuAssignment]:
    """Hold one GPU for the duration of the block.

    Candidates are the first `n_gpus` of CUDA_VISIBLE_DEVICES when the user set it, else
    indices 0..n_gpus-1. The first whose lock is free is taken; when all are held the call
    polls every `poll_s` seconds, for at most `wait_s` (None: until one frees). Inside the
    block CUDA_VISIBLE_DEVICES names the chosen GPU alone and CUDA_DEVICE_ORDER is PCI_BUS_ID
    (so CUDA and NVML number GPUs alike); both are restored on exit and the lock released.
    `env` defaults to os.environ (what CUDA reads).
    """
    env = os.environ if env is None else env
    if n_gpus < 1:
        raise GpuAssignmentError(f"gpus_per_node: {n_gpus!r} is not allowed; allowed: an integer >= 1")
    _refuse_if_cuda_initialised()
    saved = {key: env.get(key) for key in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")}
    fd = None
    try:
        env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        if slurm_assigned(env):
            index = visible_gpu_indices(env["CUDA_VISIBLE_DEVICES"])[0]
            env["CUDA_VISIBLE_DEVICES"] = str(index)
            yield GpuAssignment(index=index, assigned_by="slurm", lock_path=None)
            return
        visible = env.get("CUDA_VISIBLE_DEVICES", "").strip()
        candidates = visible_gpu_indices(visible)[:n_gpus] if visible else list(range(n_gpus))
        if not candidates:
            raise GpuAssignmentError(f"CUDA_VISIBLE_DEVICES: {visible!r} leaves no GPU; allowed: comma-separated GPU indices such as 0,1")
        folder = Path(lock_dir) / socket.gethostname()
        _make_lock_dir(folder, shared=Path(lock_dir).absolute() == HOST_LOCK_DIR)
        deadline = None if wait_s is None else time.monotonic() + wait_s
        told = False
        while True:
            for index in candidates:
                path = folder / f"gpu{index}.lock"
                fd = _try_lock(path)
                if fd is not None:
                    break
            if fd is not None:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise GpuAssignmentError(
                    f"gpus_per_node: all of GPUs {candidates} stayed busy for {wait_s:g} s (locks in {folder}); allowed: fewer concurrent jobs (--resources gpu=...) or more GPUs"
                )
            if not told:
                message = f"phasewatt: GPUs {candidates} are all busy (locks in {folder}); waiting for one to free"
                (on_wait or _say)(message)
                told = True
            time.sleep(poll_s)
        _note_holder(fd)
        env["CUDA_VISIBLE_DEVICES"] = str(index)
        yield GpuAssignment(index=index, assigned_by="lock", lock_path=str(path))
    finally:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        for key, value in saved.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
