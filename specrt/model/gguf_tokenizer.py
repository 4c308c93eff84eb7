"""The tokenizer of a GGUF checkpoint, rebuilt from its ``tokenizer.ggml.*`` metadata
with the ``tokenizers`` library (byte-level BPE; SentencePiece-style ``llama``
vocabularies as an SPM-style BPE with byte fallback). See :func:`build_tokenizer`.
"""

from __future__ import annotations

import warnings
from typing import Any

from specrt.model.gguf_read import _field

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
