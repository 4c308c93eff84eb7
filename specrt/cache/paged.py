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

    def reserve_many(self, lens: dict[int, int]) -> None:
        """:meth:`reserve` for several sequences, all or nothing."""
        need = sum(max(0, -(-n // self.block_size) - len(self.seqs[i].blocks))
                   for i, n in lens.items())
        if need > self.allocator.num_free:
            raise OutOfBlocks(f"KV cache out of blocks: need {need}, {self.allocator.num_free}"
                              f" free of {self.allocator.num_blocks}; raise num_blocks or lower"
                              " the batch size")
        for i, n in lens.items():
            self.reserve(i, n)

    def set_length(self, seq_id: int, length: int) -> None:
        """Set the committed length (shrinking drops rejected speculative tokens).

        Blocks stay reserved; :meth:`trim` returns the ones past the length.
        """
        s = self.seqs[seq_id]
        if not 0 <= length <= len(s.blocks) * self.block_size:
            raise ValueError(f"length {length} outside the reserved blocks of sequence {seq_id}")
        s.length = length

    def trim(self, seq_id: int) -> None:
        """Return the blocks past the sequence's length to the pool."""
        s = self.seqs[seq_id]
        keep = -(-s.length // self.block_size)
        if keep < len(s.blocks):
            self.allocator.free(s.blocks[keep:])
            del s.blocks[keep:]

    def release(self, seq_id: int) -> None:
        s = self.seqs.pop(seq_id, None)
        if s is not None:
            self.allocator.free(s.blocks)

    def block_table(self, seq_ids: list[int]) -> torch.Tensor:
        """``[len(seq_ids), max_blocks]`` int32 on the cache's device (pad: 0)."""
        width = max(1, max(len(self.seqs[i].blocks) for i in seq_ids))
        bt = torch.zeros(len(seq_ids), width, dtype=torch.int32)
        for r, i in enumerate(seq_ids):
            b = self.seqs[i].blocks
            if b:
                bt[r, :len(b)] = torch.tensor(b, dtype=torch.int32)
        return bt.to(self.kv.device)

    def gather(self, seq_id: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ``[length, H_kv, D]`` of one sequence (for tests and debugging)."""
        s = self.seqs[seq_id]
        pos = torch.arange(s.length)
        blocks = torch.tensor(s.blocks, dtype=torch.long)[pos // self.block_size]
        kv = self.kv[layer][blocks.to(self.kv.device), :, (pos % self.block_size).to(self.kv.device)]
        return kv[:, 0], kv[:, 1]
