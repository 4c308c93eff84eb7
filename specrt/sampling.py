"""Sampling parameters and the one logits -> probabilities transform.

The losslessness guarantee of speculative decoding is relative to the *processed*
target distribution, so target and draft distributions both go through
:func:`logits_to_probs` with the same parameters.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How to pick tokens.

    Attributes:
        max_tokens: new tokens to generate at most (> 0).
        temperature: 0 means greedy (argmax); > 0 scales logits.
        top_k: keep the k most likely tokens (0 = all).
        top_p: keep the smallest set whose mass reaches top_p, in (0, 1].
        seed: seed of the request's random generator (None: nondeterministic).
        stop: strings that end generation (not included in the output text).
        ignore_eos: keep going past the end-of-sequence token.
    """

    max_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` with a clear message on any out-of-range field."""
        if not isinstance(self.max_tokens, int) or self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not self.temperature >= 0:  # also catches NaN
            raise ValueError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def logits_to_probs(logits: torch.Tensor, temperature: float, top_k: int = 0,
                    top_p: float = 1.0) -> torch.Tensor:
    """Processed distribution of ``logits`` ``[..., V]`` -> fp32 probabilities ``[..., V]``.

    Applies temperature, then top-k, then top-p (nucleus) filtering; ``temperature == 0``
    gives the one-hot argmax distribution. Used for target and draft alike.
    """
    logits = logits.float()
    if temperature == 0.0:
        out = torch.zeros_like(logits)
        return out.scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits / temperature
    V = logits.shape[-1]
    if 0 < top_k < V:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sp, idx = torch.sort(probs, dim=-1, descending=True)
        # keep a token if the mass strictly before it is < top_p (the first always stays)
        drop = (sp.cumsum(-1) - sp) >= top_p
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sp)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs
