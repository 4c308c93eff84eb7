"""Quick end-to-end measurement of drafters on the default target (not a test).

Greedy, batch 1, on task-balanced EVAL-split prompts: tokens/s of the target alone and
of each drafter configuration, acceptance rate, tokens per target forward (mean
accepted length, bonus included), and the split of wall time between drafting and the
rest (target verify + bookkeeping), milliseconds per drafted token, acceptance by draft
position, and per task the mean accepted length (with its average over tasks).
Configurations are interleaved prompt by prompt so that load changes on a shared machine
hit all of them alike.

    python bench/bench_drafters.py --per-task 2 --max-tokens 64 \\
        --configs ar ngram:5 chain:5 tree:8 --drafter specrt/pools/default/baseline.json

Config syntax: ``ar`` | ``ngram:K`` | ``chain:K[:THRESHOLD]`` | ``tree:K[:THRESHOLD]``,
prefixed ``adaptive-`` to let the engine's length controller pick budgets up to K
(otherwise budgets are pinned to K). ``PATH=config`` uses another drafter file; a
suffix ``@fp32`` / ``@bf16`` sets the model drafter's weight dtype (default: its
``auto``). ``--weights bf16`` streams the target's weights as bf16.

    python bench/bench_drafters.py --per-task 2 --max-tokens 64 \
        --configs ar chain:4:0@fp32 chain:4:0@bf16
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from specrt.draft.registry import SHIPPED_BASELINE
from specrt.measure import Mode, measure, summarize

DEFAULT = SHIPPED_BASELINE


class _Config:
    """One configuration: its drafter (or None), budget, length rule and draft time."""

    def __init__(self, spec: str, engine, default_drafter: str, topk: int):
        from specrt.draft.adaptive import LengthController
        from specrt.draft.registry import lookup_drafter, model_drafter

        self.spec = spec
        spec, _, weights = spec.partition("@")
        path, _, body = spec.rpartition("=")
        parts = body.split(":")
        kind = parts[0]
        self.K = int(parts[1]) if len(parts) > 1 else 0
        self.adaptive = kind.startswith("adaptive-")
        kind = kind.replace("adaptive-", "")
        self.drafter = None
        if kind == "ngram":
            self.drafter = lookup_drafter("ngram", engine.model.args.vocab_size)
        elif kind in ("chain", "tree"):
            kw = {"mode": kind, "topk": topk, "weights": weights or "auto"}
            if len(parts) > 2:
                kw["threshold"] = float(parts[2])
            self.drafter = model_drafter(path or default_drafter, engine.model, name="m",
                                         runtime=kw)
        elif kind != "ar":
            raise ValueError(f"unknown config {spec!r}")
        self.draft_s = 0.0
        d = self.drafter
        # each configuration generates with its own drafter and length rule (budgets up
        # to K; pinned to K unless adaptive-)
        self.mode = Mode(self.spec, drafter=d.name if d else None, speculative=d is not None,
                         using={"drafters": [d] if d else [],
                                "lengths": LengthController(max_draft=self.K,
                                                            adaptive=self.adaptive)})
        if d is not None:
            orig = d.propose

            def timed(seqs, budgets):
                t = time.perf_counter()
                out = orig(seqs, budgets)
                self.draft_s += time.perf_counter() - t
                return out

            d.propose = timed

    def summary(self, recs) -> dict:
        """The configuration's figures over its records so far (engine-timed)."""
        from specrt.measure import by_task

        s = summarize(recs, clock="engine")
        el = s["elapsed_s"]
        steps = max(s["steps"], 1)
        tasks = {t: v for t, v in by_task(recs, clock="engine").items() if t != "all"}
        return {
            "by_task": {t: {"mean_accepted_length": round(v["emitted_per_step"], 3),
                            "tokens_per_s": round(v["tokens_per_s"], 2)}
                        for t, v in tasks.items()},
            "mean_accepted_length_task_avg": round(
                sum(v["emitted_per_step"] for v in tasks.values()) / max(len(tasks), 1), 3),
            "acceptance_by_depth": [round(x, 3) for x in s["acceptance_by_depth"]],
            "ms_per_drafted_token": round(1000 * self.draft_s / max(s["drafted_tokens"], 1), 2),
            "config": self.spec,
            "draft_weights": getattr(self.drafter, "weights", None), "tokens_per_s": round(s["tokens_per_s"], 2),
            "acceptance_rate": round(s["acceptance_rate"], 3),
            "mean_accepted_length": round(s["emitted_per_step"], 3),
            "drafted_per_step": round(s["drafted_tokens"] / steps, 2),
            "total_s": round(el, 1), "draft_share": round(self.draft_s / el, 3),
            "ms_per_step_draft": round(1000 * self.draft_s / steps, 1),
            "ms_per_step_verify_rest": round(1000 * (el - self.draft_s) / steps, 1),
        }


def main(argv=None) -> list[dict]:
    """Run the configurations given on the command line; print one JSON line each."""
    import specrt
    from specrt.data import balanced_sample, default_prompts_path, load_prompts, split

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-task", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--drafter", default=str(DEFAULT), help="model drafter config (.json)")
    ap.add_argument("--configs", nargs="+", default=["ar", "ngram:5", "chain:5", "tree:8"])
    ap.add_argument("--json", default=None, help="write the summaries here")
    ap.add_argument("--topk", type=int, default=3, help="tree branching")
    ap.add_argument("--weights", choices=["fp32", "bf16"], default="fp32",
                    help="the target's weight dtype")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    eng = specrt.Engine.from_pretrained(device="cpu", max_batch=1, drafters=[])
    if a.weights == "bf16":
        eng.model.use_weight_dtype(torch.bfloat16)
    rows = balanced_sample(split(load_prompts(default_prompts_path()))[1], a.per_task, seed=1)
    cfgs = [_Config(c, eng, a.drafter, a.topk) for c in a.configs]

    def after(i, recs):
        print(f"prompt {i + 1}/{len(rows)} done", flush=True)
        if (i + 1) % 4 == 0 and i + 1 < len(rows):  # running figures (partial runs)
            for c in cfgs:
                print("partial " + json.dumps(c.summary(recs[c.spec])), flush=True)

    recs = measure(eng, rows, [c.mode for c in cfgs],
                   specrt.SamplingParams(max_tokens=a.max_tokens), after_prompt=after)
    out = [c.summary(recs[c.spec]) | {"prompts": len(rows), "max_tokens": a.max_tokens}
           for c in cfgs]
    for o in out:
        print(json.dumps(o), flush=True)
    if a.json:
        from specrt.measure import machine

        Path(a.json).write_text(json.dumps({"machine": machine(), "configs": out}, indent=1))
    return out


if __name__ == "__main__":
    main()
