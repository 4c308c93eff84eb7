"""End-to-end speed of generation modes over a prompt file, per task.

A mode is ``ar`` (the target alone), ``auto`` or ``pool`` (the engine's own choice: its
routing head when a pool is loaded, else its default drafter), or a drafter name; with
two or more drafter modes an ``oracle`` row is added: per prompt, the drafter that
emitted the most tokens per target forward, in hindsight. Each prompt runs at batch 1
(latency), greedy unless told otherwise.
Results: ``{mode: {task: {prompts, tokens, tokens_per_s, acceptance_rate,
mean_accepted_length, elapsed_s}}}`` plus an ``all`` row per mode; ``mismatches`` counts
prompts whose greedy output differs from the ``ar`` mode (must be 0: lossless).
"""
from __future__ import annotations

import time

from specrt.sampling import SamplingParams


def _summ(stats: list[dict], elapsed: float) -> dict:
    tok = sum(s["completion_tokens"] for s in stats)
    drafted = sum(s["drafted_tokens"] for s in stats)
    acc = sum(s["accepted_tokens"] for s in stats)
    steps = sum(s["steps"] for s in stats)
    return {
        "prompts": len(stats), "tokens": tok, "elapsed_s": elapsed,
        "tokens_per_s": tok / elapsed if elapsed > 0 else 0.0,
        "acceptance_rate": acc / drafted if drafted else 0.0,
        "mean_accepted_length": tok / steps if steps else 0.0,
    }


def run_e2e(engine, rows: list[dict], modes: list[str], max_tokens: int = 64,
            params: SamplingParams | None = None, progress: bool = True) -> dict:
    """Generate every row's prompt in every mode; return per-mode, per-task figures.

    Rows need ``prompt`` and ``task``. Modes run interleaved per prompt (ar, then each
    mode) so that machine noise hits all modes alike. Each mode keeps its own learned
    drafter acceptance rates in the adaptive length rule (as if it were deployed
    alone), so one mode's history never steers another's draft lengths; the measured
    machine costs (target forward, drafting) are shared.
    """
    params = params or SamplingParams(max_tokens=max_tokens)
    per: dict[str, dict[str, list]] = {m: {} for m in modes}
    _prompt_time: dict[str, dict[str, list]] = {m: {} for m in modes}
    times: dict[str, dict[str, float]] = {m: {} for m in modes}
    outs: dict[str, list] = {m: [] for m in modes}
    it = rows
    if progress:
        from tqdm import tqdm

        it = tqdm(rows, desc="bench e2e", unit="prompt")
    rates: dict[str, dict] = {m: {} for m in modes}  # each mode's own history
    for r in it:
        for m in modes:
            kw = ({"speculative": False} if m == "ar" else
                  {} if m in ("auto", "pool") else {"drafter": m})
            with engine.lengths.scoped_rates(rates[m]):
                t0 = time.perf_counter()
                o = engine.generate(r["prompt"], params, **kw)[0]
                dt = time.perf_counter() - t0
            per[m].setdefault(r["task"], []).append(o.stats)
            times[m][r["task"]] = times[m].get(r["task"], 0.0) + dt
            _prompt_time[m].setdefault(r["task"], []).append(dt)
            outs[m].append(o.token_ids)
    res: dict = {"modes": {}, "mismatches": {}}
    # oracle: per prompt, the drafter mode with the most tokens per target forward
    drafter_modes = [m for m in modes if m not in ("ar", "auto", "pool")]
    if len(drafter_modes) > 1:
        per["oracle"], times["oracle"] = {}, {}
        counts = {t: len(v) for t, v in per[drafter_modes[0]].items()}
        for t, n in counts.items():
            for j in range(n):
                best = max(drafter_modes, key=lambda m: per[m][t][j]["mean_accepted_length"])
                per["oracle"].setdefault(t, []).append({**per[best][t][j], "choice": best})
                times["oracle"][t] = times["oracle"].get(t, 0.0) + _prompt_time[best][t][j]
        modes = [*modes, "oracle"]
    for m in modes:
        res["modes"][m] = {t: _summ(s, times[m][t]) for t, s in sorted(per[m].items())}
        allstats = [x for s in per[m].values() for x in s]
        res["modes"][m]["all"] = _summ(allstats, sum(times[m].values()))
        if "ar" in modes and params.greedy and m != "oracle":
            res["mismatches"][m] = sum(a != b for a, b in zip(outs[m], outs["ar"]))
    return res


def format_table(res: dict, base: str = "ar") -> str:
    """Per task rows: tokens/s, speedup over ``base``, acceptance, mean accepted length."""
    modes = list(res["modes"])
    tasks = list(res["modes"][modes[0]])
    lines = [f"{'task':<14}" + "".join(f"| {m:^30} " for m in modes),
             f"{'':<14}" + "".join(f"| {'tok/s':>7} {'x' + base:>7} {'acc':>6} {'len':>5} "
                                   for _ in modes)]
    for t in tasks:
        b = res["modes"][base][t]["tokens_per_s"] if base in res["modes"] else 0
        row = f"{t:<14}"
        for m in modes:
            x = res["modes"][m][t]
            sp = x["tokens_per_s"] / b if b else float("nan")
            row += (f"| {x['tokens_per_s']:7.1f} {sp:7.2f} {x['acceptance_rate']:6.2f} "
                    f"{x['mean_accepted_length']:5.2f} ")
        lines.append(row)
    if res.get("mismatches"):
        lines.append("greedy mismatches vs ar: " + ", ".join(
            f"{m}={n}" for m, n in res["mismatches"].items()))
    return "\n".join(lines)
