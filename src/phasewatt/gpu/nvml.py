"""NvmlGpu: the Gpu protocol on a real NVIDIA GPU through NVML (nvidia-ml-py's `pynvml`).

What each reading is (NVML API reference; units converted to W, MHz, ns here):
- energy_mj: nvmlDeviceGetTotalEnergyConsumption, mJ since the driver was loaded (Volta+).
  On Hopper it updates about every 100 ms.
- power_instant_w: field NVML_FI_DEV_POWER_INSTANT (186) through nvmlDeviceGetFieldValues;
  where the field is not supported (drivers before it, pre-Ampere boards) the reading of
  nvmlDeviceGetPowerUsage is used, which is the instantaneous value on those boards.
- power_average_w: nvmlDeviceGetPowerUsage, a 1-s average on Ampere (but GA100) and newer.
- clocks_event_reasons: nvmlDeviceGetCurrentClocksEventReasons, or its older name
  nvmlDeviceGetCurrentClocksThrottleReasons on drivers and bindings that lack the new one;
  temperature likewise nvmlDeviceGetTemperatureV, else the deprecated nvmlDeviceGetTemperature.
- violation_ns: nvmlDeviceGetViolationStatus(NVML_PERF_POLICY_POWER / _THERMAL).violationTime,
  ns of throttling accumulated since the driver was loaded (a policy the board does not
  report is left out).

Locked clocks: NVML has no getter for a lock set with nvmlDeviceSetGpuLockedClocks.
locked_sm_clock_mhz() therefore returns the lock *this object* set (None if it set none),
and `locked_clock_readable` is False: a lock is verified downstream, by comparing the
sustained SM clock the harness records under load with the requested one. A lock set by
another process before this one started cannot be seen, and a restore resets clocks to the
driver's default rather than re-applying such a lock.

Setters need root (or CAP_SYS_ADMIN): NVML_ERROR_NO_PERMISSION becomes a one-line
DvfsPermissionError. Setters can report success without applying a setting, so callers read
back (gpu.dvfs does).
"""

from __future__ import annotations

import re
import time

from phasewatt.errors import DvfsPermissionError, PhasewattError
from phasewatt.gpu.base import Sample, read_sample
from phasewatt.gpu.dvfs import DvfsError

FIELD_POWER_INSTANT = 186  # NVML_FI_DEV_POWER_INSTANT, mW
ROOT_HINT = "power caps and clock locks need root (or CAP_SYS_ADMIN)"


class NvmlError(PhasewattError):
    """NVML could not be loaded, or a query the measurement depends on failed."""


def _pynvml():
    """Import pynvml late so that CPU-only installs work, and tests can substitute a fake."""
    try:
        import pynvml
    except ImportError:
        raise NvmlError("device nvml: the nvidia-ml-py package is not installed (pip install nvidia-ml-py)") from None
    return pynvml


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _field_number(field) -> float:
    """The value of one nvmlFieldValue_t, read through the member its valueType names."""
    member = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}
    return float(getattr(field.value, member.get(int(field.valueType), "uiVal")))


class NvmlGpu:
    """One physical GPU by NVML index. Reads are thread-safe (NVML is), so the sampler thread
    may read while the harness does."""

    virtual_time = False
    locked_clock_readable = False

    def __init__(self, index: int = 0):
        nvml = _pynvml()
        self._nvml = nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as err:
            raise NvmlError(f"device nvml: NVML could not be initialised ({err}); is the NVIDIA driver loaded?") from None
        self._open = True
        try:
            self._setup(int(index))
        except BaseException:
            self.close()
            raise

    def _setup(self, index: int) -> None:
        nvml = self._nvml
        self.index = index
        try:
            self._handle = nvml.nvmlDeviceGetHandleByIndex(index)
        except nvml.NVMLError as err:
            count = nvml.nvmlDeviceGetCount()
            raise NvmlError(f"device nvml: GPU index {index} cannot be opened ({err}); NVML sees {count} GPU(s)") from None
        self.name = _text(nvml.nvmlDeviceGetName(self._handle))
        self.driver = _text(nvml.nvmlSystemGetDriverVersion())
        self.uuid = _text(nvml.nvmlDeviceGetUUID(self._handle))
        try:
            serial = _text(nvml.nvmlDeviceGetSerial(self._handle))
        except nvml.NVMLError:  # boards without a serial number (GeForce) report NOT_SUPPORTED
            serial = ""
        self.serial = re.sub(r"[^A-Za-z0-9_.-]", "_", serial or self.uuid)
        try:
            nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
        except nvml.NVMLError as err:
            raise NvmlError(
                f"device nvml: GPU {index} ({self.name}) has no readable energy counter ({err}); phasewatt needs Volta or newer"
            ) from None
        self.instant_power_source = "field NVML_FI_DEV_POWER_INSTANT"
        if self._instant_field_mw() is None:
            self.instant_power_source = "nvmlDeviceGetPowerUsage (no instant-power field on this GPU/driver)"
        self.reasons_source, self._reasons = self._newest_answering(
            ("nvmlDeviceGetCurrentClocksEventReasons", ()), ("nvmlDeviceGetCurrentClocksThrottleReasons", ())
        )
        sensor = nvml.NVML_TEMPERATURE_GPU
        self.temperature_source, self._temperature = self._newest_answering(
            ("nvmlDeviceGetTemperatureV", (sensor,)), ("nvmlDeviceGetTemperature", (sensor,))
        )
        self._policies = {}
        for name, policy in (("power", nvml.NVML_PERF_POLICY_POWER), ("thermal", nvml.NVML_PERF_POLICY_THERMAL)):
            try:
                nvml.nvmlDeviceGetViolationStatus(self._handle, policy)
                self._policies[name] = policy
            except nvml.NVMLError:
                pass
        self._locked: int | None = None
        self._sm_clocks: list[int] | None = None

    def _newest_answering(self, *candidates):
        """(name, function) of the first getter, newest first, that this binding has and this
        driver answers (deprecated getters are the fallback); the last one otherwise, so
        that its error surfaces where it is read."""
        for name, args in candidates:
            function = getattr(self._nvml, name, None)
            if function is None:
                continue
            try:
                function(self._handle, *args)
            except self._nvml.NVMLError:
                continue
            return name, function
        name = candidates[-1][0]
        return name, getattr(self._nvml, name)

    def _instant_field_mw(self) -> float | None:
        nvml = self._nvml
        try:
            (field,) = nvml.nvmlDeviceGetFieldValues(self._handle, [FIELD_POWER_INSTANT])
        except nvml.NVMLError:
            return None
        if int(field.nvmlReturn) != nvml.NVML_SUCCESS:
            return None
        return _field_number(field)

    def _query(self, what: str, function, *args):
        """Call an NVML query; an NVML error becomes one line naming the GPU and the reading."""
        try:
            return function(self._handle, *args)
        except self._nvml.NVMLError as err:
            raise NvmlError(f"device nvml: reading {what} of GPU {self.index} failed ({err})") from None

    # ----- time -------------------------------------------------------------------------
    def now(self) -> float:
        return time.perf_counter()

    def sleep(self, seconds: float) -> None:
        time.sleep(max(seconds, 0.0))

    # ----- sensors ----------------------------------------------------------------------
    def energy_mj(self) -> int:
        return int(self._query("the energy counter", self._nvml.nvmlDeviceGetTotalEnergyConsumption))

    def power_instant_w(self) -> float:
        if self.instant_power_source.startswith("field"):
            milliwatts = self._instant_field_mw()
            if milliwatts is not None:
                return milliwatts / 1000.0
        return self.power_average_w()

    def power_average_w(self) -> float:
        return self._query("power usage", self._nvml.nvmlDeviceGetPowerUsage) / 1000.0

    def sm_clock_mhz(self) -> int:
        return int(self._query("the SM clock", self._nvml.nvmlDeviceGetClockInfo, self._nvml.NVML_CLOCK_SM))

    def mem_clock_mhz(self) -> int:
        return int(self._query("the memory clock", self._nvml.nvmlDeviceGetClockInfo, self._nvml.NVML_CLOCK_MEM))

    def temperature_c(self) -> float:
        return float(self._query("the temperature", self._temperature, self._nvml.NVML_TEMPERATURE_GPU))

    def clocks_event_reasons(self) -> int:
        return int(self._query("the clocks-event reasons", self._reasons))

    def violation_ns(self) -> dict[str, int]:
        return {
            name: int(self._query(f"the {name} violation time", self._nvml.nvmlDeviceGetViolationStatus, policy).violationTime)
            for name, policy in self._policies.items()
        }

    def sample(self) -> Sample:
        return read_sample(self, self.now())

    # ----- facts ------------------------------------------------------------------------
    def memory_total_bytes(self) -> int:
        return int(self._query("the memory size", self._nvml.nvmlDeviceGetMemoryInfo).total)

    def power_limit_constraints_w(self) -> tuple[float, float]:
        low, high = self._query("the power-limit constraints", self._nvml.nvmlDeviceGetPowerManagementLimitConstraints)
        return low / 1000.0, high / 1000.0

    def default_power_limit_w(self) -> float:
        return self._query("the default power limit", self._nvml.nvmlDeviceGetPowerManagementDefaultLimit) / 1000.0

    def enforced_power_limit_w(self) -> float:
        """The limit the driver enforces after every limiter (it can be below the set one)."""
        return self._query("the enforced power limit", self._nvml.nvmlDeviceGetEnforcedPowerLimit) / 1000.0

    def supported_mem_clocks_mhz(self) -> list[int]:
        return sorted(int(c) for c in self._query("the memory clocks", self._nvml.nvmlDeviceGetSupportedMemoryClocks))

    def supported_sm_clocks_mhz(self) -> list[int]:
        """SM clocks the GPU supports at its highest memory clock (the one it runs at)."""
        if self._sm_clocks is None:
            memory = max(self.supported_mem_clocks_mhz())
            clocks = self._query("the SM clocks", self._nvml.nvmlDeviceGetSupportedGraphicsClocks, memory)
            self._sm_clocks = sorted({int(c) for c in clocks})
        return list(self._sm_clocks)

    # ----- DVFS -------------------------------------------------------------------------
    def _set(self, what: str, function, *args) -> None:
        nvml = self._nvml
        try:
            function(self._handle, *args)
        except nvml.NVMLError as err:
            if getattr(err, "value", None) == nvml.NVML_ERROR_NO_PERMISSION:
                raise DvfsPermissionError(f"dvfs: NVML refused to {what} on GPU {self.index} ({err}): {ROOT_HINT}") from None
            raise DvfsError(f"dvfs: NVML could not {what} on GPU {self.index} ({err})") from None

    def power_limit_w(self) -> float:
        return self._query("the power limit", self._nvml.nvmlDeviceGetPowerManagementLimit) / 1000.0

    def set_power_limit_w(self, watts: float) -> None:
        self._set(f"set the power limit to {watts:g} W", self._nvml.nvmlDeviceSetPowerManagementLimit, int(round(watts * 1000)))

    def lock_sm_clock_mhz(self, mhz: int) -> None:
        self._set(f"lock the SM clock at {mhz} MHz", self._nvml.nvmlDeviceSetGpuLockedClocks, int(mhz), int(mhz))
        self._locked = int(mhz)

    def unlock_sm_clock(self) -> None:
        self._set("reset the locked SM clock", self._nvml.nvmlDeviceResetGpuLockedClocks)
        self._locked = None

    def locked_sm_clock_mhz(self) -> int | None:
        """The lock this object set, or None: NVML cannot read a lock back (module docstring)."""
        return self._locked

    def close(self) -> None:
        if getattr(self, "_open", False):
            self._open = False
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError:
                pass
