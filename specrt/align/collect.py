"""Stage a, ``collect``: the target's greedy outputs for a task-balanced subsample of
the TRAIN split, through the engine with its default drafter, batched; appended to
``collect.jsonl`` chunk by chunk, so an interrupted run resumes where it stopped."""
from __future__ import annotations

import json
import time

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
    """Generate the target's greedy outputs for ``rows`` (chunks of ``gen_batch``),
    appending one JSON line per prompt to ``collect.jsonl``: ``{id, task, prompt_ids,
    output_ids, finish_reason}``. Prompts already in the file are skipped."""
    from specrt.sampling import SamplingParams

    cfg = ctx.cfg
    path = ctx.work / "collect.jsonl"
    have = {r["id"] for r in ctx.read_collect()}
    todo = [r for r in rows if str(r["id"]) not in have]
    log(f"collect: {len(rows)} train prompts, {len(rows) - len(todo)} already collected")
    if not todo:
        return {"prompts": len(rows), "new": 0, "complete": True}
    eng = ctx.engine
    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=len(rows), initial=len(rows) - len(todo), desc="a) collect",
                   unit="prompt")
    t0 = time.perf_counter()
    new = 0
    ctx_len = eng.model.args.max_position_embeddings
    complete = True
    for c in range(0, len(todo), cfg.gen_batch):
        if c > 0 and time.perf_counter() - t0 > budget_s:  # at least one chunk per run
            log(f"collect: time budget reached ({len(todo) - c} prompts left; rerun to resume)")
            complete = False
            break
        part = todo[c:c + cfg.gen_batch]
        texts, ok = [], []
        for r in part:
            t = shorten_prompt(r["prompt"], cfg.max_prompt_chars)
            n = len(eng.tokenizer.encode_prompt(t))
            if n + 2 >= ctx_len:
                log(f"collect: prompt {r['id']} too long ({n} tokens), skipped")
                continue
            texts.append(t)
            ok.append(r)
        if not ok:
            continue
        outs = eng.generate(texts, SamplingParams(max_tokens=cfg.max_tokens))
        with path.open("a") as f:
            for r, t, o in zip(ok, texts, outs):
                f.write(json.dumps({"id": str(r["id"]), "task": r["task"],
                                    "prompt_ids": eng.tokenizer.encode_prompt(t),
                                    "output_ids": o.token_ids,
                                    "finish_reason": o.finish_reason}) + "\n")
        new += len(ok)
        if bar is not None:
            bar.update(len(part))
    if bar is not None:
        bar.close()
    return {"prompts": len(rows), "new": new, "complete": complete,
            "seconds": round(time.perf_counter() - t0, 1)}
