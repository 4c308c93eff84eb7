"""Backend selection, the native module and the ``torch.ops.specrt`` namespace.

Shared by the op modules of :mod:`specrt.ops`; imports nothing else of specrt
(``specrt._C`` is loaded on first use).
"""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager

import torch

__all__ = ["backend_for", "BACKENDS", "using_backend"]

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")

#: The library every ``specrt::*`` op is defined in (kept alive by this module).
LIB = torch.library.Library("specrt", "FRAGMENT")

_warned_attention_cuda = False


def backend_for(t: torch.Tensor, op: str | None = None) -> str:
    """The implementation :mod:`specrt.ops` runs for tensors on ``t``'s device.

    ``SPECRT_OPS_BACKEND`` (read on every call) selects it:

    ========  ===================================  =====================================
    value     append_kv, commit_kv, verify_tree,   tree_attention (``op="tree_attention"``)
              chain_verify
    ========  ===================================  =====================================
    auto      ``triton`` on CUDA, ``cpu`` else    ``triton`` on CUDA, ``cpu`` else
    triton    ``triton`` (CPU tensors need        ``triton`` (same condition)
              ``TRITON_INTERPRET=1`` set before
              specrt is imported)
    cuda      ``cuda``: specrt._C's CUDA code;    ``torch``: specrt._C has no CUDA
              CUDA tensors only, and specrt._C    attention kernel, so ``cuda`` runs the
              must be built with CUDA (else       torch path (gather + SDPA, torch's own
              RuntimeError)                       CUDA kernels), never Triton; warns once
    cpu       ``cpu``: specrt._C's C++ code;      ``cpu``: specrt._C's kernel over the
              CPU tensors only                    blocks (fp32; other dtypes: ``torch``)
    torch     as ``auto``                         ``torch`` (gather + SDPA) on any device
    ========  ===================================  =====================================

    Args:
        t: a tensor of the call (its device decides ``auto``).
        op: ``"tree_attention"`` for the attention mapping; anything else (or None)
            for the KV and verification ops.

    Returns:
        ``"triton"``, ``"cuda"`` or ``"cpu"``; for ``op="tree_attention"`` ``"triton"``,
        ``"cpu"`` or ``"torch"``.

    Raises:
        ValueError: an unknown value, or a backend that cannot run on ``t``'s device.
        RuntimeError: ``cuda`` with a specrt._C built without CUDA.
    """
    b = os.environ.get("SPECRT_OPS_BACKEND", "auto").lower()
    if b not in BACKENDS:
        raise ValueError(f"SPECRT_OPS_BACKEND={b!r}: expected one of {BACKENDS}")
    if b == "torch":
        if op == "tree_attention":
            return "torch"
        b = "auto"
    if b == "auto":
        b = "triton" if t.is_cuda else "cpu"
    elif b == "cpu" and t.is_cuda:
        raise ValueError("SPECRT_OPS_BACKEND=cpu but the tensors are on CUDA")
    elif b == "cuda" and not t.is_cuda:
        raise ValueError("SPECRT_OPS_BACKEND=cuda but the tensors are on the CPU")
    elif b == "triton" and not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("SPECRT_OPS_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1 "
                         "set before specrt is imported")
    if op == "tree_attention":
        if b == "cuda":
            _warn_attention_cuda()
        return {"triton": "triton", "cpu": "cpu"}.get(b, "torch")
    if b == "cuda" and not getattr(native(), "with_cuda", False):
        raise RuntimeError("SPECRT_OPS_BACKEND=cuda but specrt._C was built without CUDA "
                           "(rebuild with nvcc available, or SPECRT_CUDA=1 to require it)")
    return b


@contextmanager
def using_backend(name: str):
    """Within the block ``SPECRT_OPS_BACKEND`` is ``name`` (one of :data:`BACKENDS`);
    the previous value (or its absence) comes back on exit. For benchmarks and checks
    that compare implementations in one process."""
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r}: expected one of {BACKENDS}")
    old = os.environ.get("SPECRT_OPS_BACKEND")
    os.environ["SPECRT_OPS_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SPECRT_OPS_BACKEND", None)
        else:
            os.environ["SPECRT_OPS_BACKEND"] = old


def _warn_attention_cuda() -> None:
    global _warned_attention_cuda
    if not _warned_attention_cuda:
        _warned_attention_cuda = True
        warnings.warn("SPECRT_OPS_BACKEND=cuda: specrt._C has no CUDA tree-attention kernel; "
                      "tree_attention runs the torch path (gather + SDPA on CUDA), not Triton",
                      RuntimeWarning, stacklevel=3)


_native_override = None


def native():
    """``specrt._C`` (the C++ / CUDA extension built from csrc/), or the module that
    :func:`using_native` put in its place."""
    if _native_override is not None:
        return _native_override
    from specrt import _C

    return _C


def load_native(path: str):
    """Another build of the extension, loaded from its ``.so`` file (for benchmarks that
    compare kernels before and after a change in one process; pass it to
    :func:`using_native`). ``ValueError`` when the file is missing or is not a build of
    ``specrt._C``."""
    import importlib.util
    from pathlib import Path

    f = Path(path)
    if not f.is_file():
        raise ValueError(f"{path}: no such native build (a specrt/_C*.so file)")
    spec = importlib.util.spec_from_file_location(f"specrt_native_{abs(hash(str(f.resolve())))}._C",
                                                  f)
    try:
        mod = importlib.util.module_from_spec(spec)  # an extension is loaded here
        spec.loader.exec_module(mod)
    except ImportError as e:
        raise ValueError(f"{path}: not a loadable build of specrt._C ({e})") from None
    for name in ("skinny_mm", "decoder_layers_cpu"):
        if not hasattr(mod, name):
            raise ValueError(f"{path}: this build has no {name}(); too old to stand in")
    return mod


@contextmanager
def using_native(module):
    """Within the block every op and model forward calls ``module`` (from
    :func:`load_native`) instead of ``specrt._C``; restored on exit."""
    global _native_override
    saved = _native_override
    _native_override = module
    try:
        yield module
    finally:
        _native_override = saved


def current_stream(device: torch.device) -> int:
    """The raw CUDA stream handle the ``cuda`` backend launches on."""
    return torch.cuda.current_stream(device).cuda_stream


# ---------------------------------------------------------------------------
# shared argument checks

def check_cache(kv_cache: torch.Tensor, block_tables: torch.Tensor) -> None:
    """``kv_cache`` ``[num_blocks, 2, block_size, H_kv, D]`` contiguous and
    ``block_tables`` ``[B, max_blocks]`` int32 on its device, or ValueError."""
    if kv_cache.dim() != 5 or kv_cache.shape[1] != 2:
        raise ValueError(f"kv_cache must be [num_blocks, 2, block_size, H_kv, D], got "
                         f"{tuple(kv_cache.shape)}")
    if not kv_cache.is_contiguous():
        raise ValueError("kv_cache must be contiguous")
    if block_tables.dim() != 2 or block_tables.dtype != torch.int32:
        raise ValueError(f"block_tables must be [B, max_blocks] int32, got "
                         f"{tuple(block_tables.shape)} {block_tables.dtype}")
    if block_tables.device != kv_cache.device:
        raise ValueError("block_tables and kv_cache are on different devices")


def as_i64(x: torch.Tensor | int | None, B: int, name: str, device, default=None):
    """``x`` as a contiguous ``[B]`` int64 tensor on ``device`` (a Python int is
    broadcast; None takes ``default``, or is an error without one)."""
    if x is None:
        if default is None:
            raise ValueError(f"{name} is required")
        x = default
    if isinstance(x, int):
        return torch.full((B,), x, dtype=torch.int64, device=device)
    if x.dim() != 1 or x.shape[0] != B:
        raise ValueError(f"{name} must be [B={B}], got {tuple(x.shape)}")
    return x.to(device=device, dtype=torch.int64).contiguous()

