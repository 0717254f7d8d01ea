"""Our Gated DeltaNet model against transformers' Qwen3NextForCausalLM (every layer linear
attention, dense MLPs) with the same weights, loaded from a saved checkpoint, on CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _reference import assert_matches_cached_reference, assert_prefill_needs_caches_for_its_batch, loaded
from phasewatt.errors import ConfigError
from phasewatt.models import recurrent
from phasewatt.models.loader import CheckpointError
from phasewatt.models.gdn import GatedDeltaNetModel
from phasewatt.models.registry import build_model
from phasewatt.models.spec import ModelSpec

transformers = pytest.importorskip("transformers")

PROMPT_LEN = 70  # two chunks of 64, the second one partial
DECODE_STEPS = 16
ATOL = 2e-4
NO_MASKS = {"full_attention": None, "linear_attention": None}


def tiny_spec(n_v_heads: int, tied: bool) -> ModelSpec:
    return ModelSpec(
        name="tiny-gdn", arch="gdn", n_layers=2, d_model=32, vocab_size=97, n_heads=2, head_dim=8,
        expand_v=2, conv_size=4, d_ff=48, tied_embeddings=tied, dtype="float32", norm_eps=1e-6,
        extra={"n_v_heads": n_v_heads},
    )


def reference_model(spec: ModelSpec):
    """A Qwen3NextForCausalLM of the spec's shapes, every weight perturbed away from its
    initial value (norms away from 0/1, decays spread) so that a convention mismatch shows."""
    config = transformers.Qwen3NextConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.d_model, intermediate_size=spec.d_ff,
        num_hidden_layers=spec.n_layers, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        linear_conv_kernel_dim=spec.conv_size, linear_key_head_dim=spec.head_dim,
        linear_value_head_dim=spec.head_dim * spec.expand_v, linear_num_key_heads=spec.n_heads,
        linear_num_value_heads=spec.extra["n_v_heads"], num_experts=0,
        layer_types=["linear_attention"] * spec.n_layers, rms_norm_eps=spec.norm_eps,
        tie_word_embeddings=spec.tied_embeddings, initializer_range=0.1,
    )
    torch.manual_seed(1)
    model = transformers.Qwen3NextForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn_like(param))
    return model


@pytest.mark.parametrize("n_v_heads,tied", [(2, False), (4, True)], ids=["heads-equal", "grouped-values-tied"])
def test_matches_qwen3next_reference(tmp_path, n_v_heads, tied):
    spec = tiny_spec(n_v_heads, tied)
    reference = reference_model(spec)
    reference.save_pretrained(tmp_path)
    ours = loaded(GatedDeltaNetModel(spec), tmp_path)
    prompt = torch.randint(0, spec.vocab_size, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(2))
    assert_matches_cached_reference(
        ours, reference, prompt, DECODE_STEPS, ATOL,
        call_kwargs=lambda position_ids: {"position_ids": position_ids, "attention_mask": NO_MASKS},
    )


def test_random_model_decode_continues_prefill():
    """Random weights from a seed (no checkpoint): the decode step after a prefill of S tokens
    gives the logits a prefill of S+1 tokens gives, and the seed fixes the weights."""
    spec = tiny_spec(4, False)
    model = build_model(spec, dtype=torch.float32, seed=3)
    again = build_model(spec, dtype=torch.float32, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert not torch.equal(model.layers[0].mixer.A_log, model.layers[1].mixer.A_log)
    tokens = torch.randint(0, spec.vocab_size, (3, 9), generator=torch.Generator().manual_seed(4))
    model.setup_caches(3, 16)
    whole = model.prefill(tokens)
    model.prefill(tokens[:, :-1])
    stepped = model.decode(tokens[:, -1], torch.tensor([8]))
    assert torch.isfinite(whole).all()
    torch.testing.assert_close(stepped, whole, atol=1e-4, rtol=0)


def test_prefill_resets_states():
    spec = tiny_spec(2, True)
    model = GatedDeltaNetModel(spec)
    tokens = torch.randint(0, spec.vocab_size, (1, 5), generator=torch.Generator().manual_seed(5))
    model.setup_caches(1, 8)
    first = model.prefill(tokens)
    model.decode(tokens[:, 0], torch.tensor([5]))
    torch.testing.assert_close(model.prefill(tokens), first, atol=0, rtol=0)


def test_loader_reports_missing_misshapen_and_unknown_tensors(tmp_path):
    spec = tiny_spec(2, False)
    reference_model(spec).save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    name = "model.layers.1.linear_attn.A_log"

    missing = {k: v for k, v in state.items() if k != name}
    with pytest.raises(CheckpointError, match=f"tensor {name} is missing"):
        GatedDeltaNetModel(spec).load_hf_state_dict(missing)

    for bad in (name, "model.layers.0.linear_attn.in_proj_qkvz.weight"):
        misshapen = dict(state, **{bad: torch.zeros(3)})
        with pytest.raises(CheckpointError, match=rf"{bad} has shape \(3,\), the model spec needs"):
            GatedDeltaNetModel(spec).load_hf_state_dict(misshapen)

    hybrid = dict(state, **{"model.layers.0.self_attn.q_proj.weight": torch.zeros(4, 32)})
    with pytest.raises(CheckpointError, match="no place for: model.layers.0.self_attn.q_proj.weight"):
        GatedDeltaNetModel(spec).load_hf_state_dict(hybrid)

    with_mtp = dict(state, **{"mtp.fc.weight": torch.zeros(4, 32)})
    GatedDeltaNetModel(spec).load_hf_state_dict(with_mtp)


def test_prefill_in_row_groups_equals_whole_batch(monkeypatch):
    """Prompts longer than the prefill token budget go through a few rows at a time; logits
    and the states they leave are those of one pass."""
    model = build_model(tiny_spec(4, False), dtype=torch.float32, seed=6)
    tokens = torch.randint(0, 97, (5, 12), generator=torch.Generator().manual_seed(7))
    model.setup_caches(5, 12)
    whole = model.prefill(tokens, all_logits=True)
    whole_states = [t.clone() for state in model.states for t in state]
    monkeypatch.setattr(recurrent, "PREFILL_CHUNK_TOKENS", 24)  # two rows at a time
    model.setup_caches(5, 12)
    grouped = model.prefill(tokens, all_logits=True)
    torch.testing.assert_close(grouped, whole, atol=1e-6, rtol=0)
    for a, b in zip((t for state in model.states for t in state), whole_states):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_bad_value_heads_and_batch_are_refused():
    with pytest.raises(ConfigError, match="models.tiny-gdn.n_v_heads: 3; allowed: a positive multiple of n_heads=2"):
        GatedDeltaNetModel(tiny_spec(3, False))
    model = GatedDeltaNetModel(tiny_spec(2, False))
    assert_prefill_needs_caches_for_its_batch(model, 1, "states hold batch 2; asked for batch 1")
    with pytest.raises(ValueError, match="prefill_backend 'cuda'"):
        model.prefill_backend = "cuda"
    with pytest.raises(ValueError, match="prefill_backend 'triton'; allowed: auto, torch, fla$"):
        model.prefill_backend = "triton"  # Mamba2's own kernels


def test_in_proj_rows_are_padded_to_16_byte_rows_that_nothing_reads(tmp_path):
    """config.yaml's gdn has 13842 projection rows: padded to 13848 (a bf16 row of its output
    then starts 16-byte aligned, which cuBLAS's Hopper GEMMs need); the pad rows are zero after
    init and after a checkpoint load, and what they hold changes no output."""
    import yaml

    from phasewatt.models.gdn import IN_PROJ_ROW_MULTIPLE

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "config.yaml").read_text())
    real = ModelSpec.from_config("gdn", config["models"]["gdn"])
    meta = GatedDeltaNetModel(real, device="meta")
    assert meta.layers[0].mixer.in_proj_rows == 13842 and meta.layers[0].mixer.in_proj.out_features == 13848

    spec = tiny_spec(2, False)  # 100 rows: 4 of pad
    reference = reference_model(spec)
    reference.save_pretrained(tmp_path)
    ours = loaded(GatedDeltaNetModel(spec), tmp_path)
    mixer = ours.layers[0].mixer
    assert mixer.in_proj_pad == 4 and mixer.in_proj.out_features % IN_PROJ_ROW_MULTIPLE == 0
    assert torch.all(mixer.in_proj.weight[mixer.in_proj_rows :] == 0)
    assert torch.all(GatedDeltaNetModel(spec).layers[1].mixer.in_proj.weight[mixer.in_proj_rows :] == 0)
    prompt = torch.randint(0, spec.vocab_size, (1, 20), generator=torch.Generator().manual_seed(4))

    def prefill_and_decode():
        ours.setup_caches(1, 24)
        logits = [ours.prefill(prompt)]
        for t in range(2):
            logits.append(ours.decode(torch.tensor([3 + t]), torch.tensor([20 + t])))
        return logits

    expected = prefill_and_decode()
    with torch.no_grad():
        for layer in ours.layers:
            layer.mixer.in_proj.weight[layer.mixer.in_proj_rows :].normal_()
    assert all(torch.equal(a, b) for a, b in zip(prefill_and_decode(), expected))


def test_alignment_benchmark_times_the_unpadded_and_padded_in_proj(tmp_path):
    """benchmarks/gemm_alignment.py: its default shapes are config.yaml's gdn in_proj (rows as
    read, then padded; K = d_model); its smoke run writes one row per (mode, tokens, n), each
    width's time over the last width's at the same mode and tokens (the last at 1)."""
    import csv
    import sys

    import yaml

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import gemm_alignment

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "config.yaml").read_text())
    mixer = GatedDeltaNetModel(ModelSpec.from_config("gdn", config["models"]["gdn"]), device="meta").layers[0].mixer
    defaults = gemm_alignment.parse_args(["--out", str(tmp_path)])
    assert defaults.n_list == [mixer.in_proj_rows, mixer.in_proj.out_features] and defaults.k == config["models"]["gdn"]["d_model"]
    assert gemm_alignment.main(["--smoke", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "gemm_alignment.csv").open()))
    shapes = [("4", "30"), ("4", "32"), ("16", "30"), ("16", "32")]
    assert [(r["mode"], r["tokens"], r["n"]) for r in rows] == [(mode, *shape) for mode in ("eager", "compiled") for shape in shapes]
    assert [float(r["vs_last_n"]) for r in rows][1::2] == [1.0] * 4 and all(float(r["ms"]) > 0 for r in rows)
    with pytest.raises(SystemExit):
        gemm_alignment.parse_args(["--out", str(tmp_path), "--n", "13842,x"])
