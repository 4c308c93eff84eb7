"""The assign stage's selection policy: which measured candidate drafter a cluster gets
(:func:`pick_drafter`)."""
from __future__ import annotations


def pick_drafter(m: dict[str, dict], key: str, margin: float) -> str:
    """The candidate to assign from measurements ``{name: {key, mean_accepted_length,
    fixed?}}``: the best by ``key`` and every candidate within ``margin`` (relative) of
    it tie, and among them the best drafter wins: the longest mean accepted length at
    the fixed budget (``fixed``, when every tied candidate has it), else the longest
    mean accepted length as measured; then the better ``key``, then the name.

    Ties are only this close: accepted length leaves out what a drafter costs, so among
    wider ties it always chose a fusion with a model drafter (which adds model drafts to
    the lookups). Tied also when a one-sided paired t-test over the held-back prompts
    could not call a candidate slower, the fusions with a model drafter took 4 of 5
    clusters at 5-6% less goodput than the lookup-only fusion, and the pool ran at 0.92x
    of that fusion alone on unseen prompts (bench/RESULTS.md, 2026-12-06)."""
    top_name = max(sorted(m), key=lambda n: m[n][key])
    top = m[top_name][key]

    tied = [n for n in m if m[n][key] >= top * (1.0 - margin)]
    fixed = all("fixed" in m[n] for n in tied)

    def quality(n: str) -> float:
        return m[n]["fixed"]["mean_accepted_length"] if fixed else m[n]["mean_accepted_length"]

    return max(sorted(tied), key=lambda n: (quality(n), m[n][key]))
