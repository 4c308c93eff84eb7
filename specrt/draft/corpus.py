"""Target-distillation data: what the target generates on the train split, collected in
resumable shards of token ids; the one collection path of ``specrt align`` and of the
baseline trainer (:mod:`specrt.draft.train`).

A *plan* is a list of :class:`Item` (prompt x sample): sample 0 is the target's greedy
output, samples 1.. are seeded samples at a temperature (diversity for the tasks with few
prompts). :func:`collect` runs the plan through :class:`specrt.Engine` (plain decoding,
continuous batching over ``batch`` requests) and writes it as shards of ``shard_size``
items, ``shard_00000.jsonl``...: one JSON line per item (:data:`RECORD_FIELDS`) and a last
line ``{"shard_end": n}``. A shard is written to a temporary name and renamed, so a file
under a shard's name is always whole; an interrupted run loses at most the shards in
flight, and the next run skips every item already in a shard. :func:`read_shards` refuses
a truncated or corrupt shard with the file and line named (and deletes nothing).

Token ids are small (a few MB for 500k positions); the hidden states a drafter trains on
are recomputed from them by one teacher-forced prefill (:mod:`specrt.draft.features`).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

RECORD_FIELDS = ("id", "task", "sample", "temperature", "prompt_ids", "output_ids",
                 "finish_reason")
"""The fields of one collected item (one JSON line of a shard)."""


@dataclass(frozen=True)
class Item:
    """One generation of the plan: ``prompt_ids`` (already chat-wrapped and shortened)
    of prompt ``id`` (task ``task``); ``sample`` 0 is greedy, k > 0 is sampled at
    ``temperature`` with a seed derived from (id, sample)."""

    id: str
    task: str
    sample: int
    prompt_ids: tuple[int, ...]
    temperature: float = 0.0

    @property
    def key(self) -> tuple[str, int]:
        return (self.id, self.sample)

    @property
    def seed(self) -> int:
        return int.from_bytes(hashlib.sha256(f"{self.id}#{self.sample}".encode()).digest()[:7],
                              "big")


def plan(rows: list[dict], encode, *, samples: dict[str, int] | int = 0,
         temperature: float = 0.8, max_prompt_tokens: int | None = None) -> list[Item]:
    """The items for ``rows`` (dicts with ``id``, ``task``, ``prompt``): every row's greedy
    item first (in row order), then the sampled passes 1..k (``samples``: extra samples
    per row, one number or per task, default 0), so that any prefix of the plan covers
    the rows evenly. ``encode(prompt) -> ids``; prompts of more than ``max_prompt_tokens``
    tokens are left out."""
    per = (lambda t: samples.get(t, 0)) if isinstance(samples, dict) else (lambda t: samples)
    enc = []
    for r in rows:
        for f in ("id", "task", "prompt"):
            if f not in r:
                raise ValueError(f"plan: row {r!r:.80} has no field {f!r}")
        ids = tuple(encode(r["prompt"]))
        if max_prompt_tokens is None or len(ids) <= max_prompt_tokens:
            enc.append((r, ids))
    items = [Item(str(r["id"]), str(r["task"]), 0, ids) for r, ids in enc]
    k_max = max((per(str(r["task"])) for r, _ in enc), default=0)
    for k in range(1, k_max + 1):
        items += [Item(str(r["id"]), str(r["task"]), k, ids, temperature)
                  for r, ids in enc if per(str(r["task"])) >= k]
    return items


def shard_paths(out_dir: str | Path) -> list[Path]:
    """The shard files of a collection directory, in order."""
    return sorted(Path(out_dir).glob("shard_*.jsonl"))


def read_shard(path: Path) -> list[dict]:
    """The records of one shard; ``ValueError`` naming the file and line when it is not
    whole (no end line, a line that is not a record, a count that does not match)."""
    lines = path.read_text().split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    recs = []
    for n, line in enumerate(lines, 1):
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: corrupt shard (not JSON: {e}); delete the file "
                             f"to collect its items again") from None
        if n == len(lines):
            if not (isinstance(r, dict) and r.keys() == {"shard_end"}):
                raise ValueError(f"{path}:{n}: truncated shard (no end line); delete the "
                                 f"file to collect its items again")
            if r["shard_end"] != len(recs):
                raise ValueError(f"{path}: corrupt shard ({len(recs)} records, the end line "
                                 f"says {r['shard_end']})")
            return recs
        if not isinstance(r, dict) or any(f not in r for f in RECORD_FIELDS):
            raise ValueError(f"{path}:{n}: corrupt shard (a record needs the fields "
                             f"{', '.join(RECORD_FIELDS)})")
        recs.append(r)
    raise ValueError(f"{path}: empty shard; delete the file to collect its items again")


def read_shards(out_dir: str | Path) -> list[dict]:
    """Every record of a collection directory (shard order); see :func:`read_shard`."""
    return [r for p in shard_paths(out_dir) for r in read_shard(p)]


def write_lines_atomic(path: Path, lines) -> None:
    """``lines`` (strings, without their newlines) to ``path``, through a temporary name
    synced and renamed: a file under ``path`` is always whole."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as f:
        for line in lines:
            f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_shard(path: Path, recs: list[dict]) -> None:
    write_lines_atomic(path, [*(json.dumps(r, separators=(",", ":")) for r in recs),
                              json.dumps({"shard_end": len(recs)})])


def collect(engine, items: list[Item], out_dir: str | Path, *, max_tokens: int,
            batch: int = 16, shard_size: int = 64, top_p: float = 0.95,
            budget_s: float = float("inf"), progress: bool = True,
            stop_after_shards: int | None = None) -> dict:
    """Generate ``items`` with ``engine`` (plain decoding, at most ``batch`` requests in
    flight) into shards of ``out_dir`` (see the module docstring), skipping items already
    collected. No new shard starts after ``budget_s`` seconds (the shards in flight, at
    least one per call, are finished); ``stop_after_shards`` stops after writing that many new shards (tests).

    Returns ``{"items", "new", "complete", "output_tokens", "seconds", "tok_per_s"}``.
    The shard an item goes to is fixed by its place in ``items`` (shard ``c`` holds
    ``items[c*shard_size:(c+1)*shard_size]`` not collected before), so a resumed run
    writes what an uninterrupted one would.
    """
    from specrt.sampling import SamplingParams

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = {(r["id"], r["sample"]) for r in read_shards(out)}
    todo = [it for it in items if it.key not in done]
    shards = [todo[i:i + shard_size] for i in range(0, len(todo), shard_size)]
    first = len(shard_paths(out))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), initial=len(items) - len(todo), desc="collect",
                   unit="seq", dynamic_ncols=True, mininterval=2.0)
    t0 = time.perf_counter()
    results: dict[tuple, dict] = {}
    pending: dict[int, tuple[int, Item]] = {}    # rid -> (shard, item)
    queue = [(c, it) for c, sh in enumerate(shards) for it in sh]
    qi, written, tokens, complete = 0, 0, 0, True
    try:
        while True:
            if complete and 0 < qi < len(queue) and time.perf_counter() - t0 > budget_s:
                # finish the shards already started (at least one), start no new one
                last = max((c for c, _ in pending.values()), default=-1)
                queue = queue[:qi] + [q for q in queue[qi:] if q[0] <= last]
                complete = False
            while len(pending) < batch and qi < len(queue):
                c, it = queue[qi]
                qi += 1
                sp = SamplingParams(max_tokens=max_tokens, temperature=it.temperature,
                                    top_p=top_p if it.temperature > 0 else 1.0,
                                    seed=it.seed if it.temperature > 0 else None)
                rid = engine.add_request(list(it.prompt_ids), sp, speculative=False)
                pending[rid] = (c, it)
            if not pending:
                break
            for ev in engine.step():
                tokens += len(ev.token_ids)
                if ev.finished and ev.request_id in pending:
                    c, it = pending.pop(ev.request_id)
                    o = ev.output
                    if o.finish_reason == "error":
                        raise RuntimeError(f"collect: item {it.key} failed: {o.error}")
                    results[it.key] = {"id": it.id, "task": it.task, "sample": it.sample,
                                       "temperature": it.temperature,
                                       "prompt_ids": list(it.prompt_ids),
                                       "output_ids": list(o.token_ids),
                                       "finish_reason": o.finish_reason}
                    if bar is not None:
                        bar.update(1)
            if bar is not None:
                dt = time.perf_counter() - t0
                bar.set_postfix(tok_s=f"{tokens / max(dt, 1e-9):.0f}", shards=written)
            # write every shard whose items are all back, in order
            while written < len(shards) and all(it.key in results for it in shards[written]):
                sh = shards[written]
                _write_shard(out / f"shard_{first + written:05d}.jsonl",
                             [results.pop(it.key) for it in sh])
                written += 1
                if stop_after_shards is not None and written >= stop_after_shards:
                    complete = False
                    return _summary(items, todo, shards, written, tokens, t0, complete)
            if written == len(shards):
                break
    finally:
        for rid in list(pending):
            engine.abort(rid)
        while engine.has_unfinished():  # aborted requests leave on the next step
            engine.step()
        if bar is not None:
            bar.close()
    return _summary(items, todo, shards, written, tokens, t0, complete and written == len(shards))


def _summary(items, todo, shards, written, tokens, t0, complete) -> dict:
    dt = time.perf_counter() - t0
    new = sum(len(s) for s in shards[:written])
    return {"items": len(items), "new": new, "left": len(todo) - new, "complete": complete,
            "output_tokens": tokens, "seconds": round(dt, 1),
            "tok_per_s": round(tokens / dt, 1) if dt > 0 else 0.0}
