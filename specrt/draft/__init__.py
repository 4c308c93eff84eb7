"""Drafters: the protocol, model-free drafters (n-gram, token recycling), model drafters,
and fused drafters (several members' trees merged into one)."""
from __future__ import annotations

from specrt.draft.base import Drafter, DraftTree, SeqState, Verified
from specrt.draft.fused import FusedDrafter
from specrt.draft.ngram import NgramDrafter
from specrt.draft.recycling import RecyclingDrafter

__all__ = ["Drafter", "DraftTree", "SeqState", "Verified", "NgramDrafter", "RecyclingDrafter",
           "FusedDrafter",
           "default_drafters", "drafter_from_spec"]


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
    """A drafter from a short spec: ``ngram``, ``recycling``, the path of a saved
    model drafter's ``.json`` (loaded with its recorded runtime settings, named after
    the file stem), or two or more of those joined by ``+`` (a :class:`FusedDrafter`
    with the ``fill`` split, named after its members joined by ``+``, e.g.
    ``ngram+baseline``). ``ValueError`` for anything else."""
    if "+" in spec:
        return FusedDrafter([drafter_from_spec(p, model) for p in spec.split("+")])
    if spec == "ngram":
        return NgramDrafter()
    if spec == "recycling":
        return RecyclingDrafter(model.args.vocab_size)
    if spec.endswith(".json"):
        from specrt.draft.model import ModelDrafter

        return ModelDrafter.from_config(spec, model)
    raise ValueError(f"{spec!r} is not ngram, recycling or a model drafter .json")
