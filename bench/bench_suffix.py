"""What a suffix datastore adds to prompt lookup, measured without the target.

Greedy decoding accepts a draft exactly as far as it agrees with the target's own
output, so over collected target outputs (``specrt.draft.corpus`` shards) the tokens
per step of a model-free drafter follow from the outputs alone: at each step the
drafter proposes a tree from the request's tokens so far, the longest tree path that
matches the next output tokens is accepted, plus the target's own token. The prompts
are split by a hash of their id: the datastore is built from the outputs of most of
them, the rest (``--held-frac``, greedy outputs only) are decoded. No timing: this is
the drafters' accepted length at a fixed budget; bench_pool.py measures wall time.

    python bench/bench_suffix.py --corpus WORK/corpus [--budget 4] [--held-frac 0.1]
        [--json OUT]
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from collections import defaultdict

from specrt.data import in_share
from specrt.draft.base import DraftTree, SeqState
from specrt.draft.corpus import read_shards
from specrt.draft.fused import FusedDrafter
from specrt.draft.ngram import NgramDrafter
from specrt.draft.suffix import SuffixDrafter, SuffixIndex


def accepted(tree: DraftTree, truth: list[int]) -> int:
    """Drafted tokens greedy verification keeps: the longest root path equal to
    ``truth``'s first tokens."""
    kids = defaultdict(list)
    for i in range(1, len(tree)):
        kids[tree.parents[i]].append(i)
    node = d = 0
    while d < len(truth):
        nxt = [c for c in kids[node] if tree.tokens[c] == truth[d]]
        if not nxt:
            break
        node, d = nxt[0], d + 1
    return d


def replay(make, queries: list[dict], budget: int) -> dict:
    """Tokens per step (and drafted per step, microseconds per step) of the drafter
    ``make()`` builds, per task and over all, decoding ``queries``' outputs."""
    per = defaultdict(lambda: [0, 0, 0])  # steps, tokens, drafted
    spent = 0.0
    for r in queries:
        d = make()
        p, o = list(r["prompt_ids"]), list(r["output_ids"])
        seq = SeqState(0, p + o[:1], len(p))
        d.begin(seq, None)
        t = 1
        while t < len(o):
            seq.tokens = p + o[:t]
            t0 = time.perf_counter()
            tree = d.propose([seq], [budget])[0]
            spent += time.perf_counter() - t0
            a = accepted(tree, o[t:])
            s = per[r["task"]]
            s[0], s[1], s[2] = s[0] + 1, s[1] + a + 1, s[2] + len(tree) - 1
            t += a + 1
    out = {k: {"tokens_per_step": v[1] / v[0], "drafted_per_step": v[2] / v[0]}
           for k, v in sorted(per.items())}
    n = [sum(v[i] for v in per.values()) for i in range(3)]
    out["all"] = {"tokens_per_step": n[1] / n[0], "drafted_per_step": n[2] / n[0],
                  "us_per_step": 1e6 * spent / n[0]}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--corpus", required=True, help="collected shards (WORK/corpus)")
    ap.add_argument("--budget", type=int, default=4, help="drafted tokens per step")
    ap.add_argument("--held-frac", type=float, default=0.1,
                    help="share of prompts decoded (the rest make the datastore)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    recs = read_shards(a.corpus)

    def held(rid: str) -> bool:   # the project's hash-share rule, salted apart
        return in_share(f"suffix-replay:{rid}", a.held_frac)

    store = [r["output_ids"] for r in recs if not held(r["id"])]
    queries = [r for r in recs if held(r["id"]) and r["sample"] == 0 and r["output_ids"]]
    idx = SuffixIndex(store, vocab_size=None)
    print(f"datastore: {len(idx)} positions from {len(store)} outputs; {len(queries)} held-out "
          f"prompts decoded; budget {a.budget}")
    modes = {
        "ngram": lambda: NgramDrafter(),
        "ngram2+ngram": lambda: FusedDrafter([NgramDrafter("ngram2", min_ngram=2),
                                              NgramDrafter()]),
        "suffix": lambda: SuffixDrafter(idx),
        "ngram2+suffix+ngram": lambda: FusedDrafter([NgramDrafter("ngram2", min_ngram=2),
                                                     SuffixDrafter(idx), NgramDrafter()]),
    }
    res = {m: replay(f, queries, a.budget) for m, f in modes.items()}
    tasks = [k for k in res["ngram"] if k != "all"] + ["all"]
    print(f"{'tokens/step':<22}" + "".join(f"{t[:8]:>9}" for t in tasks) + "  us/step")
    for m, r in res.items():
        print(f"{m:<22}" + "".join(f"{r[t]['tokens_per_step']:9.3f}" for t in tasks)
              + f"  {r['all']['us_per_step']:7.0f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"date": datetime.date.today().isoformat(), "corpus": a.corpus,
                       "budget": a.budget, "held_frac": a.held_frac,
                       "datastore_positions": len(idx), "queries": len(queries),
                       "modes": res}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
