"""Stage e, ``assign``: per cluster, goodput (emitted tokens per wall second at batch 1)
of each candidate drafter (aligned, baseline, n-gram, token recycling, suffix lookup
in the collection's outputs, and fusions of those) on the cluster's held-back prompts,
and its mean accepted length at a fixed draft budget, measured by
:func:`specrt.measure.measure_candidates`; the best goodput and the candidates within
the margin of it tie, and the longest accepted length among them is assigned
(:func:`specrt.align.policy.pick_drafter`): ``assign.json``."""
from __future__ import annotations

import json

from specrt.align.context import Ctx, log
from specrt.align.policy import pick_drafter
from specrt.data import shorten_prompt
from specrt.draft.registry import candidate_drafters, lookup_drafter
from specrt.measure import measure_candidates

_measure = measure_candidates  # the name the tests and older callers use


def stage_assign(ctx: Ctx, by_id: dict[str, dict], budget_s: float = float("inf")) -> dict:
    """Per cluster, measure every candidate drafter on the cluster's held-back TRAIN
    prompts (batch 1, greedy) and assign the best by ``assign_metric``; resumable per
    cluster. Writes ``assign.json`` ``{clusters: {c: {candidates, drafter}}, default}``.

    ``budget_s`` bounds the stage: each cluster measures as many of its held-back
    prompts (at least one) as its share of the time left allows, at the seconds per
    prompt measured so far (before any measurement: 40 ms per token and candidate)."""
    import time

    t_start = time.perf_counter()
    per_prompt: list[float] = []
    cfg = ctx.cfg
    part = ctx.read("partition")
    k = part["k"]
    eng = ctx.engine
    path = ctx.work / "assign.json"
    res = json.loads(path.read_text()) if path.is_file() else {"clusters": {}}
    shared = {}  # the model-free drafters the candidates name (ngram, ngram2, recycling)
    pieces = list(dict.fromkeys(x for t in cfg.candidates for x in t.split("+")))
    for piece in pieces:
        d = lookup_drafter(piece, eng.model.args.vocab_size)
        if d is not None:
            shared[piece] = d
    if "suffix" in pieces:
        shared["suffix"] = ctx.suffix_drafter()
    base = ctx.baseline_drafter() if "baseline" in pieces else None
    if base is not None:
        shared["baseline"] = base
    held = set(part["held"])
    clusters = range(k)
    if cfg.progress:
        from tqdm import tqdm

        clusters = tqdm(clusters, desc="e) assign", unit="cluster")
    key = "goodput_tok_s" if cfg.assign_metric == "goodput" else cfg.assign_metric
    for c in clusters:
        if str(c) in res["clusters"]:
            continue
        mem = [i for i, lab in zip(part["ids"], part["labels"]) if lab == c]
        rows = [by_id[i] for i in mem if i in held] or [by_id[i] for i in mem][:1]
        have = dict(shared)
        al = ctx.work / "align" / f"aligned_{c}.json"
        if al.is_file() and any("aligned" in t.split("+") for t in cfg.candidates):
            have["aligned"] = ctx.model_drafter(al, f"aligned_{c}")
        cand = candidate_drafters(cfg.candidates, have)
        if not cand:
            raise ValueError(f"no candidate drafters among {cfg.candidates}")
        rows = [dict(r, prompt=shorten_prompt(r["prompt"], cfg.max_prompt_chars))
                for r in rows]
        tokens, fixed = cfg.assign_tokens, cfg.assign_budget
        if budget_s != float("inf"):
            passes = 2 if fixed else 1
            guess = per_prompt[-1] if per_prompt else 0.04 * tokens * len(cand) * passes
            share = max(0.0, budget_s - (time.perf_counter() - t_start)) / (k - c)
            n = max(1, int(share / max(guess, 1e-9)))
            if n < len(rows):
                log(f"assign: cluster {c}: {n} of {len(rows)} held-back prompts fit the "
                    f"time budget")
                rows = rows[:n]
            if share < guess:  # not even one prompt: the fixed-budget pass goes, then
                if fixed:      # the prompt is cut to what fits (at least 8 tokens)
                    fixed, share, guess = None, share, guess / 2
                tokens = max(8, min(tokens, int(tokens * share / max(guess, 1e-9))))
                log(f"assign: cluster {c}: {tokens} tokens per prompt"
                    f"{'' if fixed else ', no fixed-budget pass'} to fit the time budget")
        t0 = time.perf_counter()
        with eng.using(drafters=cand, max_batch=1):  # the first candidate is the default
            m = measure_candidates(eng, rows, list(cand), tokens, fixed_budget=fixed)
        per_prompt.append((time.perf_counter() - t0) / len(rows) * cfg.assign_tokens
                          / tokens * ((2 if cfg.assign_budget else 1) / (2 if fixed else 1)))
        best = pick_drafter(m, key, cfg.assign_margin)
        res["clusters"][str(c)] = {"candidates": m, "drafter": best,
                                   "held_back": [r["id"] for r in rows]}
        path.write_text(json.dumps(res, indent=1))
        log(f"assign: cluster {c} -> {best} (" + ", ".join(
            f"{n} {v[key]:.2f}" for n, v in m.items()) + f" {key})")
    # default drafter (serves requests the router is unsure of): the candidate with the
    # best goodput over every cluster's prompts (cluster-specific drafters cannot be it).
    # Not simply the baseline: alone it ran at 1.14x plain decoding where the fused
    # lookup drafters ran at ~1.5x (bench/RESULTS.md, 2026-12-06).
    tot: dict[str, list[float]] = {}
    for v in res["clusters"].values():
        for n, x in v["candidates"].items():
            if "aligned_" not in n:
                a = tot.setdefault(n, [0.0, 0.0])
                a[0] += x["tokens"]
                a[1] += x["elapsed_s"]
    default = max(sorted(tot), key=lambda n: tot[n][0] / max(tot[n][1], 1e-9)) if tot \
        else "ngram"
    res["default"] = default
    path.write_text(json.dumps(res, indent=1))
    return {"assigned": {c: v["drafter"] for c, v in res["clusters"].items()},
            "default": default}
