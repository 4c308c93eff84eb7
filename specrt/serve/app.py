"""The FastAPI application: routes, authentication, body limits, streaming, errors.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions`` (``stream`` true or
false), ``GET /v1/models``, ``GET /health`` (never needs the key), ``GET /metrics``.
Each request is checked in this order: API key (401), draining (503), body size
(413), content type (400), JSON (400), fields (400/404), queue (429); then it goes to
the :class:`~specrt.serve.loop.EngineLoop` and its handler waits for the engine's news.
A stream's headers go out with its first token, so that a request refused by the
engine still gets a plain error status; after that an error becomes one SSE event
``data: {"error": {...}}`` and the stream closes without ``[DONE]``. A client that goes
away (closes the connection) has its request aborted at once. Every error body is
OpenAI's error object; unexpected exceptions give a 500 with a fixed message (the
traceback goes to the server's log, never to the client).
"""
from __future__ import annotations

import asyncio
import hmac
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from specrt.request import StreamEvent
from specrt.serve.config import ServeConfig
from specrt.serve.loop import DISCONNECTED, EngineLoop, Handle
from specrt.serve.metrics import Metrics
from specrt.serve.protocol import (APIError, bad_request, chat_job, chunk, completion_job,
                                   parse_json, response, sse)

log = logging.getLogger("specrt.serve")

# bodies above the cap are read (and dropped) up to this many bytes so that the client,
# still sending, reads the 413 instead of a reset connection; beyond it the connection
# is closed
_DRAIN_LIMIT = 64 << 20


class ServerState:
    """What the routes share: the loop, the config, the metrics, the draining flag."""

    def __init__(self, loop: EngineLoop, cfg: ServeConfig, metrics: Metrics):
        self.loop, self.cfg, self.metrics = loop, cfg, metrics
        self.draining = False


def error_response(e: APIError) -> JSONResponse:
    """The JSON response of an :class:`APIError` (its status, body and headers)."""
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def create_app(loop: EngineLoop, cfg: ServeConfig, metrics: Metrics | None = None) -> FastAPI:
    """The ASGI app over ``loop`` (started at the app's startup, stopped at shutdown)."""
    st = ServerState(loop, cfg, metrics or loop.metrics)

    @asynccontextmanager
    async def lifespan(app):
        loop.start()
        try:
            yield
        finally:
            await asyncio.to_thread(loop.stop)

    app = FastAPI(title="specrt", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.specrt = st
    _handlers(app)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _complete(st, request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _complete(st, request, "completion")

    @app.get("/v1/models")
    async def models(request: Request):
        _check_auth(request, cfg)
        return {"object": "list", "data": [{"id": cfg.model_name, "object": "model",
                                            "created": 0, "owned_by": "specrt"}]}

    @app.get("/health")
    async def health():
        ok = loop.alive and not st.draining
        return JSONResponse({"status": "ok" if ok else "unavailable",
                             "in_flight": loop.in_flight, "draining": st.draining},
                            status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics_route(request: Request):
        _check_auth(request, cfg)
        return Response(st.metrics.render(), media_type=st.metrics.content_type)

    return app


def _handlers(app: FastAPI) -> None:
    """Every error the client sees is OpenAI's error object; nothing else leaks."""

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(APIError(exc.status_code, str(exc.detail), type=kind,
                                       headers=dict(exc.headers or {})))

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc):
        return error_response(bad_request("The request is not valid.", None, "invalid_value"))

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        log.error("specrt serve: unhandled error", exc_info=exc)
        return error_response(APIError(500, "The server had an error while processing "
                                            "your request.", type="server_error",
                                       code="internal_error"))


def _check_auth(request: Request, cfg: ServeConfig) -> None:
    """401 unless the request carries ``Authorization: Bearer <api_key>`` (compared in
    constant time); nothing to check without a key."""
    if cfg.api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(401, "Missing bearer authentication in header (Authorization: "
                            "Bearer <key>).", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(token.strip().encode(), cfg.api_key.encode()):
        raise APIError(401, "Incorrect API key provided.", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


async def _read_body(request: Request, cap: int) -> bytes:
    """The body, or a 413 when it is longer than ``cap`` bytes."""
    too_big = APIError(413, f"The request body is larger than this server's limit of "
                            f"{cap} bytes.", param=None, code="request_too_large")
    cl = request.headers.get("content-length", "")
    if cl.isdigit() and int(cl) > max(_DRAIN_LIMIT, cap):
        raise too_big
    size, parts = 0, []
    async for part in request.stream():
        size += len(part)
        if size <= cap:
            parts.append(part)
        elif size > max(_DRAIN_LIMIT, cap):
            break
    if size > cap:
        raise too_big
    return b"".join(parts)


async def _complete(st: ServerState, request: Request, kind: str):
    """Validate, submit, and answer one completion request (streamed or not)."""
    cfg, endpoint = st.cfg, f"/v1/{'chat/' if kind == 'chat' else ''}completions"
    try:
        _check_auth(request, cfg)
        if st.draining:
            raise APIError(503, "The server is shutting down.", type="server_error",
                           code="shutting_down")
        body = await _read_body(request, cfg.max_body_bytes)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise bad_request(f"Content-Type must be application/json, got "
                              f"{ctype or 'none'!r}", None, "unsupported_content_type")
        data = parse_json(body)
        job = chat_job(data, cfg) if kind == "chat" else completion_job(data, cfg)
        h = st.loop.submit(job)
    except APIError as e:
        st.metrics.request(endpoint, e.status)
        return error_response(e)
    return await _answer(st, request, h, endpoint)


async def _watch(request: Request, h: Handle) -> None:
    """Put :data:`DISCONNECTED` into ``h``'s queue when the client goes away."""
    try:
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                h.queue.put_nowait(DISCONNECTED)
                return
    except Exception:  # noqa: BLE001 -- a watcher must never fail a request
        return


def _failed(out) -> APIError:
    """The 500 of a request the engine ended with ``finish_reason="error"``."""
    return APIError(500, f"The request failed in the engine: {out.error}",
                    type="server_error", code="drafter_error")


def _early_exit(st: ServerState, item, endpoint: str) -> Response | None:
    """The response for a queue item that ends a request before its output (the client
    went away: 499; an error from the loop: its status), counted; None otherwise."""
    if item is DISCONNECTED:
        st.metrics.request(endpoint, 499)
        return Response(status_code=499)
    if isinstance(item, APIError):
        st.metrics.request(endpoint, item.status)
        return error_response(item)
    return None


async def _answer(st: ServerState, request: Request, h: Handle, endpoint: str):
    watch = asyncio.create_task(_watch(request, h))
    handed_off = False
    try:
        item = await h.queue.get()
        early = _early_exit(st, item, endpoint)
        if early is not None:
            return early
        if h.job.stream and not (item.finished and item.output.finish_reason == "error"):
            handed_off = True
            return StreamingResponse(_stream(st, h, item, watch, endpoint),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache",
                                              "X-Accel-Buffering": "no"})
        while not (isinstance(item, StreamEvent) and item.finished):
            item = await h.queue.get()
            early = _early_exit(st, item, endpoint)
            if early is not None:
                return early
        out = item.output
        if out.finish_reason == "error":
            st.metrics.request(endpoint, 500)
            return error_response(_failed(out))
        st.metrics.request(endpoint, 200)
        return JSONResponse(response(h.job, out))
    finally:
        if not handed_off:
            watch.cancel()
            if not h.finished:
                st.loop.cancel(h)


async def _stream(st: ServerState, h: Handle, item, watch: asyncio.Task, endpoint: str):
    """The SSE body of a streamed request, from its first queue item on."""
    job, status = h.job, None
    try:
        if job.kind == "chat":
            yield sse(chunk(job, "", role=True))
        while True:
            if item is DISCONNECTED:
                status = 499
                return
            if isinstance(item, APIError):
                status = item.status
                yield sse(item.body())
                return
            tids = item.token_ids if job.token_ids else None
            if item.text or tids:
                yield sse(chunk(job, item.text, token_ids=tids))
            if item.finished:
                out = item.output
                if out.finish_reason == "error":
                    status = 500
                    yield sse(_failed(out).body())
                    return
                yield sse(chunk(job, finish_reason=out.finish_reason, stats=out.stats,
                                token_ids=out.token_ids if job.token_ids else None))
                if job.include_usage:
                    yield sse(chunk(job, stats=out.stats, usage_only=True))
                yield sse("[DONE]")
                status = 200
                return
            item = await h.queue.get()
    except Exception as e:  # noqa: BLE001 -- after the headers: an error event, then close
        log.error("specrt serve: stream failed", exc_info=e)
        status = 500
        yield sse(APIError(500, "The server had an error while streaming.",
                           type="server_error", code="internal_error").body())
    finally:
        watch.cancel()
        if not h.finished:
            st.loop.cancel(h)
        st.metrics.request(endpoint, 499 if status is None else status)
