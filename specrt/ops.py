"""specrt's kernel API: paged-KV attention over draft trees, KV movement, verification.

Every function takes torch tensors on CPU or CUDA and returns the same result
(within dtype tolerance) on both. CUDA tensors run the Triton kernels of
:mod:`specrt.kernels` (or specrt._C CUDA code); CPU tensors run specrt._C or torch.
``SPECRT_OPS_BACKEND=triton|cuda|cpu|auto`` (default ``auto``) forces one
implementation; ``triton`` with ``TRITON_INTERPRET=1`` runs the Triton kernels on
CPU tensors (how CI checks them without a GPU).

Layout of one layer's paged cache (FlashInfer's NHD layout):
``kv_cache`` ``[num_blocks, 2, block_size, H_kv, D]``, index 0 = K, 1 = V;
``block_tables`` ``[B, max_blocks]`` int32, block ids of each sequence in order.

The ops are also registered as ``torch.ops.specrt.*`` custom ops (with fake
implementations) so code under ``torch.compile`` and other stacks can call them.
"""
from __future__ import annotations

import math
import os

import torch

from specrt.verify import chain_verify, verify_tree  # noqa: F401  (re-exported)

__all__ = ["append_kv", "commit_kv", "tree_attention", "plan_tree_attention", "verify_tree",
           "chain_verify", "backend_for", "build_tree_mask"]

_BACKENDS = ("auto", "triton", "cuda", "cpu")


def backend_for(t: torch.Tensor) -> str:
    """The implementation ``specrt.ops`` uses for tensors on ``t``'s device.

    ``SPECRT_OPS_BACKEND`` wins when set to triton, cuda or cpu; ``auto`` picks
    ``triton`` for CUDA tensors and ``cpu`` otherwise.
    """
    b = os.environ.get("SPECRT_OPS_BACKEND", "auto").lower()
    if b not in _BACKENDS:
        raise ValueError(f"SPECRT_OPS_BACKEND={b!r}: expected one of {_BACKENDS}")
    if b == "auto":
        return "triton" if t.is_cuda else "cpu"
    if b == "cpu" and t.is_cuda:
        raise ValueError("SPECRT_OPS_BACKEND=cpu but the tensors are on CUDA")
    if b == "cuda" and not t.is_cuda:
        raise ValueError("SPECRT_OPS_BACKEND=cuda but the tensors are on the CPU")
    if b == "triton" and not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("SPECRT_OPS_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1 "
                         "set before specrt is imported")
    return b


def _native():
    from specrt import _C

    return _C


# ---------------------------------------------------------------------------
# validation

def _check_cache(kv_cache: torch.Tensor, block_tables: torch.Tensor) -> None:
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


def _as_i64(x: torch.Tensor | int | None, B: int, name: str, device, default=None):
    if x is None:
        if default is None:
            raise ValueError(f"{name} is required")
        x = default
    if isinstance(x, int):
        return torch.full((B,), x, dtype=torch.int64, device=device)
    if x.dim() != 1 or x.shape[0] != B:
        raise ValueError(f"{name} must be [B={B}], got {tuple(x.shape)}")
    return x.to(device=device, dtype=torch.int64).contiguous()


def _byte_rows(kv_cache: torch.Tensor) -> torch.Tensor:
    nb, _, bs = kv_cache.shape[:3]
    return kv_cache.view(torch.uint8).view(nb, 2, bs, -1)


# ---------------------------------------------------------------------------
# append_kv

def append_kv(kv_cache: torch.Tensor, block_tables: torch.Tensor, start_pos: torch.Tensor,
              k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor | None = None) -> None:
    """Write new keys and values into a paged cache, in place.

    Args:
        kv_cache: ``[num_blocks, 2, block_size, H_kv, D]``, any float dtype, contiguous.
        block_tables: ``[B, max_blocks]`` int32.
        start_pos: ``[B]`` int (or a Python int for all): position of ``k[:, 0]``.
        k, v: ``[B, T, H_kv, D]``, the cache's dtype.
        lens: ``[B]`` int or None: only ``t < lens[b]`` are written (default all T).

    Position ``p`` of sequence ``b`` lives in block ``block_tables[b, p // block_size]``
    at offset ``p % block_size``. The blocks must already be allocated.
    """
    _check_cache(kv_cache, block_tables)
    if k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"k and v must both be [B, T, H_kv, D], got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    B, T = k.shape[:2]
    if k.shape[2:] != kv_cache.shape[3:] or k.dtype != kv_cache.dtype:
        raise ValueError(f"k/v {tuple(k.shape[2:])} {k.dtype} do not match the cache "
                         f"{tuple(kv_cache.shape[3:])} {kv_cache.dtype}")
    if block_tables.shape[0] != B:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows for B={B}")
    dev = kv_cache.device
    start = _as_i64(start_pos, B, "start_pos", dev)
    ln = _as_i64(lens, B, "lens", dev, default=T)
    k, v = k.contiguous(), v.contiguous()
    backend = backend_for(kv_cache)
    if backend == "triton":
        from specrt.kernels import kv_cache as kern

        kern.append_kv(kv_cache, block_tables.contiguous(), start, k, v, ln)
    elif backend == "cuda":
        C = _native()
        row = kv_cache[0, 0, 0].numel() * kv_cache.element_size()
        C.append_kv_cuda(kv_cache.data_ptr(), block_tables.contiguous().data_ptr(),
                         block_tables.shape[1], kv_cache.shape[2], row, start.data_ptr(),
                         k.data_ptr(), v.data_ptr(), ln.data_ptr(), B, T,
                         torch.cuda.current_stream(dev).cuda_stream)
    else:
        C = _native()
        C.append_kv(_byte_rows(kv_cache).numpy(), block_tables.contiguous().numpy(),
                    start.numpy(), k.view(torch.uint8).reshape(B, T, -1).numpy(),
                    v.view(torch.uint8).reshape(B, T, -1).numpy(), ln.numpy())


# ---------------------------------------------------------------------------
# commit_kv

def commit_kv(kv_cache: torch.Tensor, block_tables: torch.Tensor, prefix_lens: torch.Tensor,
              path: torch.Tensor, path_lens: torch.Tensor) -> None:
    """Move the K/V of an accepted tree path into contiguous positions, in place.

    Args:
        kv_cache: ``[num_blocks, 2, block_size, H_kv, D]``.
        block_tables: ``[B, max_blocks]`` int32.
        prefix_lens: ``[B]`` int: committed length before the tree; tree node ``i``
            sits at position ``prefix_lens[b] + i``.
        path: ``[B, P]`` int: accepted node indices, strictly increasing, ``path[b, 0]``
            normally 0 (the root).
        path_lens: ``[B]`` int: valid entries of each row of ``path``.

    After the call node ``path[b, i]``'s K/V is at position ``prefix_lens[b] + i``.
    Overlapping source and destination ranges are handled (in-order copy).
    """
    _check_cache(kv_cache, block_tables)
    if path.dim() != 2:
        raise ValueError(f"path must be [B, P], got {tuple(path.shape)}")
    B = path.shape[0]
    dev = kv_cache.device
    prefix = _as_i64(prefix_lens, B, "prefix_lens", dev)
    plen = _as_i64(path_lens, B, "path_lens", dev)
    path = path.to(device=dev, dtype=torch.int64).contiguous()
    backend = backend_for(kv_cache)
    if backend == "triton":
        from specrt.kernels import kv_cache as kern

        kern.commit_kv(kv_cache, block_tables.contiguous(), prefix, path, plen)
    elif backend == "cuda":
        C = _native()
        row = kv_cache[0, 0, 0].numel() * kv_cache.element_size()
        C.commit_kv_cuda(kv_cache.data_ptr(), block_tables.contiguous().data_ptr(),
                         block_tables.shape[1], kv_cache.shape[2], row, prefix.data_ptr(),
                         path.data_ptr(), plen.data_ptr(), B, path.shape[1],
                         torch.cuda.current_stream(dev).cuda_stream)
    else:
        _native().commit_kv(_byte_rows(kv_cache).numpy(), block_tables.contiguous().numpy(),
                            prefix.numpy(), path.numpy(), plen.numpy())


# ---------------------------------------------------------------------------
# tree_attention

def build_tree_mask(parents: torch.Tensor, tree_lens: torch.Tensor | None = None) -> torch.Tensor:
    """Ancestor mask of draft trees.

    Args:
        parents: ``[B, T]`` int, ``parents[b, 0] = -1`` and ``parents[b, i] < i``.
        tree_lens: ``[B]`` or None; nodes at or beyond it get an all-false row.

    Returns:
        ``[B, T, T]`` bool, ``mask[b, i, j]`` true iff j is i or an ancestor of i.
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


def tree_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                   prefix_lens: torch.Tensor, tree_mask: torch.Tensor | None = None,
                   tree_lens: torch.Tensor | None = None, scale: float | None = None, *,
                   packed_mask: torch.Tensor | None = None, num_splits: int | None = None,
                   out: torch.Tensor | None = None, plan: "TreeAttentionPlan | None" = None
                   ) -> torch.Tensor:
    """Attention of draft-tree queries over a paged cache (prefix + the tree itself).

    Args:
        q: ``[B, T, H_q, D]``; ``H_q`` a multiple of ``H_kv``.
        kv_cache: ``[num_blocks, 2, block_size, H_kv, D]``, same dtype as q; the tree
            tokens' K/V are already written at positions
            ``prefix_lens[b] .. prefix_lens[b] + T - 1``.
        block_tables: ``[B, max_blocks]`` int32.
        prefix_lens: ``[B]`` int: committed tokens every query sees in full.
        tree_mask: ``[B, T, T]`` bool, ``tree_mask[b, i, j]`` true iff node j is i or an
            ancestor of i; None means causal (prefill, chains, decode with T=1).
        tree_lens: ``[B]`` int or None: valid nodes per sequence; rows and columns at or
            beyond it are ignored and their output is 0.
        scale: softmax scale, default ``1/sqrt(D)``.
        packed_mask: keyword-only, ``[B, T, ceil(T/64)]`` (or ``[B, T]`` for T <= 64)
            int64 from ``specrt.kernels.attention.pack_tree_mask(tree_mask)``; build it
            once per step and share it across layers. Takes precedence over ``tree_mask``.
        num_splits: keyword-only, split-KV factor of the Triton kernel (None = auto;
            1 = single pass); ignored by the CPU path.
        out: keyword-only, preallocated ``[B, T, H_q, D]`` output in q's dtype; every
            element is written and it is returned.
        plan: keyword-only, a :func:`plan_tree_attention` result for this step; the
            mask/index work is then skipped (block_tables, prefix_lens, tree_mask and
            tree_lens must be the ones it was planned with).

    Returns:
        ``[B, T, H_q, D]`` in q's dtype (accumulation in fp32).
    """
    if plan is not None and out is None and backend_for(q) == "cpu":
        # hot path of the model on CPU: everything was checked when planning
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        return _tree_attention_torch(q, kv_cache, None, None, None, None, scale, plan)
    _check_cache(kv_cache, block_tables)
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H_q, D], got {tuple(q.shape)}")
    B, T, Hq, D = q.shape
    Hkv = kv_cache.shape[3]
    if kv_cache.shape[4] != D or Hq % Hkv != 0:
        raise ValueError(f"q heads/dim {Hq}x{D} incompatible with cache {Hkv}x{kv_cache.shape[4]}")
    if block_tables.shape[0] != B:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows for B={B}")
    if tree_mask is not None and tuple(tree_mask.shape) != (B, T, T):
        raise ValueError(f"tree_mask must be [B={B}, T={T}, T={T}], got {tuple(tree_mask.shape)}")
    dev = q.device
    prefix = _as_i64(prefix_lens, B, "prefix_lens", dev)
    tl = None if tree_lens is None else _as_i64(tree_lens, B, "tree_lens", dev)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    backend = backend_for(q)
    if out is not None and (tuple(out.shape) != (B, T, Hq, D) or out.dtype != q.dtype
                            or out.device != dev):
        raise ValueError(f"out must be [{B}, {T}, {Hq}, {D}] {q.dtype} on {dev}, got "
                         f"{tuple(out.shape)} {out.dtype} on {out.device}")
    if packed_mask is not None and (packed_mask.dim() not in (2, 3)
                                    or tuple(packed_mask.shape[:2]) != (B, T)):
        raise ValueError(f"packed_mask must be [B={B}, T={T}, W] int64, got "
                         f"{tuple(packed_mask.shape)}")
    if plan is not None and packed_mask is None:
        packed_mask = plan.packed_mask
    if backend in ("triton", "cuda"):
        from specrt.kernels import attention as kern

        if out is not None and out.stride(-1) != 1:
            res = kern.tree_attention(q, kv_cache, block_tables.contiguous(), prefix, tree_mask,
                                      tl, scale, packed_mask=packed_mask, num_splits=num_splits)
            return out.copy_(res)
        return kern.tree_attention(q, kv_cache, block_tables.contiguous(), prefix, tree_mask,
                                   tl, scale, packed_mask=packed_mask, num_splits=num_splits,
                                   out=out)
    if packed_mask is not None:
        words = packed_mask.reshape(B, T, -1).cpu()
        bit = torch.arange(T)
        tree_mask = ((words[:, :, bit // 64] >> (bit % 64)) & 1).bool()
    res = _tree_attention_torch(q, kv_cache, block_tables, prefix, tree_mask, tl, scale, plan)
    return res if out is None else out.copy_(res)


class TreeAttentionPlan:
    """Host-side work of :func:`tree_attention` done once per step and shared by all
    layers (they attend over the same positions with the same mask).

    Build with :func:`plan_tree_attention`; pass as ``plan=`` to :func:`tree_attention`.
    CUDA: the packed tree mask. CPU: gather indices ``[B, L]`` and the visibility mask.
    """

    def __init__(self, block_tables, prefix, tree_mask, tree_lens, T, block_size, device):
        self.block_tables = block_tables.contiguous()
        self.prefix = prefix
        self.tree_lens = tree_lens
        self.T = T
        self.tree_mask = tree_mask
        self.packed_mask = None
        self.device = device
        self.causal = False
        if device.type == "cuda" or backend_for(block_tables) == "triton":
            if tree_mask is not None:
                from specrt.kernels.attention import pack_tree_mask

                self.packed_mask = pack_tree_mask(tree_mask)
            return
        B = prefix.shape[0]
        tl = torch.full((B,), T, dtype=torch.int64) if tree_lens is None else tree_lens.cpu()
        pl = prefix.cpu()
        # plain causal attention (a single prefill from position 0): SDPA's causal kernel
        self.causal = (B == 1 and tree_mask is None and T > 1 and int(pl[0]) == 0
                       and int(tl[0]) == T)
        L = int((pl + T).max())
        pos = torch.arange(L)
        slot = (pos // block_size).clamp(max=block_tables.shape[1] - 1)
        self.blocks = block_tables.long()[:, slot].to(device)          # [B, L]
        self.offsets = (pos % block_size).to(device)                    # [L]
        rel = pos[None, :] - pl[:, None]                                # [B, L]
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
        self.zero_rows = zero.to(device) if bool(zero.any()) else None
        self.mask = None if bool(mask.all()) else mask[:, None].to(device)  # [B, 1, T, L]


def plan_tree_attention(block_tables: torch.Tensor, prefix_lens: torch.Tensor, T: int,
                        block_size: int, tree_mask: torch.Tensor | None = None,
                        tree_lens: torch.Tensor | None = None) -> TreeAttentionPlan:
    """Plan :func:`tree_attention` for one step (arguments as there; ``T`` tree nodes,
    ``block_size`` of the cache). The plan is valid for every layer of that step."""
    dev = block_tables.device
    B = block_tables.shape[0]
    prefix = _as_i64(prefix_lens, B, "prefix_lens", dev)
    tl = None if tree_lens is None else _as_i64(tree_lens, B, "tree_lens", dev)
    if tree_mask is not None and tuple(tree_mask.shape) != (B, T, T):
        raise ValueError(f"tree_mask must be [B={B}, T={T}, T={T}], got {tuple(tree_mask.shape)}")
    return TreeAttentionPlan(block_tables, prefix, tree_mask, tl, T, block_size, dev)


def _tree_attention_torch(q, kv_cache, block_tables, prefix, tree_mask, tree_lens, scale,
                          plan: TreeAttentionPlan | None = None):
    """CPU path: gather each sequence's K/V and run masked SDPA (fp32 accumulation)."""
    B, T, Hq, D = q.shape
    if plan is None:
        plan = TreeAttentionPlan(block_tables, prefix, tree_mask, tree_lens, T,
                                 kv_cache.shape[2], q.device)
    kv = kv_cache[plan.blocks, :, plan.offsets]                        # [B, L, 2, Hkv, D]
    kf = kv[:, :, 0].float().transpose(1, 2)                           # [B, Hkv, L, D]
    vf = kv[:, :, 1].float().transpose(1, 2)
    qf = q.float().transpose(1, 2)                                     # [B, Hq, T, D]
    out = torch.nn.functional.scaled_dot_product_attention(
        qf, kf, vf, attn_mask=None if plan.causal else plan.mask, is_causal=plan.causal,
        scale=scale, enable_gqa=(Hq != kv.shape[3]))
    out = out.transpose(1, 2)
    if plan.zero_rows is not None:
        out = out.masked_fill(plan.zero_rows[:, :, None, None], 0.0)
    return out.to(q.dtype)


# ---------------------------------------------------------------------------
# torch.library registration (for torch.compile and other stacks)

@torch.library.custom_op("specrt::append_kv", mutates_args=("kv_cache",))
def _append_kv_op(kv_cache: torch.Tensor, block_tables: torch.Tensor, start_pos: torch.Tensor,
                  k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor) -> None:
    append_kv(kv_cache, block_tables, start_pos, k, v, lens)


@torch.library.custom_op("specrt::commit_kv", mutates_args=("kv_cache",))
def _commit_kv_op(kv_cache: torch.Tensor, block_tables: torch.Tensor, prefix_lens: torch.Tensor,
                  path: torch.Tensor, path_lens: torch.Tensor) -> None:
    commit_kv(kv_cache, block_tables, prefix_lens, path, path_lens)


@_append_kv_op.register_fake
def _(kv_cache, block_tables, start_pos, k, v, lens):
    return None


@_commit_kv_op.register_fake
def _(kv_cache, block_tables, prefix_lens, path, path_lens):
    return None


@torch.library.custom_op("specrt::tree_attention", mutates_args=())
def _tree_attention_op(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                       prefix_lens: torch.Tensor, tree_mask: torch.Tensor | None,
                       tree_lens: torch.Tensor | None, scale: float) -> torch.Tensor:
    return tree_attention(q, kv_cache, block_tables, prefix_lens, tree_mask, tree_lens, scale)


@_tree_attention_op.register_fake
def _(q, kv_cache, block_tables, prefix_lens, tree_mask, tree_lens, scale):
    return torch.empty_like(q)
