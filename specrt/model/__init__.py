"""Llama-family models over the paged cache, their loaders and tokenizers."""
from __future__ import annotations

from pathlib import Path

import torch

from specrt.model.llama import Llama, ModelArgs
from specrt.model.tokenizer import Detokenizer, Tokenizer

__all__ = ["Llama", "ModelArgs", "Tokenizer", "Detokenizer", "load_model", "resolve_target"]


def resolve_target(target: str | Path | None) -> Path:
    """The HF directory for ``target``: the default model when None, a GGUF file
    converted once into the cache, or an HF directory as is."""
    from specrt.model import gguf_loader

    if target is None:
        return gguf_loader.default_model_dir()
    p = Path(target).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"target not found: {p}")
    if p.is_file():
        if p.suffix != ".gguf":
            raise ValueError(f"{p}: a target is an HF model directory or a .gguf file")
        return _converted_gguf(p)
    return p


def _converted_gguf(p: Path) -> Path:
    """Convert a GGUF file once into ``$SPECRT_CACHE`` (keyed by path, size, mtime)."""
    import hashlib
    import os

    from specrt.model import gguf_loader

    st = p.stat()
    key = hashlib.sha1(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    root = Path(os.environ.get("SPECRT_CACHE", Path.home() / ".cache" / "specrt"))
    out = root / f"{p.stem}-{key}"
    if not (out / "config.json").is_file():
        gguf_loader.gguf_to_hf_dir(p, out)
    return out


def load_model(target: str | Path | None = None, dtype: torch.dtype | None = None,
               device: str | torch.device | None = None) -> tuple[Llama, Tokenizer]:
    """Load a target (HF directory, GGUF file, or the default model when None).

    dtype defaults to fp32 on CPU and bf16 on CUDA; device to CUDA when available.
    """
    from specrt.model.hf import load_hf_model

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    d = resolve_target(target)
    model = load_hf_model(d, dtype=dtype, device=device)
    tok = Tokenizer(d, eos_ids=model.args.eos_token_id)
    return model, tok
