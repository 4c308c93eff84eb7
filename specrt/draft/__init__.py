"""Drafters: the protocol, model-free drafters (n-gram, token recycling), model drafters."""
from __future__ import annotations

from specrt.draft.base import Drafter, DraftTree, SeqState, Verified
from specrt.draft.ngram import NgramDrafter
from specrt.draft.recycling import RecyclingDrafter

__all__ = ["Drafter", "DraftTree", "SeqState", "Verified", "NgramDrafter", "RecyclingDrafter",
           "default_drafters"]


def default_drafters(model, target=None) -> list:
    """The drafters an engine gets without a pool: n-gram prompt lookup first (the
    default), then whatever else is available for this target."""
    return [NgramDrafter(), RecyclingDrafter(model.args.vocab_size)]
