"""End-to-end greedy decoding on the default target, per task, in one process:
specrt target-only AR, each specrt drafter, and the HF transformers peers on the same
prompts (HF greedy AR, HF assisted generation with the same baseline drafter as an HF
model, HF prompt lookup). Prompts: a task-balanced sample of the EVAL split of
../shared/data/prompts.jsonl (never seen by drafter training).

    python bench/bench_e2e.py [--per-task 2] [--max-tokens 64] [--no-hf]

Prints per task tokens/s, speedup over specrt AR, acceptance rate and mean accepted
length of every mode, and specrt / HF ratios for AR, the model drafter and n-gram lookup.
"""
from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

import specrt
from specrt.benchmark import format_table, run_e2e
from specrt.data import balanced_sample, default_prompts_path, load_prompts, split
from specrt.measure import Record, by_task, machine


def hf_models(engine, assistant_dir: Path | None):
    import transformers

    from specrt.model import resolve_target

    d = resolve_target(None)
    tgt = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    asst = None
    if assistant_dir is not None:
        asst = transformers.AutoModelForCausalLM.from_pretrained(assistant_dir,
                                                                 dtype=torch.float32).eval()
    return tgt, asst


@torch.inference_mode()
def run_hf(engine, rows, max_tokens, tgt, asst):
    """HF modes: ar, assisted (if asst), lookup. Returns the run_e2e-like dict."""
    modes = {"hf_ar": {}, "hf_lookup": {"prompt_lookup_num_tokens": 10}}
    if asst is not None:
        modes["hf_assisted"] = {"assistant_model": asst}
    res = {"modes": {}, "outputs": {}}
    for m, kw in modes.items():
        recs = []
        for r in rows:
            ids = torch.tensor([engine.tokenizer.encode_prompt(r["prompt"])])
            t0 = time.perf_counter()
            out = tgt.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                               do_sample=False, eos_token_id=sorted(engine.eos_ids),
                               pad_token_id=sorted(engine.eos_ids)[0], **kw)
            dt = time.perf_counter() - t0
            new = out[0, ids.shape[1]:].tolist()
            while new and new[-1] in engine.eos_ids:
                new.pop()
            steps = max(len(new), 1)  # HF reports no steps: one per token
            st = {"completion_tokens": len(new), "drafted_tokens": 0, "accepted_tokens": 0,
                  "steps": steps, "mean_accepted_length": len(new) / steps, "elapsed_s": dt}
            recs.append(Record(r["task"], dt, st, new))
        res["modes"][m] = by_task(recs)
        res["outputs"][m] = [x.token_ids for x in recs]
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--per-task", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--modes", default=None, help="specrt modes (default: ar + every drafter)")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--lm-drafter", default=None, metavar="PATH",
                    help="plain-LM drafter config (.json; not shipped, train one with python -m "
                         "specrt.draft.train --kind lm) used in specrt AND, exported, as HF's "
                         "assistant; the lm2 and hf_assisted modes need it")
    ap.add_argument("--json", default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rows = balanced_sample(split(load_prompts(default_prompts_path()))[1], args.per_task,
                           seed=args.seed)
    engine = specrt.Engine.from_pretrained(device="cpu")
    lm = None
    if args.lm_drafter and Path(args.lm_drafter).is_file():
        from specrt.draft.registry import model_drafter

        lm = model_drafter(args.lm_drafter, engine.model, name="lm2", runtime={"mode": "chain"})
        engine.add_drafter(lm)
    else:
        print(f"lm2 and hf_assisted modes skipped: they need --lm-drafter PATH (a plain-LM "
              f"drafter .json; got {args.lm_drafter!r})")
    modes = args.modes.split(",") if args.modes else ["ar", *engine.drafters]
    print(f"device: {machine()}  date: {datetime.date.today()}  prompts: {len(rows)} "
          f"({args.per_task}/task, eval split)  max_tokens {args.max_tokens}  greedy batch 1")
    res = run_e2e(engine, rows, modes, max_tokens=args.max_tokens)
    print(format_table(res))
    if not args.no_hf:
        asst_dir = None
        if lm is not None:
            from specrt.model import resolve_target

            asst_dir = lm.net.export_hf("/tmp/specrt_hf_assistant", resolve_target(None))
        tgt, asst = hf_models(engine, asst_dir)
        hf = run_hf(engine, rows, args.max_tokens, tgt, asst)
        both = {"modes": {"ar": res["modes"]["ar"], **hf["modes"]}, "mismatches": {}}
        print("\nHF transformers peers (same prompts):")
        print(format_table(both))
        print("\nspecrt / HF tokens/s (all prompts):")
        pairs = [("ar", "hf_ar"), ("ngram", "hf_lookup"), ("lm2", "hf_assisted")]
        for a, b in pairs:
            if a in res["modes"] and b in hf["modes"]:
                x, y = res["modes"][a]["all"]["tokens_per_s"], hf["modes"][b]["all"]["tokens_per_s"]
                print(f"  specrt {a:<10} {x:7.1f}  vs  {b:<12} {y:7.1f}   ratio {x / y:5.2f}")
        res["hf"] = hf["modes"]
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
