"""Asynchronous front of the engine: a background thread runs `EngineCore.step()` while
callers `submit()` requests and iterate over their outputs from an asyncio event loop."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from cold_ray.adapters.sources import AdapterResolver
from cold_ray.config import EngineConfig
from cold_ray.decoding import ColdParams, GenerationRequest, SamplingParams
from cold_ray.engine.core import EngineCore
from cold_ray.engine.request import Request, RequestOutput

log = logging.getLogger(__name__)


class AsyncEngine:
    def __init__(self, config: EngineConfig, resolver: AdapterResolver | None = None):
        self.core = EngineCore(config, resolver)
        self.core.driven_by_thread = True
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._sinks: dict[str, Callable[[RequestOutput], None]] = {}
        self._stopped = False
        self._tokenizer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        self._thread = threading.Thread(target=self._loop, name="cold-engine", daemon=True)
        self._thread.start()

    async def submit(
        self,
        request: GenerationRequest | str | list[int],
        params: SamplingParams | None = None,
        adapter: str | None = None,
        cold: ColdParams | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Tokenize and check the request off the event loop (raising EngineError /
        UnknownAdapterError naming the problem), then stream its outputs.

        Closing the iterator early (client gone, task cancelled) aborts the request, which
        frees its rows and cache at the next step boundary. Tokenisation (chat templates
        included) has one thread of its own: a fast tokenizer is not made for concurrent use,
        and one thread keeps requests in arrival order.
        """
        loop = asyncio.get_running_loop()
        req = await loop.run_in_executor(
            self._tokenizer, self.core.make_request, request, params, adapter, cold, request_id
        )
        return self._stream(req)

    async def _stream(self, req: Request) -> AsyncIterator[RequestOutput]:
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._send(("add", req, lambda out: loop.call_soon_threadsafe(outputs.put_nowait, out)))
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                finished = out.finished
                if out.error is not None:
                    raise out.error
                yield out
        finally:
            if not finished:
                self._send(("abort", req.request_id, None))

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id, None))

    def _send(self, command) -> None:
        self._inbox.put(command)
        self._wake.set()

    def _drain(self) -> None:
        while True:
            try:
                op, arg, sink = self._inbox.get_nowait()
            except queue.Empty:
                return
            if op == "add":
                self._sinks[arg.request_id] = sink
                self.core.add(arg)
            elif op == "abort":
                out = self.core.abort(arg)
                if out is not None:
                    self._deliver(out)
                self._sinks.pop(arg, None)

    def _deliver(self, out: RequestOutput) -> None:
        sink = self._sinks.get(out.request_id)
        if out.finished:
            self._sinks.pop(out.request_id, None)
        if sink is None:
            return
        try:
            sink(out)
        except Exception:  # e.g. the caller's event loop is closed: drop this stream only
            log.exception("could not deliver an output of %s; aborting it", out.request_id)
            self._sinks.pop(out.request_id, None)
            if not out.finished:
                self.core.abort(out.request_id)

    def _loop(self) -> None:
        # Intra-op thread settings are per thread: apply the configured count here too, or the
        # step thread would run with the process default (different speed, and BLAS may pick
        # a different reduction order than the caller's thread).
        if self.core.config.num_threads is not None:
            torch.set_num_threads(self.core.config.num_threads)
        while not self._stopped:
            try:
                self._iterate()
            except Exception:  # the step thread outlives any error: it is the replica's heart
                log.exception("engine loop error")

    def _iterate(self) -> None:
        self._drain()
        if not self.core.has_work():
            self._wake.wait(timeout=0.1)
            self._wake.clear()
            return
        try:
            outputs = self.core.step()
        except Exception as e:  # a bug outside any one request: the running ones end
            log.exception("engine step failed; failing the running requests")
            outputs = self.core.fail_running(e)
        for out in outputs:
            self._deliver(out)
        if not outputs and not self.core.running:
            self._wake.wait(timeout=0.002)  # waiting only on an adapter load
            self._wake.clear()

    def stats(self) -> dict:
        core = self.core
        return {
            **core.stats,
            "running_requests": len(core.running),
            "running_rows": len(core.cache.rows),
            "waiting_requests": len(core.waiting),
            "kv_cache_usage": core.kv_usage(),
            "resident_adapters": list(core.slots.resident),
            "adapter_loads": core.slots.loads,
            "adapter_evictions": core.slots.evictions,
            "lora_backend": core.backend.name,
        }

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=5)
        self._tokenizer.shutdown(wait=False)
        self.core.shutdown()
