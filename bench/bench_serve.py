"""Serving benchmark: open-loop Poisson arrivals against `specrt serve`, speculative vs
plain decoding, per arrival rate.

For each rate and mode, requests arrive as a Poisson process (exponential gaps, seeded)
whatever the server's progress (open loop), each a streamed chat completion of an
eval-split prompt (`specrt.data`, never seen by alignment). "spec" requests let the
server route and draft; "plain" ones send `{"specrt": {"speculative": false}}`, so
both modes run on the same server, model and batch. Per (mode, rate): time to first
token, time per output token (after the first), end-to-end latency (p50, p99),
output throughput (tokens/s over the run), errors, and the spec stats (mean accepted
length). Written as JSON (`--json`) and a PNG of latency vs rate (`--png`; skipped
without matplotlib).

    python bench/bench_serve.py --rates 0.25,0.5,1,2 --requests 32 --max-tokens 64 \\
        --json bench/results/DATE_cpu_serve.json --png bench/results/DATE_cpu_serve.png
    python bench/bench_serve.py --url http://127.0.0.1:8000   # an already running server

Without `--url` it starts `python -m specrt.cli serve --port 0` (with --target/--pool/
--device/--max-batch) in a subprocess, so that the client never shares the server's
interpreter, and stops it at the end. `--smoke` runs a tiny random model (no default
model needed) with 2 rates and a handful of requests: a check that the script works,
not a measurement.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ the server
def start_server(args) -> tuple[subprocess.Popen, str]:
    """`specrt serve` on a free port; returns the process and its base URL."""
    cmd = [sys.executable, "-m", "specrt.cli", "serve", "--port", "0",
           "--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue),
           "--max-tokens-cap", str(max(args.max_tokens, 16))]
    for flag in ("target", "pool", "device"):
        if getattr(args, flag):
            cmd += [f"--{flag}", getattr(args, flag)]
    if args.cache_tokens:
        cmd += ["--cache-tokens", str(args.cache_tokens)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=str(ROOT),
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            raise RuntimeError(f"specrt serve exited with {proc.returncode}")
        m = re.search(r"ready at (http://\S+?)/v1", line)
        if m:
            return proc, m.group(1)
    proc.kill()
    raise RuntimeError("specrt serve did not get ready in 300 s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# ---------------------------------------------------------------------- prompts
def load_rows(args) -> list[dict]:
    """Eval-split prompts, balanced over tasks, shortened to --max-prompt-chars."""
    from specrt.data import balanced_sample, default_prompts_path, load_prompts, \
        shorten_prompt, split

    path = args.prompts or default_prompts_path()
    rows = split(load_prompts(path))[1]
    rows = balanced_sample(rows, args.per_task, seed=args.seed)
    random.Random(args.seed).shuffle(rows)
    for r in rows:
        r["prompt"] = shorten_prompt(r["prompt"], args.max_prompt_chars)
    return rows


# ----------------------------------------------------------------------- client
async def one_request(client: httpx.AsyncClient, url: str, model: str, row: dict,
                      mode: str, args, headers: dict) -> dict:
    """One streamed chat completion; its timings (seconds from its own send)."""
    body = {"model": model, "messages": [{"role": "user", "content": row["prompt"]}],
            "max_tokens": args.max_tokens, "temperature": 0.0, "stream": True,
            "specrt": {"speculative": mode == "spec", "ignore_eos": args.ignore_eos}}
    t0 = time.perf_counter()
    rec = {"task": row.get("task"), "mode": mode, "ttft": None, "e2e": None, "tokens": 0,
           "status": None, "spec": None}
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body,
                                 headers=headers) as r:
            rec["status"] = r.status_code
            if r.status_code != 200:
                await r.aread()
                return rec
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    rec["status"] = 500
                    break
                ch = obj["choices"][0] if obj.get("choices") else {}
                if rec["ttft"] is None and ch.get("delta", {}).get("content"):
                    rec["ttft"] = time.perf_counter() - t0
                if obj.get("usage"):
                    rec["tokens"] = obj["usage"]["completion_tokens"]
                    rec["spec"] = obj.get("specrt")
    except httpx.HTTPError as e:
        rec["status"] = f"{type(e).__name__}"
        return rec
    rec["e2e"] = time.perf_counter() - t0
    if rec["ttft"] is None:
        rec["ttft"] = rec["e2e"]
    return rec


async def run_rate(url: str, model: str, rows: list[dict], rate: float, mode: str,
                   args, headers: dict) -> tuple[list[dict], float]:
    """Poisson arrivals at ``rate`` req/s of ``args.requests`` requests (open loop)."""
    rng = random.Random(f"{args.seed}:{rate}")
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout), limits=limits) as c:
        tasks, t_start = [], time.perf_counter()
        at = 0.0
        for i in range(args.requests):
            delay = t_start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            row = rows[i % len(rows)]
            tasks.append(asyncio.create_task(one_request(c, url, model, row, mode, args,
                                                         headers)))
            at += rng.expovariate(rate)
        recs = await asyncio.gather(*tasks)
        return list(recs), time.perf_counter() - t_start


def pct(xs: list[float], q: float) -> float | None:
    """The q-quantile (0..1) of ``xs`` by linear interpolation; None when empty."""
    if not xs:
        return None
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(recs: list[dict], wall: float, rate: float, mode: str) -> dict:
    """Latency percentiles, throughput and spec stats of one (mode, rate) run."""
    ok = [r for r in recs if r["status"] == 200 and r["e2e"] is not None]
    tpot = [(r["e2e"] - r["ttft"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1]
    mal = [r["spec"]["mean_accepted_length"] for r in ok if r["spec"]]
    out = {"mode": mode, "rate": rate, "requests": len(recs), "ok": len(ok),
           "errors": len(recs) - len(ok), "wall_s": wall,
           "throughput_tok_s": sum(r["tokens"] for r in ok) / wall if wall > 0 else 0.0,
           "mean_accepted_length": statistics.mean(mal) if mal else None}
    for name, xs in (("ttft", [r["ttft"] for r in ok]), ("tpot", tpot),
                     ("e2e", [r["e2e"] for r in ok])):
        out[f"{name}_p50"], out[f"{name}_p99"] = pct(xs, 0.5), pct(xs, 0.99)
    return out


def plot(rows: list[dict], path: str) -> bool:
    """Latency vs rate per mode (time per output token, e2e p50/p99) as a PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench_serve: matplotlib is not installed; no PNG", file=sys.stderr)
        return False
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    for i, mode in enumerate(sorted({r["mode"] for r in rows})):
        rs = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["rate"])
        x, c = [r["rate"] for r in rs], f"C{i}"
        for a, key in ((ax[0], "tpot"), (ax[1], "e2e")):
            a.plot(x, [r[f"{key}_p50"] for r in rs], "o-", color=c, label=f"{mode} p50")
            a.plot(x, [r[f"{key}_p99"] for r in rs], "x--", color=c, label=f"{mode} p99")
        ax[2].plot(x, [r["throughput_tok_s"] for r in rs], "o-", color=c, label=mode)
    for a, t in zip(ax, ("time per output token (s)", "end-to-end latency (s)",
                         "output tokens/s")):
        a.set_xlabel("arrival rate (req/s)")
        a.set_title(t)
        a.set_xscale("log", base=2)
        a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def smoke_model() -> str:
    """A tiny random model directory (tests/tiny.py) for --smoke."""
    sys.path.insert(0, str(ROOT))
    from tests.tiny import make_tiny_model

    return str(make_tiny_model(Path(tempfile.mkdtemp(prefix="bench_serve_")) / "tiny",
                               "llama", seed=5))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="use this running server (no subprocess)")
    ap.add_argument("--api-key", default=os.environ.get("SPECRT_API_KEY"))
    ap.add_argument("--model", default=None, help="model id (default: the server's)")
    ap.add_argument("--target", default=None)
    ap.add_argument("--pool", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-queue", type=int, default=1024)
    ap.add_argument("--cache-tokens", type=int, default=None)
    ap.add_argument("--rates", default="0.25,0.5,1,2", help="arrival rates, req/s")
    ap.add_argument("--modes", default="spec,plain")
    ap.add_argument("--requests", type=int, default=32, help="requests per (rate, mode)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--ignore-eos", action="store_true", help="always max_tokens tokens")
    ap.add_argument("--prompts", default=None, help="prompt file (default ../shared/data)")
    ap.add_argument("--per-task", type=int, default=8)
    ap.add_argument("--max-prompt-chars", type=int, default=1500)
    ap.add_argument("--warmup", type=int, default=2, help="requests per mode before timing")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--png", default=None)
    ap.add_argument("--smoke", action="store_true",
                    help="tiny random model, rates 2,8, 6 requests, 8 tokens")
    args = ap.parse_args(argv)
    if args.smoke:
        args.target = args.target or smoke_model()
        args.device = args.device or "cpu"
        args.rates, args.requests, args.max_tokens, args.warmup = "2,8", 6, 8, 1
        args.max_prompt_chars = min(args.max_prompt_chars, 150)
    rates = [float(x) for x in args.rates.split(",") if x.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if any(m not in ("spec", "plain") for m in modes) or not rates or min(rates) <= 0:
        ap.error("--modes takes spec and/or plain; --rates positive numbers")
    rows = load_rows(args)
    proc, url = (None, args.url.rstrip("/")) if args.url else start_server(args)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        model = args.model or httpx.get(url + "/v1/models", headers=headers).json()[
            "data"][0]["id"]
        if args.warmup:
            wargs = argparse.Namespace(**{**vars(args), "requests": args.warmup})
            for mode in modes:
                asyncio.run(run_rate(url, model, rows[::-1], 1e6, mode, wargs, headers))
        results = []
        for rate in rates:
            for mode in modes:
                recs, wall = asyncio.run(run_rate(url, model, rows, rate, mode, args, headers))
                s = summarize(recs, wall, rate, mode)
                results.append(s)
                f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
                print(f"rate {rate:g}/s {mode:5s}: ok {s['ok']}/{s['requests']}  ttft p50 "
                      f"{f(s['ttft_p50'])} p99 {f(s['ttft_p99'])}  tpot p50 {f(s['tpot_p50'])}"
                      f" p99 {f(s['tpot_p99'])}  e2e p50 {f(s['e2e_p50'])} p99 "
                      f"{f(s['e2e_p99'])}  {s['throughput_tok_s']:.1f} tok/s  mal "
                      f"{f(s['mean_accepted_length'])}", flush=True)
    finally:
        if proc is not None:
            stop_server(proc)
    from specrt.measure import machine

    out = {"date": datetime.date.today().isoformat(), "machine": machine(),
           "command": " ".join(sys.argv), "server": url if args.url else "subprocess",
           "target": args.target or "default", "max_tokens": args.max_tokens,
           "requests_per_run": args.requests, "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    if args.png:
        plot(results, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
