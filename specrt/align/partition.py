"""Stage c, ``partition``: k-means on the router features (K given, or chosen by
silhouette); purity and adjusted Rand index against the ``task`` labels are reported,
never used; per cluster a held-back part of the TRAIN prompts is set aside for the
assign and route stages, preferring prompts the baseline drafter was not trained on (its
config's ``data.reserve_fraction``, :func:`specrt.data.is_reserved`):
``partition.json`` + ``partition.safetensors``."""
from __future__ import annotations

import json
import math

from specrt.align.context import Ctx, baseline_reserve, hash_order, log


def stage_partition(ctx: Ctx) -> dict:
    """k-means (auto K by silhouette unless given), cluster report vs task labels,
    held-back prompts per cluster. Writes ``partition.json`` / ``partition.safetensors``."""
    from safetensors.torch import save_file

    from specrt.align.features import load_features
    from specrt.align.kmeans import (adjusted_rand_index, choose_k, kmeans, prepare, purity,
                                     silhouette_score)

    cfg = ctx.cfg
    X, ids, tasks = load_features(ctx.work)
    N = X.shape[0]
    if N < 2:
        raise ValueError(f"partition needs at least 2 collected prompts, have {N}")
    if str(cfg.clusters) == "auto":
        hi = min(cfg.k_max, N - 1)
        lo = min(max(2, cfg.k_min), hi)
        bar = range(lo, hi + 1)
        if cfg.progress:
            from tqdm import tqdm

            bar = tqdm(bar, desc="c) partition (K)", unit="K")
        k, scores, res = choose_k(X, bar, metric=cfg.metric, seed=cfg.seed)
    else:
        k = int(cfg.clusters)
        if not 1 <= k <= N:
            raise ValueError(f"--clusters {k}: need 1 <= K <= {N} (collected prompts)")
        res = kmeans(X, k, metric=cfg.metric, seed=cfg.seed)
        scores = {k: silhouette_score(prepare(X, res.mean, res.std, cfg.metric), res.labels,
                                      cfg.metric)} if k >= 2 else {}
    labels = res.labels.tolist()
    comp = []
    held: list[str] = []
    # held-back prompts: those the baseline drafter never trained on first (its reserve),
    # so that measurements on them are not flattered by memorised outputs
    from specrt.data import is_reserved

    rf = baseline_reserve(cfg)
    unseen = {i for i in ids if is_reserved({"id": i}, rf)}
    for c in range(k):
        mem = [i for i in range(N) if labels[i] == c]
        tc: dict[str, int] = {}
        for i in mem:
            tc[tasks[i]] = tc.get(tasks[i], 0) + 1
        order = sorted(mem, key=lambda i: (ids[i] not in unseen, hash_order(ids[i], cfg.seed)))
        nh = 0 if len(mem) < 2 else min(cfg.assign_prompts,
                                        max(1, math.ceil(cfg.hold_frac * len(mem))))
        held += [ids[i] for i in order[:nh]]
        comp.append({"id": c, "size": len(mem),
                     "tasks": dict(sorted(tc.items(), key=lambda x: -x[1])),
                     "held_back": nh,
                     "held_back_unseen_by_baseline": sum(ids[i] in unseen for i in order[:nh])})
    rep = {"k": k, "metric": cfg.metric, "silhouette": {str(a): b for a, b in scores.items()},
           "purity": purity(labels, tasks), "ari": adjusted_rand_index(labels, tasks),
           "n": N, "clusters": comp, "ids": ids, "labels": labels, "held": held}
    save_file({"centroids": res.centroids.contiguous(), "mean": res.mean.contiguous(),
               "std": res.std.contiguous()}, str(ctx.work / "partition.safetensors"))
    (ctx.work / "partition.json").write_text(json.dumps(rep, indent=1))
    log(f"partition: K={k} (silhouette {scores.get(k, float('nan')):.3f}), purity "
         f"{rep['purity']:.3f}, ARI {rep['ari']:.3f} vs task labels; sizes "
         f"{[c['size'] for c in comp]}")
    return {"k": k, "purity": rep["purity"], "ari": rep["ari"]}
