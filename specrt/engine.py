"""The generation engine: a step API over continuous batching with speculative decoding.

The seam servers and tools drive (after vLLM's ``LLMEngine``)::

    rid = engine.add_request(prompt, params)   # waits; joins the batch at a later step
    events = engine.step()                     # admit, prefill, route, draft, verify,
                                               # commit, emit: one round for every request
    engine.abort(rid)                          # frees its KV blocks and drafter state now

:meth:`Engine.generate` and :meth:`Engine.stream` are loops over :meth:`Engine.step`;
a stream closed or dropped at any event aborts its requests, so no KV block outlives
its request. Tools that need other drafters or lengths for a while use the scoped
:meth:`Engine.using`, never attribute swaps.
"""
from __future__ import annotations

import dataclasses
import json
import secrets
import time
import warnings
from collections import deque
from contextlib import contextmanager
from types import MappingProxyType
from typing import Iterator, Mapping

import torch

from specrt import ops
from specrt.cache import PagedKVCache
from specrt.draft.adaptive import LengthController
from specrt.draft.base import Drafter, DraftTree, SeqState, Verified
from specrt.draft.fused import FusedDrafter
from specrt.draft.registry import drafter_set, routes_within, uses_model
from specrt.model import Detokenizer, Llama, Tokenizer, load_model
from specrt.model.prefill import mean_prompt_state, ragged_prefill
from specrt.acceptance import accept
from specrt.request import Request, RequestOutput, StreamEvent
from specrt.engine_config import EngineConfig
from specrt.engine_stream import Stream
from specrt.sampling import (SEED_LIMIT, SamplingParams, logits_to_probs, position_uniform,
                             sample_at)

__all__ = ["Engine", "EngineConfig", "RequestOutput", "StreamEvent"]


_UNSET = object()


class Engine:
    """Speculative-decoding engine around one target model.

    Args:
        model, tokenizer: the target (see :func:`specrt.model.load_model`).
        drafters: the drafters requests may use (names unique); the first is the
            default unless ``default_drafter`` names another.
        router: the routing head (:class:`specrt.route.MLPRouter`) that picks each
            request's drafter after prefill, or None.
        config: an :class:`EngineConfig`; its fields may also be given as keywords
            (``max_batch=4``), which override ``config``'s.

    Read-only views: ``config``, ``drafters`` (name -> drafter), ``default_drafter``,
    ``router``, ``lengths`` (the draft-length rule), ``eos_ids``, ``cache``.
    """

    def __init__(self, model: Llama, tokenizer: Tokenizer, *,
                 drafters: list[Drafter] | None = None, default_drafter: str | None = None,
                 router=None, config: EngineConfig | None = None, **config_fields):
        cfg = dataclasses.replace(config or EngineConfig(), **config_fields)
        self.model, self.tokenizer = model, tokenizer
        self._config = cfg
        self.device = next(model.parameters()).device
        a = model.args
        self.cache = PagedKVCache(a.num_hidden_layers, -(-cfg.cache_tokens // cfg.block_size),
                                  cfg.block_size, a.num_key_value_heads, a.head_dim,
                                  dtype=model.embed.weight.dtype, device=self.device)
        self._eos_ids = frozenset(tokenizer.eos_ids)
        self._drafters, self._default = drafter_set(drafters or [], default_drafter)
        self._router = router
        self._max_batch = cfg.max_batch
        self._lengths = LengthController(max_draft=cfg.max_draft, adaptive=cfg.adaptive)
        self._record_warned = False
        self._next_id = 0
        self._waiting: deque[Request] = deque()
        self._active: list[Request] = []       # admitted: blocks reserved, prefilled
        self._requests: dict[int, Request] = {}
        self._owned: dict[int, list[StreamEvent]] = {}  # stream-owned ids -> their outbox
        self._failures: list[Request] = []     # failed in this step; events to send

    @classmethod
    def from_pretrained(cls, target: str | None = None, pool: str | None = None, *,
                        device: str | None = None, dtype: torch.dtype | None = None,
                        weight_dtype: torch.dtype | None = None,
                        fp32_precision: str = "auto", **kwargs) -> "Engine":
        """Load a target (HF directory, .gguf file, or the default model when None or
        its own GGUF file) with its drafters.

        ``pool``: a pool directory (see :mod:`specrt.pool`): its drafters, routing head
        and default drafter are used (a ``ValueError`` when it was aligned to another
        target or misses files). With ``pool=None`` and the default target, the shipped
        default pool (``specrt/pools/default/pool.json``) is used when it exists.
        Without a pool the drafters are the model-free ones (n-gram prompt lookup and
        token recycling) plus the shipped baseline drafter when ``target`` is the
        default model. ``dtype`` / ``weight_dtype`` / ``fp32_precision``: see
        :func:`specrt.model.load_model` (``weight_dtype=torch.bfloat16`` streams bf16
        weights on CPU: faster; ``fp32_precision="high"``, the default where the CPU has
        AMX, multiplies fp32 weights as bf16x3; the drafters verify against
        whichever model that makes, losslessly). kwargs go to
        :class:`Engine` (explicit ``drafters`` /
        ``default_drafter`` / ``router`` override the pool's; the rest are
        :class:`EngineConfig` fields).
        """
        from specrt.model import is_default_target

        if target is not None and is_default_target(target):
            target = None  # the default model's own file: its pool and baseline too
        model, tok = load_model(target, dtype=dtype, device=device, weight_dtype=weight_dtype,
                                fp32_precision=fp32_precision)
        if pool is None and target is None and "drafters" not in kwargs:
            from specrt.pool import SHIPPED_POOL

            if (SHIPPED_POOL / "pool.json").is_file():
                pool = str(SHIPPED_POOL)
        if pool is not None:
            from specrt.pool import load_pool

            drafters, router, default, _ = load_pool(pool, model)
            if "drafters" not in kwargs:  # explicit drafters: the pool's router only if
                kwargs["drafters"] = drafters  # every name it routes to is among them
                kwargs.setdefault("default_drafter", default)
            if routes_within(router, {d.name for d in kwargs["drafters"]}):
                kwargs.setdefault("router", router)
        if "drafters" not in kwargs:
            from specrt.draft import default_drafters

            kwargs["drafters"] = default_drafters(model, target)
        return cls(model, tok, **kwargs)

    # ------------------------------------------------------------ read-only views
    @property
    def config(self) -> EngineConfig:
        return self._config

    @property
    def drafters(self) -> Mapping[str, Drafter]:
        return MappingProxyType(self._drafters)

    @property
    def default_drafter(self) -> str | None:
        return self._default

    @property
    def router(self):
        return self._router

    @property
    def lengths(self) -> LengthController:
        return self._lengths

    @property
    def eos_ids(self) -> frozenset:
        return self._eos_ids

    @property
    def max_batch(self) -> int:
        """The batch size in force (``config.max_batch`` unless :meth:`using` set one)."""
        return self._max_batch

    def add_drafter(self, drafter: Drafter) -> None:
        """Make ``drafter`` available for good (``ValueError`` if its name is taken)."""
        if drafter.name in self._drafters:
            raise ValueError(f"the engine already has a drafter {drafter.name!r}")
        self._drafters[drafter.name] = drafter
        if self._default is None:
            self._default = drafter.name

    @contextmanager
    def using(self, *, drafters: list[Drafter] | Mapping[str, Drafter] | None = None,
              default_drafter: str | None = None, lengths: LengthController | None = None,
              max_batch: int | None = None, max_draft: int | None = None,
              adaptive: bool | None = None, router=_UNSET):
        """Within the block the engine uses these settings; on exit (error or not) the
        previous ones come back. For tools that measure other drafters or lengths.

        ``drafters``: exactly these (a list, or name -> drafter); ``default_drafter``
        defaults to their first. With new drafters the router stays on only if every
        drafter it routes to is among them (pass ``router=`` to choose). ``lengths``:
        another draft-length rule; ``max_draft`` / ``adaptive`` change the rule in
        force for the block. ``RuntimeError`` while requests are unfinished.
        """
        if self.has_unfinished():
            raise RuntimeError("Engine.using: requests are in flight; finish or abort them")
        saved = (self._drafters, self._default, self._router, self._lengths, self._max_batch)
        rule = None
        try:
            if drafters is not None:
                lst = list(drafters.values()) if isinstance(drafters, Mapping) else drafters
                self._drafters, self._default = drafter_set(lst, default_drafter)
                if router is _UNSET:
                    router = self._router if routes_within(self._router, self._drafters) \
                        else None
            elif default_drafter is not None:
                self._default = drafter_set(list(self._drafters.values()),
                                             default_drafter)[1]
            if router is not _UNSET:
                self._router = router
            if lengths is not None:
                self._lengths = lengths
            if max_batch is not None:
                self._max_batch = EngineConfig(max_batch=max_batch).max_batch
            if max_draft is not None or adaptive is not None:
                lc = self._lengths
                rule = lc, lc.max_draft, lc.adaptive
                lc.max_draft = lc.max_draft if max_draft is None else \
                    EngineConfig(max_draft=max_draft).max_draft
                lc.adaptive = lc.adaptive if adaptive is None else bool(adaptive)
            yield self
        finally:
            if rule is not None:
                rule[0].max_draft, rule[0].adaptive = rule[1], rule[2]
            (self._drafters, self._default, self._router, self._lengths,
             self._max_batch) = saved

    # ------------------------------------------------------------------ step API
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None, *,
                    drafter: str | None = None, speculative: bool = True,
                    chat: bool = True) -> int:
        """Queue one request; it joins the running batch at a later :meth:`step`.

        ``prompt``: text (wrapped in the chat template when ``chat`` and the model has
        one) or token ids. ``drafter`` forces a drafter by name; without it the router
        (or the default drafter) picks one; ``speculative=False`` decodes plainly.
        Returns the request id. ``ValueError`` (nothing queued) for an empty or too
        long prompt, an unknown drafter or bad sampling parameters.
        """
        r = self._new_request(prompt, params, drafter, speculative, chat, where="prompt")
        self._queue(r)
        return r.rid

    def step(self) -> list[StreamEvent]:
        """One round: admit waiting requests, prefill and route them, draft, verify
        every admitted request's tree in one target forward, commit the accepted K/V,
        emit. Returns the news of requests added with :meth:`add_request` (new text and
        tokens; ``finished`` with the :class:`RequestOutput` at the end). A finished
        request's blocks are free when this returns."""
        events: list[StreamEvent] = []
        new = self._admit()
        if new:
            first = self._prefill(new)
            events += self._emit(new, [[t] for t in first])
        batch = [r for r in self._active if r.finish_reason is None]
        if batch:
            batch, trees = self._draft(batch)
            paths, emitted, logits, h = self._verify(batch, trees)
            self.cache.commit([r.rid for r in batch], paths)
            self._tell_drafters(batch, trees, paths, emitted, logits, h)
            events += self._emit(batch, emitted)
        events += self._take_failures()
        self._reap()
        return self._deliver(events)

    def abort(self, request_id: int) -> None:
        """Stop a request now: its KV blocks, drafter state and length history are
        freed before this returns. Unknown or finished ids are ignored."""
        r = self._requests.pop(request_id, None)
        if r is None:
            return
        if r.finish_reason is None:
            r.finish_reason = "abort"
        if r in self._waiting:
            self._waiting.remove(r)
        if r in self._active:
            self._active.remove(r)
            self._release(r)
        self._owned.pop(request_id, None)

    def has_unfinished(self) -> bool:
        """Whether any request is waiting or running."""
        return bool(self._requests)

    # ------------------------------------------------------------ loops over step
    def generate(self, prompts: str | list[str], params: SamplingParams | list[SamplingParams]
                 | None = None, *, speculative: bool = True, drafter: str | None = None,
                 chat: bool = True, progress: bool = False) -> list[RequestOutput]:
        """Generate completions for ``prompts`` (batched).

        Args:
            prompts: a prompt or a list of prompts.
            params: one :class:`SamplingParams` for all, or one per prompt.
            speculative: use speculative decoding (default); False = the target alone.
                Without drafters the engine decodes plainly either way.
            drafter: force a drafter by name (``ValueError`` if unknown).
            chat: wrap prompts in the model's chat template when it has one.
            progress: show a progress bar over finished requests.

        Returns:
            One :class:`RequestOutput` per prompt, in order.

        Raises ``ValueError`` (before any work, nothing changed) for an empty prompt, a
        prompt longer than the context, or bad sampling parameters.
        """
        it = self.stream(prompts, params, speculative=speculative, drafter=drafter, chat=chat)
        outs: list[RequestOutput | None] = [None] * it.n
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(outs), desc="generate", unit="req")
        for ev in it:
            if ev.finished:
                outs[ev.index] = ev.output
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        return outs  # type: ignore[return-value]

    def stream(self, prompts: str | list[str], params: SamplingParams | list[SamplingParams]
               | None = None, *, speculative: bool = True, drafter: str | None = None,
               chat: bool = True) -> Stream:
        """Like :meth:`generate`, but returns an iterator of :class:`StreamEvent` (one
        whenever a request gets new text, and one when it finishes; ``index`` = position
        in ``prompts``). Bad input raises here, before iteration. Closing or dropping
        the iterator at any point aborts its unfinished requests."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("no prompts given" if isinstance(prompts, (list, tuple))
                             else f"prompts must be a string or a list, got "
                                  f"{type(prompts).__name__}")
        if params is None:
            params = SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} SamplingParams for {len(prompts)} prompts")
        reqs = [self._new_request(p, sp, drafter, speculative, chat, where=f"prompt {i}")
                for i, (p, sp) in enumerate(zip(prompts, plist))]
        return Stream(self, reqs)

    # ------------------------------------------------------------ the loop's parts
    def _new_request(self, prompt, params, drafter, speculative, chat, where) -> Request:
        if drafter is not None and drafter not in self._drafters:
            raise ValueError(f"unknown drafter {drafter!r}; have {sorted(self._drafters)}")
        p = SamplingParams() if params is None else params
        if not isinstance(p, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(p).__name__}")
        p.validate()
        if isinstance(prompt, str):
            if not prompt.strip():
                raise ValueError(f"{where} is empty")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"{where} is not valid text: {e.reason} at character "
                                 f"{e.start} ({prompt[e.start]!r})") from None
            ids = self.tokenizer.encode_prompt(prompt, chat=chat)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            V = self.model.args.vocab_size
            if not prompt or any(not 0 <= t < V for t in prompt):
                raise ValueError(f"{where}: token ids must be a non-empty list in 0..{V - 1}")
            ids, prompt = list(prompt), self.tokenizer.decode(list(prompt))
        else:
            raise ValueError(f"{where} must be a string or a list of token ids, got "
                             f"{type(prompt).__name__}")
        ctx = self.model.args.max_position_embeddings
        limit = min(ctx, self.cache.allocator.num_blocks * self.cache.block_size)
        if len(ids) >= limit:
            raise ValueError(f"{where} has {len(ids)} tokens; the limit is {limit - 1} "
                             f"(context {ctx}, cache {limit} tokens)")
        seed = p.seed if p.seed is not None else secrets.randbelow(SEED_LIMIT)
        spec = speculative and bool(self._drafters)
        r = Request(-1, prompt, ids, p, min(p.max_tokens, limit - len(ids)), seed,
                    Detokenizer(self.tokenizer), self._eos_ids,
                    drafter=(drafter or self._default) if spec else None,
                    auto_route=spec and drafter is None and self._router is not None)
        return r

    def _queue(self, r: Request) -> None:
        r.rid = self._next_id
        self._next_id += 1
        self._requests[r.rid] = r
        self._waiting.append(r)

    def _admit(self) -> list[Request]:
        """Move waiting requests into the batch while batch slots and blocks allow."""
        new = []
        while self._waiting and len(self._active) < self._max_batch:
            r = self._waiting[0]
            span = len(r.prompt_ids) + r.max_new + self._lengths.max_draft + 1
            if -(-span // self.cache.block_size) > self.cache.allocator.num_free:
                if not self._active:
                    self.abort(r.rid)
                    raise RuntimeError(
                        f"KV cache too small for one request of {span} tokens "
                        f"({self.cache.allocator.num_free} of {self.cache.allocator.num_blocks}"
                        f" blocks of {self.cache.block_size} free); raise cache_tokens")
                break
            self._waiting.popleft()
            self.cache.add(r.rid)
            self.cache.reserve(r.rid, span)
            r.t_start = time.perf_counter()
            self._active.append(r)
            new.append(r)
        return new

    @torch.inference_mode()
    def _prefill(self, reqs: list[Request]) -> list[int]:
        """Batched ragged prefill, routing, drafters told the request began; returns
        each request's first token."""
        lens = [len(r.prompt_ids) for r in reqs]
        bt = self.cache.block_table([r.rid for r in reqs])
        taps = self._taps()
        h = ragged_prefill(self.model, [r.prompt_ids for r in reqs], self.cache.kv, bt, taps)
        h, tapped = h if taps else (h, None)
        ln = torch.tensor(lens, device=self.device)
        last = self.model.final_norm(h[torch.arange(len(reqs), device=self.device), ln - 1])
        logits = self.model.logits(last)
        # a prefill does not price the length rule's forwards: its hundreds of tokens
        # (1.3 ms each on a 2-core CPU) set the slope of the rule's line by their leverage,
        # and a verification of 24 tokens at batch 8 (~30 ms) was priced at 46 ms
        self._route(reqs, h, lens)
        for i, (r, n) in enumerate(zip(reqs, lens)):
            self.cache.set_length(r.rid, n)
            r.steps += 1
            if r.drafter is not None:
                r.seq = SeqState(r.rid, list(r.prompt_ids), n, r.params.temperature)
                try:
                    self._drafters[r.drafter].begin(
                        r.seq, self._states_for(r.drafter, h, tapped, taps, i, n))
                except Exception as e:  # noqa: BLE001 -- fails this request only
                    self._fail(r, "begin", e)
        return [self._sample_first(r, row) for r, row in zip(reqs, logits)]

    def _taps(self) -> tuple[int, ...]:
        """Target layers whose states the forward keeps for the drafters: the union of
        their ``feature_layers`` plus the last layer, or ``()`` when none asks."""
        want = {x for d in self._drafters.values() for x in getattr(d, "feature_layers", ())}
        return tuple(sorted(want | {self.model.args.num_hidden_layers - 1})) if want else ()

    def _states_for(self, name: str, h: torch.Tensor, tapped: torch.Tensor | None,
                    taps: tuple[int, ...], i: int, n: int) -> torch.Tensor:
        """What drafter ``name`` receives of row ``i``'s first ``n`` positions: the
        pre-norm last-layer states ``[n, hidden]``, or ``[n, k, hidden]`` of the ``k``
        layers it names in ``feature_layers``."""
        want = getattr(self._drafters[name], "feature_layers", ())
        if not want:
            return h[i, :n]
        return tapped[i, :n, [taps.index(x) for x in want]]

    def _route(self, reqs: list[Request], h: torch.Tensor, lens: list[int]) -> None:
        """The router picks the drafter of each auto-routed request from its prompt's
        mean final state (``h`` ``[B, T, hidden]`` pre-norm, from prefill)."""
        auto = [i for i, r in enumerate(reqs) if r.auto_route]
        if not auto:
            return
        feats = torch.stack([mean_prompt_state(self.model, h[i, :lens[i]]) for i in auto])
        fallback = self._load_fallback(len(self._active))
        for i, (name, cluster, conf) in zip(auto, self._router.route(feats)):
            if fallback and self._yields(name, len(self._active)):
                name = fallback  # under load this drafter costs more than it returns
            reqs[i].drafter = name
            reqs[i].cluster, reqs[i].route_confidence = cluster, conf

    def _load_fallback(self, batch: int) -> str | None:
        """The drafter that routed requests fall back to at ``batch`` requests in flight
        (``EngineConfig.load_fallback``): the default drafter when it runs no model, and
        only under load (batch > 1)."""
        d = self._default
        if (not self._config.load_fallback or batch <= 1 or d not in self._drafters
                or uses_model(self._drafters[d])):
            return None
        return d

    def _yields(self, name: str | None, batch: int) -> bool:
        """Whether drafter ``name`` gives way to the fallback at ``batch``: it runs a
        model and the length rule says it would not draft there."""
        return (name is not None and name in self._drafters
                and uses_model(self._drafters[name]) and not self._lengths.pays(name, batch))

    def _fall_back(self, reqs: list[Request]) -> None:
        """Routed requests whose drafter no longer pays at this batch size (it learns its
        cost per drafted token there as it drafts) move to the model-free default drafter
        for the rest of the request (one way: the model drafter's state is released)."""
        fb = self._load_fallback(len(reqs))
        if fb is None:
            return
        yields: dict[str | None, bool] = {}  # per drafter, once per step
        for r in reqs:
            if not r.auto_route or r.seq is None:
                continue
            if r.drafter not in yields:
                yields[r.drafter] = self._yields(r.drafter, len(reqs))
            if yields[r.drafter]:
                self._drafters[r.drafter].release(r.seq)
                r.seq.state.clear()
                r.seq.tokens = r.prompt_ids + r.out_ids
                self._drafters[fb].begin(r.seq, None)
                r.drafter = fb

    def _sample_first(self, r: Request, logits: torch.Tensor) -> int:
        """The first token after prefill, from ``logits`` ``[V]``."""
        p = r.params
        if p.greedy:
            return int(logits.argmax())
        probs = logits_to_probs(logits, p.temperature, p.top_k, p.top_p)
        return int(sample_at(probs, torch.tensor(position_uniform(r.seed, 0))))

    def _draft(self, reqs: list[Request]) -> tuple[list[Request], list[DraftTree]]:
        """Draft trees, batched per drafter; a root-only tree for plain decoding. A
        drafter that raises or returns a bad tree fails the requests it serves (only
        those); returns the requests still going and their trees."""
        self._fall_back(reqs)
        trees: list[DraftTree | None] = [None] * len(reqs)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(reqs):
            if r.drafter is None:
                trees[i] = DraftTree([r.out_ids[-1]], [-1])
            else:
                r.seq.tokens = r.prompt_ids + r.out_ids
                groups.setdefault(r.drafter, []).append(i)
        B = len(reqs)
        for name, idx in groups.items():
            d = self._drafters[name]
            fused = isinstance(d, FusedDrafter)
            # under load, members of a fused drafter that do not pay there sit out
            skip = self._lengths.skip_members(name, [m.name for m in d.members], B) \
                if fused else set()
            sources = [m.name for m in d.members if m.name not in skip] if skip else None
            budgets = [self._lengths.budget(name, reqs[i].rid, B, reqs[i].remaining, sources)
                       for i in idx]
            t0 = time.perf_counter()
            try:
                seqs = [reqs[i].seq for i in idx]
                got = d.propose(seqs, budgets, skip) if fused else d.propose(seqs, budgets)
                if len(got) != len(idx):
                    raise RuntimeError(f"{len(got)} trees for {len(idx)} requests")
                for i, b, t in zip(idx, budgets, got):
                    if len(t) > b + 1 or t.tokens[0] != reqs[i].out_ids[-1]:
                        raise RuntimeError(f"a tree of {len(t)} nodes for budget {b}, or "
                                           f"with the wrong root")
            except Exception as e:  # noqa: BLE001 -- fails this drafter's requests only
                for i in idx:
                    self._fail(reqs[i], "propose", e)
                continue
            # a request's first draft also runs its whole prompt through the drafter (and
            # a process's first, the drafter's weight packing): 49 ms per drafted token
            # against ~0.5 later, which kept the rule from drafting for most of a request
            if all(reqs[i].drafted > 0 for i in idx):
                self._lengths.observe_draft(name, sum(len(t) - 1 for t in got),
                                            time.perf_counter() - t0, B)
                for m, (sec, n) in (d.last_costs.items() if fused else ()):
                    self._lengths.observe_draft(f"{name}/{m}", n, sec, B)
            prunable = getattr(d, "prunable", True)
            for i, t in zip(idx, got):  # nodes not worth their verification at B go
                trees[i] = self._lengths.prune(name, t, B) \
                    if prunable and t.probs is None else t
        keep = [i for i, r in enumerate(reqs) if r.finish_reason is None]
        return [reqs[i] for i in keep], [trees[i] for i in keep]  # type: ignore[misc]

    @torch.inference_mode()
    def _verify(self, reqs: list[Request], trees: list[DraftTree]):
        """One target forward over every request's tree (plain decode = root only) and
        lossless verification. Returns per request the accepted path (node indices,
        root first) and the tokens it emits, plus the trees' logits ``[B, T, V]`` and
        states ``(h [B, T, hidden] pre-norm, tapped [B, T, k, hidden] or None, taps)``."""
        dev, B = self.device, len(reqs)
        T = max(len(t) for t in trees)
        tokens = torch.zeros(B, T, dtype=torch.long)
        parents = torch.zeros(B, T, dtype=torch.long)
        depth = torch.zeros(B, T, dtype=torch.long)
        for i, t in enumerate(trees):
            n = len(t)
            tokens[i, :n] = torch.tensor(t.tokens)
            parents[i, :n] = torch.tensor(t.parents)
            depth[i, :n] = torch.tensor(t.depths())
        tl = torch.tensor([len(t) for t in trees])
        prefix = torch.tensor([self.cache.length(r.rid) for r in reqs])
        tree_mask = None
        if T > 1 and any(t.parents != list(range(-1, len(t) - 1)) for t in trees):
            tree_mask = ops.build_tree_mask(parents, tl).to(dev)
        bt = self.cache.block_table([r.rid for r in reqs])
        t0 = time.perf_counter()
        taps = self._taps()
        h = self.model(tokens.to(dev), (prefix[:, None] + depth).to(dev), self.cache.kv, bt,
                       prefix.to(dev), tree_mask, tl.to(dev) if T > 1 else None, norm=False,
                       taps=taps)
        h, tapped = h if taps else (h, None)
        # logits of the valid nodes only (padding rows of a ragged batch stay 0)
        valid = (torch.arange(T)[None, :] < tl[:, None]).to(dev)
        if bool(valid.all()):
            logits = self.model.logits(self.model.final_norm(h))        # [B, T, V] fp32
        else:
            logits = torch.zeros(B, T, self.model.args.vocab_size, device=dev)
            logits[valid] = self.model.logits(self.model.final_norm(h[valid]))
        path, plen, nxt = accept(reqs, trees, logits, tokens, parents, tl)
        self._lengths.observe_forward(int(tl.sum()), time.perf_counter() - t0)  # padding is free
        paths = [p[:n] for p, n in zip(path, plen)]
        emitted = [[t.tokens[j] for j in p[1:]] + [x] for t, p, x in zip(trees, paths, nxt)]
        return paths, emitted, logits, (h, tapped, taps)

    def _tell_drafters(self, reqs, trees, paths, emitted, logits, states) -> None:
        """Counters, the length rule and each request's drafter learn the outcome."""
        for i, r in enumerate(reqs):
            r.steps += 1
            if r.drafter is None:
                continue
            n = len(trees[i])
            r.drafted += n - 1
            r.accepted += len(paths[i]) - 1
            depth = max(trees[i].depths())
            r.count_step(depth, len(paths[i]) - 1)
            self._lengths.observe_accept(r.drafter, r.rid, len(paths[i]) - 1, depth)
            self._lengths.observe_nodes(r.drafter, trees[i], paths[i])
            r.seq.tokens = r.prompt_ids + r.out_ids + emitted[i]
            try:
                self._drafters[r.drafter].update(r.seq, Verified(
                    trees[i], paths[i], emitted[i], logits[i, :n],
                    self._states_for(r.drafter, *states, i, n)))
            except Exception as e:  # noqa: BLE001 -- fails this request only
                self._fail(r, "update", e)

    def _emit(self, reqs: list[Request], new_tokens: list[list[int]]) -> list[StreamEvent]:
        """Append each request's new tokens (EOS, stops, max_tokens applied); events."""
        events = []
        for r, toks in zip(reqs, new_tokens):
            if r.finish_reason == "error":
                continue  # its final event comes from _take_failures
            ev = r.emit(toks)
            if ev is None:
                continue
            if ev.finished and self._config.record:
                self._record(r, ev.output)
            events.append(ev)
        return events

    def _fail(self, r: Request, where: str, e: Exception) -> None:
        """A drafter raised for ``r``: the request ends with ``finish_reason="error"``
        (its blocks are freed at the end of the step); other requests go on."""
        r.finish_reason = "error"
        r.error = f"drafter {r.drafter!r} failed in {where}: {type(e).__name__}: {e}"
        r.t_end = time.perf_counter()
        self._failures.append(r)

    def _take_failures(self) -> list[StreamEvent]:
        out = [StreamEvent(r.rid, "", [], True, r.output()) for r in self._failures]
        self._failures.clear()
        return out

    def _reap(self) -> None:
        """Release finished requests."""
        for r in [r for r in self._active if r.finish_reason is not None]:
            self._active.remove(r)
            self._release(r)
            self._requests.pop(r.rid, None)

    def _release(self, r: Request) -> None:
        """Free a request's drafter state, length history and KV blocks."""
        try:
            if r.drafter is not None and r.seq is not None:
                self._drafters[r.drafter].release(r.seq)
        except Exception as e:  # noqa: BLE001 -- a failing release must not stop serving
            warnings.warn(f"specrt: drafter {r.drafter!r} failed to release request "
                          f"{r.rid}: {type(e).__name__}: {e}")
        finally:
            self._lengths.forget(r.rid)
            self.cache.release(r.rid)

    def _deliver(self, events: list[StreamEvent]) -> list[StreamEvent]:
        """Stream-owned requests' events go to their stream's outbox; the rest out."""
        out = []
        for ev in events:
            box = self._owned.get(ev.request_id)
            if box is None:
                out.append(ev)
            else:
                box.append(ev)
        return out

    def _record(self, r: Request, out: RequestOutput) -> None:
        """Append one served request to ``config.record`` (see :class:`EngineConfig`)."""
        row = r.record_row(out)
        try:
            with open(self._config.record, "a", encoding="utf-8") as f:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        except OSError as e:
            if not self._record_warned:
                warnings.warn(f"specrt: cannot record served requests to "
                              f"{self._config.record}: {e}")
                self._record_warned = True
