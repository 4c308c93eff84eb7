"""Reading a GGUF checkpoint: open and validate the file, decode metadata, dequantize
tensors to numpy, map llama.cpp's tensor names to HF's, undo its q/k row permutation and
rebuild the HF ``config.json``.

Used by :mod:`specrt.model.gguf_loader` (the conversion into an HF-style directory) and
:mod:`specrt.model.gguf_tokenizer` (the tokenizer rebuilt from the metadata).
"""

from __future__ import annotations

import math
import pathlib
from typing import Any

import numpy as np

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
# tensor names and shapes
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


def _check_shapes(state: dict[str, np.ndarray], cfg: dict, path: pathlib.Path) -> None:
    """Raise a ValueError naming ``path`` unless ``state`` holds every tensor of ``cfg``'s
    shape (HF names, ``[out_features, in_features]``)."""
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
