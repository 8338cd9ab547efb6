"""Paged KV cache: a pool of fixed-size blocks per layer and a block table per sequence.

Blocks are reserved when a sequence is admitted (enough for its prompt and its max_tokens), so a
running sequence can never run out of cache and nothing is evicted behind its back; they return to
the pool when the sequence finishes or is cancelled.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import GemmaConfig


@dataclass(frozen=True)
class CacheUsage:
    total_blocks: int
    used_blocks: int
    block_size: int


class BlockPool:
    """Hands out block ids; knows nothing about tensors."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


def bytes_per_block(cfg: GemmaConfig, block_size: int, dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return cfg.num_layers * 2 * block_size * cfg.num_kv_heads * cfg.head_dim * itemsize


class PagedKVCache:
    """K and V for every layer as flat slot arrays [num_blocks * block_size, kv_heads, head_dim];
    slot = block_id * block_size + offset."""

    def __init__(self, cfg: GemmaConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        shape = (cfg.num_layers, 2, num_blocks * block_size, cfg.num_kv_heads, cfg.head_dim)
        self.slots = torch.zeros(shape, dtype=dtype, device=device)

    @classmethod
    def from_budget(cls, cfg: GemmaConfig, budget_bytes: int, block_size: int, dtype, device):
        num_blocks = budget_bytes // bytes_per_block(cfg, block_size, dtype)
        if num_blocks < 1:
            raise ValueError(f"KV cache budget {budget_bytes} bytes holds no block of {block_size} tokens")
        return cls(cfg, num_blocks, block_size, dtype, device)

    def layer(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.slots[idx, 0], self.slots[idx, 1]

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def usage(self) -> CacheUsage:
        return CacheUsage(self.pool.num_blocks, self.pool.num_blocks - self.pool.num_free, self.block_size)
