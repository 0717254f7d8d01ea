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


def test_the_copy_that_comes_back_holds_the_whole_table(tmp_path, monkeypatch):
    """The table written to --out (what a GPU machine sends back to be committed) is the same
    merged table as the one the engine reads, not only the shapes this run tuned."""
    package, out = tmp_path / "package", tmp_path / "out"
    package.mkdir()
    out.mkdir()
    monkeypatch.setattr(gemv_sweep.gemv, "CONFIG_DIR", package)
    monkeypatch.setattr(gemv_sweep, "_triton_version", lambda: "test")  # no triton on CPU
    existing = {"device": "old", "configs": {"1,8,8": {"BLOCK_N": 1}, "rms:1,4,4": {"BLOCK_N": 2}}}
    (package / "GPU.json").write_text(json.dumps(existing))
    args = gemv_sweep.parse_args(["--out", str(out)])
    gemv_sweep._write_tables(args, out, "GPU", 3e12, {"rms:1,4,4": {"BLOCK_N": 4}})
    for path in (package / "GPU.json", out / "GPU.json"):
        assert json.loads(path.read_text())["configs"] == {"1,8,8": {"BLOCK_N": 1}, "rms:1,4,4": {"BLOCK_N": 4}}, path


# Tables swept for every product of config.yaml's models. The H100's holds the shapes tuned on
# the H100 calls so far (10 of the 24 run on the size rule: RESULTS.md, round 5).
COMPLETE_TABLES = ("NVIDIA_H200", "NVIDIA_H100_80GB_HBM3")  # the H100's since round 7


def test_committed_tables_tune_every_product_of_the_configured_models():
    """The complete tables hold an entry for every batch-1 product shape of the models of
    config.yaml (the plain product's entry serves a variant the table lacks): a table cut down
    by accident would send those products to the size rule, some points of bandwidth lower."""
    import yaml

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "config.yaml").read_text())
    specs = gemv_sweep.select_model_specs(config["models"], None, "config.yaml")
    products = gemv_sweep.decode_products(specs)
    for name in COMPLETE_TABLES:
        table = json.loads((gemv_sweep.gemv.CONFIG_DIR / f"{name}.json").read_text())["configs"]
        missing = [
            (variant, n, k) for variant, n, k in products
            if gemv_sweep.gemv.config_key(1, n, k, variant) not in table and gemv_sweep.gemv.config_key(1, n, k) not in table
        ]
        assert not missing, (name, missing)


def test_candidates_include_whole_rows_for_rows_up_to_4096():
    """Tiles of 256-1024 columns for every K; for 1024 < K <= 4096 at one row also tiles of a
    whole (power-of-two padded) row, one K step; never a register tile past 16384 elements."""
    for k in (768, 2560, 4096, 6400):
        configs = gemv_sweep.candidate_configs(1, k)
        k_cap = 1 << (k - 1).bit_length()
        whole = [c for c in configs if c["BLOCK_K"] > 1024]
        assert bool(whole) is (1024 < k <= 4096)
        assert all(c["BLOCK_K"] == k_cap and c["num_stages"] == 1 for c in whole)
        assert all(c["BLOCK_N"] * c["BLOCK_K"] <= 16384 for c in configs)
        assert {c["BLOCK_K"] for c in configs if c["BLOCK_K"] <= 1024} == {b for b in (256, 512, 1024) if b <= max(k_cap, 128)}
    assert not [c for c in gemv_sweep.candidate_configs(4, 2560) if c["BLOCK_K"] > 1024]

