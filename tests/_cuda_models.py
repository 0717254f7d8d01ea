"""The same float32 model on CPU and on CUDA, run through a prefill and a few decode steps:
what the GPU tests compare to check that a CUDA path (a kernel, a prefill backend) gives the
torch form's logits."""

import torch

from phasewatt.models.registry import build_model
from phasewatt.models.spec import ModelSpec

DECODE_STEPS = 3


def cpu_and_cuda_logits(spec: ModelSpec, tokens: torch.Tensor, prefill_backend: str | None = None) -> list[torch.Tensor]:
    """[CPU logits, CUDA logits] of two copies of one seeded float32 model: the prefill of
    tokens [2, S], then DECODE_STEPS decode steps of fixed tokens; each [1 + steps, 2, V] on
    CPU. prefill_backend: set on both models (recurrent ones), else their default (auto)."""
    models = [build_model(spec, device="cpu", dtype=torch.float32, seed=2).eval() for _ in range(2)]
    models[1].to("cuda")
    prompt_len = tokens.shape[1]
    logits = []
    for model in models:
        if prefill_backend is not None:
            model.prefill_backend = prefill_backend
        model.setup_caches(2, prompt_len + DECODE_STEPS + 8)
        device = model.device
        steps = [model.prefill(tokens.to(device))]
        for t in range(DECODE_STEPS):
            steps.append(model.decode(torch.tensor([11 + t, 90 - t], device=device), torch.tensor([prompt_len + t], device=device)))
        logits.append(torch.stack(steps).cpu())
    return logits
