"""Stage d, ``align``: per cluster, a model drafter distilled on that cluster's target
outputs (:func:`specrt.draft.train.stage_train`: KL to the target's distribution) --
LoRA adapters on the baseline drafter (a few hundred KB; ``--align-lora 0``: full
tuning), or the target's first layers when there is no baseline; teacher-forced draft
accuracy on the cluster's held-back prompts before/after: ``align/aligned_<c>.*``,
``summary.json``. Pluggable (:data:`ALIGNERS`); ``--align none`` skips it."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from specrt.align.context import Ctx, log


def _align_distill(ctx: "Ctx", cluster: int, seqs: list[dict], out_stem: Path,
                   time_budget_s: float, held: list[dict] | None = None) -> dict | None:
    """Distil a model drafter on one cluster's sequences with
    :func:`specrt.draft.train.stage_train` -- LoRA adapters on the baseline drafter
    (``align_lora`` > 0 and a baseline exists) or full tuning of its layers; writes
    ``out_stem.{json,safetensors}``. With ``held`` (the cluster's held-back sequences)
    the teacher-forced draft accuracy before and after is measured on them. Returns a
    summary dict, or None when the drafter machinery is unavailable."""
    try:
        from specrt.draft.model import DraftNet
        from specrt.draft.train import (cpu_has_bf16, stage_train, stage_vocab,
                                        teacher_forced_accuracy)
    except ImportError as e:  # the model drafter is optional machinery
        log(f"align: model drafter / distillation not available ({e}); skipping")
        return None
    cfg = ctx.cfg
    model = ctx.model
    if ctx.baseline_cfg is not None:
        net = DraftNet.load(ctx.baseline_cfg, model)
        init = f"baseline {ctx.baseline_cfg.name}"
    else:
        vf = ctx.work / "align" / "vocab.pt"
        if vf.is_file():
            vocab = torch.load(vf)
        else:
            n = min(cfg.align_vocab, model.args.vocab_size)
            vocab = stage_vocab(ctx.all_train_seqs(), n, extra=sorted(ctx.eos_ids))
            torch.save(vocab, vf)
        net = DraftNet.from_target(model, arch=cfg.align_kind, num_layers=cfg.align_layers,
                                   vocab_ids=vocab)
        init = f"target layers 0..{cfg.align_layers - 1}"
    lora = cfg.align_lora if ctx.baseline_cfg is not None else 0
    if lora > 0:  # adapters on the baseline: kilobytes per cluster, base shared
        net.add_lora(lora, targets=("qkv", "o", "gate_up", "down"), seed=cfg.seed)
        net.train_lora_only()
        init += f" + LoRA r{lora}"
    lr = cfg.align_lr if cfg.align_lr is not None else (3e-3 if lora > 0 else 3e-4)
    steps = cfg.align_ttt if net.arch == "eagle3" else 1
    before = teacher_forced_accuracy(net, model, held, steps=steps) if held else None
    summary = stage_train(net, model, seqs, epochs=cfg.align_epochs, lr=lr,
                          max_len=256, batch_tokens=4096 if steps == 1 else 2048,
                          feat_weight=0.1 if net.arch == "eagle" else 0.0, seed=cfg.seed,
                          time_budget_s=time_budget_s, ttt_steps=steps, bf16=cpu_has_bf16())
    if held:
        after = teacher_forced_accuracy(net, model, held, steps=steps)
        summary["heldout"] = {"positions": after["positions"],
                              "baseline_top1": before["top1"], "aligned_top1": after["top1"],
                              "baseline_top3": before["top3"], "aligned_top3": after["top3"]}
        if steps > 1:
            summary["heldout"].update(chain_budget=steps,
                                      baseline_chain=before["chain_accepted"],
                                      aligned_chain=after["chain_accepted"])
        log(f"align: cluster {cluster}: held-back draft accuracy (teacher forced, top-1) "
             f"{before['top1']:.3f} -> {after['top1']:.3f} over {after['positions']} positions")
    meta = {"runtime": ctx.baseline_runtime, "aligned": {
        "cluster": cluster, "init": init, "sequences": len(seqs), "train": summary}}
    net.save(out_stem.with_suffix(".safetensors"), out_stem.with_suffix(".json"), meta,
             base=ctx.baseline_cfg if lora > 0 else None)
    return {"init": init, "sequences": len(seqs), **summary}


def _taps_of(ctx: "Ctx") -> tuple[int, ...]:
    """The target layers the run's drafters read: an eagle3 baseline's (or a fresh eagle3
    drafter's) feature layers plus the last, else none."""
    if ctx.baseline_cfg is not None:
        fl = json.loads(ctx.baseline_cfg.read_text()).get("feature_layers") or []
    elif ctx.cfg.align_kind == "eagle3":
        from specrt.draft.eagle3 import default_feature_layers

        fl = default_feature_layers(ctx.model.args.num_hidden_layers)
    else:
        fl = []
    return tuple(sorted(set(fl) | {ctx.model.args.num_hidden_layers - 1})) if fl else ()


ALIGNERS = {"distill": _align_distill}
"""Per-cluster aligners: ``f(ctx, cluster, seqs, out_stem, time_budget_s, held) ->
summary | None`` writing a model drafter (``DraftNet.save`` format) to
``out_stem.{json,safetensors}``; ``held`` are the cluster's held-back sequences."""


def stage_align(ctx: Ctx, budget_s: float) -> dict:
    """Per cluster, align a model drafter on the cluster's non-held sequences with the
    configured aligner; resumable per cluster. ``budget_s`` bounds the stage: each
    cluster gets its share of the time left, its sequences' target states and held-back
    evaluation included. Writes ``align/summary.json``."""
    cfg = ctx.cfg
    (ctx.work / "align").mkdir(exist_ok=True)
    if cfg.aligner == "none":
        log("align: skipped (--align none); candidates are the baseline and model-free drafters")
        return {"skipped": True}
    if cfg.aligner not in ALIGNERS:
        raise ValueError(f"unknown aligner {cfg.aligner!r}; have {sorted(ALIGNERS)} or 'none'")
    part = ctx.read("partition")
    held = set(part["held"])
    recs: dict[str, list[dict]] = {}  # every collected record of a prompt (samples too)
    for r in ctx.read_collect(all_samples=True):
        recs.setdefault(r["id"], []).append(r)
    summ_p = ctx.work / "align" / "summary.json"
    summary = json.loads(summ_p.read_text()) if summ_p.is_file() else {}
    k = part["k"]
    clusters = range(k)
    if cfg.progress:
        from tqdm import tqdm

        clusters = tqdm(clusters, desc="d) align", unit="cluster")
    t0 = time.perf_counter()
    for c in clusters:
        stem = ctx.work / "align" / f"aligned_{c}"
        if stem.with_suffix(".json").is_file() and str(c) in summary:
            continue
        mem = [i for i, lab in zip(part["ids"], part["labels"]) if lab == c and i not in held]
        if not mem:
            summary[str(c)] = None
            continue
        # this cluster's share of the time left; its data's target states and the
        # held-back evaluation (before and after, about as long as the states) come out
        # of it, the training gets the rest
        t_c = time.perf_counter()
        share = max(0.0, budget_s - (t_c - t0)) / (k - c)
        taps = _taps_of(ctx)
        seqs = ctx.sequences([x for i in mem for x in recs.get(i, [])], taps)
        hv = [i for i, lab in zip(part["ids"], part["labels"]) if lab == c and i in held
              and i in recs]
        held_seqs = ctx.sequences([x for i in hv for x in recs[i] if x["sample"] == 0],
                                  taps) if hv else None
        spent = time.perf_counter() - t_c  # the training keeps at least a quarter
        s = ALIGNERS[cfg.aligner](ctx, c, seqs, stem, max(0.25 * share, share - 2 * spent),
                                  held_seqs)
        if s is None:
            return {"skipped": True}
        summary[str(c)] = s
        summ_p.write_text(json.dumps(summary, indent=1))
    summ_p.write_text(json.dumps(summary, indent=1))
    return {"clusters": k}
