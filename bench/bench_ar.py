"""Autoregressive tokens/s of the default target (batch 1, greedy), median of runs.

    python bench/bench_ar.py [--target PATH] [--tokens 64] [--runs 5]
"""
from __future__ import annotations

import argparse
import datetime
import statistics

import specrt
from specrt.measure import machine, measure


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--target", default=None)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--prompt", default="Write a short story about a robot who learns to paint.")
    args = ap.parse_args()
    eng = specrt.Engine.from_pretrained(args.target)
    p = specrt.SamplingParams(max_tokens=args.tokens, ignore_eos=True)
    row = {"prompt": args.prompt, "task": "ar"}
    measure(eng, [row], ["ar"], p)  # warm-up
    recs = measure(eng, [row] * args.runs, ["ar"], p)["ar"]
    rates = [r.stats["tokens_per_s"] for r in recs]
    print(f"device: {machine()}  date: {datetime.date.today()}")
    print(f"target: {args.target or 'SmolLM2-135M-Instruct (default)'}  "
          f"prompt tokens: {recs[-1].stats['prompt_tokens']}  new tokens: {args.tokens}")
    print(f"AR tokens/s (batch 1, greedy, incl. prefill): median {statistics.median(rates):.1f} "
          f"over {args.runs} runs  [min {min(rates):.1f}, max {max(rates):.1f}]")


if __name__ == "__main__":
    main()
