"""Llama-family decoder (Llama 2/3, SmolLM, Mistral, Qwen2) over specrt's paged KV cache.

One forward serves prefill, plain decode, chain and tree verification: the new
tokens' K/V are appended to the paged cache after each sequence's committed prefix
and attention goes through one :func:`specrt.ops.plan_tree_attention` plan per forward,
run per layer (``tree_mask=None`` is causal). Position ids are explicit, so tree nodes
get ``prefix_len + depth``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from specrt import ops
from specrt.ops import gemm
from specrt.ops._backend import native
from specrt.ops.gemm import PackedLinear


@dataclass
class ModelArgs:
    """The hyper-parameters of a Llama-family model (HF config.json names)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: q/k/v biases
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: list[int] | None = None

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        """Build from an HF ``config.json`` dict (Llama, Mistral, Qwen2, SmolLM)."""
        mt = cfg.get("model_type", "llama")
        if mt not in ("llama", "mistral", "qwen2"):
            raise ValueError(f"unsupported model_type {mt!r}: specrt runs llama, mistral, qwen2")
        heads = cfg["num_attention_heads"]
        # transformers >= 5 writes rope_parameters (with rope_theta inside); 4.x wrote
        # rope_theta + rope_scaling
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        if rope.get("rope_type", rope.get("type")) in (None, "default"):
            rope = None
        eos = cfg.get("eos_token_id")
        if isinstance(eos, int):
            eos = [eos]
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=rope,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", mt == "qwen2")),
            model_type=mt,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=eos,
        )


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies ``[head_dim/2]`` fp32, with llama3-style scaling if configured."""
    D = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    rs = args.rope_scaling or {}
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return inv
    if kind != "llama3":
        raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, llama3)")
    factor = rs["factor"]
    low, high = rs.get("low_freq_factor", 1.0), rs.get("high_freq_factor", 4.0)
    old_ctx = rs.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv
    out = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, out)


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """``layer(x)``; on CPU (fp32, up to :data:`specrt.ops.gemm.MAX_ROWS` rows) through
    the skinny GEMM (:class:`specrt.ops.gemm.PackedLinear`), which streams the weight
    once from a copy packed on first use."""
    return _mm(layer)(x, layer.weight, layer.bias)


def _mm(layer: nn.Linear) -> PackedLinear:
    """``layer``'s :class:`PackedLinear` (made on first use)."""
    mm = layer.__dict__.get("_specrt_mm")
    if mm is None:
        mm = layer.__dict__["_specrt_mm"] = PackedLinear()
    return mm


def _packed(layer: nn.Linear) -> torch.Tensor:
    """The packed copy of ``layer.weight`` that :func:`linear` uses."""
    return _mm(layer).packed(layer._parameters["weight"])


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


#: cos, sin tables ``[n, head_dim]`` fp32 per (inverse frequencies, device): the target
#: and every drafter over the same frequencies share one (each takes ~20 ms to make).
_ROPE_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def rope_rows(inv_freq: torch.Tensor, need: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[n, head_dim]`` (``n >= need``) of every position below ``n``: each
    entry is ``cos(p * inv_freq[i])`` of the fp32 product, evaluated in float64 by libm
    (Python's ``math``) and rounded once to fp32, so a position's row is the same bits in
    every process. torch's own fp32 ``cos`` is not: the same call gave other bits for some
    elements in about one process in eight on an AVX-512 Xeon (its vector path depends on
    how the buffer falls), and greedy decoding then differed from run to run wherever two
    top logits were within a few 1e-4. A table grows to the next power of two (at least
    2048) when a position needs it."""
    key = (tuple(inv_freq.tolist()), str(inv_freq.device))
    got = _ROPE_TABLES.get(key)
    if got is None or got[0].shape[0] < need:
        n = max(2048, 1 << (need - 1).bit_length())
        freqs = torch.arange(n, dtype=torch.float32)[:, None] * inv_freq.detach().float().cpu()
        vals = freqs.double().flatten().tolist()
        tabs = []
        for f in (math.cos, math.sin):
            t = torch.tensor([f(v) for v in vals], dtype=torch.float64).view(freqs.shape)
            tabs.append(torch.cat((t, t), -1).float().to(inv_freq.device))
        got = _ROPE_TABLES[key] = (tabs[0], tabs[1])
    return got


class RopeTable:
    """A model's view of :func:`rope_rows`: cos and sin of the positions of a forward,
    looked up again only when ``inv_freq`` is another tensor (a move to another device)
    or a position lies past the table."""

    def __init__(self):
        self._inv: torch.Tensor | None = None
        self._cos = self._sin = None

    def __call__(self, inv_freq: torch.Tensor, positions: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[B, T, 1, head_dim]`` in ``dtype`` of ``positions`` ``[B, T]``."""
        need = int(positions.max()) + 1 if positions.numel() else 1
        if self._inv is not inv_freq or self._cos.shape[0] < need:
            self._cos, self._sin = rope_rows(inv_freq, need)
            self._inv = inv_freq
        return (self._cos[positions][:, :, None, :].to(dtype),
                self._sin[positions][:, :, None, :].to(dtype))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x ``[..., H, D]``, cos/sin ``[..., 1, D]`` (same leading dims)."""
    h = x.shape[-1] // 2
    rot = torch.cat((-x[..., h:], x[..., :h]), dim=-1)
    return x * cos + rot * sin


class Layer(nn.Module):
    def __init__(self, a: ModelArgs):
        super().__init__()
        qd, kvd = a.num_attention_heads * a.head_dim, a.num_key_value_heads * a.head_dim
        self.qkv = nn.Linear(a.hidden_size, qd + 2 * kvd, bias=a.attention_bias)
        self.o = nn.Linear(qd, a.hidden_size, bias=False)
        self.gate_up = nn.Linear(a.hidden_size, 2 * a.intermediate_size, bias=False)
        self.down = nn.Linear(a.intermediate_size, a.hidden_size, bias=False)
        self.attn_norm = nn.Parameter(torch.ones(a.hidden_size))
        self.mlp_norm = nn.Parameter(torch.ones(a.hidden_size))


class Llama(nn.Module):
    """Decoder over a paged cache. Build with :func:`specrt.model.load_model`."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Layer(args) for _ in range(args.num_hidden_layers))
        self.norm = nn.Parameter(torch.ones(args.hidden_size))
        self.lm_head = None if args.tie_word_embeddings else nn.Linear(
            args.hidden_size, args.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)
        self._rope = RopeTable()
        self._head_mm = PackedLinear()

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype in which the CPU kernels stream the linear layers' and the LM head's
        weights (see :meth:`use_weight_dtype`); the parameters themselves keep theirs."""
        return self._head_mm.weight_dtype

    def use_weight_dtype(self, dtype: torch.dtype) -> "Llama":
        """Stream the weights of every linear layer and the LM head as ``dtype`` on CPU:
        ``torch.float32`` (the default: the same products as ``F.linear``) or
        ``torch.bfloat16`` (:func:`specrt.ops.skinny_mm_bf16`: half the bytes; on AMX
        CPUs a few dozen rows cost about one row). With bf16 the activations entering
        each product are rounded to bf16 as well and the logits differ from the fp32
        model's by that rounding (norms, the softmax, the residual stream and all sums
        stay fp32). Where the CPU has AMX (:func:`specrt.ops.amx_attention_available`)
        attention's two products take bf16 inputs too (q, K, the softmax weights, V),
        on the tile unit: at 32 tree tokens over 300 cached ones its cost falls ~2.5x.
        It is the same model at every batch size and tree width, so speculative
        decoding stays exactly as lossless relative to it. Packed copies (and with them
        the native decoder's weight table) are made again on the next forward. Returns
        ``self``."""
        from specrt.ops.gemm import check_weight_dtype

        check_weight_dtype(dtype)
        for mm in self._packed_linears():
            mm.weight_dtype = dtype
        return self

    @property
    def fp32_precision(self) -> str:
        """How fp32 weights are multiplied on CPU (see :meth:`use_fp32_precision`)."""
        return self._head_mm.fp32_precision

    def use_fp32_precision(self, precision: str) -> "Llama":
        """``"highest"`` (the default): fp32 weights are multiplied in fp32 (the same
        products as ``F.linear``); ``"high"``: as bf16x3 (:func:`specrt.ops.gemm.
        skinny_mm_bf16x3`: activations and weights each split into two bf16 parts,
        ~16 significant bits of each, sums in fp32; PyTorch's name for this precision)
        where the CPU has bf16 dot products (:func:`specrt.ops.gemm.bf16x3_fast`), fp32
        elsewhere. The same weight bytes as fp32; on AMX a tree or a batch of a few
        dozen rows then costs little more than one row. Like bf16 weights it is one
        model at every batch size and tree width (a row's bits never depend on the other
        rows), so speculation is as lossless relative to it. Applies while the weights
        are fp32 (:meth:`use_weight_dtype`). Returns ``self``."""
        from specrt.ops.gemm import check_fp32_precision

        check_fp32_precision(precision)
        for mm in self._packed_linears():
            mm.fp32_precision = precision
        return self

    def _packed_linears(self) -> list[PackedLinear]:
        """The LM head's and every linear layer's :class:`PackedLinear`."""
        return [self._head_mm] + [_mm(lin) for layer in self.layers
                                  for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)]

    @property
    def head_weight(self) -> torch.Tensor:
        """The LM head ``[V, hidden]`` (the embedding when tied)."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def rope(self, positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[B, T, 1, head_dim]`` of ``positions`` ``[B, T]`` (:class:`RopeTable`)."""
        return self._rope(self.inv_freq, positions, dtype)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor,
                block_tables: torch.Tensor, prefix_lens: torch.Tensor,
                tree_mask: torch.Tensor | None = None, tree_lens: torch.Tensor | None = None,
                *, norm: bool = True, taps: tuple[int, ...] = ()):
        """Run the decoder over new tokens, writing their K/V into the paged cache.

        Args:
            tokens: ``[B, T]`` int64 new tokens (tree nodes in node order).
            positions: ``[B, T]`` int64 RoPE positions (``prefix_len + depth``).
            kv: ``[num_layers, num_blocks, 2, block_size, H_kv, D]`` cache pools.
            block_tables: ``[B, max_blocks]`` int32.
            prefix_lens: ``[B]`` int64 committed lengths; token t's K/V goes to
                position ``prefix_lens[b] + t``.
            tree_mask: ``[B, T, T]`` bool ancestor mask, or None for causal.
            tree_lens: ``[B]`` valid tokens per row (padding beyond), or None.
            norm: keyword-only, apply the final norm.
            taps: keyword-only layer indices (0-based, ascending) whose output states
                (the residual stream after that layer, pre-norm) are returned too.

        Returns:
            ``[B, T, hidden]`` hidden states (final-normed if ``norm``); rows at or past
            ``tree_lens[b]`` are 0 (padding is not computed: the dense layers run on the
            valid rows only). With ``taps``: ``(states, tapped)``, ``tapped``
            ``[B, T, len(taps), hidden]`` (layer ``num_layers - 1`` is the pre-norm last
            state).
        """
        a = self.args
        B, T = tokens.shape
        Hq, Hkv, Dh = a.num_attention_heads, a.num_key_value_heads, a.head_dim
        qd, kvd = Hq * Dh, Hkv * Dh
        # host work shared by every layer, once; each layer then runs it on its own cache
        plan = ops.plan_tree_attention(block_tables, prefix_lens, T, kv.shape[3], tree_mask,
                                       tree_lens)
        bt, prefix, lens = plan.block_tables, plan.prefix_lens, plan.tree_lens
        # rows past tree_lens in a ragged batch are padding: the dense layers run on the
        # N valid rows only (packed); the cache and attention see the [B, T] layout
        sel = None
        if tree_lens is not None and T > 1:
            valid = torch.arange(T, device=tokens.device)[None, :] < tree_lens[:, None]
            if not bool(valid.all()):
                sel = valid.reshape(-1).nonzero().squeeze(1)                    # [N]

        def packed(t: torch.Tensor) -> torch.Tensor:      # [B, T, ...] -> [N, ...]
            t = t.reshape(B * T, *t.shape[2:])
            return t if sel is None else t[sel]

        def padded(t: torch.Tensor) -> torch.Tensor:      # [N, ...] -> [B, T, ...]
            if sel is None:
                return t.reshape(B, T, *t.shape[1:])
            out = t.new_zeros(B * T, *t.shape[1:])
            out[sel] = t
            return out.view(B, T, *t.shape[1:])

        x = self.embed(packed(tokens))                                          # [N, hidden]
        cos, sin = (packed(c) for c in self.rope(positions, x.dtype))           # [N, 1, Dh]
        tapped: list[torch.Tensor] = []
        if taps and (list(taps) != sorted(set(taps)) or not 0 <= taps[0] <= taps[-1] < len(self.layers)):
            raise ValueError(f"taps {taps} must be ascending layer indices below "
                             f"{len(self.layers)}")
        if self._fusable(x, kv, plan):
            rows = (torch.arange(B * T) if sel is None else sel).to(torch.int64)
            nt = len(taps)
            tap_out = x.new_empty((x.shape[0], nt, a.hidden_size) if nt else (0, 0, 0))
            native().decoder_layers_cpu(
                x.numpy(), self._fused_table().numpy(), Hq, Hkv, a.intermediate_size,
                cos.reshape(-1, Dh).contiguous().numpy(), sin.reshape(-1, Dh).contiguous().numpy(),
                kv.numpy(), bt.numpy(), prefix.numpy(), plan.byte_mask.numpy(), lens.numpy(),
                rows.numpy(), T, a.rms_norm_eps, 1.0 / math.sqrt(Dh),
                torch.tensor(list(taps), dtype=torch.int64).numpy(), tap_out.numpy(),
                torch.get_num_threads(), **self._fused_kw())
            out = padded(self.final_norm(x) if norm else x)
            return out if not taps else (out, padded(tap_out))
        attn_bf16 = (plan.backend == "cpu" and kv.dtype is torch.float32 and x.is_cpu
                     and x.dtype is torch.float32 and self._attn_bf16())
        for li, layer in enumerate(self.layers):
            h = rms_norm(x, layer.attn_norm, a.rms_norm_eps)
            q, k, v = linear(h, layer.qkv).split((qd, kvd, kvd), dim=-1)
            q = apply_rope(q.view(-1, Hq, Dh), cos, sin)
            k = apply_rope(k.view(-1, Hkv, Dh), cos, sin)
            ops.append_kv(kv[li], bt, prefix, padded(k.to(kv.dtype)),
                          padded(v.reshape(-1, Hkv, Dh).to(kv.dtype)), lens)
            o = packed(plan.run(padded(q.to(kv.dtype)), kv[li],                 # [N, Hq, Dh]
                                bf16=attn_bf16))
            x = x + linear(o.reshape(-1, qd).to(x.dtype), layer.o)
            h = rms_norm(x, layer.mlp_norm, a.rms_norm_eps)
            g, u = linear(h, layer.gate_up).chunk(2, dim=-1)
            x = x + linear(F.silu(g) * u, layer.down)
            if li in taps:
                tapped.append(x)
        out = padded(self.final_norm(x) if norm else x)
        if not taps:
            return out
        return out, padded(torch.stack(tapped, 1))

    def _fusable(self, x: torch.Tensor, kv: torch.Tensor, plan) -> bool:
        """Whether this forward runs as one native call (csrc/decoder_cpu.cpp): CPU fp32
        inference on the CPU attention backend with the skinny GEMM on (the op-by-op path
        below is the same arithmetic and serves every other case: autograd, other
        dtypes and devices, the ``torch`` backend)."""
        return (plan.backend == "cpu" and x.dtype is torch.float32 and kv.dtype is torch.float32
                and x.is_cpu and kv.is_contiguous() and gemm.MAX_ROWS > 0
                and not torch.is_grad_enabled()
                and self.head_weight.dtype is torch.float32)

    def _fused_kw(self) -> dict:
        # flags only when set: a build from before them (bench_native_ab's baseline) still runs
        kw = {"bf16": True} if self.weight_dtype is torch.bfloat16 else {}
        if self._head_mm.format() == "bf16x3":
            kw["x3"] = True
        if self._attn_bf16():
            kw["attn_bf16"] = True
        return kw

    def _attn_bf16(self) -> bool:
        """Whether attention takes bf16 products (AMX): with bf16 weights, where the CPU
        kernel has them (:func:`specrt.ops.amx_attention_available`)."""
        return (self.weight_dtype is torch.bfloat16
                and ops.amx_attention_available(self.args.head_dim))

    def _fused_table(self) -> torch.Tensor:
        """``[L, 7]`` int64 addresses of each layer's weights for the native decoder:
        attn_norm, packed Wqkv, qkv bias (0: none), packed Wo, mlp_norm, packed Wgu,
        packed Wd. Rebuilt when a packed copy is (a weight replaced or changed in place);
        the tensors stay alive in the layers and their :class:`PackedLinear` caches."""
        held = []
        for layer in self.layers._modules.values():   # (plain dict reads: once per forward)
            lp, mods = layer._parameters, layer._modules
            qkv = mods["qkv"]
            held += [lp["attn_norm"], _packed(qkv), qkv._parameters["bias"], _packed(mods["o"]),
                     lp["mlp_norm"], _packed(mods["gate_up"]), _packed(mods["down"])]
        cached = self.__dict__.get("_fused")
        if cached is not None and len(cached[0]) == len(held) and all(
                p is q for p, q in zip(cached[0], held)):
            return cached[1]
        packed_dtype = torch.float32 if _mm(self.layers[0].qkv).format() == "fp32" \
            else torch.bfloat16
        for j, t in enumerate(held):
            want = packed_dtype if j % 7 in (1, 3, 5, 6) else torch.float32
            if t is not None and (t.dtype is not want or not t.is_contiguous()):
                raise ValueError(f"the native decoder needs contiguous {want} weights, got "
                                 f"{t.dtype}")
        table = torch.tensor([0 if t is None else t.data_ptr() for t in held],
                             dtype=torch.int64).view(len(self.layers), 7)
        self.__dict__["_fused"] = (held, table)
        return table

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        """The final RMSNorm (for states returned with ``norm=False``)."""
        return rms_norm(h, self.norm, self.args.rms_norm_eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., hidden]`` -> fp32 logits ``[..., V]`` (the skinny GEMM on CPU for
        few rows, see :func:`linear`)."""
        W = self.head_weight
        x = hidden.reshape(-1, hidden.shape[-1])
        y = self._head_mm(x, W)
        return y.float().reshape(*hidden.shape[:-1], W.shape[0])
