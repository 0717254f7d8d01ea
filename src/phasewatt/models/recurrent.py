"""The skeleton the recurrent models (gdn, mamba2) share: embedding, a stack of blocks, final
norm and lm_head, fixed-shape states, row-chunked prefill and a shape-static decode step.

Each block implements make_state(batch) (a tuple of zeroed tensors: its conv window and its
recurrent state), prefill(h, *state) and forward(h, *state) (one decode step); both update the
state in place. States are arguments, not buffers, so that a compiled block serves every
layer and batch size. Their size does not depend on the sequence length.
"""

from __future__ import annotations

import torch
from torch import nn

from phasewatt.models.decoder import PREFILL_CHUNK_TOKENS, lm_head_linear
from phasewatt.models.gemv import norm_linear


class RecurrentModel(nn.Module):
    def __init__(self, spec, blocks: list[nn.Module], final_norm: nn.Module, device, dtype):
        super().__init__()
        self.spec = spec
        self.embed = nn.Embedding(spec.vocab_size, spec.d_model, device=device, dtype=dtype)
        self.layers = nn.ModuleList(blocks)
        self.final_norm = final_norm
        self.lm_head = lm_head_linear(spec.d_model, spec.vocab_size, self.embed.weight if spec.tied_embeddings else None, device, dtype)
        self.states: list[tuple[torch.Tensor, ...]] = []
        self.cache_batch = 0

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def prefill_backend(self) -> str:
        """'auto' (the GPU kernels on CUDA, the torch chunked form elsewhere), 'torch', 'fla'
        (fla's public chunked ops), or a mixer's own (its prefill_backends: Mamba2's 'triton')."""
        return self.layers[0].mixer.backend

    @prefill_backend.setter
    def prefill_backend(self, backend: str) -> None:
        allowed = self.layers[0].mixer.prefill_backends
        if backend not in allowed:
            raise ValueError(f"prefill_backend '{backend}'; allowed: " + ", ".join(allowed))
        for layer in self.layers:
            layer.mixer.backend = backend

    def setup_caches(self, batch: int, max_len: int) -> None:
        """Allocate zeroed states for `batch` sequences. A recurrent state has the same size
        at any length, so max_len does not size anything."""
        self.states = []  # the old states are freed before the new ones are allocated
        self.states = [layer.make_state(batch) for layer in self.layers]
        self.cache_batch = batch

    def _check_batch(self, batch: int) -> None:
        if not self.cache_batch:
            raise RuntimeError("setup_caches(batch, max_len) must be called before prefill/decode")
        if batch != self.cache_batch:
            raise ValueError(f"states hold batch {self.cache_batch}; asked for batch {batch}")

    def norm_folds(self):
        """The final norm folds into an untied lm_head (a tied one is the embedding too)."""
        return [] if self.spec.tied_embeddings else [(self.final_norm, [self.lm_head])]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return norm_linear(h, None, self.final_norm, self.lm_head)[0]

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Run whole prompts [B, S] from empty states, overwriting them; logits of the last
        position [B, V], or of every position [B, S, V]. Rows go through in groups of at most
        PREFILL_CHUNK_TOKENS tokens, which bounds the activations."""
        batch, seq = tokens.shape
        self._check_batch(batch)
        rows_per_chunk = max(1, PREFILL_CHUNK_TOKENS // seq)
        logits = []
        for start in range(0, batch, rows_per_chunk):
            rows = slice(start, min(batch, start + rows_per_chunk))
            h = self.embed(tokens[rows])
            for layer, state in zip(self.layers, self.states):
                h = layer.prefill(h, *(s[rows] for s in state))
            logits.append(self.logits(h if all_logits else h[:, -1]))
        return logits[0] if len(logits) == 1 else torch.cat(logits)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """One step for tokens [B]; logits [B, V]. Fixed shapes, no host sync: capturable in a
        CUDA graph. input_pos is accepted for the common interface; a state has no positions."""
        h = self.embed(tokens)
        for layer, state in zip(self.layers, self.states):
            h = layer(h, *state)
        return self.logits(h)

    def compile_decode(self, mode: str = "default", dynamic: bool | None = None) -> None:
        """torch.compile each block's decode step on its own (regional compilation): one compile
        serves every layer, and the state update's pointwise ops fuse into one pass over the
        state. Prefill stays eager (block.prefill)."""
        for layer in self.layers:
            layer.compile(mode=mode, dynamic=dynamic, fullgraph=True)

    def compile_prefill(self, mode: str = "default", dynamic: bool | None = None, backend: str = "inductor") -> None:
        """torch.compile each block's prefill on its own: the norms, projections' epilogues,
        conv activation, gates and MLP fuse; fla's kernels (Gated DeltaNet's, Mamba2's with
        backend 'fla') stay outside the graphs (a graph break at linear_ops' fla call), so such
        a block compiles as a few graphs; Mamba2's own kernels are one custom op in its graph.
        Another backend (eager, aot_eager) checks the tracing without a GPU."""
        how = {"mode": mode} if backend == "inductor" else {"backend": backend}
        for layer in self.layers:
            layer.prefill = torch.compile(layer.prefill, dynamic=dynamic, **how)
