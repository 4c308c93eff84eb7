"""Prompt files (``id, source, task, prompt`` JSON lines) and the fixed train/eval split.

Alignment and drafter training read only the *train* part; benchmarks of drafters read
only the *eval* part, so no drafter is ever measured on prompts it was trained on.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def default_prompts_path(small: bool = False) -> Path:
    """``../shared/data/prompts.jsonl`` (or ``prompts_small.jsonl``) beside the checkout."""
    return SHARED_DATA / ("prompts_small.jsonl" if small else "prompts.jsonl")


def load_prompts(path: str | Path) -> list[dict]:
    """Rows of a prompts JSONL file; each needs ``prompt`` (``id``/``task`` optional)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompt file not found: {p}")
    rows = []
    for n, line in enumerate(p.read_text().split("\n"), 1):  # not splitlines: U+2028 in strings
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{n}: not JSON ({e})") from None
        if not isinstance(r, dict) or not isinstance(r.get("prompt"), str):
            raise ValueError(f"{p}:{n}: each line needs a string field 'prompt'")
        r.setdefault("id", f"{p.stem}:{n}")
        r.setdefault("task", "unknown")
        rows.append(r)
    return rows


def shorten_prompt(prompt: str, max_chars: int) -> str:
    """A prompt longer than ``max_chars`` keeps its first 2/3 and last 1/3 of that many
    characters, joined by ``"\n...\n"`` (long documents: the task and the question
    survive); ``max_chars`` <= 0 keeps every prompt whole."""
    if max_chars <= 0 or len(prompt) <= max_chars:
        return prompt
    h = max_chars * 2 // 3
    return prompt[:h] + "\n...\n" + prompt[-(max_chars - h):]


def in_share(key: str, fraction: float) -> bool:
    """Fixed membership of ``key`` in a ``fraction`` of all keys, by its sha256 hash (the
    one rule behind the eval split, the reserve and the trainer's early-stopping split;
    each salts its keys apart)."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return (h % 10_000) < fraction * 10_000


def is_eval(row: dict, eval_fraction: float = 0.2) -> bool:
    """Fixed membership in the evaluation split, by a hash of the row's id."""
    return in_share(str(row["id"]), eval_fraction)


def is_reserved(row: dict, fraction: float) -> bool:
    """Fixed membership in the *reserve* of the train split (a hash of the id, salted
    apart from :func:`is_eval`): prompts a shipped baseline drafter was not trained on,
    so that ``specrt align`` can measure drafters on prompts none of them has seen."""
    return fraction > 0 and in_share(f"reserve:{row['id']}", fraction)


def split(rows: list[dict], eval_fraction: float = 0.2) -> tuple[list[dict], list[dict]]:
    """(train, eval) by :func:`is_eval`."""
    train = [r for r in rows if not is_eval(r, eval_fraction)]
    ev = [r for r in rows if is_eval(r, eval_fraction)]
    return train, ev


def balanced_sample(rows: list[dict], per_task: int, seed: int = 0) -> list[dict]:
    """Up to ``per_task`` rows of every task, deterministic for a seed, tasks sorted."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["task"], []).append(r)
    rng = random.Random(seed)
    out = []
    for t in sorted(by):
        xs = sorted(by[t], key=lambda r: str(r["id"]))
        rng.shuffle(xs)
        out.extend(xs[:per_task])
    return out


def interleave_tasks(rows: list[dict]) -> list[dict]:
    """Round-robin over tasks, so any prefix of the list is task-balanced."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["task"], []).append(r)
    out, i = [], 0
    while len(out) < len(rows):
        for t in sorted(by):
            if i < len(by[t]):
                out.append(by[t][i])
        i += 1
    return out
