"""Sampling parameters and the one logits -> probabilities transform.

The losslessness guarantee of speculative decoding is relative to the *processed*
target distribution, so target and draft distributions both go through
:func:`logits_to_probs` with the same parameters.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch

SEED_LIMIT = 2 ** 63
"""Seeds are integers in ``[0, 2**63)``."""


@dataclass
class SamplingParams:
    """How to pick tokens.

    Attributes:
        max_tokens: new tokens to generate at most (> 0).
        temperature: 0 means greedy (argmax); > 0 scales logits.
        top_k: keep the k most likely tokens (0 = all).
        top_p: keep the smallest set whose mass reaches top_p, in (0, 1].
        seed: seed of the request's random numbers, an integer in ``[0, 2**63)``
            (None: a fresh random one). The numbers are keyed by (seed, output
            position, purpose) (:func:`position_uniform`), so a seed reproduces the
            same text whatever the draft lengths, the batch or the timing, and with
            deterministic drafts speculative output equals plain output.
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
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        elif isinstance(self.stop, tuple):
            self.stop = list(self.stop)
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` with a clear message on any field of the wrong type or
        out of range (booleans are not numbers here)."""
        def number(x) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool)

        def integer(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        if not integer(self.max_tokens) or self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not number(self.temperature) or not 0 <= self.temperature < math.inf:
            raise ValueError(f"temperature must be a finite number >= 0, got "
                             f"{self.temperature!r}")
        if not integer(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not isinstance(self.stop, list) or any(not isinstance(s, str) or not s
                                                  for s in self.stop):
            raise ValueError(f"stop must be a string or a list of non-empty strings, got "
                             f"{self.stop!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(
                self.seed, int) or not 0 <= self.seed < SEED_LIMIT):
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")

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
        probs = _nucleus(probs, top_p)
    return probs


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Top-p filtering of ``probs`` ``[..., V]``: in descending order, a token stays if
    the mass strictly before it is < ``top_p`` (the first always stays); renormalised.

    The nucleus is a prefix of the descending order, so it is searched among the top
    ``k`` tokens (``k`` = 128, x8 until the ``k``-th token of every row is already out;
    ``k = V`` is the full sort) instead of sorting the whole vocabulary per row: a
    49k-token sort costs milliseconds per row on a CPU, more than a draft step."""
    V = probs.shape[-1]
    k = min(V, 128)
    while True:
        sp, idx = torch.topk(probs, k, dim=-1)                    # descending
        drop = (sp.cumsum(-1) - sp) >= top_p
        if k == V or bool(drop[..., -1].all()):
            break
        k = min(V, k * 8)
    out = torch.zeros_like(probs).scatter_(-1, idx, sp.masked_fill(drop, 0.0))
    return out / out.sum(-1, keepdim=True)


def position_uniform(seed: int, position: int, purpose: str = "token") -> float:
    """The request's uniform random number in ``(0, 1)`` for output ``position`` and
    ``purpose`` (``"token"``: which token the target emits there; ``"verify"``: the
    acceptance tests of a sampled-draft tree verified from there): a hash of
    (seed, position, purpose), so it does not depend on how many numbers were drawn
    before (draft lengths, batch, timing)."""
    d = hashlib.blake2b(f"{seed}:{position}:{purpose}".encode(), digest_size=8).digest()
    return (int.from_bytes(d, "big") + 0.5) / 2.0 ** 64


def position_uniforms(seed: int, position: int, n: int, purpose: str) -> torch.Tensor:
    """``n`` uniforms ``[n]`` (float32) for ``purpose`` at output ``position``."""
    return torch.tensor([position_uniform(seed, position, f"{purpose}.{i}") for i in range(n)],
                        dtype=torch.float32)


def sample_at(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draws: ``probs`` ``[..., V]`` (normalised or not), uniforms ``u``
    ``[...]`` in (0, 1) -> token ids ``[...]`` int64, the first token whose cumulative
    mass (float64, vocabulary order) exceeds ``u`` x the total. A token of zero
    probability is never drawn. The same distribution and uniform give the same token,
    which is what couples speculative to plain sampling."""
    cdf = probs.double().cumsum(-1)
    x = (u.double().to(cdf.device) * cdf[..., -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, x, right=True).squeeze(-1)
    return idx.clamp_(max=probs.shape[-1] - 1)
