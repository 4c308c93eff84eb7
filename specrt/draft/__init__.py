"""Drafters: the protocol, model-free drafters (n-gram, token recycling), model drafters."""
from __future__ import annotations

from specrt.draft.base import Drafter, DraftTree, SeqState, Verified
from specrt.draft.ngram import NgramDrafter
from specrt.draft.recycling import RecyclingDrafter

__all__ = ["Drafter", "DraftTree", "SeqState", "Verified", "NgramDrafter", "RecyclingDrafter",
           "default_drafters"]


def default_drafters(model, target=None) -> list:
    """The drafters an engine gets without a pool. For the default target (``target``
    None) the shipped baseline model drafter (``specrt/pools/default/baseline.json``)
    comes first, and so is the engine's default, when its weights exist; then n-gram
    prompt lookup and token recycling."""
    out = []
    if target is None:
        from pathlib import Path

        cfg = Path(__file__).resolve().parents[1] / "pools" / "default" / "baseline.json"
        if cfg.is_file():
            from specrt.draft.model import ModelDrafter

            out.append(ModelDrafter.from_config(cfg, model))
    return out + [NgramDrafter(), RecyclingDrafter(model.args.vocab_size)]
