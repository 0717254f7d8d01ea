"""DVFS settings: parsing of `default`, `pl<W>`, `sm<MHz>`, and applying one with a journal,
read-back verification and restore on every exit path."""

from __future__ import annotations

import bisect
import json
import os
import re
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from phasewatt.errors import ConfigError, DvfsPermissionError, PhasewattError

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
JOURNAL_VERSION = 1
POWER_TOLERANCE_W = 1.0  # NVML stores limits in mW; a read-back within 1 W is the value set


class DvfsError(PhasewattError):
    """A DVFS setting could not be applied, verified or restored."""


def check_dvfs_opt_in(config: dict, device: str) -> None:
    """Before any job: a grid with non-default settings on a real GPU needs the opt-in.

    `device` is the config's device or the resolved one ("auto" is resolved here). The
    simulated and null devices need no opt-in: nothing outlives the process there.
    """
    if device == "auto":
        from phasewatt.gpu.select import resolve_device

        device = resolve_device(device, quiet=True)
    if device != "nvml" or config.get("dvfs_control", False):
        return
    non_default = [token for token in config["grid"]["dvfs"] if token != "default"]
    if non_default:
        raise ConfigError(
            f"grid.dvfs: {', '.join(non_default)} would change the real GPU's power limit or SM clock "
            f"but dvfs_control is false; {OPT_IN_HINT}"
        )


def journal_path(journal_dir: str | os.PathLike, gpu) -> Path:
    serial = re.sub(r"[^A-Za-z0-9_.-]", "_", str(gpu.serial))
    return Path(journal_dir) / f"gpu{gpu.index}_{serial}.json"


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _owner_alive(entry: dict) -> bool:
    """Whether the process that wrote a journal is still running (on this host)."""
    if entry.get("host") != socket.gethostname() or not isinstance(entry.get("pid"), int):
        return False
    if entry["pid"] == os.getpid():
        return False
    try:
        os.kill(entry["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_journal(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _create_journal(path: Path, entry: dict) -> None:
    """Write the journal durably, failing if one exists (another job owns the GPU, or an
    interrupted run left one): written whole to a temporary file, fsynced, then linked into
    place, which is atomic and refuses an existing name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as handle:
        json.dump(entry, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.link(tmp, path)
    except FileExistsError:
        other = _read_journal(path) or {}
        if _owner_alive(other):
            raise DvfsError(
                f"dvfs: GPU {entry['gpu_index']} is being changed by another job (pid {other['pid']}, journal {path}); "
                "run one measurement per GPU at a time"
            ) from None
        raise DvfsError(
            f"dvfs: an interrupted run left a journal at {path}; run `phasewatt restore --journal-dir {path.parent}` first"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _remove_journal(path: Path) -> None:
    path.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def restore_from_journal(gpu, entry: dict) -> dict:
    """Put the GPU back as the journal says it was, reading back what can be read.

    Each part (power limit, clock lock) is attempted even if the other fails; a limit that
    already reads the original is not set again (so a journal whose change never happened
    replays without root). Raises DvfsError naming every part that failed.
    """
    done: dict = {}
    failures: list[str] = []
    if entry.get("power_limit_changed"):
        original = float(entry["original_power_limit_w"])
        try:
            current = gpu.power_limit_w()
            if abs(current - original) <= POWER_TOLERANCE_W:
                done["power_limit_w"] = current
                done["power_limit_was_original"] = True
            else:
                gpu.set_power_limit_w(original)
                after = gpu.power_limit_w()
                done["power_limit_w"] = after
                if abs(after - original) > POWER_TOLERANCE_W:
                    failures.append(f"the power limit reads {after:g} W after restoring {original:g} W")
        except PhasewattError as err:
            failures.append(str(err))
    if entry.get("clock_locked"):
        original_lock = entry.get("original_locked_sm_clock_mhz")
        try:
            gpu.unlock_sm_clock()
            done["sm_clock_unlocked"] = True
            if original_lock:
                gpu.lock_sm_clock_mhz(int(original_lock))
                done["sm_clock_relocked_mhz"] = int(original_lock)
            if getattr(gpu, "locked_clock_readable", True):
                after = gpu.locked_sm_clock_mhz()
                if after != original_lock:
                    failures.append(f"the SM clock lock reads {after} MHz after restoring {original_lock}")
        except PhasewattError as err:
            failures.append(str(err))
    if failures:
        raise DvfsError(f"restore of GPU {entry.get('gpu_index')}: " + "; ".join(failures))
    return done


def describe_restore(done: dict, gpu) -> str:
    """One phrase for what restore_from_journal did."""
    parts = []
    if "power_limit_w" in done:
        verb = "already at" if done.get("power_limit_was_original") else "restored to"
        parts.append(f"power limit {verb} {done['power_limit_w']:g} W (read back)")
    if done.get("sm_clock_unlocked"):
        what = f"re-locked at {done['sm_clock_relocked_mhz']} MHz" if "sm_clock_relocked_mhz" in done else "reset to the driver default"
        how = "" if getattr(gpu, "locked_clock_readable", True) else " (NVML cannot read a lock back)"
        parts.append(f"SM clock lock {what}{how}")
    return ", ".join(parts) or "nothing to undo"


def _default_limit_w(gpu) -> float | None:
    """The board's default power limit, or None where the board does not report one."""
    try:
        return gpu.default_power_limit_w()
    except PhasewattError:
        return None


def _apply(gpu, setting: DvfsSetting) -> dict:
    """Apply and read back. NVML setters can report success on failure: trust only reads."""
    default_w = _default_limit_w(gpu)
    if setting.kind == "power_cap":
        gpu.set_power_limit_w(setting.value)
        effective = gpu.power_limit_w()
        if abs(effective - setting.value) > POWER_TOLERANCE_W:
            raise DvfsError(f"dvfs {setting.token}: the driver accepted it but the power limit reads {effective:g} W")
        return {"effective_power_limit_w": effective, "default_power_limit_w": default_w}
    if setting.kind == "clock_lock":
        gpu.lock_sm_clock_mhz(setting.value)
        out = {"effective_power_limit_w": gpu.power_limit_w(), "default_power_limit_w": default_w}
        if getattr(gpu, "locked_clock_readable", True):
            effective = gpu.locked_sm_clock_mhz()
            if effective != setting.value:
                raise DvfsError(f"dvfs {setting.token}: the driver accepted it but the lock reads {effective} MHz")
            out["effective_locked_sm_clock_mhz"] = effective
        else:
            out["effective_locked_sm_clock_mhz"] = None
            out["lock_verification"] = "NVML cannot read a lock back: compare sustained_sm_clock_mhz under load with the request"
        out["sm_clock_after_lock_mhz"] = gpu.sm_clock_mhz()
        return out
    effective = gpu.power_limit_w()
    return {
        "effective_power_limit_w": effective,
        "default_power_limit_w": default_w,
        # "default" measures the GPU as found: say so when someone else has capped it.
        "power_limit_is_default": None if default_w is None else abs(effective - default_w) <= POWER_TOLERANCE_W,
    }


# ----- signals ---------------------------------------------------------------------------

SIGNALS = tuple(s for s in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGHUP", None)) if s is not None)


class _Interrupted(SystemExit):
    """Raised from a SIGTERM/SIGHUP handler so that every `finally` runs (restoring the GPU)
    and the process then exits with the shell's status for that signal (128 + signum)."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


def _raise_for(signum: int):
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise _Interrupted(signum)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def _signals_raise():
    """While inside, SIGTERM/SIGHUP raise _Interrupted and SIGINT KeyboardInterrupt (main
    thread only: elsewhere handlers cannot be installed and the journal covers it)."""
    if not _in_main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    for sig in SIGNALS:
        signal.signal(sig, lambda signum, frame: _raise_for(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def _signals_deferred():
    """While inside, a SIGTERM/SIGINT/SIGHUP is remembered instead of interrupting a
    restore half-way; it is raised once the block is done."""
    if not _in_main_thread():
        yield
        return
    pending: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
    for sig in SIGNALS:
        signal.signal(sig, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if pending:
        _raise_for(pending[0])


def _restore(gpu, entry: dict, path: Path | None, reason: BaseException | None = None) -> None:
    """Restore (signals deferred), then remove the journal; keep it if the restore failed."""
    with _signals_deferred():
        try:
            done = restore_from_journal(gpu, entry)
        except DvfsError as err:
            if path is None:
                raise
            raise DvfsError(f"{err}; journal kept at {path}: run `phasewatt restore --journal-dir {path.parent}`") from None
        if path is not None:
            _remove_journal(path)
    if isinstance(reason, (_Interrupted, KeyboardInterrupt)):
        name = signal.Signals(getattr(reason, "signum", signal.SIGINT)).name
        print(f"phasewatt: {name}: GPU {gpu.index} {describe_restore(done, gpu)}", file=sys.stderr, flush=True)


@contextmanager
def dvfs_applied(gpu, setting: DvfsSetting, *, journal_dir, allowed: bool):
    """Apply `setting` for the duration of the block, restoring on every exit path.

    A journal (original power limit, whether the clock was locked by us) is written and
    fsynced before any change, and removed only once the restore has been read back. The
    block's exit, an exception, SIGTERM, SIGHUP and SIGINT restore; after a SIGKILL or a
    power cut, `phasewatt restore` replays the journal. Yields the effective setting as
    read back from the GPU.
    """
    if setting.kind == "default":
        yield {"requested": setting.token, **_apply(gpu, setting)}
        return
    if getattr(gpu, "virtual_time", False):
        # A simulated GPU lives and dies with this process: nothing outlives it to journal.
        entry = {
            "gpu_index": gpu.index,
            "original_power_limit_w": gpu.power_limit_w(),
            "power_limit_changed": setting.kind == "power_cap",
            "original_locked_sm_clock_mhz": gpu.locked_sm_clock_mhz(),
            "clock_locked": setting.kind == "clock_lock",
        }
        try:
            yield {"requested": setting.token, **_apply(gpu, setting)}
        finally:
            restore_from_journal(gpu, entry)
        return
    if not allowed:
        raise DvfsError(f"dvfs {setting.token}: DVFS control is off; {OPT_IN_HINT}")
    entry = {
        "journal_version": JOURNAL_VERSION,
        "gpu_index": gpu.index,
        "gpu_serial": gpu.serial,
        "gpu_uuid": getattr(gpu, "uuid", None),
        "gpu_name": gpu.name,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "setting": setting.token,
        "original_power_limit_w": gpu.power_limit_w(),
        "default_power_limit_w": _default_limit_w(gpu),
        "power_limit_changed": setting.kind == "power_cap",
        "original_locked_sm_clock_mhz": gpu.locked_sm_clock_mhz(),
        "original_lock_known": bool(getattr(gpu, "locked_clock_readable", True)),
        "clock_locked": setting.kind == "clock_lock",
    }
    path = journal_path(journal_dir, gpu)
    with _signals_raise():
        _create_journal(path, entry)
        try:
            effective = _apply(gpu, setting)
        except DvfsPermissionError:
            _remove_journal(path)  # the driver refused: nothing was changed
            raise
        except BaseException as exc:
            _restore(gpu, entry, path, exc)
            raise
        try:
            yield {"requested": setting.token, **effective}
        except BaseException as exc:
            _restore(gpu, entry, path, exc)
            raise
        _restore(gpu, entry, path)


def replay_journals(journal_dir, open_gpu_by_index, echo=None) -> list[str]:
    """`phasewatt restore`: replay every journal left in journal_dir, one line per journal
    (passed to `echo` as it happens). Journals of a job still running are left to it.
    Raises DvfsError after trying them all if any could not be replayed."""
    journal_dir = Path(journal_dir)
    lines: list[str] = []
    failed = 0

    def say(line: str) -> None:
        lines.append(line)
        if echo is not None:
            echo(line)

    paths = sorted(journal_dir.glob("gpu*.json"))
    if not paths:
        say(f"no journal in {journal_dir}: nothing to restore")
        return lines
    for path in paths:
        entry = _read_journal(path)
        if entry is None or "gpu_index" not in entry:
            failed += 1
            say(f"{path}: unreadable journal; left in place (restore that GPU by hand: nvidia-smi -pl / -rgc)")
            continue
        if _owner_alive(entry):
            say(f"{path}: pid {entry['pid']} is still running and will restore GPU {entry['gpu_index']} itself; left alone")
            continue
        try:
            gpu = open_gpu_by_index(int(entry["gpu_index"]))
        except PhasewattError as err:
            failed += 1
            say(f"{path}: {err}; journal left in place")
            continue
        try:
            if str(gpu.serial) != str(entry["gpu_serial"]):
                failed += 1
                say(
                    f"{path}: GPU {entry['gpu_index']} is now serial {gpu.serial}, not {entry['gpu_serial']}; "
                    "left in place (the GPUs were renumbered: restore that GPU by hand)"
                )
                continue
            done = restore_from_journal(gpu, entry)
            _remove_journal(path)
            say(
                f"GPU {entry['gpu_index']} ({entry.get('gpu_name', '?')}): undid {entry.get('setting', '?')} "
                f"left by pid {entry.get('pid', '?')} at {entry.get('time', '?')}: {describe_restore(done, gpu)}"
            )
        except PhasewattError as err:
            failed += 1
            say(f"{path}: {err}; journal left in place")
        finally:
            gpu.close()
    if failed:
        raise DvfsError(f"restore: {failed} of {len(paths)} journal(s) in {journal_dir} could not be replayed")
    return lines
