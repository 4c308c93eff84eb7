"""``specrt serve``: an OpenAI-compatible HTTP server over the engine's step API.

Modules: :mod:`~specrt.serve.protocol` (request models, validation, responses, the
error object), :mod:`~specrt.serve.loop` (the one thread that owns the engine),
:mod:`~specrt.serve.app` (FastAPI routes), :mod:`~specrt.serve.metrics`
(Prometheus), :mod:`~specrt.serve.server` (uvicorn, graceful shutdown, a background
server), :mod:`~specrt.serve.config` (:class:`ServeConfig`), :mod:`~specrt.serve.command`
(the CLI subcommand). Needs the ``serve`` extra (fastapi, uvicorn, prometheus_client)::

    from specrt.serve.server import BackgroundServer
    with BackgroundServer(engine) as s:      # a free loopback port
        print(s.url)                         # http://127.0.0.1:PORT
"""
