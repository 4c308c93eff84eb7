"""Stage g, ``write``: the pool directory ``OUT`` (``pool.json``, router, centroids,
drafters; see :mod:`specrt.pool`) from the earlier stages' outputs."""
from __future__ import annotations

import shutil

from specrt.align.config import STAGES
from specrt.align.context import Ctx


def stage_write(ctx: Ctx) -> dict:
    """Write the pool directory from the stage outputs (see :mod:`specrt.pool`): the
    drafters the router names (a fused drafter's members too) get their entries from
    the drafter registry (:func:`specrt.draft.registry.pool_entries`); the model
    drafters' files (baseline, aligned) and the suffix datastore are copied into the
    pool."""
    from safetensors.torch import load_file

    from specrt.draft.registry import model_entry, pool_entries
    from specrt.pool import copy_model_drafter_files, write_pool
    from specrt.route import MLPRouter

    cfg = ctx.cfg
    ctx.out.mkdir(parents=True, exist_ok=True)  # --work may lie elsewhere
    part, asg, route = ctx.read("partition"), ctx.read("assign"), ctx.read("route")
    model = ctx.model
    router = MLPRouter.load(ctx.work / "router.safetensors")
    used = list(dict.fromkeys(router.cluster_drafter + [router.default]))

    def model_files(name: str) -> dict | None:
        if name == "suffix":   # the datastore assign measured
            from specrt.draft.registry import drafter_entry
            from specrt.draft.suffix import SuffixDrafter

            shutil.copyfile(ctx.suffix_path, ctx.out / "suffix.safetensors")
            d = SuffixDrafter.load(ctx.out / "suffix.safetensors",
                                   min_prob=cfg.suffix_min_prob)
            return drafter_entry(d, files=["suffix.safetensors"])
        if name == "baseline":
            src = ctx.baseline_cfg
        elif name.startswith("aligned_"):
            src = ctx.work / "align" / f"{name}.json"
        else:
            return None
        files = copy_model_drafter_files(src, ctx.out, name)
        return model_entry(name, files, ctx.baseline_runtime)

    entries = pool_entries(used, model.args.vocab_size, model_files)
    items = []
    for c in part["clusters"]:
        a = asg["clusters"][str(c["id"])]
        items.append({"id": c["id"], "size": c["size"], "tasks": c["tasks"],
                      "drafter": a["drafter"], "held_back": len(a["held_back"]),
                      "candidates": a["candidates"]})
    pt = load_file(str(ctx.work / "partition.safetensors"))
    manifest = ctx.manifest.data
    write_pool(ctx.out, model=model, drafters=entries, default_drafter=router.default,
               router=router, centroids=pt["centroids"], mean=pt.get("mean"),
               std=pt.get("std"), metric=part["metric"], clusters=items,
               target_name=cfg.target or "default",
               extra={"router": {k: v for k, v in route.items() if k not in ("clusters",)},
                      "partition": {k: part[k] for k in ("k", "metric", "silhouette", "purity",
                                                         "ari", "n")},
                      "build": {"prompts": str(cfg.prompts), "split": "train",
                                "per_task": cfg.per_task, "max_tokens": cfg.max_tokens,
                                "aligner": cfg.aligner, "assign_metric": cfg.assign_metric,
                                "assign_tokens": cfg.assign_tokens,
                                "stage_seconds": {s: manifest.get(s, {}).get("seconds")
                                                  for s in STAGES if s != "write"},
                                **cfg.extra}})
    return {"pool": str(ctx.out / "pool.json"), "drafters": used}
