"""The Gpu protocol shared by NvmlGpu and SimGpu, and the clocks-event reason bits."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol, runtime_checkable

# nvmlClocksEventReasons bits (nvml.h, "clocks event reasons", formerly throttle reasons).
CLOCK_EVENT_REASONS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}
# Reasons that mean the clock was lowered below what was asked for: a window with any of
# these is flagged (analysis marks or excludes it).
THROTTLE_REASONS = frozenset(
    {"sw_power_cap", "hw_slowdown", "sw_thermal_slowdown", "hw_thermal_slowdown", "hw_power_brake_slowdown"}
)
SW_POWER_CAP = 0x4
SW_THERMAL_SLOWDOWN = 0x20
GPU_IDLE = 0x1
APPLICATIONS_CLOCKS_SETTING = 0x2


def decode_reasons(mask: int) -> list[str]:
    """Names of the set bits of a clocks-event-reasons mask (unknown bits as hex)."""
    names = [name for bit, name in CLOCK_EVENT_REASONS.items() if mask & bit]
    unknown = mask & ~sum(CLOCK_EVENT_REASONS)
    if unknown:
        names.append(f"unknown_0x{unknown:x}")
    return names


@dataclass(frozen=True)
class Sample:
    """One reading of the sensors, as the sampler records it."""

    t_s: float
    power_instant_w: float
    power_average_w: float
    energy_mj: int
    sm_clock_mhz: int
    mem_clock_mhz: int
    temperature_c: float
    clocks_event_reasons: int

    def as_row(self) -> dict:
        return asdict(self)


@runtime_checkable
class Gpu(Protocol):
    """What the harness needs from a GPU. Times are seconds on the GPU's own clock: wall time
    for a real card, virtual time for the simulator (`virtual_time` says which)."""

    name: str
    driver: str
    index: int
    serial: str
    virtual_time: bool

    # time
    def now(self) -> float: ...
    def sleep(self, seconds: float) -> None: ...

    # sensors
    def energy_mj(self) -> int: ...
    def power_instant_w(self) -> float: ...
    def power_average_w(self) -> float: ...
    def sm_clock_mhz(self) -> int: ...
    def mem_clock_mhz(self) -> int: ...
    def temperature_c(self) -> float: ...
    def clocks_event_reasons(self) -> int: ...
    def violation_ns(self) -> dict[str, int]: ...
    def sample(self) -> Sample: ...

    # facts
    def memory_total_bytes(self) -> int: ...
    def power_limit_constraints_w(self) -> tuple[float, float]: ...
    def default_power_limit_w(self) -> float: ...
    def supported_sm_clocks_mhz(self) -> list[int]: ...

    # DVFS (changing these needs root on a real card)
    def power_limit_w(self) -> float: ...
    def set_power_limit_w(self, watts: float) -> None: ...
    def lock_sm_clock_mhz(self, mhz: int) -> None: ...
    def unlock_sm_clock(self) -> None: ...
    def locked_sm_clock_mhz(self) -> int | None: ...

    def close(self) -> None: ...


def read_sample(gpu, t_s: float) -> Sample:
    """Read every sensor once (used by both backends' sample())."""
    return Sample(
        t_s=t_s,
        power_instant_w=float(gpu.power_instant_w()),
        power_average_w=float(gpu.power_average_w()),
        energy_mj=int(gpu.energy_mj()),
        sm_clock_mhz=int(gpu.sm_clock_mhz()),
        mem_clock_mhz=int(gpu.mem_clock_mhz()),
        temperature_c=float(gpu.temperature_c()),
        clocks_event_reasons=int(gpu.clocks_event_reasons()),
    )
