"""A fake `pynvml` for CPU tests: a GPU that answers like NVML does, errors included.

It takes its error classes and constants from the real nvidia-ml-py module (so codes,
subclasses such as NVMLError_NoPermission and str(err) are the real ones) and replaces every
function the project calls. Its behaviour follows the NVML API reference:
- calls before nvmlInit raise UNINITIALIZED; nvmlInit raises DRIVER_NOT_LOADED when the
  state says so; init/shutdown are reference counted;
- a bad index raises INVALID_ARGUMENT;
- setters raise NO_PERMISSION unless the state says "root", INVALID_ARGUMENT outside the
  constraints, and with "ignore_setters" report success without applying anything;
- queries listed in a device's "unsupported" raise NOT_SUPPORTED (the instant-power field
  answers per field, as the real nvmlDeviceGetFieldValues does; the clocks-event-reasons
  getter raises FUNCTION_NOT_FOUND, as on drivers older than its introduction);
- the energy counter and the power readings update every 100 ms of wall time, the counter
  being the integral of the instant readings.

State is a dict, optionally persisted in a JSON file (re-read on every call, written
atomically by setters) so that a child process and the test see the same GPU.
"""

from __future__ import annotations

import copy
import importlib
import json
import math
import os
import sys
import time
import types
from pathlib import Path

_real = importlib.import_module("pynvml")

UPDATE_S = 0.1
WOBBLE_MW = 1000  # the instant reading steps through +0..+4 W, one step per update
H200_SM_CLOCKS = list(range(345, 1981, 15))


def h200(index: int = 0, **overrides) -> dict:
    """A device shaped like the lent H200 (paper-facts.md: probe numbers)."""
    device = {
        "name": "NVIDIA H200",
        "serial": f"16522400{index:05d}",
        "uuid": f"GPU-8d5c1e2a-0000-4000-8000-{index:012d}",
        "memory_total": 150_754_820_096,
        "power_limit_mw": 700_000,
        "default_limit_mw": 700_000,
        "min_limit_mw": 200_000,
        "max_limit_mw": 700_000,
        "locked_clocks": None,
        "power_mw": 127_000,
        "sm_clock": 1980,
        "mem_clock": 3201,
        "temperature": 34,
        "reasons": 0x1,
        "violation_ns": {"power": 0, "thermal": 0},
        "mem_clocks": [3201, 2201],
        "sm_clocks": {"3201": H200_SM_CLOCKS, "2201": H200_SM_CLOCKS[:60]},
        "energy_base_mj": 1_234_567_890,
        "unsupported": [],
    }
    device.update(overrides)
    return device


def default_state(**overrides) -> dict:
    state = {
        "driver": "580.159.04",
        "driver_loaded": True,
        "root": True,
        "ignore_setters": False,
        "t0": time.time(),
        "devices": [h200(0)],
        "calls": [],
    }
    state.update(overrides)
    return state


class _Handle:
    def __init__(self, index: int):
        self.index = index


class FakeNvml:
    """The fake GPU(s) and the `pynvml` module object that reads them."""

    def __init__(self, state: dict | None = None, path: str | os.PathLike | None = None, drop: tuple[str, ...] = ()):
        self.path = Path(path) if path is not None else None
        if state is None and self.path is not None and self.path.exists():
            state = json.loads(self.path.read_text())
        self._state = state if state is not None else default_state()
        if self.path is not None:
            self._save(self._state)
        self._refcount = 0
        self.module = self._build_module(drop)

    # ----- state --------------------------------------------------------------------
    def state(self) -> dict:
        if self.path is None:
            return self._state
        return json.loads(self.path.read_text())

    def _save(self, state: dict) -> None:
        if self.path is None:
            self._state = state
            return
        tmp = self.path.with_name(self.path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.path)

    def update(self, **changes) -> None:
        state = copy.deepcopy(self.state())
        state.update(changes)
        self._save(state)

    def update_device(self, index: int = 0, **changes) -> None:
        state = copy.deepcopy(self.state())
        state["devices"][index].update(changes)
        self._save(state)

    def device(self, index: int = 0) -> dict:
        return self.state()["devices"][index]

    # ----- behaviour ------------------------------------------------------------------
    @staticmethod
    def _raise(code: int):
        raise _real.NVMLError(code)

    def _dev(self, handle) -> dict:
        if self._refcount <= 0:
            self._raise(_real.NVML_ERROR_UNINITIALIZED)
        if not isinstance(handle, _Handle):
            self._raise(_real.NVML_ERROR_INVALID_ARGUMENT)
        return self.state()["devices"][handle.index]

    def _supported(self, device: dict, what: str) -> None:
        if what in device["unsupported"]:
            self._raise(_real.NVML_ERROR_NOT_SUPPORTED)

    def _ticks(self) -> int:
        return math.floor((time.time() - self.state()["t0"]) / UPDATE_S)

    @staticmethod
    def _tick_power_mw(device: dict, k: int) -> int:
        return device["power_mw"] + WOBBLE_MW * (k % 5)

    def _energy(self, device: dict) -> int:
        """Integral of the per-update power since t0 (mJ), as the counter posts it."""
        k = self._ticks()
        wobble = WOBBLE_MW * (10 * (k // 5) + sum(range(k % 5)))
        return int(device["energy_base_mj"] + UPDATE_S * (device["power_mw"] * k + wobble))

    def _setter(self, handle, apply) -> None:
        self._dev(handle)
        state = copy.deepcopy(self.state())
        if not state["root"]:
            self._raise(_real.NVML_ERROR_NO_PERMISSION)
        state["calls"].append(apply.__name__)
        if not state["ignore_setters"]:
            apply(state["devices"][handle.index])
        self._save(state)

    def _build_module(self, drop) -> types.ModuleType:
        module = types.ModuleType("pynvml")
        module.__dict__.update({k: v for k, v in vars(_real).items() if k.startswith(("NVML_", "NVMLError"))})
        fake = self

        def nvmlInit():
            if not fake.state()["driver_loaded"]:
                fake._raise(_real.NVML_ERROR_DRIVER_NOT_LOADED)
            fake._refcount += 1

        def nvmlShutdown():
            if fake._refcount <= 0:
                fake._raise(_real.NVML_ERROR_UNINITIALIZED)
            fake._refcount -= 1

        def nvmlDeviceGetCount():
            if fake._refcount <= 0:
                fake._raise(_real.NVML_ERROR_UNINITIALIZED)
            return len(fake.state()["devices"])

        def nvmlDeviceGetHandleByIndex(index):
            if fake._refcount <= 0:
                fake._raise(_real.NVML_ERROR_UNINITIALIZED)
            if not 0 <= int(index) < len(fake.state()["devices"]):
                fake._raise(_real.NVML_ERROR_INVALID_ARGUMENT)
            return _Handle(int(index))

        def nvmlSystemGetDriverVersion():
            if fake._refcount <= 0:
                fake._raise(_real.NVML_ERROR_UNINITIALIZED)
            return fake.state()["driver"]

        def nvmlDeviceGetName(handle):
            return fake._dev(handle)["name"]

        def nvmlDeviceGetUUID(handle):
            return fake._dev(handle)["uuid"]

        def nvmlDeviceGetSerial(handle):
            device = fake._dev(handle)
            fake._supported(device, "serial")
            return device["serial"]

        def nvmlDeviceGetMemoryInfo(handle, version=None):
            total = fake._dev(handle)["memory_total"]
            return types.SimpleNamespace(total=total, free=total, used=0)

        def nvmlDeviceGetTotalEnergyConsumption(handle):
            device = fake._dev(handle)
            fake._supported(device, "energy")
            return fake._energy(device)

        def nvmlDeviceGetPowerUsage(handle):
            device = fake._dev(handle)
            k = fake._ticks()
            return int(sum(fake._tick_power_mw(device, j) for j in range(k - 10, k)) / 10)

        def nvmlDeviceGetFieldValues(handle, fieldIds):
            device = fake._dev(handle)
            values = []
            for field_id in fieldIds:
                ok = field_id == _real.NVML_FI_DEV_POWER_INSTANT and "instant_power" not in device["unsupported"]
                reading = fake._tick_power_mw(device, fake._ticks() - 1) if ok else 0
                values.append(
                    types.SimpleNamespace(
                        fieldId=field_id,
                        scopeId=0,
                        timestamp=int(time.time() * 1e6),
                        latencyUsec=0,
                        valueType=_real.NVML_VALUE_TYPE_UNSIGNED_INT,
                        nvmlReturn=_real.NVML_SUCCESS if ok else _real.NVML_ERROR_NOT_SUPPORTED,
                        value=types.SimpleNamespace(uiVal=reading, dVal=0.0, ulVal=0, ullVal=0, sllVal=0, siVal=0, usVal=0),
                    )
                )
            return values

        def nvmlDeviceGetClockInfo(handle, clock_type):
            device = fake._dev(handle)
            if clock_type == _real.NVML_CLOCK_SM:
                locked = device["locked_clocks"]
                return locked[1] if locked else device["sm_clock"]
            if clock_type == _real.NVML_CLOCK_MEM:
                return device["mem_clock"]
            fake._raise(_real.NVML_ERROR_INVALID_ARGUMENT)

        def nvmlDeviceGetTemperature(handle, sensor):
            return fake._dev(handle)["temperature"]

        def nvmlDeviceGetTemperatureV(handle, sensor, version=None):
            device = fake._dev(handle)
            if "temperature_v" in device["unsupported"]:
                fake._raise(_real.NVML_ERROR_FUNCTION_NOT_FOUND)
            return device["temperature"]

        def nvmlDeviceGetCurrentClocksEventReasons(handle):
            device = fake._dev(handle)
            if "clocks_event_reasons" in device["unsupported"]:
                fake._raise(_real.NVML_ERROR_FUNCTION_NOT_FOUND)
            return device["reasons"]

        def nvmlDeviceGetCurrentClocksThrottleReasons(handle):
            return fake._dev(handle)["reasons"]

        def nvmlDeviceGetViolationStatus(handle, policy):
            device = fake._dev(handle)
            name = {_real.NVML_PERF_POLICY_POWER: "power", _real.NVML_PERF_POLICY_THERMAL: "thermal"}.get(policy)
            if name is None or f"violation_{name}" in device["unsupported"]:
                fake._raise(_real.NVML_ERROR_NOT_SUPPORTED)
            return types.SimpleNamespace(referenceTime=int(time.time() * 1e6), violationTime=device["violation_ns"][name])

        def nvmlDeviceGetPowerManagementLimit(handle):
            return fake._dev(handle)["power_limit_mw"]

        def nvmlDeviceGetEnforcedPowerLimit(handle):
            return fake._dev(handle)["power_limit_mw"]

        def nvmlDeviceGetPowerManagementDefaultLimit(handle):
            device = fake._dev(handle)
            fake._supported(device, "default_limit")
            return device["default_limit_mw"]

        def nvmlDeviceGetPowerManagementLimitConstraints(handle):
            device = fake._dev(handle)
            return [device["min_limit_mw"], device["max_limit_mw"]]

        def nvmlDeviceGetSupportedMemoryClocks(handle):
            return list(fake._dev(handle)["mem_clocks"])

        def nvmlDeviceGetSupportedGraphicsClocks(handle, memoryClockMHz):
            device = fake._dev(handle)
            if str(memoryClockMHz) not in device["sm_clocks"]:
                fake._raise(_real.NVML_ERROR_NOT_FOUND)
            return list(reversed(device["sm_clocks"][str(memoryClockMHz)]))  # NVML lists them high to low

        def nvmlDeviceSetPowerManagementLimit(handle, limit):
            device = fake._dev(handle)
            if not device["min_limit_mw"] <= int(limit) <= device["max_limit_mw"]:
                fake._raise(_real.NVML_ERROR_INVALID_ARGUMENT)

            def set_power_limit(target):
                target["power_limit_mw"] = int(limit)

            fake._setter(handle, set_power_limit)

        def nvmlDeviceSetGpuLockedClocks(handle, minGpuClockMHz, maxGpuClockMHz):
            if int(minGpuClockMHz) > int(maxGpuClockMHz):
                fake._raise(_real.NVML_ERROR_INVALID_ARGUMENT)

            def lock_clocks(target):
                target["locked_clocks"] = [int(minGpuClockMHz), int(maxGpuClockMHz)]

            fake._setter(handle, lock_clocks)

        def nvmlDeviceResetGpuLockedClocks(handle):
            def reset_clocks(target):
                target["locked_clocks"] = None

            fake._setter(handle, reset_clocks)

        functions = {name: value for name, value in locals().items() if name.startswith("nvml")}
        for name in drop:
            functions.pop(name)
        module.__dict__.update(functions)
        return module


def install(monkeypatch, state: dict | None = None, path=None, drop: tuple[str, ...] = ()) -> FakeNvml:
    """Put a fake pynvml in sys.modules for one test (monkeypatch undoes it)."""
    fake = FakeNvml(state, path, drop)
    monkeypatch.setitem(sys.modules, "pynvml", fake.module)
    return fake


def install_for_process(path) -> FakeNvml:
    """In a child process: read the fake GPU from the state file the test wrote."""
    fake = FakeNvml(path=path)
    sys.modules["pynvml"] = fake.module
    return fake
