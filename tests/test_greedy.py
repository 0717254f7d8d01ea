"""The greedy next token (models/greedy.py) on CPU: torch's argmax, in place, with the position
advance; shapes it cannot take are refused. The kernels are checked in test_greedy_gpu.py."""

import pytest
import torch

from phasewatt.models import greedy


def test_cpu_is_argmax_in_place_with_the_position_advance():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    logits[1, 7] = logits[1, 30] = logits[1].max() + 1  # a tie: the first index wins
    tokens, position = torch.zeros(3, dtype=torch.long), torch.tensor([11])
    greedy.next_tokens_(logits, tokens, position)
    assert tokens.tolist() == logits.argmax(dim=-1).tolist() and tokens[1] == 7
    assert position.tolist() == [12]
    greedy.next_tokens_(logits, tokens)
    assert position.tolist() == [12]


@pytest.mark.parametrize("logits_shape,tokens_shape", [((3, 50), (2,)), ((50,), (1,)), ((3, 50), (3, 1))])
def test_refuses_shapes_it_cannot_take(logits_shape, tokens_shape):
    with pytest.raises(ValueError, match=r"need \[B, V\] and \[B\]"):
        greedy.next_tokens_(torch.zeros(logits_shape), torch.zeros(tokens_shape, dtype=torch.long))


def test_refuses_a_position_of_more_than_one_element_and_odd_chunks():
    logits, tokens = torch.zeros(2, 8), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"position \(2,\); need \[1\]"):
        greedy.next_tokens_(logits, tokens, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk 100; allowed: a power of two"):
        greedy.triton_next_tokens_(logits, tokens, chunk=100)


def test_float64_logits_take_torch_argmax():
    """float64 would be compared in float32 by the kernels: it stays with torch (on CPU here,
    on CUDA as well)."""
    logits = torch.zeros(1, 4, dtype=torch.float64)
    logits[0, 1], logits[0, 3] = 1.0, 1.0 + 1e-12  # equal in float32
    tokens = torch.zeros(1, dtype=torch.long)
    greedy.next_tokens_(logits, tokens)
    assert tokens.item() == 3
