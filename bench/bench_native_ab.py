"""Before / after a kernel change, in one process: the default engine (routed pool,
adaptive draft length) and plain decoding on this build's kernels and on another
build's ``specrt._C``, interleaved prompt by prompt (order rotated), greedy, batch 1.

    python bench/bench_native_ab.py --before OLD/specrt/_C.cpython-311-x86_64-linux-gnu.so
        [--per-task 1] [--max-tokens 64] [--weights fp32|bf16] [--json OUT]

Build the "before" extension from the older commit in a separate worktree
(``git worktree add /tmp/old OLDREV && cd /tmp/old && python setup.py build_ext
--inplace``). Each configuration keeps its own draft-length rule (a fresh
:class:`~specrt.draft.adaptive.LengthController`), so the rule fits its costs to the
kernels it runs on: that is the question asked -- does the rule, seeing cheaper trees,
draft more, and does that pay. Per task: speedup over the same build's plain decoding,
mean accepted length (tokens per target forward), drafted tokens per step; greedy
outputs are checked equal to plain decoding in every mode.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

import specrt
from specrt import ops
from specrt.data import balanced_sample, default_prompts_path, load_prompts, split
from specrt.draft.adaptive import LengthController
from specrt.measure import Mode, machine, measure, report
from specrt.sampling import SamplingParams

from common import ab_by_task


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="the other build's specrt/_C*.so")
    ap.add_argument("--prompts", default=str(default_prompts_path()))
    ap.add_argument("--per-task", type=int, default=1, help="eval prompts per task")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--weights", choices=("fp32", "bf16"), default="fp32",
                    help="weights the target streams, in both builds (default fp32)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    old = ops.load_native(a.before)
    engine = specrt.Engine.from_pretrained(
        device="cpu", weight_dtype=torch.bfloat16 if a.weights == "bf16" else torch.float32)
    lc = engine.lengths
    fresh = LengthController(max_draft=lc.max_draft, prior=lc.prior,
                             prior_weight=lc.prior_weight, probe_every=lc.probe_every,
                             adaptive=lc.adaptive)
    before = lambda: ops.using_native(old)  # noqa: E731
    modes = [Mode("ar", speculative=False), Mode("default"),
             Mode("ar@before", speculative=False, context=before),
             Mode("default@before", using={"lengths": fresh}, context=before)]
    rows = balanced_sample(split(load_prompts(a.prompts))[1], a.per_task, seed=0)
    print(f"{machine()}; {len(rows)} eval prompts, {a.max_tokens} tokens, {a.weights} weights; "
          f"before = {a.before}")
    recs = measure(engine, rows, modes, SamplingParams(max_tokens=a.max_tokens), rotate=True,
                   history="mode", progress=True, desc="before/after")
    res = report(recs, modes)
    out = ab_by_task(res["modes"], [("before", "ar@before", "default@before"),
                                     ("after", "ar", "default")])
    print(f"plain tok/s after / before: {out['all']['after']['plain_tok_s'] / out['all']['before']['plain_tok_s']:.3f}; "
          f"default after / before: {out['all']['after']['tok_s'] / out['all']['before']['tok_s']:.3f}")
    print(f"greedy mismatches vs ar: {res['mismatches']}")
    if a.json:
        Path(a.json).write_text(json.dumps(
            {"date": datetime.date.today().isoformat(), "machine": machine(),
             "before": a.before, "weights": a.weights, "max_tokens": a.max_tokens, "by_task": out,
             "mismatches": res["mismatches"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
