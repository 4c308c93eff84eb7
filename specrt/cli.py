"""Command line: ``specrt generate | drafters | align | bench | serve``.

Every error is one ``specrt: error: MESSAGE`` line on stderr with exit status 2 (as
argparse reports bad arguments); Ctrl-C exits with status 130 after ``specrt:
interrupted``. Neither prints a traceback.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path


# ------------------------------------------------------------------ the engine
#: ``--weights`` choices -> the ``weight_dtype`` (a torch attribute name) the CPU kernels
#: stream the target's weights in; None: the model's own (fp32 on CPU).
WEIGHTS = {"fp32": None, "bf16": "bfloat16"}


def load_engine(target: str | None = None, pool: str | None = None, *, no_pool: bool = False,
                device: str | None = None, weights: str = "fp32",
                fp32_precision: str = "auto", **kwargs):
    """The engine the subcommands run, and the pool directory it loaded (None: none).

    ``target``: HF directory or .gguf file; None or the default model's own GGUF file
    (:func:`specrt.model.is_default_target`) is the default model, with the shipped
    default pool. ``pool``: another pool directory. ``no_pool``: no pool (no router):
    the drafters :func:`specrt.draft.default_drafters` gives (n-gram, token recycling,
    and for the default model the shipped baseline). ``weights``: ``fp32`` or ``bf16``,
    the dtype the CPU kernels stream the weights in (see
    :func:`specrt.model.load_model`); ``fp32_precision``: ``auto``, ``high`` or
    ``highest``, how fp32 weights are multiplied (the same function). kwargs: :class:`specrt.Engine` /
    :class:`specrt.EngineConfig` fields."""
    import specrt
    from specrt.model import is_default_target

    if no_pool and pool is not None:
        raise ValueError("--pool and --no-pool exclude each other")
    if weights not in WEIGHTS:
        raise ValueError(f"--weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    import torch

    wdt = None if WEIGHTS[weights] is None else getattr(torch, WEIGHTS[weights])
    if target is not None and is_default_target(target):
        target = None  # the default model: its pool and baseline drafter too
    if no_pool:
        from specrt.draft import default_drafters
        from specrt.model import load_model

        model, tok = load_model(target, device=device, weight_dtype=wdt,
                                fp32_precision=fp32_precision)
        return specrt.Engine(model, tok, drafters=default_drafters(model, target),
                             **kwargs), None
    if pool is None and target is None:
        from specrt.pool import SHIPPED_POOL

        pool = str(SHIPPED_POOL) if (SHIPPED_POOL / "pool.json").is_file() else None
    return specrt.Engine.from_pretrained(target, pool=pool, device=device, weight_dtype=wdt,
                                         fp32_precision=fp32_precision, **kwargs), pool


def _engine_of(args, **kwargs):
    """:func:`load_engine` with a subcommand's ``--target/--pool/--no-pool/--device``."""
    return load_engine(args.target, args.pool, no_pool=args.no_pool, device=args.device,
                       weights=args.weights, fp32_precision=args.fp32_precision, **kwargs)


def _force_drafter(engine, name: str | None) -> str | None:
    """Make ``--drafter NAME`` usable; returns the drafter's name in the engine. A name
    the engine lacks is read as a drafter spec (:func:`specrt.draft.drafter_from_spec`:
    ngram, ngramN, recycling, a model drafter's .json, a suffix datastore's
    .safetensors, or a fusion of those joined by +) and that drafter is added; anything
    else is a ``ValueError`` listing the engine's drafters."""
    if name is None or name in engine.drafters:
        return name
    from specrt.draft.registry import drafter_from_spec

    try:
        d = drafter_from_spec(name, engine.model)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"unknown drafter {name!r}: this engine has "
                         f"{', '.join(sorted(engine.drafters)) or 'none'} (see `specrt "
                         "drafters`), and a spec (ngram, ngramN, recycling, a drafter .json, "
                         f"a datastore .safetensors, joined by +) can be named ({e})") from None
    if d.name not in engine.drafters:
        engine.add_drafter(d)
    return d.name


# ----------------------------------------------------------------- subcommands
def _generate(args) -> int:
    import specrt

    params = specrt.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                   top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                                   stop=args.stop or [])
    engine, _ = _engine_of(args, record=args.record)
    kw = dict(speculative=not args.no_spec, drafter=args.drafter, chat=not args.no_chat)
    if args.no_spec:
        kw.update(speculative=False, drafter=None)
    else:
        kw["drafter"] = _force_drafter(engine, args.drafter)
    if args.compare:
        if args.no_spec:
            raise ValueError("--compare runs both ways; drop --no-spec")
        return _compare(engine, args.prompt, params, kw, as_json=args.json)
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


def _compare(engine, prompt: str, params, kw: dict, as_json: bool = False) -> int:
    """``generate --compare``: the prompt decoded plainly, then speculatively (after one
    warm-up of each); the text once, then both rates, their ratio and who drafted."""
    plain_kw = dict(kw, speculative=False, drafter=None)
    warm = dataclasses.replace(params, max_tokens=4)
    engine.generate(prompt, warm, **plain_kw)
    engine.generate(prompt, warm, **kw)
    plain = engine.generate(prompt, params, **plain_kw)[0]
    spec = engine.generate(prompt, params, **kw)[0]
    p, s = plain.stats, spec.stats
    ratio = s["tokens_per_s"] / p["tokens_per_s"] if p["tokens_per_s"] else float("nan")
    same = plain.token_ids == spec.token_ids
    if as_json:
        print(json.dumps({"text": spec.text, "plain": p, "speculative": s,
                          "speedup": ratio, "same_tokens": same}))
        return 0
    print(spec.text)
    route = (f", cluster {s['cluster']} ({s['route_confidence']:.2f})"
             if s.get("cluster") is not None else "")
    print(f"plain        {p['completion_tokens']:4d} tokens  {p['tokens_per_s']:6.1f} tok/s\n"
          f"speculative  {s['completion_tokens']:4d} tokens  {s['tokens_per_s']:6.1f} tok/s  "
          f"{ratio:.2f}x  ({s['mean_accepted_length']:.2f} tokens/step, drafter "
          f"{s['drafter']}{route})\n"
          + ("same tokens both ways" if same else
             "outputs differ (sampling without --seed, or an fp32 tie)"))
    return 0


def _drafters(args) -> int:
    """``specrt drafters``: the engine's drafters (name, kind) and its pool's clusters."""
    engine, pool = _engine_of(args)
    report = drafters_report(engine, pool)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(format_drafters(report))
    return 0


def drafters_report(engine, pool: str | None) -> dict:
    """What ``specrt drafters`` shows: ``{"drafters": [{name, kind, default}], "pool":
    dir or None, "router": {mode, threshold, fallback} or None, "clusters": [{id,
    drafter, tasks}]}`` (tasks: ``{task: prompts}`` when ``pool.json`` records them)."""
    drafters = [{"name": n, "kind": getattr(d, "kind", type(d).__name__),
                 "default": n == engine.default_drafter} for n, d in engine.drafters.items()]
    out = {"drafters": drafters, "pool": pool, "router": None, "clusters": []}
    r = engine.router
    if r is None:
        return out
    out["router"] = {"mode": r.mode, "threshold": r.threshold, "fallback": r.default}
    items = {}
    if pool is not None:
        from specrt.pool import read_pool_meta

        items = {c.get("id"): c for c in
                 (read_pool_meta(pool).get("clusters") or {}).get("items") or []
                 if isinstance(c, dict)}
    for cid, name in enumerate(r.cluster_drafter):
        tasks = items.get(cid, {}).get("tasks")
        out["clusters"].append({"id": cid, "drafter": name,
                                "tasks": tasks if isinstance(tasks, dict) else None})
    return out


def format_drafters(report: dict) -> str:
    """The text ``specrt drafters`` prints for a :func:`drafters_report`."""
    width = max([len(d["name"]) for d in report["drafters"]] + [8])
    lines = ["drafters (* the default):"]
    lines += [f"  {'*' if d['default'] else ' '} {d['name']:<{width}}  {d['kind']}"
              for d in report["drafters"]]
    r = report["router"]
    if r is None:
        lines.append("pool: none (no routing: requests use the default drafter)")
        return "\n".join(lines)
    lines.append(f"pool: {report['pool'] or '(given by the engine)'}")
    lines.append(f"clusters (router {r['mode']}, below confidence {r['threshold']:g} the "
                 f"fallback {r['fallback']}):")
    for c in report["clusters"]:
        tasks = ", ".join(f"{t} {n}" for t, n in
                          sorted(c["tasks"].items(), key=lambda kv: -kv[1])) \
            if c["tasks"] else "tasks not recorded"
        lines.append(f"  {c['id']} -> {c['drafter']:<{width}}  ({tasks})")
    return "\n".join(lines)


def _bench_e2e(args) -> int:
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
    engine, _ = _engine_of(args, **kw)
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
        raise ValueError("bench e2e: no modes left to run")
    if any(m in ("auto", "pool") for m in modes) and engine.router is None:
        print("specrt bench e2e: no pool loaded; 'pool'/'auto' use the default drafter "
              f"{engine.default_drafter!r}", file=sys.stderr)
    res = run_e2e(engine, rows, modes, max_tokens=args.max_tokens)
    print(format_table(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


# ---------------------------------------------------------------------- parser
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


def _check_device(args) -> None:
    """Refuse a ``--device`` this machine lacks before any subcommand loads anything."""
    if getattr(args, "device", None) is not None:
        from specrt.model import resolve_device

        resolve_device(args.device)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Help that shows every option's default: ``(default: X)`` is appended (``(default:
    unset)`` for None) unless the help text already says what the default is, or the
    option is a flag (off unless given) or required; an option without help text still
    shows its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" in text.lower() or action.nargs == 0 or action.required
                or action.default is argparse.SUPPRESS or not action.option_strings):
            return text
        if action.default is None:
            return (text + " (default: unset)").strip()
        return super()._get_help_string(action)

    def _format_action(self, action):
        if not action.help and self._get_help_string(action):
            import copy

            action = copy.copy(action)
            action.help = self._get_help_string(action)
        return super()._format_action(action)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose help shows defaults (:class:`HelpFormatter`), also in
    the subcommands' parsers (it is their parser class)."""

    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", HelpFormatter)
        super().__init__(*a, **kw)


def _add_engine_options(p, device_help: str = "cpu, cuda or cuda:N (default: cuda when "
                                               "available, else cpu)") -> None:
    """``--target``, ``--pool`` / ``--no-pool`` and ``--device`` of a subcommand that
    loads an engine."""
    p.add_argument("--target", default=None, metavar="PATH",
                   help="HF model directory or .gguf file (default: SmolLM2-135M-Instruct; "
                        "its own .gguf file counts as the default)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--pool", default=None, metavar="DIR",
                   help="drafter pool directory, as `specrt align --out` writes it "
                        "(default: the shipped pool for the default target, none otherwise)")
    g.add_argument("--no-pool", action="store_true",
                   help="load no pool: no routing; the drafters are ngram, recycling and, "
                        "for the default target, the shipped baseline")
    p.add_argument("--device", default=None, help=device_help)
    p.add_argument("--weights", choices=WEIGHTS, default="fp32",
                   help="CPU: the dtype the kernels stream the weights in; bf16 halves the "
                        "bytes (and on AMX CPUs makes wide draft trees and batches cheap), "
                        "with the target's logits rounded accordingly")
    p.add_argument("--fp32-precision", choices=("auto", "high", "highest"), default="auto",
                   help="CPU, fp32 weights: highest = fp32 products; high = bf16x3 (each "
                        "operand split in two bf16 parts, ~16 significant bits, on the bf16 "
                        "units: trees and batches of a few dozen rows cost little more than "
                        "one); auto (default) = high where the CPU has AMX")


def _parser() -> argparse.ArgumentParser:
    """The ``specrt`` argument parser with every subcommand."""
    import specrt

    ap = _Parser(prog="specrt", description="speculative-decoding runtime")
    ap.add_argument("--version", action="version", version=f"specrt {specrt.__version__}",
                    help="print the version and exit")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser,
                            metavar="COMMAND")
    _add_generate(sub)
    _add_drafters(sub)

    from specrt.align.pipeline import add_cli as _add_align

    _add_align(sub)
    _add_bench(sub)

    from specrt.serve.command import add_cli as _add_serve

    _add_serve(sub)
    return ap


def _add_generate(sub) -> None:
    """``specrt generate``."""
    g = sub.add_parser("generate", help="generate a completion for one prompt",
                       description="Generate a completion for one prompt, streamed to "
                                   "stdout.")
    g.add_argument("prompt", help="the prompt text")
    _add_engine_options(g)
    g.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature (0: greedy)")
    g.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest (0: all)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    g.add_argument("--seed", type=int, default=None,
                   help="seed of the sampler (default: a random one); the same seed gives "
                        "the same output")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop string, repeatable (default: none; the model's EOS stops)")
    g.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    g.add_argument("--no-spec", action="store_true", help="target alone (no drafters)")
    g.add_argument("--drafter", default=None, metavar="NAME",
                   help="force a drafter by name (see `specrt drafters`) or spec: ngram, "
                        "ngramN, recycling, a drafter .json, a suffix datastore "
                        ".safetensors, or those joined by + (e.g. "
                        "ngram2+store.safetensors+ngram); default: the router's pick")
    g.add_argument("--record", default=None, metavar="FILE.jsonl",
                   help="append the prompt and output to this file (a prompt file for "
                        "`specrt align`: rerun alignment on served traffic); default: off")
    g.add_argument("--json", action="store_true", help="print one JSON object with stats")
    g.add_argument("--stats", action="store_true", help="print speed stats to stderr")
    g.add_argument("--compare", action="store_true",
                   help="decode plainly and speculatively; print both rates, the ratio and "
                        "the drafter that served")
    g.set_defaults(func=_generate)


def _add_drafters(sub) -> None:
    """``specrt drafters``."""
    d = sub.add_parser("drafters", help="list the drafters and the pool's clusters",
                       description="List the drafters an engine has (name, kind; * marks "
                                   "the default) and its pool's task clusters (cluster id "
                                   "-> drafter, and the tasks of the prompts it was built "
                                   "from).")
    _add_engine_options(d)
    d.add_argument("--json", action="store_true", help="print one JSON object")
    d.set_defaults(func=_drafters)


def _add_bench(sub) -> None:
    """``specrt bench``."""
    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True, metavar="BENCH",
                            help="which benchmark")
    e = bsub.add_parser("e2e", help="tokens/s, acceptance, speedup per task and mode")
    e.add_argument("--prompts", required=True, help="JSONL with prompt and task fields")
    e.add_argument("--max-tokens", type=int, default=64, help="tokens per prompt")
    e.add_argument("--json", default=None, metavar="FILE",
                   help="write the results here (default: only the table on stdout)")
    e.add_argument("--modes", default="ar,baseline,pool",
                   help="comma list: ar (target alone), pool or auto (the engine's routing "
                        "/ default drafter), drafter names; two or more drafter names add "
                        "an oracle row. Names the engine lacks are dropped with a warning")
    e.add_argument("--per-task", type=int, default=0,
                   help="sample this many prompts per task (0: every prompt)")
    e.add_argument("--split", choices=("all", "train", "eval"), default="all",
                   help="use only this part of the file's fixed train/eval split")
    e.add_argument("--seed", type=int, default=0, help="seed of the per-task sample")
    e.add_argument("--draft-len", type=int, default=None, metavar="K",
                   help="fixed draft budget K every step (adaptive length off): vanilla "
                        "speculative decoding; default: the adaptive rule")
    e.add_argument("--extra-drafters", default=None, metavar="LIST",
                   help="comma list of drafters to add to the engine (ngram, recycling, "
                        "a model drafter .json, or a fusion of those joined by +, e.g. "
                        "ngram+POOL/baseline.json), e.g. a pool's unassigned candidates, so "
                        "that they can be modes and enter the oracle row; default: none")
    _add_engine_options(e)
    e.set_defaults(func=_bench_e2e)


if __name__ == "__main__":
    sys.exit(main())
