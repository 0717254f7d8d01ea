"""On a CUDA machine with fla-core: check the linear-attention models' GPU paths against the
pure-torch reference and time them. Writes $OUT/check_linear_gpu.json (and prints it).

For Gated DeltaNet and Mamba2, at small configs with the real head shapes, in float32 and
bfloat16:
- prefill: fla's Triton kernels vs the torch chunked path (max abs diff of all logits and of
  the final recurrent states, share of equal argmax), and their times;
- decode: the step after a prefill of S tokens vs a prefill of S+1 tokens; a CUDA graph of the
  decode step vs eager (16 greedy steps, logits must agree), eager and graph step times; in
  bf16 also the torch.compile'd step (compile_decode) captured in a graph.
With --full it also times the config.yaml shapes (bf16, fla prefill, compiled graph decode)
and reports the decode step's achieved bandwidth against the spec's HBM bytes.
Mamba2's prefill on CUDA defaults to its own kernels (backend 'triton', models/ssd_prefill.py),
which tests/test_ssd_prefill_gpu.py and benchmarks/ssd_prefill_bench.py check; this script
checks and times the 'fla' paths.

    PYTHONPATH=src python3 benchmarks/check_linear_gpu.py [--full]

It never touches power limits or clocks.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from phasewatt.io import write_json
from phasewatt.models.registry import build_model
from phasewatt.models.spec import ModelSpec

SMALL_SPECS = {
    "gdn": ModelSpec(
        name="gdn-small", arch="gdn", n_layers=4, d_model=1024, vocab_size=32000, n_heads=4,
        head_dim=256, expand_v=2, conv_size=4, d_ff=2816,
    ),
    "mamba2": ModelSpec(
        name="mamba2-small", arch="mamba2", n_layers=4, d_model=1024, vocab_size=32000, d_state=128,
        head_dim=64, expand=2, n_groups=1, conv_size=4, chunk_size=256, tied_embeddings=True,
    ),
}
BATCH, PROMPT_LEN, DECODE_STEPS = 4, 1000, 16  # 1000: a multiple of neither 64 nor 256


def cuda_ms(fn, warmup: int, iters: int) -> float:
    """Median milliseconds of fn() over iters timed calls after warmup calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def states(model) -> list[torch.Tensor]:
    """Copies of every layer's (conv window, recurrent state), alternating."""
    return [t.clone() for state in model.states for t in state]


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def capture_decode(model, tokens: torch.Tensor, pos: torch.Tensor):
    """A CUDA graph of one decode step reading `tokens`/`pos` and writing the returned logits.
    The warm-up runs mutate the states; the caller re-runs prefill before replaying."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            model.decode(tokens, pos)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = model.decode(tokens, pos)
    return graph, logits


def greedy_eager(model, first: torch.Tensor, start: int) -> torch.Tensor:
    token, out = first, []
    for i in range(DECODE_STEPS):
        logits = model.decode(token, torch.tensor([start + i], device=token.device))
        out.append(logits.float())
        token = logits.argmax(-1)
    return torch.stack(out, 1)


def greedy_graph(model, graph, static_tokens, static_logits, first: torch.Tensor) -> torch.Tensor:
    static_tokens.copy_(first)
    out = []
    for _ in range(DECODE_STEPS):
        graph.replay()
        out.append(static_logits.float().clone())
        static_tokens.copy_(static_logits.argmax(-1))
    return torch.stack(out, 1)


def check_small(arch: str, dtype: torch.dtype) -> dict:
    spec = SMALL_SPECS[arch]
    model = build_model(spec, device="cuda", dtype=dtype, seed=0)
    prompt = torch.randint(0, spec.vocab_size, (BATCH, PROMPT_LEN + 1), device="cuda")
    head = prompt[:, :PROMPT_LEN]
    model.setup_caches(BATCH, PROMPT_LEN + DECODE_STEPS + 1)
    result = {"arch": arch, "dtype": str(dtype).removeprefix("torch."), "batch": BATCH, "prompt_len": PROMPT_LEN}

    model.prefill_backend = "torch"
    torch_logits = model.prefill(head, all_logits=True).float()
    torch_states = states(model)
    model.prefill_backend = "fla"
    fla_logits = model.prefill(head, all_logits=True).float()
    fla_states = states(model)
    result["prefill_logits_max_abs_diff"] = max_diff(fla_logits, torch_logits)
    result["prefill_logits_abs_max"] = torch_logits.abs().max().item()
    result["prefill_argmax_agreement"] = (fla_logits.argmax(-1) == torch_logits.argmax(-1)).float().mean().item()
    result["conv_state_max_abs_diff"] = max(max_diff(a, b) for a, b in zip(fla_states[0::2], torch_states[0::2]))
    result["ssm_state_max_abs_diff"] = max(max_diff(a, b) for a, b in zip(fla_states[1::2], torch_states[1::2]))
    result["ssm_state_abs_max"] = max(t.abs().max().item() for t in torch_states[1::2])

    for backend in ("torch", "fla"):
        model.prefill_backend = backend
        result[f"prefill_ms_{backend}"] = cuda_ms(lambda: model.prefill(head), warmup=2, iters=5)

    model.prefill_backend = "fla"
    whole = model.prefill(prompt).float()
    model.prefill(head)
    stepped = model.decode(prompt[:, -1], torch.tensor([PROMPT_LEN], device="cuda")).float()
    result["decode_vs_longer_prefill_max_abs_diff"] = max_diff(stepped, whole)

    first = model.prefill(head).argmax(-1)
    eager = greedy_eager(model, first, PROMPT_LEN)
    static_tokens = first.clone()
    static_pos = torch.tensor([PROMPT_LEN], device="cuda")
    graph, static_logits = capture_decode(model, static_tokens, static_pos)
    model.prefill(head)
    replayed = greedy_graph(model, graph, static_tokens, static_logits, first)
    result["graph_vs_eager_decode_max_abs_diff"] = max_diff(replayed, eager)
    result["graph_vs_eager_greedy_tokens_equal"] = bool(torch.equal(replayed.argmax(-1), eager.argmax(-1)))
    result["decode_step_ms_eager"] = cuda_ms(lambda: model.decode(static_tokens, static_pos), warmup=3, iters=20)
    result["decode_step_ms_graph"] = cuda_ms(graph.replay, warmup=3, iters=50)
    del graph

    if dtype == torch.bfloat16:
        started = time.perf_counter()
        model.compile_decode()
        model.prefill(head)
        compiled_graph, compiled_logits = capture_decode(model, static_tokens, static_pos)
        result["compile_and_capture_s"] = time.perf_counter() - started
        model.prefill(head)
        compiled = greedy_graph(model, compiled_graph, static_tokens, compiled_logits, first)
        result["compiled_graph_vs_eager_decode_max_abs_diff"] = max_diff(compiled, eager)
        result["compiled_graph_vs_eager_greedy_tokens_equal"] = bool(torch.equal(compiled.argmax(-1), eager.argmax(-1)))
        result["decode_step_ms_compiled_graph"] = cuda_ms(compiled_graph.replay, warmup=3, iters=50)
    return result


def time_full(name: str, spec: ModelSpec) -> dict:
    """The config.yaml shapes in bf16: fla prefill, and a CUDA graph of the compiled decode
    step per batch, its bandwidth against the spec's HBM bytes of one step."""
    model = build_model(spec, device="cuda", dtype=torch.bfloat16, seed=0)
    model.compile_decode()
    out = {"model": name, "arch": spec.arch, "dtype": "bfloat16", "param_count": spec.param_count(), "runs": []}
    for batch, prompt_len in ((1, 2048), (32, 512)):
        model.setup_caches(batch, prompt_len + 1)
        tokens = torch.randint(0, spec.vocab_size, (batch, prompt_len), device="cuda")
        prefill_ms = cuda_ms(lambda: model.prefill(tokens), warmup=2, iters=3)
        static_tokens = model.prefill(tokens).argmax(-1)
        graph, _ = capture_decode(model, static_tokens, torch.tensor([prompt_len], device="cuda"))
        step_ms = cuda_ms(graph.replay, warmup=5, iters=50)
        hbm = spec.decode_step_cost(batch, prompt_len).hbm_bytes
        out["runs"].append({
            "batch": batch, "prompt_len": prompt_len, "prefill_ms": prefill_ms,
            "decode_step_ms_compiled_graph": step_ms, "decode_spec_hbm_gb": hbm / 1e9,
            "decode_achieved_tb_s": hbm / (step_ms * 1e-3) / 1e12,
        })
        del graph
        torch.cuda.empty_cache()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="also time the config.yaml gdn and mamba2 shapes")
    parser.add_argument("--config", default="config.yaml")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("check_linear_gpu: needs a CUDA device", file=sys.stderr)
        return 2
    import fla

    out_dir = Path(os.environ.get("OUT", "."))
    report = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "fla": getattr(fla, "__version__", "unknown"), "checks": [], "errors": [], "full": [],
    }
    for arch in ("gdn", "mamba2"):
        for dtype in (torch.float32, torch.bfloat16):
            started = time.perf_counter()
            try:
                entry = check_small(arch, dtype)
                entry["wall_s"] = time.perf_counter() - started
                report["checks"].append(entry)
            except Exception:
                report["errors"].append({"arch": arch, "dtype": str(dtype), "traceback": traceback.format_exc()})
            torch.cuda.empty_cache()
            write_json(out_dir / "check_linear_gpu.json", report)
    if args.full:
        from phasewatt.config import load_config, model_spec

        config = load_config(args.config)
        for name in ("gdn", "mamba2"):
            try:
                report["full"].append(time_full(name, model_spec(config, name)))
            except Exception:
                report["errors"].append({"model": name, "traceback": traceback.format_exc()})
            torch.cuda.empty_cache()
            write_json(out_dir / "check_linear_gpu.json", report)
    write_json(out_dir / "check_linear_gpu.json", report)
    print((out_dir / "check_linear_gpu.json").read_text())
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
