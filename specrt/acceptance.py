"""Verification of one step's batch: which drafted nodes the target keeps.

Apart from proposal (the drafters) and from the model forward (the engine): this
module sees only target logits, the trees and each request's sampling parameters.
"""
from __future__ import annotations

import torch

from specrt import ops
from specrt.sampling import logits_to_probs, position_uniform, position_uniforms, sample_at


def accept(reqs, trees, logits, tokens, parents, tl):
    """Lossless verification of a batch of trees, ``ops.verify_tree`` once per group of
    rows sharing a mode.

    * greedy: a child is kept iff it is the target's argmax.
    * sampled, deterministic children (``probs`` None: n-gram, recycling, top-k model
      drafts, root-only plain decoding): *coupled* verification. The token the target
      emits at output position ``t`` is :func:`~specrt.sampling.sample_at` of its
      processed distribution with the request's uniform for ``t``
      (:func:`~specrt.sampling.position_uniform`); a child is kept iff it is that token.
      Each emitted token is an exact draw from the target (lossless), and it is the
      token plain sampling with the same seed draws at that position: seeded
      speculative output equals seeded plain output, whatever the draft lengths. It is
      the greedy walk over the one-hot rows of these choices.
    * sampled with draft distributions (``probs`` set): recursive rejection sampling
      with uniforms keyed by (seed, position of the root's successor, "verify").

    ``reqs``: the B requests (params, ``seed`` and emitted tokens); ``trees``: their
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
    dev = logits.device
    for key, idx in groups.items():
        sel = torch.tensor(idx)
        if key[0] == "greedy" and len(idx) == B:   # the whole batch: no copies
            p, n, x = ops.verify_tree(logits, tokens.to(dev), parents.to(dev), tl.to(dev),
                                      greedy=True)
        elif key[0] == "greedy":
            p, n, x = ops.verify_tree(logits[sel.to(dev)], tokens[sel].to(dev),
                                      parents[sel].to(dev), tl[sel].to(dev), greedy=True)
        elif not key[1]:
            choice = torch.zeros(len(idx), T, logits.shape[-1], device=dev)
            for j, i in enumerate(idx):
                n_i, r = len(trees[i]), reqs[i]
                probs = logits_to_probs(logits[i, :n_i], r.params.temperature,
                                        r.params.top_k, r.params.top_p)
                first = len(r.out_ids)         # output position after the root
                depth = trees[i].depths()
                per_depth = [position_uniform(r.seed, first + d) for d in range(max(depth) + 1)]
                u = torch.tensor(per_depth)[torch.tensor(depth)]   # one uniform per node
                choice[j, torch.arange(n_i), sample_at(probs, u).to(dev)] = 1.0
            p, n, x = ops.verify_tree(choice, tokens[sel].to(dev), parents[sel].to(dev),
                                      tl[sel].to(dev), greedy=True)
        else:
            probs = torch.stack([logits_to_probs(logits[i], reqs[i].params.temperature,
                                                 reqs[i].params.top_k, reqs[i].params.top_p)
                                 for i in idx])
            dprobs = torch.zeros_like(probs)
            for j, i in enumerate(idx):
                dprobs[j, :len(trees[i])] = trees[i].probs.to(probs)
            u = torch.stack([position_uniforms(reqs[i].seed, len(reqs[i].out_ids), T,
                                               "verify") for i in idx]).to(dev)
            p, n, x = ops.verify_tree(probs, tokens[sel].to(dev), parents[sel].to(dev),
                                      tl[sel].to(dev), dprobs, uniforms=u)
        p, n, x = p.tolist(), n.tolist(), x.tolist()
        for j, i in enumerate(idx):
            path[i], plen[i], nxt[i] = p[j], n[j], x[j]
    return path, plen, nxt
