"""Drafters: the protocol, model-free drafters (n-gram, token recycling, suffix lookup in a
datastore of the target's past outputs), model drafters,
and fused drafters (several members' trees merged into one). Naming and building them
from spec strings and ``pool.json`` entries: :mod:`specrt.draft.registry`."""
from __future__ import annotations

from specrt.draft.base import Drafter, DraftTree, SeqState, Verified
from specrt.draft.fused import FusedDrafter
from specrt.draft.ngram import NgramDrafter
from specrt.draft.recycling import RecyclingDrafter
from specrt.draft.suffix import SuffixDrafter, SuffixIndex
from specrt.draft.registry import (candidate_drafters, default_drafters, drafter_entry,
                                   drafter_from_entry, drafter_from_spec, lookup_drafter)

__all__ = ["Drafter", "DraftTree", "SeqState", "Verified", "NgramDrafter", "RecyclingDrafter",
           "SuffixDrafter", "SuffixIndex", "FusedDrafter", "candidate_drafters",
           "default_drafters", "drafter_entry", "drafter_from_entry", "drafter_from_spec",
           "lookup_drafter"]
