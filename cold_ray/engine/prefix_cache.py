"""Prompt-prefix KV reuse across requests, built for CoLD (docs/design.md §8).

A block holds the K/V of `block_size` consecutive prompt tokens of one row. It is keyed by
(its parent block, the row's identity, its tokens), so a block stands for the whole prefix up
to its end, under that identity. The identity is what the K/V depend on besides the tokens:
`BASE` for rows without an adapter — the amateur row of every CoLD pair and every base-model
request, whatever the adapter — and (adapter name, weights checksum) for adapter rows. So the
amateur half of a CoLD prompt is computed once for all adapters and all requests.

Reuse copies blocks into the row's dense KV slot (on CPU a token's K/V copy costs about a
thousandth of recomputing it). Keys compare the token tuples themselves: a hit is exact.
Blocks are evicted least-recently-used, leaves first, so a parent never disappears before
its children.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from cold_ray.engine.kv_cache import KVCache

BASE = "base"


@dataclass
class _Block:
    key: tuple  # (parent block id or -1, identity, tokens)
    parent: int
    children: int = 0


class PrefixCache:
    def __init__(self, cache: KVCache, max_bytes: int, block_size: int):
        layers, _, kv_heads, _, head_dim = cache.k.shape
        shape = (layers, kv_heads, block_size, head_dim)
        per_block = 2 * cache.k.element_size() * layers * kv_heads * block_size * head_dim
        self.capacity = max_bytes // per_block
        self.block_size = block_size
        # Uninitialised on purpose: a block is read only after it was written, and untouched
        # pages cost no memory, so the pool takes memory as blocks are stored.
        self.k = torch.empty((self.capacity, *shape), dtype=cache.k.dtype, device=cache.k.device)
        self.v = torch.empty_like(self.k)
        self.cache = cache
        self.ids: dict[tuple, int] = {}
        self.blocks: dict[int, _Block] = {}
        self.leaves: OrderedDict[int, None] = OrderedDict()  # evictable, oldest first
        self._unused = list(range(self.capacity - 1, -1, -1))
        self.stats = {"queried_tokens": 0, "hit_tokens": 0, "evicted_blocks": 0}

    def __len__(self) -> int:
        return len(self.blocks)

    def _key(self, parent: int, identity, tokens: list[int], i: int) -> tuple:
        return (parent, identity, tuple(tokens[i * self.block_size : (i + 1) * self.block_size]))

    def load(self, identity, tokens: list[int], slot: int, limit: int) -> int:
        """Copy the longest cached prefix of `tokens[:limit]` into `slot`; return its length."""
        found, parent = [], -1
        for i in range(limit // self.block_size):
            parent = self.ids.get(self._key(parent, identity, tokens, i), -1)
            if parent < 0:
                break
            found.append(parent)
        self.stats["queried_tokens"] += limit
        if not found:
            return 0
        self._touch(found)
        index = torch.tensor(found, device=self.k.device)
        # [blocks, layers, kv_heads, block_size, head_dim] -> [layers, kv_heads, tokens, head_dim]
        k = self.k[index].permute(1, 2, 0, 3, 4).flatten(2, 3)
        v = self.v[index].permute(1, 2, 0, 3, 4).flatten(2, 3)
        self.cache.write(slot, 0, k, v)
        n = len(found) * self.block_size
        self.stats["hit_tokens"] += n
        return n

    def store(self, identity, tokens: list[int], slot: int, length: int) -> None:
        """Keep the full blocks of the first `length` tokens, whose K/V are in `slot`, up to
        the first block holding a non-finite value."""
        chain, parent, b = [], -1, self.block_size
        for i in range(length // b):
            key = self._key(parent, identity, tokens, i)
            block = self.ids.get(key)
            if block is None:
                k, v = self.cache.read(slot, i * b, (i + 1) * b)
                if not (torch.isfinite(k).all() and torch.isfinite(v).all()):
                    break  # a forward that overflowed: share nothing it computed
                block = self._allocate(key, parent)
                if block is None:
                    break  # full of blocks that other prefixes still extend
                self.k[block].copy_(k)
                self.v[block].copy_(v)
            chain.append(block)
            parent = block
        self._touch(chain)

    def _allocate(self, key: tuple, parent: int) -> int | None:
        if not self._unused and not self._evict_one(keep=parent):
            return None
        block = self._unused.pop()
        self.ids[key] = block
        self.blocks[block] = _Block(key, parent)
        self.leaves[block] = None
        if parent >= 0:
            self.blocks[parent].children += 1
            self.leaves.pop(parent, None)
        return block

    def _evict_one(self, keep: int) -> bool:
        victim = next((b for b in self.leaves if b != keep), None)
        if victim is None:
            return False
        del self.leaves[victim]
        meta = self.blocks.pop(victim)
        del self.ids[meta.key]
        self._unused.append(victim)
        self.stats["evicted_blocks"] += 1
        if meta.parent >= 0:
            parent = self.blocks[meta.parent]
            parent.children -= 1
            if parent.children == 0:  # as old as the child it just lost
                self.leaves[meta.parent] = None
                self.leaves.move_to_end(meta.parent, last=False)
        return True

    def _touch(self, chain: list[int]) -> None:
        for block in chain:  # root first, so the leaf ends up most recent
            if block in self.leaves:
                self.leaves.move_to_end(block)

    def clear(self) -> None:
        self.ids.clear()
        self.blocks.clear()
        self.leaves.clear()
        self._unused = list(range(self.capacity - 1, -1, -1))
