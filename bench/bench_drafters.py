"""Quick end-to-end measurement of drafters on the default target (not a test).

Greedy, batch 1, on task-balanced EVAL-split prompts: tokens/s of the target alone and
of each drafter configuration, acceptance rate, tokens per target forward (mean
accepted length, bonus included), and the split of wall time between drafting and the
rest (target verify + bookkeeping). Configurations are interleaved prompt by prompt so
that load changes on a shared machine hit all of them alike.

    python bench/bench_drafters.py --per-task 2 --max-tokens 64 \\
        --configs ar ngram:5 chain:5 tree:8 --drafter specrt/pools/default/baseline.json

Config syntax: ``ar`` | ``ngram:K`` | ``chain:K[:THRESHOLD]`` | ``tree:K[:THRESHOLD]``,
prefixed ``adaptive-`` to let the engine's length controller pick budgets up to K
(otherwise budgets are pinned to K). ``PATH=config`` uses another drafter file.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

DEFAULT = Path(__file__).resolve().parents[1] / "specrt/pools/default/baseline.json"


class _Config:
    """One configuration: its drafter (or None), budget and accumulated statistics."""

    def __init__(self, spec: str, engine, default_drafter: str, topk: int):
        from specrt.draft import NgramDrafter
        from specrt.draft.model import ModelDrafter

        self.spec = spec
        path, _, body = spec.rpartition("=")
        parts = body.split(":")
        kind = parts[0]
        self.K = int(parts[1]) if len(parts) > 1 else 0
        self.adaptive = kind.startswith("adaptive-")
        kind = kind.replace("adaptive-", "")
        self.drafter = None
        if kind == "ngram":
            self.drafter = NgramDrafter(name="ngram")
        elif kind in ("chain", "tree"):
            kw = {"mode": kind, "topk": topk}
            if len(parts) > 2:
                kw["threshold"] = float(parts[2])
            self.drafter = ModelDrafter.load(path or default_drafter, engine.model,
                                             name="m", **kw)
        elif kind != "ar":
            raise ValueError(f"unknown config {spec!r}")
        self.lengths = None
        self.draft_s = 0.0
        self.tot = dict(tokens=0, elapsed=0.0, drafted=0, accepted=0, steps=0, emitted=0.0)
        if self.drafter is not None:
            orig = self.drafter.propose

            def timed(seqs, budgets):
                t = time.perf_counter()
                out = orig(seqs, budgets)
                self.draft_s += time.perf_counter() - t
                return out

            self.drafter.propose = timed

    def run(self, engine, prompt: str, max_tokens: int) -> None:
        """Generate one prompt with this configuration and accumulate its stats."""
        from specrt import SamplingParams
        from specrt.draft.adaptive import LengthController

        if self.lengths is None:
            self.lengths = LengthController(max_draft=self.K, adaptive=self.adaptive)
        engine.lengths, engine.max_draft = self.lengths, self.K
        d = self.drafter
        engine.drafters = {d.name: d} if d is not None else {}
        o = engine.generate(prompt, SamplingParams(max_tokens=max_tokens),
                            speculative=d is not None, drafter=d.name if d else None)[0]
        s, t = o.stats, self.tot
        t["tokens"] += s["completion_tokens"]
        t["elapsed"] += s["elapsed_s"]
        t["drafted"] += s["drafted_tokens"]
        t["accepted"] += s["accepted_tokens"]
        t["steps"] += s["steps"]
        t["emitted"] += s["mean_accepted_length"] * s["steps"]

    def summary(self) -> dict:
        t = self.tot
        steps = max(t["steps"], 1)
        return {
            "config": self.spec, "tokens_per_s": round(t["tokens"] / t["elapsed"], 2),
            "acceptance_rate": round(t["accepted"] / max(t["drafted"], 1), 3),
            "mean_accepted_length": round(t["emitted"] / steps, 3),
            "drafted_per_step": round(t["drafted"] / steps, 2),
            "total_s": round(t["elapsed"], 1), "draft_share": round(self.draft_s / t["elapsed"], 3),
            "ms_per_step_draft": round(1000 * self.draft_s / steps, 1),
            "ms_per_step_verify_rest": round(1000 * (t["elapsed"] - self.draft_s) / steps, 1),
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
    ap.add_argument("--topk", type=int, default=3, help="tree branching")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    eng = specrt.Engine.from_pretrained(device="cpu", max_batch=1, drafters=[])
    rows = balanced_sample(split(load_prompts(default_prompts_path()))[1], a.per_task, seed=1)
    cfgs = [_Config(c, eng, a.drafter, a.topk) for c in a.configs]
    for i, r in enumerate(rows):
        for c in cfgs:
            c.run(eng, r["prompt"], a.max_tokens)
        print(f"prompt {i + 1}/{len(rows)} done", flush=True)
        if (i + 1) % 4 == 0 and i + 1 < len(rows):  # running figures (partial runs)
            for c in cfgs:
                print("partial " + json.dumps(c.summary()), flush=True)
    out = [c.summary() | {"prompts": len(rows), "max_tokens": a.max_tokens} for c in cfgs]
    for o in out:
        print(json.dumps(o), flush=True)
    return out


if __name__ == "__main__":
    main()
