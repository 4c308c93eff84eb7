"""How far each CPU arithmetic of the default target is from exact: fp32 products
("highest"), bf16x3 ("high", ``Llama.use_fp32_precision``) and bf16 weights
(``Llama.use_weight_dtype``), against a float64 forward of the same weights.

For ``--prompts`` eval prompts (the first ``--tokens`` tokens of each, chat template
applied): the largest and mean absolute logit error, and how often the argmax agrees
with float64's; then greedy plain decoding of ``--decode-prompts`` prompts x
``--max-tokens`` tokens in each arithmetic, compared token for token with "highest"
(the first differing position named). Accuracy only: run it beside other work.

    python bench/bench_precision.py [--prompts 4] [--tokens 300] [--decode-prompts 16]
        [--max-tokens 64] [--json F]
"""
from __future__ import annotations

import argparse
import datetime
import json

import torch

import specrt
from specrt import ops
from specrt.data import balanced_sample, default_prompts_path, load_prompts, split
from specrt.measure import machine
from specrt.model import llama

ARITHMETICS = {"highest": (torch.float32, "highest"), "high": (torch.float32, "high"),
               "bf16": (torch.bfloat16, "highest")}


@torch.inference_mode()
def logits_of(model, cache, ids: torch.Tensor) -> torch.Tensor:
    """``[T, V]`` logits of a prefill of ``ids`` ``[1, T]`` in a scratch sequence."""
    cache.add(-1)
    try:
        cache.reserve(-1, ids.shape[1])
        h = model(ids, torch.arange(ids.shape[1])[None], cache.kv, cache.block_table([-1]),
                  torch.tensor([0]))
        return model.logits(h)[0].double()
    finally:
        cache.release(-1)


@torch.inference_mode()
def float64_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """The same weights in float64, op by op (the ``torch`` attention backend)."""
    m64 = llama.Llama(model.args).double()
    m64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    bs = 16
    nb = -(-ids.shape[1] // bs)
    kv = torch.zeros(model.args.num_hidden_layers, nb, 2, bs, model.args.num_key_value_heads,
                     model.args.head_dim, dtype=torch.float64)
    with ops.using_backend("torch"):
        h = m64(ids, torch.arange(ids.shape[1])[None], kv, torch.arange(nb, dtype=torch.int32)[None],
                torch.tensor([0]))
    return m64.logits(h)[0].double()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--decode-prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    eval_rows = split(load_prompts(default_prompts_path()))[1]
    engine = specrt.Engine.from_pretrained(device="cpu", max_batch=16, fp32_precision="highest")
    m, tok = engine.model, engine.tokenizer
    print(f"device: {machine()}  date: {datetime.date.today()}  bf16 isa "
          f"{ops.gemm.gemm_bf16_isa()}")
    rows = balanced_sample(eval_rows, 1, seed=1)[:a.prompts]
    err = {k: [] for k in ARITHMETICS}
    for r in rows:
        ids = torch.tensor([tok.encode(r["prompt"])[:a.tokens]])
        ref = float64_logits(m, ids)
        for name, (wdt, prec) in ARITHMETICS.items():
            m.use_weight_dtype(wdt).use_fp32_precision(prec)
            lg = logits_of(m, engine.cache, ids)
            e = (lg - ref).abs()
            err[name].append((e.max().item(), e.mean().item(),
                              (lg.argmax(-1) == ref.argmax(-1)).double().mean().item()))
    m.use_weight_dtype(torch.float32).use_fp32_precision("highest")
    res = {"device": machine(), "date": str(datetime.date.today()), "prompts": len(rows),
           "tokens": a.tokens, "logits": {}, "greedy": {}}
    print(f"{'arithmetic':>10} {'max |err|':>10} {'mean |err|':>11} {'argmax agrees':>14}")
    for name, v in err.items():
        mx, mean, agree = max(x[0] for x in v), sum(x[1] for x in v) / len(v), \
            min(x[2] for x in v)
        res["logits"][name] = {"max_abs_err": mx, "mean_abs_err": mean, "argmax_agree": agree}
        print(f"{name:>10} {mx:10.2e} {mean:11.2e} {agree:14.4f}")
    prompts = [r["prompt"][:2000] for r in balanced_sample(eval_rows, 2, seed=0)][
        :a.decode_prompts]
    params = specrt.SamplingParams(max_tokens=a.max_tokens, ignore_eos=True)
    outs = {}
    for name, (wdt, prec) in ARITHMETICS.items():
        m.use_weight_dtype(wdt).use_fp32_precision(prec)
        outs[name] = [o.token_ids for o in engine.generate(prompts, params, speculative=False)]
    m.use_weight_dtype(torch.float32).use_fp32_precision("highest")
    for name in ("high", "bf16"):
        same = [x == y for x, y in zip(outs[name], outs["highest"])]
        first = [next(i for i in range(len(x)) if x[i] != y[i])
                 for x, y, s in zip(outs[name], outs["highest"], same) if not s]
        res["greedy"][name] = {"same": sum(same), "of": len(same), "first_diff": first}
        print(f"greedy plain decoding, {len(same)} prompts x {a.max_tokens}: {name} == highest "
              f"on {sum(same)}" + (f" (first differences at {first})" if first else ""))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
