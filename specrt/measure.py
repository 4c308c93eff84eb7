"""The measurement harness: generation modes run interleaved prompt by prompt, their
statistics aggregated one way, per task, with an oracle row, as JSON.

Used by ``specrt bench e2e`` (:func:`specrt.benchmark.run_e2e`), ``specrt align``'s
assign stage (:func:`measure_candidates`), the drafter trainer's evaluation and the
bench scripts. It drives the engine through its public API only: ``engine.generate``,
``with engine.using(...)`` for a mode's own drafters / length rule / batch size, and
``engine.lengths.scoped_rates()`` / ``fixed_budget()``.

A **mode** (:class:`Mode`, or a string parsed by :meth:`Mode.parse`) is ``ar`` (the
target alone), ``auto`` / ``pool`` (the engine's own choice: its routing head when a
pool is loaded, else its default drafter), or a drafter name. Each prompt runs at batch
1 in every mode before the next prompt starts, so drifts in the host's load hit all
modes alike. :func:`measure` returns the raw :class:`Record` of every (mode, prompt);
:func:`summarize` is the one aggregation of records into figures; :func:`report` makes
the per-task table with the oracle row and the greedy mismatch count.
"""
from __future__ import annotations

import platform
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

from specrt.sampling import SamplingParams

ENGINE_MODES = ("auto", "pool")


@dataclass
class Mode:
    """One way of generating.

    Args:
        name: the row name in results.
        drafter: force this drafter (by name); None: the engine's own choice.
        speculative: False: the target alone.
        using: ``engine.using(...)`` keyword overrides while this mode generates
            (its own drafters, length controller, draft length, ...).
        context: a function returning a context manager entered around each of this
            mode's generations (e.g. ``lambda: ops.using_native(other_build)``: the same
            engine on another build's kernels).
    """

    name: str
    drafter: str | None = None
    speculative: bool = True
    using: dict | None = None
    context: Callable[[], object] | None = None

    @classmethod
    def parse(cls, m: "str | Mode") -> "Mode":
        """``ar`` -> the target alone; ``auto`` / ``pool`` -> the engine's choice;
        anything else -> that drafter."""
        if isinstance(m, Mode):
            return m
        if m == "ar":
            return cls(m, speculative=False)
        if m in ENGINE_MODES:
            return cls(m)
        return cls(m, drafter=m)


@dataclass
class Record:
    """One generation: the row's task, wall seconds around ``engine.generate``, the
    output's ``stats`` and token ids."""

    task: str
    seconds: float
    stats: dict
    token_ids: list = field(default_factory=list)


def measure(engine, rows: list[dict], modes: list, params: SamplingParams, *,
            rotate: bool = False, history: str = "mode", reset: bool = False,
            progress: bool = False, desc: str = "measure",
            after_prompt: Callable[[int, dict], None] | None = None) -> dict[str, list[Record]]:
    """Generate every row's ``prompt`` in every mode; ``{mode name: [Record per row]}``.

    Args:
        rows: dicts with ``prompt`` (and ``task``; default ``"all"``).
        modes: :class:`Mode` objects or mode strings.
        params: sampling parameters of every generation.
        rotate: the mode order rotates by one each prompt (else the given order).
        history: the adaptive length rule's learned per-drafter acceptance while a mode
            generates, always apart from the engine's own (restored after): ``"mode"``
            -- each mode keeps its own across the prompts (as if deployed alone);
            ``"pass"`` -- one fresh table for the whole call, shared by the modes (the
            same as ``"mode"`` when the modes are distinct drafters, since the table is
            keyed by drafter name). The measured machine costs stay shared.
        reset: first call ``reset()`` on each mode's drafter that has one (what persists
            across requests, e.g. token recycling's matrix, starts empty).
        after_prompt: called ``(row index, records so far)`` after each row.
    """
    modes = [Mode.parse(m) for m in modes]
    if len({m.name for m in modes}) != len(modes):
        raise ValueError(f"mode names must differ: {[m.name for m in modes]}")
    if history not in ("mode", "pass"):
        raise ValueError(f"history must be 'mode' or 'pass', got {history!r}")
    if reset:  # all before any generation: fused modes share their members' objects
        for m in modes:
            getattr(_drafter_of(engine, m), "reset", lambda: None)()
    shared: dict = {}
    tables = {m.name: (shared if history == "pass" else {}) for m in modes}
    recs: dict[str, list[Record]] = {m.name: [] for m in modes}
    it = rows
    if progress:
        from tqdm import tqdm

        it = tqdm(rows, desc=desc, unit="prompt")
    for j, r in enumerate(it):
        order = modes[j % len(modes):] + modes[:j % len(modes)] if rotate else modes
        for m in order:
            kw = {"speculative": False} if not m.speculative else (
                {"drafter": m.drafter} if m.drafter is not None else {})
            scope = engine.using(**m.using) if m.using is not None else nullcontext()
            extra = m.context() if m.context is not None else nullcontext()
            with scope, extra, engine.lengths.scoped_rates(tables[m.name]):
                t0 = time.perf_counter()
                o = engine.generate(r["prompt"], params, **kw)[0]
                dt = time.perf_counter() - t0
            recs[m.name].append(Record(r.get("task", "all"), dt, o.stats, o.token_ids))
        if after_prompt is not None:
            after_prompt(j, recs)
    return recs


def _drafter_of(engine, m: Mode):
    """The drafter object mode ``m`` forces (from its ``using`` drafters when it has
    them, else the engine's), or None."""
    if m.drafter is None:
        return None
    ds = (m.using or {}).get("drafters")
    if ds is None:
        return engine.drafters.get(m.drafter)
    return (ds if isinstance(ds, dict) else {d.name: d for d in ds}).get(m.drafter)


def summarize(recs: list[Record], clock: str = "wall") -> dict:
    """The figures of a set of generations: ``prompts``, ``tokens`` (completion tokens),
    ``drafted_tokens``, ``accepted_tokens``, ``steps``, ``elapsed_s``, ``tokens_per_s``
    (goodput), ``accepted_per_s``, ``acceptance_rate`` (accepted / drafted),
    ``mean_accepted_length`` (completion tokens per target forward) and
    ``emitted_per_step`` (tokens the verification steps emitted per step, the engine's
    own per-request figure, averaged over steps) and ``acceptance_by_depth`` (entry d:
    of the steps whose tree reached draft depth d + 1, the share that accepted a draft
    there). ``clock``: ``"wall"`` -- seconds
    around each ``generate`` call; ``"engine"`` -- the engine's own ``elapsed_s``."""
    if clock not in ("wall", "engine"):
        raise ValueError(f"clock must be 'wall' or 'engine', got {clock!r}")
    tok = sum(r.stats["completion_tokens"] for r in recs)
    drafted = sum(r.stats["drafted_tokens"] for r in recs)
    acc = sum(r.stats["accepted_tokens"] for r in recs)
    steps = sum(r.stats["steps"] for r in recs)
    emitted = sum(r.stats["mean_accepted_length"] * r.stats["steps"] for r in recs)
    el = sum(r.seconds if clock == "wall" else r.stats["elapsed_s"] for r in recs)
    dd, ad = _depth_sums(recs, "drafted_by_depth"), _depth_sums(recs, "accepted_by_depth")
    return {
        "prompts": len(recs), "tokens": tok, "drafted_tokens": drafted,
        "accepted_tokens": acc, "steps": steps, "elapsed_s": el,
        "tokens_per_s": tok / el if el > 0 else 0.0,
        "accepted_per_s": acc / el if el > 0 else 0.0,
        "acceptance_rate": acc / drafted if drafted else 0.0,
        "mean_accepted_length": tok / steps if steps else 0.0,
        "emitted_per_step": emitted / steps if steps else 0.0,
        "acceptance_by_depth": [a / d if d else 0.0 for a, d in zip(ad + [0] * len(dd), dd)],
    }


def _depth_sums(recs: list[Record], key: str) -> list[int]:
    out: list[int] = []
    for r in recs:
        v = r.stats.get(key, [])
        out.extend([0] * (len(v) - len(out)))
        for i, x in enumerate(v):
            out[i] += x
    return out


def by_task(recs: list[Record], clock: str = "wall") -> dict[str, dict]:
    """:func:`summarize` per task (sorted) plus an ``all`` row."""
    tasks: dict[str, list[Record]] = {}
    for r in recs:
        tasks.setdefault(r.task, []).append(r)
    out = {t: summarize(v, clock) for t, v in sorted(tasks.items())}
    out["all"] = summarize(recs, clock)
    return out


def oracle(recs: dict[str, list[Record]], names: list[str],
           key: str = "mean_accepted_length") -> list[Record]:
    """Per prompt, the record of the mode among ``names`` with the highest ``key`` in
    hindsight (the first on ties); its stats gain ``choice`` (the mode's name)."""
    out = []
    for j in range(len(recs[names[0]])):
        best = max(names, key=lambda m: recs[m][j].stats[key])
        r = recs[best][j]
        out.append(Record(r.task, r.seconds, {**r.stats, "choice": best}, r.token_ids))
    return out


def mismatches(recs: dict[str, list[Record]], ref: str = "ar") -> dict[str, int]:
    """Per mode, the prompts whose output differs from mode ``ref``'s (greedy runs: must
    be 0, speculative decoding is lossless)."""
    return {m: sum(a.token_ids != b.token_ids for a, b in zip(v, recs[ref]))
            for m, v in recs.items()}


def report(recs: dict[str, list[Record]], modes: list, greedy: bool = True) -> dict:
    """``{"modes": {mode: {task: summary, ..., "all": summary}}, "mismatches": {mode:
    n}}``; with two or more drafter modes an ``oracle`` mode is added (per prompt the
    drafter mode with the longest mean accepted length, in hindsight); mismatches count
    greedy outputs different from ``ar`` (when ``ar`` ran)."""
    modes = [Mode.parse(m) for m in modes]
    names = [m.name for m in modes]
    drafter_modes = [m.name for m in modes if m.drafter is not None]
    table = {m: by_task(recs[m]) for m in names}
    if len(drafter_modes) > 1:
        table["oracle"] = by_task(oracle(recs, drafter_modes))
    mm = mismatches(recs) if "ar" in recs and greedy else {}
    return {"modes": table, "mismatches": mm}


def machine() -> str:
    """Human-readable device name: the GPU's, or the CPU model and torch's thread count."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


# --------------------------------------------------------------- drafter candidates
def candidate_summary(recs: list[Record]) -> dict:
    """A candidate's measurement as ``specrt align`` records it (``pool.json``
    ``clusters.items[].candidates``): ``prompts, tokens, elapsed_s, goodput_tok_s,
    accepted_per_s, acceptance_rate, mean_accepted_length`` and ``per_prompt``
    ``[[tokens, seconds], ...]`` (the pairs of :func:`specrt.align.policy.pick_drafter`'s
    paired test)."""
    s = summarize(recs)
    return {"prompts": s["prompts"], "tokens": s["tokens"], "elapsed_s": round(s["elapsed_s"], 4),
            "goodput_tok_s": s["tokens_per_s"], "accepted_per_s": s["accepted_per_s"],
            "acceptance_rate": s["acceptance_rate"],
            "mean_accepted_length": s["mean_accepted_length"],
            "per_prompt": [[r.stats["completion_tokens"], round(r.seconds, 5)] for r in recs]}


def measure_candidates(engine, rows: list[dict], names: list[str], max_tokens: int,
                       fixed_budget: int | None = None) -> dict[str, dict]:
    """Greedy batch-1 generation of ``rows`` with each of the engine's drafters
    ``names``: ``{name: candidate_summary}``.

    Candidates are interleaved prompt by prompt (the order rotating), so a drift in the
    host's load during the measurement hits every candidate alike. The adaptive length
    rule's learned acceptance per drafter starts empty (restored afterwards): a
    candidate is measured as if deployed on these rows alone, not with the history of
    what was measured before (which made a drafter that fails on one task barely
    draft on the next); likewise what a drafter learns across requests (token
    recycling's matrix, via ``reset()``) starts empty in each pass, so the fixed-budget
    pass below does not replay outputs the first pass taught it.

    With ``fixed_budget`` K, every candidate also runs the rows once more with K draft
    tokens every step (adaptive rule off): its ``"fixed"`` entry ``{budget,
    mean_accepted_length, acceptance_rate}`` measures the drafter alone, apart from the
    draft lengths the adaptive rule picks on this machine (greedy: deterministic)."""
    params = SamplingParams(max_tokens=max_tokens)
    kw = dict(rotate=True, history="pass", reset=True)
    out = {n: candidate_summary(v) for n, v in measure(engine, rows, names, params, **kw).items()}
    if fixed_budget is not None:
        with engine.lengths.fixed_budget(fixed_budget):
            fx = measure(engine, rows, names, params, **kw)
        for n in names:
            s = summarize(fx[n])
            out[n]["fixed"] = {"budget": fixed_budget,
                               "mean_accepted_length": s["mean_accepted_length"],
                               "acceptance_rate": s["acceptance_rate"]}
    return out
