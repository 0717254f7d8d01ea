"""Our Mamba2 model against transformers' Mamba2ForCausalLM (its pure-torch path) with the same
weights, loaded from a saved checkpoint, on CPU."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from _reference import assert_matches_cached_reference, loaded
from phasewatt.errors import ConfigError
from phasewatt.models.loader import CheckpointError
from phasewatt.models.mamba2 import Mamba2Model
from phasewatt.models.registry import build_model
from phasewatt.models.spec import ModelSpec

transformers = pytest.importorskip("transformers")

PROMPT_LEN = 40  # chunks of 16: two full, one partial
DECODE_STEPS = 16
ATOL = 2e-4


def tiny_spec(tied: bool, **extra) -> ModelSpec:
    return ModelSpec(
        name="tiny-mamba2", arch="mamba2", n_layers=2, d_model=32, vocab_size=97, d_state=8,
        head_dim=16, expand=2, n_groups=2, conv_size=4, chunk_size=16, tied_embeddings=tied,
        dtype="float32", norm_eps=1e-5, extra=extra,
    )


def reference_model(spec: ModelSpec):
    """A Mamba2ForCausalLM of the spec's shapes, every weight perturbed away from its initial
    value (norms away from 1, D away from 1) so that a convention mismatch shows."""
    config = transformers.Mamba2Config(
        num_heads=spec.mamba_heads, head_dim=spec.head_dim, vocab_size=spec.vocab_size,
        hidden_size=spec.d_model, state_size=spec.d_state, num_hidden_layers=spec.n_layers,
        expand=spec.expand, n_groups=spec.n_groups, conv_kernel=spec.conv_size,
        chunk_size=spec.chunk_size, layer_norm_epsilon=spec.norm_eps,
        tie_word_embeddings=spec.tied_embeddings,
        time_step_limit=tuple(spec.extra.get("time_step_limit", (0.0, float("inf")))),
    )
    torch.manual_seed(1)
    model = transformers.Mamba2ForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn_like(param))
    return model


def prompt_of(spec: ModelSpec, batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, spec.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_matches_mamba2_reference(tmp_path, tied):
    spec = tiny_spec(tied)
    reference = reference_model(spec)
    reference.save_pretrained(tmp_path)
    ours = loaded(Mamba2Model(spec), tmp_path)
    assert_matches_cached_reference(ours, reference, prompt_of(spec, 2, PROMPT_LEN, 2), DECODE_STEPS, ATOL)


def test_time_step_limit_matches_reference_prefill(tmp_path):
    """A time-step limit from spec.extra clamps dt as transformers' chunked path does."""
    spec = tiny_spec(False, time_step_limit=[0.0, 0.05])
    reference = reference_model(spec)
    reference.save_pretrained(tmp_path)
    prompt = prompt_of(spec, 1, 20, 3)
    with torch.no_grad():
        expected = reference(prompt).logits
    ours = loaded(Mamba2Model(spec), tmp_path)
    ours.setup_caches(1, 20)
    torch.testing.assert_close(ours.prefill(prompt, all_logits=True), expected, atol=ATOL, rtol=0)
    unlimited = loaded(Mamba2Model(tiny_spec(False)), tmp_path)
    unlimited.setup_caches(1, 20)
    assert (unlimited.prefill(prompt, all_logits=True) - expected).abs().max() > 1e-2


def test_mamba_ssm_embedding_name_loads(tmp_path):
    """state-spaces checkpoints spell the embedding 'backbone.embedding.weight'."""
    spec = tiny_spec(True)
    reference_model(spec).save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["backbone.embedding.weight"] = state.pop("backbone.embeddings.weight")
    model = Mamba2Model(spec)
    model.load_hf_state_dict(state)
    assert torch.equal(model.embed.weight, state["backbone.embedding.weight"])
    assert torch.equal(model.layers[1].mixer.conv_weight, state["backbone.layers.1.mixer.conv1d.weight"][:, 0])


def test_random_model_decode_continues_prefill():
    """Random weights from a seed (no checkpoint): the decode step after a prefill of S tokens
    gives the logits a prefill of S+1 tokens gives; the prompt spans several chunks."""
    spec = tiny_spec(False, time_step_limit=[0.0, 0.05])
    model = build_model(spec, dtype=torch.float32, seed=3)
    tokens = prompt_of(spec, 3, 35, 4)
    model.setup_caches(3, 40)
    whole = model.prefill(tokens)
    model.prefill(tokens[:, :-1])
    stepped = model.decode(tokens[:, -1], torch.tensor([34]))
    assert torch.isfinite(whole).all()
    torch.testing.assert_close(stepped, whole, atol=1e-4, rtol=0)


def test_loader_reports_missing_misshapen_and_unknown_tensors(tmp_path):
    spec = tiny_spec(False)
    reference_model(spec).save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    name = "backbone.layers.0.mixer.conv1d.bias"

    missing = {k: v for k, v in state.items() if k != name}
    with pytest.raises(CheckpointError, match=f"tensor {name} is missing"):
        Mamba2Model(spec).load_hf_state_dict(missing)

    misshapen = dict(state, **{"backbone.layers.1.mixer.D": torch.zeros(5)})
    with pytest.raises(CheckpointError, match=r"backbone.layers.1.mixer.D has shape \(5,\), the model spec needs \(4,\)"):
        Mamba2Model(spec).load_hf_state_dict(misshapen)

    deeper = dict(state, **{"backbone.layers.2.norm.weight": torch.ones(32)})
    with pytest.raises(CheckpointError, match="no place for: backbone.layers.2.norm.weight"):
        Mamba2Model(spec).load_hf_state_dict(deeper)


def test_bad_shapes_and_batch_are_refused():
    with pytest.raises(ConfigError, match="models.tiny-mamba2.time_step_limit"):
        Mamba2Model(tiny_spec(False, time_step_limit=[0.1, 0.01]))
    with pytest.raises(ConfigError, match="models.tiny-mamba2.time_step_limit"):
        Mamba2Model(tiny_spec(False, time_step_limit="fast"))
    with pytest.raises(ConfigError, match="models.tiny-mamba2.n_groups"):
        Mamba2Model(ModelSpec(**{**tiny_spec(False).__dict__, "n_groups": 3}))
    model = Mamba2Model(tiny_spec(False))
    model.setup_caches(2, 8)
    with pytest.raises(ValueError, match="states hold batch 2; asked for batch 1"):
        model.prefill(torch.zeros(1, 4, dtype=torch.long))


def test_prefill_backends_and_the_kernel_op_shapes_on_cpu():
    """'triton' is Mamba2's own prefill backend (models/ssd_prefill.py); auto stays the torch
    form on CPU. The kernels' op is shape-checked by its fake (what torch.compile traces with):
    u [B, T, d_inner] in the model dtype and the sums of squares per head (and block of its
    channels) [B, T, heads * v_blocks]."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from phasewatt.models import ssd_prefill

    model = Mamba2Model(tiny_spec(False))
    model.prefill_backend = "triton"
    assert {layer.mixer.backend for layer in model.layers} == {"triton"}
    with pytest.raises(ValueError, match="prefill_backend 'cuda'; allowed: auto, torch, fla, triton"):
        model.prefill_backend = "cuda"
    mixer = model.layers[0].mixer
    with FakeTensorMode() as mode:
        proj = mode.from_tensor(torch.empty(3, 7, mixer.in_proj.weight.shape[0], dtype=torch.bfloat16))
        params = [mode.from_tensor(p) for p in (mixer.conv_weight, mixer.conv_bias, mixer.dt_bias, mixer.A_log, mixer.D, mixer.norm.weight)]
        ssm = mode.from_tensor(mixer.make_state(3)[1])
        u, squares = ssd_prefill.mamba2_prefill_ssd(proj, *params, 0.0, float("inf"), mixer.n_groups, mixer.d_state, mixer.head_dim, ssm)
    assert (tuple(u.shape), u.dtype) == ((3, 7, mixer.d_inner), torch.bfloat16)
    blocks = ssd_prefill.output_v_blocks(mixer.head_dim)
    assert (tuple(squares.shape), squares.dtype) == ((3, 7, mixer.n_heads * blocks), torch.float32)


def test_triton_backend_on_cpu_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = Mamba2Model(tiny_spec(False))
    model.prefill_backend = "triton"
    model.setup_caches(1, 8)
    with pytest.raises(ValueError, match="prefill backend 'triton' needs CUDA tensors"):
        model.prefill(torch.zeros(1, 4, dtype=torch.long))


def test_kernel_launcher_refuses_misfit_shapes_before_any_launch():
    from phasewatt.models import ssd_prefill

    mixer = Mamba2Model(tiny_spec(False)).layers[0].mixer
    proj = torch.zeros(1, 5, mixer.in_proj.weight.shape[0] + 1)
    args = (mixer.conv_weight, mixer.conv_bias, mixer.dt_bias, mixer.A_log, mixer.D, mixer.norm.weight, (0.0, 1.0), mixer.n_groups, mixer.d_state, mixer.head_dim)
    with pytest.raises(ValueError, match="do not fit"):
        ssd_prefill.mamba2_prefill_kernels(proj, *args, mixer.make_state(1)[1])
    with pytest.raises(ValueError, match="ssm_state"):
        ssd_prefill.mamba2_prefill_kernels(proj[..., :-1], *args, torch.zeros(1, mixer.n_heads, mixer.d_state, mixer.head_dim, dtype=torch.float64))
    with pytest.raises(ValueError, match="needed contiguous float32"):  # the kernel writes it as packed rows
        ssd_prefill.mamba2_prefill_kernels(proj[..., :-1], *args, mixer.make_state(1)[1].transpose(-1, -2).contiguous().transpose(-1, -2))
