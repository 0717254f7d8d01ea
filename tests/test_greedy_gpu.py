"""The greedy kernels (models/greedy.py) against torch.argmax (needs CUDA and Triton; skipped in
CI). PHASEWATT_KERNEL_DEVICE=cpu with TRITON_INTERPRET=1 runs them through Triton's interpreter:
  TRITON_INTERPRET=1 PHASEWATT_KERNEL_DEVICE=cpu PYTHONPATH=src python -m pytest tests/test_greedy_gpu.py
"""

import pytest
import torch

from _kernel_device import DEVICE, INTERPRETED, require_kernel_device
from phasewatt.models import greedy

require_kernel_device()


def logits_with_ties(batch: int, vocab: int, dtype) -> torch.Tensor:
    """Random rows; row 0's max twice in one slice, row 1's in two slices (the later one
    first in its slice), row 2 all -inf, row 3's max in the last, part-filled slice."""
    g = torch.Generator(device=DEVICE).manual_seed(3)
    x = torch.randn(batch, vocab, device=DEVICE, generator=g).to(dtype)
    chunk = greedy.CHUNK if vocab > greedy.CHUNK else vocab
    if vocab > 9:
        x[0, 5] = x[0, 9] = 10
    if batch > 1 and vocab > chunk + 3:
        x[1, chunk + 3] = x[1, chunk - 1] = 10
    if batch > 2:
        x[2] = float("-inf")
    if batch > 3:
        x[3, vocab - 1] = 10
    return x


CASES = [(1, 73448), (4, 73448), (5, 32000), (4, 1000), (2, 1), (33, 2 * greedy.CHUNK + 1)]
if INTERPRETED:
    CASES = [(4, 3 * greedy.CHUNK + 17), (1, 700), (5, 2 * greedy.CHUNK)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("batch,vocab", CASES)
def test_kernels_are_argmax_with_the_position_advance(batch, vocab, dtype):
    logits = logits_with_ties(batch, vocab, dtype)
    tokens = torch.full((batch,), -1, dtype=torch.long, device=DEVICE)
    position = torch.tensor([41], device=DEVICE)
    greedy.triton_next_tokens_(logits, tokens, position)
    assert tokens.tolist() == logits.argmax(dim=-1).tolist()
    assert position.tolist() == [42]
    greedy.triton_next_tokens_(logits, tokens)  # no position: none advanced
    assert position.tolist() == [42]


@pytest.mark.skipif(INTERPRETED, reason="a CUDA graph")
def test_captured_step_advances_on_every_replay():
    logits = logits_with_ties(4, 73448, torch.bfloat16)
    tokens = torch.zeros(4, dtype=torch.long, device=DEVICE)
    position = torch.tensor([0], device=DEVICE)
    greedy.next_tokens_(logits, tokens, position)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        greedy.next_tokens_(logits, tokens, position)
    position.zero_()
    for step in range(3):
        logits[0, 100 + step] = 50 + step
        graph.replay()
        torch.cuda.synchronize()
        assert tokens.tolist() == logits.argmax(dim=-1).tolist() and position.item() == step + 1


@pytest.mark.parametrize("vocab", [700, 2 * greedy.CHUNK + 5])
def test_nan_counts_as_minus_infinity(vocab):
    """A row of NaN only gives argmax's 0; a row with some NaN the maximum of the rest (never an
    index outside the vocabulary, which the next step's embedding would read out of range)."""
    logits = torch.randn(3, vocab, device=DEVICE)
    logits[0] = float("nan")
    logits[1, vocab // 2] = float("nan")
    logits[2, :] = float("nan")
    logits[2, vocab - 1] = 1.0
    tokens = torch.full((3,), -1, dtype=torch.long, device=DEVICE)
    greedy.triton_next_tokens_(logits, tokens)
    expected = torch.nan_to_num(logits, nan=float("-inf")).argmax(dim=-1)
    expected[0] = 0
    assert tokens.tolist() == expected.tolist() and tokens[2].item() == vocab - 1
