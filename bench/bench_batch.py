"""Batched decoding on the default target: tokens/s at batch 1 (prompt by prompt) and at
larger batches (all prompts at once), plain and speculative, interleaved round by round.

Eval-split prompts (``--per-task`` per task), ``--max-tokens`` each with EOS ignored,
greedy. Every batched run must give the same tokens as batch 1 (checked, each
arithmetic against itself). Modes: ``plain``, ``spec`` (the default engine),
``plain_ops`` / ``spec_ops``, the same with the model run op by op from Python (the path
before the native decoder), ``plain_bf16`` / ``spec_bf16``, the same with the weights
streamed as bf16 (another arithmetic, so its tokens are checked against its own batch-1
run), ``plain_high`` / ``spec_high`` and ``plain_fp32`` / ``spec_fp32``, fp32 weights
at "high" (bf16x3) or "highest" (fp32) precision (``Llama.use_fp32_precision``; ``plain``
and ``spec`` run the engine's own, ``load_model``'s "auto" on this CPU),
and ``spec_whole`` / ``spec_whole_bf16``, speculation with the length rule's
per-node part off (``LengthController.per_node``: trees verified whole, every fused
member drafting).

    python bench/bench_batch.py [--per-task 2] [--max-tokens 64] [--batches 1,16]
        [--rounds 2] [--schedule continuous|static] [--json F]

``--schedule continuous`` (default) submits every prompt at once with the engine's batch
capped at BATCH, which admits a waiting request as soon as one finishes (how a server
runs); ``static`` runs groups of BATCH that each wait for their slowest request (the
schedule of the figures before 2026-12-06's fifth session).
"""
from __future__ import annotations

import argparse
import datetime
import json
import time
from contextlib import contextmanager

import torch

import specrt
from specrt.data import balanced_sample, default_prompts_path, load_prompts, split
from specrt.draft.adaptive import LengthController
from specrt.measure import machine
from specrt.model import llama

MODES = {"plain": dict(speculative=False), "spec": dict(),
         "plain_ops": dict(speculative=False), "spec_ops": dict(),
         "plain_bf16": dict(speculative=False), "spec_bf16": dict(),
         "spec_whole": dict(), "spec_whole_bf16": dict(),
         "plain_high": dict(speculative=False), "spec_high": dict(),
         "plain_fp32": dict(speculative=False), "spec_fp32": dict()}


def arithmetic(mode: str) -> str:
    """The arithmetic ``mode`` runs (its tokens are checked against that one's first
    run): ``ops`` (op by op), ``bf16``, else the fp32 precision, ``high`` or ``highest``."""
    for k in ("ops", "bf16"):
        if mode.endswith("_" + k):
            return k
    return precision(mode)


def precision(mode: str) -> str:
    """The fp32 precision ``mode`` runs: ``*_high`` high, ``*_fp32`` highest, else the
    engine's own."""
    return ("high" if mode.endswith("_high") else "highest" if mode.endswith("_fp32")
            else DEFAULT_PRECISION[0])


#: the engine's own fp32 precision (``load_model``'s ``"auto"`` on this CPU), set in main
DEFAULT_PRECISION = ["highest"]


@contextmanager
def path(mode: str, engine, warm, rules: dict):
    """``*_ops`` modes run the model op by op from Python (the path before the native
    decoder, csrc/decoder_cpu.cpp); ``*_bf16`` modes stream bf16 weights (``warm()`` then
    packs them outside the timing); ``spec_whole*`` turn the per-node rule off; the
    others the shipped path. Each mode keeps its own length rule (``rules[mode]``, its
    learned rates and costs carried from round to round), so no mode runs on what
    another learned."""
    fusable = llama.Llama._fusable
    if mode.endswith("_ops"):
        llama.Llama._fusable = lambda *a: False
    want = torch.bfloat16 if mode.endswith("_bf16") else torch.float32
    prec = precision(mode)
    if engine.model.weight_dtype is not want or engine.model.fp32_precision != prec:
        engine.model.use_weight_dtype(want).use_fp32_precision(prec)
        warm()
    lc = engine.lengths
    rule = rules.setdefault(mode, LengthController(
        max_draft=lc.max_draft, adaptive=lc.adaptive, per_node="_whole" not in mode))
    try:
        with engine.using(lengths=rule):
            yield
    finally:
        llama.Llama._fusable = fusable


def run(engine, prompts, batch, params, kw, schedule="continuous"):
    """(seconds, outputs) of ``prompts`` at most ``batch`` at a time: ``continuous``
    submits them all and the engine admits a waiting request whenever one finishes (as
    a server runs); ``static`` runs them in groups of ``batch``, each group waiting for
    its slowest request (speculation's uneven step counts then idle the others)."""
    outs, t0 = [], time.perf_counter()
    if schedule == "continuous":
        with engine.using(max_batch=batch):
            outs = engine.generate(prompts, params, **kw)
    else:
        for i in range(0, len(prompts), batch):
            outs += engine.generate(prompts[i:i + batch], params, **kw)
    return time.perf_counter() - t0, outs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-task", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--modes", default="plain,spec")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-prompt-chars", type=int, default=2000)
    ap.add_argument("--schedule", choices=("continuous", "static"), default="continuous",
                    help="continuous: all prompts submitted, at most BATCH running (default); "
                         "static: groups of BATCH, each waiting for its slowest")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = balanced_sample(split(load_prompts(default_prompts_path()))[1], args.per_task, seed=0)
    prompts = [r["prompt"][:args.max_prompt_chars] for r in rows]
    engine = specrt.Engine.from_pretrained(device="cpu", max_batch=max(
        int(b) for b in args.batches.split(",")))
    DEFAULT_PRECISION[0] = engine.model.fp32_precision
    params = specrt.SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    batches = [int(b) for b in args.batches.split(",")]
    modes = args.modes.split(",")
    print(f"device: {machine()}  threads: {torch.get_num_threads()}  date: "
          f"{datetime.date.today()}  prompts: {len(prompts)} (eval split)  "
          f"max_tokens {args.max_tokens}  rounds {args.rounds}  schedule {args.schedule}  "
          f"fp32 precision {DEFAULT_PRECISION[0]} (modes *_fp32: highest, *_high: high)")
    def warm():                                              # packs the weights
        run(engine, prompts[:2], 2, specrt.SamplingParams(max_tokens=2, ignore_eos=True), {})

    warm()
    secs = {(m, b): 0.0 for m in modes for b in batches}
    ref, same, stats, rules = {}, {}, {}, {}
    for r in range(args.rounds):
        order = [(m, b) for m in modes for b in batches]
        order = order[r % len(order):] + order[:r % len(order)]
        for m, b in order:
            with path(m, engine, warm, rules):
                s, outs = run(engine, prompts, b, params, MODES[m], args.schedule)
            secs[(m, b)] += s
            toks = [o.token_ids for o in outs]
            # each arithmetic against itself: fp32 fused, op by op, bf16
            key = arithmetic(m)
            ref.setdefault(key, toks)
            same[(m, b)] = same.get((m, b), True) and toks == ref[key]
            stats[(m, b)] = sum(o.stats["mean_accepted_length"] for o in outs) / len(outs)
    n = len(prompts) * args.max_tokens * args.rounds
    res = []
    base = n / secs[(modes[0], batches[0])]
    print(f"{'mode':>6} {'batch':>5} {'tok/s':>8} {'x ' + modes[0] + ' b' + str(batches[0]):>11} "
          f"{'x own b1':>9} {'acc.len':>8} {'same tokens':>12}")
    for m in modes:
        for b in batches:
            tps = n / secs[(m, b)]
            own = n / secs[(m, batches[0])]
            res.append({"mode": m, "batch": b, "tokens_per_s": round(tps, 2),
                        "x_base": round(tps / base, 3), "x_own_b1": round(tps / own, 3),
                        "mean_accepted_length": round(stats[(m, b)], 3),
                        "same_tokens": same[(m, b)]})
            print(f"{m:>6} {b:>5} {tps:8.1f} {tps / base:11.2f} {tps / own:9.2f} "
                  f"{stats[(m, b)]:8.2f} {str(same[(m, b)]):>12}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": machine(), "date": str(datetime.date.today()),
                       "threads": torch.get_num_threads(), "prompts": len(prompts),
                       "max_tokens": args.max_tokens, "rounds": args.rounds,
                       "schedule": args.schedule, "fp32_precision": DEFAULT_PRECISION[0],
                       "rows": res},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
