"""The EAGLE-3-style drafter architecture (``arch = "eagle3"``): the EAGLE head of
:mod:`specrt.draft.eagle` fed with a fusion of low, middle and high target layers, and
trained with *training-time test* (the head unrolled on its own predictions).

Target features: the drafter names the target layers it reads, ``feature_layers`` (by
default ``(2, L // 2, L - 1)`` of an ``L``-layer target); the engine hands it those
layers' states, ``[n, k, hidden]`` (see :class:`specrt.draft.base.Drafter`). They are
fused into one ``[hidden]`` vector, ``g = fuse(concat_i feature_norm(h_i))``, which takes
the place of EAGLE's last-layer state: the input of position ``j`` is
``fc(concat(embed(tok_j), feature_norm(g_{j-1})))``. Inside a draft tree the drafter's own
output state of the parent node stands in for ``g`` (no fusion), exactly as in EAGLE.

Training-time test (:meth:`Eagle3Net.ttt_forward`): step 0 is the teacher-forced forward
over target features; step ``s`` feeds each position the drafter's own step ``s-1``
output of the previous position, and attends, like a depth-``s`` tree node at drafting
time, to the step-0 keys of positions ``<= j - s`` (the committed prefix) and to the
step-``r`` key of position ``j - s + r`` for ``r = 1..s`` (its ancestors and itself). So
the head learns to draft at depth ``s + 1`` from its own states, which is what keeps deep
drafts from collapsing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from specrt.draft.eagle import EagleDrafting, EagleNet, feature_norm
from specrt.model.llama import Llama, ModelArgs, linear


def default_feature_layers(num_target_layers: int) -> tuple[int, ...]:
    """Low, middle and high layers of an ``L``-layer target: ``(2, L // 2, L - 1)``
    (fewer, distinct, for tiny targets)."""
    L = num_target_layers
    return tuple(sorted({min(2, L - 1), L // 2, L - 1}))


def ttt_mask(T: int, s: int, device=None) -> torch.Tensor:
    """Attention mask ``[T, (s + 1) * T]`` (True = attend) of training-time-test step
    ``s``: query ``j`` sees step-0 keys ``i <= j - s`` and the step-``r`` key at
    ``j - s + r`` for ``r = 1..s``."""
    j = torch.arange(T, device=device)[:, None]
    i = torch.arange(T, device=device)[None, :]
    blocks = [i <= j - s] + [i == j - s + r for r in range(1, s + 1)]
    return torch.cat(blocks, dim=1)


class Eagle3Net(EagleNet):
    """:class:`~specrt.draft.eagle.EagleNet` plus ``fuse`` ``[hidden, k * hidden]`` over
    ``k = len(feature_layers)`` target layers (other arguments as for
    :class:`~specrt.draft.net.DraftNet`)."""

    arch = "eagle3"

    def __init__(self, args: ModelArgs, embed_weight: torch.Tensor,
                 head_weight: torch.Tensor, vocab_ids: torch.Tensor,
                 feature_layers: tuple[int, ...] = ()):
        super().__init__(args, embed_weight, head_weight, vocab_ids)
        if not feature_layers or list(feature_layers) != sorted(set(feature_layers)):
            raise ValueError(f"eagle3 needs ascending target feature_layers, got "
                             f"{feature_layers!r}")
        self.feature_layers = tuple(int(x) for x in feature_layers)
        H = args.hidden_size
        self.fuse = nn.Linear(len(self.feature_layers) * H, H, bias=False)

    @classmethod
    def init_kwargs(cls, cfg: dict) -> dict:
        if "feature_layers" not in cfg:
            raise ValueError("an eagle3 drafter config needs 'feature_layers'")
        return {"feature_layers": tuple(cfg["feature_layers"])}

    def config_extra(self) -> dict:
        return {"feature_layers": list(self.feature_layers)}

    @classmethod
    def target_kwargs(cls, target: Llama) -> dict:
        return {"feature_layers": default_feature_layers(target.args.num_hidden_layers)}

    def fuse_target(self, taps: torch.Tensor) -> torch.Tensor:
        """Target features ``[..., k, hidden]`` -> the fused state ``[..., hidden]``."""
        t = feature_norm(taps.to(self.fuse.weight.dtype))
        return linear(t.flatten(-2), self.fuse)

    def _init_from_target(self, target: Llama) -> None:
        """``fc`` as for eagle; ``fuse`` starts as the identity on the last tapped layer
        (the head starts as EAGLE over that layer)."""
        super()._init_from_target(target)
        H = self.args.hidden_size
        self.fuse.weight.zero_()
        self.fuse.weight[:, -H:].copy_(torch.eye(H))

    def drafting(self) -> "Eagle3Drafting":
        return Eagle3Drafting(self)

    def train_forward(self, tokens: torch.Tensor, positions: torch.Tensor,
                      prev: torch.Tensor | None = None) -> torch.Tensor:
        """The teacher-forced forward: ``prev`` ``[B, T, k, hidden]`` are target
        features (fused here); ``[B, T, hidden]`` are already-fused states."""
        if prev is not None and prev.dim() == 4:
            return self.ttt_forward(tokens, positions, prev, 1)[0]
        return super().train_forward(tokens, positions, prev)

    def ttt_forward(self, tokens: torch.Tensor, positions: torch.Tensor,
                    prev_taps: torch.Tensor, steps: int) -> list[torch.Tensor]:
        """Training-time test over a dense window (see the module docstring).

        Args:
            tokens: ``[B, T]`` int64 (teacher-forced tokens).
            positions: ``[B, T]`` RoPE positions.
            prev_taps: ``[B, T, k, hidden]`` target features of each position's
                predecessor (zeros where there is none).
            steps: unrolled steps (>= 1; 1 is the plain teacher-forced forward).

        Returns ``steps`` pre-norm output states ``[B, T, hidden]``; the state of step
        ``s`` at position ``j`` predicts token ``j + 1`` as a depth-``s + 1`` draft
        would (valid for ``j >= s``).
        """
        a = self.args
        B, T = tokens.shape
        cos, sin = self.rope(positions, self.fc.weight.dtype)
        prev = self.fuse_target(prev_taps)
        keys: list[list] = [[] for _ in self.layers]
        vals: list[list] = [[] for _ in self.layers]
        outs = []
        for s in range(steps):
            x = self.embed_input(tokens, prev)
            mask = ttt_mask(T, s, tokens.device)
            for li in range(len(self.layers)):
                q, k, v = self._qkv(li, x, cos, sin)
                keys[li].append(k)
                vals[li].append(v)
                kk = torch.cat(keys[li], dim=1).transpose(1, 2)
                vv = torch.cat(vals[li], dim=1).transpose(1, 2)
                o = F.scaled_dot_product_attention(
                    q.transpose(1, 2), kk, vv, attn_mask=mask,
                    enable_gqa=a.num_attention_heads != a.num_key_value_heads).transpose(1, 2)
                x = self._post(li, x, o)
            outs.append(x)
            # the next step's input at j is this step's own state at j - 1
            prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        return outs


class Eagle3Drafting(EagleDrafting):
    """As :class:`~specrt.draft.eagle.EagleDrafting`, with the target's tapped states
    ``[n, k, hidden]`` fused into ``[n, hidden]`` as they arrive."""

    def begin(self, st: dict, prompt_hidden: torch.Tensor | None) -> None:
        if prompt_hidden is None or prompt_hidden.dim() != 3:
            raise ValueError("an eagle3 drafter needs the target's tapped prompt states "
                             "[P, k, hidden] (the engine passes them for its "
                             "feature_layers)")
        super().begin(st, prompt_hidden)

    def incoming(self, h: torch.Tensor) -> torch.Tensor:
        return self.net.fuse_target(h.detach())
