"""Benchmark: specrt tree attention vs PyTorch SDPA and FlashInfer, Llama-3-8B shapes.

Compares, from one run, on the same paged cache and tree masks:

* ``specrt``  - one layer's :meth:`specrt.ops.TreeAttentionPlan.run` (Triton; split-KV
  chosen automatically, or forced with ``--splits``), the plan (packed mask) built once
  outside the timed region, as the model does once per step for all layers;
* ``sdpa``    - PyTorch ``scaled_dot_product_attention`` over K/V gathered from the
  block table, with a dense ``[T, L]`` bool mask (gather included in the time, as
  it is part of what a non-paged kernel needs);
* ``flashinfer`` - ``BatchPrefillWithPagedKVCacheWrapper`` with a packed custom mask
  (``plan`` outside the timed region), when flashinfer is installed.

Times are medians over ``--repeats`` CUDA-event measurements. ``bw`` is the achieved
bandwidth (K/V bytes of prefix + tree read once, plus q and out) as a fraction of
the device-to-device copy bandwidth measured at start-up with a large torch copy.
``--json PATH`` writes every row (rewritten after each, so a run cut short keeps what
it measured). ``--dry-run`` runs tiny shapes for a few iterations; without CUDA it runs
the Triton kernel through Triton's interpreter (``TRITON_INTERPRET=1``, set here) and
times with the wall clock: a check that the script works, not a measurement.

Usage::

    python bench/bench_tree_attention.py             # --quick set
    python bench/bench_tree_attention.py --batch 1 8 --prefix 4096 32768 --tree 16 64
    python bench/bench_tree_attention.py --dry-run --json /tmp/ta.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time

import torch

LLAMA3_8B = dict(heads=(32, 8), head_dim=128, page=16)   # attention of Llama-3-8B, page 16

QUICK = dict(batch=[1, 8, 32], prefix=[512, 4096, 32768], tree=[8, 64])
FULL = dict(batch=[1, 4, 16, 64], prefix=[512, 2048, 8192, 32768], tree=[8, 16, 32, 64])
DRY = dict(batch=[1, 2], prefix=[40], tree=[4, 8], heads=(4, 2), head_dim=16, page=16,
           dtype="fp32", repeats=2, warmup=1)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


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
    ap.add_argument("--dry-run", action="store_true",
                    help=f"tiny shapes, a few iterations, CPU allowed (interpreter): {DRY}")
    ap.add_argument("--heads", type=int, nargs=2, metavar=("H_Q", "H_KV"), default=None,
                    help=f"query / KV heads (default {LLAMA3_8B['heads']})")
    ap.add_argument("--head-dim", type=int, default=None,
                    help=f"head dim (default {LLAMA3_8B['head_dim']})")
    ap.add_argument("--page", type=int, default=None,
                    help=f"cache block size (default {LLAMA3_8B['page']})")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None, help="default bf16")
    ap.add_argument("--splits", type=int, default=None,
                    help="force specrt's split-KV factor (default: automatic)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per config (30)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls first (5)")
    ap.add_argument("--max-tokens", type=int, default=2_000_000,
                    help="skip configs with batch * (prefix + T) above this (memory)")
    ap.add_argument("--no-sdpa", action="store_true", help="skip the SDPA baseline")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, metavar="PATH", help="write the rows here")
    args = ap.parse_args(argv)
    base = DRY if args.dry_run else LLAMA3_8B
    for k in ("heads", "head_dim", "page"):
        if getattr(args, k) is None:
            setattr(args, k, base[k])
    if args.dtype is None:
        args.dtype = DRY["dtype"] if args.dry_run else "bf16"
    if args.repeats is None:
        args.repeats = DRY["repeats"] if args.dry_run else 30
    if args.warmup is None:
        args.warmup = DRY["warmup"] if args.dry_run else 5
    return args


def configs(args):
    base = DRY if args.dry_run else FULL if args.full else QUICK
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


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def cuda_time(fn, warmup: int, repeats: int, device="cuda") -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` timed calls: CUDA events on a
    CUDA device, the wall clock elsewhere (dry runs)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if torch.device(device).type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 1 << 30, device="cuda") -> float:
    """Copy bandwidth of ``device`` in bytes/s (read + write counted)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = cuda_time(lambda: dst.copy_(src), 3, 20, device)
    del src, dst
    return 2 * nbytes / (ms * 1e-3)


def device_name(device) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({torch.get_num_threads()} threads)"


def meta(bench: str, args, device) -> dict:
    """Fields every bench JSON of bench/gpu.sh starts with."""
    try:
        import triton
        tv = triton.__version__
    except Exception:  # noqa: BLE001
        tv = None
    return {"bench": bench, "date": datetime.date.today().isoformat(),
            "device": device_name(device), "torch": torch.__version__, "triton": tv,
            "cuda": torch.version.cuda, "dry_run": bool(getattr(args, "dry_run", False)),
            "args": {k: v for k, v in vars(args).items() if k != "json"}, "complete": False,
            "notes": [], "rows": []}


def write_json(path, res: dict) -> None:
    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, indent=1)
        os.replace(tmp, path)


def random_trees(B: int, T: int, g: torch.Generator) -> torch.Tensor:
    """[B, T] parent arrays of random trees (parents[i] < i)."""
    par = torch.zeros(B, T, dtype=torch.int64)
    par[:, 0] = -1
    for i in range(1, T):
        par[:, i] = torch.randint(0, i, (B,), generator=g)
    return par


def make_inputs(B, P, T, args, g, device):
    Hq, Hkv = args.heads
    D, page = args.head_dim, args.page
    dtype = DTYPES[args.dtype]
    need = math.ceil((P + T) / page)
    nblocks = B * need
    cache = torch.randn(nblocks, 2, page, Hkv, D, dtype=dtype, device=device)
    bt = torch.randperm(nblocks, generator=g).view(B, need).int().to(device)
    q = torch.randn(B, T, Hq, D, dtype=dtype, device=device)
    prefix = torch.full((B,), P, dtype=torch.int64, device=device)
    from specrt.ops import build_tree_mask

    mask = build_tree_mask(random_trees(B, T, g).to(device))
    return cache, bt, q, prefix, mask


def bench_specrt(cache, bt, q, prefix, mask, args):
    from specrt import ops

    # the runtime's split: plan once per step (mask packing), then one run per layer
    plan = ops.plan_tree_attention(bt, prefix, q.shape[1], cache.shape[2], mask)
    out = torch.empty_like(q)
    scale = 1.0 / math.sqrt(q.shape[-1])

    def fn():
        plan.run(q, cache, scale, out=out, num_splits=args.splits)
    return fn, out


def bench_sdpa(cache, bt, q, prefix, mask, P):
    B, T = q.shape[:2]
    page = cache.shape[2]
    L = P + T
    dev = q.device
    pos = torch.arange(L, device=dev)
    blocks = bt.long()[:, pos // page]
    full = torch.ones(B, T, L, dtype=torch.bool, device=dev)
    full[:, :, P:] = mask
    scale = 1.0 / math.sqrt(q.shape[-1])
    res = {}

    def fn():
        kv = cache[blocks, :, pos % page]                      # [B, L, 2, Hkv, D]
        k = kv[:, :, 0].transpose(1, 2)
        v = kv[:, :, 1].transpose(1, 2)
        o = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k, v, attn_mask=full[:, None], scale=scale, enable_gqa=True)
        res["out"] = o.transpose(1, 2)
    return fn, res


def bench_flashinfer(cache, bt, q, prefix, mask, P):
    import flashinfer

    B, T, Hq, D = q.shape
    Hkv, page = cache.shape[3], cache.shape[2]
    need = bt.shape[1]
    L = P + T
    ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD")
    qo_indptr = torch.arange(B + 1, dtype=torch.int32, device="cuda") * T
    kv_indptr = torch.arange(B + 1, dtype=torch.int32, device="cuda") * need
    kv_indices = bt.reshape(-1).contiguous()
    last = torch.full((B,), (L - 1) % page + 1, dtype=torch.int32, device="cuda")
    full = torch.ones(B, T, L, dtype=torch.bool, device="cuda")
    full[:, :, P:] = mask
    # plan() packs the flattened [T, L] masks into bits (little bit order) once, untimed
    w.plan(qo_indptr, kv_indptr, kv_indices, last, Hq, Hkv, D, page,
           custom_mask=full.reshape(-1), q_data_type=q.dtype, kv_data_type=cache.dtype)
    qf = q.reshape(B * T, Hq, D)
    res = {}

    def fn():
        res["out"] = w.run(qf, cache).view(B, T, Hq, D)
    return fn, res


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print("bench_tree_attention: needs a CUDA device (none found); nothing to do "
              "(--dry-run runs tiny shapes through Triton's interpreter).")
        return 0
    device = "cuda" if cuda else "cpu"
    if not cuda:  # the Triton kernel on CPU tensors: interpreter, set before triton loads
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ["SPECRT_OPS_BACKEND"] = "triton"
    res = meta("tree_attention", args, device)
    res["backend"] = "triton" + ("" if cuda else " (interpreted)")
    have_fi = False
    if cuda:
        try:
            import flashinfer  # noqa: F401
            have_fi = True
            res["flashinfer"] = getattr(flashinfer, "__version__", "unknown")
        except Exception as e:  # noqa: BLE001
            res["flashinfer"] = None
            res["notes"].append(f"flashinfer not available ({type(e).__name__}: {e}); its "
                                "columns are skipped")
            print(f"note: {res['notes'][-1]}")
    dtype = DTYPES[args.dtype]
    esz = torch.finfo(dtype).bits // 8
    Hq, Hkv = args.heads
    D = args.head_dim
    bw_copy = copy_bandwidth(1 << 30 if cuda else 1 << 24, device)
    res["copy_bandwidth_GBps"] = bw_copy / 1e9
    print(f"device: {res['device']}  torch {torch.__version__}  dtype {args.dtype}  "
          f"heads {Hq}/{Hkv} D {D} page {args.page}" + ("  [dry run]" if args.dry_run else ""))
    print(f"copy bandwidth: {bw_copy / 1e9:.0f} GB/s")
    hdr = (f"{'B':>3} {'prefix':>6} {'T':>3} | {'specrt ms':>9} {'bw':>5} | {'sdpa ms':>8} "
           f"{'x':>6} | {'flashinfer ms':>13} {'bw':>5} {'x':>6} | {'maxdiff':>8}")
    print(hdr)
    print("-" * len(hdr))
    write_json(args.json, res)
    g = torch.Generator().manual_seed(args.seed)
    oom = torch.cuda.OutOfMemoryError if cuda else MemoryError
    for B, P, T in configs(args):
        cache, bt, q, prefix, mask = make_inputs(B, P, T, args, g, device)
        moved = (B * (P + T) * 2 * Hkv * D + 2 * B * T * Hq * D) * esz
        row = {"B": B, "prefix": P, "T": T, "bytes": moved}

        def frac(ms):
            return moved / (ms * 1e-3) / bw_copy

        fn, out = bench_specrt(cache, bt, q, prefix, mask, args)
        t_s = cuda_time(fn, args.warmup, args.repeats, device)
        row.update(specrt_ms=t_s, specrt_bw_frac=frac(t_s))
        line = f"{B:>3} {P:>6} {T:>3} | {t_s:>9.4f} {frac(t_s):>5.2f} | "
        ref = None
        if not args.no_sdpa:
            try:
                fn2, r2 = bench_sdpa(cache, bt, q, prefix, mask, P)
                t_p = cuda_time(fn2, args.warmup, args.repeats, device)
                ref = r2["out"]
                row.update(sdpa_ms=t_p, sdpa_over_specrt=t_p / t_s)
                line += f"{t_p:>8.4f} {t_p / t_s:>5.2f}x | "
            except oom:
                row["sdpa_ms"] = "OOM"
                line += f"{'OOM':>8} {'':>6} | "
                if cuda:
                    torch.cuda.empty_cache()
        else:
            line += f"{'-':>8} {'':>6} | "
        if have_fi:
            try:
                fn3, r3 = bench_flashinfer(cache, bt, q, prefix, mask, P)
                t_f = cuda_time(fn3, args.warmup, args.repeats, device)
                ref = r3["out"] if ref is None else ref
                row.update(flashinfer_ms=t_f, flashinfer_bw_frac=frac(t_f),
                           flashinfer_over_specrt=t_f / t_s)
                line += f"{t_f:>13.4f} {frac(t_f):>5.2f} {t_f / t_s:>5.2f}x | "
            except Exception as e:  # noqa: BLE001
                row["flashinfer_ms"] = f"error {type(e).__name__}: {e}"[:300]
                line += f"{'err ' + type(e).__name__:>13} {'':>5} {'':>6} | "
        else:
            line += f"{'-':>13} {'':>5} {'':>6} | "
        diff = (out.float() - ref.float()).abs().max().item() if ref is not None else None
        row["maxdiff"] = diff
        line += f"{diff:>8.1e}" if diff is not None else f"{'-':>8}"
        print(line, flush=True)
        res["rows"].append(row)
        write_json(args.json, res)
        del cache, bt, q, prefix, mask
        if cuda:
            torch.cuda.empty_cache()
    res["complete"] = True
    write_json(args.json, res)
    print("x = baseline time / specrt time (>1: specrt faster); bw = fraction of copy bandwidth")
    return 0


if __name__ == "__main__":
    sys.exit(main())
