"""Few-row matrix products on CPU: ``y = x @ W.T`` for decode steps, draft trees and
small batches.

Verifying a tree of T nodes, or decoding a batch of B requests, multiplies a matrix of
a few dozen rows by every weight matrix of the model (prefill: a few hundred). On CPU the floor of such a
product is reading the weights once; BLAS sgemm is far from it for 2-64 rows. The
kernel in ``csrc/gemm_cpu.cpp`` streams the weights once per call from a layout packed
once at load (:func:`pack_weight`): 32-column panels, so each panel is one contiguous
stream, with all rows of ``x`` kept in registers (AVX-512 or AVX2, chosen at run time;
OpenMP over panels).

* :func:`pack_weight` ``[N, K]`` -> ``[ceil(N / 32), K, 32]`` (host work, once).
* :func:`skinny_mm` ``x [M, K]`` with a packed weight -> ``[M, N]``; also
  ``torch.ops.specrt.skinny_mm`` (CPU kernel and a fake implementation).
* :func:`pack_weight_bf16` / :func:`skinny_mm_bf16` (``torch.ops.specrt.skinny_mm_bf16``):
  the same product from bf16 weights (``csrc/gemm_bf16_cpu.cpp``): half the bytes to
  stream, and on CPUs with AMX the tile unit does the multiply-adds, so a tree or a batch
  of a few dozen rows costs about what one row does. ``x`` is rounded to bf16, the sums
  and ``y`` are fp32. Opt-in (``Llama.use_weight_dtype``): its logits are not the fp32
  model's.
* :func:`pack_weight_bf16x3` / :func:`skinny_mm_bf16x3` (``torch.ops.specrt.skinny_mm_bf16x3``):
  fp32 weights at "high" precision (PyTorch's name for it,
  ``torch.set_float32_matmul_precision``): ``x`` and ``W`` each split into a high and a
  low bf16 part and ``y = xh Wh + xh Wl + xl Wh`` on the bf16 units, ~16 significant
  bits of each operand (bf16: 8; fp32: 24). The same weight bytes as fp32, but on AMX a
  few dozen rows cost little more than one (``PackedLinear.fp32_precision``).
* :class:`PackedLinear` runs the kernel on CPU fp32 without autograd (in chunks of
  :data:`MAX_ROWS` rows), ``F.linear`` otherwise: the model's linear layers use it.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from specrt.ops._backend import LIB, native

__all__ = ["pack_weight", "skinny_mm", "pack_weight_bf16", "skinny_mm_bf16",
           "pack_weight_bf16x3", "skinny_mm_bf16x3", "PackedLinear", "MAX_ROWS", "gemm_isa",
           "gemm_bf16_isa", "WEIGHT_DTYPES", "FP32_PRECISIONS", "bf16x3_fast",
           "default_fp32_precision"]

#: Panel width of the packed layout (outputs per panel).
PANEL = 32
#: Rows per kernel call of :class:`PackedLinear`; more rows run as blocks of this many
#: (each block's rows stay in cache while every weight panel streams past). Measured on
#: the project's AMD EPYC (2026-12-02): the kernel is 1.2x ``F.linear`` at 1 row and about
#: 2x from 2 to 2048 rows (bench/bench_gemm.py); for 4800 rows x [3072, 576] one call took
#: 85 ms, blocks of 4096 / 1024 / 512 / 256 rows 99 / 79 / 72 / 73 ms, ``F.linear`` 119 ms.
MAX_ROWS = 512


def gemm_isa() -> str:
    """The SIMD path :func:`skinny_mm` runs on this CPU: ``avx512``, ``avx2`` or
    ``scalar``."""
    return native().gemm_isa()


def gemm_bf16_isa() -> str:
    """The path :func:`skinny_mm_bf16` runs on this CPU: ``amx`` (tile unit), ``avx512bf16``
    (``vdpbf16ps``), ``avx512`` (bf16 widened to fp32) or ``scalar``."""
    return native().gemm_bf16_isa()


#: The weight dtypes :class:`PackedLinear` streams: fp32 (:func:`skinny_mm`) or bf16
#: (:func:`skinny_mm_bf16`).
WEIGHT_DTYPES = (torch.float32, torch.bfloat16)


#: How fp32 weights are multiplied (PyTorch's names): ``"highest"`` fp32 products
#: (:func:`skinny_mm`); ``"high"`` bf16x3 (:func:`skinny_mm_bf16x3`) where the CPU has
#: bf16 dot products (:func:`bf16x3_fast`), else fp32 as with ``"highest"``.
FP32_PRECISIONS = ("highest", "high")


@functools.cache
def bf16x3_fast() -> bool:
    """Whether :func:`skinny_mm_bf16x3` runs on bf16 units here (AMX or AVX512-BF16):
    where it does not, ``"high"`` precision keeps the fp32 kernel (faster there). Asked
    of the CPU once (every linear layer's call reads it)."""
    return gemm_bf16_isa() in ("amx", "avx512bf16")


def default_fp32_precision() -> str:
    """The fp32 precision ``"auto"`` means here: ``"high"`` where AMX runs the bf16x3
    products (on the AMX Xeon a 16-row product 0.6-0.7x fp32's time, a 32-row one about
    0.5x), else ``"highest"`` (AVX512-BF16 without AMX: not measured, so fp32
    products stay)."""
    return "high" if gemm_bf16_isa() == "amx" else "highest"


def check_fp32_precision(precision, what: str = "fp32_precision") -> None:
    """``ValueError`` naming ``what`` unless ``precision`` is one of
    :data:`FP32_PRECISIONS`."""
    if precision not in FP32_PRECISIONS:
        raise ValueError(f"{what} must be one of {FP32_PRECISIONS}, got {precision!r}")


def check_weight_dtype(dtype, what: str = "weight dtype") -> None:
    """``ValueError`` naming ``what`` unless ``dtype`` is one of :data:`WEIGHT_DTYPES`."""
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"{what} must be torch.float32 or torch.bfloat16, got {dtype}")


def _huge_copy(src: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``src`` (CPU) whose memory was advised to transparent huge
    pages before it was written (weights read whole every step: fewer TLB misses)."""
    out = torch.empty(src.shape, dtype=src.dtype)
    if out.nbytes >= 1 << 22:
        native().advise_hugepages(out.data_ptr(), out.nbytes)
    return out.copy_(src)


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """Pack a weight ``[N, K]`` (fp32, CPU) for :func:`skinny_mm`.

    Returns ``wp`` ``[P, K, 32]`` fp32 contiguous, ``P = ceil(N / 32)``, with
    ``wp[p, k, j] = w[32 p + j, k]`` and zeros past row N.
    """
    if w.dim() != 2 or w.dtype != torch.float32 or w.device.type != "cpu":
        raise ValueError(f"pack_weight needs a [N, K] float32 CPU tensor, got "
                         f"{tuple(w.shape)} {w.dtype} on {w.device}")
    N, K = w.shape
    P = -(-N // PANEL)
    w = w.detach()
    return _huge_copy(F.pad(w, (0, 0, 0, P * PANEL - N)).view(P, PANEL, K).transpose(1, 2))


def _check(x: torch.Tensor, wp: torch.Tensor, n: int) -> None:
    if x.dim() != 2 or wp.dim() != 3 or wp.shape[2] != PANEL:
        raise ValueError(f"skinny_mm needs x [M, K] and wp [P, K, {PANEL}], got "
                         f"{tuple(x.shape)} and {tuple(wp.shape)}")
    if x.shape[1] != wp.shape[1]:
        raise ValueError(f"x has K={x.shape[1]}, the packed weight K={wp.shape[1]}")
    if not (wp.shape[0] - 1) * PANEL < n <= wp.shape[0] * PANEL:
        raise ValueError(f"n={n} does not fit a packed weight of {wp.shape[0]} panels")
    if x.dtype != torch.float32 or wp.dtype != torch.float32:
        raise ValueError(f"skinny_mm is fp32: got x {x.dtype}, wp {wp.dtype}")


def _skinny_mm_impl(x: torch.Tensor, wp: torch.Tensor, n: int) -> torch.Tensor:
    _check(x, wp, n)
    if x.device.type != "cpu" or wp.device.type != "cpu":
        raise ValueError("skinny_mm runs on CPU tensors only")
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    native().skinny_mm(x.numpy(), wp.numpy(), y.numpy(), n, torch.get_num_threads())
    return y


LIB.define("skinny_mm(Tensor x, Tensor wp, int n) -> Tensor")
LIB.impl("skinny_mm", _skinny_mm_impl, "CPU")


@torch.library.register_fake("specrt::skinny_mm", lib=LIB)
def _(x, wp, n):
    _check(x, wp, n)
    return x.new_empty(x.shape[0], n)


_skinny_mm_op = torch.ops.specrt.skinny_mm.default


def skinny_mm(x: torch.Tensor, wp: torch.Tensor, n: int) -> torch.Tensor:
    """``x @ W.T`` from W packed by :func:`pack_weight`.

    Args:
        x: ``[M, K]`` float32 CPU (rows may be strided; each row contiguous).
        wp: ``[P, K, 32]`` float32 CPU, ``pack_weight(W)`` of ``W`` ``[n, K]``.
        n: output columns (W's rows), ``32 (P - 1) < n <= 32 P``.

    Returns:
        ``[M, n]`` float32, new memory. Each output is one fp32 dot product summed in
        order over K (results match a float64 reference within fp32 rounding).

    Raises:
        ValueError: shapes, dtypes or devices that do not fit.
    """
    return _skinny_mm_op(x, wp, n)


def pack_weight_bf16(w: torch.Tensor) -> torch.Tensor:
    """Pack a weight ``[N, K]`` (fp32 or bf16, CPU) for :func:`skinny_mm_bf16`.

    Returns ``wq`` ``[P, KB, 16, 2, 32]`` bfloat16 contiguous, ``P = ceil(N / 32)``,
    ``KB = ceil(K / 32)``, VNNI panels: ``wq[p, kb, r, h, 2 c + e] =
    bf16(w[32 p + 16 h + c, 32 kb + 2 r + e])`` (round to nearest even), zeros past N
    and K. ``wq[p, kb, :, h]`` is one AMX B tile (row stride 128 bytes); the kernel reads
    each panel ``wq[p]`` in address order.
    """
    if w.dim() != 2 or w.dtype not in WEIGHT_DTYPES or w.device.type != "cpu":
        raise ValueError(f"pack_weight_bf16 needs a [N, K] float32 or bfloat16 CPU tensor, "
                         f"got {tuple(w.shape)} {w.dtype} on {w.device}")
    N, K = w.shape
    P, KB = -(-N // PANEL), -(-K // PANEL)
    wb = F.pad(w.detach().to(torch.bfloat16), (0, KB * PANEL - K, 0, P * PANEL - N))
    return _huge_copy(wb.view(P, 2, 16, KB, 16, 2).permute(0, 3, 4, 1, 2, 5)).view(
        P, KB, 16, 2, 2 * 16)


def _check_packed(op: str, x: torch.Tensor, wq: torch.Tensor, n: int) -> None:
    """Shapes and dtypes of :func:`skinny_mm_bf16` (``op`` ``skinny_mm_bf16``) or
    :func:`skinny_mm_bf16x3` (``skinny_mm_bf16x3``: ``wq`` has the extra parts dim)."""
    tail = (2, 16, 2, 32) if op.endswith("x3") else (16, 2, 32)
    if x.dim() != 2 or wq.dim() != 2 + len(tail) or tuple(wq.shape[2:]) != tail:
        raise ValueError(f"{op} needs x [M, K] and wq [P, KB, {', '.join(map(str, tail))}], "
                         f"got {tuple(x.shape)} and {tuple(wq.shape)}")
    if not (wq.shape[1] - 1) * PANEL < x.shape[1] <= wq.shape[1] * PANEL:
        raise ValueError(f"x has K={x.shape[1]}, the packed weight {wq.shape[1]} blocks of 32")
    if not (wq.shape[0] - 1) * PANEL < n <= wq.shape[0] * PANEL:
        raise ValueError(f"n={n} does not fit a packed weight of {wq.shape[0]} panels")
    if x.dtype != torch.float32 or wq.dtype != torch.bfloat16:
        raise ValueError(f"{op} takes fp32 x and bf16 wq: got x {x.dtype}, wq {wq.dtype}")


def _run_packed(op: str, x: torch.Tensor, wq: torch.Tensor, n: int) -> torch.Tensor:
    """The CPU implementation of the ``op`` custom op (``skinny_mm_bf16`` / ``x3``)."""
    _check_packed(op, x, wq, n)
    if x.device.type != "cpu" or wq.device.type != "cpu":
        raise ValueError(f"{op} runs on CPU tensors only")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if not wq.is_contiguous():
        raise ValueError(f"{op}: wq must be contiguous (as its pack function makes it)")
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    getattr(native(), op)(x.numpy(), wq.view(torch.uint16).numpy(), y.numpy(), n,
                          torch.get_num_threads())
    return y


def _skinny_mm_bf16_impl(x: torch.Tensor, wq: torch.Tensor, n: int) -> torch.Tensor:
    return _run_packed("skinny_mm_bf16", x, wq, n)


LIB.define("skinny_mm_bf16(Tensor x, Tensor wq, int n) -> Tensor")
LIB.impl("skinny_mm_bf16", _skinny_mm_bf16_impl, "CPU")


@torch.library.register_fake("specrt::skinny_mm_bf16", lib=LIB)
def _(x, wq, n):
    _check_packed("skinny_mm_bf16", x, wq, n)
    return x.new_empty(x.shape[0], n)


_skinny_mm_bf16_op = torch.ops.specrt.skinny_mm_bf16.default


def skinny_mm_bf16(x: torch.Tensor, wq: torch.Tensor, n: int) -> torch.Tensor:
    """``bf16(x) @ W.T`` from W packed by :func:`pack_weight_bf16`.

    Args:
        x: ``[M, K]`` float32 CPU (rows may be strided; each row contiguous); rounded to
            bf16 (nearest even) inside.
        wq: ``[P, KB, 16, 2, 32]`` bfloat16 CPU, ``pack_weight_bf16(W)`` of ``W``
            ``[n, K]``.
        n: output columns (W's rows), ``32 (P - 1) < n <= 32 P``.

    Returns:
        ``[M, n]`` float32, new memory: each output the fp32 sum of exact bf16 x bf16
        products (within fp32 rounding of a float64 reference on the rounded inputs). A
        row's result never depends on ``M``, the other rows or the thread count.

    Raises:
        ValueError: shapes, dtypes or devices that do not fit.
    """
    return _skinny_mm_bf16_op(x, wq, n)


def pack_weight_bf16x3(w: torch.Tensor) -> torch.Tensor:
    """Pack an fp32 weight ``[N, K]`` (CPU) for :func:`skinny_mm_bf16x3`.

    Returns ``wq3`` ``[P, KB, 2, 16, 2, 32]`` bfloat16 contiguous (``P = ceil(N / 32)``,
    ``KB = ceil(K / 32)``): ``wq3[:, :, 0]`` is :func:`pack_weight_bf16` of ``Wh =
    bf16(w)``, ``wq3[:, :, 1]`` of ``Wl = bf16(w - Wh)`` (``w - Wh`` is exact in fp32; both
    round to nearest even), so each k block of a panel holds its high then its low part
    (4 KB, read in address order). ``Wh + Wl`` equals ``w`` to ~2^-17 relative.
    """
    if w.dim() != 2 or w.dtype is not torch.float32 or w.device.type != "cpu":
        raise ValueError(f"pack_weight_bf16x3 needs a [N, K] float32 CPU tensor, got "
                         f"{tuple(w.shape)} {w.dtype} on {w.device}")
    w = w.detach()
    hi = w.to(torch.bfloat16)
    lo = (w - hi.float()).to(torch.bfloat16)
    return _huge_copy(torch.stack((pack_weight_bf16(hi), pack_weight_bf16(lo)), 2))


def _skinny_mm_bf16x3_impl(x: torch.Tensor, wq: torch.Tensor, n: int) -> torch.Tensor:
    return _run_packed("skinny_mm_bf16x3", x, wq, n)


LIB.define("skinny_mm_bf16x3(Tensor x, Tensor wq, int n) -> Tensor")
LIB.impl("skinny_mm_bf16x3", _skinny_mm_bf16x3_impl, "CPU")


@torch.library.register_fake("specrt::skinny_mm_bf16x3", lib=LIB)
def _(x, wq, n):
    _check_packed("skinny_mm_bf16x3", x, wq, n)
    return x.new_empty(x.shape[0], n)


_skinny_mm_bf16x3_op = torch.ops.specrt.skinny_mm_bf16x3.default


def skinny_mm_bf16x3(x: torch.Tensor, wq: torch.Tensor, n: int) -> torch.Tensor:
    """``x @ W.T`` at "high" fp32 precision from W packed by :func:`pack_weight_bf16x3`.

    ``x`` is split as W is (``xh = bf16(x)``, ``xl = bf16(x - xh)``) and ``y = xl Wh + xh
    Wl + xh Wh`` summed in fp32 (the ``xl Wl`` term, below 2^-18 of each product, is
    dropped): each product carries ~16 significant bits of its operands against fp32's
    24 and bf16's 8. On AMX the tile unit does the three products (:func:`bf16x3_fast`).

    Args:
        x: ``[M, K]`` float32 CPU (rows may be strided; each row contiguous); finite (an
            infinite entry gives NaN: its low part is ``inf - inf``).
        wq: ``[P, KB, 2, 16, 2, 32]`` bfloat16 CPU, ``pack_weight_bf16x3(W)`` of ``W``
            ``[n, K]``.
        n: output columns (W's rows), ``32 (P - 1) < n <= 32 P``.

    Returns:
        ``[M, n]`` float32, new memory. A row's result never depends on ``M``, the other
        rows or the thread count.

    Raises:
        ValueError: shapes, dtypes or devices that do not fit.
    """
    return _skinny_mm_bf16x3_op(x, wq, n)


class PackedLinear:
    """``F.linear(x, weight, bias)`` that runs the skinny GEMM on CPU fp32 activations (in
    chunks of :data:`MAX_ROWS` rows), from a copy of ``weight`` packed on first use (and
    packed again if the weight is changed in place or :attr:`weight_dtype` changes).
    ``F.linear`` everywhere else (other devices or dtypes, autograd).

    Attributes:
        weight_dtype: the packed copy's dtype, one of :data:`WEIGHT_DTYPES`: fp32
            (:func:`skinny_mm`, the default: the same products as ``F.linear``) or bf16
            (:func:`skinny_mm_bf16`).
        fp32_precision: with fp32 weights, ``"highest"`` (fp32 products, the default)
            or ``"high"`` (:func:`skinny_mm_bf16x3` where :func:`bf16x3_fast`); see
            :data:`FP32_PRECISIONS`.
    """

    def __init__(self, weight_dtype: torch.dtype = torch.float32,
                 fp32_precision: str = "highest"):
        self._packed: torch.Tensor | None = None
        self._weight: torch.Tensor | None = None
        self._version: int | None = None   # None: an inference tensor (no counter)
        self._format: str | None = None
        check_weight_dtype(weight_dtype, "weight_dtype")
        check_fp32_precision(fp32_precision)
        self.weight_dtype = weight_dtype
        self.fp32_precision = fp32_precision

    def format(self) -> str:
        """The packed layout the next call uses: ``"fp32"``, ``"bf16"`` or ``"bf16x3"``."""
        if self.weight_dtype is torch.bfloat16:
            return "bf16"
        return "bf16x3" if self.fp32_precision == "high" and bf16x3_fast() else "fp32"

    def packed(self, weight: torch.Tensor) -> torch.Tensor:
        """The packed copy of ``weight`` (made again when it is another tensor, was
        changed in place, or :attr:`weight_dtype` / :attr:`fp32_precision` changed)."""
        fmt = self.format()
        if (self._weight is weight and self._format == fmt
                and (self._version is None or weight._version == self._version)):
            return self._packed
        self._packed = self._weight = None   # the old copy goes before the new one is made
        self._packed = (pack_weight_bf16(weight) if fmt == "bf16" else
                        pack_weight_bf16x3(weight) if fmt == "bf16x3" else pack_weight(weight))
        self._format = fmt
        self._weight = weight
        self._version = None if weight.is_inference() else weight._version
        return self._packed

    def __call__(self, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
        # the decode hot path (121 calls per token for the default target): cheap checks
        if (x.dtype is not torch.float32 or weight.dtype is not torch.float32 or not x.is_cpu
                or torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
            return F.linear(x, weight, bias)
        K = x.shape[-1]
        rows = x.numel() // K if K else 0
        if rows <= 0 or MAX_ROWS <= 0:   # MAX_ROWS 0: the kernel off (benchmarks' baseline)
            return F.linear(x, weight, bias)
        wp, N = self.packed(weight), weight.shape[0]
        op = (_skinny_mm_op if wp.dtype is torch.float32 else
              _skinny_mm_bf16x3_op if wp.dim() == 6 else _skinny_mm_bf16_op)
        x2 = x.reshape(rows, K)
        if rows <= MAX_ROWS:
            y = op(x2, wp, N)
        else:  # prefill: row blocks that stay in cache, written into one output
            y = x2.new_empty(rows, N)
            for i in range(0, rows, MAX_ROWS):
                y[i:i + MAX_ROWS] = op(x2[i:i + MAX_ROWS], wp, N)
        if bias is not None:
            y += bias
        return y.view(*x.shape[:-1], N)
