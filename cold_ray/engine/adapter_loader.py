"""Which adapters the engine can serve, and getting them into slots without stalling steps.

Names resolve through the registry (or a script's dict); files are fetched, validated and laid
out on a background thread; the step thread only installs a ready copy when a slot is free
(docs/design.md §4). Every copy carries the checksum it was read with, and is installed only
while that is the registry's current one: a load that finished after the adapter was replaced
is dropped and read again, never served stale. A load that no waiting request needs any more
is dropped too, so finished loads never pile up outside `host_cache_bytes`.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from cold_ray.adapters.peft import files_checksum, load_peft_adapter
from cold_ray.adapters.slots import AdapterSlots, PackedAdapter, background_priority
from cold_ray.adapters.sources import AdapterResolver, AdapterSource
from cold_ray.config import EngineConfig
from cold_ray.decoding import ColdParams
from cold_ray.engine.request import UnknownAdapterError
from cold_ray.model.args import ModelArgs


@dataclass
class _Load:
    future: Future  # -> PackedAdapter
    checksum: str | None  # the registry's checksum when the load started
    started: float


class AdapterLoader:
    def __init__(
        self,
        args: ModelArgs,
        config: EngineConfig,
        slots: AdapterSlots,
        resolver: AdapterResolver | None,
        stats: dict,
    ):
        self.args, self.config, self.slots, self.stats = args, config, slots, stats
        self._sources: dict[str, AdapterSource] = {}
        self.resolver = resolver or self._sources.__getitem__
        self._pool = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="adapter-load", initializer=background_priority
        )
        self._loading: dict[str, _Load] = {}

    def register(self, name: str, path: str | Path, cold: ColdParams | None = None) -> None:
        """Make an adapter known by name (a script's stand-in for the registry). Its checksum is
        taken now, as the registry does, so a later `register` of other files under the same
        name is a replacement the slots see."""
        try:
            checksum = files_checksum(path)
        except OSError:  # missing or unreadable: its requests fail with the load's own error
            checksum = None
        self._sources[name] = AdapterSource(str(path), sha256=checksum, cold=cold)
        self.slots.forget(name)
        self._loading.pop(name, None)

    def source(self, name: str) -> AdapterSource:
        try:
            return self.resolver(name)
        except KeyError as e:
            raise UnknownAdapterError(f"adapter {name!r} does not exist") from e

    def read(self, name: str, source: AdapterSource) -> PackedAdapter:
        """Fetch, validate and lay out adapter `name` (the load thread's work)."""
        if source.prepare is not None:
            source.prepare()
        adapter = load_peft_adapter(
            source.path,
            self.args,
            self.config.max_lora_rank,
            max_bytes=self.config.max_adapter_bytes,
            expected_sha256=source.sha256,
        )
        return self.slots.pack(adapter)

    @property
    def loading(self) -> list[str]:
        """Adapters whose files are being read, or were read and wait for a slot."""
        return list(self._loading)

    def load_now(self, name: str) -> int:
        """Load an adapter now (blocking) and return its slot; for scripts and tests."""
        source = self.source(name)
        self.slots.current(name, source.sha256)
        slot = self.slots.lookup(name)
        if slot is None:
            t0 = time.perf_counter()
            cached = self._cached(name, source)
            slot = self.slots.install(name, cached or self.read(name, source))
            self.stats["adapter_load_seconds"] += time.perf_counter() - t0
        return slot

    def ensure(self, name: str, keep_idle: int = 0) -> bool:
        """True when `name` is resident and may be pinned without leaving fewer than
        `keep_idle` slots free or idle (the claims of older waiting requests); otherwise start
        or finish its load off the step thread and say False. Raises (UnknownAdapterError,
        AdapterError, ...) when it cannot be served: the caller fails its waiting requests."""
        source = self.source(name)
        if not self.slots.current(name, source.sha256):
            return False  # replaced in the registry; rows still run the old version: wait
        if self.slots.lookup(name) is not None:
            return self.slots.can_pin(name, keep_idle)
        packed = self._cached(name, source)
        if packed is None:  # read it off this thread (now, if not yet started)
            load = self._current_load(name, source)
            if not load.future.done() or not self.slots.can_install(keep_idle):
                return False
            del self._loading[name]
            packed = load.future.result()  # a bad adapter raises here
            self.stats["adapter_load_seconds"] += time.perf_counter() - load.started
        elif not self.slots.can_install(keep_idle):
            return False  # every slot is pinned or claimed by an older request: wait
        self.slots.install(name, packed)
        return True

    def _cached(self, name: str, source: AdapterSource) -> PackedAdapter | None:
        """The host copy, if it is of the registry's current version."""
        cached = self.slots.cached(name)
        if cached is not None and source.sha256 not in (None, cached.checksum):
            return None
        return cached

    def _current_load(self, name: str, source: AdapterSource) -> _Load:
        """The read of `name` at the registry's current checksum, started if needed; a read
        of an older version is dropped (its thread's result is discarded)."""
        load = self._loading.get(name)
        if load is None or load.checksum != source.sha256:
            future = self._pool.submit(self.read, name, source)
            load = self._loading[name] = _Load(future, source.sha256, time.perf_counter())
        return load

    def drop_loads_except(self, wanted: set[str]) -> None:
        """Forget loads that no waiting request needs (a running read finishes unseen)."""
        for name in [n for n in self._loading if n not in wanted]:
            del self._loading[name]

    def pin(self, name: str) -> tuple[int, str | None]:
        """Pin a resident adapter for a request's rows: (its slot, the checksum it runs)."""
        return self.slots.acquire(name), self.slots.versions.get(name)

    def unpin(self, name: str) -> None:
        self.slots.release(name)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
