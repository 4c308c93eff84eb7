"""Benchmark of specrt's verification (rejection sampling) kernels.

On a CUDA device: chain_verify (chains of K = T - 1 drafts) through the Triton and the
CUDA implementations, against FlashInfer's ``chain_speculative_sampling`` (when
flashinfer is installed) and against the bandwidth floor of reading target_probs and
draft_probs once (device copy bandwidth measured here); plus verify_tree on random trees
in the three modes. Batch 1..64, V 32k and 128k, T 8..64 by default.

Without CUDA it runs a small CPU comparison (specrt._C vs a vectorised torch
reference) and says that GPU figures need a GPU.

    python bench/bench_verify.py                     # defaults
    python bench/bench_verify.py --batch 1 16 --vocab 128256 --tree 8 32
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch


def _parse():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64], help="batch sizes")
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256], help="vocab sizes")
    ap.add_argument("--tree", type=int, nargs="+", default=[8, 16, 64],
                    help="tree sizes T (chains use K = T - 1 drafts)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--iters", type=int, default=50, help="timed iterations per case")
    ap.add_argument("--no-trees", action="store_true", help="chains only")
    return ap.parse_args()


def _probs(shape, device, dtype, gen):
    x = torch.randn(shape, device=device, generator=gen) * 2
    return torch.softmax(x, -1).to(dtype)


def _time_cuda(fn, iters):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e3  # us


def _copy_bandwidth(device):
    n = 256 << 20  # 256 MiB
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    us = _time_cuda(lambda: b.copy_(a), 20)
    return 2 * n / (us * 1e-6)  # bytes/s (read + write)


def _with_backend(name, fn):
    old = os.environ.get("SPECRT_OPS_BACKEND")
    os.environ["SPECRT_OPS_BACKEND"] = name
    try:
        return fn()
    finally:
        if old is None:
            os.environ.pop("SPECRT_OPS_BACKEND", None)
        else:
            os.environ["SPECRT_OPS_BACKEND"] = old


def _random_trees(B, T, V, device, dtype, gen):
    parents = torch.full((B, T), -1, dtype=torch.int64)
    for i in range(1, T):
        parents[:, i] = torch.randint(max(0, i - 4), i, (B,))  # bushy, a few levels deep
    target = _probs((B, T, V), device, dtype, gen)
    draft = _probs((B, T, V), device, dtype, gen)
    tokens = torch.randint(0, V, (B, T), device=device, generator=gen)
    am = target.argmax(-1)
    tokens = torch.where(torch.rand(B, T, device=device, generator=gen) < 0.5,
                         am.gather(1, parents.to(device).clamp(min=0)), tokens)
    return target, tokens, parents.to(device), torch.full((B,), T, device=device), draft


def bench_gpu(args):
    from specrt import _C, ops

    dev = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device=dev).manual_seed(0)
    try:
        from flashinfer.sampling import chain_speculative_sampling as fi_chain
    except Exception:  # noqa: BLE001 - any import problem means "not available"
        fi_chain = None
    have_cuda_ops = bool(getattr(_C, "with_cuda", False))
    bw = _copy_bandwidth(dev)
    print(f"device: {torch.cuda.get_device_name(dev)}; copy bandwidth {bw / 1e9:.0f} GB/s; "
          f"dtype {args.dtype}; flashinfer: {'yes' if fi_chain else 'not installed'}; "
          f"specrt CUDA ops: {'yes' if have_cuda_ops else 'no'}")
    print("\nchain verification (K = T - 1 sampled drafts), microseconds; x = ratio to floor")
    hdr = f"{'B':>4} {'V':>7} {'T':>4} {'floor':>8} {'triton':>14} {'cuda':>14} {'flashinfer':>14}"
    print(hdr)
    for V in args.vocab:
        for T in args.tree:
            K = T - 1
            for B in args.batch:
                q = _probs((B, K, V), dev, dtype, gen)
                p = _probs((B, K + 1, V), dev, dtype, gen)
                ids = torch.multinomial(q.float().reshape(-1, V), 1, generator=gen).reshape(B, K)
                floor = (p.numel() + q.numel()) * p.element_size() / bw * 1e6
                g2 = torch.Generator(device=dev).manual_seed(1)
                cols = []
                tt = _time_cuda(lambda: _with_backend(
                    "triton", lambda: ops.chain_verify(q, ids, p, generator=g2)), args.iters)
                cols.append(f"{tt:8.1f} {tt / floor:4.1f}x")
                if have_cuda_ops:
                    tc = _time_cuda(lambda: _with_backend(
                        "cuda", lambda: ops.chain_verify(q, ids, p, generator=g2)), args.iters)
                    cols.append(f"{tc:8.1f} {tc / floor:4.1f}x")
                else:
                    cols.append(f"{'-':>14}")
                if fi_chain is not None:
                    ids32 = ids.to(torch.int32)
                    tf = _time_cuda(lambda: fi_chain(q.float(), ids32, p.float(), generator=g2)
                                    if dtype != torch.float32 else
                                    fi_chain(q, ids32, p, generator=g2), args.iters)
                    cols.append(f"{tf:8.1f} {tf / floor:4.1f}x")
                else:
                    cols.append(f"{'-':>14}")
                print(f"{B:>4} {V:>7} {T:>4} {floor:8.1f} " + " ".join(cols))
                del q, p
    if args.no_trees:
        return
    print("\ntree verification (random trees, all T nodes valid), microseconds")
    print(f"{'B':>4} {'V':>7} {'T':>4} {'floor':>8} {'impl':>7} {'greedy':>9} {'sampled':>9} "
          f"{'determ.':>9}")
    for V in args.vocab:
        for T in args.tree:
            for B in args.batch:
                target, tokens, parents, lens, draft = _random_trees(B, T, V, dev, dtype, gen)
                floor = 2 * target.numel() * target.element_size() / bw * 1e6
                for impl in (["triton", "cuda"] if have_cuda_ops else ["triton"]):
                    g2 = torch.Generator(device=dev).manual_seed(1)
                    times = []
                    for mode in ("greedy", "sampled", "deterministic"):
                        d = draft if mode == "sampled" else None
                        times.append(_time_cuda(lambda: _with_backend(impl, lambda: ops.verify_tree(
                            target, tokens, parents, lens, d, greedy=mode == "greedy",
                            generator=g2)), args.iters))
                    print(f"{B:>4} {V:>7} {T:>4} {floor:8.1f} {impl:>7} " +
                          " ".join(f"{t:9.1f}" for t in times))
                del target, draft


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


def main():
    args = _parse()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if torch.cuda.is_available():
        bench_gpu(args)
    else:
        bench_cpu(args)


if __name__ == "__main__":
    main()
