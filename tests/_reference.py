"""Comparing one of our models with a transformers reference of the same weights: prefill
logits at every prompt position, the logits of greedy decode steps and the greedy tokens.
Shared by the per-architecture model tests."""

from __future__ import annotations

from typing import Callable

import pytest
import torch

from phasewatt.models.loader import load_checkpoint


def loaded(model, path):
    """`model` with the checkpoint in directory `path` copied in."""
    load_checkpoint(model, path)
    return model


def our_greedy_run(model, prompt: torch.Tensor, steps: int):
    """Prefill logits [B, S, V], `steps` decode steps' logits [B, steps, V] and the greedy
    tokens fed to them [B, steps] (the first one from the prefill)."""
    model.setup_caches(prompt.shape[0], prompt.shape[1] + steps)
    prefill_logits = model.prefill(prompt, all_logits=True)
    token = prefill_logits[:, -1].argmax(-1)
    step_logits, tokens = [], []
    for i in range(steps):
        tokens.append(token)
        logits = model.decode(token, torch.tensor([prompt.shape[1] + i]))
        step_logits.append(logits)
        token = logits.argmax(-1)
    return prefill_logits, torch.stack(step_logits, 1), torch.stack(tokens, 1)


def reference_cached_run(reference, prompt: torch.Tensor, steps: int, call_kwargs: Callable[[torch.Tensor], dict] | None = None):
    """our_greedy_run on a transformers model, decoding through its own cache.
    call_kwargs(position_ids [1, n]) gives further arguments of each call."""
    call_kwargs = call_kwargs or (lambda position_ids: {})
    length = prompt.shape[1]
    with torch.no_grad():
        out = reference(prompt, use_cache=True, **call_kwargs(torch.arange(length)[None]))
        prefill_logits, cache = out.logits, out.cache
        token = prefill_logits[:, -1].argmax(-1)
        step_logits, tokens = [], []
        for i in range(steps):
            tokens.append(token)
            out = reference(token[:, None], cache=cache, use_cache=True, **call_kwargs(torch.tensor([[length + i]])))
            cache = out.cache
            step_logits.append(out.logits[:, 0])
            token = out.logits[:, 0].argmax(-1)
    return prefill_logits, torch.stack(step_logits, 1), torch.stack(tokens, 1)


def assert_matches_cached_reference(ours, reference, prompt: torch.Tensor, steps: int, atol: float, call_kwargs=None) -> None:
    """Both decode through their own state: logits within atol everywhere, the same tokens,
    and reference logits spread enough for the comparison to mean something."""
    ref_prefill, ref_steps, ref_tokens = reference_cached_run(reference, prompt, steps, call_kwargs)
    our_prefill, our_steps, our_tokens = our_greedy_run(ours, prompt, steps)
    assert ref_prefill.std() > 0.3, "reference logits too flat for the comparison to mean anything"
    torch.testing.assert_close(our_prefill, ref_prefill, atol=atol, rtol=0)
    torch.testing.assert_close(our_steps, ref_steps, atol=atol, rtol=0)
    assert torch.equal(our_tokens, ref_tokens)


def greedy_against_recomputed_reference(ours, reference, prompt: torch.Tensor, steps: int):
    """Prefill then `steps` greedy decode steps on ours; the reference recomputes the whole
    sequence each step. Returns (prefill max |diff|, decode max |diff|, our tokens, theirs)."""
    with torch.no_grad():
        ours.setup_caches(prompt.shape[0], prompt.shape[1] + steps)
        logits = ours.prefill(prompt, all_logits=True)
        prefill_diff = (logits - reference(prompt).logits).abs().max().item()
        seq, ours_next, decode_diff, ours_tokens, ref_tokens = prompt, logits[:, -1].argmax(-1), 0.0, [], []
        for step in range(steps):
            seq = torch.cat([seq, ours_next[:, None]], dim=1)
            step_logits = ours.decode(ours_next, torch.tensor([prompt.shape[1] + step]))
            ref_logits = reference(seq).logits[:, -1]
            decode_diff = max(decode_diff, (step_logits - ref_logits).abs().max().item())
            ours_next = step_logits.argmax(-1)
            ours_tokens.append(ours_next)
            ref_tokens.append(ref_logits.argmax(-1))
    return prefill_diff, decode_diff, torch.stack(ours_tokens, 1), torch.stack(ref_tokens, 1)


def assert_matches_recomputed_reference(ours, reference, prompt: torch.Tensor, steps: int, atol: float) -> None:
    """Logits within atol, the same greedy tokens, and more than one distinct token (a
    degenerate model would prove nothing)."""
    prefill_diff, decode_diff, ours_tokens, ref_tokens = greedy_against_recomputed_reference(ours, reference, prompt, steps)
    assert prefill_diff < atol
    assert decode_diff < atol
    assert torch.equal(ours_tokens, ref_tokens)
    assert len(set(ours_tokens.flatten().tolist())) > 1


def assert_prefill_needs_caches_for_its_batch(model, wrong_batch: int, match: str) -> None:
    """Prefill before setup_caches, and prefill of a batch the caches (2 x 8) do not hold,
    are refused."""
    with pytest.raises(RuntimeError, match="setup_caches"):
        model.prefill(torch.zeros(2, 4, dtype=torch.long))
    model.setup_caches(2, 8)
    with pytest.raises(ValueError, match=match):
        model.prefill(torch.zeros(wrong_batch, 4, dtype=torch.long))


def assert_decode_steps_agree(eager, compiled, prompt: torch.Tensor, steps: int = 2) -> None:
    """After the same prefill, `steps` greedy decode steps of two copies of one model give the
    same logits (to 1e-5), e.g. eager against compile_decode."""
    batch, length = prompt.shape
    with torch.no_grad():
        for model in (eager, compiled):
            model.setup_caches(batch, length + steps)
            model.prefill(prompt)
        tokens = prompt[:, -1]
        for step in range(steps):
            pos = torch.tensor([length + step])
            expected, got = eager.decode(tokens, pos), compiled.decode(tokens, pos)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            tokens = expected.argmax(-1)
