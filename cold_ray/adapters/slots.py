"""Per-replica adapter slots: LRU over idle adapters, refcounted so a running row's adapter is
never evicted, with a host-memory cache of validated adapters for fast reloads.

Only the engine thread touches an `AdapterSlots`; adapter files are read elsewhere. Each
resident or cached copy remembers the sha256 it was read with, so an adapter replaced in the
registry under the same name is reloaded rather than served stale (see `current`).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from cold_ray.adapters.peft import AdapterError, PeftAdapter
from cold_ray.model.config import FUSED_SITES
from cold_ray.model.llama import LlamaModel


@dataclass
class PackedAdapter:
    """A validated adapter already laid out as the model's slots hold it (see `pack`): an
    install is two copies per LoRA site, cheap enough to do between decode steps."""

    sha256: str
    rank: int
    scale: float
    nbytes: int  # host memory it holds
    # per layer: site name -> (A [parts * r_max, in], B [out, parts * r_max])
    sites: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(repr=False)


def background_priority() -> None:
    """Lower the calling thread's CPU priority (Linux: per thread), so that an adapter load
    yields the core to the decode loop when the machine is busy."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):  # not Linux, or not allowed: loads just compete
        pass


class AdapterSlots:
    def __init__(self, model: LlamaModel, max_loras: int, host_cache_size: int):
        self.model = model
        self.max_loras = max_loras
        self.resident: OrderedDict[str, int] = OrderedDict()  # name -> slot, LRU first
        self.versions: dict[str, str] = {}  # resident name -> sha256 of its weights
        self.refs: dict[str, int] = {}
        self.host: OrderedDict[str, PackedAdapter] = OrderedDict()
        self.host_cache_size = host_cache_size
        self.loads = 0
        self.evictions = 0

    def lookup(self, name: str) -> int | None:
        slot = self.resident.get(name)
        if slot is not None:
            self.resident.move_to_end(name)
        return slot

    def pack(self, adapter: PeftAdapter) -> PackedAdapter:
        """Lay an adapter out in slot format. Touches no slot state: the load thread calls it,
        so the engine thread only copies."""
        if isinstance(adapter, PackedAdapter):
            return adapter
        sites = []
        for i, layer in enumerate(self.model.layers):
            packed = {}
            for site_name, site in layer.lora_sites().items():
                parts = [adapter.weights.get((i, m)) for m in FUSED_SITES[site_name]]
                packed[site_name] = site.pack(parts)
            sites.append(packed)
        lossy = sites[0]["qkv_proj"][0].dtype not in (torch.float32, torch.float64)
        if lossy and not all(torch.isfinite(t.sum()) or torch.isfinite(t).all()
                             for layer in sites for ab in layer.values() for t in ab):  # fmt: skip
            raise AdapterError(f"adapter weights overflow the model dtype {self.model.norm.dtype}")
        nbytes = sum(t.nbytes for layer in sites for ab in layer.values() for t in ab)
        return PackedAdapter(adapter.sha256, adapter.rank, adapter.scale, nbytes, sites)

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

    def current(self, name: str, sha256: str | None) -> bool:
        """Drop copies of `name` whose weights differ from `sha256` (the registry's).

        False when an outdated copy is still pinned by running rows: the caller waits.
        """
        if sha256 is None:
            return True
        cached = self.host.get(name)
        if cached is not None and cached.sha256 != sha256:
            del self.host[name]
        if name in self.resident and self.versions.get(name) != sha256:
            if name in self.refs:
                return False
            self._evict(name)
        return True

    def has_room(self) -> bool:
        return len(self.resident) < self.max_loras or any(n not in self.refs for n in self.resident)

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
        self.versions[name] = adapter.sha256
        self.loads += 1
        self.host[name] = adapter
        self.host.move_to_end(name)
        while len(self.host) > self.host_cache_size:
            self.host.popitem(last=False)
        return slot

    def forget(self, name: str) -> None:
        """Drop an adapter from the host cache (and its slot, if idle): its source changed."""
        self.host.pop(name, None)
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

    def _write(self, slot: int, adapter: PackedAdapter) -> None:
        for layer, packed in zip(self.model.layers, adapter.sites):
            for site_name, site in layer.lora_sites().items():
                site.write_packed(slot, *packed[site_name], adapter.scale)
