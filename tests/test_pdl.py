"""When the decode step's Triton kernels are launched with programmatic dependent launch
(models/pdl.py): the decision and the process-wide switch, on CPU (the kernels' PDL paths
themselves: test_gemv_gpu.py, test_decode_attention_gpu.py, test_conv_step_gpu.py,
test_mla_attention_gpu.py on a GPU; test_gemv_compile.py compiles for sm_90 without one)."""

import pytest
import torch

from phasewatt.models import gemv, pdl

PDL_ON = {"USE_PDL": True, "launch_pdl": True}
PDL_OFF = {"USE_PDL": False, "launch_pdl": False}


@pytest.fixture
def switch():
    """Leaves the PDL switch as it found it."""
    before = pdl.pdl_enabled()
    yield
    pdl.set_pdl(before)


@pytest.mark.parametrize("capability,enabled,interpreted,expected", [
    ((9, 0), True, False, PDL_ON),      # H100 / H200
    ((10, 0), True, False, PDL_ON),     # Blackwell
    ((8, 9), True, False, PDL_OFF),     # Ada: no griddepcontrol
    ((8, 0), True, False, PDL_OFF),     # A100
    ((9, 0), False, False, PDL_OFF),    # switched off
    ((9, 0), True, True, PDL_OFF),      # the interpreter has no inline assembly
    (None, True, False, PDL_OFF),       # not a CUDA device
])
def test_pdl_launch_args_only_on_hopper_and_later_when_switched_on(capability, enabled, interpreted, expected):
    assert pdl.pdl_launch_args(capability, enabled, interpreted) == expected


def test_the_gemv_loads_its_first_weight_tile_early_exactly_when_it_waits(switch, monkeypatch):
    for args in (PDL_ON, PDL_OFF):
        monkeypatch.setattr(pdl, "launch_args", lambda device, args=args: dict(args))
        assert gemv._launch_args(torch.device("cuda")) == {**args, "EARLY_W": args["USE_PDL"]}


def test_interpreter_turns_pdl_off(switch, monkeypatch):
    pdl.set_pdl(True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert pdl.launch_args(torch.device("cuda")) == PDL_OFF
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert pdl.launch_args(torch.device("cpu")) == PDL_OFF  # not a CUDA device


def test_pdl_switch_round_trip(switch):
    assert pdl.pdl_active(torch.device("cpu")) is False
    pdl.set_pdl(False)
    assert pdl.pdl_enabled() is False
    pdl.set_pdl(True)
    assert pdl.pdl_enabled() is True
    for value in (0, 1, "auto", None):
        with pytest.raises(TypeError, match="bool"):
            pdl.set_pdl(value)
    assert pdl.pdl_enabled() is True


def test_launched_notes_pdl_launches_only(switch, monkeypatch):
    """What the engine records: whether a kernel was launched with PDL since its set-up began
    (a GPU with PDL whose model runs none of these kernels records False)."""
    monkeypatch.setattr(pdl, "_capability", lambda index: (9, 0))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    cuda = torch.device("cuda", 0)
    pdl.set_pdl(True)
    pdl.reset_launched()
    assert pdl.pdl_active(cuda) and not pdl.launched()  # asking does not count as a launch
    assert pdl.launch_args(cuda) == PDL_ON and pdl.launched()
    pdl.reset_launched()
    pdl.set_pdl(False)
    assert pdl.launch_args(cuda) == PDL_OFF and not pdl.launched()


def test_each_engine_sets_the_switch_before_its_own_uncaptured_steps(switch):
    """Two engines in one process with opposite choices: an engine's eager prefill and decode
    run with its own setting, not the one of the engine set up last."""
    from phasewatt.engines.native import NativeEngine
    from phasewatt.models.spec import ModelSpec

    spec = ModelSpec.from_config("tiny-gqa", dict(arch="gqa", n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, head_dim=16,
                                                  d_ff=48, vocab_size=64))
    engines = {
        choice: NativeEngine(spec=spec, batch=1, prompt_len=4, decode_tokens=2, device="cpu", options={"pdl": choice})
        for choice in (False, "auto")
    }
    for engine in engines.values():
        engine.setup()
    assert pdl.pdl_enabled() is True  # the last set-up's choice
    engines[False].decode(1)
    assert pdl.pdl_enabled() is False
    engines["auto"].prefill()
    assert pdl.pdl_enabled() is True
    assert all(engine.describe()["pdl"] is False for engine in engines.values())  # CPU: nothing launched with PDL
