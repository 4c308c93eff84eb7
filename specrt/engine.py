"""The generation engine: request admission, batched prefill, the decode loop, metrics.

``Engine.generate`` runs a continuous batch: requests are admitted while the batch
and the KV cache have room, prefilled together, then decoded together one target
forward per step; a finished request leaves and the next waiting one is admitted.
"""
from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import dataclass, field
from typing import Iterator

import torch

from specrt import ops
from specrt.cache import PagedKVCache
from specrt.draft.adaptive import LengthController
from specrt.draft.base import Drafter, DraftTree, SeqState, Verified
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
    emitted: int = 0  # tokens produced, a final EOS included
    drafted: int = 0
    accepted: int = 0
    drafter: str | None = None
    auto_route: bool = False
    cluster: int | None = None
    route_confidence: float | None = None
    seq: SeqState | None = None


class Engine:
    """Speculative-decoding engine around one target model.

    Args:
        model, tokenizer: the target (see :func:`specrt.model.load_model`).
        max_batch: requests decoded together at most.
        cache_tokens: KV cache capacity in tokens over all sequences.
        block_size: tokens per KV block.
        record: path of a JSONL file to which every finished request is appended
            (``id``, ``task`` = "served", ``prompt``, ``output``, ``prompt_ids``,
            ``output_ids``, ``finish_reason``, ``drafter``, ``cluster``, ``time``): served
            traffic kept so that ``specrt align --prompts FILE`` can be rerun on it (the
            file is a valid prompt file). A failing write warns once and never stops
            serving.
    """

    def __init__(self, model: Llama, tokenizer: Tokenizer, *,
                 drafters: list[Drafter] | None = None, default_drafter: str | None = None,
                 max_batch: int = 16, cache_tokens: int = 16384, block_size: int = 16,
                 max_draft: int = 6, adaptive: bool = True, router=None,
                 record: str | None = None):
        if max_batch <= 0:
            raise ValueError(f"max_batch must be positive, got {max_batch}")
        if max_draft < 0:
            raise ValueError(f"max_draft must be >= 0, got {max_draft}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.device = next(model.parameters()).device
        a = model.args
        self.cache = PagedKVCache(a.num_hidden_layers, -(-cache_tokens // block_size), block_size,
                                  a.num_key_value_heads, a.head_dim, dtype=model.embed.weight.dtype,
                                  device=self.device)
        self.eos_ids = set(tokenizer.eos_ids)
        self.drafters: dict[str, Drafter] = {}
        for d in drafters or []:
            if d.name in self.drafters:
                raise ValueError(f"two drafters named {d.name!r}")
            self.drafters[d.name] = d
        if default_drafter is not None and default_drafter not in self.drafters:
            raise ValueError(f"default drafter {default_drafter!r} is not among "
                             f"{sorted(self.drafters)}")
        self.default_drafter = default_drafter or next(iter(self.drafters), None)
        self.router = router
        self.max_draft = max_draft
        self.lengths = LengthController(max_draft=max_draft, adaptive=adaptive)
        self._next_seq = 0
        self.record = record
        self._record_warned = False

    @classmethod
    def from_pretrained(cls, target: str | None = None, pool: str | None = None, *,
                        device: str | None = None, dtype: torch.dtype | None = None,
                        **kwargs) -> "Engine":
        """Load a target (HF directory, .gguf file, or the default model when None)
        with its drafters.

        ``pool``: a pool directory (see :mod:`specrt.pool`): its drafters, routing head
        and default drafter are used (a ``ValueError`` when it was aligned to another
        target or misses files). With ``pool=None`` and the default target, the shipped
        default pool (``specrt/pools/default/pool.json``) is used when it exists.
        Without a pool the drafters are the model-free ones (n-gram prompt lookup and
        token recycling) plus the shipped baseline drafter when ``target`` is the
        default model. kwargs go to :class:`Engine` (explicit ``drafters`` /
        ``default_drafter`` / ``router`` override the pool's).
        """
        model, tok = load_model(target, dtype=dtype, device=device)
        if pool is None and target is None and "drafters" not in kwargs:
            from pathlib import Path

            shipped = Path(__file__).resolve().parent / "pools" / "default"
            if (shipped / "pool.json").is_file():
                pool = str(shipped)
        if pool is not None:
            from specrt.pool import load_pool

            drafters, router, default, _ = load_pool(pool, model)
            if "drafters" not in kwargs:  # explicit drafters: the pool's router only if
                kwargs["drafters"] = drafters  # every name it routes to is among them
                kwargs.setdefault("default_drafter", default)
            have = {d.name for d in kwargs["drafters"]}
            if set(router.cluster_drafter) | {router.default} <= have:
                kwargs.setdefault("router", router)
        if "drafters" not in kwargs:
            from specrt.draft import default_drafters

            kwargs["drafters"] = default_drafters(model, target)
        return cls(model, tok, **kwargs)

    # ------------------------------------------------------------------ API

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
               | None = None, *, speculative: bool = True, drafter: str | None = None,
               chat: bool = True) -> Iterator[StreamEvent]:
        """Like :meth:`generate`, but yields a :class:`StreamEvent` whenever a request
        gets new text (incremental detokenization) and once when it finishes."""
        if drafter is not None and drafter not in self.drafters:
            raise ValueError(f"unknown drafter {drafter!r}; have {sorted(self.drafters)}")
        reqs = self._make_requests(prompts, params, chat)
        for r in reqs:
            r.drafter = (drafter or self.default_drafter) if speculative else None
            r.auto_route = speculative and drafter is None and self.router is not None
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
            span = len(r.prompt_ids) + r.max_new + self.max_draft + 1
            need = -(-span // self.cache.block_size)
            if need > self.cache.allocator.num_free:
                if not active and not new:
                    raise RuntimeError("KV cache too small for one request; raise cache_tokens")
                break
            waiting.pop(0)
            r.seq_id = self._next_seq
            self._next_seq += 1
            self.cache.add(r.seq_id)
            self.cache.reserve(r.seq_id, span)
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
                    active = self._reap(active + new)
                if active:
                    news = self._step(active)
                    yield from self._emit(active, news)
                    active = self._reap(active)
        finally:  # an exception (or a closed stream) must not leak cache blocks
            for r in active:
                self._release(r)

    def _reap(self, active: list[_Request]) -> list[_Request]:
        """Release finished requests; return the rest."""
        keep = []
        for r in active:
            if r.finish_reason is None:
                keep.append(r)
            else:
                self._release(r)
        return keep

    def _release(self, r: _Request) -> None:
        self.cache.release(r.seq_id)
        if r.drafter is not None and r.seq is not None:
            self.drafters[r.drafter].release(r.seq)

    @torch.inference_mode()
    def _prefill(self, reqs: list[_Request]) -> torch.Tensor:
        """Batched ragged prefill; returns the last prompt position's logits ``[B, V]``.

        Drafters of speculative requests are told the request began, with the target's
        pre-norm last-layer states over the prompt.
        """
        lens = [len(r.prompt_ids) for r in reqs]
        T = max(lens)
        toks = torch.zeros(len(reqs), T, dtype=torch.long)
        for i, r in enumerate(reqs):
            toks[i, :lens[i]] = torch.tensor(r.prompt_ids)
        dev = self.device
        ln = torch.tensor(lens, device=dev)
        bt = self.cache.block_table([r.seq_id for r in reqs])
        t0 = time.perf_counter()
        h = self.model(toks.to(dev), torch.arange(T, device=dev).expand(len(reqs), T),
                       self.cache.kv, bt, torch.zeros(len(reqs), dtype=torch.long, device=dev),
                       tree_lens=ln, norm=False)
        last = self.model.final_norm(h[torch.arange(len(reqs), device=dev), ln - 1])
        logits = self.model.logits(last)
        self.lengths.observe_forward(sum(lens), time.perf_counter() - t0)
        auto = [i for i, r in enumerate(reqs) if r.auto_route]
        if auto:
            # routing features: mean of the target's final (normed) states over the prompt
            feats = torch.stack([self.model.final_norm(h[i, :lens[i]]).mean(0) for i in auto])
            for i, (name, cluster, conf) in zip(auto, self.router.route(feats)):
                reqs[i].drafter = name
                reqs[i].cluster, reqs[i].route_confidence = cluster, conf
        for i, (r, n) in enumerate(zip(reqs, lens)):
            self.cache.set_length(r.seq_id, n)
            r.steps += 1
            if r.drafter is not None:
                r.seq = SeqState(r.seq_id, list(r.prompt_ids), n, r.params.temperature)
                self.drafters[r.drafter].begin(r.seq, h[i, :n])
        return logits

    def _propose(self, reqs: list[_Request]) -> list[DraftTree]:
        """Draft trees, batched per drafter; a root-only tree for plain decoding."""
        trees: list[DraftTree | None] = [None] * len(reqs)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(reqs):
            if r.drafter is None:
                trees[i] = DraftTree([r.out_ids[-1]], [-1])
            else:
                r.seq.tokens = r.prompt_ids + r.out_ids
                groups.setdefault(r.drafter, []).append(i)
        for name, idx in groups.items():
            budgets = [self.lengths.budget(name, reqs[i].seq.state, len(reqs),
                                           reqs[i].max_new - len(reqs[i].out_ids)) for i in idx]
            t0 = time.perf_counter()
            got = self.drafters[name].propose([reqs[i].seq for i in idx], budgets)
            n = 0
            for i, b, t in zip(idx, budgets, got):
                if len(t) > b + 1 or t.tokens[0] != reqs[i].out_ids[-1]:
                    raise RuntimeError(f"drafter {name!r} returned a tree of {len(t)} nodes "
                                       f"for budget {b}, or with the wrong root")
                trees[i] = t
                n += len(t) - 1
            self.lengths.observe_draft(name, n, time.perf_counter() - t0)
        return trees  # type: ignore[return-value]

    @torch.inference_mode()
    def _step(self, reqs: list[_Request]) -> list[list[int]]:
        """One target forward over every request's draft tree (plain decode = root only),
        lossless verification, KV compaction; returns the tokens each request emits."""
        dev, B = self.device, len(reqs)
        trees = self._propose(reqs)
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
        prefix = torch.tensor([self.cache.length(r.seq_id) for r in reqs])
        tree_mask = None
        if T > 1 and any(t.parents != list(range(-1, len(t) - 1)) for t in trees):
            tree_mask = ops.build_tree_mask(parents, tl).to(dev)
        bt = self.cache.block_table([r.seq_id for r in reqs])
        t0 = time.perf_counter()
        h = self.model(tokens.to(dev), (prefix[:, None] + depth).to(dev), self.cache.kv, bt,
                       prefix.to(dev), tree_mask, tl.to(dev) if T > 1 else None, norm=False)
        # logits of the valid nodes only (padding rows of a ragged batch stay 0)
        valid = (torch.arange(T)[None, :] < tl[:, None]).to(dev)
        if bool(valid.all()):
            logits = self.model.logits(self.model.final_norm(h))        # [B, T, V] fp32
        else:
            logits = torch.zeros(B, T, self.model.args.vocab_size, device=dev)
            logits[valid] = self.model.logits(self.model.final_norm(h[valid]))
        path, plen, nxt = self._verify(reqs, trees, logits, tokens, parents, tl)
        self.lengths.observe_forward(int(B * T), time.perf_counter() - t0)
        # move accepted K/V into place (every layer in one call: layers stacked as blocks)
        moved = [i for i in range(B) if path[i][:plen[i]] != list(range(plen[i]))]
        if moved:
            L, NB = self.cache.kv.shape[:2]
            kv = self.cache.kv.view(L * NB, *self.cache.kv.shape[2:])
            sel = torch.tensor(moved)
            bts = torch.cat([bt[sel.to(dev)] + l * NB for l in range(L)])
            P = max(plen[i] for i in moved)
            pth = torch.tensor([path[i][:P] for i in moved])  # rows are T wide, -1 padded
            ops.commit_kv(kv, bts, prefix[sel].repeat(L).to(dev), pth.repeat(L, 1).to(dev),
                          torch.tensor([plen[i] for i in moved]).repeat(L).to(dev))
        news = []
        for i, r in enumerate(reqs):
            pth = path[i][:plen[i]]
            self.cache.set_length(r.seq_id, int(prefix[i]) + plen[i])
            new = [trees[i].tokens[j] for j in pth[1:]] + [nxt[i]]
            r.steps += 1
            if r.drafter is not None:
                dmax = int(depth[i].max())
                r.drafted += len(trees[i]) - 1
                r.accepted += plen[i] - 1
                self.lengths.observe_accept(r.drafter, r.seq.state, plen[i] - 1, dmax)
                r.seq.tokens = r.prompt_ids + r.out_ids + new
                n = len(trees[i])
                self.drafters[r.drafter].update(r.seq, Verified(
                    trees[i], pth, new, logits[i, :n], h[i, :n]))
            news.append(new)
        return news

    def _verify(self, reqs, trees, logits, tokens, parents, tl):
        """verify_tree per group of rows sharing a mode; python lists out."""
        B, T, _ = logits.shape
        path = [[0]] * B
        plen = [1] * B
        nxt = [0] * B
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(reqs):
            key = ("greedy",) if r.params.greedy else ("sample", trees[i].probs is not None)
            groups.setdefault(key, []).append(i)
        for key, idx in groups.items():
            sel = torch.tensor(idx)
            dev = logits.device
            if key[0] == "greedy":
                p, n, x = ops.verify_tree(logits[sel.to(dev)], tokens[sel].to(dev),
                                          parents[sel].to(dev), tl[sel].to(dev), greedy=True)
            else:
                probs = torch.stack([logits_to_probs(logits[i], reqs[i].params.temperature,
                                                     reqs[i].params.top_k, reqs[i].params.top_p)
                                     for i in idx])
                dprobs = None
                if key[1]:
                    dprobs = torch.zeros_like(probs)
                    for j, i in enumerate(idx):
                        dprobs[j, :len(trees[i])] = trees[i].probs.to(probs)
                u = torch.stack([torch.rand(T, generator=reqs[i].generator, device=dev)
                                 for i in idx])
                p, n, x = ops.verify_tree(probs, tokens[sel].to(dev), parents[sel].to(dev),
                                          tl[sel].to(dev), dprobs, uniforms=u)
            p, n, x = p.tolist(), n.tolist(), x.tolist()
            for j, i in enumerate(idx):
                path[i], plen[i], nxt[i] = p[j], n[j], x[j]
        return path, plen, nxt

    def _sample(self, reqs: list[_Request], logits: torch.Tensor) -> list[int]:
        """First token after prefill, from ``logits`` ``[B, V]``."""
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
                    r.emitted += 1
                    break
                kept.append(t)
                if len(r.out_ids) + len(kept) >= r.max_new:
                    r.finish_reason = "length"
                    break
            r.out_ids.extend(kept)
            r.emitted += len(kept)
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
                out = self._output(r)
                if self.record:
                    self._record(r, out)
                yield StreamEvent(r.index, delta, kept, True, out)
            else:
                end = max(r.text_sent, len(full) - hold)
                delta = full[r.text_sent:end]
                r.text_sent = end
                if kept:
                    yield StreamEvent(r.index, delta, kept, False)

    def _record(self, r: _Request, out: RequestOutput) -> None:
        """Append one served request to ``self.record`` (see the class docstring)."""
        key = hashlib.sha256(f"{r.prompt}\x00{out.text}".encode()).hexdigest()[:16]
        row = {"id": f"served:{key}", "task": "served", "prompt": r.prompt,
               "output": out.text, "prompt_ids": list(r.prompt_ids),
               "output_ids": out.token_ids, "finish_reason": out.finish_reason,
               "drafter": r.drafter, "cluster": r.cluster, "time": time.time()}
        try:
            with open(self.record, "a", encoding="utf-8") as f:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        except OSError as e:
            if not self._record_warned:
                warnings.warn(f"specrt: cannot record served requests to {self.record}: {e}")
                self._record_warned = True

    def _output(self, r: _Request) -> RequestOutput:
        el = max(r.t_end - r.t_start, 1e-9)
        n = len(r.out_ids)
        stats = {
            "drafter": r.drafter, "cluster": r.cluster,
            "route_confidence": r.route_confidence, "steps": r.steps, "drafted_tokens": r.drafted,
            "accepted_tokens": r.accepted,
            "acceptance_rate": r.accepted / r.drafted if r.drafted else 0.0,
            "mean_accepted_length": r.emitted / r.steps if r.steps else 0.0,
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
