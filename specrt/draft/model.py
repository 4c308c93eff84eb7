"""Model drafter: a small causal LM (or an EAGLE-style feature drafter) with its own
paged KV cache, the target's embedding and LM head shared, and a reduced-vocabulary head.

Two architectures share one class, :class:`DraftNet`:

* ``lm``: ``k`` Llama decoder layers over the target's token embedding, then a final
  norm and the target's LM head restricted to ``vocab_ids`` (the N most frequent
  target-output tokens). Usually initialised from the target's first ``k`` layers.
* ``eagle``: the input of position ``j`` is ``fc(concat(embed(tok_j), h_{j-1}))`` where
  ``h_{j-1}`` is the target's pre-norm last-layer state of the previous position (the
  state that predicted ``tok_j``); inside a draft tree, whose nodes have no target
  state yet, the drafter's own output state of the parent node stands in (EAGLE).

Only the drafter's own tensors (layers, norm, fc, vocab ids, LoRA adapters) are stored
on disk; the embedding and the head rows are referenced from the target at load time.

:class:`ModelDrafter` implements the :class:`~specrt.draft.base.Drafter` protocol.
Its KV cache holds the request's *committed* tokens only (prompt and emitted tokens,
root included). Each :meth:`ModelDrafter.propose` first runs the tokens not yet in the
drafter's cache (the previous step's accepted tokens and bonus, or the whole prompt at
the first step) as one ragged causal chunk, batched over requests, which writes their
K/V; the chunk's last position (the root) yields the first level of drafts. Tree
nodes then live in a dense per-call scratch K/V (prefix K/V gathered once per call)
and attend to the prefix plus their ancestors through an explicit mask, so nothing
speculative ever enters the paged cache. On :meth:`ModelDrafter.update`, for ``lm``
the scratch K/V of the accepted, already-forwarded nodes is appended to the paged
cache (they depend only on tokens and positions, so this equals recomputation); for
``eagle`` the accepted tokens are recomputed at the next call because their K/V must
use the target's hidden states (which ``update`` hands over) instead of the drafter's.
"""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from specrt import ops
from specrt.cache import PagedKVCache
from specrt.cache.paged import OutOfBlocks
from specrt.draft.base import DraftTree, SeqState, Verified
from specrt.model.llama import Layer, Llama, ModelArgs, apply_rope, rms_norm

LORA_TARGETS = ("q", "k", "v", "qkv", "o", "gate_up", "down")


class DraftNet(nn.Module):
    """The drafter's network (see the module docstring for the two ``kind`` values).

    Args:
        args: target hyper-parameters with ``num_hidden_layers`` set to the drafter's.
        kind: ``"lm"`` or ``"eagle"``.
        embed_weight: the target's embedding ``[V, hidden]`` (referenced, not copied,
            not a parameter of this module).
        head_weight: the target's LM head ``[V, hidden]``; its rows ``vocab_ids`` form
            the reduced head ``head_sub`` ``[N, hidden]``.
        vocab_ids: sorted int64 ids of the reduced output vocabulary.
    """

    def __init__(self, args: ModelArgs, kind: str, embed_weight: torch.Tensor,
                 head_weight: torch.Tensor, vocab_ids: torch.Tensor):
        super().__init__()
        if kind not in ("lm", "eagle"):
            raise ValueError(f"kind must be 'lm' or 'eagle', got {kind!r}")
        self.args, self.kind = args, kind
        self.layers = nn.ModuleList(Layer(args) for _ in range(args.num_hidden_layers))
        self.norm = nn.Parameter(torch.ones(args.hidden_size))
        self.fc = nn.Linear(2 * args.hidden_size, args.hidden_size, bias=False) \
            if kind == "eagle" else None
        vocab_ids = torch.as_tensor(vocab_ids, dtype=torch.long)
        if vocab_ids.numel() == 0 or int(vocab_ids.max()) >= args.vocab_size:
            raise ValueError("vocab_ids must be non-empty ids below the target's vocab size")
        self.register_buffer("vocab_ids", vocab_ids.clone())
        self.embed_weight = embed_weight.detach()              # shared, not saved
        self.head_sub = head_weight.detach()[vocab_ids].clone()   # derived, not saved
        self.register_buffer("inv_freq", _inv_freq(args), persistent=False)
        self.lora: dict[str, dict] = {}       # "layer.target" -> {A, B, scale}

    # ------------------------------------------------------------ building
    @classmethod
    def from_target(cls, target: Llama, kind: str = "eagle", num_layers: int = 1,
                    vocab_ids: torch.Tensor | None = None,
                    init_layers: list[int] | None = None) -> "DraftNet":
        """A drafter initialised from the target's first ``num_layers`` layers (or
        ``init_layers``) and its final norm; ``fc`` starts as ``[I | 0]`` (embedding
        passes through, the hidden-state half is learnt). ``vocab_ids`` defaults to the
        whole vocabulary."""
        a = copy.deepcopy(target.args)
        a.num_hidden_layers = num_layers
        if vocab_ids is None:
            vocab_ids = torch.arange(a.vocab_size)
        net = cls(a, kind, target.embed.weight, target.head_weight, vocab_ids)
        src = init_layers if init_layers is not None else list(range(num_layers))
        with torch.no_grad():
            for dst, s in zip(net.layers, src):
                dst.load_state_dict(target.layers[s].state_dict())
            net.norm.copy_(target.norm)
            if net.fc is not None:
                H = a.hidden_size
                net.fc.weight.zero_()
                net.fc.weight[:, :H].copy_(torch.eye(H))
        return net.to(target.embed.weight.dtype)

    def trainable_parameters(self):
        """What an optimiser should update: the drafter's own parameters that require
        grad (never the shared embedding/head) plus trainable LoRA factors."""
        return [p for p in self.parameters() if p.requires_grad] + [
            ad[x] for ad in self.lora.values() for x in ("A", "B") if ad[x].requires_grad]

    def train_lora_only(self) -> None:
        """Freeze every base parameter and make the LoRA factors trainable, so
        that :meth:`trainable_parameters` yields the adapters alone."""
        if not self.lora:
            raise ValueError("train_lora_only: no adapters (call add_lora first)")
        for p in self.parameters():
            p.requires_grad_(False)
        for ad in self.lora.values():
            for x in ("A", "B"):
                ad[x] = ad[x].detach().clone().requires_grad_(True)

    # ------------------------------------------------------------------ LoRA
    def add_lora(self, rank: int, targets: tuple[str, ...] = ("q", "v"), alpha: float | None = None,
                 init_std: float = 0.0, seed: int = 0) -> None:
        """Attach rank-``rank`` adapters ``W + (alpha/rank) B A`` to ``targets`` of every
        layer (``q``/``k``/``v`` are row slices of the fused qkv projection). ``B`` starts
        at zero unless ``init_std`` > 0 (tests use random B to check merging)."""
        g = torch.Generator().manual_seed(seed)
        alpha = float(rank if alpha is None else alpha)
        for li, layer in enumerate(self.layers):
            for t in targets:
                lin, sl = self._lora_site(layer, t)
                out_dim = sl.stop - sl.start
                A = torch.randn(rank, lin.in_features, generator=g) / math.sqrt(lin.in_features)
                B = torch.randn(out_dim, rank, generator=g) * init_std
                self.lora[f"{li}.{t}"] = {"A": A.to(lin.weight), "B": B.to(lin.weight),
                                          "scale": alpha / rank}

    def _lora_site(self, layer: Layer, t: str) -> tuple[nn.Linear, slice]:
        a = self.args
        qd, kvd = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
        if t == "q":
            return layer.qkv, slice(0, qd)
        if t == "k":
            return layer.qkv, slice(qd, qd + kvd)
        if t == "v":
            return layer.qkv, slice(qd + kvd, qd + 2 * kvd)
        if t in ("qkv", "o", "gate_up", "down"):
            lin = getattr(layer, t)
            return lin, slice(0, lin.out_features)
        raise ValueError(f"unknown LoRA target {t!r}; use {LORA_TARGETS}")

    def merge_lora(self) -> None:
        """Fold every adapter into its base weight and drop the adapters."""
        with torch.no_grad():
            for key, ad in self.lora.items():
                li, t = key.split(".")
                lin, sl = self._lora_site(self.layers[int(li)], t)
                lin.weight[sl] += ad["scale"] * (ad["B"] @ ad["A"])
        self.lora = {}

    def _linear(self, li: int, name: str, h: torch.Tensor) -> torch.Tensor:
        layer = self.layers[li]
        lin = getattr(layer, name)
        out = lin(h)
        if self.lora:
            targets = ("q", "k", "v", "qkv") if name == "qkv" else (name,)
            for t in targets:
                ad = self.lora.get(f"{li}.{t}")
                if ad is not None:
                    _, sl = self._lora_site(layer, t)
                    d = F.linear(F.linear(h, ad["A"]), ad["B"]) * ad["scale"]
                    if sl.start == 0 and sl.stop == out.shape[-1]:
                        out = out + d
                    else:
                        out = torch.cat([out[..., :sl.start], out[..., sl] + d,
                                         out[..., sl.stop:]], dim=-1)
        return out

    # --------------------------------------------------------------- pieces
    def embed_input(self, tokens: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
        """Layer input ``[B, T, hidden]``: the embedding (``lm``) or
        ``fc(concat(embed, feature_norm(prev)))`` (``eagle``; ``prev`` the previous
        position's pre-norm state, whose raw scale varies by orders of magnitude)."""
        e = F.embedding(tokens, self.embed_weight)
        if self.kind == "lm":
            return e
        if prev is None:
            prev = torch.zeros_like(e)
        return self.fc(torch.cat([e, feature_norm(prev.to(e.dtype))], dim=-1))

    def rope(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def _qkv(self, li: int, x: torch.Tensor, cos, sin):
        a = self.args
        B, T = x.shape[:2]
        qd, kvd = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
        h = rms_norm(x, self.layers[li].attn_norm, a.rms_norm_eps)
        q, k, v = self._linear(li, "qkv", h).split((qd, kvd, kvd), dim=-1)
        q = apply_rope(q.view(B, T, a.num_attention_heads, a.head_dim), cos, sin)
        k = apply_rope(k.view(B, T, a.num_key_value_heads, a.head_dim), cos, sin)
        return q, k, v.view(B, T, a.num_key_value_heads, a.head_dim)

    def _post(self, li: int, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        a = self.args
        B, T = x.shape[:2]
        x = x + self._linear(li, "o", o.reshape(B, T, -1).to(x.dtype))
        h = rms_norm(x, self.layers[li].mlp_norm, a.rms_norm_eps)
        g, u = self._linear(li, "gate_up", h).chunk(2, dim=-1)
        return x + self._linear(li, "down", F.silu(g) * u)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-norm states ``[..., hidden]`` -> fp32 logits over the reduced vocabulary."""
        return F.linear(rms_norm(x, self.norm, self.args.rms_norm_eps), self.head_sub).float()

    # ------------------------------------------------------------- forwards
    def train_forward(self, tokens: torch.Tensor, positions: torch.Tensor,
                      prev: torch.Tensor | None = None) -> torch.Tensor:
        """Dense causal forward without a cache (training, reference checks).

        Args: tokens ``[B, T]``, positions ``[B, T]``, prev ``[B, T, hidden]`` (eagle).
        Returns pre-norm output states ``[B, T, hidden]``.
        """
        x = self.embed_input(tokens, prev)
        cos, sin = self.rope(positions, x.dtype)
        a = self.args
        for li in range(len(self.layers)):
            q, k, v = self._qkv(li, x, cos, sin)
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                enable_gqa=a.num_attention_heads != a.num_key_value_heads).transpose(1, 2)
            x = self._post(li, x, o)
        return x

    def cache_forward(self, x: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor,
                      block_tables: torch.Tensor, prefix_lens: torch.Tensor,
                      lens: torch.Tensor | None) -> torch.Tensor:
        """Causal forward of a ragged chunk after each row's committed prefix, writing the
        chunk's K/V into the paged cache ``kv`` ``[layers, blocks, 2, bs, H_kv, D]``.

        ``x`` is the layer input ``[B, T, hidden]`` (:meth:`embed_input`); rows are valid
        up to ``lens``. Returns pre-norm states ``[B, T, hidden]``.
        """
        cos, sin = self.rope(positions, x.dtype)
        for li in range(len(self.layers)):
            q, k, v = self._qkv(li, x, cos, sin)
            ops.append_kv(kv[li], block_tables, prefix_lens, k.to(kv.dtype).contiguous(),
                          v.to(kv.dtype).contiguous(), lens)
            o = ops.tree_attention(q.to(kv.dtype), kv[li], block_tables, prefix_lens, None, lens)
            x = self._post(li, x, o)
        return x

    def tree_forward(self, x: torch.Tensor, positions: torch.Tensor, prefix_k: list,
                     prefix_v: list, prefix_ok: torch.Tensor, scratch: list,
                     vis: torch.Tensor) -> torch.Tensor:
        """Forward of new tree nodes against the prefix and earlier tree nodes.

        Args:
            x: layer input ``[B, N, hidden]`` of the new nodes (padding rows allowed).
            positions: ``[B, N]``.
            prefix_k, prefix_v: per layer ``[B, Lp, H_kv, D]`` committed K/V (gathered).
            prefix_ok: ``[B, Lp]`` bool, valid prefix columns.
            scratch: per layer ``[K, V]`` of earlier nodes ``[B, S, H_kv, D]`` (appended
                to in place with the new nodes' K/V: columns ``S .. S+N-1``).
            vis: ``[B, N, S + N]`` bool: which tree columns each new node sees (its
                forwarded ancestors and itself).

        Returns pre-norm states ``[B, N, hidden]``.
        """
        a = self.args
        B, N = x.shape[:2]
        cos, sin = self.rope(positions, x.dtype)
        mask = torch.cat([prefix_ok[:, None, :].expand(B, N, -1), vis], dim=-1)[:, None]
        for li in range(len(self.layers)):
            q, k, v = self._qkv(li, x, cos, sin)
            sk, sv = scratch[li]
            sk = k if sk is None else torch.cat([sk, k], dim=1)
            sv = v if sv is None else torch.cat([sv, v], dim=1)
            scratch[li] = [sk, sv]
            kk = torch.cat([prefix_k[li], sk], dim=1).transpose(1, 2)
            vv = torch.cat([prefix_v[li], sv], dim=1).transpose(1, 2)
            o = F.scaled_dot_product_attention(
                q.transpose(1, 2), kk.to(q.dtype), vv.to(q.dtype), attn_mask=mask,
                enable_gqa=a.num_attention_heads != a.num_key_value_heads).transpose(1, 2)
            x = self._post(li, x, o)
        return x

    # ------------------------------------------------------------ save/load
    def export_hf(self, out_dir: str | Path, target_dir: str | Path) -> Path:
        """Write an ``lm`` drafter as an HF ``LlamaForCausalLM`` directory (its layers,
        norm, the target's embedding and full tied head, the target's tokenizer), e.g.
        for HF assisted generation. LoRA adapters are merged into the copy."""
        import shutil

        from safetensors.torch import save_file

        if self.kind != "lm":
            raise ValueError("only 'lm' drafters have an HF form (eagle reads target states)")
        net = copy.deepcopy(self)
        if net.lora:
            net.merge_lora()
        a, out, td = net.args, Path(out_dir), Path(target_dir)
        out.mkdir(parents=True, exist_ok=True)
        cfg = json.loads((td / "config.json").read_text())
        cfg.update(num_hidden_layers=a.num_hidden_layers, tie_word_embeddings=True)
        (out / "config.json").write_text(json.dumps(cfg, indent=1))
        qd, kvd = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
        sd = {"model.embed_tokens.weight": net.embed_weight, "model.norm.weight": net.norm}
        for i, L in enumerate(net.layers):
            p = f"model.layers.{i}."
            q, k, v = L.qkv.weight.split((qd, kvd, kvd))
            g, u = L.gate_up.weight.chunk(2)
            sd.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                       p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": L.o.weight,
                       p + "mlp.gate_proj.weight": g, p + "mlp.up_proj.weight": u,
                       p + "mlp.down_proj.weight": L.down.weight,
                       p + "input_layernorm.weight": L.attn_norm,
                       p + "post_attention_layernorm.weight": L.mlp_norm})
        save_file({k: t.detach().float().contiguous().cpu() for k, t in sd.items()},
                  str(out / "model.safetensors"))
        for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            if (td / f).is_file():
                shutil.copy(td / f, out / f)
        return out

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors stored on disk (no embedding, no head)."""
        sd = {k: v for k, v in self.state_dict().items()}
        for key, ad in self.lora.items():
            sd[f"lora.{key}.A"] = ad["A"].detach()
            sd[f"lora.{key}.B"] = ad["B"].detach()
        return sd

    def save(self, weights: str | Path, config: str | Path, meta: dict | None = None,
             dtype: torch.dtype = torch.float16, base: str | Path | None = None) -> None:
        """Write ``weights`` (safetensors; float tensors in ``dtype``) and ``config``
        (JSON: kind, arch, layers, reduced vocab size, target shape, LoRA, ``meta``).

        With ``base`` (the config of the drafter the adapters were trained on, whose
        base weights this net must still hold unmerged), only the LoRA factors are
        written and the config records ``"base"``: the path of ``base`` relative to
        ``config``'s folder when it lies beneath it, else absolute. :meth:`load` then
        loads the base and attaches the adapters: a per-task drafter costs kilobytes."""
        from safetensors.torch import save_file

        tens = self.state_tensors()
        if base is not None:
            if not self.lora:
                raise ValueError("save(base=...): this net has no LoRA adapters")
            tens = {k: v for k, v in tens.items() if k.startswith("lora.")}
        sd = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous().cpu()
              for k, v in tens.items()}
        save_file(sd, str(weights))
        a = self.args
        cfg = {
            "kind": "model", "arch": self.kind, "layers": a.num_hidden_layers,
            "weights": Path(weights).name, "reduced_vocab": int(self.vocab_ids.numel()),
            "vocab_ids": "tensor 'vocab_ids' in the weights file",
            "shared_with_target": ["embedding", "lm_head"],
            "target_shape": {"hidden_size": a.hidden_size, "vocab_size": a.vocab_size,
                             "num_attention_heads": a.num_attention_heads,
                             "num_key_value_heads": a.num_key_value_heads,
                             "head_dim": a.head_dim, "intermediate_size": a.intermediate_size},
            "lora": {k: {"rank": int(ad["A"].shape[0]), "scale": ad["scale"]}
                     for k, ad in self.lora.items()},
        }
        if base is not None:
            b, folder = Path(base).resolve(), Path(config).resolve().parent
            cfg["base"] = str(b.relative_to(folder)) if b.is_relative_to(folder) else str(b)
        cfg.update(meta or {})
        Path(config).write_text(json.dumps(cfg, indent=1))

    @classmethod
    def load(cls, config: str | Path, target: Llama) -> "DraftNet":
        """Load a drafter saved by :meth:`save` against ``target`` (shape-checked)."""
        from safetensors.torch import load_file

        config = Path(config)
        cfg = json.loads(config.read_text())
        ta = target.args
        ts = cfg.get("target_shape", {})
        for k, v in ts.items():
            if getattr(ta, k) != v:
                raise ValueError(f"drafter {config} was built for {k}={v}, target has "
                                 f"{getattr(ta, k)}")
        if cfg.get("base"):  # LoRA adapters over a base drafter saved elsewhere
            bpath = config.parent / cfg["base"]
            if not bpath.is_file():
                raise FileNotFoundError(f"{config}: base drafter {bpath} not found")
            net = cls.load(bpath, target)
            if net.lora:
                raise ValueError(f"{config}: base drafter {bpath} has adapters itself")
            sd = load_file(str(config.parent / cfg["weights"]))
            dt = target.embed.weight.dtype
            for key, meta in cfg.get("lora", {}).items():
                li, t = key.split(".")
                net._lora_site(net.layers[int(li)], t)  # checks the site exists
                net.lora[key] = {"A": sd[f"lora.{key}.A"].to(dt), "B": sd[f"lora.{key}.B"].to(dt),
                                 "scale": float(meta["scale"])}
            return net
        sd = load_file(str(config.parent / cfg["weights"]))
        a = copy.deepcopy(ta)
        a.num_hidden_layers = int(cfg["layers"])
        dt = target.embed.weight.dtype
        net = cls(a, cfg["arch"], target.embed.weight, target.head_weight, sd["vocab_ids"])
        lora = {k: v for k, v in sd.items() if k.startswith("lora.")}
        base = {k: v.to(dt) if v.is_floating_point() else v for k, v in sd.items()
                if not k.startswith("lora.")}
        missing, unexpected = net.load_state_dict(base, strict=False)
        if [m for m in missing if m != "inv_freq"] or unexpected:
            raise ValueError(f"{config}: bad drafter weights (missing {missing}, "
                             f"unexpected {unexpected})")
        for key, meta in cfg.get("lora", {}).items():
            net.lora[key] = {"A": lora[f"lora.{key}.A"].to(dt), "B": lora[f"lora.{key}.B"].to(dt),
                             "scale": float(meta["scale"])}
        return net.to(dt).eval()


def feature_norm(h: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Parameter-free RMS normalisation of hidden states (eagle inputs and the
    feature-regression loss)."""
    hf = h.float()
    return (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)


def _inv_freq(args: ModelArgs) -> torch.Tensor:
    from specrt.model.llama import rope_inv_freq

    return rope_inv_freq(args)


class ModelDrafter:
    """A :class:`DraftNet` as a drafter: batched chains or EAGLE-2-style trees.

    Args:
        net: the network.
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
    """

    kind = "model"

    def __init__(self, net: DraftNet, name: str = "baseline", mode: str = "chain",
                 topk: int = 4, max_depth: int = 8, threshold: float = 0.2,
                 cache_tokens: int = 32768, block_size: int = 16):
        if mode not in ("chain", "tree"):
            raise ValueError(f"mode must be 'chain' or 'tree', got {mode!r}")
        if topk < 1 or max_depth < 1:
            raise ValueError("need topk >= 1 and max_depth >= 1")
        self.net = net.eval()
        self.name, self.mode = name, mode
        self.topk = 1 if mode == "chain" else topk
        self.max_depth, self.threshold = max_depth, threshold
        a = net.args
        dev = net.embed_weight.device
        self.cache = PagedKVCache(a.num_hidden_layers, -(-cache_tokens // block_size), block_size,
                                  a.num_key_value_heads, a.head_dim,
                                  dtype=net.embed_weight.dtype, device=dev)
        self.device = dev

    @classmethod
    def load(cls, config: str | Path, target: Llama, name: str | None = None,
             **kw) -> "ModelDrafter":
        """Load a saved drafter (``<stem>.json`` + weights) for ``target``. kw go to
        the constructor; ``name`` defaults to the file stem."""
        net = DraftNet.load(config, target)
        if net.lora:  # serve merged: no adapter matmuls per step
            net.merge_lora()
        return cls(net, name=name or Path(config).stem, **kw)

    @classmethod
    def from_config(cls, config: str | Path, target: Llama, **kw) -> "ModelDrafter":
        """Load a shipped drafter with the runtime settings recorded in its config
        (``"runtime"``: mode, topk, max_depth, threshold); kw override them."""
        cfg = json.loads(Path(config).read_text())
        opts = {k: v for k, v in cfg.get("runtime", {}).items()
                if k in ("mode", "topk", "max_depth", "threshold", "name")}
        opts.update(kw)
        return cls.load(config, target, **opts)

    # ------------------------------------------------------------ protocol
    def begin(self, seq: SeqState, prompt_hidden: torch.Tensor | None) -> None:
        """Register the request; eagle drafters keep the target's prompt states (the
        prompt itself is run through the drafter, batched, at the first :meth:`propose`)."""
        self.cache.add(seq.seq_id)
        st = seq.state
        st["dlen"] = 0
        st["scratch"] = None
        if self.net.kind == "eagle":
            if prompt_hidden is None:
                raise ValueError("an eagle drafter needs the target's prompt hidden states")
            H = self.net.args.hidden_size
            # predecessors of tokens[0:]: none for token 0, then h_0 .. h_{P-1}
            st["hprev"] = torch.cat([torch.zeros(1, H, dtype=prompt_hidden.dtype,
                                                 device=prompt_hidden.device),
                                     prompt_hidden.detach()])

    def release(self, seq: SeqState) -> None:
        """Drop the request's cache blocks and state."""
        self.cache.release(seq.seq_id)
        for k in ("dlen", "scratch", "hprev"):
            seq.state.pop(k, None)

    def update(self, seq: SeqState, result: Verified) -> None:
        """Keep the drafter's cache in step with the accepted tokens.

        ``lm``: the accepted nodes that were forwarded while drafting have their K/V
        appended from the scratch (same tokens, same positions: equal to recomputing).
        ``eagle``: the target's hidden states of the path nodes become the predecessor
        states of the new tokens, which the next :meth:`propose` runs.
        """
        st = seq.state
        scratch, st["scratch"] = st.get("scratch"), None
        if self.net.kind == "eagle":
            hp = result.target_hidden[result.path].detach().to(st["hprev"].dtype)
            st["hprev"] = torch.cat([st["hprev"], hp])
            return
        if scratch is None or len(result.path) < 2:
            return
        cols = []
        for node in result.path[1:]:
            c = scratch["col"].get(node)
            if c is None:
                break
            cols.append(c)
        if not cols:
            return
        dlen = st["dlen"]
        n = len(cols)
        try:
            self.cache.reserve(seq.seq_id, dlen + n)
        except OutOfBlocks:  # the accepted tokens stay pending and are recomputed
            return
        bt = self.cache.block_table([seq.seq_id])
        idx = torch.tensor(cols, device=self.device)
        for li, (k, v) in enumerate(scratch["kv"]):
            ops.append_kv(self.cache.kv[li], bt, torch.tensor([dlen]),
                          k[None, idx].contiguous(), v[None, idx].contiguous())
        st["dlen"] = dlen + n
        self.cache.set_length(seq.seq_id, dlen + n)

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
                seqs[i].state["scratch"] = None
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
        prev = None
        if net.kind == "eagle":
            prev = torch.zeros(B, T, net.args.hidden_size, dtype=net.embed_weight.dtype,
                               device=dev)
            for b, (s, n) in enumerate(zip(S, lens)):
                hp = s.state["hprev"]
                if hp.shape[0] != n:
                    raise RuntimeError(f"eagle drafter out of step: {hp.shape[0]} states for "
                                       f"{n} new tokens")
                prev[b, :n] = hp.to(prev)
        x = net.embed_input(toks.to(dev), prev)
        bt = self.cache.block_table([s.seq_id for s in S])
        h = net.cache_forward(x, pos.to(dev), self.cache.kv, bt,
                              torch.tensor(starts, device=dev),
                              torch.tensor(lens, device=dev))
        for s, d, n in zip(S, starts, lens):
            s.state["dlen"] = d + n
            self.cache.set_length(s.seq_id, d + n)
            if net.kind == "eagle":
                s.state["hprev"] = s.state["hprev"][n:]
        return h[torch.arange(B, device=dev), torch.tensor(lens, device=dev) - 1]

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
        probs = torch.softmax(net.logits(x_root), -1)                     # [B, N]
        p, ix = probs.topk(min(k, probs.shape[-1]), dim=-1)
        tok = net.vocab_ids[ix].tolist()
        p = p.tolist()
        frontier: list[list[int]] = []
        for b in range(B):
            for j in range(len(tok[b])):
                cands[b].append([tok[b][j], -1, p[b][j], 1, None])
            frontier.append(list(range(len(cands[b]))))
        feats = {b: x_root[b] for b in range(B)}  # parent state of level-1 nodes: root
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
            H = net.args.hidden_size
            toks = torch.zeros(B, N, dtype=torch.long)
            pos = torch.zeros(B, N, dtype=torch.long)
            prev = torch.zeros(B, N, H, dtype=x_root.dtype, device=dev) \
                if net.kind == "eagle" else None
            vis = torch.zeros(B, N, ncols + N, dtype=torch.bool, device=dev)
            for b in range(B):
                for j, c in enumerate(sel[b]):
                    tk, par, _, d, _ = cands[b][c]
                    toks[b, j] = tk
                    pos[b, j] = seq_len[b] - 1 + d
                    if prev is not None:
                        prev[b, j] = feats[b] if par < 0 else node_state[(b, par)]
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
            x = net.embed_input(toks.to(dev), prev)
            y = net.tree_forward(x, pos.to(dev), prefix[0], prefix[1], prefix[2], scratch, vis)
            ncols += N
            probs = torch.softmax(net.logits(y), -1)                      # [B, N, V']
            p, ix = probs.topk(min(k, probs.shape[-1]), dim=-1)
            tok = net.vocab_ids[ix].tolist()
            p = p.tolist()
            depth += 1
            new_front: list[list[int]] = []
            for b in range(B):
                nf = []
                for j, c in enumerate(sel[b]):
                    if net.kind == "eagle":
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
            if net.kind == "lm" and scratch[0][0] is not None:
                S[b].state["scratch"] = {
                    "col": col, "kv": [(kk[b], vv[b]) for kk, vv in scratch]}
            else:
                S[b].state["scratch"] = None
        return trees
