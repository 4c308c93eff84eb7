"""Benchmark of specrt's KV movement: append_kv (write a step's tree K/V into the paged
cache) and commit_kv (move the accepted path's K/V to contiguous slots, all layers in
one call as the engine does), Llama-3-8B shapes (8 KV heads, D 128, page 16, 32 layers).

Implementations: the Triton kernels, the specrt._C CUDA code (when built with CUDA), and
a torch reference (advanced-index gather/scatter over the block table), on the same
cache; each is checked once against the torch reference. ``bw`` is bytes read plus
written over the time, as a fraction of the device's copy bandwidth (measured here).
``--dry-run`` runs tiny shapes for a few iterations; without CUDA it runs specrt._C and
the Triton kernels through Triton's interpreter, timed by the wall clock (a check that
the script works, not a measurement). ``--json PATH`` writes every row.

    python bench/bench_kv.py
    python bench/bench_kv.py --batch 1 64 --tree 16 --layers 30
    python bench/bench_kv.py --dry-run --json /tmp/kv.json
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

from bench_tree_attention import DTYPES, copy_bandwidth, cuda_time, meta, write_json

FULL = dict(batch=[1, 8, 64], tree=[8, 64], prefix=200, heads_kv=8, head_dim=128, page=16,
            layers=32, dtype="bf16", repeats=30, warmup=5)
DRY = dict(batch=[1, 2], tree=[4], prefix=20, heads_kv=2, head_dim=16, page=16, layers=2,
           dtype="fp32", repeats=2, warmup=1)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", help=f"batch sizes ({FULL['batch']})")
    ap.add_argument("--tree", type=int, nargs="+",
                    help=f"tree nodes T per sequence ({FULL['tree']}); the committed path "
                         "is every other node, T/2 of them")
    ap.add_argument("--prefix", type=int, help=f"committed tokens before the tree ({FULL['prefix']})")
    ap.add_argument("--heads-kv", type=int, help=f"KV heads ({FULL['heads_kv']})")
    ap.add_argument("--head-dim", type=int, help=f"head dim ({FULL['head_dim']})")
    ap.add_argument("--page", type=int, help=f"cache block size ({FULL['page']})")
    ap.add_argument("--layers", type=int, help=f"layers moved by one commit ({FULL['layers']})")
    ap.add_argument("--dtype", choices=list(DTYPES), help=f"({FULL['dtype']})")
    ap.add_argument("--repeats", type=int, help=f"timed repeats ({FULL['repeats']})")
    ap.add_argument("--warmup", type=int, help=f"untimed calls first ({FULL['warmup']})")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dry-run", action="store_true", help=f"tiny shapes, CPU allowed: {DRY}")
    ap.add_argument("--json", default=None, metavar="PATH", help="write the rows here")
    args = ap.parse_args(argv)
    base = DRY if args.dry_run else FULL
    for k, v in base.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def with_backend(name, fn):
    """``fn()`` with the ops backend ``name``."""
    from specrt import ops  # imported late: the scripts set TRITON_INTERPRET first

    with ops.using_backend(name):
        return fn()


def slots(bt: torch.Tensor, pos: torch.Tensor, page: int):
    """(block ids, offsets) of positions ``pos [B, N]`` under block tables ``bt [B, M]``."""
    return bt.long().gather(1, pos // page), pos % page


def torch_append(kv, bt, start, k, v):
    B, T = k.shape[:2]
    pos = start[:, None] + torch.arange(T, device=kv.device)
    blk, off = slots(bt, pos, kv.shape[2])
    kv[blk, 0, off] = k
    kv[blk, 1, off] = v


def torch_commit(kv, bt, prefix, path, plen):
    """Gather-then-scatter; equal to the in-order copy since ``path`` is increasing."""
    P = path.shape[1]
    ar = torch.arange(P, device=kv.device)
    src_blk, src_off = slots(bt, prefix[:, None] + path, kv.shape[2])
    dst_blk, dst_off = slots(bt, prefix[:, None] + ar, kv.shape[2])
    ok = ar[None] < plen[:, None]
    data = kv[src_blk[ok], :, src_off[ok]]
    kv[dst_blk[ok], :, dst_off[ok]] = data


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("bench_kv: needs a CUDA device (none found); --dry-run runs tiny shapes on CPU.")
        return 0
    device = "cuda" if cuda else "cpu"
    if not cuda:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the Triton kernels load
    from specrt import _C, ops

    dev = torch.device(device)
    res = meta("kv", args, dev)
    if cuda:
        impls = ["triton"] + (["cuda"] if getattr(_C, "with_cuda", False) else [])
    else:
        impls = ["cpu"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
    impls.append("torch")
    res["impls"] = impls
    res["specrt_cuda_ops"] = bool(getattr(_C, "with_cuda", False))
    dtype = DTYPES[args.dtype]
    esz = torch.finfo(dtype).bits // 8
    H, D, page, L = args.heads_kv, args.head_dim, args.page, args.layers
    bw = copy_bandwidth(1 << 30 if cuda else 1 << 24, device)
    res["copy_bandwidth_GBps"] = bw / 1e9
    print(f"device: {res['device']}; copy bandwidth {bw / 1e9:.0f} GB/s; {args.dtype}, "
          f"{H} KV heads x {D}, page {page}, prefix {args.prefix}, {L} layers per commit; "
          f"implementations: {', '.join(impls)}" + (" [dry run]" if args.dry_run else ""))
    print(f"{'op':>6} {'B':>4} {'T':>4} {'moved':>6} | " + " | ".join(
        f"{i + ' ms':>10} {'bw':>5}" for i in impls) + " | match")
    write_json(args.json, res)
    g = torch.Generator().manual_seed(args.seed)
    for B in args.batch:
        for T in args.tree:
            need = math.ceil((args.prefix + T) / page)
            nb = B * need
            # one layer's cache for append; L layers stacked as one [L * nb] block pool for
            # commit, block tables offset per layer (how the engine commits all layers)
            kv = torch.randn(L * nb, 2, page, H, D, dtype=dtype, device=dev)
            bt = torch.randperm(nb, generator=g).view(B, need).int().to(dev)
            start = torch.full((B,), args.prefix, dtype=torch.int64, device=dev)
            k = torch.randn(B, T, H, D, dtype=dtype, device=dev)
            v = torch.randn(B, T, H, D, dtype=dtype, device=dev)
            n_path = max(1, T // 2)
            path = (torch.arange(n_path, device=dev) * 2)[None].repeat(L * B, 1)
            plen = torch.full((L * B,), n_path, dtype=torch.int64, device=dev)
            bts = torch.cat([bt + layer * nb for layer in range(L)])
            pre_l = start.repeat(L)
            cases = {  # op: (cache it works on, tokens moved, call)
                "append": (kv[:nb], B * T, lambda impl, c: (
                    torch_append(c, bt, start, k, v) if impl == "torch" else
                    with_backend(impl, lambda: ops.append_kv(c, bt, start, k, v)))),
                "commit": (kv, L * B * n_path, lambda impl, c: (
                    torch_commit(c, bts, pre_l, path, plen) if impl == "torch" else
                    with_backend(impl, lambda: ops.commit_kv(c, bts, pre_l, path, plen)))),
            }
            for op, (base, tokens, run) in cases.items():
                moved = 2 * tokens * 2 * H * D * esz       # K and V, read + written
                row = {"op": op, "B": B, "T": T, "path_len": n_path if op == "commit" else None,
                       "layers": L if op == "commit" else 1, "bytes": moved}
                ref = base.clone()
                run("torch", ref)
                cells, match = [], True
                for impl in impls:
                    if impl != "torch":
                        out = base.clone()
                        run(impl, out)
                        same = bool(torch.equal(out, ref))
                        row[f"{impl}_matches_torch"] = same
                        match &= same
                        del out
                    work = base.clone()
                    ms = cuda_time(lambda: run(impl, work), args.warmup, args.repeats, device)
                    frac = moved / (ms * 1e-3) / bw
                    row[f"{impl}_ms"], row[f"{impl}_bw_frac"] = ms, frac
                    cells.append(f"{ms:>10.4f} {frac:>5.2f}")
                    del work
                row["match"] = match
                print(f"{op:>6} {B:>4} {T:>4} {moved / 2**20:5.1f}M | " + " | ".join(cells)
                      + f" | {match}", flush=True)
                res["rows"].append(row)
                write_json(args.json, res)
                del ref, base
            del kv, cases
            if cuda:
                torch.cuda.empty_cache()
    res["complete"] = True
    res["all_match"] = all(r["match"] for r in res["rows"])
    write_json(args.json, res)
    return 0 if res["all_match"] else 1


if __name__ == "__main__":
    sys.exit(main())
