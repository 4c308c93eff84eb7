"""Paged KV movement: :func:`append_kv` (new tokens' K/V) and :func:`commit_kv`
(an accepted tree path's K/V to contiguous positions).

Each public function turns Python scalars into tensors and calls its custom op,
``torch.ops.specrt.append_kv`` / ``torch.ops.specrt.commit_kv``; the op's CPU/CUDA
implementation checks shapes, dtypes and devices, normalises the index tensors to
contiguous int64 and runs the backend :func:`~specrt.ops.backend_for` picks:

* ``cpu``: specrt._C (csrc/kv_cpu.cpp) over a uint8 view of the cache; positions
  beyond a sequence's block table raise ``IndexError`` and leave the cache untouched.
* ``triton``: specrt/kernels/kv_cache.py; such positions are skipped (no host sync).
* ``cuda``: specrt._C's CUDA code (csrc/kv_cuda.cu) on the current stream.

The fake implementations run the same shape checks, so shape errors show at trace
time under ``torch.compile`` too.
"""
from __future__ import annotations

import torch

from specrt.ops._backend import LIB, as_i64, backend_for, check_cache, current_stream, native

__all__ = ["append_kv", "commit_kv"]


# ---------------------------------------------------------------------------
# public API

def append_kv(kv_cache: torch.Tensor, block_tables: torch.Tensor,
              start_pos: torch.Tensor | int, k: torch.Tensor, v: torch.Tensor,
              lens: torch.Tensor | None = None) -> None:
    """Write new keys and values into one layer's paged cache, in place.

    Args:
        kv_cache: ``[num_blocks, 2, block_size, H_kv, D]`` (index 0 = K, 1 = V), any
            float dtype, contiguous.
        block_tables: ``[B, max_blocks]`` int32 on the cache's device: block ids of each
            sequence, in order.
        start_pos: ``[B]`` int tensor (any integer dtype, any device), or a Python int
            for every row: position of ``k[b, 0]``.
        k, v: ``[B, T, H_kv, D]``, the cache's dtype and device (any strides).
        lens: ``[B]`` int tensor or None: only ``t < lens[b]`` are written (default T).

    Position ``p`` of sequence ``b`` lives in block ``block_tables[b, p // block_size]``
    at offset ``p % block_size``. The blocks must already be allocated.

    Raises:
        ValueError: mismatched shapes, dtypes or devices.
        IndexError: (``cpu`` backend) a position beyond the sequence's block table.
    """
    if isinstance(start_pos, int):
        start_pos = torch.full((k.shape[0],), start_pos, dtype=torch.int64,
                               device=kv_cache.device)
    _append_kv_op(kv_cache, block_tables, start_pos, k, v, lens)


def commit_kv(kv_cache: torch.Tensor, block_tables: torch.Tensor, prefix_lens: torch.Tensor,
              path: torch.Tensor, path_lens: torch.Tensor) -> None:
    """Move the K/V of an accepted tree path into contiguous positions, in place.

    Args:
        kv_cache: ``[num_blocks, 2, block_size, H_kv, D]``, contiguous.
        block_tables: ``[B, max_blocks]`` int32 on the cache's device.
        prefix_lens: ``[B]`` int: committed length before the tree; tree node ``i``
            sits at position ``prefix_lens[b] + i``.
        path: ``[B, P]`` int: accepted node indices, strictly increasing, ``path[b, 0]``
            normally 0 (the root).
        path_lens: ``[B]`` int: valid entries of each row of ``path``.

    After the call node ``path[b, i]``'s K/V is at position ``prefix_lens[b] + i``.
    Overlapping source and destination ranges are handled (in-order copy). Several
    layers at once: view ``[L, num_blocks, ...]`` as ``[L * num_blocks, ...]`` and
    repeat the rows with block ids offset by ``l * num_blocks``.

    Raises:
        ValueError: mismatched shapes or devices; (``cpu``) a path that is not
            increasing or longer than its row.
        IndexError: (``cpu`` backend) a position beyond the sequence's block table.
    """
    _commit_kv_op(kv_cache, block_tables, prefix_lens, path, path_lens)


# ---------------------------------------------------------------------------
# checks

def _check_append(kv_cache, block_tables, k, v) -> tuple[int, int]:
    check_cache(kv_cache, block_tables)
    if k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"k and v must both be [B, T, H_kv, D], got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    B, T = k.shape[:2]
    if k.shape[2:] != kv_cache.shape[3:] or k.dtype != kv_cache.dtype or v.dtype != k.dtype:
        raise ValueError(f"k/v {tuple(k.shape[2:])} {k.dtype} do not match the cache "
                         f"{tuple(kv_cache.shape[3:])} {kv_cache.dtype}")
    if k.device != kv_cache.device or v.device != kv_cache.device:
        raise ValueError(f"k/v are on {k.device}/{v.device}, kv_cache on {kv_cache.device}")
    if block_tables.shape[0] != B:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows for B={B}")
    return B, T


def _check_commit(kv_cache, block_tables, path) -> int:
    check_cache(kv_cache, block_tables)
    if path.dim() != 2:
        raise ValueError(f"path must be [B, P], got {tuple(path.shape)}")
    B = path.shape[0]
    if block_tables.shape[0] != B:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows for B={B}")
    return B


def _byte_rows(kv_cache: torch.Tensor) -> torch.Tensor:
    nb, _, bs = kv_cache.shape[:3]
    return kv_cache.view(torch.uint8).view(nb, 2, bs, -1)


def _row_bytes(kv_cache: torch.Tensor) -> int:
    return kv_cache[0, 0, 0].numel() * kv_cache.element_size()


# ---------------------------------------------------------------------------
# torch.ops.specrt implementations (CPU and CUDA dispatch keys)

def _append_kv_impl(kv_cache, block_tables, start_pos, k, v, lens=None):
    B, T = _check_append(kv_cache, block_tables, k, v)
    dev = kv_cache.device
    start = as_i64(start_pos, B, "start_pos", dev)
    ln = as_i64(lens, B, "lens", dev, default=T)
    k, v = k.contiguous(), v.contiguous()
    bt = block_tables.contiguous()
    backend = backend_for(kv_cache)
    if backend == "triton":
        from specrt.kernels import kv_cache as kern

        kern.append_kv(kv_cache, bt, start, k, v, ln)
    elif backend == "cuda":
        native().append_kv_cuda(kv_cache.data_ptr(), bt.data_ptr(), bt.shape[1],
                                kv_cache.shape[2], _row_bytes(kv_cache), start.data_ptr(),
                                k.data_ptr(), v.data_ptr(), ln.data_ptr(), B, T,
                                current_stream(dev))
    else:
        native().append_kv(_byte_rows(kv_cache).numpy(), bt.numpy(), start.numpy(),
                           k.view(torch.uint8).reshape(B, T, -1).numpy(),
                           v.view(torch.uint8).reshape(B, T, -1).numpy(), ln.numpy())


def _commit_kv_impl(kv_cache, block_tables, prefix_lens, path, path_lens):
    B = _check_commit(kv_cache, block_tables, path)
    dev = kv_cache.device
    prefix = as_i64(prefix_lens, B, "prefix_lens", dev)
    plen = as_i64(path_lens, B, "path_lens", dev)
    path = path.to(device=dev, dtype=torch.int64).contiguous()
    bt = block_tables.contiguous()
    backend = backend_for(kv_cache)
    if backend == "triton":
        from specrt.kernels import kv_cache as kern

        kern.commit_kv(kv_cache, bt, prefix, path, plen)
    elif backend == "cuda":
        native().commit_kv_cuda(kv_cache.data_ptr(), bt.data_ptr(), bt.shape[1],
                                kv_cache.shape[2], _row_bytes(kv_cache), prefix.data_ptr(),
                                path.data_ptr(), plen.data_ptr(), B, path.shape[1],
                                current_stream(dev))
    else:
        native().commit_kv(_byte_rows(kv_cache).numpy(), bt.numpy(), prefix.numpy(),
                           path.numpy(), plen.numpy())


LIB.define("append_kv(Tensor(a!) kv_cache, Tensor block_tables, Tensor start_pos, Tensor k, "
           "Tensor v, Tensor? lens=None) -> ()")
LIB.define("commit_kv(Tensor(a!) kv_cache, Tensor block_tables, Tensor prefix_lens, "
           "Tensor path, Tensor path_lens) -> ()")
for _key in ("CPU", "CUDA"):
    LIB.impl("append_kv", _append_kv_impl, _key)
    LIB.impl("commit_kv", _commit_kv_impl, _key)


@torch.library.register_fake("specrt::append_kv", lib=LIB)
def _(kv_cache, block_tables, start_pos, k, v, lens=None):
    _check_append(kv_cache, block_tables, k, v)
    return None


@torch.library.register_fake("specrt::commit_kv", lib=LIB)
def _(kv_cache, block_tables, prefix_lens, path, path_lens):
    _check_commit(kv_cache, block_tables, path)
    return None


_append_kv_op = torch.ops.specrt.append_kv.default
_commit_kv_op = torch.ops.specrt.commit_kv.default
