"""The engine deployment: one `AsyncEngine` per replica, pinned to the device Ray assigned.

The ingress calls `generate` through a DeploymentHandle with `multiplexed_model_id=<adapter>`,
so Serve routes an adapter's traffic to replicas that already hold it; the multiplexed loader
(`max_num_models_per_replica` = `max_loras`) gives Serve's router its view of which replica
holds what, while the engine reads the adapter off its step thread and installs it in a slot
when the first request for it is admitted (LRU, refcounted). Mixed-adapter batching happens
inside the engine, so Serve's `@serve.batch` (which splits batches by model id) is not used.

`generate` takes the `GenerationRequest` the ingress built and yields the engine's
`RequestOutput`s as they are, the first marked with this replica's id. A failure ends the
stream with a final output carrying the error, so the ingress can answer with the right
status before it sends any byte of a stream (cold_ray.serve.errors maps errors to statuses).
Nothing slow runs on the replica's event loop: tokenisation runs on the engine's tokenizer
thread, a catalog read on a multiplex miss on a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from ray import serve

from cold_ray import device as devices
from cold_ray.decoding import GenerationRequest
from cold_ray.engine import AsyncEngine, RequestOutput
from cold_ray.serve.app_args import AppArgs
from cold_ray.serve.errors import classify
from cold_ray.serve.metrics import EngineMetrics, Sampler

log = logging.getLogger(__name__)
_ACCELERATOR_HINT = {
    "npu": "give the engine deployment ray_actor_options: {resources: {NPU: 1}}",
    "cuda": "give the engine deployment ray_actor_options: {num_gpus: 1}",
}


@serve.deployment(
    name="ColdEngine",
    max_ongoing_requests=32,
    max_queued_requests=64,
    ray_actor_options={"num_cpus": 1},
    health_check_period_s=10,
)
class ColdEngine:
    def __init__(self, args: dict):
        self.args = AppArgs.model_validate(args)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        device, self.assignment = self._pin(self.args.engine.device)
        self.registry = self.args.open_registry()
        self.engine = AsyncEngine(
            self.args.engine_config(device), resolver=self.registry.resolver()
        )
        self.device = str(self.engine.core.device)

        async def lease(name: str) -> str:  # Serve keeps its LRU state on a function
            return await self._lease(name)

        self._lease_fn = lease
        self._adapter = serve.multiplexed(max_num_models_per_replica=self.args.engine.max_loras)(
            lease
        )
        self.metrics = EngineMetrics()
        self.sampler = Sampler(lambda: self.metrics.sample(self.engine.stats()))
        self.sampler.start()
        log.info("engine replica %s on %s (%s)", self.replica_id, self.device, self.assignment)

    def _pin(self, configured: str) -> tuple[str, dict]:
        """The device Ray assigned this replica; fails the start with a clear message."""
        kind = configured.split(":")[0]
        try:
            device, info = devices.from_ray_assignment(kind)
        except RuntimeError as e:
            raise RuntimeError(f"{e}: {_ACCELERATOR_HINT.get(kind, '')}") from e
        if self.args.simulate_accelerator:
            return "cpu", info
        return device, info

    async def _lease(self, name: str) -> str:
        """Serve's multiplex loader: the adapter is routed here from now on. An adapter
        registered a moment ago through another process may not be in this replica's snapshot
        yet: read the catalog once (the engine then says 404 if it truly does not exist)."""
        if name not in self.registry.snapshot().sources:
            await asyncio.to_thread(self.registry.refresh)
        return name

    async def generate(self, request: GenerationRequest):
        """Stream one request: see the module docstring for what is yielded."""
        first = True
        try:
            if request.adapter is not None:
                await self._adapter(request.adapter)  # Serve's multiplex LRU; a miss: _lease
            stream = await self.engine.submit(request)
            self.metrics.request("cold" if request.cold else "plain", request.adapter)
            try:
                async for out in stream:
                    if first:
                        out.served_by, first = self.replica_id, False
                    yield out
            finally:
                await stream.aclose()  # a cancelled (disconnected) request frees its rows here
        except Exception as e:  # refused, its adapter did not load, or a step failed it
            status, code = classify(e)
            if status >= 500 and code not in ("queue_timeout", "registry_unavailable"):
                log.error("request %s failed", request.request_id, exc_info=e)
            out = RequestOutput(request.request_id, "", [], finished=True, finish_reason="error")
            out.error, out.served_by = e, self.replica_id
            yield out

    # ---- introspection --------------------------------------------------------------------

    def stats(self) -> dict:
        return {**self.engine.stats(), "replica": self.replica_id, "device": self.device}

    def info(self) -> dict:
        return {
            "replica": self.replica_id,
            "device": self.device,
            "assignment": self.assignment,
            "pid": os.getpid(),
            "multiplexed": self.multiplexed(),
            "max_model_len": self.args.engine.max_model_len,
            "time": time.time(),
        }

    def multiplexed(self) -> list[str]:
        """Adapters Serve's multiplexer counts as held here (what routing sees), LRU first."""
        wrapper = getattr(self._lease_fn, "__serve_multiplex_wrapper", None)
        return list(wrapper.models) if wrapper is not None else []

    def check_health(self) -> None:
        if not self.engine._thread.is_alive():
            raise RuntimeError("the engine step thread has died")

    def __del__(self):
        sampler = getattr(self, "sampler", None)
        if sampler is not None:
            sampler.stop()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
