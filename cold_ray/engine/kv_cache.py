"""The KV cache: one preallocated dense slot per batch row, and the rows that own them.

A row's slot holds the keys and values of every token it has processed, at their positions.
Slots are handed out lowest-first and compacted between steps (the highest row moves into the
lowest hole), so the running rows occupy slots 0..n-1 and decode attention can read the cache
as a view instead of gathering it (docs/design.md §3).
"""

from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from cold_ray.engine.request import Request
    from cold_ray.model.args import ModelArgs


@dataclass(eq=False)
class Row:
    """One batch row: a KV slot holding one token stream of a request. Found by identity."""

    request: Request
    adapter_slot: int  # LoRA slot; -1 = base model (the amateur row of a CoLD pair)
    slot: int = -1  # KV cache slot; changes only when compaction moves the row between steps
    length: int = 0  # tokens whose K/V are in the slot (positions 0..length-1)
    prefix_key: object = None  # prefix-cache identity of this row's KV (adapter + weights)

    @property
    def prompt_left(self) -> int:
        return len(self.request.prompt_ids) - self.length


@dataclass
class KVCache:
    k: torch.Tensor  # [layers, slots, kv_heads, max_len, head_dim]
    v: torch.Tensor  # [layers, slots, kv_heads, max_len, head_dim]
    rows: list[Row] = field(default_factory=list)  # rows holding a slot, in no fixed order
    _free: list[int] = field(default_factory=list)  # min-heap of free slots

    @classmethod
    def allocate(cls, args: ModelArgs, slots: int, max_len: int, dtype, device) -> KVCache:
        shape = (args.num_layers, slots, args.num_kv_heads, max_len, args.head_dim)
        cache = cls(
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
        )
        cache._free = list(range(slots))
        return cache

    @property
    def num_slots(self) -> int:
        return self.k.shape[1]

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def peek_free(self) -> int:
        """The slot `add` would hand out next (scratch space between steps)."""
        return self._free[0]

    def add(self, row: Row) -> None:
        """Give `row` the lowest free slot (the caller checked `free_slots`)."""
        row.slot = heapq.heappop(self._free)
        row.length = 0
        self.rows.append(row)

    def remove(self, row: Row) -> None:
        self.rows.remove(row)
        heapq.heappush(self._free, row.slot)
        row.slot = -1

    def compact(self) -> None:
        """Move the highest rows into the lowest holes until rows fill slots 0..n-1. Runs only
        between steps, so no step ever sees a row move."""
        by_slot = sorted(self.rows, key=lambda r: r.slot)
        while self._free and by_slot and self._free[0] < by_slot[-1].slot:
            row, hole = by_slot.pop(), heapq.heappop(self._free)
            self.copy(row.slot, hole, row.length)
            self.scrub(row.slot, row.length)  # the slot it leaves holds nothing of it
            heapq.heappush(self._free, row.slot)
            row.slot = hole
            bisect.insort(by_slot, row, key=lambda r: r.slot)

    def scrub(self, slot: int, length: int | None = None) -> None:
        """Zero positions [0, length) of a slot (None: all of it) as its occupant leaves it.
        Attention reads positions past a row's length under a mask (the next chunk's span, a
        decode graph's span bucket), and a masked non-finite value still poisons the sum
        (0 · NaN = NaN): a row whose forward overflowed can even end normally — a key of −inf
        only zeroes its own attention weight — and must not leave that to the next occupant.
        Costs one write of what the row wrote."""
        self.k[:, slot, :, :length].zero_()
        self.v[:, slot, :, :length].zero_()

    def copy(self, src: int, dst: int, length: int) -> None:
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def read(self, slot: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of positions [start, end) of a slot: [layers, kv_heads, end-start, head_dim]."""
        return self.k[:, slot, :, start:end], self.v[:, slot, :, start:end]

    def write(self, slot: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        end = start + k.shape[2]
        self.k[:, slot, :, start:end] = k
        self.v[:, slot, :, start:end] = v

    def usage(self) -> float:
        return len(self.rows) / self.num_slots
