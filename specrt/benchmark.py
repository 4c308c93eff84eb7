"""End-to-end speed of generation modes over a prompt file, per task.

A mode is ``ar`` (the target alone), ``auto`` or ``pool`` (the engine's own choice: its
routing head when a pool is loaded, else its default drafter), or a drafter name; with
two or more drafter modes an ``oracle`` row is added: per prompt, the drafter that
emitted the most tokens per target forward, in hindsight. Each prompt runs at batch 1
(latency), greedy unless told otherwise; the harness is :mod:`specrt.measure`.
Results: ``{mode: {task: {prompts, tokens, tokens_per_s, acceptance_rate,
mean_accepted_length, elapsed_s, ...}}}`` (:func:`specrt.measure.summarize`) plus an
``all`` row per mode; ``mismatches`` counts prompts whose greedy output differs from the
``ar`` mode (must be 0: lossless).
"""
from __future__ import annotations

from specrt.measure import measure, report
from specrt.sampling import SamplingParams


def run_e2e(engine, rows: list[dict], modes: list[str], max_tokens: int = 64,
            params: SamplingParams | None = None, progress: bool = True) -> dict:
    """Generate every row's prompt in every mode; return per-mode, per-task figures
    (:func:`specrt.measure.report`).

    Rows need ``prompt`` and ``task``. Modes run interleaved per prompt (ar, then each
    mode) so that machine noise hits all modes alike. Each mode keeps its own learned
    drafter acceptance rates in the adaptive length rule (as if it were deployed
    alone), so one mode's history never steers another's draft lengths; the measured
    machine costs (target forward, drafting) are shared.
    """
    params = params or SamplingParams(max_tokens=max_tokens)
    recs = measure(engine, rows, modes, params, history="mode", progress=progress,
                   desc="bench e2e")
    return report(recs, modes, greedy=params.greedy)


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
