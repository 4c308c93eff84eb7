"""Prometheus metrics of one server (its own registry, so that several servers can live
in one process, as in the tests).

Names (all prefixed ``specrt_``): ``requests_total{endpoint,status}`` (HTTP status;
a stream that fails after it started counts as 500, a client gone before the end as
499), ``prompt_tokens_total``, ``completion_tokens_total``, ``queue_depth`` (requests
waiting for a batch slot), ``running_requests`` (the running batch),
``kv_blocks_used`` / ``kv_blocks_free`` / ``kv_blocks_total``,
``drafted_tokens_total{drafter}``, ``accepted_tokens_total{drafter}``,
``mean_accepted_length{drafter}`` (tokens per target forward over the drafter's
finished requests, bonus included), ``step_seconds`` (histogram of engine steps),
``batch_size`` (histogram of requests per step), ``time_to_first_token_seconds`` and
``request_seconds`` (histograms, from arrival at the server).
"""
from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

_STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_LAT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    """The server's counters, gauges and histograms (thread-safe: the engine loop and
    the HTTP handlers both write them)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("specrt_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("specrt_prompt_tokens", "prompt tokens of finished "
                                     "requests", registry=r)
        self.completion_tokens = Counter("specrt_completion_tokens", "tokens generated",
                                         registry=r)
        self.queue_depth = Gauge("specrt_queue_depth", "requests waiting for a batch slot",
                                 registry=r)
        self.running = Gauge("specrt_running_requests", "requests in the running batch",
                             registry=r)
        self.kv_used = Gauge("specrt_kv_blocks_used", "KV cache blocks in use", registry=r)
        self.kv_free = Gauge("specrt_kv_blocks_free", "KV cache blocks free", registry=r)
        self.kv_total = Gauge("specrt_kv_blocks_total", "KV cache blocks", registry=r)
        self.drafted = Counter("specrt_drafted_tokens", "drafted tokens of finished requests",
                               ["drafter"], registry=r)
        self.accepted = Counter("specrt_accepted_tokens", "accepted drafted tokens of "
                                "finished requests", ["drafter"], registry=r)
        self.mal = Gauge("specrt_mean_accepted_length", "tokens per target forward (bonus "
                         "included) over the drafter's finished requests", ["drafter"],
                         registry=r)
        self.step_seconds = Histogram("specrt_step_seconds", "engine step time",
                                      buckets=_STEP_BUCKETS, registry=r)
        self.batch_size = Histogram("specrt_batch_size", "requests in the batch per step",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.ttft = Histogram("specrt_time_to_first_token_seconds", "arrival to first "
                              "token", buckets=_LAT_BUCKETS, registry=r)
        self.latency = Histogram("specrt_request_seconds", "arrival to last token",
                                 buckets=_LAT_BUCKETS, registry=r)
        self._lock = threading.Lock()
        self._mal: dict[str, list[float]] = {}  # drafter -> [tokens emitted, forwards]

    def request(self, endpoint: str, status: int) -> None:
        """Count one answered request."""
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()

    def finished(self, stats: dict) -> None:
        """Tokens and speculation counters of one finished request (its ``stats``)."""
        self.prompt_tokens.inc(stats.get("prompt_tokens", 0))
        self.completion_tokens.inc(stats.get("completion_tokens", 0))
        d = stats.get("drafter") or "none"
        self.drafted.labels(drafter=d).inc(stats.get("drafted_tokens", 0))
        self.accepted.labels(drafter=d).inc(stats.get("accepted_tokens", 0))
        steps = stats.get("steps", 0)
        with self._lock:
            acc = self._mal.setdefault(d, [0.0, 0.0])
            acc[0] += stats.get("mean_accepted_length", 0.0) * steps
            acc[1] += steps
            if acc[1]:
                self.mal.labels(drafter=d).set(acc[0] / acc[1])

    def state(self, *, waiting: int, running: int, kv_free: int, kv_total: int) -> None:
        """The loop's current queue, batch and KV cache occupancy."""
        self.queue_depth.set(waiting)
        self.running.set(running)
        self.kv_free.set(kv_free)
        self.kv_used.set(kv_total - kv_free)
        self.kv_total.set(kv_total)

    def step(self, seconds: float, batch: int) -> None:
        """One engine step of ``batch`` requests."""
        self.step_seconds.observe(seconds)
        self.batch_size.observe(batch)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
