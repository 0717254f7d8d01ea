"""GQA against transformers' Qwen3ForCausalLM and LlamaForCausalLM with the same weights,
loaded through our checkpoint loader: prefill logits at every position, 16 decode steps'
logits and the greedy tokens. Tiny float32 configs on CPU."""

import json

import pytest
import torch

from _reference import (
    assert_decode_steps_agree,
    assert_matches_recomputed_reference,
    assert_prefill_needs_caches_for_its_batch,
    greedy_against_recomputed_reference,
)
from phasewatt.errors import ConfigError
from phasewatt.models.gqa import GQAModel
from phasewatt.models.loader import CheckpointError, load_checkpoint
from phasewatt.models.spec import ModelSpec

transformers = pytest.importorskip("transformers")

VOCAB, D, LAYERS, HEADS, KV_HEADS, HEAD_DIM, FF = 96, 64, 2, 4, 2, 16, 80
BATCH, PROMPT, STEPS = 2, 9, 16
ATOL = 1e-4

REFERENCES = {
    # name: (config class, model class, qk_norm, tied, rope_theta)
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", True, True, 1e6),
    "llama": ("LlamaConfig", "LlamaForCausalLM", False, False, 5e5),
}


def tiny_spec(qk_norm: bool, tied: bool, rope_theta: float, **over) -> ModelSpec:
    entry = dict(
        arch="gqa", n_layers=LAYERS, d_model=D, n_heads=HEADS, n_kv_heads=KV_HEADS, head_dim=HEAD_DIM,
        d_ff=FF, vocab_size=VOCAB, tied_embeddings=tied, qk_norm=qk_norm, rope_theta=rope_theta, norm_eps=1e-6,
    )
    entry.update(over)
    return ModelSpec.from_config("tiny-gqa", entry)


@pytest.fixture(scope="module", params=sorted(REFERENCES))
def reference(request, tmp_path_factory):
    """(name, HF model, its checkpoint directory)."""
    config_name, model_name, _, tied, theta = REFERENCES[request.param]
    config = getattr(transformers, config_name)(
        vocab_size=VOCAB, hidden_size=D, intermediate_size=FF, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
        tie_word_embeddings=tied, rope_theta=theta, rms_norm_eps=1e-6,
        initializer_range=0.3,  # large weights: peaked attention, so position errors show
    )
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).eval()
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, model, path


def ours_for(name: str, path) -> GQAModel:
    _, _, qk_norm, tied, theta = REFERENCES[name]
    model = GQAModel(tiny_spec(qk_norm, tied, theta))
    load_checkpoint(model, path)
    return model.eval()


def test_prefill_and_decode_match_reference(reference):
    name, ref, path = reference
    prompt = torch.randint(0, VOCAB, (BATCH, PROMPT), generator=torch.Generator().manual_seed(1))
    assert_matches_recomputed_reference(ours_for(name, path), ref, prompt, STEPS, ATOL)


def test_wrong_rope_theta_is_caught(reference):
    """The comparison is sensitive: a different rope base changes the logits."""
    name, ref, path = reference
    _, _, qk_norm, tied, theta = REFERENCES[name]
    model = GQAModel(tiny_spec(qk_norm, tied, theta * 0.01))
    load_checkpoint(model, path)
    prompt = torch.randint(0, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(2))
    prefill_diff, _, _, _ = greedy_against_recomputed_reference(model, ref, prompt, STEPS)
    assert prefill_diff > 1e-3


@pytest.mark.parametrize("attention", ["sdpa", "fused"])
def test_regional_compile_traces_each_layer_as_one_graph(reference, attention):
    """compile_decode with a CPU-only backend: every layer and the head trace without graph
    breaks (fullgraph), the cache update (in place, or the fused op's mutation) survives
    functionalization, logits are unchanged."""
    name, _, path = reference
    eager, compiled = ours_for(name, path), ours_for(name, path)
    compiled.set_decode_attention(attention)
    compiled.compile_decode(backend="aot_eager")
    prompt = torch.randint(0, VOCAB, (BATCH, PROMPT), generator=torch.Generator().manual_seed(3))
    assert_decode_steps_agree(eager, compiled, prompt)


def test_sharded_checkpoint_loads(reference, tmp_path):
    name, ref, _ = reference
    ref.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    model = ours_for(name, tmp_path)
    torch.testing.assert_close(model.embed.weight, ref.model.embed_tokens.weight)


def test_cache_is_kv_heads_only():
    model = GQAModel(tiny_spec(True, True, 1e6))
    model.setup_caches(3, 70)
    assert model.cache_len == 128  # rounded up to the alignment multiple
    for k, v in model.caches:
        assert k.shape == v.shape == (3, KV_HEADS, 128, HEAD_DIM)


def test_batch_or_length_beyond_the_caches_is_refused():
    model = GQAModel(tiny_spec(False, False, 1e4))
    assert_prefill_needs_caches_for_its_batch(model, 3, "batch 2")
    with pytest.raises(ValueError, match="x 9"):
        model.prefill(torch.zeros(2, 9, dtype=torch.long))


def test_kv_heads_must_divide_heads():
    with pytest.raises(ConfigError, match="n_kv_heads"):
        GQAModel(tiny_spec(False, False, 1e4, n_kv_heads=3))


def test_loader_errors_name_the_problem(reference, tmp_path):
    name, _, path = reference
    with pytest.raises(CheckpointError, match="not a directory"):
        load_checkpoint(ours_for(name, path), tmp_path / "absent")
    with pytest.raises(CheckpointError, match="neither model.safetensors"):
        load_checkpoint(ours_for(name, path), tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "shard-1.safetensors"}}))
    with pytest.raises(CheckpointError, match="shard-1.safetensors .* is missing"):
        load_checkpoint(ours_for(name, path), tmp_path)

    _, _, qk_norm, tied, theta = REFERENCES[name]
    wrong_ff = GQAModel(tiny_spec(qk_norm, tied, theta, d_ff=FF + 8))
    with pytest.raises(CheckpointError, match=r"gate_proj.weight\+.*up_proj.weight has shape"):
        load_checkpoint(wrong_ff, path)
    from phasewatt.models.loader import read_safetensors_dir

    tensors = read_safetensors_dir(path)
    missing = dict(tensors)
    missing.pop("model.layers.1.self_attn.o_proj.weight")
    with pytest.raises(CheckpointError, match="model.layers.1.self_attn.o_proj.weight is missing"):
        ours_for(name, path).load_hf_state_dict(missing)
    extra = dict(tensors, **{"model.layers.0.self_attn.q_proj.bias": torch.zeros(HEADS * HEAD_DIM)})
    with pytest.raises(CheckpointError, match="no place for: model.layers.0.self_attn.q_proj.bias"):
        ours_for(name, path).load_hf_state_dict(extra)


def test_every_decode_attention_agrees(reference):
    """sdpa, matmul and fused (its CPU form: the op's torch maths) give the same logits."""
    name, _, path = reference
    prompt = torch.randint(0, VOCAB, (BATCH, PROMPT), generator=torch.Generator().manual_seed(4))
    logits = {}
    assert GQAModel.decode_attentions == ("sdpa", "matmul", "fused")
    for kind in GQAModel.decode_attentions:
        model = ours_for(name, path)
        model.set_decode_attention(kind)
        assert model.decode_attention == kind
        with torch.no_grad():
            model.setup_caches(BATCH, PROMPT + 1)
            model.prefill(prompt)
            logits[kind] = model.decode(prompt[:, -1], torch.tensor([PROMPT]))
    torch.testing.assert_close(logits["matmul"], logits["sdpa"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits["fused"], logits["matmul"], atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="decode_attention: 'flash'; allowed for gqa: sdpa, matmul, fused"):
        model.set_decode_attention("flash")
