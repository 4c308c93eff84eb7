"""Running the app under uvicorn: in the foreground with graceful shutdown
(:func:`serve`, what ``specrt serve`` runs) or in a background thread
(:class:`BackgroundServer`, for tests, benchmarks and notebooks).

Graceful shutdown: SIGTERM or SIGINT marks the server draining (new requests get 503),
closes the listening socket, lets running requests finish for up to
``ServeConfig.drain_timeout`` seconds, then cancels what is left (aborted in the
engine, blocks freed), stops the engine loop and returns; ``specrt serve`` then exits
0. A second SIGINT forces the exit at once.
"""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time

import uvicorn

from specrt.serve.app import create_app
from specrt.serve.config import ServeConfig
from specrt.serve.loop import EngineLoop
from specrt.serve.metrics import Metrics


class SpecrtServer(uvicorn.Server):
    """uvicorn's server with the draining flag, a ready callback, and signals that end
    in a normal return (uvicorn re-raises them after shutdown, which would end the
    process with the signal's status instead of 0)."""

    def __init__(self, config: uvicorn.Config, state, on_ready=None):
        super().__init__(config)
        self.state = state
        self.on_ready = on_ready
        self.signals: list[int] = []

    @property
    def url(self) -> str:
        """``http://host:port`` of the bound socket (the real port when port was 0)."""
        sock = self.servers[0].sockets[0]
        host, port = sock.getsockname()[:2]
        return f"http://{host}:{port}"

    async def startup(self, sockets=None) -> None:
        """Bind, then tell ``on_ready`` the URL."""
        await super().startup(sockets)
        if self.started and self.on_ready is not None:
            self.on_ready(self.url)

    def handle_exit(self, sig, frame) -> None:
        """Stop accepting: mark draining and let uvicorn shut down gracefully."""
        self.signals.append(sig)
        self.state.draining = True
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        """Install the exit handlers in the main thread; restore the old ones after,
        without re-raising the signal."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        sigs = [signal.SIGINT, signal.SIGTERM]
        old = {s: signal.signal(s, self.handle_exit) for s in sigs}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def build_server(engine, cfg: ServeConfig, on_ready=None) -> SpecrtServer:
    """A server over ``engine`` (not started): its loop, metrics, app and uvicorn."""
    metrics = Metrics()
    loop = EngineLoop(engine, metrics, max_queue=cfg.max_queue, retry_after=cfg.retry_after)
    app = create_app(loop, cfg, metrics)
    ucfg = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                          timeout_graceful_shutdown=cfg.drain_timeout, lifespan="on",
                          access_log=False)
    return SpecrtServer(ucfg, app.state.specrt, on_ready)


def serve(engine, cfg: ServeConfig, on_ready=None) -> int:
    """Serve ``engine`` in the foreground until SIGTERM/SIGINT; returns 0 after a
    graceful shutdown, 1 when the server could not start (e.g. the port is taken)."""
    if on_ready is None:
        def on_ready(url):
            print(f"specrt serve: ready at {url}/v1 (model {cfg.model_name!r})", flush=True)
    server = build_server(engine, cfg, on_ready)
    server.run()
    if not server.started:
        print("specrt serve: the server did not start", file=sys.stderr)
        return 1
    return 0


class BackgroundServer:
    """A server in a daemon thread: ``with BackgroundServer(engine, cfg) as s: s.url``.

    ``start()`` returns once the socket listens (``RuntimeError`` if it failed);
    ``drain()`` starts a graceful shutdown as SIGTERM would; ``stop()`` shuts down
    and joins (always call it: the context manager does)."""

    def __init__(self, engine, cfg: ServeConfig | None = None, *, start_timeout: float = 30):
        self.cfg = cfg or ServeConfig(port=0)
        self.server = build_server(engine, self.cfg)
        self.start_timeout = start_timeout
        self._thread: threading.Thread | None = None
        self.url = ""

    @property
    def loop(self) -> EngineLoop:
        """The server's engine loop."""
        return self.server.state.loop

    @property
    def metrics(self) -> Metrics:
        """The server's metrics."""
        return self.server.state.metrics

    def start(self) -> "BackgroundServer":
        """Run the server in a thread and wait until it listens."""
        self._thread = threading.Thread(target=self.server.run, name="specrt-serve",
                                        daemon=True)
        self._thread.start()
        ready, deadline = threading.Event(), time.monotonic() + self.start_timeout
        while not self.server.started and self._thread.is_alive() \
                and time.monotonic() < deadline:
            ready.wait(0.01)
        if not self.server.started:
            self.stop()
            raise RuntimeError("specrt serve: the background server did not start")
        self.url = self.server.url
        return self

    def drain(self) -> None:
        """Begin a graceful shutdown (what SIGTERM does to ``specrt serve``)."""
        self.server.handle_exit(signal.SIGTERM, None)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the server thread to end; whether it did."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def stop(self, timeout: float = 30) -> None:
        """Shut down (gracefully, within ``cfg.drain_timeout``) and join the thread."""
        if self._thread is None:
            return
        self.server.state.draining = True
        self.server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
