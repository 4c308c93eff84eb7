"""Benchmark: specrt tree attention vs PyTorch SDPA and FlashInfer, Llama-3-8B shapes.

Compares, from one run, on the same paged cache and tree masks:

* ``specrt``  - :func:`specrt.ops.tree_attention` (Triton; split-KV chosen automatically,
  or forced with ``--splits``), packed mask built once outside the timed region
  (as the runtime does once per step for all layers);
* ``sdpa``    - PyTorch ``scaled_dot_product_attention`` over K/V gathered from the
  block table, with a dense ``[T, L]`` bool mask (gather included in the time, as
  it is part of what a non-paged kernel needs);
* ``flashinfer`` - ``BatchPrefillWithPagedKVCacheWrapper`` with a packed custom mask
  (``plan`` outside the timed region), when flashinfer is installed.

Times are medians over ``--repeats`` CUDA-event measurements. ``bw`` is the achieved
bandwidth (K/V bytes of prefix + tree read once, plus q and out) as a fraction of
the device-to-device copy bandwidth measured at start-up with a large torch copy.

Usage::

    python bench/bench_tree_attention.py             # --quick set
    python bench/bench_tree_attention.py --batch 1 8 --prefix 4096 32768 --tree 16 64
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys

import torch

H_Q, H_KV, HEAD_DIM, PAGE = 32, 8, 128, 16          # Llama-3-8B attention, page size 16

QUICK = dict(batch=[1, 8, 32], prefix=[512, 4096, 32768], tree=[8, 64])
FULL = dict(batch=[1, 4, 16, 64], prefix=[512, 2048, 8192, 32768], tree=[8, 16, 32, 64])


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", help="batch sizes (1..64)")
    ap.add_argument("--prefix", type=int, nargs="+", help="prefix lengths (512..32k)")
    ap.add_argument("--tree", type=int, nargs="+", help="tree sizes T (8..64)")
    ap.add_argument("--quick", action="store_true",
                    help="the small default set (used when no list is given): "
                         f"{QUICK}")
    ap.add_argument("--full", action="store_true", help=f"the full sweep: {FULL}")
    ap.add_argument("--dtype", choices=["fp16", "bf16"], default="bf16")
    ap.add_argument("--splits", type=int, default=None,
                    help="force specrt's split-KV factor (default: automatic)")
    ap.add_argument("--repeats", type=int, default=30, help="timed repeats per config")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=2_000_000,
                    help="skip configs with batch * (prefix + T) above this (memory)")
    ap.add_argument("--no-sdpa", action="store_true", help="skip the SDPA baseline")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def configs(args):
    base = FULL if args.full else QUICK
    bs = args.batch or base["batch"]
    ps = args.prefix or base["prefix"]
    ts = args.tree or base["tree"]
    out = []
    for B in bs:
        for P in ps:
            for T in ts:
                if B * (P + T) <= args.max_tokens:
                    out.append((B, P, T))
    return out


def cuda_time(fn, warmup: int, repeats: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` CUDA-event-timed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_time(lambda: dst.copy_(src), 3, 20)
    del src, dst
    return 2 * nbytes / (ms * 1e-3)


def random_trees(B: int, T: int, g: torch.Generator) -> torch.Tensor:
    """[B, T] parent arrays of random trees (parents[i] < i)."""
    par = torch.zeros(B, T, dtype=torch.int64)
    par[:, 0] = -1
    for i in range(1, T):
        par[:, i] = torch.randint(0, i, (B,), generator=g)
    return par


def make_inputs(B, P, T, dtype, g):
    need = math.ceil((P + T) / PAGE)
    nblocks = B * need
    cache = torch.randn(nblocks, 2, PAGE, H_KV, HEAD_DIM, dtype=dtype, device="cuda")
    bt = torch.randperm(nblocks, generator=g).view(B, need).int().cuda()
    q = torch.randn(B, T, H_Q, HEAD_DIM, dtype=dtype, device="cuda")
    prefix = torch.full((B,), P, dtype=torch.int64, device="cuda")
    from specrt.ops import build_tree_mask

    mask = build_tree_mask(random_trees(B, T, g).cuda())
    return cache, bt, q, prefix, mask


def bench_specrt(cache, bt, q, prefix, mask, args):
    from specrt import ops
    from specrt.kernels.attention import pack_tree_mask

    packed = pack_tree_mask(mask)
    out = torch.empty_like(q)
    scale = 1.0 / math.sqrt(HEAD_DIM)

    def fn():
        ops.tree_attention(q, cache, bt, prefix, None, None, scale, packed_mask=packed,
                           num_splits=args.splits, out=out)
    return fn, out


def bench_sdpa(cache, bt, q, prefix, mask, P):
    B, T = q.shape[:2]
    L = P + T
    pos = torch.arange(L, device="cuda")
    blocks = bt.long()[:, pos // PAGE]
    full = torch.ones(B, T, L, dtype=torch.bool, device="cuda")
    full[:, :, P:] = mask
    scale = 1.0 / math.sqrt(HEAD_DIM)
    res = {}

    def fn():
        kv = cache[blocks, :, pos % PAGE]                      # [B, L, 2, Hkv, D]
        k = kv[:, :, 0].transpose(1, 2)
        v = kv[:, :, 1].transpose(1, 2)
        o = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k, v, attn_mask=full[:, None], scale=scale, enable_gqa=True)
        res["out"] = o.transpose(1, 2)
    return fn, res


def bench_flashinfer(cache, bt, q, prefix, mask, P):
    import flashinfer

    B, T = q.shape[:2]
    need = bt.shape[1]
    L = P + T
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
    qo_indptr = torch.arange(B + 1, dtype=torch.int32, device="cuda") * T
    kv_indptr = torch.arange(B + 1, dtype=torch.int32, device="cuda") * need
    kv_indices = bt.reshape(-1).contiguous()
    last = torch.full((B,), (L - 1) % PAGE + 1, dtype=torch.int32, device="cuda")
    full = torch.ones(B, T, L, dtype=torch.bool, device="cuda")
    full[:, :, P:] = mask
    # plan() packs the flattened [T, L] masks into bits (little bit order) once, untimed
    w.plan(qo_indptr, kv_indptr, kv_indices, last, H_Q, H_KV, HEAD_DIM, PAGE,
           custom_mask=full.reshape(-1), q_data_type=q.dtype, kv_data_type=cache.dtype)
    qf = q.reshape(B * T, H_Q, HEAD_DIM)
    res = {}

    def fn():
        res["out"] = w.run(qf, cache).view(B, T, H_Q, HEAD_DIM)
    return fn, res


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_tree_attention: needs a CUDA device (none found); nothing to do.")
        return 0
    try:
        import flashinfer  # noqa: F401
        have_fi = True
    except Exception as e:  # noqa: BLE001
        have_fi = False
        print(f"note: flashinfer not available ({type(e).__name__}: {e}); its column is skipped")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    esz = torch.finfo(dtype).bits // 8
    dev_name = torch.cuda.get_device_name()
    bw_copy = copy_bandwidth()
    print(f"device: {dev_name}  torch {torch.__version__}  dtype {args.dtype}  "
          f"heads {H_Q}/{H_KV} D {HEAD_DIM} page {PAGE}")
    print(f"device-to-device copy bandwidth: {bw_copy / 1e9:.0f} GB/s")
    hdr = (f"{'B':>3} {'prefix':>6} {'T':>3} | {'specrt ms':>9} {'bw':>5} | {'sdpa ms':>8} "
           f"{'x':>6} | {'flashinfer ms':>13} {'bw':>5} {'x':>6} | {'maxdiff':>8}")
    print(hdr)
    print("-" * len(hdr))
    g = torch.Generator().manual_seed(args.seed)
    for B, P, T in configs(args):
        cache, bt, q, prefix, mask = make_inputs(B, P, T, dtype, g)
        moved = (B * (P + T) * 2 * H_KV * HEAD_DIM + 2 * B * T * H_Q * HEAD_DIM) * esz

        def frac(ms):
            return moved / (ms * 1e-3) / bw_copy

        fn, out = bench_specrt(cache, bt, q, prefix, mask, args)
        t_s = cuda_time(fn, args.warmup, args.repeats)
        row = f"{B:>3} {P:>6} {T:>3} | {t_s:>9.4f} {frac(t_s):>5.2f} | "
        ref = None
        if not args.no_sdpa:
            try:
                fn2, res = bench_sdpa(cache, bt, q, prefix, mask, P)
                t_p = cuda_time(fn2, args.warmup, args.repeats)
                ref = res["out"]
                row += f"{t_p:>8.4f} {t_p / t_s:>5.2f}x | "
            except torch.cuda.OutOfMemoryError:
                row += f"{'OOM':>8} {'':>6} | "
                torch.cuda.empty_cache()
        else:
            row += f"{'-':>8} {'':>6} | "
        if have_fi:
            try:
                fn3, res3 = bench_flashinfer(cache, bt, q, prefix, mask, P)
                t_f = cuda_time(fn3, args.warmup, args.repeats)
                ref = res3["out"] if ref is None else ref
                row += f"{t_f:>13.4f} {frac(t_f):>5.2f} {t_f / t_s:>5.2f}x | "
            except Exception as e:  # noqa: BLE001
                row += f"{'err ' + type(e).__name__:>13} {'':>5} {'':>6} | "
        else:
            row += f"{'-':>13} {'':>5} {'':>6} | "
        diff = (out.float() - ref.float()).abs().max().item() if ref is not None else float("nan")
        row += f"{diff:>8.1e}"
        print(row, flush=True)
        del cache, bt, q, prefix, mask
        torch.cuda.empty_cache()
    print("x = baseline time / specrt time (>1: specrt faster); bw = fraction of copy bandwidth")
    return 0


if __name__ == "__main__":
    sys.exit(main())
