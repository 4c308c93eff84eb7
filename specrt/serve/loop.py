"""The engine loop: the one thread that owns the engine.

HTTP handlers never touch the engine. They :meth:`EngineLoop.submit` a validated
:class:`~specrt.serve.protocol.Job` and read its news from the returned
:class:`Handle`'s asyncio queue; :meth:`EngineLoop.cancel` asks for an abort. The loop
thread drains its inbox (new requests, aborts), calls ``engine.add_request`` /
``engine.abort``, then ``engine.step()`` while anything is unfinished, and hands every
:class:`~specrt.StreamEvent` to its request's queue through
``loop.call_soon_threadsafe``. A request that arrives at any time joins the running
batch at the next step (continuous batching); a finished or aborted one leaves at once,
its KV blocks free before its last event is delivered. With nothing to do the thread
sleeps on a condition variable.

What a handle's queue receives: ``StreamEvent`` objects (the last one ``finished``),
or one :class:`~specrt.serve.protocol.APIError` when the request is refused or the
engine failed, or :data:`DISCONNECTED` (put there by the HTTP side when its client
left).
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time

from specrt.serve.metrics import Metrics
from specrt.serve.protocol import APIError, Job, bad_request, engine_error, render_chat

log = logging.getLogger("specrt.serve")

DISCONNECTED = object()  # queue item: the client of this handle went away


class Handle:
    """One request's link between its HTTP handler (an asyncio task) and the loop."""

    def __init__(self, job: Job, aloop: asyncio.AbstractEventLoop):
        self.job = job
        self.aloop = aloop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.rid: int | None = None        # the engine's id, once added
        self.t_arrival = time.perf_counter()
        self.started = False               # got its first event (admitted, prefilled)
        self.finished = False              # its last event (or error) was sent
        self.cancelled = False
        self._retired = False

    def put(self, item) -> None:
        """Deliver ``item`` to the handler's queue from any thread (dropped when the
        handler's event loop is gone)."""
        try:
            self.aloop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:
            pass


class EngineLoop:
    """Owns ``engine`` in a thread of its own (see the module docstring).

    Args:
        engine: a :class:`specrt.Engine`; nothing else may use it while the loop runs.
        metrics: where queue, batch, KV and speculation figures go.
        max_queue: requests that may wait beyond ``engine.max_batch``; a submit past
            ``max_batch + max_queue`` requests in flight raises a 429 :class:`APIError`.
        retry_after: seconds for that 429's ``Retry-After``.
    """

    def __init__(self, engine, metrics: Metrics | None = None, *, max_queue: int = 64,
                 retry_after: int = 1):
        self.engine = engine
        self.metrics = metrics or Metrics()
        self.capacity = engine.max_batch + max_queue
        self.retry_after = retry_after
        self._cv = threading.Condition()
        self._inbox: list[tuple[str, Handle]] = []
        self._inflight = 0                   # submitted, not yet retired (under _cv)
        self._live: dict[int, Handle] = {}   # engine id -> handle (loop thread only)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._kv_total = engine.cache.allocator.num_blocks
        self.metrics.state(waiting=0, running=0, kv_free=engine.cache.allocator.num_free,
                           kv_total=self._kv_total)

    # ------------------------------------------------------- the HTTP side
    def start(self) -> None:
        """Start the loop thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="specrt-engine-loop",
                                            daemon=True)
            self._thread.start()

    def submit(self, job: Job) -> Handle:
        """Queue ``job`` for the engine; call from the handler's event loop. Raises a
        429 :class:`APIError` (with ``Retry-After``) when the queue is full and a 503
        one when the loop is stopping."""
        h = Handle(job, asyncio.get_running_loop())
        with self._cv:
            if self._stopping:
                raise APIError(503, "The server is shutting down.", type="server_error",
                               code="shutting_down")
            if self._inflight >= self.capacity:
                raise APIError(429, f"The server is at capacity ({self._inflight} requests "
                                    f"in flight); retry later.", type="rate_limit_error",
                               code="queue_full", headers={"Retry-After":
                                                           str(self.retry_after)})
            self._inflight += 1
            self._inbox.append(("add", h))
            self._cv.notify()
        return h

    def cancel(self, h: Handle) -> None:
        """Abort ``h``'s request (its client went away); its KV blocks are freed by the
        loop thread at once. Ignored once it finished."""
        with self._cv:
            if h.finished or h.cancelled:
                return
            h.cancelled = True
            self._inbox.append(("abort", h))
            self._cv.notify()

    def stop(self, timeout: float = 30.0) -> None:
        """Abort whatever is still in flight (its handlers get a 503), stop the thread
        and wait for it up to ``timeout`` seconds."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet finished, aborted or refused."""
        with self._cv:
            return self._inflight

    @property
    def alive(self) -> bool:
        """Whether the loop thread is running."""
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------ the loop thread
    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._inbox and not self._live and not self._stopping:
                    self._cv.wait()
                items, self._inbox = self._inbox, []
                stopping = self._stopping
            for kind, h in items:
                if kind == "add":
                    self._add(h)
                else:
                    self._abort(h)
            if stopping:
                for h in list(self._live.values()):
                    self._abort(h)
                    h.put(APIError(503, "The server shut down before this request finished.",
                                   type="server_error", code="shutting_down"))
                self._publish()
                return
            if self._live:
                self._step()
            self._publish()

    def _add(self, h: Handle) -> None:
        job = h.job
        if h.cancelled:
            self._retire(h)
            return
        tok = self.engine.tokenizer
        try:
            prompt = render_chat(tok, job.prompt) if job.chat else job.prompt
        except Exception as e:  # noqa: BLE001 -- e.g. a template that raises on a role
            self._refuse(h, bad_request(f"messages: the model's chat template refused them "
                                        f"({type(e).__name__}: {e})", "messages",
                                        "invalid_value"))
            return
        if isinstance(prompt, str) and prompt.strip():
            prompt = tok.encode(prompt)  # what add_request(chat=False) does, done here
        err = self._too_big(prompt, job)  # so that its KV need can be checked first
        if err is not None:
            self._refuse(h, err)
            return
        try:
            h.rid = self.engine.add_request(prompt, job.params, drafter=job.drafter,
                                            speculative=job.speculative, chat=False)
        except ValueError as e:
            self._refuse(h, engine_error(e, job))
            return
        except Exception as e:  # noqa: BLE001 -- never kill the loop over one request
            log.exception("specrt serve: add_request failed")
            self._refuse(h, APIError(500, f"The engine could not take this request "
                                          f"({type(e).__name__}).", type="server_error",
                                     code="engine_error"))
            return
        self._live[h.rid] = h

    def _too_big(self, ids, job: Job) -> APIError | None:
        """A 400 when the request could never be admitted: its prompt plus max_tokens
        (as the engine clamps it to the context) and a full draft need more KV blocks
        than the whole cache has (the engine would fail its step otherwise)."""
        if not isinstance(ids, list) or not ids:
            return None  # the engine refuses it with a clear message
        eng = self.engine
        bs, blocks = eng.cache.block_size, eng.cache.allocator.num_blocks
        limit = min(eng.model.args.max_position_embeddings, blocks * bs)
        if len(ids) >= limit:
            return None  # over the context: the engine says so
        span = len(ids) + min(job.params.max_tokens, limit - len(ids)) + \
            eng.lengths.max_draft + 1
        if -(-span // bs) <= blocks:
            return None
        room = blocks * bs - len(ids) - eng.lengths.max_draft - 1
        param = job.mt_param
        return bad_request(f"{param}: the prompt ({len(ids)} tokens) and {param} "
                           f"({job.params.max_tokens}) do not fit this server's KV cache "
                           f"({blocks * bs} tokens); ask for at most {max(room, 0)}",
                           param, "invalid_value")

    def _refuse(self, h: Handle, err: APIError) -> None:
        self._retire(h)
        h.put(err)

    def _abort(self, h: Handle) -> None:
        if h.rid is None or self._live.get(h.rid) is not h:
            return
        del self._live[h.rid]
        try:
            self.engine.abort(h.rid)
        finally:
            self._retire(h)

    def _step(self) -> None:
        t0 = time.perf_counter()
        try:
            events = self.engine.step()
        except Exception as e:  # noqa: BLE001 -- fail the batch, keep serving
            log.exception("specrt serve: engine step failed; aborting the running batch")
            err = APIError(500, f"The engine failed in a step ({type(e).__name__}: {e}); "
                                f"this request was aborted.", type="server_error",
                           code="engine_error")
            for h in list(self._live.values()):
                try:
                    self._abort(h)
                except Exception:  # noqa: BLE001
                    log.exception("specrt serve: abort after a failed step")
                h.put(err)
            return
        now = time.perf_counter()
        self.metrics.step(now - t0, len({ev.request_id for ev in events}))
        self._publish()  # blocks of finished requests are free before they hear of it
        for ev in events:
            h = self._live.get(ev.request_id)
            if h is None:
                continue
            if not h.started:
                h.started = True
                self.metrics.ttft.observe(now - h.t_arrival)
            if ev.finished:
                del self._live[ev.request_id]
                self._retire(h)
                if ev.output is not None and ev.output.finish_reason != "error":
                    self.metrics.finished(ev.output.stats)
                    self.metrics.latency.observe(now - h.t_arrival)
            h.put(ev)

    def _retire(self, h: Handle) -> None:
        with self._cv:
            if not h._retired:
                h._retired = True
                h.finished = True
                self._inflight -= 1

    def _publish(self) -> None:
        running = sum(1 for h in self._live.values() if h.started)
        with self._cv:
            waiting = self._inflight - running
        self.metrics.state(waiting=max(waiting, 0), running=running,
                           kv_free=self.engine.cache.allocator.num_free,
                           kv_total=self._kv_total)
