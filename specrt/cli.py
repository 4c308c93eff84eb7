"""Command line: ``specrt generate | align | bench | serve``."""
from __future__ import annotations

import argparse
import json
import sys


def _generate(args) -> int:
    import specrt

    params = specrt.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                   top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                   stop=args.stop or [])
    engine = specrt.Engine.from_pretrained(args.target, pool=args.pool, device=args.device,
                                           record=args.record)
    kw = dict(speculative=not args.no_spec, drafter=args.drafter, chat=not args.no_chat)
    if args.no_spec or not hasattr(engine, "drafters"):
        kw.update(speculative=False, drafter=None)
    if args.json:
        out = engine.generate(args.prompt, params, **kw)[0]
        print(json.dumps({"text": out.text, "token_ids": out.token_ids,
                          "finish_reason": out.finish_reason, "stats": out.stats}))
        return 0
    final = None
    try:
        for ev in engine.stream(args.prompt, params, **kw):
            sys.stdout.write(ev.text)
            sys.stdout.flush()
            if ev.finished:
                final = ev.output
    finally:  # Ctrl-C too: the partial text ends its line
        sys.stdout.write("\n")
        sys.stdout.flush()
    if final is not None and args.stats:
        s = final.stats
        print(f"[{s['completion_tokens']} tokens, {s['tokens_per_s']:.1f} tok/s, "
              f"{s['mean_accepted_length']:.2f} tokens/step, drafter {s['drafter']}"
              + (f", cluster {s['cluster']} ({s['route_confidence']:.2f})"
                 if s.get("cluster") is not None else "") + "]",
              file=sys.stderr)
    return 0


def _bench_e2e(args) -> int:
    import specrt
    from specrt.benchmark import format_table, run_e2e
    from specrt.data import balanced_sample, load_prompts

    rows = load_prompts(args.prompts)
    if args.split != "all":
        from specrt.data import split

        rows = split(rows)[0 if args.split == "train" else 1]
    if args.per_task:
        rows = balanced_sample(rows, args.per_task, seed=args.seed)
    kw = {}
    if args.draft_len is not None:
        if args.draft_len < 1:
            raise ValueError(f"--draft-len must be >= 1, got {args.draft_len}")
        kw = {"max_draft": args.draft_len, "adaptive": False}
    engine = specrt.Engine.from_pretrained(args.target, pool=args.pool, device=args.device, **kw)
    from specrt.draft.registry import drafter_from_spec

    for x in (args.extra_drafters or "").split(","):  # more candidates for the oracle row
        if not x.strip():
            continue
        try:
            d = drafter_from_spec(x.strip(), engine.model)
        except ValueError as e:
            raise ValueError(f"--extra-drafters: {e}") from None
        if d.name in engine.drafters:
            raise ValueError(f"--extra-drafters: the engine already has a drafter {d.name!r}")
        engine.add_drafter(d)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in ("ar", "auto", "pool") and m not in engine.drafters]
    if unknown:
        print(f"specrt bench e2e: no drafter {', '.join(unknown)} in this engine (have "
              f"{', '.join(sorted(engine.drafters)) or 'none'}); dropped", file=sys.stderr)
        modes = [m for m in modes if m not in unknown]
    if not modes:
        print("specrt bench e2e: no modes left to run", file=sys.stderr)
        return 2
    if any(m in ("auto", "pool") for m in modes) and engine.router is None:
        print("specrt bench e2e: no pool loaded; 'pool'/'auto' use the default drafter "
              f"{engine.default_drafter!r}", file=sys.stderr)
    res = run_e2e(engine, rows, modes, max_tokens=args.max_tokens)
    print(format_table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``specrt`` command: runs a subcommand and returns its exit
    status; errors print ``specrt: error: ...`` (status 2), Ctrl-C ``specrt:
    interrupted`` (status 130), never a traceback."""
    try:
        args = _parser().parse_args(argv)
        _check_device(args)
        return args.func(args)
    except KeyboardInterrupt:
        print("specrt: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        print(f"specrt: error: {e}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    """The ``specrt`` argument parser with every subcommand."""
    ap = argparse.ArgumentParser(prog="specrt", description="speculative-decoding runtime")
    sub = ap.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="generate a completion for one prompt")
    g.add_argument("prompt")
    g.add_argument("--record", default=None, metavar="FILE.jsonl",
                   help="append the prompt and output to this file (a prompt file for "
                        "`specrt align`: rerun alignment on served traffic)")
    g.add_argument("--target", default=None,
                   help="HF model directory or .gguf file (default: SmolLM2-135M-Instruct)")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    g.add_argument("--no-spec", action="store_true", help="target alone (no drafters)")
    g.add_argument("--drafter", default=None, help="force a drafter by name")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    g.add_argument("--pool", default=None, help="drafter pool directory (specrt align --out)")
    g.add_argument("--json", action="store_true", help="print one JSON object with stats")
    g.add_argument("--stats", action="store_true", help="print speed stats to stderr")
    g.set_defaults(func=_generate)

    from specrt.align.pipeline import add_cli as _add_align

    _add_align(sub)

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
    e = bsub.add_parser("e2e", help="tokens/s, acceptance, speedup per task and mode")
    e.add_argument("--prompts", required=True, help="JSONL with prompt and task fields")
    e.add_argument("--max-tokens", type=int, default=64)
    e.add_argument("--json", default=None, help="write the results here")
    e.add_argument("--modes", default="ar,baseline,pool",
                   help="comma list: ar (target alone), pool or auto (the engine's routing "
                        "/ default drafter), drafter names; two or more drafter names add "
                        "an oracle row. Names the engine lacks are dropped with a warning")
    e.add_argument("--per-task", type=int, default=0, help="sample this many prompts per task")
    e.add_argument("--split", choices=("all", "train", "eval"), default="all",
                   help="use only this part of the file's fixed train/eval split")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--draft-len", type=int, default=None, metavar="K",
                   help="fixed draft budget K every step (adaptive length off): vanilla "
                        "speculative decoding; default: the adaptive rule")
    e.add_argument("--extra-drafters", default=None, metavar="LIST",
                   help="comma list of drafters to add to the engine (ngram, recycling, "
                        "a model drafter .json, or a fusion of those joined by +, e.g. "
                        "ngram+POOL/baseline.json), e.g. a pool's unassigned candidates, so "
                        "that they can be modes and enter the oracle row")
    e.add_argument("--target", default=None)
    e.add_argument("--pool", default=None)
    e.add_argument("--device", default=None)
    e.set_defaults(func=_bench_e2e)

    from specrt.serve.command import add_cli as _add_serve

    _add_serve(sub)

    return ap


def _check_device(args) -> None:
    """Refuse a ``--device`` this machine lacks before any subcommand loads anything."""
    if getattr(args, "device", None) is not None:
        from specrt.model import resolve_device

        resolve_device(args.device)


if __name__ == "__main__":
    sys.exit(main())
