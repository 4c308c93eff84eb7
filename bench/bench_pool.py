"""The task-aware pool against vanilla speculative decoding and the oracle, per task.

One run on a task-balanced sample of the EVAL split of ../shared/data/prompts.jsonl
(prompts `specrt align` never reads), greedy, batch 1, modes interleaved prompt by
prompt: the target alone (ar), the pool's default drafter, the routed pool, and every
other candidate the pool was built from (n-gram, token recycling, the baseline model
drafter alone (vanilla SD), the per-cluster aligned drafters found in POOL/work/align,
and each of those model drafters fused with n-gram, as ``ngram+X`` and
``ngram2+X+ngram``, and with the pool's suffix datastore, alone as ``suffix`` and fused
as ``ngram2+suffix+X+ngram``), which feed the oracle row (per prompt, the drafter with
the longest mean accepted length, in hindsight). ``--only`` keeps just the named
candidates (the run's time grows with every mode).

    python bench/bench_pool.py [--pool specrt/pools/default] [--per-task 3]
        [--max-tokens 64] [--draft-len K] [--only NAME,...] [--batch 8] [--weights bf16]
        [--json OUT]

Prints the per-task table (speedup over ar, acceptance rate, mean accepted length), the
routing of every prompt, and the targets as ratios: the pool's speedup over plain
decoding as the geometric mean over tasks, its lowest task, the pool over the best
single drafter (one proposer: a name without ``+``) and over the best candidate (fused
ones included), pool / baseline mean accepted length, pool / oracle, greedy mismatches,
and plain vs speculative throughput at ``--batch`` requests in flight. With ``--json``
also ``*_speedup.png`` (per task per mode) and ``*_acceptance.png`` (acceptance by draft
position) beside it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

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
    base = pool / "baseline.json"
    fuse = [base, *aligned] if base.is_file() else aligned
    specs = ["ngram", "recycling", *map(str, fuse)]   # the model drafters alone too
    # fused candidates (see specrt.draft.fused): n-gram-first fill and the tiered
    # lookup-model-lookup fill, with the baseline and with each aligned drafter
    specs += [f"ngram+{p}" for p in fuse] + [f"ngram2+{p}+ngram" for p in fuse]
    store = pool / "suffix.safetensors"   # the suffix drafter's datastore, alone and fused
    if store.is_file():
        specs += [str(store), f"ngram2+{store}+ngram"] + [f"ngram2+{store}+{p}+ngram" for p in fuse]
    for spec in specs:
        d = drafter_from_spec(spec, engine.model)
        if d.name not in engine.drafters:
            engine.add_drafter(d)
        names.append(d.name)
    return names


def per_task_speedup(M: dict, mode: str, tasks: list[str]) -> dict[str, float]:
    """Tokens/s of ``mode`` over the target alone's, per task."""
    return {t: M[mode][t]["tokens_per_s"] / M["ar"][t]["tokens_per_s"] for t in tasks}


def geomean(xs) -> float:
    xs = list(xs)
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else float("nan")


def batch_throughput(engine, rows: list[dict], batch: int, max_tokens: int,
                     repeats: int = 2) -> dict:
    """Plain vs the engine's own speculative decoding with ``batch`` requests in flight
    (continuous batching, greedy, EOS ignored so every request runs ``max_tokens``):
    tokens/s of each, interleaved ``repeats`` times. ``4 x batch`` requests (``rows``
    cycled) go in at once, so the batch stays full but for the tail: with only ``batch``
    requests (the probe before 2026-12-06's fifth session) speculation's uneven finishing
    left the last steps of every run to one to three requests."""
    prompts = [rows[i % len(rows)]["prompt"] for i in range(4 * batch)]
    p = specrt.SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    out = {"plain": [0, 0.0], "spec": [0, 0.0]}
    with engine.using(max_batch=batch):
        engine.generate(prompts[:2], specrt.SamplingParams(max_tokens=4))  # warm-up
        for _ in range(repeats):
            for name, spec in (("plain", False), ("spec", True)):
                t0 = time.perf_counter()
                outs = engine.generate(prompts, p, speculative=spec)
                out[name][1] += time.perf_counter() - t0
                out[name][0] += sum(len(o.token_ids) for o in outs)
    res = {k: v[0] / v[1] for k, v in out.items()}
    return {"batch": batch, "requests": len(prompts), "max_tokens": max_tokens, "plain_tok_s": res["plain"],
            "spec_tok_s": res["spec"], "ratio": res["spec"] / res["plain"]}


def plot(res: dict, tasks: list[str], modes: list[str], path: Path) -> None:
    """Two PNGs next to ``path``: speedup over ar per task per mode (bars) and
    acceptance by draft position per mode (lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    M = res["modes"]
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(tasks)), 4.2))
    w = 0.8 / len(modes)
    for i, m in enumerate(modes):
        sp = per_task_speedup(M, m, tasks + ["all"])
        ax.bar([j + i * w for j in range(len(tasks) + 1)], [sp[t] for t in tasks + ["all"]],
               w, label=m)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([j + 0.4 - w / 2 for j in range(len(tasks) + 1)], tasks + ["all"],
                  rotation=20)
    ax.set_ylabel("speedup over plain decoding (tokens/s)")
    ax.set_title(f"{res['machine']}, batch 1, greedy, {res['max_tokens']} tokens", fontsize=9)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path.with_name(path.stem + "_speedup.png"), dpi=110)
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in modes:
        acc = M[m]["all"].get("acceptance_by_depth", [])
        if acc:
            ax.plot(range(1, len(acc) + 1), acc, "o-", label=m)
    ax.set_xlabel("draft position (depth)")
    ax.set_ylabel("accepted / drafted at that depth")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("acceptance by draft position (all tasks)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path.with_name(path.stem + "_acceptance.png"), dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--pool", default=str(SHIPPED), help="pool directory")
    ap.add_argument("--prompts", default=str(default_prompts_path()), help="prompt file")
    ap.add_argument("--per-task", type=int, default=3, help="eval prompts per task")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per generation")
    ap.add_argument("--draft-len", type=int, default=None,
                    help="fixed draft budget (adaptive rule off)")
    ap.add_argument("--only", default=None, metavar="NAMES",
                    help="comma list: of the pool's other candidates, measure just these")
    ap.add_argument("--batch", type=int, default=8,
                    help="also compare throughput at this batch size (0: skip)")
    ap.add_argument("--weights", choices=("fp32", "bf16"), default="fp32",
                    help="weights the target streams (bf16: on AMX CPUs attention too)")
    ap.add_argument("--fp32-precision", choices=("auto", "high", "highest"), default="auto",
                    help="fp32 weights: highest = fp32 products, high = bf16x3 (auto: high "
                         "where the CPU has bf16 dot products)")
    ap.add_argument("--json", default=None, help="results file; PNGs are written beside it")
    a = ap.parse_args()

    pool = Path(a.pool)
    kw = {"max_draft": a.draft_len, "adaptive": False} if a.draft_len else {}
    wdt = torch.bfloat16 if a.weights == "bf16" else torch.float32
    engine = specrt.Engine.from_pretrained(pool=str(pool), device="cpu", weight_dtype=wdt,
                                           fp32_precision=a.fp32_precision, **kw)
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
    print(f"{machine()}; {len(rows)} eval prompts; {a.weights} weights (fp32 precision {engine.model.fp32_precision}); modes {modes}; "
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
            for m in (base, "pool", "oracle") if m in M}
    below = [t for t in tasks if M["pool"][t]["mean_accepted_length"]
             < M[base][t]["mean_accepted_length"]]
    cands = [m for m in modes if m not in ("ar", "pool")]
    g = {m: geomean(per_task_speedup(M, m, tasks).values()) for m in cands + ["pool"]}
    # a single drafter is one proposer (no '+'); a fused candidate is the pool's own
    # combination of several, so it is reported apart
    singles = [m for m in cands if "+" not in m] or cands
    best_single = max(singles, key=lambda m: g[m])
    best_cand = max(cands, key=lambda m: g[m])
    sp_pool = per_task_speedup(M, "pool", tasks)
    check = {"pool_over_baseline": mean["pool"] / mean[base],
             "tasks_below_baseline": below,
             "pool_over_oracle": mean["pool"] / mean["oracle"] if "oracle" in mean else None,
             "speedup_over_ar": {m: M[m]["all"]["tokens_per_s"] / M["ar"]["all"]["tokens_per_s"]
                                 for m in (base, "pool", "oracle") if m in M},
             "pool_speedup_by_task": sp_pool,
             "pool_speedup_geomean": g["pool"], "pool_speedup_min_task": min(sp_pool.values()),
             "geomean_by_mode": g, "best_single_drafter": best_single,
             "pool_over_best_single": g["pool"] / g[best_single],
             "best_candidate": best_cand, "pool_over_best_candidate": g["pool"] / g[best_cand]}
    print("mean accepted length over tasks: " + ", ".join(f"{m} {v:.3f}" for m, v in mean.items()))
    print(f"pool speedup over plain, geometric mean over {len(tasks)} tasks: {g['pool']:.3f} "
          f"(target >= 1.6); lowest task {min(sp_pool, key=sp_pool.get)} "
          f"{min(sp_pool.values()):.3f} (target >= 1.05); best single drafter {best_single} "
          f"{g[best_single]:.3f}, pool / it {check['pool_over_best_single']:.3f} (target >= 1.15); "
          f"best candidate (fused included) {best_cand} {g[best_cand]:.3f}, pool / it "
          f"{check['pool_over_best_candidate']:.3f}")
    print(f"greedy mismatches vs ar: {res['mismatches']}")
    if a.batch:
        bt = batch_throughput(engine, rows, a.batch, a.max_tokens)
        check["batch"] = bt
        print(f"batch {bt['batch']}: plain {bt['plain_tok_s']:.1f} tok/s, speculative "
              f"{bt['spec_tok_s']:.1f} tok/s, {bt['ratio']:.3f}x (target >= 1.1)")
    if a.json:
        out = {"date": datetime.date.today().isoformat(), "machine": machine(),
               "weights": a.weights, "fp32_precision": engine.model.fp32_precision,
               "max_tokens": a.max_tokens, "draft_len": a.draft_len, "routes": routes,
               "check": check, **res}
        Path(a.json).write_text(json.dumps(out, indent=1))
        plot(out, tasks, [m for m in modes if m != "ar"], Path(a.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
