"""The server's knobs, in one dataclass (the engine's own are :class:`specrt.EngineConfig`)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeConfig:
    """Every knob of ``specrt serve`` that is not the engine's.

    Attributes:
        host, port: where to listen (loopback by default; port 0 picks a free port).
        model_name: the id served at ``/v1/models``; requests naming another model get
            404 (requests without ``model`` are served).
        api_key: when set, every endpoint but ``/health`` needs
            ``Authorization: Bearer <api_key>`` (401 otherwise).
        max_queue: requests that may wait beyond the running batch (the engine's
            ``max_batch``); one more in flight gets 429 with ``Retry-After``.
        max_tokens_cap: the largest ``max_tokens`` a request may ask for (400 above).
        default_max_tokens: ``max_tokens`` of a request that gives none (at most the
            cap; the engine also stops at the context). KV blocks are reserved for a
            request's whole ``max_tokens`` when it is admitted, so this bounds how much
            of the cache one careless request takes.
        max_body_bytes: request bodies above this get 413.
        drain_timeout: seconds that SIGTERM/SIGINT give running requests to finish
            before they are aborted and the server exits.
        retry_after: seconds sent in ``Retry-After`` with a 429.
        log_level: uvicorn's log level.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str = "specrt"
    api_key: str | None = None
    max_queue: int = 64
    max_tokens_cap: int = 4096
    default_max_tokens: int = 256
    max_body_bytes: int = 1 << 20
    drain_timeout: float = 30.0
    retry_after: int = 1
    log_level: str = "warning"

    def __post_init__(self):
        for name in ("max_queue", "max_tokens_cap", "default_max_tokens", "max_body_bytes",
                     "retry_after"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if name == "max_queue"
                                                                     else 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port!r}")
        if not self.drain_timeout >= 0:
            raise ValueError(f"drain_timeout must be >= 0, got {self.drain_timeout!r}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty (leave it unset for no key)")
