"""Shared bits of the benchmarks: machine name, medians."""
from __future__ import annotations

import statistics

from specrt.measure import machine  # noqa: F401  (the name the bench scripts use)


def median(xs):
    return statistics.median(xs)


def ab_by_task(M: dict, pairs: list[tuple[str, str, str]]) -> dict:
    """Per task (and ``all``) of a :func:`specrt.measure.report` table ``M``, for each
    ``(tag, plain mode, speculative mode)`` of ``pairs``: the speculative mode's speedup
    over that plain mode, its tokens/s and the plain one's, mean accepted length and
    drafted tokens per step. Prints one row per task, the pairs side by side; returns
    ``{task: {tag: {...}}}``."""
    tags = [p[0] for p in pairs]
    tasks = [t for t in M[pairs[0][1]] if t != "all"] + ["all"]
    print(f"{'task':<14}" + "".join(f"{'speedup ' + g:>16}" for g in tags)
          + "".join(f"{'accepted/step ' + g:>20}" for g in tags)
          + "".join(f"{'drafted/step ' + g:>19}" for g in tags))
    out = {}
    for t in tasks:
        row = {}
        for tag, ar, sp in pairs:
            s = M[sp][t]
            row[tag] = {"speedup": s["tokens_per_s"] / M[ar][t]["tokens_per_s"],
                        "plain_tok_s": M[ar][t]["tokens_per_s"], "tok_s": s["tokens_per_s"],
                        "mean_accepted_length": s["mean_accepted_length"],
                        "drafted_per_step": s["drafted_tokens"] / max(1, s["steps"])}
        out[t] = row
        print(f"{t:<14}" + "".join(f"{row[g]['speedup']:16.3f}" for g in tags)
              + "".join(f"{row[g]['mean_accepted_length']:20.3f}" for g in tags)
              + "".join(f"{row[g]['drafted_per_step']:19.2f}" for g in tags))
    return out
