"""`phasewatt probe`: what a GPU is and how its sensors behave, changing nothing."""

from __future__ import annotations

import os
import statistics
from pathlib import Path

from phasewatt.errors import PhasewattError
from phasewatt.gpu.base import decode_reasons

CAP_SYS_ADMIN = 21  # linux/capability.h


def dvfs_permission() -> tuple[bool, str]:
    """Whether this process may change power limits and locked clocks. NVML's setters need
    root or CAP_SYS_ADMIN; this is read from the process, not tried on the GPU."""
    if os.geteuid() == 0:
        return True, "running as root"
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:") and int(line.split()[1], 16) >> CAP_SYS_ADMIN & 1:
                return True, "the process has CAP_SYS_ADMIN"
    except (OSError, ValueError, IndexError):
        pass
    return False, "not root and no CAP_SYS_ADMIN: NVML would answer NO_PERMISSION"


def sensor_update_rate(gpu, seconds: float = 2.0, poll_s: float = 0.001) -> dict:
    """Poll the energy counter and the instant power for `seconds` and count how often each
    changes (NVML posts new values on its own period, ~100 ms on Hopper)."""
    energy_changes, power_changes = [], []
    t_start = gpu.now()
    last_energy, last_power = gpu.energy_mj(), gpu.power_instant_w()
    first_energy = last_energy
    while gpu.now() - t_start < seconds:
        gpu.sleep(poll_s)
        now = gpu.now()
        energy, power = gpu.energy_mj(), gpu.power_instant_w()
        if energy != last_energy:
            energy_changes.append(now)
            last_energy = energy
        if power != last_power:
            power_changes.append(now)
            last_power = power
    elapsed = gpu.now() - t_start

    def period(times):
        gaps = [b - a for a, b in zip(times, times[1:])]
        return statistics.median(gaps) if gaps else None

    return {
        "seconds": elapsed,
        "energy_updates_per_s": len(energy_changes) / elapsed,
        "energy_update_period_s": period(energy_changes),
        "power_updates_per_s": len(power_changes) / elapsed,
        "power_update_period_s": period(power_changes),
        "mean_power_w": (last_energy - first_energy) / 1000.0 / elapsed,
    }


def gpu_facts(gpu) -> dict:
    """Identity, limits and clock tables of a GPU (reads only). A reading the GPU does not
    offer is None, and its name is listed under "unavailable"."""
    unavailable: list[str] = []

    def read(name, function, *args):
        try:
            return function(*args)
        except PhasewattError as err:
            unavailable.append(f"{name} ({err})")
            return None

    clocks = read("sm_clocks", gpu.supported_sm_clocks_mhz) or []
    low, high = read("power_limit_constraints", gpu.power_limit_constraints_w) or (None, None)
    reasons = read("clocks_event_reasons", gpu.clocks_event_reasons)
    facts = {
        "index": gpu.index,
        "name": gpu.name,
        "serial": gpu.serial,
        "uuid": getattr(gpu, "uuid", None),
        "driver": gpu.driver,
        "memory_gb": gpu.memory_total_bytes() / 1e9,
        "power_limit_w": read("power_limit", gpu.power_limit_w),
        "default_power_limit_w": read("default_power_limit", gpu.default_power_limit_w),
        "power_limit_min_w": low,
        "power_limit_max_w": high,
        "sm_clocks_mhz": [min(clocks), max(clocks)] if clocks else [],
        "sm_clock_count": len(clocks),
        "sm_clock_steps_mhz": sorted({b - a for a, b in zip(clocks, clocks[1:])}),
        "sm_clock_mhz": read("sm_clock", gpu.sm_clock_mhz),
        "mem_clock_mhz": read("mem_clock", gpu.mem_clock_mhz),
        "temperature_c": read("temperature", gpu.temperature_c),
        "power_instant_w": read("power_instant", gpu.power_instant_w),
        "power_average_w": read("power_average", gpu.power_average_w),
        "clocks_event_reasons": decode_reasons(reasons) if reasons is not None else None,
        "violation_ns": read("violation", gpu.violation_ns),
    }
    if hasattr(gpu, "supported_mem_clocks_mhz"):
        facts["mem_clocks_mhz"] = read("mem_clocks", gpu.supported_mem_clocks_mhz)
    if hasattr(gpu, "enforced_power_limit_w"):
        facts["enforced_power_limit_w"] = read("enforced_power_limit", gpu.enforced_power_limit_w)
    for key in ("instant_power_source", "reasons_source", "temperature_source"):
        if hasattr(gpu, key):
            facts[key] = getattr(gpu, key)
    facts["unavailable"] = unavailable
    return facts
