"""MLA against transformers' MiniCPM3ForCausalLM (half-split rope, embedding/residual/logit
scalings, tied) and DeepseekV2ForCausalLM (interleaved rope, dense layers, untied), same
weights through our loader: prefill logits, 16 absorbed decode steps, greedy tokens."""

import pytest
import torch

from _reference import assert_decode_steps_agree, assert_matches_recomputed_reference, greedy_against_recomputed_reference
from phasewatt.errors import ConfigError
from phasewatt.models.loader import CheckpointError, load_checkpoint, read_safetensors_dir
from phasewatt.models.mla import MLAModel
from phasewatt.models.spec import ModelSpec

transformers = pytest.importorskip("transformers")

SHAPES = dict(n_layers=2, d_model=64, n_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12, d_ff=80, vocab_size=96)
BATCH, PROMPT, STEPS = 2, 9, 16
ATOL = 1e-4

MINICPM3_SCALES = dict(scale_emb=12, scale_depth=1.4, dim_model_base=16)
REFERENCES = {
    # name: (config class, model class, tied, spec extras, config extras)
    "minicpm3": ("MiniCPM3Config", "MiniCPM3ForCausalLM", True, MINICPM3_SCALES, MINICPM3_SCALES),
    "deepseek_v2": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        False,
        {"rope_interleaved": True},
        # every layer dense (the MoE layers are not part of our MLA spec)
        dict(first_k_dense_replace=SHAPES["n_layers"], n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
    ),
}


def tiny_spec(tied: bool, extras: dict) -> ModelSpec:
    return ModelSpec.from_config("tiny-mla", dict(arch="mla", tied_embeddings=tied, norm_eps=1e-6, **SHAPES, **extras))


@pytest.fixture(scope="module", params=sorted(REFERENCES))
def reference(request, tmp_path_factory):
    config_name, model_name, tied, _, config_extras = REFERENCES[request.param]
    if not hasattr(transformers, model_name):
        pytest.skip(f"transformers {transformers.__version__} has no {model_name}")
    config = getattr(transformers, config_name)(
        vocab_size=SHAPES["vocab_size"], hidden_size=SHAPES["d_model"], intermediate_size=SHAPES["d_ff"],
        num_hidden_layers=SHAPES["n_layers"], num_attention_heads=SHAPES["n_heads"], num_key_value_heads=SHAPES["n_heads"],
        q_lora_rank=SHAPES["q_lora_rank"], kv_lora_rank=SHAPES["kv_lora_rank"], qk_nope_head_dim=SHAPES["qk_nope_head_dim"],
        qk_rope_head_dim=SHAPES["qk_rope_head_dim"], v_head_dim=SHAPES["v_head_dim"], rms_norm_eps=1e-6,
        tie_word_embeddings=tied, initializer_range=0.3, **config_extras,
    )
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).eval()
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, model, path


def ours_for(name: str, path, **extra_over) -> MLAModel:
    _, _, tied, extras, _ = REFERENCES[name]
    model = MLAModel(tiny_spec(tied, {**extras, **extra_over}))
    load_checkpoint(model, path)
    return model.eval()


def test_prefill_and_absorbed_decode_match_reference(reference):
    name, ref, path = reference
    prompt = torch.randint(0, SHAPES["vocab_size"], (BATCH, PROMPT), generator=torch.Generator().manual_seed(1))
    assert_matches_recomputed_reference(ours_for(name, path), ref, prompt, STEPS, ATOL)


def test_the_other_rope_layout_is_caught(reference):
    """MiniCPM3 rotates halves, DeepSeek-V2 adjacent pairs: swapping them must show."""
    name, ref, path = reference
    interleaved = REFERENCES[name][3].get("rope_interleaved", False)
    prompt = torch.randint(0, SHAPES["vocab_size"], (1, PROMPT), generator=torch.Generator().manual_seed(2))
    swapped = ours_for(name, path, rope_interleaved=not interleaved)
    prefill_diff, _, _, _ = greedy_against_recomputed_reference(swapped, ref, prompt, STEPS)
    assert prefill_diff > 1e-3


def test_cache_holds_only_the_latent_and_rope_key():
    model = MLAModel(tiny_spec(True, {}))
    model.setup_caches(3, 20)
    assert [tuple(t.shape for t in cache) for cache in model.caches] == [((3, 64, SHAPES["kv_lora_rank"] + SHAPES["qk_rope_head_dim"]),)] * SHAPES["n_layers"]


def test_regional_compile_traces_each_layer_as_one_graph(reference):
    name, _, path = reference
    eager, compiled = ours_for(name, path), ours_for(name, path)
    compiled.compile_decode(backend="aot_eager")
    prompt = torch.randint(0, SHAPES["vocab_size"], (BATCH, PROMPT), generator=torch.Generator().manual_seed(3))
    assert_decode_steps_agree(eager, compiled, prompt)


def test_minicpm3_scales_must_agree_with_a_stored_embed_scale(reference):
    name, _, path = reference
    tensors = read_safetensors_dir(path)
    tensors["model.embed_tokens.embed_scale"] = torch.tensor(7.0)
    with pytest.raises(CheckpointError, match="embed_scale is 7.0"):
        ours_for(name, path).load_hf_state_dict(tensors)


def test_bad_extra_keys_name_the_field():
    with pytest.raises(ConfigError, match="rope_interleaved"):
        MLAModel(tiny_spec(True, {"rope_interleaved": "yes"}))
    with pytest.raises(ConfigError, match="scale_emb"):
        MLAModel(tiny_spec(True, {"scale_emb": "big"}))


def test_both_decode_attentions_agree(reference):
    name, _, path = reference
    prompt = torch.randint(0, SHAPES["vocab_size"], (BATCH, PROMPT), generator=torch.Generator().manual_seed(4))
    logits = {}
    for kind in ("matmul", "sdpa", "fused"):
        model = ours_for(name, path)
        model.set_decode_attention(kind)
        with torch.no_grad():
            model.setup_caches(BATCH, PROMPT + 1)
            model.prefill(prompt)
            logits[kind] = model.decode(prompt[:, -1], torch.tensor([PROMPT]))
    torch.testing.assert_close(logits["sdpa"], logits["matmul"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits["fused"], logits["matmul"], atol=1e-5, rtol=1e-5)


def test_fused_decode_builds_no_mask(reference, monkeypatch):
    """The fused op masks by input_pos itself: a step that would build the mask kernels for it
    fails here (the torch forms still get theirs)."""
    from phasewatt.models import decoder

    name, _, path = reference
    built = []
    real = decoder.decode_mask
    monkeypatch.setattr(decoder, "decode_mask", lambda *a: built.append(1) or real(*a))
    prompt = torch.randint(0, SHAPES["vocab_size"], (BATCH, PROMPT), generator=torch.Generator().manual_seed(4))
    for kind, masks in (("fused", 0), ("matmul", 1)):
        built.clear()
        model = ours_for(name, path)
        model.set_decode_attention(kind)
        with torch.no_grad():
            model.setup_caches(BATCH, PROMPT + 1)
            model.prefill(prompt)
            model.decode(prompt[:, -1], torch.tensor([PROMPT]))
        assert len(built) == masks, kind
