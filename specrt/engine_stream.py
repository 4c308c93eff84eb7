"""The iterator :meth:`specrt.engine.Engine.stream` returns (part of the engine: it
queues its requests and reads their events from the engine's outbox)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

from specrt.request import Request, StreamEvent

if TYPE_CHECKING:
    from specrt.engine import Engine


class Stream:
    """The iterator :meth:`Engine.stream` returns: its requests join the engine at the
    first ``next()``; closing it, dropping it or an error aborts the unfinished ones."""

    def __init__(self, engine: Engine, reqs: list[Request]):
        self.engine, self.n = engine, len(reqs)
        self._reqs = reqs
        self._gen: Iterator[StreamEvent] | None = None

    def __iter__(self):
        return self

    def __next__(self) -> StreamEvent:
        if self._gen is None:
            self._gen = self._run()
        return next(self._gen)

    def close(self) -> None:
        """Abort this stream's unfinished requests (their blocks are free at once)."""
        if self._gen is not None:
            self._gen.close()

    def __del__(self):
        self.close()

    def _run(self) -> Iterator[StreamEvent]:
        eng = self.engine
        index = {}
        for i, r in enumerate(self._reqs):
            eng._queue(r)
            index[r.rid] = i
            eng._owned[r.rid] = []
        left = set(index)
        try:
            while left:
                eng.step()
                for rid in sorted(left):
                    box = eng._owned.get(rid, [])
                    while box:
                        ev = box.pop(0)
                        ev.index = index[rid]
                        if ev.finished:
                            left.discard(rid)
                            eng._owned.pop(rid, None)
                        yield ev
        finally:
            for rid in index:
                eng.abort(rid)
