"""Prompt lookup (n-gram) drafter: copy what followed the longest earlier match of the
current suffix in prompt + output. Free to run; strong on summarization, RAG, code edits.
"""
from __future__ import annotations

import torch

from specrt.draft.base import DraftTree, SeqState, Verified


class NgramDrafter:
    """Longest-suffix-match lookup over the request's own tokens.

    Args:
        max_ngram: longest suffix tried; shorter ones down to ``min_ngram`` follow.
        min_ngram: shortest suffix that counts as a match.
        branches: continuations from distinct earlier matches, as sibling chains.
    """

    kind = "ngram"

    def __init__(self, name: str = "ngram", max_ngram: int = 4, min_ngram: int = 1,
                 branches: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError("need 1 <= min_ngram <= max_ngram")
        self.name = name
        self.max_ngram, self.min_ngram, self.branches = max_ngram, min_ngram, branches

    def begin(self, seq: SeqState, prompt_hidden: torch.Tensor | None) -> None:
        pass

    def propose(self, seqs: list[SeqState], budgets: list[int]) -> list[DraftTree]:
        return [self._one(s.tokens, b) for s, b in zip(seqs, budgets)]

    def _one(self, toks: list[int], budget: int) -> DraftTree:
        root = toks[-1]
        if budget <= 0:
            return DraftTree([root], [-1])
        n_tok = len(toks)
        conts: list[list[int]] = []
        for n in range(min(self.max_ngram, n_tok - 1), self.min_ngram - 1, -1):
            suffix = toks[n_tok - n:]
            # latest match first: recent context predicts best
            for start in range(n_tok - n - 1, -1, -1):
                if toks[start:start + n] == suffix:
                    c = toks[start + n:start + n + budget]
                    if c and all(c[:1] != x[:1] for x in conts):
                        conts.append(c)
                        if len(conts) >= self.branches:
                            break
            if conts:
                break
        tokens, parents = [root], [-1]
        left = budget
        for c in conts:
            c = c[:left]
            prev = 0
            for t in c:
                tokens.append(t)
                parents.append(prev)
                prev = len(tokens) - 1
            left -= len(c)
            if left <= 0:
                break
        return DraftTree(tokens, parents)

    def update(self, seq: SeqState, result: Verified) -> None:
        pass

    def release(self, seq: SeqState) -> None:
        pass
