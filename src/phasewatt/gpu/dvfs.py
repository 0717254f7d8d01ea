"""DVFS settings: parsing of `default`, `pl<W>`, `sm<MHz>`, and applying one with a journal,
read-back verification and restore on every exit path."""

from __future__ import annotations

import bisect
import json
import os
import re
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from phasewatt.errors import ConfigError, PhasewattError

TOKEN = re.compile(r"^(default|pl(?P<watts>[1-9][0-9]*)|sm(?P<mhz>[1-9][0-9]*))$")
ALLOWED = "default, pl<watts> (power cap), sm<MHz> (locked SM clock)"


@dataclass(frozen=True)
class DvfsSetting:
    token: str
    kind: str  # "default" | "power_cap" | "clock_lock"
    value: int | None = None

    @property
    def power_cap_w(self) -> int | None:
        return self.value if self.kind == "power_cap" else None

    @property
    def sm_clock_mhz(self) -> int | None:
        return self.value if self.kind == "clock_lock" else None


def nearest_clocks(supported: list[int], mhz: int) -> list[int]:
    """The supported clocks just below and above `mhz` (one if it is outside the range)."""
    ordered = sorted(supported)
    i = bisect.bisect_left(ordered, mhz)
    return sorted({ordered[j] for j in (i - 1, i) if 0 <= j < len(ordered)})


def parse_dvfs(token: str, gpu_spec=None, field: str = "dvfs", supported_clocks=None, power_range=None) -> DvfsSetting:
    """Parse a DVFS token; with a spec (or the live GPU's limits), check it is achievable."""
    match = TOKEN.match(str(token))
    if not match:
        raise ConfigError(f"{field}: {token!r} is not a DVFS setting; allowed: {ALLOWED}")
    if token == "default":
        return DvfsSetting(token, "default")
    if power_range is None and gpu_spec is not None:
        power_range = (gpu_spec.power_limit_min_w, gpu_spec.power_limit_max_w)
    if supported_clocks is None and gpu_spec is not None:
        supported_clocks = gpu_spec.supported_sm_clocks()
    if match.group("watts"):
        watts = int(match.group("watts"))
        if power_range is not None and not (power_range[0] <= watts <= power_range[1]):
            lo, hi = (int(v) for v in power_range)
            raise ConfigError(
                f"{field}: {token!r} is outside the GPU's power-limit range; allowed: pl{lo} to pl{hi}"
            )
        return DvfsSetting(token, "power_cap", watts)
    mhz = int(match.group("mhz"))
    if supported_clocks is not None and mhz not in supported_clocks:
        near = " or ".join(f"sm{c}" for c in nearest_clocks(supported_clocks, mhz))
        raise ConfigError(f"{field}: {token!r} is not a supported SM clock; nearest supported: {near}")
    return DvfsSetting(token, "clock_lock", mhz)


# ----- applying a setting --------------------------------------------------------------

OPT_IN_HINT = (
    "set `dvfs_control: true` in config.yaml (needs root; changes the GPU for every user of it) "
    "or restrict grid.dvfs to [default]"
)


class DvfsError(PhasewattError):
    """A DVFS setting could not be applied, verified or restored."""


def journal_path(journal_dir: str | os.PathLike, gpu) -> Path:
    return Path(journal_dir) / f"gpu{gpu.index}_{gpu.serial}.json"


def _write_journal(path: Path, entry: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as handle:
        json.dump(entry, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def restore_from_journal(gpu, entry: dict) -> dict:
    """Put the GPU back as the journal says it was; read back and report what was done."""
    done = {}
    if entry.get("power_limit_changed"):
        gpu.set_power_limit_w(entry["original_power_limit_w"])
        done["power_limit_w"] = gpu.power_limit_w()
        if abs(done["power_limit_w"] - entry["original_power_limit_w"]) > 1.0:
            raise DvfsError(
                f"restore: power limit reads {done['power_limit_w']} W after restoring "
                f"{entry['original_power_limit_w']} W"
            )
    if entry.get("clock_locked"):
        gpu.unlock_sm_clock()
        done["sm_clock_unlocked"] = True
        if entry.get("original_locked_sm_clock_mhz"):
            gpu.lock_sm_clock_mhz(entry["original_locked_sm_clock_mhz"])
            done["sm_clock_relocked_mhz"] = entry["original_locked_sm_clock_mhz"]
        after = gpu.locked_sm_clock_mhz()
        if after != entry.get("original_locked_sm_clock_mhz") and after is not None:
            raise DvfsError(f"restore: SM clock still reads locked at {after} MHz")
    return done


def _apply(gpu, setting: DvfsSetting) -> dict:
    """Apply and read back. NVML setters can report success on failure: trust only reads."""
    if setting.kind == "power_cap":
        gpu.set_power_limit_w(setting.value)
        effective = gpu.power_limit_w()
        if abs(effective - setting.value) > 1.0:
            raise DvfsError(f"dvfs {setting.token}: the driver accepted it but the power limit reads {effective} W")
        return {"effective_power_limit_w": effective}
    if setting.kind == "clock_lock":
        gpu.lock_sm_clock_mhz(setting.value)
        effective = gpu.locked_sm_clock_mhz()
        if effective is not None and effective != setting.value:
            raise DvfsError(f"dvfs {setting.token}: the driver accepted it but the lock reads {effective} MHz")
        return {"effective_locked_sm_clock_mhz": effective, "effective_power_limit_w": gpu.power_limit_w()}
    return {"effective_power_limit_w": gpu.power_limit_w()}


class _Interrupted(BaseException):
    """Raised from a SIGTERM handler so that `finally` blocks restore the GPU."""


@contextmanager
def _signals_raise():
    """While inside, SIGTERM raises _Interrupted and SIGINT KeyboardInterrupt (main thread
    only: elsewhere signals cannot be caught and the journal covers it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        raise _Interrupted(signum)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def dvfs_applied(gpu, setting: DvfsSetting, *, journal_dir, allowed: bool):
    """Apply `setting` for the duration of the block, restoring on every exit path.

    A journal (original power limit, whether the clock was locked) is written before any
    change, and removed only once the restore has been read back. After a SIGKILL or a power
    cut, `phasewatt restore` replays it.
    """
    if setting.kind == "default":
        yield {"requested": setting.token, **_apply(gpu, setting)}
        return
    if getattr(gpu, "virtual_time", False):
        # A simulated GPU lives and dies with this process: nothing outlives it to journal.
        original_limit, original_lock = gpu.power_limit_w(), gpu.locked_sm_clock_mhz()
        try:
            yield {"requested": setting.token, **_apply(gpu, setting)}
        finally:
            gpu.set_power_limit_w(original_limit)
            gpu.unlock_sm_clock() if original_lock is None else gpu.lock_sm_clock_mhz(original_lock)
        return
    if not allowed:
        raise DvfsError(f"dvfs {setting.token}: DVFS control is off; {OPT_IN_HINT}")
    path = journal_path(journal_dir, gpu)
    if path.exists():
        raise DvfsError(
            f"dvfs: a journal from an earlier run is still at {path}; run `phasewatt restore "
            f"--journal-dir {journal_dir}` first"
        )
    entry = {
        "gpu_index": gpu.index,
        "gpu_serial": gpu.serial,
        "gpu_name": gpu.name,
        "pid": os.getpid(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "setting": setting.token,
        "original_power_limit_w": gpu.power_limit_w(),
        "power_limit_changed": setting.kind == "power_cap",
        "original_locked_sm_clock_mhz": gpu.locked_sm_clock_mhz(),
        "clock_locked": setting.kind == "clock_lock",
    }
    with _signals_raise():
        _write_journal(path, entry)
        try:
            yield {"requested": setting.token, **_apply(gpu, setting)}
        finally:
            restore_from_journal(gpu, entry)
            path.unlink(missing_ok=True)


def replay_journals(journal_dir, open_gpu_by_index) -> list[str]:
    """`phasewatt restore`: replay every journal left in journal_dir; one line per action."""
    lines = []
    for path in sorted(Path(journal_dir).glob("gpu*.json")):
        entry = json.loads(path.read_text())
        gpu = open_gpu_by_index(entry["gpu_index"])
        try:
            if gpu.serial != entry["gpu_serial"]:
                lines.append(f"{path}: skipped, GPU {entry['gpu_index']} is now {gpu.serial}, not {entry['gpu_serial']}")
                continue
            done = restore_from_journal(gpu, entry)
            path.unlink()
            what = ", ".join(f"{k}={v}" for k, v in done.items()) or "nothing to undo"
            lines.append(f"GPU {entry['gpu_index']} ({entry['gpu_name']}): undid {entry['setting']}: {what}")
        finally:
            gpu.close()
    if not lines:
        lines.append(f"no journal in {journal_dir}: nothing to restore")
    return lines
