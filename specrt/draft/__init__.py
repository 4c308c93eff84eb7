"""Drafters: the protocol, model-free drafters (n-gram, token recycling), model drafters,
and fused drafters (several members' trees merged into one)."""
from __future__ import annotations

from specrt.draft.base import Drafter, DraftTree, SeqState, Verified
from specrt.draft.fused import FusedDrafter
from specrt.draft.ngram import NgramDrafter
from specrt.draft.recycling import RecyclingDrafter

__all__ = ["Drafter", "DraftTree", "SeqState", "Verified", "NgramDrafter", "RecyclingDrafter",
           "FusedDrafter",
           "default_drafters", "drafter_from_spec", "lookup_drafter"]


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


def default_drafters(model, target=None) -> list:
    """The drafters an engine gets without a pool; the first one is the engine's default.

    For the default target (``target`` None) the shipped baseline model drafter
    (``specrt/pools/default/baseline.json``, named ``baseline``) is included when its
    weights exist. It goes first only when its config says it pays
    (``"runtime": {"default_first": true}``, set from measured goodput); on the CPU
    it was measured on it does not, so n-gram prompt lookup stays the default there.
    """
    out = [NgramDrafter(), RecyclingDrafter(model.args.vocab_size)]
    if target is None:
        import json
        from pathlib import Path

        cfg = Path(__file__).resolve().parents[1] / "pools" / "default" / "baseline.json"
        if cfg.is_file():
            from specrt.draft.model import ModelDrafter

            d = ModelDrafter.from_config(cfg, model)
            first = json.loads(cfg.read_text()).get("runtime", {}).get("default_first", False)
            out.insert(0 if first else 1, d)
    return out


def drafter_from_spec(spec: str, model):
    """A drafter from a short spec: ``ngram``, ``ngramN``, ``recycling`` (see
    :func:`lookup_drafter`), the path of a saved
    model drafter's ``.json`` (loaded with its recorded runtime settings, named after
    the file stem), or two or more of those joined by ``+`` (a :class:`FusedDrafter`
    with the ``fill`` split, named after its members joined by ``+``, e.g.
    ``ngram+baseline``). ``ValueError`` for anything else."""
    if "+" in spec:
        return FusedDrafter([drafter_from_spec(p, model) for p in spec.split("+")])
    d = lookup_drafter(spec, model.args.vocab_size)
    if d is not None:
        return d
    if spec.endswith(".json"):
        from specrt.draft.model import ModelDrafter

        return ModelDrafter.from_config(spec, model)
    raise ValueError(f"{spec!r} is not ngram, ngramN, recycling or a model drafter .json")
