"""Which adapters the engine can serve, and getting them into slots without stalling steps.

Names resolve through the registry (or a script's dict); files are fetched, validated and laid
out on a background thread; the step thread only installs a ready copy when a slot is free
(docs/design.md §4). A copy whose checksum no longer matches the registry's is reloaded, never
served stale.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from cold_ray.adapters.peft import load_peft_adapter
from cold_ray.adapters.slots import AdapterSlots, PackedAdapter, background_priority
from cold_ray.adapters.sources import AdapterResolver, AdapterSource
from cold_ray.config import EngineConfig
from cold_ray.decoding import ColdParams
from cold_ray.engine.request import UnknownAdapterError
from cold_ray.model.config import ModelArgs


class AdapterLoader:
    def __init__(self, args: ModelArgs, config: EngineConfig, slots: AdapterSlots,
                 resolver: AdapterResolver | None, stats: dict):  # fmt: skip
        self.args, self.config, self.slots, self.stats = args, config, slots, stats
        self._sources: dict[str, AdapterSource] = {}
        self.resolver = resolver or self._sources.__getitem__
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-load",
                                        initializer=background_priority)  # fmt: skip
        self._loading: dict[str, tuple[Future, float]] = {}  # name -> (read, started)

    def register(self, name: str, path: str | Path, cold: ColdParams | None = None) -> None:
        """Make an adapter known by name (a script's stand-in for the registry)."""
        self._sources[name] = AdapterSource(str(path), cold=cold)
        self.slots.forget(name)

    def source(self, name: str) -> AdapterSource:
        try:
            return self.resolver(name)
        except KeyError as e:
            raise UnknownAdapterError(f"adapter {name!r} does not exist") from e

    def read(self, name: str, source: AdapterSource) -> PackedAdapter:
        """Fetch, validate and lay out adapter `name` (the load thread's work)."""
        if source.prepare is not None:
            source.prepare()
        adapter = load_peft_adapter(source.path, self.args, self.config.max_lora_rank,
                                    max_bytes=self.config.max_adapter_bytes,
                                    expected_sha256=source.sha256)  # fmt: skip
        return self.slots.pack(adapter)

    def load_now(self, name: str) -> int:
        """Load an adapter now (blocking) and return its slot; for scripts and tests."""
        source = self.source(name)
        self.slots.current(name, source.sha256)
        slot = self.slots.lookup(name)
        if slot is None:
            t0 = time.perf_counter()
            slot = self.slots.install(name, self.slots.cached(name) or self.read(name, source))
            self.stats["adapter_load_seconds"] += time.perf_counter() - t0
        return slot

    def ensure(self, name: str) -> bool:
        """True when `name` is resident; otherwise start or finish its load off the step thread
        and say False. Raises (UnknownAdapterError, AdapterError, ...) when it cannot be
        served: the caller fails the requests waiting for it."""
        source = self.source(name)
        if not self.slots.current(name, source.sha256):
            return False  # replaced in the registry; rows still run the old version: wait
        if self.slots.lookup(name) is not None:
            return True
        cached = self.slots.cached(name)
        if cached is not None:  # in host memory: no file read, just wait for a free slot
            if not self.slots.has_room():
                return False
            self.slots.install(name, cached)
            return True
        if name not in self._loading:
            self._loading[name] = (self._pool.submit(self.read, name, source), time.perf_counter())
            return False
        future, started = self._loading[name]
        if not future.done() or not self.slots.has_room():
            return False  # every slot is pinned by running rows: wait, do not fail
        del self._loading[name]
        self.slots.install(name, future.result())  # a bad adapter raises here
        self.stats["adapter_load_seconds"] += time.perf_counter() - started
        return True

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
