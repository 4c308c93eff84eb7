"""The drafter registry: spec string <-> drafter object <-> ``pool.json`` entry.

Every tool names and builds drafters here (the engine's defaults, pools, ``specrt
align``, ``specrt bench`` and the bench scripts):

* a **spec** is a short string: ``ngram`` (prompt lookup on any suffix match),
  ``ngramN`` (only suffix matches of N or more tokens), ``recycling`` (token recycling),
  the path of a saved model drafter's ``.json``, the path of a suffix datastore's
  ``.safetensors`` (:mod:`specrt.draft.suffix`), or two or more of those joined by
  ``+`` (a :class:`~specrt.draft.fused.FusedDrafter`, ``fill`` split, named after its
  members joined by ``+``, e.g. ``ngram+baseline``);
* an **entry** is a drafter's ``pool.json`` record ``{"name", "kind", "files",
  "config"}`` (see :mod:`specrt.pool`), of kind ``model``, ``ngram``, ``recycling``,
  ``suffix`` or ``fused``.

:func:`drafter_from_spec` and :func:`lookup_drafter` go from specs to drafters,
:func:`drafter_entry` from a live drafter to its entry, :func:`spec_entry` /
:func:`pool_entries` from specs to entries (no live objects needed), and
:func:`drafter_from_entry` from an entry back to a drafter.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable, Mapping

from specrt.draft.base import Drafter
from specrt.draft.fused import FusedDrafter
from specrt.draft.ngram import NgramDrafter
from specrt.draft.recycling import RecyclingDrafter
from specrt.draft.suffix import SuffixDrafter

KINDS = ("model", "ngram", "recycling", "suffix", "fused")
RUNTIME_KEYS = ("mode", "topk", "max_depth", "threshold", "weights")
"""A model drafter's runtime options (:class:`specrt.draft.model.ModelDrafter`)."""

SHIPPED_BASELINE = Path(__file__).resolve().parents[1] / "pools" / "default" / "baseline.json"
"""The default target's shipped baseline model drafter (config; weights beside it)."""


# ------------------------------------------------------------------ spec -> drafter
def lookup_drafter(spec: str, vocab_size: int):
    """The model-free drafter a short name stands for, or None: ``ngram`` (prompt
    lookup on any suffix match), ``ngramN`` (only suffix matches of N or more tokens,
    e.g. ``ngram2``: fewer but surer copies, the first tier of a fused
    ``ngram2+baseline+ngram``), ``recycling`` (token recycling over ``vocab_size``)."""
    if spec == "ngram":
        return NgramDrafter()
    if spec.startswith("ngram") and spec[5:].isdigit():
        n = int(spec[5:])
        if not 1 <= n <= 8:
            raise ValueError(f"{spec!r}: the shortest match N of ngramN must be 1..8")
        return NgramDrafter(name=spec, min_ngram=n, max_ngram=max(4, n))
    if spec == "recycling":
        return RecyclingDrafter(vocab_size)
    return None


def recorded_runtime(config_json: str | Path) -> dict:
    """The runtime options (:data:`RUNTIME_KEYS`) recorded in a saved model drafter's
    config (its ``"runtime"`` key); ``{}`` when none."""
    rt = json.loads(Path(config_json).read_text()).get("runtime") or {}
    return {k: v for k, v in rt.items() if k in RUNTIME_KEYS}


def model_drafter(config_json: str | Path, model, *, name: str | None = None,
                  runtime: dict | None = None):
    """A saved model drafter for the target ``model``, named ``name`` (default: the
    file stem). ``runtime`` None: with the runtime settings recorded in its config;
    a dict: with exactly those options (the constructor's defaults for the rest)."""
    from specrt.draft.model import ModelDrafter

    if runtime is None:
        return ModelDrafter.from_config(config_json, model, **({"name": name} if name else {}))
    opts = {k: v for k, v in runtime.items() if k in RUNTIME_KEYS}
    return ModelDrafter.load(config_json, model, name=name, **opts)


def uses_model(drafter) -> bool:
    """Whether ``drafter`` runs a model forward to draft (a model drafter, or a fused
    drafter with one among its members); the lookup drafters (n-gram, suffix, token
    recycling) do not."""
    if isinstance(drafter, FusedDrafter):
        return any(uses_model(m) for m in drafter.members)
    return not isinstance(drafter, (NgramDrafter, RecyclingDrafter, SuffixDrafter))


def fuse(members: list, name: str | None = None, split: str = "fill") -> FusedDrafter:
    """The fused drafter of ``members`` (named after them joined by ``+`` by default)."""
    return FusedDrafter(members, name=name, split=split)


def drafter_from_spec(spec: str, model):
    """A drafter from a short spec: ``ngram``, ``ngramN``, ``recycling`` (see
    :func:`lookup_drafter`), the path of a saved
    model drafter's ``.json`` (loaded with its recorded runtime settings, named after
    the file stem), the path of a suffix datastore ``.safetensors`` (a
    :class:`~specrt.draft.suffix.SuffixDrafter` named after the file stem), or two or
    more of those joined by ``+`` (a :class:`FusedDrafter` with the ``fill`` split,
    named after its members joined by ``+``, e.g. ``ngram+baseline``). ``ValueError``
    for anything else."""
    if "+" in spec:
        return fuse([drafter_from_spec(p, model) for p in spec.split("+")])
    d = lookup_drafter(spec, model.args.vocab_size)
    if d is not None:
        return d
    if spec.endswith(".json"):
        return model_drafter(spec, model)
    if spec.endswith(".safetensors"):
        return SuffixDrafter.load(spec, vocab_size=model.args.vocab_size)
    raise ValueError(f"{spec!r} is not ngram, ngramN, recycling, a model drafter .json or "
                     "a suffix datastore .safetensors")


def candidate_drafters(tokens: Iterable[str], have: Mapping) -> dict:
    """The drafters named by spec ``tokens`` among the drafters ``have`` (``{token:
    drafter}``, e.g. ``aligned`` -> a cluster's aligned drafter): a token ``a+b`` is a
    :func:`fuse` (``fill`` split) of those members, named after their names joined by
    ``+``. Tokens whose drafters are missing are left out. Returns ``{name: drafter}``
    in token order."""
    out = {}
    for t in tokens:
        parts = t.split("+")
        if not all(p in have for p in parts):
            continue
        d = have[t] if len(parts) == 1 else fuse([have[p] for p in parts])
        out[d.name] = d
    return out


def default_drafters(model, target=None) -> list:
    """The drafters an engine gets without a pool; the first one is the engine's default.

    For the default target (``target`` None) the shipped baseline model drafter
    (``specrt/pools/default/baseline.json``, named ``baseline``) is included when its
    weights exist. It goes first only when its config says it pays
    (``"runtime": {"default_first": true}``, set from measured goodput); on the CPU
    it was measured on it does not, so n-gram prompt lookup stays the default there.
    """
    out = [NgramDrafter(), RecyclingDrafter(model.args.vocab_size)]
    if target is None and SHIPPED_BASELINE.is_file():
        d = model_drafter(SHIPPED_BASELINE, model)
        rt = json.loads(SHIPPED_BASELINE.read_text()).get("runtime", {})
        out.insert(0 if rt.get("default_first", False) else 1, d)
    return out


# -------------------------------------------------------------------- drafter -> entry
def fused_entry(name: str, members: list[str], split: str = "fill") -> dict:
    """The entry of a fused drafter over the pool's drafters named ``members``."""
    return {"name": name, "kind": "fused", "files": [],
            "config": {"members": list(members), "split": split}}


def model_entry(name: str, files: list[str], runtime: dict) -> dict:
    """The entry of a model drafter: ``files`` relative to the pool (config json first,
    then weights, then a LoRA drafter's base files), ``runtime`` its options."""
    if not files:
        raise ValueError(f"model drafter {name!r} needs its files")
    return {"name": name, "kind": "model", "files": list(files), "config": dict(runtime)}


def drafter_entry(d, files: list[str] | None = None, config: dict | None = None) -> dict:
    """The ``pool.json`` entry of a live drafter object (ngram / recycling / model /
    fused). For model drafters ``files`` (config json first, then weights) must be
    given; a fused drafter's members must get entries of their own."""
    kind = getattr(d, "kind", None)
    if kind == "ngram":
        cfg = {"max_ngram": d.max_ngram, "min_ngram": d.min_ngram, "branches": d.branches}
    elif kind == "recycling":
        cfg = {"k": d.k, "max_nodes": len(d.template)}
    elif kind == "suffix":
        if not files:
            raise ValueError(f"suffix drafter {d.name!r} needs its datastore file")
        cfg = d.config()
    elif kind == "model":
        e = model_entry(d.name, files or [], {k: getattr(d, k) for k in RUNTIME_KEYS})
        e["config"].update(config or {})
        return e
    elif kind == "fused":
        e = fused_entry(d.name, [m.name for m in d.members], d.split)
        e["config"].update(config or {})
        return e
    else:
        raise ValueError(f"drafter {getattr(d, 'name', d)!r} of kind {kind!r} cannot go in a "
                         f"pool (kinds: {KINDS})")
    cfg.update(config or {})
    return {"name": d.name, "kind": kind, "files": list(files or []), "config": cfg}


def spec_entry(spec: str, vocab_size: int) -> dict | None:
    """The entry of a drafter named by a spec that needs no files: a model-free name
    (``ngram``, ``ngramN``, ``recycling``) or a fusion ``a+b`` of other entries of the
    pool (``fill`` split). None for anything else (a model drafter's entry needs its
    files: :func:`model_entry`)."""
    if "+" in spec:
        return fused_entry(spec, spec.split("+"))
    d = lookup_drafter(spec, vocab_size)
    return drafter_entry(d) if d is not None else None


def pool_entries(names: Iterable[str], vocab_size: int,
                 model_entry_of: Callable[[str], dict | None]) -> list[dict]:
    """The entries of the drafters ``names`` (specs), a fused drafter's members among
    them and first: model-free and fused ones by :func:`spec_entry`, the rest by
    ``model_entry_of(name)`` (an entry, e.g. :func:`model_entry` after copying the
    files; None: unknown, ``ValueError``)."""
    names = list(names)
    members = [m for n in names if "+" in n for m in n.split("+")]
    out = []
    for n in dict.fromkeys([*members, *names]):
        e = spec_entry(n, vocab_size)
        if e is None:
            e = model_entry_of(n)
        if e is None:
            raise ValueError(f"unknown drafter {n!r}: not ngram, ngramN, recycling, a "
                             "fusion or a model drafter")
        out.append(e)
    return out


# --------------------------------------------------------------------- entry -> drafter
def fused_members(entry: dict, kinds: Mapping[str, str], err=ValueError) -> list[str]:
    """The member names of a fused entry, checked against the pool's ``{name: kind}``
    (two or more, each another non-fused drafter); ``err`` is raised otherwise."""
    members = list(entry.get("config", {}).get("members") or [])
    bad = [m for m in members if kinds.get(m) in (None, "fused")]
    if len(members) < 2 or bad:
        raise err(f"fused drafter {entry.get('name')!r} needs two or more members that are "
                  f"other non-fused drafters of the pool; bad: {bad or members}")
    return members


def drafter_from_entry(entry: dict, pool_dir: Path, model, built: dict | None = None):
    """Instantiate one drafter from its ``pool.json`` entry for ``model``; a fused
    drafter takes its members from ``built`` (``{name: drafter}``, the pool's others).
    :class:`specrt.pool.PoolError` for missing files or a bad entry."""
    from specrt.pool import PoolError

    kind, name, cfg = entry.get("kind"), entry.get("name"), dict(entry.get("config", {}))
    pool_dir = Path(pool_dir)
    for f in entry.get("files", []):
        if not (pool_dir / f).is_file():
            raise PoolError(f"pool {pool_dir}: drafter {name!r} misses file {f}")
    if kind == "ngram":
        return NgramDrafter(name=name, **cfg)
    if kind == "recycling":
        return RecyclingDrafter(model.args.vocab_size, name=name, **cfg)
    if kind == "suffix":
        if not entry.get("files"):
            raise PoolError(f"pool {pool_dir}: suffix drafter {name!r} lists no datastore")
        try:
            return SuffixDrafter.load(pool_dir / entry["files"][0], name=name,
                                      vocab_size=model.args.vocab_size, **cfg)
        except (TypeError, ValueError) as e:
            raise PoolError(f"pool {pool_dir}: drafter {name!r}: {e}") from None
    if kind == "model":
        if not entry.get("files"):
            raise PoolError(f"pool {pool_dir}: model drafter {name!r} lists no files")
        return model_drafter(pool_dir / entry["files"][0], model, name=name, runtime=cfg)
    if kind == "fused":
        built = built or {}
        members = fused_members(entry, {n: d.kind for n, d in built.items()}, PoolError)
        try:
            return fuse([built[m] for m in members], name=name, split=cfg.get("split", "fill"))
        except ValueError as e:
            raise PoolError(f"pool {pool_dir}: drafter {name!r}: {e}") from None
    raise PoolError(f"pool {pool_dir}: drafter {name!r} has unknown kind {kind!r} "
                    f"(kinds: {KINDS})")


def drafter_set(drafters: list[Drafter], default: str | None):
    """(name -> drafter, default name) with unique names and a known default."""
    out: dict[str, Drafter] = {}
    for d in drafters:
        if d.name in out:
            raise ValueError(f"two drafters named {d.name!r}")
        out[d.name] = d
    if default is not None and default not in out:
        raise ValueError(f"default drafter {default!r} is not among {sorted(out)}")
    return out, default or next(iter(out), None)


def routes_within(router, names) -> bool:
    """Whether every drafter ``router`` can pick is among ``names``."""
    return router is not None and set(router.cluster_drafter) | {router.default} <= set(names)
