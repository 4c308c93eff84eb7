"""Paged KV cache: one block pool per layer, a free-list allocator, block tables.

A sequence owns an ordered list of block ids; position ``p`` lives in block
``blocks[p // block_size]`` at offset ``p % block_size``. Sequences grow by whole
blocks and shrink (dropping rejected speculative tokens returns whole blocks no
longer needed to the free list).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


class OutOfBlocks(RuntimeError):
    """Raised when the pool cannot hold a sequence's growth. Nothing was changed."""


class BlockAllocator:
    """Free list of block ids ``0 .. num_blocks-1``."""

    def __init__(self, num_blocks: int):
        if num_blocks <= 0:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks; raise :class:`OutOfBlocks` (taking none) if fewer are free."""
        if n > len(self._free):
            raise OutOfBlocks(f"KV cache out of blocks: need {n}, {len(self._free)} free of "
                              f"{self.num_blocks}; raise num_blocks or lower the batch size")
        return [self._free.pop() for _ in range(n)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


def block_table_of(blocks: list[list[int]], device) -> torch.Tensor:
    """Block lists (one per sequence) -> ``[len(blocks), max_blocks]`` int32 on ``device``
    (pad: 0)."""
    bt = torch.zeros(len(blocks), max(1, max(len(b) for b in blocks)), dtype=torch.int32)
    for r, b in enumerate(blocks):
        if b:
            bt[r, :len(b)] = torch.tensor(b, dtype=torch.int32)
    return bt.to(device)


@dataclass
class SeqBlocks:
    """Blocks and committed length of one sequence."""

    blocks: list[int] = field(default_factory=list)
    length: int = 0


class PagedKVCache:
    """K/V pools of all layers plus the allocator and the sequences' block lists.

    ``kv[l]`` is layer ``l``'s pool ``[num_blocks, 2, block_size, H_kv, D]``.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype=torch.float32, device="cpu"):
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.kv = torch.zeros(num_layers, num_blocks, 2, block_size, num_kv_heads, head_dim,
                              dtype=dtype, device=device)
        self.allocator = BlockAllocator(num_blocks)
        self.seqs: dict[int, SeqBlocks] = {}

    @property
    def num_layers(self) -> int:
        return self.kv.shape[0]

    def add(self, seq_id: int) -> None:
        if seq_id in self.seqs:
            raise ValueError(f"sequence {seq_id} already exists")
        self.seqs[seq_id] = SeqBlocks()

    def length(self, seq_id: int) -> int:
        return self.seqs[seq_id].length

    def reserve(self, seq_id: int, total_len: int) -> None:
        """Make sure ``seq_id`` has blocks for positions ``< total_len``.

        Raises :class:`OutOfBlocks` without allocating anything if the pool is short.
        """
        s = self.seqs[seq_id]
        need = -(-total_len // self.block_size) - len(s.blocks)
        if need > 0:
            s.blocks.extend(self.allocator.allocate(need))

    def set_length(self, seq_id: int, length: int) -> None:
        """Set the committed length (shrinking drops rejected speculative tokens).

        Blocks stay reserved until :meth:`release`.
        """
        s = self.seqs[seq_id]
        if not 0 <= length <= len(s.blocks) * self.block_size:
            raise ValueError(f"length {length} outside the reserved blocks of sequence {seq_id}")
        s.length = length

    def commit(self, seq_ids: list[int], paths: list[list[int]]) -> None:
        """Keep one verified tree per sequence, in every layer at once.

        Sequence ``seq_ids[i]`` had a tree written at positions ``length .. length+T-1``
        (node ``j`` at ``length + j``); ``paths[i]`` are the accepted node indices,
        increasing, root (0) first. Node ``paths[i][k]``'s K/V moves to ``length + k``
        in every layer and the length grows by ``len(paths[i])``; the other nodes are
        dropped. A path ``0, 1, .., n-1`` (a chain's accepted prefix) moves nothing.
        """
        from specrt import ops

        moved = [i for i, p in enumerate(paths) if p != list(range(len(p)))]
        if moved:
            # layers stacked as blocks: layer l's block b is row l * NB + b of one pool
            L, NB = self.kv.shape[:2]
            kv = self.kv.view(L * NB, *self.kv.shape[2:])
            bt = self.block_table([seq_ids[i] for i in moved])
            dev = self.kv.device
            bts = torch.cat([bt + layer * NB for layer in range(L)])
            P = max(len(paths[i]) for i in moved)
            pth = torch.tensor([paths[i] + [-1] * (P - len(paths[i])) for i in moved])
            prefix = torch.tensor([self.seqs[seq_ids[i]].length for i in moved])
            ops.commit_kv(kv, bts, prefix.repeat(L).to(dev), pth.repeat(L, 1).to(dev),
                          torch.tensor([len(paths[i]) for i in moved]).repeat(L).to(dev))
        for sid, p in zip(seq_ids, paths):
            self.set_length(sid, self.seqs[sid].length + len(p))

    def release(self, seq_id: int) -> None:
        s = self.seqs.pop(seq_id, None)
        if s is not None:
            self.allocator.free(s.blocks)

    def block_table(self, seq_ids: list[int]) -> torch.Tensor:
        """``[len(seq_ids), max_blocks]`` int32 on the cache's device (pad: 0)."""
        return block_table_of([self.seqs[i].blocks for i in seq_ids], self.kv.device)

    def gather(self, seq_id: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ``[length, H_kv, D]`` of one sequence (for tests and debugging)."""
        s = self.seqs[seq_id]
        pos = torch.arange(s.length)
        blocks = torch.tensor(s.blocks, dtype=torch.long)[pos // self.block_size]
        kv = self.kv[layer][blocks.to(self.kv.device), :, (pos % self.block_size).to(self.kv.device)]
        return kv[:, 0], kv[:, 1]
