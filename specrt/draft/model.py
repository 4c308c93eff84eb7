"""Model drafter: a small network with its own paged KV cache, the target's embedding and
LM head shared, and a reduced-vocabulary head.

The network is a :class:`~specrt.draft.net.DraftNet` of one of three architectures, each
in its own module:

* ``lm`` (:mod:`specrt.draft.lm`): a small causal LM over token embeddings;
* ``eagle`` (:mod:`specrt.draft.eagle`): an EAGLE-style head over the target's hidden
  states;
* ``eagle3`` (:mod:`specrt.draft.eagle3`): the EAGLE head over a fusion of low, middle
  and high target layers (``feature_layers``, which the engine hands it), trained with
  training-time test.

:class:`ModelDrafter` implements the :class:`~specrt.draft.base.Drafter` protocol for
both and picks the architecture from the net (:meth:`ModelDrafter.load` from the saved
config's ``"arch"``). Its KV cache holds the request's *committed* tokens only (prompt and
emitted tokens, root included). Each :meth:`ModelDrafter.propose` first runs the tokens
not yet in the drafter's cache (the previous step's accepted tokens and bonus, or the
whole prompt at the first step) as one ragged causal chunk, batched over requests, which
writes their K/V; the chunk's last position (the root) yields the first level of drafts.
Tree nodes then live in a dense per-call scratch K/V (prefix K/V gathered once per call)
and attend to the prefix plus their ancestors through an explicit mask, so nothing
speculative ever enters the paged cache. What a request keeps between steps, and what
:meth:`ModelDrafter.update` does with the accepted tokens, is the architecture's
(:class:`~specrt.draft.net.ArchDrafting`): ``lm`` appends the accepted nodes' scratch K/V
to the paged cache; ``eagle`` keeps the target's hidden states of the accepted path, and
the tokens are recomputed with them at the next call.

``DraftNet``, ``feature_norm`` and ``LORA_TARGETS`` are re-exported here for callers that
import them from this module.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from specrt.cache import PagedKVCache
from specrt.cache.paged import OutOfBlocks
from specrt.draft.base import DraftTree, SeqState, Verified
from specrt.draft.eagle import EagleNet, feature_norm
from specrt.draft.lm import LMNet
from specrt.draft.net import LORA_TARGETS, ArchDrafting, DraftNet
from specrt.model.llama import Llama

__all__ = ["ModelDrafter", "DraftNet", "EagleNet", "LMNet", "ArchDrafting", "feature_norm",
           "LORA_TARGETS"]


def _native_bf16(net: DraftNet) -> bool:
    """Whether ``net`` drafts on a CPU whose GEMM multiplies bf16 natively (AMX or
    AVX512-BF16): there bf16 weights halve the bytes a draft step streams at no cost in
    compute; on other CPUs the bf16 GEMM widens each weight first."""
    if net.embed_weight.device.type != "cpu":
        return False
    try:
        from specrt.ops.gemm import gemm_bf16_isa

        return gemm_bf16_isa() in ("amx", "avx512bf16")
    except Exception:  # noqa: BLE001  (no native library: F.linear, fp32)
        return False


class ModelDrafter:
    """A :class:`DraftNet` as a drafter: batched chains or EAGLE-2-style trees.

    Args:
        net: the network (its architecture, ``net.arch``, decides the per-request
            bookkeeping: ``self.drafting = net.drafting()``).
        name: drafter name in the engine.
        mode: ``"chain"`` (top-1, stop when the cumulative confidence falls below
            ``threshold``) or ``"tree"`` (each level: the ``topk`` most confident
            frontier nodes get ``topk`` children each; the ``topk`` best new nodes form
            the next frontier; finally the ``budget`` most confident nodes are kept).
        topk: tree branching (ignored for chains).
        max_depth: deepest draft level.
        threshold: stop drafting deeper once the best frontier confidence (product of
            draft probabilities along the path) is below this.
        cache_tokens: capacity of the drafter's own paged KV cache.
        block_size: tokens per block of that cache.
        weights: the dtype its drafting forward streams weights in on CPU
            (:meth:`DraftNet.use_weight_dtype`): ``"fp32"``, ``"bf16"``, or ``"auto"``
            (the default: bf16 where the CPU multiplies bf16 natively, AMX or
            AVX512-BF16; fp32 elsewhere). Drafts only: what is emitted is the target's.
    """

    kind = "model"

    def __init__(self, net: DraftNet, name: str = "baseline", mode: str = "chain",
                 topk: int = 4, max_depth: int = 8, threshold: float = 0.2,
                 cache_tokens: int = 32768, block_size: int = 16, weights: str = "auto"):
        if mode not in ("chain", "tree"):
            raise ValueError(f"mode must be 'chain' or 'tree', got {mode!r}")
        if weights not in ("auto", "fp32", "bf16"):
            raise ValueError(f"weights must be 'auto', 'fp32' or 'bf16', got {weights!r}")
        if topk < 1 or max_depth < 1:
            raise ValueError("need topk >= 1 and max_depth >= 1")
        self.net = net.eval()
        self._static = set(net.vocab_ids.tolist())   # the context vocabulary's complement
        if weights == "auto":
            weights = "bf16" if _native_bf16(net) else "fp32"
        net.use_weight_dtype(torch.bfloat16 if weights == "bf16" else torch.float32)
        self.weights = weights
        self.drafting: ArchDrafting = net.drafting()
        self.name, self.mode = name, mode
        self.topk = 1 if mode == "chain" else topk
        self.max_depth, self.threshold = max_depth, threshold
        #: whether the engine may cut this drafter's trees before verification: the
        #: ``lm`` architecture keys its draft-time K/V by its own node indices
        self.prunable = net.arch != "lm"
        a = net.args
        dev = net.embed_weight.device
        self.feature_layers = net.feature_layers  # eagle3: the target layers it reads
        self.cache = PagedKVCache(a.num_hidden_layers, -(-cache_tokens // block_size), block_size,
                                  a.num_key_value_heads, a.head_dim,
                                  dtype=net.embed_weight.dtype, device=dev)
        self.device = dev

    @classmethod
    def load(cls, config: str | Path, target: Llama, name: str | None = None,
             **kw) -> "ModelDrafter":
        """Load a saved drafter (``<stem>.json`` + weights) for ``target``, of the
        architecture its config names (``"arch"``; old files: ``"kind"``). kw go to the
        constructor; ``name`` defaults to the file stem."""
        net = DraftNet.load(config, target)
        if net.lora:  # serve merged: no adapter matmuls per step
            net.merge_lora()
        return cls(net, name=name or Path(config).stem, **kw)

    @classmethod
    def from_config(cls, config: str | Path, target: Llama, **kw) -> "ModelDrafter":
        """Load a shipped drafter with the runtime settings recorded in its config
        (``"runtime"``: :data:`specrt.draft.registry.RUNTIME_KEYS` and ``name``); kw
        override them."""
        from specrt.draft.registry import RUNTIME_KEYS

        cfg = json.loads(Path(config).read_text())
        opts = {k: v for k, v in cfg.get("runtime", {}).items()
                if k in RUNTIME_KEYS or k == "name"}
        opts.update(kw)
        return cls.load(config, target, **opts)

    # ------------------------------------------------------------ protocol
    def begin(self, seq: SeqState, prompt_hidden: torch.Tensor | None) -> None:
        """Register the request (the prompt itself is run through the drafter, batched,
        at the first :meth:`propose`); the architecture keeps what it needs, e.g. eagle
        the target's prompt states ``prompt_hidden`` ``[P, hidden]``."""
        self.cache.add(seq.seq_id)
        seq.state["dlen"] = 0
        self.drafting.begin(seq.state, prompt_hidden)

    def release(self, seq: SeqState) -> None:
        """Drop the request's cache blocks and state."""
        self.cache.release(seq.seq_id)
        for k in ("dlen", "vocab_ctx", *self.drafting.state_keys):
            seq.state.pop(k, None)

    def update(self, seq: SeqState, result: Verified) -> None:
        """Keep the drafter's cache in step with the accepted tokens, as the
        architecture does it (:meth:`ArchDrafting.update`): ``lm`` appends the K/V of
        the accepted nodes forwarded while drafting from the scratch (same tokens, same
        positions: equal to recomputing); ``eagle`` keeps the target's hidden states of
        the path nodes as the predecessor states of the new tokens, which the next
        :meth:`propose` runs.
        """
        self.drafting.update(self, seq, result)

    @torch.inference_mode()
    def propose(self, seqs: list[SeqState], budgets: list[int]) -> list[DraftTree]:
        """Draft a chain or tree per request (see the class docstring), batched."""
        out: list[DraftTree | None] = [None] * len(seqs)
        act = [i for i, b in enumerate(budgets) if b > 0]
        for i, b in enumerate(budgets):
            if b <= 0:
                out[i] = DraftTree([seqs[i].tokens[-1]], [-1])
        if not act:
            return out  # type: ignore[return-value]
        S = [seqs[i] for i in act]
        try:
            x_root = self._catch_up(S)                           # [B, hidden]
        except OutOfBlocks:  # drafter cache full: decode plainly, stay consistent
            for i in act:
                self.drafting.keep_tree(seqs[i].state, None, None)
                out[i] = DraftTree([seqs[i].tokens[-1]], [-1])
            return out  # type: ignore[return-value]
        trees = self._expand(S, [budgets[i] for i in act], x_root)
        for i, t in zip(act, trees):
            out[i] = t
        return out  # type: ignore[return-value]

    # ------------------------------------------------------------ internals
    def _catch_up(self, S: list[SeqState]) -> torch.Tensor:
        """Run every request's tokens not yet in the drafter cache (root included) as one
        ragged causal chunk; return the root's output state ``[B, hidden]``."""
        net, dev = self.net, self.device
        B = len(S)
        starts = [s.state["dlen"] for s in S]
        lens = [len(s.tokens) - d for s, d in zip(S, starts)]
        T = max(lens)
        toks = torch.zeros(B, T, dtype=torch.long)
        pos = torch.zeros(B, T, dtype=torch.long)
        for b, (s, d, n) in enumerate(zip(S, starts, lens)):
            toks[b, :n] = torch.tensor(s.tokens[d:])
            pos[b, :n] = torch.arange(d, d + n)
            self.cache.reserve(s.seq_id, d + n)
        prev = self.drafting.chunk_prev([s.state for s in S], lens, T)  # eagle: [B, T, H]
        x = net.embed_input(toks.to(dev), prev)
        bt = self.cache.block_table([s.seq_id for s in S])
        h = net.cache_forward(x, pos.to(dev), self.cache.kv, bt,
                              torch.tensor(starts, device=dev),
                              torch.tensor(lens, device=dev))
        for s, d, n in zip(S, starts, lens):
            s.state["dlen"] = d + n
            self.cache.set_length(s.seq_id, d + n)
            self.drafting.consumed(s.state, n)
        return h[torch.arange(B, device=dev), torch.tensor(lens, device=dev) - 1]

    def _context(self, S: list[SeqState]):
        """The context vocabulary of each request (``net.context_vocab``; see
        :mod:`specrt.draft.net`): its tokens so far outside the reduced vocabulary, kept
        in ``state["vocab_ctx"]`` and extended by the tokens committed since the last
        call. Returns ``(ids [B, N + E], (w [B, E, hidden], allowed [B, 1, E]))``: the token
        id of each vocabulary index and :meth:`DraftNet.logits`' ``extra`` (padded to the
        longest request's ``E``), or ``(None, None)`` when no request has such a token."""
        net = self.net
        rows = []
        for s in S:
            c = s.state.get("vocab_ctx")
            if c is None:
                c = s.state["vocab_ctx"] = {"n": 0, "seen": set(), "ids": None, "w": None,
                                            "all": net.vocab_ids}
            new = []
            for t in s.tokens[c["n"]:]:
                if t not in self._static and t not in c["seen"]:
                    c["seen"].add(t)
                    new.append(t)
            c["n"] = len(s.tokens)
            if new:  # extend the request's rows once; steps without new tokens reuse them
                ids = torch.tensor(new, device=self.device)
                w = net.head_weight[ids].float()
                c["ids"] = ids if c["ids"] is None else torch.cat([c["ids"], ids])
                c["w"] = w if c["w"] is None else torch.cat([c["w"], w])
                c["all"] = torch.cat([net.vocab_ids, c["ids"]])
            rows.append(c)
        E = max(0 if c["ids"] is None else c["ids"].numel() for c in rows)
        if E == 0:
            return None, None
        B, H = len(S), net.args.hidden_size
        if B == 1:  # the request's own tensors, no padding
            c = rows[0]
            return c["all"][None], (c["w"][None],
                                    torch.ones(1, 1, E, dtype=torch.bool, device=self.device))
        ids = torch.zeros(B, net.vocab_ids.numel() + E, dtype=torch.long, device=self.device)
        w = torch.zeros(B, E, H, device=self.device)
        allowed = torch.zeros(B, 1, E, dtype=torch.bool, device=self.device)
        for b, c in enumerate(rows):
            n = 0 if c["ids"] is None else c["ids"].numel()
            ids[b, :c["all"].numel()] = c["all"]
            if n:
                w[b, :n] = c["w"]
                allowed[b, 0, :n] = True
        return ids, (w, allowed)

    def _token_ids(self, ix: torch.Tensor, ids) -> torch.Tensor:
        """Vocabulary indices ``[B, ...]`` -> token ids (``ids``: :meth:`_context`'s table,
        None: the reduced vocabulary)."""
        if ids is None:
            return self.net.vocab_ids[ix]
        return ids.gather(1, ix.flatten(1)).view_as(ix)

    def _gather_prefix(self, S: list[SeqState]):
        """Committed K/V of the batch, padded: per layer ``[B, Lp, H_kv, D]`` and the
        ``[B, Lp]`` validity mask."""
        lens = [self.cache.length(s.seq_id) for s in S]
        Lp = max(lens)
        bs = self.cache.block_size
        bt = self.cache.block_table([s.seq_id for s in S]).long()
        pos = torch.arange(Lp, device=self.device)
        slot = (pos // bs).clamp(max=bt.shape[1] - 1)
        blocks = bt[:, slot]                                              # [B, Lp]
        ok = pos[None, :] < torch.tensor(lens, device=self.device)[:, None]
        ks, vs = [], []
        for li in range(self.cache.num_layers):
            kv = self.cache.kv[li][blocks, :, pos % bs]                   # [B, Lp, 2, H, D]
            ks.append(kv[:, :, 0])
            vs.append(kv[:, :, 1])
        return ks, vs, ok

    def _expand(self, S: list[SeqState], budgets: list[int],
                x_root: torch.Tensor) -> list[DraftTree]:
        """Grow the trees level by level from the roots' states (see the class doc)."""
        net, dev, k = self.net, self.device, self.topk
        B = len(S)
        depth_cap = [min(self.max_depth, b) for b in budgets]
        # candidate nodes per request: (token, parent_cand (-1 = root), conf, depth, col)
        cands: list[list[list]] = [[] for _ in range(B)]
        ids, extra = self._context(S) if net.context_vocab else (None, None)
        probs = torch.softmax(net.logits(x_root[:, None], extra)[:, 0], -1)  # [B, N]
        p, ix = probs.topk(min(k, probs.shape[-1]), dim=-1)
        tok = self._token_ids(ix, ids).tolist()
        p = p.tolist()
        frontier: list[list[int]] = []
        for b in range(B):
            for j in range(len(tok[b])):
                cands[b].append([tok[b][j], -1, p[b][j], 1, None])
            frontier.append(list(range(len(cands[b]))))
        # the drafter's output state at each forwarded node: the root's for level 1
        node_state: dict[tuple[int, int], torch.Tensor] = {}
        scratch = [[None, None] for _ in range(len(net.layers))]
        anc: list[list[torch.Tensor]] = [[] for _ in range(B)]   # per forwarded column
        col_owner: list[list[int]] = [[] for _ in range(B)]      # column -> cand index
        ncols = 0
        prefix = None
        seq_len = [len(s.tokens) for s in S]
        depth = 1
        while True:
            # which frontier nodes get forwarded (expanded) at this level
            sel = []
            for b in range(B):
                f = [c for c in frontier[b] if cands[b][c][3] < depth_cap[b]]
                if not f or max(cands[b][c][2] for c in f) < self.threshold:
                    f = []
                sel.append(sorted(f, key=lambda c: -cands[b][c][2])[:k])
            N = max(len(f) for f in sel)
            if N == 0:
                break
            if prefix is None:
                prefix = self._gather_prefix(S)
            toks = torch.zeros(B, N, dtype=torch.long)
            pos = torch.zeros(B, N, dtype=torch.long)
            parent_states: list[list[torch.Tensor]] = [[] for _ in range(B)]
            vis = torch.zeros(B, N, ncols + N, dtype=torch.bool, device=dev)
            for b in range(B):
                for j, c in enumerate(sel[b]):
                    tk, par, _, d, _ = cands[b][c]
                    toks[b, j] = tk
                    pos[b, j] = seq_len[b] - 1 + d
                    parent_states[b].append(x_root[b] if par < 0 else node_state[(b, par)])
                    row = torch.zeros(ncols + N, dtype=torch.bool, device=dev)
                    if par >= 0:
                        pc = cands[b][par][4]
                        row[:ncols] = anc[b][pc]
                    row[ncols + j] = True
                    vis[b, j] = row
                for j in range(N):  # padding columns keep a self edge (no NaN rows)
                    if j >= len(sel[b]):
                        vis[b, j, ncols + j] = True
            for b in range(B):
                for a_ in range(len(anc[b])):
                    anc[b][a_] = torch.cat([anc[b][a_], torch.zeros(N, dtype=torch.bool,
                                                                    device=dev)])
                for j in range(N):
                    anc[b].append(vis[b, j].clone())
                    c = sel[b][j] if j < len(sel[b]) else None
                    col_owner[b].append(-1 if c is None else c)
                    if c is not None:
                        cands[b][c][4] = ncols + j
            prev = self.drafting.tree_prev(parent_states, N, x_root)  # eagle: [B, N, H]
            x = net.embed_input(toks.to(dev), prev)
            y = net.tree_forward(x, pos.to(dev), prefix[0], prefix[1], prefix[2], scratch, vis)
            ncols += N
            probs = torch.softmax(net.logits(y, extra), -1)               # [B, N, V']
            p, ix = probs.topk(min(k, probs.shape[-1]), dim=-1)
            tok = self._token_ids(ix, ids).tolist()
            p = p.tolist()
            depth += 1
            new_front: list[list[int]] = []
            for b in range(B):
                nf = []
                for j, c in enumerate(sel[b]):
                    node_state[(b, c)] = y[b, j]
                    pc = cands[b][c][2]
                    for t_, q_ in zip(tok[b][j], p[b][j]):
                        cands[b].append([t_, c, pc * q_, depth, None])
                        nf.append(len(cands[b]) - 1)
                nf.sort(key=lambda c: -cands[b][c][2])
                new_front.append(nf[:k])
            frontier = new_front
        trees = []
        for b in range(B):
            # the `budget` most confident candidates (ancestors rank before descendants);
            # below-threshold ones are dropped, except the best first-level node
            order = sorted(range(len(cands[b])), key=lambda c: (-cands[b][c][2], c))
            keep = sorted(c for n_, c in enumerate(order[:budgets[b]])
                          if n_ == 0 or cands[b][c][2] >= self.threshold)
            remap = {c: i + 1 for i, c in enumerate(keep)}
            tokens, parents, conf = [S[b].tokens[-1]], [-1], [1.0]
            col = {}
            for c in keep:
                tk, par, cf, _, cl = cands[b][c]
                tokens.append(tk)
                parents.append(0 if par < 0 else remap[par])
                conf.append(cf)
                if cl is not None:
                    col[remap[c]] = cl
            trees.append(DraftTree(tokens, parents, conf=conf))
            forwarded = scratch[0][0] is not None
            self.drafting.keep_tree(S[b].state, col if forwarded else None,
                                    [(kk[b], vv[b]) for kk, vv in scratch] if forwarded else None)
        return trees
