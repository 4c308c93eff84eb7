"""fp32 against bf16 weights, in one process: does the draft-length rule, seeing the
cheaper steps of bf16 weights, draft more, and does speculation pay more?

The default engine (routed pool, adaptive draft length) and plain decoding, each on the
fp32 target and on a second copy of it loaded with ``weight_dtype=torch.bfloat16``
(the engine's model swapped in for the bf16 modes; the pool and its drafters are the
same), interleaved prompt by prompt (order rotated), greedy, batch 1. Each weight dtype
keeps its own length rule (a fresh :class:`~specrt.draft.adaptive.LengthController`
for bf16), so the rule fits its costs to the steps it runs. Per task: speedup over the
same weights' plain decoding, mean accepted length (tokens per target forward) and
drafted tokens per step. Greedy outputs are checked against plain decoding of the same
weights (bf16 is another arithmetic: its tokens are compared with bf16 plain decoding).

    python bench/bench_weights_ab.py [--per-task 1] [--max-tokens 64] [--json OUT]
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

import specrt
from specrt.data import balanced_sample, default_prompts_path, load_prompts, split
from specrt.draft.adaptive import LengthController
from specrt.measure import Mode, machine, measure, mismatches, report
from specrt.model import load_model
from specrt.sampling import SamplingParams

from common import ab_by_task


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default=str(default_prompts_path()))
    ap.add_argument("--per-task", type=int, default=1, help="eval prompts per task")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    engine = specrt.Engine.from_pretrained(device="cpu")
    bf16_model, _ = load_model(None, device="cpu", weight_dtype=torch.bfloat16)
    lc = engine.lengths
    fresh = LengthController(max_draft=lc.max_draft, prior=lc.prior,
                             prior_weight=lc.prior_weight, probe_every=lc.probe_every,
                             adaptive=lc.adaptive)

    @contextmanager
    def bf16():
        saved = engine.model
        engine.model = bf16_model
        try:
            yield
        finally:
            engine.model = saved

    modes = [Mode("ar", speculative=False), Mode("default"),
             Mode("ar@bf16", speculative=False, context=bf16),
             Mode("default@bf16", using={"lengths": fresh}, context=bf16)]
    rows = balanced_sample(split(load_prompts(a.prompts))[1], a.per_task, seed=0)
    print(f"{machine()}; {len(rows)} eval prompts, {a.max_tokens} tokens")
    recs = measure(engine, rows, modes, SamplingParams(max_tokens=a.max_tokens), rotate=True,
                   history="mode", progress=True, desc="fp32/bf16")
    res = report(recs, modes)
    out = ab_by_task(res["modes"], [("fp32", "ar", "default"),
                                     ("bf16", "ar@bf16", "default@bf16")])
    bad = {"default": mismatches(recs)["default"],
           "default@bf16": mismatches(recs, ref="ar@bf16")["default@bf16"]}
    print(f"plain tok/s bf16 / fp32: {out['all']['bf16']['plain_tok_s'] / out['all']['fp32']['plain_tok_s']:.3f}; "
          f"default bf16 / fp32: {out['all']['bf16']['tok_s'] / out['all']['fp32']['tok_s']:.3f}")
    print(f"greedy mismatches against plain decoding of the same weights: {bad}")
    if a.json:
        Path(a.json).write_text(json.dumps(
            {"date": datetime.date.today().isoformat(), "machine": machine(),
             "max_tokens": a.max_tokens, "by_task": out, "mismatches": bad}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
