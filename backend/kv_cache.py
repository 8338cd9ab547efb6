"""Paged KV cache: K/V tensors in fixed-size blocks, and the pool that hands the blocks out.

Blocks are allocated as sequences grow (the scheduler asks for one more block when a sequence's
next token starts a new one) and are reference-counted, so sequences sharing a prompt prefix share
its blocks. With prefix caching, every full block is named by a content hash that chains its
parent's hash with its own token ids; a block whose last reference goes keeps its K/V and its name
and waits, least recently used first, to be either reused by a later prompt with the same prefix or
evicted when the pool needs a fresh block.
"""
from __future__ import annotations

import collections
import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .config import GemmaConfig
from .memory import free_memory_bytes, total_memory_bytes, used_memory_bytes, utilization_budget
from .params import EngineConfig, blocks_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheUsage:
    total_blocks: int
    used_blocks: int  # referenced by a running (or preempted-and-resuming) sequence
    cached_blocks: int  # unreferenced, still holding a reusable prefix (evicted on demand)
    block_size: int
    num_bytes: int  # the K/V tensors' size: the budget the engine started with, rounded down to whole blocks


def block_hash(parent: Optional[int], token_ids: Sequence[int]) -> int:
    """The name of a full block: its tokens and, through the parent's name, every token before them.
    Python's tuple hash of ints is deterministic across processes; 64 bits make a collision (two
    different prefixes sharing a name) about 2**-64 per pair of blocks."""
    return hash((parent, tuple(token_ids)))


class BlockPool:
    """Block ids with reference counts and, for prefix caching, content names. Knows no tensors."""

    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self._free = list(range(num_blocks - 1, -1, -1))  # never named, or evicted; pop() gives low ids first
        self._refs = [0] * num_blocks
        self._name_of: dict[int, int] = {}  # block id -> its content hash
        self._block_named: dict[int, int] = {}  # content hash -> block id
        # Named blocks nobody references, least recently released first: reusable until evicted.
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: never used, or cached and evictable."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self._evictable)

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise RuntimeError(f"asked for {n} KV blocks, {self.num_free} free")
        blocks = []
        for _ in range(n):
            if self._free:
                block = self._free.pop()
            else:  # evict the least recently used cached prefix block
                block, _ = self._evictable.popitem(last=False)
                del self._block_named[self._name_of.pop(block)]
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; unnamed blocks with none left are free at once, named
        ones stay cached. Released last block first, so a sequence's tail is evicted before its head
        (a later prompt can only reuse a prefix whose head survives)."""
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block] > 0:
                continue
            if block in self._name_of:
                self._evictable[block] = None
            else:
                self._free.append(block)

    def cached_prefix(self, hashes: Sequence[int]) -> list[int]:
        """The blocks holding the longest prefix of `hashes` (a sequence's full-block names), each
        given one more reference."""
        blocks = []
        if not self.enable_prefix_caching:
            return blocks
        for name in hashes:
            block = self._block_named.get(name)
            if block is None:
                break
            blocks.append(block)
        for block in blocks:
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
        return blocks

    def name(self, block: int, name: int) -> None:
        """Record that `block` (now full and computed) holds the prefix called `name`. If another
        block already holds it, this one stays unnamed and is freed as usual."""
        if self.enable_prefix_caching and name not in self._block_named and block not in self._name_of:
            self._block_named[name] = block
            self._name_of[block] = name


def bytes_per_block(cfg: GemmaConfig, block_size: int, dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return cfg.num_layers * 2 * block_size * cfg.num_kv_heads * cfg.head_dim * itemsize


def kv_cache_budget(config: EngineConfig, cfg: GemmaConfig, dtype: torch.dtype, device: torch.device,
                    max_model_len: int) -> int:
    """The KV cache's bytes: kv_cache_bytes, or with gpu_memory_utilization what that share of the
    device leaves after what this process holds now (called once the weights are loaded)."""
    utilization = config.gpu_memory_utilization
    if utilization is None:
        return config.kv_cache_bytes
    total, used = total_memory_bytes(device), used_memory_bytes(device)
    if total is None or used is None:
        raise ValueError(f"gpu_memory_utilization needs {device}'s total memory and this process's use of it, "
                         f"which cannot be read here; set kv_cache_bytes instead")
    budget = utilization_budget(utilization, total, used, free_memory_bytes(device),
                                bytes_per_block(cfg, config.block_size, dtype),
                                blocks_for(max_model_len, config.block_size), str(device))
    log.info("KV cache budget %d bytes: gpu_memory_utilization %s of %d bytes on %s, %d bytes in use",
             budget, utilization, total, device, used)
    return budget


class PagedKVCache:
    """K and V for every layer as flat slot arrays [num_blocks * block_size, kv_heads, head_dim];
    slot = block_id * block_size + offset."""

    def __init__(self, cfg: GemmaConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        shape = (cfg.num_layers, 2, num_blocks * block_size, cfg.num_kv_heads, cfg.head_dim)
        self.slots = torch.zeros(shape, dtype=dtype, device=device)

    @classmethod
    def from_budget(cls, cfg: GemmaConfig, budget_bytes: int, block_size: int, dtype, device,
                    enable_prefix_caching: bool = True):
        block_bytes = bytes_per_block(cfg, block_size, dtype)
        num_blocks = budget_bytes // block_bytes
        if num_blocks < 1:
            raise ValueError(f"KV cache budget {budget_bytes} bytes holds no block of {block_size} tokens")
        # Checked before allocating: a CUDA allocation that does not fit fails with a traceback that
        # names no setting, and on the CPU an overcommitted one succeeds and is OOM-killed later.
        free = free_memory_bytes(torch.device(device))
        if free is not None and num_blocks * block_bytes > free:
            raise ValueError(f"kv_cache_bytes={budget_bytes} does not fit: {free} bytes are free on {device} "
                             f"(after the weights); set kv_cache_bytes below that")
        return cls(cfg, num_blocks, block_size, dtype, device, enable_prefix_caching)

    def layer(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.slots[idx, 0], self.slots[idx, 1]

    def blocks_for(self, num_tokens: int) -> int:
        return blocks_for(num_tokens, self.block_size)

    def usage(self) -> CacheUsage:
        pool = self.pool
        return CacheUsage(pool.num_blocks, pool.num_used, pool.num_cached, self.block_size,
                          self.slots.numel() * self.slots.element_size())
