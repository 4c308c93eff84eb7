"""The drafter protocol and the draft tree it returns.

A drafter kind is one file: a class with ``name``, :meth:`begin`, :meth:`propose`,
:meth:`update` and :meth:`release` (see :class:`Drafter`). The engine calls them for
the requests routed to it, batched per drafter.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


@dataclass
class DraftTree:
    """A proposed token tree of one request.

    ``tokens[0]`` is the root (the last emitted token, not yet in the target's cache);
    ``parents[0] = -1`` and ``parents[i] < i``. ``probs`` ``[T, V]`` (optional) holds, for
    node ``j >= 1``, the draft distribution its token was *sampled* from (i.i.d. siblings);
    None means the children were chosen deterministically (top-k, n-gram lookup).
    ``conf`` (optional) is the drafter's confidence of each node's whole path.
    ``source`` (optional) names, per node, what proposed it (a fused drafter's member;
    the root's entry is ``""``): the length rule learns acceptance per source.
    """

    tokens: list[int]
    parents: list[int]
    probs: torch.Tensor | None = None
    conf: list[float] | None = None
    source: list[str] | None = None

    def __post_init__(self):
        if len(self.tokens) != len(self.parents) or not self.tokens:
            raise ValueError("a draft tree needs as many parents as tokens, and a root")
        if self.parents[0] != -1 or any(not 0 <= p < i for i, p in
                                        enumerate(self.parents) if i > 0):
            raise ValueError(f"bad parents {self.parents}: need parents[0] = -1 and "
                             "0 <= parents[i] < i")

    def __len__(self) -> int:
        return len(self.tokens)

    def depths(self) -> list[int]:
        d = [0] * len(self.parents)
        for i in range(1, len(d)):
            d[i] = d[self.parents[i]] + 1
        return d

    def subtree(self, keep: list[int]) -> "DraftTree":
        """The tree of the nodes ``keep`` (ascending, root first, every kept node's
        parent kept too), renumbered in that order; ``probs``, ``conf`` and ``source``
        follow their nodes."""
        where = {j: i for i, j in enumerate(keep)}
        if not keep or keep[0] != 0 or any(b <= a for a, b in zip(keep, keep[1:])):
            raise ValueError(f"keep must be ascending node indices from the root, got {keep}")
        if any(self.parents[j] not in where for j in keep[1:]):
            raise ValueError(f"keep {keep} holds a node without its parent")
        return DraftTree([self.tokens[j] for j in keep],
                         [-1] + [where[self.parents[j]] for j in keep[1:]],
                         None if self.probs is None else self.probs[keep],
                         None if self.conf is None else [self.conf[j] for j in keep],
                         None if self.source is None else [self.source[j] for j in keep])

    @classmethod
    def chain(cls, root: int, drafts: list[int]) -> "DraftTree":
        return cls([root, *drafts], list(range(-1, len(drafts))))


@dataclass
class SeqState:
    """What a drafter sees of one request.

    ``tokens`` is prompt + emitted tokens (``tokens[-1]`` is the next tree's root);
    ``state`` is the drafter's own per-request storage.
    """

    seq_id: int
    tokens: list[int]
    prompt_len: int
    temperature: float = 0.0
    state: dict[str, Any] = field(default_factory=dict)


@dataclass
class Verified:
    """The outcome of one verification, handed to :meth:`Drafter.update`.

    ``path``: accepted node indices (root first); ``new_tokens``: tokens emitted this
    step (accepted drafts + the target's bonus/correction); ``target_logits`` ``[T, V]``
    and ``target_hidden`` of the tree's nodes, for drafters that learn from the target:
    ``[T, hidden]`` pre-norm last-layer states, or ``[T, k, hidden]`` of the layers the
    drafter names in its ``feature_layers`` (see :class:`Drafter`).
    """

    tree: DraftTree
    path: list[int]
    new_tokens: list[int]
    target_logits: torch.Tensor
    target_hidden: torch.Tensor


class Drafter(Protocol):
    """What every drafter implements."""

    name: str
    # Optional: ``feature_layers: tuple[int, ...]``, the target layers whose states the
    # drafter reads (EAGLE-3 fuses low, middle and high layers). The engine then passes
    # ``[n, k, hidden]`` (those layers, in that order) as ``prompt_hidden`` and
    # ``Verified.target_hidden``; without it, ``[n, hidden]`` of the last layer.

    def begin(self, seq: SeqState, prompt_hidden: torch.Tensor | None) -> None:
        """A request starts (after the target's prefill; ``prompt_hidden`` ``[P, hidden]``
        are the target's pre-norm last-layer states over the prompt -- ``[P, k, hidden]``
        for a drafter with ``feature_layers`` -- or None)."""

    def propose(self, seqs: list[SeqState], budgets: list[int]) -> list[DraftTree]:
        """A tree per request with at most ``budgets[i] + 1`` nodes (root included)."""

    def update(self, seq: SeqState, result: Verified) -> None:
        """Learn what the target accepted (``seq.tokens`` already includes it)."""

    def release(self, seq: SeqState) -> None:
        """The request is done; drop its state."""

    # Optional: ``prunable = False`` keeps the engine from cutting this drafter's trees
    # before verification (the length rule drops nodes not worth verifying under load;
    # a drafter that keys state by its own node indices sets it).

    # Optional: ``reset()`` forgets what a drafter learned across requests (token
    # recycling's matrix); measurements call it so that replayed prompts start cold.
