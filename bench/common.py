"""Shared bits of the benchmarks: machine name, medians, prompt sampling."""
from __future__ import annotations

import json
import platform
import random
import statistics
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def machine() -> str:
    """Human-readable device name: the GPU's, or the CPU model and core count."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.get_num_threads()} threads)"


def median(xs):
    return statistics.median(xs)


def load_prompts(path: str | Path | None = None, per_task: int = 2, seed: int = 0,
                 tasks: list[str] | None = None) -> list[dict]:
    """A task-balanced sample of a prompts.jsonl file (default: ../shared/data/prompts_small)."""
    path = Path(path) if path else DATA / "prompts_small.jsonl"
    rows = [json.loads(line) for line in path.read_text().split("\n") if line.strip()]
    by = {}
    for r in rows:
        by.setdefault(r["task"], []).append(r)
    rng = random.Random(seed)
    out = []
    for t in sorted(by):
        if tasks and t not in tasks:
            continue
        xs = by[t][:]
        rng.shuffle(xs)
        out.extend(xs[:per_task])
    return out
