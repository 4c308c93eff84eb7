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
from specrt.model.prefill import mean_prompt_state, ragged_prefill


@torch.inference_mode()
def target_hidden(model, token_lists: list[list[int]], *, batch_tokens: int = 8192,
                  max_batch: int = 16, block_size: int = 16, progress: bool = False,
                  reduce=None, taps: tuple[int, ...] = ()) -> list[torch.Tensor]:
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

    Returns: N tensors, ``[T_i, hidden]`` (model dtype, CPU) or ``reduce``'s result.
    """
    dev = next(model.parameters()).device
    a = model.args
    N = len(token_lists)
    for i, t in enumerate(token_lists):
        if not 1 <= len(t) <= a.max_position_embeddings:
            raise ValueError(f"sequence {i} has {len(t)} tokens (need 1..{a.max_position_embeddings})")
    order = sorted(range(N), key=lambda i: len(token_lists[i]))
    batches, cur = [], []
    for i in order:
        L = len(token_lists[i])
        if cur and ((len(cur) + 1) * L > batch_tokens or len(cur) >= max_batch):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    out: list = [None] * N
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=N, desc="target states", unit="seq")
    for idx in batches:
        lens = [len(token_lists[i]) for i in idx]
        h = _prefill_states(model, [token_lists[i] for i in idx], block_size, dev, taps)
        for j, i in enumerate(idx):
            hi = h[j, :lens[j]]
            out[i] = reduce(hi, i) if reduce is not None else hi.detach().cpu().clone()
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    return out


def _prefill_states(model, seqs: list[list[int]], block_size: int, dev,
                    taps: tuple[int, ...] = ()) -> torch.Tensor:
    """The engine's prefill call (:func:`specrt.model.prefill.ragged_prefill`) over a
    scratch paged cache. Returns pre-norm states ``[B, T, hidden]`` (with ``taps``: the
    tapped layers' ``[B, T, k, hidden]``)."""
    a = model.args
    B, T = len(seqs), max(len(s) for s in seqs)
    cache = PagedKVCache(a.num_hidden_layers, B * -(-T // block_size), block_size,
                         a.num_key_value_heads, a.head_dim, dtype=model.embed.weight.dtype,
                         device=dev)
    for b, s in enumerate(seqs):
        cache.add(b)
        cache.reserve(b, len(s))
    out = ragged_prefill(model, seqs, cache.kv, cache.block_table(list(range(B))), taps)
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
