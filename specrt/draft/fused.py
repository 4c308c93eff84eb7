"""Fused drafter: several drafters' proposals merged into one draft tree, verified in one
target forward (multi-drafter fusion in the spirit of CoSine, arXiv 2503.10325, which
fuses cooperating drafters' tokens by confidence; here every member's proposal stays in
the tree and the target picks).

The members propose for the same request; their trees are merged as a trie (a token
proposed by two members under the same parent is one node), and the merged tree is cut
to the step's budget. The target then accepts the longest path through *any* member's
proposal, so per step the fused tree accepts at least as much as each member's own
tree within the same budget share. The typical pairing is n-gram lookup (free, long
exact runs where the output copies its context) with a model drafter (pays where there
is nothing to copy).

Two ways to share the budget ``b`` of a step:

* ``"fill"``: members propose in order, each from what the earlier ones left
  (``b - used``); a member left nothing does not run. With n-gram first, the model
  drafter runs only when the lookup finds less than ``b`` tokens to copy -- cheap
  where drafting costs real time (CPU).
  A three-tier fill ``ngram2+<model>+ngram`` (see :func:`specrt.draft.lookup_drafter`)
  lets only sure copies -- continuations of a suffix match of two or more tokens -- go
  before the model; the model drafts where there are none, and single-token matches
  fill what it left (its chain stops at its confidence threshold). At a fixed budget
  of 3 this accepted 5% more than ``ngram+<model>`` on 24 train prompts
  (bench/RESULTS.md); it runs the model more often.
* ``"share"``: every member proposes with the whole budget; the merged tree keeps the
  members' nodes round-robin (first node of each member, then the second, ...), each
  member's nodes in its own (parents-first) order, until ``b`` are kept. Every member
  contributes a candidate at depth 1 every step.

Trees are deterministic proposals (``probs`` None: top-k, lookup), which the lossless
verifier accepts as such; members that sample their trees (``probs`` set) cannot be
fused and raise. Each member keeps its per-request state apart
(``seq.state["fused"][i]``). Every member sees every step's :class:`Verified` (the
merged tree and its accepted path), so model drafters stay in step with the emitted
tokens whether or not they drafted. Model drafters of the ``"lm"`` architecture key their
cache scratch by their own node indices and so cannot be fused (eagle ones can).
"""
from __future__ import annotations

import time

import torch

from specrt.draft.base import DraftTree, SeqState, Verified

SPLITS = ("fill", "share")


class FusedDrafter:
    """One drafter over several members' merged trees.

    Args:
        members: the drafters to fuse, highest priority first (at least two).
        name: drafter name in the engine; by default the members' names joined by
            ``+`` (e.g. ``ngram+baseline``), the name pools and benchmarks use.
        split: ``"fill"`` or ``"share"`` (see the module docstring).
    """

    kind = "fused"

    def __init__(self, members: list, name: str | None = None, split: str = "fill"):
        if len(members) < 2:
            raise ValueError("a fused drafter needs at least two members")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        for m in members:
            net = getattr(m, "net", None)
            if getattr(m, "kind", None) == "fused":
                raise ValueError("fused drafters do not nest; list the members instead")
            if net is not None and getattr(net, "arch", None) == "lm":
                raise ValueError(f"member {m.name!r} is an 'lm' model drafter, which keys "
                                 "its cache scratch by its own tree's node indices; only "
                                 "eagle model drafters can be fused")
        layers = {tuple(getattr(m, "feature_layers", ())) for m in members
                  if getattr(m, "net", None) is not None}
        if len(layers) > 1:
            raise ValueError(f"the model drafters fused read different target layers "
                             f"{sorted(layers)}; fuse drafters of one architecture")
        #: the target layers the model members read (they agree), passed through
        self.feature_layers = layers.pop() if layers else ()
        self.members, self.split = list(members), split
        self.name = name or "+".join(m.name for m in members)
        #: per member (by name) of the last :meth:`propose`: ``(seconds, tokens drafted)``;
        #: a call that was some request's first to that member is left out
        self.last_costs: dict[str, tuple[float, int]] = {}

    def reset(self) -> None:
        """Reset every member that keeps state across requests (``reset()``)."""
        for m in self.members:
            getattr(m, "reset", lambda: None)()

    # ------------------------------------------------------------ protocol
    def begin(self, seq: SeqState, prompt_hidden: torch.Tensor | None) -> None:
        """Start the request in every member, each with its own state."""
        seq.state["fused"] = [{} for _ in self.members]
        for m, v in zip(self.members, self._views(seq)):
            m.begin(v, prompt_hidden)

    def propose(self, seqs: list[SeqState], budgets: list[int],
                skip: set[str] | frozenset[str] = frozenset()) -> list[DraftTree]:
        """A merged tree of at most ``budgets[i] + 1`` nodes per request (batched per
        member). ``skip`` names members that do not propose this step (the engine's
        length rule leaves out members that do not pay at the batch size). Each node's
        ``source`` is the member that proposed it first; :attr:`last_costs` holds each
        member's time and drafted tokens."""
        views = [self._views(s) for s in seqs]
        merged = [_Trie(s.tokens[-1]) for s in seqs]
        self.last_costs = {}
        if self.split == "fill":
            for mi, m in enumerate(self.members):
                idx = [i for i, b in enumerate(budgets) if b - merged[i].drafted > 0]
                if not idx:
                    break
                if m.name in skip:
                    continue
                mv = [views[i][mi] for i in idx]
                t0 = time.perf_counter()
                got = m.propose(mv, [budgets[i] - merged[i].drafted for i in idx])
                self._cost(m, time.perf_counter() - t0, got, mv)
                for i, t in zip(idx, got):
                    self._check(m, t, seqs[i])
                    merged[i].add_all(t, budgets[i], m.name)
        else:
            per_member = []
            idx = [i for i, b in enumerate(budgets) if b > 0]
            for mi, m in enumerate(self.members):
                got = [DraftTree([s.tokens[-1]], [-1]) for s in seqs]
                if idx and m.name not in skip:
                    mv = [views[i][mi] for i in idx]
                    t0 = time.perf_counter()
                    part = m.propose(mv, [budgets[i] for i in idx])
                    self._cost(m, time.perf_counter() - t0, part, mv)
                    for i, t in zip(idx, part):
                        self._check(m, t, seqs[i])
                        got[i] = t
                per_member.append(got)
            for i, b in enumerate(budgets):
                if b > 0:
                    merged[i].add_round_robin([g[i] for g in per_member], b,
                                              [m.name for m in self.members])
        return [t.tree() for t in merged]

    def update(self, seq: SeqState, result: Verified) -> None:
        """Hand the step's outcome (merged tree, accepted path) to every member."""
        for m, v in zip(self.members, self._views(seq)):
            m.update(v, result)

    def release(self, seq: SeqState) -> None:
        """Release the request in every member."""
        if "fused" not in seq.state:
            return
        for m, v in zip(self.members, self._views(seq)):
            m.release(v)
        seq.state.pop("fused", None)

    # ------------------------------------------------------------ internals
    def _cost(self, m, seconds: float, got: list[DraftTree], views: list[SeqState]) -> None:
        """Record member ``m``'s call in :attr:`last_costs` unless it was some request's
        first call to ``m`` (a model member then runs the whole prompt: not what a
        drafted token costs); mark the requests as seen by ``m``."""
        if all(v.state.get("fused_seen") for v in views):
            self.last_costs[m.name] = (seconds, sum(len(t) - 1 for t in got))
        for v in views:
            v.state["fused_seen"] = True

    def _views(self, seq: SeqState) -> list[SeqState]:
        """Per-member views of one request: same tokens, the member's own state dict."""
        return [SeqState(seq.seq_id, seq.tokens, seq.prompt_len, seq.temperature, st)
                for st in seq.state["fused"]]

    def _check(self, m, t: DraftTree, seq: SeqState) -> None:
        if t.probs is not None:
            raise ValueError(f"member {m.name!r} sampled its tree (probs set); only "
                             "deterministic proposals can be fused")
        if t.tokens[0] != seq.tokens[-1]:
            raise RuntimeError(f"member {m.name!r} returned a tree with the wrong root")


class _Trie:
    """A draft tree under construction: merging dedupes (parent, token) pairs."""

    def __init__(self, root: int):
        self.tokens, self.parents, self.source = [root], [-1], [""]
        self.child: dict[tuple[int, int], int] = {}

    @property
    def drafted(self) -> int:
        return len(self.tokens) - 1

    def _add(self, parent: int, token: int, budget: int, source: str) -> int | None:
        """Index of (parent, token), added (proposed by ``source``) if new and the
        budget allows; None if not."""
        at = self.child.get((parent, token))
        if at is not None:
            return at
        if self.drafted >= budget:
            return None
        self.child[(parent, token)] = len(self.tokens)
        self.tokens.append(token)
        self.parents.append(parent)
        self.source.append(source)
        return len(self.tokens) - 1

    def add_all(self, t: DraftTree, budget: int, source: str) -> None:
        """Merge a whole tree (parents first), as far as the budget goes."""
        self.add_round_robin([t], budget, [source])

    def add_round_robin(self, trees: list[DraftTree], budget: int,
                        sources: list[str]) -> None:
        """Merge node 1 of each tree, then node 2 of each, ... until ``budget`` drafted
        nodes; a node whose parent did not fit is dropped with its subtree. ``sources``:
        who proposed each tree."""
        where = [{0: 0} for _ in trees]   # tree node -> merged node
        for j in range(1, max(len(t) for t in trees)):
            for ti, t in enumerate(trees):
                if j >= len(t):
                    continue
                p = where[ti].get(t.parents[j])
                if p is None:
                    continue
                at = self._add(p, t.tokens[j], budget, sources[ti])
                if at is not None:
                    where[ti][j] = at

    def tree(self) -> DraftTree:
        return DraftTree(list(self.tokens), list(self.parents), source=list(self.source))
