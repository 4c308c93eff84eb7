"""The roofline of a decode step on this CPU: what a T-token target forward can cost at
best, from the machine's measured multiply-add rate and weight-streaming bandwidth.

A forward over T tokens does T x (MACs per token) multiply-adds on weights it must read
at least once; its time is at least ``max(T * macs / rate, weight_bytes / bandwidth)``
(attention, norms and the KV cache left out: the floor is optimistic). The ratio of the
T-token floor to the 1-token floor is the best verification cost any kernel can reach
here: once T passes ``rate * bytes_per_weight / bandwidth`` rows (the ridge) a step is
compute-bound and grows with T. Rates come from bench/roofline_cpu.cpp (compiled here
with g++ -fopenmp; register-only multiply-add chains, and a streaming read of a buffer
larger than the caches), for fp32 weights (FMA), bf16 (vdpbf16ps) and int8 (vpdpbusd).

    python bench/bench_roofline.py [--threads 2] [--sizes 1,4,8,16,32,64] [--json F]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DTYPES = {"fp32": ("fp32_fma", 4), "bf16": ("bf16_dp", 2), "int8": ("int8_vnni", 1)}


def probe(threads: int) -> dict:
    """Build and run roofline_cpu.cpp with ``threads`` OpenMP threads; its JSON."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise SystemExit("bench_roofline needs g++ (or c++) to build its probe")
    with tempfile.TemporaryDirectory() as d:
        exe = Path(d) / "roofline_cpu"
        subprocess.run([cxx, "-O2", "-fopenmp", "-o", str(exe), str(HERE / "roofline_cpu.cpp")],
                       check=True)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_PROC_BIND="spread")
        out = subprocess.run([str(exe)], check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout)


def model_shape(target: str | None) -> dict:
    """Multiply-adds per token of the linear layers and LM head, and their weight count."""
    from specrt.model import load_model

    model, _ = load_model(target, device="cpu")
    a = model.args
    H, I, D = a.hidden_size, a.intermediate_size, a.head_dim
    qkv = H * (a.num_attention_heads + 2 * a.num_key_value_heads) * D
    per_layer = qkv + a.num_attention_heads * D * H + 2 * H * I + I * H
    macs = a.num_hidden_layers * per_layer + H * a.vocab_size
    return {"macs_per_token": macs, "weights": macs, "layers": a.num_hidden_layers,
            "hidden": H, "vocab": a.vocab_size}


def floors(m: dict, p: dict, sizes: list[int]) -> dict:
    """Per dtype: the floor in ms at each T and its ratio to T = 1, and the ridge."""
    res = {}
    bw = p["read_gb_s"] * 1e9
    for name, (key, nbytes) in DTYPES.items():
        rate = p["gmac_s"][key] * 1e9
        if rate <= 0 or bw <= 0:
            continue
        mem = m["weights"] * nbytes / bw
        ms = {t: 1e3 * max(t * m["macs_per_token"] / rate, mem) for t in sizes}
        res[name] = {"ms": ms, "x_t1": {t: ms[t] / ms[1] for t in sizes},
                     "ridge_rows": rate * nbytes / bw, "weight_mb": m["weights"] * nbytes / 1e6}
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sizes", default="1,4,8,16,32,64")
    ap.add_argument("--target", default=None, help="model (default: the default target)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    sizes = sorted({1, *(int(s) for s in a.sizes.split(","))})

    import torch

    from specrt.measure import machine

    torch.set_num_threads(a.threads)
    p = probe(a.threads)
    m = model_shape(a.target)
    f = floors(m, p, sizes)
    print(f"machine: {machine()}  date: {datetime.date.today()}  threads: {p['threads']}")
    print(f"measured: fp32 FMA {p['gmac_s']['fp32_fma']:.0f}, bf16 dot {p['gmac_s']['bf16_dp']:.0f}, "
          f"int8 dot {p['gmac_s']['int8_vnni']:.0f} GMAC/s; streaming read {p['read_gb_s']:.1f} GB/s")
    print(f"model: {m['macs_per_token'] / 1e6:.1f} M multiply-adds per token (linear layers "
          f"+ LM head)")
    print(f"\n{'weights':<7} {'MB':>6} {'ridge rows':>10}  " +
          "  ".join(f"T={t:<3} ms (x T=1)" for t in sizes))
    for name, r in f.items():
        print(f"{name:<7} {r['weight_mb']:6.0f} {r['ridge_rows']:10.1f}  " +
              "  ".join(f"{r['ms'][t]:6.1f} ({r['x_t1'][t]:4.2f})   " for t in sizes))
    print("\n(a floor: no kernel on this machine does a T-token forward faster; a measured "
          "ratio below the floor's means the 1-token step is above its own floor)")
    if a.json:
        Path(a.json).write_text(json.dumps({"machine": machine(), "date": str(datetime.date.today()),
                                            "probe": p, "model": m, "floors": f}, indent=1))
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
