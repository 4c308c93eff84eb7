"""The task-aware pool against vanilla speculative decoding and the oracle, per task.

One run on a task-balanced sample of the EVAL split of ../shared/data/prompts.jsonl
(prompts `specrt align` never reads), greedy, batch 1, modes interleaved prompt by
prompt: the target alone (ar), the baseline drafter alone (vanilla SD), the routed pool,
and every other candidate the pool was built from (n-gram, token recycling, the
per-cluster aligned drafters found in POOL/work/align, and each of those model drafters
and the baseline fused with n-gram, as ``ngram+X`` and ``ngram2+X+ngram``), which feed the
oracle row (per prompt, the drafter with the longest mean accepted length, in hindsight).
``--only`` keeps just the named candidates (the run's time grows with every mode).

    python bench/bench_pool.py [--pool specrt/pools/default] [--per-task 3]
        [--max-tokens 48] [--draft-len K] [--only NAME,...] [--json OUT]

Prints the per-task table (speedup over ar, acceptance rate, mean accepted length), the
routing of every prompt, and the issue's targets as ratios: pool / baseline mean
accepted length averaged over tasks (>= 1.3), tasks where the pool is below the
baseline (none), pool / oracle (>= 0.9).
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from pathlib import Path

import specrt
from specrt.benchmark import format_table, run_e2e
from specrt.data import balanced_sample, default_prompts_path, load_prompts, split
from specrt.draft.registry import drafter_from_spec
from specrt.measure import machine

SHIPPED = Path(specrt.__file__).resolve().parent / "pools" / "default"


def _extra_drafters(engine, pool: Path) -> list[str]:
    """Add the pool's unassigned candidates to ``engine``; return their names."""
    names = []
    aligned = sorted((pool / "work" / "align").glob("aligned_*.json"))
    specs = ["ngram", "recycling", *map(str, aligned)]
    base = pool / "baseline.json"
    fuse = [base, *aligned] if base.is_file() else aligned
    # fused candidates (see specrt.draft.fused): n-gram-first fill and the tiered
    # lookup-model-lookup fill, with the baseline and with each aligned drafter
    specs += [f"ngram+{p}" for p in fuse] + [f"ngram2+{p}+ngram" for p in fuse]
    for spec in specs:
        d = drafter_from_spec(spec, engine.model)
        if d.name not in engine.drafters:
            engine.add_drafter(d)
        names.append(d.name)
    return names


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pool", default=str(SHIPPED))
    ap.add_argument("--prompts", default=str(default_prompts_path()))
    ap.add_argument("--per-task", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--draft-len", type=int, default=None,
                    help="fixed draft budget (adaptive rule off)")
    ap.add_argument("--only", default=None, metavar="NAMES",
                    help="comma list: of the pool's other candidates, measure just these")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    pool = Path(a.pool)
    kw = {"max_draft": a.draft_len, "adaptive": False} if a.draft_len else {}
    engine = specrt.Engine.from_pretrained(pool=str(pool), device="cpu", **kw)
    if engine.router is None:
        raise SystemExit(f"{pool}: no routing head loaded")
    base = json.loads((pool / "pool.json").read_text())["default_drafter"]
    extra = [n for n in _extra_drafters(engine, pool) if n != base]
    if a.only:
        keep = [n.strip() for n in a.only.split(",") if n.strip()]
        unknown = sorted(set(keep) - set(extra))
        if unknown:
            raise SystemExit(f"--only: {unknown} not among the candidates {extra}")
        extra = [n for n in extra if n in keep]
    rows = balanced_sample(split(load_prompts(a.prompts))[1], a.per_task, seed=0)
    modes = ["ar", base, "pool", *extra]
    print(f"{machine()}; {len(rows)} eval prompts; modes {modes}; "
          f"{'fixed draft ' + str(a.draft_len) if a.draft_len else 'adaptive draft length'}")
    res = run_e2e(engine, rows, modes, max_tokens=a.max_tokens)
    print(format_table(res))

    routes: dict[str, list] = {}
    for r in rows:  # the pool's decision per prompt (prefill only)
        s = engine.generate(r["prompt"], specrt.SamplingParams(max_tokens=1))[0].stats
        routes.setdefault(r["task"], []).append([s["drafter"], s["cluster"],
                                                 round(s["route_confidence"], 3)])
    for t, v in routes.items():
        print(f"route {t:<14} " + ", ".join(f"{d}/c{c} ({f:.2f})" for d, c, f in v))

    M = res["modes"]
    tasks = [t for t in M["ar"] if t != "all"]
    mean = {m: statistics.mean(M[m][t]["mean_accepted_length"] for t in tasks)
            for m in (base, "pool", "oracle")}
    below = [t for t in tasks if M["pool"][t]["mean_accepted_length"]
             < M[base][t]["mean_accepted_length"]]
    check = {"pool_over_baseline": mean["pool"] / mean[base],
             "tasks_below_baseline": below,
             "pool_over_oracle": mean["pool"] / mean["oracle"],
             "speedup_over_ar": {m: M[m]["all"]["tokens_per_s"] / M["ar"]["all"]["tokens_per_s"]
                                 for m in (base, "pool", "oracle")}}
    print(f"mean accepted length over tasks: baseline {mean[base]:.3f}, pool "
          f"{mean['pool']:.3f}, oracle {mean['oracle']:.3f}")
    print(f"pool / baseline {check['pool_over_baseline']:.3f} (target >= 1.3); tasks below "
          f"baseline: {below or 'none'}; pool / oracle {check['pool_over_oracle']:.3f} "
          f"(target >= 0.9); greedy mismatches vs ar: {res['mismatches']}")
    if a.json:
        out = {"date": datetime.date.today().isoformat(), "machine": machine(),
               "draft_len": a.draft_len, "routes": routes, "check": check, **res}
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
