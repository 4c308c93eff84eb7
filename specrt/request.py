"""One request's life in the engine: its state, the tokens it emits, what callers see.

:class:`Request` is the engine's own record of a request (prompt ids, params, emitted
tokens, counters); :meth:`Request.emit` applies EOS, stop strings and ``max_tokens`` to
a step's new tokens and returns the caller's :class:`StreamEvent`. Outputs are built
here so that the engine loop only moves tokens.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import torch

from specrt.draft.base import SeqState
from specrt.model import Detokenizer
from specrt.sampling import SamplingParams


@dataclass
class RequestOutput:
    """Result of one prompt: text, token ids (EOS excluded), why it ended, metrics.

    ``finish_reason``: ``"stop"`` (EOS or a stop string), ``"length"`` (max_tokens or
    the context), ``"abort"`` (:meth:`Engine.abort`), ``"error"`` (the request's
    drafter raised; ``error`` says what, and ``text`` / ``token_ids`` hold what was
    emitted before).

    ``stats`` keys: drafter (None for plain decoding), cluster and route_confidence
    (the router's pick, None when not routed), steps (target forwards, prefill
    included), drafted_tokens, accepted_tokens, acceptance_rate (accepted / drafted),
    mean_accepted_length (tokens emitted per target forward, bonus included),
    drafted_by_depth / accepted_by_depth (entry d: verification steps whose tree reached
    draft depth d + 1 / that accepted a draft at depth d + 1; their ratio is the
    acceptance by draft position), prompt_tokens, completion_tokens, elapsed_s,
    tokens_per_s.
    """

    prompt: str
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: dict
    error: str | None = None


@dataclass
class StreamEvent:
    """One step's news for one request.

    ``request_id``: the id :meth:`Engine.add_request` returned; ``index``: position in
    the prompt list of :meth:`Engine.stream` (None for requests added directly);
    ``text``: new text (incremental detokenization; text that may still complete a
    stop string is held back); ``token_ids``: tokens emitted this step (EOS excluded);
    ``output``: the full :class:`RequestOutput` once ``finished``.
    """

    request_id: int
    text: str
    token_ids: list[int]
    finished: bool
    output: RequestOutput | None = None
    index: int | None = None


@dataclass
class Request:
    """The engine's record of one request (see :class:`specrt.engine.Engine`)."""

    rid: int
    prompt: str
    prompt_ids: list[int]
    params: SamplingParams
    max_new: int
    seed: int              # the sampling seed (params.seed, or a fresh random one)
    detok: Detokenizer
    eos_ids: frozenset
    drafter: str | None = None
    auto_route: bool = False
    out_ids: list[int] = field(default_factory=list)
    text: str = ""
    text_sent: int = 0
    finish_reason: str | None = None
    t_start: float = 0.0
    t_end: float = 0.0
    steps: int = 0
    emitted: int = 0  # tokens produced, a final EOS included
    drafted: int = 0
    accepted: int = 0
    drafted_by_depth: list = field(default_factory=list)   # steps whose tree reached depth d+1
    accepted_by_depth: list = field(default_factory=list)  # steps that accepted depth d+1
    cluster: int | None = None
    route_confidence: float | None = None
    seq: SeqState | None = None
    error: str | None = None

    @property
    def remaining(self) -> int:
        return self.max_new - len(self.out_ids)

    def count_step(self, depth: int, accepted: int) -> None:
        """Tally one verification step whose tree reached draft depth ``depth`` and
        whose accepted path holds ``accepted`` drafts."""
        for lst, n in ((self.drafted_by_depth, depth), (self.accepted_by_depth, accepted)):
            if len(lst) < n:
                lst.extend([0] * (n - len(lst)))
            for d in range(n):
                lst[d] += 1

    def emit(self, toks: list[int]) -> StreamEvent | None:
        """Append a step's tokens; apply EOS / stop strings / max_tokens. Returns the
        event to send (None when there is nothing new and the request goes on)."""
        kept = []
        for t in toks:
            if t in self.eos_ids and not self.params.ignore_eos:
                self.finish_reason = "stop"
                self.emitted += 1
                break
            kept.append(t)
            if len(self.out_ids) + len(kept) >= self.max_new:
                self.finish_reason = "length"
                break
        self.out_ids.extend(kept)
        self.emitted += len(kept)
        if kept:
            self.detok.push(kept)
        full = self.detok.text
        hold = 0
        if self.params.stop:
            cut = find_stop(full, self.params.stop, self.text_sent)
            if cut is not None:
                full = full[:cut]
                self.finish_reason = "stop"
            else:  # a stop string may still be completing: hold its length back
                hold = max(len(x) for x in self.params.stop) - 1
        if self.finish_reason is not None:
            self.text = full
            delta = full[self.text_sent:]
            self.t_end = time.perf_counter()
            return StreamEvent(self.rid, delta, kept, True, self.output())
        end = max(self.text_sent, len(full) - hold)
        delta = full[self.text_sent:end]
        self.text_sent = end
        return StreamEvent(self.rid, delta, kept, False) if kept else None

    def record_row(self, out: RequestOutput) -> dict:
        """The row :class:`specrt.engine.EngineConfig`'s ``record`` file gets for this
        finished request (a valid prompt-file row: id, task, prompt, ...)."""
        key = hashlib.sha256(f"{self.prompt}\x00{out.text}".encode()).hexdigest()[:16]
        return {"id": f"served:{key}", "task": "served", "prompt": self.prompt,
                "output": out.text, "prompt_ids": list(self.prompt_ids),
                "output_ids": out.token_ids, "finish_reason": out.finish_reason,
                "drafter": self.drafter, "cluster": self.cluster, "time": time.time()}

    def output(self) -> RequestOutput:
        el = max(self.t_end - self.t_start, 1e-9)
        n = len(self.out_ids)
        stats = {
            "drafter": self.drafter, "cluster": self.cluster,
            "route_confidence": self.route_confidence, "steps": self.steps,
            "drafted_tokens": self.drafted, "accepted_tokens": self.accepted,
            "acceptance_rate": self.accepted / self.drafted if self.drafted else 0.0,
            "mean_accepted_length": self.emitted / self.steps if self.steps else 0.0,
            "drafted_by_depth": list(self.drafted_by_depth),
            "accepted_by_depth": list(self.accepted_by_depth),
            "prompt_tokens": len(self.prompt_ids), "completion_tokens": n,
            "elapsed_s": el, "tokens_per_s": n / el,
        }
        text = self.text if self.finish_reason != "error" else self.detok.text
        return RequestOutput(self.prompt, text, list(self.out_ids), self.finish_reason, stats,
                             self.error)


def find_stop(text: str, stops: list[str], sent: int) -> int | None:
    """Earliest index where a stop string starts, at or after ``sent`` (text before
    it was streamed already, so it holds no stop string)."""
    best = None
    for s in stops:
        i = text.find(s, sent)
        if i != -1 and (best is None or i < best):
            best = i
    return best
