"""Target states for drafter training: one prefill per sequence against one prefill per
prompt shared by its sampled outputs (``target_hidden(..., shared=)``), interleaved.

Reads collected records (a trainer or ``specrt align`` corpus: ``shard_*.jsonl``), keeps
``--prompts`` prompts with every sample collected for them, and computes the eagle3 taps
of prompt + output both ways, ``--rounds`` times alternating; prints positions per
second of each, their ratio, and the largest difference between the two results.

    python bench/bench_features.py --corpus WORK/corpus --prompts 24 --rounds 2
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main(argv=None) -> dict:
    import specrt
    from specrt.align.features import target_hidden
    from specrt.draft import corpus
    from specrt.draft.eagle3 import default_feature_layers
    from specrt.measure import machine

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", required=True, help="directory of shard_*.jsonl")
    ap.add_argument("--prompts", type=int, default=24, help="prompts (all their samples)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    recs = list(corpus.read_shards(Path(a.corpus)))
    by: dict[str, list[dict]] = {}
    for r in recs:
        by.setdefault(r["id"], []).append(r)
    ids = sorted((i for i in by if len(by[i]) > 1), key=str)[:a.prompts]
    if not ids:
        raise SystemExit(f"{a.corpus}: no prompt with more than one collected output")
    sel = [r for i in ids for r in by[i]]
    eng = specrt.Engine.from_pretrained(device="cpu", drafters=[])
    m = eng.model
    taps = tuple(sorted(set(default_feature_layers(m.args.num_hidden_layers))
                        | {m.args.num_hidden_layers - 1}))   # as the trainer taps
    toks = [(r["prompt_ids"] + r["output_ids"])[:-1] for r in sel]
    heads = [len(r["prompt_ids"]) for r in sel]
    n = sum(len(t) for t in toks)
    secs = {"per_sequence": 0.0, "shared": 0.0}
    res = {}
    for _ in range(a.rounds):
        for mode in secs:
            t = time.perf_counter()
            res[mode] = target_hidden(m, toks, taps=taps,
                                      shared=heads if mode == "shared" else None)
            secs[mode] += time.perf_counter() - t
    diff = max(float((x - y).abs().max()) for x, y in zip(res["per_sequence"], res["shared"]))
    out = {"machine": machine(), "sequences": len(sel), "prompts": len(ids), "positions": n,
           "prompt_positions": sum(heads),
           "pos_per_s": {k: round(a.rounds * n / v, 1) for k, v in secs.items()},
           "shared_over_per_sequence": round(secs["per_sequence"] / secs["shared"], 3),
           "max_abs_diff": diff}
    print(json.dumps(out), flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
