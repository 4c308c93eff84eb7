"""The ragged prefill: one target forward over several prompts of different lengths.

The engine's prefill and the aligner's feature extraction make the same model call;
this is that call, once.
"""
from __future__ import annotations

import torch


#: What one more forward costs in the groups of :func:`prefill_groups`, as prompt rows:
#: a forward streams every weight once whatever its rows (on the 2-core CPUs measured,
#: a bf16 / fp32 forward's fixed cost is ~25 / ~16 rows' worth of prefill).
FORWARD_ROWS = 32


def prefill_groups(lens: list[int], forward_rows: int = FORWARD_ROWS) -> list[list[int]]:
    """Split prompts of lengths ``lens`` into groups, each run as one forward padded to its
    longest prompt, minimising padded rows plus ``forward_rows`` per forward (exact, by
    dynamic programming over the prompts sorted by length). One group when the lengths are
    close; 16 eval prompts of 41..479 tokens (2,876 in all) pad to 7,664 rows as one
    forward, to 2,983 as six.

    Returns lists of indices into ``lens`` (each ascending), covering every prompt once;
    ``[list(range(len(lens)))]`` when one forward is best.
    """
    order = sorted(range(len(lens)), key=lambda i: lens[i])
    n = len(order)
    best, cut = [0] + [None] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        top = lens[order[j - 1]]
        for i in range(j):
            c = best[i] + forward_rows + (j - i) * top
            if best[j] is None or c < best[j]:
                best[j], cut[j] = c, i
    groups, j = [], n
    while j > 0:
        groups.append(sorted(order[cut[j]:j]))
        j = cut[j]
    return groups[::-1]


def ragged_prefill(model, seqs: list[list[int]], kv: torch.Tensor,
                   block_tables: torch.Tensor, taps: tuple[int, ...] = ()):
    """Run ``model`` over the token lists ``seqs`` (B of them, lengths ``n_b``), positions
    from 0, writing their K/V into the paged cache ``kv``
    (``[L, num_blocks, 2, block_size, H_kv, D]``) through ``block_tables`` ``[B, max_blocks]``
    int32 (blocks for ``n_b`` positions already reserved; the prefix is empty). Prompts of
    very different lengths run as a few forwards (:func:`prefill_groups`), each padded to
    its own longest prompt; a row's result does not depend on its neighbours, so the
    grouping changes no value.

    Returns the pre-norm last-layer states ``[B, T, hidden]`` (``T = max n_b``) in the
    model's dtype; rows past ``n_b`` are padding (zeros; their K/V is not written past the
    sequence's blocks). With ``taps`` (ascending layer indices): ``(states, tapped
    [B, T, len(taps), hidden])``.
    """
    dev = kv.device
    lens = [len(s) for s in seqs]
    B, T = len(seqs), max(lens)

    def forward(g: list[int], bt: torch.Tensor):   # one padded forward over prompts g
        Tg = max(lens[i] for i in g)
        toks = torch.zeros(len(g), Tg, dtype=torch.long)
        for row, i in enumerate(g):
            toks[row, :lens[i]] = torch.tensor(seqs[i])
        return model(toks.to(dev), torch.arange(Tg, device=dev).expand(len(g), Tg), kv, bt,
                     torch.zeros(len(g), dtype=torch.long, device=dev),
                     tree_lens=torch.tensor([lens[i] for i in g], device=dev), norm=False,
                     taps=taps)

    groups = prefill_groups(lens)
    if len(groups) == 1:
        return forward(groups[0], block_tables)
    h = tapped = None
    for g in groups:
        out = forward(g, block_tables[torch.tensor(g, device=block_tables.device)])
        hg, tg = out if taps else (out, None)
        if h is None:
            h = hg.new_zeros(B, T, hg.shape[-1])
            tapped = None if tg is None else tg.new_zeros(B, T, *tg.shape[2:])
        rows, Tg = torch.tensor(g, device=dev), hg.shape[1]
        h[rows, :Tg] = hg
        if tg is not None:
            tapped[rows, :Tg] = tg
    return (h, tapped) if taps else h


def mean_prompt_state(model, h: torch.Tensor) -> torch.Tensor:
    """Router features of one prompt from its pre-norm states ``h`` ``[P, hidden]``:
    the mean of the target's final (normed) states, ``[hidden]``. Free after prefill."""
    return model.final_norm(h).mean(0)
