"""The ``specrt serve`` subcommand: its flags and what it runs (imports of the server
stack stay inside :func:`run`, so that ``specrt generate`` works without the ``serve``
extra)."""
from __future__ import annotations

import os
from pathlib import Path


def model_name(target: str | None) -> str:
    """The id a server of ``target`` answers to: the model directory's or GGUF file's
    name, or ``SmolLM2-135M-Instruct`` for the default target."""
    if target is None:
        return "SmolLM2-135M-Instruct"
    p = Path(target.rstrip("/"))
    return p.stem if p.suffix == ".gguf" else p.name


def run(args) -> int:
    """Load the engine and serve it until SIGTERM/SIGINT (exit status 0 after a graceful
    shutdown)."""
    try:
        from specrt.serve.config import ServeConfig
        from specrt.serve.server import serve
    except ImportError as e:
        raise ValueError(f"specrt serve needs the serve extra (pip install 'specrt[serve]'): "
                         f"{e}") from None
    import specrt

    api_key = args.api_key if args.api_key is not None else os.environ.get("SPECRT_API_KEY")
    cfg = ServeConfig(host=args.host, port=args.port, model_name=args.model_name or
                      model_name(args.target), api_key=api_key or None,
                      max_queue=args.max_queue, max_tokens_cap=args.max_tokens_cap,
                      default_max_tokens=min(args.default_max_tokens, args.max_tokens_cap),
                      max_body_bytes=args.max_body_bytes, drain_timeout=args.drain_timeout,
                      log_level=args.log_level)
    kw = {"max_batch": args.max_batch}
    if args.cache_tokens is not None:
        kw["cache_tokens"] = args.cache_tokens
    from specrt.cli import load_engine

    engine = load_engine(args.target, args.pool, no_pool=args.no_pool, device=args.device,
                         weights=args.weights,
                         fp32_precision=getattr(args, "fp32_precision", "auto"), **kw)[0]
    return serve(engine, cfg)


def add_cli(sub) -> None:
    """Add ``serve`` to the ``specrt`` command's subparsers."""
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server (chat and completions, "
                                     "streaming, metrics)")
    from specrt.cli import _add_engine_options

    _add_engine_options(s)     # --target, --pool / --no-pool, --device, --weights
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    s.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $SPECRT_API_KEY; "
                        "none when unset)")
    s.add_argument("--model-name", default=None,
                   help="model id served at /v1/models (default: the target's name)")
    s.add_argument("--max-batch", type=int, default=16, help="requests decoded together")
    s.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait beyond the batch; more get 429")
    s.add_argument("--max-tokens-cap", type=int, default=4096,
                   help="largest max_tokens a request may ask for (400 above)")
    s.add_argument("--default-max-tokens", type=int, default=256,
                   help="max_tokens of a request that gives none (KV is reserved for it)")
    s.add_argument("--cache-tokens", type=int, default=None,
                   help="KV cache capacity in tokens (default: the engine's)")
    s.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="larger request bodies get 413")
    s.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds SIGTERM/SIGINT give running requests before exit")
    s.add_argument("--log-level", default="warning",
                   choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level")
    s.set_defaults(func=run)
