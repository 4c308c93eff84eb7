"""The ragged prefill: one target forward over several prompts of different lengths.

The engine's prefill and the aligner's feature extraction make the same model call;
this is that call, once.
"""
from __future__ import annotations

import torch


def ragged_prefill(model, seqs: list[list[int]], kv: torch.Tensor,
                   block_tables: torch.Tensor, taps: tuple[int, ...] = ()):
    """Run ``model`` over the token lists ``seqs`` (B of them, lengths ``n_b``), padded to
    the longest ``T``, positions from 0, writing their K/V into the paged cache ``kv``
    (``[L, num_blocks, 2, block_size, H_kv, D]``) through ``block_tables`` ``[B, max_blocks]``
    int32 (blocks for ``n_b`` positions already reserved; the prefix is empty).

    Returns the pre-norm last-layer states ``[B, T, hidden]`` in the model's dtype; rows
    past ``n_b`` are padding (their K/V is not written past the sequence's blocks). With
    ``taps`` (ascending layer indices): ``(states, tapped [B, T, len(taps), hidden])``.
    """
    dev = kv.device
    lens = [len(s) for s in seqs]
    B, T = len(seqs), max(lens)
    toks = torch.zeros(B, T, dtype=torch.long)
    for b, s in enumerate(seqs):
        toks[b, :lens[b]] = torch.tensor(s)
    return model(toks.to(dev), torch.arange(T, device=dev).expand(B, T), kv, block_tables,
                 torch.zeros(B, dtype=torch.long, device=dev),
                 tree_lens=torch.tensor(lens, device=dev), norm=False, taps=taps)


def mean_prompt_state(model, h: torch.Tensor) -> torch.Tensor:
    """Router features of one prompt from its pre-norm states ``h`` ``[P, hidden]``:
    the mean of the target's final (normed) states, ``[hidden]``. Free after prefill."""
    return model.final_norm(h).mean(0)
