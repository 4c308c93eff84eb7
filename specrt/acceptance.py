"""Verification of one step's batch: which drafted nodes the target keeps.

Apart from proposal (the drafters) and from the model forward (the engine): this
module sees only target logits, the trees and each request's sampling parameters.
"""
from __future__ import annotations

import torch

from specrt import ops
from specrt.sampling import logits_to_probs


def accept(reqs, trees, logits, tokens, parents, tl):
    """Lossless verification of a batch of trees, ``ops.verify_tree`` once per group of
    rows sharing a mode (greedy; sampled with deterministic children; sampled with
    draft distributions).

    ``reqs``: the B requests (their params and random generators); ``trees``: their
    :class:`~specrt.draft.base.DraftTree`; ``logits`` ``[B, T, V]`` fp32 target logits
    of the nodes; ``tokens``, ``parents`` ``[B, T]`` int64 (CPU); ``tl`` ``[B]`` nodes
    per tree. Returns python lists: accepted node indices per row (root first, padded
    with -1 to T), accepted counts, and the token the target adds after the path.
    """
    B, T, _ = logits.shape
    path, plen, nxt = [[0]] * B, [1] * B, [0] * B
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(reqs):
        key = ("greedy",) if r.params.greedy else ("sample", trees[i].probs is not None)
        groups.setdefault(key, []).append(i)
    for key, idx in groups.items():
        sel = torch.tensor(idx)
        dev = logits.device
        if key[0] == "greedy":
            p, n, x = ops.verify_tree(logits[sel.to(dev)], tokens[sel].to(dev),
                                      parents[sel].to(dev), tl[sel].to(dev), greedy=True)
        else:
            probs = torch.stack([logits_to_probs(logits[i], reqs[i].params.temperature,
                                                 reqs[i].params.top_k, reqs[i].params.top_p)
                                 for i in idx])
            dprobs = None
            if key[1]:
                dprobs = torch.zeros_like(probs)
                for j, i in enumerate(idx):
                    dprobs[j, :len(trees[i])] = trees[i].probs.to(probs)
            u = torch.stack([torch.rand(T, generator=reqs[i].generator, device=dev)
                             for i in idx])
            p, n, x = ops.verify_tree(probs, tokens[sel].to(dev), parents[sel].to(dev),
                                      tl[sel].to(dev), dprobs, uniforms=u)
        p, n, x = p.tolist(), n.tolist(), x.tolist()
        for j, i in enumerate(idx):
            path[i], plen[i], nxt[i] = p[j], n[j], x[j]
    return path, plen, nxt
