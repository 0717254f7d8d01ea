"""NvmlGpu against the fake NVML: units, fallbacks, errors as one line, setters."""

import time

import pytest

import fake_nvml
from phasewatt.errors import DvfsPermissionError, PhasewattError
from phasewatt.gpu.base import Gpu, decode_reasons
from phasewatt.gpu.dvfs import DvfsError


@pytest.fixture
def fake(monkeypatch):
    return fake_nvml.install(monkeypatch)


def open_gpu(index=0):
    from phasewatt.gpu.nvml import NvmlGpu

    return NvmlGpu(index)


def test_facts_in_watts_and_megahertz(fake):
    gpu = open_gpu()
    assert isinstance(gpu, Gpu) and gpu.virtual_time is False and gpu.locked_clock_readable is False
    assert (gpu.name, gpu.driver, gpu.index) == ("NVIDIA H200", "580.159.04", 0)
    assert gpu.serial == "1652240000000" and gpu.uuid.startswith("GPU-")
    assert gpu.power_limit_constraints_w() == (200.0, 700.0)
    assert gpu.default_power_limit_w() == 700.0 == gpu.power_limit_w() == gpu.enforced_power_limit_w()
    clocks = gpu.supported_sm_clocks_mhz()
    assert len(clocks) == 110 and clocks[0] == 345 and clocks[-1] == 1980 and clocks == sorted(clocks)
    assert gpu.supported_mem_clocks_mhz() == [2201, 3201]
    assert gpu.memory_total_bytes() == 150_754_820_096
    gpu.close()


def test_sensor_units_and_the_counter_integrating_power(fake):
    gpu = open_gpu()
    device = fake.device()
    instant = gpu.power_instant_w()
    assert device["power_mw"] / 1000 <= instant <= device["power_mw"] / 1000 + 4  # mW -> W, wobble 0..4 W
    assert 127 <= gpu.power_average_w() <= 131
    assert (gpu.sm_clock_mhz(), gpu.mem_clock_mhz(), gpu.temperature_c()) == (1980, 3201, 34.0)
    e0, t0 = gpu.energy_mj(), time.time()
    time.sleep(0.35)
    e1, t1 = gpu.energy_mj(), time.time()
    joules_per_s = (e1 - e0) / 1000 / (t1 - t0)
    assert 90 < joules_per_s < 170  # ~129 W, quantised to 100 ms updates
    sample = gpu.sample()
    assert sample.energy_mj >= e1 and sample.sm_clock_mhz == 1980 and sample.clocks_event_reasons == 0x1
    assert gpu.instant_power_source.startswith("field") and gpu.temperature_source == "nvmlDeviceGetTemperatureV"
    gpu.close()


def test_instant_power_falls_back_to_power_usage_where_the_field_is_not_supported(fake):
    fake.update_device(unsupported=["instant_power"])
    gpu = open_gpu()
    assert "nvmlDeviceGetPowerUsage" in gpu.instant_power_source
    assert gpu.power_instant_w() == gpu.power_average_w()
    gpu.close()


def test_clocks_event_reasons_are_decoded_with_unknown_bits_kept(fake):
    fake.update_device(reasons=0x4 | 0x40 | 0x1000)
    gpu = open_gpu()
    mask = gpu.clocks_event_reasons()
    assert decode_reasons(mask) == ["sw_power_cap", "hw_thermal_slowdown", "unknown_0x1000"]
    assert gpu.reasons_source == "nvmlDeviceGetCurrentClocksEventReasons"
    gpu.close()


@pytest.mark.parametrize("how", ["function_not_found", "old_bindings"])
def test_older_drivers_and_bindings_fall_back_to_the_deprecated_getters(monkeypatch, how):
    if how == "function_not_found":  # driver older than the new names
        fake = fake_nvml.install(monkeypatch)
        fake.update_device(unsupported=["clocks_event_reasons", "temperature_v"], reasons=0x20, temperature=51)
    else:  # nvidia-ml-py older than the new names
        fake = fake_nvml.install(monkeypatch, drop=("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetTemperatureV"))
        fake.update_device(reasons=0x20, temperature=51)
    gpu = open_gpu()
    assert gpu.reasons_source == "nvmlDeviceGetCurrentClocksThrottleReasons"
    assert gpu.temperature_source == "nvmlDeviceGetTemperature"
    assert decode_reasons(gpu.clocks_event_reasons()) == ["sw_thermal_slowdown"] and gpu.temperature_c() == 51.0
    gpu.close()


def test_violation_counters_in_ns_and_unsupported_policies_left_out(fake):
    fake.update_device(violation_ns={"power": 1_500_000, "thermal": 7})
    gpu = open_gpu()
    assert gpu.violation_ns() == {"power": 1_500_000, "thermal": 7}
    gpu.close()
    fake.update_device(unsupported=["violation_thermal"])
    gpu = open_gpu()
    assert gpu.violation_ns() == {"power": 1_500_000}
    gpu.close()


def test_boards_without_a_serial_use_the_uuid(fake):
    fake.update_device(unsupported=["serial"], uuid="GPU-ab/cd")
    gpu = open_gpu()
    assert gpu.serial == "GPU-ab_cd"  # safe in a journal's file name
    gpu.close()


def test_open_errors_are_one_line_and_leave_nvml_shut_down(fake):
    with pytest.raises(PhasewattError, match=r"GPU index 3 cannot be opened \(Invalid Argument\); NVML sees 1 GPU"):
        open_gpu(3)
    assert fake._refcount == 0
    fake.update_device(unsupported=["energy"])
    with pytest.raises(PhasewattError, match="has no readable energy counter .*Volta or newer"):
        open_gpu(0)
    assert fake._refcount == 0
    fake.update(driver_loaded=False)
    with pytest.raises(PhasewattError, match=r"NVML could not be initialised \(Driver Not Loaded\)"):
        open_gpu(0)


def test_a_reading_that_fails_later_names_the_reading(fake):
    gpu = open_gpu()
    fake.update_device(unsupported=["energy"])
    with pytest.raises(PhasewattError, match=r"reading the energy counter of GPU 0 failed \(Not Supported\)"):
        gpu.energy_mj()
    gpu.close()
    gpu.close()  # closing twice is harmless
    assert fake._refcount == 0


def test_setters_apply_and_a_lock_is_remembered_not_read(fake):
    gpu = open_gpu()
    gpu.set_power_limit_w(300)
    assert fake.device()["power_limit_mw"] == 300_000 and gpu.power_limit_w() == 300.0
    gpu.lock_sm_clock_mhz(1590)
    assert fake.device()["locked_clocks"] == [1590, 1590] and gpu.locked_sm_clock_mhz() == 1590
    gpu.unlock_sm_clock()
    assert fake.device()["locked_clocks"] is None and gpu.locked_sm_clock_mhz() is None
    gpu.close()


def test_setters_without_root_give_one_line_and_change_nothing(fake):
    fake.update(root=False)
    gpu = open_gpu()
    with pytest.raises(DvfsPermissionError) as info:
        gpu.set_power_limit_w(300)
    assert str(info.value) == (
        "dvfs: NVML refused to set the power limit to 300 W on GPU 0 (Insufficient Permissions): "
        "power caps and clock locks need root (or CAP_SYS_ADMIN)"
    )
    with pytest.raises(DvfsPermissionError, match="lock the SM clock at 1590 MHz"):
        gpu.lock_sm_clock_mhz(1590)
    assert gpu.locked_sm_clock_mhz() is None
    assert fake.device()["power_limit_mw"] == 700_000 and fake.device()["locked_clocks"] is None
    gpu.close()


def test_a_setting_outside_the_constraints_is_refused_by_the_driver(fake):
    gpu = open_gpu()
    with pytest.raises(DvfsError, match=r"could not set the power limit to 900 W on GPU 0 \(Invalid Argument\)"):
        gpu.set_power_limit_w(900)
    gpu.close()


def test_open_gpu_takes_the_index_from_cuda_visible_devices(fake, monkeypatch):
    from phasewatt.gpu.nvml import NvmlGpu
    from phasewatt.gpu.select import open_gpu as select_open_gpu

    fake.update(devices=[fake_nvml.h200(0), fake_nvml.h200(1)])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    gpu = select_open_gpu("nvml", "H200")
    assert isinstance(gpu, NvmlGpu) and gpu.index == 1 and gpu.serial == "1652240000001"
    gpu.close()
