"""Token recycling drafter (after arXiv 2408.08696): reuse the target's own top-k
candidates, which every verification computes anyway.

An adjacency matrix ``M`` ``[V, k]`` holds, for each token, the top-k next tokens the
target predicted the last time that token was a tree node. Each step the tree follows a
static template: the root's children are ``M[root, :]``, their children ``M[child, :]``,
and so on, in the template's order of expected acceptance. After verification every
tree node's row is refreshed from the target's logits at that node. The matrix is
shared by all requests and persists across them (that is the recycling); a new request
seeds unknown rows from its prompt's bigrams.
"""
from __future__ import annotations

import heapq

import torch

from specrt.draft.base import DraftTree, SeqState, Verified


def static_template(max_nodes: int, k: int, rank_probs: list[float] | None = None
                    ) -> list[tuple[int, int]]:
    """Template nodes ``(parent_template_index, rank)`` sorted by prior path probability.

    Node 0 (the root) is implicit; template index ``i`` is tree node ``i + 1``. A child
    of rank r has prior ``rank_probs[r]`` times its parent's. Built best-first, so any
    prefix of the list is a valid tree (parents come before children).
    """
    rp = rank_probs or [0.55, 0.15, 0.07, 0.04, 0.025, 0.015, 0.01, 0.008][:k]
    rp = (rp + [rp[-1] * 0.5 ** i for i in range(1, k - len(rp) + 1)])[:k]
    out: list[tuple[int, int]] = []
    heap = [(-rp[r], -1, r) for r in range(k)]  # (-prob, parent template index, rank)
    heapq.heapify(heap)
    while heap and len(out) < max_nodes:
        negp, parent, rank = heapq.heappop(heap)
        out.append((parent, rank))
        me = len(out) - 1
        for r in range(k):
            heapq.heappush(heap, (negp * rp[r], me, r))
    return out


class RecyclingDrafter:
    """Draft trees from the recycled adjacency matrix.

    Args:
        vocab_size: the target's vocabulary.
        k: candidates kept per token.
        max_nodes: template size (drafted tokens at most; budgets cut it further).
    """

    kind = "recycling"

    def __init__(self, vocab_size: int, name: str = "recycling", k: int = 8,
                 max_nodes: int = 64):
        self.name = name
        self.k = k
        self.matrix = torch.full((vocab_size, k), -1, dtype=torch.int32)
        self.template = static_template(max_nodes, k)

    def reset(self) -> None:
        """Forget the recycled matrix (what persists across requests), e.g. between
        measurements that must not learn from each other's outputs."""
        self.matrix.fill_(-1)

    def begin(self, seq: SeqState, prompt_hidden: torch.Tensor | None) -> None:
        toks = seq.tokens
        if len(toks) < 2:
            return
        a = torch.tensor(toks[:-1], dtype=torch.long)
        b = torch.tensor(toks[1:], dtype=torch.int32)
        unknown = self.matrix[a, 0] < 0
        self.matrix[a[unknown], 0] = b[unknown]

    def propose(self, seqs: list[SeqState], budgets: list[int]) -> list[DraftTree]:
        return [self._one(s.tokens[-1], b) for s, b in zip(seqs, budgets)]

    def _one(self, root: int, budget: int) -> DraftTree:
        tokens, parents = [root], [-1]
        node_of = {-1: 0}  # template index -> tree node (absent: pruned)
        rows: dict[int, list[int]] = {}
        for ti, (tp, rank) in enumerate(self.template):
            if len(tokens) > budget:
                break
            pn = node_of.get(tp)
            if pn is None:
                continue
            ptok = tokens[pn]
            row = rows.get(ptok)
            if row is None:
                row = rows[ptok] = self.matrix[ptok].tolist()
            tok = row[rank]
            if tok < 0:
                continue
            node_of[ti] = len(tokens)
            tokens.append(tok)
            parents.append(pn)
        return DraftTree(tokens, parents)

    def update(self, seq: SeqState, result: Verified) -> None:
        n = len(result.tree)
        top = result.target_logits[:n].topk(self.k, dim=-1).indices.to(torch.int32).cpu()
        self.matrix[torch.tensor(result.tree.tokens, dtype=torch.long)] = top

    def release(self, seq: SeqState) -> None:
        pass
