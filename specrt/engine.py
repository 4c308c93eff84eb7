"""The generation engine: request admission, batched prefill, the decode loop, metrics.

``Engine.generate`` runs a continuous batch: requests are admitted while the batch
and the KV cache have room, prefilled together, then decoded together one target
forward per step; a finished request leaves and the next waiting one is admitted.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from specrt.cache import PagedKVCache
from specrt.model import Detokenizer, Llama, Tokenizer, load_model
from specrt.sampling import SamplingParams, logits_to_probs


@dataclass
class RequestOutput:
    """Result of one prompt: text, token ids (EOS excluded), why it ended, metrics.

    ``stats`` keys: drafter, steps (target forwards, prefill included), drafted_tokens,
    accepted_tokens, acceptance_rate, mean_accepted_length (tokens per target
    forward), prompt_tokens, completion_tokens, elapsed_s, tokens_per_s.
    """

    prompt: str
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: dict


@dataclass
class StreamEvent:
    """One step's news for one request (``index`` = position in the prompt list)."""

    index: int
    text: str
    token_ids: list[int]
    finished: bool
    output: RequestOutput | None = None


@dataclass
class _Request:
    index: int
    prompt: str
    prompt_ids: list[int]
    params: SamplingParams
    max_new: int
    generator: torch.Generator | None
    detok: Detokenizer
    seq_id: int = -1
    out_ids: list[int] = field(default_factory=list)
    text: str = ""
    text_sent: int = 0
    finish_reason: str | None = None
    t_start: float = 0.0
    t_end: float = 0.0
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    drafter: str | None = None


class Engine:
    """Speculative-decoding engine around one target model.

    Args:
        model, tokenizer: the target (see :func:`specrt.model.load_model`).
        max_batch: requests decoded together at most.
        cache_tokens: KV cache capacity in tokens over all sequences.
        block_size: tokens per KV block.
    """

    def __init__(self, model: Llama, tokenizer: Tokenizer, *, max_batch: int = 16,
                 cache_tokens: int = 16384, block_size: int = 16):
        if max_batch <= 0:
            raise ValueError(f"max_batch must be positive, got {max_batch}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.device = next(model.parameters()).device
        a = model.args
        self.cache = PagedKVCache(a.num_hidden_layers, -(-cache_tokens // block_size), block_size,
                                  a.num_key_value_heads, a.head_dim, dtype=model.embed.weight.dtype,
                                  device=self.device)
        self.eos_ids = set(tokenizer.eos_ids)
        self._next_seq = 0

    @classmethod
    def from_pretrained(cls, target: str | None = None, pool: str | None = None, *,
                        device: str | None = None, dtype: torch.dtype | None = None,
                        **kwargs) -> "Engine":
        """Load a target (HF directory, .gguf file, or the default model when None).

        ``pool`` (a drafter pool directory) is accepted for the speculative engine;
        kwargs go to :class:`Engine`.
        """
        model, tok = load_model(target, dtype=dtype, device=device)
        return cls(model, tok, **kwargs)

    # ------------------------------------------------------------------ API

    def generate(self, prompts: str | list[str], params: SamplingParams | list[SamplingParams]
                 | None = None, *, speculative: bool = False, drafter: str | None = None,
                 chat: bool = True, progress: bool = False) -> list[RequestOutput]:
        """Generate completions for ``prompts`` (batched).

        Args:
            prompts: a prompt or a list of prompts.
            params: one :class:`SamplingParams` for all, or one per prompt.
            speculative: use speculative decoding (drafter pool); False = target alone.
            drafter: force a drafter by name.
            chat: wrap prompts in the model's chat template when it has one.
            progress: show a progress bar over finished requests.

        Returns:
            One :class:`RequestOutput` per prompt, in order.

        Raises ``ValueError`` (before any work, nothing changed) for an empty prompt, a
        prompt longer than the context, or bad sampling parameters.
        """
        outs: list[RequestOutput | None] = [None] * (1 if isinstance(prompts, str) else len(prompts))
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(outs), desc="generate", unit="req")
        for ev in self.stream(prompts, params, speculative=speculative, drafter=drafter,
                              chat=chat):
            if ev.finished:
                outs[ev.index] = ev.output
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        return outs  # type: ignore[return-value]

    def stream(self, prompts: str | list[str], params: SamplingParams | list[SamplingParams]
               | None = None, *, speculative: bool = False, drafter: str | None = None,
               chat: bool = True) -> Iterator[StreamEvent]:
        """Like :meth:`generate`, but yields a :class:`StreamEvent` whenever a request
        gets new text (incremental detokenization) and once when it finishes."""
        if speculative or drafter is not None:
            raise NotImplementedError("speculative decoding is not available yet; "
                                      "pass speculative=False")
        reqs = self._make_requests(prompts, params, chat)
        yield from self._run(reqs)

    # ------------------------------------------------------------ internals

    def _make_requests(self, prompts, params, chat) -> list[_Request]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise ValueError("no prompts given")
        if params is None:
            params = SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} SamplingParams for {len(prompts)} prompts")
        ctx = self.model.args.max_position_embeddings
        cap = self.cache.allocator.num_blocks * self.cache.block_size
        reqs = []
        for i, (prompt, p) in enumerate(zip(prompts, plist)):
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"prompt {i} is empty")
            p.validate()
            ids = self.tokenizer.encode_prompt(prompt, chat=chat)
            limit = min(ctx, cap)
            if len(ids) >= limit:
                raise ValueError(f"prompt {i} has {len(ids)} tokens; the limit is {limit - 1} "
                                 f"(context {ctx}, cache {cap} tokens)")
            max_new = min(p.max_tokens, limit - len(ids))
            gen = None
            if not p.greedy:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(p.seed if p.seed is not None else
                                int(torch.randint(0, 2**62, (1,)).item()))
            reqs.append(_Request(i, prompt, ids, p, max_new, gen, Detokenizer(self.tokenizer)))
        return reqs

    def _admit(self, waiting: list[_Request], active: list[_Request]) -> list[_Request]:
        """Move waiting requests into the batch while batch slots and blocks allow."""
        new = []
        while waiting and len(active) + len(new) < self.max_batch:
            r = waiting[0]
            need = -(-(len(r.prompt_ids) + r.max_new + 1) // self.cache.block_size)
            if need > self.cache.allocator.num_free:
                if not active and not new:
                    raise RuntimeError("KV cache too small for one request; raise cache_tokens")
                break
            waiting.pop(0)
            r.seq_id = self._next_seq
            self._next_seq += 1
            self.cache.add(r.seq_id)
            self.cache.reserve(r.seq_id, len(r.prompt_ids) + r.max_new + 1)
            r.t_start = time.perf_counter()
            new.append(r)
        return new

    def _run(self, reqs: list[_Request]) -> Iterator[StreamEvent]:
        waiting, active = list(reqs), []
        try:
            while waiting or active:
                new = self._admit(waiting, active)
                if new:
                    logits = self._prefill(new)
                    yield from self._emit(new, [[t] for t in self._sample(new, logits)])
                    active.extend(r for r in new if r.finish_reason is None)
                    for r in new:
                        if r.finish_reason is not None:
                            self.cache.release(r.seq_id)
                if not active:
                    continue
                logits = self._decode(active)
                done_before = list(active)
                yield from self._emit(done_before, [[t] for t in self._sample(active, logits)])
                for r in done_before:
                    if r.finish_reason is not None:
                        active.remove(r)
                        self.cache.release(r.seq_id)
        finally:  # an exception (or a closed stream) must not leak cache blocks
            for r in active:
                self.cache.release(r.seq_id)

    @torch.inference_mode()
    def _prefill(self, reqs: list[_Request]) -> torch.Tensor:
        """Batched ragged prefill; returns the last prompt position's logits ``[B, V]``."""
        lens = [len(r.prompt_ids) for r in reqs]
        T = max(lens)
        toks = torch.zeros(len(reqs), T, dtype=torch.long)
        for i, r in enumerate(reqs):
            toks[i, :lens[i]] = torch.tensor(r.prompt_ids)
        dev = self.device
        ln = torch.tensor(lens, device=dev)
        bt = self.cache.block_table([r.seq_id for r in reqs])
        h = self.model(toks.to(dev), torch.arange(T, device=dev).expand(len(reqs), T),
                       self.cache.kv, bt, torch.zeros(len(reqs), dtype=torch.long, device=dev),
                       tree_lens=ln)
        last = h[torch.arange(len(reqs), device=dev), ln - 1]
        for r, n in zip(reqs, lens):
            self.cache.set_length(r.seq_id, n)
            r.steps += 1
        return self.model.logits(last)

    @torch.inference_mode()
    def _decode(self, reqs: list[_Request]) -> torch.Tensor:
        """One plain decode step (T=1) for every request; returns logits ``[B, V]``."""
        dev = self.device
        lens = torch.tensor([self.cache.length(r.seq_id) for r in reqs], device=dev)
        toks = torch.tensor([r.out_ids[-1] for r in reqs], device=dev)[:, None]
        bt = self.cache.block_table([r.seq_id for r in reqs])
        h = self.model(toks, lens[:, None], self.cache.kv, bt, lens)
        for r in reqs:
            self.cache.set_length(r.seq_id, self.cache.length(r.seq_id) + 1)
            r.steps += 1
        return self.model.logits(h[:, 0])

    def _sample(self, reqs: list[_Request], logits: torch.Tensor) -> list[int]:
        out = []
        for r, row in zip(reqs, logits):
            p = r.params
            if p.greedy:
                out.append(int(row.argmax()))
            else:
                probs = logits_to_probs(row, p.temperature, p.top_k, p.top_p)
                out.append(int(torch.multinomial(probs, 1, generator=r.generator)))
        return out

    def _emit(self, reqs: list[_Request], new_tokens: list[list[int]]) -> Iterator[StreamEvent]:
        """Append accepted tokens, apply EOS / stop strings / max_tokens, yield events."""
        for r, toks in zip(reqs, new_tokens):
            kept = []
            for t in toks:
                if t in self.eos_ids and not r.params.ignore_eos:
                    r.finish_reason = "stop"
                    break
                kept.append(t)
                if len(r.out_ids) + len(kept) >= r.max_new:
                    r.finish_reason = "length"
                    break
            r.out_ids.extend(kept)
            if kept:
                r.detok.push(kept)
            full = r.detok.text
            hold = 0
            if r.params.stop:
                cut = _find_stop(full, r.params.stop, r.text_sent)
                if cut is not None:
                    full = full[:cut]
                    r.finish_reason = "stop"
                else:  # a stop string may still be completing: hold its length back
                    hold = max(len(x) for x in r.params.stop) - 1
            if r.finish_reason is not None:
                r.text = full
                delta = full[r.text_sent:]
                r.t_end = time.perf_counter()
                yield StreamEvent(r.index, delta, kept, True, self._output(r))
            else:
                end = max(r.text_sent, len(full) - hold)
                delta = full[r.text_sent:end]
                r.text_sent = end
                if kept:
                    yield StreamEvent(r.index, delta, kept, False)

    def _output(self, r: _Request) -> RequestOutput:
        el = max(r.t_end - r.t_start, 1e-9)
        n = len(r.out_ids)
        stats = {
            "drafter": r.drafter, "steps": r.steps, "drafted_tokens": r.drafted,
            "accepted_tokens": r.accepted,
            "acceptance_rate": r.accepted / r.drafted if r.drafted else 0.0,
            "mean_accepted_length": n / r.steps if r.steps else 0.0,
            "prompt_tokens": len(r.prompt_ids), "completion_tokens": n,
            "elapsed_s": el, "tokens_per_s": n / el,
        }
        return RequestOutput(r.prompt, r.text, list(r.out_ids), r.finish_reason, stats)


def _find_stop(text: str, stops: list[str], sent: int) -> int | None:
    """Earliest index where a stop string starts, at or after ``sent`` (text before
    it was streamed already, so it holds no stop string)."""
    best = None
    for s in stops:
        i = text.find(s, sent)
        if i != -1 and (best is None or i < best):
            best = i
    return best
