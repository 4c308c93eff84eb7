"""Stage a, ``collect``: the target's greedy outputs for a task-balanced subsample of
the TRAIN split, through the shared collector (:mod:`specrt.draft.corpus`, the one the
baseline trainer uses): batched plain decoding, whole shards under ``work/collect/``, so
an interrupted run resumes where it stopped."""
from __future__ import annotations

from specrt.align.config import AlignConfig
from specrt.align.context import Ctx, log
from specrt.data import shorten_prompt


def select_rows(cfg: AlignConfig) -> tuple[list[dict], dict[str, dict]]:
    """The prompts to collect (task-balanced, tasks interleaved) and every TRAIN-split
    row by id. The evaluation split is never read."""
    from specrt.data import balanced_sample, interleave_tasks, load_prompts, split

    rows = load_prompts(cfg.prompts)
    train, _ = split(rows)  # the eval split is never read here
    if not train:
        raise ValueError(f"{cfg.prompts}: no prompts in the train split")
    sel = interleave_tasks(balanced_sample(train, cfg.per_task, seed=cfg.seed))
    return sel, {str(r["id"]): r for r in train}


def stage_collect(ctx: Ctx, rows: list[dict], budget_s: float) -> dict:
    """The target's greedy outputs for ``rows`` (plain decoding, ``gen_batch`` at a
    time) through the shared collector, :func:`specrt.draft.corpus.collect`: shards of
    ``{id, task, sample, temperature, prompt_ids, output_ids, finish_reason}`` under
    ``work/collect/``, written whole; prompts already collected are skipped, so an
    interrupted run resumes. No new request starts after ``budget_s`` seconds."""
    from specrt.draft import corpus

    cfg = ctx.cfg
    if cfg.collect_from:  # a collection made before: read, never written
        n = len(ctx.read_collect())
        log(f"collect: {n} prompts collected in {cfg.collect_from} (--collect-from)")
        return {"prompts": len(rows), "new": 0, "complete": True, "from": cfg.collect_from}
    eng = ctx.engine
    ctx_len = eng.model.args.max_position_embeddings
    texts = [dict(r, prompt=shorten_prompt(r["prompt"], cfg.max_prompt_chars)) for r in rows]
    items = corpus.plan(texts, eng.tokenizer.encode_prompt,
                        max_prompt_tokens=ctx_len - 3)
    skipped = len(rows) - len(items)
    if skipped:
        log(f"collect: {skipped} prompts too long for the context, skipped")
    have = sum(1 for r in ctx.read_collect())
    log(f"collect: {len(items)} train prompts, {have} already collected")
    rep = corpus.collect(eng, items, ctx.collect_dir, max_tokens=cfg.max_tokens,
                         batch=cfg.gen_batch, shard_size=max(8, cfg.gen_batch * 2),
                         budget_s=budget_s, progress=cfg.progress)
    ctx.forget_collect()
    return {"prompts": len(rows), "new": rep["new"], "complete": rep["complete"],
            "seconds": rep["seconds"], "tok_per_s": rep["tok_per_s"]}
