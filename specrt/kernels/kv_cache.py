"""Paged KV movement (Triton): append new K/V, commit an accepted tree path.

Triton backend of :func:`specrt.ops.append_kv` / :func:`specrt.ops.commit_kv`
(``specrt.ops`` validates shapes and dtypes and passes int64 ``start``/``lens``/
``prefix``/``path``/``path_lens``, contiguous). The cache is
``[num_blocks, 2, block_size, H_kv, D]`` contiguous, so one position's K (or V)
of all heads is a contiguous row of ``H_kv * D`` elements; the kernels copy rows
in chunks of ``BLOCK`` elements and never interpret the values (any dtype).

Safety: a position whose block-table slot lies beyond ``max_blocks`` or whose
block id is outside ``[0, num_blocks)`` is skipped rather than written out of
bounds (the CPU backend raises instead; the GPU path avoids a host sync).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["append_kv", "commit_kv"]


def _block(row: int) -> tuple[int, int]:
    block = min(2048, max(16, triton.next_power_of_2(row)))
    return block, (4 if block >= 512 else 1)


@triton.jit
def _append_kv_kernel(KV, BT, START, K, V, LENS,
                      T, max_blocks, num_blocks, s_blk, s_kv, s_pos, ROW,
                      BLOCK_SIZE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)               # over B * T, (b, t) row-major
    b = pid // T
    t = pid % T
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    n = tl.load(LENS + b)
    pos = tl.load(START + b) + t
    slot = pos // BLOCK_SIZE
    ok = (t < n) & (pos >= 0) & (slot < max_blocks)
    blk = tl.load(BT + b.to(tl.int64) * max_blocks + slot, mask=ok, other=0).to(tl.int64)
    ok = ok & (blk >= 0) & (blk < num_blocks)
    m = (offs < ROW) & ok
    dst = KV + blk * s_blk + (pos % BLOCK_SIZE) * s_pos + offs
    src = pid.to(tl.int64) * ROW + offs
    tl.store(dst, tl.load(K + src, mask=m), mask=m)
    tl.store(dst + s_kv, tl.load(V + src, mask=m), mask=m)


@triton.jit
def _commit_kv_kernel(KV, BT, PREFIX, PATH, PLEN,
                      P, max_blocks, num_blocks, s_blk, s_kv, s_pos, ROW,
                      BLOCK_SIZE: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    col = offs < ROW
    prefix = tl.load(PREFIX + b)
    n = tl.minimum(tl.load(PLEN + b), P)
    bt_row = BT + b.to(tl.int64) * max_blocks
    path_row = PATH + b.to(tl.int64) * P
    # In order, load then store: path[i] >= i and increasing, so destination i is never
    # the source of a later step (a later source path[i'] >= i' > i); every source is
    # read before anything overwrites it, even when loads are hoisted by pipelining.
    for i in range(0, n):
        src = prefix + tl.load(path_row + i)
        dst = prefix + i
        s_slot = src // BLOCK_SIZE
        d_slot = dst // BLOCK_SIZE
        ok = (src != dst) & (s_slot < max_blocks) & (d_slot < max_blocks) & (dst >= 0)
        sb = tl.load(bt_row + s_slot, mask=ok, other=0).to(tl.int64)
        db = tl.load(bt_row + d_slot, mask=ok, other=0).to(tl.int64)
        ok = ok & (sb >= 0) & (sb < num_blocks) & (db >= 0) & (db < num_blocks)
        m = col & ok
        sp = KV + sb * s_blk + (src % BLOCK_SIZE) * s_pos + offs
        dp = KV + db * s_blk + (dst % BLOCK_SIZE) * s_pos + offs
        kk = tl.load(sp, mask=m)
        vv = tl.load(sp + s_kv, mask=m)
        tl.store(dp, kk, mask=m)
        tl.store(dp + s_kv, vv, mask=m)


def append_kv(kv_cache: torch.Tensor, block_tables: torch.Tensor, start: torch.Tensor,
              k: torch.Tensor, v: torch.Tensor, lens: torch.Tensor) -> None:
    """Write ``k``/``v`` into the paged cache at positions ``start[b] + t``, in place.

    Args:
        kv_cache: ``[num_blocks, 2, block_size, H_kv, D]`` contiguous, any dtype.
        block_tables: ``[B, max_blocks]`` int32 contiguous.
        start: ``[B]`` int64: position of ``k[b, 0]``.
        k, v: ``[B, T, H_kv, D]`` contiguous, the cache's dtype.
        lens: ``[B]`` int64: only ``t < lens[b]`` are written.

    One program per ``(b, t)`` and ``BLOCK``-element chunk of the ``H_kv * D`` row.
    """
    B, T = k.shape[:2]
    if B == 0 or T == 0:
        return
    row = kv_cache.stride(2)
    block, warps = _block(row)
    grid = (B * T, triton.cdiv(row, block))
    _append_kv_kernel[grid](
        kv_cache, block_tables, start, k, v, lens,
        T, block_tables.shape[1], kv_cache.shape[0],
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), row,
        BLOCK_SIZE=kv_cache.shape[2], BLOCK=block, num_warps=warps)


def commit_kv(kv_cache: torch.Tensor, block_tables: torch.Tensor, prefix: torch.Tensor,
              path: torch.Tensor, path_lens: torch.Tensor) -> None:
    """Move node ``path[b, i]``'s K/V (position ``prefix[b] + path[b, i]``) to ``prefix[b] + i``.

    Args:
        kv_cache: ``[num_blocks, 2, block_size, H_kv, D]`` contiguous, any dtype; in place.
        block_tables: ``[B, max_blocks]`` int32 contiguous.
        prefix: ``[B]`` int64: committed length before the tree.
        path: ``[B, P]`` int64 contiguous, strictly increasing node indices (so
            ``path[b, i] >= i``); not validated here.
        path_lens: ``[B]`` int64: valid entries per row (clamped to ``P``).

    One program per (sequence, chunk of the ``H_kv * D`` row) walks the path in order,
    which is what makes overlapping source/destination ranges safe; the path
    entries must not be processed in parallel.
    """
    B, P = path.shape
    if B == 0 or P == 0:
        return
    row = kv_cache.stride(2)
    block, warps = _block(row)
    grid = (B, triton.cdiv(row, block))
    _commit_kv_kernel[grid](
        kv_cache, block_tables, prefix, path, path_lens,
        P, block_tables.shape[1], kv_cache.shape[0],
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), row,
        BLOCK_SIZE=kv_cache.shape[2], BLOCK=block, num_warps=warps)
