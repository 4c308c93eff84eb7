"""Paged KV cache: block pool, allocator, per-sequence block tables."""
from specrt.cache.paged import BlockAllocator, OutOfBlocks, PagedKVCache

__all__ = ["BlockAllocator", "OutOfBlocks", "PagedKVCache"]
