"""The engine's knobs, in one dataclass."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    """Every engine knob, once.

    Attributes:
        max_batch: requests decoded together at most.
        cache_tokens: KV cache capacity in tokens over all sequences.
        block_size: tokens per KV block.
        max_draft: most drafted tokens per request per step (the adaptive rule picks
            0..max_draft each step; see :mod:`specrt.draft.adaptive`).
        adaptive: False pins every draft budget to ``max_draft``.
        record: path of a JSONL file to which every finished request is appended
            (``id``, ``task`` = "served", ``prompt``, ``output``, ``prompt_ids``,
            ``output_ids``, ``finish_reason``, ``drafter``, ``cluster``, ``time``):
            served traffic kept so that ``specrt align --prompts FILE`` can be rerun on
            it (the file is a valid prompt file). A failing write warns once and never
            stops serving.
        load_fallback: a routed request whose drafter does not pay at the batch size it
            joins (the length rule's test, :meth:`LengthController.pays`: its measured
            acceptance against its cost per drafted token at that batch size) decodes
            with the engine's default drafter instead when that one runs no model
            (lookup only). On a 2-core CPU a fusion with the model head cost 2.7 ms per
            drafted token at batch 8 against 0.4 ms at batch 1.
    """

    max_batch: int = 16
    cache_tokens: int = 16384
    block_size: int = 16
    max_draft: int = 6
    adaptive: bool = True
    record: str | None = None
    load_fallback: bool = True

    def __post_init__(self):
        for name in ("max_batch", "cache_tokens", "block_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(self.max_draft, int) or self.max_draft < 0:
            raise ValueError(f"max_draft must be an integer >= 0, got {self.max_draft!r}")
