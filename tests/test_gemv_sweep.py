"""benchmarks/gemv_sweep.py on CPU: which products it tunes, and how it writes the table."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gemv_sweep  # noqa: E402  (a script in benchmarks/, importable once that is on the path)


def test_tuned_products_are_the_engines_variants():
    """Traced as the engine runs batch 1 (norm weights folded): rms prologues, the MLP's
    rms_glu, plain products; the tied head keeps its norm weight; no SwiGLU prologue."""
    specs = gemv_sweep.select_model_specs(
        {"m": dict(arch="gqa", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=96, vocab_size=128, tied_embeddings=True)},
        None, "test",
    )
    products = gemv_sweep.decode_products(specs)
    assert products == {
        ("rms", 128, 64): {"m": 2},       # qkv: (4 + 2 * 2) * 16 rows
        ("plain", 64, 64): {"m": 2},      # o
        ("rms_glu", 192, 64): {"m": 2},   # gate_up
        ("plain", 64, 96): {"m": 2},      # down
        ("norm", 128, 64): {"m": 1},      # the tied head
    }


def test_a_new_table_keeps_the_entries_it_did_not_tune(tmp_path):
    path = tmp_path / "GPU.json"
    path.write_text(json.dumps({"device": "old", "configs": {"1,8,8": {"BLOCK_N": 1}, "rms:1,4,4": {"BLOCK_N": 2}}}))
    merged = gemv_sweep.merged_table(path, {"device": "new", "configs": {"rms:1,4,4": {"BLOCK_N": 4}}})
    assert merged == {"device": "new", "configs": {"1,8,8": {"BLOCK_N": 1}, "rms:1,4,4": {"BLOCK_N": 4}}}
    assert gemv_sweep.merged_table(tmp_path / "none.json", {"configs": {}}) == {"configs": {}}
