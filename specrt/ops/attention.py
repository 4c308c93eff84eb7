"""Tree attention over a paged KV cache: plan once per step, run once per layer.

    plan = plan_tree_attention(block_tables, prefix_lens, T, block_size, tree_mask, tree_lens)
    for li in range(num_layers):
        append_kv(kv[li], block_tables, prefix_lens, k, v, tree_lens)
        o = plan.run(q, kv[li])                                   # [B, T, H_q, D]

Every layer of a step attends over the same positions with the same mask, so the
host work (lengths, index tensors, the mask in the form the kernel reads) is done
once by :func:`plan_tree_attention`, which also picks the implementation
(:func:`~specrt.ops.backend_for` with ``op="tree_attention"``):

* ``triton`` (CUDA tensors by default; CPU tensors under ``TRITON_INTERPRET=1``): the
  plan keeps the block tables, the lengths and the bit-packed tree mask;
  :meth:`TreeAttentionPlan.run` calls ``torch.ops.specrt.paged_tree_attention``, the
  fused kernel of specrt/kernels/attention.py (split-KV for long prefixes).
* ``cpu`` (CPU tensors by default): the plan keeps the block tables, the lengths and
  the mask as bytes; :meth:`TreeAttentionPlan.run` calls
  ``torch.ops.specrt.cpu_tree_attention``, specrt._C's kernel (csrc/attention_cpu.cpp)
  that reads K/V straight from the blocks (no gather) for fp32 q and cache; other
  dtypes take the ``torch`` path below. ``run(..., bf16=True)`` takes its AMX variant
  (csrc/attention_amx.cpp, where :func:`amx_attention_available`): q, K, the softmax
  weights and V rounded to bf16 for the two products, fp32 softmax and accumulation;
  the attention of a model whose weights stream as bf16.
* ``torch`` (``SPECRT_OPS_BACKEND=torch`` on any device; CUDA tensors with
  ``SPECRT_OPS_BACKEND=cuda``, since specrt._C has no CUDA attention kernel): the plan
  keeps the gather index of every sequence's positions and a ``[B, 1, T, L]``
  visibility mask; :meth:`TreeAttentionPlan.run` calls
  ``torch.ops.specrt.gathered_tree_attention`` (gather K/V, SDPA with fp32
  accumulation).

:func:`tree_attention` is the one-shot form (plan + run), also registered as
``torch.ops.specrt.tree_attention`` for other stacks.
"""
from __future__ import annotations

import math
import os

import torch

from specrt.ops._backend import LIB, as_i64, backend_for, check_cache, native

__all__ = ["tree_attention", "plan_tree_attention", "TreeAttentionPlan", "build_tree_mask",
           "amx_attention_available"]


def amx_attention_available(head_dim: int) -> bool:
    """Whether the CPU kernel's bf16 variant (``bf16=True`` of :meth:`TreeAttentionPlan.run`
    and :func:`tree_attention`) runs here: AMX tiles the OS lets a thread use,
    AVX512-BF16, and ``head_dim`` 32, 64 or 128. False with a build of specrt._C that
    predates it."""
    fn = getattr(native(), "amx_attention_usable", None)
    return bool(fn is not None and fn(int(head_dim)))


def build_tree_mask(parents: torch.Tensor, tree_lens: torch.Tensor | None = None) -> torch.Tensor:
    """Ancestor mask of draft trees.

    Args:
        parents: ``[B, T]`` int, ``parents[b, 0] = -1`` and ``parents[b, i] < i``.
        tree_lens: ``[B]`` int or None; nodes at or beyond it get an all-false row and
            column.

    Returns:
        ``[B, T, T]`` bool on ``parents``' device, ``mask[b, i, j]`` true iff j is i or
        an ancestor of i.
    """
    B, T = parents.shape
    mask = torch.zeros(B, T, T, dtype=torch.bool, device=parents.device)
    idx = torch.arange(T, device=parents.device)
    mask[:, idx, idx] = True
    par = parents.long().clamp(min=0)
    for i in range(1, T):
        p = par[:, i]
        mask[:, i] |= mask[torch.arange(B, device=parents.device), p] & (parents[:, i] >= 0)[:, None]
    if tree_lens is not None:
        valid = idx[None, :] < tree_lens.to(parents.device)[:, None]
        mask &= valid[:, :, None] & valid[:, None, :]
    return mask


# ---------------------------------------------------------------------------
# plan

class TreeAttentionPlan:
    """One step's tree attention, planned for every layer of that step.

    Build with :func:`plan_tree_attention`; call :meth:`run` once per layer.

    Attributes:
        backend: ``"triton"``, ``"cpu"`` or ``"torch"`` (see the module docstring).
        B, T, block_size: batch rows, tree nodes per row, the cache's block size.
        device: the device of the block tables (and of every tensor below).
        block_tables: ``[B, max_blocks]`` int32, contiguous.
        prefix_lens: ``[B]`` int64: committed positions, visible to every query.
        tree_lens: ``[B]`` int64 valid nodes per row, or None (all T).
        packed_mask: ``triton``: ``[B, T, ceil(T / 64)]`` int64 mask bits
            (:func:`specrt.kernels.attention.pack_tree_mask`), or None (causal).
        gather_blocks: ``torch``: ``[B, L]`` int64, the block holding position ``p`` of
            row b (``L = max(prefix_lens + T)``).
        gather_offsets: ``torch``: ``[L]`` int64, ``p % block_size``.
        visible: ``torch``: ``[B, 1, T, L]`` bool, query t of row b sees position p; None
            when everything is visible.
        zero_rows: ``torch``: ``[B, T]`` bool, rows whose output is 0 (padding, or nothing
            visible); None when there are none.
        causal: ``torch``: a single row from position 0 with a causal mask (SDPA's causal
            kernel, no mask tensor).
        byte_mask: ``cpu``: ``[B, T, T]`` uint8 tree mask, or ``[0]`` (causal).
    """

    __slots__ = ("backend", "B", "T", "block_size", "device", "block_tables", "prefix_lens",
                 "tree_lens", "packed_mask", "gather_blocks", "gather_offsets", "visible",
                 "zero_rows", "causal", "byte_mask", "_tree_mask")

    def __init__(self, backend, block_tables, prefix_lens, T, block_size, tree_mask, tree_lens,
                 packed_mask):
        self.backend = backend
        self.B, self.T, self.block_size = block_tables.shape[0], T, block_size
        self.device = block_tables.device
        self.block_tables = block_tables.contiguous()
        self.prefix_lens, self.tree_lens = prefix_lens, tree_lens
        self.packed_mask = self.gather_blocks = self.gather_offsets = None
        self.visible = self.zero_rows = self.byte_mask = None
        self.causal = False
        self._tree_mask = tree_mask
        if backend == "triton":
            if packed_mask is not None:
                self.packed_mask = packed_mask.reshape(self.B, T, -1).contiguous()
            elif tree_mask is not None:
                from specrt.kernels.attention import pack_tree_mask

                self.packed_mask = pack_tree_mask(tree_mask)
            return
        if packed_mask is not None:
            words = packed_mask.reshape(self.B, T, -1).cpu()
            bit = torch.arange(T)
            tree_mask = ((words[:, :, bit // 64] >> (bit % 64)) & 1).bool()
            self._tree_mask = tree_mask
        if backend == "cpu":
            if self.tree_lens is None:
                self.tree_lens = torch.full((self.B,), T, dtype=torch.int64)
            self.byte_mask = (torch.zeros(0, dtype=torch.uint8) if tree_mask is None
                              else tree_mask.to(torch.uint8).contiguous())
            return
        self._plan_gather(tree_mask)

    def _plan_gather(self, tree_mask):
        B, T, dev = self.B, self.T, self.device
        tl = (torch.full((B,), T, dtype=torch.int64) if self.tree_lens is None
              else self.tree_lens.cpu())
        pl = self.prefix_lens.cpu()
        # plain causal attention (a single prefill from position 0): SDPA's causal kernel
        self.causal = (B == 1 and tree_mask is None and T > 1 and int(pl[0]) == 0
                       and int(tl[0]) == T)
        L = int((pl + T).max())
        pos = torch.arange(L)
        slot = (pos // self.block_size).clamp(max=self.block_tables.shape[1] - 1)
        self.gather_blocks = self.block_tables.long()[:, slot.to(dev)]    # [B, L]
        self.gather_offsets = (pos % self.block_size).to(dev)              # [L]
        rel = pos[None, :] - pl[:, None]                                   # [B, L]
        in_tree = (rel >= 0) & (rel < tl[:, None])
        if tree_mask is None:
            tmask = torch.ones(T, T, dtype=torch.bool).tril().expand(B, T, T)
        else:
            tmask = tree_mask.cpu().bool()
        tree_part = torch.gather(tmask, 2, rel.clamp(0, T - 1)[:, None, :].expand(B, T, L))
        mask = (rel < 0)[:, None, :] | (in_tree[:, None, :] & tree_part)  # [B, T, L]
        row_ok = torch.arange(T)[None, :] < tl[:, None]                   # [B, T]
        mask &= row_ok[:, :, None]
        # rows with nothing visible (padding) would give NaN: give them a column, zero later
        dead = ~mask.any(-1)
        mask[..., 0] |= dead
        zero = dead | ~row_ok
        self.zero_rows = zero.to(dev) if bool(zero.any()) else None
        self.visible = None if bool(mask.all()) else mask[:, None].to(dev)

    def run(self, q: torch.Tensor, kv_cache: torch.Tensor, scale: float | None = None, *,
            out: torch.Tensor | None = None, num_splits: int | None = None,
            bf16: bool = False) -> torch.Tensor:
        """Attention of one layer's tree queries over its paged cache.

        Args:
            q: ``[B, T, H_q, D]`` (the planned B and T), ``H_q`` a multiple of ``H_kv``;
                any strides. ``triton``: fp16, bf16 or fp32, the cache's dtype, ``D`` a
                power of two in 16..256.
            kv_cache: ``[num_blocks, 2, block_size, H_kv, D]`` of this layer, contiguous,
                the planned block size and device; the tree tokens' K/V already written
                at positions ``prefix_lens[b] .. prefix_lens[b] + T - 1``.
            scale: softmax scale, default ``1 / sqrt(D)``.
            out: keyword-only, preallocated ``[B, T, H_q, D]`` in q's dtype on q's
                device; every element is written and it is returned.
            num_splits: keyword-only, split-KV factor of the Triton kernel (None: auto;
                1: single pass; at most 64); ignored by the torch path.
            bf16: keyword-only, ``cpu`` plans with fp32 q and cache only: the products
                ``q K^T`` and ``P V`` take bf16-rounded inputs on AMX tiles (softmax and
                accumulation in fp32; :func:`amx_attention_available`). A row's result
                still depends on that row and the cache only.

        Returns:
            ``[B, T, H_q, D]`` in q's dtype (fp32 accumulation); rows ``t >=
            tree_lens[b]`` are 0.

        Raises:
            ValueError: shapes, dtypes or devices that do not match the plan or each other;
                ``bf16`` on another backend or dtype, or where the CPU lacks AMX.
        """
        if q.dim() != 4 or q.shape[0] != self.B or q.shape[1] != self.T:
            raise ValueError(f"q must be [B={self.B}, T={self.T}, H_q, D], got {tuple(q.shape)}")
        if kv_cache.dim() != 5 or kv_cache.shape[1] != 2 or kv_cache.shape[2] != self.block_size:
            raise ValueError(f"kv_cache must be [num_blocks, 2, block_size={self.block_size}, "
                             f"H_kv, D], got {tuple(kv_cache.shape)}")
        B, T, Hq, D = q.shape
        Hkv = kv_cache.shape[3]
        if kv_cache.shape[4] != D or Hq % Hkv != 0:
            raise ValueError(f"q heads/dim {Hq}x{D} incompatible with cache {Hkv}x{kv_cache.shape[4]}")
        if not kv_cache.is_contiguous():
            raise ValueError("kv_cache must be contiguous")
        if q.device != self.device or kv_cache.device != self.device:
            raise ValueError(f"q on {q.device} and kv_cache on {kv_cache.device}; the plan is "
                             f"for {self.device}")
        scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        if out is not None and (tuple(out.shape) != (B, T, Hq, D) or out.dtype != q.dtype
                                or out.device != q.device):
            raise ValueError(f"out must be [{B}, {T}, {Hq}, {D}] {q.dtype} on {q.device}, got "
                             f"{tuple(out.shape)} {out.dtype} on {out.device}")
        cpu = self.backend == "cpu" and q.dtype == kv_cache.dtype == torch.float32
        if bf16 and not (cpu and amx_attention_available(D)):
            raise ValueError("bf16 attention runs on the cpu backend with fp32 q and cache, on "
                             f"a CPU with AMX and AVX512-BF16, head dim 32, 64 or 128 (backend "
                             f"{self.backend}, {q.dtype}, head dim {D}, AMX "
                             f"{'yes' if amx_attention_available(64) else 'no'})")
        if cpu:
            dst = out if out is not None and out.is_contiguous() else q.new_empty((B, T, Hq, D))
            _cpu_op(q, kv_cache, self.block_tables, self.prefix_lens, self.byte_mask,
                    self.tree_lens, scale, dst, bf16)
            return dst if out is None or dst is out else out.copy_(dst)
        if self.backend != "triton":
            if self.gather_blocks is None:  # a cpu plan run on other dtypes: torch's path
                self._plan_gather(self._tree_mask)
            res = _gathered_op(q, kv_cache, self.gather_blocks, self.gather_offsets,
                               self.visible, self.zero_rows, self.causal, scale)
            return res if out is None else out.copy_(res)
        dst = out if out is not None and out.stride(-1) == 1 else q.new_empty((B, T, Hq, D))
        _paged_op(q, kv_cache, self.block_tables, self.prefix_lens, self.packed_mask,
                  self.tree_lens, scale, 0 if num_splits is None else int(num_splits), dst)
        return dst if out is None or dst is out else out.copy_(dst)

    def __repr__(self) -> str:
        return (f"TreeAttentionPlan(backend={self.backend!r}, B={self.B}, T={self.T}, "
                f"block_size={self.block_size}, device={self.device})")


def plan_tree_attention(block_tables: torch.Tensor, prefix_lens: torch.Tensor | int, T: int,
                        block_size: int, tree_mask: torch.Tensor | None = None,
                        tree_lens: torch.Tensor | None = None, *,
                        packed_mask: torch.Tensor | None = None) -> TreeAttentionPlan:
    """Plan one step's tree attention; run it per layer with :meth:`TreeAttentionPlan.run`.

    Args:
        block_tables: ``[B, max_blocks]`` int32: block ids of each sequence, in order; its
            device is the plan's.
        prefix_lens: ``[B]`` int (or a Python int for all rows): committed tokens, seen
            in full by every query.
        T: tree nodes (queries) per row.
        block_size: the cache's block size (``kv_cache.shape[2]``).
        tree_mask: ``[B, T, T]`` bool, ``tree_mask[b, i, j]`` true iff node j is i or an
            ancestor of i (:func:`build_tree_mask`); None means causal (prefill, chains,
            decode with T=1).
        tree_lens: ``[B]`` int or None: valid nodes per row; rows and columns at or beyond
            it are ignored and their output is 0.
        packed_mask: keyword-only, the mask already bit-packed: ``[B, T, ceil(T/64)]`` (or
            ``[B, T]`` for T <= 64) int64 from
            :func:`specrt.kernels.attention.pack_tree_mask`; takes precedence over
            ``tree_mask``.

    Returns:
        A :class:`TreeAttentionPlan`, valid for every layer of the step (all layers'
        caches share the block tables and block size).

    Raises:
        ValueError: on mismatched shapes, dtypes or an impossible backend.
    """
    if block_tables.dim() != 2 or block_tables.dtype != torch.int32:
        raise ValueError(f"block_tables must be [B, max_blocks] int32, got "
                         f"{tuple(block_tables.shape)} {block_tables.dtype}")
    dev = block_tables.device
    B, T, block_size = block_tables.shape[0], int(T), int(block_size)
    prefix = as_i64(prefix_lens, B, "prefix_lens", dev)
    tl = None if tree_lens is None else as_i64(tree_lens, B, "tree_lens", dev)
    if tree_mask is not None and tuple(tree_mask.shape) != (B, T, T):
        raise ValueError(f"tree_mask must be [B={B}, T={T}, T={T}], got {tuple(tree_mask.shape)}")
    if packed_mask is not None and (packed_mask.dim() not in (2, 3)
                                    or tuple(packed_mask.shape[:2]) != (B, T)
                                    or packed_mask.dtype != torch.int64):
        raise ValueError(f"packed_mask must be [B={B}, T={T}, W] int64, got "
                         f"{tuple(packed_mask.shape)} {packed_mask.dtype}")
    backend = backend_for(block_tables, "tree_attention")
    return TreeAttentionPlan(backend, block_tables, prefix, T, block_size, tree_mask, tl,
                             None if packed_mask is None else packed_mask.to(dev))


def tree_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                   prefix_lens: torch.Tensor, tree_mask: torch.Tensor | None = None,
                   tree_lens: torch.Tensor | None = None, scale: float | None = None, *,
                   packed_mask: torch.Tensor | None = None, num_splits: int | None = None,
                   out: torch.Tensor | None = None, bf16: bool = False) -> torch.Tensor:
    """Attention of draft-tree queries over a paged cache (prefix + the tree itself), one
    shot: :func:`plan_tree_attention` then :meth:`TreeAttentionPlan.run`. Several layers
    of one step should plan once and run the plan per layer instead.

    Args:
        q: ``[B, T, H_q, D]``; ``H_q`` a multiple of ``H_kv``.
        kv_cache: ``[num_blocks, 2, block_size, H_kv, D]``, contiguous, q's dtype for
            Triton; the tree tokens' K/V are already written at positions
            ``prefix_lens[b] .. prefix_lens[b] + T - 1``.
        block_tables: ``[B, max_blocks]`` int32.
        prefix_lens: ``[B]`` int: committed tokens every query sees in full.
        tree_mask: ``[B, T, T]`` bool, ``tree_mask[b, i, j]`` true iff node j is i or an
            ancestor of i; None means causal (prefill, chains, decode with T=1).
        tree_lens: ``[B]`` int or None: valid nodes per sequence; rows and columns at or
            beyond it are ignored and their output is 0.
        scale: softmax scale, default ``1/sqrt(D)``.
        packed_mask: keyword-only, ``[B, T, ceil(T/64)]`` (or ``[B, T]`` for T <= 64)
            int64 from ``specrt.kernels.attention.pack_tree_mask(tree_mask)``. Takes
            precedence over ``tree_mask``.
        num_splits: keyword-only, split-KV factor of the Triton kernel (None = auto;
            1 = single pass); ignored by the torch path.
        out: keyword-only, preallocated ``[B, T, H_q, D]`` output in q's dtype; every
            element is written and it is returned.
        bf16: keyword-only, the CPU kernel's bf16 products on AMX tiles (see
            :meth:`TreeAttentionPlan.run`).

    Returns:
        ``[B, T, H_q, D]`` in q's dtype (accumulation in fp32).
    """
    check_cache(kv_cache, block_tables)
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H_q, D], got {tuple(q.shape)}")
    if block_tables.shape[0] != q.shape[0]:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows for B={q.shape[0]}")
    plan = plan_tree_attention(block_tables, prefix_lens, q.shape[1], kv_cache.shape[2],
                               tree_mask, tree_lens, packed_mask=packed_mask)
    return plan.run(q, kv_cache, scale, out=out, num_splits=num_splits, bf16=bf16)


# ---------------------------------------------------------------------------
# torch.ops.specrt implementations

def _gathered_impl(q, kv_cache, gather_blocks, gather_offsets, visible, zero_rows, causal,
                   scale):
    """Gather each row's K/V ``[B, L]`` and run SDPA in fp32 (any device)."""
    Hq = q.shape[2]
    kv = kv_cache[gather_blocks, :, gather_offsets]                    # [B, L, 2, Hkv, D]
    kf = kv[:, :, 0].float().transpose(1, 2)                           # [B, Hkv, L, D]
    vf = kv[:, :, 1].float().transpose(1, 2)
    qf = q.float().transpose(1, 2)                                     # [B, Hq, T, D]
    o = torch.nn.functional.scaled_dot_product_attention(
        qf, kf, vf, attn_mask=None if causal else visible, is_causal=causal, scale=scale,
        enable_gqa=(Hq != kv.shape[3]))
    o = o.transpose(1, 2).to(dtype=q.dtype, memory_format=torch.contiguous_format)
    if zero_rows is not None:
        o.masked_fill_(zero_rows[:, :, None, None], 0.0)
    return o


def _cpu_impl(q, kv_cache, block_tables, prefix_lens, byte_mask, tree_lens, scale, out,
              bf16=False):
    """specrt._C's kernel over the paged cache: fp32 (csrc/attention_cpu.cpp) or, with
    ``bf16``, bf16 products on AMX tiles (csrc/attention_amx.cpp)."""
    if q.dtype != torch.float32 or kv_cache.dtype != torch.float32 or out.dtype != q.dtype:
        raise ValueError(f"cpu_tree_attention is fp32: got q {q.dtype}, cache {kv_cache.dtype}")
    if not out.is_contiguous():
        raise ValueError("cpu_tree_attention: out must be contiguous")
    native().tree_attention_cpu(q.contiguous().numpy(), kv_cache.numpy(), block_tables.numpy(),
                                prefix_lens.numpy(), byte_mask.numpy(), tree_lens.numpy(),
                                scale, out.numpy(), torch.get_num_threads(),
                                **({"bf16": True} if bf16 else {}))


def _paged_impl(q, kv_cache, block_tables, prefix_lens, packed_mask, tree_lens, scale,
                num_splits, out):
    """The Triton kernel (specrt/kernels/attention.py); CPU tensors need TRITON_INTERPRET=1."""
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("paged_tree_attention runs Triton: CPU tensors need "
                         "TRITON_INTERPRET=1 set before specrt is imported")
    from specrt.kernels import attention as kern

    kern.tree_attention(q, kv_cache, block_tables, prefix_lens, None, tree_lens, scale,
                        packed_mask=packed_mask, num_splits=num_splits or None, out=out)


def _tree_attention_impl(q, kv_cache, block_tables, prefix_lens, tree_mask, tree_lens, scale):
    return tree_attention(q, kv_cache, block_tables, prefix_lens, tree_mask, tree_lens, scale)


LIB.define("gathered_tree_attention(Tensor q, Tensor kv_cache, Tensor gather_blocks, "
           "Tensor gather_offsets, Tensor? visible, Tensor? zero_rows, bool causal, "
           "float scale) -> Tensor")
LIB.define("paged_tree_attention(Tensor q, Tensor kv_cache, Tensor block_tables, "
           "Tensor prefix_lens, Tensor? packed_mask, Tensor? tree_lens, float scale, "
           "int num_splits, Tensor(a!) out) -> ()")
LIB.define("tree_attention(Tensor q, Tensor kv_cache, Tensor block_tables, Tensor prefix_lens, "
           "Tensor? tree_mask, Tensor? tree_lens, float scale) -> Tensor")
LIB.define("cpu_tree_attention(Tensor q, Tensor kv_cache, Tensor block_tables, "
           "Tensor prefix_lens, Tensor byte_mask, Tensor tree_lens, float scale, "
           "Tensor(a!) out, bool bf16=False) -> ()")
LIB.impl("cpu_tree_attention", _cpu_impl, "CPU")
for _key in ("CPU", "CUDA"):
    LIB.impl("gathered_tree_attention", _gathered_impl, _key)
    LIB.impl("paged_tree_attention", _paged_impl, _key)
    LIB.impl("tree_attention", _tree_attention_impl, _key)


@torch.library.register_fake("specrt::gathered_tree_attention", lib=LIB)
def _(q, kv_cache, gather_blocks, gather_offsets, visible, zero_rows, causal, scale):
    return q.new_empty(q.shape)


@torch.library.register_fake("specrt::paged_tree_attention", lib=LIB)
def _(q, kv_cache, block_tables, prefix_lens, packed_mask, tree_lens, scale, num_splits, out):
    return None


@torch.library.register_fake("specrt::tree_attention", lib=LIB)
def _(q, kv_cache, block_tables, prefix_lens, tree_mask, tree_lens, scale):
    check_cache(kv_cache, block_tables)
    if q.dim() != 4 or block_tables.shape[0] != q.shape[0]:
        raise ValueError(f"q must be [B={block_tables.shape[0]}, T, H_q, D], got "
                         f"{tuple(q.shape)}")
    return q.new_empty(q.shape)


@torch.library.register_fake("specrt::cpu_tree_attention", lib=LIB)
def _(q, kv_cache, block_tables, prefix_lens, byte_mask, tree_lens, scale, out, bf16=False):
    return None


_cpu_op = torch.ops.specrt.cpu_tree_attention.default
_gathered_op = torch.ops.specrt.gathered_tree_attention.default
_paged_op = torch.ops.specrt.paged_tree_attention.default
