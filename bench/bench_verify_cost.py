"""Cost of one speculative step of the default target against tree size T (batch 1):
target forward (body), LM head, verification and KV commit, as ratios to T = 1.

    python bench/bench_verify_cost.py [--prefix 300] [--runs 9] [--target PATH]
"""
from __future__ import annotations

import argparse
import datetime
import time

import torch
from common import machine  # bench/common.py: the script's own folder is on sys.path

import specrt
from specrt import ops


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
    args = ap.parse_args()
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
          f"median of {args.runs}")
    print(f"{'T':>3} {'body ms':>8} {'head ms':>8} {'head(W@x) ms':>13} {'verify ms':>9} "
          f"{'commit ms':>9} {'total ms':>9} {'x T=1':>6}")
    base = None
    for T in [int(x) for x in args.sizes.split(",")]:
        toks = ids[:, args.prefix:args.prefix + T]
        parents = torch.arange(-1, T - 1)[None]
        pos = (args.prefix + torch.arange(T))[None]
        body = med(lambda: m(toks, pos, c.kv, bt, P, norm=False), args.runs)
        h = m(toks, pos, c.kv, bt, P, norm=False)
        hn = m.final_norm(h)
        head = med(lambda: m.logits(hn), args.runs)
        head_t = med(lambda: (W @ hn[0].t()).t(), args.runs)
        logits = m.logits(hn)
        tl = torch.tensor([T])
        ver = med(lambda: ops.verify_tree(logits, toks, parents, tl, greedy=True), args.runs)
        L, NB = c.kv.shape[:2]
        kv = c.kv.view(L * NB, *c.kv.shape[2:])
        bts = torch.cat([bt + l * NB for l in range(L)])
        path = torch.arange(T)[None].repeat(L, 1)
        path[:, 1:] = torch.arange(1, T).clamp(max=T - 1)
        com = med(lambda: ops.commit_kv(kv, bts, P.repeat(L), path, torch.full((L,), T)),
                  args.runs)
        tot = body + head + ver + com
        base = base or tot
        print(f"{T:3d} {body * 1e3:8.1f} {head * 1e3:8.1f} {head_t * 1e3:13.1f} {ver * 1e3:9.2f} "
              f"{com * 1e3:9.2f} {tot * 1e3:9.1f} {tot / base:6.2f}")


if __name__ == "__main__":
    main()
