"""The microbench engine on CPU: its kernels compute what they claim, and its FLOP and byte
counts are those of the kernels it issues."""

import pytest
import torch

from phasewatt.engines.base import make_engine
from phasewatt.engines.microbench import MicrobenchEngine, _uuid_hex, weight_blocks
from phasewatt.errors import ConfigError, PhasewattError
from phasewatt.models.spec import ModelSpec

TINY = {
    "arch": "gqa",
    "n_layers": 2,
    "d_model": 16,
    "n_heads": 2,
    "n_kv_heads": 1,
    "head_dim": 8,
    "d_ff": 24,
    "vocab_size": 40,
    "dtype": "float32",
}


def spec(**extra):
    return ModelSpec.from_config("tiny", {**TINY, **extra})


def engine(decode_kernel="gemv", batch=2, prompt_len=3, **options):
    return make_engine(
        "microbench",
        spec=spec(),
        gpu=None,
        batch=batch,
        prompt_len=prompt_len,
        decode_tokens=4,
        options={"device": "cpu", "decode_kernel": decode_kernel, "max_rows": 40, **options},
    )


def test_weights_are_laid_out_as_the_models_linear_weights():
    s = spec()
    # one layer: q 16x16, kv 2x16x8, o 16x16, mlp 3x16x24 -> 1920 weights = 120 rows of 16
    assert s.layer_linear_params() == 1920
    assert weight_blocks(s, 40) == [40, 40, 40] * 2
    assert weight_blocks(s, 1000) == [120, 120]


def test_flops_and_bytes_are_those_of_the_kernels_issued():
    e = engine("gemv")
    info = e.describe()
    rows, vocab, k, tokens, batch, f32 = 240, 40, 16, 6, 2, 4
    weights = (rows + vocab) * k * f32
    assert info["weight_bytes"] == weights
    assert info["prefill_flops"] == 2 * k * (tokens * rows + batch * vocab)
    assert info["prefill_bytes"] == weights + f32 * (6 * tokens * k + tokens * rows + batch * k + batch * vocab)
    assert info["decode_step_flops"] == 2 * batch * k * (rows + vocab)
    assert info["decode_step_bytes"] == weights + f32 * batch * (7 * k + rows + vocab)
    assert info["decode_kernels_per_step"] == info["prefill_kernels"] == 7
    copy = engine("copy").describe()
    assert copy["decode_step_flops"] == 0 and copy["decode_step_bytes"] == 2 * weights  # read + write


def test_kernels_compute_what_they_claim():
    e = engine("gemv")
    assert e.setup()["weight_bytes"] == e.weight_bytes
    assert e.prefill() == 6 and e.decode(3) == 6
    head = e._weights[-1]
    torch.testing.assert_close(e._y_head, e._x[:2] @ head.t())
    last_layer_block = e._weights[-2]
    expected = e._x @ last_layer_block.t()
    torch.testing.assert_close(e._y[: expected.numel()].view_as(expected), expected)
    step = e._x_step @ head.t()
    torch.testing.assert_close(e._y_step[: step.numel()].view_as(step), step)
    e.close()
    c = engine("copy")
    c.setup()
    c.decode(1)
    torch.testing.assert_close(c._scratch[: c._weights[-1].numel()], c._weights[-1].view(-1))
    c.close()


def test_options_come_from_the_model_entry_and_are_checked():
    from_entry = MicrobenchEngine(
        spec=spec(microbench={"decode_kernel": "copy", "device": "cpu"}), gpu=None, batch=1, prompt_len=2, decode_tokens=1
    )
    assert from_entry.decode_kernel == "copy" and from_entry.use_graphs is False
    with pytest.raises(ConfigError, match=r"^models.tiny.microbench.decode_kernel: 'gemm' is not allowed; allowed: gemv, copy$"):
        engine("gemm")
    with pytest.raises(ConfigError, match=r"^models.tiny.microbench.colour: unknown option; allowed: cuda_graphs, decode_kernel"):
        engine(colour="red")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where no CUDA device is visible")
def test_without_cuda_it_says_so_in_one_line():
    e = MicrobenchEngine(spec=spec(), gpu=None, batch=1, prompt_len=2, decode_tokens=1)
    with pytest.raises(PhasewattError, match=r"^engine microbench: no CUDA device visible to PyTorch"):
        e.setup()


def test_gpu_uuids_compare_in_any_spelling():
    bare = "8d5c1e2a-0000-4000-8000-000000000001"
    assert _uuid_hex(f"GPU-{bare}") == _uuid_hex(bare.upper()) == bare.replace("-", "")
    assert _uuid_hex("not a uuid") == "" and _uuid_hex(None) == ""
