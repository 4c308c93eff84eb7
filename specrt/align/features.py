"""Router features and target hidden states, computed offline exactly as online.

Online (the engine's prefill) the router sees, per request, the mean over the prompt of
the target's final-normed last-layer states: ``final_norm(h[:P]).mean(0)`` where ``h``
are the pre-norm states of the prompt's (chat-templated) tokens. :func:`prompt_features`
runs the same model call (:func:`specrt.model.prefill.ragged_prefill`) and the same
reduction (:func:`specrt.model.prefill.mean_prompt_state`), so routing features of a
prompt are the same offline and online (bit-identical for the same batch composition;
otherwise equal within fp rounding of the batched matmuls).

Stage b of ``specrt align``, ``features``: :func:`stage_features` writes the router
features of every collected prompt to ``features.safetensors``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from specrt.cache import PagedKVCache
from specrt.cache.paged import block_table_of
from specrt.model.prefill import mean_prompt_state, ragged_prefill


@torch.inference_mode()
def target_hidden(model, token_lists: list[list[int]], *, batch_tokens: int = 8192,
                  max_batch: int = 16, block_size: int = 16, progress: bool = False,
                  reduce=None, taps: tuple[int, ...] = (),
                  shared: list[int] | None = None) -> list[torch.Tensor]:
    """Pre-norm last-layer states of the target over each token list (one causal
    prefill each, batched by similar lengths through the paged cache).

    Args:
        model: the target :class:`specrt.model.Llama`.
        token_lists: N lists of token ids (each ``1 <= len <= context``).
        batch_tokens: padded tokens per forward at most (``B * max_len``).
        reduce: optional ``f(h [T_i, hidden], i) -> tensor`` applied per sequence inside
            the batch (keeps memory small); default keeps ``h`` itself (on CPU).
        taps: ascending layer indices: ``h`` is then ``[T_i, len(taps), hidden]``, those
            layers' output states (pre-norm) instead of the last layer's.
        shared: optional, per list, the length of a head (a prompt) that other lists
            may start with too (sampled outputs of one prompt). Lists whose heads are
            equal run that head once, to its last whole cache block, and their tails
            over it as a cached prefix (:func:`_shared_prefix_states`): the same states
            within the kernels' rounding, at the cost of one head instead of one each.

    Returns: N tensors, ``[T_i, hidden]`` (model dtype, CPU) or ``reduce``'s result.
    """
    dev = next(model.parameters()).device
    a = model.args
    N = len(token_lists)
    for i, t in enumerate(token_lists):
        if not 1 <= len(t) <= a.max_position_embeddings:
            raise ValueError(f"sequence {i} has {len(t)} tokens (need 1..{a.max_position_embeddings})")
    out: list = [None] * N
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=N, desc="target states", unit="seq")
    todo = list(range(N))
    if shared is not None:
        if len(shared) != N:
            raise ValueError(f"shared: {len(shared)} head lengths for {N} token lists")
        groups: dict[tuple, list[int]] = {}
        for i in todo:
            F = min(shared[i], len(token_lists[i]) - 1) // block_size * block_size
            if F > 0:
                groups.setdefault(tuple(token_lists[i][:F]), []).append(i)
        groups = {h: g for h, g in groups.items() if len(g) > 1}
        if groups:
            _shared_prefix_states(model, token_lists, list(groups.items()), out,
                                  batch_tokens=batch_tokens, max_batch=max_batch,
                                  block_size=block_size, taps=taps, reduce=reduce, bar=bar)
            done = {i for g in groups.values() for i in g}
            todo = [i for i in todo if i not in done]
    batches = _by_length(todo, lambda i: len(token_lists[i]), batch_tokens, max_batch)
    # one scratch cache for every batch, zeroed once, not once per batch
    need = max((sum(-(-len(token_lists[i]) // block_size) for i in idx) for idx in batches),
               default=0)
    cache = PagedKVCache(a.num_hidden_layers, max(need, 1), block_size,
                         a.num_key_value_heads, a.head_dim, dtype=model.embed.weight.dtype,
                         device=dev)
    for idx in batches:
        lens = [len(token_lists[i]) for i in idx]
        h = _prefill_states(model, [token_lists[i] for i in idx], cache, taps)
        for j, i in enumerate(idx):
            hi = h[j, :lens[j]]
            out[i] = reduce(hi, i) if reduce is not None else hi.detach().cpu().clone()
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    return out


def _shared_prefix_states(model, token_lists: list[list[int]], groups: list, out: list, *,
                          batch_tokens: int, max_batch: int, block_size: int,
                          taps: tuple[int, ...], reduce, bar) -> None:
    """:func:`target_hidden` for ``groups`` ``[(head, [i, ...]), ...]``: lists ``i`` that
    start with the same ``head`` (a whole number of cache blocks, shorter than each list).
    A few groups at a time: their heads run as one ragged prefill; then their lists'
    tails, batched, run over the head's blocks as a cached prefix (every tail's block
    table starts with its head's blocks, read only; the tail writes its own blocks).
    Fills ``out[i]`` (``reduce``-d as in :func:`target_hidden`)."""
    a = model.args
    dev = next(model.parameters()).device
    per_tok = lambda n: -(-n // block_size)  # noqa: E731
    chunks, cur, cur_tok = [], [], 0     # groups whose heads and tails fit one pool
    for g in groups:
        n = len(g[0]) + sum(len(token_lists[i]) - len(g[0]) for i in g[1])
        if cur and cur_tok + n > 4 * batch_tokens:
            chunks.append(cur)
            cur, cur_tok = [], 0
        cur.append(g)
        cur_tok += n
    if cur:
        chunks.append(cur)
    need = max(sum(per_tok(len(h)) + sum(per_tok(len(token_lists[i]) - len(h)) + 1
                                         for i in g) for h, g in c) for c in chunks)
    cache = PagedKVCache(a.num_hidden_layers, need, block_size, a.num_key_value_heads,
                         a.head_dim, dtype=model.embed.weight.dtype, device=dev)
    alloc = cache.allocator
    for chunk in chunks:
        heads = [list(h) for h, _ in chunk]
        head_blocks = [alloc.allocate(per_tok(len(h))) for h in heads]
        try:
            bt = block_table_of(head_blocks, dev)
            hh = ragged_prefill(model, heads, cache.kv, bt, taps)
            hh = hh[1] if taps else hh                       # [C, Fmax, (k,) H]
            members = [(c, i) for c, (_, g) in enumerate(chunk) for i in g]
            for bat in _by_length(members, lambda m: len(token_lists[m[1]]) - len(heads[m[0]]),
                                  batch_tokens, max_batch):
                F = [len(heads[c]) for c, _ in bat]
                tails = [token_lists[i][f:] for (_, i), f in zip(bat, F)]
                own = [alloc.allocate(per_tok(f + len(t)) - f // block_size)
                       for f, t in zip(F, tails)]
                try:
                    T = max(len(t) for t in tails)
                    toks = torch.zeros(len(bat), T, dtype=torch.long)
                    for r, t in enumerate(tails):
                        toks[r, :len(t)] = torch.tensor(t)
                    F_t = torch.tensor(F)
                    bt = block_table_of([head_blocks[c] + o for (c, _), o in zip(bat, own)],
                                        dev)             # the head's blocks, then its own
                    res = model(toks.to(dev), (F_t[:, None] + torch.arange(T)).to(dev),
                                cache.kv, bt, F_t.to(dev),
                                tree_lens=torch.tensor([len(t) for t in tails], device=dev),
                                norm=False, taps=taps)
                    ht = res[1] if taps else res
                    for r, ((c, i), f, t) in enumerate(zip(bat, F, tails)):
                        h = torch.cat([hh[c, :f], ht[r, :len(t)]])
                        out[i] = reduce(h, i) if reduce is not None else h.detach().cpu().clone()
                        if bar is not None:
                            bar.update(1)
                finally:
                    for o in own:
                        alloc.free(o)
        finally:
            for b in head_blocks:
                alloc.free(b)


def _by_length(items: list, length, batch_tokens: int, max_batch: int) -> list[list]:
    """``items`` sorted by ``length(item)`` and cut into batches of at most ``max_batch``
    items and ``batch_tokens`` padded tokens (``len(batch) * longest``)."""
    batches, cur = [], []
    for it in sorted(items, key=length):
        if cur and ((len(cur) + 1) * length(it) > batch_tokens or len(cur) >= max_batch):
            batches.append(cur)
            cur = []
        cur.append(it)
    if cur:
        batches.append(cur)
    return batches


def _prefill_states(model, seqs: list[list[int]], cache: PagedKVCache,
                    taps: tuple[int, ...] = ()) -> torch.Tensor:
    """The engine's prefill call (:func:`specrt.model.prefill.ragged_prefill`) over the
    scratch paged ``cache`` (its sequences are released again; a prefill writes every
    position it reads, so what earlier batches left in the blocks is never seen).
    Returns pre-norm states ``[B, T, hidden]`` (with ``taps``: the tapped layers'
    ``[B, T, k, hidden]``)."""
    B = len(seqs)
    try:
        for b, s in enumerate(seqs):
            cache.add(b)
            cache.reserve(b, len(s))
        out = ragged_prefill(model, seqs, cache.kv, cache.block_table(list(range(B))), taps)
    finally:
        for b in range(B):
            cache.release(b)
    return out[1] if taps else out


def prompt_features(model, prompt_ids: list[list[int]], **kw) -> torch.Tensor:
    """Router features ``[N, hidden]`` (fp32, CPU) of N tokenized prompts (token ids as
    ``Tokenizer.encode_prompt`` makes them, chat template included). kw go to
    :func:`target_hidden` (batch_tokens, max_batch, progress)."""
    feats = target_hidden(model, prompt_ids,
                          reduce=lambda h, i: mean_prompt_state(model, h).float().cpu(), **kw)
    if not feats:
        return torch.zeros(0, model.args.hidden_size)
    return torch.stack(feats)


def engine_prompt_features(engine, prompts: list[str], chat: bool = True, **kw) -> torch.Tensor:
    """:func:`prompt_features` of prompt strings through ``engine``'s tokenizer.
    Returns ``[N, hidden]`` fp32 CPU."""
    ids = [engine.tokenizer.encode_prompt(p, chat=chat) for p in prompts]
    return prompt_features(engine.model, ids, block_size=engine.cache.block_size, **kw)


# ------------------------------------------------------------ stage b: features
def stage_features(ctx, recs: list[dict], by_id: dict[str, dict]) -> dict:
    """Router features of the collected prompts (full prompt text, as served) ->
    ``features.safetensors`` (``feats`` ``[N, hidden]`` fp32; ids in the metadata)."""
    from safetensors.torch import save_file

    from specrt.align.context import fit_context

    eng = ctx.engine
    lim = eng.model.args.max_position_embeddings - 1
    ids = [r["id"] for r in recs]
    toks = [fit_context(eng.tokenizer.encode_prompt(by_id[i]["prompt"]), lim) for i in ids]
    feats = prompt_features(eng.model, toks, block_size=eng.cache.block_size,
                            progress=ctx.cfg.progress)
    save_file({"feats": feats.contiguous()}, str(ctx.work / "features.safetensors"),
              metadata={"ids": json.dumps(ids), "tasks": json.dumps([r["task"] for r in recs])})
    return {"n": len(ids), "dim": int(feats.shape[1])}


def load_features(work: Path) -> tuple[torch.Tensor, list[str], list[str]]:
    """``(feats [N, H], ids, tasks)`` from ``work/features.safetensors``."""
    from safetensors import safe_open

    with safe_open(str(work / "features.safetensors"), "pt") as f:
        meta = f.metadata()
        feats = f.get_tensor("feats")
    return feats, json.loads(meta["ids"]), json.loads(meta["tasks"])
