"""The EAGLE-style drafter architecture (``arch = "eagle"``): a small head over the
target's own hidden states.

The input of position ``j`` is ``fc(concat(embed(tok_j), feature_norm(h_{j-1})))`` where
``h_{j-1}`` ``[hidden]`` is the target's pre-norm last-layer state of the previous
position (the state that predicted ``tok_j``); the layers, final norm and reduced head
are those of :class:`~specrt.draft.net.DraftNet`. Inside a draft tree, whose nodes have
no target state yet, the drafter's own output state of the parent node stands in (EAGLE).

Between steps (:class:`EagleDrafting`) a request keeps ``hprev``: the predecessor states
of the tokens not yet run through the drafter (the prompt's at the start, the target's
states of the accepted path after each verification). The K/V of accepted tree nodes is
therefore never reused: it was computed from the drafter's states, and the committed
tokens must be recomputed from the target's at the next call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from specrt.draft.net import ArchDrafting, DraftNet
from specrt.model.llama import Llama, ModelArgs, linear


def feature_norm(h: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Parameter-free RMS normalisation of hidden states ``[..., hidden]`` (eagle inputs
    and the feature-regression loss)."""
    hf = h.float()
    return (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)


class EagleNet(DraftNet):
    """The EAGLE-style network: :class:`DraftNet` plus ``fc`` ``[hidden, 2 * hidden]``
    mixing the token embedding with the previous position's state (arguments as for
    :class:`DraftNet`)."""

    arch = "eagle"

    def __init__(self, args: ModelArgs, embed_weight: torch.Tensor,
                 head_weight: torch.Tensor, vocab_ids: torch.Tensor):
        super().__init__(args, embed_weight, head_weight, vocab_ids)
        self.fc = nn.Linear(2 * args.hidden_size, args.hidden_size, bias=False)

    def embed_input(self, tokens: torch.Tensor, prev: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """``fc(concat(embed(tokens), feature_norm(prev)))`` ``[B, T, hidden]``: ``prev``
        ``[B, T, hidden]`` is each position's predecessor state (pre-norm, whose raw scale
        varies by orders of magnitude; zeros when None)."""
        e = F.embedding(tokens, self.embed_weight)
        if prev is None:
            prev = torch.zeros_like(e)
        return linear(torch.cat([e, feature_norm(prev.to(e.dtype))], dim=-1), self.fc)

    def _init_from_target(self, target: Llama) -> None:
        """``fc`` starts as ``[I | 0]``: the embedding passes through, the hidden-state
        half is learnt."""
        H = self.args.hidden_size
        self.fc.weight.zero_()
        self.fc.weight[:, :H].copy_(torch.eye(H))

    def drafting(self) -> "EagleDrafting":
        return EagleDrafting(self)


class EagleDrafting(ArchDrafting):
    """Per-request ``hprev``: the predecessor state of each token not yet in the
    drafter's cache (see the module docstring), kept as a list of ``[n_i, hidden]``
    pieces joined only when a draft reads them: while the length rule keeps a request
    from drafting (every step at batch 16 on a 2-core CPU) each step appends, and joining
    on every append copied the whole pending history each step. The target states a step
    hands over wait in ``hraw`` as they came and go through :meth:`incoming` when a draft
    reads them, for every request of the draft in one call (eagle3's fusion was one small
    matrix product per request per step: 5% of a batch-8 step with nothing drafted);
    each row's result does not depend on the rows beside it, so this changes no value."""

    state_keys = ("hprev", "hraw")

    def incoming(self, h: torch.Tensor) -> torch.Tensor:
        """The target states the engine hands over -> the stored predecessor states
        ``[n, hidden]`` (eagle: the last layer's, as they are)."""
        return h.detach()

    def begin(self, st: dict, prompt_hidden: torch.Tensor | None) -> None:
        """Keep the target's prompt states: the predecessors of tokens[0:] are none
        (zeros) for token 0, then ``h_0 .. h_{P-1}``."""
        if prompt_hidden is None:
            raise ValueError("an eagle drafter needs the target's prompt hidden states")
        prompt_hidden = self.incoming(prompt_hidden)
        H = self.net.args.hidden_size
        st["hprev"] = [torch.zeros(1, H, dtype=prompt_hidden.dtype,
                                   device=prompt_hidden.device), prompt_hidden]

    def settle(self, states: list[dict]) -> None:
        """Move every waiting ``hraw`` piece of ``states`` through :meth:`incoming`, all
        requests in one call, onto the end of their ``hprev``."""
        raw = [(st, st.pop("hraw")) for st in states if st.get("hraw")]
        if not raw:
            return
        pieces = [p for _, ps in raw for p in ps]
        out = self.incoming(torch.cat(pieces) if len(pieces) > 1 else pieces[0])
        o = 0
        for st, ps in raw:
            n = sum(p.shape[0] for p in ps)
            st["hprev"].append(out[o:o + n].to(st["hprev"][0].dtype))
            o += n

    def pending(self, st: dict) -> torch.Tensor:
        """The request's pending predecessor states as one ``[n, hidden]`` tensor."""
        self.settle([st])
        if len(st["hprev"]) != 1:
            st["hprev"] = [torch.cat(st["hprev"])]
        return st["hprev"][0]

    def chunk_prev(self, states: list[dict], lens: list[int], T: int) -> torch.Tensor:
        """The pending ``hprev`` of each request, padded to ``[B, T, hidden]``."""
        self.settle(states)
        net = self.net
        prev = torch.zeros(len(states), T, net.args.hidden_size, dtype=net.embed_weight.dtype,
                           device=net.embed_weight.device)
        for b, (st, n) in enumerate(zip(states, lens)):
            hp = self.pending(st)
            if hp.shape[0] != n:
                raise RuntimeError(f"eagle drafter out of step: {hp.shape[0]} states for "
                                   f"{n} new tokens")
            prev[b, :n] = hp.to(prev)
        return prev

    def consumed(self, st: dict, n: int) -> None:
        st["hprev"] = [self.pending(st)[n:]]

    def tree_prev(self, parent_states: list[list[torch.Tensor]], N: int,
                  like: torch.Tensor) -> torch.Tensor:
        """The drafter's own parent states stand in for the target's, ``[B, N, hidden]``."""
        prev = torch.zeros(len(parent_states), N, self.net.args.hidden_size,
                           dtype=like.dtype, device=like.device)
        for b, row in enumerate(parent_states):
            for j, h in enumerate(row):
                prev[b, j] = h
        return prev

    def update(self, drafter, seq, result) -> None:
        """The target's hidden states of the path nodes become the predecessor states of
        the new tokens, which the next :meth:`~specrt.draft.model.ModelDrafter.propose`
        runs."""
        seq.state.setdefault("hraw", []).append(result.target_hidden[result.path].detach())
