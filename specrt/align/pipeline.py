"""``specrt align``: build a task-aware heterogeneous drafter pool for a target.

Stages (outputs under ``OUT/work``; a stage whose output exists with the same
parameters is skipped on a rerun, and redoing a stage redoes the ones after it):

a. ``collect``  -- target outputs (greedy, plain batched decoding) for a task-balanced
   subsample of the TRAIN split, in whole shards under ``work/collect/``
   (:mod:`specrt.draft.corpus`, shared with the baseline trainer), so an interrupted run
   resumes where it stopped.
b. ``features`` -- router features of every collected prompt (mean final-normed target
   state over the chat-templated prompt, as the engine computes online):
   ``features.safetensors``.
c. ``partition``-- k-means on the features (K given, or chosen by silhouette); purity and
   adjusted Rand index against the ``task`` labels are reported, never used;
   per cluster a held-back part of the TRAIN prompts is set aside for stages d/e/f,
   preferring prompts the baseline drafter was not trained on (its config's
   ``data.reserve_fraction``, :func:`specrt.data.is_reserved`):
   ``partition.json`` + ``partition.safetensors``.
d. ``align``    -- per cluster, a model drafter distilled on that cluster's target outputs
   (``specrt.draft.train.stage_train``: KL to the target's distribution): LoRA adapters
   on the baseline drafter (a few hundred KB; ``--align-lora 0``: full tuning), or the
   target's first layers when there is no baseline; teacher-forced draft accuracy on the
   cluster's held-back prompts before/after: ``align/aligned_<c>.*``, ``summary.json``.
   Pluggable (:data:`ALIGNERS`); ``--align none`` skips it.
e. ``assign``   -- per cluster, goodput (emitted tokens per wall second at batch 1) of
   each candidate drafter (aligned, baseline, n-gram, token recycling, suffix lookup,
   and fusions of those) on the cluster's held-back prompts, and its mean accepted
   length at a fixed draft budget; the best goodput and the candidates within
   ``--assign-margin`` of it tie, and the longest accepted length among them is
   assigned (:func:`pick_drafter`): ``assign.json``.
f. ``route``    -- the MLP routing head trained on (features, cluster) of the non-held
   prompts; accuracy on the held-back prompts and latency relative to a prefill:
   ``route.json`` + ``router.safetensors``.
g. ``write``    -- the pool directory ``OUT`` (``pool.json``, router, centroids, drafters).

The evaluation split of the prompt file (:func:`specrt.data.split`) is never read.

Modules: options in :mod:`~specrt.align.config` (one dataclass; the CLI is generated
from it), shared state in :mod:`~specrt.align.context`, one module per stage
(:mod:`~specrt.align.collect`, :mod:`~specrt.align.features`,
:mod:`~specrt.align.partition`, :mod:`~specrt.align.distill`,
:mod:`~specrt.align.assign`, :mod:`~specrt.align.route`, :mod:`~specrt.align.write`),
the selection policy in :mod:`~specrt.align.policy`, measurements by
:mod:`specrt.measure`. This module runs the stages in order and skips the finished ones.
"""
from __future__ import annotations

import hashlib
import shutil
import time
from pathlib import Path

from specrt.align.assign import _measure, stage_assign  # noqa: F401
from specrt.align.collect import select_rows, stage_collect
from specrt.align.config import (STAGES, AlignConfig, add_arguments,  # noqa: F401
                                 config_from_args)
from specrt.align.context import Ctx, baseline_path, jsonable, log
from specrt.align.distill import ALIGNERS, stage_align  # noqa: F401
from specrt.align.features import load_features, stage_features  # noqa: F401
from specrt.align.partition import stage_partition
from specrt.align.policy import pick_drafter  # noqa: F401
from specrt.align.route import stage_route
from specrt.align.write import stage_write
from specrt.draft.registry import candidate_drafters  # noqa: F401


def _clear_partial(work: Path, stage: str) -> None:
    """Delete the per-cluster progress of ``stage`` (align: ``align/aligned_*`` and
    ``summary.json``; assign: ``assign.json``) before it reruns with new inputs."""
    if stage == "align" and (work / "align").is_dir():
        for f in (work / "align").iterdir():
            if f.name.startswith("aligned_") or f.name in ("summary.json", "vocab.pt"):
                f.unlink()
    elif stage == "assign":
        (work / "assign.json").unlink(missing_ok=True)


# ------------------------------------------------------------------------------ run
def run_align(cfg: AlignConfig) -> dict:
    """Run (or resume) every stage; returns ``{stage: "ran" | "skipped", ...,
    "reports": {stage: summary}}``."""
    t_all = time.perf_counter()
    cfg.validate()
    rows, by_id = select_rows(cfg)  # clear errors for bad prompt files before any work
    if cfg.target is not None:
        from specrt.model import resolve_target

        resolve_target(cfg.target)  # unknown target: FileNotFoundError now
    total = (cfg.budget_minutes or 0) * 60 or None
    collect_s = (cfg.collect_minutes * 60 if cfg.collect_minutes is not None
                 else (0.4 * total if total else float("inf")))

    def left(reserve: float) -> float:
        """Seconds of the total budget left, less ``reserve`` x the total for the
        stages after this one (inf without a budget)."""
        if not total:
            return float("inf")
        return max(0.0, total - (time.perf_counter() - t_all) - reserve * total)

    def align_s() -> float:  # at most its 30%, and what the later stages leave it
        if cfg.align_minutes is not None:
            return cfg.align_minutes * 60
        return min(0.3 * total, left(0.2)) if total else 30 * 60

    def assign_s() -> float:  # what is left but a little for routing and writing
        return left(0.05)
    ctx = Ctx(cfg)
    status: dict = {"reports": {}}
    man = ctx.manifest
    tgt = cfg.target or "default"
    params = {
        "collect": {"prompts": str(Path(cfg.prompts).resolve()), "target": tgt,
                    "per_task": cfg.per_task, "max_tokens": cfg.max_tokens,
                    "max_prompt_chars": cfg.max_prompt_chars, "seed": cfg.seed,
                    "collect_from": cfg.collect_from},
    }
    params["features"] = dict(params["collect"])
    base_p = baseline_path(cfg)
    base_sig = None
    if base_p is not None:  # a retrained baseline redoes partition (held-back) onward
        base_sig = [str(base_p.resolve()), hashlib.sha256(base_p.read_bytes()).hexdigest()[:16]]
    params["partition"] = {"clusters": str(cfg.clusters), "k_min": cfg.k_min, "k_max": cfg.k_max,
                           "metric": cfg.metric, "hold_frac": cfg.hold_frac,
                           "assign_prompts": cfg.assign_prompts, "baseline": base_sig}
    params["align"] = {"aligner": cfg.aligner, "baseline": cfg.baseline, "kind": cfg.align_kind,
                       "layers": cfg.align_layers, "vocab": cfg.align_vocab,
                       "epochs": cfg.align_epochs, "lr": cfg.align_lr, "lora": cfg.align_lora,
                       "ttt": cfg.align_ttt}
    params["assign"] = {"candidates": list(cfg.candidates), "tokens": cfg.assign_tokens,
                        "metric": cfg.assign_metric, "rates": "per-cluster",
                        "margin": cfg.assign_margin, "tie": "margin", "cold": True,
                        "budget": cfg.assign_budget, "suffix": [cfg.suffix_window,
                                                                 cfg.suffix_min_prob]}
    params["route"] = {"hidden": cfg.router_hidden, "threshold": cfg.router_threshold,
                       "epochs": cfg.router_epochs}
    params["write"] = {"out": str(Path(cfg.out).resolve())}

    # collect: its file is reused across parameter changes only for the same outputs
    cp = params["collect"]
    old = man.data.get("collect", {}).get("params")
    same_out = old is not None and all(old.get(k) == cp[k] for k in
                                       ("prompts", "target", "max_tokens", "max_prompt_chars"))
    if old is not None and not same_out and ctx.collect_dir.is_dir() and not cfg.collect_from:
        log("collect: parameters changed; discarding the old collected shards")
        shutil.rmtree(ctx.collect_dir)
    if man.done("collect", cp):
        status["collect"] = "skipped"
    else:
        t0 = time.perf_counter()
        rep = stage_collect(ctx, rows, collect_s)
        status["reports"]["collect"] = rep
        if rep.get("new", 0) or not man.data.get("collect"):
            man.invalidate_after("collect")
        if rep["complete"]:
            man.mark("collect", cp, time.perf_counter() - t0)
        status["collect"] = "ran"
    want = {str(r["id"]) for r in rows}
    recs = [r for r in ctx.read_collect() if r["id"] in want]
    if not recs:
        raise ValueError("collect produced no sequences")

    def step(name, fn):
        if man.done(name, params[name]):
            status[name] = "skipped"
            return
        # align and assign resume per cluster; their partial outputs are kept only when
        # they were made with these very parameters (and the earlier stages unchanged)
        prog = man.data.get(name)
        if not (prog and prog.get("params") == jsonable(params[name])):
            _clear_partial(ctx.work, name)
        man.data[name] = {"done": False, "params": jsonable(params[name])}
        man.save()
        t0 = time.perf_counter()
        status["reports"][name] = fn()
        man.invalidate_after(name)
        man.mark(name, params[name], time.perf_counter() - t0)
        status[name] = "ran"

    step("features", lambda: stage_features(ctx, recs, by_id))
    step("partition", lambda: stage_partition(ctx))
    step("align", lambda: stage_align(ctx, align_s()))
    step("assign", lambda: stage_assign(ctx, by_id, assign_s()))
    step("route", lambda: stage_route(ctx, by_id))
    step("write", lambda: stage_write(ctx))
    status["seconds"] = round(time.perf_counter() - t_all, 1)
    log(f"pool written to {cfg.out} ({status['seconds']} s; stages: " + ", ".join(
        f"{s} {status.get(s)}" for s in STAGES) + ")")
    return status


def add_cli(sub) -> None:
    """Register ``specrt align`` on an argparse subparsers object (its options:
    :class:`~specrt.align.config.AlignConfig`'s fields)."""
    a = sub.add_parser("align", help="build a task-aware drafter pool (resumable stages)",
                       description=__doc__.split("\n\n")[0])
    add_arguments(a)
    a.set_defaults(func=lambda args: (run_align(config_from_args(args)), 0)[1])
