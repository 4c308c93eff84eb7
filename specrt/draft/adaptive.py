"""Adaptive draft length: how many nodes a request's next tree gets.

The rule (goodput, after SmartSpec): a tree with k drafted tokens emits, in
expectation, ``E(k) = (1 - a^(k+1)) / (1 - a)`` tokens when each position is accepted
with probability ``a``; it costs ``cost(k) = t_fixed / B + t_token * (k + 1) + k * t_draft``
of wall time, where ``t_fixed + t_token * n`` is the target forward of a batch of n
tokens (fitted online from every step) and ``t_draft`` the drafter's measured time per
drafted token at this batch size (its measurements are kept per batch size class 1, 2,
3-4, 5-8, ...: a fused n-gram + model drafter cost 0.4 ms per drafted token at batch 1,
mostly free copies, and 2.2 ms at batch 8, mostly the model head catching up on the
tokens of its plain steps; priced with the batch-1 figure, the rule drafted at batch 8
and ran at 0.88x plain decoding). Each step picks the k in ``0..max_draft`` that maximises
``E(k) / cost(k)``. When k = 0 wins, the request decodes plainly; every
``probe_every x batch`` plain steps it drafts once more (2 tokens) so that a drafter
that starts to pay is noticed again. The interval grows with the batch so that a
batch carries the same ~2 / probe_every probe rows per step whatever its size: with a
fixed interval every request of a batch of 16 probed every 8 steps, adding a quarter
to a compute-bound forward for a few accepted tokens (speculation at batch 16 ran at
0.88x plain decoding on a 2-core CPU).

``a`` per request is a Beta-style running estimate: accepted positions over tested
positions of this request, shrunk toward the drafter's running rate across requests.
The controller keeps that per-request history itself, keyed by the caller's request
key (the engine's request id); :meth:`LengthController.forget` drops it.

Per node, after drafting (:meth:`LengthController.prune`): what proposed a node matters
more than the request's average. Measured on 8 eval prompts at batch 8 (default pool,
budget 3), given the parent accepted: a node from a suffix match of two or more tokens
(``ngram2``) was accepted 76-90% of the time, one from the eagle3 head 51% at depth 1,
a one-token n-gram match 32%, the suffix datastore 18%. So the rule learns each
drafter's acceptance per source (a fused drafter's member, ``DraftTree.source``) and
depth, gives every node the chance ``q`` that its whole path is accepted (those rates
along the path; not scaled by the request's own record, which other members made: a
member never tried would inherit their failures), and keeps the nodes in order of ``q`` while ``q / t_token`` beats the tree's expected
tokens per second of wall time so far (a fractional knapsack: a node adds ``q``
expected tokens for ``t_token`` of forward time). At batch 8 it keeps sure copies and
drops guesses. Both parts act under load only (batch > 1): alone, a request's tree is
sized by the budget rule on its own record, which knows better than rates across
requests when a request copies well (on a code prompt, cutting at batch 1 took 34-36
steps for 128 tokens instead of 31). Before drafting, a fused drafter's members that do not
pay at the batch size (depth-1 acceptance against their own cost per drafted token plus
``t_token``) are left out, under load only (:meth:`LengthController.skip_members`);
every ``probe_every x batch`` decisions all members run once, so that rates stay
current.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Hashable


@dataclass
class _Rate:
    hits: float = 0.0
    trials: float = 0.0


@dataclass
class _RequestRate(_Rate):
    off: int = 0  # plain-decode steps in a row (for probing)


class LengthController:
    """Chooses per-request draft budgets and learns from each step.

    Args:
        max_draft: largest budget (drafted tokens per step).
        prior: acceptance rate assumed for a drafter with no history.
        prior_weight: how many positions of evidence the drafter-level rate is worth.
        probe_every: plain-decode steps between probes at batch 1 (times the batch
            size under load).
        adaptive: False pins every budget to ``max_draft``.
        per_node: the per-node part of the rule (members that do not pay sit out, nodes
            not worth verifying are cut); False keeps trees whole (an attribute too, for
            benchmarks that compare).
    """

    def __init__(self, max_draft: int = 6, prior: float = 0.5, prior_weight: float = 4.0,
                 probe_every: int = 8, adaptive: bool = True, per_node: bool = True):
        self.max_draft = max_draft
        self.per_node = per_node
        self.prior, self.prior_weight = prior, prior_weight
        self.probe_every = probe_every
        self.adaptive = adaptive
        self.drafter_rate: dict[str, _Rate] = {}
        self.draft_cost: dict[str, float] = {}     # seconds per drafted token (EMA)
        self._draft_cost_at: dict[tuple[str, int], float] = {}  # the same per batch class
        # target forward time ~ t_fixed + t_token * n_tokens (running least squares)
        self._s = [0.0] * 5  # sum w, sum n, sum n^2, sum t, sum n*t
        self.decay = 0.98
        self._table: dict[int, tuple[float, int]] = {}  # n_tokens -> (EMA seconds, count)
        self._requests: dict[Hashable, _RequestRate] = {}
        self._probe_count: dict[str, int] = {}

    # ------------------------------------------------------ per-request history
    def track(self, request: Hashable, hits: float = 0.0, trials: float = 0.0) -> Hashable:
        """Start (or restart) ``request``'s acceptance history at ``hits`` accepted of
        ``trials`` tested positions; returns ``request``. Unknown keys start empty on
        first use, so calling this is optional."""
        self._requests[request] = _RequestRate(float(hits), float(trials))
        return request

    def forget(self, request: Hashable) -> None:
        """Drop ``request``'s history (it finished or was aborted)."""
        self._requests.pop(request, None)

    @property
    def tracked(self) -> int:
        """How many requests have a history now (0 once every request is forgotten)."""
        return len(self._requests)

    def _request(self, request: Hashable) -> _RequestRate:
        r = self._requests.get(request)
        if r is None:
            r = self._requests[request] = _RequestRate()
        return r

    @contextmanager
    def scoped_rates(self, table: dict | None = None):
        """Within the block the learned drafter acceptance is ``table`` (a fresh one by
        default), apart from the controller's own, which is restored on exit; measured
        costs stay shared. For measurements that must not read or steer each other's
        history: pass the same ``table`` again to continue one history."""
        saved = self.drafter_rate
        self.drafter_rate = {} if table is None else table
        try:
            yield self.drafter_rate
        finally:
            self.drafter_rate = saved

    @contextmanager
    def fixed_budget(self, k: int):
        """Within the block every budget is ``k`` (at most ``max_draft``; the adaptive
        rule off), e.g. to measure drafters' accepted length at one draft length."""
        if not 0 <= k <= self.max_draft:
            raise ValueError(f"fixed budget {k} outside 0..{self.max_draft}")
        saved = self.adaptive, self.max_draft
        self.adaptive, self.max_draft = False, k
        try:
            yield
        finally:
            self.adaptive, self.max_draft = saved

    # -------------------------------------------------------------- costs
    def observe_forward(self, n_tokens: int, seconds: float) -> None:
        s, d = self._s, self.decay
        for i, x in enumerate((1.0, n_tokens, n_tokens * n_tokens, seconds, n_tokens * seconds)):
            s[i] = s[i] * d + x
        old = self._table.get(n_tokens)
        self._table[n_tokens] = (seconds, 1) if old is None else (
            0.7 * old[0] + 0.3 * seconds, old[1] + 1)

    def forward_cost(self, n_tokens: int) -> float:
        """Seconds of a target forward over ``n_tokens`` (measured, else the fitted line)."""
        m = self._table.get(n_tokens)
        if m is not None and m[1] >= 2:
            return m[0]
        fixed, per_tok = self.forward_model()
        return fixed + per_tok * n_tokens

    def forward_model(self) -> tuple[float, float]:
        """(t_fixed, t_token) of the fitted forward cost; a prior until data suffices."""
        w, sn, snn, st, snt = self._s
        if w > 0:
            var = snn / w - (sn / w) ** 2
            mean_t = st / w
            if var > 1e-9:
                slope = (snt / w - (sn / w) * (st / w)) / var
                icpt = st / w - slope * sn / w
                if slope > 0:
                    # a line through (or below) the origin: cost ~ tokens (a compute-bound
                    # CPU); keep the slope, a small fixed cost stays
                    return max(icpt, 0.01 * mean_t), slope
            return 0.8 * mean_t, 0.2 * mean_t / max(sn / w, 1.0)
        return 1.0, 0.1

    @staticmethod
    def _batch_class(batch: int) -> int:
        """1, 2, 4, 8, ...: the power of two at or above ``batch``."""
        return 1 << max(int(batch) - 1, 0).bit_length()

    def observe_draft(self, drafter: str, n_drafted: int, seconds: float,
                      batch: int = 1) -> None:
        """``drafter`` took ``seconds`` to draft ``n_drafted`` tokens for a batch of
        ``batch`` requests."""
        if n_drafted <= 0:
            return
        per = seconds / n_drafted
        for table, key in ((self.draft_cost, drafter),
                           (self._draft_cost_at, (drafter, self._batch_class(batch)))):
            old = table.get(key)
            table[key] = per if old is None else 0.8 * old + 0.2 * per

    def drafter_cost(self, drafter: str, batch: int = 1) -> float:
        """Seconds per drafted token of ``drafter`` at ``batch`` requests: measured at
        this batch class, else across all (0 before any measurement)."""
        got = self._draft_cost_at.get((drafter, self._batch_class(batch)))
        return self.draft_cost.get(drafter, 0.0) if got is None else got

    # ---------------------------------------------------------- acceptance
    def _drafter_prior(self, drafter: str) -> float:
        """``drafter``'s running acceptance across requests (the prior until measured)."""
        g = self.drafter_rate.get(drafter)
        return g.hits / g.trials if g and g.trials >= 1 else self.prior

    def rate(self, drafter: str, request: Hashable) -> float:
        """Estimated per-position acceptance of ``request`` under ``drafter``."""
        prior = self._drafter_prior(drafter)
        r = self._requests.get(request) or _RequestRate()
        a = (r.hits + self.prior_weight * prior) / (r.trials + self.prior_weight)
        return min(max(a, 0.0), 0.98)

    def observe_accept(self, drafter: str, request: Hashable, accepted: int,
                       depth: int) -> None:
        """``accepted`` positions passed out of a tree of ``depth`` (longest path)."""
        if depth <= 0:
            return
        trials = accepted + (1 if accepted < depth else 0)
        r = self._request(request)
        r.hits += accepted
        r.trials += trials
        g = self.drafter_rate.setdefault(drafter, _Rate())
        g.hits = g.hits * 0.995 + accepted
        g.trials = g.trials * 0.995 + trials

    # -------------------------------------------------------------- per node
    # node rates live in ``drafter_rate`` under ``(drafter, source, depth)`` keys, so that
    # :meth:`scoped_rates` scopes them with the drafters' own
    def observe_nodes(self, drafter: str, tree, path: list[int]) -> None:
        """Per source and depth (1, 2, 3+) of ``tree``'s nodes whose parent was accepted
        (so they were tested): how many were accepted (``path``, root first)."""
        if len(tree) < 2:
            return
        on, d, src = set(path), tree.depths(), tree.source
        for j in range(1, len(tree)):
            if tree.parents[j] in on:
                g = self.drafter_rate.setdefault((drafter, src[j] if src else "",
                                                  min(d[j], 3)), _Rate())
                g.hits = g.hits * 0.995 + (j in on)
                g.trials = g.trials * 0.995 + 1

    def node_rate(self, drafter: str, source: str, depth: int) -> float:
        """Chance that a node from ``source`` at ``depth`` is accepted given its parent
        was, shrunk toward the ``prior`` (not the drafter's rate, which other sources
        made: a member never tried must get its chance)."""
        g = self.drafter_rate.get((drafter, source, min(depth, 3)))
        if g is None:
            return self.prior
        return (g.hits + self.prior_weight * self.prior) / (g.trials + self.prior_weight)

    def _load_costs(self, batch: int) -> tuple[float, float]:
        """(a plain step's share per request, the forward's cost per token) at
        ``batch`` requests: what a node or a member is priced against."""
        return self.forward_cost(batch) / batch, self.forward_model()[1]

    def prune(self, drafter: str, tree, batch: int):
        """``tree`` cut to the nodes worth verifying at ``batch`` requests (see the
        module docstring); the tree itself when every node is, when the rule is off, or
        alone (``batch`` 1: rates across requests undersell a request that copies well,
        and the budget rule already sizes its tree)."""
        n = len(tree)
        if not (self.adaptive and self.per_node) or n < 2 or batch <= 1:
            return tree
        c_base, c_tok = self._load_costs(batch)
        d, src = tree.depths(), tree.source
        q = [1.0] * n
        for j in range(1, n):
            q[j] = q[tree.parents[j]] * min(self.node_rate(drafter, src[j] if src else "",
                                                           d[j]), 0.98)
        keep, e, c = {0}, 1.0, c_base
        for j in sorted(range(1, n), key=lambda j: (-q[j], j)):
            # E / C only grows as nodes join, so the first node that fails ends the scan
            if tree.parents[j] not in keep or q[j] * c < c_tok * e:
                break
            keep.add(j)
            e, c = e + q[j], c + c_tok
        return tree if len(keep) == n else tree.subtree(sorted(keep))

    def skip_members(self, drafter: str, members: list[str], batch: int) -> set[str]:
        """The members of fused ``drafter`` that do not pay at ``batch`` requests: a
        depth-1 node from one adds its acceptance rate in tokens for ``t_token`` plus its
        cost per drafted token (measured under ``"drafter/member"``), against a plain
        step's share per request. Every ``probe_every x batch`` calls none is skipped.
        Only under load (``batch`` > 1): alone, a request's drafting is cheap next to a
        step, and a model member that sat out would pay its whole catch-up when probed."""
        if not (self.adaptive and self.per_node) or batch <= 1:
            return set()
        probe = self._probe_count.get(drafter, 0) + 1
        self._probe_count[drafter] = probe
        if probe % (self.probe_every * max(1, batch)) == 0:
            return set()
        c_base, c_tok = self._load_costs(batch)
        return {m for m in members
                if self.node_rate(drafter, m, 1) * c_base
                < c_tok + self.drafter_cost(f"{drafter}/{m}", batch)}

    # -------------------------------------------------------------- choice
    def _best_k(self, a: float, d: float, batch: int, cap: int) -> int:
        """The budget in ``0..cap`` with the best expected tokens per second at
        acceptance ``a``, drafter cost ``d`` per drafted token, ``batch`` requests."""
        best_k, best = 0, 0.0
        for k in range(cap + 1):
            exp_tokens = (1 - a ** (k + 1)) / (1 - a)
            cost = self.forward_cost(batch * (k + 1)) / batch + k * d
            # a larger tree must beat the best so far by 2%: costs are noisy measurements
            if exp_tokens / cost > best * 1.02:
                best_k, best = k, exp_tokens / cost
        return best_k

    def pays(self, drafter: str, batch: int) -> bool:
        """Whether ``drafter`` would draft at all for a new request at ``batch``
        requests: its acceptance across requests against its cost per drafted token at
        that batch size (no side effects; True when the rule is off)."""
        if not self.adaptive or self.max_draft == 0:
            return True
        a = min(max(self._drafter_prior(drafter), 0.0), 0.98)
        return self._best_k(a, self.drafter_cost(drafter, batch), batch, self.max_draft) > 0

    def budget(self, drafter: str, request: Hashable, batch: int, remaining: int,
               sources: list[str] | None = None) -> int:
        """Draft tokens for ``request``'s next tree (0 = plain decode) in a batch of
        ``batch`` requests, with ``remaining`` tokens left to generate. ``sources``: when
        only some members of a fused drafter run (:meth:`skip_members`), those members;
        the budget then follows the best of them (its depth-1 rate across requests, its
        own cost per drafted token), and is 0 when none runs."""
        cap = min(self.max_draft, max(remaining - 1, 0))
        if not self.adaptive or cap == 0:
            return cap
        if sources is None:
            best_k = self._best_k(self.rate(drafter, request),
                                  self.drafter_cost(drafter, batch), batch, cap)
        elif not sources:
            best_k = 0
        else:
            m = max(sources, key=lambda m: self.node_rate(drafter, m, 1))
            a = min(self.node_rate(drafter, m, 1), 0.98)
            best_k = self._best_k(a, self.drafter_cost(f"{drafter}/{m}", batch), batch, cap)
        r = self._request(request)
        if best_k == 0:
            r.off += 1
            if r.off % (self.probe_every * max(1, batch)) == 0:
                return min(2, cap)
        else:
            r.off = 0
        return best_k
