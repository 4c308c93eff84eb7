"""The assign stage's selection policy: which measured candidate drafter a cluster gets
(:func:`pick_drafter`), and when a candidate's goodput is measurably lower than
another's (:func:`slower_significantly`, a one-sided paired t-test)."""
from __future__ import annotations

import math
import statistics

# one-sided 95% quantiles of Student's t by degrees of freedom (df beyond the table: the
# largest tabulated df at or below it; the normal's 1.645 from 120 on)
_T95 = {1: 6.314, 2: 2.920, 3: 2.353, 4: 2.132, 5: 2.015, 6: 1.943, 7: 1.895, 8: 1.860,
        9: 1.833, 10: 1.812, 12: 1.782, 15: 1.753, 20: 1.725, 30: 1.697, 60: 1.671,
        120: 1.645}


def _t95(df: int) -> float:
    return _T95[max(k for k in _T95 if k <= df)]


def slower_significantly(a: list | None, b: list | None) -> bool | None:
    """Whether ``a`` is slower than ``b`` by a one-sided paired t-test at the 5% level,
    over the same prompts' ``[[tokens, seconds], ...]`` (the per-prompt log goodput
    ratios are the pairs). None when it cannot tell: a record missing, fewer than two
    pairs, unequal counts, or an empty measurement."""
    if not a or not b or len(a) != len(b) or len(a) < 2:
        return None
    if any(x[0] <= 0 or x[1] <= 0 for x in a + b):
        return None
    r = [math.log((ta / sa) / (tb / sb)) for (ta, sa), (tb, sb) in zip(a, b)]
    mean, sd = statistics.fmean(r), statistics.stdev(r)
    if sd == 0.0:
        return mean < 0.0
    return mean / (sd / math.sqrt(len(r))) < -_t95(len(r) - 1)


def pick_drafter(m: dict[str, dict], key: str, margin: float) -> str:
    """The candidate to assign from measurements ``{name: {key, mean_accepted_length,
    per_prompt?, fixed?}}``: the best by ``key`` and every candidate not measurably
    worse tie, and among them the best drafter wins: the longest mean accepted length
    at the fixed budget (``fixed``, when every candidate has it), else the longest mean
    accepted length as measured; then the better ``key``, then the name.

    Not measurably worse: within ``margin`` (relative) of the best ``key``, or -- for
    goodput, given ``per_prompt`` records of the same prompts -- not slower than the
    best by a one-sided paired t-test at 5% (:func:`slower_significantly`). Wall-clock
    goodput over a few held-back prompts on a loaded host is noisy, and where it cannot
    tell candidates apart, accepted length at a fixed budget -- deterministic under
    greedy decoding, and the drafter's own quality apart from the draft lengths the
    adaptive rule picks on this machine -- decides."""
    top_name = max(sorted(m), key=lambda n: m[n][key])
    top = m[top_name][key]

    def not_worse(n: str) -> bool:
        if m[n][key] >= top * (1.0 - margin):
            return True
        if key != "goodput_tok_s":
            return False
        return slower_significantly(m[n].get("per_prompt"),
                                    m[top_name].get("per_prompt")) is False

    tied = [n for n in m if not_worse(n)]
    fixed = all("fixed" in m[n] for n in tied)

    def quality(n: str) -> float:
        return m[n]["fixed"]["mean_accepted_length"] if fixed else m[n]["mean_accepted_length"]

    return max(sorted(tied), key=lambda n: (quality(n), m[n][key]))
