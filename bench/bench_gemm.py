"""Few-row matrix products on CPU: specrt's skinny GEMM against torch, per row count.

For each M, one pass = every linear layer of the default target's shapes (SmolLM2-135M:
30 x (qkv 576->960, o 576->576, gate_up 576->3072, down 1536->576)) plus the tied LM
head (576->49152), i.e. the weight traffic of one target forward. Modes, interleaved
round by round: ``F.linear`` (torch's BLAS), ``w @ x.T`` (the old few-row workaround)
and ``skinny`` (specrt.ops.gemm). Prints ms per pass and ratios, and the crossover
above which F.linear wins.

    python bench/bench_gemm.py [--rows 1,2,4,8,16,32,64,96,128] [--rounds 5] [--json F]
"""
from __future__ import annotations

import argparse
import datetime
import json
import time

import torch
import torch.nn.functional as F

from specrt.measure import machine
from specrt.ops import gemm

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]   # (N, K) per layer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,2,4,8,16,32,48,64,96,128")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(n, k, generator=g) * 0.02 for n, k in SHAPES] * args.layers
    ws.append(torch.randn(49152, 576, generator=g) * 0.02)
    packed = [gemm.pack_weight(w) for w in ws]
    print(f"device: {machine()}  isa: {gemm.gemm_isa()}  threads: {torch.get_num_threads()}"
          f"  date: {datetime.date.today()}")
    print(f"{'M':>4} {'F.linear ms':>12} {'w@x.T ms':>10} {'skinny ms':>10} "
          f"{'F.lin/skinny':>13} {'wxT/skinny':>11}")
    rows = []
    for M in [int(m) for m in args.rows.split(",")]:
        xs = {k: torch.randn(M, k, generator=g) for k in (576, 1536)}
        modes = {
            "linear": lambda: [F.linear(xs[w.shape[1]], w) for w in ws],
            "wxT": lambda: [(w @ xs[w.shape[1]].T).T for w in ws],
            "skinny": lambda: [gemm.skinny_mm(xs[w.shape[1]], p, w.shape[0])
                               for w, p in zip(ws, packed)],
        }
        best = {k: float("inf") for k in modes}
        with torch.inference_mode():
            for f in modes.values():
                f()  # warm
            for _ in range(args.rounds):
                for k, f in modes.items():
                    t0 = time.perf_counter()
                    f()
                    best[k] = min(best[k], time.perf_counter() - t0)
        r = {"rows": M, **{f"{k}_ms": round(v * 1e3, 2) for k, v in best.items()},
             "linear_over_skinny": round(best["linear"] / best["skinny"], 2),
             "wxT_over_skinny": round(best["wxT"] / best["skinny"], 2)}
        rows.append(r)
        print(f"{M:>4} {r['linear_ms']:>12.1f} {r['wxT_ms']:>10.1f} {r['skinny_ms']:>10.1f} "
              f"{r['linear_over_skinny']:>13.2f} {r['wxT_over_skinny']:>11.2f}")
    wins = [r["rows"] for r in rows if r["linear_over_skinny"] > 1.0]
    print(f"skinny faster than F.linear up to M = {max(wins) if wins else 0} "
          f"(specrt.ops.gemm.MAX_ROWS = {gemm.MAX_ROWS})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": machine(), "isa": gemm.gemm_isa(),
                       "date": str(datetime.date.today()), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
