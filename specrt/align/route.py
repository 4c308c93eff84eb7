"""Stage f, ``route``: the MLP routing head trained on (features, cluster) of the
non-held prompts; accuracy on the held-back prompts and latency relative to a prefill:
``route.json`` + ``router.safetensors``."""
from __future__ import annotations

import json
import time

import torch

from specrt.align.context import Ctx, log


def stage_route(ctx: Ctx, by_id: dict[str, dict]) -> dict:
    """Train the MLP routing head on the non-held prompts' (features, cluster); report
    cluster and drafter accuracy on the held-back prompts and the head's latency
    relative to one prefill. Writes ``router.safetensors`` and ``route.json``."""
    from safetensors.torch import load_file

    from specrt.align.features import load_features, prompt_features
    from specrt.route import MLPRouter, router_latency

    cfg = ctx.cfg
    part = ctx.read("partition")
    asg = ctx.read("assign")
    X, ids, _ = load_features(ctx.work)
    y = torch.tensor(part["labels"])
    k = part["k"]
    cd = [asg["clusters"][str(c)]["drafter"] for c in range(k)]
    held = set(part["held"])
    tr = torch.tensor([i not in held for i in ids])
    pt = load_file(str(ctx.work / "partition.safetensors"))
    dev = next(ctx.model.parameters()).device
    router = MLPRouter(X.shape[1], k, cd, asg["default"], hidden=cfg.router_hidden,
                       threshold=cfg.router_threshold, metric=part["metric"]).to(dev)
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=1, desc="f) route", unit="fit")
    fit = router.fit(X[tr], y[tr], centroids=pt["centroids"], epochs=cfg.router_epochs,
                     seed=cfg.seed)
    if bar is not None:
        bar.update(1)
        bar.close()
    rep: dict = {"train": fit, "clusters": k, "cluster_drafter": cd, "default": asg["default"]}
    hv = ~tr
    if hv.any():
        pred = router.predict_clusters(X[hv])
        rep["heldout_n"] = int(hv.sum())
        rep["heldout_cluster_acc"] = float((pred == y[hv]).float().mean())
        routed = [n for n, _, _ in router.route(X[hv])]
        want = [cd[int(c)] for c in y[hv]]
        rep["heldout_drafter_acc"] = sum(a == b for a, b in zip(routed, want)) / len(want)
        rep["heldout_fallback_rate"] = sum(
            f < router.threshold for _, _, f in router.route(X[hv])) / len(want)
    # latency: one route call vs one batch-1 prefill of a median-length collected prompt
    recs = ctx.read_collect()
    lens = sorted(len(r["prompt_ids"]) for r in recs)
    med = next(r for r in recs if len(r["prompt_ids"]) == lens[len(lens) // 2])
    ptoks = [med["prompt_ids"]]
    prompt_features(ctx.model, ptoks)
    ts = []
    for _ in range(3):
        t0 = time.perf_counter()
        prompt_features(ctx.model, ptoks)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    pre = sorted(ts)[1]
    lat = router_latency(router, X.shape[1], device=dev)
    rep.update(router_latency_s=lat, prefill_s=pre, prefill_tokens=len(ptoks[0]),
               router_over_prefill=lat / pre if pre > 0 else None)
    router.save(ctx.work / "router.safetensors")
    (ctx.work / "route.json").write_text(json.dumps(rep, indent=1))
    log(f"route: held-back cluster acc {rep.get('heldout_cluster_acc', float('nan')):.3f}, "
         f"drafter acc {rep.get('heldout_drafter_acc', float('nan')):.3f}; latency "
         f"{lat * 1e3:.3f} ms = {100 * lat / max(pre, 1e-12):.2f}% of a "
         f"{len(ptoks[0])}-token prefill")
    return {k_: rep[k_] for k_ in ("heldout_cluster_acc", "heldout_drafter_acc",
                                   "router_over_prefill") if k_ in rep}
