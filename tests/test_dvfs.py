"""DVFS on a real-GPU backend (fake NVML): opt-in, validation against the live GPU, journal,
read-back, restore on exceptions and signals, replay after SIGKILL."""

import json
import os
import select
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import fake_nvml
from phasewatt.errors import ConfigError, DvfsPermissionError
from phasewatt.gpu.dvfs import (
    OPT_IN_HINT,
    DvfsError,
    check_dvfs_opt_in,
    dvfs_applied,
    journal_path,
    parse_dvfs,
    replay_journals,
)

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"


@pytest.fixture
def fake(monkeypatch, tmp_path):
    return fake_nvml.install(monkeypatch, path=tmp_path / "nvml_state.json")


def nvml_gpu(index=0):
    from phasewatt.gpu.nvml import NvmlGpu

    return NvmlGpu(index)


def live(token, gpu):
    return parse_dvfs(token, supported_clocks=gpu.supported_sm_clocks_mhz(), power_range=gpu.power_limit_constraints_w())


# ----- validation against the live GPU and the opt-in ------------------------------------


def test_settings_are_checked_against_the_live_gpu(fake):
    gpu = nvml_gpu()
    with pytest.raises(ConfigError, match=r"^dvfs: 'pl150' is outside the GPU's power-limit range; allowed: pl200 to pl700$"):
        live("pl150", gpu)
    with pytest.raises(ConfigError, match=r"^dvfs: 'sm1234' is not a supported SM clock; nearest supported: sm1230 or sm1245$"):
        live("sm1234", gpu)
    with pytest.raises(ConfigError, match=r"nearest supported: sm1980$"):
        live("sm2100", gpu)
    assert live("sm1590", gpu).sm_clock_mhz == 1590 and live("pl300", gpu).power_cap_w == 300
    gpu.close()


def test_opt_in_is_needed_for_non_default_settings_on_a_real_gpu(fake):
    config = {"dvfs_control": False, "grid": {"dvfs": ["default", "pl300", "sm1590"]}}
    with pytest.raises(ConfigError) as info:
        check_dvfs_opt_in(config, "nvml")
    message = str(info.value)
    assert "\n" not in message and message.startswith("grid.dvfs: pl300, sm1590 would change the real GPU")
    assert message.endswith(OPT_IN_HINT)
    with pytest.raises(ConfigError):
        check_dvfs_opt_in(config, "auto")  # an NVIDIA GPU is visible: auto means nvml
    check_dvfs_opt_in({**config, "dvfs_control": True}, "nvml")
    check_dvfs_opt_in(config, "sim")
    check_dvfs_opt_in({**config, "grid": {"dvfs": ["default"]}}, "nvml")


def test_without_opt_in_nothing_is_touched(fake, tmp_path):
    gpu = nvml_gpu()
    with pytest.raises(DvfsError, match="DVFS control is off; set `dvfs_control: true`"):
        with dvfs_applied(gpu, live("pl300", gpu), journal_dir=tmp_path / "j", allowed=False):
            pass
    assert fake.state()["calls"] == [] and not (tmp_path / "j").exists()
    gpu.close()


def test_default_reports_whether_the_gpu_is_at_its_default(fake, tmp_path):
    gpu = nvml_gpu()
    with dvfs_applied(gpu, parse_dvfs("default"), journal_dir=tmp_path, allowed=False) as effective:
        assert effective["power_limit_is_default"] is True and effective["effective_power_limit_w"] == 700
    fake.update_device(power_limit_mw=450_000)  # someone else capped it
    with dvfs_applied(gpu, parse_dvfs("default"), journal_dir=tmp_path, allowed=False) as effective:
        assert effective["power_limit_is_default"] is False and effective["effective_power_limit_w"] == 450
    fake.update_device(unsupported=["default_limit"])
    with dvfs_applied(gpu, parse_dvfs("default"), journal_dir=tmp_path, allowed=False) as effective:
        assert effective["power_limit_is_default"] is None and effective["default_power_limit_w"] is None
    assert fake.state()["calls"] == []
    gpu.close()


# ----- apply, journal, read back, restore --------------------------------------------------


def test_power_cap_is_journalled_read_back_and_restored(fake, tmp_path):
    gpu = nvml_gpu()
    journal = journal_path(tmp_path, gpu)
    with dvfs_applied(gpu, live("pl300", gpu), journal_dir=tmp_path, allowed=True) as effective:
        assert effective["effective_power_limit_w"] == 300 and fake.device()["power_limit_mw"] == 300_000
        entry = json.loads(journal.read_text())
        assert entry["original_power_limit_w"] == 700 and entry["power_limit_changed"] is True
        assert entry["pid"] == os.getpid() and entry["host"] == socket.gethostname() and entry["gpu_serial"] == gpu.serial
    assert fake.device()["power_limit_mw"] == 700_000 and not journal.exists()
    gpu.close()


def test_clock_lock_is_restored_and_its_verification_is_stated(fake, tmp_path):
    gpu = nvml_gpu()
    with dvfs_applied(gpu, live("sm1590", gpu), journal_dir=tmp_path, allowed=True) as effective:
        assert fake.device()["locked_clocks"] == [1590, 1590]
        assert effective["effective_locked_sm_clock_mhz"] is None  # NVML cannot read a lock back
        assert "sustained_sm_clock_mhz" in effective["lock_verification"]
        assert effective["sm_clock_after_lock_mhz"] == 1590
        assert json.loads(journal_path(tmp_path, gpu).read_text())["original_lock_known"] is False
    assert fake.device()["locked_clocks"] is None and not list(tmp_path.glob("gpu*.json"))
    gpu.close()


def test_an_exception_in_the_block_restores(fake, tmp_path):
    gpu = nvml_gpu()
    with pytest.raises(ZeroDivisionError):
        with dvfs_applied(gpu, live("pl400", gpu), journal_dir=tmp_path, allowed=True):
            1 / 0
    assert fake.device()["power_limit_mw"] == 700_000 and not list(tmp_path.glob("gpu*.json"))
    gpu.close()


def test_a_setter_that_reports_success_without_applying_is_caught(fake, tmp_path):
    fake.update(ignore_setters=True)
    gpu = nvml_gpu()
    with pytest.raises(DvfsError, match=r"^dvfs pl300: the driver accepted it but the power limit reads 700 W$"):
        with dvfs_applied(gpu, live("pl300", gpu), journal_dir=tmp_path, allowed=True):
            pytest.fail("the block must not run")
    assert not list(tmp_path.glob("gpu*.json"))
    gpu.close()


def test_permission_denied_is_one_line_and_leaves_no_journal(fake, tmp_path):
    fake.update(root=False)
    gpu = nvml_gpu()
    with pytest.raises(DvfsPermissionError, match=r"Insufficient Permissions\): power caps and clock locks need root"):
        with dvfs_applied(gpu, live("sm1200", gpu), journal_dir=tmp_path, allowed=True):
            pass
    assert not list(tmp_path.glob("gpu*.json")) and fake.device()["locked_clocks"] is None
    gpu.close()


def test_a_failed_restore_keeps_the_journal_and_says_what_to_run(fake, tmp_path):
    gpu = nvml_gpu()
    with pytest.raises(DvfsError, match=r"power limit reads 300 W after restoring 700 W; journal kept at .*phasewatt restore"):
        with dvfs_applied(gpu, live("pl300", gpu), journal_dir=tmp_path, allowed=True):
            fake.update(ignore_setters=True)
    assert journal_path(tmp_path, gpu).exists()
    fake.update(ignore_setters=False)
    lines = replay_journals(tmp_path, nvml_gpu)
    assert lines == [lines[0]] and "undid pl300" in lines[0] and "power limit restored to 700 W (read back)" in lines[0]
    assert fake.device()["power_limit_mw"] == 700_000 and not journal_path(tmp_path, gpu).exists()
    gpu.close()


def test_a_journal_left_behind_blocks_the_next_change(fake, tmp_path):
    gpu = nvml_gpu()
    path = journal_path(tmp_path, gpu)
    tmp_path.joinpath(path.name).write_text(json.dumps({"gpu_index": 0, "pid": 2**22 + 7, "host": socket.gethostname()}))
    with pytest.raises(DvfsError, match=r"an interrupted run left a journal at .*; run `phasewatt restore --journal-dir"):
        with dvfs_applied(gpu, live("pl300", gpu), journal_dir=tmp_path, allowed=True):
            pass
    path.write_text(json.dumps({"gpu_index": 0, "pid": os.getppid(), "host": socket.gethostname()}))
    with pytest.raises(DvfsError, match=rf"GPU 0 is being changed by another job \(pid {os.getppid()}"):
        with dvfs_applied(gpu, live("pl300", gpu), journal_dir=tmp_path, allowed=True):
            pass
    assert fake.state()["calls"] == []
    gpu.close()


def test_replay_leaves_journals_it_cannot_honour(fake, tmp_path):
    gpu = nvml_gpu()
    with dvfs_applied(gpu, live("pl300", gpu), journal_dir=tmp_path, allowed=True):
        entry = json.loads(journal_path(tmp_path, gpu).read_text())
    other = {**entry, "gpu_serial": "SOMEONE-ELSE", "setting": "pl250"}
    (tmp_path / "gpu0_SOMEONE-ELSE.json").write_text(json.dumps(other))
    (tmp_path / "gpu1_broken.json").write_text("{not json")
    (tmp_path / "gpu2_running.json").write_text(json.dumps({**entry, "gpu_index": 2, "pid": os.getppid()}))
    echoed = []
    with pytest.raises(DvfsError, match=r"^restore: 2 of 3 journal\(s\) in .* could not be replayed$"):
        replay_journals(tmp_path, nvml_gpu, echo=echoed.append)
    assert len(echoed) == 3
    assert "is now serial 1652240000000, not SOMEONE-ELSE; left in place" in echoed[0]
    assert "unreadable journal; left in place" in echoed[1]
    assert f"pid {os.getppid()} is still running" in echoed[2]
    assert len(list(tmp_path.glob("gpu*.json"))) == 3
    gpu.close()


# ----- signals: a child process applies a setting on the shared fake GPU -------------------

CHILD = """
import sys, time
sys.path[:0] = [{tests!r}, {src!r}]
import fake_nvml
fake_nvml.install_for_process({state!r})
from phasewatt.gpu.nvml import NvmlGpu
from phasewatt.gpu.dvfs import dvfs_applied, parse_dvfs
gpu = NvmlGpu(0)
setting = parse_dvfs({token!r}, supported_clocks=gpu.supported_sm_clocks_mhz(), power_range=gpu.power_limit_constraints_w())
with dvfs_applied(gpu, setting, journal_dir={journal!r}, allowed=True):
    print("applied", flush=True)
    while True:
        time.sleep(0.01)
"""


def start_child(tmp_path, token):
    code = CHILD.format(tests=str(TESTS), src=str(SRC), state=str(tmp_path / "nvml_state.json"), token=token, journal=str(tmp_path / "journal"))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready, _, _ = select.select([child.stdout], [], [], 30)
    if not ready or child.stdout.readline().strip() != "applied":
        child.kill()
        pytest.fail(f"the child did not apply the setting: {child.communicate()[1]}")
    return child


@pytest.mark.parametrize(
    "sig, token, returncodes",
    [
        (signal.SIGTERM, "pl300", {128 + signal.SIGTERM}),
        (signal.SIGINT, "sm1200", {-signal.SIGINT}),  # KeyboardInterrupt re-raises SIGINT
    ],
)
def test_sigterm_and_sigint_restore_and_remove_the_journal(fake, tmp_path, sig, token, returncodes):
    child = start_child(tmp_path, token)
    assert fake.device()["power_limit_mw"] == 300_000 or fake.device()["locked_clocks"] == [1200, 1200]
    assert len(list((tmp_path / "journal").glob("gpu*.json"))) == 1
    child.send_signal(sig)
    _, stderr = child.communicate(timeout=30)
    assert child.returncode in returncodes, stderr
    assert fake.device()["power_limit_mw"] == 700_000 and fake.device()["locked_clocks"] is None
    assert not list((tmp_path / "journal").glob("gpu*.json"))
    assert f"phasewatt: {signal.Signals(sig).name}: GPU 0 " in stderr


def test_after_sigkill_the_journal_remains_and_restore_replays_it(fake, tmp_path, capsys):
    from phasewatt.cli import main

    child = start_child(tmp_path, "pl300")
    child.kill()
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert fake.device()["power_limit_mw"] == 300_000  # nothing ran after the kill
    assert len(list((tmp_path / "journal").glob("gpu*.json"))) == 1
    assert main(["restore", "--journal-dir", str(tmp_path / "journal")]) == 0
    out = capsys.readouterr().out
    assert f"GPU 0 (NVIDIA H200): undid pl300 left by pid {child.pid}" in out
    assert "power limit restored to 700 W (read back)" in out
    assert fake.device()["power_limit_mw"] == 700_000 and not list((tmp_path / "journal").glob("gpu*.json"))
    assert main(["restore", "--journal-dir", str(tmp_path / "journal")]) == 0
    assert "nothing to restore" in capsys.readouterr().out
