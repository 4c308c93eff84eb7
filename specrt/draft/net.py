"""The network of a model drafter, shared by its two architectures.

:class:`DraftNet` holds what every model drafter has: ``k`` Llama decoder layers, a
final norm, the target's embedding and LM head referenced (not copied, not saved) with
the head restricted to ``vocab_ids`` (the N most frequent target-output tokens), LoRA
adapters, three forwards (dense causal for training, a ragged chunk over the drafter's
paged KV cache, tree nodes over a dense scratch K/V) and saving/loading.

An architecture is a subclass that says what enters the first layer
(:meth:`DraftNet.embed_input`) and how a drafter keeps its per-request state between
steps (:meth:`DraftNet.drafting`, an :class:`ArchDrafting`):

* ``"lm"`` (:class:`specrt.draft.lm.LMNet`): a small causal LM over token embeddings;
* ``"eagle"`` (:class:`specrt.draft.eagle.EagleNet`): an EAGLE-style head whose input
  mixes the token embedding with the target's hidden state of the previous position;
* ``"eagle3"`` (:class:`specrt.draft.eagle3.Eagle3Net`): the same over a fusion of
  several target layers, trained with training-time test.

Context vocabulary (``context_vocab``, a saved flag): the reduced vocabulary misses the
rare tokens a request copies from its own prompt (names, numbers, code identifiers:
a quarter of the target's rag and summarization outputs lie outside the 4,096 most
frequent tokens). With the flag set, the output vocabulary at a position is the static
``vocab_ids`` plus every other token of the sequence up to that position (prompt and
output so far), scored by the target's LM head rows (:meth:`DraftNet.logits`, ``extra``);
training, evaluation and drafting all use that per-position vocabulary.

The saved config records the architecture as ``"arch"`` (``"kind"`` is the pool kind,
always ``"model"``); :meth:`DraftNet.load` builds the matching subclass.
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
from specrt.ops.gemm import PackedLinear
from specrt.model.llama import (Layer, Llama, ModelArgs, RopeTable, _mm, apply_rope, linear,
                                rms_norm, rope_inv_freq)

LORA_TARGETS = ("q", "k", "v", "qkv", "o", "gate_up", "down")
#: the logit of an extra (context-vocabulary) token a position may not draft
MASKED = -1.0e4
ARCHS = ("lm", "eagle", "eagle3")


def net_class(arch: str) -> type["DraftNet"]:
    """The :class:`DraftNet` subclass of architecture ``arch`` (one of :data:`ARCHS`)."""
    from specrt.draft.eagle import EagleNet
    from specrt.draft.eagle3 import Eagle3Net
    from specrt.draft.lm import LMNet

    classes = {LMNet.arch: LMNet, EagleNet.arch: EagleNet, Eagle3Net.arch: Eagle3Net}
    if arch not in classes:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    return classes[arch]


def saved_arch(cfg: dict, where: str | Path = "drafter config") -> str:
    """The architecture a saved drafter config names: ``"arch"``; files written before
    the field existed said ``"kind": "lm" | "eagle"`` instead."""
    arch = cfg.get("arch")
    if arch is None and cfg.get("kind") in ARCHS:
        arch = cfg["kind"]
    if arch not in ARCHS:
        raise ValueError(f"{where}: no drafter architecture ('arch' must be one of "
                         f"{ARCHS}, got {arch!r})")
    return arch


class ArchDrafting:
    """How one architecture keeps a request's state between the drafting steps of a
    :class:`specrt.draft.model.ModelDrafter` (which owns the paged cache, the batched
    catch-up chunk and the tree expansion, and calls these hooks). The base class keeps
    nothing; each method documents when it is called."""

    #: keys this architecture adds to ``SeqState.state`` (dropped on release)
    state_keys: tuple[str, ...] = ()

    def __init__(self, net: "DraftNet"):
        self.net = net

    def begin(self, st: dict, prompt_hidden: torch.Tensor | None) -> None:
        """A request starts; ``prompt_hidden`` ``[P, hidden]`` are the target's
        pre-norm last-layer states of the prompt (may be None)."""

    def chunk_prev(self, states: list[dict], lens: list[int], T: int) -> torch.Tensor | None:
        """The ``prev`` input ``[B, T, hidden]`` of :meth:`DraftNet.embed_input` for the
        catch-up chunk (row ``b`` holds ``lens[b]`` new tokens), or None."""
        return None

    def consumed(self, st: dict, n: int) -> None:
        """The catch-up chunk ran ``n`` new tokens of this request into the cache."""

    def tree_prev(self, parent_states: list[list[torch.Tensor]], N: int,
                  like: torch.Tensor) -> torch.Tensor | None:
        """The ``prev`` input ``[B, N, hidden]`` of a tree level: ``parent_states[b][j]``
        is the drafter's output state ``[hidden]`` at node ``j``'s parent (rows past
        ``len(parent_states[b])`` are padding); ``like`` gives dtype and device."""
        return None

    def keep_tree(self, st: dict, col: dict | None, kv: list | None) -> None:
        """After a tree was drafted: ``col`` maps tree node -> scratch column of the
        forwarded nodes, ``kv`` is the request's scratch K/V per layer ``(K, V)``
        ``[S, H_kv, D]``; both None when no node was forwarded (or drafting failed)."""

    def update(self, drafter, seq, result) -> None:
        """The target verified the tree: ``result`` (:class:`~specrt.draft.base.Verified`)
        holds the accepted path and the target's hidden states of the tree nodes."""


class DraftNet(nn.Module):
    """A drafter's network: the architecture-independent part (see the module docstring).

    Build one with :meth:`from_target` or :meth:`load`, or directly as a subclass.

    Args:
        args: target hyper-parameters with ``num_hidden_layers`` set to the drafter's.
        embed_weight: the target's embedding ``[V, hidden]`` (referenced, not copied,
            not a parameter of this module).
        head_weight: the target's LM head ``[V, hidden]``; its rows ``vocab_ids`` form
            the reduced head ``head_sub`` ``[N, hidden]``.
        vocab_ids: sorted int64 ids of the reduced output vocabulary.
    """

    #: the architecture, one of :data:`ARCHS` (set by the subclasses)
    arch: str = ""
    #: target layers whose states the drafter reads (``()``: the last layer's, ``[n, H]``)
    feature_layers: tuple[int, ...] = ()

    def __init__(self, args: ModelArgs, embed_weight: torch.Tensor,
                 head_weight: torch.Tensor, vocab_ids: torch.Tensor):
        super().__init__()
        if type(self) is DraftNet:
            raise TypeError("DraftNet is abstract: use DraftNet.create(arch, ...), "
                            "from_target or load")
        self.args = args
        self.layers = nn.ModuleList(Layer(args) for _ in range(args.num_hidden_layers))
        self.norm = nn.Parameter(torch.ones(args.hidden_size))
        vocab_ids = torch.as_tensor(vocab_ids, dtype=torch.long)
        if vocab_ids.numel() == 0 or int(vocab_ids.max()) >= args.vocab_size:
            raise ValueError("vocab_ids must be non-empty ids below the target's vocab size")
        self.register_buffer("vocab_ids", vocab_ids.clone())
        self.embed_weight = embed_weight.detach()              # shared, not saved
        self.head_weight = head_weight.detach()                # shared, not saved
        self.head_sub = head_weight.detach()[vocab_ids].clone()   # derived, not saved
        #: the output vocabulary also holds the sequence's own tokens (module docstring)
        self.context_vocab = False
        self._head_mm = PackedLinear()
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)
        self._rope = RopeTable()
        self.lora: dict[str, dict] = {}       # "layer.target" -> {A, B, scale}

    # ------------------------------------------------------- architecture
    def embed_input(self, tokens: torch.Tensor, prev: torch.Tensor | None = None
                    ) -> torch.Tensor:
        """Layer input ``[B, T, hidden]`` of ``tokens`` ``[B, T]``; ``prev``
        ``[B, T, hidden]`` is the previous position's pre-norm state (used by ``eagle``)."""
        raise NotImplementedError

    def drafting(self) -> ArchDrafting:
        """The per-request bookkeeping a :class:`~specrt.draft.model.ModelDrafter`
        delegates to for this architecture."""
        raise NotImplementedError

    def _init_from_target(self, target: Llama) -> None:
        """Initialise the architecture's own tensors after :meth:`from_target` copied
        the layers and the norm."""

    @classmethod
    def init_kwargs(cls, cfg: dict) -> dict:
        """Constructor arguments of the architecture read from a saved config."""
        return {}

    def config_extra(self) -> dict:
        """What the architecture adds to the saved config (read by :meth:`init_kwargs`)."""
        return {}

    @classmethod
    def target_kwargs(cls, target: Llama) -> dict:
        """Constructor arguments of a fresh net for ``target`` (:meth:`from_target`)."""
        return {}

    def export_hf(self, out_dir: str | Path, target_dir: str | Path) -> Path:
        """An HF model directory of this drafter (only ``lm`` has one)."""
        raise ValueError("only 'lm' drafters have an HF form (eagle reads target states)")

    # ------------------------------------------------------------ building
    @classmethod
    def create(cls, arch: str, args: ModelArgs, embed_weight: torch.Tensor,
               head_weight: torch.Tensor, vocab_ids: torch.Tensor, **kw) -> "DraftNet":
        """A fresh net of architecture ``arch`` (arguments as for the class; ``kw``: the
        architecture's own, e.g. eagle3's ``feature_layers``)."""
        return net_class(arch)(args, embed_weight, head_weight, vocab_ids, **kw)

    @classmethod
    def from_target(cls, target: Llama, arch: str | None = None, num_layers: int = 1,
                    vocab_ids: torch.Tensor | None = None,
                    init_layers: list[int] | None = None) -> "DraftNet":
        """A drafter initialised from the target's first ``num_layers`` layers (or
        ``init_layers``) and its final norm (eagle: ``fc`` starts as ``[I | 0]``, the
        embedding passes through, the hidden-state half is learnt). ``arch`` defaults to
        the subclass's, ``"eagle"`` on :class:`DraftNet`. ``vocab_ids`` defaults to
        the whole vocabulary."""
        arch = arch or cls.arch or "eagle"
        impl = net_class(arch)
        if not issubclass(impl, cls):
            raise ValueError(f"{cls.__name__}.from_target cannot build a {arch!r} net")
        a = copy.deepcopy(target.args)
        a.num_hidden_layers = num_layers
        if vocab_ids is None:
            vocab_ids = torch.arange(a.vocab_size)
        net = impl(a, target.embed.weight, target.head_weight, vocab_ids,
                   **impl.target_kwargs(target))
        src = init_layers if init_layers is not None else list(range(num_layers))
        with torch.no_grad():
            for dst, s in zip(net.layers, src):
                dst.load_state_dict(target.layers[s].state_dict())
            net.norm.copy_(target.norm)
            net._init_from_target(target)
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
        out = linear(h, lin)  # the skinny GEMM when drafting on CPU (F.linear in training)
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

    def use_weight_dtype(self, dtype: torch.dtype) -> "DraftNet":
        """Stream the drafting forward's weights (every linear layer and the reduced
        head) as ``dtype`` on CPU, as :meth:`specrt.model.Llama.use_weight_dtype` does
        for the target: ``torch.float32`` (the default) or ``torch.bfloat16`` (half the
        bytes, the AMX / AVX512-BF16 GEMM where the CPU has it). Drafts are proposals
        the target verifies, so this changes which tokens are drafted, never what is
        emitted. Training (autograd) always runs ``F.linear``. Returns ``self``."""
        from specrt.ops.gemm import check_weight_dtype

        check_weight_dtype(dtype)
        self._head_mm.weight_dtype = dtype
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                _mm(mod).weight_dtype = dtype
        return self

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype the drafting forward streams its weights in (:meth:`use_weight_dtype`)."""
        return self._head_mm.weight_dtype

    # --------------------------------------------------------------- pieces
    def rope(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[B, T, 1, D]`` of ``positions`` ``[B, T]`` (the target's
        :class:`~specrt.model.llama.RopeTable`: the same bits in every process)."""
        return self._rope(self.inv_freq, positions, dtype)

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

    def logits(self, x: torch.Tensor, extra: tuple | None = None) -> torch.Tensor:
        """Pre-norm states ``x`` ``[..., hidden]`` -> fp32 logits over the reduced
        vocabulary ``[..., N]``. ``extra`` (the context vocabulary): ``(w, allowed)``, the
        target LM-head rows of ``E`` extra tokens, ``[E, hidden]`` (shared by the batch)
        or ``[B, E, hidden]`` (per row), and ``[B, T or 1, E]`` bool, which of them each
        position of ``x`` ``[B, T, hidden]`` may draft; the logits are then
        ``[B, T, N + E]``, disallowed extra entries at :data:`MASKED` (a finite floor:
        softmax weight 0, no NaN in a KL)."""
        h = rms_norm(x, self.norm, self.args.rms_norm_eps)
        base = self._head_mm(h, self.head_sub).float()
        if extra is None:
            return base
        w, allowed = extra
        w = w.to(h.dtype)
        ext = (F.linear(h, w) if w.dim() == 2 else torch.matmul(h, w.transpose(1, 2))).float()
        return torch.cat([base, ext.masked_fill(~allowed, MASKED)], dim=-1)

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
        (JSON: ``kind`` ``"model"`` (the pool kind), ``arch``, layers, reduced vocab
        size, target shape, LoRA, ``meta``).

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
            "kind": "model", "arch": self.arch, "layers": a.num_hidden_layers,
            "weights": Path(weights).name, "reduced_vocab": int(self.vocab_ids.numel()),
            "vocab_ids": "tensor 'vocab_ids' in the weights file",
            "shared_with_target": ["embedding", "lm_head"],
            "target_shape": {"hidden_size": a.hidden_size, "vocab_size": a.vocab_size,
                             "num_attention_heads": a.num_attention_heads,
                             "num_key_value_heads": a.num_key_value_heads,
                             "head_dim": a.head_dim, "intermediate_size": a.intermediate_size},
            "lora": {k: {"rank": int(ad["A"].shape[0]), "scale": ad["scale"]}
                     for k, ad in self.lora.items()},
            **self.config_extra(),
        }
        if self.context_vocab:
            cfg["context_vocab"] = True
        if base is not None:
            b, folder = Path(base).resolve(), Path(config).resolve().parent
            cfg["base"] = str(b.relative_to(folder)) if b.is_relative_to(folder) else str(b)
        cfg.update(meta or {})
        Path(config).write_text(json.dumps(cfg, indent=1))

    @classmethod
    def load(cls, config: str | Path, target: Llama) -> "DraftNet":
        """Load a drafter saved by :meth:`save` against ``target`` (shape-checked), as
        the subclass of the architecture its config names (see :func:`saved_arch`)."""
        config = Path(config)
        if not config.is_file():
            raise FileNotFoundError(f"drafter config not found: {config}")
        try:
            cfg = json.loads(config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{config}: not a drafter config (not JSON: {e})") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"{config}: not a drafter config (a JSON object is needed)")
        ta = target.args
        ts = cfg.get("target_shape", {})
        for k, v in ts.items():
            if getattr(ta, k) != v:
                raise ValueError(f"drafter {config} was built for {k}={v}, target has "
                                 f"{getattr(ta, k)}")
        dt = target.embed.weight.dtype
        if cfg.get("base"):  # LoRA adapters over a base drafter saved elsewhere
            bpath = config.parent / cfg["base"]
            if not bpath.is_file():
                raise FileNotFoundError(f"{config}: base drafter {bpath} not found")
            net = cls.load(bpath, target)
            if net.lora:
                raise ValueError(f"{config}: base drafter {bpath} has adapters itself")
            own = cfg.get("arch") or cfg.get("kind")
            if own in ARCHS and own != net.arch:
                raise ValueError(f"{config}: {own} adapters over the {net.arch} base "
                                 f"drafter {bpath}")
            sd = _load_weights(config, cfg)
            net.context_vocab = net.context_vocab or bool(cfg.get("context_vocab", False))
            for key, meta in cfg.get("lora", {}).items():
                li, t = key.split(".")
                net._lora_site(net.layers[int(li)], t)  # checks the site exists
                net.lora[key] = {"A": sd[f"lora.{key}.A"].to(dt), "B": sd[f"lora.{key}.B"].to(dt),
                                 "scale": float(meta["scale"])}
            return net
        sd = _load_weights(config, cfg)
        a = copy.deepcopy(ta)
        a.num_hidden_layers = int(cfg["layers"])
        impl = net_class(saved_arch(cfg, config))
        if not issubclass(impl, cls):
            raise ValueError(f"{config}: a {impl.arch} drafter, not a {cls.__name__}")
        net = impl(a, target.embed.weight, target.head_weight, sd["vocab_ids"],
                   **impl.init_kwargs(cfg))
        net.context_vocab = bool(cfg.get("context_vocab", False))
        if net.feature_layers and max(net.feature_layers) >= ta.num_hidden_layers:
            raise ValueError(f"{config}: reads target layers {list(net.feature_layers)}, "
                             f"the target has {ta.num_hidden_layers}")
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


def _load_weights(config: Path, cfg: dict) -> dict[str, torch.Tensor]:
    """The tensors of a drafter config's weights file; ``FileNotFoundError`` /
    ``ValueError`` naming the file when it is missing, truncated or not safetensors."""
    from safetensors.torch import load_file

    if not isinstance(cfg.get("weights"), str):
        raise ValueError(f"{config}: field 'weights' must name the weights file")
    path = config.parent / cfg["weights"]
    if not path.is_file():
        raise FileNotFoundError(f"{config}: drafter weights not found: {path}")
    try:
        sd = load_file(str(path))
    except Exception as e:  # noqa: BLE001 -- SafetensorError, OSError, ...
        raise ValueError(f"{path}: unreadable drafter weights, truncated or not "
                         f"safetensors ({type(e).__name__}: {e})") from None
    if "vocab_ids" not in sd and not cfg.get("base"):
        raise ValueError(f"{path}: not drafter weights (no 'vocab_ids' tensor)")
    return sd
