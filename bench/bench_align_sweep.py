"""Does task alignment pay, and from how much data? Per cluster, the generic drafter
fine-tuned on 10k / 30k / 100k target-labelled positions of that cluster's train data,
measured on the cluster's EVAL-split prompts (never trained on).

Clusters are the pool's (its routing head assigns every collected prompt, train and eval,
to one). Data are the shards of the baseline trainer's collection (``WORK/corpus``,
train split, and ``WORK/corpus_eval``, eval split; ``python -m specrt.draft.train ...
--eval-collect N`` writes both). For each cluster and size the generic head
(``--generic``, an eagle3 or eagle drafter) is fine-tuned (all its weights; with
``--lora R`` also LoRA adapters at the largest size, to choose between them), with early
stopping on 5% of the cluster's train prompts; the pool's own ``aligned_<c>`` drafters
are measured too. Measured teacher-forced on the eval records: top-1 and the greedy
chain's mean accepted length at a fixed budget (``--budget``, bonus token included: what
one verification step emits; equal to drafting's, see tests/test_eagle3.py).

    python bench/bench_align_sweep.py --work /work/distill --generic DRAFTER.json \
        [--pool specrt/pools/default] [--sizes 10000,30000,100000] [--budget 4] \
        [--json bench/results/X.json] [--png bench/results/X.png]

Prints per cluster the generic and aligned figures and their ratio; the JSON keeps them
all; the PNG plots accepted length and top-1 against data size, one line per cluster,
the generic head's level dashed.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import random
import time
from pathlib import Path

import torch

import specrt
from specrt.align.features import prompt_features
from specrt.draft import corpus
from specrt.draft.model import DraftNet
from specrt.draft.train import (_held_out, cpu_has_bf16, sequences, stage_train,
                                teacher_forced_accuracy)
from specrt.measure import machine

SHIPPED = Path(specrt.__file__).resolve().parent / "pools" / "default"


def clusters_of(engine, recs: list[dict]) -> list[int]:
    """The pool's cluster of each record's prompt (its routing head on the prompt's
    mean final target state, as the engine routes online)."""
    ids = list(dict.fromkeys(tuple(r["prompt_ids"]) for r in recs))
    feats = prompt_features(engine.model, [list(x) for x in ids])
    cl = engine.router.predict_clusters(feats).tolist()
    by = dict(zip(ids, cl))
    return [by[tuple(r["prompt_ids"])] for r in recs]


def take(seqs: list[dict], positions: int) -> list[dict]:
    """The first sequences (already shuffled) until ``positions`` target-labelled
    positions."""
    out, n = [], 0
    for s in seqs:
        if n >= positions:
            break
        out.append(s)
        n += s["hidden"].shape[0]
    return out


def evaluate(net, model, seqs, budget) -> dict:
    r = teacher_forced_accuracy(net, model, seqs, steps=budget)
    return {"top1": round(r["top1"], 4), "chain_accepted": round(r.get("chain_accepted", 0), 4),
            "top1_by_depth": [round(x, 4) for x in r.get("top1_by_depth", [])],
            "positions": r["positions"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--work", required=True, help="the trainer's work dir (corpus shards)")
    ap.add_argument("--generic", required=True, help="the generic drafter's .json")
    ap.add_argument("--pool", default=str(SHIPPED), help="pool whose clusters are used")
    ap.add_argument("--sizes", default="10000,30000,100000", help="positions per cluster")
    ap.add_argument("--budget", type=int, default=4, help="chain length measured")
    ap.add_argument("--lr", type=float, default=3e-4, help="full fine-tuning learning rate")
    ap.add_argument("--lora", type=int, default=16, help="also LoRA rank R at the largest "
                    "size (0: skip)")
    ap.add_argument("--lora-lr", type=float, default=2e-3)
    ap.add_argument("--max-epochs", type=float, default=4.0)
    ap.add_argument("--min-batches", type=int, default=40, help="batches per run at least")
    ap.add_argument("--minutes-per-run", type=float, default=4.0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--png", default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    sizes = [int(x) for x in a.sizes.split(",")]
    work = Path(a.work)
    eng = specrt.Engine.from_pretrained(pool=a.pool, device="cpu")
    if eng.router is None:
        raise SystemExit(f"{a.pool}: no routing head")
    model = eng.model
    generic = DraftNet.load(a.generic, model)
    taps = tuple(sorted(set(generic.feature_layers) | {model.args.num_hidden_layers - 1})) \
        if generic.arch == "eagle3" else ()
    train = [r for r in corpus.read_shards(work / "corpus")]
    ev = [r for r in corpus.read_shards(work / "corpus_eval")]
    if not ev:
        raise SystemExit(f"{work}/corpus_eval: no eval-split records (--eval-collect N)")
    t0 = time.perf_counter()
    c_train, c_eval = clusters_of(eng, train), clusters_of(eng, ev)
    K = len(eng.router.cluster_drafter)
    print(f"{machine()}; {len(train)} train records, {len(ev)} eval records, {K} clusters "
          f"({time.perf_counter() - t0:.0f} s to route)", flush=True)
    bf16 = cpu_has_bf16()
    res: dict = {"date": datetime.date.today().isoformat(), "machine": machine(),
                 "generic": a.generic, "pool": a.pool, "budget": a.budget, "sizes": sizes,
                 "clusters": {}}
    for c in range(K):
        tr = [r for r, k in zip(train, c_train) if k == c]
        er = [r for r, k in zip(ev, c_eval) if k == c]
        if not tr or not er:
            print(f"cluster {c}: {len(tr)} train / {len(er)} eval records; skipped")
            continue
        tasks = sorted({r["task"] for r in er})
        held_r = [r for r in tr if _held_out(r["id"], 0.05)]
        tr = [r for r in tr if not _held_out(r["id"], 0.05)]
        # target states only for the records the largest run uses (shuffled once; each
        # smaller run takes a prefix of the same order)
        random.Random(c).shuffle(tr)
        need, n_pos, keep = max(sizes), 0, []
        for r in tr:
            if n_pos >= need:
                break
            keep.append(r)
            n_pos += len(r["prompt_ids"]) + len(r["output_ids"]) - 1
        seqs = sequences(model, keep, progress=False, taps=taps)
        held = sequences(model, held_r, progress=False, taps=taps) if held_r else None
        evs = sequences(model, er, progress=False, taps=taps)
        avail = sum(len(r["prompt_ids"]) + len(r["output_ids"]) - 1 for r in tr)
        entry = {"tasks": tasks, "train_positions": avail, "eval_records": len(er),
                 "generic": evaluate(generic, model, evs, a.budget), "aligned": {}}
        print(f"cluster {c} ({', '.join(tasks)}): {avail} train positions, generic "
              f"{entry['generic']}", flush=True)
        shipped = Path(a.pool) / f"aligned_{c}.json"
        if shipped.is_file():  # the pool's own aligned drafter for this cluster
            m = evaluate(DraftNet.load(shipped, model), model, evs, a.budget)
            m["ratio_chain"] = round(m["chain_accepted"] / entry["generic"]["chain_accepted"], 4)
            entry["pool_aligned"] = m
            print(f"  the pool's aligned_{c}: {m}", flush=True)
        runs = [(n, "full") for n in sizes if n <= avail * 1.2]
        if not runs:
            runs = [(avail, "full")]
        if a.lora:
            runs.append((runs[-1][0], f"lora{a.lora}"))
        for n, how in runs:
            data = take(seqs, n)
            net = copy.deepcopy(generic)
            lr = a.lr
            if how.startswith("lora"):
                net.add_lora(a.lora, targets=("qkv", "o", "gate_up", "down"), seed=c)
                net.train_lora_only()
                lr = a.lora_lr
            per_epoch = max(1, sum(s["hidden"].shape[0] for s in data) // 2048)
            epochs = min(a.max_epochs, max(1.0, a.min_batches / per_epoch))
            t = time.perf_counter()
            summ = stage_train(net, model, data, epochs=epochs, lr=lr, max_len=256,
                               batch_tokens=2048, feat_weight=0.0, seed=c,
                               time_budget_s=a.minutes_per_run * 60, ttt_steps=a.budget,
                               held=held, patience=3, bf16=bf16)
            m = evaluate(net, model, evs, a.budget)
            m.update(positions=sum(s["hidden"].shape[0] for s in data),
                     seconds=round(time.perf_counter() - t, 1), steps=summ["steps"],
                     ratio_chain=round(m["chain_accepted"] / entry["generic"]["chain_accepted"], 4))
            entry["aligned"][f"{how}@{n}"] = m
            print(f"  {how} on {m['positions']} positions: {m} ", flush=True)
        res["clusters"][str(c)] = entry
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1))
    ratios, shipped = [], []
    for c, e in res["clusters"].items():
        best = max(e["aligned"].values(), key=lambda m: m["chain_accepted"])
        ratios.append(best["chain_accepted"] / e["generic"]["chain_accepted"])
        e["best"] = best
        if "pool_aligned" in e:
            shipped.append(e["pool_aligned"]["ratio_chain"])
    if ratios:
        res["summary"] = {"mean_ratio_best": round(sum(ratios) / len(ratios), 4),
                          "clusters_at_or_above_generic": sum(r >= 1.0 for r in ratios),
                          "clusters": len(ratios)}
        if shipped:
            res["summary"].update(pool_aligned_mean_ratio=round(sum(shipped) / len(shipped), 4),
                                  pool_aligned_at_or_above=sum(r >= 1.0 for r in shipped),
                                  pool_aligned_clusters=len(shipped))
        print(f"aligned (best run) / generic chain accepted length: mean "
              f"{res['summary']['mean_ratio_best']:.3f}; clusters >= generic: "
              f"{res['summary']['clusters_at_or_above_generic']}/{len(ratios)}"
              + (f"; the pool's aligned drafters / generic: mean "
                 f"{res['summary']['pool_aligned_mean_ratio']:.3f}, >= generic on "
                 f"{res['summary']['pool_aligned_at_or_above']}/{len(shipped)}" if shipped else ""))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    if a.png:
        plot(res, a.png)
    return 0


def plot(res: dict, path: str) -> None:
    """Accepted length and top-1 against data size per cluster; generic dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (c, e) in enumerate(sorted(res["clusters"].items())):
        col = f"C{i}"
        pts = sorted((m["positions"], m) for k, m in e["aligned"].items() if k.startswith("full"))
        label = f"c{c} ({'/'.join(e['tasks'][:3])})"
        for ax, key in zip(axes, ("chain_accepted", "top1")):
            ax.plot([p for p, _ in pts], [m[key] for _, m in pts], "o-", color=col, label=label)
            ax.axhline(e["generic"][key], color=col, ls="--", lw=0.8)
            for k, m in e["aligned"].items():
                if k.startswith("lora"):
                    ax.plot([m["positions"]], [m[key]], "x", color=col, ms=8)
    axes[0].set_ylabel(f"mean accepted length, chain budget {res['budget']}")
    axes[1].set_ylabel("teacher-forced top-1")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("cluster train positions used for alignment")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Per-cluster alignment vs data size (eval split; dashed: generic head; "
                 "x: LoRA)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
