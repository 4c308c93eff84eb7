"""Lossless verification of draft trees (rejection sampling). See specrt.ops."""
from __future__ import annotations

import torch


def verify_tree(target_probs, tokens, parents, tree_lens, draft_probs=None, *, greedy=False,
                generator=None):
    raise NotImplementedError("verify_tree is being written")


def chain_verify(draft_probs, draft_token_ids, target_probs, *args, **kwargs):
    raise NotImplementedError("chain_verify is being written")
