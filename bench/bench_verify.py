"""Benchmark of specrt's verification (rejection sampling) kernels.

On a CUDA device: chain_verify (chains of K = T - 1 drafts) through the Triton and the
CUDA implementations, against FlashInfer's ``chain_speculative_sampling`` (when
flashinfer is installed) and against the bandwidth floor of reading target_probs and
draft_probs once (device copy bandwidth measured here); plus verify_tree on random trees
in the three modes. Batch 1..64, V 32k and 128k, T 8..64 by default.

Without CUDA it runs a small CPU comparison (specrt._C vs a vectorised torch
reference) and says that GPU figures need a GPU. ``--dry-run`` runs the GPU benchmark's
code path on tiny shapes for a few iterations (without CUDA: specrt._C and the Triton
kernels through Triton's interpreter, timed by the wall clock; a check that the script
works, not a measurement). ``--json PATH`` writes every row (rewritten after each).

    python bench/bench_verify.py                     # defaults
    python bench/bench_verify.py --batch 1 16 --vocab 128256 --tree 8 32
    python bench/bench_verify.py --dry-run --json /tmp/verify.json
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from bench_tree_attention import meta, write_json

DRY = dict(batch=[2], vocab=[64], tree=[4], iters=2)


def _parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=None,
                    help="batch sizes (default 1 8 64)")
    ap.add_argument("--vocab", type=int, nargs="+", default=None,
                    help="vocab sizes (default 32000 128256)")
    ap.add_argument("--tree", type=int, nargs="+", default=None,
                    help="tree sizes T (chains use K = T - 1 drafts; default 8 16 64)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--iters", type=int, default=None,
                    help="timed iterations per case (default 50)")
    ap.add_argument("--no-trees", action="store_true", help="chains only")
    ap.add_argument("--dry-run", action="store_true", help=f"tiny shapes, CPU allowed: {DRY}")
    ap.add_argument("--json", default=None, metavar="PATH", help="write the rows here")
    args = ap.parse_args(argv)
    for k, full in (("batch", [1, 8, 64]), ("vocab", [32000, 128256]), ("tree", [8, 16, 64]),
                    ("iters", 50)):
        if getattr(args, k) is None:
            setattr(args, k, DRY[k] if args.dry_run else full)
    return args


def _probs(shape, device, dtype, gen):
    x = torch.randn(shape, device=device, generator=gen) * 2
    return torch.softmax(x, -1).to(dtype)


def _time(fn, iters, device):
    """Mean microseconds of ``fn()``: CUDA events on CUDA, the wall clock elsewhere."""
    for _ in range(3 if device.type == "cuda" else 1):
        fn()
    if device.type != "cuda":
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters * 1e6
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e3  # us


def _copy_bandwidth(device):
    n = (256 << 20) if device.type == "cuda" else (16 << 20)
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    us = _time(lambda: b.copy_(a), 20, device)
    return 2 * n / (us * 1e-6)  # bytes/s (read + write)


def _with_backend(name, fn):
    """``fn()`` with the ops backend ``name``."""
    from specrt import ops  # imported late: the scripts set TRITON_INTERPRET first

    with ops.using_backend(name):
        return fn()


def _random_trees(B, T, V, device, dtype, gen):
    g = torch.Generator().manual_seed(T * 1000 + B)
    parents = torch.full((B, T), -1, dtype=torch.int64)
    for i in range(1, T):
        parents[:, i] = torch.randint(max(0, i - 4), i, (B,), generator=g)  # bushy, shallow
    target = _probs((B, T, V), device, dtype, gen)
    draft = _probs((B, T, V), device, dtype, gen)
    tokens = torch.randint(0, V, (B, T), device=device, generator=gen)
    am = target.argmax(-1)
    tokens = torch.where(torch.rand(B, T, device=device, generator=gen) < 0.5,
                         am.gather(1, parents.to(device).clamp(min=0)), tokens)
    return target, tokens, parents.to(device), torch.full((B,), T, device=device), draft


def bench_kernels(args, device):
    """Chain and tree verification through every implementation the device has."""
    from specrt import _C, ops

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device=dev).manual_seed(0)
    res = meta("verify", args, dev)
    fi_chain = None
    if cuda:
        try:
            from flashinfer.sampling import chain_speculative_sampling as fi_chain
        except Exception as e:  # noqa: BLE001 - any import problem means "not available"
            res["notes"].append(f"flashinfer not available ({type(e).__name__}); its column "
                                "is skipped")
    if cuda:
        impls = ["triton"] + (["cuda"] if getattr(_C, "with_cuda", False) else [])
    else:  # dry run on CPU: the C++ code and the interpreted Triton kernels
        impls = ["cpu"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
    res["impls"] = impls + (["flashinfer"] if fi_chain else [])
    res["specrt_cuda_ops"] = bool(getattr(_C, "with_cuda", False))
    bw = _copy_bandwidth(dev)
    res["copy_bandwidth_GBps"] = bw / 1e9
    print(f"device: {res['device']}; copy bandwidth {bw / 1e9:.0f} GB/s; dtype {args.dtype}; "
          f"flashinfer: {'yes' if fi_chain else 'not installed'}; implementations: "
          f"{', '.join(impls)}" + (" [dry run]" if args.dry_run else ""))
    cols = impls + ["flashinfer"]
    print("\nchain verification (K = T - 1 sampled drafts), microseconds; x = ratio to floor")
    print(f"{'B':>4} {'V':>7} {'T':>4} {'floor':>8} " + " ".join(f"{c:>14}" for c in cols))
    write_json(args.json, res)
    for V in args.vocab:
        for T in args.tree:
            K = T - 1
            for B in args.batch:
                q = _probs((B, K, V), dev, dtype, gen)
                p = _probs((B, K + 1, V), dev, dtype, gen)
                ids = torch.multinomial(q.float().reshape(-1, V), 1, generator=gen).reshape(B, K)
                floor = (p.numel() + q.numel()) * p.element_size() / bw * 1e6
                row = {"kind": "chain", "B": B, "V": V, "T": T, "floor_us": floor}
                cells = []
                for impl in impls:
                    g2 = torch.Generator(device=dev).manual_seed(1)
                    t = _time(lambda: _with_backend(
                        impl, lambda: ops.chain_verify(q, ids, p, generator=g2)), args.iters, dev)
                    row[f"{impl}_us"] = t
                    cells.append(f"{t:8.1f} {t / floor:4.1f}x")
                if fi_chain is not None:
                    g2 = torch.Generator(device=dev).manual_seed(1)
                    ids32 = ids.to(torch.int32)
                    try:
                        t = _time(lambda: fi_chain(q.float(), ids32, p.float(), generator=g2)
                                  if dtype != torch.float32 else
                                  fi_chain(q, ids32, p, generator=g2), args.iters, dev)
                        row["flashinfer_us"] = t
                        cells.append(f"{t:8.1f} {t / floor:4.1f}x")
                    except Exception as e:  # noqa: BLE001 - API differs between versions
                        row["flashinfer_us"] = f"error {type(e).__name__}: {e}"[:300]
                        cells.append(f"{'err':>14}")
                else:
                    cells.append(f"{'-':>14}")
                print(f"{B:>4} {V:>7} {T:>4} {floor:8.1f} " + " ".join(cells), flush=True)
                res["rows"].append(row)
                write_json(args.json, res)
                del q, p
    if not args.no_trees:
        print("\ntree verification (random trees, all T nodes valid), microseconds")
        print(f"{'B':>4} {'V':>7} {'T':>4} {'floor':>8} {'impl':>7} {'greedy':>9} "
              f"{'sampled':>9} {'determ.':>9}")
        for V in args.vocab:
            for T in args.tree:
                for B in args.batch:
                    target, tokens, parents, lens, draft = _random_trees(B, T, V, dev, dtype, gen)
                    floor = 2 * target.numel() * target.element_size() / bw * 1e6
                    for impl in impls:
                        g2 = torch.Generator(device=dev).manual_seed(1)
                        row = {"kind": "tree", "B": B, "V": V, "T": T, "floor_us": floor,
                               "impl": impl}
                        for mode in ("greedy", "sampled", "deterministic"):
                            d = draft if mode == "sampled" else None
                            row[f"{mode}_us"] = _time(lambda: _with_backend(
                                impl, lambda: ops.verify_tree(
                                    target, tokens, parents, lens, d, greedy=mode == "greedy",
                                    generator=g2)), args.iters, dev)
                        print(f"{B:>4} {V:>7} {T:>4} {floor:8.1f} {impl:>7} " + " ".join(
                            f"{row[m + '_us']:9.1f}" for m in ("greedy", "sampled",
                                                                "deterministic")), flush=True)
                        res["rows"].append(row)
                        write_json(args.json, res)
                    del target, draft
    res["complete"] = True
    write_json(args.json, res)


def _torch_chain_reference(q, ids, p, u):
    """Vectorised torch chain rejection sampling (same uniform layout as specrt)."""
    B, K, V = q.shape
    pi = p[:, :K].gather(2, ids[..., None])[..., 0]
    qi = q.gather(2, ids[..., None])[..., 0]
    ok = u[:, 1:] * qi < pi
    emitted = torch.where(ok.all(1), K, (~ok).int().argmax(1))
    rows = torch.arange(B)
    pr = p[rows, emitted]
    qr = torch.cat([q, torch.zeros(B, 1, V)], 1)[rows, emitted]
    resid = torch.where((emitted < K)[:, None], (pr - qr).clamp(min=0), pr)
    c = resid.cumsum(-1)
    nxt = torch.searchsorted(c, (u[:, :1] * c[:, -1:]).contiguous(), right=True)[:, 0]
    return emitted, nxt.clamp(max=V - 1)


def bench_cpu(args):
    from specrt import ops

    res = meta("verify_cpu", args, "cpu")
    print(f"device: CPU ({torch.get_num_threads()} threads); no CUDA device - GPU figures "
          "(Triton / CUDA kernels, FlashInfer, bandwidth floor) need a GPU.")
    gen = torch.Generator().manual_seed(0)
    print(f"{'B':>4} {'V':>7} {'T':>4} {'specrt._C us':>13} {'torch ref us':>13} {'agree':>6}")
    for B, V, T in [(1, 32000, 8), (8, 32000, 8), (8, 32000, 16), (8, 128256, 8)]:
        K = T - 1
        q = _probs((B, K, V), "cpu", torch.float32, gen)
        p = _probs((B, K + 1, V), "cpu", torch.float32, gen)
        ids = torch.multinomial(q.reshape(-1, V), 1, generator=gen).reshape(B, K)
        u = torch.rand(B, K + 1, generator=gen)
        reps = 20
        t0 = time.perf_counter()
        for _ in range(reps):
            out, _, emi = ops.chain_verify(q, ids, p, uniforms=u)
        t_c = (time.perf_counter() - t0) / reps * 1e6
        t0 = time.perf_counter()
        for _ in range(reps):
            e_ref, n_ref = _torch_chain_reference(q, ids, p, u)
        t_r = (time.perf_counter() - t0) / reps * 1e6
        agree = bool((emi.long() == e_ref).all()) and bool(
            (out.long().gather(1, emi.long()[:, None])[:, 0] == n_ref).float().mean() >= 0.9)
        print(f"{B:>4} {V:>7} {T:>4} {t_c:13.1f} {t_r:13.1f} {str(agree):>6}")
        res["rows"].append({"B": B, "V": V, "T": T, "specrt_C_us": t_c, "torch_ref_us": t_r,
                            "agree": agree})
        write_json(args.json, res)
    res["complete"] = True
    write_json(args.json, res)


def main(argv=None):
    args = _parse(argv)
    if torch.cuda.is_available():
        bench_kernels(args, "cuda")
    elif args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the Triton kernels load
        bench_kernels(args, "cpu")
    else:
        bench_cpu(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
