"""Per-replica adapter slots: LRU over idle adapters, refcounted so a running row's adapter is
never evicted, with a host-memory cache of validated adapters for fast reloads, bounded in
bytes.

Only the engine thread touches an `AdapterSlots`; adapter files are read elsewhere. Each
resident or cached copy remembers the checksum it was read with (weights and config), so an
adapter replaced in the registry under the same name is reloaded rather than served stale
(see `current`). Host copies are kept compact — each module at its own rank, in the model's
dtype — and laid into the rank-padded slot only when installed.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from cold_ray.adapters.peft import AdapterError, PeftAdapter
from cold_ray.model.args import FUSED_SITES
from cold_ray.model.llama import LlamaModel


@dataclass
class PackedAdapter:
    """A validated adapter in the model's dtype, grouped by the model's LoRA sites (see
    `pack`): an install is a few copies per site, cheap enough to do between decode steps."""

    checksum: str  # the registry's checksum this copy was verified against
    rank: int
    scale: float
    nbytes: int  # host memory it holds
    # per layer: site name -> per fused part, (A [r, in], B [out_part, r]) or None
    sites: list[dict[str, list[tuple[torch.Tensor, torch.Tensor] | None]]] = field(repr=False)


def background_priority() -> None:
    """Lower the calling thread's CPU priority (Linux: per thread), so that an adapter load
    yields the core to the decode loop when the machine is busy."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):  # not Linux, or not allowed: loads just compete
        pass


class AdapterSlots:
    def __init__(self, model: LlamaModel, max_loras: int, host_cache_bytes: int):
        self.model = model
        self.max_loras = max_loras
        self.resident: OrderedDict[str, int] = OrderedDict()  # name -> slot, LRU first
        self.versions: dict[str, str] = {}  # resident name -> checksum of its files
        self.refs: dict[str, int] = {}
        self.host: OrderedDict[str, PackedAdapter] = OrderedDict()  # LRU first
        self.host_cache_bytes = host_cache_bytes
        self.host_bytes = 0  # what the host copies hold now, <= host_cache_bytes
        self.loads = 0
        self.evictions = 0

    def lookup(self, name: str) -> int | None:
        slot = self.resident.get(name)
        if slot is not None:
            self.resident.move_to_end(name)
        return slot

    def pack(self, adapter: PeftAdapter) -> PackedAdapter:
        """Cast an adapter to the model's dtype and group it by LoRA site, unpadded. Touches no
        slot state: the load thread calls it, so the engine thread only copies."""
        if isinstance(adapter, PackedAdapter):
            return adapter
        dtype = next(iter(self.model.layers[0].lora_sites().values())).lora_A.dtype
        sites, tensors = [], []
        for i, layer in enumerate(self.model.layers):
            packed = {}
            for site_name in layer.lora_sites():
                parts = []
                for m in FUSED_SITES[site_name]:
                    ab = adapter.weights.get((i, m))
                    if ab is not None:
                        ab = (ab[0].to(dtype).contiguous(), ab[1].to(dtype).contiguous())
                        tensors += ab
                    parts.append(ab)
                packed[site_name] = parts
            sites.append(packed)
        if dtype not in (torch.float32, torch.float64) and not all(
            torch.isfinite(t.sum()) or torch.isfinite(t).all() for t in tensors
        ):
            raise AdapterError(f"adapter weights overflow the model dtype {dtype}")
        nbytes = sum(t.nbytes for t in tensors)
        version = adapter.version or adapter.checksum
        return PackedAdapter(version, adapter.rank, adapter.scale, nbytes, sites)

    def cached(self, name: str) -> PackedAdapter | None:
        adapter = self.host.get(name)
        if adapter is not None:
            self.host.move_to_end(name)
        return adapter

    def acquire(self, name: str) -> int:
        self.refs[name] = self.refs.get(name, 0) + 1
        return self.lookup(name)

    def release(self, name: str) -> None:
        self.refs[name] -= 1
        if self.refs[name] == 0:
            del self.refs[name]

    def current(self, name: str, checksum: str | None) -> bool:
        """Drop copies of `name` whose checksum differs from `checksum` (the registry's, over
        weights and config).

        False when an outdated copy is still pinned by running rows: the caller waits.
        """
        if checksum is None:
            return True
        cached = self.host.get(name)
        if cached is not None and cached.checksum != checksum:
            self._uncache(name)
        if name in self.resident and self.versions.get(name) != checksum:
            if name in self.refs:
                return False
            self._evict(name)
        return True

    def has_room(self) -> bool:
        return self.available() > 0

    def available(self) -> int:
        """Slots that are free or hold an idle (unpinned) adapter: what an install can take."""
        idle = sum(1 for n in self.resident if n not in self.refs)
        return self.max_loras - len(self.resident) + idle

    def can_install(self, keep_idle: int = 0) -> bool:
        """Whether installing (then pinning) one more adapter leaves `keep_idle` slots free or
        idle for the adapters that older waiting requests claim."""
        return self.available() >= keep_idle + 1

    def can_pin(self, name: str, keep_idle: int = 0) -> bool:
        """Whether pinning resident `name` leaves `keep_idle` slots free or idle: sharing a pin
        takes no slot; pinning an idle adapter takes one."""
        return self.available() - (name not in self.refs) >= keep_idle

    def install(self, name: str, adapter: PeftAdapter | PackedAdapter) -> int:
        """Place an adapter in a free slot, evicting the least recently used idle one."""
        adapter = self.pack(adapter)
        used = set(self.resident.values())
        free = [s for s in range(self.max_loras) if s not in used]
        if free:
            slot = free[0]
        else:
            victim = next((n for n in self.resident if n not in self.refs), None)
            if victim is None:
                raise RuntimeError("all adapter slots are in use by running requests")
            slot = self._evict(victim, clear=False)  # overwritten next
        self._write(slot, adapter)
        self.resident[name] = slot
        self.versions[name] = adapter.checksum
        self.loads += 1
        self._cache(name, adapter)
        return slot

    def _cache(self, name: str, adapter: PackedAdapter) -> None:
        """Keep a host copy, dropping the least recently used ones to stay within the bound;
        an adapter larger than the whole bound is not kept."""
        if self.host.get(name) is adapter:
            self.host.move_to_end(name)
            return
        self._uncache(name)
        if adapter.nbytes > self.host_cache_bytes:
            return
        while self.host and self.host_bytes + adapter.nbytes > self.host_cache_bytes:
            self._uncache(next(iter(self.host)))
        self.host[name] = adapter
        self.host_bytes += adapter.nbytes

    def _uncache(self, name: str) -> None:
        adapter = self.host.pop(name, None)
        if adapter is not None:
            self.host_bytes -= adapter.nbytes

    def forget(self, name: str) -> None:
        """Drop an adapter from the host cache (and its slot, if idle): its source changed."""
        self._uncache(name)
        if name in self.resident and name not in self.refs:
            self._evict(name)

    def _evict(self, name: str, clear: bool = True) -> int:
        """Free an idle adapter's slot (zeroed, so a stale index can only add zeros)."""
        slot = self.resident.pop(name)
        self.versions.pop(name, None)
        self.evictions += 1
        if clear:
            for layer in self.model.layers:
                for site in layer.lora_sites().values():
                    site.clear_slot(slot)
        return slot

    @torch.no_grad()
    def _write(self, slot: int, adapter: PackedAdapter) -> None:
        """Lay a compact adapter into the slot: part j of a fused site takes rank band j
        (A rows, B columns) and its own output rows of B, as `LoraLinear` lays it out."""
        for layer, packed in zip(self.model.layers, adapter.sites):
            for site_name, site in layer.lora_sites().items():
                a_slot, b_slot = site.lora_A[slot], site.lora_B[slot]
                a_slot.zero_()
                b_slot.zero_()
                offset = 0
                for j, (out, part) in enumerate(zip(site.part_out, packed[site_name])):
                    if part is not None:
                        a, b = part
                        band = slice(j * site.max_rank, j * site.max_rank + a.shape[0])
                        a_slot[band].copy_(a)
                        b_slot[offset : offset + out, band].copy_(b)
                    offset += out
                site.lora_scale[slot] = adapter.scale
