"""Cost of one speculative step of the default target against tree size T (batch 1):
target forward (body), LM head, verification and KV commit, as ratios to T = 1.

Configurations, interleaved size by size: ``specrt`` (the shipped path: every decoder
layer in one native call, csrc/decoder_cpu.cpp, with the skinny GEMM and the CPU
attention kernel; the head through the skinny GEMM), ``bf16`` (the same with the weights
streamed as bf16, ``Llama.use_weight_dtype``: AMX tiles where the CPU has them), ``high``
(fp32 weights at "high" precision, ``Llama.use_fp32_precision``: bf16x3 products on the
bf16 units), ``ops``
(the fp32 kernels called op by op from Python: the path before the native decoder) and
``torch`` (``F.linear`` everywhere, gather + SDPA attention). Ratios ``x T=1`` are each
configuration's own; ``bf16/specrt`` compares bf16 with fp32 at the same T.

    python bench/bench_verify_cost.py [--prefix 300] [--runs 9] [--target PATH]
        [--configs specrt,bf16,ops,torch] [--before OLD/specrt/_C*.so] [--json F]

``--before`` adds every configuration again on another build's ``specrt._C`` (rows
``NAME@before``), interleaved with this build's at each size: a kernel change before and
after in one run, whatever the shared host's speed at the time.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from contextlib import contextmanager

import torch

import specrt
from specrt import ops
from specrt.measure import machine
from specrt.model import llama
from specrt.ops import gemm


@contextmanager
def config(name: str, model, before=None):
    """``specrt``: the shipped CPU path; ``bf16``: the same, bf16 weights; ``ops``: its
    kernels op by op; ``torch``: F.linear and gather + SDPA. ``NAME@before``: NAME on the
    extension ``before`` (:func:`specrt.ops.load_native`)."""
    if name.endswith("@before"):
        with ops.using_native(before), config(name[:-len("@before")], model):
            yield
        return
    rows, fusable, wdt = gemm.MAX_ROWS, llama.Llama._fusable, model.weight_dtype
    prec = model.fp32_precision
    model.use_weight_dtype(torch.bfloat16 if name == "bf16" else torch.float32)
    model.use_fp32_precision("high" if name == "high" else "highest")
    if name == "torch":
        gemm.MAX_ROWS = 0
    if name == "ops":
        llama.Llama._fusable = lambda *a: False
    try:
        with ops.using_backend("torch" if name == "torch" else
                               os.environ.get("SPECRT_OPS_BACKEND", "auto")):
            yield
    finally:
        gemm.MAX_ROWS = rows
        llama.Llama._fusable = fusable
        model.use_weight_dtype(wdt)
        model.use_fp32_precision(prec)


CONFIGS = ("specrt", "bf16", "high", "ops", "torch")


def med(f, runs):
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        f()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


@torch.inference_mode()
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--target", default=None)
    ap.add_argument("--prefix", type=int, default=300)
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--sizes", default="1,2,4,8,16,32")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help=f"comma-separated subset of {','.join(CONFIGS)} (specrt first)")
    ap.add_argument("--before", default=None,
                    help="another build's specrt/_C*.so: every config also runs on it")
    ap.add_argument("--json", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    configs = args.configs.split(",")
    if configs[0] != "specrt" or not set(configs) <= set(CONFIGS):
        ap.error(f"--configs: specrt first, then any of {CONFIGS}")
    before = ops.load_native(args.before) if args.before else None
    if before is not None:
        configs += [f"{c}@before" for c in configs]
    if args.threads:
        torch.set_num_threads(args.threads)
    eng = specrt.Engine.from_pretrained(args.target, device="cpu")
    m, c = eng.model, eng.cache
    c.add(0)
    c.reserve(0, args.prefix + 64)
    ids = torch.randint(0, m.args.vocab_size, (1, args.prefix + 64))
    bt = c.block_table([0])
    m(ids[:, :args.prefix], torch.arange(args.prefix)[None], c.kv, bt, torch.tensor([0]))
    P = torch.tensor([args.prefix])
    W = m.head_weight
    print(f"device: {machine()}  date: {datetime.date.today()}  prefix {args.prefix}  "
          f"median of {args.runs}  threads {torch.get_num_threads()}  isa {gemm.gemm_isa()}  "
          f"bf16 isa {gemm.gemm_bf16_isa()}")
    print(f"{'T':>3} {'cfg':>13} {'body ms':>8} {'head ms':>8} {'verify ms':>9} "
          f"{'commit ms':>9} {'total ms':>9} {'x T=1':>6} {'/specrt':>8}")
    base, rows = {}, []
    L, NB = c.kv.shape[:2]
    kv = c.kv.view(L * NB, *c.kv.shape[2:])
    bts = torch.cat([bt + layer * NB for layer in range(L)])
    for T in [int(x) for x in args.sizes.split(",")]:
        toks = ids[:, args.prefix:args.prefix + T]
        parents = torch.arange(-1, T - 1)[None]
        pos = (args.prefix + torch.arange(T))[None]
        tl = torch.tensor([T])
        path = torch.arange(T)[None].repeat(L, 1)
        got = {}
        for name in configs:
            with config(name, m, before):
                body = med(lambda: m(toks, pos, c.kv, bt, P, norm=False), args.runs)
                hn = m.final_norm(m(toks, pos, c.kv, bt, P, norm=False))
                head = med(lambda: m.logits(hn), args.runs)
                logits = m.logits(hn)
            ver = med(lambda: ops.verify_tree(logits, toks, parents, tl, greedy=True), args.runs)
            com = med(lambda: ops.commit_kv(kv, bts, P.repeat(L), path, torch.full((L,), T)),
                      args.runs)
            tot = body + head + ver + com
            base.setdefault(name, tot)
            got[name] = dict(T=T, config=name, body_ms=body * 1e3, head_ms=head * 1e3,
                             verify_ms=ver * 1e3, commit_ms=com * 1e3, total_ms=tot * 1e3,
                             x_T1=tot / base[name])
        for name in configs:
            r = got[name]
            ref = "specrt@before" if name.endswith("@before") else "specrt"
            r["over_specrt"] = r["total_ms"] / got[ref]["total_ms"]
            rows.append(r)
            print(f"{T:3d} {name:>13} {r['body_ms']:8.1f} {r['head_ms']:8.1f} "
                  f"{r['verify_ms']:9.2f} {r['commit_ms']:9.2f} {r['total_ms']:9.1f} "
                  f"{r['x_T1']:6.2f} {r['over_specrt']:8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": machine(), "date": str(datetime.date.today()),
                       "prefix": args.prefix, "runs": args.runs,
                       "threads": torch.get_num_threads(), "isa": gemm.gemm_isa(),
                       "bf16_isa": gemm.gemm_bf16_isa(), "before": args.before,
                       "rows": [{k: round(v, 3) if isinstance(v, float) else v
                                 for k, v in r.items()} for r in rows]}, f, indent=1)


if __name__ == "__main__":
    main()
