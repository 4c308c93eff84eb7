"""Top-p (nucleus) filtering: the whole-vocabulary sort against the top-k search that
:func:`specrt.sampling.logits_to_probs` runs now, on the target's own logits.

1. The filter alone: the target's logits at the positions of a few eval prompts (so the
   nucleus has the width real text gives it), rows at a time as a decoding step has them.
2. End to end: plain decoding at temperature 0.8, top-p 0.95, seeded, at batch 1 and at
   ``--batch`` requests in flight, with each filter (the sort patched back in for the
   baseline), interleaved ``--rounds`` times; the tokens of both must be equal.

    python bench/bench_sampling.py [--per-task 1] [--max-tokens 64] [--batch 16]
        [--rounds 2] [--json OUT]
"""
from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

import specrt
import specrt.sampling as S
from specrt.align.features import target_hidden
from specrt.data import balanced_sample, default_prompts_path, load_prompts, split
from specrt.measure import machine


def sort_nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The filter before 2026-12-06 (sixth session): a full descending sort per row."""
    sp, idx = torch.sort(probs, dim=-1, descending=True)
    drop = (sp.cumsum(-1) - sp) >= top_p
    sp = sp.masked_fill(drop, 0.0)
    probs = torch.zeros_like(probs).scatter_(-1, idx, sp)
    return probs / probs.sum(-1, keepdim=True)


def _time(f, n: int) -> float:
    f()
    t = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t) / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-task", type=int, default=1, help="eval prompts per task")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16, help="requests in flight (second run)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    eng = specrt.Engine.from_pretrained(device="cpu", drafters=[])
    rows = balanced_sample(split(load_prompts(default_prompts_path()))[1], a.per_task, seed=0)
    print(f"{machine()}; {len(rows)} eval prompts")
    new_nucleus = S._nucleus
    res: dict = {"date": datetime.date.today().isoformat(), "machine": machine(),
                 "filter": {}, "decode": {}}

    # 1. the filter alone, on real logits (temperature 0.8)
    with torch.inference_mode():
        ids = [eng.tokenizer.encode_prompt(r["prompt"])[:256] for r in rows]
        logits = torch.cat([eng.model.logits(h) for h in target_hidden(eng.model, ids)])
    probs = torch.softmax(logits.float() / 0.8, -1)
    order = torch.randperm(probs.shape[0], generator=torch.Generator().manual_seed(0))
    for n in (1, 8, 32):
        p = probs[order[:n]]
        ts = _time(lambda: sort_nucleus(p, 0.95), 20)
        tn = _time(lambda: new_nucleus(p, 0.95), 20)
        same = torch.equal(sort_nucleus(p, 0.95) > 0, new_nucleus(p, 0.95) > 0)
        res["filter"][n] = {"sort_ms": ts * 1e3, "topk_ms": tn * 1e3, "ratio": ts / tn,
                            "same_support": same}
        print(f"filter, {n:2d} rows: sort {ts * 1e3:7.2f} ms, top-k search "
              f"{tn * 1e3:6.2f} ms, {ts / tn:5.1f}x; same nucleus: {same}")

    # 2. end to end
    prompts = [r["prompt"] for r in rows]
    for batch in (1, a.batch):
        tot = {"sort": [0, 0.0], "topk": [0, 0.0]}
        toks = {}
        with eng.using(max_batch=batch):
            for _ in range(a.rounds):
                for name, f in (("sort", sort_nucleus), ("topk", new_nucleus)):
                    S._nucleus = f
                    ps = [specrt.SamplingParams(max_tokens=a.max_tokens, temperature=0.8,
                                                top_p=0.95, seed=100 + i, ignore_eos=True)
                          for i in range(len(prompts))]
                    t = time.perf_counter()
                    outs = eng.generate(prompts, ps, speculative=False)
                    tot[name][1] += time.perf_counter() - t
                    tot[name][0] += sum(len(o.token_ids) for o in outs)
                    toks[name] = [list(o.token_ids) for o in outs]
        S._nucleus = new_nucleus
        rate = {k: v[0] / v[1] for k, v in tot.items()}
        equal = toks["sort"] == toks["topk"]
        res["decode"][batch] = {"sort_tok_s": rate["sort"], "topk_tok_s": rate["topk"],
                                "ratio": rate["topk"] / rate["sort"], "tokens_equal": equal}
        print(f"decode at batch {batch:2d} (T=0.8, top-p 0.95): sort {rate['sort']:6.1f} tok/s, "
              f"top-k search {rate['topk']:6.1f} tok/s, {rate['topk'] / rate['sort']:.2f}x; "
              f"tokens equal: {equal}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
